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
}

/// Where the guest's serial port goes.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// Everything needed to build and boot one VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_mib: u64,
    pub serial: SerialBackend,
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
        }
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
