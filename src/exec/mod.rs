//! `ferrovm exec --kernel K [options] -- CMD ARGS...`: boots K with the host's `/` as a
//! read-only virtio-fs root, runs CMD in the caller's directory and environment, and ends
//! with CMD's exit status.
//!
//! The guest side is a busybox script (`init.sh`, PID 1) in an initramfs built here at run
//! time: busybox-static from the host (the project already depends on it; a script needs no
//! cross-built binary and is short enough to read whole), the script, and, for a modular
//! kernel, the modules exec needs, taken from the kernel's module tree. That part is cached
//! in `~/.cache/ferrovm/exec/`, keyed by a hash of its contents; a second archive with this
//! run's command, environment and mounts is appended each time (the kernel unpacks
//! concatenated archives in order).
//!
//! The channels are the named ports of a multiport virtio-console (`devices::virtio::ports`,
//! what virtme-ng gets from QEMU's virtserialport): `stdin`, `stdout`, `stderr` and
//! `status`. Ports are not terminals, so bytes pass untouched in both directions with no
//! raw mode to set up, and the device can close a port's host side, which the guest reads
//! as end-of-file: that is how the end of stdin reaches CMD. (hvc consoles have no
//! end-of-file in raw mode; vsock would need a vsock device and a guest-side relay.)
//!
//! Exit status: CMD's; 128+N when a signal N killed it; 255 with a one-line reason when
//! the guest panicked or never ran CMD (virtme-ng's convention); 124 after `--timeout`
//! (timeout(1)'s).

mod cpio;
pub mod kernel;

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{
    DiskConfig, FsConfig, FsSource, NetConfig, SerialBackend, VirtioTransport, VmConfig,
};
use crate::devices::host_input::stdin_input;
use crate::devices::virtio::ports::{PortConfig, PortsError, VirtioPorts};
use crate::vmm::{ExitReason, VmExtras, Vmm, VmmError};

use cpio::Cpio;
use kernel::{KernelError, ModuleTree};

/// ferrovm's status when the guest panicked or never ran CMD.
pub const EXIT_GUEST_FAILED: i32 = 255;
/// ferrovm's status when `--timeout` ran out (timeout(1)'s).
pub const EXIT_TIMEOUT: i32 = 124;
/// Where busybox-static puts its binary on Debian.
const BUSYBOX: &str = "/bin/busybox";
/// The guest init.
const INIT_SH: &str = include_str!("init.sh");

/// Environment variables that make no sense in the guest: the host's display, session bus,
/// agents and terminal multiplexers, and its per-login runtime directory (a tmpfs in the
/// guest). Names ending in `*` are prefixes. TERM, PATH, HOME, LANG and the rest are kept.
pub const DROPPED_ENV: &[&str] = &[
    "DISPLAY",
    "WAYLAND_DISPLAY",
    "XAUTHORITY",
    "XDG_RUNTIME_DIR",
    "XDG_SESSION_*",
    "DBUS_*",
    "SSH_*",
    "GPG_AGENT_INFO",
    "SESSION_MANAGER",
    "WINDOWID",
    "TMUX",
    "TMUX_PANE",
    "STY",
    "OLDPWD",
    "_",
];

