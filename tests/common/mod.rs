//! Shared test infrastructure: finding the guest artifacts, running the `ferrovm` binary with
//! a timeout, and moving guest-booting tests into the nested KVM sandbox when this host's
//! /dev/kvm is not backed by hardware virtualization.
//!
//! A test that boots a guest starts with `sandboxed!();`. Where KVM is real (a laptop, a CI
//! runner with nested virtualization, or inside `scripts/kvm-sandbox`) the test runs here;
//! elsewhere the macro re-runs just this test inside `scripts/kvm-sandbox` and passes or
//! fails with it. `scripts/test` runs whole test binaries inside one sandbox, so there every
//! test runs directly and the sandbox boots once.

#![allow(dead_code)]

pub mod net;
pub mod records;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Runs the current test inside the sandbox and returns from it, unless KVM is usable here.
#[macro_export]
macro_rules! sandboxed {
    () => {{
        fn f() {}
        let name = std::any::type_name_of_val(&f);
        let name = name.strip_suffix("::f").unwrap();
        // Drop the crate name: libtest names tests by their path inside the test crate.
        let name = name.split_once("::").map_or(name, |(_, rest)| rest);
        if $crate::common::run_in_sandbox_if_needed(name) {
            return;
        }
    }};
}

/// The repository root (where Cargo.toml is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `ferrovm` binary under test.
pub fn ferrovm_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferrovm"))
}

/// Whether this runs inside scripts/kvm-sandbox's TCG guest.
pub fn nested_sandbox() -> bool {
    std::env::var("FERROVM_SANDBOX_MODE").as_deref() == Ok("nested")
}

/// Whether /dev/kvm here is backed by hardware virtualization (vmx/svm in the CPU flags).
pub fn kvm_usable() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(|| {
        let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let hw = flags
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        hw && Path::new("/dev/kvm").exists()
    })
}

/// If KVM is not usable here, runs test `name` of the current test binary inside
/// `scripts/kvm-sandbox`, asserts it passed, and returns true (the caller then returns).
pub fn run_in_sandbox_if_needed(name: &str) -> bool {
    if kvm_usable() {
        return false;
    }
    let exe = std::env::current_exe().expect("test binary path");
    eprintln!("{name}: no hardware KVM here, running it in scripts/kvm-sandbox");
    let out = Command::new(repo_root().join("scripts/kvm-sandbox"))
        .args(["--timeout", "900", "--"])
        .arg(&exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/kvm-sandbox");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("--- sandbox stdout ---\n{stdout}\n--- sandbox stderr ---\n{stderr}");
    assert!(
        out.status.success(),
        "{name} failed inside the sandbox ({})",
        out.status
    );
    assert!(
        stdout.contains("1 passed"),
        "{name} did not run inside the sandbox (filter matched nothing?)"
    );
    true
}

/// Paths of the guest kernel and rootfs built by `scripts/build-guest`.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
    pub initramfs: PathBuf,
}

/// Builds (if needed) and finds the guest artifacts, once per test binary. `scripts/test`
/// passes them in `FERROVM_GUEST_{VMLINUX,BZIMAGE,INITRAMFS}` (the sandbox sees the cache
/// read-only, so nothing is built in there).
pub fn artifacts() -> &'static Artifacts {
    static ARTIFACTS: OnceLock<Artifacts> = OnceLock::new();
    ARTIFACTS.get_or_init(|| {
        let env = |k: &str| std::env::var_os(k).map(PathBuf::from);
        if let (Some(vmlinux), Some(bzimage), Some(initramfs)) = (
            env("FERROVM_GUEST_VMLINUX"),
            env("FERROVM_GUEST_BZIMAGE"),
            env("FERROVM_GUEST_INITRAMFS"),
        ) {
            return Artifacts {
                vmlinux,
                bzimage,
                initramfs,
            };
        }
        let out = Command::new(repo_root().join("scripts/build-guest"))
            .arg("--print-paths")
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/build-guest --print-paths");
        assert!(out.status.success(), "scripts/build-guest failed");
        let text = String::from_utf8(out.stdout).unwrap();
        let get = |key: &str| {
            let path = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("build-guest printed no {key}= line:\n{text}"));
            let path = PathBuf::from(path);
            assert!(path.is_file(), "{} does not exist", path.display());
            path
        };
        Artifacts {
            vmlinux: get("vmlinux"),
            bzimage: get("bzimage"),
            initramfs: get("initramfs"),
        }
    })
}

