//! The virtio-mmio transport (virtio 1.x, section 4.2, "modern" version 2 register layout):
//! an explicit register `match` mapped onto virtio-queue's `Queue` setters, kept apart from
//! any device's logic.
//!
//! Queue notifications (writes to QueueNotify) normally never reach this code: KVM turns them
//! into ioeventfd signals handled by the event loop. The transport still forwards a notify
//! that does arrive, so a device works without ioeventfds too.

use std::sync::{Arc, Mutex};

use log::warn;
use virtio_queue::QueueT;

use super::{QueueField, VirtioCommon};
pub use super::{
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
};
use crate::devices::bus::BusDevice;
use crate::devices::virtio::device::{VirtioDevice, VirtioInterrupt};
use crate::vstate::memory::GuestMemoryMmap;

/// Size of one device's register window.
pub const MMIO_LEN: u64 = 0x1000;
/// "virt" in little endian.
const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// Version 2: the virtio 1.x (non-legacy) layout.
const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the guest ("FEVM").
const VENDOR_ID: u32 = 0x4d56_4546;

// Register offsets (virtio 1.x, 4.2.2).
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
/// Where the guest notifies a queue; the ioeventfds sit on this address.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

/// Register names by offset, for the exit accounting.
pub fn register_name(offset: u64) -> &'static str {
    match offset {
        REG_MAGIC => "magic",
        REG_VERSION => "version",
        REG_DEVICE_ID => "device_id",
        REG_VENDOR_ID => "vendor_id",
        REG_DEVICE_FEATURES => "device_features",
        REG_DEVICE_FEATURES_SEL => "device_features_sel",
        REG_DRIVER_FEATURES => "driver_features",
        REG_DRIVER_FEATURES_SEL => "driver_features_sel",
        REG_QUEUE_SEL => "queue_sel",
        REG_QUEUE_NUM_MAX => "queue_num_max",
        REG_QUEUE_NUM => "queue_num",
        REG_QUEUE_READY => "queue_ready",
        REG_QUEUE_NOTIFY => "queue_notify",
        REG_INTERRUPT_STATUS => "interrupt_status",
        REG_INTERRUPT_ACK => "interrupt_ack",
        REG_STATUS => "status",
        REG_QUEUE_DESC_LOW..=REG_QUEUE_DEVICE_HIGH => "queue_address",
        REG_CONFIG_GENERATION => "config_generation",
        CONFIG_SPACE.. => "config",
        _ => "",
    }
}

/// The queue field a register offset names.
fn queue_field(offset: u64) -> Option<QueueField> {
    Some(match offset {
        REG_QUEUE_NUM => QueueField::Size,
        REG_QUEUE_READY => QueueField::Ready,
        REG_QUEUE_DESC_LOW => QueueField::DescLow,
        REG_QUEUE_DESC_HIGH => QueueField::DescHigh,
        REG_QUEUE_DRIVER_LOW => QueueField::DriverLow,
        REG_QUEUE_DRIVER_HIGH => QueueField::DriverHigh,
        REG_QUEUE_DEVICE_LOW => QueueField::DeviceLow,
        REG_QUEUE_DEVICE_HIGH => QueueField::DeviceHigh,
        _ => return None,
    })
}

/// A virtio device behind the MMIO register window.
pub struct MmioTransport {
    common: VirtioCommon,
}

impl MmioTransport {
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Self {
        Self {
            common: VirtioCommon::new("virtio-mmio", mem, device, interrupt),
        }
    }

