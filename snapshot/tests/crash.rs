//! Crash test: a child process writes, flushes and snapshots while the test `kill -9`s it at random points, many
//! times. After each kill the SR is reopened and: every flushed write is intact, every block holds a write that
//! was actually issued (no torn or foreign data), `sr check` passes, and every snapshot still holds exactly what
//! was acknowledged before it was taken.
//!
//! The child is this same test binary re-executed with `SHALE_CRASH_CHILD` set (see `crash_child`).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use shale_block::uring::{IoEngine, IoEngineConfig};
use shale_block::{BlockDevice, IoBuf, WriteFlags};
use shale_snapshot::{Engine, SrConfig};

const BLOCK: u64 = 4096;
const BLOCKS: u64 = 512; // 2 MiB VDI: small enough to verify fully each round
const ROUNDS: usize = 25;

/// Block content for write `seq` to block `b`: a header naming both, then a pattern derived from them.
fn block_data(seq: u64, b: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK as usize];
    v[..8].copy_from_slice(&seq.to_le_bytes());
    v[8..16].copy_from_slice(&b.to_le_bytes());
    for (i, x) in v[16..].iter_mut().enumerate() {
        *x = (seq.wrapping_mul(31).wrapping_add(b).wrapping_add(i as u64) % 251) as u8;
    }
    v
}

/// Writes per burst: issued concurrently, then flushed.
const BURST: u64 = 16;

fn pick(seed: u64, seq: u64) -> u64 {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    r.random_range(0..BLOCKS)
}

/// The write schedule: write `seq` goes to a block chosen from the seed, unless an earlier write of the same
/// concurrent burst already targets that block (overlapping in-flight writes have no defined order), in which case
/// `seq` writes nothing.
fn target(seed: u64, seq: u64) -> Option<u64> {
    let b = pick(seed, seq);
    let burst_start = seq - seq % BURST;
    (!(burst_start..seq).any(|s| pick(seed, s) == b)).then_some(b)
}

#[test]
fn crash_child() {
    let Ok(dir) = std::env::var("SHALE_CRASH_CHILD") else {
        return;
    };
    let seed: u64 = std::env::var("SHALE_CRASH_SEED").unwrap().parse().unwrap();
    let start: u64 = std::env::var("SHALE_CRASH_START").unwrap().parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let io = IoEngine::new(IoEngineConfig::default()).unwrap();
        let engine = Engine::open(Path::new(&dir), io).unwrap();
        let v = engine.lookup("v").unwrap().uuid;
        let vol = engine.open_volume(v).unwrap();
        let mut out = std::io::stdout();
        let mut seq = start;
        loop {
            // A burst of writes in flight at once, some FUA, then a flush; now and then a snapshot.
            let burst: Vec<(u64, u64)> = (seq..seq + BURST)
                .filter_map(|s| target(seed, s).map(|b| (s, b)))
                .collect();
            let futs = burst.iter().map(|&(s, b)| {
                let fua = s % 7 == 0;
                let vol = &vol;
                async move {
                    vol.write(
                        b * BLOCK,
                        IoBuf::from_slice(&block_data(s, b)),
                        WriteFlags { fua },
                    )
                    .await
                }
            });
            for r in futures_join(futs).await {
                r.unwrap();
            }
            seq += BURST;
            vol.flush().await.unwrap();
            use std::io::Write;
            writeln!(out, "flushed {seq}").unwrap();
            out.flush().unwrap();
            if seq.is_multiple_of(128) {
                let name = format!("snap-{seq}");
                vol_snapshot(&engine, v, &name).await;
                writeln!(out, "snapshot {name} {seq}").unwrap();
                out.flush().unwrap();
            }
        }
    });
}

async fn vol_snapshot(engine: &Engine, v: uuid::Uuid, name: &str) -> uuid::Uuid {
    engine.snapshot(v, name).await.unwrap().uuid
}

async fn futures_join<F: std::future::Future>(it: impl Iterator<Item = F>) -> Vec<F::Output> {
    futures::future::join_all(it).await
}

/// Expected state: per block, the newest flushed write; per snapshot, its exact per-block writes.
struct Model {
    seed: u64,
    block_seq: Vec<Option<u64>>,
    snaps: HashMap<String, Vec<Option<u64>>>,
}

fn apply_writes(m: &mut [Option<u64>], seed: u64, from: u64, to: u64) {
    for s in from..to {
        if let Some(b) = target(seed, s) {
            m[b as usize] = Some(s);
        }
    }
}

