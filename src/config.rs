//! The VM configuration and its validation: every user-facing value is checked here, once,
//! so the rest of the VMM can trust what it is given.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::arch::x86_64::layout::CMDLINE_MAX_SIZE;

/// Most vCPUs a guest can have: what the MP table and the APIC ids we hand out are sized for.
pub const MAX_VCPUS: u8 = 32;
/// Smallest guest memory we accept; a Linux kernel cannot do anything useful with less.
pub const MIN_MEM_MIB: u64 = 16;
/// Largest guest memory we accept regardless of the host (1 TiB).
pub const MAX_MEM_MIB: u64 = 1 << 20;
/// The guest command line used when the user gives none. `reboot=k` makes a guest reboot
/// reach the i8042 (which ends the VMM) and `panic=-1` turns a guest panic into a reboot.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// Errors in the configuration given by the user.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Failed to open the {what} {path}")]
    OpenFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("The {what} {path} is not a regular file")]
    NotAFile { what: &'static str, path: PathBuf },
    #[error("The {what} {path} is empty")]
    EmptyFile { what: &'static str, path: PathBuf },
    #[error("--cpus {0} is out of range: ferrovm supports 1 to {MAX_VCPUS} vCPUs")]
    VcpuCount(u8),
    #[error("--memory {0} MiB is out of range: give between {MIN_MEM_MIB} and {MAX_MEM_MIB} MiB")]
    MemorySize(u64),
    #[error(
        "--memory {requested} MiB is more than this host has ({host} MiB of RAM); \
         give a smaller --memory"
    )]
    MemoryExceedsHost { requested: u64, host: u64 },
    #[error("The kernel command line is {0} bytes long; Linux accepts at most {max} bytes", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    #[error("The kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("{1} {0} given; ferrovm supports at most {MAX_DEVICES_PER_KIND}")]
    TooMany(&'static str, usize),
    #[error("{0} IDE disks given; the two IDE channels take at most {MAX_IDE_DISKS}")]
    TooManyIde(usize),
    #[error("The TAP device {0} is given to two NICs")]
    DuplicateTap(String),
    #[error("The virtio-fs tag '{0}' is given to two shares")]
    DuplicateFsTag(String),
    #[error("The directory {path} of virtio-fs '{tag}' does not exist or is not a directory")]
    FsDir { tag: String, path: PathBuf },
}

/// Where the guest's serial port goes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SerialBackend {
    /// The VMM's stdin/stdout; the terminal goes to raw mode while the guest runs.
    Stdio,
    /// Output appended to a file (created or truncated); no input.
    File(PathBuf),
    /// The port exists but output is dropped.
    None,
}

impl FromStr for SerialBackend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdio" => Ok(Self::Stdio),
            "none" => Ok(Self::None),
            _ => match s.strip_prefix("file=") {
                Some("") => Err("file= needs a path, e.g. file=/tmp/serial.log".into()),
                Some(path) => Ok(Self::File(PathBuf::from(path))),
                None => Err(format!(
                    "unknown serial backend '{s}': expected stdio, file=PATH or none"
                )),
            },
        }
    }
}

impl fmt::Display for SerialBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stdio => write!(f, "stdio"),
            Self::File(p) => write!(f, "file={}", p.display()),
            Self::None => write!(f, "none"),
        }
    }
}

/// Most disks and NICs one VM can have (each takes a virtio-mmio slot and an IRQ).
pub const MAX_DEVICES_PER_KIND: usize = 8;
/// Most IDE disks: master and slave on each of two channels.
pub const MAX_IDE_DISKS: usize = 4;

/// Which device model serves a device class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum DeviceModel {
    /// Paravirtual: virtio over virtio-mmio.
    #[default]
    Virtio,
    /// Emulated: an ATA disk on a PIIX IDE controller, bus-master DMA (what `ata_piix`
    /// picks when the drive offers it).
    Ide,
    /// Emulated: the same ATA disk offering PIO only (IDENTIFY without DMA modes).
    IdePio,
    /// Emulated: an NE2000-compatible PCI NIC (RTL8029, port I/O).
    Ne2k,
    /// Emulated: an Intel 82540EM PCI NIC (e1000: MMIO registers, descriptor rings in
    /// guest memory).
    E1000,
}

