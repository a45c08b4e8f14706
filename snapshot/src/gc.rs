//! Space reclamation and durability helpers.
//!
//! Destroying a VDI or snapshot only removes its view (one batch, which also records `g vol`: "this volume needs
//! collection"). The GC then walks the volume's map and deletes every entry no live view can see:
//! for a cluster with entries e₁ > e₂ > … (newest first) and live views V (snapshot epochs, plus the head's epoch
//! if the head exists), entry eᵢ is live iff the smallest view ≥ eᵢ is below eᵢ₋₁ (otherwise a newer entry hides
//! it from every view that could see it). A volume with no views left is deleted whole, and may release a hidden
//! parent snapshot, which cascades.
//!
//! Concurrency: GC runs beside live I/O and snapshots. Each batch reads the views under the volume's barrier and
//! commits before releasing it, so a snapshot (a new head epoch) never lands between a batch's decision and its
//! commit; GC requests are numbered so a pass never clears one that arrived while it ran (see `collect_volume`).
//!
//! Crash safety: every GC batch deletes entries and records their clusters free atomically; the `g` marker goes
//! only when the volume is done, so a crash simply makes the next open resume. GC is idempotent: it recomputes
//! garbage from the committed state each time. Freed clusters are punched out of the data file after their batch
//! commits and only then become allocatable (`release_clusters`).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use rocksdb::WriteBatch;
use shale_block::BlockError;
use tracing::{debug, info, warn};

use crate::engine::{Engine, Inner};
use crate::error::{EngineError, Result};
use crate::keys::{self, ZERO_CLUSTER};
use crate::records::ObjectKind;

/// Entries deleted per GC batch.
const GC_BATCH: usize = 4096;

/// Passes over one volume per [`Engine::gc_now`] call at most (see there).
const PASSES_PER_CALL: usize = 2;

/// Make every acknowledged write durable: data file first, then the metadata WAL, so a committed map entry never
/// points at data that is not on disk.
pub(crate) async fn flush(inner: &Arc<Inner>) -> std::result::Result<(), BlockError> {
    // Frees committed before this point become durable with this WAL sync; release them afterwards.
    let ready = std::mem::take(&mut *inner.deferred.lock());
    inner
        .io
        .fdatasync(&inner.data)
        .await
        .map_err(BlockError::from_io)?;
    // Deferred sub-cluster widenings of writes acknowledged so far, after their data is on disk.
    crate::dirty::commit_all(inner)
        .map_err(|e| BlockError::Other(format!("committing sub-cluster metadata: {e}")))?;
    inner
        .sync_wal()
        .await
        .map_err(|e| BlockError::Other(format!("metadata WAL sync: {e}")))?;
    if !ready.is_empty() {
        inner.alloc.lock().forget_pending(ready.len() as u64);
        release_clusters(inner, ready).await;
    }
    Ok(())
}

/// Queue clusters freed by a committed (not necessarily durable) batch; they become allocatable after the next
/// flush (an explicit one, or the background task's within a second).
pub(crate) fn defer_release(inner: &Inner, clusters: &[u64]) {
    inner.alloc.lock().add_pending(clusters.len() as u64);
    inner.deferred.lock().extend_from_slice(clusters);
}

/// Punch freed clusters out of the data file, then make them allocatable. Called after the batch that freed them
/// has committed (or for a reservation whose write failed and may have left data behind).
///
/// This keeps the allocator's invariant that every cluster it hands out reads as zeroes. A cluster that can be
/// neither punched nor overwritten with zeroes is not handed out again: its free-list key is removed, so it
/// shows as a leak to `sr check`, and the next recovery (which punches every free cluster) takes it back.
pub(crate) async fn release_clusters(inner: &Inner, clusters: Vec<u64>) {
    if clusters.is_empty() {
        return;
    }
    inner.alloc.lock().add_pending(clusters.len() as u64);
    let mut clean = Vec::with_capacity(clusters.len());
    for &p in &clusters {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let zeroed = match inner
            .io
            .fallocate(&inner.data, mode, p * inner.cs, inner.cs)
            .await
        {
            Ok(()) => true,
            Err(e) => {
                debug!(cluster = p, error = %e, "punch hole failed; writing zeroes instead");
                let (r, _) = inner
                    .io
                    .write_at(
                        &inner.data,
                        p * inner.cs,
                        shale_block::IoBuf::zeroed(inner.cs as usize),
                        false,
                    )
                    .await;
                r.is_ok()
            }
        };
        if zeroed {
            clean.push(p);
        } else {
            warn!(
                cluster = p,
                "could not zero a freed cluster; withholding it until the next recovery"
            );
            if let Err(e) = inner.db.delete(keys::free(p)) {
                warn!(cluster = p, error = %e, "could not withhold cluster");
            }
        }
    }
    let mut a = inner.alloc.lock();
    a.release(&clean);
    a.forget_pending((clusters.len() - clean.len()) as u64);
}

