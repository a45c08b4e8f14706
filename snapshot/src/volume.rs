//! The data path: a VDI head or snapshot view as a [`BlockDevice`].
//!
//! A request is split into per-cluster pieces. For each piece the map lookup is one RocksDB seek to
//! `m vol cluster !epoch` (newest entry at or below the view's epoch), falling through to the parent view for
//! clones: the cost depends on clone depth, never on the number of snapshots.
//!
//! Writes, per cluster:
//! - **in place** when the newest entry belongs to the head alone (written at the current epoch, or no live
//!   snapshot between its epoch and now): one data write, no metadata (the fast path);
//! - **redirect on write** otherwise: `reserve cluster → write full cluster (old contents merged) → commit map
//!   entry + allocator change in one WriteBatch`. Data always reaches its cluster before the entry that points to
//!   it is committed, and a cluster a snapshot can see is never overwritten.
//!
//! Durability: a write is durable after `flush` (fdatasync of the data file, then RocksDB WAL sync) or at once
//! with FUA (RWF_DSYNC data write, synced batch).
//!
//! Locking: each (volume, cluster) hashes to a lock stripe. Reads and in-place writes hold it shared; redirects,
//! discards and zeroing hold it exclusive, so a cluster is never freed or replaced under a reader. A request holds
//! at most one stripe at a time (pieces run concurrently, each with its own), so stripes cannot deadlock.
//! Mutations also hold the volume's barrier shared, which snapshot/destroy take exclusively to drain them.

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
use crate::keys::{self, ZERO_CLUSTER};
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

/// One shard of the lookup cache: (vol, cluster) → results of `lookup_own` at the epochs asked for. Keyed with
/// FxHash: the keys are our own integers (no hash-flooding exposure), and SipHash showed up in NBD read profiles.
pub(crate) type CacheShard = rustc_hash::FxHashMap<(u64, u64), Vec<(u64, Option<Loc>)>>;

/// Entries per cache shard before the shard is cleared (about a million entries in all).
const CACHE_SHARD_CAP: usize = 1024;

/// Read one map entry: the newest entry for (vol, cluster) at or below `epoch`, in this volume only.
///
/// Cached: a RocksDB iterator per lookup costs several microseconds, a cache hit a hash probe. Correctness rests
/// on two rules. The caller holds the stripe lock of (vol, cluster) (or of the clone whose parent view this is:
/// entries visible at a frozen view never change), so a fill cannot interleave with a change of the map; and
/// every change of a (vol, cluster)'s entries happens under that stripe's exclusive lock and calls
/// [`invalidate`] before releasing it. GC deletes only entries no live view can see, so it never makes a cached
/// answer for a live view wrong.
pub(crate) fn lookup_own(
    inner: &Inner,
    vol: u64,
    cluster: u64,
    epoch: u64,
) -> EResult<Option<Loc>> {
    let shard = &inner.cache[Inner::shard(vol, cluster)];
    if let Some(v) = shard.lock().get(&(vol, cluster)) {
        if let Some(&(_, r)) = v.iter().find(|(e, _)| *e == epoch) {
            return Ok(r);
        }
    }
    let r = lookup_own_db(inner, vol, cluster, epoch)?;
    let mut g = shard.lock();
    if g.len() >= CACHE_SHARD_CAP {
        g.clear();
    }
    let v = g.entry((vol, cluster)).or_default();
    if v.len() >= 4 {
        v.remove(0);
    }
    v.push((epoch, r));
    Ok(r)
}

/// Forget cached lookups of (vol, cluster); called under its exclusive stripe lock after changing its entries.
pub(crate) fn invalidate(inner: &Inner, vol: u64, cluster: u64) {
    inner.cache[Inner::shard(vol, cluster)]
        .lock()
        .remove(&(vol, cluster));
}

