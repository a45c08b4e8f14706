//! The SR driver seam: what an SR *type* must offer so the host can manage SRs of that type.
//!
//! Two small traits, split along a lifetime boundary:
//! - [`SrDriver`] is the SR type itself (one per type per host): it creates, attaches and destroys SRs at a path
//!   and says what the type can do ([`Capabilities`]).
//! - [`AttachedSr`] is one attached SR: VDI and snapshot operations, space accounting, consistency check,
//!   and [`AttachedSr::open`], which hands out the volume as an `Arc<dyn BlockDevice>` so the NBD server, the
//!   VMM and the daemon's own scripted I/O all consume the same seam without knowing the backend.
//!
//! Splitting them keeps per-SR state (an open engine, a RocksDB handle) out of the driver, and lets the host hold
//! many attached SRs of one type. Backends that offload snapshot/clone to the storage itself (reflink, rbd) plug in
//! as further drivers and report it in [`Capabilities`].
//!
//! The model types here ([`VdiInfo`], [`SrStats`], [`CheckReport`]) are driver-neutral; drivers translate their
//! native records into them.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use shale_block::BlockDevice;
use uuid::Uuid;

use crate::error::{Result, SrError};

/// What a VDI or snapshot changed since an earlier snapshot: byte extents at the SR's granularity.
pub use shale_snapshot::Changes;

/// What an SR type can do (and so what it does itself rather than leaving to Shale).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// VDIs cost no space until written.
    pub thin: bool,
    /// Point-in-time snapshots.
    pub snapshot: bool,
    /// Writable VDIs made from snapshots.
    pub clone: bool,
    /// Revert a VDI to one of its snapshots.
    pub revert: bool,
    /// Grow a VDI, online.
    pub resize_grow: bool,
    /// Shrink a VDI (with explicit opt-in).
    pub resize_shrink: bool,
    /// Content digests computed by the driver.
    pub digest: bool,
    /// Metadata consistency check.
    pub check: bool,
    /// Space reclamation on demand.
    pub gc: bool,
    /// Snapshot and clone are done by the storage itself (the filesystem's FICLONE, Ceph RBD), not by Shale's
    /// engine: their cost and space sharing are the backend's, and Shale keeps only the catalogue.
    pub offloaded_snapshots: bool,
    /// Lists what changed since a snapshot (changed-block tracking, for incremental backups).
    #[serde(default)]
    pub changed_blocks: bool,
}

/// Options for creating an SR.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SrCreateOptions {
    /// Allocation unit in bytes; `None` = the driver's default.
    pub cluster_size: Option<u32>,
    /// Maximum data bytes; `None` = until the filesystem is full.
    pub capacity: Option<u64>,
}

/// Space accounting and identity of an attached SR, as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SrStats {
    /// The SR's own UUID (stored inside the SR).
    pub uuid: Uuid,
    /// Allocation unit in bytes.
    pub cluster_size: u32,
    /// Maximum data bytes, when limited.
    pub capacity: Option<u64>,
    /// Bytes of data space in use.
    pub allocated_bytes: u64,
    /// Bytes still free, when known.
    pub free_bytes: Option<u64>,
    /// Bytes given back by space reclamation so far.
    pub reclaimed_bytes: u64,
    /// Bytes waiting for space reclamation.
    pub gc_pending: u64,
    /// VDIs (writable volumes) in the SR.
    pub vdis: usize,
    /// Snapshots in the SR (including hidden ones).
    pub snapshots: usize,
    /// Map lookups that missed the driver's lookup cache and read its metadata store since the SR was attached
    /// (0 for drivers without one): a cold or thrashing cache shows here before it shows in latency.
    #[serde(default)]
    pub metadata_reads: u64,
    /// The first metadata write that failed since the SR was attached: the SR then refuses changes until it is
    /// attached again, and `sr show` says so in its status.
    #[serde(default)]
    pub metadata_error: Option<String>,
}

/// Whether an object is a writable VDI or a read-only snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VdiKind {
    /// A writable virtual disk.
    Vdi,
    /// A read-only point-in-time image of a VDI.
    Snapshot,
}

impl VdiKind {
    /// The lowercase word used in the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            VdiKind::Vdi => "vdi",
            VdiKind::Snapshot => "snapshot",
        }
    }
}

/// A VDI or snapshot, driver-neutral.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdiInfo {
    /// Stable identity.
    pub uuid: Uuid,
    /// Name, unique within the SR.
    pub name: String,
    /// VDI or snapshot.
    pub kind: VdiKind,
    /// Virtual size in bytes.
    pub size: u64,
    /// Bytes of SR space this object owns.
    pub allocated_bytes: u64,
    /// For a clone: the snapshot it was cloned from.
    pub parent: Option<Uuid>,
    /// For a snapshot: the VDI it was taken of.
    pub snapshot_of: Option<Uuid>,
    /// Snapshots taken of this VDI.
    pub snapshots: Vec<Uuid>,
    /// VDIs cloned from this snapshot.
    pub clones: Vec<Uuid>,
    /// A destroyed snapshot kept because clones still read through it.
    pub hidden: bool,
    /// Writes are refused.
    pub read_only: bool,
    /// Creation time, Unix seconds.
    pub created: u64,
}

