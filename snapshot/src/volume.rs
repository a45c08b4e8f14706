//! The data path: a VDI head or snapshot view as a [`BlockDevice`].
//!
//! A request is split into per-cluster pieces. For each piece the map lookup is one RocksDB seek to
//! `m vol cluster !epoch` (newest entry at or below the view's epoch), falling through to the parent view for
//! clones: the cost depends on clone depth, never on the number of snapshots.
//!
//! Writes, per cluster:
//! - **in place** when the newest entry belongs to the head alone (written at the current epoch, or no live
//!   snapshot between its epoch and now): one data write, no metadata (the fast path);
//! - **redirect on write** otherwise: `reserve cluster → write → commit map entry + allocator change in one
//!   WriteBatch`. Data always reaches its cluster before the entry that points to it is committed, and a cluster
//!   a snapshot can see is never overwritten.
//!
//! **Sub-clusters** (a departure from ARCHITECTURE.md's "copies up the untouched part"): a cluster is 32
//! sub-clusters (2 KiB at the default 64 KiB; never under 512 bytes). When a write smaller than a cluster
//! redirects over a *full* entry, the new entry is *partial*: it holds only the sub-clusters written and its mask
//! says which; the other sub-clusters read through to the entry beneath. The first write after a snapshot then
//! costs one write of the new cluster instead of a 64 KiB read plus a 64 KiB write. Later head writes go in
//! place; those touching new sub-clusters widen the mask, and the widening is committed with the next flush
//! (`dirty`) rather than per request. A redirect over a partial entry that lies on a full one (a cluster an
//! earlier snapshot caught part-written, the common case when snapshots are taken periodically) makes a partial
//! entry holding that entry's sub-clusters as well as the new ones, lying on it: one read of the partial entry's
//! data instead of assembling the cluster from both layers (4 KiB random writes at QD32 over NBD, 10 s after a
//! second snapshot of a 2 GiB VDI randomly written after the first: 27-29k IOPS with the assembly, 31-36k with
//! this; qemu-nbd on a qcow2 overlay does 29-31k). Deeper than that, the redirect assembles and copies up the
//! whole cluster, so a read needs at most three lookups (two layers with data), whatever the number of
//! snapshots. GC keeps the entries beneath a live partial entry; once no snapshot sees them, it drops a middle
//! partial entry (the head's holds all of it) and folds the full entry into the head's (`fold_partial`).
//!
//! The new cluster is written whole, zero-padded around the data (the mask hides the padding): writing only
//! the touched sub-clusters leaves the data file's preallocated (unwritten) extents to be split by every later
//! small write into the cluster, and the file's extent tree fragmented for good.
//!
//! Measured (4 KiB random writes at QD32 right after a snapshot; "NBD" = one connection, 8 s, 2 GiB VDI filled
//! first, so most writes land in clusters already redirected; "engine" = `engine-bench.sh`, 5 s, 1 GiB, mostly
//! first writes): full copy-up (the old rule) 26.9k IOPS NBD / 7.4k engine; partial entries with a metadata commit
//! per widening 24.5k / 41.8k (a RocksDB memtable insert per request); completing the cluster on its second write
//! 15.7k NBD; partial entries with deferred widenings but no padding 22.3k / 42.0k (ext4 extent splitting ~17 % of
//! the NBD thread); with padding (this design) 33.4k / 18.3k.
//!
//! Durability: a write is durable after `flush` (fdatasync of the data file, then RocksDB WAL sync) or at once
//! with FUA: an RWF_DSYNC data write, then, if the write changed the map or relies on an entry committed since the
//! last WAL sync, a WAL sync. Map changes are always written unsynced and a FUA write then awaits
//! `Inner::sync_wal` on the blocking pool, so the fsync never stalls the I/O thread's other connections.
//!
//! Locking: each (volume, cluster) hashes to a lock stripe. Reads and in-place writes hold it shared; redirects,
//! discards and zeroing hold it exclusive, so a cluster is never freed or replaced under a reader. Exclusive
//! holders hold one stripe at a time (a request's pieces run concurrently, each with its own); multi-cluster
//! reads and in-place run writes hold several shared, taken in sorted order, so stripes cannot deadlock.
//! Mutations also hold the volume's barrier shared, which snapshot/destroy take exclusively to drain them.
//! A head read takes the head's epoch only once it holds its stripes: an epoch read before could be frozen by a
//! snapshot while the read waits, and then the head's rewrite of the cluster, a destroy of that snapshot and a GC
//! pass could free the very entry the read resolves. Holding the stripe keeps a newer entry from appearing, so
//! the entry found at the epoch read under it stays live until the read is done.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use futures::future::try_join_all;
use rocksdb::WriteBatch;
use shale_block::device::{check_range, check_write};
use shale_block::{BlockDevice, BlockError, DeviceInfo, Extent, ExtentKind, IoBuf, WriteFlags};
use uuid::Uuid;

use crate::engine::Inner;
use crate::error::{EngineError, Result as EResult};
use crate::keys::{self, FULL_MASK, ZERO_CLUSTER};
use crate::records::ObjectKind;
use crate::state::VolState;

type BResult<T> = std::result::Result<T, BlockError>;

/// Where a cluster's content comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loc {
    /// Volume holding the entry.
    pub vol: u64,
    /// Epoch of the entry.
    pub epoch: u64,
    /// Physical cluster, or [`ZERO_CLUSTER`].
    pub pcluster: u64,
    /// Sub-clusters this entry holds ([`FULL_MASK`] for a whole cluster); the rest read through to the entry
    /// beneath.
    pub mask: u32,
}

impl Loc {
    /// True if the entry holds data for its whole cluster (or is a zero entry).
    pub fn is_full(&self) -> bool {
        self.mask == FULL_MASK
    }
}

/// Sub-clusters per cluster: 32 (one `u32` mask), or fewer for clusters under 16 KiB so that a sub-cluster is
/// never smaller than a 512-byte sector.
pub(crate) fn sub_count(cs: u64) -> u64 {
    (cs / 512).min(32)
}

/// The mask of the sub-clusters that bytes [off, off+len) of a cluster touch, [`FULL_MASK`] if that is all of
/// them.
pub(crate) fn sub_mask(cs: u64, off: u64, len: u64) -> u32 {
    let n = sub_count(cs);
    let sub = cs / n;
    let (first, last) = (off / sub, (off + len).div_ceil(sub));
    if first == 0 && last >= n {
        return FULL_MASK;
    }
    let width = last - first;
    (((1u64 << width) - 1) << first) as u32
}

/// Combine two masks, normalising "every sub-cluster" to [`FULL_MASK`].
pub(crate) fn mask_union(cs: u64, a: u32, b: u32) -> u32 {
    let n = sub_count(cs);
    let all = ((1u64 << n) - 1) as u32;
    if (a | b) & all == all {
        FULL_MASK
    } else {
        a | b
    }
}

/// An open VDI or snapshot. Dropping it closes it.
pub struct Volume {
    inner: Arc<Inner>,
    vol: Arc<VolState>,
    object: Uuid,
    /// `None` for the head; the frozen epoch for a snapshot.
    view_epoch: Option<u64>,
    /// A snapshot's fixed size (the head's lives in `VolState::head_size`).
    snap_size: u64,
    /// Registered in the engine's open-handle count.
    counted: bool,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("object", &self.object)
            .field("vol", &self.vol.id)
            .field("view", &self.view_epoch)
            .finish()
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        if self.counted {
            let mut st = self.inner.state.write();
            if let Some(n) = st.open.get_mut(&self.object) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    st.open.remove(&self.object);
                }
            }
        }
    }
}

/// One cached result of `lookup_own`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cached {
    /// The epoch looked up at.
    pub epoch: u64,
    /// What the lookup found.
    pub found: Option<Loc>,
    /// [`Inner::snap_clock`] when the lookup began (see [`lookup_own`] on carrying lookups over a snapshot).
    pub stamp: u64,
}

/// Results of `lookup_own` for one (vol, cluster) at the epochs asked for. Almost always one epoch (the head's),
/// so held inline: a `Vec` here cost a second cache miss per lookup (the lookup was the largest user-space item
/// in thin-VDI NBD read profiles).
pub(crate) type CachedLookups = smallvec::SmallVec<[Cached; 2]>;

