//! Seccomp sandboxing: every VMM thread runs under an allow-list of syscalls once its setup
//! is over (files opened, guest memory mapped, KVM fds created).
//!
//! Threads and their lists (see `filters`): the main thread (event loop and teardown), each
//! vCPU, each virtio-blk I/O thread, and the stdin forwarder. A filter is inherited by the
//! threads its thread spawns later, so each thread installs its own at the start of its work
//! and the main thread installs its own last, after it started the vCPUs.
//!
//! A forbidden syscall raises SIGSYS (SECCOMP_RET_TRAP). The handler prints which thread
//! made which syscall and ends the whole process with status `SECCOMP_EXIT_STATUS`: a VMM
//! whose thread wants something it never does may be under a guest's control, so nothing of
//! it keeps running. `--no-seccomp` (for debugging) installs no filter.
//!
//! Test hook: `FERROVM_TEST_FORBIDDEN_SYSCALL=<kind>` (kind as in `ThreadKind::name`) makes
//! every thread of that kind call `socket()` right after its filter is installed, so tests can
//! show the trap; with `--no-seccomp` the call just succeeds. Not for any other use.

mod filters;

use std::cell::Cell;
use std::sync::OnceLock;

use log::{info, warn};
use seccompiler::BpfProgram;
use vmm_sys_util::signal::register_signal_handler;

/// Exit status of a VMM stopped by its sandbox: 128 + SIGSYS, what a shell shows for a
/// process killed by SIGSYS.
pub const SECCOMP_EXIT_STATUS: i32 = 128 + libc::SIGSYS;

/// The environment variable of the test hook (see the module documentation).
pub const TEST_TRIGGER_ENV: &str = "FERROVM_TEST_FORBIDDEN_SYSCALL";

/// `si_code` of a SIGSYS raised by a seccomp filter.
const SYS_SECCOMP: libc::c_int = 1;

/// Errors setting up the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("Failed to build the seccomp filter of the {0} thread")]
    Build(&'static str, #[source] seccompiler::BackendError),
    #[error("Failed to install the SIGSYS handler for seccomp violations")]
    Handler(#[source] vmm_sys_util::errno::Error),
    #[error("Failed to install the seccomp filter of thread '{thread}' (run with --no-seccomp on a kernel without seccomp)")]
    Install {
        thread: String,
        #[source]
        source: seccompiler::Error,
    },
}

/// The kinds of VMM thread, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: event loop, signals, metrics report, teardown.
    Main,
    /// A vCPU and the device models it exits into.
    Vcpu,
    /// A virtio-blk I/O thread.
    BlockIo,
    /// The thread forwarding a non-pollable stdin into a pipe.
    Stdin,
    /// The control socket's thread (`--api-sock`).
    Api,
    /// The live-migration thread (with `--api-sock`).
    Migration,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 6] = [
        Self::Main,
        Self::Vcpu,
        Self::BlockIo,
        Self::Stdin,
        Self::Api,
        Self::Migration,
    ];

    /// The name used in messages and by the test hook.
    pub fn name(self) -> &'static str {
        match self {
            Self::Main => "main",
            Self::Vcpu => "vcpu",
            Self::BlockIo => "blk-io",
            Self::Stdin => "stdin",
            Self::Api => "api",
            Self::Migration => "migrate",
        }
    }
}

/// The compiled filters, in `ThreadKind::ALL` order; set once sandboxing is enabled.
struct Filters([BpfProgram; 6]);

static FILTERS: OnceLock<Filters> = OnceLock::new();

/// Turns sandboxing on or off for the threads that call `apply` from now on. On: compiles
/// every filter (so a bad one fails here, not in a running thread) and installs the SIGSYS
/// handler. Called once, before the VMM spawns any thread.
pub fn init(enabled: bool) -> Result<(), SeccompError> {
    if !enabled {
        warn!("seccomp sandboxing is off (--no-seccomp): VMM threads may make any syscall");
        return Ok(());
    }
    let filters = Filters(compile_all()?);
    register_signal_handler(libc::SIGSYS, on_sigsys).map_err(SeccompError::Handler)?;
    // A second call keeps the first filters: they are the same.
    let _ = FILTERS.set(filters);
    info!("seccomp: each VMM thread runs under an allow-list filter");
    Ok(())
}

