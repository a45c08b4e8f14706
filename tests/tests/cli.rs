//! End-to-end: the `shale` CLI against a real `shale serve`, through the whole SR/VDI lifecycle, every bad-input
//! case, daemon exclusivity and clean stop, and a full SR (ENOSPC) that recovers after space is freed.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use shale_tests::{run_shale, Daemon};

const G: u64 = 1 << 30;
const T: u64 = 1 << 40;

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn read_bytes(d: &Daemon, vdi: &str, offset: &str, length: &str) -> Vec<u8> {
    let out = std::process::Command::new(shale_tests::shale_bin())
        .arg("--socket")
        .arg(&d.socket)
        .args(["vdi", "read", vdi, "--offset", offset, "--length", length])
        .output()
        .expect("run vdi read");
    assert!(
        out.status.success(),
        "vdi read failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .expect("array")
        .iter()
        .map(|v| v["name"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn lifecycle_through_the_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let d = Daemon::start(&state);

    // First start: a default `local` thin SR in the state directory.
    let srs = d.shale(["--json", "sr", "list"]).ok().json();
    assert_eq!(names(&srs), ["local"]);
    assert_eq!(srs[0]["type"], "thin");
    assert_eq!(srs[0]["status"], "attached");
    assert_eq!(
        srs[0]["path"],
        s(&state.canonicalize().unwrap().join("srs/local"))
    );

    // sr create / list / show.
    let fast = tmp.path().join("fast");
    let sr = d.shale([
        "--json",
        "sr",
        "create",
        "--name",
        "fast",
        "--type",
        "thin",
        "--path",
        &s(&fast),
        "--cluster-size",
        "64K",
    ]);
    let sr = sr.ok().json();
    assert_eq!(sr["name"], "fast");
    assert_eq!(sr["cluster_size"], 65536);
    assert_eq!(sr["allocated_bytes"], 0);
    let table = d.shale(["sr", "list"]).ok().stdout.clone();
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("local") && table.contains("fast"), "{table}");
    let show = d.shale(["sr", "show", "fast"]).ok().stdout.clone();
    assert!(
        show.contains("cluster size:") && show.contains("64 KiB"),
        "{show}"
    );
    // By UUID too.
    let by_uuid = d
        .shale(["--json", "sr", "show", sr["uuid"].as_str().unwrap()])
        .ok()
        .json();
    assert_eq!(by_uuid["name"], "fast");

    // --sr is required once there are several SRs.
    d.shale(["vdi", "create", "--name", "x", "--size", "1G"])
        .fails_with(&["several SRs", "--sr"])
        .one_line_error();

    // A 1 TiB thin VDI costs nothing until written, and a write far into it costs one cluster.
    let v = d
        .shale([
            "--json", "vdi", "create", "--sr", "local", "--name", "big", "--size", "1T",
        ])
        .ok()
        .json();
    assert_eq!(v["size"], T);
    assert_eq!(v["allocated_bytes"], 0);
    assert_eq!(v["kind"], "vdi");
    assert_eq!(
        d.shale(["--json", "sr", "show", "local"]).ok().json()["allocated_bytes"],
        0
    );
    d.shale([
        "vdi",
        "write",
        "big",
        "--offset",
        "512G",
        "--pattern",
        "9",
        "--length",
        "4K",
    ])
    .ok();
    assert_eq!(
        d.shale(["--json", "vdi", "show", "big"]).ok().json()["allocated_bytes"],
        65536
    );
    assert_eq!(read_bytes(&d, "big", "512G", "4K"), vec![9; 4096]);
    assert_eq!(read_bytes(&d, "big", "256G", "4K"), vec![0; 4096]);
    // Those I/Os looked the map up in RocksDB at least once (nothing was cached yet), and `sr show` says so.
    let local = d.shale(["--json", "sr", "show", "local"]).ok().json();
    assert!(local["metadata_reads"].as_u64().unwrap() > 0, "{local}");
    let show = d.shale(["sr", "show", "local"]).ok().stdout.clone();
    assert!(show.contains("metadata reads:"), "{show}");
    d.shale(["vdi", "destroy", "big"]).ok();

    // The rest of the lifecycle on a 4 GiB VDI (digests read every written chunk).
    let v = d
        .shale([
            "--json", "vdi", "create", "--sr", "local", "--name", "disk", "--size", "4G",
        ])
        .ok()
        .json();
    assert_eq!(v["allocated_bytes"], 0);
    let empty_digest = d.digest("disk");

    // Write: a pattern, and a file at an unaligned offset far into the disk.
    d.shale([
        "vdi",
        "write",
        "disk",
        "--offset",
        "0",
        "--pattern",
        "0xab",
        "--length",
        "1M",
    ])
    .ok();
    let file = tmp.path().join("blob");
    let blob: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &blob).unwrap();
    d.shale([
        "vdi",
        "write",
        "disk",
        "--offset",
        "1073741827",
        "--file",
        &s(&file),
    ])
    .ok();
    assert_eq!(read_bytes(&d, "disk", "1073741827", "100000"), blob);
    assert_eq!(read_bytes(&d, "disk", "4096", "4K"), vec![0xab; 4096]);
    let v = d.shale(["--json", "vdi", "show", "disk"]).ok().json();
    assert!(v["allocated_bytes"].as_u64().unwrap() >= 1 << 20, "{v}");
    let d0 = d.digest("disk");
    assert_ne!(d0, empty_digest);

    // Snapshot: same content, read-only.
    let snap = d
        .shale(["--json", "vdi", "snapshot", "disk", "--name", "snap1"])
        .ok()
        .json();
    assert_eq!(snap["kind"], "snapshot");
    assert_eq!(snap["read_only"], true);
    assert_eq!(snap["snapshot_of"]["name"], "disk");
    assert_eq!(d.digest("snap1"), d0);
    let v = d.shale(["--json", "vdi", "show", "disk"]).ok().json();
    assert_eq!(v["snapshots"][0]["name"], "snap1");

    // Writes to the VDI leave the snapshot unchanged.
    d.shale([
        "vdi",
        "write",
        "disk",
        "--offset",
        "512K",
        "--pattern",
        "0xcd",
        "--length",
        "1M",
    ])
    .ok();
    let d1 = d.digest("disk");
    assert_ne!(d1, d0);
    assert_eq!(d.digest("snap1"), d0);
    assert_eq!(read_bytes(&d, "snap1", "512K", "4K"), vec![0xab; 4096]);
    assert_eq!(read_bytes(&d, "disk", "512K", "4K"), vec![0xcd; 4096]);
    d.shale(["vdi", "write", "snap1", "--pattern", "1", "--length", "512"])
        .fails_with(&["read-only"])
        .one_line_error();

    // Clone: a new VDI equal to the snapshot, independent of it.
    let clone = d
        .shale(["--json", "vdi", "clone", "snap1", "--name", "clone1"])
        .ok()
        .json();
    assert_eq!(clone["kind"], "vdi");
    assert_eq!(clone["parent"]["name"], "snap1");
    assert_eq!(d.digest("clone1"), d0);
    d.shale([
        "vdi",
        "write",
        "clone1",
        "--offset",
        "2M",
        "--pattern",
        "7",
        "--length",
        "64K",
    ])
    .ok();
    assert_ne!(d.digest("clone1"), d0);
    assert_eq!(d.digest("snap1"), d0);

    // Revert: back to the snapshot's content.
    d.shale(["vdi", "revert", "disk", "snap1"]).ok();
    assert_eq!(d.digest("disk"), d0);

    // Resize: grow online; shrink only with --allow-shrink.
    let v = d
        .shale(["--json", "vdi", "resize", "disk", "8G"])
        .ok()
        .json();
    assert_eq!(v["size"], 8 * G);
    d.shale(["vdi", "resize", "disk", "4G"])
        .fails_with(&["--allow-shrink"])
        .one_line_error();
    let v = d
        .shale(["--json", "vdi", "resize", "disk", "4G", "--allow-shrink"])
        .ok()
        .json();
    assert_eq!(v["size"], 4 * G);
    assert_eq!(
        d.digest("disk"),
        d0,
        "shrinking back to the written size keeps the data"
    );

    // Names are unique per SR; a name in several SRs needs SR/NAME or the UUID.
    d.shale([
        "vdi", "create", "--sr", "local", "--name", "twin", "--size", "1G",
    ])
    .ok();
    let twin_fast = d
        .shale([
            "--json", "vdi", "create", "--sr", "fast", "--name", "twin", "--size", "2G",
        ])
        .ok()
        .json();
    d.shale(["vdi", "show", "twin"])
        .fails_with(&["ambiguous", "SR/NAME", "local", "fast"])
        .one_line_error();
    assert_eq!(
        d.shale(["--json", "vdi", "show", "fast/twin"]).ok().json()["size"],
        2 * G
    );
    assert_eq!(
        d.shale(["--json", "vdi", "show", "local/twin"]).ok().json()["size"],
        G
    );
    let by_uuid = d
        .shale(["--json", "vdi", "show", twin_fast["uuid"].as_str().unwrap()])
        .ok()
        .json();
    assert_eq!(by_uuid["sr_name"], "fast");
    d.shale(["vdi", "destroy", "twin"])
        .fails_with(&["ambiguous"]);
    d.shale(["vdi", "destroy", "fast/twin"]).ok();
    d.shale(["vdi", "show", "twin"]).ok();

    // vdi list: table and JSON, per SR.
    let table = d.shale(["vdi", "list"]).ok().stdout.clone();
    assert!(
        table.starts_with("NAME") && table.contains("snap1") && table.contains("clone1"),
        "{table}"
    );
    let local = d
        .shale(["--json", "vdi", "list", "--sr", "local"])
        .ok()
        .json();
    let mut n = names(&local);
    n.sort();
    assert_eq!(n, ["clone1", "disk", "snap1", "twin"]);
    assert!(names(
        &d.shale(["--json", "vdi", "list", "--sr", "fast"])
            .ok()
            .json()
    )
    .is_empty());

    // Destroying a snapshot that has clones hides it; the clone still reads through it.
    let r = d.shale(["--json", "vdi", "destroy", "snap1"]).ok().json();
    assert_eq!(r["hidden"], true);
    assert!(!names(&d.shale(["--json", "vdi", "list"]).ok().json()).contains(&"snap1".to_string()));
    let all = d.shale(["--json", "vdi", "list", "--all"]).ok().json();
    let hidden: Vec<_> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["hidden"] == true)
        .collect();
    assert_eq!(hidden.len(), 1, "{all}");
    assert_eq!(read_bytes(&d, "clone1", "0", "4K"), vec![0xab; 4096]);
    d.shale(["vdi", "destroy", "clone1"]).ok();
    d.shale(["sr", "gc", "local"]).ok();
    // `disk` was reverted to snap1 and still reads through it, so the hidden snapshot stays.
    let all = d.shale(["--json", "vdi", "list", "--all"]).ok().json();
    let hidden: Vec<_> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["hidden"] == true)
        .collect();
    assert_eq!(hidden.len(), 1, "{all}");
    assert_eq!(names(&hidden[0]["clones"]), ["disk"]);
    d.shale(["sr", "check"]).ok();
    let check = d.shale(["--json", "sr", "check", "local"]).ok().json();
    assert_eq!(check[0]["ok"], true);

    // Bad input: one clear line, non-zero exit.
    d.shale([
        "vdi", "create", "--sr", "nosuch", "--name", "a", "--size", "1G",
    ])
    .fails_with(&["unknown SR 'nosuch'"])
    .one_line_error();
    d.shale([
        "vdi", "create", "--sr", "local", "--name", "disk", "--size", "1G",
    ])
    .fails_with(&["already taken"])
    .one_line_error();
    d.shale([
        "vdi", "create", "--sr", "local", "--name", "odd", "--size", "1000",
    ])
    .fails_with(&["multiple of 512"])
    .one_line_error();
    d.shale([
        "vdi", "create", "--sr", "local", "--name", "zero", "--size", "0",
    ])
    .fails_with(&["invalid size"])
    .one_line_error();
    let bad_unit = d.shale([
        "vdi", "create", "--sr", "local", "--name", "u", "--size", "10X",
    ]);
    bad_unit.fails_with(&["unknown unit"]);
    assert_eq!(bad_unit.code, 2, "usage errors exit 2");
    for bad in ["65", "two"] {
        let serve = d.shale(["serve", "--nbd-io-threads", bad]);
        serve.fails_with(&["--nbd-io-threads"]);
        assert_eq!(serve.code, 2, "usage errors exit 2");
    }
    d.shale(["vdi", "resize", "disk", "1001"])
        .fails_with(&["multiple of 512"])
        .one_line_error();
    d.shale(["vdi", "show", "nosuch"])
        .fails_with(&["no VDI or snapshot 'nosuch'"])
        .one_line_error();
    d.shale(["vdi", "show", "local/nosuch"])
        .fails_with(&["no VDI or snapshot", "local"])
        .one_line_error();
    d.shale(["vdi", "revert", "disk", "nosnap"])
        .fails_with(&["nosnap"])
        .one_line_error();
    d.shale(["vdi", "snapshot", "disk", "--name", "bad/name"])
        .fails_with(&["invalid name"])
        .one_line_error();
    d.shale(["vdi", "read", "disk", "--offset", "4G", "--length", "1"])
        .fails_with(&["beyond the end"])
        .one_line_error();
    let blocker = tmp.path().join("a-file");
    std::fs::write(&blocker, b"x").unwrap();
    d.shale([
        "sr",
        "create",
        "--name",
        "nope",
        "--path",
        &s(&blocker.join("sr")),
    ])
    .fails_with(&["not writable"])
    .one_line_error();
    d.shale([
        "sr",
        "create",
        "--name",
        "fast",
        "--path",
        &s(&tmp.path().join("other")),
    ])
    .fails_with(&["already exists"])
    .one_line_error();
    d.shale(["sr", "create", "--name", "again", "--path", &s(&fast)])
        .fails_with(&["already used by SR 'fast'"])
        .one_line_error();
    d.shale([
        "sr",
        "create",
        "--name",
        "x",
        "--type",
        "lvm",
        "--path",
        &s(&tmp.path().join("x")),
    ])
    .fails_with(&["unknown SR type 'lvm'"])
    .one_line_error();
    d.shale([
        "sr",
        "create",
        "--name",
        "x",
        "--path",
        &s(&tmp.path().join("x")),
        "--cluster-size",
        "3K",
    ])
    .fails_with(&["cluster size"])
    .one_line_error();
    assert!(
        !tmp.path().join("x").exists(),
        "a failed sr create leaves no directory behind"
    );
    d.shale(["sr", "show", "nosuch"])
        .fails_with(&["unknown SR"])
        .one_line_error();
    run_shale(&tmp.path().join("no.sock"), ["sr", "list"])
        .fails_with(&["cannot reach shale daemon at", "is `shale serve` running?"])
        .one_line_error();

    // sr destroy refuses while VDIs exist, unless --force.
    d.shale([
        "vdi", "create", "--sr", "fast", "--name", "keep", "--size", "1G",
    ])
    .ok();
    d.shale(["sr", "destroy", "fast"])
        .fails_with(&["--force"])
        .one_line_error();
    d.shale(["sr", "destroy", "fast", "--force"]).ok();
    assert!(!fast.exists(), "SR directory removed");
    assert_eq!(
        names(&d.shale(["--json", "sr", "list"]).ok().json()),
        ["local"]
    );
    // With one SR left, --sr is optional.
    d.shale(["vdi", "create", "--name", "solo", "--size", "1G"])
        .ok();

    // A second daemon on the same state directory is refused.
    let mut second = Daemon::spawn(&state);
    let st = second
        .wait_exit(Duration::from_secs(30))
        .expect("second daemon should exit");
    assert!(!st.success());
    let log = second.log_text();
    assert!(
        log.contains("already running") && log.contains(&d.pid().to_string()),
        "{log}"
    );
    drop(second);
    d.shale(["sr", "list"]).ok();

    // SIGTERM stops cleanly; the data survives a restart.
    let socket = d.socket.clone();
    let st = d.stop();
    assert!(st.success(), "daemon exit status {st}");
    assert!(!socket.exists(), "socket removed on stop");
    let d = Daemon::start(&state);
    assert_eq!(d.digest("disk"), d0);
    assert_eq!(read_bytes(&d, "disk", "1073741827", "100000"), blob);
    d.shale(["sr", "check", "local"]).ok();
    assert!(d.stop().success());
}

