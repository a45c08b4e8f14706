//! Per-thread io_uring rings, driven by the thread's own async runtime.
//!
//! # Why
//! The shared [`IoEngine`](crate::uring::IoEngine) hands every op to a ring thread and back, so a request that
//! arrives on a socket crosses three threads (runtime worker → ring thread → runtime worker → reply writer).
//! On small, virtualised hosts each of those wake-ups is a futex/eventfd round trip that may have to wake an idle
//! vCPU, and that latency — not CPU — is what bounded NBD 4k reads (the server left a third of the machine idle).
//! An [I/O thread](crate::iothread) instead runs a single-threaded runtime that owns one ring: a request's socket
//! read, its io_uring submission, the completion and the reply all happen on that one thread, with no handoff
//! (the shape qemu's iothreads and SPDK/Seastar reactors use).
//!
//! # How
//! - The ring lives in a thread-local. [`IoEngine`](crate::uring::IoEngine) checks it first: on an I/O thread an
//!   op is appended to the ring's pending list and the ring's *driver* task is notified (a same-thread wake).
//! - The driver task runs after the tasks that were ready with it, so every op queued in one scheduler tick goes
//!   to the kernel in one `io_uring_enter`. It then waits on the ring's registered eventfd (through the runtime's
//!   epoll, as one more readiness source beside the sockets) or on the next notification, and on wake reaps every
//!   completion and completes the ops' oneshots.
//! - No `COOP_TASKRUN`: completions must signal the eventfd while the thread sleeps in `epoll_wait`.
//!
//! # Ownership and soundness
//! As in the shared engine, an op (its buffer, its `Arc<File>`) lives in the ring's in-flight table until its
//! completion is reaped, whatever happens to the future that queued it. When the thread ends, [`LocalRing`]'s
//! `Drop` waits for every in-flight op before the buffers are freed, and fails ops that never reached the kernel.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;

use io_uring::{cqueue, IoUring};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;

use crate::uring::{complete, push_pending, stopped, InFlight, Op};

thread_local! {
    static LOCAL: RefCell<Option<Rc<LocalRing>>> = const { RefCell::new(None) };
}

/// One thread's ring, its in-flight table and the ops waiting for a slot.
pub(crate) struct LocalRing {
    state: RefCell<State>,
    /// Wakes the driver task: new ops are pending.
    kick: Notify,
    /// The driver has been notified and not yet run (avoid re-notifying for every op of a burst).
    kicked: Cell<bool>,
}

struct State {
    // Field order matters for drop: the ring goes before the in-flight table (see `Drop for LocalRing`).
    ring: IoUring,
    depth: usize,
    pending: VecDeque<Op>,
    inflight: InFlight,
    /// Completions of the current turn (kept to reuse its allocation).
    reaped: Vec<(u64, i32)>,
}

impl LocalRing {
    /// A ring with `depth` slots and `efd` registered as its completion eventfd.
    fn new(depth: u32, efd: &OwnedFd) -> io::Result<LocalRing> {
        let depth = depth.clamp(1, 16384);
        let ring = IoUring::new(depth.next_power_of_two())?;
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        Ok(LocalRing {
            state: RefCell::new(State {
                ring,
                depth: depth as usize,
                pending: VecDeque::new(),
                inflight: InFlight::default(),
                reaped: Vec::new(),
            }),
            kick: Notify::new(),
            kicked: Cell::new(false),
        })
    }

    /// Move pending ops into the ring while slots are free, submit them, and reap every completion. Ops that need
    /// another round (short transfers, `EAGAIN`) go back to the front of the pending list, and ops still waiting
    /// for a slot get the slots the reaped completions freed, before returning.
    fn turn(&self) {
        let mut st = self.state.borrow_mut();
        let st = &mut *st;
        loop {
            {
                let mut sq = st.ring.submission();
                // SAFETY: ops leave `st.inflight` only below, when their completion comes off this ring, and
                // `Drop for LocalRing` waits for every in-flight completion before the table is dropped.
                unsafe { push_pending(&mut sq, &mut st.pending, &mut st.inflight, st.depth) };
            }
            if let Err(e) = st.ring.submit() {
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) {
                    tracing::error!(error = %e, "io_uring_enter failed on an I/O thread");
                }
            }
            let mut reaped = std::mem::take(&mut st.reaped);
            reaped.extend(
                st.ring
                    .completion()
                    .map(|c: cqueue::Entry| (c.user_data(), c.result())),
            );
            // Go round again if a completion freed a slot while ops are still waiting for one: their wake-up
            // (the eventfd signal of the completions just reaped) may already have been consumed, and no further
            // completion may come to signal it again.
            let mut again = !reaped.is_empty() && !st.pending.is_empty();
            for (user_data, res) in reaped.drain(..) {
                let Ok(idx) = usize::try_from(user_data) else {
                    continue;
                };
                if let Some(op) = st.inflight.remove(idx) {
                    if let Some(op) = complete(op, res) {
                        st.pending.push_front(op);
                        again = true;
                    }
                }
            }
            st.reaped = reaped;
            if !again {
                return;
            }
        }
    }
}

