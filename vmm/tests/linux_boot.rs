//! The Linux boot path with Debian's cloud kernel (downloaded at test time; skipped with a message if
//! `apt-get download` fails).
//!
//! On this project's kvm_pvm hosts guest code outside PVM's paravirtual mode is emulated, so a stock kernel
//! runs slowly and stops at the first instruction KVM's emulator cannot run (it gets through early setup_arch,
//! memory init and console setup, then fails on an `int3`-patched site). What we test here is therefore the
//! boot *path*: ELF and bzImage loading, the 64-bit entry, `boot_params` (command line, e820) and the serial
//! console. A full boot to userspace needs hardware virtualization (vmx/svm) and is skipped elsewhere.

mod common;

use std::time::Duration;

use shale_vmm::{BootSource, CpuidPolicy, Vm, VmConfig};

fn kernel() -> Option<std::path::PathBuf> {
    match common::kernel::debian_cloud_kernel() {
        Ok(k) => Some(k),
        Err(e) => {
            eprintln!("SKIP: cannot get Debian's cloud kernel ({e})");
            None
        }
    }
}

fn boot_until(
    kernel: std::path::PathBuf,
    cmdline: &str,
    needles: &[&str],
    timeout: Duration,
) -> (bool, String) {
    let mut cfg = VmConfig::new(
        "linux-boot",
        256 << 20,
        BootSource::Linux {
            kernel,
            initrd: None,
            cmdline: cmdline.into(),
        },
    );
    cfg.cpuid = CpuidPolicy::for_host();
    let mut vm = Vm::new(cfg).expect("create VM");
    vm.start().expect("start");
    let console = vm.console();
    let seen = needles.iter().all(|n| console.wait_for(n, timeout));
    vm.stop();
    let exit = vm.wait();
    let text = console.text();
    println!("exit: {exit:?}\nconsole:\n{text}");
    (seen, text)
}

/// The uncompressed vmlinux (ELF, 64-bit entry with boot_params): the banner and our command line and e820
/// map must appear on the serial early console.
#[test]
fn debian_kernel_prints_banner_on_early_console() {
    if !common::kvm_available() {
        return;
    }
    let Some(bz) = kernel() else { return };
    let vmlinux = common::kernel::extract_vmlinux(&bz).expect("extract vmlinux");
    let (seen, text) = boot_until(
        vmlinux,
        "earlyprintk=serial,ttyS0,115200 console=ttyS0 nokaslr shale-marker",
        &[
            "Linux version",
            "Command line:",
            "shale-marker",
            "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
        ],
        Duration::from_secs(180),
    );
    assert!(
        seen,
        "kernel banner/command line/e820 did not appear; console:\n{text}"
    );
}

/// The compressed bzImage through linux-loader's bzImage loader and the 64-bit entry at +0x200: its
/// decompressor parses our command line and talks on the serial port. (Decompressing takes minutes under an
/// emulating KVM, so we stop at the decompressor's first message.)
#[test]
fn debian_bzimage_decompressor_runs() {
    if !common::kvm_available() {
        return;
    }
    let Some(bz) = kernel() else { return };
    let (seen, text) = boot_until(
        bz,
        "earlyprintk=serial,ttyS0,115200 console=ttyS0 nokaslr",
        &["KASLR disabled: 'nokaslr' on cmdline."],
        Duration::from_secs(180),
    );
    assert!(
        seen,
        "bzImage decompressor did not report; console:\n{text}"
    );
}