/// Errors of `ferrovm exec`.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("Failed to find a kernel: give --kernel, build the project's (scripts/build-guest), or make /boot/vmlinuz-{0} readable")]
    NoKernel(String),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(
        "Failed to read {BUSYBOX}, which the guest init runs on (apt-get install busybox-static)"
    )]
    Busybox(#[source] std::io::Error),
    #[error("Failed to read the kernel module {0}")]
    Module(PathBuf, #[source] std::io::Error),
    #[error("Failed to write the initramfs {0}")]
    Initramfs(PathBuf, #[source] std::io::Error),
    #[error("Failed to find the current directory")]
    Cwd(#[source] std::io::Error),
    #[error("--rw {0}: not a directory")]
    RwDir(PathBuf),
    #[error("No command given: ferrovm exec [options] -- CMD ARGS...")]
    NoCommand,
    #[error(transparent)]
    Ports(#[from] PortsError),
    #[error("Failed to connect stdin to the guest")]
    Stdin(#[source] std::io::Error),
    #[error(transparent)]
    Vmm(#[from] VmmError),
}

/// What `ferrovm exec` was asked.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    pub kernel: Option<PathBuf>,
    pub modules: Option<PathBuf>,
    pub cpus: u8,
    pub memory_mib: u64,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub rw: Vec<PathBuf>,
    pub timeout: Option<Duration>,
    pub verbose: bool,
    pub seccomp: bool,
    pub virtio_transport: VirtioTransport,
    pub command: Vec<OsString>,
}

/// Runs CMD in a guest; returns ferrovm's exit status (the reason lines for 255 and 124
/// are printed here).
pub fn run(opts: &ExecOptions) -> Result<i32, ExecError> {
    if opts.command.is_empty() {
        return Err(ExecError::NoCommand);
    }
    let kernel = match &opts.kernel {
        Some(k) => k.clone(),
        None => default_kernel()?,
    };
    let release = kernel::release(&kernel)?;
    let config = kernel::find_config(&kernel, release.as_deref())
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|t| kernel::parse_config(&t));
    let tree = module_dir(opts, &kernel, release.as_deref()).and_then(|d| ModuleTree::open(&d));
    let modules = kernel::required_modules(&kernel, config.as_ref(), tree.as_ref())?;
    let base = base_initramfs(tree.as_ref(), &modules)?;

    let cwd = std::env::current_dir().map_err(ExecError::Cwd)?;
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let plan = MountPlan::new(&cwd, home.as_deref(), &opts.rw)?;
    let env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    let run_conf = run_conf(&plan, &cwd, &guest_env(&env, &cwd), &opts.command);
    let mut run = Cpio::new();
    run.dir("/exec", 0o755);
    run.file("/exec/run.conf", 0o644, &run_conf);
    let initrd = std::env::temp_dir().join(format!("ferrovm-exec-{}.cpio", std::process::id()));
    let mut image = base;
    image.extend_from_slice(&run.finish());
    std::fs::write(&initrd, &image).map_err(|e| ExecError::Initramfs(initrd.clone(), e))?;

    let mut cfg = VmConfig::new(&kernel);
    cfg.initrd = Some(initrd.clone());
    cfg.cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 rdinit=/init{}",
        if opts.verbose { "" } else { " quiet" }
    );
    cfg.vcpus = opts.cpus;
    cfg.mem_mib = opts.memory_mib;
    cfg.serial = SerialBackend::None;
    cfg.disks = opts.disks.clone();
    cfg.nets = opts.nets.clone();
    cfg.seccomp = opts.seccomp;
    cfg.virtio_transport = opts.virtio_transport;
    cfg.fs = plan.shares();

    let status = Arc::new(Mutex::new(Vec::new()));
    let console = ConsoleScan::new(opts.verbose);
    let console_lines = console.lines.clone();
    let ports = VirtioPorts::new(vec![
        PortConfig {
            name: "stdin".into(),
            output: None,
            input: Some(stdin_input().map_err(ExecError::Stdin)?),
        },
        PortConfig {
            name: "stdout".into(),
            output: Some(Box::new(std::io::stdout())),
            input: None,
        },
        PortConfig {
            name: "stderr".into(),
            output: Some(Box::new(std::io::stderr())),
            input: None,
        },
        PortConfig {
            name: "status".into(),
            output: Some(Box::new(SharedBuf(status.clone()))),
            input: None,
        },
    ])?;
    let extras = VmExtras {
        serial_out: Some(Box::new(console)),
        ports: Some(ports),
        timeout: opts.timeout,
    };
    let vmm = Vmm::build_with(&cfg, extras);
    // The kernel and initramfs are in guest memory now (or the build failed).
    let _ = std::fs::remove_file(&initrd);
    let reason = vmm?.run()?.reason;
    let status =
        String::from_utf8_lossy(&status.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    let console = console_lines
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let (code, why) = outcome(&reason, &status, &console, opts.timeout);
    if let Some(why) = why {
        eprintln!("ferrovm: exec: {why}");
    }
    Ok(code)
}

/// ferrovm's status and, when not CMD's own, the reason line.
fn outcome(
    reason: &ExitReason,
    status: &str,
    console: &[String],
    timeout: Option<Duration>,
) -> (i32, Option<String>) {
    let mut started = false;
    for line in status.lines() {
        if let Some(n) = line.strip_prefix("exit ") {
            if let Ok(n) = n.trim().parse::<i32>() {
                return (n, None);
            }
        }
        if let Some(msg) = line.strip_prefix("error ") {
            return (
                EXIT_GUEST_FAILED,
                Some(format!("the guest could not run the command: {msg}")),
            );
        }
        started |= line == "started";
    }
    if let ExitReason::TimedOut = reason {
        let secs = timeout.map_or(0, |t| t.as_secs());
        return (
            EXIT_TIMEOUT,
            Some(format!(
                "the command did not finish within {secs} s (--timeout); the VM was stopped"
            )),
        );
    }
    if let ExitReason::Signal(n) = reason {
        return (reason.exit_code(), Some(format!("stopped by signal {n}")));
    }
    if let Some(err) = console
        .iter()
        .find_map(|l| l.strip_prefix("ferrovm-exec: error: "))
    {
        return (
            EXIT_GUEST_FAILED,
            Some(format!("the guest could not run the command: {err}")),
        );
    }
    let panic = console.iter().find(|l| l.contains("Kernel panic"));
    let why = match (panic, reason) {
        (Some(p), _) => format!("the guest kernel panicked: {}", p.trim()),
        (None, ExitReason::Guest(g)) if !g.is_clean() => format!("the guest crashed: {g}"),
        (None, _) if started => {
            "the guest ended before the command reported its exit status".into()
        }
        (None, r) => format!("the guest ended before it ran the command ({r})"),
    };
    (EXIT_GUEST_FAILED, Some(why))
}

/// The project's kernel (the newest virtio-fs-capable one scripts/build-guest cached),
/// else the running host's when its image is readable.
fn default_kernel() -> Result<PathBuf, ExecError> {
    let guest = cache_root().join("guest");
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(&guest).into_iter().flatten().flatten() {
        let dir = entry.path();
        let is_kernel = entry.file_name().to_string_lossy().starts_with("kernel-");
        let image = dir.join("vmlinux");
        let fs_ok = std::fs::read_to_string(dir.join("config"))
            .is_ok_and(|c| c.lines().any(|l| l == "CONFIG_VIRTIO_FS=y"));
        if let (true, true, Ok(meta)) = (is_kernel, fs_ok, std::fs::metadata(&image)) {
            let t = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
                best = Some((t, image));
            }
        }
    }
    if let Some((_, k)) = best {
        return Ok(k);
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let host = PathBuf::from(format!("/boot/vmlinuz-{release}"));
    if std::fs::File::open(&host).is_ok() {
        return Ok(host);
    }
    Err(ExecError::NoKernel(release))
}

/// `$FERROVM_CACHE`, else `$XDG_CACHE_HOME/ferrovm`, else `~/.cache/ferrovm`.
fn cache_root() -> PathBuf {
    if let Some(c) = std::env::var_os("FERROVM_CACHE") {
        return c.into();
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return Path::new(&x).join("ferrovm");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/".into());
    Path::new(&home).join(".cache/ferrovm")
}

/// The kernel's modules: `--modules DIR`, else `modules/` beside the kernel (what
/// scripts/stock-kernel keeps), else /lib/modules/RELEASE.
fn module_dir(opts: &ExecOptions, kernel: &Path, release: Option<&str>) -> Option<PathBuf> {
    if let Some(d) = &opts.modules {
        return Some(d.clone());
    }
    let beside = kernel.parent()?.join("modules");
    if beside.join("modules.dep").is_file() {
        return Some(beside);
    }
    release
        .map(|r| PathBuf::from(format!("/lib/modules/{r}")))
        .filter(|d| d.join("modules.dep").is_file())
}

/// FNV-1a, 64 bits: a cache key stable across builds and Rust versions.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.iter().chain(&[0xffu8]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// busybox, the init and the modules, as a cpio archive; cached by its inputs' hash when
/// the cache directory is writable.
fn base_initramfs(tree: Option<&ModuleTree>, modules: &[String]) -> Result<Vec<u8>, ExecError> {
    let busybox = std::fs::read(BUSYBOX).map_err(ExecError::Busybox)?;
    let mut files = Vec::new();
    for m in modules {
        let path = tree.map_or_else(|| PathBuf::from(m), |t| t.root().join(m));
        let data = std::fs::read(&path).map_err(|e| ExecError::Module(path.clone(), e))?;
        files.push((m.clone(), data));
    }
    let mut parts: Vec<&[u8]> = vec![INIT_SH.as_bytes(), &busybox];
    for (name, data) in &files {
        parts.push(name.as_bytes());
        parts.push(data);
    }
    let cached = cache_root()
        .join("exec")
        .join(format!("initramfs-{:016x}.cpio", fnv1a(&parts)));
    if let Ok(bytes) = std::fs::read(&cached) {
        return Ok(bytes);
    }
    let mut c = Cpio::new();
    for d in ["/bin", "/dev", "/etc", "/proc", "/sys", "/newroot", "/lib"] {
        c.dir(d, 0o755);
    }
    // The kernel opens /dev/console for init's stdio before init mounts devtmpfs.
    c.char_dev("/dev/console", 0o600, 5, 1);
    c.file(BUSYBOX, 0o755, &busybox);
    c.symlink("/bin/sh", "busybox");
    c.file("/init", 0o755, INIT_SH.as_bytes());
    let mut list = String::new();
    let mut made = std::collections::HashSet::new();
    for (name, data) in &files {
        let path = format!("/lib/modules/{name}");
        // Parent directories, each once.
        let mut dir = String::new();
        for comp in Path::new(&path)
            .parent()
            .into_iter()
            .flat_map(Path::components)
            .skip(1)
        {
            dir.push('/');
            dir.push_str(&comp.as_os_str().to_string_lossy());
            if made.insert(dir.clone()) && dir != "/lib" {
                c.dir(&dir, 0o755);
            }
        }
        c.file(&path, 0o644, data);
        list.push_str(&path);
        list.push('\n');
    }
    c.file("/etc/modules", 0o644, list.as_bytes());
    let bytes = c.finish();
    // A cache that cannot be written (a read-only home) only costs the next run the build.
    if let Some(dir) = cached.parent() {
        if std::fs::create_dir_all(dir).is_ok() {
            let tmp = cached.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, &bytes).is_ok() {
                let _ = std::fs::rename(&tmp, &cached);
            }
        }
    }
    Ok(bytes)
}

/// What the guest mounts over its read-only root, in order.
#[derive(Debug, PartialEq, Eq)]
struct MountPlan {
    /// tmpfs: (path, mode).
    scratch: Vec<(PathBuf, &'static str)>,
    /// virtio-fs shares: (tag, path, writable).
    shares: Vec<(String, PathBuf, bool)>,
}

impl MountPlan {
    /// tmpfs over /tmp, /var/tmp, /run and home; each `--rw` directory its own writable
    /// share at the same path; and the working directory a read-only share of its own
    /// when a tmpfs would hide it and no `--rw` covers it.
    fn new(cwd: &Path, home: Option<&Path>, rw: &[PathBuf]) -> Result<Self, ExecError> {
        let mut scratch = vec![
            (PathBuf::from("/tmp"), "1777"),
            (PathBuf::from("/var/tmp"), "1777"),
            (PathBuf::from("/run"), "0755"),
        ];
        if let Some(h) = home.filter(|h| *h != Path::new("/")) {
            scratch.push((h.to_path_buf(), "0700"));
        }
        let mut shares = Vec::new();
        for (i, d) in rw.iter().enumerate() {
            let d = std::fs::canonicalize(d).map_err(|_| ExecError::RwDir(d.clone()))?;
            if !d.is_dir() {
                return Err(ExecError::RwDir(d));
            }
            shares.push((format!("rw{i}"), d, true));
        }
        let hidden = scratch.iter().any(|(s, _)| cwd.starts_with(s));
        let covered = shares.iter().any(|(_, p, _)| cwd.starts_with(p));
        if hidden && !covered {
            shares.push(("cwd".into(), cwd.to_path_buf(), false));
        }
        // Outer directories first, so a share inside another's path lands on top of it.
        shares.sort_by_key(|(_, p, _)| p.components().count());
        Ok(Self { scratch, shares })
    }

    /// The root and the shares as `--fs` configurations.
    fn shares(&self) -> Vec<FsConfig> {
        let mut fs = vec![FsConfig {
            tag: "root".into(),
            source: FsSource::Dir {
                path: "/".into(),
                readonly: true,
            },
            transport: None,
        }];
        fs.extend(self.shares.iter().map(|(tag, path, rw)| FsConfig {
            tag: tag.clone(),
            source: FsSource::Dir {
                path: path.clone(),
                readonly: !rw,
            },
            transport: None,
        }));
        fs
    }
}

/// The caller's environment minus `DROPPED_ENV`, with PWD set to the working directory.
fn guest_env(env: &[(OsString, OsString)], cwd: &Path) -> Vec<(OsString, OsString)> {
    let dropped = |name: &OsStr| {
        let name = name.as_bytes();
        DROPPED_ENV.iter().any(|d| match d.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix.as_bytes()),
            None => name == d.as_bytes(),
        })
    };
    let mut out: Vec<(OsString, OsString)> = env
        .iter()
        .filter(|(k, _)| !dropped(k) && k != "PWD" && !k.as_bytes().contains(&b'='))
        .cloned()
        .collect();
    out.push(("PWD".into(), cwd.as_os_str().to_owned()));
    out
}

/// `s` in single quotes for sh: any byte but NUL passes.
fn sh_quote(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'\'');
    for &b in s {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
}

/// The per-run part of the guest init (see init.sh): `mounts` and `run_cmd`.
fn run_conf(
    plan: &MountPlan,
    cwd: &Path,
    env: &[(OsString, OsString)],
    command: &[OsString],
) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(b"mounts() {\n");
    for (path, mode) in &plan.scratch {
        s.extend_from_slice(b"\tscratch ");
        sh_quote(&mut s, path.as_os_str().as_bytes());
        s.extend_from_slice(format!(" {mode}\n").as_bytes());
    }
    for (tag, path, rw) in &plan.shares {
        s.extend_from_slice(format!("\tshare {tag} {} ", if *rw { "rw" } else { "ro" }).as_bytes());
        sh_quote(&mut s, path.as_os_str().as_bytes());
        s.push(b'\n');
    }
    s.extend_from_slice(b"\t:\n}\nrun_cmd() {\n\tchroot /newroot /run/ferrovm/busybox env -i");
    for (k, v) in env {
        s.push(b' ');
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        sh_quote(&mut s, &kv);
    }
    s.extend_from_slice(b" /run/ferrovm/busybox sh -c 'cd \"$0\" || exit 255; exec \"$@\"' ");
    sh_quote(&mut s, cwd.as_os_str().as_bytes());
    for a in command {
        s.push(b' ');
        sh_quote(&mut s, a.as_bytes());
    }
    s.extend_from_slice(b"\n}\n");
    s
}

/// A writer into a shared buffer (the status port's host side).
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The console UART's output: to stderr with `--verbose`, else nowhere; either way the
/// lines that explain a failure (the guest init's errors, a kernel panic) are kept.
struct ConsoleScan {
    verbose: bool,
    partial: Vec<u8>,
    lines: Arc<Mutex<Vec<String>>>,
}

impl ConsoleScan {
    fn new(verbose: bool) -> Self {
        Self {
            verbose,
            partial: Vec::new(),
            lines: Arc::new(Mutex::new(Vec::new())),
        }
    }
}

impl Write for ConsoleScan {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.verbose {
            let _ = std::io::stderr().write_all(b);
        }
        for &c in b {
            if c == b'\n' || self.partial.len() >= 1024 {
                let line = String::from_utf8_lossy(&self.partial).into_owned();
                if line.contains("ferrovm-exec: ") || line.contains("Kernel panic") {
                    let line = line[line
                        .find("ferrovm-exec: ")
                        .or(line.find("Kernel panic"))
                        .unwrap_or(0)..]
                        .trim_end()
                        .to_string();
                    self.lines
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(line);
                }
                self.partial.clear();
            } else {
                self.partial.push(c);
            }
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::vcpu::GuestExit;

    #[test]
    fn the_environment_loses_what_makes_no_sense_in_the_guest() {
        let env: Vec<(OsString, OsString)> = [
            ("TERM", "xterm"),
            ("DISPLAY", ":0"),
            ("SSH_AUTH_SOCK", "/x"),
            ("DBUS_SESSION_BUS_ADDRESS", "unix:x"),
            ("XDG_RUNTIME_DIR", "/run/user/0"),
            ("PATH", "/usr/bin"),
            ("PWD", "/elsewhere"),
        ]
        .iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
        let got = guest_env(&env, Path::new("/work"));
        let names: Vec<&str> = got.iter().map(|(k, _)| k.to_str().unwrap()).collect();
        assert_eq!(names, ["TERM", "PATH", "PWD"]);
        assert_eq!(got[2].1, "/work");
    }

    #[test]
    fn quoting_survives_quotes_and_odd_bytes() {
        let mut s = Vec::new();
        sh_quote(&mut s, b"it's $HOME\n\xff");
        assert_eq!(s, b"'it'\\''s $HOME\n\xff'");
        // sh reads it back as the same bytes.
        let mut script = b"printf %s ".to_vec();
        script.extend_from_slice(&s);
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(OsStr::from_bytes(&script))
            .output()
            .unwrap();
        assert_eq!(out.stdout, b"it's $HOME\n\xff");
    }

    #[test]
    fn the_working_directory_stays_visible_under_a_tmpfs() {
        let plan = MountPlan::new(Path::new("/tmp/t/src"), Some(Path::new("/root")), &[]).unwrap();
        assert_eq!(
            plan.shares,
            [("cwd".to_string(), PathBuf::from("/tmp/t/src"), false)]
        );
        let plan = MountPlan::new(Path::new("/work"), Some(Path::new("/root")), &[]).unwrap();
        assert!(plan.shares.is_empty());
        assert!(plan.scratch.iter().any(|(p, _)| p == Path::new("/root")));
        let err = MountPlan::new(Path::new("/"), None, &["/nonexistent".into()]).unwrap_err();
        assert!(err.to_string().contains("/nonexistent"));
    }

    #[test]
    fn the_run_script_mounts_then_runs_the_command_in_the_cwd() {
        let plan = MountPlan::new(Path::new("/work"), None, &["/tmp".into()]).unwrap();
        let conf = run_conf(
            &plan,
            Path::new("/work"),
            &[("A".into(), "b c".into())],
            &["printf".into(), "%s|".into(), "x y".into()],
        );
        let text = String::from_utf8(conf).unwrap();
        assert!(text.contains("\tscratch '/tmp' 1777\n"), "{text}");
        assert!(text.contains("\tshare rw0 rw '/tmp'\n"), "{text}");
        assert!(
            text.contains("env -i 'A=b c' /run/ferrovm/busybox sh -c"),
            "{text}"
        );
        assert!(
            text.ends_with("'/work' 'printf' '%s|' 'x y'\n}\n"),
            "{text}"
        );
    }

    #[test]
    fn outcomes() {
        let off = ExitReason::Guest(GuestExit::PowerOff);
        assert_eq!(outcome(&off, "started\nexit 42\n", &[], None), (42, None));
        assert_eq!(outcome(&off, "started\nexit 137\n", &[], None).0, 137);
        let (code, why) = outcome(&off, "error no virtio-fs\n", &[], None);
        assert_eq!(code, 255);
        assert!(why.unwrap().contains("no virtio-fs"));
        let panic = ExitReason::Guest(GuestExit::EmergencyReset);
        let console = vec!["Kernel panic - not syncing: sysrq triggered crash".to_string()];
        let (code, why) = outcome(&panic, "started\n", &console, None);
        assert_eq!(code, 255);
        assert!(why
            .unwrap()
            .contains("panicked: Kernel panic - not syncing"));
        let (code, why) = outcome(
            &ExitReason::TimedOut,
            "started\n",
            &[],
            Some(Duration::from_secs(3)),
        );
        assert_eq!(code, 124);
        assert!(why.unwrap().contains("3 s"));
        let (code, why) = outcome(&off, "", &[], None);
        assert_eq!(code, 255);
        assert!(why.unwrap().contains("before it ran"));
    }

    #[test]
    fn the_console_scan_keeps_the_lines_that_explain_a_failure() {
        let mut c = ConsoleScan::new(false);
        c.write_all(b"[ 0.1] boot\n[ 1.2] Kernel panic - not syncing: x\nferrovm-exec: error: y\n")
            .unwrap();
        let lines = c.lines.lock().unwrap().clone();
        assert_eq!(
            lines,
            ["Kernel panic - not syncing: x", "ferrovm-exec: error: y"]
        );
    }
}
