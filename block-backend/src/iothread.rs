//! I/O threads: single-threaded runtimes that each own an io_uring ring, for front ends whose requests should
//! not hop between threads.
//!
//! A front end (the NBD server) hands each connection to one I/O thread; everything the connection does — socket
//! reads, [`BlockDevice`](crate::BlockDevice) calls, the data I/O they issue through
//! [`IoEngine`](crate::uring::IoEngine), reply writes — then runs on that thread, and the I/O goes through the
//! thread's own ring (`local_ring`) instead of the shared ring thread. Connections are spread over the
//! threads round-robin; by default there is one thread per two cores ([`default_threads`]), since the clients
//! share the host's cores.
//!
//! Why not tokio's multi-threaded runtime alone: its work stealing and the shared ring thread put three
//! cross-thread wake-ups on every request, and on small virtualised hosts that latency, not CPU, bounded the
//! NBD server (see `tools/bench/RESULTS-nbd.md`). qemu's iothreads and SPDK's reactors have the same shape.
//!
//! Departure from `ARCHITECTURE.md`, which puts io_uring rings on dedicated threads: on an I/O thread the ring is
//! driven by that thread's runtime instead. Submission there is a non-blocking `io_uring_enter` (no wait), so the
//! rule behind it — no blocking data syscalls on a runtime thread — still holds. Callers elsewhere (the daemon's
//! multi-threaded runtime, the VMM's device workers) keep using the dedicated ring threads.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::local_ring::Installed;

/// True when the calling thread is an I/O thread with its own ring (its data I/O skips the shared ring thread).
pub use crate::local_ring::on_io_thread;

/// Slots in each I/O thread's ring: more than any one front end's queue depth, so ops rarely wait for a slot.
const RING_DEPTH: u32 = 256;

/// How many I/O threads a front end starts by default: half the cores (rounded up), at most four (each can drive
/// a fast NVMe device's queue on its own).
///
/// Why half: on a hyperconverged host the storage threads share the cores with their clients (the VMs' vCPUs, a
/// backup job's NBD client). An I/O thread per core puts twice as many busy threads as cores on the host, and
/// their wake-ups then land on busy cores: on the 2-core development machine, two fio jobs of 4k QD32 over two
/// NBD connections did 58-62k random reads and 75k random writes a second with two I/O threads, 69-70k and
/// 96-101k with one, which also batches both connections' completions per wake-up (8.5 µs of server CPU per I/O
/// against 9.1-9.8). One connection runs on one thread either way. `shale serve --nbd-io-threads` overrides it.
pub fn default_threads() -> usize {
    threads_for_cores(thread::available_parallelism().map_or(1, |n| n.get()))
}

/// [`default_threads`] for a host with `cores` cores.
fn threads_for_cores(cores: usize) -> usize {
    cores.div_ceil(2).clamp(1, 4)
}

/// A pool of I/O threads. Dropping it stops them once their current tasks are dropped (in-flight kernel I/O is
/// waited for before buffers are freed).
pub struct IoThreads {
    threads: Vec<IoThread>,
    next: AtomicUsize,
}

struct IoThread {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
}

impl std::fmt::Debug for IoThreads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoThreads")
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl IoThreads {
    /// Start `n` (at least one) I/O threads named `{name}-{i}`. A thread whose ring cannot be created (no
    /// io_uring here) still runs its runtime, and its I/O goes through the shared engine.
    pub fn new(name: &str, n: usize) -> io::Result<IoThreads> {
        let mut threads = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            threads.push(start(format!("{name}-{i}"))?);
        }
        Ok(IoThreads {
            threads,
            next: AtomicUsize::new(0),
        })
    }

    /// How many threads the pool has.
    pub fn len(&self) -> usize {
        self.threads.len()
    }

    /// Never true (a pool has at least one thread); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }

    /// The runtime of the next thread (round-robin), for owners that spawn several tasks of their own on one
    /// thread (a VM's virtio-blk queue workers).
    pub fn handle(&self) -> Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.threads.len();
        self.threads[i].handle.clone()
    }

    /// Run `fut` on the next thread (round-robin). The future is dropped unpolled if that thread has stopped.
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        drop(self.handle().spawn(fut));
    }
}

impl Drop for IoThreads {
    fn drop(&mut self) {
        for t in &mut self.threads {
            if let Some(stop) = t.stop.take() {
                let _ = stop.send(());
            }
        }
    }
}