#[test]
fn full_sr_fails_cleanly_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("state"));
    let small = tmp.path().join("small");
    d.create_small_sr("small", &small, "4M");
    let sr = d.shale(["--json", "sr", "show", "small"]).ok().json();
    assert_eq!(sr["capacity"], 4 << 20);

    d.shale([
        "vdi", "create", "--sr", "small", "--name", "a", "--size", "64M",
    ])
    .ok();
    d.shale([
        "vdi", "create", "--sr", "small", "--name", "b", "--size", "64M",
    ])
    .ok();
    d.shale([
        "vdi",
        "write",
        "small/a",
        "--pattern",
        "0x5a",
        "--length",
        "2M",
    ])
    .ok();
    let da = d.digest("small/a");

    // b cannot get 8 MiB out of the 2 MiB left.
    d.shale([
        "vdi",
        "write",
        "small/b",
        "--pattern",
        "0x66",
        "--length",
        "8M",
    ])
    .fails_with(&["SR 'small' is full"])
    .one_line_error();
    // Existing data and metadata are intact.
    assert_eq!(d.digest("small/a"), da);
    d.shale(["sr", "check", "small"]).ok();
    d.shale([
        "vdi",
        "write",
        "small/a",
        "--offset",
        "2M",
        "--pattern",
        "1",
        "--length",
        "1M",
    ])
    .fails_with(&["full"]);
    assert_eq!(d.digest("small/a"), da);

    // Free space: destroy b, reclaim, and writes work again.
    d.shale(["vdi", "destroy", "small/b"]).ok();
    d.shale(["sr", "gc", "small"]).ok();
    let sr = d.shale(["--json", "sr", "show", "small"]).ok().json();
    assert!(sr["reclaimed_bytes"].as_u64().unwrap() > 0, "{sr}");
    d.shale([
        "vdi",
        "write",
        "small/a",
        "--offset",
        "2M",
        "--pattern",
        "0x77",
        "--length",
        "1M",
    ])
    .ok();
    assert_eq!(read_bytes(&d, "small/a", "2M", "4K"), vec![0x77; 4096]);
    assert_eq!(read_bytes(&d, "small/a", "0", "4K"), vec![0x5a; 4096]);
    d.shale(["sr", "check", "small"]).ok();
    assert!(d.stop().success());
}

