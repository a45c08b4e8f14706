//! End-to-end: VMs run by the daemon (`shale vm ...`) whose disks are thin VDIs.
//!
//! The guest is the freestanding test program `tests/guest/vm_daemon.c` (with vmm/guest's start.S and lib.c),
//! built here with gcc. It writes a pattern, flushes, verifies, reports on the serial console, then keeps writing
//! two stamped blocks per generation. The host checks through the daemon: the data is in the VDI, a snapshot
//! taken while the VM runs is crash-consistent (a state the guest produced), the attached VDI cannot be
//! destroyed while the VM runs, a snapshot attaches read-only, and bad input fails with one clear line.
//! Under kvm_pvm (this project's hosts) the guest runs emulated; it is kept small so this takes seconds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use shale_tests::Daemon;

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// True when /dev/kvm can be opened; the KVM tests skip (with a message) otherwise.
fn kvm_available() -> bool {
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

/// Build `tests/guest/vm_daemon.c` into a flat binary in `dir` (same flags as vmm/tests/common).
fn build_guest(dir: &Path) -> PathBuf {
    let root = shale_tests::manifest_dir();
    let lib = root.join("../vmm/guest");
    let elf = dir.join("vm_daemon.elf");
    let bin = dir.join("vm_daemon.bin");
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
        .arg(format!("-I{}", lib.display()))
        .arg("-T")
        .arg(lib.join("guest.ld"))
        .arg("-o")
        .arg(&elf)
        .arg(lib.join("start.S"))
        .arg(lib.join("lib.c"))
        .arg(root.join("guest/vm_daemon.c"))
        .status()
        .expect("running gcc (needed to build the test guest)");
    assert!(status.success(), "gcc failed building the test guest");
    let status = Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(&elf)
        .arg(&bin)
        .status()
        .expect("objcopy");
    assert!(status.success(), "objcopy failed");
    bin
}

/// The guests' sector pattern (must match `pattern()` in vmm/guest/lib.c).
fn pattern_bytes(sector: u64, sectors: u64) -> Vec<u8> {
    let mut v = Vec::new();
    for s in sector..sector + sectors {
        for i in 0..512u64 {
            v.push((s.wrapping_mul(7).wrapping_add(i * 13).wrapping_add(1)) as u8);
        }
    }
    v
}

fn read_bytes(d: &Daemon, vdi: &str, offset: u64, length: u64) -> Vec<u8> {
    let out = Command::new(shale_tests::shale_bin())
        .arg("--socket")
        .arg(&d.socket)
        .args(["vdi", "read", vdi])
        .arg(format!("--offset={offset}"))
        .arg(format!("--length={length}"))
        .output()
        .expect("run vdi read");
    assert!(
        out.status.success(),
        "vdi read {vdi} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The 32-bit stamp a 4 KiB block holds, or None if the block is not one uniform stamp (torn).
fn stamp(block: &[u8]) -> Option<u32> {
    let words: Vec<u32> = block
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let first = *words.first()?;
    words.iter().all(|&w| w == first).then_some(first)
}

/// (a, b): the stamps at sectors 256 and 512, asserting the guest's invariant a == b or a == b + 1.
fn check_consistent(d: &Daemon, vdi: &str) -> (u32, u32) {
    let a = stamp(&read_bytes(d, vdi, 256 * 512, 4096));
    let b = stamp(&read_bytes(d, vdi, 512 * 512, 4096));
    let (Some(a), Some(b)) = (a, b) else {
        panic!("{vdi}: torn stamp block (a={a:?}, b={b:?})");
    };
    assert!(
        a == b || a == b + 1,
        "{vdi}: stamps a={a} b={b} are not a state the guest produced"
    );
    assert_eq!(
        read_bytes(d, vdi, 0, 4096),
        pattern_bytes(0, 8),
        "{vdi}: phase-1 data"
    );
    (a, b)
}

fn console(d: &Daemon, vm: &str) -> String {
    d.shale(["vm", "console", vm]).ok().stdout.clone()
}

/// Wait until the VM's console contains `needle` (failing on a guest FAIL line or after `secs`).
fn wait_console(d: &Daemon, vm: &str, needle: &str, secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let c = console(d, vm);
        if c.contains(needle) {
            return c;
        }
        assert!(!c.contains("FAIL"), "guest failed:\n{c}");
        assert!(
            Instant::now() < deadline,
            "no '{needle}' on {vm}'s console after {secs} s:\n{c}\n{}",
            d.shale(["vm", "show", vm]).stdout
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn show(d: &Daemon, vm: &str) -> Value {
    d.shale(["--json", "vm", "show", vm]).ok().json()
}

/// The last generation number the guest printed.
fn last_gen(console: &str) -> u64 {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("shale-guest: gen 0x"))
        .filter_map(|h| u64::from_str_radix(h.trim(), 16).ok())
        .max()
        .unwrap_or(0)
}

#[test]
fn vm_on_a_vdi_through_the_daemon() {
    if !kvm_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let guest = build_guest(tmp.path());
    let d = Daemon::start(&tmp.path().join("state"));

    d.shale(["vdi", "create", "--name", "disk1", "--size", "64M"])
        .ok();
    let vm = d
        .shale([
            "--json",
            "vm",
            "create",
            "--name",
            "t1",
            "--memory",
            "64M",
            "--vcpus",
            "1",
            "--flat",
            &s(&guest),
            "--disk",
            "disk1",
        ])
        .ok()
        .json();
    assert_eq!(vm["state"], "stopped");
    assert_eq!(vm["memory"], 64 << 20);
    assert_eq!(vm["disks"][0]["vdi_name"], "local/disk1");
    assert_eq!(vm["disks"][0]["read_only"], false);
    let list = d.shale(["vm", "list"]).ok().stdout.clone();
    assert!(list.contains("t1") && list.contains("stopped"), "{list}");
    // A second start while running, and the same name twice, are refused.
    d.shale([
        "vm",
        "create",
        "--name",
        "t1",
        "--memory",
        "64M",
        "--flat",
        &s(&guest),
    ])
    .fails_with(&["already exists"])
    .one_line_error();

    let started = d.shale(["--json", "vm", "start", "t1"]).ok().json();
    assert_eq!(started["state"], "running");
    d.shale(["vm", "start", "t1"])
        .fails_with(&["already running"])
        .one_line_error();
    // The running VM's disk keeps its SR attached.
    d.shale(["sr", "detach", "local"])
        .fails_with(&["in use", "'disk1' is open"])
        .one_line_error();
    wait_console(&d, "t1", "shale-guest: phase1 PASS", 120);
    // Let phase 2 run, then snapshot while the guest keeps writing.
    wait_console(&d, "t1", "shale-guest: gen 0x40", 120);
    let snap = d
        .shale(["--json", "vdi", "snapshot", "disk1", "--name", "live1"])
        .ok()
        .json();
    assert_eq!(snap["kind"], "snapshot");
    let c1 = wait_console(&d, "t1", "shale-guest: gen", 5);
    let g_before = last_gen(&c1);
    let live = wait_console(
        &d,
        "t1",
        &format!("shale-guest: gen {:#x}", g_before + 64),
        120,
    );
    let snap2_gen_floor = last_gen(&live);
    d.shale(["vdi", "snapshot", "disk1", "--name", "live2"])
        .ok();
    let (a1, _) = check_consistent(&d, "live1");
    let (a2, _) = check_consistent(&d, "live2");
    assert!(a1 >= 0x40, "snapshot 1 taken after gen 0x40 holds gen {a1}");
    assert!(
        u64::from(a2) >= snap2_gen_floor,
        "snapshot 2 taken after gen {snap2_gen_floor} holds gen {a2}"
    );
    assert!(a2 > a1, "the guest kept writing between the snapshots");

    // The attached VDI is in use while the VM runs.
    d.shale(["vdi", "destroy", "disk1"])
        .fails_with(&["disk1", "in use"])
        .one_line_error();
    d.shale(["vm", "destroy", "t1"])
        .fails_with(&["running"])
        .one_line_error();
    let running = show(&d, "t1");
    assert_eq!(running["state"], "running");
    assert!(
        running["stats"]["disks"][0]["bytes_written"]
            .as_u64()
            .unwrap_or(0)
            > 0
    );

    let stopped = d.shale(["--json", "vm", "stop", "t1"]).ok().json();
    assert_eq!(stopped["state"], "stopped");
    assert_eq!(stopped["last_exit"], "stopped");
    d.shale(["vm", "stop", "t1"])
        .fails_with(&["not running"])
        .one_line_error();
    // After the stop the disk holds a state at least as new as the last one the guest reported.
    let (a_final, _) = check_consistent(&d, "disk1");
    let final_console = console(&d, "t1");
    assert!(u64::from(a_final) >= last_gen(&final_console));
    assert!(a_final >= a2);

    // A second VM: a fresh VDI on vda and the live snapshot on vdb (forced read-only); this guest exits 0 by
    // itself, and the daemon closes its disks without a `vm stop`.
    d.shale(["vdi", "create", "--name", "disk2", "--size", "16M"])
        .ok();
    let vm2 = d
        .shale([
            "--json",
            "vm",
            "create",
            "--name",
            "t2",
            "--memory",
            "32M",
            "--flat",
            &s(&guest),
            "--disk",
            "local/disk2",
            "--disk",
            "live1",
        ])
        .ok()
        .json();
    assert_eq!(
        vm2["disks"][1]["read_only"], true,
        "snapshot attached read-only"
    );
    d.shale(["vm", "start", "t2"]).ok();
    let deadline = Instant::now() + Duration::from_secs(120);
    let v = loop {
        let v = show(&d, "t2");
        if v["state"] == "stopped" {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "t2 did not exit: {v}\n{}",
            console(&d, "t2")
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let c2 = console(&d, "t2");
    assert_eq!(v["last_exit"], "guest-exit", "{c2}");
    assert_eq!(v["exit_code"], 0, "{c2}");
    assert!(c2.contains("shale-guest: vdb ro PASS"), "{c2}");
    assert_eq!(read_bytes(&d, "disk2", 0, 4096), pattern_bytes(0, 8));
    let cj = d.shale(["--json", "vm", "console", "t2"]).ok().json();
    assert!(cj["console"].as_str().unwrap_or("").contains("phase1 PASS"));

    // Definitions persist across a daemon restart; VMs come back stopped.
    d.stop();
    let d = Daemon::start(&tmp.path().join("state"));
    let list = d.shale(["--json", "vm", "list"]).ok().json();
    let names: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(names, ["t1", "t2"]);
    assert_eq!(list[0]["state"], "stopped");

    // Once stopped, the VDIs can go; the definitions are removed with `vm destroy`.
    d.shale(["vm", "destroy", "t1"]).ok();
    d.shale(["vm", "destroy", "t2"]).ok();
    d.shale(["vdi", "destroy", "live1"]).ok();
    d.shale(["vdi", "destroy", "live2"]).ok();
    d.shale(["vdi", "destroy", "disk1"]).ok();
    d.shale(["vdi", "destroy", "disk2"]).ok();
    assert_eq!(
        d.shale(["--json", "vm", "list"]).ok().json(),
        Value::Array(vec![])
    );
    d.stop();
}

/// `--no-acpi` (Linux kernels that find virtio-mmio disks on their command line) is kept in the definition and
/// shown; it makes no sense without a kernel.
#[test]
fn vm_no_acpi_is_recorded_and_shown() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("state"));
    let image = tmp.path().join("vmlinux");
    std::fs::write(&image, [0u8; 16]).unwrap();
    let img = s(&image);
    d.shale([
        "vm",
        "create",
        "--name",
        "old",
        "--memory",
        "64M",
        "--kernel",
        &img,
        "--no-acpi",
    ])
    .ok();
    d.shale([
        "vm", "create", "--name", "new", "--memory", "64M", "--kernel", &img,
    ])
    .ok();
    assert!(d
        .shale(["vm", "show", "old"])
        .ok()
        .stdout
        .contains("acpi:      off"));
    assert!(!d.shale(["vm", "show", "new"]).ok().stdout.contains("acpi:"));
    assert_eq!(show(&d, "old")["boot"]["no_acpi"], Value::Bool(true));
    for (extra, msg) in [
        (["--no-acpi", ""], "--no-acpi needs --kernel"),
        (["--initrd", img.as_str()], "--initrd needs --kernel"),
    ] {
        let mut args = vec![
            "vm", "create", "--name", "flat", "--memory", "64M", "--flat", &img,
        ];
        args.extend(extra.into_iter().filter(|a| !a.is_empty()));
        d.shale(args).fails_with(&[msg]).one_line_error();
    }
}

#[test]
fn vm_bad_input_fails_with_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("state"));
    let image = tmp.path().join("image.bin");
    std::fs::write(&image, [0xf4u8; 16]).unwrap();
    let img = s(&image);
    d.shale(["vdi", "create", "--name", "v", "--size", "16M"])
        .ok();
    let create = |extra: &[&str]| {
        let mut args = vec!["vm", "create", "--name", "b", "--memory", "64M"];
        args.extend_from_slice(extra);
        d.shale(args)
    };
    create(&["--flat", &img, "--disk", "nosuchvdi"])
        .fails_with(&["nosuchvdi"])
        .one_line_error();
    create(&["--kernel", "/nonexistent/vmlinux"])
        .fails_with(&["kernel", "/nonexistent/vmlinux", "no such file"])
        .one_line_error();
    create(&["--kernel", &img, "--initrd", "/nonexistent/initrd"])
        .fails_with(&["initrd", "no such file"])
        .one_line_error();
    create(&["--flat", &img, "--disk", "v,rx"]).fails_with(&["unknown disk option"]);
    // No boot source / both boot sources: usage errors from the parser.
    let o = create(&["--disk", "v"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    let o = create(&["--flat", &img, "--kernel", &img]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    // Memory: not a size, too small, not a multiple of 4K.
    let o = d.shale([
        "vm", "create", "--name", "b", "--memory", "lots", "--flat", &img,
    ]);
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("lots"), "{}", o.stderr);
    d.shale([
        "vm", "create", "--name", "b", "--memory", "1M", "--flat", &img,
    ])
    .fails_with(&["memory"])
    .one_line_error();
    d.shale([
        "vm", "create", "--name", "b", "--memory", "20000001", "--flat", &img,
    ])
    .fails_with(&["memory", "4K"])
    .one_line_error();
    d.shale([
        "vm", "create", "--name", "bad/name", "--memory", "64M", "--flat", &img,
    ])
    .fails_with(&["invalid VM name"]);
    for cmd in ["start", "stop", "show", "console", "destroy"] {
        d.shale(["vm", cmd, "ghost"])
            .fails_with(&["unknown VM 'ghost'"])
            .one_line_error();
    }
    // Nothing was recorded by the failures.
    assert_eq!(
        d.shale(["--json", "vm", "list"]).ok().json(),
        Value::Array(vec![])
    );
    // `vm run` in the foreground: missing files are reported before anything starts.
    let o = shale_tests::run_shale(
        &d.socket,
        [
            "vm",
            "run",
            "--memory",
            "32M",
            "--flat",
            "/nonexistent/guest.bin",
        ],
    );
    o.fails_with(&["flat image", "no such file"])
        .one_line_error();
    d.stop();
}

#[test]
fn vm_run_in_the_foreground_with_a_raw_file() {
    if !kvm_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let guest = build_guest(tmp.path());
    let disk = tmp.path().join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let base = tmp.path().join("base.raw");
    let mut content = pattern_bytes(0, 8);
    content.resize(1 << 20, 0);
    std::fs::write(&base, &content).unwrap();
    // vda + a read-only vdb holding the pattern: the guest checks both and exits 0.
    let o = shale_tests::run_shale(
        &tmp.path().join("no-daemon.sock"),
        [
            "vm",
            "run",
            "--memory",
            "32M",
            "--flat",
            &s(&guest),
            "--disk-file",
            &s(&disk),
            "--disk-file",
            &format!("{},ro", s(&base)),
            "--timeout",
            "120",
        ],
    );
    o.ok();
    assert!(
        o.stdout.contains("shale-guest: vdb ro PASS"),
        "{}",
        o.stdout
    );
    let data = std::fs::read(&disk).unwrap();
    assert_eq!(&data[..4096], &pattern_bytes(0, 8)[..]);
    // Without vdb the guest writes forever: --timeout stops it with status 124.
    let o = shale_tests::run_shale(
        &tmp.path().join("no-daemon.sock"),
        [
            "vm",
            "run",
            "--memory",
            "32M",
            "--flat",
            &s(&guest),
            "--disk-file",
            &s(&disk),
            "--timeout",
            "3",
        ],
    );
    assert_eq!(o.code, 124, "{}\n{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("phase1 PASS"), "{}", o.stdout);
}