    /// The device status as the driver last set it (plus NEEDS_RESET from the device).
    pub fn status(&self) -> u32 {
        self.common.status()
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let c = &self.common;
        match offset {
            REG_MAGIC => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => c.device().device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => c.device_features_word(),
            REG_QUEUE_NUM_MAX => c.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => c.read_queue(QueueField::Ready),
            REG_INTERRUPT_STATUS => c.interrupt.status(),
            REG_STATUS => c.status(),
            REG_CONFIG_GENERATION => c.config_generation,
            _ => {
                warn!("virtio-mmio: read of unknown or write-only register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        let c = &mut self.common;
        if let Some(field) = queue_field(offset) {
            c.write_queue(field, value);
            return;
        }
        match offset {
            REG_DEVICE_FEATURES_SEL => c.device_features_sel = value,
            REG_DRIVER_FEATURES => c.write_driver_features(value),
            REG_DRIVER_FEATURES_SEL => c.driver_features_sel = value,
            REG_QUEUE_SEL => c.queue_sel = value,
            REG_QUEUE_NOTIFY => c.notify(value),
            REG_INTERRUPT_ACK => c.interrupt.ack(value),
            REG_STATUS => c.set_status(value),
            _ => warn!(
                "virtio-mmio: write of {value:#x} to unknown or read-only register {offset:#x}"
            ),
        }
    }
}

impl crate::devices::Persist for MmioTransport {
    fn save(&mut self) -> Result<serde_json::Value, String> {
        crate::devices::to_state(&self.common.save())
    }

    fn restore(&mut self, v: &serde_json::Value) -> Result<(), String> {
        self.common.restore(&crate::devices::from_state(v)?)
    }

    fn kick(&mut self) {
        self.common.kick();
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.common
                .device()
                .read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            warn!(
                "virtio-mmio: {}-byte read at {offset:#x}; registers are 32-bit",
                data.len()
            );
            data.fill(0);
            return;
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.common
                .device()
                .write_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            warn!(
                "virtio-mmio: {}-byte write at {offset:#x}; registers are 32-bit",
                data.len()
            );
            return;
        }
        let v = u32::from_le_bytes(data.try_into().unwrap());
        self.write_reg(offset, v);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::virtio::device::test_utils::guest_memory;
    use crate::devices::virtio::device::{
        ActivateError, Activation, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    };
    use vmm_sys_util::eventfd::EventFd;

    /// A device that records what the transport does to it.
    pub struct DummyDevice {
        pub queue_evts: Vec<EventFd>,
        pub activated: Option<(usize, u64)>,
        pub resets: u32,
        pub fail_activation: bool,
        sizes: Vec<u16>,
    }

    impl DummyDevice {
        pub fn new(queues: usize) -> Self {
            Self {
                queue_evts: (0..queues)
                    .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
                    .collect(),
                activated: None,
                resets: 0,
                fail_activation: false,
                sizes: vec![16; queues],
            }
        }
    }

    impl VirtioDevice for DummyDevice {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn avail_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 0x1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8 + 0x40);
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.queue_evts
        }
        fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
            if self.fail_activation {
                return Err(ActivateError::Backend("refused".into()));
            }
            self.activated = Some((a.queues.len(), a.acked_features));
            Ok(())
        }
        fn reset(&mut self) {
            self.activated = None;
            self.resets += 1;
        }
        fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
            None
        }
    }

    fn transport(queues: usize) -> (MmioTransport, Arc<Mutex<DummyDevice>>, EventFd) {
        let dev = Arc::new(Mutex::new(DummyDevice::new(queues)));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(irq.try_clone().unwrap()));
        (
            MmioTransport::new(guest_memory(), dev.clone(), interrupt),
            dev,
            irq,
        )
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Sets queue `i` up the way Linux does, with rings in the first megabyte.
    pub fn setup_queue(t: &mut MmioTransport, i: u32) {
        let base = 0x1_0000 * u64::from(i + 1);
        w(t, REG_QUEUE_SEL, i);
        w(t, REG_QUEUE_NUM, 16);
        w(t, REG_QUEUE_DESC_LOW, base as u32);
        w(t, REG_QUEUE_DESC_HIGH, 0);
        w(t, REG_QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        w(t, REG_QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        w(t, REG_QUEUE_READY, 1);
    }

    fn negotiate(t: &mut MmioTransport, features: u64) {
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, REG_DRIVER_FEATURES_SEL, 0);
        w(t, REG_DRIVER_FEATURES, features as u32);
        w(t, REG_DRIVER_FEATURES_SEL, 1);
        w(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
        w(
            t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
    }

    const READY: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

    #[test]
    fn identification_registers() {
        let (mut t, _d, _irq) = transport(1);
        assert_eq!(r(&mut t, REG_MAGIC), MMIO_MAGIC_VALUE);
        assert_eq!(r(&mut t, REG_VERSION), 2);
        assert_eq!(r(&mut t, REG_DEVICE_ID), 2);
        assert_eq!(r(&mut t, REG_VENDOR_ID), VENDOR_ID);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        w(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(
            r(&mut t, REG_DEVICE_FEATURES),
            (VIRTIO_RING_F_EVENT_IDX | 1) as u32
        );
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 16);
        w(&mut t, REG_QUEUE_SEL, 5);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 0, "no such queue");
    }

    #[test]
    fn config_space_goes_to_the_device() {
        let (mut t, _d, _irq) = transport(1);
        let mut b = [0u8; 2];
        t.read(CONFIG_SPACE + 3, &mut b);
        assert_eq!(b, [0x43, 0x43]);
    }

    #[test]
    fn full_handshake_activates_with_acked_features() {
        let (mut t, dev, _irq) = transport(2);
        negotiate(&mut t, VIRTIO_F_VERSION_1 | 1);
        assert_eq!(
            r(&mut t, REG_STATUS) & STATUS_FEATURES_OK,
            STATUS_FEATURES_OK
        );
        setup_queue(&mut t, 0);
        setup_queue(&mut t, 1);
        w(&mut t, REG_STATUS, READY);
        assert_eq!(r(&mut t, REG_STATUS), READY);
        assert_eq!(
            dev.lock().unwrap().activated,
            Some((2, VIRTIO_F_VERSION_1 | 1))
        );
    }

    #[test]
    fn unoffered_or_legacy_features_are_refused() {
        let (mut t, _d, _irq) = transport(1);
        negotiate(&mut t, VIRTIO_F_VERSION_1 | (1 << 7));
        assert_eq!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        w(&mut t, REG_STATUS, 0);
        negotiate(&mut t, 1);
        assert_eq!(
            r(&mut t, REG_STATUS) & STATUS_FEATURES_OK,
            0,
            "no VERSION_1"
        );
    }

    #[test]
    fn driver_ok_with_a_bad_queue_sets_needs_reset() {
        let (mut t, dev, irq) = transport(1);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_NUM, 16);
        // Descriptor table far outside the 4 MiB of guest memory.
        w(&mut t, REG_QUEUE_DESC_LOW, 0x8000_0000);
        w(&mut t, REG_QUEUE_DRIVER_LOW, 0x2000);
        w(&mut t, REG_QUEUE_DEVICE_LOW, 0x3000);
        w(&mut t, REG_QUEUE_READY, 1);
        w(&mut t, REG_STATUS, READY);
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
        assert!(dev.lock().unwrap().activated.is_none());
        assert_eq!(irq.read().unwrap(), 1, "config change interrupt");
        assert_ne!(r(&mut t, REG_INTERRUPT_STATUS) & 2, 0);
    }

    #[test]
    fn unready_queue_blocks_activation() {
        let (mut t, dev, _irq) = transport(2);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0);
        w(&mut t, REG_STATUS, READY);
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
        assert!(dev.lock().unwrap().activated.is_none());
    }

    #[test]
    fn failed_activation_sets_needs_reset() {
        let (mut t, dev, _irq) = transport(1);
        dev.lock().unwrap().fail_activation = true;
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0);
        w(&mut t, REG_STATUS, READY);
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
    }

    #[test]
    fn reset_clears_everything() {
        let (mut t, dev, _irq) = transport(1);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0);
        w(&mut t, REG_STATUS, READY);
        w(&mut t, REG_STATUS, 0);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        assert!(dev.lock().unwrap().activated.is_none());
        w(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
        // And the device can be brought up again.
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0);
        w(&mut t, REG_STATUS, READY);
        assert!(dev.lock().unwrap().activated.is_some());
    }

    #[test]
    fn queue_registers_are_frozen_after_driver_ok() {
        let (mut t, _dev, _irq) = transport(1);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0);
        w(&mut t, REG_STATUS, READY);
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_READY, 0);
        w(&mut t, REG_QUEUE_NUM, 8);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 1);
        assert_eq!(t.common.queues[0].size(), 16);
    }

    #[test]
    fn status_bits_cannot_be_cleared_without_reset() {
        let (mut t, _d, _irq) = transport(1);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        assert_eq!(
            r(&mut t, REG_STATUS),
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
        );
    }

    #[test]
    fn notify_write_is_forwarded_to_the_queue_event() {
        let (mut t, dev, _irq) = transport(2);
        w(&mut t, REG_QUEUE_NOTIFY, 1);
        assert_eq!(dev.lock().unwrap().queue_evts[1].read().unwrap(), 1);
        w(&mut t, REG_QUEUE_NOTIFY, 9); // no such queue: ignored
    }

    #[test]
    fn interrupt_ack_and_odd_accesses() {
        let (mut t, _d, _irq) = transport(1);
        t.common.interrupt.signal_used_queue(0);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 1);
        w(&mut t, REG_INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
        let mut b = [0xffu8; 2];
        t.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0, 0], "16-bit register reads return zero");
        t.write(REG_STATUS + 1, &[1, 0, 0, 0]);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        assert_eq!(r(&mut t, 0x0c8), 0, "unknown register");
    }

    #[test]
    fn invalid_queue_size_is_refused() {
        let (mut t, _d, _irq) = transport(1);
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_NUM, 7);
        assert_ne!(t.common.queues[0].size(), 7);
        w(&mut t, REG_QUEUE_NUM, 64);
        assert_ne!(t.common.queues[0].size(), 64, "above the max of 16");
    }
}
