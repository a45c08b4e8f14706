//! A dense, per-volume table of each cluster's newest map entry, when that entry is full: the head's fast path
//! in front of the lookup cache.
//!
//! # Why
//! Every head read and write resolves its cluster (`volume::lookup_own`). The lookup cache answers from a sharded
//! hash map keyed by (volume, cluster), whose buckets (about 136 bytes each, 4.4 MB for a 2 GiB VDI) are touched
//! at random: in NBD profiles of 4 KiB random writes to a thin VDI the probe (shard lock and hash lookup) was the
//! largest item the thin VDI had over a plain file export, 0.53 µs of 11.1 µs of server CPU per I/O
//! (`tools/bench/RESULTS-nbd.md`). This table holds 8 bytes a cluster, in chunks of [`CHUNK`] clusters allocated
//! as the VDI is touched (256 KiB for a 2 GiB VDI at 64 KiB clusters), read with one atomic load and no lock.
//!
//! # What a slot means
//! A slot holds the *newest* map entry of its cluster in this volume, at whatever epoch, if that entry is full
//! (a data cluster or a zero entry); 0 means "not known, ask the lookup cache". The newest entry is the answer
//! to a lookup at any epoch at or above its own (there is nothing newer), so a lookup at epoch `e` uses a slot
//! whose entry's epoch is `<= e` and otherwise falls back. That covers the head (whose epoch is the newest) and
//! older views for clusters the head has not rewritten since.
//!
//! # Why it stays right (the same two rules the lookup cache rests on, see `volume::lookup_own`)
//! - **Fills** happen only in a head lookup (at the volume's current epoch), made under the cluster's stripe lock:
//!   no entry of the cluster can change while it is held, and no entry exists above the head's epoch, so what
//!   the lookup found is the newest entry. Partial entries are never stored (their masks change without the
//!   stripe lock, `dirty`), so a widening commit never has to touch this table.
//! - **Every change** of a cluster's entries happens under the stripe's exclusive lock and clears the slot
//!   (`volume::invalidate`, `volume::cache_edit`) before the lock is released. A lookup through a clone's parent
//!   view does not hold the parent's stripe, but the parent's head changes entries only at its own epoch, above
//!   every view's, so a slot that is about to be cleared still answers such a lookup correctly.
//! - GC deletes only entries no live view sees; the newest entry is seen by the head while it lives, and after
//!   the head is gone its epoch is above every remaining view's, so a stale slot is never used.
//!
//! Clusters beyond [`HeadMap::new`]'s coverage (a VDI grown to over four times its size while the SR was open)
//! are not tabled and use the lookup cache alone.
//!
//! # Memory
//! 8 bytes a touched cluster is 1/8192 of the data at 64 KiB clusters, but unbounded across many large VDIs, so the
//! chunks of all volumes of an SR share a [`Budget`] ([`DEFAULT_BUDGET`], 64 MiB: enough for 512 GiB of touched
//! clusters at 64 KiB). Once it is spent, clusters of chunks not yet allocated are served by the lookup cache (as
//! qemu's qcow2 L2 cache has a size, and lookups beyond it go to the image); a volume's chunks go back to the
//! budget when the volume's state is dropped.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::keys::{FULL_MASK, ZERO_CLUSTER};
use crate::volume::Loc;

/// Clusters per chunk (32 KiB of slots).
pub(crate) const CHUNK: u64 = 4096;
/// Bits of a slot that hold the entry's epoch; the physical cluster is above them.
const EPOCH_BITS: u32 = 24;
const EPOCH_MASK: u64 = (1 << EPOCH_BITS) - 1;
/// The largest physical cluster number a slot encodes; its top value stands for [`ZERO_CLUSTER`].
const PCLUSTER_ZERO: u64 = (1 << (64 - EPOCH_BITS)) - 1;
/// Fewest clusters covered, whatever the volume's size (so a small VDI grown later is still covered).
const MIN_COVER: u64 = 1 << 20;
/// Most clusters covered (16 TiB at 64 KiB clusters; the directory is then 64 Ki slots).
const MAX_COVER: u64 = 1 << 28;

/// Bytes of head-table chunks an SR allocates at most, across its volumes.
pub(crate) const DEFAULT_BUDGET: u64 = 64 << 20;
/// Bytes of one chunk.
const CHUNK_BYTES: u64 = CHUNK * 8;

/// Chunks the head tables of one SR may still allocate (see the module docs on memory).
#[derive(Debug)]
pub(crate) struct Budget {
    chunks_left: AtomicI64,
}

impl Budget {
    /// A budget of `bytes` (whole chunks).
    pub(crate) fn new(bytes: u64) -> Budget {
        Budget {
            chunks_left: AtomicI64::new(i64::try_from(bytes / CHUNK_BYTES).unwrap_or(i64::MAX)),
        }
    }

