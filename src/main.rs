//! The `ferrovm` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use ferrovm::config::{
    ConsoleConfig, DiskConfig, FsConfig, NetConfig, SerialBackend, VirtioTransport, DEFAULT_CMDLINE,
};
use ferrovm::leftovers::Leftovers;
use ferrovm::{terminal, Outcome, VmConfig, Vmm};

/// `--version`: the crate version and the commit it was built from (build.rs; `-dirty` when
/// the sources differed from it, `unknown` outside a git checkout).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("FERROVM_GIT_COMMIT"),
    ")"
);

/// A micro-VMM on KVM: boots a Linux kernel with emulated and paravirtual devices.
#[derive(Parser)]
#[command(name = "ferrovm", version = VERSION, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // made once per process: boxing RunArgs would buy nothing
enum Command {
    /// Boot a Linux guest and run it until it powers off, reboots or crashes.
    ///
    /// Exit status: 0 when the guest powers off or reboots, 1 when it crashes (triple fault,
    /// KVM error, kernel panic: a crash report with the registers and the console's last lines
    /// follows the reason on stderr) or the VM cannot be built, 128+N when stopped by signal N (SIGINT, SIGTERM,
    /// SIGHUP stop it cleanly), 2 for a bad command line, 159 (128+SIGSYS) when a VMM thread
    /// made a syscall its seccomp filter forbids (the VMM stops at once; see --no-seccomp).
    Run(RunArgs),
    /// Say what this host offers and what ferrovm needs: the KVM device and its API version,
    /// hardware virtualization, the KVM capabilities ferrovm uses, TAP creation, virtiofsd.
    ///
    /// One line per item, "ok" or "missing" (with the fix). Exit status: 0 when everything
    /// `ferrovm run` needs is there, 1 when something required is missing.
    Check {
        /// Print the report as JSON: {"ok": BOOL, "items": [{"id", "ok", "required",
        /// "detail", "fix"}...]}
        #[arg(long)]
        json: bool,
    },
    /// Restore a snapshot (taken with `ferrovm snapshot`) in this new process and run it:
    /// the guest continues where it stopped. Exit status as for `run`.
    Restore {
        /// The snapshot directory
        #[arg(long, value_name = "DIR")]
        snapshot: PathBuf,
        /// A control socket for the restored VM
        #[arg(long, value_name = "PATH")]
        api_sock: Option<PathBuf>,
    },
    /// Print the VM's state, configuration and uptime (JSON), from its control socket.
    Info(ClientArgs),
    /// Pause every vCPU of the VM.
    Pause(ClientArgs),
    /// Resume a paused VM.
    Resume(ClientArgs),
    /// Write a snapshot of the paused VM to DIR (new or empty); `ferrovm restore` runs it.
    Snapshot {
        #[command(flatten)]
        client: ClientArgs,
        /// Where the snapshot goes
        dir: PathBuf,
    },
    /// Move the running VM live to a ferrovm waiting with `run --incoming ADDR`: memory is
    /// copied while the guest runs, then the guest stops for the last part (the downtime)
    /// and continues there; this VM's ferrovm then exits 0. Prints each pass on stderr and a
    /// summary line; exit status 0 when the VM moved, 1 when it stayed (it runs on here).
    Migrate(MigrateArgs),
    /// Print the VM's device counters (the --metrics report, JSON).
    Metrics(ClientArgs),
    /// Press the VM's ACPI power button (the guest decides what to do).
    PowerButton(ClientArgs),
    /// Stop the VM at once; its ferrovm exits with status 0.
    Shutdown(ClientArgs),
    /// Boot a kernel on the host's own files and run one command in it.
    ///
    /// The guest's root is the host's / over virtio-fs, read-only, with tmpfs over /tmp,
    /// /var/tmp, /run and $HOME; CMD runs in the current directory with the caller's
    /// environment (less DISPLAY, SSH_*, DBUS_*, XDG_RUNTIME_DIR and the like). Its stdout and
    /// stderr are ferrovm's, stdin is forwarded. Kernel messages are hidden unless --verbose.
    ///
    /// Exit status: CMD's (128+N when signal N killed it), 255 with a reason line when the
    /// guest panicked or never ran CMD, 124 after --timeout, 1 when the VM cannot be built.
    Exec(ExecArgs),
}

#[derive(Args)]
struct ExecArgs {
    /// The kernel (bzImage or vmlinux; default: the project's, built by scripts/build-guest,
    /// else /boot/vmlinuz-$(uname -r)). It needs virtio-fs: CONFIG_VIRTIO_FS and
    /// CONFIG_FUSE_FS, with CONFIG_VIRTIO_CONSOLE and CONFIG_VIRTIO_PCI (built in or modules)
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,

