//! The host side of the emulated NICs (NE2000, e1000): frames between a NIC model and a TAP
//! device.
//!
//! The TAP is the one the virtio model uses, opened with a virtio-net header
//! (`struct virtio_net_hdr_v1`, virtio 1.x 5.1.6) on every frame. The header carries the
//! offloads: a NIC that knows none (the NE2000) sends zero headers and ignores the received
//! ones, the TAP's offloads staying off so the host hands over plain, checksummed frames of
//! at most the MTU; the e1000 hands its checksum and segmentation offloads to the host stack
//! through the header, and takes partially checksummed frames (TUN_F_CSUM) that it
//! completes.
//!
//! Transmit runs on the vCPU thread that told the NIC to send, as the chips send
//! synchronously. Receive runs on the event loop: frames go into the NIC until it has no
//! room, then the TAP is taken out of the loop's interest list (the frame that did not fit
//! is kept) until the driver frees room, which the NIC signals through `rx_space`.

use std::io;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{error, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::tap::{Tap, VNET_HDR_LEN};

/// Bytes of the virtio-net header before every frame on the TAP.
pub const HDR: usize = VNET_HDR_LEN as usize;
/// Largest frame the TAP hands over (a 64 KiB GSO frame when offloads are on), plus header.
const RX_BUF: usize = HDR + 65536;

/// virtio-net header flags and GSO types (virtio 1.x, 5.1.6).
pub const VNET_F_NEEDS_CSUM: u8 = 1;
pub const VNET_F_DATA_VALID: u8 = 2;
pub const VNET_GSO_NONE: u8 = 0;
pub const VNET_GSO_TCPV4: u8 = 1;
pub const VNET_GSO_TCPV6: u8 = 4;

/// The virtio-net header of one frame.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    /// The header as the TAP takes it (little-endian, `num_buffers` zero).
    pub fn to_bytes(self) -> [u8; HDR] {
        let mut b = [0u8; HDR];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }

    /// The header of a received frame (`b` holds at least `HDR` bytes).
    pub fn from_bytes(b: &[u8]) -> Self {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        }
    }
}

/// Where transmitted frames go (the TAP in the VMM).
pub trait FrameSink: Send {
    /// Sends one frame, `hdr` telling the host what offload work is left to do on it.
    fn send(&mut self, hdr: &VnetHdr, frame: &[u8]) -> io::Result<()>;
}

/// What became of a frame offered to a NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// Written into the receive ring.
    Accepted,
    /// Not for us (address filter), or the receiver is stopped: dropped as hardware does.
    Dropped,
    /// The ring is full: keep the frame and offer it again after `rx_space` fires.
    NoSpace,
}

/// A NIC model that takes frames from the TAP.
pub trait TapReceiver: Send {
    /// Offers one received frame (no FCS) with the header the TAP put before it.
    fn receive_from_tap(&mut self, hdr: &VnetHdr, frame: &[u8]) -> RxOutcome;
}

/// Sends transmitted frames to the TAP.
pub struct TapSink {
    tap: Tap,
    buf: Vec<u8>,
}

impl TapSink {
    pub fn new(tap: Tap) -> Self {
        Self {
            tap,
            buf: vec![0; HDR],
        }
    }
}

impl FrameSink for TapSink {
    fn send(&mut self, hdr: &VnetHdr, frame: &[u8]) -> io::Result<()> {
        // One write per frame: the TAP takes a frame per write, header first.
        self.buf.clear();
        self.buf.extend_from_slice(&hdr.to_bytes());
        self.buf.extend_from_slice(frame);
        self.tap.write_frame(&self.buf).map(|_| ())
    }
}

const EVT_TAP: u32 = 0;
const EVT_RX_SPACE: u32 = 1;

/// Moves frames from the TAP into a NIC model.
pub struct NicTap<N> {
    /// The model's name in log lines (`ne2k`, `e1000`).
    what: &'static str,
    nic: Arc<Mutex<N>>,
    tap: Tap,
    rx_space: EventFd,
    buf: Vec<u8>,
    /// Length of the frame in `buf` (header included) that the NIC had no room for.
    pending: Option<usize>,
    tap_watched: bool,
}

impl<N: TapReceiver> NicTap<N> {
    /// `rx_space` is the eventfd the NIC writes when the driver frees room.
    pub fn new(what: &'static str, nic: Arc<Mutex<N>>, tap: Tap, rx_space: EventFd) -> Self {
        Self {
            what,
            nic,
            tap,
            rx_space,
            buf: vec![0; RX_BUF],
            pending: None,
            tap_watched: false,
        }
    }

    /// Offers the frame in `buf` to the NIC; false if it has no room.
    fn offer(&mut self, len: usize) -> bool {
        if len <= HDR {
            return true;
        }
        let hdr = VnetHdr::from_bytes(&self.buf[..HDR]);
        let outcome = self
            .nic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .receive_from_tap(&hdr, &self.buf[HDR..len]);
        outcome != RxOutcome::NoSpace
    }

    /// Delivers the held frame, then whatever the TAP has, until the NIC is full or the TAP
    /// runs dry. Returns whether the TAP should be watched.
    fn pump(&mut self) -> bool {
        if let Some(len) = self.pending {
            if !self.offer(len) {
                return false;
            }
            self.pending = None;
        }
        loop {
            match self.tap.read_frame(&mut self.buf) {
                Ok(len) => {
                    if !self.offer(len) {
                        self.pending = Some(len);
                        return false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A deleted TAP fails for good (Tap says so once); it stays readable to
                // epoll, so keep watching only on errors that may pass.
                Err(_) if self.tap.is_gone() => return false,
                Err(e) => {
                    error!(
                        "{}: reading from TAP {} failed: {e}",
                        self.what,
                        self.tap.name()
                    );
                    return true;
                }
            }
        }
    }

    fn watch_tap(&mut self, ops: &mut EventOps, want: bool) {
        if want == self.tap_watched {
            return;
        }
        let ev = Events::with_data(&self.tap, EVT_TAP, EventSet::IN);
        let res = if want { ops.add(ev) } else { ops.remove(ev) };
        match res {
            Ok(()) => self.tap_watched = want,
            Err(e) => warn!("{}: cannot change the TAP watch: {e:?}", self.what),
        }
    }
}

impl<N: TapReceiver> MutEventSubscriber for NicTap<N> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.rx_space,
            EVT_RX_SPACE,
            EventSet::IN,
        )) {
            error!("{}: cannot watch the receive ring: {e:?}", self.what);
        }
        self.watch_tap(ops, true);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            EVT_RX_SPACE => {
                let _ = self.rx_space.read();
            }
            EVT_TAP => {}
            other => {
                warn!("{}: unexpected event {other}", self.what);
                return;
            }
        }
        let want = self.pump();
        self.watch_tap(ops, want);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vnet_header_round_trips_little_endian() {
        let h = VnetHdr {
            flags: VNET_F_NEEDS_CSUM,
            gso_type: VNET_GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        let b = h.to_bytes();
        assert_eq!(&b[..6], &[1, 1, 54, 0, 0xa8, 0x05]);
        assert_eq!(&b[10..], &[0, 0], "num_buffers");
        assert_eq!(VnetHdr::from_bytes(&b), h);
    }
}
