//! Shale's NBD server driven by real clients: qemu-img, qemu-io, nbdinfo, nbdcopy, fio's nbd engine and
//! libnbd's Python bindings (what nbdsh runs). Every export is a `FileDevice` on a sparse temp file.
//!
//! A test whose tool is missing prints `SKIP: …` and passes; CI installs qemu-utils, libnbd-bin, fio and
//! python3-libnbd so that nothing is skipped there.

mod common;

use std::path::Path;

use common::*;
use shale_block::nbd::NbdClient;
use shale_block::{BlockDevice, IoBuf, WriteFlags};

const MIB: u64 = 1 << 20;

/// `(start, length)` runs that `qemu-img map --output=json` reports as data, merged.
async fn qemu_data_ranges(args: &[&str]) -> Vec<(u64, u64)> {
    let mut full = vec!["map", "--output=json"];
    full.extend_from_slice(args);
    let out = run_ok("qemu-img", &full).await;
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img map json");
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().expect("array") {
        if e["data"].as_bool() != Some(true) {
            continue;
        }
        let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        match runs.last_mut() {
            Some((ps, pl)) if *ps + *pl == s => *pl += l,
            _ => runs.push((s, l)),
        }
    }
    runs
}

/// A local raw image with three data runs and holes elsewhere.
async fn make_source(path: &Path) {
    let p = path.to_str().unwrap();
    run_ok("qemu-img", &["create", "-q", "-f", "raw", p, "64M"]).await;
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 1M 2M",
            "-c",
            "write -P 0xcd 10M 64k",
            "-c",
            "write -P 0x01 63M 1M",
            p,
        ],
    )
    .await;
}

const SOURCE_DATA: [(u64, u64); 3] = [(MIB, 2 * MIB), (10 * MIB, 64 << 10), (63 * MIB, MIB)];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_info_convert_compare_map() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let s = serve().await;
    s.export_file("vol", 64 * MIB, false);
    let uri = s.unix_uri("vol");
    let tcp = s.tcp_uri("vol");
    let src = s.path("src.raw");
    make_source(&src).await;
    let src = src.to_str().unwrap();

    let info: serde_json::Value =
        serde_json::from_str(&run_ok("qemu-img", &["info", "--output=json", &uri]).await).unwrap();
    assert_eq!(info["virtual-size"].as_u64(), Some(64 * MIB));

    // raw in: local raw -> NBD, then compare over both transports.
    run_ok(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src, &uri],
    )
    .await;
    run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src, &uri],
    )
    .await;
    run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src, &tcp],
    )
    .await;
    // Block status through NBD shows exactly the written runs as data: holes were never written.
    assert_eq!(
        qemu_data_ranges(&["-f", "raw", &uri]).await,
        SOURCE_DATA.to_vec()
    );

    // qcow2 out: NBD -> qcow2; the holes must not be allocated in the result.
    let out = s.path("out.qcow2");
    let out = out.to_str().unwrap();
    run_ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", &uri, out],
    )
    .await;
    run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", src, out],
    )
    .await;
    assert_eq!(
        qemu_data_ranges(&["-f", "qcow2", out]).await,
        SOURCE_DATA.to_vec()
    );

    // raw out.
    let out_raw = s.path("out.raw");
    let out_raw = out_raw.to_str().unwrap();
    run_ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &tcp, out_raw],
    )
    .await;
    run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src, out_raw],
    )
    .await;

    // qcow2 in: a qcow2 with different data -> NBD (zeroing the rest), compare.
    let qin = s.path("in.qcow2");
    let qin = qin.to_str().unwrap();
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", qin, "64M"]).await;
    run_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x77 5M 3M", qin],
    )
    .await;
    run_ok(
        "qemu-img",
        &["convert", "-n", "-f", "qcow2", "-O", "raw", qin, &uri],
    )
    .await;
    run_ok(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", qin, &uri],
    )
    .await;
    assert_eq!(
        qemu_data_ranges(&["-f", "raw", &uri]).await,
        vec![(5 * MIB, 3 * MIB)]
    );
    // Different content must be detected, too.
    let diff = run(
        "qemu-img",
        &["compare", "-q", "-f", "raw", "-F", "raw", src, &uri],
    )
    .await;
    assert_eq!(diff.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_pattern_writes_and_reads() {
    if !have("qemu-io") {
        return;
    }
    let s = serve().await;
    s.export_file("vol", 16 * MIB, false);
    for uri in [s.unix_uri("vol"), s.tcp_uri("vol")] {
        let out = run_ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0x5a 0 1M",
                "-c",
                "read -P 0x5a 0 1M",
                "-c",
                "aio_write -P 0x11 2M 64k",
                "-c",
                "aio_write -P 0x22 3M 64k",
                "-c",
                "aio_flush",
                "-c",
                "read -P 0x11 2M 64k",
                "-c",
                "read -P 0x22 3M 64k",
                "-c",
                "write -z 0 512k",
                "-c",
                "read -P 0 0 512k",
                "-c",
                "read -P 0x5a 512k 512k",
                "-c",
                "discard 512k 64k",
                "-c",
                "read -P 0 512k 64k",
                "-c",
                "write -f -P 0x33 4M 4k",
                "-c",
                "read -P 0x33 4M 4k",
                "-c",
                "writev -P 0x44 5M 4k 8k 4k",
                "-c",
                "readv -P 0x44 5M 8k 8k",
                "-c",
                "flush",
                &uri,
            ],
        )
        .await;
        assert!(
            !out.contains("fail") && !out.contains("error"),
            "qemu-io reported a problem:\n{out}"
        );
        assert_eq!(out.matches("read ").count(), 8, "{out}");
    }
}

