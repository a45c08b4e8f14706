//! The engine of one SR: opening it, and the control-plane operations (create, snapshot, clone, revert,
//! resize, destroy). Each operation builds one RocksDB `WriteBatch` that records the whole state change, writes
//! it (synced: control operations are rare and must survive power loss once acknowledged), and only then updates
//! the in-memory [`State`]. Control operations are serialised by one async mutex; the data path never takes it.
//!
//! Snapshot, clone and revert are O(1): each writes a constant number of records whatever the size or fill of the
//! volume. A snapshot freezes the volume's current epoch (the data path then redirects the first write to any
//! cluster the snapshot can see); a clone or revert creates a new volume whose unmapped clusters fall through to a
//! parent view.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use rocksdb::{Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};
use shale_block::uring::IoEngine;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::alloc::Allocator;
use crate::error::{EngineError, Result};
use crate::headmap::{Budget, HeadMap};
use crate::keys;
use crate::records::{
    self, ObjectKind, ObjectRecord, ParentRef, SuperBlock, VolumeRecord, FORMAT_VERSION,
};
use crate::state::{State, VolState};
use crate::volume::Volume;

/// Key recording that the SR was closed cleanly (no leak scan needed at the next open).
const CLEAN: &[u8] = b"c"; // (a one-byte key; prefixes of multi-byte keys avoid "c")
/// Key of the next volume id.
const NEXT_VOL: &[u8] = b"N";
/// How far ahead of the allocator the data file is grown.
const PREALLOC_STEP: u64 = 64 << 20;
/// Number of per-cluster lock stripes.
const STRIPES: usize = 1024;
/// Largest VDI: keeps byte offsets and cluster numbers far from overflow.
pub const MAX_VDI_SIZE: u64 = 1 << 56;

/// Parameters fixed when an SR is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SrConfig {
    /// Allocation unit in bytes: a power of two from 4 KiB to 1 MiB.
    pub cluster_size: u32,
    /// Maximum bytes of data clusters; `None` grows until the filesystem is full.
    pub capacity: Option<u64>,
}

impl Default for SrConfig {
    fn default() -> Self {
        SrConfig {
            cluster_size: 64 * 1024,
            capacity: None,
        }
    }
}

/// SR-wide figures for `sr show`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SrInfo {
    /// SR uuid.
    pub uuid: Uuid,
    /// Cluster size.
    pub cluster_size: u32,
    /// Capacity, if limited.
    pub capacity: Option<u64>,
    /// Bytes in allocated clusters.
    pub allocated_bytes: u64,
    /// Bytes still allocatable, if the SR has a capacity.
    pub free_bytes: Option<u64>,
    /// Bytes reclaimed by GC over the SR's life.
    pub reclaimed_bytes: u64,
    /// Volumes waiting for GC.
    pub gc_pending: u64,
    /// Number of VDIs and snapshots (hidden included).
    pub objects: usize,
    /// Map lookups that missed the lookup cache and read RocksDB since the SR was opened: a cold or thrashing
    /// cache shows here (each costs a RocksDB seek on the data path).
    pub metadata_reads: u64,
    /// The first metadata write that failed since the SR was opened (a full filesystem, a failing disk): the
    /// SR then refuses changes until it is attached again.
    pub metadata_error: Option<String>,
}

/// A VDI or snapshot as reported to users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectInfo {
    /// Uuid.
    pub uuid: Uuid,
    /// Name (empty for hidden snapshots).
    pub name: String,
    /// VDI or snapshot.
    pub kind: ObjectKind,
    /// Virtual size in bytes.
    pub size: u64,
    /// Data bytes this object holds, from counters kept with every map change (O(1)): for a VDI, everything in
    /// its volume (its own data and what it keeps for its snapshots); for a snapshot, its delta — the data
    /// written between the previous snapshot and it (like one member of a VHD chain).
    pub allocated_bytes: u64,
    /// For a VDI: the snapshot it was cloned or reverted from.
    pub parent: Option<Uuid>,
    /// For a snapshot: the VDI it was taken of.
    pub snapshot_of: Option<Uuid>,
    /// For a VDI: its snapshots, oldest first.
    pub snapshots: Vec<Uuid>,
    /// For a snapshot: VDIs cloned (or reverted) from it.
    pub clones: Vec<Uuid>,
    /// A destroyed snapshot kept for its clones.
    pub hidden: bool,
    /// Snapshots are read-only.
    pub read_only: bool,
    /// Creation time, unix seconds.
    pub created: u64,
}

/// Shared engine internals.
pub(crate) struct Inner {
    pub dir: PathBuf,
    pub db: DB,
    pub data: Arc<File>,
    pub io: IoEngine,
    pub sb: SuperBlock,
    pub cs: u64,
    pub shift: u32,
    pub state: RwLock<State>,
    pub alloc: Mutex<Allocator>,
    pub stripes: Box<[tokio::sync::RwLock<()>]>,
    pub ctl: tokio::sync::Mutex<()>,
    pub gc_wake: Arc<tokio::sync::Notify>,
    pub gc_lock: tokio::sync::Mutex<()>,
    pub reclaimed: AtomicU64,
    pub closed: AtomicBool,
    /// Clusters freed by committed but not yet durable batches (discard/zeroing): released for reuse only after
    /// the next WAL sync, so a crash can never leave a map entry pointing at a cluster that now holds someone
    /// else's data.
    pub deferred: Mutex<Vec<u64>>,
    /// Sub-cluster mask widenings not yet committed (see `dirty`).
    pub(crate) dirty: crate::dirty::Dirty,
    /// Lookup cache, sharded like the stripes (see `volume::lookup_own`).
    pub cache: Box<[Mutex<crate::volume::CacheShard>]>,
    /// Counts snapshots taken (of any volume). Lookup-cache fills are stamped with its value, so a cached lookup
    /// is known to predate a given snapshot (see `volume::lookup_own`).
    pub snap_clock: AtomicU64,
    /// Volume → (the epoch its last snapshot froze, the `snap_clock` value that snapshot took). Cached lookups at
    /// that epoch stamped before it also answer for the head epoch after it, so a snapshot does not leave the
    /// head with a cold cache (see `volume::lookup_own`).
    pub carry: RwLock<rustc_hash::FxHashMap<u64, (u64, u64)>>,
    /// Lookups that missed the cache (`SrInfo::metadata_reads`).
    pub metadata_reads: AtomicU64,
    /// Bytes of the data file already allocated (its size); grown ahead of the allocator (see `ensure_allocated`).
    pub file_end: AtomicU64,
    /// Serialises growing the data file.
    pub grow: tokio::sync::Mutex<()>,
    /// RocksDB's sequence number before the last [`Inner::sync_wal`]: every batch up to it is durable. A FUA
    /// write in place compares it with the latest to know whether the map entry it relies on may not be.
    pub synced_seq: AtomicU64,
    /// Serialises [`Inner::sync_wal`] (its group commit).
    pub sync_lock: tokio::sync::Mutex<()>,
    /// Memory the volumes' head tables may still take ([`crate::headmap`]).
    pub(crate) headmap_budget: Arc<Budget>,
    /// Filesystem space new clusters may take while leaving the metadata store its headroom ([`crate::space`]).
    pub space: crate::space::SpaceGuard,
    /// The first failed metadata write since the SR was opened. RocksDB treats a failed WAL write as fatal
    /// (manual WAL flush): every later change fails too until the SR is opened again, so `sr show` says so.
    pub meta_error: Mutex<Option<String>>,
}

