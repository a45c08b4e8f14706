//! In-memory state shared by the control plane and the data path.
//!
//! Everything here is a cache of what RocksDB holds, rebuilt at open, and changed only after the `WriteBatch`
//! that records the change has been written. The data path reads it without touching the control-plane lock:
//! a volume's current epoch is an atomic, its live snapshot epochs a small set, its parent a direct `Arc`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use uuid::Uuid;

use crate::headmap::HeadMap;
use crate::records::{ObjectRecord, ParentRef};

/// Runtime state of one volume.
#[derive(Debug)]
pub struct VolState {
    /// Volume id.
    pub id: u64,
    /// Parent view (clones and reverted VDIs).
    pub parent: Option<ParentRef>,
    /// The parent volume's state, for falling through without a lookup.
    pub parent_state: Option<Arc<VolState>>,
    /// Epoch that head writes go to; bumped by each snapshot.
    pub epoch: AtomicU64,
    /// The VDI whose head this volume is.
    pub head: Mutex<Option<Uuid>>,
    /// Head size in bytes (the VDI's size), atomic so online resize reaches open handles.
    pub head_size: AtomicU64,
    /// Epochs of live snapshot views (including hidden snapshots that clones still read through).
    pub views: Mutex<BTreeSet<u64>>,
    /// Data clusters mapped per epoch of this volume (mirrors the `c` keys; kept in the same batches).
    pub counts: Mutex<std::collections::BTreeMap<u64, i64>>,
    /// Write barrier: data-path mutations hold it shared, snapshot/destroy take it exclusively to drain them.
    pub barrier: tokio::sync::RwLock<()>,
    /// Set when the head is gone (destroyed or reverted away); head handles then fail with `Shutdown`.
    pub head_closed: AtomicBool,
    /// Each cluster's newest entry when it is full: the head's lock-free fast path in front of the lookup
    /// cache (see [`crate::headmap`]).
    pub(crate) headmap: HeadMap,
}

impl VolState {
    /// The current head epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// True if a map entry written at epoch `e` is seen by no snapshot, given that it is the newest entry for its
    /// cluster at or below `head_epoch`: then the head owns it and may overwrite it in place.
    pub fn head_owns(&self, e: u64, head_epoch: u64) -> bool {
        e == head_epoch || self.views.lock().range(e..head_epoch).next().is_none()
    }

    /// Apply a committed count change.
    pub fn add_count(&self, epoch: u64, d: i64) {
        *self.counts.lock().entry(epoch).or_default() += d;
    }

    /// Data clusters mapped at exactly `epoch`, or in all epochs.
    pub fn count(&self, epoch: Option<u64>) -> u64 {
        let c = self.counts.lock();
        let n: i64 = match epoch {
            Some(e) => c.get(&e).copied().unwrap_or(0),
            None => c.values().sum(),
        };
        n.max(0) as u64
    }

    /// Sorted views for GC: live snapshot epochs plus the head epoch if the head exists.
    pub fn gc_views(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.views.lock().iter().copied().collect();
        if self.head.lock().is_some() {
            v.push(self.epoch());
        }
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// The control plane's view of the SR.
#[derive(Debug, Default)]
pub struct State {
    /// Objects by uuid.
    pub objects: HashMap<Uuid, ObjectRecord>,
    /// Name index.
    pub names: HashMap<String, Uuid>,
    /// Volumes by id.
    pub volumes: HashMap<u64, Arc<VolState>>,
    /// Next volume id.
    pub next_vol: u64,
    /// Open handles per object.
    pub open: HashMap<Uuid, usize>,
    /// Volumes awaiting GC, each with the number of its latest request ([`State::request_gc`]).
    pub gc_pending: BTreeMap<u64, u64>,
    /// Last GC request number handed out.
    pub gc_seq: u64,
}

impl State {
    /// Ask for a GC pass over `vol` (after committing the batch that recorded its `g` key). Requests are
    /// numbered so that a pass already running, which may have looked at the volume before this change, does not
    /// clear the request when it ends ([`State::finish_gc`]).
    pub fn request_gc(&mut self, vol: u64) {
        self.gc_seq += 1;
        self.gc_pending.insert(vol, self.gc_seq);
    }

    /// Whether `vol`'s pending GC request is still `seq`, the one a pass read when it began (no newer request
    /// arrived meanwhile).
    pub fn gc_request_is(&self, vol: u64, seq: u64) -> bool {
        self.gc_pending.get(&vol) == Some(&seq)
    }

    /// Clear `vol`'s GC request if it is still `seq`; after a newer one the volume stays pending and gets
    /// another pass.
    pub fn finish_gc(&mut self, vol: u64, seq: u64) {
        if self.gc_request_is(vol, seq) {
            self.gc_pending.remove(&vol);
        }
    }

    /// Volumes whose parent is the view (vol, epoch).
    pub fn dependents(&self, vol: u64, epoch: u64) -> Vec<u64> {
        let mut d: Vec<u64> = self
            .volumes
            .values()
            .filter(|v| v.parent.is_some_and(|p| p.vol == vol && p.epoch == epoch))
            .map(|v| v.id)
            .collect();
        d.sort_unstable();
        d
    }

    /// The snapshot object that is the view (vol, epoch), if any.
    pub fn snapshot_at(&self, vol: u64, epoch: u64) -> Option<&ObjectRecord> {
        self.objects
            .values()
            .find(|o| o.vol == vol && o.epoch == Some(epoch))
    }

    /// Whether any handle on the object is open.
    pub fn is_open(&self, id: &Uuid) -> bool {
        self.open.get(id).copied().unwrap_or(0) > 0
    }

    /// Names of the objects with a handle open, sorted.
    pub fn open_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .open
            .iter()
            .filter(|(_, &n)| n > 0)
            .filter_map(|(id, _)| self.objects.get(id).map(|o| o.name.clone()))
            .collect();
        names.sort();
        names
    }
}