    /// Where the kernel's modules are (a directory with modules.dep; default: modules/
    /// beside the kernel, else /lib/modules/RELEASE)
    #[arg(long, value_name = "DIR")]
    modules: Option<PathBuf>,

    /// Number of vCPUs
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u8,

    /// Guest memory in MiB
    #[arg(long, value_name = "MIB", default_value_t = 512)]
    memory: u64,

    /// An extra disk, as for `ferrovm run --disk`; repeatable
    #[arg(long = "disk", value_name = "DISK")]
    disks: Vec<DiskConfig>,

    /// A NIC, as for `ferrovm run --net`; repeatable
    #[arg(long = "net", value_name = "NIC")]
    nets: Vec<NetConfig>,

    /// A host directory the guest may write (its own virtio-fs share at the same path);
    /// changes are on the host when ferrovm exits; repeatable
    #[arg(long = "rw", value_name = "DIR")]
    rw: Vec<PathBuf>,

    /// Stop the VM after SECS seconds (exit status 124)
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,

    /// Show the guest kernel's messages (on stderr)
    #[arg(long)]
    verbose: bool,

    /// The virtio transport: pci or mmio
    #[arg(long, value_name = "pci|mmio", default_value = "pci")]
    virtio_transport: VirtioTransport,

    /// Run without the seccomp filters (debugging)
    #[arg(long)]
    no_seccomp: bool,

    /// The command and its arguments, after --
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<std::ffi::OsString>,
}

#[derive(Args)]
struct MigrateArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Where the destination waits: unix:PATH or tcp:HOST:PORT
    #[arg(long, value_name = "ADDR")]
    to: String,
    /// Same host: hand guest memory (needs --memory-shared) and the TAPs over by fd
    /// instead of copying (unix: only)
    #[arg(long)]
    local: bool,
    /// The longest downtime to aim for, in ms
    #[arg(long, value_name = "MS", default_value_t = ferrovm::migration::DEFAULT_DOWNTIME_MS)]
    downtime_ms: u64,
    /// Switch over after this many passes over memory whatever the estimate
    #[arg(long, value_name = "N", default_value_t = ferrovm::migration::DEFAULT_MAX_PASSES)]
    max_passes: u32,
    /// Switch over after this many seconds of copying whatever the estimate
    #[arg(long, value_name = "SECS", default_value_t = ferrovm::migration::DEFAULT_TIMEOUT_S)]
    timeout: u64,
    /// Print the progress lines and the summary as JSON on stdout (one object per line)
    #[arg(long)]
    json: bool,
}

/// Runs `ferrovm migrate`: the request, the progress, the summary.
fn migrate(a: MigrateArgs) -> ExitCode {
    let to = match ferrovm::migration::resolve(&a.to) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ferrovm: error: invalid value for '--to <ADDR>': {e}");
            return ExitCode::from(2);
        }
    };
    let params = ferrovm::migration::MigrateParams {
        to,
        local: a.local,
        downtime_ms: a.downtime_ms,
        max_passes: a.max_passes,
        timeout_s: a.timeout,
    };
    if let Err(e) = params.validate() {
        eprintln!("ferrovm: error: {e}");
        return ExitCode::from(2);
    }
    let json = a.json;
    let shown = |v: &serde_json::Value| {
        if json {
            println!("{v}");
            return;
        }
        let f = |k: &str| v[k].clone();
        match v["event"].as_str() {
            Some("connected") => eprintln!("ferrovm: migrate: connected to {}", f("to")),
            Some("pass") => eprintln!(
                "ferrovm: migrate: pass {}: {} MiB sent ({} MiB in all), {} MiB dirtied \
                 ({} MiB/s), link {} MiB/s, estimated downtime {} ms",
                f("pass"),
                f("sent_mib"),
                f("total_sent_mib"),
                f("dirty_mib"),
                f("dirty_rate_mib_s"),
                f("bandwidth_mib_s"),
                f("estimated_downtime_ms")
            ),
            _ => {}
        }
    };
    match ferrovm::api::client::migrate(&a.client.api_sock, &params, shown) {
        Ok(Ok(last)) if last["event"] == "completed" => {
            if !json {
                eprintln!(
                    "ferrovm: migrated to {} in {} ms: {} passes, {} MiB sent, downtime {} ms",
                    last["to"].as_str().unwrap_or("?"),
                    last["total_ms"],
                    last["passes"],
                    last["sent_mib"],
                    last["downtime_ms"]
                );
            }
            ExitCode::SUCCESS
        }
        Ok(Ok(last)) => {
            eprintln!(
                "ferrovm: error: migration failed, the VM runs on here: {}",
                last["error"].as_str().unwrap_or("(no reason given)")
            );
            ExitCode::FAILURE
        }
        Ok(Err((status, msg))) => {
            eprintln!("ferrovm: error: migrate failed ({status}): {msg}");
            ExitCode::FAILURE
        }
        Err(e) => {
            print_error(&e);
            ExitCode::FAILURE
        }
    }
}

