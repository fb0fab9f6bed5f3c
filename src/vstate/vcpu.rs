//! vCPUs: configuration, the per-thread run loop, and exit handling.
//!
//! The run loop knows no device: port and MMIO exits go to a `Bus` by address through
//! `handle_exit`, a plain function testable without KVM. What ends a VM is reported once
//! through `VmRunState`; the VMM's event loop stops the other vCPUs by setting `stop` and
//! kicking each thread with `SIGRTMIN`, whose handler sets `kvm_run.immediate_exit` so a
//! kick can never be lost between checking `stop` and entering `KVM_RUN`.
//!
//! For the crash report each vCPU keeps a `VcpuRecord`: its registers at every periodic kick
//! (a sample at most 100 ms old), and when the guest stopped on it (its exit, or a machine
//! reset it asked for through a device), with what KVM said about the exit.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_run, CpuId, KVM_MP_STATE_HALTED, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use log::{debug, error, info, warn};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::x86_64::boot::KernelEntry;
use crate::arch::x86_64::cpu_state::CpuState;
use crate::arch::x86_64::cpuid::filter_cpuid;
use crate::arch::x86_64::regs::{setup_boot_vcpu, setup_common, RegsError};
use crate::devices::bus::Bus;
use crate::vstate::coalesced::CoalescedRing;
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vcpu_state::{self, VcpuState, VcpuStateError};

/// RFLAGS.IF: interrupts enabled.
const RFLAGS_IF: u64 = 1 << 9;

/// Errors configuring or starting a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("Failed to set the CPUID of vCPU {0}")]
    Cpuid(u8, #[source] kvm_ioctls::Error),
    #[error("Failed to set up the registers of vCPU {0}")]
    Regs(u8, #[source] RegsError),
    #[error("Failed to install the vCPU kick signal handler")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    #[error("Failed to start the thread of vCPU {0}")]
    Spawn(u8, #[source] std::io::Error),
}

/// Why the guest stopped running, as seen by a vCPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest reset the machine after shutting down in order (i8042 pulse with
    /// `reboot=k`, a triple fault with `reboot=t`, a KVM reset event).
    Reset,
    /// The guest reset the machine without shutting down first: a kernel panic with
    /// `panic=N`, or an emergency reboot.
    EmergencyReset,
    /// Every vCPU is halted with interrupts off: what Linux does for `poweroff` and `halt`
    /// on a machine without ACPI. Nothing can wake it again.
    Halted,
    /// The guest entered ACPI S5 (soft off) through the sleep control register.
    PowerOff,
    /// A triple fault the guest did not ask for: the guest kernel crashed.
    TripleFault { vcpu: u8 },
    /// KVM could not emulate something (`KVM_EXIT_INTERNAL_ERROR`).
    InternalError { vcpu: u8, suberror: u32 },
    /// The hardware refused to enter the guest (`KVM_EXIT_FAIL_ENTRY`).
    FailEntry { vcpu: u8, reason: u64 },
    /// An exit the VMM does not handle, or a failing KVM_RUN.
    Unexpected { vcpu: u8, what: String },
}

impl GuestExit {
    /// Whether this is how a guest ends on purpose.
    pub fn is_clean(&self) -> bool {
        matches!(self, Self::Reset | Self::Halted | Self::PowerOff)
    }
}

impl std::fmt::Display for GuestExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Reset => write!(f, "the guest rebooted"),
            Self::EmergencyReset => write!(
                f,
                "the guest restarted without shutting down: a kernel panic (see its console) or an emergency reboot"
            ),
            Self::Halted => write!(f, "the guest powered off (all vCPUs halted)"),
            Self::PowerOff => write!(f, "the guest powered off (ACPI S5)"),
            Self::TripleFault { vcpu } => write!(
                f,
                "guest triple fault on vCPU {vcpu}: the guest kernel crashed (KVM_EXIT_SHUTDOWN)"
            ),
            Self::InternalError { vcpu, suberror } => write!(
                f,
                "KVM internal error on vCPU {vcpu} (suberror {suberror}): KVM could not emulate a guest instruction"
            ),
            Self::FailEntry { vcpu, reason } => write!(
                f,
                "KVM failed to enter the guest on vCPU {vcpu} (hardware entry failure reason {reason:#x})"
            ),
            Self::Unexpected { vcpu, what } => write!(f, "vCPU {vcpu} stopped: {what}"),
        }
    }
}

