//! virtio-net (virtio 1.x, section 5.1) over a host TAP device.
//!
//! Two queues: receive (0) and transmit (1). Every frame on either queue starts with the
//! 12-byte `struct virtio_net_hdr_v1`, which the TAP (opened with IFF_VNET_HDR) takes and
//! gives in the same format, so checksum and segmentation offloads pass through untouched:
//! the guest sends and receives TCP segments of up to 64 KiB.
//!
//! Transmit gathers each chain into a bounce buffer and writes it to the TAP. Receive reads
//! a frame from the TAP (watched with EPOLLIN) into the bounce buffer and scatters it into the
//! guest's receive buffers; with VIRTIO_NET_F_MRG_RXBUF a frame may span several buffers
//! (5.1.6.4), which lets the guest post page-sized buffers and still take 64 KiB segments.
//! When the guest has no receive buffer, the frame waits here and the TAP is not watched
//! until the guest adds buffers (its receive queue notification): nothing spins, and frames
//! queue in the host kernel meanwhile.
//!
//! Nothing the guest puts in a queue is trusted: a chain that loops or is longer than the
//! queue, a buffer outside guest memory or in the wrong direction, a transmit chain shorter
//! than the header or longer than the largest frame is completed with used length 0 and
//! logged; the device carries on.

use std::io;
use std::num::Wrapping;
use std::os::fd::AsRawFd;

use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, error, info, warn};
use virtio_bindings::virtio_net::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::block::read_config_bytes;
use super::device::{
    read_chain, rearm_notification, take_notifications, ActivateError, Activation, ChainError,
    DeviceState, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use super::guest_write::ChainWrites;
use crate::config::{MacAddr, NetConfig};
use crate::devices::metrics::DeviceMetrics;
use crate::devices::tap::{Tap, TapError};
use crate::vstate::memory::GuestMemoryMmap;

/// Virtio device id of a network card.
pub const VIRTIO_ID_NET: u32 = 1;
/// Entries in each queue.
pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// `struct virtio_net_hdr_v1`: with VIRTIO_F_VERSION_1 the header always has `num_buffers`.
pub const VNET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Largest frame either way, header included: the largest IP packet (what a TSO/GSO segment
/// can reach), an Ethernet header with a VLAN tag, and the virtio-net header.
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + 18 + 65535;
/// Configuration space we fill: the MAC (5.1.4).
const CONFIG_LEN: usize = 6;
/// Frames moved from the TAP per wakeup, so transmit and other devices get their turn; the
/// TAP is level-triggered, so what is left wakes the loop again.
const RX_BUDGET: usize = 128;

/// Errors creating a NIC.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("Failed to create an eventfd for a virtio-net device")]
    EventFd(#[source] io::Error),
}

/// Where a NIC's frames go: the TAP device, or a fake in tests.
pub trait NetBackend: Send + AsRawFd {
    /// Reads one frame (header first) into `buf`; WouldBlock when none is waiting.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one whole frame (header first).
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize>;
    /// Sets the TUN_F_* offloads the guest can receive.
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
    /// Whether the backend failed for good (a deleted TAP): its errors are not worth a
    /// warning each time the guest posts buffers.
    fn is_gone(&self) -> bool {
        false
    }
}

impl NetBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Tap::read_frame(self, buf)
    }
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        Tap::write_frame(self, frame)
    }
    fn is_gone(&self) -> bool {
        Tap::is_gone(self)
    }
    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        Tap::set_offload(self, flags)
    }
}

/// Opens every NIC's TAP, in order, so that a bad one fails before KVM is touched. The name
/// the kernel picked for tap=auto is logged and printed, since the user must configure it.
pub fn open_taps(nets: &[NetConfig]) -> Result<Vec<Tap>, NetError> {
    let mut taps = Vec::with_capacity(nets.len());
    for (i, net) in nets.iter().enumerate() {
        let tap = Tap::open(&net.tap)?;
        if net.tap == crate::config::TapConfig::Auto {
            info!("NIC {i} (eth{i}) uses TAP {}", tap.name());
            eprintln!("ferrovm: NIC {i} uses TAP {}", tap.name());
        }
        taps.push(tap);
    }
    Ok(taps)
}

/// The MAC of NIC `index` when none is given: locally administered unicast (02:...), with
/// the process id and the index in it so NICs of one VM, and VMs on one bridge, differ.
pub fn default_mac(index: usize) -> MacAddr {
    let pid = std::process::id();
    MacAddr([
        0x02,
        0x46, // 'F'
        (pid >> 16) as u8,
        (pid >> 8) as u8,
        pid as u8,
        index as u8,
    ])
}

/// The TUN_F_* offloads matching the features the driver acked: what the guest accepts on
/// receive. (What it sends needs no set-up: the TAP takes any valid header.) The TSO flags
/// only count with checksum offload, as for the feature bits (5.1.3.1).
pub fn tap_offloads(acked: u64) -> u32 {
    let has = |bit: u32| acked & (1 << bit) != 0;
    let mut flags = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= libc::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
    }
    flags
}

/// Counters of one NIC.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames read from the TAP that never reached the guest.
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames the guest sent that the TAP refused.
    pub tx_dropped: u64,
    /// Chains refused as malformed (both queues).
    pub bad_chains: u64,
}

/// What is wrong with a chain, for the log; the guest sees used length 0.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum ChainFault {
    #[error("{0}")]
    Chain(#[from] ChainError),
    #[error("a device-writable buffer on the transmit queue")]
    WritableTx,
    #[error("a device-readable buffer on the receive queue")]
    ReadOnlyRx,
    #[error("buffer {addr:#x}+{len} is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("transmit chain of {0} bytes is shorter than the 12-byte header")]
    TooShort(u64),
    #[error("transmit chain of {0} bytes is longer than the largest frame ({MAX_FRAME_LEN})")]
    TooLong(u64),
    #[error("receive buffer has no room")]
    Empty,
}