/// Parse `nbdinfo --map` lines into `(offset, length, type)`.
fn parse_map(out: &str) -> Vec<(u64, u64, u32)> {
    out.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((
                it.next()?.parse().ok()?,
                it.next()?.parse().ok()?,
                it.next()?.parse().ok()?,
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_list_map_can() {
    if !have("nbdinfo") {
        return;
    }
    let s = serve().await;
    s.export_file("vol", 64 * MIB, false);
    s.export_file("snap", 8 * MIB, true);
    let uri = s.tcp_uri("vol");
    let ro = s.unix_uri("snap");

    let list = run_ok("nbdinfo", &["--list", "--json", &s.tcp_uri("")]).await;
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let exports = v["exports"].as_array().unwrap();
    let names: Vec<&str> = exports
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["snap", "vol"]);
    assert_eq!(exports[1]["description"].as_str(), Some("test export vol"));
    assert_eq!(exports[1]["export-size"].as_u64(), Some(64 * MIB));
    assert_eq!(exports[0]["is_read_only"].as_bool(), Some(true));
    assert_eq!(exports[1]["block_size_minimum"].as_u64(), Some(512));
    assert_eq!(exports[1]["block_size_maximum"].as_u64(), Some(32 * MIB));

    let c = NbdClient::connect_uri(&uri).await.unwrap();
    c.write(
        MIB,
        IoBuf::from_slice(&pattern(MIB, MIB as usize, 1)),
        WriteFlags::default(),
    )
    .await
    .unwrap();
    c.write(
        8 * MIB,
        IoBuf::from_slice(&pattern(0, 4096, 1)),
        WriteFlags::FUA,
    )
    .await
    .unwrap();
    let map = parse_map(&run_ok("nbdinfo", &["--map", &uri]).await);
    assert_eq!(
        map,
        vec![
            (0, MIB, 3),
            (MIB, MIB, 0),
            (2 * MIB, 6 * MIB, 3),
            (8 * MIB, 4096, 0),
            (8 * MIB + 4096, 56 * MIB - 4096, 3)
        ]
    );
    // The map agrees with what was written after a discard, too.
    c.discard(MIB, MIB).await.unwrap();
    let map = parse_map(&run_ok("nbdinfo", &["--map", &uri]).await);
    assert_eq!(
        map,
        vec![
            (0, 8 * MIB, 3),
            (8 * MIB, 4096, 0),
            (8 * MIB + 4096, 56 * MIB - 4096, 3)
        ]
    );
    assert_eq!(
        run_ok("nbdinfo", &["--size", &uri]).await.trim(),
        (64 * MIB).to_string()
    );

    for cap in [
        "flush",
        "trim",
        "zero",
        "fast-zero",
        "multi-conn",
        "fua",
        "cache",
        "df",
        "structured-reply",
        "write",
    ] {
        let st = run("nbdinfo", &["--can", cap, &uri]).await.status;
        assert!(st.success(), "nbdinfo --can {cap} said no");
    }
    assert!(!run("nbdinfo", &["--is", "read-only", &uri])
        .await
        .status
        .success());
    assert!(run("nbdinfo", &["--is", "read-only", &ro])
        .await
        .status
        .success());
    assert!(!run("nbdinfo", &["--can", "write", &ro])
        .await
        .status
        .success());
    assert!(!run("nbdinfo", &["--can", "trim", &ro])
        .await
        .status
        .success());
    // Unknown export: a clean error, and the server is still fine afterwards.
    assert!(!run("nbdinfo", &[&s.tcp_uri("nope")]).await.status.success());
    run_ok("nbdinfo", &[&uri]).await;
}

fn allocated_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_both_directions() {
    if !have("nbdcopy") || !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let s = serve().await;
    s.export_file("a", 64 * MIB, false);
    s.export_file("b", 64 * MIB, false);
    let src = s.path("src.raw");
    make_source(&src).await;
    let (a_unix, a_tcp, b_unix) = (s.unix_uri("a"), s.tcp_uri("a"), s.unix_uri("b"));
    let srcs = src.to_str().unwrap();

    // Local file -> NBD (multi-conn, several requests in flight).
    run_ok(
        "nbdcopy",
        &["--flush", "--connections=4", "--requests=16", srcs, &a_unix],
    )
    .await;
    run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", srcs, &a_tcp],
    )
    .await;

    // NBD -> local file: identical content, and sparse (the holes were skipped via block status).
    let out = s.path("out.raw");
    let outs = out.to_str().unwrap();
    run_ok("nbdcopy", &[&a_tcp, outs]).await;
    assert!(std::fs::read(&src).unwrap() == std::fs::read(&out).unwrap());
    assert!(
        allocated_bytes(&out) < 16 * MIB,
        "copy is not sparse: {} bytes allocated",
        allocated_bytes(&out)
    );

    // NBD -> NBD across transports.
    run_ok("nbdcopy", &["--flush", &a_tcp, &b_unix]).await;
    run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", srcs, &b_unix],
    )
    .await;
    assert_eq!(
        qemu_data_ranges(&["-f", "raw", &b_unix]).await,
        SOURCE_DATA.to_vec()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_nbd_engine_verify_multi_conn() {
    if !have("fio") {
        return;
    }
    let s = serve().await;
    s.export_file("vol", 128 * MIB, false);
    // The package directory of this run (cargo and nextest set it), not of the build: a test binary built from
    // another checkout sharing the target directory would point there.
    let job = std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../tools/fio/nbd-verify.fio");
    for uri in [s.tcp_uri("vol"), s.unix_uri("vol")] {
        let out = tokio::process::Command::new("fio")
            .arg(&job)
            .env("NBD_URI", &uri)
            .kill_on_drop(true)
            .output()
            .await
            .expect("run fio");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("err= 0"),
            "fio failed on {uri}:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Several jobs means several connections at once.
        assert!(stdout.contains("jobs=6"), "{stdout}");
    }
}

/// libnbd (through its Python bindings, as nbdsh uses it) with client-side checks switched off, so the
/// server's own answers are seen: EPERM on a read-only export, EINVAL/ENOSPC out of range, EINVAL misaligned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libnbd_sees_spec_errors_and_limits() {
    let Some(py) = nbd_python() else {
        return;
    };
    let s = serve().await;
    s.export_file("vol", 8 * MIB, false);
    s.export_file("snap", 8 * MIB, true);
    let script = format!(
        r#"
import errno, nbd
def expect(fn, code):
    try:
        fn()
    except nbd.Error as e:
        assert e.errnum == code, (e.errnum, e.string)
        return
    raise AssertionError("no error, expected %d" % code)

ro = nbd.NBD()
ro.connect_uri("{ro}")
assert ro.is_read_only() == 1 and ro.can_trim() == 0
ro.set_strict_mode(0)
expect(lambda: ro.pwrite(b"x" * 512, 0), errno.EPERM)
expect(lambda: ro.trim(512, 0), errno.EPERM)
expect(lambda: ro.zero(512, 0), errno.EPERM)
assert ro.pread(512, 0) == bytes(512)
ro.shutdown()

h = nbd.NBD()
h.add_meta_context("base:allocation")
h.set_full_info(True)
h.connect_uri("{rw}")
assert h.get_block_size(nbd.SIZE_MINIMUM) == 512
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20
assert h.can_multi_conn() == 1 and h.can_fua() == 1 and h.can_fast_zero() == 1
assert h.can_meta_context("base:allocation") == 1
assert h.get_export_description() == "test export vol"
assert h.get_canonical_export_name() == "vol"
h.set_strict_mode(0)
size = h.get_size()
expect(lambda: h.pread(512, size), errno.EINVAL)
expect(lambda: h.pwrite(b"y" * 512, size), errno.ENOSPC)
expect(lambda: h.pread(100, 1), errno.EINVAL)
h.pwrite(b"z" * 4096, 4096, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 4096) == b"z" * 4096
h.zero(4096, 4096, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(4096, 4096) == bytes(4096)
seen = []
h.block_status(1 << 20, 0, lambda ctx, off, ents, err: seen.append((ctx, list(ents))))
assert seen and seen[0][0] == "base:allocation", seen
h.shutdown()
print("libnbd checks passed")
"#,
        ro = s.unix_uri("snap"),
        rw = s.tcp_uri("vol"),
    );
    let out = run_ok(&py, &["-c", &script]).await;
    assert!(out.contains("libnbd checks passed"), "{out}");
}