impl DeviceModel {
    /// Parses the model of a device of `class`, which accepts `allowed`.
    fn parse_for(s: &str, class: &str, allowed: &[DeviceModel]) -> Result<Self, String> {
        let model = match s {
            "virtio" => Some(Self::Virtio),
            "ide" => Some(Self::Ide),
            "ide-pio" => Some(Self::IdePio),
            "ne2k" => Some(Self::Ne2k),
            "e1000" => Some(Self::E1000),
            _ => None,
        };
        match model {
            Some(m) if allowed.contains(&m) => Ok(m),
            _ => {
                let names: Vec<&str> = allowed.iter().map(|m| m.name()).collect();
                let expected = match names.split_last() {
                    Some((last, rest)) if !rest.is_empty() => {
                        format!("{} or {last}", rest.join(", "))
                    }
                    _ => names.join(""),
                };
                Err(format!("unknown {class} model '{s}': expected {expected}"))
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Virtio => "virtio",
            Self::Ide => "ide",
            Self::IdePio => "ide-pio",
            Self::Ne2k => "ne2k",
            Self::E1000 => "e1000",
        }
    }

    /// Whether this is one of the emulated ATA disk models.
    pub fn is_ide(self) -> bool {
        matches!(self, Self::Ide | Self::IdePio)
    }
}

/// The transport that carries a virtio device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum VirtioTransport {
    /// virtio-pci (modern, MSI-X): what distribution and `defconfig` kernels find.
    #[default]
    Pci,
    /// virtio-mmio, described in the DSDT (and on the kernel command line without ACPI).
    Mmio,
}

impl FromStr for VirtioTransport {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pci" => Ok(Self::Pci),
            "mmio" => Ok(Self::Mmio),
            _ => Err(format!(
                "unknown virtio transport '{s}': expected pci or mmio"
            )),
        }
    }
}

impl VirtioTransport {
    pub fn name(self) -> &'static str {
        match self {
            Self::Pci => "pci",
            Self::Mmio => "mmio",
        }
    }
}

/// Parses a device's `transport=` option, which only virtio devices take.
fn parse_transport(
    value: &str,
    class: &str,
    model: DeviceModel,
) -> Result<VirtioTransport, String> {
    if model != DeviceModel::Virtio {
        return Err(format!(
            "transport= applies to virtio devices only, not to the {class} model '{}'",
            model.name()
        ));
    }
    value.parse()
}

/// Splits `a,b=c,d` into options; returns (key, value) pairs, with value None for flags.
fn parse_options(s: &str) -> Vec<(&str, Option<&str>)> {
    s.split(',')
        .filter(|o| !o.is_empty())
        .map(|o| match o.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (o, None),
        })
        .collect()
}

/// A disk image given with
/// `--disk PATH[,readonly][,model=virtio|ide|ide-pio][,transport=pci|mmio][,serial=ID]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub readonly: bool,
    pub model: DeviceModel,
    /// The virtio transport, when not the VM's default (`--virtio-transport`).
    pub transport: Option<VirtioTransport>,
    /// The id the guest reads back (VIRTIO_BLK_T_GET_ID); the file name when not given.
    pub serial: Option<String>,
}

/// Longest device id virtio-blk can report (VIRTIO_BLK_ID_BYTES).
pub const DISK_SERIAL_MAX: usize = 20;

