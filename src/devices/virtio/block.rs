//! virtio-blk (virtio 1.x, section 5.2) over a raw image file.
//!
//! Requests are parsed from the descriptor chain without trusting the guest: a chain that
//! loops, a buffer in the wrong direction or outside guest memory, a transfer that is not a
//! multiple of 512 bytes or runs past the end of the disk each fail that one request with
//! VIRTIO_BLK_S_IOERR (or UNSUPP for unknown types); the device and the VMM carry on.
//!
//! The event loop only takes chains off the ring and checks them; reads, writes and flushes
//! go to a few I/O threads the device owns, each with its own handle on the image. The thread
//! that served a request writes its status, puts it in the used ring and interrupts the guest
//! if the guest asked for it (EVENT_IDX). So several requests are in flight at once, as with
//! QEMU's `aio=threads`, and the event loop never waits for the disk.
//!
//! Requests complete in any order (virtio 1.x 5.2.6 promises none). Writes reach the file
//! before the guest sees them complete, and a FLUSH completes only after fdatasync returned:
//! it covers every write whose completion the guest saw before submitting the flush (that
//! write's pwritev had returned, and fdatasync covers writes through every descriptor of the
//! file). Writes still in flight when a flush arrives are not waited for; drivers that need
//! them covered wait for their completion first, as Linux's blk-flush does.
//! A reset and the end of the device wait for every request taken off the ring: its data
//! reaches the file and its completion the used ring before the driver sees the reset or
//! the VMM exits, so data the guest saw flushed is in the file however the VMM ends.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, error, warn};
use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::device::{
    read_chain, rearm_notification, take_notifications, wants_interrupt, ActivateError, Activation,
    DeviceState, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use super::guest_write::{ChainWriter, ChainWrites, GuestWriter};
use crate::config::DISK_SERIAL_MAX;
pub use crate::devices::disk::BlockBackend;
use crate::devices::disk::{GuestBuf, SECTOR_SIZE};
use crate::devices::metrics::DeviceMetrics;
use crate::vstate::memory::GuestMemoryMmap;

/// Virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Requests in flight the queue can hold.
pub const QUEUE_SIZE: u16 = 256;
/// I/O threads per device: what lets several requests be served while the guest keeps
/// submitting (QEMU's thread pool plays this part). An idle thread costs its stack only.
const IO_THREADS: usize = 4;
const SECTOR_SHIFT: u64 = 9;
/// Most guest buffers one merged write may gather (Linux's UIO_MAXIOV, one pwritev).
const MAX_MERGED_SEGMENTS: usize = 1024;
/// `struct virtio_blk_outhdr`: type, ioprio, sector.
const REQUEST_HEADER_LEN: u32 = 16;
/// Bytes of configuration space we fill (up to and including `blk_size`).
const CONFIG_LEN: usize = 24;

/// Errors creating a virtio-blk device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("Failed to create an eventfd for a virtio-blk device")]
    EventFd(#[source] io::Error),
    #[error("Failed to start an I/O thread for a virtio-blk device")]
    Thread(#[source] io::Error),
}

/// Why a request failed, for the log; the guest only sees the status byte.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("{0}")]
    Chain(#[from] super::device::ChainError),
    #[error("no device-writable status byte at the end of the chain")]
    NoStatus,
    #[error("the request header is missing, short or device-writable")]
    BadHeader,
    #[error("a data buffer has the wrong direction for a {0} request")]
    WrongDirection(&'static str),
    #[error("{0} bytes of data is not a whole number of sectors")]
    Unaligned(u64),
    #[error("sectors {sector}..+{len} bytes are past the end of the {size}-byte disk")]
    OutOfRange { sector: u64, len: u64, size: u64 },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("guest memory access failed: {0}")]
    Memory(String),
    #[error("disk I/O failed: {0}")]
    Io(String),
}

impl RequestError {
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A parsed request.
#[derive(Debug)]
struct Request {
    kind: u32,
    sector: u64,
    data: Vec<Descriptor>,
}

/// Splits a chain into header, data and status (virtio 1.x, 5.2.6), checking each part.
fn parse(
    descs: &[Descriptor],
    mem: &GuestMemoryMmap,
) -> Result<(Request, GuestAddress), (RequestError, Option<GuestAddress>)> {
    // A status byte outside guest memory could not report the outcome: the request is
    // refused before any I/O, rather than done and completed with no status (found by
    // fuzzing: a write reached the disk and the driver saw nothing it could trust).
    let status = descs
        .last()
        .filter(|d| d.is_write_only() && d.len() >= 1 && descs.len() >= 2)
        .filter(|d| GuestMemoryBackend::check_range(mem, d.addr(), 1))
        .map(|d| d.addr());
    let status = status.ok_or((RequestError::NoStatus, None))?;
    let fail = |e: RequestError| (e, Some(status));

    let head = descs[0];
    if head.is_write_only() || head.len() < REQUEST_HEADER_LEN {
        return Err(fail(RequestError::BadHeader));
    }
    let mut hdr = [0u8; REQUEST_HEADER_LEN as usize];
    mem.read_slice(&mut hdr, head.addr())
        .map_err(|e| fail(RequestError::Memory(e.to_string())))?;
    let kind = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
    let data = descs[1..descs.len() - 1].to_vec();

    let (name, writable) = match kind {
        VIRTIO_BLK_T_IN => ("read", true),
        VIRTIO_BLK_T_GET_ID => ("get-id", true),
        VIRTIO_BLK_T_OUT => ("write", false),
        VIRTIO_BLK_T_FLUSH => ("flush", false),
        other => return Err(fail(RequestError::Unsupported(other))),
    };
    if data.iter().any(|d| d.is_write_only() != writable) {
        return Err(fail(RequestError::WrongDirection(name)));
    }
    Ok((Request { kind, sector, data }, status))
}

/// What a checked request asks for.
#[derive(Debug)]
enum Op {
    /// Disk I/O, for an I/O thread.
    Disk(DiskOp),
    /// VIRTIO_BLK_T_GET_ID: guest memory only, served on the event loop.
    GetId(Vec<GuestBuf>),
}

#[derive(Debug)]
enum DiskOp {
    Read {
        offset: u64,
        bufs: Vec<GuestBuf>,
        len: u64,
    },
    Write {
        offset: u64,
        bufs: Vec<GuestBuf>,
        len: u64,
    },
    Flush,
}

impl Request {
    /// Checks the request against the disk and says what to do.
    fn into_op(self, readonly: bool, size: u64) -> Result<Op, RequestError> {
        let len: u64 = self.data.iter().map(|d| u64::from(d.len())).sum();
        let bufs = self
            .data
            .iter()
            .map(|d| GuestBuf {
                addr: d.addr(),
                len: d.len() as usize,
            })
            .collect();
        match self.kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let write = self.kind == VIRTIO_BLK_T_OUT;
                if write && readonly {
                    return Err(RequestError::ReadOnly);
                }
                if !len.is_multiple_of(SECTOR_SIZE) {
                    return Err(RequestError::Unaligned(len));
                }
                let offset = self
                    .sector
                    .checked_mul(SECTOR_SIZE)
                    .filter(|start| start.checked_add(len).is_some_and(|end| end <= size))
                    .ok_or(RequestError::OutOfRange {
                        sector: self.sector,
                        len,
                        size,
                    })?;
                Ok(Op::Disk(if write {
                    DiskOp::Write { offset, bufs, len }
                } else {
                    DiskOp::Read { offset, bufs, len }
                }))
            }
            VIRTIO_BLK_T_FLUSH => Ok(Op::Disk(DiskOp::Flush)),
            VIRTIO_BLK_T_GET_ID => Ok(Op::GetId(bufs)),
            other => Err(RequestError::Unsupported(other)),
        }
    }
}

impl DiskOp {
    /// Bytes the guest gets back in its buffers.
    fn bytes_to_guest(&self) -> u32 {
        match self {
            DiskOp::Read { len, .. } => u32::try_from(*len).unwrap_or(u32::MAX),
            _ => 0,
        }
    }

    /// Does the I/O; a read fills the buffers of the chain `dst` writes.
    fn run(
        &self,
        backend: &mut dyn BlockBackend,
        dst: &ChainWriter,
        metrics: &DeviceMetrics,
    ) -> Result<(), RequestError> {
        let io_error = |e: io::Error| RequestError::Io(e.to_string());
        let mem = dst.mem();
        match self {
            DiskOp::Read { offset, bufs, len } => {
                backend
                    .read_vectored_to(dst, bufs, *offset)
                    .map_err(io_error)?;
                metrics.add_bytes_to_guest(*len);
                Ok(())
            }
            DiskOp::Write { offset, bufs, len } => {
                backend
                    .write_vectored_from(mem, bufs, *offset)
                    .map_err(io_error)?;
                metrics.add_bytes_from_guest(*len);
                Ok(())
            }
            DiskOp::Flush => backend.flush().map_err(io_error),
        }
    }
}

/// Copies the device id into the guest's buffers (as much as fits).
fn write_id(id: &[u8], bufs: &[GuestBuf], dst: &ChainWriter) -> Result<u32, RequestError> {
    let mut written = 0;
    let mut id = id;
    for b in bufs {
        let n = b.len.min(id.len());
        dst.write_slice(&id[..n], b.addr)
            .map_err(|e| RequestError::Memory(e.to_string()))?;
        id = &id[n..];
        written += n as u32;
    }
    Ok(written)
}

/// The request queue of an activated device, shared by the event loop, which takes chains
/// off it, and the I/O threads, which complete them.
struct ActiveQueue {
    mem: GuestMemoryMmap,
    queue: Mutex<Queue>,
    writer: GuestWriter,
    interrupt: Arc<VirtioInterrupt>,
    metrics: Arc<DeviceMetrics>,
}

impl ActiveQueue {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Completes one chain; `status` is None for chains with nowhere to put one.
    fn complete(
        &self,
        name: &str,
        chain: ChainWrites,
        status: Option<GuestAddress>,
        result: Result<u32, RequestError>,
    ) {
        self.complete_all(name, [(chain, status, result)]);
    }

    /// Writes each chain's status byte, returns the chains to the driver and interrupts it
    /// if it wants to know; a result is the number of bytes written into guest buffers.
    fn complete_all(
        &self,
        name: &str,
        done: impl IntoIterator<Item = (ChainWrites, Option<GuestAddress>, Result<u32, RequestError>)>,
    ) {
        let used: Vec<(ChainWrites, u32)> = done
            .into_iter()
            .map(|(chain, status, result)| {
                let (status_byte, written) = match result {
                    Ok(n) => (VIRTIO_BLK_S_OK as u8, n),
                    Err(e) => {
                        warn!("{name}: request failed: {e}");
                        (e.status(), 0)
                    }
                };
                let dst = self.writer.chain(&chain);
                let used = match status.map(|addr| dst.write_obj(status_byte, addr)) {
                    Some(Ok(())) => written + 1,
                    Some(Err(e)) => {
                        warn!("{name}: cannot write the request status: {e}");
                        written
                    }
                    None => written,
                };
                (chain, used)
            })
            .collect();
        let notify = {
            let mut queue = self.lock();
            for (chain, len) in used {
                let head = chain.head();
                if let Err(e) = self.writer.add_used(&mut queue, chain, len) {
                    error!("{name}: cannot complete request {head}: {e}");
                }
            }
            wants_interrupt(&mut queue, &self.mem)
        };
        if notify {
            self.interrupt.signal_used_queue(0);
        }
    }
}

/// Requests on their way to an I/O thread: one, or several adjacent writes merged.
struct Job {
    queue: Arc<ActiveQueue>,
    op: DiskOp,
    /// The chain, status address and bytes to return to the guest, per request.
    requests: Vec<(ChainWrites, GuestAddress, u32)>,
}

impl Job {
    fn new(queue: &Arc<ActiveQueue>, chain: ChainWrites, status: GuestAddress, op: DiskOp) -> Self {
        let requests = vec![(chain, status, op.bytes_to_guest())];
        Self {
            queue: queue.clone(),
            op,
            requests,
        }
    }

    /// Appends `next` when it writes right after this job's writes, so that a sequential
    /// stream goes out as one pwritev, as QEMU merges requests. Only writes: buffered writes
    /// to one file take the inode lock in turn anyway, while reads of one file run in
    /// parallel on the I/O threads.
    fn merge(&mut self, next: Job) -> Result<(), Job> {
        match (&mut self.op, &next.op) {
            (
                DiskOp::Write { offset, bufs, len },
                DiskOp::Write {
                    offset: next_offset,
                    bufs: next_bufs,
                    len: next_len,
                },
            ) if *offset + *len == *next_offset
                && bufs.len() + next_bufs.len() <= MAX_MERGED_SEGMENTS
                && Arc::ptr_eq(&self.queue, &next.queue) =>
            {
                bufs.extend_from_slice(next_bufs);
                *len += next_len;
                self.requests.extend(next.requests);
                Ok(())
            }
            _ => Err(next),
        }
    }

    /// Does the I/O and completes every request of the job.
    fn run(self, name: &str, backend: &mut dyn BlockBackend) {
        // A read is never merged: its data goes into the buffers of its one chain.
        let dst = self.queue.writer.chain(&self.requests[0].0);
        let result = self.op.run(backend, &dst, &self.queue.metrics);
        let done = self.requests.into_iter().map(|(chain, status, written)| {
            (chain, Some(status), result.clone().map(|()| written))
        });
        self.queue.complete_all(name, done);
    }
}

#[derive(Default)]
struct PoolState {
    jobs: VecDeque<Job>,
    /// Jobs a thread took and has not completed yet.
    running: usize,
    /// Threads waiting for a job.
    idle: usize,
    closing: bool,
}

/// The I/O threads' work queue.
#[derive(Default)]
struct Pool {
    state: Mutex<PoolState>,
    /// Signalled when a job arrives or the pool closes.
    work: Condvar,
    /// Signalled when the last job completes.
    drained: Condvar,
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn submit(&self, job: Job) {
        let mut state = self.lock();
        state.jobs.push_back(job);
        let wake = state.idle > 0;
        drop(state);
        if wake {
            self.work.notify_one();
        }
    }

    /// The next job, waiting for one; None once the pool is closing and empty.
    fn take(&self) -> Option<Job> {
        let mut state = self.lock();
        loop {
            if let Some(job) = state.jobs.pop_front() {
                state.running += 1;
                return Some(job);
            }
            if state.closing {
                return None;
            }
            state.idle += 1;
            state = self
                .work
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.idle -= 1;
        }
    }

    fn done(&self) {
        let mut state = self.lock();
        state.running -= 1;
        if state.running == 0 && state.jobs.is_empty() {
            self.drained.notify_all();
        }
    }

    /// Waits until every job submitted so far has completed.
    fn drain(&self) {
        let mut state = self.lock();
        while state.running > 0 || !state.jobs.is_empty() {
            state = self
                .drained
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Lets the threads end once the jobs still queued are done.
    fn close(&self) {
        self.lock().closing = true;
        self.work.notify_all();
    }
}

/// An I/O thread: serves jobs through its own handle on the disk until the pool closes.
fn serve(name: &str, pool: &Pool, mut backend: Box<dyn BlockBackend>) {
    crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::BlockIo);
    while let Some(job) = pool.take() {
        job.run(name, &mut *backend);
        pool.done();
    }
}

/// Starts the I/O threads, one per handle on the disk: as many as `backend` can be cloned,
/// up to IO_THREADS.
fn start_io_threads(
    name: &str,
    pool: &Arc<Pool>,
    backend: Box<dyn BlockBackend>,
) -> Result<Vec<JoinHandle<()>>, BlockError> {
    let mut backends = Vec::with_capacity(IO_THREADS);
    while backends.len() + 1 < IO_THREADS {
        match backend.try_clone() {
            Ok(b) => backends.push(b),
            Err(e) => {
                if e.kind() != io::ErrorKind::Unsupported {
                    warn!("{name}: cannot open another handle on the disk: {e}");
                }
                break;
            }
        }
    }
    backends.push(backend);
    let mut threads = Vec::with_capacity(backends.len());
    for (i, backend) in backends.into_iter().enumerate() {
        let (thread_name, thread_pool) = (name.to_owned(), pool.clone());
        let spawned = thread::Builder::new()
            .name(format!("{name}-io{i}"))
            .spawn(move || serve(&thread_name, &thread_pool, backend));
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                pool.close();
                for t in threads {
                    let _ = t.join();
                }
                return Err(BlockError::Thread(e));
            }
        }
    }
    Ok(threads)
}

