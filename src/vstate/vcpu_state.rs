//! The whole architectural state of a vCPU as KVM holds it, taken from and put back into a
//! stopped vCPU for snapshots and migration.
//!
//! The order of the ioctls matters, for the reasons Firecracker's vCPU code documents
//! (`src/vmm/src/arch/x86_64/vcpu.rs`, `save_state` and `restore_state`), which this follows:
//! - saving: `KVM_GET_MP_STATE` first (it calls `kvm_apic_accept_events`, which may change
//!   the vCPU and LAPIC state), `KVM_GET_VCPU_EVENTS` last (the other GETs may change
//!   internal state it reports);
//! - restoring: CPUID first (later SETs depend on it, e.g. which MSRs exist), MP state, regs
//!   before vcpu events (`SET_REGS` clears pending exceptions, which `SET_VCPU_EVENTS`
//!   brings back), sregs before the LAPIC (sregs restore the APIC base MSR), the LAPIC before
//!   the MSRs (the TSC deadline MSR only restores into a configured LAPIC), MSR_IA32_TSC
//!   before MSR_IA32_TSC_DEADLINE, vcpu events last.
//!
//! The MSRs saved are every one KVM lists as saveable (`KVM_GET_MSR_INDEX_LIST`), which
//! includes KVM's own range 0x4b564d00-0x4b564dff (kvmclock, async PF, steal time, PV EOI),
//! minus those a vCPU refuses to read.

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// KVM's paravirtual MSRs (Documentation/virt/kvm/x86/msr.rst).
pub const KVM_MSR_RANGE: std::ops::RangeInclusive<u32> = 0x4b56_4d00..=0x4b56_4dff;

/// Errors taking or restoring a vCPU's state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("Failed to {0} of the vCPU")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("KVM restored {done} of the {total} MSRs of the vCPU (MSR {index:#x} refused)")]
    MsrsIncomplete {
        done: usize,
        total: usize,
        index: u32,
    },
    #[error("The saved CPUID has {0} entries, more than KVM takes")]
    Cpuid(usize),
}

/// One vCPU's state, in a form that serializes.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// (index, value), in restore order (the TSC deadline after the TSC).
    pub msrs: Vec<(u32, u64)>,
    pub vcpu_events: kvm_vcpu_events,
    /// The guest TSC frequency, when KVM reports it.
    pub tsc_khz: Option<u32>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("id", &self.id)
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .finish()
    }
}

/// Orders MSRs for restoring: everything else, then the TSC, then the TSC deadline.
fn restore_order(msrs: &mut [(u32, u64)]) {
    msrs.sort_by_key(|&(i, _)| match i {
        MSR_IA32_TSC => 1,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 0,
    });
}

/// Reads `indices` from the vCPU, skipping the ones it refuses (KVM_GET_MSRS stops at the
/// first MSR it cannot read and returns how many it read).
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, VcpuStateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).expect("at most KVM_MAX_MSR_ENTRIES");
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(|e| VcpuStateError::Kvm("read the MSRs", e))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        // The one at `n` could not be read: leave it out.
        rest = &rest[(n + 1).min(rest.len())..];
    }
    Ok(out)
}

/// Takes the state of a vCPU that is not running (its thread is parked out of KVM_RUN).
pub fn save(fd: &VcpuFd, id: u8, msr_indices: &[u32]) -> Result<VcpuState, VcpuStateError> {
    let k = |what| move |e| VcpuStateError::Kvm(what, e);
    let mp_state = fd.get_mp_state().map_err(k("read the MP state"))?;
    let regs = fd.get_regs().map_err(k("read the registers"))?;
    let sregs = fd.get_sregs().map_err(k("read the special registers"))?;
    let xsave = fd.get_xsave().map_err(k("read the XSAVE area"))?;
    let xcrs = fd.get_xcrs().map_err(k("read the XCRs"))?;
    let debug_regs = fd.get_debug_regs().map_err(k("read the debug registers"))?;
    let lapic = fd.get_lapic().map_err(k("read the local APIC"))?;
    let tsc_khz = fd.get_tsc_khz().ok();
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(k("read the CPUID"))?
        .as_slice()
        .iter()
        // KVM pads with empty entries.
        .filter(|e| !(e.function == 0 && e.index == 0 && e.flags == 0 && e.eax == 0))
        .copied()
        .collect();
    let mut msrs = read_msrs(fd, msr_indices)?;
    restore_order(&mut msrs);
    let vcpu_events = fd.get_vcpu_events().map_err(k("read the vCPU events"))?;
    Ok(VcpuState {
        id,
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        vcpu_events,
        tsc_khz,
    })
}

