//! Front-end request semantics: the one place that decides what a block command *means*.
//!
//! NBD and virtio-blk each decode their wire format into a [`Request`] (rejecting malformed frames with their own
//! protocol errors), then call [`execute`]. Validation, zero-length handling and FUA live here, so a flush, a
//! FUA write, a discard or a write-zeroes behaves identically whichever front end a client uses:
//!
//! - every request is checked against the device ([`check_range`], and [`check_write`] for mutations, so a
//!   read-only device refuses writes even when the range is empty) before any I/O;
//! - zero-length writes, discards and write-zeroes succeed without touching the device; a zero-length read
//!   returns an empty buffer;
//! - FUA on a write or write-zeroes is passed to the device, which makes the data durable itself; a FUA discard
//!   (NBD allows it) is followed by a flush, since [`BlockDevice::discard`] takes no flags;
//! - `Cache` (NBD's prefetch hint) is validated and acknowledged; Shale volumes have no read cache to warm;
//! - a discard or write-zeroes longer than [`EFFECT_SLICE`] reaches the device as a sequence of calls of at most
//!   that size: NBD with extended headers and virtio-blk (32-bit sector counts, up to 2 TiB a segment) can ask
//!   for terabytes at once, and devices build per-cluster work for the range they are given.

use crate::buf::IoBuf;
use crate::device::{check_range, check_write, BlockDevice, Extent, WriteFlags};
use crate::error::Result;

/// A validated-shape block command, independent of the front end that received it.
#[derive(Debug)]
pub enum Request {
    /// Read `len` bytes at `offset`. `len` is 32-bit, as in both protocols, which bounds the buffer we allocate.
    Read {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u32,
    },
    /// Write `data` at `offset`; with `fua` it is durable when acknowledged.
    Write {
        /// Byte offset.
        offset: u64,
        /// The bytes to write (its length is the request length).
        data: IoBuf,
        /// Force unit access.
        fua: bool,
    },
    /// Make every acknowledged write durable.
    Flush,
    /// Release a range; it reads as zeroes afterwards. `fua` makes the discard durable when acknowledged.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u64,
        /// Force unit access (NBD `NBD_CMD_FLAG_FUA` on `NBD_CMD_TRIM`).
        fua: bool,
    },
    /// Make a range read as zeroes, releasing space if `may_trim`.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u64,
        /// The device may deallocate the range (NBD without `NO_HOLE`, virtio-blk `unmap`).
        may_trim: bool,
        /// Force unit access.
        fua: bool,
    },
    /// Describe the allocation state of a range.
    BlockStatus {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u64,
    },
    /// Prefetch hint for a range (NBD `NBD_CMD_CACHE`).
    Cache {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u64,
    },
}

/// The successful result of a [`Request`], for the front end to encode.
#[derive(Debug)]
pub enum Response {
    /// The command completed and carries no payload.
    Done,
    /// The bytes a `Read` returned.
    Data(IoBuf),
    /// The extents a `BlockStatus` found, in order, starting at the request offset.
    Extents(Vec<Extent>),
}

/// Largest range one device call of a discard or write-zeroes covers (see the module docs).
pub const EFFECT_SLICE: u64 = 1 << 30;

/// Run `op` over `[offset, offset+len)` in [`EFFECT_SLICE`]-sized pieces, one after another, stopping at the
/// first error.
async fn in_slices<F, Fut>(offset: u64, len: u64, mut op: F) -> Result<()>
where
    F: FnMut(u64, u64) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let n = (end - pos).min(EFFECT_SLICE);
        op(pos, n).await?;
        pos += n;
    }
    Ok(())
}