/// The block device.
pub struct VirtioBlock {
    name: String,
    readonly: bool,
    /// Disk size in bytes.
    size: u64,
    device_id: [u8; DISK_SERIAL_MAX],
    avail_features: u64,
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; 1],
    queue_evts: [EventFd; 1],
    activate_evt: EventFd,
    active: Option<Arc<ActiveQueue>>,
    queue_registered: bool,
    /// The device's counters, handed over with the interrupt line at activation.
    metrics: Arc<DeviceMetrics>,
    pool: Arc<Pool>,
    io_threads: Vec<JoinHandle<()>>,
}

impl VirtioBlock {
    /// A device over `backend`; `id` is what VIRTIO_BLK_T_GET_ID reports (up to 20 bytes).
    pub fn new(
        name: String,
        backend: Box<dyn BlockBackend>,
        readonly: bool,
        id: &str,
    ) -> Result<Self, BlockError> {
        let mut avail_features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE;
        if readonly {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        }
        let size = backend.size();
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&(size >> SECTOR_SHIFT).to_le_bytes());
        // seg_max: a request may use every descriptor but the header and status ones.
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        let mut device_id = [0u8; DISK_SERIAL_MAX];
        let id = id.as_bytes();
        let n = id.len().min(DISK_SERIAL_MAX);
        device_id[..n].copy_from_slice(&id[..n]);
        let evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(BlockError::EventFd);
        let (queue_evt, activate_evt) = (evt()?, evt()?);
        let pool = Arc::new(Pool::default());
        let io_threads = start_io_threads(&name, &pool, backend)?;
        Ok(Self {
            name,
            readonly,
            size,
            device_id,
            avail_features,
            config,
            queue_sizes: [QUEUE_SIZE],
            queue_evts: [queue_evt],
            activate_evt,
            active: None,
            queue_registered: false,
            metrics: DeviceMetrics::unnamed(),
            pool,
            io_threads,
        })
    }

    /// Takes every available chain off the queue (the virtio-queue loop: disable
    /// notifications, drain, re-enable, drain what raced in) and hands it on; the I/O
    /// threads complete the requests.
    pub(crate) fn process_queue(&mut self) {
        let Some(active) = self.active.clone() else {
            return;
        };
        let mut empty_rounds = 0;
        loop {
            if let Err(e) = active.writer.disable_notification(&mut active.lock()) {
                warn!("{}: cannot disable notifications: {e}", self.name);
            }
            // The last job is held back until the next chain shows whether it continues it.
            let mut pending: Option<Job> = None;
            let mut popped = 0;
            loop {
                // Not in the loop's condition: its temporaries, the lock among them, would
                // live through the body, which completes requests under the same lock.
                let chain = active.lock().pop_descriptor_chain(&active.mem);
                let Some(chain) = chain else { break };
                popped += 1;
                let Some(job) = self.dispatch(&active, chain) else {
                    continue;
                };
                pending = match pending.take() {
                    None => Some(job),
                    Some(mut last) => match last.merge(job) {
                        Ok(()) => Some(last),
                        Err(job) => {
                            self.pool.submit(last);
                            Some(job)
                        }
                    },
                };
            }
            if let Some(job) = pending {
                self.pool.submit(job);
            }
            // Found by fuzzing: a bogus available index used to spin the event loop here.
            let more = rearm_notification(
                &mut active.lock(),
                &active.writer,
                popped,
                &mut empty_rounds,
                &self.name,
            );
            if !more {
                break;
            }
        }
    }

    /// Checks one chain: a bad one, or GET_ID, is completed here; I/O is returned as a job
    /// for the threads.
    fn dispatch<M>(&self, active: &Arc<ActiveQueue>, chain: DescriptorChain<M>) -> Option<Job>
    where
        M: std::ops::Deref,
        M::Target: GuestMemory,
    {
        let head = chain.head_index();
        let descs = match read_chain(chain, QUEUE_SIZE) {
            Ok(d) => d,
            Err(e) => {
                active.complete(&self.name, ChainWrites::unread(head), None, Err(e.into()));
                return None;
            }
        };
        let writes = ChainWrites::new(head, &descs);
        let (req, status) = match parse(&descs, &active.mem) {
            Ok(parsed) => parsed,
            Err((e, status)) => {
                active.complete(&self.name, writes, status, Err(e));
                return None;
            }
        };
        let result = match req.into_op(self.readonly, self.size) {
            Ok(Op::Disk(op)) => match check_buffers(&op, &active.mem) {
                // Checked here so that a bad buffer fails its own request only, even merged.
                Ok(()) => return Some(Job::new(active, writes, status, op)),
                Err(e) => Err(e),
            },
            // Every buffer, not only the 20 bytes the id fills: a buffer outside guest memory
            // fails any request (found by fuzzing: GET_ID let one pass).
            Ok(Op::GetId(bufs)) => check_bufs(&bufs, &active.mem)
                .and_then(|()| write_id(&self.device_id, &bufs, &active.writer.chain(&writes))),
            Err(e) => Err(e),
        };
        active.complete(&self.name, writes, Some(status), result);
        None
    }
}

