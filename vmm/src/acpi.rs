//! ACPI tables for Linux guests: how a stock distribution kernel finds the vCPUs, the IOAPIC and the
//! virtio-mmio disks.
//!
//! Why: virtio-mmio has no discovery of its own. Kernels built with `VIRTIO_MMIO_CMDLINE_DEVICES` take the disks
//! from `virtio_mmio.device=` on the command line, but distribution kernels (Debian's generic and cloud kernels
//! among them) do not set that option; they find virtio-mmio devices only through ACPI (`_HID "LNRO0005"`, the
//! binding the Linux driver matches) or a device tree. So the VMM writes a hardware-reduced ACPI platform, the
//! shape Firecracker and Cloud Hypervisor use:
//! - RSDP (revision 2) → XSDT → FADT (flag `HW_REDUCED_ACPI`: no PM timer, SCI or GPE blocks to emulate) → DSDT;
//! - DSDT: one `\_SB.Vnnn` device per virtio-mmio transport with its MMIO window and edge-triggered,
//!   active-high interrupt (the GSI its irqfd drives);
//! - MADT: one local APIC per vCPU and the IOAPIC (the same ids as the MP table, which stays for kernels
//!   without ACPI).
//!
//! The tables live in the BIOS read-only area at [`layout::ACPI_START`] (reserved in the e820 map, and where
//! Linux scans for the RSDP), and the zero page's `acpi_rsdp_addr` points at the RSDP as well. Built with the
//! `acpi_tables` crate (rust-vmm's table and AML encoders), not by hand.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{Result, VmmError};
use crate::layout;

const OEM_ID: [u8; 6] = *b"SHALE ";
/// FADT `IAPC_BOOT_ARCH`: no VGA (bit 2); the i8042 is present only for the reset line, so it is not advertised.
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;

/// One virtio-mmio transport as the DSDT describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    /// Guest-physical base of its register window.
    pub base: u64,
    /// Size of the window.
    pub size: u64,
    /// GSI (IOAPIC pin) its interrupt arrives on.
    pub gsi: u32,
}

/// The tables, laid out for [`layout::ACPI_START`], and where each one is.
#[derive(Debug)]
pub struct Tables {
    /// Everything from the RSDP on, to copy to `ACPI_START`.
    pub bytes: Vec<u8>,
    /// Guest-physical address of the RSDP.
    pub rsdp: u64,
    /// (signature, guest-physical address) of every table, for tests and logs.
    pub tables: Vec<([u8; 4], u64)>,
}

