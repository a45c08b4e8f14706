//! Virtio devices and their transport.
//!
//! - [`mmio`]: the virtio-mmio (version 2) transport: register file, feature negotiation, queue setup, status and
//!   reset; one 4 KiB window and one interrupt line per device.
//! - [`blk`]: the virtio-blk device, whose requests are parsed into typed requests ([`request`]) and executed
//!   against a Shale [`shale_block::BlockDevice`] on an async worker.
//!
//! Notifications arrive on an ioeventfd (KVM completes the guest's write to `QueueNotify` in the kernel, so the
//! vCPU does not stop in the VMM) and interrupts leave on an irqfd, so I/O never waits on a vCPU thread.

pub mod blk;
pub mod mmio;
pub mod request;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// Feature bit: the device complies with virtio 1.x (modern interface, little-endian).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Feature bit: indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// Feature bit: used_event / avail_event notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// InterruptStatus bit: a used buffer was added.
pub const INT_VRING: u32 = 1;
/// InterruptStatus bit: the configuration (or device status) changed.
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line: the InterruptStatus register plus the irqfd that raises the GSI.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
    raised: AtomicU64,
    needs_reset: AtomicBool,
}

impl Interrupt {
    /// An interrupt line that signals `irqfd` (registered with KVM for the device's GSI).
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
            raised: AtomicU64::new(0),
            needs_reset: AtomicBool::new(false),
        }
    }

    /// Set `bits` in InterruptStatus and raise the interrupt.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.raised.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!(error = %e, "raising a virtio interrupt failed");
        }
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clear `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clear everything (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// The device hit a ring error it cannot recover from: report DEVICE_NEEDS_RESET and tell the driver with
    /// a configuration-change interrupt. Lives here because the device worker shares only this with the
    /// transport.
    pub fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.trigger(INT_CONFIG);
    }

    /// Whether [`Interrupt::set_needs_reset`] was called since the last reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// How many interrupts this line has raised (for statistics).
    pub fn raised(&self) -> u64 {
        self.raised.load(Ordering::Relaxed)
    }
}
