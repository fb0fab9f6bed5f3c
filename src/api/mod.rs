//! The control socket (`--api-sock PATH`): HTTP/1.1 with JSON bodies over a Unix socket, as
//! Firecracker's and Cloud Hypervisor's are, so `curl --unix-socket PATH` works, and the
//! `ferrovm info|pause|resume|snapshot|...` client subcommands (`client`).
//!
//! A thread of its own accepts connections, reads one request each, and hands the command to
//! the event loop (a channel, and an eventfd that wakes the loop), which runs it between
//! device events and answers. Malformed, oversized or unknown requests are answered on the
//! socket thread with an error and never reach the VM. The socket is created with mode
//! 0600: only its owner (and root) may connect. The routes and their answers are documented
//! in `docs/api/openapi.json`, which a unit test holds to `ROUTES`.

pub mod client;
pub mod http;

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, error, info, warn};
use serde_json::{json, Value};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Base of every route.
pub const API_PREFIX: &str = "/api/v1";
/// How long a request waits for the event loop (a snapshot of a large guest takes a while).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What the event loop is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Info,
    Pause,
    Resume,
    Snapshot {
        dir: PathBuf,
    },
    Metrics,
    PowerButton,
    Shutdown,
    /// Live migration; its progress streams back on the requesting connection.
    Migrate(crate::migration::MigrateParams),
}

/// Every route: method, path under `API_PREFIX`, and the statuses it answers with.
pub const ROUTES: &[(&str, &str, &[u16])] = &[
    ("GET", "/vm.info", &[200]),
    ("PUT", "/vm.pause", &[204, 409, 500]),
    ("PUT", "/vm.resume", &[204, 409]),
    ("PUT", "/vm.snapshot", &[200, 400, 409, 500]),
    ("GET", "/vm.metrics", &[200]),
    ("PUT", "/vm.power-button", &[204, 409]),
    ("PUT", "/vm.shutdown", &[204]),
    ("PUT", "/vm.migrate", &[200, 400, 409, 500]),
];

/// The event loop's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    pub fn ok(body: Value) -> Self {
        Self { status: 200, body }
    }

    pub fn no_content() -> Self {
        Self {
            status: 204,
            body: Value::Null,
        }
    }

    /// The answer is the event loop's to write on the connection (a migration's progress):
    /// the socket thread writes nothing.
    pub fn streamed() -> Self {
        Self {
            status: 0,
            body: Value::Null,
        }
    }

    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            body: json!({ "error": message.into() }),
        }
    }
}

/// Maps a request to a command, or to the error reply it gets.
pub fn route(req: &http::Request) -> Result<Command, Reply> {
    let Some(path) = req.path.strip_prefix(API_PREFIX) else {
        return Err(Reply::error(
            404,
            format!("no route {}: the API is under {API_PREFIX}/", req.path),
        ));
    };
    let Some(&(method, _, _)) = ROUTES.iter().find(|(_, p, _)| *p == path) else {
        return Err(Reply::error(404, format!("no route {}", req.path)));
    };
    if req.method != method {
        return Err(Reply::error(
            405,
            format!("{} takes {method}, not {}", req.path, req.method),
        ));
    }
    let body = || -> Result<Value, Reply> {
        if req.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(json!({}));
        }
        serde_json::from_slice(&req.body)
            .map_err(|e| Reply::error(400, format!("the body is not JSON: {e}")))
    };
    Ok(match path {
        "/vm.info" => Command::Info,
        "/vm.pause" => Command::Pause,
        "/vm.resume" => Command::Resume,
        "/vm.metrics" => Command::Metrics,
        "/vm.power-button" => Command::PowerButton,
        "/vm.shutdown" => Command::Shutdown,
        "/vm.snapshot" => {
            let v = body()?;
            let dir = v
                .get("dir")
                .and_then(Value::as_str)
                .filter(|d| !d.is_empty())
                .ok_or_else(|| {
                    Reply::error(400, "vm.snapshot needs {\"dir\": \"/path/to/snapshot\"}")
                })?;
            Command::Snapshot { dir: dir.into() }
        }
        "/vm.migrate" => {
            let params: crate::migration::MigrateParams =
                serde_json::from_value(body()?).map_err(|e| {
                    Reply::error(
                        400,
                        format!(
                            "vm.migrate needs {{\"to\": \"unix:PATH|tcp:IP:PORT\"}} and takes \
                             local, downtime_ms, max_passes, timeout_s: {e}"
                        ),
                    )
                })?;
            params.validate().map_err(|e| Reply::error(400, e))?;
            Command::Migrate(params)
        }
        _ => unreachable!("every route is matched above"),
    })
}