/// A receive buffer taken from the queue but not filled yet.
#[derive(Debug)]
struct RxBuffer {
    /// The chain, and what it lets the device write.
    chain: ChainWrites,
    /// (address, length) of each descriptor, all checked to lie in guest memory.
    parts: Vec<(GuestAddress, u32)>,
    capacity: u64,
}

/// Checks a chain's descriptors: all in the direction the queue needs, all in guest memory.
/// Returns them, and what the chain lets the device write.
fn check_parts<M>(
    chain: virtio_queue::DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    writable: bool,
) -> Result<(Vec<(GuestAddress, u32)>, ChainWrites), ChainFault>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let head = chain.head_index();
    let descs = read_chain(chain, QUEUE_SIZE)?;
    let parts = descs
        .iter()
        .map(|d| {
            if d.is_write_only() != writable {
                return Err(if writable {
                    ChainFault::ReadOnlyRx
                } else {
                    ChainFault::WritableTx
                });
            }
            if !GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
                return Err(ChainFault::OutsideMemory {
                    addr: d.addr().0,
                    len: d.len(),
                });
            }
            Ok((d.addr(), d.len()))
        })
        .collect::<Result<_, _>>()?;
    Ok((parts, ChainWrites::new(head, &descs)))
}

/// Whether the driver wants an interrupt for the receive entries added since the used index
/// was `before`. virtio-queue's own check counts one entry per `add_used`, which undercounts
/// frames completed by `GuestWriter::add_used_together`; with VIRTIO_RING_F_EVENT_IDX the test is the
/// driver's `used_event` against the whole range (virtio 1.x, 2.7.10).
fn rx_needs_interrupt(queue: &mut Queue, mem: &GuestMemoryMmap, before: u16) -> bool {
    // Also resets virtio-queue's count, and fences the used ring writes before the read.
    let lib = queue.needs_notification(mem).unwrap_or(true);
    if !queue.event_idx_enabled() {
        return lib;
    }
    let used_event_addr =
        GuestAddress(queue.avail_ring()).checked_add(4 + 2 * u64::from(queue.size()));
    let used_event = match used_event_addr.map(|a| mem.read_obj::<u16>(a)) {
        Some(Ok(v)) => Wrapping(u16::from_le(v)),
        _ => return true,
    };
    let new = Wrapping(queue.next_used());
    new - used_event - Wrapping(1) < new - Wrapping(before)
}

/// How handing one frame to the guest went.
#[derive(Debug, PartialEq, Eq)]
enum Delivery {
    Delivered,
    Dropped,
    /// No receive buffer: the frame is kept until the guest posts some.
    NoBuffers,
}

/// The network card.
pub struct VirtioNet {
    name: String,
    backend: Box<dyn NetBackend>,
    avail_features: u64,
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; 2],
    queue_evts: [EventFd; 2],
    activate_evt: EventFd,
    state: Option<DeviceState>,
    queues_registered: bool,
    tap_watched: bool,
    /// Whether the TAP watch state was logged since activation: the first decision is
    /// logged even when it changes nothing (no buffers yet, so the TAP was never watched).
    watch_reported: bool,
    /// The frame read from the TAP and not yet given to the guest, if `rx_len` is set.
    rx_frame: Vec<u8>,
    rx_len: Option<usize>,
    /// Receive buffers taken from the queue and not filled yet (in queue order).
    rx_held: Vec<RxBuffer>,
    tx_frame: Vec<u8>,
    stats: NetStats,
    /// The device's counters, handed over with the interrupt line at activation.
    metrics: Arc<DeviceMetrics>,
}

