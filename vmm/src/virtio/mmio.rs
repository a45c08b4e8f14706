//! The virtio-mmio transport (virtio 1.2, section 4.2, version 2 register layout).
//!
//! The transport owns everything generic: feature negotiation, queue configuration, the status state machine and
//! reset. The device behind it ([`VirtioDevice`]) only describes itself and, once the driver sets DRIVER_OK,
//! receives its configured queues, their notification eventfds and the interrupt line. Guest register accesses
//! arrive here from vCPU threads (MMIO exits); queue notifications normally do not (they are ioeventfds).

use std::sync::Arc;

use parking_lot::Mutex;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{status, Interrupt, VIRTIO_F_VERSION_1};
use crate::memory::GuestMemoryMmap;

/// "virt" in little-endian.
const MAGIC: u32 = 0x7472_6976;
/// Vendor id reported to the guest ("SHAL").
const VENDOR_ID: u32 = 0x4c41_4853;

/// Register offsets.
#[allow(missing_docs)]
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// A virtqueue shared between the transport (configuration, reset) and the device worker (processing).
///
/// `generation` changes on every reset, so a worker that finishes a request after a reset can tell that the
/// queue it was serving is gone and must not touch guest memory for it.
#[derive(Debug)]
pub struct QueueCell {
    /// The split virtqueue.
    pub queue: Queue,
    /// Reset counter.
    pub generation: u64,
}

/// A shared virtqueue.
pub type SharedQueue = Arc<Mutex<QueueCell>>;

/// What a device gets when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// Features the driver accepted.
    pub features: u64,
    /// The configured queues.
    pub queues: Vec<SharedQueue>,
    /// The ioeventfd of each queue.
    pub notifiers: Vec<EventFd>,
    /// The device's interrupt line.
    pub interrupt: Arc<Interrupt>,
}

/// A virtio device behind the transport.
pub trait VirtioDevice: Send {
    /// Virtio device type (2 = block).
    fn device_type(&self) -> u32;
    /// Features the device offers.
    fn features(&self) -> u64;
    /// Maximum size of each queue.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Read device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Start serving the queues.
    fn activate(&mut self, activation: Activation) -> Result<(), String>;
    /// Stop serving: drop in-flight work; the transport resets the queues afterwards.
    fn reset(&mut self);
}

/// One virtio-mmio window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<SharedQueue>,
    notifiers: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    active: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("status", &self.status)
            .field("active", &self.active)
            .finish()
    }
}

