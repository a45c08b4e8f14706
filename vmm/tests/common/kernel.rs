//! Getting a Debian cloud kernel for the Linux boot tests: `apt-get download` + `dpkg -x` into a cache dir, and
//! extracting the uncompressed `vmlinux` ELF from the bzImage (its payload is LZ4 "legacy" frames), because
//! running the kernel's own decompressor under an emulating KVM (kvm_pvm) takes minutes.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The cache directory ($HOME/.cache/shale-vmm-kernel or a temp dir).
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("HOME")
        .map(PathBuf::from)
        .map(|h| h.join(".cache"))
        .unwrap_or_else(std::env::temp_dir);
    let d = base.join("shale-vmm-kernel");
    std::fs::create_dir_all(&d).expect("kernel cache dir");
    d
}

/// Download and unpack Debian's cloud kernel; returns the bzImage path, or why it is unavailable.
pub fn debian_cloud_kernel() -> Result<PathBuf, String> {
    let dir = cache_dir();
    let root = dir.join("root");
    if let Some(k) = find_vmlinuz(&root) {
        return Ok(k);
    }
    // The metapackage only depends on the versioned image package; resolve it first.
    let deps = Command::new("apt-cache")
        .args(["depends", "linux-image-cloud-amd64"])
        .output()
        .map_err(|e| format!("apt-cache: {e}"))?;
    let text = String::from_utf8_lossy(&deps.stdout);
    let pkg = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .ok_or_else(|| {
            "apt-cache knows no linux-image-cloud-amd64 (run apt-get update?)".to_string()
        })?
        .to_string();
    let st = Command::new("apt-get")
        .args(["download", &pkg])
        .current_dir(&dir)
        .status()
        .map_err(|e| format!("apt-get: {e}"))?;
    if !st.success() {
        return Err(format!("apt-get download {pkg} failed"));
    }
    let deb = std::fs::read_dir(&dir)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or("no .deb after apt-get download")?;
    let st = Command::new("dpkg")
        .arg("-x")
        .arg(&deb)
        .arg(&root)
        .status()
        .map_err(|e| format!("dpkg: {e}"))?;
    if !st.success() {
        return Err("dpkg -x failed".into());
    }
    find_vmlinuz(&root).ok_or_else(|| "no vmlinuz in the package".into())
}

fn find_vmlinuz(root: &Path) -> Option<PathBuf> {
    std::fs::read_dir(root.join("boot"))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
}

/// Extract `vmlinux` (ELF) from an LZ4-compressed bzImage into the cache; returns its path.
pub fn extract_vmlinux(bzimage: &Path) -> Result<PathBuf, String> {
    let out = bzimage.with_file_name("vmlinux.extracted");
    if out.exists() {
        return Ok(out);
    }
    let data = std::fs::read(bzimage).map_err(|e| e.to_string())?;
    let magic = [0x02, 0x21, 0x4c, 0x18];
    let mut start = 0;
    while let Some(pos) = data[start..].windows(4).position(|w| w == magic) {
        let at = start + pos;
        if let Ok(elf) = lz4_legacy(&data[at + 4..]) {
            if elf.starts_with(b"\x7fELF") {
                std::fs::write(&out, &elf).map_err(|e| e.to_string())?;
                return Ok(out);
            }
        }
        start = at + 1;
    }
    Err("no LZ4 payload with an ELF inside (kernel not LZ4-compressed?)".into())
}

fn lz4_legacy(mut input: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while input.len() >= 4 {
        let size = u32::from_le_bytes([input[0], input[1], input[2], input[3]]) as usize;
        if size == 0x184c_2102 || size > input.len() - 4 {
            break; // next frame or the trailing uncompressed-size word
        }
        lz4_block(&input[4..4 + size], &mut out)?;
        input = &input[4 + size..];
    }
    if out.is_empty() {
        Err("empty".into())
    } else {
        Ok(out)
    }
}

fn lz4_block(src: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    let base = out.len();
    let mut i = 0;
    let bad = || "corrupt LZ4 block".to_string();
    let read_len = |i: &mut usize, mut n: usize| -> Result<usize, String> {
        if n == 15 {
            loop {
                let b = *src.get(*i).ok_or_else(bad)?;
                *i += 1;
                n += b as usize;
                if b != 255 {
                    break;
                }
            }
        }
        Ok(n)
    };
    while i < src.len() {
        let token = src[i];
        i += 1;
        let lit = read_len(&mut i, (token >> 4) as usize)?;
        out.extend_from_slice(src.get(i..i + lit).ok_or_else(bad)?);
        i += lit;
        if i >= src.len() {
            break;
        }
        let off = u16::from_le_bytes([src[i], *src.get(i + 1).ok_or_else(bad)?]) as usize;
        i += 2;
        let mlen = read_len(&mut i, (token & 15) as usize)? + 4;
        if off == 0 || off > out.len() - base {
            return Err(bad());
        }
        let from = out.len() - off;
        for k in 0..mlen {
            let b = out[from + k];
            out.push(b);
        }
    }
    Ok(())
}

