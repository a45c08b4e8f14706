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
//! key. Every batch that writes or deletes a map entry that may be dirty goes through [`Dirty::write_changing`],
//! which writes it under the commit guard and forgets the key's widening; [`commit_all`] writes under the same guard.
//! Lookups take only the map's own short lock (never the guard), so a large commit does not stall the data path.
//! Only head-owned partial entries are ever dirty, so no snapshot or clone reads one.

use std::sync::Arc;

use parking_lot::Mutex;
use rocksdb::WriteBatch;

use crate::engine::Inner;
use crate::error::Result;
use crate::keys;

/// A map entry: (volume, cluster, epoch).
pub(crate) type EntryKey = (u64, u64, u64);

/// A widening: (physical cluster, widened mask).
pub(crate) type Widening = (u64, u32);

/// Entry → its pending widening.
pub(crate) type DirtyMap = rustc_hash::FxHashMap<EntryKey, Widening>;

/// The deferred widenings of one SR.
#[derive(Debug, Default)]
pub(crate) struct Dirty {
    /// Pending widenings; locked only briefly (lookups consult it).
    map: Mutex<DirtyMap>,
    /// Held across the RocksDB write of any batch that commits widenings or changes a map entry that may have one
    /// pending, so a commit never writes a widening over a newer change of the same entry.
    pub(crate) commit: Mutex<()>,
}

impl Dirty {
    /// The widened mask of the entry (vol, cluster, epoch), if one is pending.
    pub fn mask(&self, vol: u64, cluster: u64, epoch: u64) -> Option<u32> {
        self.map.lock().get(&(vol, cluster, epoch)).map(|&(_, m)| m)
    }

    /// Record a widening (the data is already written in place). Caller holds the cluster's stripe exclusively.
    pub fn widen(&self, vol: u64, cluster: u64, epoch: u64, pcluster: u64, mask: u32) {
        self.map
            .lock()
            .insert((vol, cluster, epoch), (pcluster, mask));
    }

    /// Write a batch that changes or deletes the map entries `changed`, whose pending widenings it supersedes:
    /// serialised with commits of widenings, so no commit can write one of them over this batch.
    pub fn write_changing(
        &self,
        inner: &Inner,
        b: WriteBatch,
        sync: bool,
        changed: impl IntoIterator<Item = EntryKey>,
    ) -> Result<()> {
        let _guard = self.commit.lock();
        inner.write(b, sync)?;
        let mut map = self.map.lock();
        for k in changed {
            map.remove(&k);
        }
        Ok(())
    }

    /// Whether anything is pending.
    pub fn is_empty(&self) -> bool {
        self.map.lock().is_empty()
    }

    /// Put the pending widenings of `vol` (all volumes if `None`) into `b`, in key order (see
    /// [`Inner::write_in_order`]); returns what was put, for [`Dirty::committed`]. Caller holds the commit guard
    /// (see [`commit_all`] and `Engine::snapshot`).
    pub fn put_pending(&self, vol: Option<u64>, b: &mut WriteBatch) -> Vec<(EntryKey, Widening)> {
        let mut taken: Vec<_> = self
            .map
            .lock()
            .iter()
            .filter(|(k, _)| vol.is_none_or(|v| k.0 == v))
            .map(|(&k, &v)| (k, v))
            .collect();
        // Map keys sort by volume, cluster, then epoch newest first (`keys::map`).
        taken.sort_unstable_by_key(|&((v, c, e), _)| (v, c, std::cmp::Reverse(e)));
        for &((v, c, e), (p, mask)) in &taken {
            keys::put_map(b, &keys::map(v, c, e), p, mask);
        }
        taken
    }

    /// After the batch holding `taken` is written (still under the commit guard): the lookup cache, which
    /// holds committed entries, takes the committed masks, and widenings no newer than what was committed stop
    /// being pending. (A widening recorded meanwhile stays pending: its mask is wider.)
    pub fn committed(&self, inner: &Inner, taken: Vec<(EntryKey, Widening)>) {
        for ((v, c, e), (_, mask)) in taken {
            crate::volume::cache_set_mask(inner, v, c, e, mask);
            let mut map = self.map.lock();
            if map.get(&(v, c, e)).is_some_and(|&(_, m)| m == mask) {
                map.remove(&(v, c, e));
            }
        }
    }
}

/// Commit every pending widening in one batch (not synced: `flush` syncs the WAL right after). On failure they
/// stay pending and the next flush retries.
pub(crate) fn commit_all(inner: &Arc<Inner>) -> Result<()> {
    if inner.dirty.is_empty() {
        return Ok(());
    }
    let _guard = inner.dirty.commit.lock();
    let mut b = WriteBatch::default();
    let taken = inner.dirty.put_pending(None, &mut b);
    if taken.is_empty() {
        return Ok(());
    }
    inner.write_in_order(b)?;
    inner.dirty.committed(inner, taken);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pending widenings go into a commit batch in the byte order of their map keys, which is what lets RocksDB
    /// use each insert as the hint for the next (`Inner::write_in_order`).
    #[test]
    fn pending_widenings_are_put_in_key_order() {
        let d = Dirty::default();
        let entries = [
            (2, 7, 3),
            (1, 900, 1),
            (1, 5, 2),
            (1, 5, 9),
            (2, 1, 4),
            (1, 256, 1),
        ];
        for (i, &(v, c, e)) in entries.iter().enumerate() {
            d.widen(v, c, e, 100 + i as u64, 0b11);
        }
        let mut b = WriteBatch::default();
        let taken = d.put_pending(None, &mut b);
        assert_eq!(taken.len(), entries.len());
        assert_eq!(b.len(), entries.len());
        let order: Vec<_> = taken
            .iter()
            .map(|&((v, c, e), _)| keys::map(v, c, e))
            .collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted);

        let mut b = WriteBatch::default();
        let only: Vec<_> = d
            .put_pending(Some(2), &mut b)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(only, vec![(2, 1, 4), (2, 7, 3)]);
    }
}