/// What KVM said about the exit that ended the VM (the `kvm_run` exit union, KVM API
/// documentation 5. "The kvm_run structure").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmExitData {
    /// KVM_EXIT_INTERNAL_ERROR: `internal.suberror`, `internal.ndata` and the valid part of
    /// `internal.data`.
    Internal {
        suberror: u32,
        ndata: u32,
        data: Vec<u64>,
    },
    /// KVM_EXIT_FAIL_ENTRY: the hardware's reason and the host CPU.
    FailEntry { reason: u64, cpu: u32 },
}

/// A vCPU's registers at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub at: Instant,
    pub state: CpuState,
}

/// What one vCPU left for the crash report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VcpuRecord {
    /// Taken at the latest periodic kick from the event loop.
    pub sampled: Option<Snapshot>,
    /// Taken when the guest stopped on this vCPU: at its exit, or when it asked a device to
    /// reset the machine (the first time).
    pub stopped: Option<Snapshot>,
    /// KVM's data for the exit that stopped this vCPU.
    pub exit_data: Option<KvmExitData>,
    /// Why the registers at the stop could not be read.
    pub error: Option<String>,
}

/// What a parked vCPU thread is asked to do for the event loop.
pub enum VcpuRequest {
    /// Take the vCPU's state (snapshot, migration).
    SaveState(Sender<Result<VcpuState, VcpuStateError>>),
}

/// Pausing: the event loop asks, every vCPU thread leaves KVM_RUN and parks until resumed,
/// answering requests meanwhile (only a parked thread may touch its vCPU's state: KVM takes
/// the vCPU's mutex for every vCPU ioctl).
struct Pause {
    requested: bool,
    parked: Vec<bool>,
    requests: Vec<Option<VcpuRequest>>,
}

/// State shared between the vCPU threads and the VMM's event loop.
pub struct VmRunState {
    stop: AtomicBool,
    exit: Mutex<Option<GuestExit>>,
    /// Written once when the first vCPU reports a `GuestExit`.
    pub exit_evt: EventFd,
    /// Per vCPU: last seen halted with interrupts disabled.
    dead_halt: Vec<AtomicBool>,
    /// Per vCPU: registers for the crash report.
    records: Vec<Mutex<VcpuRecord>>,
    /// Read on every exit, so a pause costs the run loop one load.
    pause_requested: AtomicBool,
    pause: Mutex<Pause>,
    pause_cv: Condvar,
}

impl VmRunState {
    pub fn new(num_vcpus: u8) -> std::io::Result<Self> {
        let n = usize::from(num_vcpus);
        Ok(Self {
            stop: AtomicBool::new(false),
            exit: Mutex::new(None),
            exit_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            dead_halt: (0..num_vcpus).map(|_| AtomicBool::new(false)).collect(),
            records: (0..num_vcpus).map(|_| Mutex::default()).collect(),
            pause_requested: AtomicBool::new(false),
            pause: Mutex::new(Pause {
                requested: false,
                parked: vec![false; n],
                requests: (0..n).map(|_| None).collect(),
            }),
            pause_cv: Condvar::new(),
        })
    }

    fn record(&self, vcpu: u8) -> MutexGuard<'_, VcpuRecord> {
        self.records[usize::from(vcpu)]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// What every vCPU left for the crash report, by vCPU id.
    pub fn records(&self) -> Vec<VcpuRecord> {
        (0..self.records.len())
            .map(|i| self.record(i as u8).clone())
            .collect()
    }

    fn pause_lock(&self) -> MutexGuard<'_, Pause> {
        self.pause.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks every vCPU to park; `wait_parked` waits for them (after kicking them).
    pub fn request_pause(&self) {
        self.pause_lock().requested = true;
        self.pause_requested.store(true, Ordering::SeqCst);
    }

