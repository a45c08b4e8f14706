//! virtio-blk host-side cost with a guest that keeps many requests in flight.
//!
//! For each configuration the freestanding bench guest (`guest/bench.c`) pushes TOTAL 4 KiB requests through
//! one queue, DEPTH at a time, polling the used ring and notifying only when the device asks (EVENT_IDX or
//! NO_NOTIFY). We report, from the VMM's own counters: requests per guest notification, notifications per
//! worker wakeup, VMM exits per request (port/MMIO exits that reached userspace; ioeventfd notifications are
//! completed inside KVM and counted separately), interrupts, and wall-clock requests/s for the whole VM run.
//!
//! On kvm_pvm hosts (no VMX/SVM) the guest's own instructions are emulated at a few million per second, so
//! requests/s measures the emulated guest, not the device; the per-request ratios are meaningful everywhere.
//! Run: `cargo bench -p shale-vmm --bench blk_bench`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use shale_vmm::{BootSource, Disk, Vm, VmConfig, VmExit};

struct Row {
    name: String,
    total: u64,
    secs: f64,
    stats: shale_vmm::VmStats,
}

fn run(name: &str, defines: &[&str], total: u64) -> Option<Row> {
    let guest = common::build_guest_with("bench", defines);
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm")
    } else {
        tempfile::tempdir()
    }
    .expect("tempdir");
    let disk = common::file_disk(&dir.path().join("bench.raw"), 16 << 20, false);
    let mut cfg = VmConfig::new("bench", 64 << 20, BootSource::FlatBinary(guest));
    cfg.disks.push(Disk::new(disk, false));
    let vm = Vm::new(cfg).expect("create VM");
    let start = Instant::now();
    vm.start().expect("start");
    let exit = vm.wait_timeout(Duration::from_secs(300));
    let secs = start.elapsed().as_secs_f64();
    if exit != Some(VmExit::GuestExit(0)) {
        eprintln!("{name}: guest failed: {exit:?}\n{}", vm.console().text());
        return None;
    }
    Some(Row {
        name: name.into(),
        total,
        secs,
        stats: vm.stats(),
    })
}

fn main() {
    if !common::kvm_available() {
        return;
    }
    let hw = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.split_whitespace().any(|w| w == "vmx" || w == "svm"))
        .unwrap_or(false);
    let total = 4000u64;
    let t = format!("TOTAL={total}");
    let configs: Vec<(&str, Vec<String>)> = vec![
        (
            "write depth=1  event_idx",
            vec![
                "DEPTH=1".into(),
                "WRITE=1".into(),
                "EVENT_IDX=1".into(),
                t.clone(),
            ],
        ),
        (
            "write depth=32 event_idx",
            vec![
                "DEPTH=32".into(),
                "WRITE=1".into(),
                "EVENT_IDX=1".into(),
                t.clone(),
            ],
        ),
        (
            "write depth=32 no_notify",
            vec![
                "DEPTH=32".into(),
                "WRITE=1".into(),
                "EVENT_IDX=0".into(),
                t.clone(),
            ],
        ),
        (
            "read  depth=32 event_idx",
            vec![
                "DEPTH=32".into(),
                "WRITE=0".into(),
                "EVENT_IDX=1".into(),
                t.clone(),
            ],
        ),
        (
            "read  depth=64 event_idx",
            vec![
                "DEPTH=64".into(),
                "WRITE=0".into(),
                "EVENT_IDX=1".into(),
                t.clone(),
            ],
        ),
    ];
    println!(
        "virtio-blk bench: {total} x 4 KiB requests per row, FileDevice on {}; host {}",
        if std::path::Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "tmp"
        },
        if hw {
            "has VMX/SVM"
        } else {
            "has no VMX/SVM (kvm_pvm: guest code emulated; req/s is guest-bound)"
        }
    );
    println!(
        "{:<26} {:>9} {:>10} {:>11} {:>10} {:>12} {:>10}",
        "config", "req/s", "req/notif", "notif/wake", "exits/req", "intr/req", "setup-exits"
    );
    for (name, defs) in configs {
        let defs: Vec<&str> = defs.iter().map(String::as_str).collect();
        let Some(r) = run(name, &defs, total) else {
            continue;
        };
        let d = &r.stats.disks[0];
        let exits = r.stats.pio_exits + r.stats.mmio_exits;
        println!(
            "{:<26} {:>9.0} {:>10.2} {:>11.2} {:>10.3} {:>12.3} {:>10}",
            r.name,
            r.total as f64 / r.secs,
            d.requests as f64 / d.notifications.max(1) as f64,
            d.notifications as f64 / d.wakeups.max(1) as f64,
            (exits as f64) / d.requests.max(1) as f64,
            d.interrupts as f64 / d.requests.max(1) as f64,
            exits,
        );
        assert_eq!(
            d.requests, r.total,
            "{}: every request reached the device",
            r.name
        );
    }
    println!("exits/req counts VMM-visible exits over the whole run (device setup included, see setup-exits);");
    println!("each notification is one more guest exit, completed inside KVM by the ioeventfd.");
}