impl VirtioNet {
    /// A NIC named `name` (for logs) with MAC `mac` on `backend`.
    pub fn new(name: String, backend: Box<dyn NetBackend>, mac: MacAddr) -> Result<Self, NetError> {
        let avail_features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_CSUM
            | 1 << VIRTIO_NET_F_GUEST_CSUM
            | 1 << VIRTIO_NET_F_GUEST_TSO4
            | 1 << VIRTIO_NET_F_GUEST_TSO6
            | 1 << VIRTIO_NET_F_HOST_TSO4
            | 1 << VIRTIO_NET_F_HOST_TSO6
            | 1 << VIRTIO_NET_F_MRG_RXBUF;
        let evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::EventFd);
        Ok(Self {
            name,
            backend,
            avail_features,
            config: mac.0,
            queue_sizes: [QUEUE_SIZE; 2],
            queue_evts: [evt()?, evt()?],
            activate_evt: evt()?,
            state: None,
            queues_registered: false,
            tap_watched: false,
            watch_reported: false,
            // One byte more than the largest frame, to tell a frame cut short by the read.
            rx_frame: vec![0; MAX_FRAME_LEN + 1],
            rx_len: None,
            rx_held: Vec::new(),
            tx_frame: vec![0; MAX_FRAME_LEN],
            stats: NetStats::default(),
            metrics: DeviceMetrics::unnamed(),
        })
    }

    /// The counters so far.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Sends every chain on the transmit queue to the backend (the virtio-queue loop:
    /// disable notifications, drain, re-enable, drain what raced in).
    pub(crate) fn process_tx(&mut self) {
        let Some(mut state) = self.state.take() else {
            return;
        };
        let mut completed = 0u32;
        let mut empty_rounds = 0;
        loop {
            if let Err(e) = state.writers[TX].disable_notification(&mut state.queues[TX]) {
                warn!("{}: cannot disable transmit notifications: {e}", self.name);
            }
            let mut popped = 0;
            while let Some(chain) = state.queues[TX].pop_descriptor_chain(&state.mem) {
                popped += 1;
                let head = chain.head_index();
                self.transmit(chain, &state.mem);
                // The device writes nothing into transmit buffers (5.1.6.2).
                if let Err(e) = state.writers[TX].add_used_empty(&mut state.queues[TX], head) {
                    error!("{}: cannot complete transmit chain {head}: {e}", self.name);
                }
                completed += 1;
            }
            if !rearm_notification(
                &mut state.queues[TX],
                &state.writers[TX],
                popped,
                &mut empty_rounds,
                &self.name,
            ) {
                break;
            }
        }
        if completed > 0 {
            state.notify_if_needed(TX);
        }
        self.state = Some(state);
    }

    /// Gathers one transmit chain and writes it to the backend.
    fn transmit<M>(&mut self, chain: virtio_queue::DescriptorChain<M>, mem: &GuestMemoryMmap)
    where
        M: std::ops::Deref,
        M::Target: GuestMemory,
    {
        let len = match self.gather(chain, mem) {
            Ok(len) => len,
            Err(e) => {
                self.stats.bad_chains += 1;
                warn!("{}: transmit chain refused: {e}", self.name);
                return;
            }
        };
        match self.backend.write_frame(&self.tx_frame[..len]) {
            Ok(_) => {
                self.stats.tx_frames += 1;
                self.stats.tx_bytes += (len - VNET_HDR_LEN) as u64;
                self.metrics
                    .add_bytes_from_guest((len - VNET_HDR_LEN) as u64);
            }
            Err(e) => {
                // A real NIC drops too when the wire refuses (link down, bad offload
                // header); the guest's stack recovers.
                self.stats.tx_dropped += 1;
                debug!(
                    "{}: TAP refused a {len}-byte frame ({e}); {} dropped so far",
                    self.name, self.stats.tx_dropped
                );
            }
        }
    }

    /// Copies a transmit chain into `tx_frame`; returns its length.
    fn gather<M>(
        &mut self,
        chain: virtio_queue::DescriptorChain<M>,
        mem: &GuestMemoryMmap,
    ) -> Result<usize, ChainFault>
    where
        M: std::ops::Deref,
        M::Target: GuestMemory,
    {
        let (parts, _) = check_parts(chain, mem, false)?;
        let total: u64 = parts.iter().map(|&(_, len)| u64::from(len)).sum();
        if total < VNET_HDR_LEN as u64 {
            return Err(ChainFault::TooShort(total));
        }
        if total > MAX_FRAME_LEN as u64 {
            return Err(ChainFault::TooLong(total));
        }
        let mut off = 0;
        for (addr, len) in parts {
            let len = len as usize;
            mem.read_slice(&mut self.tx_frame[off..off + len], addr)
                .map_err(|_| ChainFault::OutsideMemory {
                    addr: addr.0,
                    len: len as u32,
                })?;
            off += len;
        }
        Ok(off)
    }

    /// Moves frames from the backend into receive buffers until the backend is empty, the
    /// guest has no buffer left or the budget is spent. Returns whether the backend should
    /// be watched for more: false while a frame waits for the guest's buffers.
    pub(crate) fn process_rx(&mut self) -> bool {
        let Some(mut state) = self.state.take() else {
            return false;
        };
        // Notifications are only wanted when out of buffers (re-enabled below then).
        if let Err(e) = state.writers[RX].disable_notification(&mut state.queues[RX]) {
            warn!("{}: cannot disable receive notifications: {e}", self.name);
        }
        let mut completed = 0u32;
        let used_before = state.queues[RX].next_used();
        let mut want_backend = true;
        for _ in 0..RX_BUDGET {
            let len = match self.rx_len {
                Some(len) => len,
                None => match self.backend.read_frame(&mut self.rx_frame) {
                    Ok(len) if !(VNET_HDR_LEN..=MAX_FRAME_LEN).contains(&len) => {
                        self.stats.rx_dropped += 1;
                        debug!("{}: {len}-byte frame from the TAP dropped", self.name);
                        continue;
                    }
                    Ok(len) => {
                        self.rx_len = Some(len);
                        len
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // A deleted TAP (EBADFD, which Tap reports once) stays readable to
                        // epoll: stop watching rather than spin, and try again when the guest
                        // next posts receive buffers unless it is gone for good.
                        if !self.backend.is_gone() {
                            warn!("{}: cannot read from the TAP: {e}", self.name);
                        }
                        want_backend = false;
                        break;
                    }
                },
            };
            match self.deliver(&mut state, len, &mut completed) {
                Delivery::Delivered => {
                    self.stats.rx_frames += 1;
                    self.stats.rx_bytes += (len - VNET_HDR_LEN) as u64;
                    self.metrics.add_bytes_to_guest((len - VNET_HDR_LEN) as u64);
                    self.rx_len = None;
                }
                Delivery::Dropped => {
                    self.stats.rx_dropped += 1;
                    self.rx_len = None;
                    debug!(
                        "{}: {len}-byte frame does not fit the guest's receive buffers; {} \
                         dropped so far",
                        self.name, self.stats.rx_dropped
                    );
                }
                Delivery::NoBuffers => {
                    want_backend = false;
                    break;
                }
            }
        }
        if completed > 0 && rx_needs_interrupt(&mut state.queues[RX], &state.mem, used_before) {
            state.interrupt.signal_used_queue(RX);
        }
        self.state = Some(state);
        want_backend
    }

    /// Takes receive buffers until the frame fits (one buffer without MRG_RXBUF), then
    /// copies it in and completes the buffers.
    fn deliver(&mut self, state: &mut DeviceState, len: usize, completed: &mut u32) -> Delivery {
        let mergeable = state.acked_features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        let mut retried = false;
        loop {
            let capacity: u64 = self.rx_held.iter().map(|b| b.capacity).sum();
            if (mergeable && capacity >= len as u64) || (!mergeable && !self.rx_held.is_empty()) {
                break;
            }
            if self.rx_held.len() >= usize::from(state.queues[RX].size()) {
                // Every buffer the queue can hold is here and the frame still does not fit.
                return Delivery::Dropped;
            }
            match state.queues[RX].pop_descriptor_chain(&state.mem) {
                Some(chain) => {
                    let head = chain.head_index();
                    let parts =
                        check_parts(chain, &state.mem, true).and_then(|(parts, chain)| match parts
                            .iter()
                            .map(|&(_, l)| u64::from(l))
                            .sum::<u64>()
                        {
                            0 => Err(ChainFault::Empty),
                            capacity => Ok(RxBuffer {
                                chain,
                                parts,
                                capacity,
                            }),
                        });
                    match parts {
                        Ok(buf) => self.rx_held.push(buf),
                        Err(e) => {
                            self.stats.bad_chains += 1;
                            warn!("{}: receive buffer refused: {e}", self.name);
                            let (queue, writer) = (&mut state.queues[RX], &state.writers[RX]);
                            if let Err(e) = writer.add_used_empty(queue, head) {
                                error!("{}: cannot complete receive chain {head}: {e}", self.name);
                            }
                            *completed += 1;
                        }
                    }
                }
                None => {
                    // Out of buffers: ask for a notification when the guest adds some, then
                    // look once more in case it did in between.
                    match state.writers[RX].enable_notification(&mut state.queues[RX]) {
                        Ok(true) if !retried => retried = true,
                        Ok(_) => return Delivery::NoBuffers,
                        Err(e) => {
                            warn!("{}: cannot enable receive notifications: {e}", self.name);
                            return Delivery::NoBuffers;
                        }
                    }
                }
            }
        }
        if retried {
            // Buffers came after all; notifications are not needed while they last.
            let _ = state.writers[RX].disable_notification(&mut state.queues[RX]);
        }

        // How many buffers the frame takes.
        let count = if mergeable {
            let mut sum = 0u64;
            self.rx_held
                .iter()
                .take_while(|b| {
                    let before = sum;
                    sum += b.capacity;
                    before < len as u64
                })
                .count()
        } else {
            if self.rx_held[0].capacity < len as u64 {
                // The buffer stays for a frame that fits (5.1.6.3: without MRG_RXBUF the
                // driver's buffers must take a whole frame; it chose them too small).
                return Delivery::Dropped;
            }
            1
        };
        self.rx_frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN]
            .copy_from_slice(&(count as u16).to_le_bytes());
        let mut off = 0;
        let mut used = Vec::with_capacity(count);
        for buf in self.rx_held.drain(..count) {
            let start = off;
            let dst = state.writers[RX].chain(&buf.chain);
            for &(addr, part_len) in &buf.parts {
                let n = (part_len as usize).min(len - off);
                if n == 0 {
                    break;
                }
                if let Err(e) = dst.write_slice(&self.rx_frame[off..off + n], addr) {
                    // Checked at pop time; guest memory does not shrink.
                    error!("{}: cannot write a receive buffer: {e}", self.name);
                }
                off += n;
            }
            used.push((buf.chain, (off - start) as u32));
        }
        let heads: Vec<u16> = used.iter().map(|(c, _)| c.head()).collect();
        if let Err(e) = state.writers[RX].add_used_together(&mut state.queues[RX], used) {
            error!(
                "{}: cannot complete receive buffers {heads:?}: {e}",
                self.name
            );
        }
        *completed += count as u32;
        Delivery::Delivered
    }

    fn backend_events(&self) -> Events {
        Events::with_data_raw(self.backend.as_raw_fd(), EVT_TAP, EventSet::IN)
    }

    /// Starts or stops watching the backend for frames.
    fn watch_backend(&mut self, ops: &mut EventOps, want: bool) {
        if want != self.tap_watched {
            let events = self.backend_events();
            let result = if want {
                ops.add(events)
            } else {
                ops.remove(events)
            };
            if let Err(e) = result {
                error!("{}: cannot change the watch on the TAP: {e:?}", self.name);
                return;
            }
            self.tap_watched = want;
        } else if self.watch_reported {
            return;
        }
        self.watch_reported = true;
        if want {
            debug!("{}: watching the TAP", self.name);
        } else {
            debug!(
                "{}: TAP not watched until the guest posts receive buffers",
                self.name
            );
        }
    }
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
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
        let state = DeviceState::from_activation(activation, 2)?;
        let offloads = tap_offloads(state.acked_features);
        match self.backend.set_offload(offloads) {
            Ok(()) => {}
            // The device still comes up, as a NIC with its cable pulled: the guest is not
            // left with a half-probed device because the host side went away.
            Err(_) if self.backend.is_gone() => {}
            Err(e) => {
                return Err(ActivateError::Backend(format!(
                    "{}: failed to set the TAP offloads {offloads:#x}: {e}",
                    self.name
                )))
            }
        }
        info!(
            "{}: activated, features {:#x}, TAP offloads {offloads:#x}",
            self.name, state.acked_features
        );
        self.state = Some(state);
        self.activate_evt.write(1).map_err(ActivateError::EventFd)
    }

    fn reset(&mut self) {
        self.state = None;
        self.watch_reported = false;
        self.rx_held.clear();
        if self.rx_len.take().is_some() {
            self.stats.rx_dropped += 1;
        }
        debug!("{}: reset; {:?}", self.name, self.stats);
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.state
            .as_ref()
            .map(|st| st.queues.iter().map(|q| q.state()).collect())
    }
}