    /// Waits until every vCPU thread parked, at most `timeout`; false on timeout.
    pub fn wait_parked(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut p = self.pause_lock();
        while !p.parked.iter().all(|&x| x) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.stopping() {
                return false;
            }
            p = self
                .pause_cv
                .wait_timeout(p, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Lets the parked vCPUs run again.
    pub fn resume(&self) {
        let mut p = self.pause_lock();
        p.requested = false;
        self.pause_requested.store(false, Ordering::SeqCst);
        drop(p);
        self.pause_cv.notify_all();
    }

    /// Whether a pause is requested (or in effect).
    pub fn paused(&self) -> bool {
        self.pause_requested.load(Ordering::SeqCst)
    }

    /// Hands `req` to parked vCPU `id`.
    pub fn request(&self, id: u8, req: VcpuRequest) {
        self.pause_lock().requests[usize::from(id)] = Some(req);
        self.pause_cv.notify_all();
    }

    /// Parks the calling vCPU thread until resumed or stopped, serving requests.
    fn park(&self, id: u8, mut serve: impl FnMut(VcpuRequest)) {
        let i = usize::from(id);
        let mut p = self.pause_lock();
        p.parked[i] = true;
        self.pause_cv.notify_all();
        loop {
            if let Some(req) = p.requests[i].take() {
                drop(p);
                serve(req);
                p = self.pause_lock();
                continue;
            }
            if !p.requested || self.stopping() {
                break;
            }
            p = self.pause_cv.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        p.parked[i] = false;
    }

    /// Records why the guest stopped; only the first report counts.
    pub fn report(&self, exit: GuestExit) {
        let mut slot = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(exit);
            if let Err(e) = self.exit_evt.write(1) {
                error!("Failed to signal the guest exit: {e}");
            }
        }
    }

    /// The first reported exit, if any.
    pub fn exit(&self) -> Option<GuestExit> {
        self.exit.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Asks every vCPU loop to return at its next check (parked ones too).
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _p = self.pause_lock();
        self.pause_cv.notify_all();
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// True when every vCPU was last seen halted with interrupts off.
    pub fn all_dead_halted(&self) -> bool {
        self.dead_halt.iter().all(|h| h.load(Ordering::SeqCst))
    }
}

/// What the run loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum VcpuAction {
    Continue,
    Stop(GuestExit),
}

/// Handles one exit by dispatching it to the buses. Pure over its inputs. `pio_size` is the
/// width of each access of a port I/O exit (0: one access of the whole data), which
/// differs from the data's length for string I/O (`rep insw`), batched by KVM into one exit.
pub fn handle_exit(vcpu: u8, exit: VcpuExit, pio_size: usize, pio: &Bus, mmio: &Bus) -> VcpuAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            let size = if pio_size == 0 { data.len() } else { pio_size };
            if !pio.read_string(u64::from(port), size, data) {
                debug!("vCPU {vcpu}: unhandled in from port {port:#x}");
            }
            VcpuAction::Continue
        }
        VcpuExit::IoOut(port, data) => {
            let size = if pio_size == 0 { data.len() } else { pio_size };
            if !pio.write_string(u64::from(port), size, data) {
                debug!("vCPU {vcpu}: unhandled out to port {port:#x}");
            }
            VcpuAction::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if !mmio.read(addr, data) {
                warn!("vCPU {vcpu}: MMIO read from unmapped address {addr:#x}");
            }
            VcpuAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !mmio.write(addr, data) {
                warn!("vCPU {vcpu}: MMIO write to unmapped address {addr:#x}");
            }
            VcpuAction::Continue
        }
        // Only reachable without an in-kernel LAPIC; treat it like the in-kernel case.
        VcpuExit::Hlt => VcpuAction::Stop(GuestExit::Halted),
        // A triple fault. Whether the guest meant it (`reboot=t`) is decided by the VMM from
        // the interrupt controller state: the vCPU state itself is gone on AMD, where KVM
        // INITs the vCPU on shutdown.
        VcpuExit::Shutdown => VcpuAction::Stop(GuestExit::TripleFault { vcpu }),
        VcpuExit::FailEntry(reason, _cpu) => {
            VcpuAction::Stop(GuestExit::FailEntry { vcpu, reason })
        }
        VcpuExit::InternalError => VcpuAction::Stop(GuestExit::InternalError { vcpu, suberror: 0 }),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => VcpuAction::Stop(GuestExit::Halted),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => VcpuAction::Stop(GuestExit::Reset),
        VcpuExit::IrqWindowOpen | VcpuExit::Intr => VcpuAction::Continue,
        other => VcpuAction::Stop(GuestExit::Unexpected {
            vcpu,
            what: format!("unexpected KVM exit {other:?}"),
        }),
    }
}

