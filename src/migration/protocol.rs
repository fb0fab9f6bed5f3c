//! The migration stream: a preamble line each way, then frames.
//!
//! ```text
//! destination -> source   FERROVM-MIGRATION 1\n      (first, on accepting)
//! source -> destination   FERROVM-MIGRATION 1\n      (or the destination sends ERROR)
//! frame                   kind: u32 LE, length: u64 LE, payload: length bytes
//! ```
//! Every frame kind has a largest payload (`Kind::max_len`): a length past it is a garbled
//! stream or another protocol and ends the migration before anything is allocated. On a
//! Unix socket a frame may carry one file descriptor (SCM_RIGHTS, with the frame's first
//! byte): local migration hands over the guest-memory memfd and the TAPs that way, so
//! every frame header on a Unix socket is read with `recvmsg`.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The protocol this ferrovm speaks.
pub const VERSION: u32 = 1;
const PREAMBLE: &str = "FERROVM-MIGRATION";
/// Longest preamble line read before giving up on the peer.
const PREAMBLE_MAX: usize = 64;
const HEADER_LEN: usize = 12;
/// Guest pages per PAGES record at most (1 MiB).
pub const PAGES_PER_RECORD: u64 = 256;
pub const PAGE_SIZE: u64 = 4096;
/// A PAGES record's header: guest address u64, page count u32, flags u32.
pub const RECORD_HEADER_LEN: usize = 16;
/// Record flag: the pages are zero (no data follows).
pub const RECORD_ZERO: u32 = 1;
/// Most bytes of page records in one frame.
pub const PAGES_FRAME_MAX: u64 = 4 << 20;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Source: `{ferrovm, local, config, memory}` (JSON); local mode: the memfd with it.
    Config,
    /// Source: page records (`RECORD_HEADER_LEN` bytes each, then the pages' bytes unless
    /// the record is of zero pages).
    Pages,
    /// Source: the VM's state (the snapshot's JSON, without memory).
    State,
    /// Source (test mode): `{ram_hash}` of all guest memory at the switch-over.
    Verify,
    /// Source: one TAP's fd (local mode), `{nic}`.
    Tap,
    /// Source: the disks and TAPs are let go; build the VM and run it.
    Commit,
    /// Source: giving up, `{error}`.
    Abort,
    /// Destination: done with the last request, `{...}`.
    Ok,
    /// Destination: cannot go on, `{error}`.
    Error,
}

impl Kind {
    fn code(self) -> u32 {
        match self {
            Self::Config => 1,
            Self::Pages => 2,
            Self::State => 3,
            Self::Verify => 4,
            Self::Tap => 5,
            Self::Commit => 6,
            Self::Abort => 7,
            Self::Ok => 100,
            Self::Error => 101,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            1 => Self::Config,
            2 => Self::Pages,
            3 => Self::State,
            4 => Self::Verify,
            5 => Self::Tap,
            6 => Self::Commit,
            7 => Self::Abort,
            100 => Self::Ok,
            101 => Self::Error,
            _ => return None,
        })
    }

    /// The largest payload of this kind.
    pub fn max_len(self) -> u64 {
        match self {
            // A frame is sent once it reaches PAGES_FRAME_MAX: the last record (a run of at
            // most PAGES_PER_RECORD pages) may take it past by that much.
            Self::Pages => {
                PAGES_FRAME_MAX + PAGES_PER_RECORD * PAGE_SIZE + RECORD_HEADER_LEN as u64
            }
            Self::State => 256 << 20,
            Self::Config => 1 << 20,
            _ => 64 << 10,
        }
    }
}