    /// Take one chunk if any is left. Once the budget is spent every fill of an unallocated chunk asks again, so
    /// that case is a plain load, not two read-modify-writes of a counter all I/O threads share.
    fn take(&self) -> bool {
        if self.chunks_left.load(Ordering::Acquire) <= 0 {
            return false;
        }
        if self.chunks_left.fetch_sub(1, Ordering::AcqRel) > 0 {
            return true;
        }
        self.chunks_left.fetch_add(1, Ordering::AcqRel);
        false
    }

    fn give(&self, n: i64) {
        self.chunks_left.fetch_add(n, Ordering::AcqRel);
    }
}

/// A chunk directory: one slot per [`CHUNK`] clusters covered.
type Directory = Box<[OnceLock<Box<[AtomicU64]>>]>;

/// See the module docs.
pub(crate) struct HeadMap {
    /// Length of the directory once it exists.
    cover_chunks: usize,
    /// Allocated by the first fill, not with the volume: a clone of a 1 TiB VDI would otherwise spend 0.15 ms
    /// building a directory it may never use (clone latency 0.09 -> 0.25-0.29 ms, `engine-bench.sh`).
    chunks: OnceLock<Directory>,
    budget: Arc<Budget>,
}

impl Drop for HeadMap {
    fn drop(&mut self) {
        self.budget.give(self.allocated() as i64);
    }
}

impl std::fmt::Debug for HeadMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadMap")
            .field("chunks", &self.cover_chunks)
            .field("allocated", &self.allocated())
            .finish()
    }
}

impl HeadMap {
    /// A table for a volume whose head has `clusters` clusters now: it covers four times that (online growth),
    /// at least [`MIN_COVER`] and at most [`MAX_COVER`] clusters. Nothing is allocated here; the directory is on
    /// the first fill, and chunks come out of `budget` as they are filled.
    pub(crate) fn new(clusters: u64, budget: Arc<Budget>) -> HeadMap {
        let cover = clusters.saturating_mul(4).clamp(MIN_COVER, MAX_COVER);
        HeadMap {
            cover_chunks: usize::try_from(cover.div_ceil(CHUNK)).unwrap_or(usize::MAX),
            chunks: OnceLock::new(),
            budget,
        }
    }

    /// Chunks allocated so far.
    fn allocated(&self) -> usize {
        self.chunks
            .get()
            .map_or(0, |d| d.iter().filter(|c| c.get().is_some()).count())
    }

    fn slot(&self, cluster: u64) -> Option<&AtomicU64> {
        let chunk = self
            .chunks
            .get()?
            .get(usize::try_from(cluster / CHUNK).ok()?)?
            .get()?;
        chunk.get((cluster % CHUNK) as usize)
    }

    /// The newest entry of `cluster` in volume `vol` if it is tabled and answers a lookup at `epoch`.
    #[inline]
    pub(crate) fn get(&self, vol: u64, cluster: u64, epoch: u64) -> Option<Loc> {
        let v = self.slot(cluster)?.load(Ordering::Acquire);
        if v == 0 {
            return None;
        }
        let e = v & EPOCH_MASK;
        if e > epoch {
            return None;
        }
        let p = v >> EPOCH_BITS;
        Some(Loc {
            vol,
            epoch: e,
            pcluster: if p == PCLUSTER_ZERO { ZERO_CLUSTER } else { p },
            mask: FULL_MASK,
        })
    }

    /// Record `loc`, the newest entry of `cluster` (see the module docs for who may call this). Entries that
    /// are partial, or whose numbers do not fit a slot, are left to the lookup cache.
    pub(crate) fn fill(&self, cluster: u64, loc: &Loc) {
        if !loc.is_full() || loc.epoch == 0 || loc.epoch > EPOCH_MASK {
            return;
        }
        let p = match loc.pcluster {
            ZERO_CLUSTER => PCLUSTER_ZERO,
            p if p < PCLUSTER_ZERO => p,
            _ => return,
        };
        let Some(i) = usize::try_from(cluster / CHUNK)
            .ok()
            .filter(|&i| i < self.cover_chunks)
        else {
            return;
        };
        let dirs = self
            .chunks
            .get_or_init(|| (0..self.cover_chunks).map(|_| OnceLock::new()).collect());
        let Some(dir) = dirs.get(i) else {
            return;
        };
        let chunk = match dir.get() {
            Some(c) => c,
            None => {
                if !self.budget.take() {
                    return;
                }
                let mut mine = false;
                let c = dir.get_or_init(|| {
                    mine = true;
                    (0..CHUNK).map(|_| AtomicU64::new(0)).collect()
                });
                if !mine {
                    // Another fill allocated it first (with its own share of the budget).
                    self.budget.give(1);
                }
                c
            }
        };
        if let Some(s) = chunk.get((cluster % CHUNK) as usize) {
            s.store(p << EPOCH_BITS | loc.epoch, Ordering::Release);
        }
    }