/// Compile a freestanding static program from `vmm/guest/NAME.c` into the test output dir.
fn build_static(name: &str) -> Result<PathBuf, String> {
    let src = super::manifest_dir().join(format!("guest/{name}.c"));
    let out = super::out_dir().join(name);
    let st = Command::new("gcc")
        .args([
            "-ffreestanding",
            "-nostdlib",
            "-static",
            "-no-pie",
            "-fno-pic",
            "-O2",
            "-o",
        ])
        .arg(&out)
        .arg(&src)
        .status()
        .map_err(|e| format!("gcc: {e}"))?;
    if !st.success() {
        return Err(format!("gcc failed building {name}"));
    }
    Ok(out)
}

/// One cpio member: name, mode, (rdev major, minor), contents.
type CpioEntry<'a> = (&'a str, u32, (u32, u32), Vec<u8>);

/// A newc cpio archive of `entries`.
fn cpio(entries: &[CpioEntry<'_>]) -> Vec<u8> {
    let mut cpio = Vec::new();
    let trailer = ("TRAILER!!!", 0u32, (0u32, 0u32), Vec::new());
    for (ino, (name, mode, rdev, data)) in
        entries.iter().chain(std::iter::once(&trailer)).enumerate()
    {
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            ino + 1,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        cpio.extend_from_slice(header.as_bytes());
        cpio.extend_from_slice(name.as_bytes());
        cpio.push(0);
        while cpio.len() % 4 != 0 {
            cpio.push(0);
        }
        cpio.extend_from_slice(data);
        while cpio.len() % 4 != 0 {
            cpio.push(0);
        }
    }
    cpio
}

/// An initramfs whose `/init` (vmm/guest/init.c) prints a marker and exits the VM through the debug port.
pub fn build_initramfs() -> Result<PathBuf, String> {
    let init = std::fs::read(build_static("init")?).map_err(|e| e.to_string())?;
    let archive = cpio(&[
        ("dev", 0o040755, (0, 0), Vec::new()),
        ("dev/console", 0o020600, (5, 1), Vec::new()),
        ("init", 0o100755, (0, 0), init),
    ]);
    let path = super::out_dir().join("initramfs.cpio");
    std::fs::write(&path, archive).map_err(|e| e.to_string())?;
    Ok(path)
}

/// For the virtio-blk root test: an initramfs with the kernel's virtio modules and stage 1 of
/// `vmm/guest/init_root.c`, and an ext4 image (built with `mke2fs -d`) holding the same program as
/// `/sbin/init` and a `/marker` file with `marker`. Returns (initramfs, disk image).
pub fn build_root_boot(marker: &str) -> Result<(PathBuf, PathBuf), String> {
    let init_path = build_static("init_root")?;
    let init = std::fs::read(&init_path).map_err(|e| e.to_string())?;
    let modules = cache_dir().join("root/lib/modules");
    let kdir = std::fs::read_dir(&modules)
        .map_err(|e| format!("{}: {e}", modules.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .next()
        .ok_or("no kernel modules directory")?;
    let mut entries = vec![
        ("dev", 0o040755, (0, 0), Vec::new()),
        ("dev/console", 0o020600, (5, 1), Vec::new()),
        ("modules", 0o040755, (0, 0), Vec::new()),
        ("newroot", 0o040755, (0, 0), Vec::new()),
        ("init", 0o100755, (0, 0), init),
    ];
    let names = [
        (
            "modules/virtio_ring.ko",
            "kernel/drivers/virtio/virtio_ring.ko",
        ),
        ("modules/virtio.ko", "kernel/drivers/virtio/virtio.ko"),
        (
            "modules/virtio_mmio.ko",
            "kernel/drivers/virtio/virtio_mmio.ko",
        ),
        (
            "modules/virtio_blk.ko",
            "kernel/drivers/block/virtio_blk.ko",
        ),
    ];
    for (name, rel) in names {
        let data = std::fs::read(kdir.join(rel)).map_err(|e| format!("{rel}: {e}"))?;
        entries.push((name, 0o100644, (0, 0), data));
    }
    let out = super::out_dir();
    let initramfs = out.join("initramfs-root.cpio");
    std::fs::write(&initramfs, cpio(&entries)).map_err(|e| e.to_string())?;

    let tree = out.join("rootfs");
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(tree.join("sbin")).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(tree.join("dev")).map_err(|e| e.to_string())?;
    std::fs::copy(&init_path, tree.join("sbin/init")).map_err(|e| e.to_string())?;
    std::fs::write(tree.join("marker"), marker).map_err(|e| e.to_string())?;
    let disk = out.join("root.ext4");
    let _ = std::fs::remove_file(&disk);
    let st = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&tree)
        .arg(&disk)
        .arg("64M")
        .status()
        .map_err(|e| format!("mke2fs: {e}"))?;
    if !st.success() {
        return Err("mke2fs -d failed".into());
    }
    Ok((initramfs, disk))
}

/// The contents of `path` inside the ext4 image `disk`, read on the host with `debugfs`.
pub fn ext4_cat(disk: &Path, path: &str) -> Result<String, String> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(disk)
        .output()
        .map_err(|e| format!("debugfs: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
