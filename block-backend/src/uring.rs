//! The io_uring engine: data syscalls for every local volume, on dedicated threads.
//!
//! # Design
//!
//! Async callers (tokio tasks) never issue blocking data syscalls. They build an `Op` that **owns** everything
//! the kernel will touch: the [`IoBuf`] and an `Arc<File>` clone (so the fd stays open), plus a oneshot sender for
//! the result. The op is pushed onto the queue of one ring thread (round-robin over `threads` rings) and the caller
//! awaits the oneshot.
//!
//! Each ring thread loops:
//! 1. take *everything* queued (one lock, one `mem::take`), append it to its local `pending` list;
//! 2. move pending ops into the ring while fewer than `queue_depth` are in flight (the rest wait for slots);
//! 3. one `io_uring_enter` that submits the whole batch and waits for at least one completion;
//! 4. reap all completions: finish ops (resubmitting the remainder of short reads/writes) and send results.
//!
//! Waking is by an eventfd that is always armed in the ring as a `POLL_ADD`: a producer writes the eventfd only
//! when it turns the queue from empty to non-empty, so a burst of requests costs one wake-up syscall and the
//! thread sleeps in the kernel (no spinning, no timer latency) whenever it has nothing to do.
//!
//! # Ownership and soundness
//!
//! The kernel may read or write an op's buffer until its completion is reaped, so the op lives in the thread's
//! in-flight table until then, whatever happens to the caller. If the caller's future is dropped, only the
//! oneshot receiver goes away: the ring thread still owns the buffer and the file until the kernel is done, then
//! drops them. Buffers are heap allocations owned by `IoBuf`, so moving an `Op` (e.g. when the table grows) never
//! moves the memory the kernel sees. If a ring thread ever unwound with ops in flight, their buffers are leaked
//! rather than freed under the kernel.
//!
//! # Lifetime
//!
//! [`IoEngine`] is a cheap `Arc` handle. When the last clone drops, every ring thread is told to stop; it finishes
//! whatever is still queued or in flight (nobody can be waiting for it, but the kernel may still hold buffers)
//! and exits.
//!
//! # Fallback
//!
//! When io_uring is unavailable (`ENOSYS`, `EPERM` from a seccomp filter or `io_uring_disabled`, missing opcodes
//! on an old kernel), the same API runs on a small pool of blocking threads doing `pread`/`pwrite`/
//! `fdatasync`/`fallocate`. Callers cannot tell the difference except through [`IoEngine::is_uring`].

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use parking_lot::{Condvar, Mutex};
use tokio::sync::oneshot;

use crate::buf::IoBuf;

/// Largest single read/write handed to the kernel; longer buffers are done in chunks by the short-I/O loop.
const MAX_CHUNK: usize = 1 << 30;

/// `user_data` of the eventfd poll; every other value is an index into the in-flight table.
const WAKE_TOKEN: u64 = u64::MAX;

/// Blocking worker threads per configured thread when running on the fallback.
const FALLBACK_WORKERS_PER_THREAD: usize = 4;

/// How the engine is sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoEngineConfig {
    /// Number of rings, each on its own thread. One ring saturates most NVMe devices; more help only when a
    /// single thread's submission/completion work becomes the bottleneck.
    pub threads: usize,
    /// Maximum operations in flight per ring; more requests wait in the engine until completions free slots.
    pub queue_depth: u32,
}

impl Default for IoEngineConfig {
    /// One ring with 256 slots: enough parallelism for a fast SSD without pinning much kernel memory.
    fn default() -> Self {
        IoEngineConfig {
            threads: 1,
            queue_depth: 256,
        }
    }
}

/// Handle to the io_uring threads (or the blocking fallback pool). Cheap to clone; the threads stop when the
/// last clone is dropped.
#[derive(Clone)]
pub struct IoEngine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for IoEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoEngine")
            .field("uring", &self.is_uring())
            .finish()
    }
}

/// What one request asks for. Everything the kernel touches is owned here.
enum OpKind {
    Read {
        offset: u64,
        buf: IoBuf,
        done: usize,
    },
    Write {
        offset: u64,
        buf: IoBuf,
        done: usize,
        dsync: bool,
    },
    Fdatasync,
    Fallocate {
        mode: i32,
        offset: u64,
        len: u64,
    },
}

