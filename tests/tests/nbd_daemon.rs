//! End-to-end: NBD export of native thin VDIs and snapshots through a real `shale serve`, driven by real clients
//! (qemu-img, qemu-io, nbdinfo, nbdcopy, fio's nbd engine) using the URIs `shale vdi export` prints.
//!
//! Covers: raw images in and out (convert/compare/nbdcopy), thin maps (`nbdinfo --map` shows holes where
//! nothing was written), multi-connection fio verify, snapshot exports (frozen content, read-only, EPERM on
//! write), `shale nbd list` connections, in-use refusal of destroy while a client is connected, export names
//! (`NAME`, `SR/NAME`, UUID; ambiguous bare names refused), a clean daemon stop with a client connected,
//! verified fio stress while snapshots are taken, destroyed and collected, and a full SR (ENOSPC to the client,
//! the export still serving) followed by `kill -9` of the daemon (flushed and FUA writes survive), and TLS
//! (`nbds://`, client certificates) with certificates from `tools/nbd-tls-certs.sh`, and extended headers
//! (qemu negotiates them; 64-bit zeroing and maps of a VDI larger than 4 GiB), and changed-block tracking
//! (`qemu:dirty-bitmap:SNAP` contexts read by nbdinfo, qemu-img and a libnbd incremental-backup script).
//!
//! A test whose client tool is missing prints `SKIP: ...` and passes.

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use shale_tests::{have, Daemon};

const MIB: usize = 1 << 20;

/// Run an external command; panic with its output unless it succeeds. Returns stdout.
#[track_caller]
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run an external command that must fail; returns stdout + stderr.
#[track_caller]
fn run_fails(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{cmd:?} should have failed:\n{text}");
    text
}

fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args).stdin(Stdio::null());
    c
}

/// Deterministic pseudo-random bytes (xorshift), different per `seed`.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A sparse raw image of `size` bytes with random data in `regions` (offset, length) and holes elsewhere.
fn sparse_image(path: &Path, size: usize, regions: &[(usize, usize)], seed: u64) -> Vec<u8> {
    let mut content = vec![0u8; size];
    for (i, &(off, len)) in regions.iter().enumerate() {
        content[off..off + len].copy_from_slice(&random_bytes(len, seed + i as u64));
    }
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(size as u64).expect("size image");
    use std::os::unix::fs::FileExt;
    for &(off, len) in regions {
        f.write_all_at(&content[off..off + len], off as u64)
            .expect("write image");
    }
    content
}

/// `shale --json vdi export VDI`.
fn export(d: &Daemon, vdi: &str) -> Value {
    d.shale(["--json", "vdi", "export", vdi]).ok().json()
}

fn unix_uri(d: &Daemon, vdi: &str) -> String {
    export(d, vdi)["unix_uri"]
        .as_str()
        .expect("unix_uri")
        .to_string()
}

fn tcp_uri(d: &Daemon, vdi: &str) -> String {
    export(d, vdi)["tcp_uri"]
        .as_str()
        .expect("tcp_uri")
        .to_string()
}

fn create_vdi(d: &Daemon, name: &str, size: &str) {
    d.shale(["vdi", "create", "--name", name, "--size", size])
        .ok();
}

/// `nbdinfo --map` (`base:allocation`) as (offset, length, type) rows.
fn map(uri: &str) -> Vec<(u64, u64, u32)> {
    map_of(uri, "base:allocation")
}

/// The NBD connections the daemon reports for `export`.
fn connections_to(d: &Daemon, export: &str) -> Vec<Value> {
    let list = d.shale(["--json", "nbd", "list"]).ok().json();
    list["connections"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c["export"] == export)
        .collect()
}

/// Poll until `f` holds (up to 15 s).
#[track_caller]
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An NBD client that stays connected until dropped: `qemu-io` reading commands from a pipe we hold open.
struct Holder {
    child: Child,
}

impl Holder {
    fn open(uri: &str) -> Holder {
        Holder::spawn(cmd("qemu-io", &["-f", "raw", uri]))
    }

    /// Run `qemu_io` (a `qemu-io` command without `-c`) interactively.
    fn spawn(mut qemu_io: Command) -> Holder {
        let child = qemu_io
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn qemu-io");
        Holder { child }
    }

    /// Send `quit` and wait for the client to disconnect.
    fn close(mut self) {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(b"quit\n");
        }
        let _ = self.child.wait();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn thin_vdi_round_trips_through_real_clients() {
    if !(have("qemu-img") && have("qemu-io") && have("nbdinfo") && have("nbdcopy")) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("state"));