impl FromStr for DiskConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut path = None;
        let mut cfg = DiskConfig {
            path: PathBuf::new(),
            readonly: false,
            model: DeviceModel::Virtio,
            transport: None,
            serial: None,
        };
        let mut transport = None;
        for (key, value) in parse_options(s) {
            match (key, value) {
                ("readonly" | "ro", None) => cfg.readonly = true,
                ("model", Some(m)) => {
                    cfg.model = DeviceModel::parse_for(
                        m,
                        "disk",
                        &[DeviceModel::Virtio, DeviceModel::Ide, DeviceModel::IdePio],
                    )?
                }
                ("serial", Some(id)) => {
                    if id.len() > DISK_SERIAL_MAX || !id.is_ascii() {
                        return Err(format!(
                            "serial '{id}' must be at most {DISK_SERIAL_MAX} ASCII characters"
                        ));
                    }
                    cfg.serial = Some(id.to_string());
                }
                ("transport", Some(t)) => transport = Some(t),
                ("path", Some(p)) => path = Some(p),
                (p, None) if path.is_none() => path = Some(p),
                (k, _) => {
                    return Err(format!(
                        "unknown disk option '{k}': expected PATH[,readonly][,model=virtio|ide|ide-pio][,transport=pci|mmio][,serial=ID]"
                    ))
                }
            }
        }
        if let Some(t) = transport {
            cfg.transport = Some(parse_transport(t, "disk", cfg.model)?);
        }
        match path {
            Some(p) if !p.is_empty() => cfg.path = PathBuf::from(p),
            _ => return Err("a disk needs a path: --disk PATH[,readonly]".into()),
        }
        Ok(cfg)
    }
}

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad =
            || format!("bad MAC address '{s}': expected six hex bytes like 02:00:00:00:00:01");
        let bytes: Vec<u8> = s
            .split(':')
            .map(|b| {
                if b.len() == 2 {
                    u8::from_str_radix(b, 16).ok()
                } else {
                    None
                }
            })
            .collect::<Option<_>>()
            .ok_or_else(bad)?;
        let mac: [u8; 6] = bytes.try_into().map_err(|_| bad())?;
        if mac[0] & 1 != 0 {
            return Err(format!("MAC address '{s}' is a multicast address; a NIC needs a unicast one (first byte even)"));
        }
        Ok(MacAddr(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Which host TAP device a NIC uses.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TapConfig {
    /// An existing TAP device (or one the VMM may create) with this name.
    Named(String),
    /// A new TAP device named by the kernel (`fvmtapN`), removed when the VMM exits.
    Auto,
}

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

/// A NIC given with `--net tap=NAME[,mac=MAC][,model=virtio|ne2k|e1000][,transport=pci|mmio]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    pub tap: TapConfig,
    pub mac: Option<MacAddr>,
    pub model: DeviceModel,
    /// The virtio transport, when not the VM's default.
    pub transport: Option<VirtioTransport>,
}

impl FromStr for NetConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut tap = None;
        let mut mac = None;
        let mut model = DeviceModel::Virtio;
        let mut transport = None;
        for (key, value) in parse_options(s) {
            match (key, value) {
                ("tap", Some("auto")) => tap = Some(TapConfig::Auto),
                ("tap", Some(name)) => {
                    if name.is_empty()
                        || name.len() > IFNAME_MAX
                        || name.contains('/')
                        || name.contains(char::is_whitespace)
                    {
                        return Err(format!(
                            "bad TAP name '{name}': 1 to {IFNAME_MAX} characters, no '/' or spaces"
                        ));
                    }
                    tap = Some(TapConfig::Named(name.to_string()));
                }
                ("mac", Some(m)) => mac = Some(m.parse()?),
                ("model", Some(m)) => {
                    model = DeviceModel::parse_for(
                        m,
                        "NIC",
                        &[DeviceModel::Virtio, DeviceModel::Ne2k, DeviceModel::E1000],
                    )?
                }
                ("transport", Some(t)) => transport = Some(t),
                (k, _) => {
                    return Err(format!(
                        "unknown net option '{k}': expected tap=NAME|auto[,mac=MAC][,model=virtio|ne2k|e1000][,transport=pci|mmio]"
                    ))
                }
            }
        }
        let tap = tap.ok_or("a NIC needs a host TAP device: --net tap=NAME or tap=auto")?;
        let transport = transport
            .map(|t| parse_transport(t, "NIC", model))
            .transpose()?;
        Ok(NetConfig {
            tap,
            mac,
            model,
            transport,
        })
    }
}

/// The paravirtual console given with
/// `--console virtio[,file=PATH|,stdio|,none][,transport=pci|mmio]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConsoleConfig {
    pub model: DeviceModel,
    pub backend: SerialBackend,
    /// The virtio transport, when not the VM's default.
    pub transport: Option<VirtioTransport>,
}

