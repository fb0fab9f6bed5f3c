//! The source side: the migration thread, which copies memory while the guest runs, and
//! its conversation with the event loop for the switch-over.
//!
//! The thread is started with the VM (when it has a control socket), before the main
//! thread's seccomp filter, and installs its own (`ThreadKind::Migration`: connecting,
//! the socket, KVM's dirty log). It waits for a [`Job`]; during one it tells the event loop
//! ([`ToMain`], with an eventfd that wakes the loop) when the pre-copy has converged and
//! when the host resources may be let go, and the loop answers ([`ToWorker`]) with the
//! paused VM's state and the released TAP fds. The event loop stays blocked in the
//! switch-over until the thread says Done or Failed, so no device touches guest memory
//! between the final copy and the destination's start.

use std::fs::File;
use std::io::{self, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use log::{error, info, warn};
use serde_json::{json, Value};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::dirty::{DirtyPages, Tracker};
use super::protocol::{Conn, Kind, ProtocolError, PAGES_FRAME_MAX, PAGE_SIZE};
use super::{Address, MigrateParams, MigrationError, VERIFY_ENV};
use crate::config::VmConfig;
use crate::persist::{MemoryRegion, Snapshot};
use crate::vstate::memory::is_zero_page;
use crate::vstate::memory::GuestMemoryMmap;

/// How long the destination may take to answer (it builds the VM; in test mode it hashes
/// all of RAM), and a blocked write to go through.
const PEER_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a destination that is not listening yet (its socket not there, or refusing)
/// is tried again: both ends are often started together.
const CONNECT_RETRY: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the thread waits for the event loop during the switch-over.
const MAIN_TIMEOUT: Duration = Duration::from_secs(60);
const MIB: f64 = 1048576.0;

/// The thread to the event loop.
#[derive(Debug)]
pub enum ToMain {
    /// Pre-copy is done: pause the VM and send its state.
    Converged,
    /// The destination has everything: let go of the disks and TAPs.
    Release,
    /// The destination runs the guest: exit.
    Done,
    /// The migration failed (the reason); the guest must run on here.
    Failed(String),
}

/// The event loop to the thread.
pub enum ToWorker {
    /// The paused VM's state, and when it was paused.
    State(Box<Snapshot>, Instant),
    /// The host resources are let go; in local mode, each NIC's TAP fd to hand over.
    Released(Vec<(String, OwnedFd)>),
    /// The event loop could not do its part.
    Abort(String),
}

/// One migration for the thread.
pub struct Job {
    pub params: MigrateParams,
    /// The control-socket connection that asked: the HTTP response with the progress
    /// lines goes there.
    pub progress: Option<UnixStream>,
    pub mem: GuestMemoryMmap,
    pub vm: Arc<VmFd>,
    /// The configuration the destination builds (TAP names and MACs resolved).
    pub config: VmConfig,
    pub memory: Vec<MemoryRegion>,
    /// The memfd behind guest memory, for local mode.
    pub memfd: Option<File>,
    pub from_main: Receiver<ToWorker>,
}

/// The migration thread, as the event loop holds it.
pub struct Worker {
    jobs: Option<Sender<Job>>,
    events: Receiver<ToMain>,
    cancel: Arc<AtomicBool>,
    /// The connection of the running job, to cut it when the VM stops.
    conn: Arc<Mutex<Option<Conn>>>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the thread; returns it and the eventfd written whenever it has news.
    pub fn start() -> io::Result<(Self, EventFd)> {
        let (jtx, jrx) = mpsc::channel::<Job>();
        let (etx, erx) = mpsc::channel();
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let wake2 = wake.try_clone()?;
        let cancel = Arc::new(AtomicBool::new(false));
        let conn = Arc::new(Mutex::new(None));
        let (cancel2, conn2) = (cancel.clone(), conn.clone());
        let thread = std::thread::Builder::new()
            .name("migrate".into())
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Migration);
                for job in jrx {
                    cancel2.store(false, Ordering::SeqCst);
                    let link = Link {
                        to_main: &etx,
                        wake: &wake2,
                        cancel: &cancel2,
                        conn: &conn2,
                    };
                    run(job, &link);
                    *conn2.lock().unwrap_or_else(|p| p.into_inner()) = None;
                }
            })?;
        Ok((
            Self {
                jobs: Some(jtx),
                events: erx,
                cancel,
                conn,
                thread: Some(thread),
            },
            wake,
        ))
    }

    pub fn submit(&self, job: Job) -> Result<(), String> {
        self.jobs
            .as_ref()
            .and_then(|j| j.send(job).ok())
            .ok_or_else(|| "the migration thread is gone".to_owned())
    }

    /// The thread's next message, if any.
    pub fn try_event(&self) -> Option<ToMain> {
        self.events.try_recv().ok()
    }

    /// Waits for the thread's next message.
    pub fn event_timeout(&self, t: Duration) -> Result<ToMain, RecvTimeoutError> {
        self.events.recv_timeout(t)
    }

    /// Stops a running job: its connection is cut, so whatever it waits on returns.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        if let Some(c) = self.conn.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            c.shutdown();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.cancel();
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                error!("the migration thread panicked");
            }
        }
    }
}