    // A raw image with data and holes, in through qemu-img (Unix socket), compared, and out through nbdcopy (TCP).
    let size = 32 * MIB;
    let src = tmp.path().join("src.raw");
    let content = sparse_image(
        &src,
        size,
        &[
            (0, MIB),
            (5 * MIB, 2 * MIB + 12 * 1024),
            (20 * MIB + 64 * 1024, 304 * 1024),
            (31 * MIB, MIB),
        ],
        1,
    );
    create_vdi(&d, "img", "32M");
    let uri = unix_uri(&d, "img");
    let src_s = src.display().to_string();
    run_ok(&mut cmd(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", &src_s, &uri],
    ));
    let cmp = run_ok(&mut cmd(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &src_s, &uri],
    ));
    assert!(cmp.contains("identical"), "{cmp}");
    let out = tmp.path().join("out.raw");
    run_ok(&mut cmd(
        "nbdcopy",
        &[&tcp_uri(&d, "img"), &out.display().to_string()],
    ));
    assert!(
        std::fs::read(&out).unwrap() == content,
        "nbdcopy output differs"
    );
    let info = run_ok(&mut cmd("qemu-img", &["info", "-f", "raw", &uri]));
    assert!(info.contains("33554432"), "{info}");

    // A fresh thin VDI is one hole; after a 2 MiB write, exactly that range is data.
    create_vdi(&d, "thin", "64M");
    let uri = unix_uri(&d, "thin");
    assert_eq!(map(&uri), [(0, 64 << 20, 3)], "a new thin VDI is all hole");
    run_ok(&mut cmd(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 1M 2M",
            "-c",
            "flush",
            &uri,
        ],
    ));
    assert_eq!(
        map(&uri),
        [
            (0, 1 << 20, 3),
            (1 << 20, 2 << 20, 0),
            (3 << 20, 61 << 20, 3)
        ],
        "nbdinfo --map must show holes around the written range"
    );
    run_ok(&mut cmd(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0xab 1M 2M",
            "-c",
            "read -P 0 0 1M",
            &uri,
        ],
    ));
    // The SR accounts only the written clusters.
    let v = d.shale(["--json", "vdi", "show", "thin"]).ok().json();
    assert_eq!(v["allocated_bytes"], 2 << 20, "{v}");
}

/// `tools/fio/nbd-verify.fio` (six connections, crc32c verification) over TCP and the Unix socket. The daemon
/// gets three NBD I/O threads (`--nbd-io-threads`), more than the default on a small CI host, so the connections
/// spread over several threads and their rings.
#[test]
fn fio_verify_with_several_connections() {
    if !have("fio") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(&tmp.path().join("state"), &["--nbd-io-threads", "3"]);
    create_vdi(&d, "stress", "128M");
    let job = shale_tests::manifest_dir().join("../tools/fio/nbd-verify.fio");
    for uri in [tcp_uri(&d, "stress"), unix_uri(&d, "stress")] {
        let out = Command::new("fio")
            .arg(&job)
            .env("NBD_URI", &uri)
            .current_dir(tmp.path())
            .output()
            .expect("run fio");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("err= 0"),
            "fio failed on {uri}:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("jobs=6"), "several connections: {stdout}");
    }
    let io_threads = std::fs::read_dir(format!("/proc/{}/task", d.pid()))
        .expect("daemon's threads")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("shale-nbd-"))
        .count();
    assert_eq!(
        io_threads, 3,
        "--nbd-io-threads 3 started three I/O threads"
    );
    d.stop();
}

/// fio stress with crc32c verification (`tools/fio/nbd-churn.fio`: writers of 2 KiB to 192 KiB, trims, readers,
/// six connections) on a VDI while snapshots are taken every two seconds, each re-digested two rounds later and
/// destroyed, and GC runs: no acknowledged write is lost or goes stale, no snapshot changes, and the metadata
/// checks clean once the SR is quiet. A GC pass running across a snapshot once deleted the head's newest entries
/// and freed their clusters under live data; this workload, at 1 GiB (`tools/fio/snapshot-soak.sh --size 1G`), is how
/// it was found (the engine test `gc_running_across_a_snapshot_keeps_the_heads_new_entries` pins that race down).
#[test]
fn fio_stress_under_snapshot_churn() {
    if !have("fio") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("state"));
    create_vdi(&d, "churn", "256M");
    let job = shale_tests::manifest_dir().join("../tools/fio/nbd-churn.fio");
    let mut fio = Command::new("fio")
        .arg(&job)
        .env("NBD_URI", unix_uri(&d, "churn"))
        .env("RUNTIME", "30")
        .current_dir(tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run fio");
    let mut taken: Vec<(String, String)> = Vec::new();
    while fio.try_wait().expect("poll fio").is_none() {
        std::thread::sleep(Duration::from_secs(2));
        let name = format!("s{}", taken.len() + 1);
        d.shale(["vdi", "snapshot", "churn", "--name", &name]).ok();
        let sum = d.digest(&name);
        taken.push((name, sum));
        if let Some((old, want)) = taken.len().checked_sub(3).map(|i| &taken[i]) {
            assert_eq!(&d.digest(old), want, "snapshot {old} changed");
            d.shale(["vdi", "destroy", old]).ok();
        }
        d.shale(["sr", "gc", "local"]).ok();
    }
    let out = fio.wait_with_output().expect("fio output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("err= 0"),
        "fio failed under snapshot churn:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        taken.len() >= 3,
        "only {} snapshots were taken",
        taken.len()
    );
    d.shale(["sr", "gc", "local"]).ok();
    d.shale(["sr", "check"]).ok();
    for (name, want) in taken.iter().rev().take(2) {
        assert_eq!(&d.digest(name), want, "snapshot {name} changed");
    }
    d.stop();
}

