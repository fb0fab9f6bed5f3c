//! Interrupt moderation as the 8254x does it (317453 sections 3.2.7, 3.4 and 13.4.17-13.4.33):
//!
//! - The receive timer interrupt (ICR.RXT0) waits RDTR after each received frame, the timer
//!   restarting with every frame, and at most RADV after the first one; RDTR = 0 raises it
//!   at once, and writing RDTR with FPD set raises a pending one at once.
//! - A transmit descriptor written back with IDE (interrupt delay enable) raises ICR.TXDW
//!   after TIDV, restarted by each such descriptor, and at most TADV after the first; one
//!   without IDE raises it at once.
//! - ITR throttles the interrupt line itself: after an assertion the next may come no sooner
//!   than ITR x 256 ns later; causes arriving meanwhile are held, not lost.
//!
//! Units: RDTR, RADV, TIDV and TADV count 1.024 µs, ITR counts 256 ns. Times here are
//! nanoseconds on the device's monotonic clock; the device arms one host timer for the
//! earliest deadline (`deadline`) and calls `expired` when it fires.

/// One tick of the delay timers (RDTR, RADV, TIDV, TADV): 1.024 µs.
pub const DELAY_UNIT_NS: u64 = 1024;
/// One tick of ITR: 256 ns.
pub const ITR_UNIT_NS: u64 = 256;

/// Causes that a deadline can raise.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fired {
    pub rx: bool,
    pub tx: bool,
}

/// The timers of one NIC.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Moderation {
    /// Minimum spacing of assertions (0: none).
    itr_ns: u64,
    /// When the line may next be asserted.
    next_allowed: u64,
    /// An assertion is waiting for `next_allowed`.
    throttled: bool,
    rx_delay: Option<u64>,
    rx_abs: Option<u64>,
    tx_delay: Option<u64>,
    tx_abs: Option<u64>,
}

fn earliest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

impl Moderation {
    /// The timers with every time made relative to `now` (for a snapshot: another
    /// process's clock starts elsewhere); a time already past becomes 0.
    pub fn relative_to(&self, now: u64) -> Self {
        let rel = |t: Option<u64>| t.map(|t| t.saturating_sub(now));
        Self {
            itr_ns: self.itr_ns,
            next_allowed: self.next_allowed.saturating_sub(now),
            throttled: self.throttled,
            rx_delay: rel(self.rx_delay),
            rx_abs: rel(self.rx_abs),
            tx_delay: rel(self.tx_delay),
            tx_abs: rel(self.tx_abs),
        }
    }

    /// The inverse of `relative_to`: times relative to `now` made absolute again.
    pub fn absolute_from(&self, now: u64) -> Self {
        let abs = |t: Option<u64>| t.map(|t| t.saturating_add(now));
        Self {
            itr_ns: self.itr_ns,
            next_allowed: self.next_allowed.saturating_add(now),
            throttled: self.throttled,
            rx_delay: abs(self.rx_delay),
            rx_abs: abs(self.rx_abs),
            tx_delay: abs(self.tx_delay),
            tx_abs: abs(self.tx_abs),
        }
    }

    /// ITR was written with `interval` (in 256 ns units, bits 15:0).
    pub fn set_itr(&mut self, interval: u32) {
        self.itr_ns = u64::from(interval & 0xffff) * ITR_UNIT_NS;
    }

    /// A frame reached guest memory; true when RXT0 is due now (RDTR = 0), else the delay
    /// timers run.
    pub fn rx_frame(&mut self, now: u64, rdtr: u32, radv: u32) -> bool {
        let rdtr = u64::from(rdtr & 0xffff);
        if rdtr == 0 {
            self.rx_delay = None;
            self.rx_abs = None;
            return true;
        }
        self.rx_delay = Some(now + rdtr * DELAY_UNIT_NS);
        let radv = u64::from(radv & 0xffff);
        if radv != 0 && self.rx_abs.is_none() {
            self.rx_abs = Some(now + radv * DELAY_UNIT_NS);
        }
        false
    }

    /// RDTR written with FPD: true when a receive interrupt was pending (it is due now).
    pub fn flush_rx(&mut self) -> bool {
        let pending = self.rx_delay.is_some() || self.rx_abs.is_some();
        self.rx_delay = None;
        self.rx_abs = None;
        pending
    }

