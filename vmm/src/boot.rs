//! Getting a guest image into memory and describing the machine to it.
//!
//! Two boot paths, both entering in 64-bit mode (no firmware):
//! - **Linux**: an uncompressed `vmlinux` ELF or a `bzImage`, loaded by linux-loader; the VMM writes the zero
//!   page (`boot_params`: setup header, e820 map, command line pointer, initrd), an MP table for the vCPUs, and
//!   jumps to the 64-bit entry point with `%rsi` pointing at the zero page (Linux x86 boot protocol, 64-bit).
//! - **Flat binary**: raw code loaded at [`layout::HIMEM_START`] and entered there, for test guests that drive
//!   devices directly. `%rdi` holds the RAM size.
//!
//! Either way the VMM writes a GDT, an empty IDT and an identity map of the first 4 GiB (2 MiB pages, covering
//! the MMIO hole so a flat guest can reach virtio-mmio windows).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::cpu::GDT;
use crate::error::{Result, VmmError};
use crate::layout;
use crate::memory::{ram_ranges, GuestMemoryMmap};

/// What to boot.
#[derive(Debug, Clone)]
pub enum BootSource {
    /// A Linux kernel (`vmlinux` ELF or `bzImage`), an optional initrd and the command line. The VMM describes
    /// the disks in ACPI tables (or, with [`crate::vm::VmConfig::acpi`] off, appends `virtio_mmio.device=`
    /// entries) and adds a console setting if none is given.
    Linux {
        /// Kernel image path.
        kernel: PathBuf,
        /// Initial ramdisk path.
        initrd: Option<PathBuf>,
        /// Kernel command line (without virtio_mmio device entries: the VMM describes the disks).
        cmdline: String,
    },
    /// A raw 64-bit flat binary, loaded and entered at [`layout::HIMEM_START`].
    FlatBinary(PathBuf),
}

/// Where the boot vCPU starts.
#[derive(Debug, Clone, Copy)]
pub struct EntryPoint {
    /// First instruction.
    pub rip: u64,
    /// Initial stack pointer.
    pub rsp: u64,
    /// `%rsi`: the zero page for Linux, 0 for flat binaries.
    pub rsi: u64,
    /// `%rdi`: RAM size for flat binaries.
    pub rdi: u64,
}

fn load_err<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> VmmError {
    move |e| VmmError::Load(format!("{what}: {e}"))
}

/// Write the GDT, IDT and identity page tables that [`crate::cpu::setup_long_mode`] points at.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<()> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::BOOT_GDT + i as u64 * 8))
            .map_err(load_err("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT))
        .map_err(load_err("IDT"))?;
    mem.write_obj(layout::PDPT | 0x3, GuestAddress(layout::PML4))
        .map_err(load_err("PML4"))?;
    for gib in 0..4u64 {
        let pd = layout::PD + gib * 0x1000;
        mem.write_obj(pd | 0x3, GuestAddress(layout::PDPT + gib * 8))
            .map_err(load_err("PDPT"))?;
        for i in 0..512u64 {
            let phys = (gib << 30) | (i << 21);
            // Present | writable | 2 MiB page; cache-disabled in the MMIO hole.
            let flags = if phys >= layout::MMIO_GAP_START {
                0x83 | 0x18
            } else {
                0x83
            };
            mem.write_obj(phys | flags, GuestAddress(pd + i * 8))
                .map_err(load_err("PD"))?;
        }
    }
    Ok(())
}

/// Load a flat binary at [`layout::HIMEM_START`].
pub fn load_flat(
    mem: &GuestMemoryMmap,
    path: &std::path::Path,
    ram_size: u64,
) -> Result<EntryPoint> {
    let mut image = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut image))
        .map_err(load_err("reading flat binary"))?;
    if layout::HIMEM_START + image.len() as u64 > ram_size.min(layout::MMIO_GAP_START) {
        return Err(VmmError::Load(format!(
            "flat binary of {} bytes does not fit in RAM",
            image.len()
        )));
    }
    mem.write_slice(&image, GuestAddress(layout::HIMEM_START))
        .map_err(load_err("copying flat binary"))?;
    Ok(EntryPoint {
        rip: layout::HIMEM_START,
        rsp: layout::FLAT_STACK,
        rsi: 0,
        rdi: ram_size,
    })
}

