//! The Linux boot path with Debian's cloud kernel (downloaded at test time; skipped with a message if
//! `apt-get download` fails).
//!
//! On this project's kvm_pvm hosts guest code outside PVM's paravirtual mode is emulated, so a stock kernel
//! runs slowly and stops at the first instruction KVM's emulator cannot run (it gets through early setup_arch,
//! memory init and console setup, then fails on an `int3`-patched site). What we test here is therefore the
//! boot *path*: ELF and bzImage loading, the 64-bit entry, `boot_params` (command line, e820), the serial
//! console, and the ACPI tables that describe the vCPUs, the IOAPIC and the virtio-mmio disks (the kernel
//! validates and lists them early in `setup_arch`). A full boot to userspace needs hardware virtualization
//! (vmx/svm) and is skipped elsewhere.

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
    boot_until_with(kernel, initrd, cmdline, needles, timeout, true)
}

fn boot_until_with(
    kernel: std::path::PathBuf,
    initrd: Option<std::path::PathBuf>,
    cmdline: &str,
    needles: &[&str],
    timeout: Duration,
    acpi: bool,
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
    cfg.acpi = acpi;
    // One disk, so the DSDT (or, without ACPI, the command line) carries a virtio-mmio device.
    let dir = tempfile::tempdir().expect("tempdir");
    cfg.disks.push(shale_vmm::vm::Disk {
        device: common::file_disk(&dir.path().join("disk.raw"), 1 << 20, false),
        read_only: false,
        serial: "linux-boot".into(),
    });
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

/// The uncompressed vmlinux (ELF, 64-bit entry with boot_params): the banner, our command line, our e820 map,
/// the initrd we placed and our ACPI tables (RSDP where `acpi_rsdp_addr` points, XSDT, FADT, a DSDT holding the
/// disk's device, MADT) must appear on the serial early console.
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
            "ACPI: RSDP 0x00000000000E0000 000024 (v02 SHALE )",
            "ACPI: XSDT 0x",
            "ACPI: FACP 0x",
            "ACPI: DSDT 0x",
            "ACPI: APIC 0x",
        ],
        Duration::from_secs(180),
    );
    assert!(
        seen,
        "kernel banner/command line/e820 did not appear; console:\n{text}"
    );
}

/// With ACPI off (`VmConfig::acpi`, `shale vm create/run --no-acpi`), the disk is described on the kernel's
/// command line instead, and no ACPI tables are offered.
#[test]
fn debian_kernel_without_acpi_gets_the_disk_on_its_command_line() {
    if !common::kvm_available() {
        return;
    }
    let Some(bz) = kernel() else { return };
    let vmlinux = common::kernel::extract_vmlinux(&bz).expect("extract vmlinux");
    let (seen, text) = boot_until_with(
        vmlinux,
        None,
        "earlyprintk=serial,ttyS0,115200 console=ttyS0 nokaslr",
        &["Command line:", "virtio_mmio.device=4K@0x", "BIOS-e820:"],
        Duration::from_secs(180),
        false,
    );
    assert!(
        seen,
        "command line with the disk did not appear; console:\n{text}"
    );
    assert!(
        !text.contains("ACPI: RSDP 0x00000000000E0000"),
        "ACPI tables offered with ACPI off; console:\n{text}"
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

/// Full boot to userspace with a virtio-blk root disk: Debian's kernel finds the disk through our ACPI DSDT,
/// the initramfs's PID 1 loads the virtio modules (Debian builds them as modules), mounts `/dev/vda` (ext4, made
/// on the host with `mke2fs -d`) as the root and execs `/sbin/init` from it; that prints the disk's marker,
/// writes a file, syncs and exits through the debug port. The host then reads the guest's file out of the image.
/// Needs hardware virtualization; on kvm_pvm hosts the emulated kernel cannot get that far (there the ACPI
/// tables are checked by `debian_kernel_prints_banner_on_early_console` instead).
#[test]
fn full_boot_to_virtio_blk_root_on_hardware_virtualization() {
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
    let marker = format!("shale-root-{}", std::process::id());
    let (initrd, image) =
        common::kernel::build_root_boot(&marker).expect("initramfs and root image");
    let engine = shale_block::uring::IoEngine::new(Default::default()).expect("engine");
    let disk = std::sync::Arc::new(
        shale_block::file::FileDevice::open(&image, false, engine).expect("open root image"),
    );
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
    cfg.disks.push(shale_vmm::vm::Disk {
        device: disk,
        read_only: false,
        serial: "root".into(),
    });
    let vm = Vm::new(cfg).expect("create VM");
    vm.start().expect("start");
    let exit = vm.wait_timeout(Duration::from_secs(180));
    if exit.is_none() {
        vm.stop();
        vm.wait();
    }
    let text = vm.console().text();
    println!("exit: {exit:?}\nconsole:\n{text}");
    drop(vm);
    assert!(
        text.contains(&format!("SHALE-ROOT-OK {marker}")),
        "userspace on the virtio-blk root did not report; console:\n{text}"
    );
    assert_eq!(exit, Some(shale_vmm::VmExit::GuestExit(0)));
    let from_guest = common::kernel::ext4_cat(&image, "/from-guest").expect("debugfs");
    assert!(
        from_guest.contains("written by the guest on its virtio-blk root"),
        "the guest's write is not in the image: {from_guest:?}"
    );
}

/// The pieces of the virtio-blk root test that do not need hardware: the two-stage init compiles, the
/// initramfs carries the kernel's virtio modules, and the ext4 root image holds `/sbin/init` and the marker.
#[test]
fn virtio_blk_root_images_build() {
    if kernel().is_none() {
        return;
    }
    let (initrd, image) = common::kernel::build_root_boot("marker-xyz").expect("build");
    let cpio = std::fs::read(&initrd).expect("initramfs");
    for m in [
        "modules/virtio_ring.ko",
        "modules/virtio.ko",
        "modules/virtio_mmio.ko",
        "modules/virtio_blk.ko",
    ] {
        assert!(
            cpio.windows(m.len()).any(|w| w == m.as_bytes()),
            "{m} missing from the initramfs"
        );
    }
    assert_eq!(
        common::kernel::ext4_cat(&image, "/marker").expect("debugfs"),
        "marker-xyz"
    );
    let init = common::kernel::ext4_cat(&image, "/sbin/init").expect("debugfs");
    assert!(
        init.as_bytes().starts_with(b"\x7fELF"),
        "/sbin/init is not the ELF init"
    );
}