impl FromStr for ConsoleConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut model = None;
        let mut backend = SerialBackend::Stdio;
        let mut transport = None;
        for (key, value) in parse_options(s) {
            match (key, value) {
                ("virtio", None) => model = Some(DeviceModel::Virtio),
                ("model", Some(m)) => {
                    model = Some(DeviceModel::parse_for(
                        m,
                        "console",
                        &[DeviceModel::Virtio],
                    )?)
                }
                ("stdio", None) => backend = SerialBackend::Stdio,
                ("none", None) => backend = SerialBackend::None,
                ("file", Some(p)) if !p.is_empty() => backend = SerialBackend::File(p.into()),
                ("transport", Some(t)) => transport = Some(t.parse()?),
                (k, _) => {
                    return Err(format!(
                        "unknown console option '{k}': expected virtio[,stdio|,file=PATH|,none][,transport=pci|mmio]"
                    ))
                }
            }
        }
        let model = model.ok_or("the console needs a model: --console virtio[,file=PATH]")?;
        Ok(ConsoleConfig {
            model,
            backend,
            transport,
        })
    }
}

/// Where a virtio-fs share comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FsSource {
    /// A host directory, served by a virtiofsd the VMM starts (`path=DIR`).
    Dir { path: PathBuf, readonly: bool },
    /// The vhost-user socket of a virtiofsd the user runs (`socket=PATH`).
    Socket(PathBuf),
}

/// A virtio-fs share given with `--fs tag=T,path=DIR[,readonly][,transport=pci|mmio]` or
/// `--fs tag=T,socket=PATH[,transport=pci|mmio]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FsConfig {
    /// What the guest mounts: `mount -t virtiofs TAG /mnt`.
    pub tag: String,
    pub source: FsSource,
    /// The virtio transport, when not the VM's default.
    pub transport: Option<VirtioTransport>,
}

/// Longest virtio-fs tag (the configuration space's `tag[36]`).
pub const FS_TAG_MAX: usize = 36;

impl FromStr for FsConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const USAGE: &str = "expected tag=TAG,path=DIR[,readonly] or tag=TAG,socket=PATH, \
             [,transport=pci|mmio]";
        let (mut tag, mut path, mut socket, mut readonly, mut transport) =
            (None, None, None, false, None);
        for (key, value) in parse_options(s) {
            match (key, value) {
                ("tag", Some(t)) => tag = Some(t),
                ("path", Some(p)) if !p.is_empty() => path = Some(PathBuf::from(p)),
                ("socket", Some(p)) if !p.is_empty() => socket = Some(PathBuf::from(p)),
                ("readonly" | "ro", None) => readonly = true,
                ("transport", Some(t)) => transport = Some(t.parse()?),
                (k, _) => return Err(format!("unknown fs option '{k}': {USAGE}")),
            }
        }
        let tag = tag.ok_or_else(|| format!("a virtio-fs share needs a tag: {USAGE}"))?;
        if tag.is_empty() || tag.len() > FS_TAG_MAX {
            return Err(format!(
                "virtio-fs tag '{tag}' must be 1 to {FS_TAG_MAX} bytes"
            ));
        }
        let source = match (path, socket) {
            (Some(path), None) => FsSource::Dir { path, readonly },
            (None, Some(_)) if readonly => {
                return Err(
                    "readonly applies to path=DIR: a virtiofsd the user runs decides \
                     itself (e.g. its --readonly)"
                        .into(),
                )
            }
            (None, Some(sock)) => FsSource::Socket(sock),
            _ => {
                return Err(format!(
                    "a virtio-fs share needs one of path= or socket=: {USAGE}"
                ))
            }
        };
        Ok(FsConfig {
            tag: tag.into(),
            source,
            transport,
        })
    }
}