/// Whether a vCPU is halted for good: in HLT with interrupts disabled (only an NMI, which
/// nothing in this VM sends, or INIT could wake it).
pub fn is_dead_halt(mp_state: u32, rflags: u64) -> bool {
    mp_state == KVM_MP_STATE_HALTED && rflags & RFLAGS_IF == 0
}

thread_local! {
    /// The `kvm_run` of the vCPU this thread runs, for the kick signal handler.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
    /// A device asked for this vCPU's registers at the exit being handled.
    static SNAPSHOT_WANTED: Cell<bool> = const { Cell::new(false) };
}

/// Asks for the registers of the vCPU this thread runs as they are at the exit it is
/// handling, once that is done: for a device model that resets the machine (the i8042's
/// reset line), so a crash report can show where the guest asked for it (a kernel panic
/// restarts through there). Does nothing on a thread that runs no vCPU.
pub fn snapshot_this_vcpu() {
    SNAPSHOT_WANTED.with(|w| w.set(true));
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN_PTR.with(|p| p.get());
    if !run.is_null() {
        // SAFETY: the pointer was set by this same thread to its vCPU's mmap'ed kvm_run,
        // which stays mapped while the thread runs its loop (it is cleared before the VcpuFd
        // is dropped); a volatile byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
    std::sync::atomic::fence(Ordering::Release);
}

/// Applies the writes KVM recorded in the coalesced ring, oldest first.
fn drain_coalesced(vcpu: u8, ring: Option<&CoalescedRing>, pio: &Bus, mmio: &Bus) {
    if let Some(ring) = ring {
        ring.drain(|w| {
            let bus = if w.pio { pio } else { mmio };
            if !bus.write_coalesced(w.addr, &w.data) {
                debug!("vCPU {vcpu}: coalesced write to {:#x} unclaimed", w.addr);
            }
        });
    }
}

/// The width of each access of the port I/O exit this thread is handling. kvm-ioctls hands
/// out the `size * count` bytes of a string I/O exit without `size`, so it is read from the
/// thread's `kvm_run`; 0 when the thread runs no vCPU.
fn current_pio_size() -> usize {
    let run = KVM_RUN_PTR.with(|p| p.get());
    if run.is_null() {
        return 0;
    }
    // SAFETY: the pointer is this thread's own mmap'ed kvm_run (see `handle_kick`), which KVM
    // writes only inside KVM_RUN, not while this thread handles the exit; `io` is the union
    // member KVM filled for KVM_EXIT_IO, and for other exits the byte is only ignored.
    usize::from(unsafe { std::ptr::addr_of!((*run).__bindgen_anon_1.io.size).read_volatile() })
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick handler (once per process).
pub fn register_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::SignalHandler)
}

/// One vCPU.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    coalesced: Option<Arc<CoalescedRing>>,
    /// The MSRs its state includes (KVM_GET_MSR_INDEX_LIST).
    msr_indices: Arc<Vec<u32>>,
}

/// A running vCPU thread.
pub struct VcpuHandle {
    pub id: u8,
    thread: JoinHandle<()>,
}

impl VcpuHandle {
    /// Interrupts the vCPU's `KVM_RUN` so it looks at the shared state.
    pub fn kick(&self) {
        if let Err(e) = self.thread.kill(kick_signal()) {
            // The thread may have ended already.
            debug!("vCPU {}: kick failed: {e}", self.id);
        }
    }

