//! The KVM VM: opening /dev/kvm, checking what the host offers, the in-kernel interrupt
//! controllers and PIT, guest memory slots, and irqfds.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_API_VERSION,
    KVM_IRQCHIP_IOAPIC, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;
use crate::vstate::memory::GuestMemoryMmap;

/// The KVM device node, unless `FERROVM_KVM_DEVICE` names another (tests use it to check the
/// error for a missing device).
pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";

/// Bit 16 of an IOAPIC redirection entry: the pin is masked.
const IOAPIC_REDIR_MASKED: u64 = 1 << 16;

/// Capabilities the VMM cannot run without (`ferrovm check` lists them too).
pub const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::PitState2, "KVM_CAP_PIT_STATE2"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// Errors creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("Failed to open {path}: the file does not exist; load the kvm module (kvm_intel or kvm_amd) or run where hardware virtualization is available (see scripts/kvm-sandbox)")]
    KvmMissing { path: PathBuf },
    #[error("Failed to open {path}: permission denied; add your user to the 'kvm' group or run with access to the device")]
    KvmPermission { path: PathBuf },
    #[error("Failed to open {path}")]
    KvmOpen {
        path: PathBuf,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{0} is not a KVM device (it does not answer KVM_GET_API_VERSION)")]
    NotKvm(PathBuf),
    #[error("KVM API version {0} is not supported (expected {KVM_API_VERSION})")]
    ApiVersion(i32),
    #[error("The host's KVM lacks {0}, which ferrovm requires")]
    MissingCap(&'static str),
    #[error("The host's KVM supports at most {max} vCPUs per VM, {requested} were requested")]
    TooManyVcpus { requested: u8, max: usize },
    #[error("Failed to {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("Failed to register guest memory slot {slot} at {addr:#x} ({size} bytes) with KVM")]
    MemorySlot {
        slot: u32,
        addr: u64,
        size: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("Failed to register an irqfd for GSI {gsi}")]
    Irqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("Failed to let KVM coalesce writes to port {port:#x}")]
    Coalesced {
        port: u16,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// A KVM VM with its in-kernel IOAPIC, PIC and PIT.
pub struct KvmVm {
    kvm: Kvm,
    fd: VmFd,
}

impl KvmVm {
    /// Opens the KVM device (`FERROVM_KVM_DEVICE` or /dev/kvm) and creates a VM with an
    /// in-kernel irqchip and PIT.
    pub fn new(max_vcpus: u8) -> Result<Self, VmError> {
        let kvm = open_kvm(&kvm_device_path())?;
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(*cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let max = kvm.get_max_vcpus();
        if usize::from(max_vcpus) > max {
            return Err(VmError::TooManyVcpus {
                requested: max_vcpus,
                max,
            });
        }

        let fd = kvm
            .create_vm()
            .map_err(|e| VmError::Kvm("create the VM", e))?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(|e| VmError::Kvm("set the TSS address", e))?;
        // The irqchip must exist before vCPUs so each gets an in-kernel LAPIC.
        fd.create_irq_chip()
            .map_err(|e| VmError::Kvm("create the in-kernel irqchip", e))?;
        let pit = kvm_pit_config {
            // Let KVM handle port 0x61 too, so PIT calibration does not exit to us.
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| VmError::Kvm("create the in-kernel PIT", e))?;
        Ok(Self { kvm, fd })
    }

    /// Gives KVM every region of guest memory, one slot each.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .expect("a region's own start address is mapped");
            let region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the host range is a live mapping owned by `mem` of exactly `len` bytes;
            // the VMM keeps `mem` alive for as long as the VM (and so the slot) exists.
            unsafe { self.fd.set_user_memory_region(region_desc) }.map_err(|source| {
                VmError::MemorySlot {
                    slot: slot as u32,
                    addr: region.start_addr().0,
                    size: region.len(),
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// The CPUID entries KVM can offer, to be filtered per vCPU.
    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Kvm("read the supported CPUID", e))
    }

    /// Creates vCPU `id` (its APIC id too).
    pub fn create_vcpu(&self, id: u8) -> Result<VcpuFd, VmError> {
        self.fd
            .create_vcpu(u64::from(id))
            .map_err(|e| VmError::Kvm("create a vCPU", e))
    }

    /// Lets KVM record guest writes to ports `[port, port + len)` in the coalesced ring
    /// instead of exiting (see `vstate::coalesced`).
    pub fn coalesce_pio(&self, port: u16, len: u32) -> Result<(), VmError> {
        self.fd
            .register_coalesced_mmio(kvm_ioctls::IoEventAddress::Pio(u64::from(port)), len)
            .map_err(|source| VmError::Coalesced { port, source })
    }

    /// Makes writes to `evt` raise `gsi` in the in-kernel irqchip.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::Irqfd { gsi, source })
    }

    /// Whether any IOAPIC pin is unmasked, i.e. the guest has interrupt routing in place.
    /// Linux masks every pin (`clear_IO_APIC`) before an orderly reboot or power-off, and
    /// leaves them as they are when it restarts in an emergency (a panic).
    pub fn ioapic_routes_live(&self) -> Result<bool, VmError> {
        let mut chip = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        self.fd
            .get_irqchip(&mut chip)
            .map_err(|e| VmError::Kvm("read the IOAPIC state", e))?;
        // SAFETY: for chip_id KVM_IRQCHIP_IOAPIC, KVM_GET_IRQCHIP fills the `ioapic` member of
        // the union; it is plain data.
        let ioapic = unsafe { chip.chip.ioapic };
        Ok(ioapic.redirtbl.iter().any(|entry| {
            // SAFETY: every redirection entry is a plain u64 viewed through a union.
            let bits = unsafe { entry.bits };
            bits & IOAPIC_REDIR_MASKED == 0
        }))
    }

    /// The raw VM fd, for device wiring that needs more than irqfds.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }
}

/// The KVM device node: `FERROVM_KVM_DEVICE`, else /dev/kvm.
pub fn kvm_device_path() -> PathBuf {
    std::env::var_os("FERROVM_KVM_DEVICE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_KVM_DEVICE))
}

/// Opens the KVM device at `path` and checks its API version.
pub fn open_kvm(path: &Path) -> Result<Kvm, VmError> {
    let cpath =
        CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| VmError::KvmMissing {
            path: path.to_path_buf(),
        })?;
    let kvm = Kvm::new_with_path(&cpath).map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => VmError::KvmMissing {
            path: path.to_path_buf(),
        },
        libc::EACCES | libc::EPERM => VmError::KvmPermission {
            path: path.to_path_buf(),
        },
        _ => VmError::KvmOpen {
            path: path.to_path_buf(),
            source: e,
        },
    })?;
    match kvm.get_api_version() {
        v if v < 0 => Err(VmError::NotKvm(path.to_path_buf())),
        v if v != KVM_API_VERSION as i32 => Err(VmError::ApiVersion(v)),
        _ => Ok(kvm),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_names_path_and_remedy() {
        let err = open_kvm(Path::new("/nonexistent/kvm")).err().unwrap();
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/kvm"), "{msg}");
        assert!(msg.contains("does not exist"), "{msg}");
    }

    #[test]
    fn non_kvm_file_is_reported_not_panicked() {
        // /dev/null opens fine but is not KVM: the API version check must catch it.
        let err = open_kvm(Path::new("/dev/null")).err().unwrap();
        assert!(matches!(err, VmError::NotKvm(_)), "{err}");
        assert!(err.to_string().contains("/dev/null is not a KVM device"));
    }
}