impl Drop for LocalRing {
    fn drop(&mut self) {
        let st = self.state.get_mut();
        for op in st.pending.drain(..) {
            op.finish(Err(stopped()));
        }
        // The kernel may still write into in-flight buffers: wait for every completion before they are freed.
        while st.inflight.len() > 0 {
            if let Err(e) = st.ring.submit_and_wait(1) {
                if !matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) {
                    // Cannot wait any more: leak what is left (InFlight's Drop forgets it) rather than free
                    // memory the kernel may touch.
                    tracing::error!(error = %e, "io_uring wait failed while closing an I/O thread's ring");
                    return;
                }
            }
            let done: Vec<(u64, i32)> = st
                .ring
                .completion()
                .map(|c: cqueue::Entry| (c.user_data(), c.result()))
                .collect();
            for (user_data, _) in done {
                if let Some(op) = usize::try_from(user_data)
                    .ok()
                    .and_then(|i| st.inflight.remove(i))
                {
                    op.finish(Err(stopped()));
                }
            }
        }
    }
}

/// Queue `op` on this thread's ring, if this is an I/O thread; otherwise give it back.
pub(crate) fn try_push(op: Op) -> Result<(), Op> {
    LOCAL.with(|l| {
        let l = l.borrow();
        let Some(ring) = l.as_ref() else {
            return Err(op);
        };
        ring.state.borrow_mut().pending.push_back(op);
        if !ring.kicked.replace(true) {
            ring.kick.notify_one();
        }
        Ok(())
    })
}

/// True when the calling thread has a local ring (it is an I/O thread).
pub fn on_io_thread() -> bool {
    LOCAL.with(|l| l.borrow().is_some())
}

/// Installs a ring on the current thread for as long as the guard lives, and the future that drives it.
pub(crate) struct Installed {
    ring: Rc<LocalRing>,
}

impl Installed {
    /// Create this thread's ring (`depth` slots). Must be called inside the thread's runtime (the driver
    /// registers the eventfd with its reactor). Returns the guard and the driver future, which the caller spawns
    /// locally.
    pub(crate) fn new(
        depth: u32,
    ) -> io::Result<(Installed, impl std::future::Future<Output = ()>)> {
        // SAFETY: eventfd(2) takes no pointers; the returned fd (if non-negative) is new and owned by nobody else.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created, valid descriptor that nothing else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(fd) };
        let ring = Rc::new(LocalRing::new(depth, &efd)?);
        // SAFETY: `efd` is a valid open eventfd that the AsyncFd takes ownership of, so it stays open and refers to
        // the same file for the AsyncFd's whole life, and `OwnedFd::as_raw_fd` always returns that descriptor.
        let afd = unsafe { AsyncFd::register_with_interest(efd, Interest::READABLE) }
            .map_err(io::Error::from)?;
        LOCAL.with(|l| *l.borrow_mut() = Some(Rc::clone(&ring)));
        let driver = drive(Rc::clone(&ring), afd);
        Ok((Installed { ring }, driver))
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        LOCAL.with(|l| {
            let mut l = l.borrow_mut();
            if l.as_ref().is_some_and(|r| Rc::ptr_eq(r, &self.ring)) {
                *l = None;
            }
        });
    }
}

/// The driver task: submit what is pending, reap what completed, sleep until either changes.
async fn drive(ring: Rc<LocalRing>, efd: AsyncFd<OwnedFd>) {
    loop {
        ring.kicked.set(false);
        ring.turn();
        tokio::select! {
            biased;
            r = efd.readable() => match r {
                Ok(mut guard) => {
                    drain_eventfd(guard.get_inner());
                    guard.clear_ready();
                }
                Err(e) => {
                    tracing::error!(error = %e, "I/O thread lost its ring's eventfd");
                    return;
                }
            },
            _ = ring.kick.notified() => {}
        }
    }
}

fn drain_eventfd(fd: &OwnedFd) {
    let mut v = 0u64;
    // SAFETY: `fd` is an open non-blocking eventfd; we pass a pointer to 8 writable bytes, which is exactly what an
    // eventfd read fills. EAGAIN (already drained) is fine.
    let _ = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
}
