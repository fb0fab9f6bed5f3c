//! Just enough HTTP/1.1 (RFC 9112) for a JSON control socket: one request per connection,
//! a request line, headers, and a body of `Content-Length` bytes; and the response that
//! answers it. Anything else (no length, chunked bodies, oversized requests) is an error the
//! caller answers with the matching status.

use std::io::{self, BufRead, BufReader, Read, Write};

/// Largest request line plus headers accepted.
pub const MAX_HEAD: usize = 8 << 10;
/// Largest request body accepted.
pub const MAX_BODY: usize = 64 << 10;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

/// Why a request could not be read; each maps to a status code.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("request too large: {0}")]
    TooLarge(String),
    #[error("failed to read the request")]
    Io(#[from] io::Error),
}

impl HttpError {
    pub fn status(&self) -> u16 {
        match self {
            Self::Malformed(_) | Self::Io(_) => 400,
            Self::TooLarge(_) => 413,
        }
    }
}

/// Reads one request from `stream`.
pub fn read_request(stream: impl Read) -> Result<Request, HttpError> {
    let mut r = BufReader::new(stream.take((MAX_HEAD + MAX_BODY + 1) as u64));
    let mut head = 0usize;
    let mut line = String::new();
    let mut read_line = |r: &mut BufReader<_>, line: &mut String| -> Result<(), HttpError> {
        line.clear();
        let n = r.read_line(line)?;
        head += n;
        if head > MAX_HEAD {
            return Err(HttpError::TooLarge(format!(
                "the request head is longer than {MAX_HEAD} bytes"
            )));
        }
        if n == 0 {
            return Err(HttpError::Malformed(
                "the connection closed mid-request".into(),
            ));
        }
        Ok(())
    };
    read_line(&mut r, &mut line)?;
    let mut parts = line.trim_end().split(' ');
    let (Some(method), Some(path), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed(format!(
            "bad request line {:?}",
            line.trim_end()
        )));
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !path.starts_with('/') {
        return Err(HttpError::Malformed(format!(
            "bad request line {:?}",
            line.trim_end()
        )));
    }
    let (method, path) = (method.to_string(), path.to_string());
    let mut length = 0usize;
    loop {
        read_line(&mut r, &mut line)?;
        let h = line.trim_end();
        if h.is_empty() {
            break;
        }
        let Some((name, value)) = h.split_once(':') else {
            return Err(HttpError::Malformed(format!("bad header {h:?}")));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                length = value
                    .parse()
                    .map_err(|_| HttpError::Malformed(format!("bad Content-Length {value:?}")))?;
                if length > MAX_BODY {
                    return Err(HttpError::TooLarge(format!(
                        "a {length}-byte body; the limit is {MAX_BODY}"
                    )));
                }
            }
            "transfer-encoding" => {
                return Err(HttpError::Malformed(
                    "chunked bodies are not supported; send Content-Length".into(),
                ))
            }
            _ => {}
        }
    }
    let mut body = vec![0u8; length];
    r.read_exact(&mut body)
        .map_err(|_| HttpError::Malformed("the body is shorter than Content-Length".into()))?;
    Ok(Request { method, path, body })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        _ => "",
    }
}

/// Writes a response with a JSON body (none for 204).
pub fn write_response(mut w: impl Write, status: u16, body: &str) -> io::Result<()> {
    let body = if status == 204 { "" } else { body };
    write!(
        w,
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        reason(status),
        body.len()
    )?;
    w.flush()
}

/// Writes a request (the CLI client's side).
pub fn write_request(mut w: impl Write, method: &str, path: &str, body: &str) -> io::Result<()> {
    write!(
        w,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    w.flush()
}

/// Reads a response (the CLI client's side): the status and the body.
pub fn read_response(stream: impl Read) -> Result<(u16, String), HttpError> {
    let mut r = BufReader::new(stream.take((MAX_HEAD + (64 << 20)) as u64));
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| HttpError::Malformed(format!("bad status line {:?}", line.trim_end())))?;
    let mut length = None;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            break;
        }
        let h = line.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((n, v)) = h.split_once(':') {
            if n.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse::<usize>().ok();
            }
        }
    }
    let mut body = Vec::new();
    match length {
        Some(n) => {
            body.resize(n, 0);
            r.read_exact(&mut body)?;
        }
        None => {
            r.read_to_end(&mut body)?;
        }
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_request_with_a_body() {
        let raw = b"PUT /api/v1/vm.snapshot HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n\r\n{\"dir\":\"/x\"}\n";
        let r = read_request(&raw[..]).unwrap();
        assert_eq!(r.method, "PUT");
        assert_eq!(r.path, "/api/v1/vm.snapshot");
        assert_eq!(r.body, b"{\"dir\":\"/x\"}\n");
    }

    #[test]
    fn refuses_garbage_and_oversized_requests() {
        for raw in [
            &b"\x00\x01garbage\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"GET / SPDY/3\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort",
            b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\n",
            b"",
        ] {
            let e = read_request(raw).unwrap_err();
            assert_eq!(e.status(), 400, "{:?}: {e}", String::from_utf8_lossy(raw));
        }
        let big = format!("PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        assert_eq!(read_request(big.as_bytes()).unwrap_err().status(), 413);
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(read_request(long.as_bytes()).unwrap_err().status(), 413);
    }

    #[test]
    fn response_round_trips() {
        let mut out = Vec::new();
        write_response(&mut out, 409, "{\"error\":\"x\"}").unwrap();
        let (status, body) = read_response(&out[..]).unwrap();
        assert_eq!((status, body.as_str()), (409, "{\"error\":\"x\"}"));
        let mut out = Vec::new();
        write_request(&mut out, "GET", "/api/v1/vm.info", "").unwrap();
        let r = read_request(&out[..]).unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("GET", "/api/v1/vm.info")
        );
    }
}
