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

use crate::arch::x86_64::acpi::{setup_acpi, AcpiError};
use crate::arch::x86_64::boot::{build_cmdline, load_kernel, plan_boot, BootError};
use crate::arch::x86_64::layout::{COM1_IRQ, COM1_PORT, COM2_IRQ, COM2_PORT};
use crate::arch::x86_64::mptable::{setup_mptable, MptableError};
use crate::config::{ConfigError, DeviceModel, SerialBackend, VmConfig};
use crate::devices::disk::{DiskError, RawFile};
use crate::devices::emulated::ide::AtaDisk;
use crate::devices::host_input::stdin_input;
use crate::devices::legacy::SerialInputHandler;
use crate::devices::manager::{DeviceError, DeviceManager};
use crate::devices::metrics::MetricsRegistry;
use crate::devices::virtio::block::BlockError;
use crate::devices::virtio::console::ConsoleError;
use crate::devices::virtio::net::{default_mac, open_taps, NetError, VirtioNet};
use crate::devices::virtio::{VirtioBlock, VirtioConsole};
use crate::devices::{Bus, DeviceEventManager};
use crate::seccomp::{SeccompError, ThreadKind};
use crate::terminal::RawTerminal;
use crate::vstate::coalesced::CoalescedRing;
use crate::vstate::memory::{create_guest_memory, GuestMemoryMmap, MemoryError};
use crate::vstate::stats::KvmStats;
use crate::vstate::vcpu::{
    register_kick_handler, GuestExit, Vcpu, VcpuError, VcpuHandle, VmRunState,
};
use crate::vstate::vm::{KvmVm, VmError};

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
}

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    Guest(GuestExit),
    /// The VMM received this termination signal.
    Signal(i32),
}

impl ExitReason {
    /// The process exit status: 0 when the guest ended on purpose, 128+N for signal N (as
    /// shells report it), 1 when the guest crashed or KVM failed.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Guest(g) if g.is_clean() => 0,
            Self::Guest(_) => 1,
            Self::Signal(n) => 128 + n,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Guest(g) => g.fmt(f),
            Self::Signal(n) => write!(f, "stopped by signal {}", signal_name(*n)),
        }
    }
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

/// A VM ready to run.
pub struct Vmm {
    // Declared before `mem` so vCPUs and the VM go away before the memory they map.
    vcpus: Vec<Vcpu>,
    vm: KvmVm,
    _mem: GuestMemoryMmap,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    event_manager: DeviceEventManager,
    run_state: Arc<VmRunState>,
    raw_terminal: bool,
    metrics: MetricsRegistry,
    metrics_path: Option<PathBuf>,
}

impl Vmm {
    /// Validates `cfg` and builds the whole VM; nothing runs yet.
    pub fn build(cfg: &VmConfig) -> Result<Self, VmmError> {
        cfg.validate()?;
        // Before any thread exists: the I/O and stdin threads started below sandbox themselves.
        crate::seccomp::init(cfg.seccomp)?;
        // Bad kernel or initrd files are reported before KVM is touched.
        let boot_plan = plan_boot(&cfg.kernel, cfg.initrd.as_deref(), cfg.mem_bytes())?;
        let (serial_out, serial_wants_stdin) = open_serial_backend(&cfg.serial)?;
        let serial2 = cfg.serial2.as_ref().map(open_serial_backend).transpose()?;
        let console = match &cfg.console {
            Some(c) => Some(open_serial_backend(&c.backend)?),
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
        let taps = open_taps(&cfg.nets)?;
        // A report that cannot be written is a bad flag: say so before KVM is touched.
        if let Some(path) = &cfg.metrics {
            MetricsRegistry::new()
                .write_to(path)
                .map_err(|source| VmmError::MetricsFile {
                    path: path.clone(),
                    source,
                })?;
        }

        // Memory first: a host that cannot give it is told so whether or not KVM is there.
        let mem = create_guest_memory(cfg.mem_bytes())?;
        let vm = KvmVm::new(cfg.vcpus)?;
        vm.register_memory(&mem)?;

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
        let reset_evt = devices.attach_i8042()?;
        let power_off_evt = if cfg.acpi {
            Some(devices.attach_acpi_pm(&reset_evt)?)
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
        for (i, (net, tap)) in cfg.nets.iter().zip(taps).enumerate() {
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
            Some(setup_acpi(&mem, &devices.acpi_config(cfg.vcpus))?)
        } else {
            None
        };
        let entry = load_kernel(&mem, &boot_plan, &cmdline, rsdp)?;
        info!(
            "Kernel {} loaded, entry {:#x} ({:?})",
            cfg.kernel.display(),
            entry.entry.0,
            entry.protocol
        );
        let pci_irqs = devices.pci_irqs();
        setup_mptable(&mem, cfg.vcpus, pci_irqs.as_deref())?;

        let cpuid = vm.supported_cpuid()?;
        let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
        for id in 0..cfg.vcpus {
            let vcpu = Vcpu::new(id, vm.create_vcpu(id)?);
            vcpu.configure(&cpuid, cfg.vcpus, &mem, &entry)?;
            vcpus.push(vcpu);
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

        let (pio, mmio, mut metrics) = devices.finish()?;
        metrics.set_kvm_report(Box::new(move || kvm_stats.to_json()));

        Ok(Self {
            vcpus,
            vm,
            _mem: mem,
            pio,
            mmio,
            event_manager,
            run_state,
            raw_terminal: serial_in || serial2_in || console_takes_stdin,
            metrics,
            metrics_path: cfg.metrics.clone(),
        })
    }

    /// Runs the guest until it powers off, reboots or crashes, or a termination signal
    /// arrives; the terminal is restored whatever happens.
    pub fn run(mut self) -> Result<ExitReason, VmmError> {
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

        // Last, so no thread inherits the main thread's filter: each installed its own.
        let result = match start_err {
            Some(e) => Err(e.into()),
            None => crate::seccomp::apply(ThreadKind::Main)
                .map_err(VmmError::from)
                .and_then(|()| self.event_loop(&handles)),
        };
        self.run_state.request_stop();
        for h in &handles {
            h.kick();
        }
        for h in handles {
            h.join();
        }
        // Written after the vCPUs stopped, so the report is final.
        self.write_metrics();
        result
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

    fn event_loop(&mut self, vcpus: &[VcpuHandle]) -> Result<ExitReason, VmmError> {
        let mut last_poll = Instant::now();
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
fn open_serial_backend(backend: &SerialBackend) -> Result<(Box<dyn Write + Send>, bool), VmmError> {
    Ok(match backend {
        SerialBackend::Stdio => (Box::new(std::io::stdout()), true),
        SerialBackend::File(path) => {
            let f = File::create(path).map_err(|source| VmmError::SerialFile {
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
        let err = open_serial_backend(&SerialBackend::File("/nonexistent/dir/log".into()))
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent/dir/log"));
    }
}
