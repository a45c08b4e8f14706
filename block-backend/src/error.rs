//! Errors of the data path, and their one mapping onto front-end codes.
//!
//! Every front end (NBD, virtio-blk) reports failures in its own vocabulary; [`BlockError::errno`] and
//! [`BlockError::virtio_status`] are the only places where that translation happens, so a full SR is `ENOSPC`
//! on NBD and `VIRTIO_BLK_S_IOERR` in the guest, everywhere.

use std::io;

/// Result alias for the data path.
pub type Result<T, E = BlockError> = std::result::Result<T, E>;

/// What went wrong with a block request, in the terms a client can act on.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The request reaches past the end of the device.
    #[error(
        "request at offset {offset} length {len} is beyond the end of the device ({size} bytes)"
    )]
    OutOfRange {
        /// Request start.
        offset: u64,
        /// Request length.
        len: u64,
        /// Device size.
        size: u64,
    },
    /// Offset or length is not a multiple of the device's block size.
    #[error("request at offset {offset} length {len} is not aligned to {align} bytes")]
    Misaligned {
        /// Request start.
        offset: u64,
        /// Request length.
        len: u64,
        /// Required alignment.
        align: u32,
    },
    /// The device is read-only (a snapshot, or a disk attached read-only).
    #[error("device is read-only")]
    ReadOnly,
    /// The storage behind the device is full.
    #[error("no space left in the storage repository")]
    NoSpace,
    /// The operation is not supported by this device.
    #[error("operation not supported: {0}")]
    Unsupported(&'static str),
    /// The device was closed or its engine stopped.
    #[error("device is shut down")]
    Shutdown,
    /// Metadata is inconsistent or failed verification.
    #[error("metadata corruption: {0}")]
    Corrupt(String),
    /// An error from the remote end (NBD client) carrying its errno.
    #[error("remote error: errno {0}")]
    Remote(i32),
    /// An I/O error from the host.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// Any other failure of the layer below (e.g. the metadata store), described.
    #[error("{0}")]
    Other(String),
}

/// NBD and Linux errno values used on the wire (the NBD spec uses the Linux numbers).
pub mod errno {
    /// Operation not permitted.
    pub const EPERM: i32 = 1;
    /// I/O error.
    pub const EIO: i32 = 5;
    /// Out of memory.
    pub const ENOMEM: i32 = 12;
    /// Invalid argument.
    pub const EINVAL: i32 = 22;
    /// No space left on device.
    pub const ENOSPC: i32 = 28;
    /// Value too large (NBD: request too large).
    pub const EOVERFLOW: i32 = 75;
    /// Operation not supported.
    pub const ENOTSUP: i32 = 95;
    /// Server shutting down.
    pub const ESHUTDOWN: i32 = 108;
}

/// virtio-blk request status bytes (virtio spec 5.2.6).
pub mod virtio_status {
    /// Success.
    pub const OK: u8 = 0;
    /// Device or driver error.
    pub const IOERR: u8 = 1;
    /// Request unsupported by the device.
    pub const UNSUPP: u8 = 2;
}

impl BlockError {
    /// The errno an NBD reply (or any POSIX-style front end) carries for this error.
    pub fn errno(&self) -> i32 {
        match self {
            BlockError::OutOfRange { .. } | BlockError::Misaligned { .. } => errno::EINVAL,
            BlockError::ReadOnly => errno::EPERM,
            BlockError::NoSpace => errno::ENOSPC,
            BlockError::Unsupported(_) => errno::ENOTSUP,
            BlockError::Shutdown => errno::ESHUTDOWN,
            BlockError::Remote(e) => *e,
            BlockError::Io(e) => match e.raw_os_error() {
                Some(libc_enospc) if libc_enospc == errno::ENOSPC => errno::ENOSPC,
                Some(code) if code == errno::EPERM || code == errno::EINVAL => code,
                _ => errno::EIO,
            },
            BlockError::Corrupt(_) | BlockError::Other(_) => errno::EIO,
        }
    }

    /// The virtio-blk status byte for this error.
    pub fn virtio_status(&self) -> u8 {
        match self {
            BlockError::Unsupported(_) => virtio_status::UNSUPP,
            _ => virtio_status::IOERR,
        }
    }

    /// Classify a host I/O error: `ENOSPC`/`EDQUOT` from the filesystem become [`BlockError::NoSpace`].
    pub fn from_io(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(code) if code == errno::ENOSPC || code == 122 /* EDQUOT */ => BlockError::NoSpace,
            _ => BlockError::Io(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping() {
        assert_eq!(BlockError::ReadOnly.errno(), errno::EPERM);
        assert_eq!(BlockError::NoSpace.errno(), errno::ENOSPC);
        assert_eq!(
            BlockError::OutOfRange {
                offset: 0,
                len: 1,
                size: 0
            }
            .errno(),
            errno::EINVAL
        );
        assert_eq!(
            BlockError::from_io(io::Error::from_raw_os_error(28)).errno(),
            errno::ENOSPC
        );
        assert!(matches!(
            BlockError::from_io(io::Error::from_raw_os_error(28)),
            BlockError::NoSpace
        ));
        assert_eq!(
            BlockError::Io(io::Error::from_raw_os_error(5)).errno(),
            errno::EIO
        );
        assert_eq!(
            BlockError::Unsupported("x").virtio_status(),
            virtio_status::UNSUPP
        );
        assert_eq!(BlockError::NoSpace.virtio_status(), virtio_status::IOERR);
    }
}
