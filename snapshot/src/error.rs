//! The engine's error enum.

use shale_block::BlockError;

/// Result alias for the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// What went wrong in an engine operation, in the terms a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No VDI or snapshot with that name or UUID exists in this SR.
    #[error("no VDI or snapshot named '{0}' in this SR")]
    NotFound(String),
    /// The name is already used by another VDI or snapshot in this SR.
    #[error("name '{0}' is already taken in this SR")]
    NameTaken(String),
    /// The name is empty, too long or contains '/'.
    #[error("invalid name '{0}': names are 1-128 characters and cannot contain '/'")]
    InvalidName(String),
    /// A size that is zero, not a multiple of 512, or too large.
    #[error("invalid size {0}: {1}")]
    InvalidSize(u64, &'static str),
    /// A cluster size outside 4K..1M or not a power of two.
    #[error("invalid cluster size {0}: must be a power of two from 4K to 1M")]
    InvalidClusterSize(u32),
    /// The operation needs a VDI but got a snapshot, or the reverse.
    #[error("'{0}' is a {1}; this operation needs a {2}")]
    WrongKind(String, &'static str, &'static str),
    /// Shrinking needs an explicit opt-in because it destroys data.
    #[error(
        "shrinking {0} from {1} to {2} bytes destroys data; pass allow_shrink (--allow-shrink)"
    )]
    ShrinkRefused(String, u64, u64),
    /// The snapshot does not belong to the VDI being reverted.
    #[error("snapshot '{0}' was not taken of VDI '{1}'")]
    NotSnapshotOf(String, String),
    /// Two objects whose differences the map cannot answer (see [`crate::diff`]).
    #[error("{0}")]
    NotComparable(String),
    /// The object is open (exported, attached to a VM) and the operation needs it closed.
    #[error("'{0}' is in use (open by an export or a VM); close it first")]
    InUse(String),
    /// The SR has no free clusters left (its capacity or the filesystem is full).
    #[error("SR is full: no space left for new clusters")]
    NoSpace,
    /// The SR directory already holds an SR.
    #[error("an SR already exists at {0}")]
    AlreadyExists(String),
    /// The SR directory is missing or does not hold an SR.
    #[error("no SR at {0}")]
    NoSr(String),
    /// Another process has this SR open (RocksDB lock).
    #[error("SR at {0} is in use by another process")]
    Locked(String),
    /// The on-disk format version is not one this build understands.
    #[error("unsupported SR format version {0}")]
    UnsupportedFormat(u32),
    /// Metadata failed its checksum or is inconsistent.
    #[error("metadata corruption: {0}")]
    Corrupt(String),
    /// The metadata store failed.
    #[error("metadata store: {0}")]
    Db(rocksdb::Error),
    /// The metadata store could not write because the SR's filesystem is full. New clusters stop short of this
    /// ([`crate::space`]), so another writer on the filesystem took the last of it. RocksDB then refuses every
    /// later change until the SR is attached again; reads go on, and flushed writes are safe.
    #[error(
        "the SR's filesystem is full and its metadata store could not write ({0}); free space on it, then attach \
         the SR again (`shale sr detach` and `shale sr attach`): flushed writes are kept, later ones may be lost as in a crash"
    )]
    MetadataNoSpace(String),
    /// Host I/O failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A data-path error.
    #[error(transparent)]
    Block(#[from] BlockError),
}

/// Whether a metadata store message reports a full filesystem: RocksDB says so only in words
/// (`IOStatus::NoSpace`: "IO error: No space left on device: ..."), so this is the one place that reads them.
pub fn is_no_space(message: &str) -> bool {
    message.contains("No space left on device")
}

impl From<rocksdb::Error> for EngineError {
    /// RocksDB reports a full filesystem only in its message (`IOStatus::NoSpace`: "IO error: No space left on
    /// device: ..."); it gets its own variant so clients see ENOSPC rather than EIO.
    fn from(e: rocksdb::Error) -> Self {
        if e.kind() == rocksdb::ErrorKind::IOError && is_no_space(e.as_ref()) {
            EngineError::MetadataNoSpace(e.into_string())
        } else {
            EngineError::Db(e)
        }
    }
}

impl From<EngineError> for BlockError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::NoSpace | EngineError::MetadataNoSpace(_) => BlockError::NoSpace,
            EngineError::Block(b) => b,
            EngineError::Io(io) => BlockError::from_io(io),
            EngineError::Corrupt(s) => BlockError::Corrupt(s),
            other => BlockError::Other(other.to_string()),
        }
    }
}