/// Errors setting up the socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("The API socket {0} is in use by another process")]
    InUse(PathBuf),
    #[error("Failed to create the API socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Failed to start the API thread")]
    Thread(#[source] io::Error),
}

/// A request on its way to the event loop, with where the answer goes.
pub struct Pending {
    pub cmd: Command,
    pub reply: Sender<Reply>,
    /// The requesting connection, for a command that streams its answer (vm.migrate).
    pub stream: Option<UnixStream>,
}

/// The listening socket, before its thread runs.
pub struct ApiSocket {
    path: PathBuf,
    listener: UnixListener,
}

impl ApiSocket {
    /// Creates the socket at `path` (mode 0600), replacing a stale one nobody listens on.
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(ApiError::InUse(path.into()));
            }
            let _ = std::fs::remove_file(path);
        }
        let bind_err = |source| ApiError::Bind {
            path: path.into(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        info!("API socket at {}", path.display());
        Ok(Self {
            path: path.into(),
            listener,
        })
    }

    /// Starts the socket's thread; returns its handle, the command queue and the eventfd
    /// written whenever a command is queued.
    pub fn start(self) -> Result<(ApiServer, Receiver<Pending>, EventFd), ApiError> {
        let (tx, rx) = mpsc::channel();
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(ApiError::Thread)?;
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(ApiError::Thread)?;
        let (wake2, stop2) = (
            wake.try_clone().map_err(ApiError::Thread)?,
            stop.try_clone().map_err(ApiError::Thread)?,
        );
        let path = self.path.clone();
        // Made here: the thread's filter allows waiting on an epoll, not creating one.
        let epoll = Epoll::new().map_err(ApiError::Thread)?;
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Api);
                serve(&epoll, self.listener, &tx, &wake2, &stop2);
            })
            .map_err(ApiError::Thread)?;
        Ok((
            ApiServer {
                path,
                stop,
                thread: Some(thread),
            },
            rx,
            wake,
        ))
    }
}

/// The running socket thread; stopping it removes the socket.
pub struct ApiServer {
    path: PathBuf,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            if t.join().is_err() {
                error!("the API thread panicked");
            }
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

const TOKEN_LISTENER: u64 = 0;
const TOKEN_STOP: u64 = 1;

fn serve(
    epoll: &Epoll,
    listener: UnixListener,
    tx: &Sender<Pending>,
    wake: &EventFd,
    stop: &EventFd,
) {
    for (fd, token) in [
        (listener.as_raw_fd(), TOKEN_LISTENER),
        (stop.as_raw_fd(), TOKEN_STOP),
    ] {
        if let Err(e) = epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        ) {
            error!("API: cannot watch the socket: {e}");
            return;
        }
    }
    let mut events = vec![EpollEvent::default(); 2];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!("API: epoll failed: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            if ev.data() == TOKEN_STOP {
                return;
            }
            match listener.accept() {
                Ok((stream, _)) => handle(stream, tx, wake),
                Err(e) => warn!("API: accept failed: {e}"),
            }
        }
    }
}

/// Reads one request, has it run, writes the answer.
fn handle(stream: UnixStream, tx: &Sender<Pending>, wake: &EventFd) {
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let reply = match http::read_request(&stream) {
        Err(e) => {
            warn!("API: {e}");
            Reply::error(e.status(), e.to_string())
        }
        Ok(req) => {
            debug!("API: {} {}", req.method, req.path);
            match route(&req) {
                Err(reply) => reply,
                Ok(cmd) => {
                    let stream = match cmd {
                        Command::Migrate(_) => stream.try_clone().ok(),
                        _ => None,
                    };
                    run(cmd, tx, wake, stream)
                }
            }
        }
    };
    if reply.status == 0 {
        // Answered by whoever took the connection.
        return;
    }
    let body = if reply.body.is_null() {
        String::new()
    } else {
        reply.body.to_string()
    };
    if let Err(e) = http::write_response(&stream, reply.status, &body) {
        debug!("API: cannot answer: {e}");
    }
}