thread_local! {
    /// Whether `Vm::guest` on this thread boots the stock Debian kernel (see `on_stock_kernel`).
    static STOCK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While the returned guard lives, `Vm::guest` on this thread boots the stock Debian
/// kernel of `scripts/stock-kernel` (modular, with its modules in the initramfs) instead of
/// the project's: the same test bodies then check that the kernels people have work.
pub fn on_stock_kernel() -> StockGuard {
    STOCK.with(|s| s.set(true));
    StockGuard
}

pub struct StockGuard;

impl Drop for StockGuard {
    fn drop(&mut self) {
        STOCK.with(|s| s.set(false));
    }
}

/// The stock kernel and its initramfs: from `FERROVM_STOCK_VMLINUZ` and
/// `FERROVM_STOCK_INITRAMFS` (scripts/test sets them), else `scripts/stock-kernel`.
pub fn stock_artifacts() -> &'static (PathBuf, PathBuf) {
    static STOCK_PATHS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    STOCK_PATHS.get_or_init(|| {
        let env = |k: &str| std::env::var_os(k).map(PathBuf::from);
        if let (Some(k), Some(i)) = (env("FERROVM_STOCK_VMLINUZ"), env("FERROVM_STOCK_INITRAMFS")) {
            return (k, i);
        }
        let out = Command::new(repo_root().join("scripts/stock-kernel"))
            .arg("--print-paths")
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/stock-kernel --print-paths");
        assert!(out.status.success(), "scripts/stock-kernel failed");
        let text = String::from_utf8(out.stdout).unwrap();
        let get = |key: &str| {
            PathBuf::from(
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("{key}=")))
                    .unwrap_or_else(|| panic!("stock-kernel printed no {key}=:\n{text}")),
            )
        };
        (get("stock_kernel"), get("stock_initramfs"))
    })
}

/// The kernel command line the tests boot with (before any ` -- `). `quiet` keeps the
/// kernel's informational boot log off the console (errors, warnings and panics still
/// print): in the nested sandbox every byte through the 16550A costs about a millisecond of
/// exits, and the full log is two thirds of a boot. `bzimage_boots_to_userspace` boots with
/// the whole log.
pub const CMDLINE: &str = "console=ttyS0 quiet reboot=k panic=-1";

/// The readiness marker the guest init prints.
pub const READY: &str = "ferrovm-guest: userspace ready";

/// What a finished `ferrovm` process left behind.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    /// Killed by the harness at its timeout.
    pub timed_out: bool,
}

impl Output {
    /// Both streams, for assertion messages.
    pub fn dump(&self) -> String {
        format!(
            "exit code {:?} signal {:?} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.signal, self.elapsed, self.stdout, self.stderr
        )
    }

    /// The one line the VMM prints on stderr to say why it failed (panics if not exactly one).
    pub fn reason(&self) -> &str {
        let lines: Vec<_> = self
            .stderr
            .lines()
            .filter(|l| l.starts_with("ferrovm:"))
            // `run --incoming` says where it listens first.
            .filter(|l| !l.starts_with("ferrovm: waiting for a migration on "))
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "expected one line of reason\n{}",
            self.dump()
        );
        lines[0]
    }

    /// Why the guest ended before printing its userspace marker, if it did: a triple fault
    /// or the harness's timeout.
    pub fn died_before_userspace(&self) -> Option<&'static str> {
        if self.stdout.contains(READY) {
            return None;
        }
        if self.timed_out {
            Some("timed out")
        } else if self.stderr.contains("guest triple fault") {
            Some("triple fault")
        } else {
            None
        }
    }

    /// The name of the TAP the VMM made for its NIC `nic` with tap=auto, as it told the user.
    pub fn auto_tap(&self, nic: usize) -> Option<&str> {
        let prefix = format!("ferrovm: NIC {nic} uses TAP ");
        self.stderr
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .map(str::trim)
    }

    /// The exit status the guest command reported through the init's marker.
    pub fn guest_exit(&self) -> Option<i32> {
        self.stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix("ferrovm-guest: exit="))
            .and_then(|s| s.trim().parse().ok())
    }
}