/// Build the tables for `cpus` vCPUs, the IOAPIC `ioapic_id` and `devices`.
pub fn build(cpus: u8, ioapic_id: u8, devices: &[MmioDevice]) -> Result<Tables> {
    let base = layout::ACPI_START;
    let mut out = Vec::new();
    let mut tables = Vec::new();

    // RSDP first (its address is what the guest looks for); XSDT and the rest follow, 16-byte aligned.
    let rsdp_len = Rsdp::len();
    let place = |out: &mut Vec<u8>, data: &[u8]| -> u64 {
        let at = out
            .len()
            .next_multiple_of(16)
            .max(rsdp_len.next_multiple_of(16));
        out.resize(at, 0);
        out.extend_from_slice(data);
        base + at as u64
    };
    out.resize(rsdp_len, 0);

    // DSDT: the virtio-mmio devices.
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"SHALEDSD", 1);
    let mut body = Vec::new();
    let mut names = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        let base32 = u32::try_from(d.base).map_err(|_| {
            VmmError::InvalidConfig(format!("virtio-mmio window {:#x} above 4 GiB", d.base))
        })?;
        let size32 = u32::try_from(d.size)
            .map_err(|_| VmmError::InvalidConfig("virtio-mmio window too large".into()))?;
        names.push((format!("V{i:03X}"), i as u32, base32, size32, d.gsi));
    }
    let mem_res: Vec<aml::Memory32Fixed> = names
        .iter()
        .map(|(_, _, b, s, _)| aml::Memory32Fixed::new(true, *b, *s))
        .collect();
    let irq_res: Vec<aml::Interrupt> = names
        .iter()
        .map(|(.., gsi)| aml::Interrupt::new(true, true, false, false, *gsi))
        .collect();
    let crs: Vec<aml::ResourceTemplate> = mem_res
        .iter()
        .zip(irq_res.iter())
        .map(|(m, i)| aml::ResourceTemplate::new(vec![m, i]))
        .collect();
    let hid = "LNRO0005";
    let hids: Vec<aml::Name> = names
        .iter()
        .map(|_| aml::Name::new("_HID".into(), &hid))
        .collect();
    let uids: Vec<aml::Name> = names
        .iter()
        .map(|(_, uid, ..)| aml::Name::new("_UID".into(), uid))
        .collect();
    let crs_names: Vec<aml::Name> = crs
        .iter()
        .map(|c| aml::Name::new("_CRS".into(), c))
        .collect();
    let devices_aml: Vec<aml::Device> = names
        .iter()
        .enumerate()
        .map(|(i, (name, ..))| {
            aml::Device::new(
                name.as_str().into(),
                vec![&hids[i], &uids[i], &crs_names[i]],
            )
        })
        .collect();
    let children: Vec<&dyn Aml> = devices_aml.iter().map(|d| d as &dyn Aml).collect();
    aml::Scope::new("\\_SB_".into(), children).to_aml_bytes(&mut body);
    dsdt.append_slice(&body);
    let dsdt_at = place(&mut out, dsdt.as_slice());
    tables.push((*b"DSDT", dsdt_at));

    // FADT: hardware-reduced, pointing at the DSDT.
    let mut fadt = FADTBuilder::new(OEM_ID, *b"SHALEFAC", 1)
        .dsdt_64(dsdt_at)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH_VGA_NOT_PRESENT.into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"SHALEVMM").into();
    let mut fadt_bytes = Vec::new();
    fadt.finalize().to_aml_bytes(&mut fadt_bytes);
    let fadt_at = place(&mut out, &fadt_bytes);
    tables.push((*b"FACP", fadt_at));

    // MADT: local APICs and the IOAPIC.
    let mut madt = MADT::new(
        OEM_ID,
        *b"SHALEAPC",
        1,
        LocalInterruptController::Address(0xfee0_0000),
    );
    for id in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(ioapic_id, 0xfec0_0000, 0));
    let mut madt_bytes = Vec::new();
    madt.to_aml_bytes(&mut madt_bytes);
    let madt_at = place(&mut out, &madt_bytes);
    tables.push((*b"APIC", madt_at));

    // XSDT, then the RSDP that points at it.
    let mut xsdt = XSDT::new(OEM_ID, *b"SHALEXSD", 1);
    xsdt.add_entry(fadt_at);
    xsdt.add_entry(madt_at);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let xsdt_at = place(&mut out, &xsdt_bytes);
    tables.push((*b"XSDT", xsdt_at));

    let mut rsdp_bytes = Vec::new();
    Rsdp::new(OEM_ID, xsdt_at).to_aml_bytes(&mut rsdp_bytes);
    out[..rsdp_len].copy_from_slice(&rsdp_bytes);

    if out.len() as u64 > layout::ACPI_MAX {
        return Err(VmmError::InvalidConfig(format!(
            "ACPI tables need {} bytes, more than the {} reserved",
            out.len(),
            layout::ACPI_MAX
        )));
    }
    Ok(Tables {
        bytes: out,
        rsdp: base,
        tables,
    })
}