/// One shard of the lookup cache: (vol, cluster) → [`CachedLookups`]. Keyed with FxHash: the keys are our own
/// integers (no hash-flooding exposure), and SipHash showed up in NBD read profiles.
#[derive(Debug, Default)]
pub(crate) struct CacheShard {
    map: rustc_hash::FxHashMap<(u64, u64), CachedLookups>,
    /// Bumped by every edit. A lookup that read RocksDB caches its answer only if no edit happened meanwhile:
    /// commits of pending widenings (`dirty`) change entries without the cluster's stripe lock, so a lookup could
    /// otherwise cache what it read just before such a commit, after the commit updated the cache.
    generation: u64,
}

/// A request split at cluster boundaries: (cluster, offset in cluster, length, offset in request) per piece.
type Pieces = smallvec::SmallVec<[(u64, u64, u64, u64); 4]>;

/// A piece of a read: (offset in the caller's buffer, length, byte offset in the data file or `None` for zeroes).
type Segment = (usize, usize, Option<u64>);

/// Largest read that [`Volume::read_segments`] makes by merging neighbouring segments.
const MAX_MERGED_READ: u64 = 4 << 20;

/// Entries per cache shard before the shard is cleared (about a million entries in all).
const CACHE_SHARD_CAP: usize = 1024;

/// Read one map entry: the newest entry for (vol, cluster) at or below `epoch`, in this volume only.
///
/// Answered first from the volume's head table ([`crate::headmap`]: each cluster's newest entry, one or two
/// lock-free loads), then from the lookup cache, then from RocksDB.
///
/// Cached: a RocksDB iterator per lookup costs several microseconds, a cache hit a hash probe. Correctness rests
/// on two rules. The caller holds the stripe lock of (vol, cluster) (or of the clone whose parent view this is:
/// entries visible at a frozen view never change), so a fill cannot interleave with a change of the map; and
/// every change of a (vol, cluster)'s entries happens under that stripe's exclusive lock and calls
/// [`invalidate`] before releasing it. GC deletes only entries no live view can see, so it never makes a cached
/// answer for a live view wrong.
///
/// Carrying over a snapshot: a snapshot freezes the head's epoch `e` and moves the head to `e + 1`, which has no
/// entries yet, so until the head writes a cluster, a lookup at `e + 1` finds what a lookup at `e` finds. A cached
/// lookup at `e` answers for `e + 1` if it began before the snapshot (its stamp is below the one the snapshot
/// took, [`Inner::carry`]). That is sound because the head's first entry at `e + 1` is written through
/// [`cache_edit`], which bumps the shard's generation and, if the cluster has cached lookups, records the new
/// entry at `e + 1`: a lookup filled before the snapshot and still cached either saw that edit or was not cached
/// (the generation check), and a lookup filled after the snapshot is not carried. Without this every cluster's
/// first read or write after a snapshot cost a RocksDB seek (about 6 % of the NBD thread in the seconds after
/// one, under 4 KiB random writes).
pub(crate) fn lookup_own(
    inner: &Inner,
    vs: &VolState,
    cluster: u64,
    epoch: u64,
) -> EResult<Option<Loc>> {
    let vol = vs.id;
    if let Some(l) = vs.headmap.get(vol, cluster, epoch) {
        return Ok(Some(l));
    }
    let shard = &inner.cache[Inner::shard(vol, cluster)];
    loop {
        let (r, generation) = lookup_stored(inner, vol, cluster, epoch)?;
        let Some(mut l) = r.filter(|l| !l.is_full()) else {
            // A head lookup (at the current epoch, under the stripe) found the newest entry: table it.
            if let Some(l) = &r {
                if epoch == vs.epoch() && !vs.head_closed.load(Ordering::Acquire) {
                    vs.headmap.fill(cluster, l);
                }
            }
            return Ok(r);
        };
        // A partial entry's mask may have been widened by writes whose metadata is not committed yet (`dirty`).
        // A commit of widenings writes RocksDB, then edits the cache (bumping the shard's generation), then drops
        // the pending widening; if that happened while we looked, what we read may predate the commit while the
        // widening is already gone: look again.
        if let Some(m) = inner.dirty.mask(vol, cluster, l.epoch) {
            l.mask = m;
        }
        if shard.lock().generation == generation {
            // As for full entries: a head lookup under the stripe tables the newest entry, here with the
            // effective mask (see `crate::headmap`).
            if epoch == vs.epoch() && !vs.head_closed.load(Ordering::Acquire) {
                vs.headmap.fill(cluster, &l);
            }
            return Ok(Some(l));
        }
    }
}

/// [`lookup_own`] as committed to RocksDB (cached), before pending widenings.
/// Also returns the cache shard's generation at the time of the read.
fn lookup_stored(inner: &Inner, vol: u64, cluster: u64, epoch: u64) -> EResult<(Option<Loc>, u64)> {
    let shard = &inner.cache[Inner::shard(vol, cluster)];
    let generation = {
        let mut g = shard.lock();
        let generation = g.generation;
        if let Some(v) = g.map.get_mut(&(vol, cluster)) {
            if let Some(c) = v.iter().find(|c| c.epoch == epoch) {
                return Ok((c.found, generation));
            }
            if let Some(c) = carried(inner, vol, epoch, v) {
                push_cached(v, c);
                return Ok((c.found, generation));
            }
        }
        generation
    };
    // Read before RocksDB is: a stamp never claims a lookup predates a snapshot it does not.
    let stamp = inner.snap_clock.load(Ordering::SeqCst);
    let r = lookup_own_db(inner, vol, cluster, epoch)?;
    let mut g = shard.lock();
    if g.generation != generation {
        return Ok((r, generation));
    }
    if g.map.len() >= CACHE_SHARD_CAP {
        g.map.clear();
    }
    let v = g.map.entry((vol, cluster)).or_default();
    push_cached(
        v,
        Cached {
            epoch,
            found: r,
            stamp,
        },
    );
    Ok((r, generation))
}

/// A cached lookup at the epoch `vol`'s last snapshot froze that began before the snapshot, re-keyed to
/// `epoch` if that is the head epoch right after it (see [`lookup_own`]).
fn carried(inner: &Inner, vol: u64, epoch: u64, v: &CachedLookups) -> Option<Cached> {
    let (frozen, snap_stamp) = *inner.carry.read().get(&vol)?;
    if epoch != frozen + 1 {
        return None;
    }
    v.iter()
        .find(|c| c.epoch == frozen && c.stamp < snap_stamp)
        .map(|c| Cached { epoch, ..*c })
}

/// Add a cached lookup, dropping the oldest once a cluster has four.
fn push_cached(v: &mut CachedLookups, c: Cached) {
    if v.len() >= 4 {
        v.remove(0);
    }
    v.push(c);
}

/// Forget cached lookups of (vol, cluster) and its head-table slot; called under its exclusive stripe lock after
/// changing its entries.
pub(crate) fn invalidate(inner: &Inner, vs: &VolState, cluster: u64) {
    let vol = vs.id;
    vs.headmap.clear(cluster);
    let mut shard = inner.cache[Inner::shard(vol, cluster)].lock();
    shard.generation += 1;
    shard.map.remove(&(vol, cluster));
}

/// Edit the cached lookups of (vol, cluster) after a change the caller knows the exact effect of; called, like
/// [`invalidate`], under the cluster's exclusive stripe lock after the change is committed. Keeping the cache warm
/// matters on the write paths that change an entry on every request (sub-cluster writes after a snapshot):
/// invalidating there turned each following request into two RocksDB seeks.
/// The cluster's head-table slot is cleared (the next head lookup fills it from the edited cache).
pub(crate) fn cache_edit(
    inner: &Inner,
    vs: &VolState,
    cluster: u64,
    edit: impl FnOnce(&mut CachedLookups),
) {
    vs.headmap.clear(cluster);
    edit_shard(inner, vs.id, cluster, edit);
}

/// The lookup-cache half of [`cache_edit`]: bump the shard's generation and edit (vol, cluster)'s lookups.
fn edit_shard(inner: &Inner, vol: u64, cluster: u64, edit: impl FnOnce(&mut CachedLookups)) {
    let mut shard = inner.cache[Inner::shard(vol, cluster)].lock();
    shard.generation += 1;
    if let Some(v) = shard.map.get_mut(&(vol, cluster)) {
        edit(v);
    }
}

/// Set the mask of cached lookups that found the entry (vol, cluster, epoch), after a commit changed it. The
/// head table holds effective masks (committed and pending widenings), which a commit of pending widenings does
/// not change; callers that change an entry's effective mask clear or widen its slot themselves (see
/// [`crate::headmap`]).
pub(crate) fn cache_set_mask(inner: &Inner, vol: u64, cluster: u64, epoch: u64, mask: u32) {
    edit_shard(inner, vol, cluster, |v| {
        for c in v.iter_mut() {
            if let Some(l) = c.found.as_mut().filter(|l| l.epoch == epoch) {
                l.mask = mask;
            }
        }
    });
}