/// A `ferrovm` invocation under construction.
pub struct Vm {
    cmd: Command,
    timeout: Duration,
    /// Boots the project's guest, which prints `READY` once in userspace.
    expects_userspace: bool,
}

impl Vm {
    /// `ferrovm run` with no arguments yet, and the guest-memory write guard on (a device
    /// write outside the buffers the guest's descriptors allowed aborts the VMM with a
    /// message) unless FERROVM_WRITE_GUARD says otherwise.
    pub fn new() -> Self {
        let mut cmd = Command::new(ferrovm_bin());
        let guard = std::env::var("FERROVM_WRITE_GUARD").unwrap_or_else(|_| "1".into());
        cmd.arg("run")
            .stdin(Stdio::null())
            .env("FERROVM_WRITE_GUARD", guard);
        Self {
            cmd,
            timeout: Duration::from_secs(300),
            expects_userspace: false,
        }
    }

    /// `ferrovm run` with the default guest (ELF vmlinux + initramfs), or the stock Debian
    /// kernel and its initramfs under `on_stock_kernel`.
    pub fn guest() -> Self {
        let (kernel, initrd) = if STOCK.with(|s| s.get()) {
            stock_artifacts().clone()
        } else {
            let a = artifacts();
            (a.vmlinux.clone(), a.initramfs.clone())
        };
        let mut vm = Self::new();
        vm.arg("--kernel").arg(&kernel).arg("--initrd").arg(&initrd);
        vm.expects_userspace = true;
        vm
    }

    /// The default guest running `guest_cmd` and powering off.
    pub fn guest_running(guest_cmd: &str) -> Self {
        let mut vm = Self::guest();
        vm.cmdline_with_cmd(guest_cmd);
        vm
    }

    /// Sets `--cmdline` to the default line plus init arguments.
    pub fn cmdline_with_cmd(&mut self, guest_cmd: &str) -> &mut Self {
        self.arg("--cmdline")
            .arg(format!("{CMDLINE} -- {guest_cmd}"))
    }

    pub fn arg(&mut self, a: impl AsRef<std::ffi::OsStr>) -> &mut Self {
        self.cmd.arg(a);
        self
    }

    pub fn env(&mut self, k: &str, v: impl AsRef<std::ffi::OsStr>) -> &mut Self {
        self.cmd.env(k, v);
        self
    }

    pub fn timeout(&mut self, t: Duration) -> &mut Self {
        self.timeout = t;
        self
    }

    /// Makes ferrovm's hardware virtualization check see a host without it, whatever this
    /// one has: CPU flags without vmx/svm and the software KVM module (`FERROVM_TEST_CPUINFO`,
    /// `FERROVM_TEST_SYS_MODULE`).
    pub fn as_if_kvm_were_emulated(&mut self) -> &mut Self {
        let (cpuinfo, modules) =
            fake_host("fpu vme de pse tsc msr hypervisor", &["kvm", "kvm_pvm"]);
        self.env("FERROVM_TEST_CPUINFO", cpuinfo)
            .env("FERROVM_TEST_SYS_MODULE", modules)
    }

    /// Runs to completion and collects its output; a run past the timeout is killed and
    /// fails the test with everything it printed.
    ///
    /// In the nested sandbox only, a guest that died before reaching userspace (a triple
    /// fault or a hang in early boot, before any device is used: a fault of TCG's nested SVM
    /// seen about once per suite run) runs once more, saying so. A guest that reached
    /// userspace is never rerun, whatever happened next.
    pub fn run(&mut self) -> Output {
        let timeout = self.timeout;
        let mut out = self.spawn().finish(timeout);
        if self.expects_userspace && nested_sandbox() {
            if let Some(why) = out.died_before_userspace() {
                eprintln!(
                    "warning: the guest died before userspace ({why}): running it once more \
                     (nested sandbox)\n{}",
                    out.dump()
                );
                out = self.spawn().finish(timeout);
            }
        }
        assert!(
            !out.timed_out,
            "ferrovm timed out after {timeout:?}\n{}",
            out.dump()
        );
        out
    }
}

