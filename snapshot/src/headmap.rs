//! A dense, per-volume table of each cluster's newest map entry: the head's fast path in front of the lookup
//! cache.
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
//! A slot holds the *newest* map entry of its cluster in this volume, at whatever epoch (a data cluster, a zero
//! entry, or a partial entry); 0 means "not known, ask the lookup cache". The newest entry is the answer to a
//! lookup at any epoch at or above its own (there is nothing newer), so a lookup at epoch `e` uses a slot whose
//! entry's epoch is `<= e` and otherwise falls back. That covers the head (whose epoch is the newest) and older
//! views for clusters the head has not rewritten since.
//!
//! A partial entry's slot is flagged, and its mask sits beside the slots in the chunk. The mask tabled is the
//! *effective* one: the committed mask widened by any pending widening (`dirty`), i.e. what `lookup_own`
//! returns. Tabling partial entries matters after a snapshot: 4 KiB random writes then land in partial entries
//! almost every time, and their lookups went through the cache shard's lock, its hash probe and the dirty map
//! (about 7 % of the NBD server's CPU in a profile, `hashbrown::get_mut` the largest item).
//!
//! # Why it stays right (the same two rules the lookup cache rests on, see `volume::lookup_own`)
//! - **Fills** happen only in a head lookup (at the volume's current epoch), made under the cluster's stripe lock:
//!   no entry of the cluster can change while it is held, and no entry exists above the head's epoch, so what
//!   the lookup found is the newest entry.
//! - **Masks** change in two ways. A widening (`Volume::extend_partial`) holds the stripe exclusively and sets
//!   the tabled mask of the same entry ([`HeadMap::widen`]). A commit of pending widenings (`dirty`), which runs
//!   without the stripe, changes the committed mask but not the effective one, so this table is untouched.
//! - **Every change** of a cluster's entries happens under the stripe's exclusive lock and clears the slot
//!   (`volume::invalidate`, `volume::cache_edit`) before the lock is released. A lookup through a clone's parent
//!   view does not hold the parent's stripe, but the parent's head changes entries only at its own epoch, above
//!   every view's, so a slot that is about to be cleared still answers such a lookup correctly.
//! - **Reading a slot and its mask** takes two loads, so [`HeadMap::get`] reads the slot again after the mask
//!   and falls back if it changed. That suffices: a head reader holds the stripe, which excludes every writer of
//!   its cluster's slot and mask; a reader without the stripe (through a clone's parent view) only uses entries
//!   at or below a live snapshot's epoch, which the head no longer owns and so never widens, and a mask for a
//!   *different* entry is stored only after that slot was cleared (the release/acquire pairs order the clear
//!   before the mask, so a reader that saw the new mask sees the slot changed).
//! - GC deletes only entries no live view sees; the newest entry is seen by the head while it lives, and after
//!   the head is gone its epoch is above every remaining view's, so a stale slot is never used.
//!
//! Clusters beyond [`HeadMap::new`]'s coverage (a VDI grown to over four times its size while the SR was open)
//! are not tabled and use the lookup cache alone.
//!
//! # Memory
//! 12 bytes a touched cluster (slot and mask) is 1/5461 of the data at 64 KiB clusters, but unbounded across many
//! large VDIs, so the chunks of all volumes of an SR share a [`Budget`] ([`DEFAULT_BUDGET`], 64 MiB: enough for
//! about 340 GiB of touched clusters at 64 KiB). Once it is spent, clusters of chunks not yet allocated are served by the lookup cache (as
//! qemu's qcow2 L2 cache has a size, and lookups beyond it go to the image); a volume's chunks go back to the
//! budget when the volume's state is dropped.

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::keys::{FULL_MASK, ZERO_CLUSTER};
use crate::volume::Loc;

/// Clusters per chunk (32 KiB of slots, 16 KiB of masks).
pub(crate) const CHUNK: u64 = 4096;
/// Bits of a slot that hold the entry's epoch; the physical cluster is above them, and the top bit is
/// [`PARTIAL`].
const EPOCH_BITS: u32 = 24;
const EPOCH_MASK: u64 = (1 << EPOCH_BITS) - 1;
/// Slot flag: the entry is partial, its mask is in the chunk's masks.
const PARTIAL: u64 = 1 << 63;
/// The largest physical cluster number a slot encodes; its top value stands for [`ZERO_CLUSTER`].
const PCLUSTER_ZERO: u64 = (1 << (63 - EPOCH_BITS)) - 1;
/// Fewest clusters covered, whatever the volume's size (so a small VDI grown later is still covered).
const MIN_COVER: u64 = 1 << 20;
/// Most clusters covered (16 TiB at 64 KiB clusters; the directory is then 64 Ki slots).
const MAX_COVER: u64 = 1 << 28;

/// Bytes of head-table chunks an SR allocates at most, across its volumes.
pub(crate) const DEFAULT_BUDGET: u64 = 64 << 20;
/// Bytes of one chunk.
const CHUNK_BYTES: u64 = CHUNK * 12;

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

/// [`CHUNK`] clusters' slots, and the masks of those whose slot is [`PARTIAL`].
struct Chunk {
    slots: Box<[AtomicU64]>,
    masks: Box<[AtomicU32]>,
}

impl Chunk {
    /// The slot and mask of `cluster` (any cluster number: the chunk's own are taken modulo [`CHUNK`]).
    fn cell(&self, cluster: u64) -> Option<(&AtomicU64, &AtomicU32)> {
        let i = (cluster % CHUNK) as usize;
        Some((self.slots.get(i)?, self.masks.get(i)?))
    }
}

