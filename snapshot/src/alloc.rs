//! The cluster allocator.
//!
//! Physical clusters are numbered from 0 in the SR's data file. Two kinds of state persist in RocksDB:
//! the high-water mark (`a`, merged with `max`, so concurrent batches cannot move it backwards) and one `f` key
//! per free cluster below it. An allocation is only a *reservation* in memory until the map entry that uses it
//! commits in the same `WriteBatch` as the allocator change; if the process dies first, the cluster is still free
//! on disk and the data written into it is simply unreferenced.
//!
//! Freed clusters take a detour: they are committed free, then their space is punched out of the data file, and
//! only then handed out again ([`Allocator::release`]), so a punch can never destroy data of a new owner.
//!
//! **Invariant: every cluster [`Allocator::reserve`] hands out reads as zeroes.** Clusters above the high-water
//! mark were never written (recovery truncates the data file there), freed clusters are punched before release,
//! and recovery after an unclean shutdown punches the whole free list. The data path relies on it to write only
//! the bytes of a partial write into a fresh cluster.

use std::collections::BTreeSet;

use rustc_hash::FxHashSet;

use rocksdb::WriteBatch;

use crate::keys;

/// How a reserved cluster was obtained; decides what the commit records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Taken from the free list: the commit deletes its `f` key.
    Free,
    /// Taken above the high-water mark: the commit raises the mark.
    Fresh,
}

/// A reserved physical cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// The physical cluster number.
    pub pcluster: u64,
    /// Where it came from.
    pub source: Source,
}

impl Reservation {
    /// Add the allocator half of the commit to `batch`: the cluster leaves the free list and the high-water
    /// mark covers it. Both are recorded whatever the source, because a fresh cluster that was given back and
    /// handed out again from the free list must still raise the mark on disk.
    pub fn commit_into(&self, batch: &mut WriteBatch) {
        batch.delete(keys::free(self.pcluster));
        batch.merge(keys::HIGH_WATER, (self.pcluster + 1).to_be_bytes());
    }
}

/// In-memory allocator state (guarded by a mutex in the engine).
#[derive(Debug)]
pub struct Allocator {
    free: BTreeSet<u64>,
    high_water: u64,
    limit: Option<u64>,
    /// Clusters committed free but not yet punched/released.
    pending: u64,
    /// Reservations handed out and not yet settled (committed, or given back): `sr check` on a live SR must not
    /// count them as leaks, since the map entries that will own them are not committed yet. FxHash: every
    /// allocating write inserts and removes here under the allocator's lock.
    in_flight: FxHashSet<u64>,
}

impl Allocator {
    /// Rebuild from the persisted high-water mark and free list; `limit` is the capacity in clusters.
    pub fn new(high_water: u64, free: BTreeSet<u64>, limit: Option<u64>) -> Self {
        Allocator {
            free,
            high_water,
            limit,
            pending: 0,
            in_flight: FxHashSet::default(),
        }
    }

    /// Reserve one cluster, lowest free first (keeps the data file compact); `None` when the SR is full.
    /// The caller must [`settle`](Self::settle) it once its commit is written (or hand it to GC's release), or
    /// [`unreserve`](Self::unreserve) it.
    pub fn reserve(&mut self) -> Option<Reservation> {
        let r = if let Some(p) = self.free.pop_first() {
            Reservation {
                pcluster: p,
                source: Source::Free,
            }
        } else {
            if self.limit.is_some_and(|l| self.high_water >= l) {
                return None;
            }
            let p = self.high_water;
            self.high_water += 1;
            Reservation {
                pcluster: p,
                source: Source::Fresh,
            }
        };
        self.in_flight.insert(r.pcluster);
        Some(r)
    }

    /// A reservation's fate is decided: its commit is written (a map entry owns the cluster), or it was handed to
    /// `gc::release_clusters` after a failed write.
    pub fn settle(&mut self, r: Reservation) {
        self.in_flight.remove(&r.pcluster);
    }

    /// Clusters reserved and not yet settled or given back.
    pub fn in_flight(&self) -> &FxHashSet<u64> {
        &self.in_flight
    }

    /// The clusters the allocator will hand out next (the free list in memory).
    pub fn free_set(&self) -> &BTreeSet<u64> {
        &self.free
    }

    /// Give back a reservation whose commit did not happen.
    pub fn unreserve(&mut self, r: Reservation) {
        self.in_flight.remove(&r.pcluster);
        match r.source {
            Source::Free => {
                self.free.insert(r.pcluster);
            }
            // A fresh cluster cannot be returned below the mark (another may have been taken above it), so it
            // joins the free list in memory. If the process dies before it is used again it is unreferenced on
            // disk; the open-time leak scan after an unclean shutdown returns it to the free list.
            Source::Fresh => {
                self.free.insert(r.pcluster);
            }
        }
    }

    /// Note clusters committed free whose punch is in progress.
    pub fn add_pending(&mut self, n: u64) {
        self.pending += n;
    }

    /// Clusters committed free and punched: allocatable again.
    pub fn release(&mut self, clusters: &[u64]) {
        self.pending = self.pending.saturating_sub(clusters.len() as u64);
        self.free.extend(clusters.iter().copied());
    }

    /// Clusters that were pending release but are withheld (could not be zeroed).
    pub fn forget_pending(&mut self, n: u64) {
        self.pending = self.pending.saturating_sub(n);
    }

    /// Clusters in use (allocated and referenced, or reserved).
    pub fn used(&self) -> u64 {
        self.high_water - self.free.len() as u64 - self.pending
    }

    /// Clusters still allocatable, if the SR has a capacity.
    pub fn available(&self) -> Option<u64> {
        self.limit
            .map(|l| l.saturating_sub(self.high_water) + self.free.len() as u64)
    }

    /// The high-water mark.
    pub fn high_water(&self) -> u64 {
        self.high_water
    }

    /// Whether a cluster is currently on the free list.
    pub fn is_free(&self, p: u64) -> bool {
        self.free.contains(&p)
    }

    /// Number of clusters on the free list.
    pub fn free_len(&self) -> u64 {
        self.free.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_until_full_then_release() {
        let mut a = Allocator::new(0, BTreeSet::new(), Some(3));
        let r: Vec<_> = (0..3).map(|_| a.reserve().unwrap()).collect();
        assert_eq!(
            r.iter().map(|r| r.pcluster).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert!(a.reserve().is_none());
        assert_eq!(a.available(), Some(0));
        assert_eq!(a.in_flight().len(), 3);
        r.into_iter().for_each(|r| a.settle(r));
        a.add_pending(1);
        assert!(
            a.reserve().is_none(),
            "pending clusters are not allocatable before release"
        );
        a.release(&[1]);
        let again = a.reserve().unwrap();
        assert_eq!(
            again,
            Reservation {
                pcluster: 1,
                source: Source::Free
            }
        );
        assert!(a.in_flight().contains(&1));
        a.unreserve(again);
        assert!(a.is_free(1));
        assert!(!a.in_flight().contains(&1));
        assert_eq!(a.used(), 2);
        let r = a.reserve().unwrap();
        assert_eq!(a.in_flight().len(), 1);
        a.settle(r);
        assert!(
            a.in_flight().is_empty(),
            "a settled reservation is no longer in flight"
        );
    }
}
