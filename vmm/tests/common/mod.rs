//! Shared test helpers: building the freestanding test guest with gcc, and a file-backed `BlockDevice`.
#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use async_trait::async_trait;
use shale_block::device::{check_range, check_write};
use shale_block::{BlockDevice, DeviceInfo, Extent, ExtentKind, IoBuf, Result, WriteFlags};

/// Where built guests go.
pub fn out_dir() -> PathBuf {
    let base = option_env!("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let d = base.join("shale-vmm-guests");
    std::fs::create_dir_all(&d).expect("guest output dir");
    d
}

/// Compile `vmm/guest/<name>.c` (+ start.S, lib.c) into a flat binary and return its path.
pub fn build_guest(name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest");
    let out = out_dir();
    let elf = out.join(format!("{name}.elf"));
    let bin = out.join(format!("{name}.bin"));
    let status = Command::new("gcc")
        .args([
            "-ffreestanding",
            "-nostdlib",
            "-static",
            "-fno-pic",
            "-no-pie",
            "-fno-stack-protector",
            "-fno-asynchronous-unwind-tables",
            "-mno-red-zone",
            "-mgeneral-regs-only",
            "-O2",
            "-Wall",
            "-Werror",
            "-Wl,--build-id=none",
        ])
        .arg("-T")
        .arg(src.join("guest.ld"))
        .arg("-o")
        .arg(&elf)
        .arg(src.join("start.S"))
        .arg(src.join("lib.c"))
        .arg(src.join(format!("{name}.c")))
        .status()
        .expect("running gcc (needed to build the test guest)");
    assert!(status.success(), "gcc failed building guest {name}");
    let status = Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(&elf)
        .arg(&bin)
        .status()
        .expect("objcopy");
    assert!(status.success(), "objcopy failed for guest {name}");
    bin
}

/// True when /dev/kvm can be opened; tests skip (with a message) otherwise.
pub fn kvm_available() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIP: /dev/kvm not usable here ({e})");
            false
        }
    }
}

/// A raw file as a `BlockDevice`, with plain positioned syscalls (a stand-in for shale_block's FileDevice in
/// these tests; its I/O is synchronous, which is fine at test sizes).
pub struct TestFileDisk {
    file: std::fs::File,
    info: DeviceInfo,
}

impl TestFileDisk {
    /// A `size`-byte disk in a new file at `path`.
    pub fn create(path: &Path, size: u64, read_only: bool) -> Arc<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .expect("create disk file");
        file.set_len(size).expect("size disk file");
        Arc::new(TestFileDisk {
            file,
            info: DeviceInfo {
                size,
                block_size: 512,
                preferred_block_size: 4096,
                read_only,
                can_trim: true,
                can_fast_zero: true,
                can_multi_conn: true,
            },
        })
    }

    /// Read bytes directly from the file (host-side verification).
    pub fn read_at(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.file
            .read_exact_at(&mut v, offset)
            .expect("read disk file");
        v
    }

    /// Write bytes directly to the file (host-side setup).
    pub fn write_at(&self, offset: u64, data: &[u8]) {
        self.file
            .write_all_at(data, offset)
            .expect("write disk file");
    }
}

#[async_trait]
impl BlockDevice for TestFileDisk {
    fn info(&self) -> DeviceInfo {
        self.info
    }
    async fn read(&self, offset: u64, mut buf: IoBuf) -> Result<IoBuf> {
        check_range(&self.info, offset, buf.len() as u64)?;
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
    async fn write(&self, offset: u64, data: IoBuf, flags: WriteFlags) -> Result<()> {
        check_write(&self.info, offset, data.len() as u64)?;
        self.file.write_all_at(&data, offset)?;
        if flags.fua {
            self.file.sync_data()?;
        }
        Ok(())
    }
    async fn flush(&self) -> Result<()> {
        self.file.sync_data()?;
        Ok(())
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_write(&self.info, offset, len)?;
        self.file.write_all_at(&vec![0u8; len as usize], offset)?;
        Ok(())
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _may_trim: bool,
        _flags: WriteFlags,
    ) -> Result<()> {
        self.discard(offset, len).await
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(&self.info, offset, len)?;
        Ok(vec![Extent {
            offset,
            length: len,
            kind: ExtentKind::Data,
        }])
    }
}

/// The guests' sector pattern (must match `pattern()` in guest/lib.c).
pub fn pattern(sector: u64, i: u32) -> u8 {
    (sector
        .wrapping_mul(7)
        .wrapping_add(u64::from(i) * 13)
        .wrapping_add(1)) as u8
}

/// `sectors` sectors of the pattern starting at `sector`.
pub fn pattern_bytes(sector: u64, sectors: u64) -> Vec<u8> {
    let mut v = Vec::new();
    for s in sector..sector + sectors {
        for i in 0..512 {
            v.push(pattern(s, i));
        }
    }
    v
}