/// Errors on the stream.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("the connection failed")]
    Io(#[from] io::Error),
    #[error("the peer closed the connection")]
    Closed,
    #[error("the peer is not a ferrovm migration peer (it sent {0:?})")]
    NotFerrovm(String),
    #[error("the peer speaks migration protocol {theirs}; this ferrovm ({version}) speaks {VERSION}", version = env!("CARGO_PKG_VERSION"))]
    Version { theirs: String },
    #[error("the peer sent a frame of unknown kind {0} (a garbled stream or another protocol)")]
    UnknownKind(u32),
    #[error("the peer sent a {kind:?} frame of {len} bytes, more than the {max} it may be")]
    TooLong { kind: Kind, len: u64, max: u64 },
    #[error("the peer sent a {got:?} frame where {want} was due")]
    Unexpected { got: Kind, want: &'static str },
    #[error("a {kind:?} frame is malformed: {why}")]
    Malformed { kind: Kind, why: String },
    #[error("the peer gave up: {0}")]
    Peer(String),
}

/// One frame as received.
pub struct Frame {
    pub kind: Kind,
    pub payload: Vec<u8>,
    /// The file descriptor it carried (Unix sockets only).
    pub fd: Option<OwnedFd>,
}

impl Frame {
    /// The payload as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, ProtocolError> {
        serde_json::from_slice(&self.payload).map_err(|e| ProtocolError::Malformed {
            kind: self.kind,
            why: e.to_string(),
        })
    }

    /// Turns an ERROR or ABORT frame into the peer's message.
    pub fn into_peer_error(self) -> ProtocolError {
        let msg = serde_json::from_slice::<serde_json::Value>(&self.payload)
            .ok()
            .and_then(|v| v["error"].as_str().map(String::from))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.payload).into_owned());
        ProtocolError::Peer(msg)
    }
}

