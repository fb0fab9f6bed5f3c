//! The host side of an NE2000: frames between the NIC's buffer memory and a TAP device.
//!
//! The TAP is the one the virtio model uses, opened with a virtio-net header on every frame;
//! the NE2000 knows nothing of offloads, so the TAP's offloads stay off (the host stack
//! hands over plain, checksummed frames of at most the MTU), transmitted frames get a zero
//! header and received ones lose theirs.
//!
//! Transmit runs on the vCPU thread that set TXP, as the chip sends synchronously. Receive
//! runs on the event loop: frames go into the receive ring until it is full, then the TAP is
//! taken out of the loop's interest list (the frame that did not fit is kept) until the
//! driver frees ring pages, which the NIC signals through `rx_space`.

use std::io;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{error, warn};
use vmm_sys_util::eventfd::EventFd;

use super::ne2k::{FrameSink, Ne2k, RxOutcome};
use crate::devices::tap::{Tap, VNET_HDR_LEN};

const HDR: usize = VNET_HDR_LEN as usize;
/// Largest frame the TAP can hand over without offloads (jumbo MTUs included), plus header.
const RX_BUF: usize = HDR + 65536;

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
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.buf.truncate(HDR);
        self.buf.extend_from_slice(frame);
        self.tap.write_frame(&self.buf).map(|_| ())
    }
}

const EVT_TAP: u32 = 0;
const EVT_RX_SPACE: u32 = 1;

/// Moves frames from the TAP into the NIC's receive ring.
pub struct Ne2kTap {
    nic: Arc<Mutex<Ne2k>>,
    tap: Tap,
    rx_space: EventFd,
    buf: Vec<u8>,
    /// Length of the frame in `buf` (header included) that the ring had no room for.
    pending: Option<usize>,
    tap_watched: bool,
}

impl Ne2kTap {
    /// `rx_space` is the eventfd the NIC writes when the driver frees ring space.
    pub fn new(nic: Arc<Mutex<Ne2k>>, tap: Tap, rx_space: EventFd) -> Self {
        Self {
            nic,
            tap,
            rx_space,
            buf: vec![0; RX_BUF],
            pending: None,
            tap_watched: false,
        }
    }

    /// Offers the frame in `buf` to the NIC; false if the ring is full.
    fn offer(&mut self, len: usize) -> bool {
        if len <= HDR {
            return true;
        }
        let outcome = self
            .nic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .receive(&self.buf[HDR..len]);
        outcome != RxOutcome::NoSpace
    }

    /// Delivers the held frame, then whatever the TAP has, until the ring fills or the TAP
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
                    error!("ne2k: reading from TAP {} failed: {e}", self.tap.name());
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
            Err(e) => warn!("ne2k: cannot change the TAP watch: {e:?}"),
        }
    }
}

impl MutEventSubscriber for Ne2kTap {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.rx_space,
            EVT_RX_SPACE,
            EventSet::IN,
        )) {
            error!("ne2k: cannot watch the receive ring: {e:?}");
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
                warn!("ne2k: unexpected event {other}");
                return;
            }
        }
        let want = self.pump();
        self.watch_tap(ops, want);
    }
}