impl Inner {
    /// The lock stripe guarding (vol, cluster).
    pub fn stripe(&self, vol: u64, cluster: u64) -> &tokio::sync::RwLock<()> {
        &self.stripes[Self::shard(vol, cluster)]
    }

    /// Index of the stripe (and cache shard) of (vol, cluster).
    pub fn shard(vol: u64, cluster: u64) -> usize {
        let h =
            vol.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ cluster.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        (h >> 32) as usize % STRIPES
    }

    /// Whether the reserved cluster may be written, growing the data file ahead when it lies past the end.
    ///
    /// A cluster takes new filesystem blocks unless it lies in the data file's preallocated tail, and those are
    /// admitted only while the filesystem keeps the metadata store's headroom ([`crate::space`]). Clusters from
    /// the free list were punched, so they take blocks again.
    pub async fn admit_cluster(&self, res: &crate::alloc::Reservation) -> bool {
        let end = (res.pcluster + 1) * self.cs;
        if res.source == crate::alloc::Source::Free {
            return self.space.admit(self.cs, || self.metadata_bytes());
        }
        self.ensure_allocated(end).await
    }

    /// Make sure the data file covers `end` bytes, growing it ahead in large steps with fallocate; `false` when
    /// the cluster ending there would eat into the metadata's headroom.
    ///
    /// O_DIRECT writes past the end of a file are serialised by the filesystem (ext4 takes the inode lock
    /// exclusively and io_uring falls back to its worker threads), so new clusters would queue behind each other.
    /// Preallocated space reads as zeroes, which keeps the allocator's invariant; recovery truncates the file back
    /// to the high-water mark. A failed fallocate (e.g. a filesystem without it) is not an error: the write then
    /// extends the file.
    async fn ensure_allocated(&self, end: u64) -> bool {
        if self.file_end.load(Ordering::Acquire) >= end {
            return true;
        }
        // Under the lock, so a cluster reserved while the file was growing sees the grown end, not the headroom
        // the growth just took.
        let _g = self.grow.lock().await;
        let cur = self.file_end.load(Ordering::Acquire);
        if cur >= end {
            return true;
        }
        // The cluster itself (the rest up to `end`, if any, belongs to clusters admitted on their own), then as
        // far ahead as the headroom leaves room for.
        if !self.space.admit(self.cs, || self.metadata_bytes()) {
            return false;
        }
        let mut target = end
            + self
                .space
                .take_up_to(PREALLOC_STEP, || self.metadata_bytes());
        if let Some(cap) = self.sb.capacity {
            target = target.min(cap.div_ceil(self.cs) * self.cs).max(end);
        }
        match self.io.fallocate(&self.data, 0, cur, target - cur).await {
            Ok(()) => self.file_end.store(target, Ordering::Release),
            Err(e) => {
                debug!(error = %e, "could not preallocate the data file; writes will extend it")
            }
        }
        true
    }

    /// Bytes of the metadata store's SST files (what a compaction may need again while it runs).
    pub fn metadata_bytes(&self) -> u64 {
        self.db
            .property_int_value("rocksdb.total-sst-files-size")
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    /// Make every batch written so far durable (sync the metadata WAL), on the blocking pool.
    ///
    /// Why not `write(batch, true)` on the data path: that fsyncs on the calling thread, and there the caller is
    /// an I/O thread serving several connections (`shale_block::iothread`), every one of which would stall for the
    /// fsync. A FUA write that changes the map commits unsynced and then awaits this.
    ///
    /// Group commit: syncs run one at a time, and a caller that waited for the running one returns without
    /// syncing again if that sync covered its batch, so concurrent FUA writes share fsyncs.
    pub async fn sync_wal(self: &Arc<Self>) -> Result<()> {
        let mine = self.db.latest_sequence_number();
        let _one_at_a_time = self.sync_lock.lock().await;
        if self.synced_seq.load(Ordering::Acquire) >= mine {
            return Ok(());
        }
        let seq = self.db.latest_sequence_number();
        let inner = self.clone();
        tokio::task::spawn_blocking(move || inner.db.flush_wal(true))
            .await
            .map_err(|e| EngineError::Io(std::io::Error::other(format!("WAL sync task: {e}"))))?
            .map_err(|e| self.write_failed(e))?;
        self.synced_seq.fetch_max(seq, Ordering::AcqRel);
        Ok(())
    }

    /// Whether a batch was written after the last [`Inner::sync_wal`] (it may not be durable yet).
    pub fn wal_unsynced(&self) -> bool {
        self.db.latest_sequence_number() > self.synced_seq.load(Ordering::Acquire)
    }

    /// Write a batch, synced or not. Synced, it blocks the calling thread for an fsync: data-path callers use
    /// [`Inner::sync_wal`] instead.
    pub fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db
            .write_opt(batch, &wo)
            .map_err(|e| self.write_failed(e))
    }

    /// Record the first failed metadata write (logged once, shown by `sr show`) and classify it. Once a full
    /// filesystem has failed the WAL, RocksDB answers later writes with "Seen error" and the like; those report
    /// the cause (`MetadataNoSpace`, ENOSPC to clients) rather than an opaque I/O error.
    pub fn write_failed(&self, e: rocksdb::Error) -> EngineError {
        let mut first = self.meta_error.lock();
        match first.as_ref() {
            None => {
                tracing::error!(sr = %self.dir.display(), error = %e,
                    "metadata write failed; the SR takes no more changes until it is attached again");
                *first = Some(e.to_string());
                e.into()
            }
            Some(cause) => match EngineError::from(e) {
                EngineError::Db(_) if crate::error::is_no_space(cause) => {
                    EngineError::MetadataNoSpace(cause.clone())
                }
                other => other,
            },
        }
    }