/// Puts `state` into a fresh vCPU (created, not yet run).
pub fn restore(fd: &VcpuFd, state: &VcpuState) -> Result<(), VcpuStateError> {
    let k = |what| move |e| VcpuStateError::Kvm(what, e);
    let cpuid =
        CpuId::from_entries(&state.cpuid).map_err(|_| VcpuStateError::Cpuid(state.cpuid.len()))?;
    fd.set_cpuid2(&cpuid).map_err(k("set the CPUID"))?;
    if let Some(khz) = state.tsc_khz {
        // Same host: usually the same frequency already; KVM refuses a rate it cannot
        // scale to, in which case the guest runs at this host's (logged).
        if fd.get_tsc_khz().ok() != Some(khz) {
            if let Err(e) = fd.set_tsc_khz(khz) {
                log::warn!("vCPU {}: cannot set the TSC to {khz} kHz: {e}", state.id);
            }
        }
    }
    fd.set_mp_state(state.mp_state)
        .map_err(k("set the MP state"))?;
    fd.set_regs(&state.regs).map_err(k("set the registers"))?;
    fd.set_sregs(&state.sregs)
        .map_err(k("set the special registers"))?;
    // SAFETY: `kvm_xsave` is the fixed 4 KiB area KVM_GET_XSAVE filled; KVM_SET_XSAVE reads
    // exactly that struct (no dynamically enabled XSTATE features are in use: ferrovm never
    // calls arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM)).
    unsafe { fd.set_xsave(&state.xsave) }.map_err(k("set the XSAVE area"))?;
    fd.set_xcrs(&state.xcrs).map_err(k("set the XCRs"))?;
    fd.set_debug_regs(&state.debug_regs)
        .map_err(k("set the debug registers"))?;
    fd.set_lapic(&state.lapic)
        .map_err(k("set the local APIC"))?;
    for chunk in state.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).expect("at most KVM_MAX_MSR_ENTRIES");
        let n = fd.set_msrs(&msrs).map_err(k("set the MSRs"))?;
        if n < entries.len() {
            return Err(VcpuStateError::MsrsIncomplete {
                done: n,
                total: entries.len(),
                index: entries[n].index,
            });
        }
    }
    fd.set_vcpu_events(&state.vcpu_events)
        .map_err(k("set the vCPU events"))?;
    // Tell the guest's kvmclock the vCPU was stopped, so its watchdogs do not fire.
    if let Err(e) = fd.kvmclock_ctrl() {
        log::debug!("vCPU {}: KVM_KVMCLOCK_CTRL: {e}", state.id);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tsc_deadline_is_restored_after_the_tsc() {
        let mut msrs = vec![
            (MSR_IA32_TSC_DEADLINE, 5),
            (0x4b56_4d01, 1),
            (MSR_IA32_TSC, 7),
            (0xc000_0080, 2),
        ];
        restore_order(&mut msrs);
        let order: Vec<u32> = msrs.iter().map(|m| m.0).collect();
        assert_eq!(
            order,
            vec![
                0x4b56_4d01,
                0xc000_0080,
                MSR_IA32_TSC,
                MSR_IA32_TSC_DEADLINE
            ]
        );
        assert!(KVM_MSR_RANGE.contains(&0x4b56_4d01));
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut s = VcpuState {
            id: 3,
            cpuid: vec![kvm_bindings::kvm_cpuid_entry2 {
                function: 1,
                eax: 0x806f8,
                ..Default::default()
            }],
            mp_state: kvm_mp_state { mp_state: 3 },
            regs: kvm_regs {
                rip: 0xffff_ffff_8100_0000,
                rsp: 0x1234,
                ..Default::default()
            },
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debug_regs: Default::default(),
            lapic: Default::default(),
            msrs: vec![(MSR_IA32_TSC, 99)],
            vcpu_events: Default::default(),
            tsc_khz: Some(2_600_000),
        };
        s.lapic.regs[0x20] = 7;
        s.xsave.region[5] = 0xdead;
        let text = serde_json::to_string(&s).unwrap();
        let back: VcpuState = serde_json::from_str(&text).unwrap();
        assert_eq!(back.regs.rip, s.regs.rip);
        assert_eq!(back.lapic.regs[0x20], 7);
        assert_eq!(back.xsave.region[5], 0xdead);
        assert_eq!(back.msrs, s.msrs);
        assert_eq!(back.cpuid[0].eax, 0x806f8);
        assert_eq!(back.tsc_khz, Some(2_600_000));
    }
}
