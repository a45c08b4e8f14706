//! The SR manager's error enum, and the one place where it becomes a gRPC status.
//!
//! Every variant's message is a single line a CLI user can act on; the daemon sends it as the status message and
//! the CLI prints it as is, so the wording here *is* the user-facing error text.

use std::path::PathBuf;

use shale_block::BlockError;
use shale_snapshot::EngineError;
use tonic::{Code, Status};

/// Result alias for the SR manager.
pub type Result<T, E = SrError> = std::result::Result<T, E>;

/// What went wrong in a host, SR or VDI operation.
#[derive(Debug, thiserror::Error)]
pub enum SrError {
    /// No SR with that name or UUID is registered on this host.
    #[error("unknown SR '{0}' (see `shale sr list`)")]
    SrNotFound(String),
    /// The SR name is already used on this host.
    #[error("an SR named '{0}' already exists")]
    SrNameTaken(String),
    /// The path already belongs to a registered SR.
    #[error("path {path} is already used by SR '{1}'", path = .0.display())]
    SrPathInUse(PathBuf, String),
    /// The SR still holds VDIs or snapshots and `force` was not given.
    #[error("SR '{0}' still holds {1} VDI(s)/snapshot(s); destroy them first or pass --force")]
    SrNotEmpty(String, usize),
    /// The SR is registered but could not be attached when the daemon started.
    #[error("SR '{0}' is unavailable: {1}")]
    SrUnavailable(String, String),
    /// No SR type (driver) of that name exists.
    #[error("unknown SR type '{0}' (available: {1})")]
    UnknownType(String, String),
    /// The operation needs an SR but none was named and the host has several (or none).
    #[error("{0}")]
    SrRequired(String),
    /// The SR path cannot be created or written.
    #[error("path {path} is not writable: {1}", path = .0.display())]
    PathNotWritable(PathBuf, String),
    /// No VDI or snapshot matches the reference.
    #[error("no VDI or snapshot '{0}'{1}")]
    VdiNotFound(String, String),
    /// A bare name matches objects in several SRs.
    #[error("'{name}' is ambiguous: it exists in SRs {srs}; write SR/NAME (e.g. {example}) or use the UUID")]
    Ambiguous {
        /// The name given.
        name: String,
        /// The SRs holding it, comma separated.
        srs: String,
        /// A spelled-out `SR/NAME` example.
        example: String,
    },
    /// A name, size or other argument is invalid.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request is valid but the object's state does not allow it (shrink refused, wrong kind...).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A name is already used inside the SR.
    #[error("{0}")]
    NameTaken(String),
    /// The SR (or its filesystem) is full.
    #[error("SR '{0}' is full: {1}")]
    NoSpace(String, String),
    /// The driver does not support this operation.
    #[error("SR '{0}' (type {1}) does not support {2}")]
    Unsupported(String, String, &'static str),
    /// Another process holds the SR.
    #[error("{0}")]
    Locked(String),
    /// The host's SR registry could not be read or written.
    #[error("SR registry {path}: {1}", path = .0.display())]
    Registry(PathBuf, String),
    /// An error from the native engine that has no more specific mapping.
    #[error(transparent)]
    Engine(EngineError),
    /// A data-path error.
    #[error(transparent)]
    Block(BlockError),
    /// Host I/O failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl SrError {
    /// Translate an engine error, naming the SR for the errors a user sees most (full, name taken...).
    pub fn from_engine(sr: &str, e: EngineError) -> Self {
        match e {
            EngineError::NoSpace => {
                SrError::NoSpace(sr.to_string(), "no space left for new clusters".into())
            }
            e @ EngineError::MetadataNoSpace(_) => SrError::NoSpace(sr.to_string(), e.to_string()),
            EngineError::Block(b) => SrError::from_block(sr, b),
            EngineError::Io(io) => SrError::from_block(sr, BlockError::from_io(io)),
            EngineError::NotFound(name) => SrError::VdiNotFound(name, format!(" in SR '{sr}'")),
            EngineError::NameTaken(name) => {
                SrError::NameTaken(format!("name '{name}' is already taken in SR '{sr}'"))
            }
            e @ (EngineError::InvalidName(_)
            | EngineError::InvalidSize(..)
            | EngineError::InvalidClusterSize(_)) => SrError::InvalidArgument(e.to_string()),
            EngineError::ShrinkRefused(name, from, to) => SrError::FailedPrecondition(format!(
                "shrinking '{name}' from {} to {} destroys the data past the new end; pass --allow-shrink",
                crate::size::format_size(from),
                crate::size::format_size(to)
            )),
            e @ (EngineError::WrongKind(..)
            | EngineError::NotSnapshotOf(..)
            | EngineError::InUse(_)
            | EngineError::NotComparable(_)) => SrError::FailedPrecondition(e.to_string()),
            e @ EngineError::Locked(_) => SrError::Locked(e.to_string()),
            other => SrError::Engine(other),
        }
    }

    /// Translate a data-path error, naming the SR when it is full.
    pub fn from_block(sr: &str, e: BlockError) -> Self {
        match e {
            BlockError::NoSpace => {
                SrError::NoSpace(sr.to_string(), "no space left for new clusters".into())
            }
            BlockError::Io(io) => match BlockError::from_io(io) {
                BlockError::NoSpace => {
                    SrError::NoSpace(sr.to_string(), "the filesystem is full".into())
                }
                other => SrError::Block(other),
            },
            other => SrError::Block(other),
        }
    }

    /// The gRPC status code for this error.
    pub fn code(&self) -> Code {
        match self {
            SrError::SrNotFound(_) | SrError::VdiNotFound(..) => Code::NotFound,
            SrError::SrNameTaken(_) | SrError::SrPathInUse(..) | SrError::NameTaken(_) => {
                Code::AlreadyExists
            }
            SrError::UnknownType(..)
            | SrError::SrRequired(_)
            | SrError::Ambiguous { .. }
            | SrError::InvalidArgument(_) => Code::InvalidArgument,
            SrError::SrNotEmpty(..) | SrError::FailedPrecondition(_) | SrError::Locked(_) => {
                Code::FailedPrecondition
            }
            SrError::SrUnavailable(..) => Code::Unavailable,
            SrError::PathNotWritable(..) => Code::PermissionDenied,
            SrError::NoSpace(..) => Code::ResourceExhausted,
            SrError::Unsupported(..) => Code::Unimplemented,
            SrError::Block(b) => match b {
                BlockError::OutOfRange { .. } | BlockError::Misaligned { .. } => {
                    Code::InvalidArgument
                }
                BlockError::ReadOnly => Code::FailedPrecondition,
                BlockError::NoSpace => Code::ResourceExhausted,
                BlockError::Unsupported(_) => Code::Unimplemented,
                _ => Code::Internal,
            },
            SrError::Engine(e) => match e {
                EngineError::AlreadyExists(_) => Code::AlreadyExists,
                EngineError::NoSr(_) => Code::NotFound,
                _ => Code::Internal,
            },
            SrError::Registry(..) | SrError::Io(_) => Code::Internal,
        }
    }
}

impl From<SrError> for Status {
    fn from(e: SrError) -> Self {
        let code = e.code();
        if code == Code::Internal {
            tracing::error!(error = %e, "request failed");
        } else {
            tracing::debug!(error = %e, ?code, "request refused");
        }
        Status::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_messages() {
        let full = SrError::from_engine("small", EngineError::NoSpace);
        assert_eq!(full.code(), Code::ResourceExhausted);
        assert!(full.to_string().starts_with("SR 'small' is full"));
        let full = SrError::from_block(
            "small",
            BlockError::Io(std::io::Error::from_raw_os_error(28)),
        );
        assert_eq!(full.code(), Code::ResourceExhausted);
        assert_eq!(SrError::SrNotFound("x".into()).code(), Code::NotFound);
        let amb = SrError::Ambiguous {
            name: "d".into(),
            srs: "a, b".into(),
            example: "a/d".into(),
        };
        assert_eq!(amb.code(), Code::InvalidArgument);
        assert!(amb.to_string().contains("SR/NAME"));
        let st: Status = SrError::SrNameTaken("local".into()).into();
        assert_eq!(st.code(), Code::AlreadyExists);
        assert_eq!(st.message(), "an SR named 'local' already exists");
    }
}
