//! The KVM VM: opening /dev/kvm, checking what the host offers, the in-kernel interrupt
//! controllers and PIT, guest memory slots, and irqfds.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region, CpuId,
    KvmIrqRouting, KVM_API_VERSION, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, NoDatamatch, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{IOAPIC_NUM_PINS, KVM_TSS_ADDRESS};
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
    (Cap::IrqRouting, "KVM_CAP_IRQ_ROUTING"),
];

/// GSIs from here up are MSI routes (one per MSI-X vector); below are the IOAPIC's pins,
/// the first 16 of which the PIC shares.
pub const FIRST_MSI_GSI: u32 = IOAPIC_NUM_PINS;
/// Pins of the two cascaded 8259s.
const PIC_PINS: u32 = 16;

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
    #[error("Failed to set KVM's interrupt routing ({routes} routes)")]
    GsiRouting {
        routes: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("No GSI left for an MSI vector (KVM takes at most {max} routes)")]
    OutOfGsis { max: u32 },
    #[error("Failed to {action} an ioeventfd at {addr:#x}")]
    IoEvent {
        action: &'static str,
        addr: u64,
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
    fd: Arc<VmFd>,
    router: Arc<GsiRouter>,
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
        let fd = Arc::new(fd);
        Ok(Self {
            kvm,
            router: Arc::new(GsiRouter::new(fd.clone())),
            fd,
        })
    }

    /// Gives KVM every region of guest memory, one slot each.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        set_memory_slots(&self.fd, mem, false)
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

    /// A handle on the VM for another thread (the migration thread reads the dirty log).
    pub fn shared_fd(&self) -> Arc<VmFd> {
        self.fd.clone()
    }

    /// The MSRs a vCPU's saved state includes: every one KVM lists as saveable.
    pub fn msr_index_list(&self) -> Result<Vec<u32>, VmError> {
        self.kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .map_err(|e| VmError::Kvm("read KVM's MSR list", e))
    }

    /// The in-kernel devices' state: PIT, kvmclock, both PICs and the IOAPIC. Taken with
    /// every vCPU stopped.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let chip = |id| -> Result<kvm_irqchip, VmError> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .map_err(|e| VmError::Kvm("read an interrupt controller", e))?;
            Ok(c)
        };
        Ok(VmState {
            pit: self
                .fd
                .get_pit2()
                .map_err(|e| VmError::Kvm("read the PIT", e))?,
            clock: self
                .fd
                .get_clock()
                .map_err(|e| VmError::Kvm("read kvmclock", e))?,
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        })
    }

    /// Puts `state` back, before any vCPU runs. The clock goes back to the value it had when
    /// the state was taken, so the guest's monotonic time does not jump over the time the
    /// VM spent as a snapshot.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        self.fd
            .set_pit2(&state.pit)
            .map_err(|e| VmError::Kvm("restore the PIT", e))?;
        let mut clock = state.clock;
        // Only the clock value: the flags KVM reported (TSC_STABLE, REALTIME) are not
        // accepted back.
        clock.flags = 0;
        self.fd
            .set_clock(&clock)
            .map_err(|e| VmError::Kvm("restore kvmclock", e))?;
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd
                .set_irqchip(chip)
                .map_err(|e| VmError::Kvm("restore an interrupt controller", e))?;
        }
        Ok(())
    }

    /// Hands KVM the routing table again (after a restore, with the MSI routes the
    /// restored MSI-X tables programmed).
    pub fn router_reapply(&self) -> Result<(), VmError> {
        self.router.apply()
    }

    /// The interrupt routing table, shared with the MSI-X tables that program it.
    pub fn router(&self) -> &Arc<GsiRouter> {
        &self.router
    }

    /// A handle that can (re)register ioeventfds from any thread, for devices whose BARs
    /// the guest may move.
    pub fn ioevents(&self) -> IoEvents {
        IoEvents(self.fd.clone())
    }
}

/// The in-kernel devices' saved state.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct VmState {
    pub pit: kvm_bindings::kvm_pit_state2,
    pub clock: kvm_bindings::kvm_clock_data,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
}

/// KVM's GSI routing table (`KVM_SET_GSI_ROUTING` replaces it whole): the IOAPIC and PIC
/// pins as KVM's default table has them, which the legacy and emulated devices' irqfds
/// use, plus one MSI route per programmed MSI-X vector.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    msi: Mutex<BTreeMap<u32, (u64, u32)>>,
    next_gsi: AtomicU32,
}

impl GsiRouter {
    fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            msi: Mutex::new(BTreeMap::new()),
            next_gsi: AtomicU32::new(FIRST_MSI_GSI),
        }
    }

    /// A GSI of its own for an MSI vector.
    pub fn allocate_msi_gsi(&self) -> Result<u32, VmError> {
        let max = kvm_bindings::KVM_MAX_IRQ_ROUTES as u32;
        let gsi = self.next_gsi.fetch_add(1, Ordering::SeqCst);
        if gsi >= max {
            return Err(VmError::OutOfGsis { max });
        }
        Ok(gsi)
    }

    /// Routes `gsi` to the MSI message `address`/`data` and hands KVM the whole table.
    pub fn set_msi_route(&self, gsi: u32, address: u64, data: u32) -> Result<(), VmError> {
        let mut msi = self.msi.lock().unwrap_or_else(|p| p.into_inner());
        msi.insert(gsi, (address, data));
        self.set(&msi)
    }

    fn set(&self, msi: &BTreeMap<u32, (u64, u32)>) -> Result<(), VmError> {
        let table = routing_table(msi);
        let routes = table.as_slice().len();
        self.vm
            .set_gsi_routing(&table)
            .map_err(|source| VmError::GsiRouting { routes, source })
    }

    fn apply(&self) -> Result<(), VmError> {
        let msi = self.msi.lock().unwrap_or_else(|p| p.into_inner());
        self.set(&msi)
    }
}

