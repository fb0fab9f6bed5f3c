//! `ferrovm exec`: a kernel booted on the host's files runs one command, whose exit status,
//! stdout, stderr and stdin pass through. Each test boots the project's kernel (built with
//! CONFIG_VIRTIO_FS=y), the core ones also Debian's stock cloud kernel, modular (its
//! virtio-pci, virtio-console, fuse and virtiofs modules go into the initramfs).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{artifacts, ferrovm_bin, stock_artifacts};

/// Which kernel a test boots.
#[derive(Clone, Copy)]
enum Kernel {
    Project,
    Stock,
}

impl Kernel {
    fn path(self) -> PathBuf {
        match self {
            Self::Project => artifacts().vmlinux.clone(),
            // The stock kernel's config and modules/ tree sit beside it (scripts/stock-kernel).
            Self::Stock => stock_artifacts().0.clone(),
        }
    }
}

/// `ferrovm exec --kernel K ARGS -- CMD...` in `cwd`, with `stdin` piped in.
fn exec_in(
    kernel: Kernel,
    cwd: &Path,
    args: &[&str],
    cmd: &[&str],
    stdin: Option<&[u8]>,
) -> Output {
    let mut c = Command::new(ferrovm_bin());
    c.arg("exec")
        .arg("--kernel")
        .arg(kernel.path())
        .args(if args.contains(&"--timeout") {
            &[][..]
        } else {
            &["--timeout", "240"][..]
        })
        .args(args)
        .arg("--")
        .args(cmd)
        .current_dir(cwd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = c.spawn().expect("spawn ferrovm exec");
    if let Some(data) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        let data = data.to_vec();
        // A thread, so a guest that reads slowly cannot deadlock us against its stdout.
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
    }
    child.wait_with_output().expect("wait for ferrovm exec")
}

fn exec(kernel: Kernel, cmd: &[&str]) -> Output {
    exec_in(kernel, &scratch_dir("cwd"), &[], cmd, None)
}