impl Engine {
    pub(crate) fn start_gc_task(&self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            debug!("no async runtime: GC runs only on demand");
            return;
        };
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let wake = self.inner.gc_wake.clone();
        rt.spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                if inner.closed.load(Ordering::Acquire) {
                    return;
                }
                if !inner.deferred.lock().is_empty() || !inner.dirty.is_empty() {
                    if let Err(e) = flush(&inner).await {
                        warn!(error = %e, "background flush of freed clusters failed; will retry");
                    }
                }
                let engine = Engine { inner };
                if let Err(e) = engine.gc_now().await {
                    warn!(error = %e, "GC pass failed; will retry");
                }
                let pending = !engine.inner.state.read().gc_pending.is_empty();
                drop(engine);
                if pending {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
                // Wait for work without keeping the engine alive; re-check every second in any case.
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(1), wake.notified()).await;
            }
        });
    }

    /// Run garbage collection now, returning the bytes reclaimed.
    ///
    /// Every volume pending when a pass ends is collected, including ones a pass itself queued (a hidden parent
    /// released by its last clone); a volume asked for again while its pass ran gets one more pass, but at most
    /// `PASSES_PER_CALL` per call, so a steady stream of requests (trims freeing entries beneath partial ones)
    /// cannot keep this call, and the lock it holds, forever.
    pub async fn gc_now(&self) -> Result<u64> {
        let inner = &self.inner;
        let _g = inner.gc_lock.lock().await;
        let mut total = 0;
        let mut passes: std::collections::HashMap<u64, usize> = Default::default();
        loop {
            let next = inner
                .state
                .read()
                .gc_pending
                .iter()
                .find(|(v, _)| passes.get(v).copied().unwrap_or(0) < PASSES_PER_CALL)
                .map(|(&v, &s)| (v, s));
            let Some((vol, seq)) = next else {
                break;
            };
            *passes.entry(vol).or_default() += 1;
            total += self.collect_volume(vol, seq).await?;
        }
        if total > 0 {
            info!(bytes = total, "GC reclaimed space");
        }
        Ok(total)
    }

    /// One GC pass over `vol`, begun for its GC request number `seq`.
    ///
    /// Which entries are dead depends on the volume's views, and a snapshot adds one (the head moves to a new
    /// epoch) while a pass runs. So each batch reads the views under the volume's barrier and holds it until the
    /// batch is committed: a snapshot or revert, which take the barrier exclusively, happen between batches,
    /// never between a batch's decision and its commit. (A pass that kept the views it read when it began deleted
    /// the head's entries at the new epoch, which no view it knew could see, and freed their clusters under live
    /// data.) Views only shrink by a destroy, which requests GC again: entries a batch kept for a view destroyed
    /// since are collected by the next pass ([`State::finish_gc`](crate::state::State::finish_gc)).
    async fn collect_volume(&self, vol: u64, seq: u64) -> Result<u64> {
        let inner = &self.inner;
        let Some(vs) = inner.state.read().volumes.get(&vol).cloned() else {
            inner.db.delete(keys::gc(vol))?;
            inner.state.write().finish_gc(vol, seq);
            return Ok(0);
        };
        // A volume with no views (no head, no snapshot) can never gain one: it is deleted whole.
        let dead = vs.gc_views().is_empty();
        let mut reclaimed = 0u64;
        let end = keys::map(vol + 1, 0, u64::MAX);
        let mut start = keys::map(vol, 0, u64::MAX).to_vec();
        loop {
            let barrier = vs.barrier.read().await;
            let views = vs.gc_views();
            let mut b = WriteBatch::default();
            let mut freed = Vec::new();
            let mut deltas: std::collections::BTreeMap<u64, i64> = Default::default();
            let mut n = 0usize;
            let mut next_start = None;
            let mut fold = Vec::new();
            let mut purged = Vec::new();
            {
                let mut ro = rocksdb::ReadOptions::default();
                ro.set_iterate_upper_bound(end.to_vec());
                let mut it = inner.db.raw_iterator_opt(ro);
                it.seek(&start);
                let mut cur: Option<u64> = None;
                let mut newer = u64::MAX;
                // The entry just above was kept and is partial: this one is what its other sub-clusters read.
                let mut keep_as_base = false;
                while let (Some(k), Some(v)) = (it.key(), it.value()) {
                    let (_, c, e) = keys::parse_map(k)
                        .ok_or_else(|| EngineError::Corrupt("malformed map key".into()))?;
                    if cur != Some(c) {
                        if n >= GC_BATCH {
                            next_start = Some(keys::map(vol, c, u64::MAX).to_vec());
                            break;
                        }
                        cur = Some(c);
                        newer = u64::MAX;
                        keep_as_base = false;
                    }
                    let (p, mask) = keys::parse_map_entry(k, v).ok_or_else(|| {
                        EngineError::Corrupt(format!(
                            "map entry vol {vol} cluster {c} fails its checksum"
                        ))
                    })?;
                    let seen = !dead && {
                        let i = views.partition_point(|&x| x < e);
                        views.get(i).is_some_and(|&v| v < newer)
                    };
                    let live = seen || (!dead && keep_as_base);
                    if live && !seen {
                        // Kept only for the partial entry above it: fold it into that entry below.
                        fold.push(c);
                    }
                    keep_as_base = live && mask != keys::FULL_MASK;
                    if !live {
                        b.delete(k);
                        purged.push((c, e));
                        if p != ZERO_CLUSTER {
                            b.put(keys::free(p), []);
                            freed.push(p);
                            *deltas.entry(e).or_default() -= 1;
                        }
                        n += 1;
                    }
                    newer = e;
                    it.next();
                }
                it.status()?;
            }
            let bytes = freed.len() as u64 * inner.cs;
            if n > 0 {
                b.merge(keys::RECLAIMED, bytes.to_be_bytes());
                for (&e, &d) in &deltas {
                    b.merge(keys::count(vol, e), keys::delta(d));
                }
                // Synced: the clusters are reused right after, so the batch freeing them must be durable first.
                // Pending widenings of deleted entries must never be committed after this batch.
                inner.dirty.write_changing(
                    inner,
                    b,
                    true,
                    purged.into_iter().map(|(c, e)| (vol, c, e)),
                )?;
                inner.reclaimed.fetch_add(bytes, Ordering::Relaxed);
                for (e, d) in deltas {
                    vs.add_count(e, d);
                }
                reclaimed += bytes;
            }
            // fold_partial takes the barrier itself; punching holes need not hold off snapshots.
            drop(barrier);
            release_clusters(inner, freed).await;
            for c in fold {
                if crate::volume::fold_partial(inner, &vs, c).await? {
                    reclaimed += inner.cs;
                }
            }
            match next_start {
                Some(s) => start = s,
                None => break,
            }
        }
        if !dead && !inner.state.read().gc_request_is(vol, seq) {
            // Asked for again while this pass ran (a view destroyed since it began): the `g` key stays and the
            // next pass finishes the job.
            return Ok(reclaimed);
        }
        let mut b = WriteBatch::default();
        b.delete(keys::gc(vol));
        let mut cascade = None;
        if dead {
            b.delete(keys::volume(vol));
            for &e in vs.counts.lock().keys() {
                b.delete(keys::count(vol, e));
            }
            // A hidden snapshot this volume was the last clone of goes too.
            if let Some(p) = vs.parent {
                let st = inner.state.read();
                let others = st.dependents(p.vol, p.epoch).into_iter().any(|d| d != vol);
                if let Some(snap) = st
                    .snapshot_at(p.vol, p.epoch)
                    .filter(|s| s.hidden && s.kind == ObjectKind::Snapshot)
                {
                    if !others {
                        self.drop_snapshot_into(snap, p.epoch, &mut b);
                        cascade = Some((snap.uuid, p.vol, p.epoch));
                    }
                }
            }
        }
        inner.write(b, true)?;
        let mut st = inner.state.write();
        // A request that arrived after the check above keeps the volume pending (in memory; its `g` key may be
        // gone, so a crash before the next pass would leave that garbage until the volume's next GC request).
        st.finish_gc(vol, seq);
        if dead {
            st.volumes.remove(&vol);
            inner.carry.write().remove(&vol);
            debug!(vol, "volume deleted");
        }
        if let Some((uuid, pvol, epoch)) = cascade {
            st.objects.remove(&uuid);
            if let Some(pv) = st.volumes.get(&pvol) {
                pv.views.lock().remove(&epoch);
            }
            st.request_gc(pvol);
            debug!(%uuid, "hidden snapshot released by its last clone");
        }
        Ok(reclaimed)
    }
}