/// Everything needed to build and boot one VM.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_mib: u64,
    pub serial: SerialBackend,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub console: Option<ConsoleConfig>,
    /// The second UART (COM2, ttyS1), the emulated data channel.
    pub serial2: Option<SerialBackend>,
    /// Where the device counters are written as JSON (at exit and on SIGUSR1).
    pub metrics: Option<PathBuf>,
    /// Whether each VMM thread runs under its seccomp allow-list (off: `--no-seccomp`).
    pub seccomp: bool,
    /// The kernel's System.map, for the crash report's symbols (else the ELF kernel's
    /// `.symtab`, or a System.map found beside the kernel).
    pub system_map: Option<PathBuf>,
    /// The transport of virtio devices that do not name one (`--virtio-transport`).
    pub virtio_transport: VirtioTransport,
    /// Whether the guest gets ACPI tables (off: `--no-acpi`, MP table only).
    pub acpi: bool,
    /// Go on when /dev/kvm has no hardware virtualization under it (`--allow-emulated-kvm`).
    pub allow_emulated_kvm: bool,
    /// The control socket (`--api-sock`).
    #[serde(default)]
    pub api_sock: Option<PathBuf>,
    /// virtio-fs shares (`--fs`).
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    /// Guest RAM in a shared memfd even without a virtio-fs device (`--memory-shared`).
    #[serde(default)]
    pub memory_shared: bool,
}

impl VmConfig {
    /// A configuration with the documented defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            vcpus: 1,
            mem_mib: 256,
            serial: SerialBackend::Stdio,
            disks: Vec::new(),
            nets: Vec::new(),
            console: None,
            serial2: None,
            metrics: None,
            seccomp: true,
            system_map: None,
            virtio_transport: VirtioTransport::Pci,
            acpi: true,
            allow_emulated_kvm: false,
            api_sock: None,
            fs: Vec::new(),
            memory_shared: false,
        }
    }

    /// Whether the guest will read ACPI tables: they are built, and the command line does
    /// not turn ACPI off.
    pub fn guest_uses_acpi(&self) -> bool {
        self.acpi && !cmdline_disables_acpi(&self.cmdline)
    }

    /// Whether guest RAM must be a shared memfd: a vhost-user backend maps it.
    pub fn needs_shared_memory(&self) -> bool {
        self.memory_shared || !self.fs.is_empty()
    }

    /// Guest memory in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib << 20
    }

    /// Checks every value, so that a bad one is reported before KVM is touched.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_input_file("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            check_input_file("initrd", initrd)?;
        }
        self.validate_machine()
    }

    /// Everything but the kernel and initrd files (a restored VM needs neither).
    pub fn validate_machine(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::VcpuCount(self.vcpus));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(ConfigError::MemorySize(self.mem_mib));
        }
        if let Some(host) = host_mem_mib() {
            if self.mem_mib > host {
                return Err(ConfigError::MemoryExceedsHost {
                    requested: self.mem_mib,
                    host,
                });
            }
        }
        if self.disks.len() > MAX_DEVICES_PER_KIND {
            return Err(ConfigError::TooMany("disks", self.disks.len()));
        }
        if self.nets.len() > MAX_DEVICES_PER_KIND {
            return Err(ConfigError::TooMany("NICs", self.nets.len()));
        }
        let ide = self.disks.iter().filter(|d| d.model.is_ide()).count();
        if ide > MAX_IDE_DISKS {
            return Err(ConfigError::TooManyIde(ide));
        }
        for disk in &self.disks {
            let meta = std::fs::metadata(&disk.path).map_err(|source| ConfigError::OpenFile {
                what: "disk image",
                path: disk.path.clone(),
                source,
            })?;
            if !meta.is_file()
                && !std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type())
            {
                return Err(ConfigError::NotAFile {
                    what: "disk image",
                    path: disk.path.clone(),
                });
            }
        }
        if self.fs.len() > MAX_DEVICES_PER_KIND {
            return Err(ConfigError::TooMany("virtio-fs shares", self.fs.len()));
        }
        let mut tags = std::collections::HashSet::new();
        for fs in &self.fs {
            if !tags.insert(&fs.tag) {
                return Err(ConfigError::DuplicateFsTag(fs.tag.clone()));
            }
            if let FsSource::Dir { path, .. } = &fs.source {
                if !path.is_dir() {
                    return Err(ConfigError::FsDir {
                        tag: fs.tag.clone(),
                        path: path.clone(),
                    });
                }
            }
        }
        let mut taps = std::collections::HashSet::new();
        for net in &self.nets {
            if let TapConfig::Named(name) = &net.tap {
                if !taps.insert(name) {
                    return Err(ConfigError::DuplicateTap(name.clone()));
                }
            }
        }
        if self.cmdline.contains('\0') {
            return Err(ConfigError::CmdlineNul);
        }
        // The VMM appends its own device parameters later; this catches a user line that
        // cannot fit at all, the final length is checked again when it is built.
        if self.cmdline.len() >= CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong(self.cmdline.len()));
        }
        Ok(())
    }
}