    /// A transmit descriptor with RS was written back; true when TXDW is due now (no IDE,
    /// or TIDV = 0).
    pub fn tx_done(&mut self, now: u64, ide: bool, tidv: u32, tadv: u32) -> bool {
        let tidv = u64::from(tidv & 0xffff);
        if !ide || tidv == 0 {
            self.tx_delay = None;
            self.tx_abs = None;
            return true;
        }
        self.tx_delay = Some(now + tidv * DELAY_UNIT_NS);
        let tadv = u64::from(tadv & 0xffff);
        if tadv != 0 && self.tx_abs.is_none() {
            self.tx_abs = Some(now + tadv * DELAY_UNIT_NS);
        }
        false
    }

    /// The delayed causes whose time has come; their timers stop.
    pub fn expired(&mut self, now: u64) -> Fired {
        let due = |d: Option<u64>| d.is_some_and(|t| t <= now);
        let mut fired = Fired::default();
        if due(self.rx_delay) || due(self.rx_abs) {
            self.rx_delay = None;
            self.rx_abs = None;
            fired.rx = true;
        }
        if due(self.tx_delay) || due(self.tx_abs) {
            self.tx_delay = None;
            self.tx_abs = None;
            fired.tx = true;
        }
        fired
    }

    /// The line wants to rise: true if ITR allows it now (the next assertion is then held
    /// off for an interval), else it waits for `deadline`.
    pub fn may_assert(&mut self, now: u64) -> bool {
        if now >= self.next_allowed {
            self.throttled = false;
            self.next_allowed = now + self.itr_ns;
            true
        } else {
            self.throttled = true;
            false
        }
    }

    /// Nothing wants the line any more (the causes were read or masked).
    pub fn cancel_assert(&mut self) {
        self.throttled = false;
    }

    /// The earliest time something is due, if anything is.
    pub fn deadline(&self) -> Option<u64> {
        let timers = earliest(
            earliest(self.rx_delay, self.rx_abs),
            earliest(self.tx_delay, self.tx_abs),
        );
        earliest(timers, self.throttled.then_some(self.next_allowed))
    }

    /// Back to the power-on state (device reset).
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: u64 = 1000;

    #[test]
    fn rdtr_restarts_per_frame_and_radv_caps_it() {
        let mut m = Moderation::default();
        assert!(m.rx_frame(0, 0, 8), "RDTR 0: at once");
        assert_eq!(m.deadline(), None);
        // RDTR 10 (10.24 µs), RADV 25 (25.6 µs): frames every 8 µs keep pushing RDTR back.
        assert!(!m.rx_frame(0, 10, 25));
        assert_eq!(m.deadline(), Some(10 * DELAY_UNIT_NS));
        assert!(!m.rx_frame(8 * US, 10, 25));
        assert!(!m.rx_frame(16 * US, 10, 25));
        assert_eq!(
            m.deadline(),
            Some(25 * DELAY_UNIT_NS),
            "RADV from the first frame"
        );
        assert_eq!(m.expired(25 * DELAY_UNIT_NS - 1), Fired::default());
        assert_eq!(
            m.expired(25 * DELAY_UNIT_NS),
            Fired {
                rx: true,
                tx: false
            }
        );
        assert_eq!(m.deadline(), None);
        // After it fired, RADV starts again from the next frame.
        assert!(!m.rx_frame(30 * US, 10, 25));
        assert_eq!(m.deadline(), Some(30 * US + 10 * DELAY_UNIT_NS));
        assert!(m.flush_rx(), "FPD fires the pending one");
        assert!(!m.flush_rx());
    }

    #[test]
    fn tidv_applies_only_with_ide() {
        let mut m = Moderation::default();
        assert!(m.tx_done(0, false, 8, 32), "no IDE: at once");
        assert!(!m.tx_done(0, true, 8, 32));
        assert!(!m.tx_done(5 * US, true, 8, 32));
        assert_eq!(m.deadline(), Some(5 * US + 8 * DELAY_UNIT_NS));
        let f = m.expired(5 * US + 8 * DELAY_UNIT_NS);
        assert!(f.tx && !f.rx);
        assert!(m.tx_done(0, true, 0, 32), "TIDV 0: at once");
    }

    #[test]
    fn itr_spaces_assertions_and_holds_the_one_in_between() {
        let mut m = Moderation::default();
        m.set_itr(1000); // 256 µs
        assert!(m.may_assert(100 * US));
        assert!(!m.may_assert(200 * US), "within the interval");
        assert_eq!(m.deadline(), Some(356 * US));
        assert!(m.may_assert(356 * US));
        assert_eq!(m.deadline(), None);
        // Causes read meanwhile: nothing waits.
        assert!(!m.may_assert(400 * US));
        m.cancel_assert();
        assert_eq!(m.deadline(), None);
        m.set_itr(0);
        assert!(m.may_assert(612 * US), "interval over");
        assert!(m.may_assert(612 * US), "ITR 0: no throttling");
    }
}
