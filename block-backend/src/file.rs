//! A raw file or block device as a [`BlockDevice`], with all data I/O on the [`IoEngine`].
//!
//! This is the simplest volume Shale has: what the `raw` SR exposes, what benchmarks compare against, and the
//! device most front-end tests run on. The file is opened with `O_DIRECT` when the filesystem allows it, so
//! reads and writes bypass the page cache (the same path `fio --direct=1` measures); on filesystems that refuse
//! `O_DIRECT` (e.g. older tmpfs) it falls back to buffered I/O, which behaves the same apart from speed.
//!
//! - `flush` is `fdatasync`; a FUA write uses `RWF_DSYNC`.
//! - `discard` is `fallocate(PUNCH_HOLE | KEEP_SIZE)`. On a block device the kernel turns that into a discard
//!   that is guaranteed to read back zeroes (or refuses it), which `BLKDISCARD` would not promise, so one call
//!   serves both. Where it is refused we write zeroes, keeping Shale's "discarded ranges read as zero" rule.
//! - `write_zeroes` is `fallocate(ZERO_RANGE)` (or the punch when `may_trim`), with the same write-zeroes
//!   fallback; a refusal is remembered so later requests skip straight to what works.
//! - `block_status` walks `lseek(SEEK_DATA/SEEK_HOLE)`; those calls only consult in-memory extent maps, but
//!   they are still syscalls, so they run on tokio's blocking pool rather than on a runtime thread.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;

use crate::buf::IoBuf;
use crate::device::{
    check_range, check_write, BlockDevice, DeviceInfo, Extent, ExtentKind, WriteFlags,
};
use crate::error::{BlockError, Result};
use crate::uring::IoEngine;

/// Logical block size of every `FileDevice`: the `O_DIRECT` alignment unit on virtually all devices.
const BLOCK_SIZE: u32 = 512;

/// Size of the zero buffer used when the kernel cannot zero a range for us.
const ZERO_CHUNK: usize = 1 << 20;

/// A raw file or block device served as a Shale volume.
#[derive(Debug)]
pub struct FileDevice {
    path: PathBuf,
    file: Arc<File>,
    engine: IoEngine,
    info: DeviceInfo,
    direct: bool,
    /// `fallocate(PUNCH_HOLE)` was refused once; go straight to the next method.
    no_punch: AtomicBool,
    /// `fallocate(ZERO_RANGE)` was refused once; go straight to writing zeroes.
    no_zero_range: AtomicBool,
}

impl FileDevice {
    /// Open `path` (a regular file or a block device) as a volume on `engine`.
    ///
    /// The size is the file's length (a block device's capacity), rounded down to 512 bytes so every request
    /// the device accepts can be done with `O_DIRECT`; an unaligned tail is not exposed.
    pub fn open(path: impl AsRef<Path>, read_only: bool, engine: IoEngine) -> Result<FileDevice> {
        let path = path.as_ref();
        let mut opts = OpenOptions::new();
        opts.read(true).write(!read_only);
        let (mut file, direct) = match opts.clone().custom_flags(libc::O_DIRECT).open(path) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (opts.open(path)?, false),
            Err(e) => return Err(BlockError::Io(e)),
        };
        let meta = file.metadata()?;
        let is_block = meta.file_type().is_block_device();
        let raw_size = if is_block {
            // A block device's metadata says 0; its capacity is where a seek to the end lands. The file position
            // is never used for I/O (every request carries its offset).
            file.seek(SeekFrom::End(0))?
        } else if meta.file_type().is_file() {
            meta.len()
        } else {
            return Err(BlockError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                ),
            )));
        };
        let size = raw_size - raw_size % u64::from(BLOCK_SIZE);
        let info = DeviceInfo {
            size,
            block_size: BLOCK_SIZE,
            preferred_block_size: 4096,
            read_only,
            can_trim: true,
            // Regular files zero by extent manipulation; block devices may have to write the zeroes.
            can_fast_zero: !is_block,
            // One file, one page cache / device queue: a flush through any handle covers every write.
            can_multi_conn: true,
        };
        Ok(FileDevice {
            path: path.to_path_buf(),
            file: Arc::new(file),
            engine,
            info,
            direct,
            no_punch: AtomicBool::new(false),
            no_zero_range: AtomicBool::new(false),
        })
    }

    /// Whether the file was opened with `O_DIRECT` (false when the filesystem refused it).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The path this device was opened from, for logs and diagnostics.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Try `fallocate(mode)`; `Ok(false)` (and remember it in `flag`) when the kernel or filesystem does not
    /// support that mode here.
    async fn try_fallocate(
        &self,
        flag: &AtomicBool,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> Result<bool> {
        if flag.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match self.engine.fallocate(&self.file, mode, offset, len).await {
            Ok(()) => Ok(true),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS)) => {
                flag.store(true, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(BlockError::from_io(e)),
        }
    }

    /// Zero `[offset, offset+len)` by writing zero buffers: the method that works everywhere.
    async fn write_zero_buffers(&self, offset: u64, len: u64) -> Result<()> {
        let mut buf = IoBuf::zeroed(ZERO_CHUNK.min(usize::try_from(len).unwrap_or(ZERO_CHUNK)));
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(ZERO_CHUNK as u64) as usize;
            buf.set_len(n);
            let (res, back) = self.engine.write_at(&self.file, pos, buf, false).await;
            res.map_err(BlockError::from_io)?;
            buf = back;
            pos += n as u64;
        }
        Ok(())
    }

    /// Make the range read as zeroes, releasing space if `trim`; returns once done (not necessarily durable).
    async fn zero_range(&self, offset: u64, len: u64, trim: bool) -> Result<()> {
        if trim {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            if self
                .try_fallocate(&self.no_punch, mode, offset, len)
                .await?
            {
                return Ok(());
            }
        }
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        if self
            .try_fallocate(&self.no_zero_range, mode, offset, len)
            .await?
        {
            return Ok(());
        }
        self.write_zero_buffers(offset, len).await
    }
}

