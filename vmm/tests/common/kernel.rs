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

/// An initramfs (newc cpio) holding `/dev/console` and `init` (the freestanding `guest/init.c`).
pub fn build_initramfs() -> Result<PathBuf, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/init.c");
    let out = super::out_dir();
    let init = out.join("init");
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
        .arg(&init)
        .arg(&src)
        .status()
        .map_err(|e| format!("gcc: {e}"))?;
    if !st.success() {
        return Err("gcc failed building init".into());
    }
    let init_bytes = std::fs::read(&init).map_err(|e| e.to_string())?;
    let mut cpio = Vec::new();
    let mut ino = 1;
    let mut entry = |name: &str, mode: u32, rdev: (u32, u32), data: &[u8]| {
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            ino,
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
        ino += 1;
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
    };
    entry("dev", 0o040755, (0, 0), &[]);
    entry("dev/console", 0o020600, (5, 1), &[]);
    entry("init", 0o100755, (0, 0), &init_bytes);
    entry("TRAILER!!!", 0, (0, 0), &[]);
    let path = out.join("initramfs.cpio");
    std::fs::write(&path, cpio).map_err(|e| e.to_string())?;
    Ok(path)
}
