//! The one place that allocates ports, MMIO ranges and IRQs, and wires devices into the buses
//! and KVM. Everything the guest must be told about a device (kernel command line
//! parameters) is collected here too.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{COM1_IRQ, COM1_PORT, I8042_PORT, I8042_PORT_LEN, UART_PORT_LEN};
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::{SerialDevice, I8042};
use crate::vstate::vm::{KvmVm, VmError};

/// Errors wiring devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("Failed to place the {0} on the bus")]
    Bus(&'static str, #[source] BusError),
    #[error("Failed to create an eventfd for the {0}")]
    EventFd(&'static str, #[source] std::io::Error),
    #[error("Failed to connect the {0}'s interrupt")]
    Irq(&'static str, #[source] VmError),
}

/// Builds the port I/O and MMIO buses.
#[derive(Default)]
pub struct DeviceManager {
    pio_bus: Bus,
    mmio_bus: Bus,
    cmdline_extra: Vec<String>,
}

impl DeviceManager {
    pub fn new() -> Self {
        Self::default()
    }

    /// Attaches a 16550A at COM1 (0x3f8, IRQ 4) writing guest output to `out`.
    pub fn attach_serial(
        &mut self,
        vm: &KvmVm,
        out: Box<dyn Write + Send>,
    ) -> Result<Arc<Mutex<SerialDevice>>, DeviceError> {
        const WHAT: &str = "serial port COM1";
        let irq_evt =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| DeviceError::EventFd(WHAT, e))?;
        vm.register_irqfd(&irq_evt, COM1_IRQ)
            .map_err(|e| DeviceError::Irq(WHAT, e))?;
        let serial = Arc::new(Mutex::new(
            SerialDevice::new(irq_evt, out).map_err(|e| DeviceError::EventFd(WHAT, e))?,
        ));
        self.pio_bus
            .insert(
                serial.clone(),
                u64::from(COM1_PORT),
                u64::from(UART_PORT_LEN),
            )
            .map_err(|e| DeviceError::Bus(WHAT, e))?;
        Ok(serial)
    }

    /// Attaches the i8042 controller; returns the eventfd it writes when the guest resets.
    pub fn attach_i8042(&mut self) -> Result<EventFd, DeviceError> {
        const WHAT: &str = "i8042 controller";
        let reset_evt =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| DeviceError::EventFd(WHAT, e))?;
        let dev = I8042::new(
            reset_evt
                .try_clone()
                .map_err(|e| DeviceError::EventFd(WHAT, e))?,
        );
        self.pio_bus
            .insert(
                Arc::new(Mutex::new(dev)),
                u64::from(I8042_PORT),
                u64::from(I8042_PORT_LEN),
            )
            .map_err(|e| DeviceError::Bus(WHAT, e))?;
        Ok(reset_evt)
    }

    /// Kernel command line parameters the attached devices need.
    pub fn cmdline_extra(&self) -> &[String] {
        &self.cmdline_extra
    }

    /// The finished buses, to be shared by the vCPU threads.
    pub fn into_buses(self) -> (Arc<Bus>, Arc<Bus>) {
        (Arc::new(self.pio_bus), Arc::new(self.mmio_bus))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i8042_answers_on_its_ports() {
        let mut dm = DeviceManager::new();
        let reset = dm.attach_i8042().unwrap();
        let (pio, _mmio) = dm.into_buses();
        assert!(pio.write(0x64, &[0xfe]));
        assert_eq!(reset.read().unwrap(), 1);
        let mut b = [0u8];
        assert!(pio.read(0x60, &mut b));
    }
}