/// Result handed back to the caller: the outcome and, for reads/writes, its buffer.
pub(crate) type Reply = (io::Result<()>, Option<IoBuf>);

/// One request in the engine.
pub(crate) struct Op {
    file: Arc<File>,
    kind: OpKind,
    reply: oneshot::Sender<Reply>,
}

impl Op {
    pub(crate) fn finish(self, res: io::Result<()>) {
        let buf = match self.kind {
            OpKind::Read { buf, .. } | OpKind::Write { buf, .. } => Some(buf),
            OpKind::Fdatasync | OpKind::Fallocate { .. } => None,
        };
        // The caller may have dropped its future; then nobody wants the result and the buffer is freed here.
        let _ = self.reply.send((res, buf));
    }
}

/// The request queue shared between callers and one worker (ring thread or fallback pool).
struct Queue {
    ops: VecDeque<Op>,
    /// The last engine handle is gone: finish what is queued, then exit.
    shutdown: bool,
    /// The worker has exited (normally or by panic): refuse new ops instead of queueing them forever.
    closed: bool,
}

impl Queue {
    fn new() -> Self {
        Queue {
            ops: VecDeque::new(),
            shutdown: false,
            closed: false,
        }
    }
}

/// State shared by callers and one ring thread.
struct RingShared {
    queue: Mutex<Queue>,
    /// Non-blocking eventfd the ring thread polls; written to wake it.
    wake_fd: OwnedFd,
}

impl RingShared {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: `wake_fd` is an open eventfd owned by `self`; we pass a pointer to 8 readable bytes, which is
        // exactly what an eventfd write takes. A full counter (EAGAIN) already means "wake up", so the result is
        // ignored.
        unsafe {
            libc::write(self.wake_fd.as_raw_fd(), (&one as *const u64).cast(), 8);
        }
    }

    fn drain_wake(&self) {
        let mut val: u64 = 0;
        // SAFETY: as in `wake`; we pass 8 writable bytes. The fd is non-blocking, so this never sleeps; EAGAIN
        // just means the counter was already zero.
        unsafe {
            libc::read(self.wake_fd.as_raw_fd(), (&mut val as *mut u64).cast(), 8);
        }
    }
}

/// State shared by callers and the fallback pool.
struct PoolShared {
    queue: Mutex<Queue>,
    cond: Condvar,
}

enum Backend {
    Uring(Vec<Arc<RingShared>>),
    Fallback(Arc<PoolShared>),
}

struct Inner {
    backend: Backend,
    next: AtomicUsize,
}

impl Drop for Inner {
    fn drop(&mut self) {
        match &self.backend {
            Backend::Uring(rings) => {
                for ring in rings {
                    ring.queue.lock().shutdown = true;
                    ring.wake();
                }
            }
            Backend::Fallback(pool) => {
                pool.queue.lock().shutdown = true;
                pool.cond.notify_all();
            }
        }
    }
}

static FALLBACK_WARNED: AtomicBool = AtomicBool::new(false);

