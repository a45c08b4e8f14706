//! vCPU state at power-on: CPUID, MSRs, FPU, local APIC, and the 64-bit long-mode register file.
//!
//! Both boot paths (Linux and flat binaries) enter the guest directly in 64-bit mode with paging on, using the
//! identity map, GDT and IDT that [`crate::boot`] writes into guest memory, so no real-mode firmware is needed.

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::error::{Result, VmmError};
use crate::layout;

/// CPUID leaf 1 ECX bit: the CPU runs under a hypervisor.
const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID leaf 1 ECX bit: XSAVE supported.
const CPUID_1_ECX_XSAVE: u32 = 1 << 26;
/// CPUID leaf 1 ECX bit: OSXSAVE (mirrors CR4.OSXSAVE).
const CPUID_1_ECX_OSXSAVE: u32 = 1 << 27;
/// CPUID leaf 1 ECX bit: AVX (needs XSAVE).
const CPUID_1_ECX_AVX: u32 = 1 << 28;

/// CPUID leaf 1 ECX bit: CMPXCHG16B.
const CPUID_1_ECX_CX16: u32 = 1 << 13;

/// Which host CPU features the guest sees.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuidPolicy {
    /// Hide XSAVE (and the AVX family that depends on it). Useful on hosts whose KVM cannot emulate XSAVE for
    /// non-paravirtual guests (kvm_pvm); a kernel then falls back to FXSAVE.
    pub hide_xsave: bool,
    /// Hide CMPXCHG16B, which KVM's instruction emulator cannot run (an emulating KVM such as kvm_pvm stops
    /// with an internal error when Linux's SLUB allocator uses it); Linux then takes its locked slow paths.
    pub hide_cmpxchg16b: bool,
}

impl CpuidPolicy {
    /// Hide what KVM's instruction emulator cannot execute. Needed where guest code outside a paravirtual
    /// mode is emulated (kvm_pvm, no VMX/SVM); harmless but slower elsewhere.
    pub fn emulation_safe() -> Self {
        CpuidPolicy {
            hide_xsave: true,
            hide_cmpxchg16b: true,
        }
    }

    /// [`CpuidPolicy::emulation_safe`] on hosts without hardware virtualization (no `vmx`/`svm` flag in
    /// /proc/cpuinfo), the full feature set otherwise.
    pub fn for_host() -> Self {
        let hw = std::fs::read_to_string("/proc/cpuinfo")
            .map(|c| c.split_whitespace().any(|w| w == "vmx" || w == "svm"))
            .unwrap_or(true);
        if hw {
            CpuidPolicy::default()
        } else {
            CpuidPolicy::emulation_safe()
        }
    }
}

/// Build the CPUID table for vCPU `id` of `count`: the host's KVM_GET_SUPPORTED_CPUID with the APIC id and
/// the hypervisor bit set. The KVM paravirt leaves (0x4000_0000..) are passed through as KVM reports them.
pub fn cpuid(kvm: &Kvm, id: u8, count: u8, policy: CpuidPolicy) -> Result<CpuId> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VmmError::kvm("KVM_GET_SUPPORTED_CPUID"))?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ecx |= CPUID_1_ECX_HYPERVISOR;
                if policy.hide_xsave {
                    e.ecx &= !(CPUID_1_ECX_XSAVE | CPUID_1_ECX_OSXSAVE | CPUID_1_ECX_AVX);
                }
                if policy.hide_cmpxchg16b {
                    e.ecx &= !CPUID_1_ECX_CX16;
                }
            }
            7 if policy.hide_xsave && e.index == 0 => {
                // AVX2 (ebx bit 5) and AVX-512 (ebx bits 16..31) need XSAVE state.
                e.ebx &= !((1 << 5) | 0xffff_0000);
            }
            0xd if policy.hide_xsave => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                // x2APIC topology: EDX is the x2APIC id of this CPU.
                e.edx = u32::from(id);
            }
            _ => {}
        }
    }
    Ok(cpuid)
}

/// Program CPUID, MSRs, FPU and LAPIC for a vCPU (both boot paths).
pub fn setup_common(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    id: u8,
    count: u8,
    policy: CpuidPolicy,
) -> Result<()> {
    vcpu.set_cpuid2(&cpuid(kvm, id, count, policy)?)
        .map_err(VmmError::kvm("KVM_SET_CPUID2"))?;

    // MSR_IA32_MISC_ENABLE: fast string operations, as firmware would leave it.
    let entries = [kvm_msr_entry {
        index: 0x1a0,
        data: 1,
        ..Default::default()
    }];
    let msrs = Msrs::from_entries(&entries)
        .map_err(|e| VmmError::InvalidConfig(format!("MSR list: {e:?}")))?;
    match vcpu.set_msrs(&msrs) {
        Ok(n) if n == entries.len() => {}
        Ok(n) => tracing::debug!(
            set = n,
            wanted = entries.len(),
            "KVM accepted only some boot MSRs"
        ),
        Err(e) => tracing::debug!(error = %e, "KVM refused boot MSRs"),
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(VmmError::kvm("KVM_SET_FPU"))?;

    // LINT0 = ExtINT (the PIC's output reaches the CPU), LINT1 = NMI, as a PC firmware would program them.
    let mut lapic = vcpu.get_lapic().map_err(VmmError::kvm("KVM_GET_LAPIC"))?;
    set_lvt(&mut lapic.regs, 0x350, 7);
    set_lvt(&mut lapic.regs, 0x360, 4);
    vcpu.set_lapic(&lapic)
        .map_err(VmmError::kvm("KVM_SET_LAPIC"))?;
    Ok(())
}

fn set_lvt(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = regs[offset + i] as u8;
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (i, x) in v.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *x as std::os::raw::c_char;
    }
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// GDT entries matching [`setup_long_mode`]'s segments: null, 64-bit code (0x08), data (0x10), TSS (0x18).
pub const GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_ffff,
];

/// Put the boot vCPU in 64-bit mode with the boot identity map, at `rip` with `rsp`, and `rsi` (the Linux
/// boot protocol's pointer to `boot_params`).
pub fn setup_long_mode(vcpu: &VcpuFd, rip: u64, rsp: u64, rsi: u64, rdi: u64) -> Result<()> {
    let mut sregs = vcpu.get_sregs().map_err(VmmError::kvm("KVM_GET_SREGS"))?;
    let code = segment(0x08, 0xb, true);
    let data = segment(0x10, 0x3, false);
    let mut tss = segment(0x18, 0xb, false);
    tss.s = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.gdt.base = layout::BOOT_GDT;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT;
    sregs.idt.limit = 7;
    // PE | MP | ET | NE | PG; PAE | OSFXSR | OSXMMEXCPT; EFER.LME | LMA.
    sregs.cr0 = 0x1 | 0x2 | 0x10 | 0x20 | 0x8000_0000;
    sregs.cr3 = layout::PML4;
    sregs.cr4 = 0x20 | 0x200 | 0x400;
    sregs.efer = 0x100 | 0x400;
    vcpu.set_sregs(&sregs)
        .map_err(VmmError::kvm("KVM_SET_SREGS"))?;

    let regs = kvm_regs {
        rip,
        rsp,
        rbp: rsp,
        rsi,
        rdi,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(VmmError::kvm("KVM_SET_REGS"))?;
    Ok(())
}
