//! Building and running a VM: `Vmm::build` reads top to bottom as the boot sequence
//! (KVM, memory, devices, kernel, MP table, vCPUs), `Vmm::run` starts the vCPUs and runs the
//! event loop on the calling thread until the guest or the user ends the VM.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use log::{debug, error, info, warn};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{block_signal, register_signal_handler, unblock_signal};

use crate::api::{ApiError, ApiSocket, Pending};
use crate::arch::x86_64::acpi::{setup_acpi, AcpiError};
use crate::arch::x86_64::boot::{build_cmdline, load_kernel, plan_boot, BootError};
use crate::arch::x86_64::layout::{COM1_IRQ, COM1_PORT, COM2_IRQ, COM2_PORT};
use crate::arch::x86_64::mptable::{setup_mptable, MptableError};
use crate::check::CheckError;
use crate::config::{ConfigError, DeviceModel, SerialBackend, VmConfig};
use crate::config::{FsConfig, FsSource};
use crate::crash::symbols::SymbolError;
use crate::crash::{ConsoleTail, CrashReport, SymbolSource};
use crate::devices::disk::{DiskError, RawFile};
use crate::devices::emulated::ide::AtaDisk;
use crate::devices::host_input::stdin_input;
use crate::devices::legacy::AcpiPm;
use crate::devices::legacy::SerialInputHandler;
use crate::devices::manager::{DeviceError, DeviceManager};
use crate::devices::metrics::MetricsRegistry;
use crate::devices::tap::Tap;
use crate::devices::virtio::block::BlockError;
use crate::devices::virtio::console::ConsoleError;
use crate::devices::virtio::fs::FsError;
use crate::devices::virtio::guest_write::{guard_mode, GuardMode, WRITE_GUARD_ENV};
use crate::devices::virtio::net::{default_mac, open_taps, NetError, VirtioNet};
use crate::devices::virtio::ports::VirtioPorts;
use crate::devices::virtio::{VirtioBlock, VirtioConsole, VirtioFs};
use crate::devices::virtiofsd::{self, Virtiofsd, VirtiofsdError};
use crate::devices::{Bus, DeviceEventManager, Persist};
use crate::persist::{PersistError, Snapshot};
use crate::seccomp::{SeccompError, ThreadKind};
use crate::terminal::RawTerminal;
use crate::vstate::coalesced::CoalescedRing;
use crate::vstate::memory::{
    create_guest_memory_with, map_snapshot_memory, GuestMemoryMmap, MemoryBacking, MemoryError,
    SnapshotMemoryError,
};
use crate::vstate::stats::KvmStats;
use crate::vstate::vcpu::{
    register_kick_handler, GuestExit, Vcpu, VcpuError, VcpuHandle, VmRunState,
};
use crate::vstate::vcpu_state::VcpuStateError;
use crate::vstate::vm::{KvmVm, VmError};

mod control;
mod migrate;

/// How often the event loop checks for a powered-off guest (all vCPUs halted for good).
const HALT_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Signals that stop the VM cleanly.
const TERMINATION_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
/// Signals the event loop handles, kept away from the vCPU threads.
const LOOP_SIGNALS: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1];

/// The termination signal received, 0 if none; set by the signal handler.
static TERMINATION: AtomicI32 = AtomicI32::new(0);
/// Set by SIGUSR1: write the metrics report now.
static METRICS_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_metrics_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    METRICS_REQUESTED.store(true, Ordering::SeqCst);
}

extern "C" fn on_termination_signal(
    num: libc::c_int,
    _: *mut libc::siginfo_t,
    _: *mut libc::c_void,
) {
    TERMINATION.store(num, Ordering::SeqCst);
}