impl IoEngine {
    /// Start the engine: `cfg.threads` io_uring rings on their own threads, or the blocking fallback pool (with
    /// one warning per process) if io_uring cannot be used here.
    pub fn new(cfg: IoEngineConfig) -> io::Result<IoEngine> {
        let threads = cfg.threads.max(1);
        let depth = cfg.queue_depth.clamp(1, 16384);
        let mut rings = Vec::with_capacity(threads);
        for i in 0..threads {
            match start_ring(i, depth) {
                Ok(shared) => rings.push(shared),
                Err(e) => {
                    // Stop the rings already started (dropping `Inner` tells them to exit).
                    drop(Inner {
                        backend: Backend::Uring(rings),
                        next: AtomicUsize::new(0),
                    });
                    if !FALLBACK_WARNED.swap(true, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "io_uring unavailable; using the blocking thread-pool fallback");
                    }
                    return Self::new_fallback(cfg);
                }
            }
        }
        Ok(IoEngine {
            inner: Arc::new(Inner {
                backend: Backend::Uring(rings),
                next: AtomicUsize::new(0),
            }),
        })
    }

    /// Start the blocking thread-pool backend directly (what [`IoEngine::new`] falls back to); lets tests cover
    /// the fallback on machines where io_uring works.
    #[doc(hidden)]
    pub fn new_fallback(cfg: IoEngineConfig) -> io::Result<IoEngine> {
        let pool = Arc::new(PoolShared {
            queue: Mutex::new(Queue::new()),
            cond: Condvar::new(),
        });
        let workers = cfg.threads.max(1) * FALLBACK_WORKERS_PER_THREAD;
        let mut started = 0;
        for i in 0..workers {
            let p = Arc::clone(&pool);
            match thread::Builder::new()
                .name(format!("shale-io-{i}"))
                .spawn(move || fallback_worker(p))
            {
                Ok(_) => started += 1,
                Err(e) if started == 0 => return Err(e),
                Err(_) => break, // run with fewer workers rather than none
            }
        }
        Ok(IoEngine {
            inner: Arc::new(Inner {
                backend: Backend::Fallback(pool),
                next: AtomicUsize::new(0),
            }),
        })
    }

    /// True when requests go through io_uring; false on the blocking fallback.
    pub fn is_uring(&self) -> bool {
        matches!(self.inner.backend, Backend::Uring(_))
    }

    /// Read exactly `buf.len()` bytes at `offset`; bytes past end of file read as zero. Loops on short reads.
    pub async fn read_at(
        &self,
        file: &Arc<File>,
        offset: u64,
        buf: IoBuf,
    ) -> (io::Result<()>, IoBuf) {
        let len = buf.len();
        if len == 0 {
            return (Ok(()), buf);
        }
        let (res, buf) = self
            .run(
                file,
                OpKind::Read {
                    offset,
                    buf,
                    done: 0,
                },
            )
            .await;
        (res, buf.unwrap_or_else(|| IoBuf::zeroed(len)))
    }

    /// Write all of `buf` at `offset` (loops on short writes). With `dsync` the write uses `RWF_DSYNC`, so it is
    /// durable when this returns (the FUA path).
    pub async fn write_at(
        &self,
        file: &Arc<File>,
        offset: u64,
        buf: IoBuf,
        dsync: bool,
    ) -> (io::Result<()>, IoBuf) {
        let len = buf.len();
        if len == 0 {
            return (Ok(()), buf);
        }
        let (res, buf) = self
            .run(
                file,
                OpKind::Write {
                    offset,
                    buf,
                    done: 0,
                    dsync,
                },
            )
            .await;
        (res, buf.unwrap_or_else(|| IoBuf::zeroed(len)))
    }

    /// `fdatasync(2)`: make every completed write to `file` durable.
    pub async fn fdatasync(&self, file: &Arc<File>) -> io::Result<()> {
        self.run(file, OpKind::Fdatasync).await.0
    }

    /// `fallocate(2)` with `mode` (e.g. `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`, `FALLOC_FL_ZERO_RANGE`).
    pub async fn fallocate(
        &self,
        file: &Arc<File>,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        self.run(file, OpKind::Fallocate { mode, offset, len })
            .await
            .0
    }

    /// Queue one op on a worker and wait for its reply.
    async fn run(&self, file: &Arc<File>, kind: OpKind) -> Reply {
        let (tx, rx) = oneshot::channel();
        let op = Op {
            file: Arc::clone(file),
            kind,
            reply: tx,
        };
        if let Err(op) = self.enqueue(op) {
            op.finish(Err(stopped()));
        }
        rx.await.unwrap_or_else(|_| (Err(stopped()), None))
    }

    /// Hand `op` to a worker; gives it back if that worker has exited.
    fn enqueue(&self, op: Op) -> Result<(), Op> {
        match &self.inner.backend {
            Backend::Uring(rings) => {
                // On an I/O thread the op goes to that thread's own ring: no handoff (see `local_ring`).
                let op = match crate::local_ring::try_push(op) {
                    Ok(()) => return Ok(()),
                    Err(op) => op,
                };
                let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % rings.len();
                let ring = &rings[i];
                let mut q = ring.queue.lock();
                if q.closed {
                    return Err(op);
                }
                let was_empty = q.ops.is_empty();
                q.ops.push_back(op);
                drop(q);
                // Only the push that makes the queue non-empty needs to wake the thread: it takes the whole
                // queue at once, and resets the eventfd before taking it.
                if was_empty {
                    ring.wake();
                }
                Ok(())
            }
            Backend::Fallback(pool) => {
                let mut q = pool.queue.lock();
                if q.closed {
                    return Err(op);
                }
                q.ops.push_back(op);
                drop(q);
                pool.cond.notify_one();
                Ok(())
            }
        }
    }
}