/// How a client subcommand finds its VM.
#[derive(Args)]
struct ClientArgs {
    /// The VM's control socket (`ferrovm run --api-sock PATH`)
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
}

/// Sends `op` to the VM behind `sock`; prints the answer (JSON on stdout, an error line on
/// stderr) and returns the exit status: 0 for a 2xx answer, 1 otherwise.
fn client(op: &str, sock: &std::path::Path, dir: Option<&std::path::Path>) -> ExitCode {
    use ferrovm::api::client;
    let (method, path, body) = client::request_for(op, dir);
    match client::call(sock, method, &path, &body) {
        Ok((status, body)) if (200..300).contains(&status) => {
            if !body.is_empty() {
                println!("{body}");
            }
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            let msg = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(String::from))
                .unwrap_or(body);
            eprintln!("ferrovm: error: {op} failed ({status}): {msg}");
            ExitCode::FAILURE
        }
        Err(e) => {
            print_error(&e);
            ExitCode::FAILURE
        }
    }
}

#[derive(Args)]
struct RunArgs {
    /// Guest kernel: an uncompressed ELF vmlinux (booted through PVH when it has the PVH
    /// note, else the 64-bit boot protocol) or a bzImage (boot protocol 2.12+)
    #[arg(long, value_name = "PATH", required_unless_present = "incoming")]
    kernel: Option<PathBuf>,

