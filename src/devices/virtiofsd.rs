//! The host side of virtio-fs: a virtiofsd the VMM starts for `--fs tag=T,path=DIR`, or the
//! socket of one the user runs (`--fs tag=T,socket=PATH`).
//!
//! Which daemon: `$FERROVM_VIRTIOFSD` if set; else the Rust virtiofsd (`virtiofsd` on
//! `PATH`, then `/usr/libexec/virtiofsd`, where distributions put it); else QEMU's C daemon
//! (`/usr/lib/qemu/virtiofsd`, Debian 12's qemu-system-common), which needs root or
//! CAP_SYS_ADMIN and has no read-only mode. The Rust one is preferred: it is maintained
//! (QEMU dropped the C daemon in 8.0), enforces `--readonly`, and runs unprivileged.
//!
//! Lifetime: the daemon serves one connection and exits when it closes, so it ends with
//! the VMM however the VMM ends (a SIGKILLed VMM's socket closes too). On a clean exit the
//! VMM also waits for it (`Drop`), killing it if it lingers, so no zombie is left. It runs
//! in a process group of its own, so a Ctrl-C meant for the VMM does not stop it first.

use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use log::{info, warn};

/// How long a virtiofsd gets to create its socket (the C daemon sets up namespaces first;
/// under nested emulation that takes a while).
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a clean exit waits for the daemon to go after its socket closed.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// The environment variable naming the daemon to use.
pub const VIRTIOFSD_ENV: &str = "FERROVM_VIRTIOFSD";
/// QEMU's C daemon on Debian.
const QEMU_VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";

/// How to get a virtiofsd, for the error that says there is none.
pub const INSTALL_HINT: &str = "install the Rust virtiofsd (`apt-get install libseccomp-dev \
     libcap-ng-dev && cargo install virtiofsd`, then have it on PATH) or QEMU's C daemon \
     (`apt-get install qemu-system-common`, /usr/lib/qemu/virtiofsd, needs root), or name one \
     with FERROVM_VIRTIOFSD=PATH";

/// Errors starting or reaching a virtiofsd.
#[derive(Debug, thiserror::Error)]
pub enum VirtiofsdError {
    #[error("Failed to find virtiofsd: {INSTALL_HINT}")]
    NotFound,
    #[error("Failed to find virtiofsd at {0} ({VIRTIOFSD_ENV}): {INSTALL_HINT}")]
    NotAt(PathBuf),
    #[error("Failed to start {path} for virtio-fs '{tag}'")]
    Spawn {
        path: PathBuf,
        tag: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to start virtiofsd for virtio-fs '{tag}': it exited with {status} before it was ready{hint}{said}")]
    Exited {
        tag: String,
        status: std::process::ExitStatus,
        hint: &'static str,
        /// What it wrote on stderr, as ": ..." (empty if nothing).
        said: String,
    },
    #[error(
        "Failed to connect to the virtiofsd socket {path} of virtio-fs '{tag}' within {secs} s"
    )]
    Timeout {
        path: PathBuf,
        tag: String,
        secs: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to find a directory for the virtiofsd socket (last tried {0})")]
    SocketDir(PathBuf, #[source] std::io::Error),
}

/// Which daemon a binary is: their command lines differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// The Rust virtiofsd (gitlab.com/virtio-fs/virtiofsd).
    Rust,
    /// QEMU's C virtiofsd (QEMU up to 7.2).
    QemuC,
}

/// A virtiofsd binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binary {
    pub path: PathBuf,
    pub flavor: Flavor,
}

impl Binary {
    /// The daemon to use: `$FERROVM_VIRTIOFSD`, else the first found of `search`.
    pub fn find() -> Result<Self, VirtiofsdError> {
        if let Some(path) = std::env::var_os(VIRTIOFSD_ENV) {
            let path = PathBuf::from(path);
            if !is_executable(&path) {
                return Err(VirtiofsdError::NotAt(path));
            }
            return Ok(Self::at(path));
        }
        let path_env = std::env::var_os("PATH").unwrap_or_default();
        search(&path_env, &["/usr/libexec/virtiofsd", QEMU_VIRTIOFSD])
            .map(Self::at)
            .ok_or(VirtiofsdError::NotFound)
    }

    /// A binary at `path`: QEMU's when it is QEMU's path or says so in its help.
    fn at(path: PathBuf) -> Self {
        let flavor = if path == Path::new(QEMU_VIRTIOFSD) || help_mentions(&path, "-o source=") {
            Flavor::QemuC
        } else {
            Flavor::Rust
        };
        Self { path, flavor }
    }

