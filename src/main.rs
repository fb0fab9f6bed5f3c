//! The `ferrovm` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use ferrovm::config::{
    ConsoleConfig, DiskConfig, NetConfig, SerialBackend, VirtioTransport, DEFAULT_CMDLINE,
};
use ferrovm::{terminal, VmConfig, Vmm};

/// A micro-VMM on KVM: boots a Linux kernel with emulated and paravirtual devices.
#[derive(Parser)]
#[command(name = "ferrovm", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a Linux guest and run it until it powers off, reboots or crashes.
    ///
    /// Exit status: 0 when the guest powers off or reboots, 1 when it crashes (triple fault,
    /// KVM error) or the VM cannot be built, 128+N when stopped by signal N (SIGINT, SIGTERM,
    /// SIGHUP stop it cleanly), 2 for a bad command line, 159 (128+SIGSYS) when a VMM thread
    /// made a syscall its seccomp filter forbids (the VMM stops at once; see --no-seccomp).
    Run(RunArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Guest kernel: an uncompressed ELF vmlinux (booted through PVH when it has the PVH
    /// note, else the 64-bit boot protocol) or a bzImage (boot protocol 2.12+)
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,

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
}

impl From<RunArgs> for VmConfig {
    fn from(a: RunArgs) -> Self {
        VmConfig {
            kernel: a.kernel,
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
            virtio_transport: a.virtio_transport,
            acpi: !a.no_acpi,
        }
    }
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

/// Logs what the torn-down VMM left in this process: a warning naming each thread and fd,
/// or one info line saying there is nothing (the load tests look for it).
fn report_leftovers() {
    let left = ferrovm::leftovers::Leftovers::of_this_process();
    if left.is_empty() {
        log::info!("VMM torn down: no threads or file descriptors left behind");
    } else {
        log::warn!("VMM torn down, left behind: {left}");
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
    terminal::install_panic_restore();

    let Command::Run(args) = Cli::parse().command;
    let cfg = VmConfig::from(args);
    let result = Vmm::build(&cfg).and_then(Vmm::run);
    // The VMM is gone (run consumes it): every device thread should be joined and every
    // file, TAP, eventfd and KVM fd closed by now.
    report_leftovers();
    match result {
        Ok(reason) => {
            let code = reason.exit_code();
            if code != 0 {
                eprintln!("ferrovm: {reason}");
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
