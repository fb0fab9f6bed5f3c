//! virtio-blk (virtio 1.x, section 5.2) over a raw image file.
//!
//! Requests are parsed from the descriptor chain without trusting the guest: a chain that
//! loops, a buffer in the wrong direction or outside guest memory, a transfer that is not a
//! multiple of 512 bytes or runs past the end of the disk each fail that one request with
//! VIRTIO_BLK_S_IOERR (or UNSUPP for unknown types); the device and the VMM carry on.
//! Writes go to the file as they arrive; a FLUSH completes only after fdatasync returned.

use std::io;

use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, error, warn};
use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmm_sys_util::eventfd::EventFd;

use super::device::{
    read_chain, take_notifications, ActivateError, Activation, DeviceState, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::config::DISK_SERIAL_MAX;
pub use crate::devices::disk::BlockBackend;
use crate::devices::disk::SECTOR_SIZE;
use crate::devices::metrics::DeviceMetrics;
use crate::vstate::memory::GuestMemoryMmap;

/// Virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Requests in flight the queue can hold.
pub const QUEUE_SIZE: u16 = 256;
const SECTOR_SHIFT: u64 = 9;
/// `struct virtio_blk_outhdr`: type, ioprio, sector.
const REQUEST_HEADER_LEN: u32 = 16;
/// Bytes of configuration space we fill (up to and including `blk_size`).
const CONFIG_LEN: usize = 24;

/// Errors creating a virtio-blk device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("Failed to create an eventfd for a virtio-blk device")]
    EventFd(#[source] io::Error),
}

/// Why a request failed, for the log; the guest only sees the status byte.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
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
    let status = descs
        .last()
        .filter(|d| d.is_write_only() && d.len() >= 1 && descs.len() >= 2)
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

/// The block device.
pub struct VirtioBlock {
    name: String,
    backend: Box<dyn BlockBackend>,
    readonly: bool,
    device_id: [u8; DISK_SERIAL_MAX],
    avail_features: u64,
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; 1],
    queue_evts: [EventFd; 1],
    activate_evt: EventFd,
    state: Option<DeviceState>,
    queue_registered: bool,
    /// The device's counters, handed over with the interrupt line at activation.
    metrics: Arc<DeviceMetrics>,
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
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&(backend.size() >> SECTOR_SHIFT).to_le_bytes());
        // seg_max: a request may use every descriptor but the header and status ones.
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        let mut device_id = [0u8; DISK_SERIAL_MAX];
        let id = id.as_bytes();
        let n = id.len().min(DISK_SERIAL_MAX);
        device_id[..n].copy_from_slice(&id[..n]);
        let evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(BlockError::EventFd);
        Ok(Self {
            name,
            backend,
            readonly,
            device_id,
            avail_features,
            config,
            queue_sizes: [QUEUE_SIZE],
            queue_evts: [evt()?],
            activate_evt: evt()?,
            state: None,
            queue_registered: false,
            metrics: DeviceMetrics::unnamed(),
        })
    }

    /// Serves one request; returns the status and the bytes written into guest buffers.
    fn execute(&mut self, req: &Request, mem: &GuestMemoryMmap) -> Result<u32, RequestError> {
        let data_len: u64 = req.data.iter().map(|d| u64::from(d.len())).sum();
        match req.kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                if req.kind == VIRTIO_BLK_T_OUT && self.readonly {
                    return Err(RequestError::ReadOnly);
                }
                if !data_len.is_multiple_of(SECTOR_SIZE) {
                    return Err(RequestError::Unaligned(data_len));
                }
                let size = self.backend.size();
                let start = req.sector.checked_mul(SECTOR_SIZE);
                if start
                    .and_then(|s| s.checked_add(data_len))
                    .is_none_or(|end| end > size)
                {
                    return Err(RequestError::OutOfRange {
                        sector: req.sector,
                        len: data_len,
                        size,
                    });
                }
                let mut offset = start.unwrap();
                for d in &req.data {
                    let len = d.len() as usize;
                    let io = if req.kind == VIRTIO_BLK_T_IN {
                        self.backend.read_to(mem, d.addr(), offset, len)
                    } else {
                        self.backend.write_from(mem, d.addr(), offset, len)
                    };
                    io.map_err(|e| RequestError::Io(e.to_string()))?;
                    offset += u64::from(d.len());
                }
                Ok(if req.kind == VIRTIO_BLK_T_IN {
                    self.metrics.add_bytes_to_guest(data_len);
                    data_len as u32
                } else {
                    self.metrics.add_bytes_from_guest(data_len);
                    0
                })
            }
            VIRTIO_BLK_T_FLUSH => {
                self.backend
                    .flush()
                    .map_err(|e| RequestError::Io(e.to_string()))?;
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let mut written = 0;
                let mut id = &self.device_id[..];
                for d in &req.data {
                    let n = (d.len() as usize).min(id.len());
                    mem.write_slice(&id[..n], d.addr())
                        .map_err(|e| RequestError::Memory(e.to_string()))?;
                    id = &id[n..];
                    written += n as u32;
                }
                Ok(written)
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    /// Drains the request queue (the virtio-queue loop: disable notifications, drain,
    /// re-enable, drain what raced in), then interrupts the guest if it wants to know.
    fn process_queue(&mut self) {
        let Some(mut state) = self.state.take() else {
            return;
        };
        loop {
            if let Err(e) = state.queues[0].disable_notification(&state.mem) {
                warn!("{}: cannot disable notifications: {e}", self.name);
            }
            while let Some(chain) = state.queues[0].pop_descriptor_chain(&state.mem) {
                let head = chain.head_index();
                let used = self.handle_chain(chain, &state.mem);
                if let Err(e) = state.queues[0].add_used(&state.mem, head, used) {
                    error!("{}: cannot complete request {head}: {e}", self.name);
                }
            }
            match state.queues[0].enable_notification(&state.mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    warn!("{}: cannot re-enable notifications: {e}", self.name);
                    break;
                }
            }
        }
        state.notify_if_needed(0);
        self.state = Some(state);
    }

    /// Serves one chain and writes its status; returns the used length.
    fn handle_chain<M>(
        &mut self,
        chain: virtio_queue::DescriptorChain<M>,
        mem: &GuestMemoryMmap,
    ) -> u32
    where
        M: std::ops::Deref,
        M::Target: GuestMemory,
    {
        let descs = match read_chain(chain, QUEUE_SIZE) {
            Ok(d) => d,
            Err(e) => {
                warn!("{}: {e}", self.name);
                return 0;
            }
        };
        let (result, status_addr) = match parse(&descs, mem) {
            Ok((req, status)) => (self.execute(&req, mem), Some(status)),
            Err((e, status)) => (Err(e), status),
        };
        let (status, written) = match result {
            Ok(n) => (VIRTIO_BLK_S_OK as u8, n),
            Err(e) => {
                warn!("{}: request failed: {e}", self.name);
                (e.status(), 0)
            }
        };
        match status_addr {
            Some(addr) => match mem.write_obj(status, addr) {
                Ok(()) => written + 1,
                Err(e) => {
                    warn!("{}: cannot write the request status: {e}", self.name);
                    written
                }
            },
            None => written,
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
        self.metrics = activation.interrupt.metrics().clone();
        self.state = Some(DeviceState::from_activation(activation, 1)?);
        self.activate_evt.write(1).map_err(ActivateError::EventFd)
    }

    fn reset(&mut self) {
        self.state = None;
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
    use crate::devices::disk::guest_io_error;
    use crate::devices::virtio::device::test_utils::{guest_memory, DATA_START};
    use crate::devices::virtio::device::VirtioInterrupt;
    use std::sync::{Arc, Mutex};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;

    const F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
    const F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
    const HDR: u64 = DATA_START;
    const BUF: u64 = DATA_START + 0x1000;
    const STATUS: u64 = DATA_START + 0x8000;
    const DISK_SIZE: u64 = 64 * 1024;

    /// An in-memory disk that records flushes and what the status byte was at that moment.
    #[derive(Clone, Default)]
    struct MemDisk {
        data: Arc<Mutex<Vec<u8>>>,
        flushes: Arc<Mutex<Vec<u8>>>,
        fail_flush: bool,
        mem: Option<GuestMemoryMmap>,
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
            mem: &GuestMemoryMmap,
            addr: GuestAddress,
            offset: u64,
            len: usize,
        ) -> io::Result<()> {
            let d = self.data.lock().unwrap();
            mem.write_slice(&d[offset as usize..offset as usize + len], addr)
                .map_err(guest_io_error)
        }
        fn write_from(
            &mut self,
            mem: &GuestMemoryMmap,
            addr: GuestAddress,
            offset: u64,
            len: usize,
        ) -> io::Result<()> {
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
            if self.fail_flush {
                Err(io::Error::other("disk gone"))
            } else {
                Ok(())
            }
        }
    }

    struct Harness {
        mem: GuestMemoryMmap,
        dev: VirtioBlock,
        disk: MemDisk,
        irq: EventFd,
    }

    fn harness(readonly: bool) -> Harness {
        let mem = guest_memory();
        let disk = MemDisk {
            data: Arc::new(Mutex::new(
                (0..DISK_SIZE).map(|i| (i / 512) as u8).collect(),
            )),
            mem: Some(mem.clone()),
            ..Default::default()
        };
        let dev =
            VirtioBlock::new("vda".into(), Box::new(disk.clone()), readonly, "test-disk").unwrap();
        Harness {
            mem,
            dev,
            disk,
            irq: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        }
    }

    impl Harness {
        /// Activates the device on a mock queue holding `chain` and processes it; returns
        /// the status byte and the used length.
        fn run(&mut self, chain: &[RawDescriptor]) -> (u8, u32) {
            let vq = MockSplitQueue::create(&self.mem, GuestAddress(0), QUEUE_SIZE);
            vq.add_desc_chains(chain, 0).unwrap();
            let q: Queue = vq.create_queue().unwrap();
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let interrupt = Arc::new(VirtioInterrupt::new(self.irq.try_clone().unwrap()));
            self.dev
                .activate(Activation {
                    mem: self.mem.clone(),
                    queues: vec![q],
                    interrupt,
                    acked_features: VIRTIO_F_VERSION_1,
                })
                .unwrap();
            self.dev.process_queue();
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
        let mut h = harness(false);
        h.disk.fail_flush = true;
        h.dev.backend = Box::new(h.disk.clone());
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
}