pub(crate) fn stopped() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "I/O engine thread has stopped")
}

// ---------------------------------------------------------------------------------------------------------------
// io_uring backend
// ---------------------------------------------------------------------------------------------------------------

/// Spawn ring thread `index`; the ring is created on that thread (so `SINGLE_ISSUER` holds) and the setup
/// result is reported back before this returns.
fn start_ring(index: usize, depth: u32) -> io::Result<Arc<RingShared>> {
    // SAFETY: eventfd(2) takes no pointers; the returned fd (if non-negative) is new and owned by nobody else.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created, valid descriptor that nothing else owns.
    let wake_fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let shared = Arc::new(RingShared {
        queue: Mutex::new(Queue::new()),
        wake_fd,
    });
    let (setup_tx, setup_rx) = std::sync::mpsc::channel();
    let thread_shared = Arc::clone(&shared);
    thread::Builder::new()
        .name(format!("shale-uring-{index}"))
        .spawn(move || {
            let ring = match build_ring(depth) {
                Ok(ring) => {
                    let _ = setup_tx.send(Ok(()));
                    ring
                }
                Err(e) => {
                    let _ = setup_tx.send(Err(e));
                    thread_shared.queue.lock().closed = true;
                    return;
                }
            };
            RingThread::new(ring, thread_shared, depth).run();
        })?;
    match setup_rx.recv() {
        Ok(Ok(())) => Ok(shared),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::other("io_uring thread died during setup")),
    }
}

/// Create a ring with room for `depth` ops plus the wake-up poll, and check it supports every opcode we use.
fn build_ring(depth: u32) -> io::Result<IoUring> {
    let entries = (depth + 1).next_power_of_two();
    // COOP_TASKRUN and SINGLE_ISSUER cut interrupts and locking (one thread owns the ring); older kernels
    // reject them with EINVAL, so retry plain.
    let ring = match IoUring::builder()
        .setup_coop_taskrun()
        .setup_single_issuer()
        .build(entries)
    {
        Ok(ring) => ring,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::new(entries)?,
        Err(e) => return Err(e),
    };
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    let needed = [
        opcode::Read::CODE,
        opcode::Write::CODE,
        opcode::Fsync::CODE,
        opcode::Fallocate::CODE,
        opcode::PollAdd::CODE,
    ];
    if let Some(missing) = needed.iter().find(|&&code| !probe.is_supported(code)) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("io_uring opcode {missing} not supported"),
        ));
    }
    Ok(ring)
}

/// Ops the kernel currently owns, indexed by `user_data`.
#[derive(Default)]
pub(crate) struct InFlight {
    slots: Vec<Option<Op>>,
    free: Vec<usize>,
    len: usize,
}

impl InFlight {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn get_mut(&mut self, i: usize) -> Option<&mut Op> {
        self.slots.get_mut(i)?.as_mut()
    }

    pub(crate) fn insert(&mut self, op: Op) -> usize {
        self.len += 1;
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(op);
                i
            }
            None => {
                self.slots.push(Some(op));
                self.slots.len() - 1
            }
        }
    }

    pub(crate) fn remove(&mut self, i: usize) -> Option<Op> {
        let op = self.slots.get_mut(i)?.take()?;
        self.free.push(i);
        self.len -= 1;
        Some(op)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Only reached with ops left if the ring thread unwinds: the kernel may still write into these buffers,
        // so leak them instead of freeing memory it can touch.
        for op in self.slots.drain(..).flatten() {
            std::mem::forget(op);
        }
    }
}

