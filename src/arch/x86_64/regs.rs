//! The architectural state a vCPU starts the kernel with: general and segment registers,
//! control registers, the boot GDT, identity-mapped page tables for long mode, FPU, MSRs and
//! the local APIC's LINT pins.
//!
//! The values are computed by pure functions (testable on a `kvm_sregs` value and guest
//! memory); only the thin `setup_*` wrappers talk to KVM.

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::boot::{BootProtocol, KernelEntry};
use super::layout::*;
use crate::vstate::memory::GuestMemoryMmap;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Bit 1 of RFLAGS is reserved and always set.
const RFLAGS_RESERVED: u64 = 1 << 1;

const PAGE_PRESENT_RW: u64 = 0x3;
const PAGE_PS: u64 = 0x80;

// MSR indices (Intel SDM vol. 4).
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

// Local APIC register offsets and LVT delivery modes (Intel SDM vol. 3, 11.5.1).
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors setting up a vCPU's registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("Failed to write the boot GDT or page tables to guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    #[error("Failed to {0} vCPU registers")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("KVM accepted only {0} of the {1} boot MSRs")]
    Msrs(usize, usize),
}

/// A GDT entry from flags, base and limit, in the packed descriptor format.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Expands a GDT entry into the segment KVM takes.
pub fn kvm_segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        // With 4 KiB granularity the limit counts pages.
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

/// The boot GDT: null, code, data, TSS. Long mode wants a 64-bit code segment (L=1),
/// PVH a flat 32-bit one.
pub fn boot_gdt(protocol: BootProtocol) -> [u64; 4] {
    let code = match protocol {
        BootProtocol::Linux64 => gdt_entry(0xa09b, 0, 0xfffff),
        BootProtocol::Pvh => gdt_entry(0xc09b, 0, 0xffff_ffff),
    };
    let data = match protocol {
        BootProtocol::Linux64 => gdt_entry(0xc093, 0, 0xfffff),
        BootProtocol::Pvh => gdt_entry(0xc093, 0, 0xffff_ffff),
    };
    [0, code, data, gdt_entry(0x808b, 0, 0xfffff)]
}

/// Writes the GDT and IDT, and for long mode the page tables, and fills `sregs` so the vCPU
/// starts in the mode the boot protocol expects.
pub fn setup_sregs(
    mem: &GuestMemoryMmap,
    protocol: BootProtocol,
    sregs: &mut kvm_sregs,
) -> Result<(), RegsError> {
    let gdt = boot_gdt(protocol);
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + i as u64 * 8))
            .map_err(RegsError::GuestMemory)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(RegsError::GuestMemory)?;

    let code = kvm_segment_from_gdt(gdt[1], 1);
    let data = kvm_segment_from_gdt(gdt[2], 2);
    let tss = kvm_segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match protocol {
        BootProtocol::Pvh => {
            // PVH: 32-bit protected mode, paging off (xen/include/public/arch-x86/hvm/start_info.h).
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootProtocol::Linux64 => {
            setup_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    Ok(())
}

/// Identity-maps the first `IDENTITY_MAP_SIZE` bytes with 2 MiB pages: the 64-bit boot
/// protocol requires the kernel, zero page and command line to be mapped 1:1.
pub fn setup_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    mem.write_obj(PDPTE_START | PAGE_PRESENT_RW, GuestAddress(PML4_START))
        .map_err(RegsError::GuestMemory)?;
    mem.write_obj(PDE_START | PAGE_PRESENT_RW, GuestAddress(PDPTE_START))
        .map_err(RegsError::GuestMemory)?;
    for i in 0..IDENTITY_MAP_SIZE >> 21 {
        mem.write_obj(
            (i << 21) | PAGE_PRESENT_RW | PAGE_PS,
            GuestAddress(PDE_START + i * 8),
        )
        .map_err(RegsError::GuestMemory)?;
    }
    Ok(())
}

/// General registers at the kernel entry.
pub fn boot_regs(entry: &KernelEntry) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry.entry.0,
        ..Default::default()
    };
    match entry.protocol {
        BootProtocol::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        BootProtocol::Pvh => regs.rbx = PVH_INFO_START,
    }
    regs
}

/// The MSRs every vCPU boots with: syscall MSRs cleared, fast strings on, MTRRs write-back.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Power-on FPU state: x87 control word 0x37f and MXCSR 0x1f80 (all exceptions masked).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

fn lapic_reg(klapic: &kvm_lapic_state, off: usize) -> u32 {
    let b = &klapic.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(klapic: &mut kvm_lapic_state, off: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        klapic.regs[off + i] = *b as _;
    }
}

