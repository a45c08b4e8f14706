//! Changed-block tracking: the parts of a VDI (or of a later snapshot) that may differ from an earlier snapshot.
//!
//! **Why.** Incremental backup copies only what changed since the last backup's snapshot: XenServer's
//! `VDI.list_changed_blocks`, `rbd diff --from-snap`, qemu's dirty bitmaps. A separate bitmap maintained on every
//! write would cost the data path; here the answer is already in the extent map. Every write to a cluster a
//! snapshot can see makes a new map entry at the head's epoch (redirect on write), so a cluster of view `to`
//! changed since snapshot `from` (epoch E) exactly when the entry `to` resolves in its own volume is newer than E.
//! Discards and zeroing after E make such entries too, and a shrink zeroes what it cuts off the same way.
//!
//! **Cost.** One range scan of the volume's map, seeking past entries newer than the `to` view: O(clusters the
//! volume maps), no data read, nothing kept between calls.
//!
//! **Granularity.** A cluster (64 KiB by default, qemu's default dirty-bitmap granularity too). Like every CBT it
//! is conservative: a cluster rewritten with the bytes it held still counts as changed.
//!
//! **Which pairs.** `from` a snapshot; `to` a VDI or a snapshot of the same volume taken at or after `from`
//! (the same VDI's history), or a VDI cloned from `from` or reverted to it (then every cluster it wrote itself is
//! a change, the rest reads through to `from`). Other pairs share no history the map can answer from and are
//! refused. A VDI that is written while it is diffed gives a point-in-time answer for each cluster; diff two
//! snapshots for one consistent answer.

use serde::{Deserialize, Serialize};

use crate::engine::Inner;
use crate::error::{EngineError, Result};
use crate::keys;

/// What changed between two views, in bytes of the `to` view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changes {
    /// The `to` view's size: extents never reach past it.
    pub size: u64,
    /// The granularity of the answer (the SR's cluster size).
    pub granularity: u64,
    /// Changed byte ranges as (offset, length), sorted and merged.
    pub extents: Vec<(u64, u64)>,
}

impl Changes {
    /// Total bytes in the changed extents.
    pub fn changed_bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.1).sum()
    }
}

/// What [`crate::Engine::changes`] scans: volume `vol` at epoch `view`, entries newer than `since` (all when
/// `None`), for a view `size` bytes long compared with one `from_size` bytes long.
pub(crate) struct Plan {
    pub vol: u64,
    pub since: Option<u64>,
    pub view: u64,
    pub size: u64,
    pub from_size: u64,
}

/// Runs of clusters below `last` whose newest entry in `vol` at or before `view` is newer than `since` (any
/// entry at all when `since` is `None`), as (first cluster, count).
pub(crate) fn changed_clusters(
    inner: &Inner,
    vol: u64,
    since: Option<u64>,
    view: u64,
    last: u64,
) -> Result<Vec<(u64, u64)>> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    if last == 0 {
        return Ok(runs);
    }
    let mut ro = rocksdb::ReadOptions::default();
    ro.set_iterate_upper_bound(keys::map(vol, last, u64::MAX).to_vec());
    let mut it = inner.db.raw_iterator_opt(ro);
    it.seek(keys::map(vol, 0, view));
    while let Some(k) = it.key() {
        let (_, c, e) =
            keys::parse_map(k).ok_or_else(|| EngineError::Corrupt("malformed map key".into()))?;
        if e > view {
            // Entries newer than the view come first for each cluster: skip to its newest one the view sees.
            it.seek(keys::map(vol, c, view));
            continue;
        }
        if since.is_none_or(|s| e > s) {
            match runs.last_mut() {
                Some((first, n)) if *first + *n == c => *n += 1,
                _ => runs.push((c, 1)),
            }
        }
        match c.checked_add(1) {
            Some(next) if next < last => it.seek(keys::map(vol, next, view)),
            _ => break,
        }
    }
    it.status()?;
    Ok(runs)
}

/// Turn cluster runs into byte extents of a view `size` bytes long, adding `[grown_from, size)` (space a resize
/// added after `from`, which reads as zeroes there and may not here), merged and clipped to `size`.
pub(crate) fn extents(runs: &[(u64, u64)], cs: u64, size: u64, grown_from: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(runs.len() + 1);
    let grown = (grown_from < size).then(|| (grown_from / cs * cs, size));
    let clusters = runs
        .iter()
        .map(|&(c, n)| (c * cs, ((c + n) * cs).min(size)))
        .chain(grown);
    for (start, end) in clusters {
        if start >= end {
            continue;
        }
        match out.last_mut() {
            Some((s, len)) if *s + *len >= start => *len = (*len).max(end - *s),
            _ => out.push((start, end - start)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_merge_clip_and_add_grown_space() {
        let cs = 64 << 10;
        assert_eq!(extents(&[], cs, 10 * cs, 10 * cs), vec![]);
        assert_eq!(
            extents(&[(0, 2), (5, 1)], cs, 10 * cs, 10 * cs),
            vec![(0, 2 * cs), (5 * cs, cs)]
        );
        // The last cluster of a size that is not a multiple of the cluster size is clipped.
        assert_eq!(
            extents(&[(9, 1)], cs, 9 * cs + 512, 9 * cs + 512),
            vec![(9 * cs, 512)]
        );
        // Grown space joins a run that reaches it, from the cluster holding the old end.
        assert_eq!(
            extents(&[(3, 2)], cs, 10 * cs, 5 * cs + 4096),
            vec![(3 * cs, 7 * cs)]
        );
        assert_eq!(
            extents(&[(0, 1)], cs, 10 * cs, 8 * cs),
            vec![(0, cs), (8 * cs, 2 * cs)]
        );
        // Runs past a shrunken view's end vanish.
        assert_eq!(extents(&[(20, 4)], cs, 10 * cs, 10 * cs), vec![]);
    }
}