fn lookup_own_db(inner: &Inner, vol: u64, cluster: u64, epoch: u64) -> EResult<Option<Loc>> {
    inner.metadata_reads.fetch_add(1, Ordering::Relaxed);
    let key = keys::map(vol, cluster, epoch);
    let mut ro = rocksdb::ReadOptions::default();
    ro.set_iterate_upper_bound(keys::map(vol, cluster, 0).to_vec());
    // Upper bound is exclusive and epoch 0 is never written (epochs start at 1), so this bounds the scan to
    // this cluster's entries.
    let mut it = inner.db.raw_iterator_opt(ro);
    it.seek(key);
    if let (Some(k), Some(v)) = (it.key(), it.value()) {
        let (kv, kc, ke) =
            keys::parse_map(k).ok_or_else(|| EngineError::Corrupt("malformed map key".into()))?;
        if kv == vol && kc == cluster {
            let (p, mask) = keys::parse_map_entry(k, v).ok_or_else(|| {
                EngineError::Corrupt(format!(
                    "map entry vol {vol} cluster {cluster} fails its checksum"
                ))
            })?;
            return Ok(Some(Loc {
                vol,
                epoch: ke,
                pcluster: p,
                mask,
            }));
        }
    }
    it.status()?;
    Ok(None)
}

/// Resolve a cluster through the clone chain: own entry, else the parent view's, and so on.
pub(crate) fn resolve(
    inner: &Inner,
    vs: &Arc<VolState>,
    cluster: u64,
    epoch: u64,
) -> EResult<Option<Loc>> {
    Ok(resolve_from(inner, vs.clone(), cluster, epoch)?.map(|(loc, _)| loc))
}

/// [`resolve`], also returning the state of the volume the entry belongs to (where a walk beneath it goes on).
fn resolve_from(
    inner: &Inner,
    mut v: Arc<VolState>,
    cluster: u64,
    mut e: u64,
) -> EResult<Option<(Loc, Arc<VolState>)>> {
    loop {
        // Epochs start at 1: a lookup at epoch 0 finds nothing and falls through to the parent.
        if e > 0 {
            if let Some(loc) = lookup_own(inner, &v, cluster, e)? {
                return Ok(Some((loc, v)));
            }
        }
        match (v.parent, v.parent_state.clone()) {
            (Some(p), Some(ps)) if cluster < p.size.div_ceil(inner.cs) => {
                e = p.epoch;
                v = ps;
            }
            _ => return Ok(None),
        }
    }
}

/// The entries one cluster's data comes from, newest first (at most three; see [`resolve_layers`]).
pub(crate) type Layers = smallvec::SmallVec<[Loc; 3]>;

/// Every entry a read of `cluster` at the view (vs, epoch) may need, newest first: the entry [`resolve`]
/// finds, and while that is partial, the entry beneath it (an older entry of the same volume, else the parent
/// view's). Ends at a full entry, or when nothing is beneath (those sub-clusters read as zeroes).
///
/// The write path creates a partial entry over a full one, or over a partial entry that lies on a full one and
/// whose sub-clusters the new entry holds too, so this is at most three lookups (and two layers whose data is
/// read): read cost still does not depend on the number of snapshots.
pub(crate) fn resolve_layers(
    inner: &Inner,
    vs: &Arc<VolState>,
    cluster: u64,
    epoch: u64,
) -> EResult<Layers> {
    let mut out = Layers::new();
    let (mut v, mut e) = (vs.clone(), epoch);
    while let Some((loc, owner)) = resolve_from(inner, v, cluster, e)? {
        out.push(loc);
        if loc.is_full() {
            break;
        }
        (v, e) = (owner, loc.epoch - 1);
    }
    Ok(out)
}

/// Fold a partial head entry of `cluster` with the full entry beneath it, once no snapshot sees that entry any
/// more (GC calls this after a snapshot is deleted): copy the sub-clusters the head entry lacks into its own
/// cluster, make it full, and free the cluster beneath. This is the copy-up a redirect-on-write engine does at
/// write time, deferred to the background and done only for clusters that are still partial. Returns whether a
/// cluster was freed.
///
/// Only a head-owned entry is folded: its readers are head readers, which hold this cluster's stripe, so none
/// can be part-way through reading the entry beneath (a clone reads its parent's snapshot views, never the head).
/// The copied bytes are written with FUA before the synced batch that frees the old cluster, so a crash at any
/// point leaves either the old pair or the folded entry, both reading the same bytes.
pub(crate) async fn fold_partial(
    inner: &Arc<Inner>,
    vs: &Arc<VolState>,
    cluster: u64,
) -> EResult<bool> {
    let _barrier = vs.barrier.read().await;
    let _g = inner.stripe(vs.id, cluster).write().await;
    if vs.head.lock().is_none() || vs.head_closed.load(Ordering::Acquire) {
        return Ok(false);
    }
    let epoch = vs.epoch();
    let Some(top) = lookup_own(inner, vs, cluster, epoch)? else {
        return Ok(false);
    };
    if top.is_full() || !vs.head_owns(top.epoch, epoch) {
        return Ok(false);
    }
    let layers = resolve_layers(inner, vs, cluster, top.epoch)?;
    if let [_, mid, _] = layers.as_slice() {
        return drop_middle(inner, vs, cluster, &top, mid).await;
    }
    let base = match layers.as_slice() {
        [_, b] if b.vol == vs.id && b.is_full() && b.pcluster != ZERO_CLUSTER => *b,
        _ => return Ok(false),
    };
    if vs
        .views
        .lock()
        .range(base.epoch..top.epoch)
        .next()
        .is_some()
    {
        return Ok(false);
    }
    let cs = inner.cs;
    let sub = cs / sub_count(cs);
    let mut i = 0;
    while i < sub_count(cs) {
        if top.mask & (1u32 << i) != 0 {
            i += 1;
            continue;
        }
        let mut j = i;
        while j < sub_count(cs) && top.mask & (1u32 << j) == 0 {
            j += 1;
        }
        let (at, len) = (i * sub, (j - i) * sub);
        let (r, b) = inner
            .io
            .read_at(
                &inner.data,
                base.pcluster * cs + at,
                IoBuf::for_overwrite(len as usize),
            )
            .await;
        r.map_err(EngineError::Io)?;
        let (r, _) = inner
            .io
            .write_at(&inner.data, top.pcluster * cs + at, b, true)
            .await;
        r.map_err(EngineError::Io)?;
        i = j;
    }
    let mut b = WriteBatch::default();
    keys::put_map(
        &mut b,
        &keys::map(vs.id, cluster, top.epoch),
        top.pcluster,
        FULL_MASK,
    );
    // Any pending widening of the head entry is superseded by the full mask.
    commit_freeing(inner, vs, cluster, b, top.epoch, &base).await?;
    Ok(true)
}

/// [`fold_partial`] for a head entry `top` over a partial entry `mid` (which lies on a full one): `top` holds every
/// sub-cluster `mid` does, so once no snapshot sees `mid`, nothing reads it: delete it and free its cluster. The
/// head entry then lies on the full entry directly, and a later GC pass folds the two as usual. Caller holds the
/// barrier and the cluster's stripe exclusively.
async fn drop_middle(
    inner: &Arc<Inner>,
    vs: &Arc<VolState>,
    cluster: u64,
    top: &Loc,
    mid: &Loc,
) -> EResult<bool> {
    if mid.vol != vs.id
        || mid.pcluster == ZERO_CLUSTER
        || mid.mask & !top.mask != 0
        || vs.views.lock().range(mid.epoch..top.epoch).next().is_some()
    {
        return Ok(false);
    }
    commit_freeing(inner, vs, cluster, WriteBatch::default(), mid.epoch, mid).await?;
    Ok(true)
}

/// Add to `b` the deletion of `vs`'s entry `freed` of `cluster` (its cluster back on the free list, the counts
/// adjusted) and commit it synced, since the cluster is reused right after, superseding any pending widening of
/// the entry at `changed` (see [`crate::dirty`]); then forget the cluster's cached lookups and release the freed
/// cluster. Caller holds the cluster's stripe exclusively.
async fn commit_freeing(
    inner: &Arc<Inner>,
    vs: &Arc<VolState>,
    cluster: u64,
    mut b: WriteBatch,
    changed: u64,
    freed: &Loc,
) -> EResult<()> {
    let cs = inner.cs;
    b.delete(keys::map(vs.id, cluster, freed.epoch));
    b.put(keys::free(freed.pcluster), []);
    b.merge(keys::count(vs.id, freed.epoch), keys::delta(-1));
    b.merge(keys::RECLAIMED, cs.to_be_bytes());
    inner
        .dirty
        .write_changing(inner, b, true, [(vs.id, cluster, changed)])?;
    invalidate(inner, vs, cluster);
    vs.add_count(freed.epoch, -1);
    inner.reclaimed.fetch_add(cs, Ordering::Relaxed);
    crate::gc::release_clusters(inner, vec![freed.pcluster]).await;
    Ok(())
}