    /// Wait for a live migration on unix:PATH or tcp:HOST:PORT and run the VM it brings
    /// (its whole configuration comes from the source; only --api-sock, --metrics,
    /// --no-seccomp and --allow-emulated-kvm may be given with it)
    #[arg(
        long,
        value_name = "ADDR",
        conflicts_with_all = [
            "kernel", "initrd", "cmdline", "cpus", "memory", "serial", "disks", "nets",
            "console", "serial2", "system_map", "virtio_transport", "no_acpi", "fs",
            "memory_shared",
        ]
    )]
    incoming: Option<String>,

    /// Initramfs (cpio archive, optionally compressed) handed to the kernel
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,

    /// Kernel command line; anything after " -- " is passed to init as arguments
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    cmdline: String,

    /// Number of vCPUs (1 to 32), each on its own host thread
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        allow_hyphen_values = true
    )]
    cpus: u8,

    /// Guest memory in MiB
    #[arg(
        long,
        value_name = "MIB",
        default_value_t = 256,
        allow_hyphen_values = true
    )]
    memory: u64,

    /// Where the guest's console UART (ttyS0) goes: "stdio" (terminal in raw mode while the
    /// guest runs), "file=PATH" (output only) or "none"
    #[arg(long, value_name = "BACKEND", default_value = "stdio")]
    serial: SerialBackend,

    /// A raw disk image, PATH[,readonly][,model=virtio|ide|ide-pio][,transport=pci|mmio]
    /// [,serial=ID]; repeatable. virtio disks appear as /dev/vda, /dev/vdb, ... (root=/dev/vda
    /// boots from the first); model=ide disks (at most 4, emulated ATA on a PIIX IDE
    /// controller, bus-master DMA; ide-pio: the same drive offering PIO only) as /dev/sda, ...
    #[arg(long = "disk", value_name = "DISK")]
    disks: Vec<DiskConfig>,

    /// A NIC on a host TAP device, tap=NAME|auto[,mac=MAC][,model=virtio|ne2k|e1000]
    /// [,transport=pci|mmio]; repeatable.
    /// model=ne2k is an emulated NE2000 PCI card (RTL8029), model=e1000 an Intel 82540EM
    /// (the in-tree e1000 driver). tap=auto creates a TAP named
    /// fvmtapN for the VM's lifetime (needs CAP_NET_ADMIN)
    #[arg(long = "net", value_name = "NIC")]
    nets: Vec<NetConfig>,

    /// A paravirtual console (/dev/hvc0), virtio[,stdio|,file=PATH|,none][,transport=pci|mmio];
    /// with stdio it
    /// takes the terminal's input (the serial port keeps its output)
    #[arg(long, value_name = "CONSOLE")]
    console: Option<ConsoleConfig>,

    /// A second UART at COM2 (0x2f8, IRQ 3; the guest's ttyS1), the emulated counterpart
    /// of the virtio console: "stdio", "file=PATH" or "none"
    #[arg(long, value_name = "BACKEND")]
    serial2: Option<SerialBackend>,

    /// Write every device's counters (VM exits by register, notifications, interrupts,
    /// bytes moved, handling time) as JSON to PATH when the VMM exits and on SIGUSR1
    #[arg(long, value_name = "PATH")]
    metrics: Option<PathBuf>,

    /// The guest kernel's System.map, to show addresses in a crash report as symbol+offset
    /// (default: the ELF kernel's own symbol table, or a System.map or
    /// System.map-<release> beside the kernel)
    #[arg(long, value_name = "PATH")]
    system_map: Option<PathBuf>,

    /// Run without the seccomp filters (each VMM thread is otherwise limited to the syscalls
    /// it needs, and a forbidden one stops the VMM with status 159); for debugging only
    #[arg(long)]
    no_seccomp: bool,

    /// The transport of virtio devices that do not choose one with transport=: "pci"
    /// (virtio-pci with MSI-X, what distribution and defconfig kernels find) or "mmio"
    /// (virtio-mmio, described in the DSDT, or on the command line under --no-acpi)
    #[arg(long, value_name = "pci|mmio", default_value = "pci")]
    virtio_transport: VirtioTransport,

    /// Give the guest no ACPI tables: it finds its CPUs and interrupt routing in the MP
    /// table, virtio-mmio devices on the kernel command line, and powers off by halting
    /// (for kernels built without CONFIG_ACPI; `acpi=off` on the command line does the same
    /// for the guest but keeps the tables)
    #[arg(long)]
    no_acpi: bool,

    /// Serve the control API (HTTP/1.1 + JSON, docs/api/openapi.json) on a Unix socket at
    /// PATH (mode 0600): `ferrovm info|pause|resume|snapshot|... --api-sock PATH` or
    /// `curl --unix-socket PATH http://localhost/api/v1/vm.info`
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,

    /// Run even when /dev/kvm has no hardware virtualization (vmx/svm) under it, e.g. a
    /// software KVM; the guest then fails when KVM cannot emulate an instruction (see
    /// `ferrovm check`; scripts/kvm-sandbox gives a working KVM on such hosts)
    #[arg(long)]
    allow_emulated_kvm: bool,

    /// A virtio-fs share the guest mounts with `mount -t virtiofs TAG DIR`:
    /// tag=TAG,path=DIR[,readonly] starts a virtiofsd serving DIR (stopped with the VM),
    /// tag=TAG,socket=PATH uses a virtiofsd you run; [,transport=pci|mmio]; repeatable.
    /// Guest RAM is then a shared memfd
    #[arg(long = "fs", value_name = "SHARE")]
    fs: Vec<FsConfig>,

    /// Back guest RAM with a shared memfd even without --fs (what vhost-user backends map;
    /// QEMU's memory-backend-memfd,share=on, Cloud Hypervisor's --memory shared=on)
    #[arg(long)]
    memory_shared: bool,
}

impl From<RunArgs> for VmConfig {
    fn from(a: RunArgs) -> Self {
        VmConfig {
            kernel: a.kernel.unwrap_or_default(),
            initrd: a.initrd,
            cmdline: a.cmdline,
            vcpus: a.cpus,
            mem_mib: a.memory,
            serial: a.serial,
            disks: a.disks,
            nets: a.nets,
            console: a.console,
            serial2: a.serial2,
            metrics: a.metrics,
            seccomp: !a.no_seccomp,
            system_map: a.system_map,
            virtio_transport: a.virtio_transport,
            acpi: !a.no_acpi,
            allow_emulated_kvm: a.allow_emulated_kvm,
            api_sock: a.api_sock,
            fs: a.fs,
            memory_shared: a.memory_shared,
        }
    }
}

/// What `run` and `restore` start.
enum Launch {
    Boot(Box<VmConfig>),
    Restore(PathBuf, Option<PathBuf>),
    Incoming(ferrovm::migration::Address, ferrovm::vmm::IncomingOptions),
}

/// Prints an error and its causes on one line, each cause once.
fn print_error(err: &dyn std::error::Error) {
    let mut line = format!("ferrovm: error: {err}");
    let mut source = err.source();
    while let Some(cause) = source {
        // Some crates' messages already include their source's text: print it once.
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(&format!(": {text}"));
        }
        source = cause.source();
    }
    eprintln!("{line}");
}