const EVT_ACTIVATE: u32 = 0;
const EVT_RX_QUEUE: u32 = 1;
const EVT_TX_QUEUE: u32 = 2;
const EVT_TAP: u32 = 3;

impl MutEventSubscriber for VirtioNet {
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
                if !self.queues_registered {
                    let rx = Events::with_data(&self.queue_evts[RX], EVT_RX_QUEUE, EventSet::IN);
                    let tx = Events::with_data(&self.queue_evts[TX], EVT_TX_QUEUE, EventSet::IN);
                    match ops.add(rx).and_then(|()| ops.add(tx)) {
                        Ok(()) => self.queues_registered = true,
                        Err(e) => error!("{}: cannot watch the queues: {e:?}", self.name),
                    }
                }
                debug!("{}: activated", self.name);
                // Frames may have been queued before the queues were watched.
                self.process_tx();
                let want = self.process_rx();
                self.watch_backend(ops, want);
            }
            EVT_RX_QUEUE => {
                take_notifications(&self.queue_evts[RX], &self.metrics);
                let want = self.process_rx();
                self.watch_backend(ops, want);
            }
            EVT_TX_QUEUE => {
                take_notifications(&self.queue_evts[TX], &self.metrics);
                self.process_tx();
            }
            // An event of this batch may arrive after the watch was dropped.
            EVT_TAP if !self.tap_watched => {}
            EVT_TAP => {
                let want = self.process_rx();
                self.watch_backend(ops, want);
            }
            other => warn!("{}: unexpected event {other}", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::device::test_utils::{guest_memory, DATA_START, MEM_SIZE};
    use crate::devices::virtio::device::VirtioInterrupt;
    use std::os::fd::RawFd;
    use std::os::unix::net::UnixDatagram;
    use std::sync::{Arc, Mutex};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    const F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
    const F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
    const RX_QUEUE_AT: u64 = 0;
    const TX_QUEUE_AT: u64 = 0x1_0000;
    const MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x42]);
    const MRG: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;

    /// A backend on a datagram socket pair: each datagram is one frame. The test holds the
    /// other end.
    struct FakeTap {
        sock: UnixDatagram,
        offloads: Arc<Mutex<Option<u32>>>,
    }

    impl NetBackend for FakeTap {
        fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.sock.recv(buf)
        }
        fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
            self.sock.send(frame)
        }
        fn set_offload(&mut self, flags: u32) -> io::Result<()> {
            *self.offloads.lock().unwrap() = Some(flags);
            Ok(())
        }
    }

    impl AsRawFd for FakeTap {
        fn as_raw_fd(&self) -> RawFd {
            self.sock.as_raw_fd()
        }
    }

    struct Harness<'a> {
        mem: &'a GuestMemoryMmap,
        dev: VirtioNet,
        /// The host side of the fake TAP.
        host: UnixDatagram,
        offloads: Arc<Mutex<Option<u32>>>,
        irq: EventFd,
        rxq: MockSplitQueue<'a, GuestMemoryMmap>,
        txq: MockSplitQueue<'a, GuestMemoryMmap>,
        /// Next free descriptor index in each queue's table.
        rx_next: u16,
        tx_next: u16,
    }

    fn harness(mem: &GuestMemoryMmap) -> Harness<'_> {
        let (dev_end, host) = UnixDatagram::pair().unwrap();
        dev_end.set_nonblocking(true).unwrap();
        host.set_nonblocking(true).unwrap();
        // Room for several 64 KiB frames in flight.
        let offloads = Arc::new(Mutex::new(None));
        let backend = FakeTap {
            sock: dev_end,
            offloads: offloads.clone(),
        };
        let dev = VirtioNet::new("eth0".into(), Box::new(backend), MAC).unwrap();
        Harness {
            mem,
            dev,
            host,
            offloads,
            irq: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            rxq: MockSplitQueue::create(mem, GuestAddress(RX_QUEUE_AT), QUEUE_SIZE),
            txq: MockSplitQueue::create(mem, GuestAddress(TX_QUEUE_AT), QUEUE_SIZE),
            rx_next: 0,
            tx_next: 0,
        }
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    /// A chain of `(addr, len)` buffers with `flags`, linked from descriptor `first` on.
    fn chain(first: u16, bufs: &[(u64, u32)], flags: u16) -> Vec<RawDescriptor> {
        bufs.iter()
            .enumerate()
            .map(|(i, &(addr, len))| {
                let i = i as u16;
                if usize::from(i) + 1 < bufs.len() {
                    desc(addr, len, flags | F_NEXT, first + i + 1)
                } else {
                    desc(addr, len, flags, 0)
                }
            })
            .collect()
    }

    impl Harness<'_> {
        fn activate(&mut self, features: u64) {
            let interrupt = Arc::new(VirtioInterrupt::new(self.irq.try_clone().unwrap()));
            let mut rx: Queue = self.rxq.create_queue().unwrap();
            let mut tx: Queue = self.txq.create_queue().unwrap();
            let event_idx = features & VIRTIO_RING_F_EVENT_IDX != 0;
            rx.set_event_idx(event_idx);
            tx.set_event_idx(event_idx);
            self.dev
                .activate(Activation {
                    mem: self.mem.clone(),
                    queues: vec![rx, tx],
                    interrupt,
                    acked_features: VIRTIO_F_VERSION_1 | features,
                })
                .unwrap();
        }

        /// Puts one chain of `bufs` on the transmit queue.
        fn add_tx(&mut self, bufs: &[(u64, u32)], flags: u16) {
            self.add_tx_raw(&chain(self.tx_next, bufs, flags));
        }

        fn add_tx_raw(&mut self, descs: &[RawDescriptor]) {
            self.txq.add_desc_chains(descs, self.tx_next).unwrap();
            self.tx_next += descs.len() as u16;
        }

        /// Puts one receive buffer of `bufs` on the receive queue.
        fn add_rx(&mut self, bufs: &[(u64, u32)], flags: u16) {
            self.add_rx_raw(&chain(self.rx_next, bufs, flags));
        }

        fn add_rx_raw(&mut self, descs: &[RawDescriptor]) {
            self.rxq.add_desc_chains(descs, self.rx_next).unwrap();
            self.rx_next += descs.len() as u16;
        }

        /// (head, len) of used entry `i` of the receive or transmit queue.
        fn used(&self, q: usize, i: usize) -> (u32, u32) {
            let vq = if q == RX { &self.rxq } else { &self.txq };
            let e = vq.used().ring().ref_at(i).unwrap().load();
            (e.id(), e.len())
        }

        fn used_idx(&self, q: usize) -> u16 {
            let vq = if q == RX { &self.rxq } else { &self.txq };
            vq.used().idx().load()
        }

        /// The frames the device wrote to the fake TAP.
        fn sent(&self) -> Vec<Vec<u8>> {
            let mut out = Vec::new();
            let mut buf = vec![0u8; MAX_FRAME_LEN + 100];
            while let Ok(n) = self.host.recv(&mut buf) {
                out.push(buf[..n].to_vec());
            }
            out
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        }
    }

    /// A frame with a zero virtio-net header and `len` payload bytes derived from `seed`.
    fn frame(len: usize, seed: u8) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
        f
    }

    #[test]
    fn features_and_mac_in_config_space() {
        let mem = guest_memory();
        let h = harness(&mem);
        let f = h.dev.avail_features();
        for bit in [
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_MRG_RXBUF,
        ] {
            assert_ne!(f & (1 << bit), 0, "feature bit {bit}");
        }
        assert_ne!(f & VIRTIO_F_VERSION_1, 0);
        assert_ne!(f & VIRTIO_RING_F_EVENT_IDX, 0);
        // Not implemented, so not offered.
        for bit in [
            VIRTIO_NET_F_CTRL_VQ,
            VIRTIO_NET_F_MQ,
            VIRTIO_NET_F_GUEST_UFO,
            VIRTIO_NET_F_HOST_UFO,
        ] {
            assert_eq!(f & (1 << bit), 0, "feature bit {bit}");
        }
        assert_eq!(h.dev.device_type(), 1);
        assert_eq!(h.dev.queue_max_sizes(), &[256, 256]);
        let mut mac = [0u8; 6];
        h.dev.read_config(0, &mut mac);
        assert_eq!(mac, MAC.0);
        let mut tail = [0xffu8; 4];
        h.dev.read_config(4, &mut tail);
        assert_eq!(tail, [0, 0x42, 0, 0]);
    }

    #[test]
    fn default_macs_are_local_unicast_and_differ_per_nic() {
        let a = default_mac(0);
        let b = default_mac(1);
        assert_ne!(a, b);
        assert_eq!(a.0[0] & 0b11, 0b10, "locally administered, unicast");
        let pid = std::process::id();
        assert_eq!(
            &a.0[2..5],
            &[(pid >> 16) as u8, (pid >> 8) as u8, pid as u8]
        );
    }

    #[test]
    fn tap_offloads_follow_the_acked_features() {
        assert_eq!(tap_offloads(0), 0);
        let csum = 1 << VIRTIO_NET_F_GUEST_CSUM;
        let tso = 1 << VIRTIO_NET_F_GUEST_TSO4 | 1 << VIRTIO_NET_F_GUEST_TSO6;
        assert_eq!(tap_offloads(csum), libc::TUN_F_CSUM);
        assert_eq!(
            tap_offloads(csum | tso),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        );
        // TSO without checksum offload is meaningless to the TAP.
        assert_eq!(tap_offloads(tso), 0);
        // Host-side features do not change what the TAP hands us.
        assert_eq!(tap_offloads(1 << VIRTIO_NET_F_HOST_TSO4), 0);

        let mem = guest_memory();
        let mut h = harness(&mem);
        h.activate(csum | 1 << VIRTIO_NET_F_GUEST_TSO4);
        assert_eq!(
            *h.offloads.lock().unwrap(),
            Some(libc::TUN_F_CSUM | libc::TUN_F_TSO4)
        );
    }

    #[test]
    fn transmitted_frame_reaches_the_tap() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        let f = frame(1500, 1);
        // Header and frame in separate descriptors, as Linux sends them.
        mem.write_slice(&f[..VNET_HDR_LEN], GuestAddress(DATA_START))
            .unwrap();
        mem.write_slice(&f[VNET_HDR_LEN..], GuestAddress(DATA_START + 0x1000))
            .unwrap();
        h.add_tx(&[(DATA_START, 12), (DATA_START + 0x1000, 1500)], 0);
        h.activate(VIRTIO_RING_F_EVENT_IDX);
        h.dev.process_tx();
        assert_eq!(h.sent(), vec![f]);
        assert_eq!(h.used_idx(TX), 1);
        assert_eq!(h.used(TX, 0), (0, 0));
        assert_eq!(h.irq.read().unwrap(), 1, "the guest was interrupted");
        let s = h.dev.stats();
        assert_eq!((s.tx_frames, s.tx_bytes, s.bad_chains), (1, 1500, 0));
    }

    #[test]
    fn received_frame_reaches_the_guest() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        h.add_rx(&[(DATA_START, 2048)], F_WRITE);
        h.activate(0);
        let f = frame(1000, 3);
        h.host.send(&f).unwrap();
        assert!(h.dev.process_rx(), "the TAP is still watched");
        assert_eq!(h.used(RX, 0), (0, f.len() as u32));
        let got = h.read(DATA_START, f.len());
        assert_eq!(got[NUM_BUFFERS_OFFSET..VNET_HDR_LEN], [1, 0], "num_buffers");
        assert_eq!(got[VNET_HDR_LEN..], f[VNET_HDR_LEN..]);
        assert_eq!(h.irq.read().unwrap(), 1);
        assert_eq!(h.dev.stats().rx_frames, 1);
    }

    #[test]
    fn mergeable_buffers_take_a_large_frame() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        // Three page-sized buffers, the middle one in two pieces.
        h.add_rx(&[(DATA_START, 4096)], F_WRITE);
        h.add_rx(
            &[(DATA_START + 0x1000, 1000), (DATA_START + 0x8000, 3096)],
            F_WRITE,
        );
        h.add_rx(&[(DATA_START + 0x2000, 4096)], F_WRITE);
        h.activate(MRG);
        let f = frame(9000, 5);
        h.host.send(&f).unwrap();
        assert!(h.dev.process_rx());
        assert_eq!(h.used_idx(RX), 3);
        assert_eq!(h.used(RX, 0), (0, 4096));
        assert_eq!(h.used(RX, 1), (1, 4096));
        assert_eq!(h.used(RX, 2), (3, f.len() as u32 - 8192));
        let mut got = h.read(DATA_START, 4096);
        got.extend(h.read(DATA_START + 0x1000, 1000));
        got.extend(h.read(DATA_START + 0x8000, 3096));
        got.extend(h.read(DATA_START + 0x2000, f.len() - 8192));
        assert_eq!(got[NUM_BUFFERS_OFFSET..VNET_HDR_LEN], [3, 0], "num_buffers");
        assert_eq!(got[VNET_HDR_LEN..], f[VNET_HDR_LEN..]);
    }

    #[test]
    fn interrupt_follows_used_event_across_a_multi_buffer_frame() {
        for (used_event, want_irq) in [(0u16, true), (1, true), (2, true), (3, false)] {
            let mem = guest_memory();
            let mut h = harness(&mem);
            for i in 0..3 {
                h.add_rx(&[(DATA_START + i * 0x1000, 4096)], F_WRITE);
            }
            // The driver asks for an interrupt once entry `used_event` is used (2.7.10).
            let addr = h
                .rxq
                .avail_addr()
                .unchecked_add(4 + 2 * u64::from(QUEUE_SIZE));
            mem.write_obj(used_event, addr).unwrap();
            h.activate(VIRTIO_RING_F_EVENT_IDX | MRG);
            h.host.send(&frame(9000, 1)).unwrap();
            assert!(h.dev.process_rx());
            assert_eq!(h.used_idx(RX), 3);
            assert_eq!(h.irq.read().is_ok(), want_irq, "used_event {used_event}");
        }
    }

    #[test]
    fn frame_waits_for_buffers_and_the_tap_is_not_watched_meanwhile() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        h.activate(VIRTIO_RING_F_EVENT_IDX | MRG);
        let f1 = frame(100, 1);
        let f2 = frame(200, 2);
        h.host.send(&f1).unwrap();
        h.host.send(&f2).unwrap();
        assert!(!h.dev.process_rx(), "no buffers: stop watching the TAP");
        assert!(!h.dev.process_rx(), "still none, and no spinning");
        assert_eq!(h.used_idx(RX), 0);
        assert_eq!(
            h.dev.stats().rx_dropped,
            0,
            "the frame is kept, not dropped"
        );
        // The guest adds buffers and notifies the receive queue.
        h.add_rx(&[(DATA_START, 2048)], F_WRITE);
        h.add_rx(&[(DATA_START + 0x1000, 2048)], F_WRITE);
        assert!(h.dev.process_rx(), "buffers again: watch the TAP");
        assert_eq!(h.used_idx(RX), 2);
        assert_eq!(h.read(DATA_START + 12, 100), f1[12..]);
        assert_eq!(h.read(DATA_START + 0x1000 + 12, 200), f2[12..]);
        assert_eq!(h.dev.stats().rx_frames, 2);
    }

    #[test]
    fn frame_larger_than_the_buffer_is_dropped_without_mergeable_buffers() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        h.add_rx(&[(DATA_START, 1526)], F_WRITE);
        h.activate(0);
        h.host.send(&frame(3000, 1)).unwrap();
        let small = frame(500, 2);
        h.host.send(&small).unwrap();
        assert!(h.dev.process_rx());
        let s = h.dev.stats();
        assert_eq!((s.rx_dropped, s.rx_frames), (1, 1));
        // The buffer was kept for the frame that fits.
        assert_eq!(h.used_idx(RX), 1);
        assert_eq!(h.used(RX, 0), (0, small.len() as u32));
        assert_eq!(h.read(DATA_START + 12, 500), small[12..]);
    }

    #[test]
    fn frame_larger_than_the_whole_queue_is_dropped_with_mergeable_buffers() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        // A full ring of 16-byte buffers: 4 KiB in all.
        for i in 0..QUEUE_SIZE {
            h.add_rx(&[(DATA_START + u64::from(i) * 16, 16)], F_WRITE);
        }
        h.activate(MRG);
        h.host.send(&frame(8000, 1)).unwrap();
        h.host.send(&frame(100, 2)).unwrap();
        assert!(h.dev.process_rx());
        let s = h.dev.stats();
        assert_eq!((s.rx_dropped, s.rx_frames), (1, 1));
        // 112 bytes in 16-byte buffers.
        assert_eq!(h.used_idx(RX), 7);
    }

    #[test]
    fn oversized_frame_from_the_tap_is_dropped() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        h.add_rx(&[(DATA_START, 0x2_0000)], F_WRITE);
        h.activate(0);
        h.host.send(&frame(MAX_FRAME_LEN + 100, 1)).unwrap();
        let fits = frame(MAX_FRAME_LEN - VNET_HDR_LEN, 2);
        h.host.send(&fits).unwrap();
        assert!(h.dev.process_rx());
        assert_eq!(h.dev.stats().rx_dropped, 1);
        assert_eq!(h.used(RX, 0), (0, MAX_FRAME_LEN as u32));
        assert_eq!(h.read(DATA_START + 12, 1000), fits[12..1012]);
    }

    #[test]
    fn tx_buffer_outside_guest_memory_is_refused() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        h.add_tx(&[(DATA_START, 12), (0xffff_0000_0000, 1000)], 0);
        // Starts inside memory and runs off its end.
        h.add_tx(&[(MEM_SIZE - 100, 200)], 0);
        h.add_tx(&[(DATA_START, 60)], 0);
        h.activate(0);
        h.dev.process_tx();
        assert_eq!(h.used_idx(TX), 3);
        assert_eq!(h.used(TX, 0).1, 0);
        assert_eq!(h.used(TX, 1).1, 0);
        assert_eq!(h.sent().len(), 1, "only the good chain went out");
        assert_eq!(h.dev.stats().bad_chains, 2);
    }

    #[test]
    fn tx_chain_that_loops_is_refused_and_the_device_keeps_working() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        // 0 -> 1 -> 0 -> ...
        h.add_tx_raw(&[
            desc(DATA_START, 12, F_NEXT, 1),
            desc(DATA_START + 0x100, 100, F_NEXT, 0),
        ]);
        h.activate(0);
        h.dev.process_tx();
        assert_eq!(h.used_idx(TX), 1);
        assert_eq!(h.used(TX, 0), (0, 0));
        assert!(h.sent().is_empty());
        h.add_tx(&[(DATA_START, 80)], 0);
        h.dev.process_tx();
        assert_eq!(h.sent().len(), 1);
    }

    #[test]
    fn tx_chain_longer_than_the_queue_is_refused() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        // Every descriptor of the table, linked, and then back to the start.
        let descs: Vec<_> = (0..QUEUE_SIZE)
            .map(|i| desc(DATA_START, 64, F_NEXT, (i + 1) % QUEUE_SIZE))
            .collect();
        h.add_tx_raw(&descs);
        h.activate(0);
        h.dev.process_tx();
        assert_eq!(h.used(TX, 0), (0, 0));
        assert!(h.sent().is_empty());
    }

    #[test]
    fn tx_device_writable_buffer_is_refused() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        h.add_tx(&[(DATA_START, 12), (DATA_START + 0x100, 100)], F_WRITE);
        h.activate(0);
        h.dev.process_tx();
        assert_eq!(h.used(TX, 0), (0, 0));
        assert!(h.sent().is_empty());
        assert_eq!(h.dev.stats().bad_chains, 1);
    }

    #[test]
    fn tx_chains_too_short_or_too_long_are_refused() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        h.add_tx(&[(DATA_START, 11)], 0);
        h.add_tx(&[(DATA_START, 40_000), (DATA_START + 40_000, 40_000)], 0);
        // Exactly the largest frame is fine.
        h.add_tx(&[(DATA_START, MAX_FRAME_LEN as u32)], 0);
        h.activate(0);
        h.dev.process_tx();
        assert_eq!(h.used_idx(TX), 3);
        let sent = h.sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].len(), MAX_FRAME_LEN);
        assert_eq!(h.dev.stats().bad_chains, 2);
    }

    #[test]
    fn rx_read_only_buffer_is_refused_and_the_next_one_used() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        h.add_rx(&[(DATA_START, 2048)], 0);
        h.add_rx(&[(DATA_START + 0x1000, 2048)], F_WRITE);
        h.activate(0);
        mem.write_slice(&[0xaa; 64], GuestAddress(DATA_START))
            .unwrap();
        let f = frame(64, 9);
        h.host.send(&f).unwrap();
        assert!(h.dev.process_rx());
        assert_eq!(h.used_idx(RX), 2);
        assert_eq!(h.used(RX, 0), (0, 0));
        assert_eq!(h.used(RX, 1), (1, f.len() as u32));
        assert_eq!(h.read(DATA_START, 64), vec![0xaa; 64], "not written");
        assert_eq!(h.read(DATA_START + 0x1000 + 12, 64), f[12..]);
    }

    #[test]
    fn rx_buffer_outside_guest_memory_or_looping_is_refused() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        h.add_rx(&[(MEM_SIZE - 100, 2048)], F_WRITE);
        h.add_rx(&[(0xffff_0000_0000, 2048)], F_WRITE);
        // 2 -> 3 -> 2 -> ...
        h.add_rx_raw(&[
            desc(DATA_START, 100, F_WRITE | F_NEXT, 3),
            desc(DATA_START + 0x100, 100, F_WRITE | F_NEXT, 2),
        ]);
        h.add_rx(&[(DATA_START + 0x1000, 0)], F_WRITE);
        h.add_rx(&[(DATA_START + 0x2000, 2048)], F_WRITE);
        h.activate(MRG);
        let f = frame(300, 4);
        h.host.send(&f).unwrap();
        assert!(h.dev.process_rx());
        assert_eq!(h.used_idx(RX), 5);
        for i in 0..4 {
            assert_eq!(h.used(RX, i).1, 0, "used entry {i}");
        }
        assert_eq!(h.used(RX, 4), (5, f.len() as u32));
        assert_eq!(h.dev.stats().bad_chains, 4);
        assert_eq!(h.read(DATA_START + 0x2000 + 12, 300), f[12..]);
    }

    #[test]
    fn bogus_avail_index_does_not_hang_the_device() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        h.activate(0);
        // The guest claims 1000 new entries in a 256-entry queue.
        let idx = h.txq.avail_addr().unchecked_add(2);
        mem.write_obj(1000u16, idx).unwrap();
        h.dev.process_tx();
        let idx = h.rxq.avail_addr().unchecked_add(2);
        mem.write_obj(1000u16, idx).unwrap();
        h.host.send(&frame(10, 0)).unwrap();
        assert!(!h.dev.process_rx());
    }

    #[test]
    fn reset_forgets_the_queues() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        h.activate(0);
        h.host.send(&frame(10, 0)).unwrap();
        assert!(!h.dev.process_rx());
        h.dev.reset();
        assert!(!h.dev.process_rx(), "no queues: nothing to watch for");
        h.dev.process_tx();
        assert_eq!(h.dev.stats().rx_dropped, 1);
    }
}
