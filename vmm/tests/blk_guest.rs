//! End-to-end under real KVM: the freestanding test guest drives virtio-blk through virtio-mmio, and the host
//! then checks what landed on the disk through the `BlockDevice`.

mod common;

use std::time::Duration;

use shale_vmm::{BootSource, Disk, Vm, VmConfig, VmExit};

#[test]
fn guest_writes_flushes_reads_discards() {
    if !common::kvm_available() {
        return;
    }
    let guest = common::build_guest("blk_test");
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = common::file_disk(&dir.path().join("disk.raw"), 1 << 20, false);
    // Pre-fill the ranges the guest will discard/zero with junk the host can see go away.
    common::write_via(&*disk, 32 * 512, &[0x5a; 4096]);

    let mut cfg = VmConfig::new("blk-test", 64 << 20, BootSource::FlatBinary(guest));
    cfg.disks.push(Disk {
        device: disk.clone(),
        read_only: false,
        serial: "shale-test".into(),
    });
    let vm = Vm::new(cfg).expect("create VM");
    vm.start().expect("start VM");
    let exit = vm.wait_timeout(Duration::from_secs(120));
    let console = vm.console().text();
    println!("console:\n{console}");
    println!("stats: {:?}", vm.stats());
    assert_eq!(
        exit,
        Some(VmExit::GuestExit(0)),
        "guest failed; console:\n{console}"
    );
    assert!(console.contains("shale-guest: PASS"));

    // Host-side verification through the BlockDevice.
    assert_eq!(
        common::read_via(&*disk, 0, 4096),
        common::pattern_bytes(0, 8)
    );
    assert_eq!(
        common::read_via(&*disk, 64 * 512, 4096),
        common::pattern_bytes(64, 8)
    );
    assert_eq!(
        common::read_via(&*disk, 100 * 512, 512),
        common::pattern_bytes(100, 1)
    );
    assert!(
        common::read_via(&*disk, 16 * 512, 4096)
            .iter()
            .all(|&b| b == 0),
        "discarded range not zero"
    );
    assert!(
        common::read_via(&*disk, 32 * 512, 4096)
            .iter()
            .all(|&b| b == 0),
        "zeroed range not zero"
    );
    assert_eq!(
        common::read_via(&*disk, 24 * 512, 4096),
        common::pattern_bytes(24, 8)
    );
    let stats = vm.stats();
    assert_eq!(
        stats.disks[0].invalid, 4,
        "four refused requests (range, straddle, type, partial sector)"
    );
    assert!(
        stats.disks[0].notifications > 0,
        "notifications arrive via ioeventfd"
    );
}

#[test]
fn hostile_guest_gets_errors_and_resets_not_a_crash() {
    if !common::kvm_available() {
        return;
    }
    let guest = common::build_guest("hostile");
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = common::file_disk(&dir.path().join("disk.raw"), 1 << 20, false);
    let mut cfg = VmConfig::new("hostile", 64 << 20, BootSource::FlatBinary(guest));
    cfg.disks.push(Disk::new(disk.clone(), false));
    let vm = Vm::new(cfg).expect("create VM");
    vm.start().expect("start VM");
    let exit = vm.wait_timeout(Duration::from_secs(120));
    let console = vm.console().text();
    println!("console:\n{console}");
    let stats = vm.stats();
    println!("stats: {stats:?}");
    assert_eq!(
        exit,
        Some(VmExit::GuestExit(0)),
        "guest failed; console:\n{console}"
    );
    // The VMM is still alive and the data of the healthy requests landed.
    for sector in 1..=4u64 {
        assert_eq!(
            common::read_via(&*disk, sector * 512, 512),
            common::pattern_bytes(sector, 1)
        );
    }
    assert!(stats.disks[0].invalid >= 8, "malformed chains were refused");
    assert!(
        stats.disks[0].resets >= 3,
        "ring errors led to device resets"
    );
}

#[test]
fn two_disks_one_read_only_and_stop() {
    if !common::kvm_available() {
        return;
    }
    let guest = common::build_guest("multi");
    let dir = tempfile::tempdir().expect("tempdir");
    let vda = common::file_disk(&dir.path().join("vda.raw"), 1 << 20, false);
    let vdb_path = dir.path().join("vdb.raw");
    {
        let setup = common::file_disk(&vdb_path, 1 << 20, false);
        common::write_via(&*setup, 0, &common::pattern_bytes(0, 1));
    }
    let vdb = {
        let engine = shale_block::uring::IoEngine::new(Default::default()).expect("engine");
        std::sync::Arc::new(
            shale_block::file::FileDevice::open(&vdb_path, true, engine).expect("open ro"),
        )
    };
    let mut cfg = VmConfig::new("multi", 64 << 20, BootSource::FlatBinary(guest));
    cfg.disks.push(Disk::new(vda.clone(), false));
    cfg.disks.push(Disk::new(vdb, true));
    let vm = Vm::new(cfg).expect("create VM");
    vm.start().expect("start VM");
    let console = vm.console();
    let ok = console.wait_for("multi PASS", Duration::from_secs(60));
    assert_eq!(vm.state(), shale_vmm::VmState::Running);
    vm.stop();
    let exit = vm.wait_timeout(Duration::from_secs(10));
    println!("console:\n{}", console.text());
    assert!(ok, "guest failed: {}", console.text());
    assert_eq!(exit, Some(VmExit::Stopped));
    assert_eq!(
        common::read_via(&*vda, 5 * 512, 512),
        common::pattern_bytes(5, 1)
    );
    assert_eq!(vm.stats().disks[1].bytes_written, 0);
}