/// Errors building or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Check(#[from] CheckError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Mptable(#[from] MptableError),
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Console(#[from] ConsoleError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error(transparent)]
    Symbols(#[from] SymbolError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Virtiofsd(#[from] VirtiofsdError),
    #[error("Failed to open the serial output file {path}")]
    SerialFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to write the metrics file {path}")]
    MetricsFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to connect stdin to the console")]
    SerialInput(#[source] std::io::Error),
    #[error("Failed to set up the event loop")]
    EventLoop(#[source] event_manager::Error),
    #[error("Failed to set up the terminal")]
    Terminal(#[source] std::io::Error),
    #[error("Failed to install a signal handler")]
    Signals(#[source] vmm_sys_util::errno::Error),
    #[error("Failed to change the signal mask: {0}")]
    SignalMask(String),
    #[error("Failed to map KVM's coalesced I/O ring")]
    CoalescedRing(#[source] std::io::Error),
    #[error("Failed to create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error(transparent)]
    SnapshotMemory(#[from] SnapshotMemoryError),
    #[error("Failed to restore vCPU {0}")]
    VcpuState(u8, #[source] VcpuStateError),
    #[error("Failed to restore the state of device {device} from the snapshot: {why}")]
    DeviceState { device: String, why: String },
    #[error("The snapshot's {what} does not match the VM it describes: {why}")]
    SnapshotMismatch { what: &'static str, why: String },
    #[error(transparent)]
    Migration(#[from] crate::migration::MigrationError),
    #[error("Failed to {0}")]
    Host(&'static str, #[source] std::io::Error),
}

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    Guest(GuestExit),
    /// The VMM received this termination signal.
    Signal(i32),
    /// A client asked for it on the control socket (`vm.shutdown`).
    Requested,
    /// The VM moved on (live migration): this process's part is done.
    Migrated,
    /// The time limit the caller set (`VmExtras::timeout`) ran out.
    TimedOut,
}

impl ExitReason {
    /// The process exit status: 0 when the guest ended on purpose, 128+N for signal N (as
    /// shells report it), 1 when the guest crashed or KVM failed.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Guest(g) if g.is_clean() => 0,
            Self::Guest(_) => 1,
            Self::Signal(n) => 128 + n,
            Self::Requested | Self::Migrated => 0,
            // timeout(1)'s status.
            Self::TimedOut => 124,
        }
    }
}

/// How a run ended: the reason, and when the guest crashed, the crash report to print after
/// it (see `crash`).
#[derive(Debug)]
pub struct Outcome {
    pub reason: ExitReason,
    pub crash_report: Option<String>,
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Guest(g) => g.fmt(f),
            Self::Signal(n) => write!(f, "stopped by signal {}", signal_name(*n)),
            Self::Requested => write!(f, "stopped through the control socket"),
            Self::Migrated => write!(f, "the VM migrated to another process"),
            Self::TimedOut => write!(f, "stopped at the time limit"),
        }
    }
}

/// An error and its causes on one line, each cause once (what main prints).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(&format!(": {text}"));
        }
        source = cause.source();
    }
    line
}

/// Tells an orderly guest restart from a crash by the state the guest left its interrupt
/// routing in. Before an orderly reboot Linux masks every IOAPIC pin (`clear_IO_APIC` in
/// `native_machine_shutdown`); a panic restarts with routing untouched. So a reset with
/// routing still live is an emergency (usually a panic), and a triple fault after routing was
/// torn down is `reboot=t`. A guest that never set up routing keeps what it reported.
pub fn classify_exit(exit: GuestExit, was_live: bool, live_now: bool) -> GuestExit {
    match exit {
        GuestExit::Reset if live_now => GuestExit::EmergencyReset,
        GuestExit::TripleFault { .. } if was_live && !live_now => GuestExit::Reset,
        other => other,
    }
}

fn signal_name(n: i32) -> String {
    match n {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        other => other.to_string(),
    }
}

/// What a caller wires in besides what the configuration names (`ferrovm exec`: its
/// channels and where the console's output goes).
#[derive(Default)]
pub struct VmExtras {
    /// Takes the place of the `--serial` backend's writer for ttyS0's output.
    pub serial_out: Option<Box<dyn Write + Send>>,
    /// A multiport virtio-console, on the default virtio transport.
    pub ports: Option<VirtioPorts>,
    /// The VM is stopped after this long (`ExitReason::TimedOut`).
    pub timeout: Option<Duration>,
}

/// A VM ready to run.
pub struct Vmm {
    // Declared before `mem` so vCPUs and the VM go away before the memory they map.
    vcpus: Vec<Vcpu>,
    vm: KvmVm,
    mem: GuestMemoryMmap,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    event_manager: DeviceEventManager,
    run_state: Arc<VmRunState>,
    raw_terminal: bool,
    metrics: MetricsRegistry,
    metrics_path: Option<PathBuf>,
    /// The configuration it was built from (what `vm.info` shows and snapshots carry).
    config: VmConfig,
    /// What snapshots carry of the devices, by id.
    persist: Vec<(String, Arc<Mutex<dyn Persist>>)>,
    /// What snapshots cannot carry yet: a snapshot is refused.
    no_persist: Vec<String>,
    acpi_pm: Option<Arc<Mutex<AcpiPm>>>,
    /// The control socket, until `run` starts its thread.
    api_socket: Option<ApiSocket>,
    /// When the VM started running in this process, and how long it had run before (a
    /// restored snapshot's uptime).
    started: Instant,
    uptime_before_ms: u64,
    restored_from: Option<PathBuf>,
    /// When `restore` (or `incoming`, from the state's arrival) began, until `run` has the
    /// vCPUs going; then how long that took (the VMM's part of a restore).
    restore_began: Option<Instant>,
    restore_ms: Option<f64>,
    /// The last lines of ttyS0 and hvc0, and the kernel's symbols, for a crash report.
    console_tails: Vec<(String, Arc<ConsoleTail>)>,
    symbols: Option<SymbolSource>,
    /// The multiport console, drained once the vCPUs stopped.
    ports: Option<Arc<Mutex<VirtioPorts>>>,
    /// When the VM is stopped (`VmExtras::timeout`), counted from `run`.
    timeout: Option<Duration>,
    /// A second handle on each NIC's TAP (by NIC name), and on each writable disk: what a
    /// migration lets go of (`migrate`).
    taps: Vec<(String, Tap)>,
    disk_files: Vec<(PathBuf, std::fs::File)>,
    /// Guest memory is one memfd mapped shared (what local migration hands over).
    mem_shared: bool,
    /// The migration thread (a VM with a control socket), and the running migration.
    migration: Option<crate::migration::send::Worker>,
    migrating: Option<migrate::Running>,
    /// A migrated-in VM announces its NICs' MACs once it runs.
    announce_on_resume: bool,
    /// Last, so they are reaped after the devices closed their sockets.
    _fs_daemons: Vec<Virtiofsd>,
}

/// What the destination of a migration takes from its own command line.
#[derive(Debug, Default)]
pub struct IncomingOptions {
    pub api_sock: Option<PathBuf>,
    pub metrics: Option<PathBuf>,
    pub seccomp: bool,
    pub allow_emulated_kvm: bool,
}

/// Where a VM's state comes from.
enum Source {
    /// A fresh boot of the configured kernel.
    Boot(crate::arch::x86_64::boot::BootPlan),
    /// A snapshot directory.
    Snapshot(Box<Snapshot>, PathBuf),
    /// A migration's destination: the state, the memory as received, and in local mode
    /// the TAPs handed over (by NIC name).
    Incoming(
        Box<Snapshot>,
        GuestMemoryMmap,
        Vec<(String, std::os::fd::OwnedFd)>,
    ),
}

impl Vmm {
    /// Validates `cfg` and builds the whole VM; nothing runs yet.
    pub fn build(cfg: &VmConfig) -> Result<Self, VmmError> {
        Self::build_with(cfg, VmExtras::default())
    }

    /// The same with `extras` wired in too.
    pub fn build_with(cfg: &VmConfig, extras: VmExtras) -> Result<Self, VmmError> {
        cfg.validate()?;
        if guard_mode() != GuardMode::Off {
            info!("Guest memory write guard on ({WRITE_GUARD_ENV}=1): every device write is checked against the guest's descriptors");
        }
        // Before any thread exists: the I/O and stdin threads started below sandbox themselves.
        crate::seccomp::init(cfg.seccomp)?;
        // Bad kernel or initrd files are reported before KVM is touched.
        let boot_plan = plan_boot(&cfg.kernel, cfg.initrd.as_deref(), cfg.mem_bytes())?;
        // Opened now, read only if the guest crashes (no thread may open files later).
        let symbols = SymbolSource::find(&cfg.kernel, cfg.system_map.as_deref())?;
        Self::assemble(cfg, Source::Boot(boot_plan), symbols, extras)
    }

    /// Builds the VM a snapshot directory describes, in the state it was taken in; nothing
    /// runs yet. The same disk files and TAPs (by name) are opened again, the consoles
    /// re-attached (output files appended to), and guest memory mapped from the snapshot.
    /// `api_sock` replaces the snapshot's control socket.
    pub fn restore(dir: &std::path::Path, api_sock: Option<PathBuf>) -> Result<Self, VmmError> {
        let began = Instant::now();
        let snap = crate::persist::read_state(dir)?;
        // Checked before anything is opened: a damaged snapshot touches nothing.
        crate::persist::open_memory(dir, &snap.memory)?;
        let mut cfg = snap.config.clone();
        cfg.api_sock = api_sock;
        cfg.validate_machine()?;
        crate::seccomp::init(cfg.seccomp)?;
        let symbols = SymbolSource::find(&cfg.kernel, cfg.system_map.as_deref())?;
        let mut vmm = Self::assemble(
            &cfg,
            Source::Snapshot(Box::new(snap), dir.to_path_buf()),
            symbols,
            VmExtras::default(),
        )?;
        vmm.restore_began = Some(began);
        Ok(vmm)
    }

    /// Waits for a migration on `addr` and builds the VM it brings, in the state the source
    /// paused it in; nothing runs yet. The configuration comes from the source; `local`
    /// gives what belongs to this host (the control socket, the metrics file, seccomp, the
    /// emulated-KVM override). The source hears the outcome: it exits once told the VM is
    /// built here, and resumes its own otherwise.
    pub fn incoming(
        addr: &crate::migration::Address,
        local: IncomingOptions,
    ) -> Result<Self, VmmError> {
        use crate::migration::receive;
        let receive::Incoming {
            mut conn,
            snapshot,
            mem,
            taps,
            source_version,
            pages,
            ..
        } = receive::receive(addr)?;
        let t0 = Instant::now();
        let mut cfg = snapshot.config.clone();
        cfg.api_sock = local.api_sock;
        cfg.metrics = local.metrics;
        cfg.seccomp = local.seccomp;
        cfg.allow_emulated_kvm |= local.allow_emulated_kvm;
        let built = cfg
            .validate_machine()
            .map_err(VmmError::from)
            .and_then(|()| crate::seccomp::init(cfg.seccomp).map_err(VmmError::from))
            .and_then(|()| {
                // The kernel may not be on this host: symbols are a nicety here.
                let symbols = SymbolSource::find(&cfg.kernel, cfg.system_map.as_deref())
                    .ok()
                    .flatten();
                Self::assemble(
                    &cfg,
                    Source::Incoming(snapshot, mem, taps),
                    symbols,
                    VmExtras::default(),
                )
            });
        match built {
            Ok(mut vmm) => {
                let build_ms = t0.elapsed().as_millis() as u64;
                receive::accept(&mut conn, build_ms).map_err(|e| {
                    VmmError::Migration(crate::migration::MigrationError::Protocol(e))
                })?;
                info!(
                    "Migrated in from ferrovm {source_version} ({pages} pages received, VM built \
                     in {build_ms} ms)"
                );
                vmm.announce_on_resume = true;
                vmm.restore_began = Some(t0);
                Ok(vmm)
            }
            Err(e) => {
                receive::refuse(&mut conn, &error_chain(&e));
                Err(e)
            }
        }
    }

    fn assemble(
        cfg: &VmConfig,
        source: Source,
        symbols: Option<SymbolSource>,
        extras: VmExtras,
    ) -> Result<Self, VmmError> {
        let restoring = !matches!(source, Source::Boot(_));
        let open = |b: &SerialBackend| open_serial_backend(b, restoring);
        let mut console_tails = Vec::new();
        let mut keep_tail = |name: &str, out: Box<dyn Write + Send>| {
            let tail = ConsoleTail::new();
            console_tails.push((name.to_owned(), tail.clone()));
            tail.writer(out)
        };
        let (serial_out, serial_wants_stdin) = open(&cfg.serial)?;
        let serial_out = keep_tail("ttyS0", extras.serial_out.unwrap_or(serial_out));
        let serial2 = cfg.serial2.as_ref().map(open).transpose()?;
        let console = match &cfg.console {
            Some(c) => {
                let (out, stdin) = open(&c.backend)?;
                Some((keep_tail("hvc0", out), stdin))
            }
            None => None,
        };
        // Stdin has one reader: the virtio console when it is on stdio, else ttyS0, else ttyS1.
        let console_takes_stdin = console.as_ref().is_some_and(|(_, stdin)| *stdin);
        let serial_in = serial_wants_stdin && !console_takes_stdin;
        let serial2_in = serial2.as_ref().is_some_and(|(_, stdin)| *stdin)
            && !console_takes_stdin
            && !serial_wants_stdin;
        let disks = cfg
            .disks
            .iter()
            .map(|d| RawFile::open(&d.path, d.readonly).map(|file| (d, file)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut handed_over = match &source {
            Source::Incoming(_, _, fds) => fds.iter().map(|(n, fd)| (n.clone(), fd)).collect(),
            _ => Vec::new(),
        };
        let taps = if handed_over.is_empty() {
            open_taps(&cfg.nets)?
        } else {
            // Local migration: NIC i's TAP came from the source.
            (0..cfg.nets.len())
                .map(|i| {
                    let nic = format!("eth{i}");
                    let at = handed_over
                        .iter()
                        .position(|(n, _)| *n == nic)
                        .ok_or_else(|| VmmError::SnapshotMismatch {
                            what: "TAP list",
                            why: format!("the source handed over no TAP for {nic}"),
                        })?;
                    let (_, fd) = handed_over.remove(at);
                    Tap::from_fd(fd)
                        .map_err(|e| VmmError::Host("take over a TAP from the source", e))
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        // What a migration lets go of, and the configuration with what was chosen here
        // (TAP names, MACs) filled in, which snapshots and migrations carry.
        let mut resolved = cfg.clone();
        let mut tap_handles = Vec::with_capacity(taps.len());
        for (i, (net, tap)) in resolved.nets.iter_mut().zip(&taps).enumerate() {
            net.tap = crate::config::TapConfig::Named(tap.name().to_owned());
            net.mac.get_or_insert_with(|| default_mac(i));
            tap_handles.push((
                format!("eth{i}"),
                tap.try_clone()
                    .map_err(|e| VmmError::Host("duplicate a TAP's fd", e))?,
            ));
        }
        let disk_files = disks
            .iter()
            .filter(|(d, _)| !d.readonly)
            .map(|(d, f)| f.try_clone_file().map(|f| (d.path.clone(), f)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| VmmError::Host("duplicate a disk's fd", e))?;
        // A report that cannot be written is a bad flag: say so before KVM is touched.
        if let Some(path) = &cfg.metrics {
            MetricsRegistry::new()
                .write_to(path)
                .map_err(|source| VmmError::MetricsFile {
                    path: path.clone(),
                    source,
                })?;
        }

        // The virtio-fs backends are started (and reached) before KVM is touched too.
        let (fs_daemons, fs_streams) = start_fs_backends(&cfg.fs)?;

        // Memory first: a host that cannot give it is told so whether or not KVM is there.
        let mem = match &source {
            Source::Boot(_) => {
                let backing = if cfg.needs_shared_memory() {
                    MemoryBacking::Shared
                } else {
                    MemoryBacking::Private
                };
                create_guest_memory_with(cfg.mem_bytes(), backing)?
            }
            Source::Snapshot(snap, dir) => {
                let file = crate::persist::open_memory(dir, &snap.memory)?;
                let regions: Vec<_> = snap
                    .memory
                    .iter()
                    .map(|r| {
                        (
                            vm_memory::GuestAddress(r.guest_addr),
                            r.len as usize,
                            r.file_offset,
                        )
                    })
                    .collect();
                map_snapshot_memory(&file, &regions)?
            }
            Source::Incoming(_, mem, _) => mem.clone(),
        };
        let mem_shared = match &source {
            Source::Boot(_) => cfg.needs_shared_memory(),
            Source::Snapshot(..) => false,
            Source::Incoming(_, _, fds) => cfg.needs_shared_memory() || !fds.is_empty(),
        };
        let vm = KvmVm::new(cfg.vcpus)?;
        // After the KVM device errors (a host without /dev/kvm is told that first), before
        // anything runs on a KVM that would fail the guest minutes later.
        crate::check::require_hardware_virtualization(cfg.allow_emulated_kvm)?;
        vm.register_memory(&mem)?;
        let api_socket = cfg.api_sock.as_deref().map(ApiSocket::bind).transpose()?;

        let mut event_manager = DeviceEventManager::new().map_err(VmmError::EventLoop)?;
        let mut devices = DeviceManager::new(cfg.guest_uses_acpi());
        // Stdin feeds the UART that takes it, from the event loop.
        let mut feed_stdin = |uart| -> Result<(), VmmError> {
            let input = stdin_input()
                .and_then(|stdin| SerialInputHandler::new(uart, stdin))
                .map_err(VmmError::SerialInput)?;
            event_manager.add_subscriber(Arc::new(Mutex::new(input)));
            Ok(())
        };
        let serial = devices.attach_serial(&vm, "ttyS0", COM1_PORT, COM1_IRQ, serial_out)?;
        if serial_in {
            feed_stdin(serial)?;
        }
        if let Some((out, _)) = serial2 {
            let serial2 = devices.attach_serial(&vm, "ttyS1", COM2_PORT, COM2_IRQ, out)?;
            if serial2_in {
                feed_stdin(serial2)?;
            }
        }
        if let Some((out, wants_stdin)) = console {
            let input = if wants_stdin {
                Some(stdin_input().map_err(VmmError::SerialInput)?)
            } else {
                None
            };
            let dev = VirtioConsole::new(out, input)?;
            let transport = cfg
                .console
                .as_ref()
                .and_then(|c| c.transport)
                .unwrap_or(cfg.virtio_transport);
            devices.attach_virtio(
                &vm,
                &mem,
                &mut event_manager,
                dev,
                transport,
                "hvc0",
                "virtio console (hvc0)",
            )?;
        }
        let ports = match extras.ports {
            Some(dev) => Some(devices.attach_virtio(
                &vm,
                &mem,
                &mut event_manager,
                dev,
                cfg.virtio_transport,
                "vport0",
                "virtio console ports (vport0pN)",
            )?),
            None => None,
        };
        for (i, (fs, stream)) in cfg.fs.iter().zip(fs_streams).enumerate() {
            let dev = VirtioFs::new(&fs.tag, stream)?;
            let what = format!("virtio-fs '{}'", fs.tag);
            devices.attach_virtio(
                &vm,
                &mem,
                &mut event_manager,
                dev,
                fs.transport.unwrap_or(cfg.virtio_transport),
                &format!("fs{i}"),
                &what,
            )?;
        }
        let reset_evt = devices.attach_i8042()?;
        let power_off_evt = if cfg.acpi {
            Some(devices.attach_acpi_pm(&vm, &reset_evt)?)
        } else {
            None
        };
        // Virtio disks are vda, vdb, ... and IDE disks sda, sdb, ... each in flag order.
        let mut ide_disks = Vec::new();
        let mut virtio_disks = 0u8;
        for (disk, file) in disks {
            let id = disk
                .serial
                .clone()
                .unwrap_or_else(|| default_disk_id(&disk.path));
            match disk.model {
                DeviceModel::Ide | DeviceModel::IdePio => {
                    let dma = disk.model == DeviceModel::Ide;
                    ide_disks.push(AtaDisk::new(Box::new(file), disk.readonly, &id).with_dma(dma));
                }
                _ => {
                    let name = format!("vd{}", char::from(b'a' + virtio_disks));
                    virtio_disks += 1;
                    let dev = VirtioBlock::new(name.clone(), Box::new(file), disk.readonly, &id)?;
                    let what = format!("disk {name} ({})", disk.path.display());
                    let transport = disk.transport.unwrap_or(cfg.virtio_transport);
                    devices.attach_virtio(
                        &vm,
                        &mem,
                        &mut event_manager,
                        dev,
                        transport,
                        &name,
                        &what,
                    )?;
                }
            }
        }
        devices.attach_ide(&vm, &mem, ide_disks)?;
        // NIC i is eth{i} in the guest when all NICs share a model: virtio-mmio devices are
        // probed in command line order, PCI NICs in slot order.
        for (i, (net, tap)) in resolved.nets.iter().zip(taps).enumerate() {
            let name = format!("eth{i}");
            let mac = net.mac.unwrap_or_else(|| default_mac(i));
            let what = format!("NIC {name} (TAP {}, MAC {mac})", tap.name());
            match net.model {
                DeviceModel::Ne2k => {
                    devices.attach_ne2k(&vm, &mut event_manager, &name, tap, mac)?;
                }
                DeviceModel::E1000 => {
                    devices.attach_e1000(&vm, &mem, &mut event_manager, &name, tap, mac)?;
                }
                _ => {
                    let dev = VirtioNet::new(name.clone(), Box::new(tap), mac)?;
                    let transport = net.transport.unwrap_or(cfg.virtio_transport);
                    devices.attach_virtio(
                        &vm,
                        &mem,
                        &mut event_manager,
                        dev,
                        transport,
                        &name,
                        &what,
                    )?;
                }
            }
        }

        let msr_indices = Arc::new(vm.msr_index_list()?);
        let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
        for id in 0..cfg.vcpus {
            let mut vcpu = Vcpu::new(id, vm.create_vcpu(id)?);
            vcpu.set_msr_indices(msr_indices.clone());
            vcpus.push(vcpu);
        }
        match &source {
            Source::Boot(boot_plan) => {
                Self::load_guest(cfg, &mem, &devices, boot_plan, &vm, &vcpus)?
            }
            Source::Snapshot(snap, _) | Source::Incoming(snap, ..) => {
                if snap.vcpus.len() != vcpus.len() {
                    return Err(VmmError::SnapshotMismatch {
                        what: "vCPU list",
                        why: format!("{} vCPU states for {} vCPUs", snap.vcpus.len(), vcpus.len()),
                    });
                }
                vm.restore_state(&snap.vm)?;
                for (vcpu, st) in vcpus.iter().zip(&snap.vcpus) {
                    vcpu.restore_state(st)
                        .map_err(|e| VmmError::VcpuState(st.id, e))?;
                }
            }
        }
        // KVM's own counters of every exit, opened now (before the seccomp filters) and
        // read into the metrics report when it is written.
        let kvm_stats = KvmStats::open(vm.fd(), vcpus.iter().map(Vcpu::fd));
        if devices.uses_coalesced_pio() {
            let ring =
                Arc::new(CoalescedRing::map(vcpus[0].fd()).map_err(VmmError::CoalescedRing)?);
            for v in &mut vcpus {
                v.set_coalesced_ring(ring.clone());
            }
        }

        let run_state = Arc::new(VmRunState::new(cfg.vcpus).map_err(VmmError::EventFd)?);
        let lifecycle = LifecycleHandler {
            reset_evt,
            power_off_evt,
            run_state: run_state.clone(),
        };
        event_manager.add_subscriber(Arc::new(Mutex::new(lifecycle)));

        let mut built = devices.finish()?;
        built
            .metrics
            .set_kvm_report(Box::new(move || kvm_stats.to_json()));
        let (uptime_before_ms, restored_from) = match &source {
            Source::Boot(_) => (0, None),
            Source::Snapshot(snap, dir) => {
                restore_devices(&built.persist, &snap.devices)?;
                (snap.uptime_ms, Some(dir.clone()))
            }
            Source::Incoming(snap, ..) => {
                restore_devices(&built.persist, &snap.devices)?;
                (snap.uptime_ms, None)
            }
        };

        Ok(Self {
            vcpus,
            vm,
            mem,
            pio: built.pio,
            mmio: built.mmio,
            event_manager,
            run_state,
            raw_terminal: serial_in || serial2_in || console_takes_stdin,
            metrics: built.metrics,
            metrics_path: cfg.metrics.clone(),
            config: resolved,
            persist: built.persist,
            no_persist: built.no_persist,
            acpi_pm: built.acpi_pm,
            api_socket,
            started: Instant::now(),
            uptime_before_ms,
            restored_from,
            restore_began: None,
            restore_ms: None,
            console_tails,
            symbols,
            ports,
            timeout: extras.timeout,
            taps: tap_handles,
            disk_files,
            mem_shared,
            migration: None,
            migrating: None,
            announce_on_resume: false,
            _fs_daemons: fs_daemons,
        })
    }

    /// A fresh boot: the command line, the ACPI and MP tables, the kernel, the vCPUs' boot
    /// registers.
    fn load_guest(
        cfg: &VmConfig,
        mem: &GuestMemoryMmap,
        devices: &DeviceManager,
        boot_plan: &crate::arch::x86_64::boot::BootPlan,
        vm: &KvmVm,
        vcpus: &[Vcpu],
    ) -> Result<(), VmmError> {
        let cmdline = build_cmdline(&cfg.cmdline, devices.cmdline_extra())?;
        debug!(
            "Kernel command line: {}",
            cmdline
                .as_cstring()
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        // The ACPI tables (when the VM has them) describe the devices attached above.
        let rsdp = if cfg.acpi {
            Some(setup_acpi(mem, &devices.acpi_config(cfg.vcpus))?)
        } else {
            None
        };
        let entry = load_kernel(mem, boot_plan, &cmdline, rsdp)?;
        info!(
            "Kernel {} loaded, entry {:#x} ({:?})",
            cfg.kernel.display(),
            entry.entry.0,
            entry.protocol
        );
        let pci_irqs = devices.pci_irqs();
        setup_mptable(mem, cfg.vcpus, pci_irqs.as_deref())?;
        let cpuid = vm.supported_cpuid()?;
        for vcpu in vcpus {
            vcpu.configure(&cpuid, cfg.vcpus, mem, &entry)?;
        }
        Ok(())
    }

    /// Runs the guest until it powers off, reboots or crashes, or a termination signal
    /// arrives; the terminal is restored whatever happens.
    pub fn run(mut self) -> Result<Outcome, VmmError> {
        register_kick_handler()?;
        for sig in TERMINATION_SIGNALS {
            register_signal_handler(sig, on_termination_signal).map_err(VmmError::Signals)?;
        }
        register_signal_handler(libc::SIGUSR1, on_metrics_signal).map_err(VmmError::Signals)?;
        let _terminal = if self.raw_terminal {
            RawTerminal::stdin().map_err(VmmError::Terminal)?
        } else {
            None
        };

        // vCPU threads inherit the mask: these signals go to this thread only.
        for sig in LOOP_SIGNALS {
            block_signal(sig).map_err(|e| VmmError::SignalMask(e.to_string()))?;
        }
        let mut handles = Vec::with_capacity(self.vcpus.len());
        let mut start_err = None;
        for vcpu in self.vcpus.drain(..) {
            match vcpu.start(self.pio.clone(), self.mmio.clone(), self.run_state.clone()) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    start_err = Some(e);
                    break;
                }
            }
        }
        for sig in LOOP_SIGNALS {
            unblock_signal(sig).map_err(|e| VmmError::SignalMask(e.to_string()))?;
        }
        if let Some(t) = self.restore_began.take() {
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            info!("Restored and running in {ms:.1} ms (the VMM's part: state read, memory mapped, devices and vCPUs set, vCPU threads started)");
            self.restore_ms = Some(ms);
        }

        // The control socket's thread, before the main thread's filter (it installs its own).
        let mut api = None;
        if start_err.is_none() {
            if let Some(sock) = self.api_socket.take() {
                let (server, rx, wake) = sock.start()?;
                self.event_manager
                    .add_subscriber(Arc::new(Mutex::new(control::Wakeup(wake))));
                api = Some((server, rx));
                // Migrations are asked for on the control socket; the thread installs its
                // own filter, so it starts before the main thread's.
                let (worker, wake) = crate::migration::send::Worker::start()
                    .map_err(|e| VmmError::Host("start the migration thread", e))?;
                self.event_manager
                    .add_subscriber(Arc::new(Mutex::new(control::Wakeup(wake))));
                self.migration = Some(worker);
            }
            if self.announce_on_resume {
                self.announce();
            }
        }
        self.started = Instant::now();
        // Last, so no thread inherits the main thread's filter: each installed its own.
        let result = match start_err {
            Some(e) => Err(e.into()),
            None => crate::seccomp::apply(ThreadKind::Main)
                .map_err(VmmError::from)
                .and_then(|()| self.event_loop(&handles, api.as_ref().map(|(_, rx)| rx))),
        };
        if let Some((mut server, _)) = api {
            server.stop();
        }
        self.run_state.request_stop();
        for h in &handles {
            h.kick();
        }
        for h in handles {
            h.join();
        }
        // What the guest wrote to a port before it stopped reaches its host side.
        if let Some(ports) = &self.ports {
            ports
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain_output();
        }
        let crash_report = match &result {
            Ok(ExitReason::Guest(exit)) if !exit.is_clean() => Some(self.crash_report(exit)),
            // Stopped from outside before the guest ended: where it was (a hung guest).
            Ok(reason @ (ExitReason::Signal(_) | ExitReason::TimedOut)) => {
                Some(self.stop_report(reason))
            }
            _ => None,
        };
        // Written after the vCPUs stopped, so the report is final.
        self.write_metrics();
        result.map(|reason| Outcome {
            reason,
            crash_report,
        })
    }

    /// The crash report for `exit` as stderr shows it; its JSON goes into the metrics.
    fn crash_report(&mut self, exit: &GuestExit) -> String {
        let (table, symbols) = self.load_symbols();
        let report = CrashReport::new(
            exit,
            &self.run_state.records(),
            &self.console_tails,
            symbols,
            self.started.elapsed(),
            Instant::now(),
        );
        self.metrics.set_crash(report.to_json(table.as_ref()));
        report.render(table.as_ref())
    }

    /// The stop report for a guest stopped from outside (`reason`), as stderr shows it: each
    /// vCPU's latest sample; its JSON goes into the metrics as `stop`.
    fn stop_report(&mut self, reason: &ExitReason) -> String {
        let (table, symbols) = self.load_symbols();
        let report = CrashReport::for_stop(
            reason.to_string(),
            &self.run_state.records(),
            &self.console_tails,
            symbols,
            self.started.elapsed(),
            Instant::now(),
        );
        self.metrics.set_stop(report.to_json(table.as_ref()));
        report.render(table.as_ref())
    }

    /// The kernel's symbols for a report, and where they came from or why there are none.
    fn load_symbols(&self) -> (Option<crate::crash::SymbolTable>, Result<String, String>) {
        match self.symbols.as_ref().map(|s| (s, s.load())) {
            Some((source, Ok(table))) => (Some(table), Ok(source.describe())),
            Some((_, Err(e))) => (None, Err(e.to_string())),
            None => (
                None,
                Err(
                    "the kernel has no .symtab and no System.map was found beside it; \
                     give --system-map"
                        .to_owned(),
                ),
            ),
        }
    }

    fn write_metrics(&self) {
        if let Some(path) = &self.metrics_path {
            if let Err(e) = self.metrics.write_to(path) {
                error!("Failed to write the metrics to {}: {e}", path.display());
                eprintln!(
                    "ferrovm: warning: failed to write the metrics to {}: {e}",
                    path.display()
                );
            }
        }
    }

    fn event_loop(
        &mut self,
        vcpus: &[VcpuHandle],
        api: Option<&std::sync::mpsc::Receiver<Pending>>,
    ) -> Result<ExitReason, VmmError> {
        let mut last_poll = Instant::now();
        let deadline = self.timeout.map(|t| Instant::now() + t);
        // Whether the guest has ever had interrupt routing in place (see `classify_exit`).
        let mut interrupts_were_live = false;
        loop {
            let timeout = HALT_POLL_INTERVAL.saturating_sub(last_poll.elapsed());
            match self
                .event_manager
                .run_with_timeout(timeout.as_millis() as i32)
            {
                Ok(_) => {}
                Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EINTR => {}
                Err(e) => return Err(VmmError::EventLoop(e)),
            }
            if METRICS_REQUESTED.swap(false, Ordering::SeqCst) {
                self.write_metrics();
            }
            while let Some(Pending { cmd, reply, stream }) = api.and_then(|rx| rx.try_recv().ok()) {
                let (answer, exit) = self.handle_api(cmd, vcpus, stream);
                let _ = reply.send(answer);
                if let Some(exit) = exit {
                    return Ok(exit);
                }
            }
            if let Some(exit) = self.poll_migration(vcpus) {
                return Ok(exit);
            }
            let sig = TERMINATION.swap(0, Ordering::SeqCst);
            if sig != 0 {
                info!("Received {}, stopping the VM", signal_name(sig));
                return Ok(ExitReason::Signal(sig));
            }
            if let Some(exit) = self.run_state.exit() {
                let live_now = self.vm.ioapic_routes_live()?;
                let exit = classify_exit(exit, interrupts_were_live || live_now, live_now);
                return Ok(ExitReason::Guest(exit));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                info!("The time limit ran out, stopping the VM");
                return Ok(ExitReason::TimedOut);
            }
            if self.run_state.paused() {
                // Parked vCPUs need no kick, and a paused guest is not halting.
                last_poll = Instant::now();
                continue;
            }
            if last_poll.elapsed() >= HALT_POLL_INTERVAL {
                interrupts_were_live |= self.vm.ioapic_routes_live()?;
                if self.run_state.all_dead_halted() {
                    info!("All vCPUs halted with interrupts off: the guest powered off");
                    return Ok(ExitReason::Guest(GuestExit::Halted));
                }
                for v in vcpus {
                    v.kick();
                }
                last_poll = Instant::now();
            }
        }
    }
}

/// Puts each device's saved state back, then pokes every device so nothing waits on an
/// event lost with the old process. Every device of the VM must have a saved state and
/// every saved state a device: anything else means the snapshot is of another VM.
fn restore_devices(
    devices: &[(String, Arc<Mutex<dyn Persist>>)],
    states: &std::collections::BTreeMap<String, serde_json::Value>,
) -> Result<(), VmmError> {
    for (id, _) in devices {
        if !states.contains_key(id) {
            return Err(VmmError::DeviceState {
                device: id.clone(),
                why: "the snapshot has no state for it".into(),
            });
        }
    }
    if let Some(extra) = states
        .keys()
        .find(|k| !devices.iter().any(|(id, _)| id == *k))
    {
        return Err(VmmError::DeviceState {
            device: extra.clone(),
            why: "the snapshot has a device this VM does not".into(),
        });
    }
    for (id, dev) in devices {
        dev.lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore(&states[id])
            .map_err(|why| VmmError::DeviceState {
                device: id.clone(),
                why,
            })?;
    }
    for (_, dev) in devices {
        dev.lock().unwrap_or_else(|p| p.into_inner()).kick();
    }
    Ok(())
}

/// Starts a virtiofsd per `path=` share and connects to every share's socket; returns the
/// daemons (reaped when dropped) and the connected sockets, in `fs` order.
fn start_fs_backends(
    fs: &[FsConfig],
) -> Result<(Vec<Virtiofsd>, Vec<std::os::unix::net::UnixStream>), VmmError> {
    let mut daemons = Vec::new();
    let mut streams = Vec::new();
    let mut binary = None;
    for share in fs {
        match &share.source {
            FsSource::Dir { path, readonly } => {
                if binary.is_none() {
                    binary = Some(virtiofsd::Binary::find()?);
                }
                let bin = binary.as_ref().expect("found above");
                let (daemon, stream) = Virtiofsd::start(bin, &share.tag, path, *readonly)?;
                daemons.push(daemon);
                streams.push(stream);
            }
            FsSource::Socket(path) => {
                streams.push(virtiofsd::connect(
                    path,
                    &share.tag,
                    virtiofsd::READY_TIMEOUT,
                    || None,
                )?);
            }
        }
    }
    Ok((daemons, streams))
}

/// The id a disk reports when none is given: its file name, cut to what virtio-blk carries.
fn default_disk_id(path: &std::path::Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.chars()
        .filter(char::is_ascii)
        .take(crate::config::DISK_SERIAL_MAX)
        .collect()
}

/// Opens the serial backend: the writer for guest output, and whether stdin feeds input.
/// A restored VM appends to its output files rather than truncating them.
fn open_serial_backend(
    backend: &SerialBackend,
    append: bool,
) -> Result<(Box<dyn Write + Send>, bool), VmmError> {
    Ok(match backend {
        SerialBackend::Stdio => (Box::new(std::io::stdout()), true),
        SerialBackend::File(path) => {
            let f = if append {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
            } else {
                File::create(path)
            }
            .map_err(|source| VmmError::SerialFile {
                path: path.clone(),
                source,
            })?;
            (Box::new(f), false)
        }
        SerialBackend::None => (Box::new(std::io::sink()), false),
    })
}

const EVT_RESET: u32 = 0;
const EVT_EXIT: u32 = 1;
const EVT_POWER_OFF: u32 = 2;

/// Turns the reset line (i8042 or ACPI reset register) and ACPI S5 into guest exits, and
/// wakes the loop when a vCPU reports one.
struct LifecycleHandler {
    reset_evt: EventFd,
    power_off_evt: Option<EventFd>,
    run_state: Arc<VmRunState>,
}

impl MutEventSubscriber for LifecycleHandler {
    fn init(&mut self, ops: &mut EventOps) {
        let mut fds = vec![
            (self.reset_evt.as_raw_fd(), EVT_RESET),
            (self.run_state.exit_evt.as_raw_fd(), EVT_EXIT),
        ];
        if let Some(evt) = &self.power_off_evt {
            fds.push((evt.as_raw_fd(), EVT_POWER_OFF));
        }
        for (fd, data) in fds {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                error!("Failed to watch lifecycle events: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            EVT_RESET => {
                let _ = self.reset_evt.read();
                info!("The guest reset the machine (i8042 or ACPI reset register)");
                self.run_state.report(GuestExit::Reset);
            }
            EVT_POWER_OFF => {
                if let Some(evt) = &self.power_off_evt {
                    let _ = evt.read();
                }
                info!("The guest powered off through ACPI S5");
                self.run_state.report(GuestExit::PowerOff);
            }
            // The exit is already recorded; reading just clears the wakeup.
            EVT_EXIT => {
                let _ = self.run_state.exit_evt.read();
            }
            other => warn!("Unexpected lifecycle event {other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(ExitReason::Guest(GuestExit::Reset).exit_code(), 0);
        assert_eq!(ExitReason::Guest(GuestExit::Halted).exit_code(), 0);
        assert_eq!(ExitReason::Guest(GuestExit::PowerOff).exit_code(), 0);
        assert_eq!(
            ExitReason::Guest(GuestExit::TripleFault { vcpu: 0 }).exit_code(),
            1
        );
        assert_eq!(ExitReason::Signal(libc::SIGTERM).exit_code(), 143);
        assert_eq!(
            ExitReason::Signal(libc::SIGINT).to_string(),
            "stopped by signal SIGINT"
        );
    }

    #[test]
    fn orderly_and_emergency_restarts_are_told_apart() {
        let tf = GuestExit::TripleFault { vcpu: 0 };
        // reboot=k: routing torn down before the i8042 pulse.
        assert_eq!(
            classify_exit(GuestExit::Reset, true, false),
            GuestExit::Reset
        );
        // panic=-1 with reboot=k: routing still live.
        assert_eq!(
            classify_exit(GuestExit::Reset, true, true),
            GuestExit::EmergencyReset
        );
        // reboot=t: routing torn down, then the triple fault.
        assert_eq!(classify_exit(tf.clone(), true, false), GuestExit::Reset);
        // A crash mid-flight, or a panic with reboot=t.
        assert_eq!(classify_exit(tf.clone(), true, true), tf);
        // A guest that never set up interrupts and triple faults: a crash.
        assert_eq!(classify_exit(tf.clone(), false, false), tf);
        // Reset before any routing existed (very early reboot): orderly.
        assert_eq!(
            classify_exit(GuestExit::Reset, false, false),
            GuestExit::Reset
        );
        assert_eq!(
            classify_exit(GuestExit::Halted, true, false),
            GuestExit::Halted
        );
    }

    #[test]
    fn default_disk_ids_are_file_names_cut_to_20_bytes() {
        assert_eq!(
            default_disk_id(std::path::Path::new("/x/root.img")),
            "root.img"
        );
        let long = default_disk_id(std::path::Path::new("/x/a-very-long-image-name-indeed.raw"));
        assert_eq!(long, "a-very-long-image-na");
    }

    #[test]
    fn serial_file_backend_errors_name_the_path() {
        let err = open_serial_backend(&SerialBackend::File("/nonexistent/dir/log".into()), false)
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent/dir/log"));
    }
}