/// Checks that a request's buffers are all in guest memory.
fn check_buffers(op: &DiskOp, mem: &GuestMemoryMmap) -> Result<(), RequestError> {
    let bufs = match op {
        DiskOp::Read { bufs, .. } | DiskOp::Write { bufs, .. } => bufs,
        DiskOp::Flush => return Ok(()),
    };
    check_bufs(bufs, mem)
}

fn check_bufs(bufs: &[GuestBuf], mem: &GuestMemoryMmap) -> Result<(), RequestError> {
    match bufs
        .iter()
        .find(|b| !GuestMemoryBackend::check_range(mem, b.addr, b.len))
    {
        Some(b) => Err(RequestError::Memory(format!(
            "{} bytes at {:#x} are not all guest memory",
            b.len, b.addr.0
        ))),
        None => Ok(()),
    }
}

impl Drop for VirtioBlock {
    /// Requests already taken off the ring are served before the threads end.
    fn drop(&mut self) {
        self.pool.close();
        for t in self.io_threads.drain(..) {
            if t.join().is_err() {
                error!("{}: an I/O thread panicked", self.name);
            }
        }
    }
}

impl VirtioDevice for VirtioBlock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let metrics = activation.interrupt.metrics().clone();
        let DeviceState {
            mem,
            mut queues,
            mut writers,
            interrupt,
            ..
        } = DeviceState::from_activation(activation, 1)?;
        self.metrics = metrics.clone();
        self.active = Some(Arc::new(ActiveQueue {
            mem,
            queue: Mutex::new(queues.remove(0)),
            writer: writers.remove(0),
            interrupt,
            metrics,
        }));
        self.activate_evt.write(1).map_err(ActivateError::EventFd)
    }

    /// Waits for the requests in flight (on the vCPU thread that wrote the status, as QEMU
    /// drains its block layer on reset): after a reset the device must not touch the rings,
    /// and the writes the guest submitted must not be cut short.
    fn reset(&mut self) {
        self.pool.drain();
        self.active = None;
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.active.as_ref().map(|a| vec![a.lock().state()])
    }

    /// Waits for every request handed to the I/O threads: they are completed on the used
    /// ring (and flushes reached fdatasync) before the state is taken.
    fn quiesce(&mut self) {
        self.pool.drain();
    }
}