/// The full routing table: KVM's defaults (`kvm_setup_default_irq_routing`: GSI i is IOAPIC
/// pin i, and for i < 16 also pin i % 8 of the master or slave PIC) and the MSI routes.
fn routing_table(msi: &BTreeMap<u32, (u64, u32)>) -> KvmIrqRouting {
    let mut entries = Vec::new();
    let irqchip = |gsi: u32, chip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = chip;
        e.u.irqchip.pin = pin;
        e
    };
    for gsi in 0..IOAPIC_NUM_PINS {
        if gsi < PIC_PINS {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            entries.push(irqchip(gsi, chip, gsi % 8));
        }
        entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    for (&gsi, &(address, data)) in msi {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = address as u32;
        e.u.msi.address_hi = (address >> 32) as u32;
        e.u.msi.data = data;
        entries.push(e);
    }
    let mut table = KvmIrqRouting::new(entries.len()).expect("fewer than KVM_MAX_IRQ_ROUTES");
    table.as_mut_slice().copy_from_slice(&entries);
    table
}

/// Registers ioeventfds from any thread (a moved BAR moves its notification addresses).
#[derive(Clone)]
pub struct IoEvents(Arc<VmFd>);

impl IoEvents {
    /// Makes any write to the MMIO address `addr` signal `evt` without leaving the kernel
    /// (a zero-length ioeventfd: KVM's fast MMIO path, any access size, no data match).
    pub fn register_mmio(&self, evt: &EventFd, addr: u64) -> Result<(), VmError> {
        self.0
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|source| VmError::IoEvent {
                action: "register",
                addr,
                source,
            })
    }

    /// Undoes `register_mmio`.
    pub fn unregister_mmio(&self, evt: &EventFd, addr: u64) -> Result<(), VmError> {
        self.0
            .unregister_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|source| VmError::IoEvent {
                action: "unregister",
                addr,
                source,
            })
    }
}

/// Gives KVM every region of `mem`, slot `i` for region `i`, with dirty logging on or off
/// (`KVM_MEM_LOG_DIRTY_PAGES`, api.rst 4.35: setting a slot again with other flags changes
/// only them).
pub fn set_memory_slots(fd: &VmFd, mem: &GuestMemoryMmap, dirty_log: bool) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .expect("a region's own start address is mapped");
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: if dirty_log {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
        };
        // SAFETY: the host range is a live mapping owned by `mem` of exactly `len` bytes;
        // the VMM keeps `mem` alive for as long as the VM (and so the slot) exists.
        unsafe { fd.set_user_memory_region(region_desc) }.map_err(|source| {
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

/// KVM's dirty log of memory slot `slot` (`len` bytes), read and cleared: one bit per 4 KiB
/// page the guest (or KVM itself) wrote since the last read.
pub fn dirty_log(fd: &VmFd, slot: u32, len: u64) -> Result<Vec<u64>, VmError> {
    fd.get_dirty_log(slot, len as usize)
        .map_err(|e| VmError::Kvm("read the dirty log", e))
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
    fn routing_table_keeps_the_default_pins_and_adds_msi_routes() {
        let mut msi = BTreeMap::new();
        msi.insert(24, (0xfee0_0000u64, 0x4021u32));
        msi.insert(30, (0x1_fee0_1000, 0x22));
        let t = routing_table(&msi);
        let e = t.as_slice();
        assert_eq!(e.len(), 16 + 24 + 2);
        // GSI 4 (COM1) reaches both the master PIC pin 4 and IOAPIC pin 4.
        let gsi4: Vec<_> = e.iter().filter(|r| r.gsi == 4).collect();
        assert_eq!(gsi4.len(), 2);
        // SAFETY: irqchip entries are read through their irqchip member.
        let chips: Vec<(u32, u32)> = gsi4
            .iter()
            .map(|r| unsafe { (r.u.irqchip.irqchip, r.u.irqchip.pin) })
            .collect();
        assert!(chips.contains(&(KVM_IRQCHIP_PIC_MASTER, 4)));
        assert!(chips.contains(&(KVM_IRQCHIP_IOAPIC, 4)));
        // SAFETY: as above, for the slave PIC.
        let gsi14 = e
            .iter()
            .find(|r| r.gsi == 14 && unsafe { r.u.irqchip.irqchip } == KVM_IRQCHIP_PIC_SLAVE)
            .unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { gsi14.u.irqchip.pin }, 6);
        assert!(e
            .iter()
            .filter(|r| r.gsi >= 16 && r.gsi < 24)
            .all(|r| r.type_ == KVM_IRQ_ROUTING_IRQCHIP));
        let m = e.iter().find(|r| r.gsi == 30).unwrap();
        assert_eq!(m.type_, KVM_IRQ_ROUTING_MSI);
        // SAFETY: MSI entries are read through their msi member.
        let (lo, hi, data) = unsafe { (m.u.msi.address_lo, m.u.msi.address_hi, m.u.msi.data) };
        assert_eq!((lo, hi, data), (0xfee0_1000, 1, 0x22));
    }

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
