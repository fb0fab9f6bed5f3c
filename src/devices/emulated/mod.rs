//! Emulated hardware that stock drivers use without knowing they run in a VM (full
//! virtualization): pure register-level state machines, wired in by the device manager.

pub mod dma;
pub mod e1000;
pub mod ide;
pub mod ne2k;
pub mod nic_tap;

/// A one-way notification out of a device model: an interrupt line (wired to an irqfd by the
/// device manager) or a wakeup for the event loop.
pub trait Signal: Send {
    fn signal(&self);
}

impl Signal for vmm_sys_util::eventfd::EventFd {
    fn signal(&self) {
        if let Err(e) = self.write(1) {
            log::error!("failed to signal an eventfd: {e}");
        }
    }
}