fn start(name: String) -> io::Result<IoThread> {
    let (setup_tx, setup_rx) = std::sync::mpsc::channel::<io::Result<Handle>>();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    thread::Builder::new().name(name.clone()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = setup_tx.send(Err(e));
                return;
            }
        };
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let installed = match Installed::new(RING_DEPTH) {
                Ok((installed, driver)) => {
                    tokio::task::spawn_local(driver);
                    Some(installed)
                }
                Err(e) => {
                    tracing::warn!(thread = %name, error = %e, "I/O thread without its own ring; using the shared engine");
                    None
                }
            };
            if setup_tx.send(Ok(Handle::current())).is_err() {
                return;
            }
            let _ = stop_rx.await;
            drop(installed);
        });
        // The driver (and with it the ring, which waits for in-flight kernel I/O) goes with the LocalSet, while
        // the runtime's reactor still exists for the eventfd's deregistration; then the remaining tasks.
        drop(local);
        drop(rt);
    })?;
    let handle = setup_rx
        .recv()
        .map_err(|_| io::Error::other("I/O thread died during setup"))??;
    Ok(IoThread {
        handle,
        stop: Some(stop_tx),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::IoBuf;
    use crate::uring::{IoEngine, IoEngineConfig};
    use std::fs::OpenOptions;
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::Arc;

    /// A fresh file in `dir`, opened with `flags` (O_DIRECT where the filesystem allows it, else without).
    fn tmpfile(dir: &tempfile::TempDir, flags: i32) -> Arc<std::fs::File> {
        let open = |flags| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(flags)
                .open(dir.path().join("f"))
        };
        Arc::new(open(flags).or_else(|_| open(0)).expect("open"))
    }

    #[test]
    fn default_thread_count_leaves_half_the_cores_to_clients() {
        let counts: Vec<usize> = [0, 1, 2, 3, 4, 6, 8, 16, 64]
            .into_iter()
            .map(threads_for_cores)
            .collect();
        assert_eq!(counts, [1, 1, 1, 2, 2, 3, 4, 4, 4]);
    }

    /// Ops issued on an I/O thread run on its own ring, concurrently, and return the right data; the same file
    /// read through the shared engine agrees.
    #[test]
    fn io_thread_uses_its_own_ring() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = tmpfile(&dir, libc::O_DIRECT);
        let engine = IoEngine::new(IoEngineConfig::default()).expect("engine");
        let pool = IoThreads::new("test-io", 2).expect("pool");
        let (tx, rx) = std::sync::mpsc::channel();
        for t in 0..2u8 {
            let (engine, file, tx) = (engine.clone(), file.clone(), tx.clone());
            pool.spawn(async move {
                let local = on_io_thread();
                let mut tasks = Vec::new();
                for i in 0..64u64 {
                    let (engine, file) = (engine.clone(), file.clone());
                    tasks.push(tokio::spawn(async move {
                        let off = (u64::from(t) * 64 + i) * 4096;
                        let mut b = IoBuf::zeroed(4096);
                        b.fill((off / 4096) as u8);
                        let (r, _) = engine.write_at(&file, off, b, false).await;
                        r.expect("write");
                        let (r, b) = engine.read_at(&file, off, IoBuf::zeroed(4096)).await;
                        r.expect("read");
                        assert!(b.iter().all(|&x| x == (off / 4096) as u8));
                    }));
                }
                let mut ok = true;
                for task in tasks {
                    ok &= task.await.is_ok();
                }
                let _ = tx.send((local, ok));
            });
        }
        for _ in 0..2 {
            let (local, ok) = rx
                .recv_timeout(std::time::Duration::from_secs(20))
                .expect("I/O thread answered");
            assert!(local, "the task ran on an I/O thread with a ring");
            assert!(ok, "every op returned its data");
        }
        assert!(!on_io_thread());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        rt.block_on(async {
            for i in 0..128u64 {
                let (r, b) = engine.read_at(&file, i * 4096, IoBuf::zeroed(4096)).await;
                r.expect("read");
                assert!(b.iter().all(|&x| x == i as u8));
            }
        });
    }

    /// Many more ops at once than the ring has slots (four times [`RING_DEPTH`]): the ones that wait for a slot
    /// are submitted as completions free slots, down to the last one (a lost hand-off would hang here).
    #[test]
    fn more_ops_than_ring_slots() {
        let dir = tempfile::tempdir().expect("tempdir");
        // O_DIRECT where possible, so completions arrive after the submitting call returns.
        let file = tmpfile(&dir, libc::O_DIRECT);
        let n = 4 * RING_DEPTH as u64;
        file.set_len(n * 4096).expect("size");
        let engine = IoEngine::new(IoEngineConfig::default()).expect("engine");
        let pool = IoThreads::new("test-io", 1).expect("pool");
        for round in 0..20u8 {
            let (tx, rx) = std::sync::mpsc::channel();
            let (engine, file) = (engine.clone(), file.clone());
            pool.spawn(async move {
                let ops = (0..n).map(|i| {
                    let (engine, file) = (engine.clone(), file.clone());
                    async move {
                        let mut b = IoBuf::zeroed(4096);
                        b.fill(round ^ i as u8);
                        engine.write_at(&file, i * 4096, b, false).await.0.is_ok()
                    }
                });
                let ok = futures::future::join_all(ops)
                    .await
                    .into_iter()
                    .all(|ok| ok);
                let _ = tx.send(ok);
            });
            let ok = rx
                .recv_timeout(std::time::Duration::from_secs(30))
                .unwrap_or_else(|_| {
                    panic!("round {round}: ops waiting for a ring slot were never submitted")
                });
            assert!(ok, "round {round}: every write succeeded");
        }
    }

    /// A task dropped while its op is in flight leaves the op to the ring; stopping the pool then waits for it.
    #[test]
    fn dropped_tasks_and_stop_are_safe() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = tmpfile(&dir, 0);
        file.set_len(64 << 20).expect("size");
        let engine = IoEngine::new(IoEngineConfig::default()).expect("engine");
        let pool = IoThreads::new("test-io", 1).expect("pool");
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let (engine, file) = (engine.clone(), file.clone());
            pool.spawn(async move {
                for i in 0..32u64 {
                    let (engine, file) = (engine.clone(), file.clone());
                    let h = tokio::spawn(async move {
                        let _ = engine.read_at(&file, i << 20, IoBuf::zeroed(1 << 20)).await;
                    });
                    h.abort();
                }
                let _ = tx.send(());
                // Leave more I/O in flight when the pool stops.
                for i in 0..16u64 {
                    let _ = engine
                        .write_at(&file, i << 20, IoBuf::zeroed(1 << 20), false)
                        .await;
                }
            });
        }
        rx.recv_timeout(std::time::Duration::from_secs(20))
            .expect("task ran");
        drop(pool);
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