fn add_e820(params: &mut boot_params, addr: u64, size: u64, type_: u32) -> Result<()> {
    let i = params.e820_entries as usize;
    if i >= params.e820_table.len() {
        return Err(VmmError::Load("too many e820 entries".into()));
    }
    params.e820_table[i] = boot_e820_entry {
        addr,
        size,
        r#type: type_,
    };
    params.e820_entries += 1;
    Ok(())
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Load a Linux kernel (ELF `vmlinux` or `bzImage`), its initrd and command line, and write the zero page.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    kernel: &std::path::Path,
    initrd: Option<&std::path::Path>,
    cmdline: &str,
    acpi_rsdp: Option<u64>,
) -> Result<EntryPoint> {
    let mut kfile = File::open(kernel).map_err(load_err("opening kernel"))?;
    let mut magic = [0u8; 4];
    kfile
        .read_exact(&mut magic)
        .map_err(load_err("reading kernel"))?;
    kfile
        .seek(SeekFrom::Start(0))
        .map_err(load_err("reading kernel"))?;
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let (result, rip) = if &magic == b"\x7fELF" {
        let r = Elf::load(mem, None, &mut kfile, himem).map_err(load_err("loading ELF kernel"))?;
        let rip = r.kernel_load.raw_value();
        (r, rip)
    } else {
        let r = BzImage::load(mem, None, &mut kfile, himem).map_err(load_err("loading bzImage"))?;
        // The 64-bit entry point is 0x200 past the start of the protected-mode kernel (boot protocol 2.12+).
        let rip = r.kernel_load.raw_value() + 0x200;
        (r, rip)
    };

    let mut params = boot_params::default();
    if let Some(hdr) = result.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = 0xaa55;
        params.hdr.header = 0x5372_6448; // "HdrS"
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    params.hdr.type_of_loader = 0xff;
    if let Some(rsdp) = acpi_rsdp {
        // boot_params.acpi_rsdp_addr (boot protocol 2.14): where the RSDP is, so the kernel need not scan for it.
        params.acpi_rsdp_addr = rsdp;
    }
    params.hdr.loadflags |= 0x1; // LOADED_HIGH

    let cmd =
        Cmdline::try_from(cmdline, layout::CMDLINE_MAX).map_err(load_err("kernel command line"))?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(layout::CMDLINE), &cmd)
        .map_err(load_err("writing command line"))?;
    params.hdr.cmd_line_ptr = layout::CMDLINE as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;

    let low_ram_end = ram_size.min(layout::MMIO_GAP_START);
    if let Some(path) = initrd {
        let mut f = File::open(path).map_err(load_err("opening initrd"))?;
        let size = f.metadata().map_err(load_err("initrd size"))?.len();
        let max = if params.hdr.initrd_addr_max != 0 {
            u64::from(params.hdr.initrd_addr_max).min(low_ram_end)
        } else {
            low_ram_end
        };
        let addr = max
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|a| *a >= result.kernel_end)
            .ok_or_else(|| {
                VmmError::Load(format!(
                    "initrd of {size} bytes does not fit above the kernel in {max:#x} of RAM"
                ))
            })?;
        mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
            .map_err(load_err("copying initrd"))?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    add_e820(&mut params, 0, layout::EBDA_START, E820_RAM)?;
    add_e820(
        &mut params,
        layout::EBDA_START,
        layout::HIMEM_START - layout::EBDA_START,
        E820_RESERVED,
    )?;
    for (start, len) in ram_ranges(ram_size) {
        let (s, l) = if start == 0 {
            (layout::HIMEM_START, len - layout::HIMEM_START)
        } else {
            (start, len)
        };
        add_e820(&mut params, s, l, E820_RAM)?;
    }
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE))
        .map_err(load_err("writing boot_params"))?;
    if !mem.address_in_range(GuestAddress(rip)) {
        return Err(VmmError::Load(format!(
            "kernel entry point {rip:#x} is outside guest RAM"
        )));
    }
    Ok(EntryPoint {
        rip,
        rsp: layout::BOOT_STACK,
        rsi: layout::ZERO_PAGE,
        rdi: 0,
    })
}