struct Link<'a> {
    to_main: &'a Sender<ToMain>,
    wake: &'a EventFd,
    cancel: &'a AtomicBool,
    conn: &'a Mutex<Option<Conn>>,
}

impl Link<'_> {
    fn tell(&self, m: ToMain) {
        let _ = self.to_main.send(m);
        let _ = self.wake.write(1);
    }

    fn check_cancel(&self) -> Result<(), MigrationError> {
        if self.cancel.load(Ordering::SeqCst) {
            return Err(MigrationError::Cancelled("the VM is stopping".into()));
        }
        Ok(())
    }
}

/// Progress lines on the requesting connection: an HTTP/1.1 response without a length,
/// one JSON object per line, the last one `completed` or `failed`.
struct Progress(Option<UnixStream>);

impl Progress {
    fn start(stream: Option<UnixStream>) -> Self {
        let mut p = Self(stream);
        p.write_raw(
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n",
        );
        p
    }

    fn write_raw(&mut self, s: &str) {
        if let Some(st) = self.0.as_mut() {
            if st.write_all(s.as_bytes()).is_err() {
                // The client went away; the migration goes on.
                self.0 = None;
            }
        }
    }

    fn line(&mut self, v: &Value) {
        self.write_raw(&format!("{v}\n"));
    }
}

/// What one run measured.
#[derive(Default)]
struct Figures {
    passes: u32,
    sent_bytes: u64,
    pages_sent: u64,
}

fn mib(bytes: u64) -> f64 {
    (bytes as f64 / MIB * 10.0).round() / 10.0
}

fn connect(to: &Address) -> Result<Conn, MigrationError> {
    let t0 = Instant::now();
    loop {
        let attempt = match to {
            Address::Unix(p) => UnixStream::connect(p).map(Conn::Unix),
            Address::Tcp(a) => TcpStream::connect_timeout(a, CONNECT_TIMEOUT).map(|s| {
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }),
        };
        match attempt {
            Ok(c) => return Ok(c),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && t0.elapsed() < CONNECT_RETRY =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(MigrationError::Connect(to.clone(), e)),
        }
    }
}

fn run(mut job: Job, link: &Link) {
    let mut progress = Progress::start(job.progress.take());
    let t0 = Instant::now();
    let mut figures = Figures::default();
    let mut tracker = None;
    let mut unsent = None;
    let result = migrate(
        &job,
        link,
        &mut progress,
        &mut figures,
        &mut tracker,
        &mut unsent,
    )
    .map_err(|e| match e {
        // A write that failed because the destination gave up: its reason is better.
        MigrationError::Protocol(ProtocolError::Io(_)) => link
            .conn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
            .and_then(Conn::peer_reason)
            .map(MigrationError::Protocol)
            .unwrap_or(e),
        e => e,
    });
    match result {
        Ok(summary) => {
            info!("Migration to {} done: {summary}", job.params.to);
            progress.line(&summary);
            drop(progress);
            link.tell(ToMain::Done);
        }
        Err(e) => {
            let why = crate::vmm::error_chain(&e);
            warn!("Migration to {} failed: {why}", job.params.to);
            if let Some(t) = tracker.as_ref() {
                if let Some(u) = unsent.as_ref() {
                    t.put_back(u);
                }
                if let Err(e) = t.stop() {
                    warn!("Failed to turn the dirty log off: {e}");
                }
            }
            if let Some(c) = link.conn.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                let _ = c.send_json(Kind::Abort, &json!({ "error": why }), None);
            }
            progress.line(&json!({
                "event": "failed",
                "error": why,
                "passes": figures.passes,
                "sent_mib": mib(figures.sent_bytes),
                "elapsed_ms": t0.elapsed().as_millis() as u64,
            }));
            drop(progress);
            link.tell(ToMain::Failed(why));
        }
    }
}