struct RingThread {
    // Field order matters for drop: the ring (and with it any armed poll) goes before the in-flight table.
    ring: IoUring,
    shared: Arc<RingShared>,
    depth: usize,
    pending: VecDeque<Op>,
    inflight: InFlight,
    wake_armed: bool,
    reaped: Vec<(u64, i32)>,
}

/// Closes the queue when the ring thread exits for any reason, failing queued ops instead of stranding them.
struct CloseOnExit(Arc<RingShared>);

impl Drop for CloseOnExit {
    fn drop(&mut self) {
        let ops = {
            let mut q = self.0.queue.lock();
            q.closed = true;
            std::mem::take(&mut q.ops)
        };
        for op in ops {
            op.finish(Err(stopped()));
        }
    }
}

impl RingThread {
    fn new(ring: IoUring, shared: Arc<RingShared>, depth: u32) -> Self {
        RingThread {
            ring,
            shared,
            depth: depth as usize,
            pending: VecDeque::new(),
            inflight: InFlight {
                slots: Vec::new(),
                free: Vec::new(),
                len: 0,
            },
            wake_armed: false,
            reaped: Vec::new(),
        }
    }

    fn run(mut self) {
        let _close = CloseOnExit(Arc::clone(&self.shared));
        loop {
            let shutdown = {
                let mut q = self.shared.queue.lock();
                self.pending.extend(q.ops.drain(..));
                q.shutdown
            };
            self.fill_sq();
            if shutdown && self.pending.is_empty() && self.inflight.len == 0 {
                return;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(e) => {
                    // Not expected with a well-formed ring; back off briefly rather than spin.
                    tracing::error!(error = %e, "io_uring_enter failed");
                    thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            self.reap();
        }
    }

    /// Move pending ops into the submission queue while slots are free, and keep the wake-up poll armed.
    fn fill_sq(&mut self) {
        let mut sq = self.ring.submission();
        if !self.wake_armed {
            let entry = opcode::PollAdd::new(
                types::Fd(self.shared.wake_fd.as_raw_fd()),
                libc::POLLIN as u32,
            )
            .build()
            .user_data(WAKE_TOKEN);
            // SAFETY: a poll op references no memory, only the eventfd, which `self.shared` keeps open for the
            // life of the ring (the ring is dropped first, see `RingThread`'s field order).
            if unsafe { sq.push(&entry) }.is_ok() {
                self.wake_armed = true;
            }
        }
        // SAFETY: ops leave `self.inflight` only in `reap`, when their completion comes off this ring, and if
        // this thread unwinds with ops in flight `InFlight`'s Drop leaks them rather than freeing their buffers.
        unsafe { push_pending(&mut sq, &mut self.pending, &mut self.inflight, self.depth) };
    }

    fn reap(&mut self) {
        let mut reaped = std::mem::take(&mut self.reaped);
        reaped.extend(
            self.ring
                .completion()
                .map(|c: cqueue::Entry| (c.user_data(), c.result())),
        );
        for (user_data, res) in reaped.drain(..) {
            if user_data == WAKE_TOKEN {
                self.wake_armed = false;
                // Reset the eventfd before the next queue drain, so a push after the drain always re-wakes us.
                self.shared.drain_wake();
                continue;
            }
            let Ok(idx) = usize::try_from(user_data) else {
                continue;
            };
            if let Some(op) = self.inflight.remove(idx) {
                if let Some(op) = complete(op, res) {
                    // Short read/write or EINTR/EAGAIN: the remainder goes out ahead of new work.
                    self.pending.push_front(op);
                }
            }
        }
        self.reaped = reaped;
    }
}

/// Move ops from `pending` into the submission queue `sq` (and the `inflight` table, keyed by `user_data`) while
/// fewer than `depth` are in flight. Shared by the ring threads and the I/O threads' rings.
///
/// # Safety
/// Each entry hands the kernel pointers into an op's heap buffer and its fd, so the caller must keep every op in
/// `inflight` there until its completion has been reaped from the ring `sq` belongs to (or leak it), and must not
/// drop that ring's in-flight table first. Moving the table is fine: the buffers' heap memory does not move, and
/// each op's `Arc<File>` keeps its fd open.
pub(crate) unsafe fn push_pending(
    sq: &mut squeue::SubmissionQueue<'_>,
    pending: &mut VecDeque<Op>,
    inflight: &mut InFlight,
    depth: usize,
) {
    while inflight.len < depth && !sq.is_full() {
        let Some(op) = pending.pop_front() else {
            break;
        };
        let idx = inflight.insert(op);
        let Some(op) = inflight.get_mut(idx) else {
            break;
        };
        let entry = sqe_for(op).user_data(idx as u64);
        // SAFETY: the entry's memory and fd stay valid until its completion is reaped (this function's contract).
        if unsafe { sq.push(&entry) }.is_err() {
            if let Some(op) = inflight.remove(idx) {
                pending.push_front(op);
            }
            break;
        }
    }
}

/// Build the submission entry for the next step of `op` (the part not yet done).
fn sqe_for(op: &mut Op) -> squeue::Entry {
    let fd = types::Fd(op.file.as_raw_fd());
    match &mut op.kind {
        OpKind::Read { offset, buf, done } => {
            let chunk = (buf.len() - *done).min(MAX_CHUNK) as u32;
            let ptr = buf.as_mut_ptr().wrapping_add(*done);
            opcode::Read::new(fd, ptr, chunk)
                .offset(*offset + *done as u64)
                .build()
        }
        OpKind::Write {
            offset,
            buf,
            done,
            dsync,
        } => {
            let chunk = (buf.len() - *done).min(MAX_CHUNK) as u32;
            let ptr = buf.as_ptr().wrapping_add(*done);
            let flags = if *dsync { libc::RWF_DSYNC } else { 0 };
            opcode::Write::new(fd, ptr, chunk)
                .offset(*offset + *done as u64)
                .rw_flags(flags)
                .build()
        }
        OpKind::Fdatasync => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        OpKind::Fallocate { mode, offset, len } => opcode::Fallocate::new(fd, *len)
            .offset(*offset)
            .mode(*mode)
            .build(),
    }
}

/// Apply one completion result (`res` as the kernel returns it) to `op`. Returns the op if more work remains;
/// otherwise replies to the caller.
pub(crate) fn complete(mut op: Op, res: i32) -> Option<Op> {
    if res < 0 {
        if matches!(-res, libc::EINTR | libc::EAGAIN) {
            return Some(op);
        }
        op.finish(Err(io::Error::from_raw_os_error(-res)));
        return None;
    }
    let n = res as usize;
    match &mut op.kind {
        OpKind::Read { offset, buf, done } => {
            *done += n;
            if *done < buf.len() {
                if n == 0 || at_eof(&op.file, *offset + *done as u64) {
                    buf.as_mut_slice()[*done..].fill(0);
                } else {
                    return Some(op);
                }
            }
        }
        OpKind::Write { buf, done, .. } => {
            if n == 0 {
                op.finish(Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "write returned 0 bytes",
                )));
                return None;
            }
            *done += n;
            if *done < buf.len() {
                return Some(op);
            }
        }
        OpKind::Fdatasync | OpKind::Fallocate { .. } => {}
    }
    op.finish(Ok(()));
    None
}