    /// The command line serving `dir` on `socket`.
    fn args(&self, socket: &Path, dir: &Path, readonly: bool) -> Vec<String> {
        let socket = format!("--socket-path={}", socket.display());
        // The default sandbox pivots into the shared directory, which fails where the VMM
        // itself runs in a chroot (as in scripts/kvm-sandbox); as root, chroot(2) into it
        // confines the daemon as well. Unprivileged, the Rust daemon's namespace sandbox.
        let root = std::fs::metadata("/proc/self").is_ok_and(|m| {
            use std::os::unix::fs::MetadataExt;
            m.uid() == 0
        });
        match self.flavor {
            Flavor::Rust => {
                let mut a = vec![
                    socket,
                    format!("--shared-dir={}", dir.display()),
                    "--cache=auto".into(),
                    "--log-level=error".into(),
                    "--announce-submounts".into(),
                ];
                if root {
                    a.push("--sandbox=chroot".into());
                }
                if readonly {
                    a.push("--readonly".into());
                }
                a
            }
            Flavor::QemuC => vec![
                socket,
                "-o".into(),
                format!("source={}", dir.display()),
                "-o".into(),
                "cache=auto".into(),
                "-o".into(),
                "log_level=err".into(),
                "-o".into(),
                "announce_submounts".into(),
                "-o".into(),
                "sandbox=chroot".into(),
            ],
        }
    }
}

/// The first `virtiofsd` in the `PATH` list, else the first executable of `fallbacks`.
pub fn search(path_env: &std::ffi::OsStr, fallbacks: &[&str]) -> Option<PathBuf> {
    std::env::split_paths(path_env)
        .map(|d| d.join("virtiofsd"))
        .chain(fallbacks.iter().map(PathBuf::from))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn help_mentions(path: &Path, what: &str) -> bool {
    Command::new(path)
        .arg("--help")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(what))
}

/// A virtiofsd this VMM started, serving one share.
pub struct Virtiofsd {
    child: Child,
    tag: String,
}

/// Tells the socket paths of one process's daemons apart.
static NEXT_SOCKET: AtomicUsize = AtomicUsize::new(0);

impl Virtiofsd {
    /// Starts `bin` serving `dir` for `tag` and connects to it, waiting until it is ready
    /// (at most `READY_TIMEOUT`). The socket file is removed once connected: the daemon
    /// takes one connection only.
    pub fn start(
        bin: &Binary,
        tag: &str,
        dir: &Path,
        readonly: bool,
    ) -> Result<(Self, UnixStream), VirtiofsdError> {
        let sock_dir = socket_dir()?;
        let socket = sock_dir.join("virtiofsd.sock");
        if readonly && bin.flavor == Flavor::QemuC {
            // Info, not a warning: `ferrovm exec` mounts its read-only shares with -o ro,
            // and says so in its documentation; so does the README for --fs.
            info!(
                "virtio-fs '{tag}': QEMU's C virtiofsd has no read-only mode; the share is \
                 writable unless the guest mounts it read-only (mount -o ro)"
            );
        }
        // Its stderr goes to an unlinked file: read back when it fails to start, and
        // otherwise unseen (the C daemon reports the closing socket at exit, which would
        // land in the middle of `ferrovm exec`'s stderr).
        let log_path = sock_dir.join("stderr");
        let log = std::fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&log_path)
            .map_err(|e| VirtiofsdError::SocketDir(log_path.clone(), e))?;
        let _ = std::fs::remove_file(&log_path);
        let child_log = log
            .try_clone()
            .map_err(|e| VirtiofsdError::SocketDir(log_path.clone(), e))?;
        let child = Command::new(&bin.path)
            .args(bin.args(&socket, dir, readonly))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(child_log)
            .process_group(0)
            .spawn()
            .map_err(|source| VirtiofsdError::Spawn {
                path: bin.path.clone(),
                tag: tag.into(),
                source,
            });
        let mut daemon = match child {
            Ok(child) => Self {
                child,
                tag: tag.into(),
            },
            Err(e) => {
                let _ = std::fs::remove_dir(&sock_dir);
                return Err(e);
            }
        };
        let hint = if bin.flavor == Flavor::QemuC {
            " (QEMU's C virtiofsd needs root or CAP_SYS_ADMIN)"
        } else {
            ""
        };
        let stream = connect(&socket, tag, READY_TIMEOUT, || {
            daemon
                .child
                .try_wait()
                .ok()
                .flatten()
                .map(|status| VirtiofsdError::Exited {
                    tag: tag.into(),
                    status,
                    hint,
                    said: last_words(&log),
                })
        });
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_dir(&sock_dir);
        let stream = stream?;
        info!(
            "virtio-fs '{tag}': {} (pid {}) serves {}{}",
            bin.path.display(),
            daemon.child.id(),
            dir.display(),
            if readonly { " read-only" } else { "" }
        );
        // `daemon` is dropped (and the child reaped) if the caller's setup fails later.
        daemon.tag = tag.into();
        Ok((daemon, stream))
    }
}

/// The last line a failed daemon wrote to its stderr file, as ": LINE".
fn last_words(mut log: &std::fs::File) -> String {
    use std::io::{Read, Seek};
    let mut text = String::new();
    if log.rewind().is_ok() {
        let _ = log.read_to_string(&mut text);
    }
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| format!(": {}", l.trim()))
        .unwrap_or_default()
}