fn check_input_file(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    let file = File::open(path).map_err(|source| ConfigError::OpenFile {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let meta = file.metadata().map_err(|source| ConfigError::OpenFile {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(ConfigError::NotAFile {
            what,
            path: path.to_path_buf(),
        });
    }
    if meta.len() == 0 {
        return Err(ConfigError::EmptyFile {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Whether a kernel command line has `acpi=off` among its kernel parameters (before any
/// ` -- `, which starts init's arguments).
pub fn cmdline_disables_acpi(cmdline: &str) -> bool {
    cmdline
        .split_whitespace()
        .take_while(|w| *w != "--")
        .any(|w| w == "acpi=off")
}

/// The host's RAM in MiB, from /proc/meminfo; `None` if it cannot be read.
fn host_mem_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_memtotal_mib(&meminfo)
}

fn parse_memtotal_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vmm_sys_util::tempfile::TempFile;

    fn file_with(content: &[u8]) -> TempFile {
        let f = TempFile::new().unwrap();
        f.as_file().write_all(content).unwrap();
        f
    }

    fn kernel_file() -> (TempFile, VmConfig) {
        let f = file_with(b"not empty");
        let cfg = VmConfig::new(f.as_path());
        (f, cfg)
    }

    #[test]
    fn serial_backend_parses_all_forms() {
        assert_eq!("stdio".parse(), Ok(SerialBackend::Stdio));
        assert_eq!("none".parse(), Ok(SerialBackend::None));
        assert_eq!(
            "file=/tmp/x".parse(),
            Ok(SerialBackend::File("/tmp/x".into()))
        );
        let err = "file=".parse::<SerialBackend>().unwrap_err();
        assert!(err.contains("needs a path"), "{err}");
        let err = "tcp:1234".parse::<SerialBackend>().unwrap_err();
        assert!(err.contains("unknown serial backend 'tcp:1234'"), "{err}");
    }

    #[test]
    fn disk_options_parse() {
        let d: DiskConfig = "/tmp/a.img".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/tmp/a.img"));
        assert!(!d.readonly);
        assert_eq!(d.model, DeviceModel::Virtio);
        let d: DiskConfig = "/tmp/a.img,readonly,model=virtio,serial=disk-7"
            .parse()
            .unwrap();
        assert!(d.readonly);
        assert_eq!(d.serial.as_deref(), Some("disk-7"));
        let d: DiskConfig = "path=/x,ro".parse().unwrap();
        assert_eq!((d.path, d.readonly), (PathBuf::from("/x"), true));
        assert!(""
            .parse::<DiskConfig>()
            .unwrap_err()
            .contains("needs a path"));
        assert!("/a,model=scsi"
            .parse::<DiskConfig>()
            .unwrap_err()
            .contains("unknown disk model 'scsi': expected virtio, ide or ide-pio"));
        let d: DiskConfig = "/a,model=ide".parse().unwrap();
        assert_eq!(d.model, DeviceModel::Ide);
        let d: DiskConfig = "/a,model=ide-pio".parse().unwrap();
        assert_eq!(d.model, DeviceModel::IdePio);
        assert!(d.model.is_ide());
        assert!("/a,model=e1000"
            .parse::<DiskConfig>()
            .unwrap_err()
            .contains("unknown disk model 'e1000'"));
        assert!("/a,model=ne2k"
            .parse::<DiskConfig>()
            .unwrap_err()
            .contains("unknown disk model 'ne2k'"));
        assert!("/a,cache=none"
            .parse::<DiskConfig>()
            .unwrap_err()
            .contains("unknown disk option 'cache'"));
        let long = format!("/a,serial={}", "x".repeat(21));
        assert!(long
            .parse::<DiskConfig>()
            .unwrap_err()
            .contains("at most 20"));
    }

    #[test]
    fn net_options_parse() {
        let n: NetConfig = "tap=tap0,mac=02:00:00:00:00:01".parse().unwrap();
        assert_eq!(n.tap, TapConfig::Named("tap0".into()));
        assert_eq!(n.mac, Some(MacAddr([2, 0, 0, 0, 0, 1])));
        assert_eq!(n.mac.unwrap().to_string(), "02:00:00:00:00:01");
        let n: NetConfig = "tap=auto".parse().unwrap();
        assert_eq!(n.tap, TapConfig::Auto);
        let n: NetConfig = "tap=t,model=e1000".parse().unwrap();
        assert_eq!(n.model, DeviceModel::E1000);
        assert!("tap=t,model=rtl8139"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("unknown NIC model 'rtl8139': expected virtio, ne2k or e1000"));
        assert!("tap=t,model=ide-pio"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("unknown NIC model"));
        assert!("mac=02:00:00:00:00:01"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("needs a host TAP"));
        assert!("tap=a-very-long-interface-name"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("bad TAP name"));
        assert!("tap=t,mac=01:00:00:00:00:01"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("multicast"));
        assert!("tap=t,mac=02:00:00:00:00"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("bad MAC"));
        assert!("tap=t,mac=02:00:00:00:00:zz"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("bad MAC"));
    }

    #[test]
    fn transports_parse_per_device_and_only_for_virtio() {
        let d: DiskConfig = "/a,transport=mmio".parse().unwrap();
        assert_eq!(d.transport, Some(VirtioTransport::Mmio));
        let d: DiskConfig = "/a".parse().unwrap();
        assert_eq!(d.transport, None);
        let err = "/a,model=ide,transport=pci"
            .parse::<DiskConfig>()
            .unwrap_err();
        assert!(err.contains("virtio devices only"), "{err}");
        let err = "/a,transport=isa".parse::<DiskConfig>().unwrap_err();
        assert!(err.contains("unknown virtio transport 'isa'"), "{err}");
        let n: NetConfig = "tap=t,transport=pci".parse().unwrap();
        assert_eq!(n.transport, Some(VirtioTransport::Pci));
        assert!("tap=t,model=ne2k,transport=mmio"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("virtio devices only"));
        let c: ConsoleConfig = "virtio,transport=mmio,file=/x".parse().unwrap();
        assert_eq!(c.transport, Some(VirtioTransport::Mmio));
        assert_eq!("pci".parse(), Ok(VirtioTransport::Pci));
    }

    #[test]
    fn acpi_off_on_the_command_line_is_seen_before_init_arguments() {
        assert!(cmdline_disables_acpi("console=ttyS0 acpi=off quiet"));
        assert!(!cmdline_disables_acpi("console=ttyS0 -- echo acpi=off"));
        assert!(!cmdline_disables_acpi("acpi=force"));
        let (_f, mut cfg) = kernel_file();
        assert!(cfg.guest_uses_acpi());
        cfg.cmdline = "console=ttyS0 acpi=off".into();
        assert!(!cfg.guest_uses_acpi());
        cfg.cmdline = DEFAULT_CMDLINE.into();
        cfg.acpi = false;
        assert!(!cfg.guest_uses_acpi());
    }

    #[test]
    fn console_options_parse() {
        let c: ConsoleConfig = "virtio".parse().unwrap();
        assert_eq!(c.backend, SerialBackend::Stdio);
        let c: ConsoleConfig = "virtio,file=/tmp/hvc.log".parse().unwrap();
        assert_eq!(c.backend, SerialBackend::File("/tmp/hvc.log".into()));
        assert!("file=/x"
            .parse::<ConsoleConfig>()
            .unwrap_err()
            .contains("needs a model"));
        assert!("virtio,tcp"
            .parse::<ConsoleConfig>()
            .unwrap_err()
            .contains("unknown console option 'tcp'"));
    }

    #[test]
    fn rejects_missing_disks_and_shared_taps() {
        let (_f, mut cfg) = kernel_file();
        cfg.disks.push("/nonexistent/disk.img".parse().unwrap());
        let err = cfg.validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "Failed to open the disk image /nonexistent/disk.img"
        );
        cfg.disks.clear();
        cfg.nets.push("tap=t0".parse().unwrap());
        cfg.nets.push("tap=t0".parse().unwrap());
        assert!(matches!(cfg.validate(), Err(ConfigError::DuplicateTap(_))));
    }

    #[test]
    fn defaults_are_valid() {
        let (_f, cfg) = kernel_file();
        assert_eq!(cfg.vcpus, 1);
        assert_eq!(cfg.mem_mib, 256);
        assert_eq!(cfg.serial, SerialBackend::Stdio);
        assert!(cfg.cmdline.contains("console=ttyS0"));
        cfg.validate().unwrap();
    }

    #[test]
    fn rejects_bad_vcpu_counts() {
        let (_f, mut cfg) = kernel_file();
        for n in [0, MAX_VCPUS + 1, 255] {
            cfg.vcpus = n;
            let err = cfg.validate().unwrap_err();
            assert!(matches!(err, ConfigError::VcpuCount(v) if v == n));
            assert!(err.to_string().contains("1 to 32"));
        }
        cfg.vcpus = MAX_VCPUS;
        cfg.validate().unwrap();
    }

    #[test]
    fn rejects_bad_memory_sizes() {
        let (_f, mut cfg) = kernel_file();
        cfg.mem_mib = MIN_MEM_MIB - 1;
        assert!(matches!(cfg.validate(), Err(ConfigError::MemorySize(_))));
        cfg.mem_mib = MAX_MEM_MIB + 1;
        assert!(matches!(cfg.validate(), Err(ConfigError::MemorySize(_))));
    }

    #[test]
    fn rejects_memory_beyond_host() {
        let host = host_mem_mib().expect("/proc/meminfo has MemTotal");
        let (_f, mut cfg) = kernel_file();
        cfg.mem_mib = host + 1;
        let err = cfg.validate().unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::MemoryExceedsHost { .. } | ConfigError::MemorySize(_)
            ),
            "{err}"
        );
    }

    #[test]
    fn parses_memtotal() {
        let text = "MemTotal:       24576000 kB\nMemFree: 1 kB\n";
        assert_eq!(parse_memtotal_mib(text), Some(24000));
        assert_eq!(parse_memtotal_mib("garbage"), None);
    }

    #[test]
    fn rejects_missing_empty_and_directory_kernels() {
        let mut cfg = VmConfig::new("/nonexistent/vmlinux");
        let err = cfg.validate().unwrap_err();
        assert!(matches!(err, ConfigError::OpenFile { .. }));
        assert_eq!(
            err.to_string(),
            "Failed to open the kernel /nonexistent/vmlinux"
        );

        cfg.kernel = std::env::temp_dir();
        assert!(matches!(cfg.validate(), Err(ConfigError::NotAFile { .. })));

        let empty = file_with(b"");
        cfg.kernel = empty.as_path().to_path_buf();
        assert!(matches!(cfg.validate(), Err(ConfigError::EmptyFile { .. })));
    }

    #[test]
    fn rejects_missing_initrd() {
        let (_f, mut cfg) = kernel_file();
        cfg.initrd = Some("/nonexistent/initrd".into());
        let err = cfg.validate().unwrap_err();
        assert!(err.to_string().contains("initrd /nonexistent/initrd"));
    }

    #[test]
    fn rejects_oversized_and_nul_cmdlines() {
        let (_f, mut cfg) = kernel_file();
        cfg.cmdline = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::CmdlineTooLong(_))
        ));
        cfg.cmdline = "a\0b".into();
        assert!(matches!(cfg.validate(), Err(ConfigError::CmdlineNul)));
        cfg.cmdline = "y".repeat(CMDLINE_MAX_SIZE - 1);
        cfg.validate().unwrap();
    }
}
