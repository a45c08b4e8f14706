//! Benchmark of the native thin engine, with qemu's qcow2 as the peer in the same run (issue 2, "Benchmarks").
//!
//! Measures, on a throwaway SR in `--dir` (O_DIRECT data I/O through the io_uring engine, 64 KiB clusters):
//! 1. snapshot and clone latency (median / p99 of `--samples` each) for a 1 GiB and a 1 TiB VDI, empty and
//!    written (the 1 GiB VDI fully, the 1 TiB VDI with 2 GiB spread over its whole range);
//! 2. 4k random read IOPS at QD32 on a fully written 1 GiB VDI with 0, 10 and 100 snapshots (100 random 4k writes
//!    after every snapshot, so the map holds many epochs), plus reads of the oldest snapshot and of a clone;
//! 3. 4k random write IOPS at QD32 on a fresh VDI (every write allocates a cluster), on a fully written VDI
//!    (in place: the head owns every cluster) and right after a snapshot (redirect on write: every write hits a
//!    cluster the snapshot can see);
//! 4. the qcow2 peer through `qemu-img bench` (cache=none, aio=io_uring, QD32, 4k): backing chains of depth
//!    0/10/100 built with `qemu-img create -b` and `qemu-io -c 'write -P'` (100 random 4k writes per layer), and
//!    4k writes into a fresh image, a fully written image, and a fresh overlay on a full image.
//!
//! `qemu-img bench` has no random mode: it walks offsets with a fixed step modulo the image size. The step used
//! (an odd multiple of the block size) visits every block in a scattered order, so the peer's pattern is
//! "strided", not random; for the distinct-cluster write rows both sides touch every cluster once.
//!
//! Usage: `cargo run -p shale-snapshot --example engine_bench -- --dir DIR [--secs 5] [--samples 20] [--no-qemu]
//! [--keep]` (normally via `tools/bench/engine-bench.sh`). Prints a Markdown table.

use std::error::Error;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt, TryStreamExt};
use shale_block::uring::{IoEngine, IoEngineConfig};
use shale_block::{BlockDevice, IoBuf, WriteFlags};
use shale_snapshot::{Engine, SrConfig, Volume};

type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;
const BS: u64 = 4 * KIB;
const CLUSTER: u64 = 64 * KIB;
const QD: usize = 32;
/// Virtual size of the VDIs (and qcow2 images) used for IOPS.
const IOPS_SIZE: u64 = GIB;
/// Random 4k writes between two snapshots (and in each qcow2 layer).
const WRITES_PER_LAYER: usize = 100;
/// Odd step (in blocks) for `qemu-img bench`: odd, so it is coprime with the power-of-two block count and the
/// walk visits every block (or cluster) once before repeating.
const QEMU_STEP_BLOCKS: u64 = 104_729;
const QEMU_STEP_CLUSTERS: u64 = 4_099;

static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Progress on stderr, with the time since start.
macro_rules! log {
    ($($a:tt)*) => {
        eprintln!("{:7.1}s {}", START.get_or_init(Instant::now).elapsed().as_secs_f64(), format!($($a)*))
    };
}

/// Attach a message to an error.
trait Ctx<T> {
    fn ctx(self, what: &str) -> Res<T>;
}

impl<T, E: std::fmt::Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Res<T> {
        self.map_err(|e| format!("{what}: {e}").into())
    }
}

struct Args {
    dir: PathBuf,
    secs: f64,
    samples: usize,
    qemu: bool,
    keep: bool,
}

fn usage() -> String {
    "usage: engine_bench --dir DIR [--secs SECONDS_PER_POINT] [--samples N] [--no-qemu] [--keep]"
        .into()
}

fn parse_args() -> Res<Args> {
    let mut a = Args {
        dir: PathBuf::new(),
        secs: 5.0,
        samples: 20,
        qemu: true,
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .ok_or_else(|| format!("{name} needs a value\n{}", usage()))
        };
        match arg.as_str() {
            "--dir" => a.dir = PathBuf::from(val("--dir")?),
            "--secs" => a.secs = val("--secs")?.parse().ctx("--secs")?,
            "--samples" => a.samples = val("--samples")?.parse().ctx("--samples")?,
            "--no-qemu" => a.qemu = false,
            "--keep" => a.keep = true,
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}\n{}", usage()).into()),
        }
    }
    if a.dir.as_os_str().is_empty() {
        return Err(usage().into());
    }
    if !a.secs.is_finite() || a.secs <= 0.0 || a.samples == 0 {
        return Err("--secs and --samples must be positive".into());
    }
    Ok(a)
}

