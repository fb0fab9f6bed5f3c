//! The e1000's host side: its moderation timer as a timerfd on the event loop, and the
//! event-loop handler that fires it.
//!
//! The timer is armed from whichever thread touches the device (a vCPU writing TDT or IMS,
//! the event loop delivering a frame), so arming is one `timerfd_settime` with the absolute
//! deadline turned relative. The fd is never read: every expiry is followed by a re-arm (or
//! a disarm), which resets the expiration count and so the fd's readiness.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{error, warn};
use vmm_sys_util::timerfd::TimerFd;

use super::{DelayTimer, E1000};

/// A `DelayTimer` on CLOCK_MONOTONIC (through `Instant`) and a timerfd.
pub struct HostTimer {
    epoch: Instant,
    fd: TimerFd,
}

impl HostTimer {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            epoch: Instant::now(),
            fd: TimerFd::new().map_err(std::io::Error::from)?,
        })
    }
}

impl AsRawFd for HostTimer {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl DelayTimer for HostTimer {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn arm(&mut self, at: Option<u64>) {
        let result = match at {
            // A zero duration would disarm: a deadline already passed fires in 1 ns.
            Some(at) => {
                let after = at.saturating_sub(self.now()).max(1);
                self.fd.reset(Duration::from_nanos(after), None)
            }
            None => self.fd.clear(),
        };
        if let Err(e) = result {
            error!("e1000: failed to arm the interrupt moderation timer: {e}");
        }
    }
}

/// Calls the NIC's `on_timer` when its timerfd expires.
pub struct E1000Timer {
    nic: Arc<Mutex<E1000>>,
    fd: RawFd,
}

impl E1000Timer {
    /// `fd` is the timerfd of the NIC's `HostTimer`, which lives as long as the NIC.
    pub fn new(nic: Arc<Mutex<E1000>>, fd: RawFd) -> Self {
        Self { nic, fd }
    }
}

impl MutEventSubscriber for E1000Timer {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data_raw(self.fd, 0, EventSet::IN)) {
            error!("e1000: cannot watch the interrupt moderation timer: {e:?}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.event_set() != EventSet::IN {
            warn!("e1000: unexpected timer event {:?}", events.event_set());
        }
        self.nic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .on_timer();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet as EpollSet};

    fn readable(ep: &Epoll) -> bool {
        let mut ev = [EpollEvent::default()];
        ep.wait(0, &mut ev).unwrap() == 1
    }

    #[test]
    fn the_timerfd_fires_after_the_deadline_and_rearming_clears_it() {
        let mut t = HostTimer::new().unwrap();
        let ep = Epoll::new().unwrap();
        ep.ctl(
            ControlOperation::Add,
            t.as_raw_fd(),
            EpollEvent::new(EpollSet::IN, 0),
        )
        .unwrap();
        t.arm(Some(t.now() + 2_000_000));
        assert!(!readable(&ep), "not before the deadline");
        std::thread::sleep(Duration::from_millis(5));
        assert!(readable(&ep), "expired");
        t.arm(None);
        assert!(!readable(&ep), "disarming cleared the expiry");
        // A deadline in the past fires at once rather than never.
        t.arm(Some(0));
        std::thread::sleep(Duration::from_millis(2));
        assert!(readable(&ep));
        t.arm(Some(t.now() + 1_000_000_000));
        assert!(!readable(&ep), "re-arming cleared it too");
    }
}
