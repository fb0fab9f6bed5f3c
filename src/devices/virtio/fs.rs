//! virtio-fs (virtio 1.2, section 5.11): a FUSE file system the guest mounts by tag
//! (`mount -t virtiofs TAG /mnt`), served by an external virtiofsd over vhost-user.
//!
//! The device owns the configuration space (the tag and the number of request queues) and
//! the interrupts; the backend owns the queues. Two queues: hiprio (FORGET and INTERRUPT
//! requests) and one request queue. On DRIVER_OK (a vCPU thread) the device records the
//! queues and wakes the event loop, which starts the backend (`VhostUserConnection::start`):
//! the kick eventfds are the queue ioeventfds the transport registered with KVM, the call
//! eventfds are the device's own, watched on the event loop and turned into
//! `signal_used_queue`, so the same device works on virtio-pci and virtio-mmio. (On MSI-X
//! the backend could signal the vector's irqfd directly and skip the event loop; not done:
//! the vector is programmed by the driver later and may change.)
//!
//! A backend that hangs up (virtiofsd killed or crashed) is reported once; from then on the
//! device answers every request itself with ENOTCONN, FUSE's "transport endpoint is not
//! connected", so the guest's file operations fail instead of hanging. The VMM goes on.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{error, info, warn};
use virtio_queue::QueueT;
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

use super::device::{
    read_chain, rearm_notification, take_notifications, ActivateError, Activation, DeviceState,
    VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use super::guest_write::{ChainWriter, ChainWrites};
use super::vhost_user::{VhostUserConnection, VhostUserError};
use crate::devices::metrics::DeviceMetrics;

/// Virtio device id of a file system device.
pub const VIRTIO_ID_FS: u32 = 26;
/// Longest tag: the configuration space holds 36 bytes, NUL-padded (5.11.4).
pub use crate::config::FS_TAG_MAX;
/// hiprio + one request queue.
const NUM_QUEUES: usize = 2;
/// Request queues (`num_request_queues` in the configuration space).
const NUM_REQUEST_QUEUES: u32 = 1;
/// Queue size offered; virtiofsd (C and Rust) accept up to 1024.
const QUEUE_SIZE: u16 = 1024;
/// Indirect descriptors: handled by the backend, and by `fail_requests` through
/// virtio-queue.
const VIRTIO_RING_F_INDIRECT_DESC: u64 =
    1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// Feature bits passed through from the backend when it offers them.
const PASSED_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC;
/// FUSE's reply header (`struct fuse_out_header`: len, error, unique) and the request's
/// (`struct fuse_in_header`, whose `unique` is at offset 8).
const FUSE_OUT_HEADER_LEN: u32 = 16;
const FUSE_IN_HEADER_LEN: usize = 40;

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("Failed to create an eventfd for virtio-fs")]
    EventFd(#[source] io::Error),
    #[error("The virtio-fs tag '{0}' is empty or longer than {FS_TAG_MAX} bytes")]
    Tag(String),
    #[error("Failed to set up the vhost-user connection of virtio-fs '{tag}'")]
    Connect {
        tag: String,
        #[source]
        source: VhostUserError,
    },
    #[error("The vhost-user backend of virtio-fs '{0}' does not offer VIRTIO_F_VERSION_1")]
    NotModern(String),
}

/// The device.
pub struct VirtioFs {
    tag: String,
    conn: Option<VhostUserConnection>,
    avail_features: u64,
    queue_sizes: [u16; NUM_QUEUES],
    /// Kick: KVM signals them on guest notifications; the backend reads them.
    queue_evts: [EventFd; NUM_QUEUES],
    /// Call: the backend signals them when it used buffers.
    call_evts: [EventFd; NUM_QUEUES],
    /// Written by the vCPU thread on activation and reset, so the event loop (the only
    /// thread that talks to the backend) catches up.
    sync_evt: EventFd,
    state: Option<DeviceState>,
    /// Whether the backend runs the current activation's rings.
    started: bool,
    /// The driver reset the device and the backend's rings are still running.
    stop_pending: bool,
    /// The backend is gone (or failed): the device fails requests itself.
    failed: bool,
    kicks_watched: bool,
    metrics: Arc<DeviceMetrics>,
}