    /// Write a large batch whose keys were put in key order (not synced). RocksDB then keeps each memtable
    /// insert's position as the hint for the next key (`memtable_insert_hint_per_batch`), so inserting the batch
    /// costs a short step per key instead of a skiplist search from the top: the commits of pending sub-cluster
    /// widenings (tens of thousands of keys a second under small random writes after a snapshot) spent most of
    /// their time in that search.
    pub fn write_in_order(&self, batch: WriteBatch) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_memtable_insert_hint_per_batch(true);
        self.db
            .write_opt(batch, &wo)
            .map_err(|e| self.write_failed(e))
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if !self.deferred.lock().is_empty() {
            // Freed clusters not yet punched: leave the SR marked unclean so the next open re-zeroes free space.
            let _ = self.db.flush_wal(true);
            return;
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        if let Err(e) = self.db.put_opt(CLEAN, b"1", &wo) {
            warn!(error = %e, "could not mark SR closed cleanly");
        }
    }
}

/// One SR's native engine. Cheap to clone; the SR closes when the last clone and volume handle are dropped.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("dir", &self.inner.dir)
            .field("uuid", &self.inner.sb.uuid)
            .finish()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn db_options(create: bool) -> Options {
    let mut o = Options::default();
    o.create_if_missing(create);
    o.set_merge_operator_associative("shale-merge", keys::merge);
    o.set_compression_type(rocksdb::DBCompressionType::None);
    o.set_max_background_jobs(2);
    o.set_keep_log_file_num(4);
    o.set_max_log_file_size(8 << 20);
    // Map commits stay in RocksDB's WAL buffer until `flush` (FlushWAL + sync), like qcow2 keeping metadata
    // updates in memory until flush: an unflushed write may be lost in a crash, a flushed one never is. Synced
    // writes (control operations, GC) and FUA writes' `Inner::sync_wal` flush the buffer too, and the log is a
    // prefix: nothing later survives without everything before it.
    o.set_manual_wal_flush(true);
    // The WAL and the memtable bound what the metadata needs of the SR's filesystem beyond its SST files
    // (`crate::space` keeps that much free): RocksDB preallocates each WAL file in blocks of
    // min(1.1 x write_buffer_size, max_total_wal_size), and with one column family a WAL file is retired only
    // when the memtable it backs fills and is flushed to an SST (max_total_wal_size switches WALs only with
    // several column families). The defaults (a 64 MiB memtable, 70 MiB preallocation blocks) once left room
    // for 8 MiB of VDI data on an 85 MiB filesystem. A 16 MiB memtable holds a little less than 16 MiB of WAL,
    // so the live WAL stays within one 16 MiB block, a flush writes an SST of at most about 16 MiB, and crash
    // recovery replays at most that. A 4 MiB memtable measured no slower under the heaviest metadata load, small
    // random writes after a snapshot (RESULTS-nbd.md).
    o.set_write_buffer_size(16 << 20);
    o.set_max_total_wal_size(16 << 20);
    o
}

fn open_db(meta: &Path, create: bool) -> Result<DB> {
    DB::open(&db_options(create), meta).map_err(|e| {
        let s = e.to_string();
        if s.contains("lock")
            && (s.contains("Resource temporarily unavailable") || s.contains("No locks"))
        {
            EngineError::Locked(meta.display().to_string())
        } else {
            EngineError::Db(e)
        }
    })
}

fn open_data(path: &Path, create: bool) -> Result<File> {
    let mut oo = OpenOptions::new();
    oo.read(true).write(true).create(create);
    match oo.clone().custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => Ok(f),
        // tmpfs and some filesystems refuse O_DIRECT; buffered I/O still gives every guarantee we need because
        // flush fdatasyncs the file.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            warn!(path = %path.display(), "O_DIRECT unsupported here, using buffered I/O");
            Ok(oo.open(path)?)
        }
        Err(e) => Err(e.into()),
    }
}

/// Validate an object name.
pub(crate) fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 128
        || name.contains('/')
        || name.chars().any(char::is_control)
    {
        return Err(EngineError::InvalidName(name.to_string()));
    }
    Ok(())
}

/// Validate a virtual size.
pub(crate) fn check_size(size: u64) -> Result<()> {
    if size == 0 {
        return Err(EngineError::InvalidSize(size, "must be greater than zero"));
    }
    if !size.is_multiple_of(512) {
        return Err(EngineError::InvalidSize(
            size,
            "must be a multiple of 512 bytes",
        ));
    }
    if size > MAX_VDI_SIZE {
        return Err(EngineError::InvalidSize(
            size,
            "larger than the 64 PiB maximum",
        ));
    }
    Ok(())
}

/// One key-value pair from a RocksDB iterator.
type KvResult = std::result::Result<(Box<[u8]>, Box<[u8]>), rocksdb::Error>;

fn prefix_scan(db: &DB, prefix: u8) -> impl Iterator<Item = KvResult> + '_ {
    db.iterator(IteratorMode::From(&[prefix], Direction::Forward))
        .take_while(move |r| {
            r.as_ref()
                .map(|(k, _)| k.first() == Some(&prefix))
                .unwrap_or(true)
        })
}

impl Engine {
    /// Create a new SR in `dir` (which must be absent or empty): the data file `dir/data` and the metadata
    /// store `dir/meta`.
    pub fn create(dir: &Path, cfg: SrConfig, io: IoEngine) -> Result<Engine> {
        let cs = cfg.cluster_size;
        if !cs.is_power_of_two() || !(4096..=1 << 20).contains(&cs) {
            return Err(EngineError::InvalidClusterSize(cs));
        }
        if dir.join("meta").exists() || dir.join("data").exists() {
            return Err(EngineError::AlreadyExists(dir.display().to_string()));
        }
        std::fs::create_dir_all(dir)?;
        let db = open_db(&dir.join("meta"), true)?;
        let sb = SuperBlock {
            format: FORMAT_VERSION,
            uuid: Uuid::new_v4(),
            cluster_size: cs,
            capacity: cfg.capacity,
            created: now(),
        };
        let mut b = WriteBatch::default();
        b.put(keys::SUPER, records::encode(&sb)?);
        b.put(NEXT_VOL, 1u64.to_be_bytes());
        b.put(CLEAN, b"1");
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        db.write_opt(b, &wo)?;
        drop(db);
        open_data(&dir.join("data"), true)?;
        info!(dir = %dir.display(), uuid = %sb.uuid, cluster_size = cs, "created SR");
        Self::open(dir, io)
    }