impl Volume {
    pub(crate) fn new(
        inner: Arc<Inner>,
        vol: Arc<VolState>,
        object: Uuid,
        kind: ObjectKind,
        epoch: Option<u64>,
        size: u64,
    ) -> Self {
        let view_epoch = if kind == ObjectKind::Snapshot {
            epoch
        } else {
            None
        };
        Volume {
            inner,
            vol,
            object,
            view_epoch,
            snap_size: size,
            counted: true,
        }
    }

    /// A head handle used by the engine itself (not counted as open).
    pub(crate) fn internal(inner: Arc<Inner>, vol: Arc<VolState>, object: Uuid) -> Self {
        Volume {
            inner,
            vol,
            object,
            view_epoch: None,
            snap_size: 0,
            counted: false,
        }
    }

    /// The object (VDI or snapshot) this handle reads.
    pub fn object_id(&self) -> Uuid {
        self.object
    }

    fn cs(&self) -> u64 {
        self.inner.cs
    }

    fn size_now(&self) -> u64 {
        match self.view_epoch {
            Some(_) => self.snap_size,
            None => self.vol.head_size.load(Ordering::Acquire),
        }
    }

    fn epoch_now(&self) -> u64 {
        self.view_epoch.unwrap_or_else(|| self.vol.epoch())
    }

    fn check_open(&self) -> BResult<()> {
        if self.view_epoch.is_none() && self.vol.head_closed.load(Ordering::Acquire) {
            return Err(BlockError::Shutdown);
        }
        Ok(())
    }

