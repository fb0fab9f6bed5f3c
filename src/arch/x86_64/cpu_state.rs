//! A snapshot of the vCPU registers a crash report shows: where the guest was (RIP, RSP,
//! RFLAGS), its mode and paging (CR0, CR2, CR3, CR4, EFER) and its code and stack segments.
//!
//! Taken from KVM on the vCPU's own thread (`CpuState::read`), kept as plain values so the
//! report can be built and tested from a saved register set, without KVM.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;

const CR0_PE: u64 = 1 << 0;
const EFER_LMA: u64 = 1 << 10;
/// Where an x86 CPU starts after RESET or INIT (Intel SDM vol. 3, 9.1.4 "First Instruction
/// Executed"): CS.base 0xffff0000, IP 0xfff0, protection off.
const RESET_RIP: u64 = 0xfff0;
const RESET_CS_BASE: u64 = 0xffff_0000;
const RESET_CS_SELECTOR: u16 = 0xf000;

/// One segment register as the report shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    /// Type, S, DPL, P, AVL, L, D/B and G packed as in a descriptor's bytes 5-6 (the
    /// `flags` of a GDT entry, e.g. 0xa09b for 64-bit kernel code); bit 16 set when KVM
    /// marks the segment unusable.
    pub attributes: u32,
}

impl Segment {
    pub fn from_kvm(s: &kvm_segment) -> Self {
        let attributes = u32::from(s.type_ & 0xf)
            | u32::from(s.s & 1) << 4
            | u32::from(s.dpl & 3) << 5
            | u32::from(s.present & 1) << 7
            | u32::from(s.avl & 1) << 12
            | u32::from(s.l & 1) << 13
            | u32::from(s.db & 1) << 14
            | u32::from(s.g & 1) << 15
            | u32::from(s.unusable & 1) << 16;
        Self {
            selector: s.selector,
            base: s.base,
            limit: s.limit,
            attributes,
        }
    }

    /// `0x0010 base 0x0 limit 0xffffffff attr 0xa09b`.
    pub fn describe(&self) -> String {
        format!(
            "{:#06x} base {:#x} limit {:#x} attr {:#06x}",
            self.selector, self.base, self.limit, self.attributes
        )
    }

    fn to_json(self) -> String {
        format!(
            "{{\"selector\":\"{:#x}\",\"base\":\"{:#x}\",\"limit\":\"{:#x}\",\"attributes\":\"{:#x}\"}}",
            self.selector, self.base, self.limit, self.attributes
        )
    }
}

/// The registers of one vCPU at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuState {
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub cs: Segment,
    pub ss: Segment,
}

impl CpuState {
    pub fn from_kvm(regs: &kvm_regs, sregs: &kvm_sregs) -> Self {
        Self {
            rip: regs.rip,
            rsp: regs.rsp,
            rflags: regs.rflags,
            cr0: sregs.cr0,
            cr2: sregs.cr2,
            cr3: sregs.cr3,
            cr4: sregs.cr4,
            efer: sregs.efer,
            cs: Segment::from_kvm(&sregs.cs),
            ss: Segment::from_kvm(&sregs.ss),
        }
    }

    /// Reads the vCPU's registers (KVM_GET_REGS, KVM_GET_SREGS); on the vCPU's thread,
    /// outside KVM_RUN.
    pub fn read(fd: &VcpuFd) -> Result<Self, kvm_ioctls::Error> {
        Ok(Self::from_kvm(&fd.get_regs()?, &fd.get_sregs()?))
    }

    /// Whether this is the state of a CPU just out of RESET or INIT rather than where a guest
    /// was: on AMD, KVM re-initialises a vCPU that triple faulted (`shutdown_interception`
    /// clears the VMCB and resets the vCPU), so after KVM_EXIT_SHUTDOWN its registers are
    /// this and nothing is left of the crash.
    pub fn is_reset_state(&self) -> bool {
        self.rip == RESET_RIP
            && self.cs.base == RESET_CS_BASE
            && self.cs.selector == RESET_CS_SELECTOR
            && self.cr0 & CR0_PE == 0
    }

    /// The processor mode: long, protected or real.
    pub fn mode(&self) -> &'static str {
        if self.efer & EFER_LMA != 0 {
            "long mode"
        } else if self.cr0 & CR0_PE != 0 {
            "protected mode"
        } else {
            "real mode"
        }
    }

    /// The report's lines for these registers, RIP followed by `rip_symbol` when known.
    pub fn describe(&self, rip_symbol: Option<&str>) -> Vec<String> {
        let sym = rip_symbol.map(|s| format!(" {s}")).unwrap_or_default();
        vec![
            format!("RIP {:#018x}{sym} ({})", self.rip, self.mode()),
            format!("RSP {:#018x} RFLAGS {:#x}", self.rsp, self.rflags),
            format!(
                "CR0 {:#x} CR2 {:#x} CR3 {:#x} CR4 {:#x} EFER {:#x}",
                self.cr0, self.cr2, self.cr3, self.cr4, self.efer
            ),
            format!("CS {}", self.cs.describe()),
            format!("SS {}", self.ss.describe()),
        ]
    }

    /// The registers as a JSON object, `rip_symbol` null when unknown.
    pub fn to_json(&self, rip_symbol: Option<&str>, json_str: fn(&str) -> String) -> String {
        format!(
            "{{\"rip\":\"{:#x}\",\"rip_symbol\":{},\"mode\":\"{}\",\"rsp\":\"{:#x}\",\"rflags\":\"{:#x}\",\
             \"cr0\":\"{:#x}\",\"cr2\":\"{:#x}\",\"cr3\":\"{:#x}\",\"cr4\":\"{:#x}\",\"efer\":\"{:#x}\",\
             \"cs\":{},\"ss\":{},\"reset_state\":{}}}",
            self.rip,
            rip_symbol.map_or_else(|| "null".to_owned(), json_str),
            self.mode(),
            self.rsp,
            self.rflags,
            self.cr0,
            self.cr2,
            self.cr3,
            self.cr4,
            self.efer,
            self.cs.to_json(),
            self.ss.to_json(),
            self.is_reset_state()
        )
    }
}

/// The registers KVM leaves after re-initialising a vCPU (what AMD shows after a triple
/// fault), for tests.
#[cfg(test)]
pub(crate) fn after_reset() -> CpuState {
    CpuState {
        rip: RESET_RIP,
        rflags: 0x2,
        cr0: 0x6000_0010,
        cs: Segment {
            selector: RESET_CS_SELECTOR,
            base: RESET_CS_BASE,
            limit: 0xffff,
            attributes: 0x9b,
        },
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::regs::{gdt_entry, kvm_segment_from_gdt};

    #[test]
    fn segments_pack_the_descriptor_flags_back() {
        for flags in [0xa09b_u16, 0xc093, 0x808b] {
            let seg = Segment::from_kvm(&kvm_segment_from_gdt(gdt_entry(flags, 0, 0xfffff), 2));
            assert_eq!(seg.attributes, u32::from(flags), "{flags:#x}");
            assert_eq!((seg.selector, seg.limit), (0x10, 0xffff_ffff));
        }
    }

    #[test]
    fn reset_state_is_recognised() {
        let mut s = after_reset();
        assert!(s.is_reset_state());
        assert_eq!(s.mode(), "real mode");
        // A 64-bit kernel is never there.
        s.rip = 0xffff_ffff_8102_6898;
        assert!(!s.is_reset_state());
    }
}