#[test]
fn snapshot_export_is_frozen_and_read_only() {
    if !(have("qemu-img") && have("qemu-io") && have("nbdinfo")) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("state"));
    let size = 16 * MIB;
    let a = tmp.path().join("a.raw");
    let b = tmp.path().join("b.raw");
    sparse_image(&a, size, &[(0, size)], 10);
    let mut b_content = sparse_image(&b, size, &[(0, 8 * MIB), (12 * MIB, MIB)], 20);
    let (a_s, b_s) = (a.display().to_string(), b.display().to_string());

    create_vdi(&d, "base", "16M");
    let base = unix_uri(&d, "base");
    run_ok(&mut cmd(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", &a_s, &base],
    ));
    d.shale(["vdi", "snapshot", "base", "--name", "snap"]).ok();
    let ex = export(&d, "snap");
    assert_eq!(ex["read_only"], true, "{ex}");
    let snap = ex["unix_uri"].as_str().unwrap().to_string();

    // Write B over the VDI after the snapshot (whole clusters and a partial one: the redirect path).
    run_ok(&mut cmd(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", &b_s, &base],
    ));
    run_ok(&mut cmd(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xcc 9441280 4k",
            "-c",
            "flush",
            &base,
        ],
    ));
    b_content[9 * MIB + 4096..9 * MIB + 8192].fill(0xcc);
    std::fs::write(&b, &b_content).unwrap();

    // The snapshot still reads A; the VDI reads B.
    let cmp = run_ok(&mut cmd(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &a_s, &snap],
    ));
    assert!(cmp.contains("identical"), "snapshot changed: {cmp}");
    let cmp = run_ok(&mut cmd(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &b_s, &base],
    ));
    assert!(cmp.contains("identical"), "{cmp}");

    // The snapshot export is read-only: advertised so, and writes are refused (EPERM).
    let st = cmd("nbdinfo", &["--is", "read-only", &snap])
        .status()
        .unwrap();
    assert!(st.success(), "snapshot export must be read-only");
    let st = cmd("nbdinfo", &["--is", "read-only", &base])
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(2), "VDI export must be writable");
    let err = run_fails(&mut cmd(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0xee 0 4k", &snap],
    ));
    assert!(
        err.contains("Permission denied") || err.contains("read-only") || err.contains("read only"),
        "{err}"
    );
    let cmp = run_ok(&mut cmd(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &a_s, &snap],
    ));
    assert!(cmp.contains("identical"), "{cmp}");
}

#[test]
fn cli_export_list_and_in_use() {
    if !(have("qemu-io") && have("nbdinfo")) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("state"));
    create_vdi(&d, "busy", "16M");

    // `shale vdi export` prints a TCP and a Unix URI, both of which work, and lists every export name.
    let text = d.shale(["vdi", "export", "busy"]).ok().stdout.clone();
    let uris: Vec<&str> = text.lines().collect();
    assert_eq!(uris.len(), 2, "{text}");
    assert!(
        uris[0].starts_with("nbd://127.0.0.1:") && uris[0].ends_with("/busy"),
        "{text}"
    );
    assert!(uris[1].starts_with("nbd+unix:///busy?socket="), "{text}");
    for u in &uris {
        let info = run_ok(&mut cmd("nbdinfo", &["--size", u]));
        assert_eq!(info.trim(), "16777216", "{u}");
    }
    let ex = export(&d, "busy");
    let uuid = ex["uuid"].as_str().unwrap().to_string();
    assert_eq!(
        ex["export_names"],
        serde_json::json!(["busy", "local/busy", uuid.clone()])
    );
    let socket = d.state_dir.canonicalize().unwrap().join("nbd.sock");
    for name in ["local/busy", uuid.as_str()] {
        let u = format!("nbd+unix:///{name}?socket={}", socket.display());
        let info = run_ok(&mut cmd("nbdinfo", &["--size", &u]));
        assert_eq!(info.trim(), "16777216", "{u}");
    }
    let list = d.shale(["--json", "nbd", "list"]).ok().json();
    let names: Vec<_> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["local/busy"]);
    assert_eq!(list["listeners"].as_array().unwrap().len(), 2, "{list}");

    // While a client is connected: `shale nbd list` shows it with counters, and destroy is refused.
    let holder = Holder::open(uris[1]);
    wait_for("the connection to show in `shale nbd list`", || {
        !connections_to(&d, "local/busy").is_empty()
    });
    let c = &connections_to(&d, "local/busy")[0];
    assert_eq!(c["peer"], "unix", "{c}");
    assert!(c["reads"].as_u64().is_some(), "{c}");
    let table = d.shale(["nbd", "list"]).ok().stdout.clone();
    assert!(
        table.contains("local/busy") && table.contains("PEER") && table.contains("unix"),
        "{table}"
    );
    d.shale(["vdi", "destroy", "busy"])
        .fails_with(&["busy", "in use"])
        .one_line_error();

    // After the client disconnects, destroy works and the export is gone.
    holder.close();
    wait_for("the connection to end", || {
        connections_to(&d, "local/busy").is_empty()
    });
    d.shale(["vdi", "destroy", "busy"]).ok();
    run_fails(&mut cmd("nbdinfo", &["--size", uris[1]]));

    // A name held by two SRs is exported only as SR/NAME (and UUID); the bare name is ambiguous.
    let other = tmp.path().join("other");
    d.shale([
        "sr",
        "create",
        "--name",
        "other",
        "--path",
        &other.display().to_string(),
    ])
    .ok();
    d.shale([
        "vdi", "create", "--sr", "local", "--name", "dup", "--size", "1M",
    ])
    .ok();
    d.shale([
        "vdi", "create", "--sr", "other", "--name", "dup", "--size", "2M",
    ])
    .ok();
    let ex = export(&d, "other/dup");
    assert_eq!(ex["export_names"][0], "other/dup", "{ex}");
    assert_eq!(ex["export_names"].as_array().unwrap().len(), 2, "{ex}");
    let u = ex["unix_uri"].as_str().unwrap();
    assert_eq!(
        run_ok(&mut cmd("nbdinfo", &["--size", u])).trim(),
        "2097152"
    );
    let bare = format!("nbd+unix:///dup?socket={}", socket.display());
    run_fails(&mut cmd("nbdinfo", &["--size", &bare]));

    // A clean stop with a client connected drains it and exits 0.
    let _holder = Holder::open(u);
    wait_for("the second connection", || {
        !connections_to(&d, "other/dup").is_empty()
    });
    let st = d.stop();
    assert!(st.success(), "daemon exit: {st}");
}