/// After a short read: is `pos` at or past the end of a regular file? (With `O_DIRECT`, reading on from an
/// unaligned end-of-file offset would fail with `EINVAL` instead of returning 0, so we check the size.)
fn at_eof(file: &File, pos: u64) -> bool {
    match file.metadata() {
        Ok(m) if m.file_type().is_file() => pos >= m.len(),
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Blocking fallback
// ---------------------------------------------------------------------------------------------------------------

fn fallback_worker(pool: Arc<PoolShared>) {
    loop {
        let op = {
            let mut q = pool.queue.lock();
            loop {
                if let Some(op) = q.ops.pop_front() {
                    break Some(op);
                }
                if q.shutdown {
                    break None;
                }
                pool.cond.wait(&mut q);
            }
        };
        match op {
            Some(op) => run_blocking(op),
            None => return,
        }
    }
}

fn run_blocking(mut op: Op) {
    let res = match &mut op.kind {
        OpKind::Read { offset, buf, .. } => read_full(&op.file, *offset, buf.as_mut_slice()),
        OpKind::Write {
            offset, buf, dsync, ..
        } => op
            .file
            .write_all_at(buf.as_slice(), *offset)
            .and_then(|()| if *dsync { op.file.sync_data() } else { Ok(()) }),
        OpKind::Fdatasync => op.file.sync_data(),
        OpKind::Fallocate { mode, offset, len } => {
            fallocate_blocking(op.file.as_raw_fd(), *mode, *offset, *len)
        }
    };
    op.finish(res);
}

/// `pread` until `buf` is full, zero-filling past end of file.
fn read_full(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let end = buf.len().min(done + MAX_CHUNK);
        match file.read_at(&mut buf[done..end], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                if done < buf.len() && at_eof(file, offset + done as u64) {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

fn fallocate_blocking(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    loop {
        // SAFETY: `fd` belongs to the op's `Arc<File>`, which outlives this call; fallocate takes no pointers.
        let r = unsafe { libc::fallocate(fd, mode, off, len) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    fn engines() -> Vec<IoEngine> {
        let cfg = IoEngineConfig {
            threads: 2,
            queue_depth: 32,
        };
        vec![
            IoEngine::new(cfg).unwrap(),
            IoEngine::new_fallback(cfg).unwrap(),
        ]
    }

    fn tmpfile(dir: &tempfile::TempDir, name: &str, direct: bool) -> Arc<File> {
        let path = dir.path().join(name);
        let mut o = std::fs::OpenOptions::new();
        o.read(true).write(true).create(true).truncate(true);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        Arc::new(o.open(path).unwrap())
    }

    fn pattern(seed: u64, len: usize) -> IoBuf {
        let mut b = IoBuf::zeroed(len);
        for (i, x) in b.iter_mut().enumerate() {
            *x = (seed.wrapping_mul(31).wrapping_add(i as u64 / 7)) as u8;
        }
        b
    }

    #[test]
    fn uring_is_available_here() {
        // Not a requirement for correctness, but the rest of the suite only tests io_uring if it is used.
        let e = IoEngine::new(IoEngineConfig::default()).unwrap();
        eprintln!("io_uring in use: {}", e.is_uring());
    }

    #[tokio::test]
    async fn direct_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        for (n, engine) in engines().into_iter().enumerate() {
            let file = tmpfile(&dir, &format!("f{n}"), true);
            for dsync in [false, true] {
                let data = pattern(n as u64 + dsync as u64, 1 << 20);
                let (r, back) = engine.write_at(&file, 8192, data.clone(), dsync).await;
                r.unwrap();
                assert_eq!(back[..], data[..]);
                engine.fdatasync(&file).await.unwrap();
                let (r, got) = engine.read_at(&file, 8192, IoBuf::zeroed(1 << 20)).await;
                r.unwrap();
                assert_eq!(got[..], data[..]);
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_ops() {
        let dir = tempfile::tempdir().unwrap();
        for (n, engine) in engines().into_iter().enumerate() {
            let file = tmpfile(&dir, &format!("c{n}"), true);
            let mut tasks = Vec::new();
            for i in 0..1000u64 {
                let (engine, file) = (engine.clone(), Arc::clone(&file));
                tasks.push(tokio::spawn(async move {
                    let data = pattern(i, 4096);
                    let (r, _) = engine.write_at(&file, i * 4096, data.clone(), false).await;
                    r.unwrap();
                    let (r, got) = engine.read_at(&file, i * 4096, IoBuf::zeroed(4096)).await;
                    r.unwrap();
                    assert_eq!(got[..], data[..], "block {i}");
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            for i in (0..1000u64).step_by(97) {
                let (r, got) = engine.read_at(&file, i * 4096, IoBuf::zeroed(4096)).await;
                r.unwrap();
                assert_eq!(got[..], pattern(i, 4096)[..]);
            }
        }
    }

    #[tokio::test]
    async fn read_past_eof_zero_fills() {
        let dir = tempfile::tempdir().unwrap();
        for (n, engine) in engines().into_iter().enumerate() {
            for direct in [false, true] {
                let file = tmpfile(&dir, &format!("e{n}{direct}"), direct);
                // A file whose size is not a multiple of 512: the O_DIRECT read stops short at an odd offset.
                let (r, _) = engine.write_at(&file, 0, pattern(3, 4096), false).await;
                r.unwrap();
                file.set_len(1000).unwrap();
                let (r, got) = engine
                    .read_at(&file, 0, IoBuf::from_slice(&[0xAA; 8192]))
                    .await;
                r.unwrap();
                assert_eq!(got[..1000], pattern(3, 4096)[..1000]);
                assert!(got[1000..].iter().all(|&b| b == 0));
                let (r, got) = engine
                    .read_at(&file, 1 << 20, IoBuf::from_slice(&[0xAA; 4096]))
                    .await;
                r.unwrap();
                assert!(got.iter().all(|&b| b == 0));
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_future_mid_flight() {
        let dir = tempfile::tempdir().unwrap();
        for (n, engine) in engines().into_iter().enumerate() {
            let file = tmpfile(&dir, &format!("d{n}"), true);
            for i in 0..200u64 {
                let fut = engine.write_at(&file, i * 65536, pattern(i, 65536), i % 2 == 0);
                // Poll once (submitting the op) and then drop the future, abandoning the op mid-flight.
                let _ = tokio::time::timeout(std::time::Duration::from_micros(1), fut).await;
                let fut = engine.read_at(&file, i * 65536, IoBuf::zeroed(65536));
                drop(tokio::time::timeout(std::time::Duration::ZERO, fut).await);
            }
            engine.fdatasync(&file).await.unwrap();
            let data = pattern(7, 4096);
            let (r, _) = engine.write_at(&file, 0, data.clone(), false).await;
            r.unwrap();
            let (r, got) = engine.read_at(&file, 0, IoBuf::zeroed(4096)).await;
            r.unwrap();
            assert_eq!(got[..], data[..]);
        }
    }

    #[tokio::test]
    async fn punch_hole_reads_zero() {
        let dir = tempfile::tempdir().unwrap();
        for (n, engine) in engines().into_iter().enumerate() {
            let file = tmpfile(&dir, &format!("p{n}"), true);
            let (r, _) = engine.write_at(&file, 0, pattern(5, 1 << 20), false).await;
            r.unwrap();
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            engine.fallocate(&file, mode, 65536, 131072).await.unwrap();
            let (r, got) = engine.read_at(&file, 0, IoBuf::zeroed(1 << 20)).await;
            r.unwrap();
            let want = pattern(5, 1 << 20);
            assert_eq!(got[..65536], want[..65536]);
            assert!(got[65536..196608].iter().all(|&b| b == 0));
            assert_eq!(got[196608..], want[196608..]);
            assert_eq!(file.metadata().unwrap().len(), 1 << 20);
            // Errors come back as errors, not hangs: a negative length is EINVAL.
            assert!(engine.fallocate(&file, 0, 0, u64::MAX).await.is_err());
        }
    }

    #[tokio::test]
    async fn errors_and_zero_length() {
        let dir = tempfile::tempdir().unwrap();
        for (n, engine) in engines().into_iter().enumerate() {
            let file = tmpfile(&dir, &format!("z{n}"), true);
            let (r, b) = engine.read_at(&file, 0, IoBuf::zeroed(0)).await;
            r.unwrap();
            assert!(b.is_empty());
            // Misaligned O_DIRECT write: EINVAL, and the buffer comes back.
            let (r, b) = engine.write_at(&file, 1, IoBuf::zeroed(512), false).await;
            assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EINVAL));
            assert_eq!(b.len(), 512);
        }
    }

    #[test]
    fn threads_stop_when_last_handle_drops() {
        let engine = IoEngine::new(IoEngineConfig::default()).unwrap();
        let weak = match &engine.inner.backend {
            Backend::Uring(rings) => Arc::downgrade(&rings[0]),
            Backend::Fallback(_) => return,
        };
        let clone = engine.clone();
        drop(engine);
        assert!(weak.upgrade().is_some());
        drop(clone);
        // The ring thread holds the last strong reference until it exits.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while weak.upgrade().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "ring thread did not exit"
            );
            thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
