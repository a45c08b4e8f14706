//! Shale's embedded KVM VMM: an x86_64 VM whose virtio-blk disks are Shale volumes.
//!
//! The daemon (or `shale vm run`) builds a [`VmConfig`] — name, memory, vCPUs, disks as
//! `Arc<dyn BlockDevice>`, and a [`BootSource`] — and drives a [`Vm`]: [`Vm::new`], [`Vm::start`],
//! [`Vm::stop`], [`Vm::wait`], [`Vm::console`]. Guest disks are served straight from the `BlockDevice`
//! (no file or loop device in between).
//!
//! Layout of the crate:
//! - [`vm`]: lifecycle, vCPU threads, exit handling; [`cpu`]: CPUID/MSR/LAPIC/long-mode setup;
//!   [`boot`]: Linux and flat-binary loading, zero page, e820, MP table, page tables; [`acpi`]: the ACPI tables
//!   that let distribution kernels find the vCPUs and virtio-mmio disks; [`memory`]: memfd RAM;
//!   [`layout`]: the guest-physical map.
//! - [`virtio`]: the virtio-mmio transport and the virtio-blk device with its hostile-input parser.
//! - [`console`]: serial console output; `legacy`: COM1, i8042 reset, debug-exit port.
//!
//! `unsafe` is confined to [`memory`] (memfd creation, registering RAM with KVM) and the vCPU-kick signal
//! handler registration in [`vm`], plus one `AsyncFd` registration of an owned eventfd in [`virtio::blk`].

#![warn(missing_docs)]

pub mod acpi;
pub mod boot;
pub mod console;
pub mod cpu;
pub mod error;
pub mod layout;
mod legacy;
pub mod memory;
pub mod virtio;
pub mod vm;

pub use boot::BootSource;
pub use console::Console;
pub use cpu::CpuidPolicy;
pub use error::{Result, VmmError};
pub use virtio::blk::BlkStatsSnapshot;
pub use vm::{Disk, Vm, VmConfig, VmExit, VmState, VmStats};