/// Programs LINT0 as ExtINT (the 8259 path) and LINT1 as NMI, as a BIOS would for virtual
/// wire mode; the MP table tells the guest the same.
pub fn set_lint_modes(klapic: &mut kvm_lapic_state) {
    let delivery = |reg: u32, mode: u32| (reg & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(klapic, APIC_LVT0);
    set_lapic_reg(klapic, APIC_LVT0, delivery(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(klapic, APIC_LVT1);
    set_lapic_reg(klapic, APIC_LVT1, delivery(lvt1, APIC_MODE_NMI));
}

/// Configures the LAPIC and MSRs of any vCPU.
pub fn setup_common(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut klapic = vcpu
        .get_lapic()
        .map_err(|e| RegsError::Kvm("read the LAPIC of", e))?;
    set_lint_modes(&mut klapic);
    vcpu.set_lapic(&klapic)
        .map_err(|e| RegsError::Kvm("set the LAPIC of", e))?;

    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).expect("boot MSR list fits a kvm_msrs");
    let set = vcpu
        .set_msrs(&msrs)
        .map_err(|e| RegsError::Kvm("set MSRs of", e))?;
    if set != entries.len() {
        return Err(RegsError::Msrs(set, entries.len()));
    }
    Ok(())
}

/// Puts the boot vCPU at the kernel entry point in the mode its boot protocol wants.
pub fn setup_boot_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: &KernelEntry,
) -> Result<(), RegsError> {
    vcpu.set_fpu(&boot_fpu())
        .map_err(|e| RegsError::Kvm("set the FPU of", e))?;
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| RegsError::Kvm("read special registers of", e))?;
    setup_sregs(mem, entry.protocol, &mut sregs)?;
    vcpu.set_sregs(&sregs)
        .map_err(|e| RegsError::Kvm("set special registers of", e))?;
    vcpu.set_regs(&boot_regs(entry))
        .map_err(|e| RegsError::Kvm("set general registers of", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    #[test]
    fn gdt_entries_round_trip_to_segments() {
        let code = kvm_segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(code.selector, 8);
        assert_eq!(code.l, 1, "64-bit code");
        assert_eq!(code.db, 0);
        assert_eq!(code.present, 1);
        assert_eq!(code.type_, 0xb);
        assert_eq!(code.limit, 0xffff_ffff);
        assert_eq!(code.g, 1);

        let data = kvm_segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!(data.selector, 16);
        assert_eq!(data.db, 1);
        assert_eq!(data.type_, 0x3);

        let tss = kvm_segment_from_gdt(gdt_entry(0x808b, 0, 0xfffff), 3);
        assert_eq!(tss.type_, 0xb);
        assert_eq!(tss.s, 0, "system segment");

        let null = kvm_segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
        assert_eq!(gdt_entry(0x9b, 0x1234_5678, 0xabcde) >> 56, 0x12);
    }

    #[test]
    fn long_mode_sregs_and_page_tables() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let mut sregs = kvm_sregs::default();
        setup_sregs(&mem, BootProtocol::Linux64, &mut sregs).unwrap();
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        assert_ne!(sregs.cr0 & X86_CR0_PE, 0);
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(sregs.gdt.base, BOOT_GDT_START);
        assert_eq!(sregs.gdt.limit, 31);

        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | PAGE_PRESENT_RW);
        let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START)).unwrap();
        assert_eq!(pdpte, PDE_START | PAGE_PRESENT_RW);
        let first: u64 = mem.read_obj(GuestAddress(PDE_START)).unwrap();
        assert_eq!(first, PAGE_PRESENT_RW | PAGE_PS);
        let last: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(last, (511 << 21) | PAGE_PRESENT_RW | PAGE_PS);
        let gdt1: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(gdt1, gdt_entry(0xa09b, 0, 0xfffff));
    }

    #[test]
    fn pvh_sregs_are_flat_32bit_without_paging() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let mut sregs = kvm_sregs::default();
        setup_sregs(&mem, BootProtocol::Pvh, &mut sregs).unwrap();
        assert_eq!(sregs.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!(sregs.cr4, 0);
        assert_eq!(sregs.efer, 0);
        assert_eq!(sregs.cs.l, 0);
        assert_eq!(sregs.cs.db, 1);
        assert_eq!(sregs.cs.limit, 0xffff_ffff);
        assert_eq!(sregs.ds.base, 0);
    }

    #[test]
    fn boot_regs_follow_protocol() {
        let linux = boot_regs(&KernelEntry {
            entry: GuestAddress(0x100_0000),
            protocol: BootProtocol::Linux64,
        });
        assert_eq!(linux.rip, 0x100_0000);
        assert_eq!(linux.rsi, ZERO_PAGE_START);
        assert_eq!(linux.rsp, BOOT_STACK_POINTER);
        assert_eq!(linux.rflags, 2);
        let pvh = boot_regs(&KernelEntry {
            entry: GuestAddress(0x100_0200),
            protocol: BootProtocol::Pvh,
        });
        assert_eq!(pvh.rbx, PVH_INFO_START);
        assert_eq!(pvh.rsi, 0);
    }

    #[test]
    fn lint_pins_get_extint_and_nmi() {
        let mut klapic = kvm_lapic_state::default();
        set_lapic_reg(&mut klapic, APIC_LVT0, 0x0001_0000 | 0x300);
        set_lint_modes(&mut klapic);
        assert_eq!(
            lapic_reg(&klapic, APIC_LVT0),
            0x0001_0000 | (APIC_MODE_EXTINT << 8)
        );
        assert_eq!(lapic_reg(&klapic, APIC_LVT1), APIC_MODE_NMI << 8);
    }

    #[test]
    fn boot_msrs_and_fpu() {
        let msrs = boot_msr_entries();
        let misc = msrs
            .iter()
            .find(|m| m.index == MSR_IA32_MISC_ENABLE)
            .unwrap();
        assert_eq!(misc.data, MSR_IA32_MISC_ENABLE_FAST_STRING);
        assert!(msrs
            .iter()
            .any(|m| m.index == MSR_MTRR_DEF_TYPE && m.data == MTRR_ENABLE_WB));
        let fpu = boot_fpu();
        assert_eq!(fpu.fcw, 0x37f);
        assert_eq!(fpu.mxcsr, 0x1f80);
    }
}