/// Copies from a config space image; bytes past its end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let start = offset as usize;
    if start < config.len() {
        let n = data.len().min(config.len() - start);
        data[..n].copy_from_slice(&config[start..start + n]);
    }
}

const EVT_ACTIVATE: u32 = 0;
const EVT_QUEUE: u32 = 1;

impl MutEventSubscriber for VirtioBlock {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            EVT_ACTIVATE,
            EventSet::IN,
        )) {
            error!("{}: cannot watch the activation event: {e:?}", self.name);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            EVT_ACTIVATE => {
                let _ = self.activate_evt.read();
                if !self.queue_registered {
                    match ops.add(Events::with_data(
                        &self.queue_evts[0],
                        EVT_QUEUE,
                        EventSet::IN,
                    )) {
                        Ok(()) => self.queue_registered = true,
                        Err(e) => error!("{}: cannot watch the queue: {e:?}", self.name),
                    }
                }
                debug!("{}: activated", self.name);
                // Requests may have been queued before the queue was watched.
                self.process_queue();
            }
            EVT_QUEUE => {
                take_notifications(&self.queue_evts[0], &self.metrics);
                self.process_queue();
            }
            other => warn!("{}: unexpected event {other}", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::disk::{each_buf, guest_io_error};
    use crate::devices::virtio::device::test_utils::{guest_memory, DATA_START};
    use crate::devices::virtio::device::VirtioInterrupt;
    use std::sync::Condvar;
    use std::time::Duration;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;

    const F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
    const F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
    const HDR: u64 = DATA_START;
    const BUF: u64 = DATA_START + 0x1000;
    const STATUS: u64 = DATA_START + 0x8000;
    const DISK_SIZE: u64 = 64 * 1024;

    /// Holds reads and writes while closed, counting those it holds.
    #[derive(Default)]
    struct Gate {
        /// Open, and how many transfers are waiting.
        state: Mutex<(bool, usize)>,
        changed: Condvar,
    }

    impl Gate {
        fn closed() -> Arc<Self> {
            Arc::new(Self::default())
        }

        fn pass(&self) {
            let mut s = self.state.lock().unwrap();
            s.1 += 1;
            self.changed.notify_all();
            while !s.0 {
                s = self.changed.wait(s).unwrap();
            }
            s.1 -= 1;
        }

        fn set_open(&self, open: bool) {
            self.state.lock().unwrap().0 = open;
            self.changed.notify_all();
        }

        fn is_open(&self) -> bool {
            self.state.lock().unwrap().0
        }

        /// Waits (up to 10 s) until `n` transfers are held at once.
        fn holds(&self, n: usize) -> bool {
            let s = self.state.lock().unwrap();
            let (s, _) = self
                .changed
                .wait_timeout_while(s, Duration::from_secs(10), |s| s.1 < n)
                .unwrap();
            s.1 >= n
        }
    }

    /// An in-memory disk that records flushes, with what the status byte was at that moment
    /// and what the disk held, and can hold transfers at a gate.
    #[derive(Clone, Default)]
    struct MemDisk {
        data: Arc<Mutex<Vec<u8>>>,
        flushes: Arc<Mutex<Vec<u8>>>,
        flushed_data: Arc<Mutex<Vec<Vec<u8>>>>,
        fail_flush: bool,
        gate: Option<Arc<Gate>>,
        /// (write?, offset, buffers) of each vectored transfer.
        transfers: Arc<Mutex<Vec<(bool, u64, usize)>>>,
        mem: Option<GuestMemoryMmap>,
    }

    impl MemDisk {
        fn record(&self, write: bool, offset: u64, bufs: &[GuestBuf]) {
            let mut t = self.transfers.lock().unwrap();
            t.push((write, offset, bufs.len()));
        }

        fn pass_gate(&self) {
            if let Some(g) = &self.gate {
                g.pass();
            }
        }
    }

    impl BlockBackend for MemDisk {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let d = self.data.lock().unwrap();
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
            let mut d = self.data.lock().unwrap();
            d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn read_to(
            &mut self,
            dst: &ChainWriter,
            addr: GuestAddress,
            offset: u64,
            len: usize,
        ) -> io::Result<()> {
            self.pass_gate();
            let d = self.data.lock().unwrap();
            dst.write_slice(&d[offset as usize..offset as usize + len], addr)
                .map_err(guest_io_error)
        }
        fn write_from(
            &mut self,
            mem: &GuestMemoryMmap,
            addr: GuestAddress,
            offset: u64,
            len: usize,
        ) -> io::Result<()> {
            self.pass_gate();
            let mut d = self.data.lock().unwrap();
            mem.read_slice(&mut d[offset as usize..offset as usize + len], addr)
                .map_err(guest_io_error)
        }
        fn flush(&mut self) -> io::Result<()> {
            let status: u8 = self
                .mem
                .as_ref()
                .unwrap()
                .read_obj(GuestAddress(STATUS))
                .unwrap();
            self.flushes.lock().unwrap().push(status);
            let data = self.data.lock().unwrap().clone();
            self.flushed_data.lock().unwrap().push(data);
            if self.fail_flush {
                Err(io::Error::other("disk gone"))
            } else {
                Ok(())
            }
        }
        fn try_clone(&self) -> io::Result<Box<dyn BlockBackend>> {
            Ok(Box::new(self.clone()))
        }
        fn read_vectored_to(
            &mut self,
            dst: &ChainWriter,
            bufs: &[GuestBuf],
            offset: u64,
        ) -> io::Result<()> {
            self.record(false, offset, bufs);
            each_buf(bufs, offset, |b, at| self.read_to(dst, b.addr, at, b.len))
        }
        fn write_vectored_from(
            &mut self,
            mem: &GuestMemoryMmap,
            bufs: &[GuestBuf],
            offset: u64,
        ) -> io::Result<()> {
            self.record(true, offset, bufs);
            each_buf(bufs, offset, |b, at| {
                self.write_from(mem, b.addr, at, b.len)
            })
        }
    }

    struct Harness {
        mem: GuestMemoryMmap,
        dev: VirtioBlock,
        disk: MemDisk,
        irq: EventFd,
    }

    fn harness(readonly: bool) -> Harness {
        harness_with(MemDisk::default(), readonly)
    }

    /// A device over `disk`, whose sector n holds bytes n.
    fn harness_with(mut disk: MemDisk, readonly: bool) -> Harness {
        let mem = guest_memory();
        disk.data = Arc::new(Mutex::new(
            (0..DISK_SIZE).map(|i| (i / 512) as u8).collect(),
        ));
        disk.mem = Some(mem.clone());
        let dev =
            VirtioBlock::new("vda".into(), Box::new(disk.clone()), readonly, "test-disk").unwrap();
        Harness {
            mem,
            dev,
            disk,
            irq: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        }
    }

    /// Activates `dev` on `queue`, its interrupt line `irq`.
    fn activate(dev: &mut VirtioBlock, mem: &GuestMemoryMmap, irq: &EventFd, queue: Queue) {
        let interrupt = Arc::new(VirtioInterrupt::new(irq.try_clone().unwrap()));
        dev.activate(Activation {
            mem: mem.clone(),
            queues: vec![queue],
            interrupt,
            acked_features: VIRTIO_F_VERSION_1,
        })
        .unwrap();
    }

    impl Harness {
        /// Activates the device on a mock queue holding `chain` and processes it; returns
        /// the status byte and the used length once the request completed.
        fn run(&mut self, chain: &[RawDescriptor]) -> (u8, u32) {
            let vq = MockSplitQueue::create(&self.mem, GuestAddress(0), QUEUE_SIZE);
            vq.add_desc_chains(chain, 0).unwrap();
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            activate(
                &mut self.dev,
                &self.mem,
                &self.irq,
                vq.create_queue().unwrap(),
            );
            self.dev.process_queue();
            self.dev.pool.drain();
            let used = vq.used().ring().ref_at(0).unwrap().load();
            let status: u8 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
            (status, used.len())
        }

        fn header(&self, kind: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        }
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    /// header -> one data buffer -> status.
    fn chain3(data_len: u32, data_flags: u16) -> Vec<RawDescriptor> {
        vec![
            desc(HDR, 16, F_NEXT, 1),
            desc(BUF, data_len, data_flags | F_NEXT, 2),
            desc(STATUS, 1, F_WRITE, 0),
        ]
    }

    const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
    const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    #[test]
    fn config_space_reports_capacity_seg_max_and_block_size() {
        let h = harness(false);
        let mut cap = [0u8; 8];
        h.dev.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), DISK_SIZE / 512);
        let mut seg = [0u8; 4];
        h.dev.read_config(12, &mut seg);
        assert_eq!(u32::from_le_bytes(seg), u32::from(QUEUE_SIZE) - 2);
        let mut bs = [0u8; 4];
        h.dev.read_config(20, &mut bs);
        assert_eq!(u32::from_le_bytes(bs), 512);
        let mut past = [0xffu8; 4];
        h.dev.read_config(100, &mut past);
        assert_eq!(past, [0; 4]);
    }

    #[test]
    fn features_follow_readonly() {
        let rw = harness(false).dev.avail_features();
        let ro = harness(true).dev.avail_features();
        assert_eq!(rw & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(ro & (1 << VIRTIO_BLK_F_RO), 0);
        for f in [
            VIRTIO_F_VERSION_1,
            1 << VIRTIO_BLK_F_FLUSH,
            1 << VIRTIO_BLK_F_SEG_MAX,
        ] {
            assert_ne!(rw & f, 0);
        }
    }

    #[test]
    fn read_returns_disk_contents() {
        let mut h = harness(false);
        h.header(VIRTIO_BLK_T_IN, 3);
        let (status, used) = h.run(&chain3(1024, F_WRITE));
        assert_eq!(status, S_OK);
        assert_eq!(used, 1024 + 1);
        let mut buf = vec![0u8; 1024];
        h.mem.read_slice(&mut buf, GuestAddress(BUF)).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 3));
        assert!(buf[512..].iter().all(|&b| b == 4));
        assert_eq!(h.irq.read().unwrap(), 1, "the guest was interrupted");
    }

    #[test]
    fn write_reaches_the_disk() {
        let mut h = harness(false);
        h.header(VIRTIO_BLK_T_OUT, 1);
        h.mem.write_slice(&[0xab; 512], GuestAddress(BUF)).unwrap();
        let (status, used) = h.run(&chain3(512, 0));
        assert_eq!((status, used), (S_OK, 1));
        let d = h.disk.data.lock().unwrap();
        assert!(d[512..1024].iter().all(|&b| b == 0xab));
        assert!(d[..512].iter().all(|&b| b == 0));
    }

    #[test]
    fn flush_completes_only_after_the_backend_flushed() {
        let mut h = harness(false);
        h.header(VIRTIO_BLK_T_FLUSH, 0);
        let chain = vec![desc(HDR, 16, F_NEXT, 1), desc(STATUS, 1, F_WRITE, 0)];
        let (status, _) = h.run(&chain);
        assert_eq!(status, S_OK);
        // While the backend flushed, the status was still unset.
        assert_eq!(*h.disk.flushes.lock().unwrap(), vec![0xff]);
    }

    #[test]
    fn failed_flush_is_an_io_error() {
        let disk = MemDisk {
            fail_flush: true,
            ..Default::default()
        };
        let mut h = harness_with(disk, false);
        h.header(VIRTIO_BLK_T_FLUSH, 0);
        let (status, _) = h.run(&[desc(HDR, 16, F_NEXT, 1), desc(STATUS, 1, F_WRITE, 0)]);
        assert_eq!(status, S_IOERR);
    }

    #[test]
    fn get_id_reports_the_serial() {
        let mut h = harness(false);
        h.header(VIRTIO_BLK_T_GET_ID, 0);
        let (status, used) = h.run(&chain3(20, F_WRITE));
        assert_eq!(status, S_OK);
        assert_eq!(used, 20 + 1);
        let mut id = [0u8; 20];
        h.mem.read_slice(&mut id, GuestAddress(BUF)).unwrap();
        assert_eq!(&id[..9], b"test-disk");
        assert_eq!(id[9], 0);
    }

    #[test]
    fn readonly_disk_refuses_writes_and_stays_unchanged() {
        let mut h = harness(true);
        let before = h.disk.data.lock().unwrap().clone();
        h.header(VIRTIO_BLK_T_OUT, 0);
        h.mem.write_slice(&[0xcd; 512], GuestAddress(BUF)).unwrap();
        let (status, _) = h.run(&chain3(512, 0));
        assert_eq!(status, S_IOERR);
        assert_eq!(*h.disk.data.lock().unwrap(), before);
    }

    #[test]
    fn past_the_end_of_the_disk_is_an_io_error() {
        let mut h = harness(false);
        h.header(VIRTIO_BLK_T_IN, DISK_SIZE / 512 - 1);
        let (status, used) = h.run(&chain3(1024, F_WRITE));
        assert_eq!((status, used), (S_IOERR, 1));
        // A sector number so large that sector * 512 overflows.
        let mut h = harness(false);
        h.header(VIRTIO_BLK_T_IN, u64::MAX / 256);
        assert_eq!(h.run(&chain3(512, F_WRITE)).0, S_IOERR);
    }

    #[test]
    fn unaligned_length_is_an_io_error() {
        let mut h = harness(false);
        h.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(h.run(&chain3(100, F_WRITE)).0, S_IOERR);
    }

    #[test]
    fn wrong_buffer_direction_is_an_io_error() {
        let mut h = harness(false);
        h.header(VIRTIO_BLK_T_IN, 0);
        // A read into a device-readable buffer.
        assert_eq!(h.run(&chain3(512, 0)).0, S_IOERR);
        let mut h = harness(false);
        h.header(VIRTIO_BLK_T_OUT, 0);
        let before = h.disk.data.lock().unwrap().clone();
        assert_eq!(h.run(&chain3(512, F_WRITE)).0, S_IOERR);
        assert_eq!(*h.disk.data.lock().unwrap(), before);
    }

    #[test]
    fn buffer_outside_guest_memory_is_an_io_error() {
        let mut h = harness(false);
        h.header(VIRTIO_BLK_T_IN, 0);
        let chain = vec![
            desc(HDR, 16, F_NEXT, 1),
            desc(0xffff_0000_0000, 512, F_WRITE | F_NEXT, 2),
            desc(STATUS, 1, F_WRITE, 0),
        ];
        assert_eq!(h.run(&chain).0, S_IOERR);
        // A buffer that starts inside memory and runs off its end.
        let mut h = harness(false);
        h.header(VIRTIO_BLK_T_IN, 0);
        let end = crate::devices::virtio::device::test_utils::MEM_SIZE - 256;
        let chain = vec![
            desc(HDR, 16, F_NEXT, 1),
            desc(end, 512, F_WRITE | F_NEXT, 2),
            desc(STATUS, 1, F_WRITE, 0),
        ];
        assert_eq!(h.run(&chain).0, S_IOERR);
    }

    /// Regression (fuzz/corpus/virtio_block/regress-status-outside-memory): the write was
    /// done and completed with 512 used bytes and no status.
    #[test]
    fn status_outside_guest_memory_refuses_the_request_before_any_io() {
        let mut h = harness(false);
        h.header(VIRTIO_BLK_T_OUT, 0);
        h.mem.write_slice(&[0xab; 512], GuestAddress(BUF)).unwrap();
        let chain = vec![
            desc(HDR, 16, F_NEXT, 1),
            desc(BUF, 512, F_NEXT, 2),
            desc(0xffff_0000_0000, 1, F_WRITE, 0),
        ];
        assert_eq!(h.run(&chain).1, 0);
        assert_eq!(h.disk.data.lock().unwrap()[..512], [0u8; 512]);
    }

    /// Regression (fuzz/corpus/virtio_block/regress-get-id-buffer-outside-memory): GET_ID
    /// wrote its 20 bytes and said OK although the buffer ran past guest memory.
    #[test]
    fn get_id_buffer_outside_guest_memory_is_an_io_error() {
        let mut h = harness(false);
        h.header(VIRTIO_BLK_T_GET_ID, 0);
        let end = crate::devices::virtio::device::test_utils::MEM_SIZE - 256;
        let chain = vec![
            desc(HDR, 16, F_NEXT, 1),
            desc(end, 4096, F_WRITE | F_NEXT, 2),
            desc(STATUS, 1, F_WRITE, 0),
        ];
        assert_eq!(h.run(&chain), (S_IOERR, 1));
    }

    /// Regression (fuzz/corpus/virtio_block/regress-bogus-avail-index): process_queue spun
    /// forever on an available index the queue refuses to walk.
    #[test]
    fn bogus_avail_index_does_not_hang_the_device() {
        let mut h = harness(false);
        let vq = MockSplitQueue::create(&h.mem, GuestAddress(0), QUEUE_SIZE);
        activate(&mut h.dev, &h.mem, &h.irq, vq.create_queue().unwrap());
        // The guest claims 1000 new entries in a 256-entry queue.
        vq.avail().idx().store(1000);
        h.dev.process_queue();
        assert_eq!(vq.used().idx().load(), 0);
    }

    #[test]
    fn bad_header_is_an_io_error() {
        let mut h = harness(false);
        let chain = vec![desc(HDR, 8, F_NEXT, 1), desc(STATUS, 1, F_WRITE, 0)];
        assert_eq!(h.run(&chain).0, S_IOERR);
        let mut h = harness(false);
        let chain = vec![
            desc(HDR, 16, F_WRITE | F_NEXT, 1),
            desc(STATUS, 1, F_WRITE, 0),
        ];
        assert_eq!(h.run(&chain).0, S_IOERR);
    }

    #[test]
    fn unknown_request_type_is_unsupported() {
        let mut h = harness(false);
        h.header(42, 0);
        assert_eq!(h.run(&chain3(512, F_WRITE)).0, S_UNSUPP);
    }

    #[test]
    fn chain_without_status_is_completed_without_touching_memory() {
        let mut h = harness(false);
        h.header(VIRTIO_BLK_T_IN, 0);
        // The last descriptor is device-readable: nowhere to put a status.
        let chain = vec![desc(HDR, 16, F_NEXT, 1), desc(BUF, 512, 0, 0)];
        let (status, used) = h.run(&chain);
        assert_eq!((status, used), (0xff, 0));
    }

    #[test]
    fn looping_chain_is_completed_and_the_device_keeps_working() {
        let mut h = harness(false);
        h.header(VIRTIO_BLK_T_IN, 0);
        let chain = vec![
            desc(HDR, 16, F_NEXT, 1),
            desc(BUF, 512, F_WRITE | F_NEXT, 0),
        ];
        let (status, used) = h.run(&chain);
        assert_eq!((status, used), (0xff, 0));
        // A good request after it still works.
        h.header(VIRTIO_BLK_T_IN, 2);
        assert_eq!(h.run(&chain3(512, F_WRITE)).0, S_OK);
    }

    /// A writable device whose disk holds transfers while its gate is closed (it starts so).
    fn gated_harness() -> (Harness, Arc<Gate>) {
        let gate = Gate::closed();
        let disk = MemDisk {
            gate: Some(gate.clone()),
            ..Default::default()
        };
        (harness_with(disk, false), gate)
    }

    /// Where request `i` of a multi-request test keeps its header, data and status.
    fn slot(i: u16) -> (u64, u64, u64) {
        let base = DATA_START + 0x1_0000 + u64::from(i) * 0x2000;
        (base, base + 0x400, base + 0x1800)
    }

    /// Request `i`: descriptors 3i..3i+2 (header, `len` bytes of data, status), its header
    /// written and its status byte set to 0xff; a write's data is bytes `0xa0 + i`.
    fn request(
        mem: &GuestMemoryMmap,
        i: u16,
        kind: u32,
        sector: u64,
        len: u32,
    ) -> Vec<RawDescriptor> {
        let (hdr, buf, status) = slot(i);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let first = 3 * i;
        if kind == VIRTIO_BLK_T_FLUSH {
            return vec![
                desc(hdr, 16, F_NEXT, first + 1),
                desc(status, 1, F_WRITE, 0),
            ];
        }
        let data_flags = if kind == VIRTIO_BLK_T_IN { F_WRITE } else { 0 };
        if kind == VIRTIO_BLK_T_OUT {
            mem.write_slice(&vec![0xa0 + i as u8; len as usize], GuestAddress(buf))
                .unwrap();
        }
        vec![
            desc(hdr, 16, F_NEXT, first + 1),
            desc(buf, len, data_flags | F_NEXT, first + 2),
            desc(status, 1, F_WRITE, 0),
        ]
    }

    fn status_of(mem: &GuestMemoryMmap, i: u16) -> u8 {
        mem.read_obj(GuestAddress(slot(i).2)).unwrap()
    }

    /// The ids of the chains in the used ring, in completion order.
    fn used_heads(vq: &MockSplitQueue<GuestMemoryMmap>) -> Vec<u32> {
        let n = vq.used().idx().load();
        (0..n)
            .map(|i| vq.used().ring().ref_at(usize::from(i)).unwrap().load().id())
            .collect()
    }

    /// Makes requests `first`, `first + 1`... available: `(kind, sector, len)` each.
    fn queue_requests(
        vq: &MockSplitQueue<GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        first: u16,
        reqs: &[(u32, u64, u32)],
    ) {
        for (&(kind, sector, len), i) in reqs.iter().zip(first..) {
            let chain = request(mem, i, kind, sector, len);
            vq.add_desc_chains(&chain, 3 * i).unwrap();
        }
    }

    #[test]
    fn requests_are_served_concurrently_without_blocking_the_event_loop() {
        let (mut h, gate) = gated_harness();
        let vq = MockSplitQueue::create(&h.mem, GuestAddress(0), QUEUE_SIZE);
        let reqs: Vec<_> = (0..IO_THREADS as u64)
            .map(|i| (VIRTIO_BLK_T_IN, i + 1, 512))
            .collect();
        queue_requests(&vq, &h.mem, 0, &reqs);
        activate(&mut h.dev, &h.mem, &h.irq, vq.create_queue().unwrap());
        // Returns with every read still held at the gate.
        h.dev.process_queue();
        assert!(gate.holds(IO_THREADS), "all reads were in the disk at once");
        assert!(
            used_heads(&vq).is_empty(),
            "nothing completed before the disk did"
        );
        assert_eq!(status_of(&h.mem, 0), 0xff);
        gate.set_open(true);
        h.dev.pool.drain();
        let mut heads = used_heads(&vq);
        heads.sort_unstable();
        assert_eq!(heads, vec![0, 3, 6, 9]);
        for i in 0..IO_THREADS as u16 {
            assert_eq!(status_of(&h.mem, i), S_OK);
            let mut buf = [0u8; 512];
            h.mem.read_slice(&mut buf, GuestAddress(slot(i).1)).unwrap();
            assert_eq!(buf, [i as u8 + 1; 512], "request {i} read its own sector");
        }
        assert!(h.irq.read().unwrap() >= 1);
        assert_eq!(h.dev.metrics.bytes_to_guest(), 512 * IO_THREADS as u64);
    }

    #[test]
    fn flush_covers_the_writes_the_guest_saw_complete() {
        let (mut h, gate) = gated_harness();
        gate.set_open(true);
        let vq = MockSplitQueue::create(&h.mem, GuestAddress(0), QUEUE_SIZE);
        // Write A completes and the guest sees it.
        queue_requests(&vq, &h.mem, 0, &[(VIRTIO_BLK_T_OUT, 1, 512)]);
        activate(&mut h.dev, &h.mem, &h.irq, vq.create_queue().unwrap());
        h.dev.process_queue();
        h.dev.pool.drain();
        assert_eq!(used_heads(&vq), vec![0]);
        // Then write B, held in the disk, and a flush.
        gate.set_open(false);
        queue_requests(
            &vq,
            &h.mem,
            1,
            &[(VIRTIO_BLK_T_OUT, 2, 512), (VIRTIO_BLK_T_FLUSH, 0, 0)],
        );
        h.dev.process_queue();
        assert!(gate.holds(1));
        // The flush does not wait for B, which the guest has not seen complete...
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while used_heads(&vq).len() < 2 && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(used_heads(&vq), vec![0, 6]);
        assert_eq!(status_of(&h.mem, 2), S_OK);
        // ...but what it made durable holds A.
        let flushed = h.disk.flushed_data.lock().unwrap()[0].clone();
        assert!(flushed[512..1024].iter().all(|&b| b == 0xa0));
        gate.set_open(true);
        h.dev.pool.drain();
        assert_eq!(used_heads(&vq), vec![0, 6, 3]);
        assert!(h.disk.data.lock().unwrap()[1024..1536]
            .iter()
            .all(|&b| b == 0xa1));
    }

    #[test]
    fn reset_waits_for_requests_in_flight_and_queued() {
        let (mut h, gate) = gated_harness();
        let vq = MockSplitQueue::create(&h.mem, GuestAddress(0), QUEUE_SIZE);
        // More writes than threads: some wait in the pool's queue. Every other sector, so
        // that they are not merged.
        let n = IO_THREADS as u16 + 2;
        let reqs: Vec<_> = (0..u64::from(n))
            .map(|i| (VIRTIO_BLK_T_OUT, 2 * i, 512))
            .collect();
        queue_requests(&vq, &h.mem, 0, &reqs);
        activate(&mut h.dev, &h.mem, &h.irq, vq.create_queue().unwrap());
        h.dev.process_queue();
        assert!(gate.holds(IO_THREADS));
        let opener = {
            let gate = gate.clone();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(100));
                gate.set_open(true);
            })
        };
        h.dev.reset();
        assert!(gate.is_open(), "reset returned before the disk let go");
        assert_eq!(used_heads(&vq).len(), usize::from(n));
        let data = h.disk.data.lock().unwrap();
        for i in 0..n {
            assert_eq!(status_of(&h.mem, i), S_OK);
            let sector = &data[usize::from(i) * 1024..][..512];
            assert!(sector.iter().all(|&b| b == 0xa0 + i as u8), "write {i}");
        }
        drop(data);
        opener.join().unwrap();
        // Reset means no queue: a notification now does nothing.
        h.dev.process_queue();
    }

    #[test]
    fn dropping_the_device_finishes_its_requests() {
        let (h, gate) = gated_harness();
        let Harness {
            mem,
            mut dev,
            disk,
            irq,
        } = h;
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE);
        let reqs: Vec<_> = (0..IO_THREADS as u64 + 2)
            .map(|i| (VIRTIO_BLK_T_OUT, 2 * i, 512))
            .collect();
        queue_requests(&vq, &mem, 0, &reqs);
        activate(&mut dev, &mem, &irq, vq.create_queue().unwrap());
        dev.process_queue();
        assert!(gate.holds(IO_THREADS));
        gate.set_open(true);
        drop(dev);
        let data = disk.data.lock().unwrap();
        for i in 0..reqs.len() {
            assert!(data[i * 1024..][..512].iter().all(|&b| b == 0xa0 + i as u8));
        }
        assert_eq!(used_heads(&vq).len(), reqs.len());
    }

    #[test]
    fn completions_interrupt_only_when_the_driver_asks() {
        let mut h = harness(false);
        let vq = MockSplitQueue::create(&h.mem, GuestAddress(0), QUEUE_SIZE);
        let reqs: Vec<_> = (0..4).map(|i| (VIRTIO_BLK_T_IN, i, 512)).collect();
        queue_requests(&vq, &h.mem, 0, &reqs);
        // used_event = 3: interrupt once the fourth completion is in the used ring.
        let used_event = GuestAddress(vq.avail_addr().0 + 4 + 2 * u64::from(QUEUE_SIZE));
        h.mem.write_obj(3u16, used_event).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        q.set_event_idx(true);
        activate(&mut h.dev, &h.mem, &h.irq, q);
        h.dev.process_queue();
        h.dev.pool.drain();
        assert_eq!(used_heads(&vq).len(), 4);
        assert_eq!(h.irq.read().unwrap(), 1);
        assert_eq!(h.dev.metrics.interrupts(), 1);
        // Two more completions, still past used_event: no interrupt.
        queue_requests(
            &vq,
            &h.mem,
            4,
            &[(VIRTIO_BLK_T_IN, 0, 512), (VIRTIO_BLK_T_FLUSH, 0, 0)],
        );
        h.dev.process_queue();
        h.dev.pool.drain();
        assert_eq!(used_heads(&vq).len(), 6);
        assert!(h.irq.read().is_err(), "no interrupt was raised");
        assert_eq!(h.dev.metrics.interrupts(), 1);
    }

    #[test]
    fn adjacent_writes_are_merged_and_each_completed() {
        let mut h = harness(false);
        let vq = MockSplitQueue::create(&h.mem, GuestAddress(0), QUEUE_SIZE);
        let reqs = [
            (VIRTIO_BLK_T_OUT, 4, 512),
            (VIRTIO_BLK_T_OUT, 5, 1024),
            (VIRTIO_BLK_T_OUT, 7, 512),
            // Not adjacent: a job of its own.
            (VIRTIO_BLK_T_OUT, 10, 512),
            // Reads are never merged.
            (VIRTIO_BLK_T_IN, 20, 512),
            (VIRTIO_BLK_T_IN, 21, 512),
            // A write past the end fails alone.
            (VIRTIO_BLK_T_OUT, DISK_SIZE / 512, 512),
        ];
        queue_requests(&vq, &h.mem, 0, &reqs);
        activate(&mut h.dev, &h.mem, &h.irq, vq.create_queue().unwrap());
        h.dev.process_queue();
        h.dev.pool.drain();
        let mut transfers = h.disk.transfers.lock().unwrap().clone();
        transfers.sort_unstable();
        assert_eq!(
            transfers,
            vec![
                (false, 20 * 512, 1),
                (false, 21 * 512, 1),
                (true, 4 * 512, 3),
                (true, 10 * 512, 1)
            ]
        );
        let mut heads = used_heads(&vq);
        heads.sort_unstable();
        assert_eq!(heads, vec![0, 3, 6, 9, 12, 15, 18]);
        for i in 0..6 {
            assert_eq!(status_of(&h.mem, i), S_OK, "request {i}");
        }
        assert_eq!(status_of(&h.mem, 6), S_IOERR);
        // Each request's own used length: reads their data, writes the status byte only.
        for i in 0..7 {
            let e = vq.used().ring().ref_at(i).unwrap().load();
            let want = if e.id() == 12 || e.id() == 15 { 513 } else { 1 };
            assert_eq!(e.len(), want, "chain {}", e.id());
        }
        let d = h.disk.data.lock().unwrap();
        assert!(d[4 * 512..5 * 512].iter().all(|&b| b == 0xa0));
        assert!(d[5 * 512..7 * 512].iter().all(|&b| b == 0xa1));
        assert!(d[7 * 512..8 * 512].iter().all(|&b| b == 0xa2));
        assert!(d[10 * 512..11 * 512].iter().all(|&b| b == 0xa3));
        assert_eq!(h.dev.metrics.bytes_from_guest(), 512 * 5);
        assert_eq!(h.dev.metrics.bytes_to_guest(), 1024);
    }
}