    /// Forget `cluster`'s slot: its entries are changing (caller holds its stripe exclusively).
    #[inline]
    pub(crate) fn clear(&self, cluster: u64) {
        if let Some(s) = self.slot(cluster) {
            s.store(0, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unlimited() -> Arc<Budget> {
        Arc::new(Budget::new(DEFAULT_BUDGET))
    }

    #[test]
    fn chunks_come_out_of_a_shared_budget_and_go_back_on_drop() {
        let b = Arc::new(Budget::new(CHUNK_BYTES));
        let m = HeadMap::new(1, b.clone());
        m.fill(0, &full(1, 5));
        m.fill(1, &full(1, 6));
        assert_eq!(
            m.get(7, 1, 1),
            Some(full(1, 6)),
            "same chunk, no new budget"
        );
        let other = HeadMap::new(1, b.clone());
        other.fill(0, &full(1, 9));
        assert_eq!(
            other.get(7, 0, 1),
            None,
            "budget spent: left to the lookup cache"
        );
        m.fill(CHUNK, &full(1, 7));
        assert_eq!(
            m.get(7, CHUNK, 1),
            None,
            "a second chunk is over budget too"
        );
        drop(m);
        other.fill(0, &full(1, 9));
        assert_eq!(
            other.get(7, 0, 1),
            Some(full(1, 9)),
            "the dropped table's chunk went back"
        );
        assert_eq!(b.chunks_left.load(Ordering::Acquire), 0);
        drop(other);
        assert_eq!(b.chunks_left.load(Ordering::Acquire), 1);
    }

    fn full(epoch: u64, pcluster: u64) -> Loc {
        Loc {
            vol: 7,
            epoch,
            pcluster,
            mask: FULL_MASK,
        }
    }

    #[test]
    fn answers_lookups_at_or_above_the_entry_epoch() {
        let m = HeadMap::new(100, unlimited());
        assert_eq!(m.get(7, 5, 10), None, "nothing tabled yet");
        assert!(
            m.chunks.get().is_none(),
            "no directory before the first fill"
        );
        m.fill(5, &full(3, 42));
        assert_eq!(m.get(7, 5, 3), Some(full(3, 42)));
        assert_eq!(m.get(7, 5, 9), Some(full(3, 42)));
        assert_eq!(m.get(7, 5, 2), None, "an older view may see an older entry");
        m.clear(5);
        assert_eq!(m.get(7, 5, 9), None);
        assert_eq!(
            m.get(7, 6, 9),
            None,
            "a neighbour in the same chunk was never filled"
        );
    }

    #[test]
    fn zero_entries_and_large_numbers() {
        let m = HeadMap::new(1, unlimited());
        m.fill(0, &full(1, ZERO_CLUSTER));
        assert_eq!(m.get(7, 0, 1), Some(full(1, ZERO_CLUSTER)));
        m.fill(1, &full(1, PCLUSTER_ZERO - 1));
        assert_eq!(m.get(7, 1, 1), Some(full(1, PCLUSTER_ZERO - 1)));
        // Numbers that do not fit are not tabled (and a stale slot is not left behind by the caller: it clears
        // first).
        m.fill(2, &full(1, PCLUSTER_ZERO));
        m.fill(3, &full(EPOCH_MASK + 1, 9));
        assert_eq!(m.get(7, 2, 1), None);
        assert_eq!(m.get(7, 3, u64::MAX), None);
    }

    #[test]
    fn partial_entries_and_clusters_beyond_cover_are_not_tabled() {
        let m = HeadMap::new(1, unlimited());
        m.fill(
            4,
            &Loc {
                mask: 0b11,
                ..full(1, 8)
            },
        );
        assert_eq!(m.get(7, 4, 1), None);
        let beyond = MIN_COVER.div_ceil(CHUNK) * CHUNK;
        m.fill(beyond, &full(1, 8));
        assert_eq!(m.get(7, beyond, 1), None);
        m.clear(beyond);
        m.fill(beyond - 1, &full(1, 8));
        assert_eq!(m.get(7, beyond - 1, 1), Some(full(1, 8)));
    }

    #[test]
    fn cover_scales_with_size_within_bounds() {
        assert_eq!(
            HeadMap::new(0, unlimited()).cover_chunks as u64,
            MIN_COVER / CHUNK
        );
        assert_eq!(
            HeadMap::new(1 << 20, unlimited()).cover_chunks as u64,
            (4 << 20) / CHUNK
        );
        assert_eq!(
            HeadMap::new(u64::MAX, unlimited()).cover_chunks as u64,
            MAX_COVER / CHUNK
        );
    }
}
