//! The guest-physical address map: where RAM, boot structures and devices live.
//!
//! One fixed map for every VM keeps the boot code, the device model and the test guest in agreement; the test
//! guest (`vmm/guest/`) hard-codes the same numbers (see `guest/shale_guest.h`).

/// Start of the GDT written for 64-bit entry.
pub const BOOT_GDT: u64 = 0x500;
/// Start of the (empty) IDT written for 64-bit entry.
pub const BOOT_IDT: u64 = 0x520;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer for Linux entry (grows down below the zero page area).
pub const BOOT_STACK: u64 = 0x8ff0;
/// PML4 of the boot identity map.
pub const PML4: u64 = 0x9000;
/// PDPT of the boot identity map.
pub const PDPT: u64 = 0xa000;
/// First of four page directories (2 MiB pages) covering the first 4 GiB.
pub const PD: u64 = 0xb000;
/// Multiprocessor table (so Linux finds every vCPU without ACPI).
pub const MPTABLE: u64 = 0x9fc00;
/// Kernel command line.
pub const CMDLINE: u64 = 0x20000;
/// Maximum command line length including the NUL.
pub const CMDLINE_MAX: usize = 4096;
/// Where kernels and flat binaries are loaded ("high memory" in boot protocol terms).
pub const HIMEM_START: u64 = 0x10_0000;
/// Initial stack pointer for flat binaries.
pub const FLAT_STACK: u64 = 0x8_0000;
/// Start of the 32-bit MMIO hole; RAM above this is relocated to [`HIGH_RAM_START`].
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Where RAM beyond [`MMIO_GAP_START`] continues.
pub const HIGH_RAM_START: u64 = MMIO_GAP_END;
/// First virtio-mmio device window; device `i` sits at `VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE`.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// GSI of the first virtio-mmio device; device `i` uses `VIRTIO_IRQ_BASE + i`.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Most virtio-mmio devices one VM can have (IOAPIC pins 5..=23).
pub const MAX_VIRTIO_DEVICES: usize = 19;
/// COM1 base port.
pub const SERIAL_PORT: u16 = 0x3f8;
/// COM1 interrupt line.
pub const SERIAL_IRQ: u32 = 4;
/// i8042 data port.
pub const I8042_DATA: u16 = 0x60;
/// i8042 command port; writing 0xfe pulses the CPU reset line.
pub const I8042_CMD: u16 = 0x64;
/// Debug-exit port: a guest `out` of a value here stops the VM with that exit code
/// ([`crate::VmExit::GuestExit`]).
pub const DEBUG_EXIT_PORT: u16 = 0x501;
/// Start of the EBDA/BIOS area that the e820 map reserves.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (RSDP first): in the reserved BIOS area, where Linux scans for the RSDP (0xE0000-0xFFFFF).
pub const ACPI_START: u64 = 0xe_0000;
/// Bytes reserved for the ACPI tables (up to the end of the BIOS area at 1 MiB).
pub const ACPI_MAX: u64 = 0x2_0000;