/// Result of an SR consistency check.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// Every inconsistency found, one line each; empty = consistent.
    pub problems: Vec<String>,
    /// Clusters referenced by maps.
    pub mapped_clusters: u64,
    /// Map entries holding only some sub-clusters of their cluster (native SRs); 0 elsewhere.
    #[serde(default)]
    pub partial_entries: u64,
    /// Clusters the allocator considers free.
    pub free_clusters: u64,
    /// Objects (VDIs and snapshots) checked.
    pub objects: usize,
}

impl CheckReport {
    /// No problems were found.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// An SR type: creates, attaches and destroys SRs at a path.
#[async_trait]
pub trait SrDriver: Send + Sync + 'static {
    /// The type name users write (`--type thin`).
    fn type_name(&self) -> &'static str;

    /// What SRs of this type can do.
    fn capabilities(&self) -> Capabilities;

    /// Create a new SR at `path` (which must be absent or an empty directory) and attach it.
    /// `label` is the SR's name, used in error messages.
    async fn create(
        &self,
        label: &str,
        path: &Path,
        opts: &SrCreateOptions,
    ) -> Result<Arc<dyn AttachedSr>>;

    /// Attach an existing SR at `path`.
    async fn attach(&self, label: &str, path: &Path) -> Result<Arc<dyn AttachedSr>>;

    /// Delete a detached SR's data and metadata at `path`.
    async fn destroy(&self, path: &Path) -> Result<()>;
}

/// One attached SR: VDI lifecycle, space accounting, and access to volume data.
#[async_trait]
pub trait AttachedSr: Send + Sync + 'static {
    /// Identity and space accounting.
    fn stats(&self) -> SrStats;

    /// Release the SR (close metadata and data files). Later calls on this handle fail.
    async fn detach(&self) -> Result<()>;

    /// Names of the VDIs and snapshots with a volume open (NBD clients, VM disks), sorted: while any is, the SR
    /// is in use and [`crate::host::Host::sr_detach`] refuses, naming them.
    fn open_objects(&self) -> Vec<String>;

    /// Every VDI and snapshot, hidden ones included.
    fn list(&self) -> Vec<VdiInfo>;

    /// Find an object by name or UUID.
    fn lookup(&self, name_or_uuid: &str) -> Result<VdiInfo>;

    /// Find an object by UUID.
    fn info(&self, id: Uuid) -> Result<VdiInfo>;

    /// Create a VDI of `size` bytes.
    async fn vdi_create(&self, name: &str, size: u64) -> Result<VdiInfo>;

    /// Destroy a VDI or snapshot; a snapshot with clones becomes hidden instead.
    async fn vdi_destroy(&self, id: Uuid) -> Result<()>;

    /// Change a VDI's size.
    async fn vdi_resize(&self, id: Uuid, size: u64, allow_shrink: bool) -> Result<VdiInfo>;

    /// Snapshot a VDI.
    async fn vdi_snapshot(&self, id: Uuid, name: &str) -> Result<VdiInfo>;

    /// Clone a snapshot into a new VDI.
    async fn vdi_clone(&self, snapshot: Uuid, name: &str) -> Result<VdiInfo>;

    /// Revert a VDI to one of its snapshots.
    async fn vdi_revert(&self, id: Uuid, snapshot: Uuid) -> Result<()>;

    /// Open an object's data (snapshots read-only).
    fn open(&self, id: Uuid) -> Result<Arc<dyn BlockDevice>>;

    /// blake3 hex digest of the object's whole content.
    async fn digest(&self, id: Uuid) -> Result<String>;

    /// What `to` (a VDI or a later snapshot) changed since snapshot `from`, for incremental backups. Types
    /// without [`Capabilities::changed_blocks`] keep this default.
    async fn changes(&self, from: Uuid, to: Uuid) -> Result<Changes> {
        let _ = (from, to);
        Err(SrError::FailedPrecondition(
            "this SR type does not track changed blocks".into(),
        ))
    }

    /// Whether [`AttachedSr::changes`] answers for this pair, cheaply (no scan).
    fn comparable(&self, from: Uuid, to: Uuid) -> bool {
        let _ = (from, to);
        false
    }

    /// Consistency check.
    async fn check(&self) -> Result<CheckReport>;

    /// Run space reclamation now; returns bytes reclaimed.
    async fn gc(&self) -> Result<u64>;
}