/// Changed-block tracking, used the way an incremental backup uses it: a full copy of snapshot `base`, then
/// `vdi diff inc1 --from base` names the extents to copy from snapshot `inc1`, and the patched copy equals
/// `inc1` byte for byte. The VDI's own diff follows later writes; bad pairs get one clear line.
#[test]
fn changed_blocks_make_an_incremental_backup() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("state"));
    let sr = d.shale(["sr", "show", "local"]).ok().stdout.clone();
    assert!(sr.contains("changed-blocks"), "{sr}");
    d.shale(["vdi", "create", "--name", "d", "--size", "8M"])
        .ok();
    d.shale(["vdi", "write", "d", "--pattern", "0x11", "--length", "6M"])
        .ok();
    d.shale(["vdi", "snapshot", "d", "--name", "base"]).ok();
    let mut backup = read_bytes(&d, "base", "0", "8M");

    let diff = d
        .shale(["--json", "vdi", "diff", "d", "--from", "base"])
        .ok()
        .json();
    assert_eq!(diff["extents"].as_array().map(Vec::len), Some(0), "{diff}");

    // Writes after the snapshot: 4 KiB inside one cluster, one whole cluster, zeroes over data.
    for (offset, pattern, length) in [
        ("1M", "0x22", "4K"),
        ("5M", "0x33", "64K"),
        ("3M", "0", "4K"),
    ] {
        d.shale([
            "vdi",
            "write",
            "d",
            "--offset",
            offset,
            "--pattern",
            pattern,
            "--length",
            length,
        ])
        .ok();
    }
    d.shale(["vdi", "snapshot", "d", "--name", "inc1"]).ok();
    let diff = d
        .shale(["--json", "vdi", "diff", "inc1", "--from", "base"])
        .ok()
        .json();
    assert_eq!(diff["granularity"], 65536);
    assert_eq!(diff["size"], 8 << 20);
    let extents = shale_tests::diff_extents(&diff);
    assert_eq!(
        extents,
        [(1 << 20, 65536), (3 << 20, 65536), (5 << 20, 65536)],
        "{diff}"
    );
    assert_eq!(diff["changed_bytes"], 3 * 65536);
    for (offset, length) in &extents {
        let bytes = read_bytes(&d, "inc1", &offset.to_string(), &length.to_string());
        backup[*offset as usize..(*offset + *length) as usize].copy_from_slice(&bytes);
    }
    assert!(
        backup == read_bytes(&d, "inc1", "0", "8M"),
        "the full backup patched with the changed extents differs from inc1"
    );

    // The text form, and the live VDI after one more write.
    d.shale([
        "vdi",
        "write",
        "d",
        "--offset",
        "7M",
        "--pattern",
        "0x44",
        "--length",
        "512",
    ])
    .ok();
    let text = d
        .shale(["vdi", "diff", "d", "--from", "inc1"])
        .ok()
        .stdout
        .clone();
    assert!(
        text.contains("7340032") && text.contains("64 KiB changed in 1 extent(s) of 'd'"),
        "{text}"
    );

    // Bad pairs: older against newer, a VDI as the base, an unknown snapshot.
    d.shale(["vdi", "diff", "base", "--from", "inc1"])
        .fails_with(&["taken before"])
        .one_line_error();
    d.shale(["vdi", "diff", "inc1", "--from", "d"])
        .fails_with(&["is a vdi", "snapshot"])
        .one_line_error();
    d.shale(["vdi", "diff", "d", "--from", "nope"])
        .fails_with(&["nope"])
        .one_line_error();
}