fn run(cmd: Command, tx: &Sender<Pending>, wake: &EventFd, stream: Option<UnixStream>) -> Reply {
    let (rtx, rrx) = mpsc::channel();
    let pending = Pending {
        cmd,
        reply: rtx,
        stream,
    };
    if tx.send(pending).is_err() {
        return Reply::error(500, "the VM is shutting down");
    }
    let _ = wake.write(1);
    rrx.recv_timeout(COMMAND_TIMEOUT)
        .unwrap_or_else(|_| Reply::error(500, "the VM did not answer"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str, body: &str) -> http::Request {
        http::Request {
            method: method.into(),
            path: path.into(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn routes_map_to_commands_and_errors_to_statuses() {
        assert_eq!(route(&req("GET", "/api/v1/vm.info", "")), Ok(Command::Info));
        assert_eq!(
            route(&req("PUT", "/api/v1/vm.pause", "")),
            Ok(Command::Pause)
        );
        assert_eq!(
            route(&req("PUT", "/api/v1/vm.snapshot", r#"{"dir": "/s"}"#)),
            Ok(Command::Snapshot { dir: "/s".into() })
        );
        let status = |m: &str, p: &str, b: &str| route(&req(m, p, b)).unwrap_err().status;
        assert_eq!(status("GET", "/api/v1/vm.nothing", ""), 404);
        assert_eq!(status("GET", "/vm.info", ""), 404);
        assert_eq!(status("GET", "/api/v1/vm.pause", ""), 405);
        assert_eq!(status("PUT", "/api/v1/vm.snapshot", "{"), 400);
        assert_eq!(status("PUT", "/api/v1/vm.snapshot", "{}"), 400);
        assert_eq!(status("PUT", "/api/v1/vm.snapshot", r#"{"dir": 3}"#), 400);
    }

    /// The committed OpenAPI document describes exactly the routes served, with the same
    /// methods and statuses.
    #[test]
    fn the_openapi_schema_matches_the_routes() {
        let doc: Value = serde_json::from_str(include_str!("../../docs/api/openapi.json")).unwrap();
        assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
        let paths = doc["paths"].as_object().unwrap();
        assert_eq!(paths.len(), ROUTES.len(), "routes in the schema");
        for (method, path, statuses) in ROUTES {
            let full = format!("{API_PREFIX}{path}");
            let ops = paths
                .get(&full)
                .unwrap_or_else(|| panic!("{full} missing from the schema"));
            let ops = ops.as_object().unwrap();
            assert_eq!(ops.len(), 1, "{full}: one method");
            let op = &ops[&method.to_ascii_lowercase()];
            let mut documented: Vec<u16> = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .map(|k| k.parse().unwrap())
                .collect();
            documented.sort();
            let mut want = statuses.to_vec();
            // Every route may also answer 400 (unreadable request) and 413 (too large).
            want.extend([400, 413]);
            want.sort();
            want.dedup();
            assert_eq!(documented, want, "{full}: statuses");
        }
    }

    #[test]
    fn a_socket_in_use_is_refused_and_a_stale_one_replaced() {
        let dir = std::env::temp_dir().join(format!("ferrovm-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let first = ApiSocket::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "only the owner may connect");
        assert!(matches!(ApiSocket::bind(&path), Err(ApiError::InUse(_))));
        drop(first);
        // The file is left behind with nobody listening: taken over.
        ApiSocket::bind(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_request_goes_through_the_loop_and_back() {
        let dir = std::env::temp_dir().join(format!("ferrovm-api-test2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let (mut server, rx, wake) = ApiSocket::bind(&path).unwrap().start().unwrap();
        let answer = std::thread::spawn(move || {
            let Pending { cmd, reply, .. } = rx.recv().unwrap();
            // The wakeup is written just after the command is queued: wait for it.
            let woken = (0..200).any(|_| {
                wake.read().is_ok() || {
                    std::thread::sleep(Duration::from_millis(5));
                    false
                }
            });
            assert!(woken, "the event loop is woken for a queued command");
            reply
                .send(Reply::ok(json!({ "got": format!("{cmd:?}") })))
                .unwrap();
        });
        let (status, body) = client::call(&path, "GET", "/api/v1/vm.info", "").unwrap();
        assert_eq!(status, 200);
        assert!(body.contains("Info"), "{body}");
        answer.join().unwrap();
        // Garbage gets an error without reaching the loop.
        let mut s = UnixStream::connect(&path).unwrap();
        std::io::Write::write_all(&mut s, b"\x16\x03\x01 hello\r\n\r\n").unwrap();
        let (status, _) = http::read_response(&s).unwrap();
        assert_eq!(status, 400);
        server.stop();
        assert!(!path.exists(), "the socket is removed");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
