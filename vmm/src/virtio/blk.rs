//! The virtio-blk device: a Shale [`BlockDevice`] as a guest disk.
//!
//! Data path: the guest writes `QueueNotify` → KVM signals the queue's ioeventfd → the device worker (a task on
//! the VM's tokio runtime) pops every available chain, [parses](super::request::parse) each into a typed request
//! and spawns its execution against the `BlockDevice` → on completion it copies read data into the guest's
//! buffers, writes the status byte, publishes the used entry, and raises the irqfd once per batch (respecting
//! EVENT_IDX suppression). Requests run concurrently and complete in any order, which virtio allows; FLUSH
//! covers every write completed before it was submitted because `BlockDevice::flush` covers every acknowledged
//! write.
//!
//! A guest that breaks the ring itself (an avail index running more than a queue ahead, a head index out of
//! range, rings outside RAM) gets DEVICE_NEEDS_RESET and the worker stops; bad requests only get a status.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use shale_block::{BlockDevice, BlockError, IoBuf};
use tokio::io::unix::AsyncFd;
use tokio::task::{AbortHandle, JoinSet};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::{Activation, SharedQueue, VirtioDevice};
use super::request::{self, Desc, ParseContext, Parsed, Request, SECTOR_SIZE};
use super::{
    Interrupt, INT_VRING, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::memory::GuestMemoryMmap;

/// virtio device type of a block device.
pub const DEVICE_TYPE: u32 = 2;
/// Queue size offered to the guest.
pub const QUEUE_SIZE: u16 = 256;

/// virtio-blk feature bits.
pub mod features {
    /// `size_max` is valid.
    pub const SIZE_MAX: u64 = 1 << 1;
    /// `seg_max` is valid.
    pub const SEG_MAX: u64 = 1 << 2;
    /// The disk is read-only.
    pub const RO: u64 = 1 << 5;
    /// `blk_size` is valid.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// FLUSH is supported.
    pub const FLUSH: u64 = 1 << 9;
    /// Topology fields are valid.
    pub const TOPOLOGY: u64 = 1 << 10;
    /// DISCARD is supported.
    pub const DISCARD: u64 = 1 << 13;
    /// WRITE_ZEROES is supported.
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

/// Counters for one disk, cheap to read while the VM runs (benchmarks, `shale vm show`).
#[derive(Debug, Default)]
pub struct BlkStats {
    /// Guest notifications (ioeventfd signals; several may coalesce into one wakeup).
    pub notifications: AtomicU64,
    /// Worker wakeups caused by notifications.
    pub wakeups: AtomicU64,
    /// Requests popped from the ring (valid or not).
    pub requests: AtomicU64,
    /// Requests refused by parsing (IOERR/UNSUPP without I/O).
    pub invalid: AtomicU64,
    /// Requests that failed in the `BlockDevice`.
    pub failed: AtomicU64,
    /// Used-ring interrupts raised.
    pub interrupts: AtomicU64,
    /// Bytes read by the guest.
    pub bytes_read: AtomicU64,
    /// Bytes written by the guest.
    pub bytes_written: AtomicU64,
    /// Device resets (driver-initiated or after a ring error).
    pub resets: AtomicU64,
}

/// A plain copy of [`BlkStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlkStatsSnapshot {
    /// See [`BlkStats::notifications`].
    pub notifications: u64,
    /// See [`BlkStats::wakeups`].
    pub wakeups: u64,
    /// See [`BlkStats::requests`].
    pub requests: u64,
    /// See [`BlkStats::invalid`].
    pub invalid: u64,
    /// See [`BlkStats::failed`].
    pub failed: u64,
    /// See [`BlkStats::interrupts`].
    pub interrupts: u64,
    /// See [`BlkStats::bytes_read`].
    pub bytes_read: u64,
    /// See [`BlkStats::bytes_written`].
    pub bytes_written: u64,
    /// See [`BlkStats::resets`].
    pub resets: u64,
}

impl BlkStats {
    /// Read every counter.
    pub fn snapshot(&self) -> BlkStatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BlkStatsSnapshot {
            notifications: l(&self.notifications),
            wakeups: l(&self.wakeups),
            requests: l(&self.requests),
            invalid: l(&self.invalid),
            failed: l(&self.failed),
            interrupts: l(&self.interrupts),
            bytes_read: l(&self.bytes_read),
            bytes_written: l(&self.bytes_written),
            resets: l(&self.resets),
        }
    }
}

/// A virtio-blk device serving one `BlockDevice`.
pub struct Block {
    disk: Arc<dyn BlockDevice>,
    read_only: bool,
    id: [u8; request::ID_BYTES],
    runtime: tokio::runtime::Handle,
    stats: Arc<BlkStats>,
    worker: Option<AbortHandle>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("read_only", &self.read_only)
            .field("info", &self.disk.info())
            .finish()
    }
}

