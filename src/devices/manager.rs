//! The one place that allocates ports, MMIO ranges and IRQs, and wires devices into the buses
//! and KVM. Everything the guest must be told about a device (kernel command line
//! parameters) is collected here too.

use std::io::Write;
use std::sync::{Arc, Mutex};

use event_manager::{MutEventSubscriber, SubscriberOps};
use kvm_ioctls::IoEventAddress;
use log::info;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{
    COM1_IRQ, COM1_PORT, DEVICE_IRQS, I8042_PORT, I8042_PORT_LEN, UART_PORT_LEN,
    VIRTIO_MMIO_SLOT_SIZE, VIRTIO_MMIO_START,
};
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::{SerialDevice, I8042};
use crate::devices::virtio::mmio::{MMIO_LEN, REG_QUEUE_NOTIFY};
use crate::devices::virtio::{MmioTransport, VirtioDevice, VirtioInterrupt};
use crate::devices::DeviceEventManager;
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vm::{KvmVm, VmError};

/// Errors wiring devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("Failed to place the {0} on the bus")]
    Bus(&'static str, #[source] BusError),
    #[error("Failed to create an eventfd for the {0}")]
    EventFd(&'static str, #[source] std::io::Error),
    #[error("Failed to connect the {0}'s interrupt")]
    Irq(String, #[source] VmError),
    #[error("Failed to register the queue notifications of {0} with KVM")]
    IoEvent(String, #[source] kvm_ioctls::Error),
    #[error("No interrupt line left for {0}: at most {n} devices get one", n = DEVICE_IRQS.len())]
    OutOfIrqs(String),
}

/// Builds the port I/O and MMIO buses.
#[derive(Default)]
pub struct DeviceManager {
    pio_bus: Bus,
    mmio_bus: Bus,
    cmdline_extra: Vec<String>,
    /// How many of `DEVICE_IRQS` are taken.
    irqs_used: usize,
    /// How many virtio-mmio slots are taken.
    mmio_slots_used: u64,
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
            .map_err(|e| DeviceError::Irq(WHAT.into(), e))?;
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

    fn allocate_irq(&mut self, what: &str) -> Result<u32, DeviceError> {
        let irq = *DEVICE_IRQS
            .get(self.irqs_used)
            .ok_or_else(|| DeviceError::OutOfIrqs(what.into()))?;
        self.irqs_used += 1;
        Ok(irq)
    }

    /// Wires a virtio device in: an MMIO slot with the transport, an IRQ through an irqfd,
    /// one ioeventfd per queue on QueueNotify (matched on the queue index, so a notify never
    /// exits to userspace), the device's event handler on the event loop, and the
    /// `virtio_mmio.device=` parameter that tells the guest where to find it.
    pub fn attach_virtio<D>(
        &mut self,
        vm: &KvmVm,
        mem: &GuestMemoryMmap,
        event_manager: &mut DeviceEventManager,
        device: D,
        what: &str,
    ) -> Result<Arc<Mutex<D>>, DeviceError>
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
    {
        let irq = self.allocate_irq(what)?;
        let base = VIRTIO_MMIO_START + self.mmio_slots_used * VIRTIO_MMIO_SLOT_SIZE;
        let irq_evt = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| DeviceError::EventFd("virtio device", e))?;
        vm.register_irqfd(&irq_evt, irq)
            .map_err(|e| DeviceError::Irq(what.into(), e))?;
        for (i, evt) in device.queue_events().iter().enumerate() {
            vm.fd()
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY),
                    i as u32,
                )
                .map_err(|e| DeviceError::IoEvent(what.into(), e))?;
        }
        let device = Arc::new(Mutex::new(device));
        let transport = MmioTransport::new(
            mem.clone(),
            device.clone(),
            Arc::new(VirtioInterrupt::new(irq_evt)),
        );
        self.mmio_bus
            .insert(Arc::new(Mutex::new(transport)), base, MMIO_LEN)
            .map_err(|e| DeviceError::Bus("virtio device", e))?;
        self.mmio_slots_used += 1;
        event_manager.add_subscriber(device.clone());
        self.cmdline_extra.push(format!(
            "virtio_mmio.device={}K@{base:#x}:{irq}",
            MMIO_LEN >> 10
        ));
        info!("{what}: virtio-mmio at {base:#x}, IRQ {irq}");
        Ok(device)
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
