//! Drive an NBD export with Shale's own client ([`NbdClient`]) and report IOPS: how fast a host reaches a remote
//! disk through it, with one connection or several (multi-conn). `tools/bench/nbd-client-bench.sh` runs it
//! against a `shale serve` VDI next to fio's nbd engine (libnbd) on the same export, the peer it is measured
//! against.
//!
//! ```text
//! cargo run -p shale-block --example nbd-client-bench -- URI [--rw randread|randwrite] [--bs 4096]
//!     [--qd 32] [--secs 10] [--connections 1] [--workers 1]
//! ```
//! `--qd` requests are kept in flight (one task each, random block-aligned offsets over the whole export),
//! `--connections` is the most `NbdClient::connect_multi` opens (one unless the server advertises multi-conn),
//! `--workers` sizes the tokio runtime the client's tasks run on. Prints one line: IOPS, MiB/s, connections, and
//! the process's CPU time per I/O (user + system, over the measured window).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shale_block::nbd::NbdClient;
use shale_block::{BlockDevice, IoBuf, WriteFlags};

struct Args {
    uri: String,
    write: bool,
    bs: usize,
    qd: usize,
    secs: u64,
    connections: usize,
    workers: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        uri: String::new(),
        write: false,
        bs: 4096,
        qd: 32,
        secs: 10,
        connections: 1,
        workers: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |n: &str| it.next().ok_or_else(|| format!("{n} needs a value"));
        let num = |v: String| {
            v.parse::<u64>()
                .map_err(|e| format!("bad number {v:?}: {e}"))
        };
        match arg.as_str() {
            "--rw" => {
                a.write = match val("--rw")?.as_str() {
                    "randread" => false,
                    "randwrite" => true,
                    other => {
                        return Err(format!("--rw must be randread or randwrite, not {other:?}"))
                    }
                }
            }
            "--bs" => a.bs = num(val("--bs")?)? as usize,
            "--qd" => a.qd = num(val("--qd")?)? as usize,
            "--secs" => a.secs = num(val("--secs")?)?,
            "--connections" => a.connections = num(val("--connections")?)? as usize,
            "--workers" => a.workers = num(val("--workers")?)? as usize,
            s if s.starts_with("--") => return Err(format!("unknown option {s}")),
            s => a.uri = s.to_string(),
        }
    }
    if a.uri.is_empty() {
        return Err(
            "usage: nbd-client-bench URI [--rw randread|randwrite] [--bs N] [--qd N] [--secs N] \
                    [--connections N] [--workers N]"
                .into(),
        );
    }
    if a.bs == 0 || a.qd == 0 || a.connections == 0 || a.workers == 0 {
        return Err("--bs, --qd, --connections and --workers must be positive".into());
    }
    Ok(a)
}

/// One in-flight slot: requests back to back at xorshift-random block offsets until `stop`.
async fn worker(
    c: Arc<NbdClient>,
    a: Arc<Args>,
    mut seed: u64,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> Result<(), String> {
    let blocks = c.info().size / a.bs as u64;
    if blocks == 0 {
        return Err("the export is smaller than one block".into());
    }
    let data = IoBuf::from_slice(&vec![0x5a; a.bs]);
    while !stop.load(Ordering::Relaxed) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let offset = seed % blocks * a.bs as u64;
        let r = if a.write {
            c.write(offset, data.clone(), WriteFlags::default()).await
        } else {
            c.read(offset, IoBuf::for_overwrite(a.bs)).await.map(|_| ())
        };
        r.map_err(|e| format!("I/O at {offset}: {e}"))?;
        done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// User + system CPU time of this process so far, in seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct we pass, which is plain data and fully initialised by zeroing.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer to a rusage struct.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn main() {
    let a = match parse_args() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let r: Result<(), String> = rt.block_on(async {
        let c = NbdClient::connect_uri_multi(&a.uri, a.connections)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", a.uri))?;
        let c = Arc::new(c);
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..a.qd as u64)
            .map(|i| {
                let seed = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i + 1) | 1;
                tokio::spawn(worker(
                    c.clone(),
                    a.clone(),
                    seed,
                    stop.clone(),
                    done.clone(),
                ))
            })
            .collect();
        let (t0, n0, cpu0) = (Instant::now(), done.load(Ordering::Relaxed), cpu_seconds());
        tokio::time::sleep(Duration::from_secs(a.secs)).await;
        let n = done.load(Ordering::Relaxed) - n0;
        let elapsed = t0.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu0;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.map_err(|e| format!("worker: {e}"))??;
        }
        let iops = n as f64 / elapsed;
        println!(
            "{} bs={} qd={} connections={}: {:.0} IOPS, {:.1} MiB/s, {:.2} us CPU/IO",
            if a.write { "randwrite" } else { "randread" },
            a.bs,
            a.qd,
            c.connections(),
            iops,
            iops * a.bs as f64 / f64::from(1 << 20),
            cpu * 1e6 / n.max(1) as f64
        );
        Ok(())
    });
    if let Err(e) = r {
        eprintln!("{e}");
        std::process::exit(1);
    }
}