impl VirtioFs {
    /// A device with `tag` on a connected backend socket.
    pub fn new(tag: &str, stream: std::os::unix::net::UnixStream) -> Result<Self, FsError> {
        if tag.is_empty() || tag.len() > FS_TAG_MAX {
            return Err(FsError::Tag(tag.into()));
        }
        let conn = VhostUserConnection::connect(stream, NUM_QUEUES).map_err(|source| {
            FsError::Connect {
                tag: tag.into(),
                source,
            }
        })?;
        let backend = conn.backend_features();
        if backend & VIRTIO_F_VERSION_1 == 0 {
            return Err(FsError::NotModern(tag.into()));
        }
        let evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(FsError::EventFd);
        Ok(Self {
            tag: tag.into(),
            conn: Some(conn),
            avail_features: backend & PASSED_FEATURES,
            queue_sizes: [QUEUE_SIZE; NUM_QUEUES],
            queue_evts: [evt()?, evt()?],
            call_evts: [evt()?, evt()?],
            sync_evt: evt()?,
            state: None,
            started: false,
            stop_pending: false,
            failed: false,
            kicks_watched: false,
            metrics: DeviceMetrics::unnamed(),
        })
    }

    /// The tag the guest mounts.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Whether the backend is gone and requests are failed.
    pub fn backend_failed(&self) -> bool {
        self.failed
    }

    /// Brings the backend in line with the driver: stops rings a reset left running,
    /// starts the rings of a new activation. Runs on the event loop.
    fn sync_backend(&mut self, ops: &mut EventOps) {
        if self.stop_pending {
            self.stop_pending = false;
            if let Some(conn) = self.conn.as_mut() {
                if let Err(e) = conn.stop(NUM_QUEUES) {
                    self.backend_lost(ops, &format!("{e}"));
                }
            }
        }
        if self.started || self.failed {
            if self.failed {
                self.fail_all(ops);
            }
            return;
        }
        let Some(state) = self.state.as_ref() else {
            return;
        };
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        match conn.start(
            &state.mem,
            &state.queues,
            state.acked_features,
            &self.queue_evts,
            &self.call_evts,
        ) {
            Ok(()) => {
                self.started = true;
                info!("virtio-fs {}: the backend runs the queues", self.tag);
            }
            Err(e) => self.backend_lost(ops, &error_chain(&e)),
        }
    }

    /// The backend hung up or refused a request: said once, the connection dropped, and
    /// the device answers the guest's requests itself from now on.
    fn backend_lost(&mut self, ops: &mut EventOps, why: &str) {
        if !self.failed {
            error!(
                "virtio-fs {}: the vhost-user backend (virtiofsd) is gone: {why}; the guest's \
                 requests on this file system now fail with ENOTCONN",
                self.tag
            );
        }
        self.failed = true;
        self.started = false;
        if let Some(conn) = self.conn.take() {
            let _ = ops.remove(Events::with_data_raw(
                conn.socket_fd(),
                EVT_SOCKET,
                EventSet::IN,
            ));
        }
        self.fail_all(ops);
    }

    /// Watches the kicks (the backend no longer does) and fails what is queued.
    fn fail_all(&mut self, ops: &mut EventOps) {
        if !self.kicks_watched {
            for (i, evt) in self.queue_evts.iter().enumerate() {
                if let Err(e) = ops.add(Events::with_data(evt, EVT_KICK + i as u32, EventSet::IN)) {
                    error!("virtio-fs {}: cannot watch queue {i}: {e:?}", self.tag);
                }
            }
            self.kicks_watched = true;
            // What the backend took and never completed is between the used index in guest
            // memory and the available index: answer all of it.
            if let Some(state) = self.state.as_mut() {
                for q in &mut state.queues {
                    if let Ok(used) = q.used_idx(&state.mem, std::sync::atomic::Ordering::Acquire) {
                        q.set_next_avail(used.0);
                        q.set_next_used(used.0);
                    }
                }
            }
        }
        for q in 0..NUM_QUEUES {
            self.fail_requests(q);
        }
    }