fn lookup_own_db(inner: &Inner, vol: u64, cluster: u64, epoch: u64) -> EResult<Option<Loc>> {
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
            let p = keys::parse_map_value(k, v).ok_or_else(|| {
                EngineError::Corrupt(format!(
                    "map entry vol {vol} cluster {cluster} fails its checksum"
                ))
            })?;
            return Ok(Some(Loc {
                vol,
                epoch: ke,
                pcluster: p,
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
    let mut v = vs.clone();
    let mut e = epoch;
    loop {
        if let Some(loc) = lookup_own(inner, v.id, cluster, e)? {
            return Ok(Some(loc));
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

    /// Split [offset, offset+len) into (cluster, offset in cluster, length, offset in request).
    fn pieces(&self, offset: u64, len: u64) -> Vec<(u64, u64, u64, u64)> {
        let cs = self.cs();
        let mut out = Vec::with_capacity((len / cs + 2) as usize);
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

    async fn read_piece(&self, c: u64, in_off: u64, buf: IoBuf, epoch: u64) -> BResult<IoBuf> {
        let _g = self.inner.stripe(self.vol.id, c).read().await;
        match resolve(&self.inner, &self.vol, c, epoch)? {
            Some(loc) if loc.pcluster != ZERO_CLUSTER => {
                let (r, mut buf) = self
                    .inner
                    .io
                    .read_at(&self.inner.data, loc.pcluster * self.cs() + in_off, buf)
                    .await;
                r.map_err(BlockError::from_io)?;
                // The parent view may be shorter than this cluster; bytes beyond it were never written, but an
                // old grown-then-shrunk tail is zeroed on shrink, so nothing to mask here.
                let _ = &mut buf;
                Ok(buf)
            }
            _ => {
                let mut buf = buf;
                buf.as_mut_slice().fill(0);
                Ok(buf)
            }
        }
    }

    /// A read spanning several clusters: hold their stripes (in sorted order, so readers holding several cannot
    /// deadlock; writers hold one stripe at a time), resolve every piece, and issue one I/O per physically
    /// contiguous run — straight into the caller's buffer when a single run covers the whole request, the common
    /// case for data written sequentially.
    async fn read_multi(
        &self,
        pieces: &[(u64, u64, u64, u64)],
        mut buf: IoBuf,
        epoch: u64,
    ) -> BResult<IoBuf> {
        let cs = self.cs();
        let mut idx: Vec<usize> = pieces
            .iter()
            .map(|&(c, ..)| Inner::shard(self.vol.id, c))
            .collect();
        idx.sort_unstable();
        idx.dedup();
        let mut guards = Vec::with_capacity(idx.len());
        for i in idx {
            guards.push(self.inner.stripes[i].read().await);
        }
        let mut locs = Vec::with_capacity(pieces.len());
        for &(c, ..) in pieces {
            let loc = resolve(&self.inner, &self.vol, c, epoch)?;
            locs.push(
                loc.filter(|l| l.pcluster != ZERO_CLUSTER)
                    .map(|l| l.pcluster),
            );
        }
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

    /// Write one piece (within one cluster) of the head.
    async fn write_piece(&self, c: u64, in_off: u64, data: IoBuf, fua: bool) -> BResult<()> {
        let stripe = self.inner.stripe(self.vol.id, c);
        let epoch = self.vol.epoch();
        {
            let _g = stripe.read().await;
            if let Some(loc) = lookup_own(&self.inner, self.vol.id, c, epoch)? {
                if loc.pcluster != ZERO_CLUSTER && self.vol.head_owns(loc.epoch, epoch) {
                    return self.write_in_place(loc.pcluster, in_off, data, fua).await;
                }
            }
        }
        let _g = stripe.write().await;
        let own = lookup_own(&self.inner, self.vol.id, c, epoch)?;
        if let Some(loc) = own {
            if loc.pcluster != ZERO_CLUSTER && self.vol.head_owns(loc.epoch, epoch) {
                return self.write_in_place(loc.pcluster, in_off, data, fua).await;
            }
        }
        // Redirect on write: the old contents (if any) are merged into a fresh cluster.
        let base = match own {
            Some(loc) => Some(loc),
            None => resolve(&self.inner, &self.vol, c, epoch)?,
        };
        let cs = self.cs();
        let base_data = base.filter(|l| l.pcluster != ZERO_CLUSTER);
        let res = self
            .inner
            .alloc
            .lock()
            .reserve()
            .ok_or(BlockError::NoSpace)?;
        self.inner.ensure_allocated((res.pcluster + 1) * cs).await;
        // Every cluster the allocator hands out reads as zeroes (see `alloc`), so a partial write with nothing
        // beneath writes only its own bytes; otherwise the old contents are merged into a full cluster.
        let (at, buf) = if in_off == 0 && data.len() as u64 == cs || base_data.is_none() {
            (res.pcluster * cs + in_off, data)
        } else {
            // Fully overwritten by the read below (base_data is Some on this branch).
            let mut cbuf = IoBuf::for_overwrite(cs as usize);
            if let Some(loc) = base_data {
                let (r, b) = self
                    .inner
                    .io
                    .read_at(&self.inner.data, loc.pcluster * cs, cbuf)
                    .await;
                if let Err(e) = r {
                    self.inner.alloc.lock().unreserve(res);
                    return Err(BlockError::from_io(e));
                }
                cbuf = b;
            }
            let s = in_off as usize;
            cbuf.as_mut_slice()[s..s + data.len()].copy_from_slice(&data);
            (res.pcluster * cs, cbuf)
        };
        let (r, _) = self.inner.io.write_at(&self.inner.data, at, buf, fua).await;
        if let Err(e) = r {
            // The cluster may now hold part of the write: it must be zeroed again before reuse.
            crate::gc::release_clusters(&self.inner, vec![res.pcluster]).await;
            return Err(BlockError::from_io(e));
        }
        let key = keys::map(self.vol.id, c, epoch);
        let mut b = WriteBatch::default();
        b.put(key, keys::map_value(&key, res.pcluster));
        b.merge(keys::count(self.vol.id, epoch), keys::delta(1));
        res.commit_into(&mut b);
        if let Err(e) = self.inner.write(b, fua) {
            crate::gc::release_clusters(&self.inner, vec![res.pcluster]).await;
            return Err(e.into());
        }
        invalidate(&self.inner, self.vol.id, c);
        self.vol.add_count(epoch, 1);
        Ok(())
    }

    async fn write_in_place(&self, p: u64, in_off: u64, data: IoBuf, fua: bool) -> BResult<()> {
        let (r, _) = self
            .inner
            .io
            .write_at(&self.inner.data, p * self.cs() + in_off, data, fua)
            .await;
        r.map_err(BlockError::from_io)
    }

    /// Make a whole cluster of the head read as zeroes, freeing it if the head owned it.
    async fn zero_cluster(&self, c: u64, fua: bool) -> BResult<()> {
        let _g = self.inner.stripe(self.vol.id, c).write().await;
        let epoch = self.vol.epoch();
        let own = lookup_own(&self.inner, self.vol.id, c, epoch)?;
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
                freed = Some((loc.pcluster, loc.epoch));
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
        self.inner.write(b, fua)?;
        invalidate(&self.inner, self.vol.id, c);
        if let Some((p, e)) = freed {
            self.vol.add_count(e, -1);
            crate::gc::defer_release(&self.inner, &[p]);
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
        try_join_all(pieces.into_iter().map(|(c, in_off, n, _)| async move {
            if n == cs {
                self.zero_cluster(c, fua).await
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
        let epoch = self.epoch_now();
        let pieces = self.pieces(offset, len);
        if pieces.len() == 1 {
            let (c, in_off, _, _) = pieces[0];
            return self.read_piece(c, in_off, buf, epoch).await;
        }
        self.read_multi(&pieces, buf, epoch).await
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
        try_join_all(pieces.iter().map(|&(c, in_off, n, at)| {
            let part = IoBuf::from_slice(&data[at as usize..(at + n) as usize]);
            self.write_piece(c, in_off, part, flags.fua)
        }))
        .await?;
        Ok(())
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
