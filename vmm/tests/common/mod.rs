//! Shared test helpers: building the freestanding test guest with gcc, and file-backed volumes.
#![allow(dead_code)]

pub mod kernel;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use shale_block::file::FileDevice;
use shale_block::uring::{IoEngine, IoEngineConfig};
use shale_block::{BlockDevice, IoBuf, WriteFlags};

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
    build_guest_with(name, &[])
}

/// This package's directory for the current run (set by cargo and nextest), falling back to the build's: a
/// test binary built from another checkout that shares the target directory must not read that checkout.
pub fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// Like [`build_guest`], with `-D` definitions (e.g. `["DEPTH=32"]`).
pub fn build_guest_with(name: &str, defines: &[&str]) -> PathBuf {
    let src = manifest_dir().join("guest");
    let out = out_dir();
    let tag: String = defines
        .iter()
        .map(|d| format!("-{}", d.replace('=', "_")))
        .collect();
    let elf = out.join(format!("{name}{tag}.elf"));
    let bin = out.join(format!("{name}{tag}.bin"));
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
        .args(defines.iter().map(|d| format!("-D{d}")))
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

/// A `size`-byte raw file at `path` served as a volume by shale-block's `FileDevice` on its own io_uring engine.
pub fn file_disk(path: &Path, size: u64, read_only: bool) -> Arc<FileDevice> {
    let f = std::fs::File::create(path).expect("create disk file");
    f.set_len(size).expect("size disk file");
    drop(f);
    let engine = IoEngine::new(IoEngineConfig::default()).expect("io engine");
    Arc::new(FileDevice::open(path, read_only, engine).expect("open FileDevice"))
}

/// Read through the `BlockDevice` (host-side verification of what the guest wrote).
pub fn read_via(dev: &dyn BlockDevice, offset: u64, len: usize) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(dev.read(offset, IoBuf::zeroed(len)))
        .expect("read through BlockDevice")
        .to_vec()
}

/// Write through the `BlockDevice` (host-side setup).
pub fn write_via(dev: &dyn BlockDevice, offset: u64, data: &[u8]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(dev.write(offset, IoBuf::from_slice(data), WriteFlags::default()))
        .expect("write through BlockDevice");
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