/// `qemu-io` on `uri` running `commands` (each a `-c`), as a command to run.
fn qemu_io(uri: &str, commands: &[&str]) -> Command {
    let mut args = vec!["-f", "raw"];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(uri);
    cmd("qemu-io", &args)
}

/// Over NBD, a full SR answers writes with ENOSPC while the export goes on serving; every write acknowledged
/// after a flush, or with FUA, survives `kill -9` of the daemon; and freeing space makes the export writable
/// again.
#[test]
fn full_sr_is_enospc_over_nbd_and_flushed_writes_survive_kill_9() {
    if !have("qemu-io") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let d = Daemon::start(&state);
    d.create_small_sr("small", &tmp.path().join("small"), "4M");
    for vdi in ["a", "b"] {
        d.shale([
            "vdi", "create", "--sr", "small", "--name", vdi, "--size", "64M",
        ])
        .ok();
    }
    d.shale([
        "vdi",
        "write",
        "small/b",
        "--pattern",
        "0x66",
        "--length",
        "1M",
    ])
    .ok();
    let uri = unix_uri(&d, "small/a");

    // 2 MiB written then flushed, and 64 KiB written with FUA: both acknowledged as durable.
    run_ok(&mut qemu_io(&uri, &["write -P 0x5a 0 2M", "flush"]));
    run_ok(&mut qemu_io(&uri, &["write -f -P 0x33 2M 64k"]));
    // 2 MiB more does not fit in the 960 KiB left.
    let err = run_fails(&mut qemu_io(&uri, &["write -P 0x77 3M 2M"]));
    assert!(err.contains("No space left on device"), "{err}");
    // The export still serves, and a write into space the VDI already owns still works.
    run_ok(&mut qemu_io(
        &uri,
        &["read -P 0x5a 0 2M", "write -P 0x5b 1M 4k", "flush"],
    ));

    // kill -9, restart: everything acknowledged as durable is there, and the SR checks clean.
    d.signal(libc::SIGKILL);
    drop(d);
    let d = Daemon::start(&state);
    let uri = unix_uri(&d, "small/a");
    run_ok(&mut qemu_io(
        &uri,
        &[
            "read -P 0x5a 0 1M",
            "read -P 0x5b 1M 4k",
            "read -P 0x5a 1052672 1044480",
            "read -P 0x33 2M 64k",
        ],
    ));
    d.shale(["sr", "check", "small"]).ok();

    // Freeing space (destroy b, collect) makes the export writable again.
    d.shale(["vdi", "destroy", "small/b"]).ok();
    d.shale(["sr", "gc", "small"]).ok();
    run_ok(&mut qemu_io(
        &uri,
        &["write -P 0x44 3M 512k", "flush", "read -P 0x44 3M 512k"],
    ));
    d.shale(["sr", "check", "small"]).ok();
    assert!(d.stop().success());
}

/// `qemu-img`/`qemu-io` arguments that open `export` at `hostport` over TLS with the certificates in `dir`:
/// the `tls-creds-x509` object, and the image options that use it (qemu takes no `nbds://` URI).
fn qemu_tls(dir: &Path, hostport: &str, export: &str) -> ([String; 2], String) {
    let (host, port) = hostport.rsplit_once(':').expect("host:port");
    (
        [
            "--object".into(),
            format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                dir.display()
            ),
        ],
        format!(
            "driver=nbd,server.type=inet,server.host={host},server.port={port},export={export},tls-creds=tls0"
        ),
    )
}