#[async_trait]
impl BlockDevice for FileDevice {
    fn info(&self) -> DeviceInfo {
        self.info
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        check_range(&self.info, offset, buf.len() as u64)?;
        let (res, buf) = self.engine.read_at(&self.file, offset, buf).await;
        res.map_err(BlockError::from_io)?;
        Ok(buf)
    }

    async fn write(&self, offset: u64, data: IoBuf, flags: WriteFlags) -> Result<()> {
        check_write(&self.info, offset, data.len() as u64)?;
        let (res, _) = self
            .engine
            .write_at(&self.file, offset, data, flags.fua)
            .await;
        res.map_err(BlockError::from_io)
    }

    async fn flush(&self) -> Result<()> {
        if self.info.read_only {
            return Ok(());
        }
        self.engine
            .fdatasync(&self.file)
            .await
            .map_err(BlockError::from_io)
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_write(&self.info, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.zero_range(offset, len, true).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        flags: WriteFlags,
    ) -> Result<()> {
        check_write(&self.info, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.zero_range(offset, len, may_trim).await?;
        if flags.fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(&self.info, offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || map_extents(&file, offset, offset + len))
            .await
            .map_err(|e| BlockError::Other(format!("block_status task failed: {e}")))?
    }
}

/// One `lseek(SEEK_DATA/SEEK_HOLE)`; `Ok(None)` for `ENXIO` (no data/hole at or after `pos` before end of file).
fn seek(file: &File, pos: u64, whence: i32) -> io::Result<Option<u64>> {
    let Ok(off) = libc::off_t::try_from(pos) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: the fd is owned by `file`, which is borrowed for the whole call; lseek takes no pointers. Moving
    // the file position is harmless because all I/O on this file is positional.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// Describe `[start, end)` (512-aligned) as data and hole extents.
///
/// Boundaries are rounded to 512 bytes towards "data" (a partially allocated block is reported as data), so
/// extents always satisfy the device's alignment. Filesystems without SEEK_DATA support report everything as
/// data, which is always a safe answer.
fn map_extents(file: &File, start: u64, end: u64) -> Result<Vec<Extent>> {
    let bs = u64::from(BLOCK_SIZE);
    let mut out: Vec<Extent> = Vec::new();
    let mut push = |offset: u64, stop: u64, kind: ExtentKind| {
        if stop <= offset {
            return;
        }
        match out.last_mut() {
            Some(last) if last.kind == kind && last.offset + last.length == offset => {
                last.length += stop - offset
            }
            _ => out.push(Extent {
                offset,
                length: stop - offset,
                kind,
            }),
        }
    };
    let mut pos = start;
    while pos < end {
        let data = match seek(file, pos, libc::SEEK_DATA) {
            Ok(Some(d)) => d,
            Ok(None) => end, // only a hole from here to the end of the file
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                push(pos, end, ExtentKind::Data);
                break;
            }
            Err(e) => return Err(BlockError::from_io(e)),
        };
        let data = (data - data % bs).clamp(pos, end);
        if data > pos {
            push(pos, data, ExtentKind::Hole);
            pos = data;
            continue;
        }
        let hole = match seek(file, pos, libc::SEEK_HOLE) {
            Ok(Some(h)) => h,
            Ok(None) => end,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => end,
            Err(e) => return Err(BlockError::from_io(e)),
        };
        // Round up, and always make progress even if the filesystem says "hole here".
        let hole = hole.div_ceil(bs).saturating_mul(bs).clamp(pos + bs, end);
        push(pos, hole, ExtentKind::Data);
        pos = hole;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uring::IoEngineConfig;

    fn engine() -> IoEngine {
        IoEngine::new(IoEngineConfig::default()).unwrap()
    }

    fn make(dir: &tempfile::TempDir, size: u64, read_only: bool) -> FileDevice {
        let path = dir.path().join("disk.raw");
        if !path.exists() {
            File::create(&path).unwrap().set_len(size).unwrap();
        }
        FileDevice::open(&path, read_only, engine()).unwrap()
    }

    fn fill(len: usize, byte: u8) -> IoBuf {
        IoBuf::from_slice(&vec![byte; len])
    }

    #[tokio::test]
    async fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let dev = make(&dir, 4 << 20, false);
        assert_eq!(dev.size(), 4 << 20);
        assert_eq!(dev.block_size(), 512);
        eprintln!("O_DIRECT: {}", dev.is_direct());
        dev.write(512, fill(8192, 0x5a), WriteFlags::default())
            .await
            .unwrap();
        dev.write(65536, fill(4096, 0x11), WriteFlags::FUA)
            .await
            .unwrap();
        dev.flush().await.unwrap();
        let got = dev.read(0, IoBuf::zeroed(69632)).await.unwrap();
        assert!(got[..512].iter().all(|&b| b == 0));
        assert!(got[512..8704].iter().all(|&b| b == 0x5a));
        assert!(got[8704..65536].iter().all(|&b| b == 0));
        assert!(got[65536..].iter().all(|&b| b == 0x11));
    }

    #[tokio::test]
    async fn range_and_alignment_errors() {
        let dir = tempfile::tempdir().unwrap();
        let dev = make(&dir, 1 << 20, false);
        let oob = dev.read(1 << 20, IoBuf::zeroed(512)).await;
        assert!(matches!(oob, Err(BlockError::OutOfRange { .. })));
        let oob = dev
            .write((1 << 20) - 512, fill(1024, 1), WriteFlags::default())
            .await;
        assert!(matches!(oob, Err(BlockError::OutOfRange { .. })));
        let mis = dev.read(100, IoBuf::zeroed(512)).await;
        assert!(matches!(mis, Err(BlockError::Misaligned { .. })));
        let mis = dev.write(0, fill(100, 1), WriteFlags::default()).await;
        assert!(matches!(mis, Err(BlockError::Misaligned { .. })));
        assert!(matches!(
            dev.discard(0, 100).await,
            Err(BlockError::Misaligned { .. })
        ));
        assert!(matches!(
            dev.block_status(1 << 20, 512).await,
            Err(BlockError::OutOfRange { .. })
        ));
        // The file never grew.
        assert_eq!(std::fs::metadata(dev.path()).unwrap().len(), 1 << 20);
    }

    #[tokio::test]
    async fn unaligned_file_size_rounds_down() {
        let dir = tempfile::tempdir().unwrap();
        let dev = make(&dir, 1000, false);
        assert_eq!(dev.size(), 512);
    }

    #[tokio::test]
    async fn read_only_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        drop(make(&dir, 1 << 20, false));
        let dev = make(&dir, 1 << 20, true);
        assert!(dev.read_only());
        assert!(matches!(
            dev.write(0, fill(512, 1), WriteFlags::default()).await,
            Err(BlockError::ReadOnly)
        ));
        assert!(matches!(
            dev.discard(0, 512).await,
            Err(BlockError::ReadOnly)
        ));
        assert!(matches!(
            dev.write_zeroes(0, 512, true, WriteFlags::default()).await,
            Err(BlockError::ReadOnly)
        ));
        dev.read(0, IoBuf::zeroed(512)).await.unwrap();
        dev.flush().await.unwrap();
    }

    #[tokio::test]
    async fn discard_reads_zero_and_shows_hole() {
        let dir = tempfile::tempdir().unwrap();
        let dev = make(&dir, 4 << 20, false);
        dev.write(0, fill(4 << 20, 0x77), WriteFlags::default())
            .await
            .unwrap();
        let ext = dev.block_status(0, 4 << 20).await.unwrap();
        assert_eq!(
            ext,
            vec![Extent {
                offset: 0,
                length: 4 << 20,
                kind: ExtentKind::Data
            }]
        );

        dev.discard(1 << 20, 1 << 20).await.unwrap();
        let got = dev.read(0, IoBuf::zeroed(4 << 20)).await.unwrap();
        assert!(got[..1 << 20].iter().all(|&b| b == 0x77));
        assert!(got[1 << 20..2 << 20].iter().all(|&b| b == 0));
        assert!(got[2 << 20..].iter().all(|&b| b == 0x77));

        let ext = dev.block_status(0, 4 << 20).await.unwrap();
        assert_eq!(
            ext,
            vec![
                Extent {
                    offset: 0,
                    length: 1 << 20,
                    kind: ExtentKind::Data
                },
                Extent {
                    offset: 1 << 20,
                    length: 1 << 20,
                    kind: ExtentKind::Hole
                },
                Extent {
                    offset: 2 << 20,
                    length: 2 << 20,
                    kind: ExtentKind::Data
                },
            ]
        );
        // A query inside the hole, and one that starts in it.
        let ext = dev.block_status((1 << 20) + 4096, 8192).await.unwrap();
        assert_eq!(
            ext,
            vec![Extent {
                offset: (1 << 20) + 4096,
                length: 8192,
                kind: ExtentKind::Hole
            }]
        );
        let ext = dev.block_status((2 << 20) - 4096, 8192).await.unwrap();
        assert_eq!(ext.len(), 2);
        assert_eq!(ext[0].kind, ExtentKind::Hole);
        assert_eq!(
            ext[1],
            Extent {
                offset: 2 << 20,
                length: 4096,
                kind: ExtentKind::Data
            }
        );
    }

    #[tokio::test]
    async fn sparse_file_is_a_hole() {
        let dir = tempfile::tempdir().unwrap();
        let dev = make(&dir, 1 << 20, false);
        let ext = dev.block_status(0, 1 << 20).await.unwrap();
        assert_eq!(
            ext,
            vec![Extent {
                offset: 0,
                length: 1 << 20,
                kind: ExtentKind::Hole
            }]
        );
        assert!(dev.block_status(0, 0).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn write_zeroes_modes() {
        let dir = tempfile::tempdir().unwrap();
        let dev = make(&dir, 2 << 20, false);
        dev.write(0, fill(2 << 20, 0x33), WriteFlags::default())
            .await
            .unwrap();
        dev.write_zeroes(4096, 8192, false, WriteFlags::default())
            .await
            .unwrap();
        dev.write_zeroes(1 << 20, 65536, true, WriteFlags::FUA)
            .await
            .unwrap();
        dev.write_zeroes(0, 0, false, WriteFlags::default())
            .await
            .unwrap();
        let got = dev.read(0, IoBuf::zeroed(2 << 20)).await.unwrap();
        for (i, &b) in got.iter().enumerate() {
            let zero = (4096..12288).contains(&i) || ((1 << 20)..(1 << 20) + 65536).contains(&i);
            assert_eq!(b, if zero { 0 } else { 0x33 }, "byte {i}");
        }
        // The fallback path (as if the filesystem refused both fallocate modes) zeroes the same way.
        dev.no_punch.store(true, Ordering::Relaxed);
        dev.no_zero_range.store(true, Ordering::Relaxed);
        dev.write_zeroes(65536, 3 << 19, true, WriteFlags::default())
            .await
            .unwrap();
        let got = dev.read(65536, IoBuf::zeroed(3 << 19)).await.unwrap();
        assert!(got.iter().all(|&b| b == 0));
        let got = dev
            .read((3 << 19) + 65536, IoBuf::zeroed(4096))
            .await
            .unwrap();
        assert!(got.iter().all(|&b| b == 0x33));
    }

    #[tokio::test]
    async fn works_on_fallback_engine() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fb.raw");
        File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let dev = FileDevice::open(
            &path,
            false,
            IoEngine::new_fallback(IoEngineConfig::default()).unwrap(),
        )
        .unwrap();
        dev.write(4096, fill(4096, 9), WriteFlags::FUA)
            .await
            .unwrap();
        dev.discard(0, 4096).await.unwrap();
        assert!(dev
            .read(4096, IoBuf::zeroed(4096))
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 9));
    }

    #[test]
    fn open_missing_file_fails() {
        let dir = tempfile::tempdir().unwrap();
        assert!(FileDevice::open(dir.path().join("nope"), false, engine()).is_err());
        assert!(FileDevice::open(dir.path(), true, engine()).is_err());
    }
}