/// Write an Intel MP table (spec 1.4) listing `cpus` processors, an IOAPIC and ISA interrupts, so Linux finds
/// every vCPU and the IOAPIC without ACPI. Returns the IOAPIC's id (the ACPI MADT must use the same).
pub fn write_mptable(mem: &GuestMemoryMmap, cpus: u8) -> Result<u8> {
    const APIC_VERSION: u8 = 0x14;
    const IOAPIC_ID_OFFSET: u8 = 1;
    let ioapic_id = cpus + IOAPIC_ID_OFFSET;
    let mut table: Vec<u8> = Vec::new();
    let mut entries = 0u16;
    // Processor entries.
    for cpu in 0..cpus {
        let mut e = [0u8; 20];
        e[0] = 0; // processor
        e[1] = cpu;
        e[2] = APIC_VERSION;
        e[3] = 0x1 | if cpu == 0 { 0x2 } else { 0 }; // enabled, BSP
        e[4..8].copy_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        e[8..12].copy_from_slice(&0x201u32.to_le_bytes()); // features: FPU | APIC
        table.extend_from_slice(&e);
        entries += 1;
    }
    // Bus entry: ISA.
    table.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    entries += 1;
    // IOAPIC entry.
    let mut io = [0u8; 8];
    io[0] = 2;
    io[1] = ioapic_id;
    io[2] = 0x11;
    io[3] = 1;
    io[4..8].copy_from_slice(&0xfec0_0000u32.to_le_bytes());
    table.extend_from_slice(&io);
    entries += 1;
    // I/O interrupt entries: ISA IRQ i -> IOAPIC pin i (0..24), plus ExtINT on pin 0.
    for irq in 0..24u8 {
        let kind = if irq == 0 { 3 } else { 0 }; // ExtINT for pin 0, INT otherwise
        table.extend_from_slice(&[3, kind, 0, 0, 0, irq, ioapic_id, irq]);
        entries += 1;
    }
    // Local interrupt entries: LINT0 ExtINT, LINT1 NMI.
    table.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    table.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    entries += 2;

    let fps_addr = layout::MPTABLE;
    let cfg_addr = fps_addr + 16;
    let mut cfg = vec![0u8; 44];
    cfg[0..4].copy_from_slice(b"PCMP");
    let len = (44 + table.len()) as u16;
    cfg[4..6].copy_from_slice(&len.to_le_bytes());
    cfg[6] = 4; // spec revision 1.4
    cfg[8..16].copy_from_slice(b"SHALE   ");
    cfg[16..28].copy_from_slice(b"VM          ");
    cfg[34..36].copy_from_slice(&entries.to_le_bytes());
    cfg[36..40].copy_from_slice(&0xfee0_0000u32.to_le_bytes());
    cfg.extend_from_slice(&table);
    let sum: u8 = cfg.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    cfg[7] = 0u8.wrapping_sub(sum);

    let mut fps = [0u8; 16];
    fps[0..4].copy_from_slice(b"_MP_");
    fps[4..8].copy_from_slice(&(cfg_addr as u32).to_le_bytes());
    fps[8] = 1; // length in 16-byte units
    fps[9] = 4;
    let sum: u8 = fps.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    fps[10] = 0u8.wrapping_sub(sum);
    mem.write_slice(&fps, GuestAddress(fps_addr))
        .map_err(load_err("MP table"))?;
    mem.write_slice(&cfg, GuestAddress(cfg_addr))
        .map_err(load_err("MP table"))?;
    if cfg_addr + cfg.len() as u64 > layout::HIMEM_START {
        return Err(VmmError::Load("MP table too large".into()));
    }
    Ok(ioapic_id)
}