fn compile_all() -> Result<[BpfProgram; 6], SeccompError> {
    let one =
        |kind: ThreadKind| filters::compile(kind).map_err(|e| SeccompError::Build(kind.name(), e));
    Ok([
        one(ThreadKind::Main)?,
        one(ThreadKind::Vcpu)?,
        one(ThreadKind::BlockIo)?,
        one(ThreadKind::Stdin)?,
        one(ThreadKind::Api)?,
        one(ThreadKind::Migration)?,
    ])
}

/// Puts the calling thread under the filter of `kind`, if sandboxing is on; a no-op
/// otherwise (with `--no-seccomp`, and in unit tests that never enable it).
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    // Read before the filter is on: it takes a lock and may allocate.
    let provoke = std::env::var(TEST_TRIGGER_ENV).is_ok_and(|k| k == kind.name());
    if let Some(filters) = FILTERS.get() {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or(kind.name());
        remember_thread_name(name);
        install(&filters.0[kind as usize]).map_err(|source| SeccompError::Install {
            thread: name.to_owned(),
            source,
        })?;
    }
    if provoke {
        make_forbidden_syscall();
    }
    Ok(())
}

/// `apply` for a thread that has no one to return an error to: a thread that cannot be
/// sandboxed must not run unsandboxed, so the VMM stops.
pub fn apply_or_exit(kind: ThreadKind) {
    if let Err(e) = apply(kind) {
        let mut line = format!("ferrovm: error: {e}");
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            line.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        eprintln!("{line}");
        std::process::exit(1);
    }
}

fn install(filter: &BpfProgram) -> Result<(), seccompiler::Error> {
    seccompiler::apply_filter(filter)
}

/// What the test hook does: a syscall no VMM thread needs.
fn make_forbidden_syscall() {
    // bind(): no VMM thread binds anything after its setup (the control socket is bound
    // before any filter). On fd -1 with no address it fails with EBADF if let through.
    // SAFETY: a null address of length 0 is never read; fd -1 is nobody's.
    let _ = unsafe { libc::bind(-1, std::ptr::null(), 0) };
}

/// Longest thread name kept for the message (Linux's own limit is 15 bytes).
const NAME_MAX: usize = 32;

thread_local! {
    /// This thread's name for the SIGSYS message, stored before its filter goes on, as
    /// bytes so the handler reads it without allocating or locking.
    static THREAD_NAME: Cell<([u8; NAME_MAX], usize)> = const { Cell::new(([0; NAME_MAX], 0)) };
}

fn remember_thread_name(name: &str) {
    let mut buf = [0u8; NAME_MAX];
    let n = name.len().min(NAME_MAX);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    THREAD_NAME.with(|t| t.set((buf, n)));
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // Only async-signal-safe work here: no allocation, no locks, raw write(2) and _exit(2).
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let info = unsafe { &*info };
    if info.si_code != SYS_SECCOMP {
        return;
    }
    // SAFETY: for a seccomp SIGSYS the kernel fills `_sigsys` (call address, syscall number,
    // arch) in the union, whose syscall number is the 7th int of siginfo_t on x86_64
    // (si_signo, si_errno, si_code, padding, then the 8-byte call address).
    let nr = unsafe { *(info as *const libc::siginfo_t as *const i32).add(6) };
    // SAFETY: an SA_SIGINFO handler's third argument is the interrupted ucontext_t, whose
    // registers hold the syscall's arguments (rsi: the second, the ioctl request).
    let request = unsafe {
        let uc = &*(ctx as *const libc::ucontext_t);
        uc.uc_mcontext.gregs[libc::REG_RSI as usize] as u64
    };
    let (name, len) = THREAD_NAME.with(|t| t.get());
    let mut msg = Message::new();
    msg.push(b"ferrovm: seccomp: thread '");
    msg.push(&name[..len]);
    msg.push(b"' made forbidden syscall ");
    msg.push_dec(i64::from(nr));
    msg.push(b" (");
    msg.push(syscall_name(i64::from(nr)).as_bytes());
    if i64::from(nr) == libc::SYS_ioctl {
        msg.push(b" request ");
        msg.push_hex(request);
    }
    msg.push(b"); the VMM stops (run with --no-seccomp to debug)\n");
    crate::terminal::restore_from_signal_handler();
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is live for the call.
    unsafe {
        libc::write(libc::STDERR_FILENO, msg.buf.as_ptr().cast(), msg.len);
        libc::_exit(SECCOMP_EXIT_STATUS);
    }
}