    /// Completes every available request of `queue` with ENOTCONN (requests without a
    /// reply buffer, such as FORGET, are just completed).
    pub(crate) fn fail_requests(&mut self, queue: usize) {
        let Some(state) = self.state.as_mut() else {
            return;
        };
        let mut completed = 0;
        let mut empty_rounds = 0;
        loop {
            // With EVENT_IDX the driver only notifies past the available event the device
            // publishes (virtio 1.x 2.7.10): the backend's last one is stale now, so the
            // drain loop re-arms it as every device here does.
            if let Err(e) = state.writers[queue].disable_notification(&mut state.queues[queue]) {
                warn!("virtio-fs: cannot disable notifications: {e}");
            }
            let mut popped = 0;
            while let Some(chain) = state.queues[queue].pop_descriptor_chain(&state.mem) {
                popped += 1;
                let head = chain.head_index();
                let result = match read_chain(chain, QUEUE_SIZE) {
                    Ok(descs) => {
                        let chain = ChainWrites::new(head, &descs);
                        let len =
                            error_reply(&descs, &state.mem, &state.writers[queue].chain(&chain))
                                .unwrap_or(0);
                        state.writers[queue].add_used(&mut state.queues[queue], chain, len)
                    }
                    Err(e) => {
                        warn!("virtio-fs: bad request chain: {e}");
                        state.writers[queue].add_used_empty(&mut state.queues[queue], head)
                    }
                };
                if let Err(e) = result {
                    error!("virtio-fs: cannot complete a request: {e}");
                }
            }
            completed += popped;
            if !rearm_notification(
                &mut state.queues[queue],
                &state.writers[queue],
                popped,
                &mut empty_rounds,
                "virtio-fs",
            ) {
                break;
            }
        }
        if completed > 0 {
            state.notify_if_needed(queue);
        }
    }
}

/// Writes a FUSE error reply (ENOTCONN) for the request in `descs`; returns its length, or
/// None when the request has no room for one (it takes no reply).
fn error_reply(
    descs: &[virtio_queue::desc::split::Descriptor],
    mem: &crate::vstate::memory::GuestMemoryMmap,
    dst: &ChainWriter,
) -> Option<u32> {
    let first = descs.first().filter(|d| !d.is_write_only())?;
    let mut header = [0u8; FUSE_IN_HEADER_LEN];
    let n = (first.len() as usize).min(FUSE_IN_HEADER_LEN);
    mem.read_slice(&mut header[..n], first.addr()).ok()?;
    let unique = u64::from_le_bytes(header[8..16].try_into().ok()?);
    let reply_buf = descs
        .iter()
        .find(|d| d.is_write_only() && d.len() >= FUSE_OUT_HEADER_LEN)?;
    let mut reply = [0u8; FUSE_OUT_HEADER_LEN as usize];
    reply[0..4].copy_from_slice(&FUSE_OUT_HEADER_LEN.to_le_bytes());
    reply[4..8].copy_from_slice(&(-libc::ENOTCONN).to_le_bytes());
    reply[8..16].copy_from_slice(&unique.to_le_bytes());
    dst.write_slice(&reply, reply_buf.addr()).ok()?;
    Some(FUSE_OUT_HEADER_LEN)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(&format!(": {c}"));
        src = c.source();
    }
    s
}

impl VirtioDevice for VirtioFs {
    /// The backend (virtiofsd, another process) holds the share's open files and FUSE
    /// sessions, and writes guest memory where the VMM cannot track it.
    fn persist_refusal(&self) -> Option<&'static str> {
        Some("its virtiofsd holds the open files and writes guest memory itself")
    }
    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.state
            .as_ref()
            .map(|st| st.queues.iter().map(|q| q.state()).collect())
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    /// `struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; }` (5.11.4).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; FS_TAG_MAX + 4];
        config[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        config[FS_TAG_MAX..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
        data.fill(0);
        if let Some(src) = usize::try_from(offset).ok().and_then(|o| config.get(o..)) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.metrics = activation.interrupt.metrics().clone();
        self.state = Some(DeviceState::from_activation(activation, NUM_QUEUES)?);
        self.sync_evt.write(1).map_err(ActivateError::EventFd)
    }

    fn reset(&mut self) {
        self.state = None;
        if self.started {
            self.started = false;
            self.stop_pending = true;
            if let Err(e) = self.sync_evt.write(1) {
                error!(
                    "virtio-fs {}: cannot stop the backend's rings: {e}",
                    self.tag
                );
            }
        }
    }
}

const EVT_SYNC: u32 = 0;
const EVT_SOCKET: u32 = 1;
/// EVT_CALL + queue index.
const EVT_CALL: u32 = 0x10;
/// EVT_KICK + queue index (watched only once the backend is gone).
const EVT_KICK: u32 = 0x20;