/// NBD over TLS through the daemon, with certificates made by `tools/nbd-tls-certs.sh` and a client CA:
/// `vdi export` prints `nbds://` for TCP; nbdcopy, nbdinfo and qemu-img/qemu-io connect over TLS with the CA and
/// a client certificate; plain TCP clients, clients without a certificate and clients that do not trust the
/// server's CA are refused while the daemon serves on; the Unix socket still serves plain clients; `shale nbd
/// list` marks TLS connections.
#[test]
fn tls_exports_with_real_clients() {
    if !(have("qemu-img")
        && have("qemu-io")
        && have("nbdinfo")
        && have("nbdcopy")
        && have("openssl"))
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path().join("pki");
    let script = shale_tests::manifest_dir().join("../tools/nbd-tls-certs.sh");
    run_ok(&mut cmd(
        "bash",
        &[&script.display().to_string(), &pki.display().to_string()],
    ));
    let p = |f: &str| pki.join(f).display().to_string();

    // Bad credentials stop the daemon at start with the reason: a key that is not the certificate's, a missing
    // file.
    for (cert, key, why) in [
        (
            p("server-cert.pem"),
            p("client-key.pem"),
            "TLS configuration",
        ),
        (p("nope.pem"), p("server-key.pem"), "nope.pem"),
    ] {
        let mut bad = Daemon::spawn_with(
            &tmp.path().join("bad-state"),
            &["--nbd-tls-cert", &cert, "--nbd-tls-key", &key],
        );
        let st = bad
            .wait_exit(Duration::from_secs(60))
            .expect("a daemon with bad TLS credentials should exit");
        assert!(!st.success());
        let log = bad.log_text();
        assert!(log.contains("NBD TLS") && log.contains(why), "{log}");
    }

    let d = Daemon::start_with(
        &tmp.path().join("state"),
        &[
            "--nbd-tls-cert",
            &p("server-cert.pem"),
            "--nbd-tls-key",
            &p("server-key.pem"),
            "--nbd-tls-client-ca",
            &p("ca-cert.pem"),
        ],
    );
    create_vdi(&d, "sec", "32M");
    let uri = tcp_uri(&d, "sec");
    let hostport = uri
        .strip_prefix("nbds://")
        .and_then(|r| r.strip_suffix("/sec"))
        .unwrap_or_else(|| panic!("TCP URI should be nbds://: {uri}"))
        .to_string();
    let tls_uri = format!("{uri}?tls-certificates={}", pki.display());

    // In with nbdcopy over TLS, compared by qemu-img over TLS, out again with nbdcopy.
    let size = 32 * MIB;
    let src = tmp.path().join("src.raw");
    let content = sparse_image(&src, size, &[(0, MIB), (9 * MIB, 3 * MIB + 4096)], 7);
    run_ok(&mut cmd("nbdcopy", &[&src.display().to_string(), &tls_uri]));
    let (object, opts) = qemu_tls(&pki, &hostport, "sec");
    let src_opts = format!("driver=raw,file.filename={}", src.display());
    let out = run_ok(&mut cmd(
        "qemu-img",
        &[
            "compare",
            &object[0],
            &object[1],
            "--image-opts",
            &src_opts,
            &opts,
        ],
    ));
    assert!(out.contains("identical"), "{out}");
    let back = tmp.path().join("back.raw");
    run_ok(&mut cmd(
        "nbdcopy",
        &[&tls_uri, &back.display().to_string()],
    ));
    assert!(
        std::fs::read(&back).unwrap() == content,
        "nbdcopy over TLS read back other bytes"
    );
    let info = run_ok(&mut cmd("nbdinfo", &[&tls_uri]));
    assert!(
        info.contains("with TLS") && info.contains("33554432"),
        "{info}"
    );

    // A TLS client that stays connected shows up as such.
    let qemu_io_tls = |commands: &[&str]| {
        let mut args: Vec<&str> = vec![&object[0], &object[1], "--image-opts"];
        for c in commands {
            args.extend(["-c", c]);
        }
        args.push(&opts);
        cmd("qemu-io", &args)
    };
    run_ok(&mut qemu_io_tls(&[
        "write -P 0x5a 16M 64k",
        "flush",
        "read -P 0x5a 16M 64k",
    ]));
    let holder = Holder::spawn(qemu_io_tls(&[]));
    wait_for("the TLS client to show in nbd list", || {
        connections_to(&d, "local/sec")
            .iter()
            .any(|c| c["tls"] == true)
    });
    let text = d.shale(["nbd", "list"]).ok().stdout.clone();
    assert!(text.contains("tcp+tls:") && text.contains("tls"), "{text}");
    holder.close();

    // Refused: a plain client on TCP; a TLS client without a client certificate; one that trusts another CA.
    let plain = format!("nbd://{hostport}/sec");
    let e = run_fails(&mut cmd("nbdinfo", &[&plain]));
    assert!(e.to_lowercase().contains("tls"), "{e}");
    let ca_only = tmp.path().join("ca-only");
    std::fs::create_dir(&ca_only).unwrap();
    std::fs::copy(pki.join("ca-cert.pem"), ca_only.join("ca-cert.pem")).unwrap();
    run_fails(&mut cmd(
        "nbdinfo",
        &[&format!("{uri}?tls-certificates={}", ca_only.display())],
    ));
    let other = tmp.path().join("other-pki");
    run_ok(&mut cmd(
        "bash",
        &[&script.display().to_string(), &other.display().to_string()],
    ));
    run_fails(&mut cmd(
        "nbdinfo",
        &[&format!("{uri}?tls-certificates={}", other.display())],
    ));

    // The Unix socket serves plain clients, and the daemon is still serving TLS.
    run_ok(&mut qemu_io(
        &unix_uri(&d, "sec"),
        &["read -P 0x5a 16M 64k", "read -P 0 13M 3M"],
    ));
    let info = run_ok(&mut cmd("nbdinfo", &["--size", &tls_uri]));
    assert_eq!(info.trim(), "33554432");
}