impl Block {
    /// A device for `disk`, read-only if asked or if the disk itself is; `serial` is the GET_ID string
    /// (truncated to 20 bytes); the worker runs on `runtime`.
    pub fn new(
        disk: Arc<dyn BlockDevice>,
        read_only: bool,
        serial: &str,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        let mut id = [0u8; request::ID_BYTES];
        let n = serial.len().min(id.len());
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        let read_only = read_only || disk.info().read_only;
        Block {
            disk,
            read_only,
            id,
            runtime,
            stats: Arc::new(BlkStats::default()),
            worker: None,
        }
    }

    /// The device's counters.
    pub fn stats(&self) -> Arc<BlkStats> {
        self.stats.clone()
    }

    fn config(&self) -> [u8; 60] {
        let info = self.disk.info();
        let mut c = [0u8; 60];
        let put32 = |c: &mut [u8; 60], off: usize, v: u32| {
            c[off..off + 4].copy_from_slice(&v.to_le_bytes())
        };
        c[0..8].copy_from_slice(&(info.size / SECTOR_SIZE).to_le_bytes());
        put32(&mut c, 8, request::SIZE_MAX);
        put32(&mut c, 12, request::SEG_MAX);
        put32(&mut c, 20, info.block_size.max(512));
        // Topology: physical_block_exp, alignment_offset, min_io_size (in logical blocks), opt_io_size.
        let bs = info.block_size.max(512);
        let phys_exp = (info.preferred_block_size.max(bs) / bs)
            .min(1 << 15)
            .trailing_zeros() as u8;
        c[24] = phys_exp.min(3);
        c[25] = 0;
        c[26..28].copy_from_slice(&1u16.to_le_bytes());
        put32(&mut c, 28, info.preferred_block_size / bs);
        // num_queues
        c[34..36].copy_from_slice(&1u16.to_le_bytes());
        // Discard: up to 4 GiB - 512 per range, aligned to the block size.
        let max_sectors = u32::MAX - 1;
        put32(&mut c, 36, max_sectors);
        put32(&mut c, 40, request::MAX_DISCARD_SEG);
        put32(&mut c, 44, bs / SECTOR_SIZE as u32);
        put32(&mut c, 48, max_sectors);
        put32(&mut c, 52, request::MAX_DISCARD_SEG);
        c[56] = 1; // write_zeroes_may_unmap
        c
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | features::SIZE_MAX
            | features::SEG_MAX
            | features::BLK_SIZE
            | features::FLUSH
            | features::TOPOLOGY;
        if self.read_only {
            f |= features::RO;
        } else {
            f |= features::DISCARD | features::WRITE_ZEROES;
        }
        f
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config();
        let start = offset as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = start
                .checked_add(i)
                .and_then(|j| c.get(j))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(
            offset,
            "virtio-blk: config write ignored (writeback toggling not offered)"
        );
    }

    fn activate(&mut self, a: Activation) -> Result<(), String> {
        let (Some(queue), Some(notifier)) =
            (a.queues.into_iter().next(), a.notifiers.into_iter().next())
        else {
            return Err("virtio-blk needs one queue".into());
        };
        let generation = queue.lock().generation;
        let info = self.disk.info();
        let ctx = ParseContext {
            disk_size: info.size,
            read_only: self.read_only,
            discard: a.features & features::DISCARD != 0,
            write_zeroes: a.features & features::WRITE_ZEROES != 0,
            flush: a.features & features::FLUSH != 0,
        };
        let worker = Worker {
            mem: a.mem,
            queue,
            generation,
            interrupt: a.interrupt,
            disk: self.disk.clone(),
            ctx,
            id: self.id,
            stats: self.stats.clone(),
        };
        let _guard = self.runtime.enter();
        // SAFETY: `EventFd` owns its file descriptor, closes it only when dropped (which happens only when the
        // AsyncFd is dropped, since the AsyncFd owns it), and `as_raw_fd` always returns that same descriptor.
        let notifier =
            unsafe { AsyncFd::register_with_interest(notifier, tokio::io::Interest::READABLE) }
                .map_err(|e| format!("registering the queue notifier: {e}"))?;
        let handle = self.runtime.spawn(worker.run(notifier));
        self.worker = Some(handle.abort_handle());
        Ok(())
    }

