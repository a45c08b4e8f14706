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
    initrd: Option<std::path::PathBuf>,
    cmdline: &str,
    needles: &[&str],
    timeout: Duration,
) -> (bool, String) {
    let mut cfg = VmConfig::new(
        "linux-boot",
        256 << 20,
        BootSource::Linux {
            kernel,
            initrd,
            cmdline: cmdline.into(),
        },
    );
    cfg.cpuid = CpuidPolicy::for_host();
    let vm = Vm::new(cfg).expect("create VM");
    vm.start().expect("start");
    let console = vm.console();
    let seen = needles.iter().all(|n| console.wait_for(n, timeout));
    vm.stop();
    let exit = vm.wait();
    let text = console.text();
    println!("exit: {exit:?}\nconsole:\n{text}");
    (seen, text)
}

/// The uncompressed vmlinux (ELF, 64-bit entry with boot_params): the banner, our command line, our e820 map
/// and the initrd we placed must appear on the serial early console.
#[test]
fn debian_kernel_prints_banner_on_early_console() {
    if !common::kvm_available() {
        return;
    }
    let Some(bz) = kernel() else { return };
    let vmlinux = common::kernel::extract_vmlinux(&bz).expect("extract vmlinux");
    let initrd = common::kernel::build_initramfs().expect("initramfs");
    let (seen, text) = boot_until(
        vmlinux,
        Some(initrd),
        "earlyprintk=serial,ttyS0,115200 console=ttyS0 nokaslr shale-marker",
        &[
            "Linux version",
            "RAMDISK: [mem ",
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
        None,
        "earlyprintk=serial,ttyS0,115200 console=ttyS0 nokaslr",
        &["KASLR disabled: 'nokaslr' on cmdline."],
        Duration::from_secs(180),
    );
    assert!(
        seen,
        "bzImage decompressor did not report; console:\n{text}"
    );
}

/// Full boot to userspace: kernel, initramfs, PID 1 prints a marker and exits the VM through the debug port.
/// Needs hardware virtualization; on kvm_pvm hosts the emulated kernel cannot get that far.
///
/// Debian's cloud kernel builds virtio-mmio as a module without `VIRTIO_MMIO_CMDLINE_DEVICES`, so it cannot
/// find `virtio_mmio.device=` disks; a virtio-blk root disk needs a kernel with that option (or ACPI device
/// tables, which Shale does not write yet). This test therefore boots from an initramfs.
#[test]
fn full_boot_to_userspace_on_hardware_virtualization() {
    if !common::kvm_available() {
        return;
    }
    if !std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.split_whitespace().any(|w| w == "vmx" || w == "svm"))
        .unwrap_or(false)
    {
        eprintln!(
            "SKIP: full Linux boot needs hardware virtualization (no vmx/svm in /proc/cpuinfo: this KVM emulates \
             guest code and a stock kernel stops in early boot)"
        );
        return;
    }
    let Some(bz) = kernel() else { return };
    let vmlinux = common::kernel::extract_vmlinux(&bz).expect("extract vmlinux");
    let initrd = common::kernel::build_initramfs().expect("initramfs");
    let mut cfg = VmConfig::new(
        "linux-full",
        512 << 20,
        BootSource::Linux {
            kernel: vmlinux,
            initrd: Some(initrd),
            cmdline: "console=ttyS0 rdinit=/init panic=-1 reboot=k".into(),
        },
    );
    cfg.cpuid = CpuidPolicy::for_host();
    let vm = Vm::new(cfg).expect("create VM");
    vm.start().expect("start");
    let exit = vm.wait_timeout(Duration::from_secs(120));
    if exit.is_none() {
        vm.stop();
        vm.wait();
    }
    let text = vm.console().text();
    println!("exit: {exit:?}\nconsole:\n{text}");
    assert!(
        text.contains("SHALE-USERSPACE-OK"),
        "init did not run; console:\n{text}"
    );
    assert_eq!(exit, Some(shale_vmm::VmExit::GuestExit(0)));
}