    /// Split [offset, offset+len) into (cluster, offset in cluster, length, offset in request). Inline for the
    /// common case (a request within a few clusters): this runs on every request, and a heap allocation here was
    /// a visible part of the thin read path's CPU.
    fn pieces(&self, offset: u64, len: u64) -> Pieces {
        let cs = self.cs();
        let mut out = Pieces::with_capacity((len / cs + 2) as usize);
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let c = pos >> self.inner.shift;
            let in_off = pos & (cs - 1);
            let n = (cs - in_off).min(end - pos);
            out.push((c, in_off, n, pos - offset));
            pos += n;
        }
        out
    }

    async fn read_piece(&self, c: u64, in_off: u64, buf: IoBuf) -> BResult<IoBuf> {
        let _g = self.inner.stripe(self.vol.id, c).read().await;
        // Under the stripe, not before it (see the module doc on locking).
        let epoch = self.epoch_now();
        let layers = resolve_layers(&self.inner, &self.vol, c, epoch)?;
        match layers.as_slice() {
            [loc] if loc.is_full() && loc.pcluster != ZERO_CLUSTER => {
                let (r, buf) = self
                    .inner
                    .io
                    .read_at(&self.inner.data, loc.pcluster * self.cs() + in_off, buf)
                    .await;
                r.map_err(BlockError::from_io)?;
                Ok(buf)
            }
            []
            | [Loc {
                pcluster: ZERO_CLUSTER,
                ..
            }] => {
                let mut buf = buf;
                buf.as_mut_slice().fill(0);
                Ok(buf)
            }
            _ => Box::pin(self.read_layers(&layers, in_off, buf)).await,
        }
    }

    /// Read bytes [in_off, in_off + buf.len()) of a cluster whose entries are `layers` (newest first, from
    /// [`resolve_layers`]): each sub-cluster comes from the newest layer holding it, or reads as zeroes. The
    /// caller holds the cluster's stripe.
    async fn read_layers(&self, layers: &[Loc], in_off: u64, buf: IoBuf) -> BResult<IoBuf> {
        let mut segs = Vec::new();
        self.segments(layers, in_off, buf.len() as u64, 0, &mut segs);
        self.read_segments(&segs, buf).await
    }

    /// Append the segments of a cluster read (see [`Volume::read_layers`]) as (offset in the caller's buffer,
    /// length, byte offset in the data file or `None` for zeroes), merging neighbours with the same source.
    fn segments(&self, layers: &[Loc], in_off: u64, len: u64, at: u64, out: &mut Vec<Segment>) {
        let cs = self.cs();
        let sub = cs / sub_count(cs);
        let end = in_off + len;
        let mut pos = in_off;
        while pos < end {
            let i = pos / sub;
            let stop = ((i + 1) * sub).min(end);
            let src = layers
                .iter()
                .find(|l| l.mask & (1u32 << i) != 0)
                .map(|l| l.pcluster)
                .filter(|&p| p != ZERO_CLUSTER)
                .map(|p| p * cs + pos);
            let dst = (at + pos - in_off) as usize;
            match out.last_mut() {
                Some(s)
                    if s.0 + s.1 == dst
                        && match (s.2, src) {
                            (Some(x), Some(y)) => x + s.1 as u64 == y,
                            (None, None) => true,
                            _ => false,
                        } =>
                {
                    s.1 += (stop - pos) as usize
                }
                _ => out.push((dst, (stop - pos) as usize, src)),
            }
            pos = stop;
        }
    }

    /// Fill `buf` from `segs`. Segments are read in as few I/Os as their places in the data file allow: sorted by
    /// file offset, neighbours less than a cluster apart share one read (the gap is read and dropped). A cluster
    /// written in scattered small pieces after a snapshot alternates between two layers every few sub-clusters;
    /// a few larger reads beat many small ones, and the clusters beneath, often contiguous, merge across clusters.
    async fn read_segments(&self, segs: &[Segment], mut buf: IoBuf) -> BResult<IoBuf> {
        let cs = self.cs();
        if let [(0, len, Some(off))] = segs {
            if *len == buf.len() {
                let (r, out) = self.inner.io.read_at(&self.inner.data, *off, buf).await;
                r.map_err(BlockError::from_io)?;
                return Ok(out);
            }
        }
        let mut by_file: Vec<(u64, usize, usize)> = segs
            .iter()
            .filter_map(|&(dst, len, src)| src.map(|o| (o, len, dst)))
            .collect();
        by_file.sort_unstable();
        // (file offset, length) of each read, and for each segment which read holds it.
        let mut reads: Vec<(u64, u64)> = Vec::new();
        let mut home = Vec::with_capacity(by_file.len());
        for &(off, len, _) in &by_file {
            let end = off + len as u64;
            match reads.last_mut() {
                Some(r) if off <= r.0 + r.1 + cs && end - r.0 <= MAX_MERGED_READ => {
                    r.1 = r.1.max(end - r.0)
                }
                _ => reads.push((off, len as u64)),
            }
            home.push(reads.len() - 1);
        }
        let parts = try_join_all(reads.iter().map(|&(off, len)| async move {
            let (r, part) = self
                .inner
                .io
                .read_at(&self.inner.data, off, IoBuf::for_overwrite(len as usize))
                .await;
            r.map(|()| part).map_err(BlockError::from_io)
        }))
        .await?;
        let out = buf.as_mut_slice();
        for &(dst, len, src) in segs {
            if src.is_none() {
                out[dst..dst + len].fill(0);
            }
        }
        for (&(off, len, dst), &h) in by_file.iter().zip(&home) {
            let from = (off - reads[h].0) as usize;
            out[dst..dst + len].copy_from_slice(&parts[h][from..from + len]);
        }
        Ok(buf)
    }

    /// Hold the stripes of several pieces shared, taken in sorted order: readers and in-place writers that hold
    /// several cannot deadlock one another, and exclusive holders hold one stripe at a time.
    async fn lock_shared(
        &self,
        pieces: &[(u64, u64, u64, u64)],
    ) -> Vec<tokio::sync::RwLockReadGuard<'_, ()>> {
        let mut idx: smallvec::SmallVec<[usize; 16]> = pieces
            .iter()
            .map(|&(c, ..)| Inner::shard(self.vol.id, c))
            .collect();
        idx.sort_unstable();
        idx.dedup();
        let mut guards = Vec::with_capacity(idx.len());
        for i in idx {
            guards.push(self.inner.stripes[i].read().await);
        }
        guards
    }

    /// A read spanning several clusters: hold their stripes ([`Self::lock_shared`]), resolve every piece, and
    /// issue one I/O per physically contiguous run — straight into the caller's buffer when a single run covers
    /// the whole request, the common case for data written sequentially.
    async fn read_multi(&self, pieces: &[(u64, u64, u64, u64)], mut buf: IoBuf) -> BResult<IoBuf> {
        let cs = self.cs();
        let guards = self.lock_shared(pieces).await;
        // Under the stripes, not before them (see the module doc on locking).
        let epoch = self.epoch_now();
        let layers = pieces
            .iter()
            .map(|&(c, ..)| resolve_layers(&self.inner, &self.vol, c, epoch))
            .collect::<EResult<Vec<Layers>>>()?;
        if layers
            .iter()
            .any(|l| l.first().is_some_and(|t| !t.is_full()))
        {
            // Some cluster is only partly its top entry's: assemble the request from every piece's layers.
            let mut segs = Vec::new();
            for (&(_, in_off, n, at), l) in pieces.iter().zip(&layers) {
                self.segments(l, in_off, n, at, &mut segs);
            }
            let out = self.read_segments(&segs, buf).await?;
            drop(guards);
            return Ok(out);
        }
        let locs: Vec<Option<u64>> = layers
            .iter()
            .map(|l| l.first().map(|t| t.pcluster).filter(|&p| p != ZERO_CLUSTER))
            .collect();
        // Group consecutive pieces into runs of consecutive physical clusters; each hole is a run of its own.
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for (i, loc) in locs.iter().enumerate() {
            match (runs.last_mut(), loc) {
                (Some((_, end)), Some(p)) if locs[*end].is_some_and(|q| q + 1 == *p) => *end = i,
                _ => runs.push((i, i)),
            }
        }
        if let ([_], Some(p0)) = (runs.as_slice(), locs[0]) {
            let at = p0 * cs + pieces[0].1;
            let (r, out) = self.inner.io.read_at(&self.inner.data, at, buf).await;
            r.map_err(BlockError::from_io)?;
            drop(guards);
            return Ok(out);
        }
        let run_len = |i: usize, j: usize| -> u64 { pieces[i..=j].iter().map(|p| p.2).sum() };
        let reads = runs.iter().filter_map(|&(i, j)| {
            let at = locs[i]? * cs + pieces[i].1;
            let len = run_len(i, j) as usize;
            Some(async move {
                let (r, b) = self
                    .inner
                    .io
                    .read_at(&self.inner.data, at, IoBuf::for_overwrite(len))
                    .await;
                r.map(|()| (pieces[i].3 as usize, b))
                    .map_err(BlockError::from_io)
            })
        });
        let parts = try_join_all(reads).await?;
        drop(guards);
        let out = buf.as_mut_slice();
        for &(i, j) in runs.iter().filter(|&&(i, _)| locs[i].is_none()) {
            let start = pieces[i].3 as usize;
            out[start..start + run_len(i, j) as usize].fill(0);
        }
        for (at, part) in parts {
            out[at..at + part.len()].copy_from_slice(&part);
        }
        Ok(buf)
    }

    /// A write spanning several clusters, each of them a full entry the head owns, in consecutive physical
    /// clusters (a VDI rewritten sequentially, the common case for 1 MiB writes): one in-place I/O of the caller's
    /// buffer, instead of a copy and a write per cluster (16 of each at 64 KiB clusters). Holds the stripes
    /// shared, in sorted order, like [`Self::read_multi`]. Hands `data` back when any piece needs more than an
    /// in-place write, or the clusters are not one run; the caller then writes piece by piece.
    async fn write_run(
        &self,
        pieces: &[(u64, u64, u64, u64)],
        data: IoBuf,
        fua: bool,
    ) -> BResult<Option<IoBuf>> {
        let guards = self.lock_shared(pieces).await;
        let epoch = self.vol.epoch();
        let mut first = None;
        for (k, &(c, ..)) in pieces.iter().enumerate() {
            let run = match lookup_own(&self.inner, &self.vol, c, epoch)? {
                Some(loc)
                    if loc.is_full()
                        && loc.pcluster != ZERO_CLUSTER
                        && self.vol.head_owns(loc.epoch, epoch) =>
                {
                    let p0 = *first.get_or_insert(loc.pcluster);
                    loc.pcluster == p0 + k as u64
                }
                _ => false,
            };
            if !run {
                return Ok(Some(data));
            }
        }
        let Some(p0) = first else {
            return Ok(Some(data));
        };
        let r = self.write_in_place(p0, pieces[0].1, data, fua).await;
        drop(guards);
        r.map(|()| None)
    }

    /// Write one piece (within one cluster) of the head.
    async fn write_piece(&self, c: u64, in_off: u64, data: IoBuf, fua: bool) -> BResult<()> {
        let stripe = self.inner.stripe(self.vol.id, c);
        let epoch = self.vol.epoch();
        let cs = self.cs();
        let need = sub_mask(cs, in_off, data.len() as u64);
        {
            let _g = stripe.read().await;
            if let Some(loc) = lookup_own(&self.inner, &self.vol, c, epoch)? {
                // FUA on a partial entry takes the exclusive path: its mask may still be pending.
                if loc.pcluster != ZERO_CLUSTER
                    && (loc.is_full() || loc.mask & need == need && !fua)
                    && self.vol.head_owns(loc.epoch, epoch)
                {
                    return self.write_in_place(loc.pcluster, in_off, data, fua).await;
                }
            }
        }
        let _g = stripe.write().await;
        let own = lookup_own(&self.inner, &self.vol, c, epoch)?;
        if let Some(loc) = own {
            if loc.pcluster != ZERO_CLUSTER && self.vol.head_owns(loc.epoch, epoch) {
                if loc.is_full() || loc.mask & need == need && !fua {
                    return self.write_in_place(loc.pcluster, in_off, data, fua).await;
                }
                return Box::pin(self.extend_partial(c, loc, in_off, data, need, fua)).await;
            }
        }
        // Boxed: the redirect's state is large, and a future that embedded it would make every in-place write's
        // future (allocated and moved per request) that much larger.
        Box::pin(self.redirect(c, in_off, data, need, fua, epoch)).await
    }

    /// The redirect-on-write of [`Volume::write_piece`]: a head write to a cluster the head does not own. Caller
    /// holds the cluster's stripe exclusively.
    async fn redirect(
        &self,
        c: u64,
        in_off: u64,
        data: IoBuf,
        need: u32,
        fua: bool,
        epoch: u64,
    ) -> BResult<()> {
        let cs = self.cs();
        // Redirect on write into a fresh cluster. What is beneath decides how much is copied up:
        // - nothing (or zeroes): only the new bytes (a fresh cluster reads as zeroes, see `alloc`);
        // - one full entry: nothing, the new entry is *partial* and holds just the sub-clusters written (rounded
        //   out to sub-cluster boundaries with bytes from beneath), the rest reads through — a 4 KiB write after
        //   a snapshot costs a 4 KiB write, not a 64 KiB copy;
        // - a partial entry on a full one (a cluster an earlier snapshot caught part-written): the new entry takes
        //   that entry's sub-clusters too (one read of them) and lies on it, reading the rest through to the full
        //   entry; it needs nothing from the partial entry, which GC drops once no snapshot sees it;
        // - deeper (a partial entry on such a pair): the whole cluster is assembled and copied up, so reads stay
        //   at three lookups at most.
        let layers = resolve_layers(&self.inner, &self.vol, c, epoch)?;
        let beneath_data = layers.first().is_some_and(|l| l.pcluster != ZERO_CLUSTER);
        let res = self
            .inner
            .alloc
            .lock()
            .reserve()
            .ok_or(BlockError::NoSpace)?;
        // A full filesystem fails the data write here, before it can fail a metadata write ([`crate::space`]).
        if !self.inner.admit_cluster(&res).await {
            self.inner.alloc.lock().unreserve(res);
            return Err(BlockError::NoSpace);
        }
        // Over one full entry, or over a partial entry lying on one: the new entry is partial and holds the
        // written sub-clusters (and that partial entry's). It is written whole, zeroes around the data (hidden by
        // the mask): the cluster's extent in the data file is then fully written, so later small writes into it
        // do not split preallocated extents.
        let held = match layers.as_slice() {
            [f] if f.is_full() => Some(&layers[..0]),
            [p, f] if !p.is_full() && f.is_full() => Some(&layers[..1]),
            _ => None,
        };
        // `padded`: the bytes written into a zeroed buffer, so it can go back to the pool of zeroed buffers
        // clearing just those (`IoBuf::recycle_zeroed`) rather than be cleared whole for the next redirect.
        let built = if need == FULL_MASK && in_off == 0 && data.len() as u64 == cs || !beneath_data
        {
            Ok((in_off, data, FULL_MASK, None))
        } else if let Some(held) = held.filter(|_| need != FULL_MASK) {
            async {
                let (at, buf) = self.round_out(&layers, in_off, data).await?;
                let dirty = at as usize..at as usize + buf.len();
                let (mut whole, padded) = if held.is_empty() {
                    (IoBuf::zeroed(cs as usize), Some(dirty.clone()))
                } else {
                    let whole = self
                        .read_layers(held, 0, IoBuf::for_overwrite(cs as usize))
                        .await?;
                    (whole, None)
                };
                whole.as_mut_slice()[dirty].copy_from_slice(&buf);
                let mask = held.iter().fold(need, |m, l| mask_union(cs, m, l.mask));
                Ok((0, whole, mask, padded))
            }
            .await
        } else {
            let whole = self
                .read_layers(&layers, 0, IoBuf::for_overwrite(cs as usize))
                .await;
            whole.map(|mut cbuf| {
                let s = in_off as usize;
                cbuf.as_mut_slice()[s..s + data.len()].copy_from_slice(&data);
                (0, cbuf, FULL_MASK, None)
            })
        };
        let (at, buf, mask, padded) = match built {
            Ok(b) => b,
            Err(e) => {
                self.inner.alloc.lock().unreserve(res);
                return Err(e);
            }
        };
        let (r, buf) = self
            .inner
            .io
            .write_at(&self.inner.data, res.pcluster * cs + at, buf, fua)
            .await;
        if let Some(dirty) = padded {
            buf.recycle_zeroed(dirty);
        }
        if let Err(e) = r {
            // The cluster may now hold part of the write: it must be zeroed again before reuse.
            self.inner.alloc.lock().settle(res);
            crate::gc::release_clusters(&self.inner, vec![res.pcluster]).await;
            return Err(BlockError::from_io(e));
        }
        let key = keys::map(self.vol.id, c, epoch);
        let mut b = WriteBatch::default();
        keys::put_map(&mut b, &key, res.pcluster, mask);
        b.merge(keys::count(self.vol.id, epoch), keys::delta(1));
        res.commit_into(&mut b);
        // Unsynced even for FUA: the WAL sync below does not hold up this thread's other connections.
        let committed = self.inner.write(b, false);
        self.inner.alloc.lock().settle(res);
        if let Err(e) = committed {
            crate::gc::release_clusters(&self.inner, vec![res.pcluster]).await;
            return Err(e.into());
        }
        // The new entry is the newest at the head's epoch: lookups at that epoch now find it, lookups at older
        // epochs (snapshot views) are unchanged.
        let new = Loc {
            vol: self.vol.id,
            epoch,
            pcluster: res.pcluster,
            mask,
        };
        let stamp = self.inner.snap_clock.load(Ordering::SeqCst);
        cache_edit(&self.inner, &self.vol, c, |v| {
            v.retain(|c| c.epoch < epoch);
            v.push(Cached {
                epoch,
                found: Some(new),
                stamp,
            });
        });
        self.vol.add_count(epoch, 1);
        if fua {
            self.inner.sync_wal().await?;
        }
        Ok(())
    }

    /// Widen a write within a cluster to whole sub-clusters, filling the added bytes with what the cluster reads
    /// now (from `layers`). Returns the widened offset and buffer; an aligned write is returned as it is.
    async fn round_out(&self, layers: &[Loc], in_off: u64, data: IoBuf) -> BResult<(u64, IoBuf)> {
        let cs = self.cs();
        let sub = cs / sub_count(cs);
        let len = data.len() as u64;
        if in_off.is_multiple_of(sub) && len.is_multiple_of(sub) {
            return Ok((in_off, data));
        }
        let start = in_off / sub * sub;
        let end = (in_off + len).div_ceil(sub) * sub;
        let mut buf = self
            .read_layers(layers, start, IoBuf::for_overwrite((end - start) as usize))
            .await?;
        let s = (in_off - start) as usize;
        buf.as_mut_slice()[s..s + data.len()].copy_from_slice(&data);
        Ok((start, buf))
    }

    /// A head write to a partial entry the head owns, touching sub-clusters the entry does not hold yet (or any
    /// FUA write to a partial entry): write them in place, rounded out to sub-clusters with the bytes they read
    /// now, then widen the mask. The widening is committed at once when the write is FUA or the entry becomes
    /// whole (then the entry beneath may be freed in the same batch), and otherwise deferred to the next flush
    /// ([`crate::dirty`]): until it is committed a crash makes those sub-clusters read from beneath again, which
    /// only loses this unflushed write. Caller holds the cluster's stripe exclusively.
    async fn extend_partial(
        &self,
        c: u64,
        loc: Loc,
        in_off: u64,
        data: IoBuf,
        need: u32,
        fua: bool,
    ) -> BResult<()> {
        let cs = self.cs();
        let sub = cs / sub_count(cs);
        let mask = mask_union(cs, loc.mask, need);
        // The layers beneath are needed only to round an unaligned write out to sub-clusters, or to free the
        // entry beneath once this one is whole. Skipping their lookup otherwise matters: after a snapshot about
        // a quarter of 4 KiB random writes widen an entry, and the lookup beneath goes to the lookup cache.
        let aligned = in_off.is_multiple_of(sub) && (data.len() as u64).is_multiple_of(sub);
        let layers = if aligned && mask != FULL_MASK {
            Default::default()
        } else {
            resolve_layers(&self.inner, &self.vol, c, loc.epoch)?
        };
        let (at, buf) = self.round_out(&layers, in_off, data).await?;
        let (r, _) = self
            .inner
            .io
            .write_at(&self.inner.data, loc.pcluster * cs + at, buf, fua)
            .await;
        r.map_err(BlockError::from_io)?;
        if mask != FULL_MASK && !fua {
            self.inner
                .dirty
                .widen(self.vol.id, c, loc.epoch, loc.pcluster, mask);
            self.vol.headmap.widen(c, &loc, mask);
            return Ok(());
        }
        let key = keys::map(self.vol.id, c, loc.epoch);
        let mut b = WriteBatch::default();
        keys::put_map(&mut b, &key, loc.pcluster, mask);
        // Now whole: if no snapshot sees the entry beneath, nothing reads it any more; free it in the same batch.
        let freed = match layers.get(1) {
            Some(base) if mask == FULL_MASK && self.unseen_base(&loc, base) => {
                b.delete(keys::map(self.vol.id, c, base.epoch));
                b.put(keys::free(base.pcluster), []);
                b.merge(keys::count(self.vol.id, base.epoch), keys::delta(-1));
                Some(*base)
            }
            _ => None,
        };
        self.commit_entry_change(b, c, loc.epoch)?;
        self.vol.headmap.clear(c);
        cache_set_mask(&self.inner, self.vol.id, c, loc.epoch, mask);
        if let Some(base) = freed {
            // Lookups that found the freed entry would now find what is older: forget them.
            cache_edit(&self.inner, &self.vol, c, |v| {
                v.retain(|c| c.found.is_none_or(|l| l.epoch != base.epoch))
            });
        }
        if let Some(base) = freed {
            self.vol.add_count(base.epoch, -1);
            crate::gc::defer_release(&self.inner, &[base.pcluster]);
        }
        if fua {
            self.inner.sync_wal().await?;
        }
        Ok(())
    }

    /// Write a batch that changes the head's entry (vol, c, epoch), dropping any pending widening of it under the
    /// commit guard (see [`crate::dirty`]). Unsynced: a FUA caller then awaits [`Inner::sync_wal`].
    fn commit_entry_change(&self, b: WriteBatch, c: u64, epoch: u64) -> EResult<()> {
        self.inner
            .dirty
            .write_changing(&self.inner, b, false, [(self.vol.id, c, epoch)])
    }

    /// Whether `base`, the entry beneath the head-owned partial entry `top`, is an entry of this volume that no
    /// snapshot sees (so only `top` reads it). Head-owned means no snapshot sees `top` either, and a clone reads
    /// only its parent's snapshot views, so the head's readers, which hold the cluster's stripe, are its only
    /// readers.
    fn unseen_base(&self, top: &Loc, base: &Loc) -> bool {
        base.vol == self.vol.id
            && base.is_full()
            && base.pcluster != ZERO_CLUSTER
            && self
                .vol
                .views
                .lock()
                .range(base.epoch..top.epoch)
                .next()
                .is_none()
    }

    /// Note (after a committed batch that put the volume's GC key) that the volume has garbage to collect.
    fn wake_gc(&self) {
        self.inner.state.write().request_gc(self.vol.id);
        self.inner.gc_wake.notify_one();
    }

    /// Write into a cluster the head owns. FUA makes the data durable, but the map entry that points at the
    /// cluster may have been committed unsynced (by an earlier, non-FUA write that allocated it): then the WAL is
    /// synced too, or a crash could lose the entry and with it this acknowledged write.
    async fn write_in_place(&self, p: u64, in_off: u64, data: IoBuf, fua: bool) -> BResult<()> {
        let (r, _) = self
            .inner
            .io
            .write_at(&self.inner.data, p * self.cs() + in_off, data, fua)
            .await;
        r.map_err(BlockError::from_io)?;
        if fua && self.inner.wal_unsynced() {
            self.inner.sync_wal().await?;
        }
        Ok(())
    }

    /// Make a whole cluster of the head read as zeroes, freeing it if the head owned it. The commit is not synced:
    /// a FUA caller syncs once for all its clusters ([`Volume::zero_range`]).
    async fn zero_cluster(&self, c: u64) -> BResult<()> {
        let _g = self.inner.stripe(self.vol.id, c).write().await;
        let epoch = self.vol.epoch();
        let own = lookup_own(&self.inner, &self.vol, c, epoch)?;
        let mut b = WriteBatch::default();
        let mut freed = None;
        match own {
            Some(loc) if self.vol.head_owns(loc.epoch, epoch) => {
                if loc.pcluster == ZERO_CLUSTER {
                    return Ok(());
                }
                // Anything beneath (an older own entry, even one GC has not removed yet, or the parent chain)
                // would show through a deleted entry: shadow it with a zero entry instead.
                let beneath = match loc.epoch.checked_sub(1) {
                    Some(e) if e > 0 => resolve(&self.inner, &self.vol, c, e)?.is_some(),
                    _ => self.parent_resolves(c)?,
                };
                let key = keys::map(self.vol.id, c, loc.epoch);
                if beneath {
                    b.put(key, keys::map_value(&key, ZERO_CLUSTER));
                } else {
                    b.delete(key);
                }
                b.put(keys::free(loc.pcluster), []);
                b.merge(keys::count(self.vol.id, loc.epoch), keys::delta(-1));
                // The entry beneath a partial one may now be visible to no view: let GC collect it.
                let collect = !loc.is_full()
                    && resolve_layers(&self.inner, &self.vol, c, loc.epoch)?
                        .get(1)
                        .is_some_and(|base| self.unseen_base(&loc, base));
                if collect {
                    b.put(keys::gc(self.vol.id), []);
                }
                freed = Some((loc.pcluster, loc.epoch, collect));
            }
            Some(loc) if loc.pcluster == ZERO_CLUSTER => return Ok(()),
            Some(_) => {
                let key = keys::map(self.vol.id, c, epoch);
                b.put(key, keys::map_value(&key, ZERO_CLUSTER));
            }
            None => {
                if !self.parent_resolves_data(c)? {
                    return Ok(());
                }
                let key = keys::map(self.vol.id, c, epoch);
                b.put(key, keys::map_value(&key, ZERO_CLUSTER));
            }
        }
        match own {
            Some(loc) => self.commit_entry_change(b, c, loc.epoch)?,
            None => self.inner.write(b, false)?,
        }
        invalidate(&self.inner, &self.vol, c);
        if let Some((p, e, collect)) = freed {
            self.vol.add_count(e, -1);
            crate::gc::defer_release(&self.inner, &[p]);
            if collect {
                self.wake_gc();
            }
        }
        Ok(())
    }

    fn parent_resolves(&self, c: u64) -> EResult<bool> {
        match (self.vol.parent, &self.vol.parent_state) {
            (Some(p), Some(ps)) if c < p.size.div_ceil(self.cs()) => {
                Ok(resolve(&self.inner, ps, c, p.epoch)?.is_some())
            }
            _ => Ok(false),
        }
    }

    fn parent_resolves_data(&self, c: u64) -> EResult<bool> {
        match (self.vol.parent, &self.vol.parent_state) {
            (Some(p), Some(ps)) if c < p.size.div_ceil(self.cs()) => {
                Ok(resolve(&self.inner, ps, c, p.epoch)?
                    .is_some_and(|l| l.pcluster != ZERO_CLUSTER))
            }
            _ => Ok(false),
        }
    }

    /// Zero [offset, offset+len) of the head: whole clusters are unmapped, partial ones written with zeroes
    /// unless they already read as zeroes.
    async fn zero_range(&self, offset: u64, len: u64, fua: bool) -> BResult<()> {
        let cs = self.cs();
        let pieces = self.pieces(offset, len);
        let whole = pieces.iter().any(|&(_, _, n, _)| n == cs);
        try_join_all(pieces.into_iter().map(|(c, in_off, n, _)| async move {
            if n == cs {
                self.zero_cluster(c).await
            } else {
                let epoch = self.vol.epoch();
                let has_data = {
                    let _g = self.inner.stripe(self.vol.id, c).read().await;
                    resolve(&self.inner, &self.vol, c, epoch)?
                        .is_some_and(|l| l.pcluster != ZERO_CLUSTER)
                };
                if has_data {
                    self.write_piece(c, in_off, IoBuf::zeroed(n as usize), fua)
                        .await
                } else {
                    Ok(())
                }
            }
        }))
        .await?;
        // One WAL sync for all the whole clusters' commits (not one fsync per cluster).
        if fua && whole {
            self.inner.sync_wal().await?;
        }
        Ok(())
    }

    /// Used by shrink: make everything in [new_size, old_size) read as zeroes.
    pub(crate) async fn zero_beyond(&self, new_size: u64, old_size: u64) -> EResult<()> {
        let _b = self.vol.barrier.read().await;
        let end = old_size.div_ceil(self.cs()) * self.cs();
        let first = new_size >> self.inner.shift;
        let last = end >> self.inner.shift;
        let mapped =
            crate::digest::mapped_clusters(&self.inner, &self.vol, self.vol.epoch(), first, last)?;
        for (c, _) in mapped {
            let start = (c * self.cs()).max(new_size);
            let stop = (c + 1) * self.cs();
            self.zero_range(start, stop - start, false).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl BlockDevice for Volume {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            size: self.size_now(),
            block_size: 512,
            preferred_block_size: self.inner.cs as u32,
            read_only: self.view_epoch.is_some(),
            can_trim: true,
            can_fast_zero: true,
            can_multi_conn: true,
        }
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> BResult<IoBuf> {
        let len = buf.len() as u64;
        check_range(&self.info(), offset, len)?;
        self.check_open()?;
        if len == 0 {
            return Ok(buf);
        }
        let pieces = self.pieces(offset, len);
        if pieces.len() == 1 {
            let (c, in_off, _, _) = pieces[0];
            return self.read_piece(c, in_off, buf).await;
        }
        Box::pin(self.read_multi(&pieces, buf)).await
    }

    async fn write(&self, offset: u64, data: IoBuf, flags: WriteFlags) -> BResult<()> {
        let len = data.len() as u64;
        check_write(&self.info(), offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let _b = self.vol.barrier.read().await;
        self.check_open()?;
        let pieces = self.pieces(offset, len);
        if pieces.len() == 1 {
            let (c, in_off, _, _) = pieces[0];
            return self.write_piece(c, in_off, data, flags.fua).await;
        }
        // Boxed for the same reason as the redirect: single-cluster writes should not carry its state.
        Box::pin(async {
            let Some(data) = self.write_run(&pieces, data, flags.fua).await? else {
                return Ok(());
            };
            try_join_all(pieces.iter().map(|&(c, in_off, n, at)| {
                let part = IoBuf::from_slice(&data[at as usize..(at + n) as usize]);
                self.write_piece(c, in_off, part, flags.fua)
            }))
            .await?;
            Ok(())
        })
        .await
    }

    async fn flush(&self) -> BResult<()> {
        self.check_open()?;
        crate::gc::flush(&self.inner).await
    }

    async fn discard(&self, offset: u64, len: u64) -> BResult<()> {
        self.write_zeroes(offset, len, true, WriteFlags::default())
            .await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _may_trim: bool,
        flags: WriteFlags,
    ) -> BResult<()> {
        check_write(&self.info(), offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let _b = self.vol.barrier.read().await;
        self.check_open()?;
        self.zero_range(offset, len, flags.fua).await?;
        if flags.fua {
            crate::gc::flush(&self.inner).await?;
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> BResult<Vec<Extent>> {
        check_range(&self.info(), offset, len)?;
        self.check_open()?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let cs = self.cs();
        // Bound the work of one call; callers ask again for the rest.
        let len = len.min(cs << 16);
        let end = offset + len;
        let first = offset >> self.inner.shift;
        let last = end.div_ceil(cs);
        let mapped =
            crate::digest::mapped_clusters(&self.inner, &self.vol, self.epoch_now(), first, last)?;
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |start: u64, stop: u64, kind: ExtentKind| {
            let (s, e) = (start.max(offset), stop.min(end));
            if s >= e {
                return;
            }
            match out.last_mut() {
                Some(l) if l.kind == kind && l.offset + l.length == s => l.length += e - s,
                _ => out.push(Extent {
                    offset: s,
                    length: e - s,
                    kind,
                }),
            }
        };
        let mut pos = first;
        for (c, p) in mapped {
            if c > pos {
                push(pos * cs, c * cs, ExtentKind::Hole);
            }
            let kind = if p == ZERO_CLUSTER {
                ExtentKind::Hole
            } else {
                ExtentKind::Data
            };
            push(c * cs, (c + 1) * cs, kind);
            pos = c + 1;
        }
        if pos < last {
            push(pos * cs, last * cs, ExtentKind::Hole);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After a snapshot, the head's partial entries are tabled in the head table with their effective masks:
    /// a deferred widening shows at once, a commit of it changes nothing, a widening to the whole cluster
    /// clears the slot (the next lookup tables the full entry), and the data read back is right throughout.
    /// A fresh SR of 64 KiB clusters in `dir`.
    fn engine(dir: &std::path::Path) -> crate::engine::Engine {
        let io = shale_block::uring::IoEngine::new(Default::default()).expect("io engine");
        let cfg = crate::engine::SrConfig {
            cluster_size: 65536,
            capacity: None,
        };
        crate::engine::Engine::create(&dir.join("sr"), cfg, io).expect("sr")
    }

    #[tokio::test]
    async fn partial_entries_are_tabled_with_effective_masks() {
        let cs = 65536u64;
        let t = tempfile::tempdir().expect("tempdir");
        let e = engine(t.path());
        let v = e.create_vdi("v", 4 * cs).await.expect("vdi");
        let vol = e.open_volume(v.uuid).expect("volume");
        vol.write(
            0,
            IoBuf::from_slice(&vec![1u8; cs as usize]),
            WriteFlags::default(),
        )
        .await
        .expect("fill");
        let snap = e.snapshot(v.uuid, "s").await.expect("snapshot");
        let tabled = |c: u64| vol.vol.headmap.get(vol.vol.id, c, vol.vol.epoch());
        let write = |off: u64, len: usize, b: u8| {
            vol.write(off, IoBuf::from_slice(&vec![b; len]), WriteFlags::default())
        };

        write(0, 4096, 2).await.expect("redirect");
        // The redirect's entry is found (and tabled) by the next head lookup.
        write(0, 4096, 3).await.expect("in place");
        let first = tabled(0).expect("partial entry tabled");
        assert_eq!(first.mask, sub_mask(cs, 0, 4096));
        write(8192, 4096, 4).await.expect("widen");
        let widened = tabled(0).expect("still tabled");
        assert_eq!(
            (widened.epoch, widened.pcluster),
            (first.epoch, first.pcluster)
        );
        assert_eq!(
            widened.mask,
            sub_mask(cs, 0, 4096) | sub_mask(cs, 8192, 4096)
        );
        crate::dirty::commit_all(&e.inner).expect("commit widenings");
        assert_eq!(
            tabled(0),
            Some(widened),
            "a commit leaves the effective mask as it was"
        );
        let back = vol.read(0, IoBuf::zeroed(16384)).await.expect("read");
        assert!(back[..4096].iter().all(|&b| b == 3));
        assert!(
            back[4096..8192].iter().all(|&b| b == 1),
            "read through to the snapshot's data"
        );
        assert!(back[8192..12288].iter().all(|&b| b == 4));

        // Whole: committed at once, the slot cleared, then the full entry tabled by the next lookup.
        write(0, cs as usize, 5).await.expect("whole");
        let back = vol.read(0, IoBuf::zeroed(cs as usize)).await.expect("read");
        assert!(back.iter().all(|&b| b == 5));
        assert_eq!(tabled(0).map(|l| l.mask), Some(FULL_MASK));
        // The snapshot still reads its own data.
        let snap = e.open_volume(snap.uuid).expect("snapshot view");
        let old = snap
            .read(0, IoBuf::zeroed(cs as usize))
            .await
            .expect("snapshot read");
        assert!(old.iter().all(|&b| b == 1));
    }

    /// Every FUA write that changes the map (an allocation, a redirect after a snapshot, a widened partial entry,
    /// zeroed clusters) returns with its metadata synced, and so does a FUA write in place into a cluster whose
    /// entry an earlier non-FUA write committed unsynced; those commits run unsynced and then await
    /// `Inner::sync_wal` off the I/O thread. A non-FUA write leaves its commit unsynced.
    #[tokio::test]
    async fn fua_writes_return_with_their_map_entries_synced() {
        let cs = 65536u64;
        let t = tempfile::tempdir().expect("tempdir");
        let e = engine(t.path());
        let v = e.create_vdi("v", 16 * cs).await.expect("vdi");
        let vol = e.open_volume(v.uuid).expect("volume");
        let inner = e.inner.clone();
        let write = |off: u64, fua: bool| {
            let flags = if fua {
                WriteFlags::FUA
            } else {
                WriteFlags::default()
            };
            vol.write(off, IoBuf::from_slice(&[7u8; 4096]), flags)
        };
        let steps: [(&str, u64, bool); 6] = [
            ("allocating, not FUA", 0, false),
            ("FUA in place over that unsynced entry", 4096, true),
            ("allocating, FUA", cs, true),
            ("allocating, not FUA, again", 2 * cs, false),
            ("FUA in place after the snapshot below", 3 * cs, true),
            ("FUA redirect after the snapshot", 0, true),
        ];
        for (i, (what, off, fua)) in steps.into_iter().enumerate() {
            if i == 4 {
                write(3 * cs, false).await.expect("allocate cluster 3");
                e.snapshot(v.uuid, "s").await.expect("snapshot");
                write(3 * cs, false)
                    .await
                    .expect("redirect cluster 3, not FUA");
                assert!(inner.wal_unsynced(), "the redirect's entry is unsynced");
            }
            write(off, fua).await.expect(what);
            assert_eq!(inner.wal_unsynced(), !fua, "{what}");
        }
        // Widening the redirected (partial) entry of cluster 0 with FUA.
        write(8192, true).await.expect("FUA widening");
        assert!(!inner.wal_unsynced(), "FUA widening");
        // Zeroing whole clusters with FUA: one sync for all of them.
        write(5 * cs, false).await.expect("allocate cluster 5");
        vol.write_zeroes(4 * cs, 4 * cs, false, WriteFlags::FUA)
            .await
            .expect("FUA zeroes");
        assert!(!inner.wal_unsynced(), "FUA zeroing");
        let back = vol.read(5 * cs, IoBuf::zeroed(4096)).await.expect("read");
        assert!(back.iter().all(|&b| b == 0), "zeroed");
        // Concurrent allocating FUA writes share syncs (group commit): none returns before a sync that began
        // after its commit, so once all have returned nothing is unsynced.
        let writes = (8..16u64).map(|c| write(c * cs, true));
        for r in futures::future::join_all(writes).await {
            r.expect("concurrent FUA write");
        }
        assert!(!inner.wal_unsynced(), "concurrent FUA writes");
    }

    #[test]
    fn sub_cluster_masks() {
        let cs = 65536;
        assert_eq!(sub_count(cs), 32);
        assert_eq!(sub_mask(cs, 0, 4096), 0b11);
        assert_eq!(sub_mask(cs, 2560, 512), 0b10);
        assert_eq!(
            sub_mask(cs, 2047, 2),
            0b11,
            "a write straddling two sub-clusters touches both"
        );
        assert_eq!(sub_mask(cs, cs - 2048, 2048), 1 << 31);
        assert_eq!(sub_mask(cs, 0, cs), FULL_MASK);
        // Small clusters: sub-clusters are never under a sector.
        assert_eq!(sub_count(4096), 8);
        assert_eq!(sub_mask(4096, 512, 1024), 0b110);
        assert_eq!(sub_mask(4096, 0, 4096), FULL_MASK);
        assert_eq!(mask_union(4096, 0b0000_1111, 0b1111_0000), FULL_MASK);
        assert_eq!(mask_union(cs, 0b01, 0b10), 0b11);
        assert_eq!(mask_union(cs, u32::MAX >> 1, 1 << 31), FULL_MASK);
    }
}
