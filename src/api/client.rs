//! The client side of the control socket: what `ferrovm info|pause|resume|snapshot|metrics|
//! power-button|shutdown --api-sock PATH` send, and how they print the answer.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{http, API_PREFIX};

/// Errors talking to a VMM's socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("Failed to connect to the API socket {path} (is a ferrovm running with --api-sock {path}?)", path = .path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to talk to the VMM on {path}", path = .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("The VMM on {path} answered with something that is not HTTP: {why}", path = .path.display())]
    BadAnswer { path: PathBuf, why: String },
}

/// Sends one request; returns the status and the body.
pub fn call(
    sock: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), ClientError> {
    let stream = UnixStream::connect(sock).map_err(|source| ClientError::Connect {
        path: sock.into(),
        source,
    })?;
    let io = |source| ClientError::Io {
        path: sock.into(),
        source,
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(660)))
        .map_err(io)?;
    http::write_request(&stream, method, path, body).map_err(io)?;
    http::read_response(&stream).map_err(|e| ClientError::BadAnswer {
        path: sock.into(),
        why: e.to_string(),
    })
}

/// Asks the VM behind `sock` to migrate (`PUT vm.migrate`), calling `on_line` with each
/// progress object as it arrives; returns the last one (`completed` or `failed`), or the
/// error answer's status and message when the migration did not start.
pub fn migrate(
    sock: &Path,
    params: &crate::migration::MigrateParams,
    mut on_line: impl FnMut(&serde_json::Value),
) -> Result<Result<serde_json::Value, (u16, String)>, ClientError> {
    use std::io::BufRead;
    let stream = UnixStream::connect(sock).map_err(|source| ClientError::Connect {
        path: sock.into(),
        source,
    })?;
    let io = |source| ClientError::Io {
        path: sock.into(),
        source,
    };
    let bad = |why: String| ClientError::BadAnswer {
        path: sock.into(),
        why,
    };
    let body = serde_json::to_string(params).map_err(|e| bad(e.to_string()))?;
    http::write_request(&stream, "PUT", &format!("{API_PREFIX}/vm.migrate"), &body).map_err(io)?;
    let mut r = std::io::BufReader::new(&stream);
    let mut line = String::new();
    r.read_line(&mut line).map_err(io)?;
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {:?}", line.trim_end())))?;
    // The head; an error answer has a length and a JSON body.
    let mut length = 0usize;
    loop {
        line.clear();
        if r.read_line(&mut line).map_err(io)? == 0 {
            break;
        }
        let h = line.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((n, v)) = h.split_once(':') {
            if n.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    if status != 200 {
        let mut body = vec![0u8; length.min(1 << 20)];
        std::io::Read::read_exact(&mut r, &mut body).map_err(io)?;
        let body = String::from_utf8_lossy(&body).into_owned();
        let msg = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(String::from))
            .unwrap_or(body);
        return Ok(Err((status, msg)));
    }
    let mut last = None;
    loop {
        line.clear();
        if r.read_line(&mut line).map_err(io)? == 0 {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(line.trim_end())
            .map_err(|e| bad(format!("a progress line is not JSON ({e}): {line:?}")))?;
        on_line(&v);
        last = Some(v);
    }
    last.map(Ok).ok_or_else(|| {
        bad("the VMM closed the connection before saying how the migration ended".into())
    })
}

/// The request a client subcommand sends: method, path and body.
pub fn request_for(op: &str, snapshot_dir: Option<&Path>) -> (&'static str, String, String) {
    let (method, route) = match op {
        "info" => ("GET", "/vm.info"),
        "metrics" => ("GET", "/vm.metrics"),
        "pause" => ("PUT", "/vm.pause"),
        "resume" => ("PUT", "/vm.resume"),
        "snapshot" => ("PUT", "/vm.snapshot"),
        "power-button" => ("PUT", "/vm.power-button"),
        _ => ("PUT", "/vm.shutdown"),
    };
    let body = match snapshot_dir {
        Some(d) => serde_json::json!({ "dir": d }).to_string(),
        None => String::new(),
    };
    (method, format!("{API_PREFIX}{route}"), body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subcommands_map_to_routes() {
        let (m, p, b) = request_for("snapshot", Some(Path::new("/tmp/s")));
        assert_eq!((m, p.as_str()), ("PUT", "/api/v1/vm.snapshot"));
        assert_eq!(b, r#"{"dir":"/tmp/s"}"#);
        assert_eq!(request_for("info", None).0, "GET");
        assert!(super::super::ROUTES
            .iter()
            .any(|(_, r, _)| format!("{API_PREFIX}{r}") == request_for("power-button", None).1));
    }

    #[test]
    fn no_socket_is_a_clear_error() {
        let err = call(Path::new("/nonexistent/api.sock"), "GET", "/", "").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/api.sock"), "{msg}");
        assert!(msg.contains("--api-sock"), "{msg}");
    }
}