impl MmioTransport {
    /// Wrap `device`; `notifiers[i]` is the ioeventfd registered for queue `i`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        notifiers: Vec<EventFd>,
    ) -> Result<Self, String> {
        let mut queues = Vec::new();
        for max in device.queue_max_sizes() {
            let queue = Queue::new(max).map_err(|e| format!("queue of size {max}: {e}"))?;
            queues.push(Arc::new(Mutex::new(QueueCell {
                queue,
                generation: 0,
            })));
        }
        if notifiers.len() != queues.len() {
            return Err("one notifier per queue is required".into());
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            notifiers,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            active: false,
        })
    }

    fn selected(&self) -> Option<&SharedQueue> {
        self.queues.get(self.queue_sel as usize)
    }

    /// The device status register (for tests and `show`).
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        let v: u32 = if data.len() != 4 || !offset.is_multiple_of(4) {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio: unaligned register read"
            );
            0
        } else {
            match offset {
                reg::MAGIC => MAGIC,
                reg::VERSION => 2,
                reg::DEVICE_ID => self.device.device_type(),
                reg::VENDOR_ID => VENDOR_ID,
                reg::DEVICE_FEATURES => match self.device_features_sel {
                    0 => self.device.features() as u32,
                    1 => (self.device.features() >> 32) as u32,
                    _ => 0,
                },
                reg::QUEUE_NUM_MAX => self
                    .selected()
                    .map_or(0, |q| u32::from(q.lock().queue.max_size())),
                reg::QUEUE_READY => self
                    .selected()
                    .map_or(0, |q| u32::from(q.lock().queue.ready())),
                reg::INTERRUPT_STATUS => self.interrupt.status(),
                reg::STATUS => {
                    if self.interrupt.needs_reset() {
                        self.status | status::DEVICE_NEEDS_RESET
                    } else {
                        self.status
                    }
                }
                reg::CONFIG_GENERATION => 0,
                _ => 0,
            }
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    /// Guest write of `data` at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio: unaligned register write ignored"
            );
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let configurable =
            self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & status::FEATURES_OK != 0 || self.status & status::DRIVER == 0 {
                    tracing::debug!(
                        "virtio-mmio: driver features written outside negotiation; ignored"
                    );
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NOTIFY => {
                // Normally handled in the kernel by the ioeventfd; this path is a fallback for odd access sizes.
                if let Some(n) = self.notifiers.get(v as usize) {
                    if let Err(e) = n.write(1) {
                        tracing::warn!(error = %e, "virtio-mmio: forwarding a queue notification failed");
                    }
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.write_status(v),
            reg::QUEUE_NUM | reg::QUEUE_READY | reg::QUEUE_DESC_LOW..=reg::QUEUE_USED_HIGH
                if configurable =>
            {
                let Some(q) = self.selected() else { return };
                let mut cell = q.lock();
                let queue = &mut cell.queue;
                match offset {
                    reg::QUEUE_NUM => queue.set_size(v as u16),
                    reg::QUEUE_READY => queue.set_ready(v == 1),
                    reg::QUEUE_DESC_LOW => queue.set_desc_table_address(Some(v), None),
                    reg::QUEUE_DESC_HIGH => queue.set_desc_table_address(None, Some(v)),
                    reg::QUEUE_AVAIL_LOW => queue.set_avail_ring_address(Some(v), None),
                    reg::QUEUE_AVAIL_HIGH => queue.set_avail_ring_address(None, Some(v)),
                    reg::QUEUE_USED_LOW => queue.set_used_ring_address(Some(v), None),
                    reg::QUEUE_USED_HIGH => queue.set_used_ring_address(None, Some(v)),
                    _ => {}
                }
            }
            _ => tracing::debug!(
                offset,
                v,
                status = self.status,
                "virtio-mmio: write ignored"
            ),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits (virtio 1.2, 2.1.2), apart from writing 0 to reset.
        if v & self.status != self.status {
            tracing::debug!(
                old = self.status,
                new = v,
                "virtio-mmio: status bits cleared without reset; ignored"
            );
            return;
        }
        let new = v & !self.status;
        let mut v = v;
        if new & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                tracing::info!(
                    driver = self.driver_features,
                    offered,
                    "virtio-mmio: driver accepted unoffered features or no VERSION_1; refusing FEATURES_OK"
                );
                v &= !status::FEATURES_OK;
            }
        }
        if new & status::DRIVER_OK != 0 {
            if v & status::FEATURES_OK == 0 {
                tracing::info!("virtio-mmio: DRIVER_OK without FEATURES_OK; ignored");
                return;
            }
            self.status = v;
            self.activate();
            return;
        }
        self.status = v;
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & super::VIRTIO_RING_F_EVENT_IDX != 0;
        for q in &self.queues {
            let mut cell = q.lock();
            cell.queue.set_event_idx(event_idx);
            if !cell.queue.is_valid(&self.mem) {
                tracing::info!(
                    "virtio-mmio: driver set DRIVER_OK with an invalid queue; device needs reset"
                );
                drop(cell);
                self.needs_reset();
                return;
            }
        }
        let mut notifiers = Vec::new();
        for n in &self.notifiers {
            match n.try_clone() {
                Ok(n) => notifiers.push(n),
                Err(e) => {
                    tracing::warn!(error = %e, "virtio-mmio: cloning a notifier failed");
                    self.needs_reset();
                    return;
                }
            }
        }
        let activation = Activation {
            mem: self.mem.clone(),
            features: self.driver_features,
            queues: self.queues.clone(),
            notifiers,
            interrupt: self.interrupt.clone(),
        };
        match self.device.activate(activation) {
            Ok(()) => self.active = true,
            Err(e) => {
                tracing::warn!(error = %e, "virtio-mmio: device activation failed");
                self.needs_reset();
            }
        }
    }

    fn needs_reset(&mut self) {
        self.interrupt.set_needs_reset();
    }

    /// Device reset: stop the device, forget negotiation, reset every queue (and bump its generation).
    pub fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        for q in &self.queues {
            let mut cell = q.lock();
            cell.queue.reset();
            cell.generation += 1;
        }
        self.interrupt.reset();
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
    }
}
