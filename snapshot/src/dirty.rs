//! Deferred sub-cluster mask widenings ("dirty masks").
//!
//! A head write that touches sub-clusters its partial entry does not hold yet widens the entry's mask. Committing
//! that to RocksDB on every such request cost a memtable insert per request (under sustained 4 KiB random writes
//! after a snapshot, RocksDB's skiplist insert was the largest item in the NBD thread's profile), so widenings are
//! kept here and committed together, the way dm-thin commits its metadata: at `flush`, before a snapshot freezes
//! the volume, on FUA writes, when an entry becomes whole, and within a second by the background task. A crash
//! loses only widenings of writes that were never flushed: those sub-clusters then read as before the write (the
//! data beneath), which is what an unflushed write may do.
//!
//! Safety rule: a deferred widening must never be applied after another batch changed or deleted the same map
//! key. Every batch that writes or deletes a map entry that may be dirty takes this map's lock, removes the key
//! and writes the batch before releasing the lock; [`commit_all`] writes its batch under the same lock. Only
//! head-owned partial entries are ever dirty, so no snapshot or clone reads one.

use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use rocksdb::WriteBatch;

use crate::engine::Inner;
use crate::error::Result;
use crate::keys;

/// (volume, cluster, epoch of the entry) → (physical cluster, widened mask).
pub(crate) type DirtyMap = rustc_hash::FxHashMap<(u64, u64, u64), (u64, u32)>;

/// The deferred widenings of one SR.
#[derive(Debug, Default)]
pub(crate) struct Dirty {
    map: Mutex<DirtyMap>,
}

impl Dirty {
    /// The widened mask of the entry (vol, cluster, epoch), if one is pending.
    pub fn mask(&self, vol: u64, cluster: u64, epoch: u64) -> Option<u32> {
        self.map.lock().get(&(vol, cluster, epoch)).map(|&(_, m)| m)
    }

    /// Record a widening (the data is already written in place).
    pub fn widen(&self, vol: u64, cluster: u64, epoch: u64, pcluster: u64, mask: u32) {
        self.map
            .lock()
            .insert((vol, cluster, epoch), (pcluster, mask));
    }

    /// Lock the map: held by a caller across the RocksDB write of a batch that changes map keys (see the module
    /// docs), after removing those keys.
    pub fn lock(&self) -> MutexGuard<'_, DirtyMap> {
        self.map.lock()
    }

    /// Whether anything is pending.
    pub fn is_empty(&self) -> bool {
        self.map.lock().is_empty()
    }
}

/// Put the pending widenings of `vol` into `b` (the caller forgets them with [`forget`] once `b` is written).
pub(crate) fn put_pending(map: &DirtyMap, vol: u64, b: &mut WriteBatch) {
    for (&(v, c, e), &(p, mask)) in map.iter().filter(|(k, _)| k.0 == vol) {
        keys::put_map(b, &keys::map(v, c, e), p, mask);
    }
}

/// Forget the pending widenings of `vol`, committed by the caller's batch: the lookup cache, which holds
/// committed entries, takes the widened masks.
pub(crate) fn forget(inner: &Inner, map: &mut DirtyMap, vol: u64) {
    map.retain(|&(v, c, e), &mut (_, mask)| {
        if v != vol {
            return true;
        }
        to_cache(inner, v, c, e, mask);
        false
    });
}

/// Set the mask of cached lookups that found the entry (vol, cluster, epoch).
fn to_cache(inner: &Inner, vol: u64, cluster: u64, epoch: u64, mask: u32) {
    crate::volume::cache_edit(inner, vol, cluster, |v| {
        for (_, r) in v.iter_mut() {
            if let Some(l) = r.as_mut().filter(|l| l.epoch == epoch) {
                l.mask = mask;
            }
        }
    });
}

/// Commit every pending widening in one batch (not synced: `flush` syncs the WAL right after). On failure they
/// stay pending and the next flush retries.
pub(crate) fn commit_all(inner: &Arc<Inner>) -> Result<()> {
    let mut map = inner.dirty.lock();
    if map.is_empty() {
        return Ok(());
    }
    let mut b = WriteBatch::default();
    for (&(v, c, e), &(p, mask)) in map.iter() {
        keys::put_map(&mut b, &keys::map(v, c, e), p, mask);
    }
    inner.write(b, false)?;
    for ((v, c, e), (_, mask)) in map.drain() {
        to_cache(inner, v, c, e, mask);
    }
    Ok(())
}