fn migrate(
    job: &Job,
    link: &Link,
    progress: &mut Progress,
    figures: &mut Figures,
    tracker: &mut Option<Tracker>,
    unsent: &mut Option<DirtyPages>,
) -> Result<Value, MigrationError> {
    let t0 = Instant::now();
    let p = &job.params;
    let mut conn = connect(&p.to)?;
    conn.set_timeout(Some(PEER_TIMEOUT))
        .map_err(|e| MigrationError::Protocol(e.into()))?;
    *link.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(
        conn.try_clone()
            .map_err(|e| MigrationError::Protocol(e.into()))?,
    );
    link.check_cancel()?;
    // The destination speaks first: a peer that is not one is found out by reading.
    conn.read_preamble()?;
    conn.send_preamble()?;
    let memfd = match (p.local, &job.memfd) {
        (true, Some(f)) => Some(f.as_raw_fd()),
        (true, None) => {
            return Err(MigrationError::Memory(
                "handed over: local migration needs guest memory in a shared memfd (start \
                 the VM with --memory-shared)"
                    .into(),
            ))
        }
        (false, _) => None,
    };
    conn.send_json(
        Kind::Config,
        &json!({
            "ferrovm": env!("CARGO_PKG_VERSION"),
            "local": p.local,
            "config": job.config,
            "memory": job.memory,
        }),
        memfd,
    )?;
    conn.expect_ok("an answer to the configuration")?;
    progress.line(&json!({"event": "connected", "to": p.to, "local": p.local}));

    let verify = std::env::var(VERIFY_ENV).as_deref() == Ok("1");
    if !p.local {
        let t = Tracker::start(job.vm.clone(), job.mem.clone()).map_err(MigrationError::Dirty)?;
        *tracker = Some(t);
        let t = tracker.as_ref().expect("set above");
        let mut pages = DirtyPages::all(&job.mem);
        let mut first = true;
        loop {
            *unsent = Some(pages.clone());
            let pass_start = Instant::now();
            let sent = send_pages(&mut conn, &job.mem, &pages, first, link, figures)?;
            first = false;
            figures.passes += 1;
            let pass_ms = pass_start.elapsed().as_secs_f64() * 1000.0;
            pages = t.take().map_err(MigrationError::Dirty)?;
            *unsent = Some(pages.clone());
            // What the link moved per ms, and what the rest would take at that rate.
            let bandwidth = sent as f64 / pass_ms.max(1.0);
            let estimate_ms = pages.bytes() as f64 / bandwidth.max(1.0);
            let dirty_rate = pages.bytes() as f64 / MIB / (pass_ms / 1000.0).max(0.001);
            progress.line(&json!({
                "event": "pass",
                "pass": figures.passes,
                "sent_mib": mib(sent),
                "total_sent_mib": mib(figures.sent_bytes),
                "dirty_mib": mib(pages.bytes()),
                "dirty_rate_mib_s": dirty_rate.round(),
                "bandwidth_mib_s": (bandwidth * 1000.0 / MIB).round(),
                "estimated_downtime_ms": estimate_ms.round() as u64,
                "elapsed_ms": t0.elapsed().as_millis() as u64,
            }));
            if estimate_ms <= p.downtime_ms as f64
                || figures.passes >= p.max_passes
                || t0.elapsed() >= p.timeout()
            {
                break;
            }
        }
    }

    // The switch-over: the event loop pauses the VM and sends its state.
    link.tell(ToMain::Converged);
    let (snap, paused_at) = match job.from_main.recv_timeout(MAIN_TIMEOUT) {
        Ok(ToWorker::State(s, at)) => (s, at),
        Ok(ToWorker::Abort(why)) => return Err(MigrationError::Cancelled(why)),
        Ok(ToWorker::Released(_)) | Err(_) => {
            return Err(MigrationError::Cancelled(
                "the event loop did not send the VM's state".into(),
            ))
        }
    };
    if let Some(t) = tracker.as_ref() {
        let mut last = unsent.take().unwrap_or_else(|| DirtyPages::none(&job.mem));
        last.merge(&t.take().map_err(MigrationError::Dirty)?);
        *unsent = Some(last.clone());
        send_pages(&mut conn, &job.mem, &last, false, link, figures)?;
        figures.passes += 1;
    }
    let state = serde_json::to_vec(&*snap).map_err(|e| MigrationError::Refused(e.to_string()))?;
    conn.send(Kind::State, &state, None)?;
    conn.expect_ok("an answer to the state")?;
    let mut ram_hash = None;
    if verify {
        let h = super::dirty::ram_hash(&job.mem);
        conn.send_json(Kind::Verify, &json!({ "ram_hash": h }), None)?;
        conn.expect_ok("an answer to the RAM hash")?;
        ram_hash = Some(h);
    }
    // The destination has all it needs: let go of the disks and TAPs, then commit.
    link.tell(ToMain::Release);
    let taps = match job.from_main.recv_timeout(MAIN_TIMEOUT) {
        Ok(ToWorker::Released(t)) => t,
        Ok(ToWorker::Abort(why)) => return Err(MigrationError::Cancelled(why)),
        _ => {
            return Err(MigrationError::Cancelled(
                "the event loop did not release the host resources".into(),
            ))
        }
    };
    for (nic, fd) in &taps {
        conn.send_json(Kind::Tap, &json!({ "nic": nic }), Some(fd.as_raw_fd()))?;
    }
    conn.send_json(Kind::Commit, &json!({}), None)?;
    let answer = conn.expect_ok("the destination's start")?;
    // From here the guest runs there: nothing may fail the migration any more.
    *unsent = None;
    let downtime_ms = paused_at.elapsed().as_millis() as u64;
    Ok(json!({
        "event": "completed",
        "to": p.to,
        "mode": if p.local { "local" } else { "copy" },
        "passes": figures.passes,
        "sent_mib": mib(figures.sent_bytes),
        "pages_sent": figures.pages_sent,
        "total_ms": t0.elapsed().as_millis() as u64,
        "downtime_ms": downtime_ms,
        "destination_build_ms": answer.get("build_ms"),
        "ram_hash": ram_hash,
    }))
}