    /// Open an existing SR. Fails with [`EngineError::Locked`] if another process has it open.
    pub fn open(dir: &Path, io: IoEngine) -> Result<Engine> {
        let meta = dir.join("meta");
        if !meta.join("CURRENT").exists() {
            return Err(EngineError::NoSr(dir.display().to_string()));
        }
        let db = open_db(&meta, false)?;
        let sb: SuperBlock = match db.get(keys::SUPER)? {
            Some(v) => records::decode("superblock", &v)?,
            None => return Err(EngineError::NoSr(dir.display().to_string())),
        };
        if sb.format != FORMAT_VERSION {
            return Err(EngineError::UnsupportedFormat(sb.format));
        }
        let data = Arc::new(open_data(&dir.join("data"), false)?);
        let cs = u64::from(sb.cluster_size);

        let mut st = State::default();
        let budget = Arc::new(Budget::new(crate::headmap::DEFAULT_BUDGET));
        for r in prefix_scan(&db, keys::prefix::OBJECT) {
            let (_, v) = r?;
            let o: ObjectRecord = records::decode("object", &v)?;
            if !o.name.is_empty() {
                st.names.insert(o.name.clone(), o.uuid);
            }
            st.objects.insert(o.uuid, o);
        }
        let mut vols: Vec<VolumeRecord> = Vec::new();
        for r in prefix_scan(&db, keys::prefix::VOLUME) {
            let (_, v) = r?;
            vols.push(records::decode("volume", &v)?);
        }
        vols.sort_by_key(|v| v.id);
        let mut views: std::collections::HashMap<u64, BTreeSet<u64>> = Default::default();
        for r in prefix_scan(&db, keys::prefix::VIEW) {
            let (k, _) = r?;
            let (Some(vol), Some(ep)) = (keys::u64_at(&k, 1), keys::u64_at(&k, 9)) else {
                return Err(EngineError::Corrupt("malformed view key".into()));
            };
            views.entry(vol).or_default().insert(ep);
        }
        let mut counts: std::collections::HashMap<u64, std::collections::BTreeMap<u64, i64>> =
            Default::default();
        for r in prefix_scan(&db, keys::prefix::COUNT) {
            let (k, v) = r?;
            let (Some(vol), Some(ep)) = (keys::u64_at(&k, 1), keys::u64_at(&k, 9)) else {
                return Err(EngineError::Corrupt("malformed count key".into()));
            };
            let n = v.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0) as i64;
            counts.entry(vol).or_default().insert(ep, n);
        }
        for v in vols {
            let parent_state = match v.parent {
                Some(p) => Some(st.volumes.get(&p.vol).cloned().ok_or_else(|| {
                    EngineError::Corrupt(format!("volume {} has missing parent {}", v.id, p.vol))
                })?),
                None => None,
            };
            let head_size = v
                .head
                .and_then(|h| st.objects.get(&h))
                .map(|o| o.size)
                .unwrap_or(0);
            let vs = VolState {
                id: v.id,
                parent: v.parent,
                parent_state,
                epoch: AtomicU64::new(v.epoch),
                head: Mutex::new(v.head),
                head_size: AtomicU64::new(head_size),
                views: Mutex::new(views.remove(&v.id).unwrap_or_default()),
                counts: Mutex::new(counts.remove(&v.id).unwrap_or_default()),
                barrier: tokio::sync::RwLock::new(()),
                head_closed: AtomicBool::new(v.head.is_none()),
                headmap: HeadMap::new(head_size.div_ceil(cs), budget.clone()),
            };
            st.volumes.insert(v.id, Arc::new(vs));
        }
        st.next_vol = match db.get(NEXT_VOL)? {
            Some(v) => keys::u64_at(&[&[0u8][..], &v].concat(), 1).unwrap_or(1),
            None => 1,
        };
        for r in prefix_scan(&db, keys::prefix::GC) {
            let (k, _) = r?;
            if let Some(vol) = keys::u64_at(&k, 1) {
                st.request_gc(vol);
            }
        }
        let read_u64 = |k: &[u8]| -> Result<u64> {
            Ok(db
                .get(k)?
                .and_then(|v| v.as_slice().try_into().ok().map(u64::from_be_bytes))
                .unwrap_or(0))
        };
        let high_water = read_u64(keys::HIGH_WATER)?;
        let reclaimed = read_u64(keys::RECLAIMED)?;
        let mut free = BTreeSet::new();
        for r in prefix_scan(&db, keys::prefix::FREE) {
            let (k, _) = r?;
            if let Some(p) = keys::u64_at(&k, 1) {
                free.insert(p);
            }
        }
        let clean = db.get(CLEAN)?.is_some();
        if !clean {
            Self::recover_leaks(&db, high_water, &mut free)?;
            Self::rezero_free_space(&data, high_water, &free, cs)?;
        }
        // Durably unclean from now on: a crash before the next clean close must trigger recovery.
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        db.delete_opt(CLEAN, &wo)?;
        let limit = sb.capacity.map(|c| c / cs);
        let file_len = data.metadata()?.len();
        let space = crate::space::SpaceGuard::new(data.clone());
        let inner = Arc::new(Inner {
            dir: dir.to_path_buf(),
            db,
            data,
            io,
            sb,
            cs,
            shift: cs.trailing_zeros(),
            state: RwLock::new(st),
            alloc: Mutex::new(Allocator::new(high_water, free, limit)),
            stripes: (0..STRIPES).map(|_| tokio::sync::RwLock::new(())).collect(),
            ctl: tokio::sync::Mutex::new(()),
            gc_wake: Arc::new(tokio::sync::Notify::new()),
            gc_lock: tokio::sync::Mutex::new(()),
            reclaimed: AtomicU64::new(reclaimed),
            closed: AtomicBool::new(false),
            deferred: Mutex::new(Vec::new()),
            dirty: Default::default(),
            file_end: AtomicU64::new(file_len),
            grow: tokio::sync::Mutex::new(()),
            cache: (0..STRIPES)
                .map(|_| Mutex::new(Default::default()))
                .collect(),
            snap_clock: AtomicU64::new(0),
            carry: Default::default(),
            metadata_reads: AtomicU64::new(0),
            synced_seq: AtomicU64::new(0),
            sync_lock: tokio::sync::Mutex::new(()),
            headmap_budget: budget,
            space,
            meta_error: Mutex::new(None),
        });
        let engine = Engine { inner };
        engine.start_gc_task();
        debug!(dir = %dir.display(), clean, "opened SR");
        Ok(engine)
    }

    /// After an unclean shutdown, clusters reserved but never committed may be neither mapped nor free:
    /// put them back on the free list. O(map entries), and only after a crash.
    fn recover_leaks(db: &DB, high_water: u64, free: &mut BTreeSet<u64>) -> Result<()> {
        let mut used = BTreeSet::new();
        for r in prefix_scan(db, keys::prefix::MAP) {
            let (k, v) = r?;
            match keys::parse_map_value(&k, &v) {
                Some(keys::ZERO_CLUSTER) => {}
                Some(p) => {
                    used.insert(p);
                }
                None => return Err(EngineError::Corrupt("map entry checksum mismatch".into())),
            }
        }
        let mut b = WriteBatch::default();
        let mut n = 0u64;
        for p in 0..high_water {
            if !used.contains(&p) && free.insert(p) {
                b.put(keys::free(p), []);
                n += 1;
            }
        }
        if n > 0 {
            info!(
                clusters = n,
                "returned clusters leaked by an unclean shutdown to the free list"
            );
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            db.write_opt(b, &wo)?;
        }
        Ok(())
    }

    /// Close the SR: stop background GC, wait (up to 10 s) until every other clone of this engine and every volume
    /// handle is gone, then release the metadata store so the SR can be opened again.
    ///
    /// If the pending frees cannot be made durable (a metadata write already failed, say on a full filesystem),
    /// the SR still closes: it is then not marked clean, and the next open recovers it as after a crash. That is
    /// how an SR degraded by a failed metadata write is brought back without restarting the process.
    pub async fn close(self) -> Result<()> {
        // Make pending frees durable and punch them, so the SR can be marked clean.
        if let Err(e) = crate::gc::flush(&self.inner).await {
            warn!(sr = %self.inner.sb.uuid, error = %e, "closing without flushing pending frees; the next open recovers them");
        }
        self.inner.closed.store(true, Ordering::Release);
        self.inner.gc_wake.notify_one();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while Arc::strong_count(&self.inner) > 1 {
            if std::time::Instant::now() > deadline {
                return Err(EngineError::InUse(format!("SR {}", self.inner.sb.uuid)));
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        drop(self);
        Ok(())
    }

    /// After an unclean shutdown, re-establish the allocator's invariant that free clusters read as zeroes:
    /// a cluster may have been committed free but not yet punched, or written by a reservation that never
    /// committed (below or above the high-water mark). Truncate the file at the mark and punch every free run.
    fn rezero_free_space(
        data: &File,
        high_water: u64,
        free: &BTreeSet<u64>,
        cs: u64,
    ) -> Result<()> {
        use std::os::fd::AsRawFd;
        if data.metadata()?.len() > high_water * cs {
            data.set_len(high_water * cs)?;
        }
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &p in free {
            match runs.last_mut() {
                Some((s, n)) if *s + *n == p => *n += 1,
                _ => runs.push((p, 1)),
            }
        }
        for (start, n) in runs {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            // SAFETY: fallocate only reads its integer arguments; the fd is valid for the life of `data`.
            let r = unsafe {
                libc::fallocate(data.as_raw_fd(), mode, (start * cs) as i64, (n * cs) as i64)
            };
            if r != 0 {
                let err = std::io::Error::last_os_error();
                // Without punch support, write zeroes so the invariant still holds.
                warn!(error = %err, "punch hole failed during recovery; writing zeroes");
                let zeros = shale_block::IoBuf::zeroed(cs as usize); // aligned for O_DIRECT
                for p in start..start + n {
                    std::os::unix::fs::FileExt::write_all_at(data, &zeros, p * cs)?;
                }
            }
        }
        data.sync_data()?;
        Ok(())
    }

    /// The SR's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The SR's superblock (identity and geometry).
    pub fn superblock(&self) -> &SuperBlock {
        &self.inner.sb
    }

    /// Names of the VDIs and snapshots with a volume handle open (an NBD client, a VM, a copy in progress): what
    /// keeps [`Engine::close`] waiting, so callers can refuse to detach with a list instead of timing out.
    pub fn open_objects(&self) -> Vec<String> {
        self.inner.state.read().open_names()
    }

    /// SR-wide figures.
    pub fn sr_info(&self) -> SrInfo {
        let a = self.inner.alloc.lock();
        let st = self.inner.state.read();
        SrInfo {
            uuid: self.inner.sb.uuid,
            cluster_size: self.inner.sb.cluster_size,
            capacity: self.inner.sb.capacity,
            allocated_bytes: a.used() * self.inner.cs,
            free_bytes: a.available().map(|c| c * self.inner.cs),
            reclaimed_bytes: self.inner.reclaimed.load(Ordering::Relaxed),
            gc_pending: st.gc_pending.len() as u64,
            objects: st.objects.len(),
            metadata_reads: self.inner.metadata_reads.load(Ordering::Relaxed),
            metadata_error: self.inner.meta_error.lock().clone(),
        }
    }

    /// Every VDI and snapshot (hidden snapshots included, flagged), by creation time then name.
    pub fn list(&self) -> Vec<ObjectInfo> {
        let ids: Vec<Uuid> = self.inner.state.read().objects.keys().copied().collect();
        let mut v: Vec<ObjectInfo> = ids
            .into_iter()
            .filter_map(|id| self.info(id).ok())
            .collect();
        v.sort_by(|a, b| (a.created, &a.name, a.uuid).cmp(&(b.created, &b.name, b.uuid)));
        v
    }

    /// Find an object by UUID or name.
    pub fn lookup(&self, name_or_uuid: &str) -> Result<ObjectInfo> {
        let id = {
            let st = self.inner.state.read();
            match Uuid::parse_str(name_or_uuid) {
                Ok(u) if st.objects.contains_key(&u) => Some(u),
                _ => st.names.get(name_or_uuid).copied(),
            }
        };
        match id {
            Some(id) => self.info(id),
            None => Err(EngineError::NotFound(name_or_uuid.to_string())),
        }
    }

    /// Describe one object.
    pub fn info(&self, id: Uuid) -> Result<ObjectInfo> {
        let (rec, snapshots, clones, vol) = {
            let st = self.inner.state.read();
            let rec = st
                .objects
                .get(&id)
                .cloned()
                .ok_or_else(|| EngineError::NotFound(id.to_string()))?;
            let mut snaps: Vec<&ObjectRecord> = st
                .objects
                .values()
                .filter(|o| o.snapshot_of == Some(id) && !o.hidden)
                .collect();
            snaps.sort_by_key(|o| (o.epoch, o.created));
            let snapshots = snaps.iter().map(|o| o.uuid).collect();
            let clones = match (rec.kind, rec.epoch) {
                (ObjectKind::Snapshot, Some(e)) => {
                    let deps = st.dependents(rec.vol, e);
                    st.objects
                        .values()
                        .filter(|o| o.kind == ObjectKind::Vdi && deps.contains(&o.vol))
                        .map(|o| o.uuid)
                        .collect()
                }
                _ => Vec::new(),
            };
            let vol = st.volumes.get(&rec.vol).cloned();
            (rec, snapshots, clones, vol)
        };
        let allocated_bytes = vol.map(|v| v.count(rec.epoch)).unwrap_or(0) * self.inner.cs;
        Ok(ObjectInfo {
            uuid: rec.uuid,
            name: rec.name,
            kind: rec.kind,
            size: rec.size,
            allocated_bytes,
            parent: rec.parent,
            snapshot_of: rec.snapshot_of,
            snapshots,
            clones,
            hidden: rec.hidden,
            read_only: rec.kind == ObjectKind::Snapshot,
            created: rec.created,
        })
    }

    /// What `to` (a VDI, or a snapshot taken at or after `from`) may have changed since snapshot `from`, at
    /// cluster granularity, for incremental backups: see [`crate::diff`] for what counts and which pairs are
    /// answered. One scan of `to`'s map; no data is read.
    pub fn changes(&self, from: Uuid, to: Uuid) -> Result<crate::diff::Changes> {
        let p = self.diff_plan(from, to)?;
        let cs = self.inner.cs;
        let runs = crate::diff::changed_clusters(
            &self.inner,
            p.vol,
            p.since,
            p.view,
            p.size.div_ceil(cs),
        )?;
        Ok(crate::diff::Changes {
            size: p.size,
            granularity: cs,
            extents: crate::diff::extents(&runs, cs, p.size, p.from_size),
        })
    }

    /// Whether [`Engine::changes`] answers for this pair (cheap: no map scan). The NBD export offers a
    /// `qemu:dirty-bitmap:` context for exactly these snapshots.
    pub fn comparable(&self, from: Uuid, to: Uuid) -> bool {
        self.diff_plan(from, to).is_ok()
    }

    fn diff_plan(&self, from: Uuid, to: Uuid) -> Result<crate::diff::Plan> {
        let f = self.object(from)?;
        Self::expect_kind(&f, ObjectKind::Snapshot)?;
        let no_epoch = || EngineError::Corrupt("snapshot without epoch".into());
        let since = f.epoch.ok_or_else(no_epoch)?;
        let t = self.object(to)?;
        let vs = self.volume_state(t.vol)?;
        let view = match t.kind {
            ObjectKind::Snapshot => t.epoch.ok_or_else(no_epoch)?,
            ObjectKind::Vdi => vs.epoch(),
        };
        let since = if t.vol == f.vol {
            if view < since {
                return Err(EngineError::NotComparable(format!(
                    "snapshot '{}' was taken before '{}': diff from the older one",
                    t.name, f.name
                )));
            }
            Some(since)
        } else if vs
            .parent
            .is_some_and(|p| p.vol == f.vol && p.epoch == since)
        {
            // Cloned from `from` or reverted to it: everything it wrote itself is a change.
            None
        } else {
            return Err(EngineError::NotComparable(format!(
                "'{}' shares no history with snapshot '{}' that the map can compare (it is not a later snapshot \
                 of the same VDI, nor cloned from or reverted to it)",
                t.name, f.name
            )));
        };
        Ok(crate::diff::Plan {
            vol: t.vol,
            since,
            view,
            size: t.size,
            from_size: f.size,
        })
    }

    fn object(&self, id: Uuid) -> Result<ObjectRecord> {
        self.inner
            .state
            .read()
            .objects
            .get(&id)
            .cloned()
            .ok_or_else(|| EngineError::NotFound(id.to_string()))
    }

    fn expect_kind(rec: &ObjectRecord, kind: ObjectKind) -> Result<()> {
        if rec.kind != kind || rec.hidden {
            let what = if rec.hidden {
                "hidden snapshot"
            } else {
                rec.kind.as_str()
            };
            return Err(EngineError::WrongKind(
                rec.name.clone(),
                what,
                kind.as_str(),
            ));
        }
        Ok(())
    }

    fn name_free(&self, name: &str) -> Result<()> {
        check_name(name)?;
        if self.inner.state.read().names.contains_key(name) {
            return Err(EngineError::NameTaken(name.to_string()));
        }
        Ok(())
    }

    fn new_volume(
        &self,
        parent: Option<ParentRef>,
        head: Uuid,
        head_size: u64,
        b: &mut WriteBatch,
    ) -> Result<Arc<VolState>> {
        let st = self.inner.state.read();
        let id = st.next_vol;
        let parent_state = match parent {
            Some(p) => Some(
                st.volumes
                    .get(&p.vol)
                    .cloned()
                    .ok_or_else(|| EngineError::Corrupt(format!("missing volume {}", p.vol)))?,
            ),
            None => None,
        };
        let rec = VolumeRecord {
            id,
            epoch: 1,
            parent,
            head: Some(head),
        };
        b.put(keys::volume(id), records::encode(&rec)?);
        b.put(NEXT_VOL, (id + 1).to_be_bytes());
        Ok(Arc::new(VolState {
            id,
            parent,
            parent_state,
            epoch: AtomicU64::new(1),
            head: Mutex::new(Some(head)),
            head_size: AtomicU64::new(head_size),
            views: Mutex::new(BTreeSet::new()),
            counts: Mutex::new(Default::default()),
            barrier: tokio::sync::RwLock::new(()),
            head_closed: AtomicBool::new(false),
            headmap: HeadMap::new(
                head_size.div_ceil(self.inner.cs),
                self.inner.headmap_budget.clone(),
            ),
        }))
    }

    fn put_volume_record(vs: &VolState, b: &mut WriteBatch) -> Result<()> {
        let rec = VolumeRecord {
            id: vs.id,
            epoch: vs.epoch(),
            parent: vs.parent,
            head: *vs.head.lock(),
        };
        b.put(keys::volume(vs.id), records::encode(&rec)?);
        Ok(())
    }

    fn insert_object(st: &mut State, rec: ObjectRecord) {
        if !rec.name.is_empty() {
            st.names.insert(rec.name.clone(), rec.uuid);
        }
        st.objects.insert(rec.uuid, rec);
    }

    /// Create a thin VDI of `size` bytes: costs no data space until written.
    pub async fn create_vdi(&self, name: &str, size: u64) -> Result<ObjectInfo> {
        let _ctl = self.inner.ctl.lock().await;
        self.name_free(name)?;
        check_size(size)?;
        let uuid = Uuid::new_v4();
        let mut b = WriteBatch::default();
        let vs = self.new_volume(None, uuid, size, &mut b)?;
        let rec = ObjectRecord {
            uuid,
            name: name.to_string(),
            kind: ObjectKind::Vdi,
            size,
            vol: vs.id,
            epoch: None,
            parent: None,
            snapshot_of: None,
            hidden: false,
            created: now(),
        };
        b.put(keys::object(&uuid), records::encode(&rec)?);
        b.put(keys::name(name), uuid.as_bytes());
        self.inner.write(b, true)?;
        {
            let mut st = self.inner.state.write();
            st.next_vol = vs.id + 1;
            st.volumes.insert(vs.id, vs);
            Self::insert_object(&mut st, rec);
        }
        info!(%uuid, name, size, "created VDI");
        self.info(uuid)
    }

    /// Take a snapshot of a VDI. O(1): freezes the volume's current epoch. In-flight writes are drained first, and
    /// the data they wrote is made durable, so the snapshot holds exactly what was acknowledged before it.
    pub async fn snapshot(&self, vdi: Uuid, name: &str) -> Result<ObjectInfo> {
        let _ctl = self.inner.ctl.lock().await;
        let src = self.object(vdi)?;
        Self::expect_kind(&src, ObjectKind::Vdi)?;
        self.name_free(name)?;
        let vs = self.volume_state(src.vol)?;
        let _barrier = vs.barrier.write().await;
        self.inner
            .io
            .fdatasync(&self.inner.data)
            .await
            .map_err(EngineError::Io)?;
        let e = vs.epoch();
        let size = vs.head_size.load(Ordering::Acquire);
        let uuid = Uuid::new_v4();
        let rec = ObjectRecord {
            uuid,
            name: name.to_string(),
            kind: ObjectKind::Snapshot,
            size,
            vol: vs.id,
            epoch: Some(e),
            parent: None,
            snapshot_of: Some(vdi),
            hidden: false,
            created: now(),
        };
        let mut b = WriteBatch::default();
        b.put(keys::object(&uuid), records::encode(&rec)?);
        b.put(keys::name(name), uuid.as_bytes());
        b.put(keys::view(vs.id, e), uuid.as_bytes());
        let vrec = VolumeRecord {
            id: vs.id,
            epoch: e + 1,
            parent: vs.parent,
            head: *vs.head.lock(),
        };
        b.put(keys::volume(vs.id), records::encode(&vrec)?);
        {
            // The snapshot freezes the head's partial entries: their pending widenings go in the same batch.
            let _commit = self.inner.dirty.commit.lock();
            let taken = self.inner.dirty.put_pending(Some(vs.id), &mut b);
            self.inner.write(b, true)?;
            self.inner.dirty.committed(&self.inner, taken);
        }
        // Until the head's first write after this, its clusters resolve exactly as they did at `e`: let cached
        // lookups at `e` made before this point answer for `e + 1` (see `volume::lookup_own`).
        let stamp = self.inner.snap_clock.fetch_add(1, Ordering::SeqCst) + 1;
        self.inner.carry.write().insert(vs.id, (e, stamp));
        vs.views.lock().insert(e);
        vs.epoch.store(e + 1, Ordering::Release);
        Self::insert_object(&mut self.inner.state.write(), rec);
        info!(%uuid, name, vdi = %vdi, epoch = e, "took snapshot");
        drop(_barrier);
        self.info(uuid)
    }

    /// Create a writable VDI from a snapshot. O(1): a new volume whose unmapped clusters read through the
    /// snapshot's view.
    pub async fn clone_snapshot(&self, snap: Uuid, name: &str) -> Result<ObjectInfo> {
        let _ctl = self.inner.ctl.lock().await;
        let src = self.object(snap)?;
        Self::expect_kind(&src, ObjectKind::Snapshot)?;
        self.name_free(name)?;
        let epoch = src
            .epoch
            .ok_or_else(|| EngineError::Corrupt("snapshot without epoch".into()))?;
        let uuid = Uuid::new_v4();
        let mut b = WriteBatch::default();
        let vs = self.new_volume(
            Some(ParentRef {
                vol: src.vol,
                epoch,
                size: src.size,
            }),
            uuid,
            src.size,
            &mut b,
        )?;
        let rec = ObjectRecord {
            uuid,
            name: name.to_string(),
            kind: ObjectKind::Vdi,
            size: src.size,
            vol: vs.id,
            epoch: None,
            parent: Some(snap),
            snapshot_of: None,
            hidden: false,
            created: now(),
        };
        b.put(keys::object(&uuid), records::encode(&rec)?);
        b.put(keys::name(name), uuid.as_bytes());
        self.inner.write(b, true)?;
        {
            let mut st = self.inner.state.write();
            st.next_vol = vs.id + 1;
            st.volumes.insert(vs.id, vs);
            Self::insert_object(&mut st, rec);
        }
        info!(%uuid, name, snapshot = %snap, "cloned snapshot");
        self.info(uuid)
    }

    /// Make a VDI's content that of one of its snapshots. O(1): the VDI moves to a new volume reading through the
    /// snapshot's view; what only the old head could see is reclaimed by GC. The VDI must not be open.
    pub async fn revert(&self, vdi: Uuid, snap: Uuid) -> Result<()> {
        let _ctl = self.inner.ctl.lock().await;
        let v = self.object(vdi)?;
        Self::expect_kind(&v, ObjectKind::Vdi)?;
        let s = self.object(snap)?;
        Self::expect_kind(&s, ObjectKind::Snapshot)?;
        if s.snapshot_of != Some(vdi) {
            return Err(EngineError::NotSnapshotOf(s.name, v.name));
        }
        if self.inner.state.read().is_open(&vdi) {
            return Err(EngineError::InUse(v.name));
        }
        let epoch = s
            .epoch
            .ok_or_else(|| EngineError::Corrupt("snapshot without epoch".into()))?;
        let old = self.volume_state(v.vol)?;
        let mut b = WriteBatch::default();
        let nv = self.new_volume(
            Some(ParentRef {
                vol: s.vol,
                epoch,
                size: s.size,
            }),
            vdi,
            s.size,
            &mut b,
        )?;
        let rec = ObjectRecord {
            vol: nv.id,
            size: s.size,
            parent: Some(snap),
            ..v
        };
        b.put(keys::object(&vdi), records::encode(&rec)?);
        let _barrier = old.barrier.write().await;
        let old_head = old.head.lock().take();
        Self::put_volume_record(&old, &mut b)?;
        b.put(keys::gc(old.id), []);
        if let Err(e) = self.inner.write(b, true) {
            *old.head.lock() = old_head;
            return Err(e);
        }
        old.head_closed.store(true, Ordering::Release);
        {
            let mut st = self.inner.state.write();
            st.next_vol = nv.id + 1;
            st.volumes.insert(nv.id, nv);
            st.objects.insert(vdi, rec);
            st.request_gc(old.id);
        }
        info!(%vdi, %snap, "reverted VDI to snapshot");
        self.inner.gc_wake.notify_one();
        Ok(())
    }

    /// Change a VDI's size. Growing is O(1) and works while the VDI is open; shrinking needs `allow_shrink`
    /// and zeroes what lies beyond the new end so a later grow reads zeroes there.
    pub async fn resize(&self, vdi: Uuid, new_size: u64, allow_shrink: bool) -> Result<ObjectInfo> {
        let _ctl = self.inner.ctl.lock().await;
        let v = self.object(vdi)?;
        Self::expect_kind(&v, ObjectKind::Vdi)?;
        check_size(new_size)?;
        let vs = self.volume_state(v.vol)?;
        if new_size < v.size {
            if !allow_shrink {
                return Err(EngineError::ShrinkRefused(v.name, v.size, new_size));
            }
            let vol = Volume::internal(self.inner.clone(), vs.clone(), vdi);
            vol.zero_beyond(new_size, v.size).await?;
        }
        let rec = ObjectRecord {
            size: new_size,
            ..v
        };
        let mut b = WriteBatch::default();
        b.put(keys::object(&vdi), records::encode(&rec)?);
        self.inner.write(b, true)?;
        vs.head_size.store(new_size, Ordering::Release);
        self.inner.state.write().objects.insert(vdi, rec);
        info!(%vdi, new_size, "resized VDI");
        self.info(vdi)
    }

    /// Destroy a VDI or snapshot. A snapshot that clones still read through is kept hidden until they are gone
    /// (like XenServer's hidden parents). Space is reclaimed in the background by GC. Refused while open.
    pub async fn destroy(&self, id: Uuid) -> Result<()> {
        let _ctl = self.inner.ctl.lock().await;
        let rec = self.object(id)?;
        if self.inner.state.read().is_open(&id) {
            return Err(EngineError::InUse(rec.name));
        }
        let vs = self.volume_state(rec.vol)?;
        let mut b = WriteBatch::default();
        match rec.kind {
            ObjectKind::Vdi => {
                let _barrier = vs.barrier.write().await;
                b.delete(keys::object(&id));
                b.delete(keys::name(&rec.name));
                let prev = vs.head.lock().take();
                Self::put_volume_record(&vs, &mut b)?;
                b.put(keys::gc(vs.id), []);
                if let Err(e) = self.inner.write(b, true) {
                    *vs.head.lock() = prev;
                    return Err(e);
                }
                vs.head_closed.store(true, Ordering::Release);
                let mut st = self.inner.state.write();
                st.objects.remove(&id);
                st.names.remove(&rec.name);
                st.request_gc(vs.id);
            }
            ObjectKind::Snapshot => {
                let epoch = rec
                    .epoch
                    .ok_or_else(|| EngineError::Corrupt("snapshot without epoch".into()))?;
                let has_clones = !self.inner.state.read().dependents(vs.id, epoch).is_empty();
                if has_clones {
                    if rec.hidden {
                        return Ok(());
                    }
                    let hidden = ObjectRecord {
                        hidden: true,
                        name: String::new(),
                        ..rec.clone()
                    };
                    b.put(keys::object(&id), records::encode(&hidden)?);
                    b.delete(keys::name(&rec.name));
                    self.inner.write(b, true)?;
                    let mut st = self.inner.state.write();
                    st.names.remove(&rec.name);
                    st.objects.insert(id, hidden);
                    info!(%id, "snapshot has clones: kept hidden");
                    return Ok(());
                }
                self.drop_snapshot_into(&rec, epoch, &mut b);
                self.inner.write(b, true)?;
                vs.views.lock().remove(&epoch);
                let mut st = self.inner.state.write();
                st.objects.remove(&id);
                if !rec.name.is_empty() {
                    st.names.remove(&rec.name);
                }
                st.request_gc(vs.id);
            }
        }
        info!(%id, kind = rec.kind.as_str(), "destroyed");
        self.inner.gc_wake.notify_one();
        Ok(())
    }

    /// Batch half of removing a snapshot view.
    pub(crate) fn drop_snapshot_into(&self, rec: &ObjectRecord, epoch: u64, b: &mut WriteBatch) {
        b.delete(keys::object(&rec.uuid));
        if !rec.name.is_empty() {
            b.delete(keys::name(&rec.name));
        }
        b.delete(keys::view(rec.vol, epoch));
        b.put(keys::gc(rec.vol), []);
    }

    pub(crate) fn volume_state(&self, vol: u64) -> Result<Arc<VolState>> {
        self.inner
            .state
            .read()
            .volumes
            .get(&vol)
            .cloned()
            .ok_or_else(|| EngineError::Corrupt(format!("missing volume {vol}")))
    }

    /// Open a VDI (writable) or snapshot (read-only) for I/O. While any handle is open the object cannot be
    /// destroyed or reverted.
    pub fn open_volume(&self, id: Uuid) -> Result<Arc<Volume>> {
        let rec = self.object(id)?;
        if rec.hidden {
            return Err(EngineError::NotFound(id.to_string()));
        }
        let vs = self.volume_state(rec.vol)?;
        *self.inner.state.write().open.entry(id).or_default() += 1;
        Ok(Arc::new(Volume::new(
            self.inner.clone(),
            vs,
            id,
            rec.kind,
            rec.epoch,
            rec.size,
        )))
    }

    /// blake3 content digest of a VDI or snapshot (see [`crate::digest`]).
    pub async fn digest(&self, id: Uuid) -> Result<String> {
        let vol = self.open_volume(id)?;
        crate::digest::digest(&vol).await
    }
}