/// A fixed buffer the SIGSYS handler formats its line into; overlong input is cut.
struct Message {
    buf: [u8; 256],
    len: usize,
}

impl Message {
    fn new() -> Self {
        Self {
            buf: [0; 256],
            len: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_dec(&mut self, v: i64) {
        if v < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = v.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    fn push_hex(&mut self, v: u64) {
        let mut digits = [0u8; 16];
        let mut i = digits.len();
        let mut v = v;
        loop {
            i -= 1;
            digits[i] = b"0123456789abcdef"[(v & 0xf) as usize];
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        self.push(b"0x");
        self.push(&digits[i..]);
    }
}

/// Names of the syscalls a compromised VMM thread would likely try, for the message.
fn syscall_name(nr: i64) -> &'static str {
    const NAMES: &[(i64, &str)] = &[
        (libc::SYS_read, "read"),
        (libc::SYS_write, "write"),
        (libc::SYS_open, "open"),
        (libc::SYS_openat, "openat"),
        (libc::SYS_close, "close"),
        (libc::SYS_stat, "stat"),
        (libc::SYS_fstat, "fstat"),
        (libc::SYS_mmap, "mmap"),
        (libc::SYS_mprotect, "mprotect"),
        (libc::SYS_ioctl, "ioctl"),
        (libc::SYS_socket, "socket"),
        (libc::SYS_connect, "connect"),
        (libc::SYS_accept, "accept"),
        (libc::SYS_bind, "bind"),
        (libc::SYS_listen, "listen"),
        (libc::SYS_sendto, "sendto"),
        (libc::SYS_recvfrom, "recvfrom"),
        (libc::SYS_clone, "clone"),
        (libc::SYS_clone3, "clone3"),
        (libc::SYS_fork, "fork"),
        (libc::SYS_vfork, "vfork"),
        (libc::SYS_execve, "execve"),
        (libc::SYS_execveat, "execveat"),
        (libc::SYS_kill, "kill"),
        (libc::SYS_tgkill, "tgkill"),
        (libc::SYS_ptrace, "ptrace"),
        (libc::SYS_prctl, "prctl"),
        (libc::SYS_mount, "mount"),
        (libc::SYS_unlink, "unlink"),
        (libc::SYS_unlinkat, "unlinkat"),
        (libc::SYS_rename, "rename"),
        (libc::SYS_renameat, "renameat"),
        (libc::SYS_mkdir, "mkdir"),
        (libc::SYS_chmod, "chmod"),
        (libc::SYS_setuid, "setuid"),
        (libc::SYS_setns, "setns"),
        (libc::SYS_unshare, "unshare"),
        (libc::SYS_rt_sigaction, "rt_sigaction"),
        (libc::SYS_fcntl, "fcntl"),
        (libc::SYS_statx, "statx"),
        (libc::SYS_newfstatat, "newfstatat"),
    ];
    NAMES
        .iter()
        .find(|(n, _)| *n == nr)
        .map_or("not allowed for this thread", |(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    #[test]
    fn every_thread_kind_has_a_filter() {
        let filters = compile_all().unwrap();
        for (kind, prog) in ThreadKind::ALL.iter().zip(&filters) {
            assert!(!prog.is_empty(), "{kind:?}");
        }
        // `Filters` is indexed by `kind as usize`: ALL must list the kinds in that order.
        for (i, kind) in ThreadKind::ALL.iter().enumerate() {
            assert_eq!(*kind as usize, i);
        }
    }

    #[test]
    fn message_formats_numbers_without_allocating() {
        let mut m = Message::new();
        m.push(b"n=");
        m.push_dec(41);
        m.push(b" ");
        m.push_dec(-7);
        m.push(b" ");
        m.push_dec(0);
        m.push(b" ");
        m.push_hex(0xae80);
        assert_eq!(&m.buf[..m.len], b"n=41 -7 0 0xae80");
        let mut m = Message::new();
        m.push(&[b'x'; 300]);
        assert_eq!(m.len, 256, "cut, not overflowed");
    }

    #[test]
    fn syscall_names() {
        assert_eq!(syscall_name(libc::SYS_socket), "socket");
        assert_eq!(syscall_name(libc::SYS_execve), "execve");
        assert_eq!(syscall_name(100_000), "not allowed for this thread");
    }

    /// Runs `body` in a forked child whose stderr is a pipe, with `kind`'s filter and the
    /// SIGSYS handler installed; returns the child's exit status and what it printed.
    fn in_sandboxed_child(kind: ThreadKind, body: fn()) -> (i32, String) {
        let filter = filters::compile(kind).unwrap();
        let mut fds = [0; 2];
        // SAFETY: pipe() writes two fds into the array it is given.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both fds were just created and are owned here only.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: the child only makes raw syscalls and the async-signal-safe calls below
        // (no allocation: the filter was compiled before the fork) and ends with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: in the child: dup2 and _exit are async-signal-safe; the handler is
            // a plain extern "C" fn.
            unsafe {
                libc::dup2(w.as_raw_fd(), libc::STDERR_FILENO);
                if register_signal_handler(libc::SIGSYS, on_sigsys).is_err()
                    || install(&filter).is_err()
                {
                    libc::_exit(100);
                }
                body();
                libc::_exit(0);
            }
        }
        drop(w);
        let mut out = String::new();
        std::fs::File::from(r).read_to_string(&mut out).unwrap();
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a valid out pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status),
            "child died of a signal: {status:#x}"
        );
        (libc::WEXITSTATUS(status), out)
    }

    #[test]
    fn a_forbidden_syscall_stops_the_process_with_a_clear_message() {
        for kind in ThreadKind::ALL {
            let (status, out) = in_sandboxed_child(kind, make_forbidden_syscall);
            assert_eq!(status, SECCOMP_EXIT_STATUS, "{kind:?}: {out}");
            assert!(
                out.contains("made forbidden syscall 49 (bind); the VMM stops (run with --no-seccomp to debug)"),
                "{kind:?}: {out}"
            );
        }
    }

    #[test]
    fn a_forbidden_ioctl_is_named_with_its_request() {
        let (status, out) = in_sandboxed_child(ThreadKind::BlockIo, || {
            // SAFETY: TCGETS on stdin writes into the termios given; it traps before that.
            unsafe {
                let mut t = std::mem::zeroed::<libc::termios>();
                libc::ioctl(0, libc::TCGETS, &mut t);
            }
        });
        assert_eq!(status, SECCOMP_EXIT_STATUS, "{out}");
        assert!(out.contains("syscall 16 (ioctl request 0x5401)"), "{out}");
    }

    #[test]
    fn allowed_syscalls_run_under_the_filter() {
        let (status, out) = in_sandboxed_child(ThreadKind::Stdin, || {
            let msg = b"still here\n";
            // SAFETY: write(2) of a live buffer; getrandom fills the one given.
            unsafe {
                libc::write(libc::STDERR_FILENO, msg.as_ptr().cast(), msg.len());
                let mut b = [0u8; 8];
                libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0);
            }
        });
        assert_eq!((status, out.as_str()), (0, "still here\n"));
    }
}