fn dump(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ({} bytes) ---\n{}\n--- stderr ---\n{}",
        o.status.code(),
        o.stdout.len(),
        String::from_utf8_lossy(&o.stdout[..o.stdout.len().min(4000)]),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A fresh directory under target/tmp: not under /tmp or home, so the guest sees it
/// through its read-only root, as it sees a source tree.
fn scratch_dir(tag: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("exec-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut buf)
        .unwrap();
    buf
}

fn exit_statuses(k: Kernel) {
    for n in [0, 1, 42] {
        let o = exec(k, &["sh", "-c", &format!("exit {n}")]);
        assert_eq!(o.status.code(), Some(n), "{}", dump(&o));
        assert!(o.stderr.is_empty(), "nothing on stderr: {}", dump(&o));
    }
}

fn killed_by_a_signal_is_128_plus_n(k: Kernel) {
    let o = exec(k, &["sh", "-c", "kill -KILL $$"]);
    assert_eq!(o.status.code(), Some(128 + 9), "{}", dump(&o));
}

/// 1 MiB of random bytes on stdout and 256 KiB on stderr, from host files the guest reads
/// through its root: both arrive apart and exact.
fn binary_stdout_and_stderr_stay_apart(k: Kernel) {
    let dir = scratch_dir("bin");
    let (a, b) = (random_bytes(1 << 20), random_bytes(256 << 10));
    std::fs::write(dir.join("a.bin"), &a).unwrap();
    std::fs::write(dir.join("b.bin"), &b).unwrap();
    let o = exec_in(
        k,
        &dir,
        &[],
        &["sh", "-c", "cat a.bin; cat b.bin >&2"],
        None,
    );
    assert_eq!(o.status.code(), Some(0), "{}", dump(&o));
    assert!(
        o.stdout == a,
        "stdout differs: {} bytes of {}",
        o.stdout.len(),
        a.len()
    );
    assert!(
        o.stderr == b,
        "stderr differs: {} bytes of {}",
        o.stderr.len(),
        b.len()
    );
}

/// Binary stdin reaches CMD whole, and its end does: `cat` returns only at end-of-file.
fn stdin_is_piped_through_to_its_end(k: Kernel) {
    let data = random_bytes(300 << 10);
    let o = exec_in(k, &scratch_dir("stdin"), &[], &["cat"], Some(&data));
    assert_eq!(o.status.code(), Some(0), "{}", dump(&o));
    assert!(
        o.stdout == data,
        "{} bytes back of {}",
        o.stdout.len(),
        data.len()
    );
    // Empty stdin (/dev/null) is an immediate end-of-file.
    let o = exec(k, &["sh", "-c", "wc -c"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "0",
        "{}",
        dump(&o)
    );
}

/// A --rw directory written in the guest is changed on the host after exit; the rest of
/// the host is read-only, and /tmp is the guest's own.
fn rw_directory_changes_reach_the_host(k: Kernel) {
    let rw = scratch_dir("rw");
    std::fs::write(rw.join("old"), "from the host\n").unwrap();
    let script = format!(
        "set -e; cd {d}; cat old > copy; echo written in the guest > new; rm old; \
         echo tmp > /tmp/x; cat /tmp/x; if touch /etc/ferrovm-exec-probe 2>/dev/null; \
         then echo ROOT-WRITABLE; fi",
        d = rw.display()
    );
    let o = exec_in(
        k,
        &scratch_dir("cwd"),
        &["--rw", rw.to_str().unwrap()],
        &["sh", "-c", &script],
        None,
    );
    assert_eq!(o.status.code(), Some(0), "{}", dump(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "tmp\n", "{}", dump(&o));
    assert_eq!(
        std::fs::read_to_string(rw.join("copy")).unwrap(),
        "from the host\n"
    );
    assert_eq!(
        std::fs::read_to_string(rw.join("new")).unwrap(),
        "written in the guest\n"
    );
    assert!(!rw.join("old").exists(), "the guest's rm reached the host");
    assert!(!Path::new("/etc/ferrovm-exec-probe").exists());
}

/// CMD runs in the caller's directory, with the caller's environment (less DISPLAY and
/// the like).
fn runs_in_the_callers_directory_and_environment(k: Kernel) {
    let dir = scratch_dir("where");
    std::fs::write(dir.join("marker"), "here\n").unwrap();
    let mut c = Command::new(ferrovm_bin());
    c.arg("exec")
        .arg("--kernel")
        .arg(k.path())
        .args(["--timeout", "240", "--"])
        .args([
            "sh",
            "-c",
            "pwd; cat marker; echo \"$FERROVM_TEST_VAR|${DISPLAY-unset}\"",
        ])
        .current_dir(&dir)
        .env("FERROVM_TEST_VAR", "it's kept")
        .env("DISPLAY", ":0")
        .stdin(Stdio::null());
    let o = c.output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", dump(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("{}\nhere\nit's kept|unset\n", dir.display())
    );
}

#[test]
fn exit_statuses_pass_through() {
    sandboxed!();
    exit_statuses(Kernel::Project);
}

#[test]
fn a_command_killed_by_a_signal_gives_128_plus_n() {
    sandboxed!();
    killed_by_a_signal_is_128_plus_n(Kernel::Project);
}

#[test]
fn binary_stdout_and_stderr_arrive_apart_and_whole() {
    sandboxed!();
    binary_stdout_and_stderr_stay_apart(Kernel::Project);
}

#[test]
fn stdin_reaches_the_command_with_its_end() {
    sandboxed!();
    stdin_is_piped_through_to_its_end(Kernel::Project);
}

#[test]
fn a_rw_directory_is_written_through_to_the_host() {
    sandboxed!();
    rw_directory_changes_reach_the_host(Kernel::Project);
}

#[test]
fn the_command_runs_in_the_callers_cwd_and_environment() {
    sandboxed!();
    runs_in_the_callers_directory_and_environment(Kernel::Project);
}

#[test]
fn a_cwd_under_tmp_stays_visible() {
    sandboxed!();
    // /tmp is a tmpfs in the guest: the working directory comes along as a share.
    let dir = std::env::temp_dir().join(format!("ferrovm-exec-cwd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("f"), "under tmp\n").unwrap();
    let o = exec_in(Kernel::Project, &dir, &[], &["cat", "f"], None);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(o.status.code(), Some(0), "{}", dump(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "under tmp\n");
}

#[test]
fn a_guest_panic_exits_255_with_the_reason() {
    sandboxed!();
    let o = exec(
        Kernel::Project,
        &["sh", "-c", "echo c > /proc/sysrq-trigger"],
    );
    assert_eq!(o.status.code(), Some(255), "{}", dump(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("ferrovm: exec: the guest kernel panicked"),
        "{}",
        dump(&o)
    );
    assert_eq!(err.lines().count(), 1, "one line: {}", dump(&o));
}

#[test]
fn the_time_limit_exits_124_with_the_reason() {
    sandboxed!();
    let o = exec_in(
        Kernel::Project,
        &scratch_dir("slow"),
        &["--timeout", "5"],
        &["sleep", "600"],
        None,
    );
    assert_eq!(o.status.code(), Some(124), "{}", dump(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("did not finish within 5 s"), "{}", dump(&o));
}

/// A kernel whose configuration (beside it) has no virtio-fs is refused before it boots,
/// naming the options.
#[test]
fn a_kernel_without_virtio_fs_is_refused_naming_the_option() {
    let dir = scratch_dir("oldkernel");
    let kernel = dir.join("bzImage");
    std::fs::copy(stock_artifacts().0.clone(), &kernel).unwrap();
    let config = std::fs::read_to_string(stock_artifacts().0.with_file_name("config")).unwrap();
    let config: String = config
        .lines()
        .filter(|l| !l.starts_with("CONFIG_VIRTIO_FS=") && !l.starts_with("CONFIG_FUSE_FS="))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(dir.join("config"), config).unwrap();
    let o = Command::new(ferrovm_bin())
        .args(["exec", "--kernel"])
        .arg(&kernel)
        .args(["--", "true"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(255), "{}", dump(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("CONFIG_VIRTIO_FS") && err.contains("CONFIG_FUSE_FS"),
        "{}",
        dump(&o)
    );
}

/// Without a configuration to read, the guest init finds the missing virtio-fs itself and
/// says so through the status port: here the stock kernel, with its modules but for fuse
/// and virtiofs.
#[test]
fn a_kernel_without_virtio_fs_is_reported_by_the_guest() {
    sandboxed!();
    let dir = scratch_dir("nofs");
    let kernel = dir.join("vmlinuz");
    std::fs::copy(stock_artifacts().0.clone(), &kernel).unwrap();
    let src = stock_artifacts().0.with_file_name("modules");
    let dep = std::fs::read_to_string(src.join("modules.dep")).unwrap();
    let mods = dir.join("mods");
    let mut kept = String::new();
    for line in dep.lines() {
        let path = line.split(':').next().unwrap();
        if path.contains("/fuse/") || !src.join(path).exists() {
            continue;
        }
        let to = mods.join(path);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(src.join(path), &to).unwrap();
        kept.push_str(line);
        kept.push('\n');
    }
    std::fs::write(mods.join("modules.dep"), kept).unwrap();
    let o = Command::new(ferrovm_bin())
        .args(["exec", "--timeout", "240", "--kernel"])
        .arg(&kernel)
        .arg("--modules")
        .arg(&mods)
        .args(["--", "true"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(255), "{}", dump(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("the guest could not run the command") && err.contains("CONFIG_VIRTIO_FS"),
        "{}",
        dump(&o)
    );
}

/// No virtiofsd: the error says how to get one, before any VM exists.
#[test]
fn a_missing_virtiofsd_says_how_to_get_one() {
    let o = Command::new(ferrovm_bin())
        .args(["exec", "--kernel"])
        .arg(stock_artifacts().0.clone())
        .args(["--", "true"])
        .env("FERROVM_VIRTIOFSD", "/nonexistent/virtiofsd")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(255), "{}", dump(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("/nonexistent/virtiofsd") && err.contains("cargo install virtiofsd"),
        "{}",
        dump(&o)
    );
    assert_eq!(err.lines().count(), 1, "{}", dump(&o));
}

#[test]
fn stock_kernel_exit_statuses_and_signals() {
    sandboxed!();
    exit_statuses(Kernel::Stock);
    killed_by_a_signal_is_128_plus_n(Kernel::Stock);
}

#[test]
fn stock_kernel_binary_stdio() {
    sandboxed!();
    binary_stdout_and_stderr_stay_apart(Kernel::Stock);
    stdin_is_piped_through_to_its_end(Kernel::Stock);
}

#[test]
fn stock_kernel_rw_directory_cwd_and_environment() {
    sandboxed!();
    rw_directory_changes_reach_the_host(Kernel::Stock);
    runs_in_the_callers_directory_and_environment(Kernel::Stock);
}

/// `ferrovm run --fs`: a share of a host directory, mounted by the project's own guest
/// over virtio-mmio, read and written.
#[test]
fn run_with_fs_over_virtio_mmio() {
    sandboxed!();
    let dir = scratch_dir("fs-mmio");
    std::fs::write(dir.join("in"), "host data\n").unwrap();
    let out = common::Vm::guest_running(
        "mkdir /mnt; mount -t virtiofs share /mnt && cat /mnt/in && echo guest > /mnt/out",
    )
    .arg("--fs")
    .arg(format!("tag=share,path={},transport=mmio", dir.display()))
    .run();
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert_eq!(out.guest_exit(), Some(0), "{}", out.dump());
    assert!(out.stdout.contains("host data"), "{}", out.dump());
    assert_eq!(std::fs::read_to_string(dir.join("out")).unwrap(), "guest\n");
}

/// A directory on a file system that takes Unix sockets (the sandbox's /tmp is 9p).
fn socket_dir() -> PathBuf {
    for base in ["/dev/shm", "/var/tmp", "/run"] {
        let d = Path::new(base).join(format!("ferrovm-test-fs-{}", std::process::id()));
        if std::fs::create_dir_all(&d).is_err() {
            continue;
        }
        if std::os::unix::net::UnixListener::bind(d.join("probe")).is_ok() {
            let _ = std::fs::remove_file(d.join("probe"));
            return d;
        }
        let _ = std::fs::remove_dir_all(&d);
    }
    panic!("no directory here takes Unix sockets");
}

/// `--fs tag=T,socket=PATH` on a virtiofsd the test runs, then kills: the guest's next
/// request fails (ENOTCONN) instead of hanging, ferrovm says so once, and the VM goes on to
/// power off normally.
#[test]
fn a_virtiofsd_that_dies_makes_requests_fail_and_the_vm_goes_on() {
    sandboxed!();
    let dir = scratch_dir("userfs");
    std::fs::write(dir.join("a"), "first\n").unwrap();
    std::fs::write(dir.join("b"), "second\n").unwrap();
    let socks = socket_dir();
    let sock = socks.join("fs.sock");
    // QEMU's C virtiofsd (Debian bookworm's qemu-system-common, in scripts/setup's list)
    // or the Rust one where a distribution ships it instead (trixie: /usr/libexec).
    let qemu = Path::new("/usr/lib/qemu/virtiofsd");
    let mut cmd = if qemu.exists() {
        let mut c = Command::new(qemu);
        c.args(["-o", &format!("source={}", dir.display())]).args([
            "-o",
            "sandbox=chroot",
            "-o",
            "log_level=err",
        ]);
        c
    } else {
        let mut c = Command::new(Path::new("/usr/libexec/virtiofsd"));
        c.arg(format!("--shared-dir={}", dir.display()))
            .arg("--sandbox=chroot");
        c
    };
    let mut daemon = cmd
        .arg(format!("--socket-path={}", sock.display()))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect(
            "start a virtiofsd (QEMU's /usr/lib/qemu/virtiofsd or the Rust one in /usr/libexec)",
        );
    let mut vm = common::Vm::guest_running(
        "mkdir /mnt; mount -t virtiofs u /mnt; cat /mnt/a; echo read-$((6*7)); sleep 10; \
         cat /mnt/b || echo second-read-$((6*7))-failed",
    );
    vm.arg("--fs")
        .arg(format!("tag=u,socket={}", sock.display()));
    let running = vm.spawn_until("read-42", std::time::Duration::from_secs(240));
    let _ = daemon.kill();
    let _ = daemon.wait();
    let out = running.finish(std::time::Duration::from_secs(240));
    let _ = std::fs::remove_dir_all(&socks);
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert_eq!(out.guest_exit(), Some(0), "{}", out.dump());
    assert!(out.stdout.contains("first"), "{}", out.dump());
    assert!(
        out.stdout.contains("second-read-42-failed"),
        "{}",
        out.dump()
    );
    assert!(!out.stdout.contains("\nsecond\n"), "{}", out.dump());
    assert_eq!(
        out.stderr
            .matches("the vhost-user backend (virtiofsd) is gone")
            .count(),
        1,
        "{}",
        out.dump()
    );
}
