//! The `BlockDevice` trait: the one interface every Shale volume offers and every front end consumes.
//!
//! Implemented by the native engine's volumes (`shale-snapshot`), by raw files on io_uring ([`crate::file`]),
//! and by the NBD client (a remote volume). Consumed by the NBD server and the VMM's virtio-blk device, always
//! as `Arc<dyn BlockDevice>`, so no front end knows which backend it has (the Cloud Hypervisor `block` crate
//! pattern).
//!
//! Buffers are owned ([`IoBuf`]) and moved through the call: a read takes the buffer to fill and returns it, a
//! write takes the data. That keeps io_uring requests sound even when a caller's future is dropped mid-flight.
//!
//! Semantics every implementation follows:
//! - offsets and lengths are bytes; both must be multiples of [`DeviceInfo::block_size`], and the range must lie
//!   within [`DeviceInfo::size`] ([`check_range`] does both checks, returning `Misaligned`/`OutOfRange`);
//! - an acknowledged write is visible to every later read; it is durable once a later [`BlockDevice::flush`]
//!   completes, or at once when written with [`WriteFlags::fua`];
//! - [`BlockDevice::discard`] and [`BlockDevice::write_zeroes`] leave the range reading as zeroes (Shale makes
//!   discard deterministic, which the NBD spec allows and which keeps model tests exact).

use async_trait::async_trait;

use crate::buf::IoBuf;
use crate::error::{BlockError, Result};

/// Static facts about a device that front ends advertise (NBD transmission flags, virtio-blk config space).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Size in bytes (a multiple of `block_size`).
    pub size: u64,
    /// Minimum I/O granularity in bytes (512 for every Shale volume).
    pub block_size: u32,
    /// Preferred I/O size in bytes (the engine's cluster size; writes of this size and alignment are fastest).
    pub preferred_block_size: u32,
    /// Writes, discards and write-zeroes are refused with [`BlockError::ReadOnly`].
    pub read_only: bool,
    /// Discard really releases space (otherwise it only zeroes).
    pub can_trim: bool,
    /// Write-zeroes is efficient (no data written for whole clusters).
    pub can_fast_zero: bool,
    /// Several connections/queues may use the device at once and a flush on one covers writes from all.
    pub can_multi_conn: bool,
}

/// Per-write options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the write is durable when acknowledged.
    pub fua: bool,
}

impl WriteFlags {
    /// Flags for a write that must be durable on completion.
    pub const FUA: WriteFlags = WriteFlags { fua: true };
}

/// What a range of the device holds, as `block_status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExtentKind {
    /// Allocated data (may happen to contain zeroes).
    Data,
    /// Allocated, but known to read as zeroes.
    Zero,
    /// Not allocated; reads as zeroes and costs no space.
    Hole,
}

/// A run of bytes with one [`ExtentKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    /// Byte offset of the run.
    pub offset: u64,
    /// Length of the run in bytes.
    pub length: u64,
    /// What the run holds.
    pub kind: ExtentKind,
}

/// A block volume: the seam between storage backends and front ends.
#[async_trait]
pub trait BlockDevice: Send + Sync + 'static {
    /// Size, block size, and capabilities.
    fn info(&self) -> DeviceInfo;

    /// Fill `buf` (its length is the request length) from `offset` and return it.
    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf>;

    /// Write `data` at `offset`.
    async fn write(&self, offset: u64, data: IoBuf, flags: WriteFlags) -> Result<()>;

    /// Make every write acknowledged so far durable.
    async fn flush(&self) -> Result<()>;

    /// Release the range; it reads as zeroes afterwards.
    async fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Make the range read as zeroes; with `may_trim` the device may release space to do it.
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        flags: WriteFlags,
    ) -> Result<()>;

    /// Describe `[offset, offset+len)` as a list of contiguous extents covering at least the first byte and at
    /// most the whole range, in order.
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;

    /// Convenience: [`DeviceInfo::size`].
    fn size(&self) -> u64 {
        self.info().size
    }

    /// Convenience: [`DeviceInfo::block_size`].
    fn block_size(&self) -> u32 {
        self.info().block_size
    }

    /// Convenience: [`DeviceInfo::read_only`].
    fn read_only(&self) -> bool {
        self.info().read_only
    }
}

/// Validate a request against a device: aligned to `block_size` and inside `size`.
pub fn check_range(info: &DeviceInfo, offset: u64, len: u64) -> Result<()> {
    let align = u64::from(info.block_size.max(1));
    if !offset.is_multiple_of(align) || !len.is_multiple_of(align) {
        return Err(BlockError::Misaligned {
            offset,
            len,
            align: info.block_size,
        });
    }
    match offset.checked_add(len) {
        Some(end) if end <= info.size => Ok(()),
        _ => Err(BlockError::OutOfRange {
            offset,
            len,
            size: info.size,
        }),
    }
}

/// Validate a mutating request: [`check_range`] plus the read-only check.
pub fn check_write(info: &DeviceInfo, offset: u64, len: u64) -> Result<()> {
    if info.read_only {
        return Err(BlockError::ReadOnly);
    }
    check_range(info, offset, len)
}

#[cfg(test)]
impl DeviceInfo {
    /// A writable device of `size` bytes with 512-byte blocks, 64 KiB preferred, and every capability: what the
    /// crate's unit tests serve or check against.
    pub(crate) fn for_tests(size: u64) -> DeviceInfo {
        DeviceInfo {
            size,
            block_size: 512,
            preferred_block_size: 65536,
            read_only: false,
            can_trim: true,
            can_fast_zero: true,
            can_multi_conn: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> DeviceInfo {
        DeviceInfo::for_tests(1 << 20)
    }

    #[test]
    fn ranges() {
        let i = info();
        assert!(check_range(&i, 0, 512).is_ok());
        assert!(check_range(&i, (1 << 20) - 512, 512).is_ok());
        assert!(matches!(
            check_range(&i, 1 << 20, 512),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_range(&i, u64::MAX - 511, 512),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_range(&i, 1, 512),
            Err(BlockError::Misaligned { .. })
        ));
        assert!(matches!(
            check_range(&i, 0, 100),
            Err(BlockError::Misaligned { .. })
        ));
        let ro = DeviceInfo {
            read_only: true,
            ..i
        };
        assert!(matches!(
            check_write(&ro, 0, 512),
            Err(BlockError::ReadOnly)
        ));
    }
}