/// Logs what the torn-down VMM left in this process beyond what it started with: a warning
/// naming each thread and fd, or one info line saying there is nothing (the load tests look
/// for it).
fn report_leftovers(at_start: &Leftovers) {
    let left = Leftovers::of_this_process().since(at_start);
    if left.is_empty() {
        log::info!("VMM torn down: no threads or file descriptors left behind");
    } else {
        log::warn!("VMM torn down, left behind: {left}");
    }
}

/// `ferrovm exec`: CMD's status, or the VM's failure.
fn exec(a: ExecArgs, at_start: &Leftovers) -> ExitCode {
    let opts = ferrovm::exec::ExecOptions {
        kernel: a.kernel,
        modules: a.modules,
        cpus: a.cpus,
        memory_mib: a.memory,
        disks: a.disks,
        nets: a.nets,
        rw: a.rw,
        timeout: a.timeout.map(std::time::Duration::from_secs),
        verbose: a.verbose,
        seccomp: !a.no_seccomp,
        virtio_transport: a.virtio_transport,
        command: a.command,
    };
    let result = ferrovm::exec::run(&opts);
    report_leftovers(at_start);
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        // Not CMD's status: the guest never ran it (virtme-ng's 255).
        Err(e) => {
            print_error(&e);
            ExitCode::from(ferrovm::exec::EXIT_GUEST_FAILED as u8)
        }
    }
}

fn main() -> ExitCode {
    // Before anything is opened: fds the parent let us inherit are not ours to close.
    let at_start = Leftovers::of_this_process();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
    terminal::install_panic_restore();

    let vm = match Cli::parse().command {
        Command::Run(args) => match args.incoming.as_deref().map(str::parse) {
            Some(Ok(addr)) => Launch::Incoming(
                addr,
                ferrovm::vmm::IncomingOptions {
                    api_sock: args.api_sock,
                    metrics: args.metrics,
                    seccomp: !args.no_seccomp,
                    allow_emulated_kvm: args.allow_emulated_kvm,
                },
            ),
            Some(Err(e)) => {
                eprintln!("ferrovm: error: invalid value for '--incoming <ADDR>': {e}");
                return ExitCode::from(2);
            }
            None => Launch::Boot(Box::new(VmConfig::from(args))),
        },
        Command::Migrate(m) => return migrate(m),
        Command::Exec(a) => return exec(a, &at_start),
        Command::Restore { snapshot, api_sock } => Launch::Restore(snapshot, api_sock),
        Command::Info(c) => return client("info", &c.api_sock, None),
        Command::Pause(c) => return client("pause", &c.api_sock, None),
        Command::Resume(c) => return client("resume", &c.api_sock, None),
        Command::Metrics(c) => return client("metrics", &c.api_sock, None),
        Command::PowerButton(c) => return client("power-button", &c.api_sock, None),
        Command::Shutdown(c) => return client("shutdown", &c.api_sock, None),
        Command::Snapshot { client: c, dir } => return client("snapshot", &c.api_sock, Some(&dir)),
        Command::Check { json } => {
            let report = ferrovm::check::Report::of_this_host();
            print!("{}", if json { report.json() } else { report.text() });
            return if report.missing_required() == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
    };
    log::info!("ferrovm {VERSION}");
    if !at_start.fds.is_empty() {
        log::debug!("Inherited from the parent: {at_start}");
    }
    let result = match vm {
        Launch::Boot(cfg) => Vmm::build(&cfg),
        Launch::Restore(dir, sock) => Vmm::restore(&dir, sock),
        Launch::Incoming(addr, local) => Vmm::incoming(&addr, local),
    }
    .and_then(Vmm::run);
    // The VMM is gone (run consumes it): every device thread should be joined and every
    // file, TAP, eventfd and KVM fd it opened closed by now.
    report_leftovers(&at_start);
    match result {
        Ok(Outcome {
            reason,
            crash_report,
        }) => {
            let code = reason.exit_code();
            if code != 0 {
                eprintln!("ferrovm: {reason}");
                // Indented lines under a "crash report:" (or "stop report:") line, after the
                // one-line reason.
                if let Some(report) = crash_report {
                    eprint!("{report}");
                }
            } else {
                log::info!("{reason}");
            }
            ExitCode::from(code as u8)
        }
        Err(e) => {
            print_error(&e);
            ExitCode::FAILURE
        }
    }
}