/// qemu 10 negotiates extended headers with the daemon (`nbd list` says so), zeroes 6 GiB of an 8 GiB thin VDI
/// in 64-bit requests without touching the data beyond, and maps it; nbdinfo (libnbd 1.14, no extended
/// headers) sees the same map through structured replies.
#[test]
fn qemu_uses_extended_headers_on_a_large_thin_vdi() {
    if !(have("qemu-io") && have("qemu-img") && have("nbdinfo")) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("state"));
    create_vdi(&d, "big", "8G");
    let uri = unix_uri(&d, "big");
    run_ok(&mut qemu_io(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 6G 1M",
            "write -z -u -n 0 6G",
            "read -P 0 0 1M",
            "read -P 0xcd 6G 1M",
            "flush",
        ],
    ));
    let gib = 1u64 << 30;
    let out = run_ok(&mut cmd(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &uri],
    ));
    let rows: Vec<Value> = serde_json::from_str(&out).expect("qemu-img map JSON");
    let data: Vec<(u64, u64)> = rows
        .iter()
        .filter(|r| r["data"] == true)
        .map(|r| (r["start"].as_u64().unwrap(), r["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data, [(6 * gib, 1 << 20)], "qemu-img map: {out}");
    assert_eq!(
        map(&uri),
        [
            (0, 6 * gib, 3),
            (6 * gib, 1 << 20, 0),
            (6 * gib + (1 << 20), 2 * gib - (1 << 20), 3)
        ],
        "nbdinfo --map"
    );
    let h = Holder::open(&uri);
    wait_for("qemu-io's connection", || {
        !connections_to(&d, "local/big").is_empty()
    });
    let conns = connections_to(&d, "local/big");
    assert_eq!(conns[0]["extended"], true, "{conns:?}");
    let text = d.shale(["nbd", "list"]).ok().stdout.clone();
    assert!(
        text.contains("REPLIES") && text.contains("extended"),
        "{text}"
    );
    h.close();
    let st = d.stop();
    assert!(st.success(), "daemon exit: {st}");
}

/// `nbdinfo --map=CONTEXT` as (offset, length, flags) rows.
fn map_of(uri: &str, context: &str) -> Vec<(u64, u64, u32)> {
    run_ok(&mut cmd("nbdinfo", &[&format!("--map={context}"), uri]))
        .lines()
        .filter_map(|l| {
            let f: Vec<_> = l.split_whitespace().collect();
            Some((
                f.first()?.parse().ok()?,
                f.get(1)?.parse().ok()?,
                f.get(2)?.parse().ok()?,
            ))
        })
        .collect()
}

/// An incremental backup as an NBD backup tool makes it with libnbd: select `qemu:dirty-bitmap:SNAP` on the
/// export of the newer snapshot, walk its block status, read only the dirty ranges and write them into the
/// previous full copy. Prints the dirty ranges as `offset:length`.
const LIBNBD_INCREMENTAL: &str = r#"
import nbd, sys
uri, ctx, out = sys.argv[1:4]
h = nbd.NBD()
h.add_meta_context(ctx)
h.add_meta_context("base:allocation")
h.connect_uri(uri)
assert h.can_meta_context(ctx), "context not negotiated"
size, off, dirty = h.get_size(), 0, []
while off < size:
    got = {}
    def cb(c, o, e, err):
        got[c] = (o, list(e))
        return 0
    h.block_status(size - off, off, cb)
    assert "base:allocation" in got, "one reply carries every selected context"
    pos = off
    o, e = got[ctx]
    for i in range(0, len(e), 2):
        if e[i + 1] & 1:
            dirty.append((pos, e[i]))
        pos += e[i]
    off = pos
with open(out, "r+b") as f:
    for o, l in dirty:
        f.seek(o)
        f.write(h.pread(l, o))
print(" ".join("%d:%d" % d for d in dirty))
"#;

/// Changed-block tracking over NBD: an export offers `qemu:dirty-bitmap:SNAP` for each earlier snapshot of its
/// VDI; nbdinfo, qemu-img (`x-dirty-bitmap`) and a libnbd backup script all see the extents `shale vdi diff`
/// lists, and the script's incremental copy turns the full backup of `base` into `inc1` byte for byte.
#[test]
fn dirty_bitmaps_drive_an_incremental_backup_over_nbd() {
    let py = "/usr/bin/python3";
    let libnbd = Command::new(py)
        .args(["-c", "import nbd"])
        .status()
        .is_ok_and(|s| s.success());
    if !(have("qemu-img") && have("qemu-io") && have("nbdinfo") && libnbd) {
        eprintln!("SKIP: needs qemu-img, qemu-io, nbdinfo and python3-libnbd");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("state"));
    let size = 16 * MIB;
    let a = tmp.path().join("a.raw");
    sparse_image(&a, size, &[(0, 12 * MIB)], 30);
    create_vdi(&d, "d", "16M");
    let vdi = unix_uri(&d, "d");
    run_ok(&mut cmd(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            &a.display().to_string(),
            &vdi,
        ],
    ));
    d.shale(["vdi", "snapshot", "d", "--name", "base"]).ok();
    // The full backup: a copy of the `base` snapshot's export.
    let backup = tmp.path().join("backup.raw");
    let backup_s = backup.display().to_string();
    run_ok(&mut cmd(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &unix_uri(&d, "base"),
            &backup_s,
        ],
    ));

    // Changes after it: a 4 KiB write, 200 KiB across three clusters, zeroes over data.
    run_ok(&mut qemu_io(
        &vdi,
        &[
            "write -P 0x55 3M 4k",
            "write -P 0x66 9437696 204800",
            "write -z 1M 64k",
        ],
    ));
    d.shale(["vdi", "snapshot", "d", "--name", "inc1"]).ok();
    let inc1 = unix_uri(&d, "inc1");

    // Which contexts each export offers: earlier snapshots of the same VDI only.
    let list = run_ok(&mut cmd("nbdinfo", &["--list", &inc1]));
    let inc1_block = list
        .split("export=")
        .find(|b| b.starts_with("\"local/inc1\""))
        .expect("inc1 in the list");
    assert!(
        inc1_block.contains("qemu:dirty-bitmap:base"),
        "{inc1_block}"
    );
    assert!(
        !inc1_block.contains("qemu:dirty-bitmap:inc1"),
        "{inc1_block}"
    );
    let base_block = list
        .split("export=")
        .find(|b| b.starts_with("\"local/base\""))
        .expect("base in the list");
    assert!(!base_block.contains("qemu:dirty-bitmap"), "{base_block}");

    // nbdinfo's map of the bitmap is `vdi diff`'s answer.
    let diff = d
        .shale(["--json", "vdi", "diff", "inc1", "--from", "base"])
        .ok()
        .json();
    let want = shale_tests::diff_extents(&diff);
    assert_eq!(
        want,
        [(1 << 20, 1 << 16), (3 << 20, 1 << 16), (9 << 20, 4 << 16)],
        "{diff}"
    );
    let dirty: Vec<(u64, u64)> = map_of(&inc1, "qemu:dirty-bitmap:base")
        .into_iter()
        .filter(|r| r.2 == 1)
        .map(|r| (r.0, r.1))
        .collect();
    assert_eq!(dirty, want);

    // qemu reads the bitmap too: with x-dirty-bitmap, `qemu-img map` shows dirty ranges as "data": false.
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=local/inc1,x-dirty-bitmap=qemu:dirty-bitmap:base",
        inc1.split("socket=").nth(1).expect("socket in the URI")
    );
    let qmap: Value = serde_json::from_str(&run_ok(&mut cmd(
        "qemu-img",
        &["map", "--output=json", "--image-opts", &opts],
    )))
    .expect("qemu-img map json");
    let qdirty: Vec<(u64, u64)> = qmap
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r["data"] == false)
        .map(|r| {
            (
                r["start"].as_u64().unwrap_or(0),
                r["length"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(qdirty, want, "{qmap}");

    // The incremental copy: only the dirty ranges, read over NBD, turn the full backup into inc1.
    let out = run_ok(&mut cmd(
        py,
        &[
            "-c",
            LIBNBD_INCREMENTAL,
            &inc1,
            "qemu:dirty-bitmap:base",
            &backup_s,
        ],
    ));
    let copied: Vec<String> = want.iter().map(|(o, l)| format!("{o}:{l}")).collect();
    assert_eq!(out.trim(), copied.join(" "));
    run_ok(&mut cmd(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &backup_s, &inc1],
    ));

    // An unknown bitmap is refused at negotiation.
    let err = run_fails(&mut cmd(
        "nbdinfo",
        &["--map=qemu:dirty-bitmap:nope", &inc1],
    ));
    assert!(err.contains("qemu:dirty-bitmap:nope"), "{err}");
}

/// `shale sr detach` / `sr attach`, XenServer's PBD unplug and plug, without a daemon restart: refused while an
/// NBD client has one of the SR's VDIs open (naming it); once detached, the SR's objects leave the CLI and the
/// export list while another SR keeps serving; attached again, every write is there and it takes new ones. A
/// directory that holds a different SR is refused by UUID, and an SR missing when the daemon started is attached
/// once it is back.
#[test]
fn sr_detach_and_attach_without_a_restart() {
    if !(have("qemu-io") && have("nbdinfo")) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let d = Daemon::start(&state);
    let sr_create = |d: &Daemon, name: &str| {
        let path = tmp.path().join(name).display().to_string();
        d.shale(["sr", "create", "--name", name, "--path", &path])
            .ok();
    };
    sr_create(&d, "fast");
    d.shale([
        "vdi", "create", "--sr", "fast", "--name", "d", "--size", "16M",
    ])
    .ok();
    d.shale([
        "vdi",
        "write",
        "fast/d",
        "--pattern",
        "0x5a",
        "--length",
        "2M",
    ])
    .ok();
    let digest = d.digest("fast/d");
    d.shale([
        "vdi", "create", "--sr", "local", "--name", "keep", "--size", "4M",
    ])
    .ok();
    let keep = unix_uri(&d, "keep");
    let uri = unix_uri(&d, "fast/d");

    // In use: refused, naming the open VDI.
    let holder = Holder::open(&uri);
    wait_for("the connection", || {
        !connections_to(&d, "fast/d").is_empty()
    });
    d.shale(["sr", "detach", "fast"])
        .fails_with(&["SR 'fast' is in use", "'d' is open", "disconnect"])
        .one_line_error();
    holder.close();
    wait_for("the connection to end", || {
        connections_to(&d, "fast/d").is_empty()
    });

    // Detached: gone from the CLI and from NBD; the other SR serves on; a second detach changes nothing.
    let out = d.shale(["sr", "detach", "fast"]).ok().stdout.clone();
    assert!(out.contains("detached SR 'fast'"), "{out}");
    let sr = d.shale(["--json", "sr", "show", "fast"]).ok().json();
    let status = sr["status"].as_str().unwrap();
    assert!(status.starts_with("detached"), "{status}");
    d.shale(["vdi", "show", "fast/d"])
        .fails_with(&["SR 'fast' is unavailable", "shale sr attach fast"])
        .one_line_error();
    run_fails(&mut cmd("nbdinfo", &["--size", &uri]));
    let list = d.shale(["--json", "nbd", "list"]).ok().json();
    assert!(
        !list["exports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "fast/d"),
        "{list}"
    );
    assert_eq!(
        run_ok(&mut cmd("nbdinfo", &["--size", &keep])).trim(),
        "4194304"
    );
    let table = d.shale(["sr", "list"]).ok().stdout.clone();
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("fast ") && l.contains(" detached ")),
        "{table}"
    );
    d.shale(["sr", "destroy", "fast"])
        .fails_with(&["SR 'fast' is detached", "shale sr attach fast", "--force"])
        .one_line_error();
    let check = d.shale(["sr", "check"]).ok().stderr.clone();
    assert!(check.contains("SR 'fast' not checked"), "{check}");
    d.shale(["sr", "detach", "fast"]).ok();

    // Another SR's directory put in its place is refused: the UUID does not match.
    sr_create(&d, "other");
    d.shale(["sr", "detach", "other"]).ok();
    let (fast, other, away) = (
        tmp.path().join("fast"),
        tmp.path().join("other"),
        tmp.path().join("fast.away"),
    );
    std::fs::rename(&fast, &away).unwrap();
    std::fs::rename(&other, &fast).unwrap();
    d.shale(["sr", "attach", "fast"])
        .fails_with(&["holds SR", "not SR 'fast'"])
        .one_line_error();
    let sr = d.shale(["--json", "sr", "show", "fast"]).ok().json();
    let status = sr["status"].as_str().unwrap();
    assert!(
        status.starts_with("unavailable: ") && status.contains("holds SR"),
        "{status}"
    );
    std::fs::rename(&fast, &other).unwrap();
    std::fs::rename(&away, &fast).unwrap();
    d.shale(["sr", "attach", "other"]).ok();

    // Attached again: the data is there and it takes writes.
    let sr = d.shale(["--json", "sr", "attach", "fast"]).ok().json();
    assert_eq!(sr["status"], "attached", "{sr}");
    assert_eq!(d.digest("fast/d"), digest);
    d.shale([
        "vdi",
        "write",
        "fast/d",
        "--offset",
        "2M",
        "--pattern",
        "0x77",
        "--length",
        "64K",
    ])
    .ok();
    let read = run_ok(&mut qemu_io(
        &uri,
        &["read -P 0x5a 0 2M", "read -P 0x77 2M 64K"],
    ));
    assert!(!read.contains("Pattern verification failed"), "{read}");
    let digest = d.digest("fast/d");

    // Missing when the daemon starts: unavailable, then attached once the directory is back.
    assert!(d.stop().success());
    std::fs::rename(&fast, &away).unwrap();
    let d = Daemon::start(&state);
    let sr = d.shale(["--json", "sr", "show", "fast"]).ok().json();
    assert!(
        sr["status"].as_str().unwrap().starts_with("unavailable"),
        "{sr}"
    );
    d.shale(["sr", "attach", "fast"]).fails_with(&["fast"]);
    std::fs::rename(&away, &fast).unwrap();
    d.shale(["sr", "attach", "fast"]).ok();
    assert_eq!(d.digest("fast/d"), digest);
    d.shale(["sr", "check", "fast"]).ok();
    assert!(d.stop().success());
}