/// xorshift64*: deterministic and cheap.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Latency samples in microseconds (or any unit) and their order statistics.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Read,
    Write,
}

/// Where the n-th request goes.
enum Offsets {
    /// A uniformly random 4k block of the first `size` bytes.
    Random { size: u64 },
    /// The n-th cluster of a random permutation, at a random 4k block inside it: every request hits a cluster no
    /// other request touched.
    Distinct { perm: Vec<u32> },
}

impl Offsets {
    fn get(&self, n: u64, rng: &mut Rng) -> u64 {
        match self {
            Offsets::Random { size } => rng.below(size / BS) * BS,
            Offsets::Distinct { perm } => {
                let c = u64::from(perm[n as usize % perm.len()]);
                c * CLUSTER + rng.below(CLUSTER / BS) * BS
            }
        }
    }

    fn distinct(size: u64, seed: u64) -> Offsets {
        let n = (size / CLUSTER) as u32;
        let mut perm: Vec<u32> = (0..n).collect();
        let mut rng = Rng::new(seed);
        for i in (1..perm.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            perm.swap(i, j);
        }
        Offsets::Distinct { perm }
    }
}

struct IopsResult {
    iops: f64,
    p50_us: f64,
    p99_us: f64,
}

/// Run `op` with `qd` requests in flight (one tokio task each) until `secs` pass or `max_ops` are done.
async fn run_qd(
    vol: &Arc<Volume>,
    op: Op,
    offsets: Arc<Offsets>,
    secs: f64,
    max_ops: u64,
) -> Res<IopsResult> {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::with_capacity(QD);
    for t in 0..QD {
        let (vol, offsets, next) = (vol.clone(), offsets.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(0x5EED + t as u64);
            let mut lat = Vec::new();
            let mut rbuf = Some(IoBuf::zeroed(BS as usize));
            let pattern = IoBuf::from_slice(&[0xA5u8; BS as usize]);
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= max_ops || Instant::now() >= deadline {
                    break;
                }
                let off = offsets.get(n, &mut rng);
                let t0 = Instant::now();
                match op {
                    Op::Read => {
                        let buf = rbuf.take().unwrap_or_else(|| IoBuf::zeroed(BS as usize));
                        rbuf = Some(vol.read(off, buf).await?);
                    }
                    Op::Write => {
                        vol.write(off, pattern.clone(), WriteFlags::default())
                            .await?;
                    }
                }
                lat.push(t0.elapsed().as_secs_f64() * 1e6);
            }
            Ok::<_, shale_block::BlockError>(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.ctx("I/O task")?.ctx("I/O")?);
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    Ok(IopsResult {
        iops: lat.len() as f64 / elapsed,
        p50_us: pct(&lat, 0.5),
        p99_us: pct(&lat, 0.99),
    })
}

/// Write 1 MiB chunks at the given offsets, 4 in flight, then flush.
async fn fill(vol: &Arc<Volume>, offsets: Vec<u64>) -> Res<()> {
    if !offsets.is_empty() {
        log!("[shale]   writing {} MiB in 1 MiB writes", offsets.len());
    }
    let chunk = IoBuf::from_slice(&vec![0x3Cu8; MIB as usize]);
    stream::iter(offsets)
        .map(|o| {
            let buf = chunk.clone();
            async move { vol.write(o, buf, WriteFlags::default()).await }
        })
        .buffer_unordered(4)
        .try_collect::<Vec<()>>()
        .await
        .ctx("fill")?;
    vol.flush().await.ctx("flush")?;
    Ok(())
}

/// `n` random 4k writes, QD32.
async fn scatter_writes(vol: &Arc<Volume>, n: usize, seed: u64) -> Res<()> {
    let mut rng = Rng::new(seed);
    let offs: Vec<u64> = (0..n)
        .map(|_| rng.below(vol.info().size / BS) * BS)
        .collect();
    let pattern = IoBuf::from_slice(&[seed as u8; BS as usize]);
    stream::iter(offs)
        .map(|o| {
            let buf = pattern.clone();
            async move { vol.write(o, buf, WriteFlags::default()).await }
        })
        .buffer_unordered(QD)
        .try_collect::<Vec<()>>()
        .await
        .ctx("scatter writes")?;
    Ok(())
}

/// Median and p99 of a latency series, in milliseconds.
struct Lat {
    p50_ms: f64,
    p99_ms: f64,
}

fn lat_of(mut v: Vec<f64>) -> Lat {
    v.sort_by(f64::total_cmp);
    Lat {
        p50_ms: pct(&v, 0.5),
        p99_ms: pct(&v, 0.99),
    }
}

struct SnapRow {
    label: &'static str,
    snap: Lat,
    clone: Lat,
    /// `Engine::info` of the last snapshot alone (part of what `snapshot()` returns).
    info: Lat,
}

#[derive(Default)]
struct ShaleResults {
    snaps: Vec<SnapRow>,
    read0: Option<IopsResult>,
    read10: Option<IopsResult>,
    read100: Option<IopsResult>,
    read_oldest: Option<IopsResult>,
    read_clone: Option<IopsResult>,
    write_fresh: Option<IopsResult>,
    write_inplace: Option<IopsResult>,
    write_cow: Option<IopsResult>,
    uring: bool,
}

async fn shale_bench(args: &Args, out: &mut ShaleResults) -> Res<()> {
    let io = IoEngine::new(IoEngineConfig::default()).ctx("start io engine")?;
    out.uring = io.is_uring();
    let dir = args.dir.join("sr");
    let engine = Engine::create(
        &dir,
        SrConfig {
            cluster_size: CLUSTER as u32,
            capacity: None,
        },
        io,
    )
    .ctx("create SR")?;

    // 1. Snapshot / clone latency vs size and fill.
    let cases: [(&'static str, u64, Vec<u64>); 4] = [
        ("1 GiB VDI, empty", GIB, vec![]),
        (
            "1 GiB VDI, 1 GiB written",
            GIB,
            (0..GIB / MIB).map(|i| i * MIB).collect(),
        ),
        ("1 TiB VDI, empty", TIB, vec![]),
        (
            "1 TiB VDI, 2 GiB written",
            TIB,
            // 2048 x 1 MiB spread over the whole 1 TiB (one every 512 MiB).
            (0..2 * GIB / MIB).map(|i| i * (TIB / 2048)).collect(),
        ),
    ];
    for (ci, (label, size, offs)) in cases.into_iter().enumerate() {
        log!("[shale] snapshot/clone latency: {label}");
        let vdi = engine
            .create_vdi(&format!("lat{ci}"), size)
            .await
            .ctx("create VDI")?;
        let vol = engine.open_volume(vdi.uuid).ctx("open VDI")?;
        fill(&vol, offs).await?;
        let mut snaps = Vec::with_capacity(args.samples);
        let mut st = Vec::with_capacity(args.samples);
        for i in 0..args.samples {
            let t = Instant::now();
            let s = engine
                .snapshot(vdi.uuid, &format!("lat{ci}-s{i}"))
                .await
                .ctx("snapshot")?;
            st.push(t.elapsed().as_secs_f64() * 1e3);
            snaps.push(s.uuid);
        }
        let mut ct = Vec::with_capacity(args.samples);
        for (i, s) in snaps.iter().enumerate() {
            let t = Instant::now();
            engine
                .clone_snapshot(*s, &format!("lat{ci}-c{i}"))
                .await
                .ctx("clone")?;
            ct.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let mut it = Vec::new();
        let last = *snaps.last().ok_or("no snapshots")?;
        for _ in 0..args.samples.min(5) {
            let t = Instant::now();
            engine.info(last).ctx("info")?;
            it.push(t.elapsed().as_secs_f64() * 1e3);
        }
        out.snaps.push(SnapRow {
            label,
            snap: lat_of(st),
            clone: lat_of(ct),
            info: lat_of(it),
        });
    }

    let secs = args.secs;
    let all = IOPS_SIZE / CLUSTER;

    // 3a. Allocating writes on a fresh VDI: each request hits a cluster nothing maps yet.
    log!("[shale] 4k randwrite, fresh VDI");
    let fresh = engine
        .create_vdi("fresh", IOPS_SIZE)
        .await
        .ctx("create VDI")?;
    let fresh = engine.open_volume(fresh.uuid).ctx("open VDI")?;
    out.write_fresh = Some(
        run_qd(
            &fresh,
            Op::Write,
            Arc::new(Offsets::distinct(IOPS_SIZE, 1)),
            secs,
            all,
        )
        .await?,
    );
    drop(fresh);

    // 3c. Writes right after a snapshot: each request hits a cluster the snapshot sees (redirect on write).
    log!("[shale] 4k randwrite, right after a snapshot (CoW)");
    let cow = engine
        .create_vdi("cow", IOPS_SIZE)
        .await
        .ctx("create VDI")?;
    let cowv = engine.open_volume(cow.uuid).ctx("open VDI")?;
    fill(&cowv, (0..IOPS_SIZE / MIB).map(|i| i * MIB).collect()).await?;
    engine.snapshot(cow.uuid, "cow-s").await.ctx("snapshot")?;
    out.write_cow = Some(
        run_qd(
            &cowv,
            Op::Write,
            Arc::new(Offsets::distinct(IOPS_SIZE, 2)),
            secs,
            all,
        )
        .await?,
    );
    drop(cowv);

    // 2. Reads vs snapshot count, and 3b. in-place writes, on one fully written VDI.
    log!("[shale] 4k randread, 0 snapshots");
    let rd = engine.create_vdi("rd", IOPS_SIZE).await.ctx("create VDI")?;
    let rdv = engine.open_volume(rd.uuid).ctx("open VDI")?;
    fill(&rdv, (0..IOPS_SIZE / MIB).map(|i| i * MIB).collect()).await?;
    let random = Arc::new(Offsets::Random { size: IOPS_SIZE });
    out.read0 = Some(run_qd(&rdv, Op::Read, random.clone(), secs, u64::MAX).await?);
    log!("[shale] 4k randwrite, in place");
    out.write_inplace = Some(run_qd(&rdv, Op::Write, random.clone(), secs, u64::MAX).await?);
    let mut snaps = Vec::new();
    for target in [10usize, 100] {
        log!("[shale]   taking snapshots up to {target}, {WRITES_PER_LAYER} random 4k writes after each");
        while snaps.len() < target {
            let i = snaps.len();
            let s = engine
                .snapshot(rd.uuid, &format!("rd-s{i}"))
                .await
                .ctx("snapshot")?;
            snaps.push(s.uuid);
            scatter_writes(&rdv, WRITES_PER_LAYER, 1000 + i as u64).await?;
        }
        log!("[shale] 4k randread, {target} snapshots");
        let r = run_qd(&rdv, Op::Read, random.clone(), secs, u64::MAX).await?;
        if target == 10 {
            out.read10 = Some(r);
        } else {
            out.read100 = Some(r);
        }
    }
    log!("[shale] 4k randread, oldest of 100 snapshots");
    let oldest = engine.open_volume(snaps[0]).ctx("open snapshot")?;
    out.read_oldest = Some(run_qd(&oldest, Op::Read, random.clone(), secs, u64::MAX).await?);
    drop(oldest);
    log!("[shale] 4k randread, clone of the newest snapshot");
    let last = *snaps.last().ok_or("no snapshots")?;
    let cl = engine.clone_snapshot(last, "rd-clone").await.ctx("clone")?;
    let clv = engine.open_volume(cl.uuid).ctx("open clone")?;
    out.read_clone = Some(run_qd(&clv, Op::Read, random.clone(), secs, u64::MAX).await?);
    drop(clv);
    drop(rdv);
    engine.close().await.ctx("close SR")?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// The qcow2 peer.

fn run(cmd: &mut Command) -> Res<String> {
    let o = cmd.output().ctx(&format!("run {cmd:?}"))?;
    if !o.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn qcow2_create(path: &Path, backing: Option<&Path>) -> Res<()> {
    let mut c = Command::new("qemu-img");
    c.args(["create", "-q", "-f", "qcow2"]);
    if let Some(b) = backing {
        c.arg("-b").arg(b).args(["-F", "qcow2"]);
    }
    c.arg(path).arg(IOPS_SIZE.to_string());
    run(&mut c).map(drop)
}

/// `qemu-img bench` with cache=none, aio=io_uring, QD32, 4k requests; returns IOPS.
fn qemu_bench(img: &Path, write: bool, count: u64, step: u64) -> Res<f64> {
    let mut c = Command::new("qemu-img");
    c.args(["bench", "-f", "qcow2", "-t", "none", "-i", "io_uring", "-d"])
        .arg(QD.to_string())
        .args(["-s", "4096", "-c"])
        .arg(count.to_string())
        .arg("-S")
        .arg(step.to_string());
    if write {
        c.args(["-w", "--pattern", "90"]);
    }
    c.arg(img);
    let out = run(&mut c)?;
    // "Run completed in 1.234 seconds."
    let secs: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("Run completed in "))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("unexpected qemu-img bench output: {out}"))?;
    Ok(count as f64 / secs.max(1e-9))
}

/// Time-boxed `qemu_bench`: a short calibration run sizes the real one to about `secs`.
fn qemu_bench_timed(img: &Path, write: bool, secs: f64, step: u64) -> Res<f64> {
    let probe = qemu_bench(img, write, 4000, step)?;
    let count = ((probe * secs) as u64).clamp(4000, 5_000_000);
    qemu_bench(img, write, count, step)
}

#[derive(Default)]
struct QemuResults {
    read: [Option<f64>; 3],
    write_fresh: Option<f64>,
    write_inplace: Option<f64>,
    write_cow: Option<f64>,
}

fn qemu_peer(args: &Args, out: &mut QemuResults) -> Res<()> {
    let dir = args.dir.join("qcow2");
    std::fs::create_dir_all(&dir).ctx("create qcow2 dir")?;
    let block_step = QEMU_STEP_BLOCKS * BS;
    let cluster_step = QEMU_STEP_CLUSTERS * CLUSTER;
    let clusters = IOPS_SIZE / CLUSTER;

    log!("[qcow2] 4k write, fresh image");
    let fresh = dir.join("fresh.qcow2");
    qcow2_create(&fresh, None)?;
    out.write_fresh = Some(qemu_bench(&fresh, true, clusters, cluster_step)?);

    log!("[qcow2] filling the base image");
    let layer = |i: usize| dir.join(format!("layer{i}.qcow2"));
    let base = layer(0);
    qcow2_create(&base, None)?;
    run(Command::new("qemu-img")
        .args([
            "bench",
            "-q",
            "-w",
            "--pattern",
            "60",
            "-f",
            "qcow2",
            "-t",
            "none",
        ])
        .args(["-i", "io_uring", "-d", "4", "-s", "1M", "-S", "1M", "-c"])
        .arg((IOPS_SIZE / MIB).to_string())
        .arg(&base))?;

    log!("[qcow2] 4k write, right after a snapshot (fresh overlay on the full image)");
    let snap = dir.join("cow.qcow2");
    qcow2_create(&snap, Some(&base))?;
    out.write_cow = Some(qemu_bench(&snap, true, clusters, cluster_step)?);

    log!("[qcow2] 4k read, chain depth 0");
    out.read[0] = Some(qemu_bench_timed(&base, false, args.secs, block_step)?);
    log!("[qcow2] 4k write, in place (full image)");
    let inplace = dir.join("inplace.qcow2");
    std::fs::copy(&base, &inplace).ctx("copy base image")?;
    out.write_inplace = Some(qemu_bench_timed(&inplace, true, args.secs, block_step)?);
    std::fs::remove_file(&inplace).ctx("remove image")?;

    for (slot, depth) in [(1, 10usize), (2, 100)] {
        log!("[qcow2] building the backing chain to depth {depth}");
        for i in 1..=depth {
            let p = layer(i);
            if p.exists() {
                continue;
            }
            qcow2_create(&p, Some(&layer(i - 1)))?;
            let mut rng = Rng::new(1000 + i as u64);
            let mut c = Command::new("qemu-io");
            c.args(["-f", "qcow2", "-t", "none"]);
            for _ in 0..WRITES_PER_LAYER {
                let off = rng.below(IOPS_SIZE / BS) * BS;
                c.arg("-c")
                    .arg(format!("write -q -P {} {off} 4k", (i % 255) + 1));
            }
            c.arg(&p);
            run(&mut c)?;
        }
        log!("[qcow2] 4k read, chain depth {depth}");
        out.read[slot] = Some(qemu_bench_timed(
            &layer(depth),
            false,
            args.secs,
            block_step,
        )?);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// Report.

fn fmt_iops(v: f64) -> String {
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "—".into(),
    }
}

fn table(s: &ShaleResults, qres: Option<&QemuResults>, args: &Args) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "Snapshot and clone latency ({} of each per row; ms, median / p99):\n",
        args.samples
    );
    let _ = writeln!(
        t,
        "| VDI | snapshot p50 / p99 | clone p50 / p99 | `Engine::info` of a snapshot p50 |"
    );
    let _ = writeln!(t, "|---|---|---|---|");
    for r in &s.snaps {
        let _ = writeln!(
            t,
            "| {} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} |",
            r.label, r.snap.p50_ms, r.snap.p99_ms, r.clone.p50_ms, r.clone.p99_ms, r.info.p50_ms
        );
    }
    let _ = writeln!(
        t,
        "\n4k I/O at QD32 on 1 GiB VDIs, {} s per point (Shale: random offsets; qcow2: `qemu-img bench`, \
         cache=none, aio=io_uring, strided offsets):\n",
        args.secs
    );
    let _ = writeln!(
        t,
        "| workload | Shale IOPS | Shale lat p50 / p99 (µs) | qcow2 peer | qcow2 IOPS | Shale / qcow2 |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|");
    let q = |f: &dyn Fn(&QemuResults) -> Option<f64>| qres.and_then(f);
    let rows: Vec<(&str, &Option<IopsResult>, &str, Option<f64>)> = vec![
        (
            "randread, 0 snapshots",
            &s.read0,
            "chain depth 0",
            q(&|r| r.read[0]),
        ),
        (
            "randread, 10 snapshots",
            &s.read10,
            "chain depth 10",
            q(&|r| r.read[1]),
        ),
        (
            "randread, 100 snapshots",
            &s.read100,
            "chain depth 100",
            q(&|r| r.read[2]),
        ),
        (
            "randread, oldest of 100 snapshots",
            &s.read_oldest,
            "—",
            None,
        ),
        (
            "randread, clone of the newest snapshot",
            &s.read_clone,
            "—",
            None,
        ),
        (
            "randwrite, fresh VDI (allocating)",
            &s.write_fresh,
            "fresh image",
            q(&|r| r.write_fresh),
        ),
        (
            "randwrite, written VDI (in place)",
            &s.write_inplace,
            "full image",
            q(&|r| r.write_inplace),
        ),
        (
            "randwrite, right after a snapshot (CoW)",
            &s.write_cow,
            "fresh overlay on full image",
            q(&|r| r.write_cow),
        ),
    ];
    for (name, r, peer, qv) in rows {
        let Some(r) = r else { continue };
        let peer = if qv.is_some() { peer } else { "—" };
        let _ = writeln!(
            t,
            "| {name} | {} | {:.0} / {:.0} | {peer} | {} | {} |",
            fmt_iops(r.iops),
            r.p50_us,
            r.p99_us,
            qv.map(fmt_iops).unwrap_or_else(|| "—".into()),
            ratio(Some(r.iops), qv)
        );
    }
    if !s.uring {
        let _ = writeln!(
            t,
            "\nNote: io_uring was unavailable; Shale ran on the blocking fallback."
        );
    }
    t
}

fn main() -> Res<()> {
    let args = parse_args()?;
    if args.dir.exists()
        && std::fs::read_dir(&args.dir)
            .ctx("read --dir")?
            .next()
            .is_some()
    {
        return Err(format!("{} must be empty or absent", args.dir.display()).into());
    }
    std::fs::create_dir_all(&args.dir).ctx("create --dir")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .ctx("start tokio")?;
    let t0 = *START.get_or_init(Instant::now);
    let mut s = ShaleResults::default();
    let shale = rt.block_on(shale_bench(&args, &mut s));
    drop(rt);
    let mut q = QemuResults::default();
    let qemu = if args.qemu && shale.is_ok() {
        Some(qemu_peer(&args, &mut q))
    } else {
        None
    };
    if !args.keep {
        // The SR and images are throwaway.
        let _ = std::fs::remove_dir_all(args.dir.join("sr"));
        let _ = std::fs::remove_dir_all(args.dir.join("qcow2"));
    }
    shale?;
    if let Some(Err(e)) = &qemu {
        eprintln!("qcow2 peer failed: {e}");
    }
    print!("{}", table(&s, qemu.as_ref().map(|_| &q), &args));
    eprintln!("(total {:.0} s)", t0.elapsed().as_secs_f64());
    Ok(())
}