    fn reset(&mut self) {
        self.stats.resets.fetch_add(1, Ordering::Relaxed);
        if let Some(w) = self.worker.take() {
            w.abort();
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        if let Some(w) = self.worker.take() {
            w.abort();
        }
    }
}

/// The ring is unusable until the driver resets the device.
#[derive(Debug)]
struct RingBroken(String);

struct Worker {
    mem: GuestMemoryMmap,
    queue: SharedQueue,
    generation: u64,
    interrupt: Arc<Interrupt>,
    disk: Arc<dyn BlockDevice>,
    ctx: ParseContext,
    id: [u8; request::ID_BYTES],
    stats: Arc<BlkStats>,
}

/// A finished request, ready to be published.
struct Done {
    head: u16,
    status_addr: Option<GuestAddress>,
    status: u8,
    used: u32,
}

/// Most requests in flight at once; more are left in the ring until some complete.
const MAX_INFLIGHT: usize = QUEUE_SIZE as usize;

impl Worker {
    async fn run(self, notifier: AsyncFd<EventFd>) {
        let mut inflight: JoinSet<Done> = JoinSet::new();
        loop {
            if let Err(RingBroken(why)) = self.pop_and_dispatch(&mut inflight) {
                tracing::warn!(reason = %why, "virtio-blk: ring error; device needs reset");
                self.mark_broken();
                return;
            }
            tokio::select! {
                ready = notifier.readable() => {
                    match ready {
                        Ok(mut guard) => {
                            match guard.get_inner().read() {
                                Ok(n) => {
                                    self.stats.notifications.fetch_add(n, Ordering::Relaxed);
                                    self.stats.wakeups.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => guard.clear_ready(),
                                Err(e) => {
                                    tracing::warn!(error = %e, "virtio-blk: reading the notifier failed");
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "virtio-blk: notifier failed");
                            return;
                        }
                    }
                }
                Some(first) = inflight.join_next(), if !inflight.is_empty() => {
                    let mut done = Vec::new();
                    if let Ok(d) = first {
                        done.push(d);
                    }
                    while let Some(next) = inflight.try_join_next() {
                        if let Ok(d) = next {
                            done.push(d);
                        }
                    }
                    if let Err(RingBroken(why)) = self.publish(&done) {
                        tracing::warn!(reason = %why, "virtio-blk: ring error; device needs reset");
                        self.mark_broken();
                        return;
                    }
                }
            }
        }
    }

    fn mark_broken(&self) {
        self.interrupt.set_needs_reset();
    }

    /// Pop every available chain (up to the in-flight cap), parse it, and start it.
    fn pop_and_dispatch(&self, inflight: &mut JoinSet<Done>) -> Result<(), RingBroken> {
        let mut refused = Vec::new();
        {
            let mut cell = self.queue.lock();
            if cell.generation != self.generation {
                return Ok(());
            }
            let queue = &mut cell.queue;
            let size = queue.size();
            loop {
                queue
                    .disable_notification(&self.mem)
                    .map_err(|e| RingBroken(e.to_string()))?;
                let room = MAX_INFLIGHT.saturating_sub(inflight.len());
                let mut popped = 0usize;
                let chains: Vec<_> = queue
                    .iter(&self.mem)
                    .map_err(|e| RingBroken(e.to_string()))?
                    .take(room)
                    .collect();
                for chain in chains {
                    popped += 1;
                    let head = chain.head_index();
                    if head >= size {
                        return Err(RingBroken(format!(
                            "head index {head} beyond queue size {size}"
                        )));
                    }
                    let descs: Vec<Desc> = chain
                        .take(request::MAX_DESCRIPTORS + 1)
                        .map(|d| Desc {
                            addr: d.addr().0,
                            len: d.len(),
                            writable: d.is_write_only(),
                        })
                        .collect();
                    self.stats.requests.fetch_add(1, Ordering::Relaxed);
                    let parsed = request::parse(&self.mem, &descs, &self.ctx);
                    match parsed {
                        Parsed {
                            status,
                            request: Ok(req),
                        } => {
                            let job = Job {
                                head,
                                status_addr: status,
                                req,
                                mem: self.mem.clone(),
                                disk: self.disk.clone(),
                                id: self.id,
                                stats: self.stats.clone(),
                            };
                            inflight.spawn(job.run());
                        }
                        Parsed {
                            status,
                            request: Err(e),
                        } => {
                            tracing::debug!(head, error = %e, "virtio-blk: request refused");
                            self.stats.invalid.fetch_add(1, Ordering::Relaxed);
                            refused.push(Done {
                                head,
                                status_addr: status,
                                status: e.status(),
                                used: 0,
                            });
                        }
                    }
                }
                if inflight.len() >= MAX_INFLIGHT {
                    // Leave notifications off: completions will come back here.
                    break;
                }
                if popped == 0
                    && !queue
                        .enable_notification(&self.mem)
                        .map_err(|e| RingBroken(e.to_string()))?
                {
                    break;
                }
            }
        }
        if !refused.is_empty() {
            self.publish(&refused)?;
        }
        Ok(())
    }

    /// Write status bytes, add used entries, and interrupt the guest once if it wants to be told.
    fn publish(&self, done: &[Done]) -> Result<(), RingBroken> {
        let mut cell = self.queue.lock();
        if cell.generation != self.generation {
            // Reset while these were in flight: the buffers belong to nobody now.
            return Ok(());
        }
        for d in done {
            let mut used = 0;
            if let Some(addr) = d.status_addr {
                if self.mem.write_obj(d.status, addr).is_ok() {
                    used = d.used + 1;
                }
            }
            cell.queue
                .add_used(&self.mem, d.head, used)
                .map_err(|e| RingBroken(e.to_string()))?;
        }
        let wanted = cell
            .queue
            .needs_notification(&self.mem)
            .map_err(|e| RingBroken(e.to_string()))?;
        // virtio-queue leaves VRING_AVAIL_F_NO_INTERRUPT to us: without EVENT_IDX a polling driver sets it.
        let suppressed = !cell.queue.event_idx_enabled()
            && self
                .mem
                .read_obj::<u16>(GuestAddress(cell.queue.avail_ring()))
                .is_ok_and(|flags| u16::from_le(flags) & 1 != 0);
        if wanted && !suppressed {
            self.stats.interrupts.fetch_add(1, Ordering::Relaxed);
            self.interrupt.trigger(INT_VRING);
        }
        Ok(())
    }
}

/// One request in flight.
struct Job {
    head: u16,
    status_addr: Option<GuestAddress>,
    req: Request,
    mem: GuestMemoryMmap,
    disk: Arc<dyn BlockDevice>,
    id: [u8; request::ID_BYTES],
    stats: Arc<BlkStats>,
}

impl Job {
    async fn run(self) -> Done {
        let used = self.req.data_in_len();
        let status = match self.execute().await {
            Ok(()) => shale_block::error::virtio_status::OK,
            Err(e) => {
                tracing::debug!(error = %e, "virtio-blk: request failed");
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                e.virtio_status()
            }
        };
        let used = if status == shale_block::error::virtio_status::OK {
            used
        } else {
            0
        };
        Done {
            head: self.head,
            status_addr: self.status_addr,
            status,
            used,
        }
    }

    /// Map the typed virtio request onto the shared front-end semantics (`shale_block::semantics`), so flush,
    /// discard and write-zeroes behave exactly as they do over NBD; only the guest-memory copies are ours.
    async fn execute(&self) -> Result<(), BlockError> {
        use shale_block::semantics::{execute, Request as Cmd, Response};
        let guest = |_| BlockError::Other("guest memory access failed".into());
        let dev = &*self.disk;
        match &self.req {
            Request::Read {
                offset,
                len,
                segments,
            } => {
                let len32 =
                    u32::try_from(*len).map_err(|_| BlockError::Other("read too large".into()))?;
                let Response::Data(buf) = execute(
                    dev,
                    Cmd::Read {
                        offset: *offset,
                        len: len32,
                    },
                )
                .await?
                else {
                    return Err(BlockError::Other("read returned no data".into()));
                };
                let mut at = 0usize;
                for s in segments {
                    let n = s.len as usize;
                    let src = buf
                        .get(at..at + n)
                        .ok_or_else(|| BlockError::Other("short read".into()))?;
                    self.mem.write_slice(src, s.addr).map_err(guest)?;
                    at += n;
                }
                self.stats.bytes_read.fetch_add(*len, Ordering::Relaxed);
                Ok(())
            }
            Request::Write {
                offset,
                len,
                segments,
            } => {
                let mut data = IoBuf::zeroed(*len as usize);
                let mut at = 0usize;
                for s in segments {
                    let n = s.len as usize;
                    let dst = data
                        .get_mut(at..at + n)
                        .ok_or_else(|| BlockError::Other("bad segment".into()))?;
                    self.mem.read_slice(dst, s.addr).map_err(guest)?;
                    at += n;
                }
                execute(
                    dev,
                    Cmd::Write {
                        offset: *offset,
                        data,
                        fua: false,
                    },
                )
                .await?;
                self.stats.bytes_written.fetch_add(*len, Ordering::Relaxed);
                Ok(())
            }
            Request::Flush => execute(dev, Cmd::Flush).await.map(|_| ()),
            Request::GetId { segment } => {
                let n = (segment.len as usize).min(self.id.len());
                self.mem
                    .write_slice(&self.id[..n], segment.addr)
                    .map_err(guest)
            }
            Request::Discard(ranges) => {
                for r in ranges {
                    execute(
                        dev,
                        Cmd::Discard {
                            offset: r.offset,
                            len: r.len,
                            fua: false,
                        },
                    )
                    .await?;
                }
                Ok(())
            }
            Request::WriteZeroes(ranges) => {
                for r in ranges {
                    let cmd = Cmd::WriteZeroes {
                        offset: r.offset,
                        len: r.len,
                        may_trim: r.unmap,
                        fua: false,
                    };
                    execute(dev, cmd).await?;
                }
                Ok(())
            }
        }
    }
}