impl Default for Vm {
    fn default() -> Self {
        Self::new()
    }
}

impl Vm {
    /// `ferrovm restore --snapshot DIR` with no further arguments yet.
    pub fn restore(dir: &Path) -> Self {
        let mut cmd = Command::new(ferrovm_bin());
        cmd.arg("restore")
            .arg("--snapshot")
            .arg(dir)
            .stdin(Stdio::null());
        Self {
            cmd,
            timeout: Duration::from_secs(300),
            expects_userspace: false,
        }
    }
}

/// Runs `ferrovm ARGS` (a client subcommand) to completion.
pub fn ferrovm_cli(args: &[&str]) -> std::process::Output {
    Command::new(ferrovm_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ferrovm")
}

/// A fresh directory on a local filesystem, removed on drop: Unix sockets cannot live on
/// the nested sandbox's 9p share, and snapshots write faster to tmpfs.
pub struct LocalDir(pub PathBuf);

impl LocalDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = PathBuf::from("/var/tmp")
            .join(format!("ferrovm-test-{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        LocalDir(p)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for LocalDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A file removed when the test ends (also when it fails).
pub struct TempFile(pub PathBuf);

impl TempFile {
    /// A sparse file of `len` bytes at a fresh path.
    pub fn sparse(tag: &str, len: u64) -> Self {
        let path = temp_path(tag);
        std::fs::File::create(&path).unwrap().set_len(len).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The value of environment variable `key`, or `default` when unset or unparsable.
pub fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A fresh path under /tmp (shared with the sandbox) for this test's files.
pub fn temp_path(tag: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    std::env::temp_dir().join(format!("ferrovm-test-{}-{n}-{tag}", std::process::id()))
}

/// A /proc/cpuinfo with `flags` and a /sys/module with directories `modules`, in a fresh
/// directory under the temp dir (left there: a few bytes): for `FERROVM_TEST_CPUINFO` and
/// `FERROVM_TEST_SYS_MODULE`.
pub fn fake_host(flags: &str, modules: &[&str]) -> (PathBuf, PathBuf) {
    let dir = temp_path("fake-host");
    let sys_module = dir.join("module");
    std::fs::create_dir_all(&sys_module).unwrap();
    for m in modules {
        std::fs::create_dir_all(sys_module.join(m)).unwrap();
    }
    let cpuinfo = dir.join("cpuinfo");
    std::fs::write(
        &cpuinfo,
        format!("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: {flags}\n\n"),
    )
    .unwrap();
    (cpuinfo, sys_module)
}

/// A minimal x86_64 `vmlinux`-shaped ELF whose entry (at 1 MiB, entered in 64-bit mode
/// through the Linux boot protocol since it has no PVH note) runs `code`.
pub fn tiny_elf(code: &[u8]) -> Vec<u8> {
    let paddr: u64 = 0x10_0000;
    let mut b = vec![0u8; 64];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2; // 64-bit
    b[5] = 1; // little-endian
    b[6] = 1;
    b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    b[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86_64
    b[20..24].copy_from_slice(&1u32.to_le_bytes());
    b[24..32].copy_from_slice(&paddr.to_le_bytes());
    b[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    b[52..54].copy_from_slice(&64u16.to_le_bytes());
    b[54..56].copy_from_slice(&56u16.to_le_bytes());
    b[56..58].copy_from_slice(&1u16.to_le_bytes());
    let mut ph = vec![0u8; 56];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // offset
    ph[16..24].copy_from_slice(&paddr.to_le_bytes());
    ph[24..32].copy_from_slice(&paddr.to_le_bytes());
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
    b.extend_from_slice(&ph);
    b.extend_from_slice(code);
    b
}

/// A `ferrovm` process still running, with its stdout read line by line.
pub struct Running {
    pub child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: std::thread::JoinHandle<Vec<u8>>,
    started: Instant,
}

impl Vm {
    /// Starts the VMM and returns at once.
    pub fn spawn(&mut self) -> Running {
        let started = Instant::now();
        let mut child = self
            .cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferrovm");
        let stdout = child.stdout.take().unwrap();
        let mut se = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                if tx
                    .send(String::from_utf8_lossy(&line).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = se.read_to_end(&mut s);
            s
        });
        Running {
            child,
            lines: rx,
            seen: Vec::new(),
            stderr,
            started,
        }
    }

    /// Starts the VMM and waits until a stdout line contains `needle`; panics with the
    /// output when it does not come within `timeout`.
    ///
    /// In the nested sandbox only, a guest that ended or hung before reaching userspace is
    /// started once more, with the same policy and warning as `run`.
    pub fn spawn_until(&mut self, needle: &str, timeout: Duration) -> Running {
        let mut vm = self.spawn();
        let Err(gone) = vm.try_wait_for(needle, timeout) else {
            return vm;
        };
        let _ = vm.child.kill();
        let mut out = vm.finish(timeout);
        out.timed_out = gone == NotSeen::TimedOut;
        let early = out.died_before_userspace();
        if !(self.expects_userspace && nested_sandbox() && early.is_some()) {
            panic!("{}\n{}", gone.why(needle, timeout), out.dump());
        }
        eprintln!(
            "warning: the guest died before userspace ({}): running it once more \
             (nested sandbox)\n{}",
            early.unwrap_or_default(),
            out.dump()
        );
        let mut vm = self.spawn();
        vm.wait_for(needle, timeout);
        vm
    }

    /// Gives the VMM a pipe as stdin, written with `Running::write_stdin`.
    pub fn stdin_piped(&mut self) -> &mut Self {
        self.cmd.stdin(Stdio::piped());
        self
    }

    /// Feeds `bytes` to the VMM's stdin (the serial console's input).
    pub fn stdin_bytes(&mut self, bytes: &[u8]) -> &mut Self {
        let p = temp_path("stdin");
        std::fs::write(&p, bytes).unwrap();
        self.cmd.stdin(std::fs::File::open(&p).unwrap());
        self
    }
}

/// Why `Running::try_wait_for` returned without its line.
#[derive(Debug, PartialEq)]
enum NotSeen {
    TimedOut,
    Ended,
}

impl NotSeen {
    fn why(&self, needle: &str, timeout: Duration) -> String {
        match self {
            NotSeen::TimedOut => format!("'{needle}' not seen within {timeout:?}"),
            NotSeen::Ended => format!("the VMM ended before printing '{needle}'"),
        }
    }
}

impl Running {
    /// Waits until a stdout line contains `needle`; panics with the output at the timeout.
    /// The kernel prints its command line, so a marker should be computed by the guest
    /// (`echo ready-$((6*7))`), not appear literally in the command.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) {
        if let Err(gone) = self.try_wait_for(needle, timeout) {
            let _ = self.child.kill();
            panic!(
                "{}; stdout so far:\n{}",
                gone.why(needle, timeout),
                self.seen.join("\n")
            );
        }
    }

    /// `wait_for` that says why the line did not come instead of panicking.
    fn try_wait_for(&mut self, needle: &str, timeout: Duration) -> Result<(), NotSeen> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.seen.push(line);
                    if hit {
                        return Ok(());
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => return Err(NotSeen::TimedOut),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err(NotSeen::Ended),
            }
        }
    }

    /// Every stdout line seen so far (by `wait_for`), joined.
    pub fn seen_text(&mut self) -> String {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        self.seen.join("\n")
    }

    /// Writes to the VMM's stdin (set up with `Vm::stdin_piped`).
    pub fn write_stdin(&mut self, bytes: &[u8]) {
        use std::io::Write;
        let stdin = self
            .child
            .stdin
            .as_mut()
            .expect("Vm::stdin_piped was not called");
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    /// Sends `sig` to the VMM process.
    pub fn signal(&self, sig: i32) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Waits for exit (killing it after `timeout`) and returns everything it printed.
    pub fn finish(mut self, timeout: Duration) -> Output {
        let start = Instant::now();
        let mut timed_out = false;
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > timeout {
                timed_out = true;
                let _ = self.child.kill();
                break self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        Output {
            code: status.code(),
            signal: std::os::unix::process::ExitStatusExt::signal(&status),
            stdout: self.seen.join("\n"),
            stderr: String::from_utf8_lossy(&self.stderr.join().unwrap()).into(),
            elapsed: self.started.elapsed(),
            timed_out,
        }
    }
}