/// A chunk directory: one entry per [`CHUNK`] clusters covered.
type Directory = Box<[OnceLock<Chunk>]>;

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

    /// `cluster`'s slot and mask, if its chunk is allocated.
    fn cell(&self, cluster: u64) -> Option<(&AtomicU64, &AtomicU32)> {
        let chunk = self
            .chunks
            .get()?
            .get(usize::try_from(cluster / CHUNK).ok()?)?
            .get()?;
        chunk.cell(cluster)
    }

    /// The slot value for `loc`, or `None` if its numbers do not fit one.
    fn encode(loc: &Loc) -> Option<u64> {
        if loc.epoch == 0 || loc.epoch > EPOCH_MASK || loc.mask == 0 {
            return None;
        }
        let p = match loc.pcluster {
            ZERO_CLUSTER => PCLUSTER_ZERO,
            p if p < PCLUSTER_ZERO => p,
            _ => return None,
        };
        let partial = if loc.is_full() { 0 } else { PARTIAL };
        Some(partial | p << EPOCH_BITS | loc.epoch)
    }

    /// The newest entry of `cluster` in volume `vol` if it is tabled and answers a lookup at `epoch`.
    #[inline]
    pub(crate) fn get(&self, vol: u64, cluster: u64, epoch: u64) -> Option<Loc> {
        let (slot, m) = self.cell(cluster)?;
        let v = slot.load(Ordering::Acquire);
        if v == 0 {
            return None;
        }
        let e = v & EPOCH_MASK;
        if e > epoch {
            return None;
        }
        let mask = if v & PARTIAL != 0 {
            let mask = m.load(Ordering::Acquire);
            // The mask is this entry's only if the slot did not change meanwhile (see the module docs).
            if slot.load(Ordering::Acquire) != v {
                return None;
            }
            mask
        } else {
            FULL_MASK
        };
        let p = (v & !PARTIAL) >> EPOCH_BITS;
        Some(Loc {
            vol,
            epoch: e,
            pcluster: if p == PCLUSTER_ZERO { ZERO_CLUSTER } else { p },
            mask,
        })
    }

    /// Record `loc`, the newest entry of `cluster` with its effective mask (see the module docs for who may
    /// call this). Entries whose numbers do not fit a slot are left to the lookup cache.
    pub(crate) fn fill(&self, cluster: u64, loc: &Loc) {
        let Some(v) = Self::encode(loc) else {
            return;
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
                    Chunk {
                        slots: (0..CHUNK).map(|_| AtomicU64::new(0)).collect(),
                        masks: (0..CHUNK).map(|_| AtomicU32::new(0)).collect(),
                    }
                });
                if !mine {
                    // Another fill allocated it first (with its own share of the budget).
                    self.budget.give(1);
                }
                c
            }
        };
        let Some((slot, m)) = chunk.cell(cluster) else {
            return;
        };
        if v & PARTIAL != 0 {
            // A mask for a different entry goes in only after the slot stopped naming the old one.
            let old = slot.load(Ordering::Acquire);
            if old != 0 && old != v {
                slot.store(0, Ordering::Release);
            }
            m.store(loc.mask, Ordering::Release);
        }
        slot.store(v, Ordering::Release);
    }

    /// A widening of the partial entry `loc` to `mask` (the caller holds the cluster's stripe exclusively): if
    /// `loc` is what the slot holds, its tabled mask becomes `mask`.
    pub(crate) fn widen(&self, cluster: u64, loc: &Loc, mask: u32) {
        let (Some(v), Some((slot, m))) = (Self::encode(loc), self.cell(cluster)) else {
            return;
        };
        if v & PARTIAL != 0 && slot.load(Ordering::Acquire) == v {
            m.store(mask, Ordering::Release);
        }
    }

    /// Forget `cluster`'s slot: its entries are changing (caller holds its stripe exclusively).
    #[inline]
    pub(crate) fn clear(&self, cluster: u64) {
        if let Some((slot, _)) = self.cell(cluster) {
            slot.store(0, Ordering::Release);
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
    fn partial_entries_are_tabled_with_their_mask_and_widened_in_place() {
        let m = HeadMap::new(1, unlimited());
        let p = Loc {
            mask: 0b11,
            ..full(2, 8)
        };
        m.fill(4, &p);
        assert_eq!(m.get(7, 4, 2), Some(p));
        assert_eq!(m.get(7, 4, 1), None, "an older view");
        m.widen(4, &p, 0b111);
        assert_eq!(m.get(7, 4, 5).map(|l| l.mask), Some(0b111));
        // A widening of some other entry (stale caller) leaves the slot alone.
        m.widen(4, &Loc { epoch: 1, ..p }, 0b1111);
        assert_eq!(m.get(7, 4, 5).map(|l| l.mask), Some(0b111));
        // Replaced by a full entry, then by another partial one: each answers with its own mask.
        m.fill(4, &full(3, 9));
        assert_eq!(m.get(7, 4, 3), Some(full(3, 9)));
        let q = Loc {
            mask: 0b1000,
            ..full(4, 10)
        };
        m.fill(4, &q);
        assert_eq!(m.get(7, 4, 4), Some(q));
        m.clear(4);
        assert_eq!(m.get(7, 4, 4), None);
        // A partial zero-mask entry is not a thing; it is not tabled.
        m.fill(
            5,
            &Loc {
                mask: 0,
                ..full(1, 3)
            },
        );
        assert_eq!(m.get(7, 5, 1), None);
    }

    #[test]
    fn clusters_beyond_cover_are_not_tabled() {
        let m = HeadMap::new(1, unlimited());
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