#[test]
fn kill9_loses_no_flushed_write() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sr");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let io = IoEngine::new(IoEngineConfig::default()).unwrap();
    rt.block_on(async {
        let e = Engine::create(
            &dir,
            SrConfig {
                cluster_size: 16384,
                capacity: None,
            },
            io.clone(),
        )
        .unwrap();
        e.create_vdi("v", BLOCKS * BLOCK).await.unwrap();
        e.close().await.unwrap();
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5EED);
    let mut model = Model {
        seed: 0,
        block_seq: vec![None; BLOCKS as usize],
        snaps: HashMap::new(),
    };
    let mut next_seq = 0u64;
    for round in 0..ROUNDS {
        model.seed = rng.random();
        let kill_after = Duration::from_millis(rng.random_range(30..400));
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env("SHALE_CRASH_CHILD", &dir)
            .env("SHALE_CRASH_SEED", model.seed.to_string())
            .env("SHALE_CRASH_START", next_seq.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let started = Instant::now();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for l in BufReader::new(stdout).lines() {
                match l {
                    Ok(l) => lines.push(l),
                    Err(_) => break,
                }
            }
            lines
        });
        // Kill at a random point (the child needs a moment to start, so early kills hit open and recovery).
        std::thread::sleep(kill_after);
        assert!(
            child.try_wait().unwrap().is_none(),
            "round {round}: child died on its own"
        );
        child.kill().unwrap(); // SIGKILL
        let _ = started;
        let status = child.wait().unwrap();
        let lines = reader.join().unwrap();
        assert!(
            !status.success(),
            "round {round}: child exited on its own: {status:?}"
        );
        // Replay what the child acknowledged.
        let mut flushed_to = next_seq;
        for l in &lines {
            // libtest may print its own "test crash_child ... " on the same line as the child's first output.
            let parts: Vec<&str> = l.split_whitespace().collect();
            let at = parts
                .iter()
                .position(|p| *p == "flushed" || *p == "snapshot")
                .unwrap_or(parts.len());
            match &parts[at..] {
                ["flushed", s] => {
                    let s: u64 = s.parse().unwrap();
                    apply_writes(&mut model.block_seq, model.seed, flushed_to, s);
                    flushed_to = s;
                }
                ["snapshot", name, s] => {
                    let s: u64 = s.parse().unwrap();
                    assert_eq!(s, flushed_to);
                    model
                        .snaps
                        .insert(name.to_string(), model.block_seq.clone());
                }
                _ => {}
            }
        }
        // Unflushed writes (up to one burst) may or may not have landed.
        let maybe_end = flushed_to + BURST;
        let seed = model.seed;
        rt.block_on(async {
            let e = Engine::open(&dir, io.clone()).unwrap();
            let rep = e.check().unwrap();
            assert!(rep.ok(), "round {round}: sr check after kill: {:?}", rep.problems);
            let v = e.lookup("v").unwrap().uuid;
            let vol = e.open_volume(v).unwrap();
            let all = vol.read(0, IoBuf::zeroed((BLOCKS * BLOCK) as usize)).await.unwrap();
            for b in 0..BLOCKS {
                let got = &all[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize];
                let want = model.block_seq[b as usize];
                let got_seq = u64::from_le_bytes(got[..8].try_into().unwrap());
                let is_zero = got.iter().all(|&x| x == 0);
                if is_zero {
                    assert!(want.is_none(), "round {round}: block {b} lost flushed write {want:?}");
                    continue;
                }
                assert!(got == block_data(got_seq, b).as_slice(), "round {round}: block {b} holds torn or foreign data");
                let acceptable = Some(got_seq) == want || (got_seq >= flushed_to && got_seq < maybe_end && target(seed, got_seq) == Some(b));
                assert!(acceptable, "round {round}: block {b} holds write {got_seq}, expected {want:?} or an unflushed later write");
                model.block_seq[b as usize] = Some(got_seq);
            }
            for (name, want) in &model.snaps {
                let s = e.lookup(name).unwrap().uuid;
                let sv = e.open_volume(s).unwrap();
                let all = sv.read(0, IoBuf::zeroed((BLOCKS * BLOCK) as usize)).await.unwrap();
                for b in 0..BLOCKS {
                    let got = &all[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize];
                    match want[b as usize] {
                        Some(s) => assert!(
                            got == block_data(s, b).as_slice(),
                            "round {round}: snapshot {name} block {b} changed: holds write {} instead of {s}",
                            u64::from_le_bytes(got[..8].try_into().unwrap())
                        ),
                        None => assert!(got.iter().all(|&x| x == 0), "round {round}: snapshot {name} block {b} should be zero"),
                    }
                }
            }
            // Keep the snapshot count bounded: drop the oldest ones now and then (exercises GC across kills).
            if model.snaps.len() > 4 {
                let mut names: Vec<String> = model.snaps.keys().cloned().collect();
                names.sort_by_key(|n| n.trim_start_matches("snap-").parse::<u64>().unwrap_or(0));
                let victim = names[0].clone();
                let id = e.lookup(&victim).unwrap().uuid;
                e.destroy(id).await.unwrap();
                model.snaps.remove(&victim);
            }
            drop(vol);
            e.close().await.unwrap();
        });
        next_seq = maybe_end + BURST;
    }
}