/// Sends `pages` of `mem`, in frames of at most `PAGES_FRAME_MAX` bytes of pages; zero
/// pages go as zero records, and not at all on the first pass (the destination's memory
/// starts zeroed). Returns the bytes that went on the wire.
fn send_pages(
    conn: &mut Conn,
    mem: &GuestMemoryMmap,
    pages: &DirtyPages,
    first: bool,
    link: &Link,
    figures: &mut Figures,
) -> Result<u64, MigrationError> {
    let regions: Vec<_> = mem.iter().collect();
    // A frame: record headers and the pages' bytes where they are mapped, sent with
    // vectored writes (no copy of the pages in this process).
    enum Piece<'a> {
        Header(usize),
        Data(&'a [u8]),
    }
    let mut headers: Vec<[u8; super::protocol::RECORD_HEADER_LEN]> = Vec::new();
    let mut pieces: Vec<Piece<'_>> = Vec::new();
    let mut frame_len = 0u64;
    let mut sent = 0u64;
    let mut flush = |headers: &mut Vec<[u8; super::protocol::RECORD_HEADER_LEN]>,
                     pieces: &mut Vec<Piece<'_>>,
                     frame_len: &mut u64,
                     conn: &mut Conn|
     -> Result<(), MigrationError> {
        if !pieces.is_empty() {
            let slices: Vec<&[u8]> = pieces
                .iter()
                .map(|p| match p {
                    Piece::Header(i) => &headers[*i][..],
                    Piece::Data(d) => *d,
                })
                .collect();
            conn.send_pieces(Kind::Pages, &slices)?;
            sent += *frame_len + 12;
            *frame_len = 0;
            pieces.clear();
            headers.clear();
        }
        Ok(())
    };
    let outside =
        |offset: u64| MigrationError::Memory(format!("read at {offset:#x}: outside the region"));
    for (r, first_page, count) in pages.runs() {
        link.check_cancel()?;
        let region = regions[r];
        let offset = first_page * PAGE_SIZE;
        let len = (count * PAGE_SIZE).min(region.len() - offset) as usize;
        let buf = crate::vstate::memory::bytes_in_place(region, offset, len)
            .ok_or_else(|| outside(offset))?;
        let base = region.start_addr().0 + offset;
        // Split the run into records of data pages and of zero pages.
        let npages = len.div_ceil(PAGE_SIZE as usize);
        let mut i = 0;
        while i < npages {
            let zero = is_zero_page(page(buf, i));
            let mut j = i + 1;
            while j < npages && is_zero_page(page(buf, j)) == zero {
                j += 1;
            }
            let gpa = base + i as u64 * PAGE_SIZE;
            let n = (j - i) as u32;
            if !zero || !first {
                headers.push(super::protocol::record_header(gpa, n, zero));
                pieces.push(Piece::Header(headers.len() - 1));
                frame_len += super::protocol::RECORD_HEADER_LEN as u64;
            }
            if !zero {
                let data = &buf[i * PAGE_SIZE as usize..(j * PAGE_SIZE as usize).min(len)];
                pieces.push(Piece::Data(data));
                frame_len += data.len() as u64;
            }
            figures.pages_sent += u64::from(n);
            i = j;
            if frame_len >= PAGES_FRAME_MAX {
                flush(&mut headers, &mut pieces, &mut frame_len, conn)?;
            }
        }
    }
    flush(&mut headers, &mut pieces, &mut frame_len, conn)?;
    figures.sent_bytes += sent;
    Ok(sent)
}