/// A new private directory (mode 0700) where a Unix socket can live: the first of
/// `$XDG_RUNTIME_DIR`, the temporary directory, /dev/shm, /var/tmp and /run where binding
/// one works (not every file system takes sockets: a 9p or FUSE /tmp may refuse them).
fn socket_dir() -> Result<PathBuf, VirtiofsdError> {
    let name = format!(
        "ferrovm-{}-fs{}",
        std::process::id(),
        NEXT_SOCKET.fetch_add(1, Ordering::Relaxed)
    );
    let mut bases: Vec<PathBuf> = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    bases.push(std::env::temp_dir());
    bases.extend(["/dev/shm", "/var/tmp", "/run"].map(PathBuf::from));
    let mut last = None;
    for base in bases {
        let dir = base.join(&name);
        if let Err(e) = std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            last = Some((dir, e));
            continue;
        }
        let probe = dir.join("probe.sock");
        match std::os::unix::net::UnixListener::bind(&probe) {
            Ok(_) => {
                let _ = std::fs::remove_file(&probe);
                return Ok(dir);
            }
            Err(e) => {
                let _ = std::fs::remove_file(&probe);
                let _ = std::fs::remove_dir(&dir);
                last = Some((dir, e));
            }
        }
    }
    let (dir, e) = last.expect("at least one candidate");
    Err(VirtiofsdError::SocketDir(dir, e))
}

/// Connects to `path`, retrying until `timeout`; `gone` says whether the process that
/// should create it has died (then waiting longer is pointless).
pub fn connect(
    path: &Path,
    tag: &str,
    timeout: Duration,
    mut gone: impl FnMut() -> Option<VirtiofsdError>,
) -> Result<UnixStream, VirtiofsdError> {
    let start = Instant::now();
    loop {
        let err = match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) => e,
        };
        if let Some(e) = gone() {
            return Err(e);
        }
        if start.elapsed() >= timeout {
            return Err(VirtiofsdError::Timeout {
                path: path.into(),
                tag: tag.into(),
                secs: timeout.as_secs(),
                source: err,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Virtiofsd {
    /// Reaps the daemon: it exits once its socket closed (the device went before it);
    /// one that lingers is killed.
    fn drop(&mut self) {
        let deadline = Instant::now() + EXIT_GRACE;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => break,
            }
        }
        warn!(
            "virtio-fs '{}': virtiofsd (pid {}) did not exit with its socket closed; killing it",
            self.tag,
            self.child.id()
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_comes_before_the_fallbacks() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let bin = dir.as_path().join("virtiofsd");
        assert_eq!(search(dir.as_path().as_os_str(), &[]), None);
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        // Not executable yet: skipped.
        assert_eq!(search(dir.as_path().as_os_str(), &[]), None);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            search(dir.as_path().as_os_str(), &["/bin/sh"]),
            Some(bin.clone())
        );
        assert_eq!(
            search(
                std::ffi::OsStr::new("/nonexistent"),
                &["/nonexistent/x", "/bin/sh"]
            ),
            Some(PathBuf::from("/bin/sh"))
        );
        assert_eq!(search(std::ffi::OsStr::new(""), &["/nonexistent/x"]), None);
    }

    #[test]
    fn command_lines_per_flavor() {
        let rust = Binary {
            path: "/usr/bin/virtiofsd".into(),
            flavor: Flavor::Rust,
        };
        let a = rust.args(Path::new("/s"), Path::new("/d"), true);
        assert!(a.contains(&"--shared-dir=/d".to_string()), "{a:?}");
        assert!(a.contains(&"--readonly".to_string()));
        assert!(a.contains(&"--socket-path=/s".to_string()));
        let c = Binary {
            path: QEMU_VIRTIOFSD.into(),
            flavor: Flavor::QemuC,
        };
        let a = c.args(Path::new("/s"), Path::new("/d"), true);
        assert!(a.contains(&"source=/d".to_string()), "{a:?}");
        assert!(!a.iter().any(|x| x.contains("readonly")));
    }

    #[test]
    fn a_daemon_that_exits_early_is_reported_not_waited_for() {
        // /bin/false takes any arguments and exits 1 without creating a socket.
        let bin = Binary {
            path: "/bin/false".into(),
            flavor: Flavor::Rust,
        };
        let start = Instant::now();
        let err = Virtiofsd::start(&bin, "t", Path::new("/"), false)
            .err()
            .unwrap();
        assert!(matches!(err, VirtiofsdError::Exited { .. }), "{err}");
        assert!(start.elapsed() < READY_TIMEOUT);
    }

    #[test]
    fn an_absent_socket_times_out_with_its_path() {
        let err = connect(
            Path::new("/nonexistent/sock"),
            "t",
            Duration::from_millis(50),
            || None,
        )
        .err()
        .unwrap();
        let msg = err.to_string();
        assert!(
            msg.contains("/nonexistent/sock") && msg.contains("'t'"),
            "{msg}"
        );
    }
}