/// Build the tables and copy them into guest memory; returns the RSDP's address.
pub fn write(
    mem: &GuestMemoryMmap,
    cpus: u8,
    ioapic_id: u8,
    devices: &[MmioDevice],
) -> Result<u64> {
    let t = build(cpus, ioapic_id, devices)?;
    mem.write_slice(&t.bytes, GuestAddress(layout::ACPI_START))
        .map_err(|e| VmmError::Load(format!("writing ACPI tables: {e}")))?;
    Ok(t.rsdp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    fn table_at(t: &Tables, addr: u64) -> &[u8] {
        let off = (addr - layout::ACPI_START) as usize;
        let len = u32::from_le_bytes([
            t.bytes[off + 4],
            t.bytes[off + 5],
            t.bytes[off + 6],
            t.bytes[off + 7],
        ]) as usize;
        &t.bytes[off..off + len]
    }

    fn devices(n: usize) -> Vec<MmioDevice> {
        (0..n)
            .map(|i| MmioDevice {
                base: layout::VIRTIO_MMIO_BASE + i as u64 * layout::VIRTIO_MMIO_SIZE,
                size: layout::VIRTIO_MMIO_SIZE,
                gsi: layout::VIRTIO_IRQ_BASE + i as u32,
            })
            .collect()
    }

    /// The chain RSDP → XSDT → FADT → DSDT and XSDT → MADT is linked, and every checksum verifies.
    #[test]
    fn tables_link_and_checksum() {
        let t = build(2, 3, &devices(3)).expect("tables");
        let rsdp = &t.bytes[..36];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]), "ACPI 1.0 RSDP checksum");
        assert!(checksum_ok(rsdp), "extended RSDP checksum");
        let xsdt_at = u64::from_le_bytes(rsdp[24..32].try_into().expect("8 bytes"));
        let xsdt = table_at(&t, xsdt_at);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(xsdt));
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let sigs: Vec<&[u8]> = entries.iter().map(|&a| &table_at(&t, a)[..4]).collect();
        assert_eq!(sigs, vec![&b"FACP"[..], &b"APIC"[..]]);
        let fadt = table_at(&t, entries[0]);
        assert!(checksum_ok(fadt));
        let flags = u32::from_le_bytes(fadt[112..116].try_into().expect("4 bytes"));
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        let x_dsdt = u64::from_le_bytes(fadt[140..148].try_into().expect("8 bytes"));
        let dsdt = table_at(&t, x_dsdt);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(dsdt));
        let madt = table_at(&t, entries[1]);
        assert!(checksum_ok(madt));
        // Header (44) + 2 local APICs (8 each) + IOAPIC (12).
        assert_eq!(madt.len(), 44 + 16 + 12);
        assert!(t.bytes.len() as u64 <= layout::ACPI_MAX);
    }

    /// The DSDT names every transport with the driver's `_HID` and its window and GSI; `iasl` (when installed)
    /// disassembles it without errors.
    #[test]
    fn dsdt_describes_each_virtio_device() {
        let devs = devices(2);
        let t = build(1, 2, &devs).expect("tables");
        let (_, dsdt_at) = t
            .tables
            .iter()
            .find(|(s, _)| s == b"DSDT")
            .copied()
            .expect("dsdt");
        let dsdt = table_at(&t, dsdt_at).to_vec();
        let hay = |needle: &[u8]| dsdt.windows(needle.len()).filter(|w| *w == needle).count();
        assert_eq!(hay(b"LNRO0005"), 2);
        assert_eq!(hay(b"V000"), 1);
        assert_eq!(hay(b"V001"), 1);
        for d in &devs {
            assert_eq!(
                hay(&(d.base as u32).to_le_bytes()),
                1,
                "window {:#x}",
                d.base
            );
        }
        let Ok(iasl) = which_iasl() else {
            eprintln!("iasl not installed (Debian: acpica-tools): skipping the disassembly check");
            return;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dsdt.dat");
        std::fs::write(&path, &dsdt).expect("write");
        let out = std::process::Command::new(iasl)
            .arg("-d")
            .arg(&path)
            .current_dir(dir.path())
            .output()
            .expect("iasl");
        assert!(
            out.status.success(),
            "iasl -d: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dsl = std::fs::read_to_string(dir.path().join("dsdt.dsl")).expect("dsl");
        assert!(dsl.contains("\"LNRO0005\""), "{dsl}");
        assert!(dsl.contains("Memory32Fixed"), "{dsl}");
        assert!(dsl.contains("0xD0001000"), "{dsl}");
        assert!(dsl.contains("0x00000006"), "{dsl}");
    }

    fn which_iasl() -> std::result::Result<std::path::PathBuf, ()> {
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|d| d.join("iasl"))
            .find(|p| p.is_file())
            .ok_or(())
    }

    /// Too many devices for the reserved window is an error, not an overflow into other memory.
    #[test]
    fn oversized_is_refused() {
        assert!(build(255, 255, &devices(4000)).is_err());
    }
}