fn page(buf: &[u8], i: usize) -> &[u8] {
    let start = i * PAGE_SIZE as usize;
    &buf[start..(start + PAGE_SIZE as usize).min(buf.len())]
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    /// Every page arrives where it was, zero pages as records on later passes, and every
    /// frame is within what the receiver takes.
    #[test]
    fn pages_go_out_in_frames_the_destination_accepts() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        // Data everywhere but a zero hole at 1 MiB.
        for p in 0..4096u64 {
            if !(256..300).contains(&p) {
                mem.write_obj(p | 1, GuestAddress(p * PAGE_SIZE)).unwrap();
            }
        }
        let (a, b) = UnixStream::pair().unwrap();
        let (tx, _rx) = mpsc::channel();
        let wake = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let cancel = AtomicBool::new(false);
        let conn = Mutex::new(None);
        let link = Link {
            to_main: &tx,
            wake: &wake,
            cancel: &cancel,
            conn: &conn,
        };
        let reader = std::thread::spawn(move || {
            let mut c = Conn::Unix(b);
            let dst = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
            // Pretend an earlier pass left garbage in the hole.
            dst.write_obj(0xffu8, GuestAddress(260 * PAGE_SIZE))
                .unwrap();
            let mut frames = 0;
            while let Ok(f) = c.recv() {
                frames += 1;
                for r in super::super::protocol::records(&f.payload).unwrap() {
                    match r.data {
                        Some(d) => dst.write_slice(d, GuestAddress(r.gpa)).unwrap(),
                        None => {
                            let zero = vec![0u8; r.pages as usize * PAGE_SIZE as usize];
                            dst.write_slice(&zero, GuestAddress(r.gpa)).unwrap();
                        }
                    }
                }
            }
            (frames, super::super::dirty::ram_hash(&dst))
        });
        let mut c = Conn::Unix(a);
        let mut figures = Figures::default();
        let all = DirtyPages::all(&mem);
        let sent = send_pages(&mut c, &mem, &all, false, &link, &mut figures).unwrap();
        drop(c);
        let (frames, hash) = reader.join().unwrap();
        assert!(frames >= 4, "16 MiB in frames of about 4 MiB: {frames}");
        assert_eq!(hash, super::super::dirty::ram_hash(&mem));
        assert_eq!(figures.pages_sent, 4096);
        assert!(sent < 17 << 20);
    }
}
