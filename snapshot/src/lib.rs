//! Shale's native thin-provisioned copy-on-write volume engine.
//!
//! One engine instance is one SR: a data file of fixed-size clusters (`DIR/data`) and a RocksDB metadata store
//! (`DIR/meta`). The design follows `shared/ARCHITECTURE.md` ("Native engine rules"):
//!
//! - **One map, epochs, no chains.** Each volume has one extent map keyed by (cluster, epoch). A snapshot
//!   freezes the volume's current epoch; a read at view epoch E takes the newest entry with epoch <= E — a single
//!   RocksDB seek, because epochs are stored inverted ([`keys`]). Snapshot and clone write O(1) metadata, and
//!   read cost does not depend on how many snapshots exist (dm-thin's "one btree with timestamps", RBD's snap
//!   contexts).
//! - **Clones** are new volumes whose unmapped clusters fall through to a parent view (volume, epoch).
//! - **Redirect on write** for clusters a snapshot can see, **in place** for head-only clusters ([`volume`]).
//! - **Crash consistency**: data before the map entry that points at it; map, allocator and records change
//!   together in one `WriteBatch`; `flush` = data fdatasync then WAL sync.
//! - **GC** reclaims what no view can see, in the background, crash-safely ([`gc`]).
//!
//! Modules: [`engine`] (open/create and control-plane operations), [`volume`] (the data path, `BlockDevice`),
//! [`alloc`] (clusters), [`space`] (the metadata's headroom on the filesystem), `dirty` (deferred sub-cluster mask widenings), [`gc`], [`check`] (`sr check`), [`digest`] (`vdi digest`), [`diff`] (changed blocks since a snapshot), [`keys`]/[`records`] (the
//! on-disk format), [`state`] (in-memory caches).

pub mod alloc;
pub mod check;
pub mod diff;
pub mod digest;
pub(crate) mod dirty;
pub mod engine;
pub mod error;
pub mod gc;
pub(crate) mod headmap;
pub mod keys;
pub mod records;
pub mod space;
pub mod state;
pub mod volume;

pub use check::CheckReport;
pub use diff::Changes;
pub use engine::{Engine, ObjectInfo, SrConfig, SrInfo, MAX_VDI_SIZE};
pub use error::{EngineError, Result};
pub use records::ObjectKind;
pub use volume::Volume;