impl MutEventSubscriber for VirtioFs {
    fn init(&mut self, ops: &mut EventOps) {
        let mut fds = vec![(self.sync_evt.as_raw_fd(), EVT_SYNC)];
        if let Some(conn) = &self.conn {
            // The backend sends nothing unasked (no backend request channel is set up), so
            // the socket turns readable only when the backend hangs up.
            fds.push((conn.socket_fd(), EVT_SOCKET));
        }
        for (i, evt) in self.call_evts.iter().enumerate() {
            fds.push((evt.as_raw_fd(), EVT_CALL + i as u32));
        }
        for (fd, data) in fds {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                error!("virtio-fs {}: cannot watch its events: {e:?}", self.tag);
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            EVT_SYNC => {
                let _ = self.sync_evt.read();
                self.sync_backend(ops);
            }
            EVT_SOCKET => self.backend_lost(ops, "it closed the vhost-user socket"),
            d if (EVT_CALL..EVT_CALL + NUM_QUEUES as u32).contains(&d) => {
                let q = (d - EVT_CALL) as usize;
                let _ = self.call_evts[q].read();
                if let Some(state) = &self.state {
                    state.interrupt.signal_used_queue(q);
                }
            }
            d if (EVT_KICK..EVT_KICK + NUM_QUEUES as u32).contains(&d) => {
                let q = (d - EVT_KICK) as usize;
                take_notifications(&self.queue_evts[q], &self.metrics);
                if self.failed {
                    self.fail_requests(q);
                }
            }
            other => warn!("virtio-fs {}: unexpected event {other}", self.tag),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::Mutex;

    use event_manager::{EventManager, SubscriberOps};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Address, GuestAddress, GuestMemoryBackend};

    use super::*;
    use crate::devices::virtio::device::test_utils::{DATA_START, MEM_SIZE};
    use crate::devices::virtio::device::{VirtioInterrupt, VIRTIO_MMIO_INT_VRING};
    use crate::devices::virtio::vhost_user::fake::{FakeBackend, FEATURES};
    use crate::vstate::memory::{create_guest_memory_with, GuestMemoryMmap, MemoryBacking};

    const F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
    const F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
    const SETUP: [&str; 4] = [
        "SET_OWNER",
        "GET_FEATURES",
        "GET_PROTOCOL_FEATURES",
        "SET_PROTOCOL_FEATURES",
    ];

    type Loop = EventManager<Arc<Mutex<VirtioFs>>>;

    fn shared_memory() -> GuestMemoryMmap {
        create_guest_memory_with(MEM_SIZE, MemoryBacking::Shared).unwrap()
    }

    fn run(ev: &mut Loop) {
        // Everything is already signalled: one pass handles it.
        ev.run_with_timeout(100).unwrap();
    }

    struct Harness<'a> {
        fake: FakeBackend,
        dev: Arc<Mutex<VirtioFs>>,
        ev: Loop,
        irq: EventFd,
        interrupt: Arc<VirtioInterrupt>,
        queues: [MockSplitQueue<'a, GuestMemoryMmap>; 2],
    }

    fn activated(mem: &GuestMemoryMmap) -> Harness<'_> {
        let (fake, stream) = FakeBackend::start();
        let dev = Arc::new(Mutex::new(VirtioFs::new("hostroot", stream).unwrap()));
        let mut ev = Loop::new().unwrap();
        ev.add_subscriber(dev.clone());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(irq.try_clone().unwrap()));
        let queues = [
            MockSplitQueue::create(mem, GuestAddress(0), 64),
            MockSplitQueue::create(mem, GuestAddress(0x1_0000), 64),
        ];
        let qs: Vec<Queue> = queues.iter().map(|q| q.create_queue().unwrap()).collect();
        dev.lock()
            .unwrap()
            .activate(Activation {
                mem: mem.clone(),
                queues: qs,
                interrupt: interrupt.clone(),
                acked_features: VIRTIO_F_VERSION_1,
            })
            .unwrap();
        run(&mut ev);
        // Setup, SET_FEATURES, SET_MEM_TABLE, 5 per ring, 2 ENABLEs.
        fake.wait_requests(SETUP.len() + 2 + 10 + 2);
        Harness {
            fake,
            dev,
            ev,
            irq,
            interrupt,
            queues,
        }
    }

    #[test]
    fn config_space_holds_the_tag_and_one_request_queue() {
        let (_fake, stream) = FakeBackend::start();
        let dev = VirtioFs::new("myfs", stream).unwrap();
        assert_eq!(dev.device_type(), VIRTIO_ID_FS);
        let mut cfg = [0xffu8; 40];
        dev.read_config(0, &mut cfg);
        assert_eq!(&cfg[..4], b"myfs");
        assert!(cfg[4..36].iter().all(|&b| b == 0), "NUL-padded");
        assert_eq!(u32::from_le_bytes(cfg[36..40].try_into().unwrap()), 1);
        // A read at an offset, and one past the end.
        let mut word = [0u8; 4];
        dev.read_config(36, &mut word);
        assert_eq!(u32::from_le_bytes(word), 1);
        let mut past = [0xffu8; 4];
        dev.read_config(40, &mut past);
        assert_eq!(past, [0; 4]);
        // The backend's features, without the vhost-user bit.
        assert_eq!(
            dev.avail_features(),
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
        );
        assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    }

    #[test]
    fn bad_tags_are_refused() {
        for tag in ["", &"x".repeat(FS_TAG_MAX + 1)] {
            let (_fake, stream) = FakeBackend::start();
            let err = VirtioFs::new(tag, stream).err().unwrap();
            assert!(err.to_string().contains("tag"), "{err}");
        }
        let (_fake, stream) = FakeBackend::start();
        assert!(VirtioFs::new(&"x".repeat(FS_TAG_MAX), stream).is_ok());
    }

    #[test]
    fn activation_hands_the_backend_memory_and_rings() {
        let mem = shared_memory();
        let h = activated(&mem);
        let mut want: Vec<&str> = SETUP.to_vec();
        want.extend(["SET_FEATURES", "SET_MEM_TABLE"]);
        for _ in 0..2 {
            want.extend([
                "SET_VRING_NUM",
                "SET_VRING_BASE",
                "SET_VRING_ADDR",
                "SET_VRING_KICK",
                "SET_VRING_CALL",
            ]);
        }
        want.extend(["SET_VRING_ENABLE", "SET_VRING_ENABLE"]);
        assert_eq!(h.fake.requests(), want);
        let seen = h.fake.seen.lock().unwrap();
        // The driver's features plus the vhost-user bit.
        assert_eq!(
            seen.acked_features,
            VIRTIO_F_VERSION_1 | (FEATURES & (1 << 30))
        );
        // One region, the memfd at offset 0, at this process's address for it.
        let region = mem.iter().next().unwrap();
        assert_eq!(seen.regions, vec![(0, MEM_SIZE, region.as_ptr() as u64, 0)]);
        assert_eq!(seen.region_files.len(), 1);
        // Ring addresses are user addresses (vhost-user SET_VRING_ADDR).
        let hva = |gpa: GuestAddress| mem.get_host_address(gpa).unwrap() as u64;
        let q1 = &h.queues[1];
        assert_eq!(
            seen.vring_addr[1],
            (
                hva(q1.desc_table_addr()),
                hva(q1.used_addr()),
                hva(q1.avail_addr())
            )
        );
        assert_eq!(seen.vring_num, [64, 64]);
        assert_eq!(seen.enabled, [true, true]);
    }

    #[test]
    fn kicks_reach_the_backend_and_calls_interrupt_the_guest() {
        let mem = shared_memory();
        let mut h = activated(&mem);
        // The kick fd the backend got is the queue's ioeventfd.
        h.dev.lock().unwrap().queue_events()[1].write(3).unwrap();
        let mut kick = h.fake.seen.lock().unwrap().kick[1].take().unwrap();
        let mut count = [0u8; 8];
        kick.read_exact(&mut count).unwrap();
        assert_eq!(u64::from_ne_bytes(count), 3);
        // The backend signalling its call fd raises the queue's interrupt.
        let mut call = h.fake.seen.lock().unwrap().call[1].take().unwrap();
        call.write_all(&1u64.to_ne_bytes()).unwrap();
        run(&mut h.ev);
        assert_eq!(h.irq.read().unwrap(), 1);
        assert_eq!(h.interrupt.status(), VIRTIO_MMIO_INT_VRING);
    }

    #[test]
    fn reset_stops_the_backends_rings() {
        let mem = shared_memory();
        let mut h = activated(&mem);
        h.dev.lock().unwrap().reset();
        run(&mut h.ev);
        let reqs = h.fake.wait_requests(SETUP.len() + 14 + 2);
        assert_eq!(
            &reqs[reqs.len() - 2..],
            ["GET_VRING_BASE", "GET_VRING_BASE"]
        );
        assert_eq!(h.fake.seen.lock().unwrap().enabled, [false, false]);
    }

    #[test]
    fn a_backend_that_hangs_up_makes_requests_fail_with_enotconn() {
        let mem = shared_memory();
        let mut h = activated(&mem);
        h.fake.hang_up();
        run(&mut h.ev);
        assert!(h.dev.lock().unwrap().backend_failed());
        // A FUSE request (in header with unique = 0x77, then room for the reply).
        let mut header = [0u8; FUSE_IN_HEADER_LEN];
        header[8..16].copy_from_slice(&0x77u64.to_le_bytes());
        mem.write_slice(&header, GuestAddress(DATA_START)).unwrap();
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(DATA_START, 40, F_NEXT, 1)),
            RawDescriptor::from(SplitDescriptor::new(DATA_START + 0x1000, 256, F_WRITE, 0)),
        ];
        h.queues[1].add_desc_chains(&descs, 0).unwrap();
        h.dev.lock().unwrap().queue_events()[1].write(1).unwrap();
        run(&mut h.ev);
        let used = h.queues[1].used().ring().ref_at(0).unwrap().load();
        assert_eq!(used.len(), FUSE_OUT_HEADER_LEN);
        let reply: [u8; 16] = mem.read_obj(GuestAddress(DATA_START + 0x1000)).unwrap();
        assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), 16);
        assert_eq!(
            i32::from_le_bytes(reply[4..8].try_into().unwrap()),
            -libc::ENOTCONN
        );
        assert_eq!(u64::from_le_bytes(reply[8..16].try_into().unwrap()), 0x77);
        assert!(h.irq.read().is_ok(), "the guest was interrupted");
    }

    /// Regression (seen in the guest: `sync` hung after the backend died): with EVENT_IDX
    /// the device must publish a fresh available event after it answered, or the driver
    /// never notifies the next request.
    #[test]
    fn failed_requests_rearm_the_available_event() {
        let mem = shared_memory();
        let (mut fake, stream) = FakeBackend::start();
        let dev = Arc::new(Mutex::new(VirtioFs::new("t", stream).unwrap()));
        let mut ev = Loop::new().unwrap();
        ev.add_subscriber(dev.clone());
        fake.hang_up();
        run(&mut ev);
        let qs = [
            MockSplitQueue::create(&mem, GuestAddress(0), 64),
            MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 64),
        ];
        let queues: Vec<Queue> = qs
            .iter()
            .map(|q| {
                let mut q: Queue = q.create_queue().unwrap();
                q.set_event_idx(true);
                q
            })
            .collect();
        dev.lock()
            .unwrap()
            .activate(Activation {
                mem: mem.clone(),
                queues,
                interrupt: Arc::new(VirtioInterrupt::new(
                    EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                )),
                acked_features: VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX,
            })
            .unwrap();
        run(&mut ev);
        for i in 0..3u16 {
            qs[1]
                .add_desc_chains(
                    &[RawDescriptor::from(SplitDescriptor::new(
                        DATA_START, 40, 0, 0,
                    ))],
                    i,
                )
                .unwrap();
            dev.lock().unwrap().queue_events()[1].write(1).unwrap();
            run(&mut ev);
            assert_eq!(qs[1].used().idx().load(), i + 1);
            // avail_event sits after the used ring's 64 entries (virtio 1.x 2.7.8).
            let avail_event: u16 = mem
                .read_obj(qs[1].used_addr().unchecked_add(4 + 8 * 64))
                .unwrap();
            assert_eq!(avail_event, i + 1, "the next request is notified");
        }
    }

    #[test]
    fn a_backend_gone_before_activation_fails_requests_too() {
        let mem = shared_memory();
        let (mut fake, stream) = FakeBackend::start();
        let dev = Arc::new(Mutex::new(VirtioFs::new("t", stream).unwrap()));
        let mut ev = Loop::new().unwrap();
        ev.add_subscriber(dev.clone());
        fake.hang_up();
        run(&mut ev);
        let q = MockSplitQueue::create(&mem, GuestAddress(0), 64);
        let q1 = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 64);
        // A FORGET-like request: no reply buffer, completed with length 0.
        q.add_desc_chains(
            &[RawDescriptor::from(SplitDescriptor::new(
                DATA_START, 40, 0, 0,
            ))],
            0,
        )
        .unwrap();
        dev.lock()
            .unwrap()
            .activate(Activation {
                mem: mem.clone(),
                queues: vec![q.create_queue().unwrap(), q1.create_queue().unwrap()],
                interrupt: Arc::new(VirtioInterrupt::new(
                    EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                )),
                acked_features: VIRTIO_F_VERSION_1,
            })
            .unwrap();
        run(&mut ev);
        assert!(dev.lock().unwrap().backend_failed());
        assert_eq!(q.used().idx().load(), 1);
        assert_eq!(q.used().ring().ref_at(0).unwrap().load().len(), 0);
    }
}