    pub fn join(self) {
        if self.thread.join().is_err() {
            error!("vCPU {} thread panicked", self.id);
        }
    }
}

impl Vcpu {
    pub fn new(id: u8, fd: VcpuFd) -> Self {
        Self {
            id,
            fd,
            coalesced: None,
            msr_indices: Arc::new(Vec::new()),
        }
    }

    /// The MSRs to save with its state.
    pub fn set_msr_indices(&mut self, msrs: Arc<Vec<u32>>) {
        self.msr_indices = msrs;
    }

    /// Puts a saved state into this (never run) vCPU, instead of `configure`.
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), VcpuStateError> {
        vcpu_state::restore(&self.fd, state)
    }

    fn serve(&self, req: VcpuRequest) {
        match req {
            VcpuRequest::SaveState(reply) => {
                let _ = reply.send(vcpu_state::save(&self.fd, self.id, &self.msr_indices));
            }
        }
    }

    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Drains `ring` before handling each exit (see `vstate::coalesced`).
    pub fn set_coalesced_ring(&mut self, ring: Arc<CoalescedRing>) {
        self.coalesced = Some(ring);
    }

    /// CPUID, MSRs and LAPIC for every vCPU; boot registers for the boot vCPU (the others
    /// wait for INIT/SIPI from the guest in the in-kernel LAPIC).
    pub fn configure(
        &self,
        supported_cpuid: &CpuId,
        num_vcpus: u8,
        mem: &GuestMemoryMmap,
        entry: &KernelEntry,
    ) -> Result<(), VcpuError> {
        let mut cpuid = supported_cpuid.clone();
        filter_cpuid(cpuid.as_mut_slice(), self.id, num_vcpus);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| VcpuError::Cpuid(self.id, e))?;
        setup_common(&self.fd).map_err(|e| VcpuError::Regs(self.id, e))?;
        if self.id == 0 {
            setup_boot_vcpu(&self.fd, mem, entry).map_err(|e| VcpuError::Regs(self.id, e))?;
        }
        Ok(())
    }

    /// Runs the vCPU on its own thread until the VM stops.
    pub fn start(
        self,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        state: Arc<VmRunState>,
    ) -> Result<VcpuHandle, VcpuError> {
        let id = self.id;
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || self.run(&pio, &mmio, &state))
            .map_err(|e| VcpuError::Spawn(id, e))?;
        Ok(VcpuHandle { id, thread })
    }

    fn run(mut self, pio: &Bus, mmio: &Bus, state: &VmRunState) {
        KVM_RUN_PTR.with(|p| p.set(self.fd.get_kvm_run() as *mut kvm_run));
        crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Vcpu);
        if let Some(exit) = self.run_loop(pio, mmio, state) {
            info!("vCPU {}: {exit}", self.id);
            state.report(exit);
        }
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
    }

    fn run_loop(&mut self, pio: &Bus, mmio: &Bus, state: &VmRunState) -> Option<GuestExit> {
        let id = self.id;
        loop {
            if state.stopping() {
                return None;
            }
            let action = match self.fd.run() {
                Ok(exit) => {
                    // Writes KVM held back happened before this exit: apply them first.
                    drain_coalesced(id, self.coalesced.as_deref(), pio, mmio);
                    let action = handle_exit(id, exit, current_pio_size(), pio, mmio);
                    if SNAPSHOT_WANTED.with(|w| w.replace(false)) {
                        self.record_stop(state, None);
                    }
                    action
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    // The periodic kick also applies held-back writes, so a guest that waits
                    // for an interrupt they raise is not left waiting.
                    drain_coalesced(id, self.coalesced.as_deref(), pio, mmio);
                    if state.stopping() {
                        return None;
                    }
                    if state.paused() {
                        state.park(id, |req| self.serve(req));
                        continue;
                    }
                    // A periodic kick from the VMM: tell it whether this vCPU is gone for good,
                    // and keep where it is for a crash report.
                    let dead = self.sample(state);
                    state.dead_halt[usize::from(id)].store(dead, Ordering::SeqCst);
                    VcpuAction::Continue
                }
                Err(e) => VcpuAction::Stop(GuestExit::Unexpected {
                    vcpu: id,
                    what: format!("KVM_RUN failed: {e}"),
                }),
            };
            match action {
                VcpuAction::Continue => {}
                VcpuAction::Stop(exit) => {
                    let data = self.exit_data(&exit);
                    let exit = match (exit, &data) {
                        (
                            GuestExit::InternalError { vcpu, .. },
                            Some(KvmExitData::Internal { suberror, .. }),
                        ) => GuestExit::InternalError {
                            vcpu,
                            suberror: *suberror,
                        },
                        (exit, _) => exit,
                    };
                    self.record_stop(state, data);
                    return Some(exit);
                }
            }
        }
    }

    /// KVM's data for an exit that stops the VM, read from `kvm_run`.
    fn exit_data(&mut self, exit: &GuestExit) -> Option<KvmExitData> {
        let run = self.fd.get_kvm_run();
        match exit {
            GuestExit::InternalError { .. } => {
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for which KVM fills the
                // `internal` member of the exit union, plain integers any bits of which are
                // valid; `data` is a fixed array, indexed below within its length.
                let internal = unsafe { run.__bindgen_anon_1.internal };
                let valid = (internal.ndata as usize).min(internal.data.len());
                Some(KvmExitData::Internal {
                    suberror: internal.suberror,
                    ndata: internal.ndata,
                    data: internal.data[..valid].to_vec(),
                })
            }
            GuestExit::FailEntry { .. } => {
                // SAFETY: the exit reason is KVM_EXIT_FAIL_ENTRY, for which KVM fills the
                // `fail_entry` member of the exit union, plain integers.
                let fail = unsafe { run.__bindgen_anon_1.fail_entry };
                Some(KvmExitData::FailEntry {
                    reason: fail.hardware_entry_failure_reason,
                    cpu: fail.cpu,
                })
            }
            _ => None,
        }
    }

    /// Keeps the registers as they are now as where the guest stopped on this vCPU (the
    /// first time only: a panicking kernel pulses the reset line several times).
    fn record_stop(&self, state: &VmRunState, data: Option<KvmExitData>) {
        let read = CpuState::read(&self.fd);
        let mut rec = state.record(self.id);
        if data.is_some() {
            rec.exit_data = data;
        }
        if rec.stopped.is_some() {
            return;
        }
        match read {
            Ok(cpu) => {
                rec.stopped = Some(Snapshot {
                    at: Instant::now(),
                    state: cpu,
                })
            }
            Err(e) => rec.error = Some(format!("cannot read the registers: {e}")),
        }
    }

    /// On a periodic kick: keeps the registers for a crash report, and says whether the vCPU
    /// is halted for good.
    fn sample(&self, state: &VmRunState) -> bool {
        let Ok(mp) = self.fd.get_mp_state() else {
            return false;
        };
        let Ok(regs) = self.fd.get_regs() else {
            return false;
        };
        if let Ok(sregs) = self.fd.get_sregs() {
            state.record(self.id).sampled = Some(Snapshot {
                at: Instant::now(),
                state: CpuState::from_kvm(&regs, &sregs),
            });
        }
        is_dead_halt(mp.mp_state, regs.rflags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;

    struct Reg(u8);
    impl BusDevice for Reg {
        fn read(&mut self, _: u64, data: &mut [u8]) {
            data[0] = self.0;
        }
        fn write(&mut self, _: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    fn buses() -> (Bus, Bus) {
        let mut pio = Bus::new(crate::devices::metrics::Space::Pio);
        pio.insert(Arc::new(Mutex::new(Reg(0x11))), 0x3f8, 8)
            .unwrap();
        let mut mmio = Bus::new(crate::devices::metrics::Space::Mmio);
        mmio.insert(Arc::new(Mutex::new(Reg(0x22))), 0xd000_0000, 0x1000)
            .unwrap();
        (pio, mmio)
    }

    #[test]
    fn port_io_goes_to_the_pio_bus() {
        let (pio, mmio) = buses();
        let mut data = [0u8; 1];
        assert_eq!(
            handle_exit(0, VcpuExit::IoIn(0x3f8, &mut data), 0, &pio, &mmio),
            VcpuAction::Continue
        );
        assert_eq!(data[0], 0x11);
        handle_exit(0, VcpuExit::IoOut(0x3f9, &[0x33]), 0, &pio, &mmio);
        handle_exit(0, VcpuExit::IoIn(0x3f8, &mut data), 0, &pio, &mmio);
        assert_eq!(data[0], 0x33);
        // Unclaimed ports read as all ones and do not stop the vCPU.
        assert_eq!(
            handle_exit(0, VcpuExit::IoIn(0x80, &mut data), 0, &pio, &mmio),
            VcpuAction::Continue
        );
        assert_eq!(data[0], 0xff);
    }

    #[test]
    fn mmio_goes_to_the_mmio_bus() {
        let (pio, mmio) = buses();
        let mut data = [0u8; 1];
        handle_exit(
            1,
            VcpuExit::MmioRead(0xd000_0010, &mut data),
            0,
            &pio,
            &mmio,
        );
        assert_eq!(data[0], 0x22);
        assert_eq!(
            handle_exit(1, VcpuExit::MmioWrite(0xe000_0000, &[1]), 0, &pio, &mmio),
            VcpuAction::Continue
        );
    }

    #[test]
    fn lifecycle_exits_stop_the_vcpu() {
        let (pio, mmio) = buses();
        assert_eq!(
            handle_exit(0, VcpuExit::Shutdown, 0, &pio, &mmio),
            VcpuAction::Stop(GuestExit::TripleFault { vcpu: 0 })
        );
        assert_eq!(
            handle_exit(2, VcpuExit::FailEntry(0x7, 2), 0, &pio, &mmio),
            VcpuAction::Stop(GuestExit::FailEntry { vcpu: 2, reason: 7 })
        );
        assert_eq!(
            handle_exit(
                0,
                VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[]),
                0,
                &pio,
                &mmio
            ),
            VcpuAction::Stop(GuestExit::Reset)
        );
        assert!(matches!(
            handle_exit(3, VcpuExit::Exception, 0, &pio, &mmio),
            VcpuAction::Stop(GuestExit::Unexpected { vcpu: 3, .. })
        ));
    }

    #[test]
    fn dead_halt_needs_hlt_and_interrupts_off() {
        assert!(is_dead_halt(KVM_MP_STATE_HALTED, 0x2));
        assert!(
            !is_dead_halt(KVM_MP_STATE_HALTED, 0x202),
            "idle HLT with IF=1 wakes up"
        );
        assert!(!is_dead_halt(0, 0x2), "runnable");
    }

    #[test]
    fn only_the_first_exit_is_kept_and_signalled_once() {
        let state = VmRunState::new(2).unwrap();
        assert!(state.exit().is_none());
        state.report(GuestExit::Reset);
        state.report(GuestExit::TripleFault { vcpu: 1 });
        assert_eq!(state.exit(), Some(GuestExit::Reset));
        assert_eq!(state.exit_evt.read().unwrap(), 1);
        assert!(state.exit_evt.read().is_err(), "signalled only once");
    }

    #[test]
    fn all_dead_halted_needs_every_vcpu() {
        let state = VmRunState::new(2).unwrap();
        assert!(!state.all_dead_halted());
        state.dead_halt[0].store(true, Ordering::SeqCst);
        assert!(!state.all_dead_halted());
        state.dead_halt[1].store(true, Ordering::SeqCst);
        assert!(state.all_dead_halted());
    }

    #[test]
    fn exit_messages_are_actionable() {
        assert!(GuestExit::TripleFault { vcpu: 0 }
            .to_string()
            .contains("triple fault"));
        assert!(GuestExit::Reset.is_clean() && GuestExit::Halted.is_clean());
        assert!(!GuestExit::InternalError {
            vcpu: 0,
            suberror: 1
        }
        .is_clean());
    }
}