/// A connection to the other side.
pub enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    /// A second handle on the same socket (to shut it down from another thread).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Unix(s) => Self::Unix(s.try_clone()?),
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
        })
    }

    /// Ends the connection both ways (a blocked reader or writer returns).
    pub fn shutdown(&self) {
        let _ = match self {
            Self::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Self::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    pub fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Self::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    pub fn is_unix(&self) -> bool {
        matches!(self, Self::Unix(_))
    }

    /// Writes this side's preamble.
    pub fn send_preamble(&mut self) -> Result<(), ProtocolError> {
        self.write_all(format!("{PREAMBLE} {VERSION}\n").as_bytes())?;
        Ok(())
    }

    /// Reads the peer's preamble and checks its version.
    pub fn read_preamble(&mut self) -> Result<(), ProtocolError> {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while line.len() < PREAMBLE_MAX {
            match self.read(&mut byte) {
                Ok(0) if line.is_empty() => return Err(ProtocolError::Closed),
                Ok(0) => break,
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) => line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let text = String::from_utf8_lossy(&line).into_owned();
        let Some(version) = text
            .strip_prefix(PREAMBLE)
            .and_then(|r| r.strip_prefix(' '))
        else {
            return Err(ProtocolError::NotFerrovm(text));
        };
        if version != VERSION.to_string() {
            return Err(ProtocolError::Version {
                theirs: version.to_owned(),
            });
        }
        Ok(())
    }

    /// Sends one frame, with `fd` attached on a Unix socket.
    pub fn send(
        &mut self,
        kind: Kind,
        payload: &[u8],
        fd: Option<RawFd>,
    ) -> Result<(), ProtocolError> {
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&kind.code().to_le_bytes());
        header[4..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        match (fd, &*self) {
            (Some(fd), Self::Unix(s)) => {
                // The fd goes with the header's bytes; whatever of them sendmsg did not take
                // follows in plain writes.
                let sent = s.send_with_fd(&header[..], fd).map_err(io::Error::from)?;
                self.write_all(&header[sent..])?;
            }
            (Some(_), Self::Tcp(_)) => {
                return Err(ProtocolError::Io(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "file descriptors go over Unix sockets only",
                )))
            }
            (None, _) => self.write_all(&header)?,
        }
        self.write_all(payload)?;
        Ok(())
    }

    /// Sends a frame whose payload is `pieces`, one after the other, with vectored writes
    /// (the pages of a frame go from guest memory to the socket without a copy of their
    /// own).
    pub fn send_pieces(&mut self, kind: Kind, pieces: &[&[u8]]) -> Result<(), ProtocolError> {
        let len: usize = pieces.iter().map(|p| p.len()).sum();
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&kind.code().to_le_bytes());
        header[4..].copy_from_slice(&(len as u64).to_le_bytes());
        let mut all: Vec<io::IoSlice<'_>> = Vec::with_capacity(pieces.len() + 1);
        all.push(io::IoSlice::new(&header));
        all.extend(
            pieces
                .iter()
                .filter(|p| !p.is_empty())
                .map(|p| io::IoSlice::new(p)),
        );
        // writev takes at most IOV_MAX (1024) pieces at a time.
        let mut rest = &mut all[..];
        while !rest.is_empty() {
            let n = rest.len().min(1024);
            let written = match self.write_vectored(&rest[..n]) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            io::IoSlice::advance_slices(&mut rest, written);
        }
        Ok(())
    }

    /// Sends a frame whose payload is `value` as JSON.
    pub fn send_json(
        &mut self,
        kind: Kind,
        value: &serde_json::Value,
        fd: Option<RawFd>,
    ) -> Result<(), ProtocolError> {
        self.send(kind, value.to_string().as_bytes(), fd)
    }

    /// Receives one frame.
    pub fn recv(&mut self) -> Result<Frame, ProtocolError> {
        let mut header = [0u8; HEADER_LEN];
        let mut got = 0;
        let mut fd = None;
        while got < HEADER_LEN {
            let n = match self {
                Self::Unix(s) => {
                    let (n, f) = s
                        .recv_with_fd(&mut header[got..])
                        .map_err(io::Error::from)?;
                    if let Some(f) = f {
                        fd = Some(OwnedFd::from(f));
                    }
                    n
                }
                Self::Tcp(s) => match s.read(&mut header[got..]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => r?,
                },
            };
            if n == 0 {
                return Err(ProtocolError::Closed);
            }
            got += n;
        }
        let code = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        let len = u64::from_le_bytes(header[4..].try_into().expect("8 bytes"));
        let kind = Kind::from_code(code).ok_or(ProtocolError::UnknownKind(code))?;
        if len > kind.max_len() {
            return Err(ProtocolError::TooLong {
                kind,
                len,
                max: kind.max_len(),
            });
        }
        let mut payload = vec![0u8; len as usize];
        self.read_exact(&mut payload).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                ProtocolError::Closed
            } else {
                e.into()
            }
        })?;
        Ok(Frame { kind, payload, fd })
    }

    /// After a failed write: the reason the peer gave before it closed the connection (an
    /// ERROR or ABORT frame waiting to be read), if it gave one.
    pub fn peer_reason(&mut self) -> Option<ProtocolError> {
        self.set_timeout(Some(Duration::from_secs(2))).ok()?;
        // What was in flight towards us before the peer's frame is skipped.
        for _ in 0..64 {
            match self.recv() {
                Ok(f) if matches!(f.kind, Kind::Error | Kind::Abort) => {
                    return Some(f.into_peer_error())
                }
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    }

    /// Waits for the destination's answer: its OK payload, or its error.
    pub fn expect_ok(&mut self, after: &'static str) -> Result<serde_json::Value, ProtocolError> {
        let frame = self.recv()?;
        match frame.kind {
            Kind::Ok => frame.json(),
            Kind::Error => Err(frame.into_peer_error()),
            got => Err(ProtocolError::Unexpected { got, want: after }),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.read(buf),
            Self::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.write(buf),
            Self::Tcp(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.write_vectored(bufs),
            Self::Tcp(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Conn {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Self::Unix(s) => s.as_raw_fd(),
            Self::Tcp(s) => s.as_raw_fd(),
        }
    }
}

/// Appends a record of `pages` pages at `gpa` to `out`: their bytes, or none when `data` is
/// None (zero pages).
pub fn push_record(out: &mut Vec<u8>, gpa: u64, pages: u32, data: Option<&[u8]>) {
    out.extend_from_slice(&record_header(gpa, pages, data.is_none()));
    if let Some(d) = data {
        out.extend_from_slice(d);
    }
}

/// The header of a record of `pages` pages at `gpa`, zero pages (no bytes follow) or not.
pub fn record_header(gpa: u64, pages: u32, zero: bool) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[..8].copy_from_slice(&gpa.to_le_bytes());
    h[8..12].copy_from_slice(&pages.to_le_bytes());
    h[12..].copy_from_slice(&(if zero { RECORD_ZERO } else { 0 }).to_le_bytes());
    h
}

/// One record of a PAGES frame.
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub gpa: u64,
    pub pages: u32,
    /// None: zero pages.
    pub data: Option<&'a [u8]>,
}

/// Splits a PAGES payload into its records, checking every length.
pub fn records(payload: &[u8]) -> Result<Vec<Record<'_>>, ProtocolError> {
    let bad = |why: String| ProtocolError::Malformed {
        kind: Kind::Pages,
        why,
    };
    let mut out = Vec::new();
    let mut rest = payload;
    while !rest.is_empty() {
        if rest.len() < RECORD_HEADER_LEN {
            return Err(bad(format!("{} bytes left, short of a record", rest.len())));
        }
        let gpa = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
        let pages = u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(rest[12..16].try_into().expect("4 bytes"));
        rest = &rest[RECORD_HEADER_LEN..];
        if !gpa.is_multiple_of(PAGE_SIZE) || pages == 0 || u64::from(pages) > PAGES_PER_RECORD {
            return Err(bad(format!("a record of {pages} pages at {gpa:#x}")));
        }
        let data = match flags {
            RECORD_ZERO => None,
            0 => {
                let len = pages as usize * PAGE_SIZE as usize;
                if rest.len() < len {
                    return Err(bad(format!(
                        "a record of {pages} pages at {gpa:#x} with {} bytes",
                        rest.len()
                    )));
                }
                let (d, r) = rest.split_at(len);
                rest = r;
                Some(d)
            }
            f => return Err(bad(format!("record flags {f:#x}"))),
        };
        out.push(Record { gpa, pages, data });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Conn, Conn) {
        let (a, b) = UnixStream::pair().unwrap();
        (Conn::Unix(a), Conn::Unix(b))
    }

    #[test]
    fn frames_and_fds_cross_a_unix_socket() {
        let (mut a, mut b) = pair();
        a.send_preamble().unwrap();
        b.read_preamble().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        a.send(Kind::Tap, b"{\"nic\":\"eth0\"}", Some(file.as_raw_fd()))
            .unwrap();
        a.send_json(Kind::Ok, &serde_json::json!({"x": 1}), None)
            .unwrap();
        let f = b.recv().unwrap();
        assert_eq!(f.kind, Kind::Tap);
        assert!(f.fd.is_some(), "the fd came with its frame");
        assert_eq!(f.payload, b"{\"nic\":\"eth0\"}");
        assert_eq!(b.expect_ok("an answer").unwrap()["x"], 1);
    }

    #[test]
    fn bad_peers_are_named() {
        let (mut a, mut b) = pair();
        a.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").unwrap();
        assert!(matches!(
            b.read_preamble(),
            Err(ProtocolError::NotFerrovm(_))
        ));
        a.write_all(b"FERROVM-MIGRATION 7\n").unwrap();
        let e = b.read_preamble().unwrap_err();
        assert!(e.to_string().contains("protocol 7"), "{e}");
        // An unknown kind, then an absurd length.
        a.write_all(&[9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        assert!(matches!(b.recv(), Err(ProtocolError::UnknownKind(9))));
        let mut h = vec![3, 0, 0, 0];
        h.extend_from_slice(&u64::MAX.to_le_bytes());
        a.write_all(&h).unwrap();
        assert!(matches!(b.recv(), Err(ProtocolError::TooLong { .. })));
        // A frame cut short by the peer's end.
        a.write_all(&[1, 0, 0, 0, 100, 0, 0, 0, 0, 0, 0, 0, b'{'])
            .unwrap();
        drop(a);
        assert!(matches!(b.recv(), Err(ProtocolError::Closed)));
    }

    #[test]
    fn page_records_round_trip_and_bad_ones_are_refused() {
        let page = vec![7u8; PAGE_SIZE as usize];
        let mut out = Vec::new();
        push_record(&mut out, 0x1000, 1, Some(&page));
        push_record(&mut out, 0x10_0000, 3, None);
        let r = records(&out).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].gpa, 0x1000);
        assert_eq!(r[0].data, Some(&page[..]));
        assert_eq!((r[1].gpa, r[1].pages, r[1].data), (0x10_0000, 3, None));
        // Data shorter than the page count says.
        let mut short = Vec::new();
        push_record(&mut short, 0, 2, Some(&page));
        assert!(records(&short).is_err());
        // An unaligned address, a record too large, leftover bytes.
        let mut bad = Vec::new();
        push_record(&mut bad, 0x10, 1, None);
        assert!(records(&bad).is_err());
        let mut big = Vec::new();
        push_record(&mut big, 0, PAGES_PER_RECORD as u32 + 1, None);
        assert!(records(&big).is_err());
        assert!(records(&[0u8; 5]).is_err());
    }
}