/// Validate `req` against `dev` and carry it out. Errors are [`crate::BlockError`]s; front ends map them to
/// their codes with `errno()` / `virtio_status()`.
pub async fn execute(dev: &dyn BlockDevice, req: Request) -> Result<Response> {
    let info = dev.info();
    match req {
        Request::Read { offset, len } => {
            check_range(&info, offset, u64::from(len))?;
            let buf = IoBuf::zeroed(len as usize);
            if len == 0 {
                return Ok(Response::Data(buf));
            }
            Ok(Response::Data(dev.read(offset, buf).await?))
        }
        Request::Write { offset, data, fua } => {
            check_write(&info, offset, data.len() as u64)?;
            if !data.is_empty() {
                dev.write(offset, data, WriteFlags { fua }).await?;
            }
            Ok(Response::Done)
        }
        Request::Flush => {
            dev.flush().await?;
            Ok(Response::Done)
        }
        Request::Discard { offset, len, fua } => {
            check_write(&info, offset, len)?;
            if len != 0 {
                in_slices(offset, len, |o, n| dev.discard(o, n)).await?;
                if fua {
                    dev.flush().await?;
                }
            }
            Ok(Response::Done)
        }
        Request::WriteZeroes {
            offset,
            len,
            may_trim,
            fua,
        } => {
            check_write(&info, offset, len)?;
            if len != 0 {
                in_slices(offset, len, |o, n| {
                    dev.write_zeroes(o, n, may_trim, WriteFlags { fua })
                })
                .await?;
            }
            Ok(Response::Done)
        }
        Request::BlockStatus { offset, len } => {
            check_range(&info, offset, len)?;
            if len == 0 {
                return Ok(Response::Extents(Vec::new()));
            }
            Ok(Response::Extents(dev.block_status(offset, len).await?))
        }
        Request::Cache { offset, len } => {
            check_range(&info, offset, len)?;
            Ok(Response::Done)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::ExtentKind;
    use crate::error::BlockError;
    use crate::file::FileDevice;
    use crate::uring::{IoEngine, IoEngineConfig};

    fn device(dir: &tempfile::TempDir, read_only: bool) -> FileDevice {
        let path = dir.path().join("vol.raw");
        if !path.exists() {
            std::fs::File::create(&path)
                .unwrap()
                .set_len(1 << 20)
                .unwrap();
        }
        FileDevice::open(
            &path,
            read_only,
            IoEngine::new(IoEngineConfig::default()).unwrap(),
        )
        .unwrap()
    }

    async fn read(dev: &dyn BlockDevice, offset: u64, len: u32) -> IoBuf {
        match execute(dev, Request::Read { offset, len }).await.unwrap() {
            Response::Data(b) => b,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn write_read_flush() {
        let dir = tempfile::tempdir().unwrap();
        let dev = device(&dir, false);
        for fua in [false, true] {
            let data = IoBuf::from_slice(&[fua as u8 + 1; 4096]);
            assert!(matches!(
                execute(
                    &dev,
                    Request::Write {
                        offset: 8192,
                        data,
                        fua
                    }
                )
                .await,
                Ok(Response::Done)
            ));
            assert!(read(&dev, 8192, 4096)
                .await
                .iter()
                .all(|&b| b == fua as u8 + 1));
        }
        assert!(matches!(
            execute(&dev, Request::Flush).await,
            Ok(Response::Done)
        ));
        assert!(matches!(
            execute(
                &dev,
                Request::Cache {
                    offset: 0,
                    len: 4096
                }
            )
            .await,
            Ok(Response::Done)
        ));
    }

    #[tokio::test]
    async fn zero_length_requests_are_no_ops() {
        let dir = tempfile::tempdir().unwrap();
        let dev = device(&dir, false);
        assert!(read(&dev, 0, 0).await.is_empty());
        assert!(read(&dev, 1 << 20, 0).await.is_empty()); // at the very end is still in range
        let data = IoBuf::zeroed(0);
        execute(
            &dev,
            Request::Write {
                offset: 512,
                data,
                fua: true,
            },
        )
        .await
        .unwrap();
        execute(
            &dev,
            Request::Discard {
                offset: 0,
                len: 0,
                fua: true,
            },
        )
        .await
        .unwrap();
        let wz = Request::WriteZeroes {
            offset: 0,
            len: 0,
            may_trim: false,
            fua: false,
        };
        execute(&dev, wz).await.unwrap();
        match execute(&dev, Request::BlockStatus { offset: 0, len: 0 })
            .await
            .unwrap()
        {
            Response::Extents(e) => assert!(e.is_empty()),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn validation_before_io() {
        let dir = tempfile::tempdir().unwrap();
        let dev = device(&dir, false);
        let r = execute(
            &dev,
            Request::Read {
                offset: 1 << 20,
                len: 512,
            },
        )
        .await;
        assert!(matches!(r, Err(BlockError::OutOfRange { .. })));
        let r = execute(
            &dev,
            Request::Read {
                offset: 7,
                len: 512,
            },
        )
        .await;
        assert!(matches!(r, Err(BlockError::Misaligned { .. })));
        let r = execute(
            &dev,
            Request::Discard {
                offset: u64::MAX - 511,
                len: 512,
                fua: false,
            },
        )
        .await;
        assert!(matches!(r, Err(BlockError::OutOfRange { .. })));
        let r = execute(
            &dev,
            Request::Cache {
                offset: 0,
                len: 2 << 20,
            },
        )
        .await;
        assert!(matches!(r, Err(BlockError::OutOfRange { .. })));
        let r = execute(
            &dev,
            Request::Write {
                offset: 0,
                data: IoBuf::zeroed(100),
                fua: false,
            },
        )
        .await;
        assert!(matches!(r, Err(BlockError::Misaligned { .. })));
        let r = execute(
            &dev,
            Request::BlockStatus {
                offset: 0,
                len: (1 << 20) + 512,
            },
        )
        .await;
        assert!(matches!(r, Err(BlockError::OutOfRange { .. })));
    }

    #[tokio::test]
    async fn read_only_device() {
        let dir = tempfile::tempdir().unwrap();
        drop(device(&dir, false));
        let dev = device(&dir, true);
        let r = execute(
            &dev,
            Request::Write {
                offset: 0,
                data: IoBuf::zeroed(512),
                fua: false,
            },
        )
        .await;
        assert!(matches!(r, Err(BlockError::ReadOnly)));
        // Even an empty mutation is refused on a read-only device.
        let r = execute(
            &dev,
            Request::Discard {
                offset: 0,
                len: 0,
                fua: false,
            },
        )
        .await;
        assert!(matches!(r, Err(BlockError::ReadOnly)));
        let wz = Request::WriteZeroes {
            offset: 0,
            len: 512,
            may_trim: true,
            fua: false,
        };
        assert!(matches!(execute(&dev, wz).await, Err(BlockError::ReadOnly)));
        assert_eq!(read(&dev, 0, 512).await.len(), 512);
        execute(&dev, Request::Flush).await.unwrap();
    }

    #[tokio::test]
    async fn discard_and_write_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let dev = device(&dir, false);
        let data = IoBuf::from_slice(&[0xee; 1 << 20]);
        execute(
            &dev,
            Request::Write {
                offset: 0,
                data,
                fua: false,
            },
        )
        .await
        .unwrap();
        execute(
            &dev,
            Request::Discard {
                offset: 0,
                len: 65536,
                fua: true,
            },
        )
        .await
        .unwrap();
        let wz = Request::WriteZeroes {
            offset: 131072,
            len: 4096,
            may_trim: false,
            fua: true,
        };
        execute(&dev, wz).await.unwrap();
        let got = read(&dev, 0, 1 << 20).await;
        for (i, &b) in got.iter().enumerate() {
            let zero = i < 65536 || (131072..135168).contains(&i);
            assert_eq!(b, if zero { 0 } else { 0xee }, "byte {i}");
        }
        match execute(
            &dev,
            Request::BlockStatus {
                offset: 0,
                len: 131072,
            },
        )
        .await
        .unwrap()
        {
            Response::Extents(e) => {
                assert_eq!(
                    e[0],
                    Extent {
                        offset: 0,
                        length: 65536,
                        kind: ExtentKind::Hole
                    }
                );
                assert_eq!(e[1].kind, ExtentKind::Data);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Records the ranges of discards and write-zeroes, and flushes, on a 4 TiB device that stores nothing.
    #[derive(Default)]
    struct Recorder {
        calls: std::sync::Mutex<Vec<(&'static str, u64, u64, bool)>>,
    }

    #[async_trait::async_trait]
    impl BlockDevice for Recorder {
        fn info(&self) -> crate::device::DeviceInfo {
            crate::device::DeviceInfo::for_tests(4 << 40)
        }
        async fn read(&self, _: u64, buf: IoBuf) -> Result<IoBuf> {
            Ok(buf)
        }
        async fn write(&self, _: u64, _: IoBuf, _: WriteFlags) -> Result<()> {
            Ok(())
        }
        async fn flush(&self) -> Result<()> {
            self.calls.lock().unwrap().push(("flush", 0, 0, false));
            Ok(())
        }
        async fn discard(&self, offset: u64, len: u64) -> Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(("discard", offset, len, false));
            Ok(())
        }
        async fn write_zeroes(&self, offset: u64, len: u64, _: bool, f: WriteFlags) -> Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(("zeroes", offset, len, f.fua));
            Ok(())
        }
        async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
            Ok(vec![Extent {
                offset,
                length: len,
                kind: ExtentKind::Hole,
            }])
        }
    }

    /// Terabyte discards and write-zeroes reach the device in slices of at most `EFFECT_SLICE`, covering the
    /// range exactly once; a FUA discard still ends with one flush, and FUA write-zeroes pass FUA on each slice.
    #[tokio::test]
    async fn huge_discards_and_zeroes_reach_the_device_in_slices() {
        let dev = Recorder::default();
        let (offset, len) = (512, 2 * EFFECT_SLICE + 4096);
        execute(
            &dev,
            Request::Discard {
                offset,
                len,
                fua: true,
            },
        )
        .await
        .unwrap();
        let r = Request::WriteZeroes {
            offset,
            len,
            may_trim: true,
            fua: true,
        };
        execute(&dev, r).await.unwrap();
        let calls = dev.calls.lock().unwrap().clone();
        let s = EFFECT_SLICE;
        assert_eq!(
            calls,
            [
                ("discard", 512, s, false),
                ("discard", 512 + s, s, false),
                ("discard", 512 + 2 * s, 4096, false),
                ("flush", 0, 0, false),
                ("zeroes", 512, s, true),
                ("zeroes", 512 + s, s, true),
                ("zeroes", 512 + 2 * s, 4096, true),
            ]
        );
    }
}
