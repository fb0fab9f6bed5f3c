//! The virtio-pci transport, modern (virtio 1.x, section 4.1) and nothing else: a PCI function
//! 1af4:(1040 + device id) whose vendor capabilities point into one 32-bit memory BAR
//! holding the common configuration, the ISR status, the device configuration, the queue
//! notification area and the MSI-X table and PBA.
//!
//! Queue notifications never reach this code while the BAR sits where it was placed: each
//! queue's notify address is a KVM ioeventfd (zero-length, so KVM's fast MMIO path takes
//! it). If the driver moves the BAR, the ioeventfds move with it. Interrupts are MSI-X, one
//! vector per queue plus one for configuration changes as Linux asks for them, or INTx with
//! the ISR status when the driver does not enable MSI-X (`pci=nomsi`).
//!
//! BAR 0 layout:
//! ```text
//! 0x0000 common configuration    0x3000 notifications, queue i at 0x3000 + 4 i
//! 0x1000 ISR status              0x4000 MSI-X table
//! 0x2000 device configuration    0x5000 MSI-X pending bits
//! ```

use std::sync::{Arc, Mutex};

use log::{error, warn};
use vmm_sys_util::eventfd::EventFd;

use super::{QueueField, VirtioCommon};
use crate::devices::pci::config::{
    touches, PciConfig, PciDevice, COMMAND_MEMORY_ENABLE, REG_BAR0, REG_BAR_END, REG_COMMAND,
};
use crate::devices::pci::msix::{MsixTable, MSIX_CAP_CONTROL, PCI_CAP_ID_MSIX};
use crate::devices::virtio::device::{VirtioDevice, VirtioInterrupt, VIRTIO_MSI_NO_VECTOR};
use crate::vstate::memory::GuestMemoryMmap;

/// PCI vendor of virtio devices, and the base of modern device ids (4.1.2.1).
pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;
/// Revision 1: a modern-only device (4.1.2.1).
const VIRTIO_PCI_REVISION: u8 = 1;
/// Subsystem id as QEMU's modern devices report it.
const VIRTIO_PCI_SUBSYSTEM: u16 = 0x1100;

/// Vendor-specific capability id, and the virtio structure types (4.1.4).
const PCI_CAP_ID_VNDR: u8 = 0x09;
const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;

/// The memory BAR and its regions.
pub const BAR_INDEX: usize = 0;
pub const BAR_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
/// `struct virtio_pci_common_cfg` of virtio 1.1 (through `queue_device`).
const COMMON_LEN: u64 = 0x38;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_LEN: u64 = 0x1000;
/// Queue i notifies at NOTIFY_OFFSET + i * NOTIFY_MULTIPLIER.
pub const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x5000;
const REGION_LEN: u64 = 0x1000;
/// Most queues: their notify addresses must fit the notification region.
pub const MAX_QUEUES: usize = (NOTIFY_LEN / NOTIFY_MULTIPLIER as u64) as usize;

// Common configuration fields (4.1.4.3).
const CC_DEVICE_FEATURE_SELECT: u64 = 0x00;
const CC_DEVICE_FEATURE: u64 = 0x04;
const CC_DRIVER_FEATURE_SELECT: u64 = 0x08;
const CC_DRIVER_FEATURE: u64 = 0x0c;
const CC_MSIX_CONFIG: u64 = 0x10;
const CC_NUM_QUEUES: u64 = 0x12;
const CC_DEVICE_STATUS: u64 = 0x14;
const CC_CONFIG_GENERATION: u64 = 0x15;
const CC_QUEUE_SELECT: u64 = 0x16;
const CC_QUEUE_SIZE: u64 = 0x18;
const CC_QUEUE_MSIX_VECTOR: u64 = 0x1a;
const CC_QUEUE_ENABLE: u64 = 0x1c;
const CC_QUEUE_NOTIFY_OFF: u64 = 0x1e;
const CC_QUEUE_DESC: u64 = 0x20;
const CC_QUEUE_DRIVER: u64 = 0x28;
const CC_QUEUE_DEVICE: u64 = 0x30;

/// Names of BAR 0's registers by offset, for the exit accounting.
pub fn register_name(offset: u64) -> &'static str {
    match offset {
        CC_DEVICE_FEATURE_SELECT => "device_feature_select",
        CC_DEVICE_FEATURE => "device_feature",
        CC_DRIVER_FEATURE_SELECT => "driver_feature_select",
        CC_DRIVER_FEATURE => "driver_feature",
        CC_MSIX_CONFIG => "msix_config",
        CC_NUM_QUEUES => "num_queues",
        CC_DEVICE_STATUS => "device_status",
        CC_CONFIG_GENERATION => "config_generation",
        CC_QUEUE_SELECT => "queue_select",
        CC_QUEUE_SIZE => "queue_size",
        CC_QUEUE_MSIX_VECTOR => "queue_msix_vector",
        CC_QUEUE_ENABLE => "queue_enable",
        CC_QUEUE_NOTIFY_OFF => "queue_notify_off",
        CC_QUEUE_DESC..CC_QUEUE_DEVICE => "queue_address",
        CC_QUEUE_DEVICE..COMMON_LEN => "queue_address",
        ISR_OFFSET => "isr",
        DEVICE_OFFSET..NOTIFY_OFFSET => "device_config",
        NOTIFY_OFFSET..MSIX_TABLE_OFFSET => "queue_notify",
        MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET => "msix_table",
        MSIX_PBA_OFFSET..BAR_SIZE => "msix_pba",
        _ => "",
    }
}

/// Class code per virtio device type, as QEMU gives them (drivers do not look).
fn class_of(device_type: u32) -> (u8, u8) {
    match device_type {
        1 => (0x02, 0x00), // network controller, Ethernet
        2 => (0x01, 0x00), // mass storage, SCSI
        3 => (0x07, 0x80), // communication, other
        _ => (0xff, 0x00),
    }
}

/// Registers the queues' notify addresses with KVM; the transport calls it again when the
/// driver moves the BAR.
pub trait NotifyRegistry: Send {
    fn register(&self, evt: &EventFd, addr: u64) -> Result<(), String>;
    fn unregister(&self, evt: &EventFd, addr: u64) -> Result<(), String>;
}

/// A virtio device as a PCI function.
pub struct PciTransport {
    common: VirtioCommon,
    config: PciConfig,
    msix: Arc<MsixTable>,
    msix_cap: usize,
    pci_cfg_cap: usize,
    num_queues: usize,
    notify: Box<dyn NotifyRegistry>,
    /// The BAR address the queues' ioeventfds sit at now.
    notify_base: Option<u64>,
}

impl PciTransport {
    /// The function for `device`, its BAR at `bar_addr` (in the MMIO gap), INTx on IRQ
    /// `irq`, MSI-X through `interrupt`'s table; registers the queue notifications.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<VirtioInterrupt>,
        bar_addr: u64,
        irq: u8,
        notify: Box<dyn NotifyRegistry>,
    ) -> Result<Self, String> {
        let msix = interrupt
            .msix_table()
            .cloned()
            .ok_or("a virtio-pci device needs an MSI-X table")?;
        let (device_type, num_queues) = {
            let d = device.lock().unwrap_or_else(|p| p.into_inner());
            (d.device_type(), d.queue_max_sizes().len())
        };
        if num_queues > MAX_QUEUES || msix.table_size() > REGION_LEN {
            return Err(format!("{num_queues} queues do not fit a virtio-pci BAR"));
        }
        let (class, subclass) = class_of(device_type);
        let mut config = PciConfig::new(
            VIRTIO_PCI_VENDOR,
            VIRTIO_PCI_DEVICE_BASE + device_type as u16,
            class,
            subclass,
            0,
            0,
        );
        config.set_ids(VIRTIO_PCI_REVISION, VIRTIO_PCI_VENDOR, VIRTIO_PCI_SUBSYSTEM);
        config.set_mem_bar(BAR_INDEX, BAR_SIZE, bar_addr, false, false);
        config.set_interrupt(1, irq);
        let cap = |cfg_type: u8, offset: u64, length: u64| -> Vec<u8> {
            // struct virtio_pci_cap after id and next: cap_len, cfg_type, bar, id,
            // padding[2], offset, length (4.1.4).
            let mut b = vec![0u8; 14];
            b[0] = 16;
            b[1] = cfg_type;
            b[2] = BAR_INDEX as u8;
            b[6..10].copy_from_slice(&(offset as u32).to_le_bytes());
            b[10..14].copy_from_slice(&(length as u32).to_le_bytes());
            b
        };
        config.add_capability(
            PCI_CAP_ID_VNDR,
            &cap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, COMMON_LEN),
        );
        let mut notify_cap = cap(VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFFSET, NOTIFY_LEN);
        notify_cap[0] = 20;
        notify_cap.extend_from_slice(&NOTIFY_MULTIPLIER.to_le_bytes());
        config.add_capability(PCI_CAP_ID_VNDR, &notify_cap);
        config.add_capability(PCI_CAP_ID_VNDR, &cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, 1));
        config.add_capability(
            PCI_CAP_ID_VNDR,
            &cap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET, DEVICE_LEN),
        );
        // The configuration access window (4.1.4.9): bar, offset and length are the
        // driver's to write, pci_cfg_data reaches the BAR there.
        let mut pci_cfg = cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0);
        pci_cfg[0] = 20;
        pci_cfg.extend_from_slice(&[0; 4]);
        let pci_cfg_cap = config.add_capability(PCI_CAP_ID_VNDR, &pci_cfg);
        config.make_writable(pci_cfg_cap + 4, 1);
        config.make_writable(pci_cfg_cap + 8, 8);
        let msix_cap = config.add_capability(
            PCI_CAP_ID_MSIX,
            &msix.capability_body(
                BAR_INDEX as u8,
                MSIX_TABLE_OFFSET as u32,
                MSIX_PBA_OFFSET as u32,
            ),
        );
        let mut t = Self {
            common: VirtioCommon::new("virtio-pci", mem, device, interrupt),
            config,
            msix,
            msix_cap,
            pci_cfg_cap,
            num_queues,
            notify,
            notify_base: None,
        };
        t.move_notifications(Some(bar_addr))?;
        Ok(t)
    }

    /// The device status as the driver last set it.
    pub fn status(&self) -> u32 {
        self.common.status()
    }

    /// Moves the queues' ioeventfds to the BAR at `base` (None: nowhere).
    fn move_notifications(&mut self, base: Option<u64>) -> Result<(), String> {
        if base == self.notify_base {
            return Ok(());
        }
        let dev = self.common.device();
        let evts = dev.queue_events();
        if let Some(old) = self.notify_base {
            for (i, evt) in evts.iter().enumerate() {
                self.notify.unregister(evt, notify_addr(old, i))?;
            }
        }
        if let Some(new) = base {
            for (i, evt) in evts.iter().enumerate() {
                self.notify.register(evt, notify_addr(new, i))?;
            }
        }
        drop(dev);
        self.notify_base = base;
        Ok(())
    }

    /// Keeps the ioeventfds where the BAR decodes, after a configuration write.
    fn follow_bar(&mut self) {
        if self.config.command() & COMMAND_MEMORY_ENABLE == 0 {
            // Linux turns decoding off while it sizes BARs; they come back before decoding
            // does, so nothing moves until then.
            return;
        }
        let base = self.config.bar_range(BAR_INDEX).map(|r| r.base);
        if base.is_some() && base != self.notify_base {
            if let Err(e) = self.move_notifications(base) {
                error!("virtio-pci: failed to move the queue notifications: {e}");
            }
        }
    }

    fn read_common(&mut self, off: u64, data: &mut [u8]) {
        let c = &self.common;
        let sel = c.queue_sel as usize;
        let qword = |low: QueueField, high: QueueField| {
            u64::from(c.read_queue(low)) | (u64::from(c.read_queue(high)) << 32)
        };
        let (v, width): (u64, usize) = match off {
            CC_DEVICE_FEATURE_SELECT => (u64::from(c.device_features_sel), 4),
            CC_DEVICE_FEATURE => (u64::from(c.device_features_word()), 4),
            CC_DRIVER_FEATURE_SELECT => (u64::from(c.driver_features_sel), 4),
            CC_DRIVER_FEATURE => (u64::from(c.driver_features_word()), 4),
            CC_MSIX_CONFIG => (u64::from(c.interrupt.config_vector()), 2),
            CC_NUM_QUEUES => (self.num_queues as u64, 2),
            CC_DEVICE_STATUS => (u64::from(c.status() & 0xff), 1),
            CC_CONFIG_GENERATION => (u64::from(c.config_generation & 0xff), 1),
            CC_QUEUE_SELECT => (u64::from(c.queue_sel), 2),
            CC_QUEUE_SIZE => (u64::from(c.read_queue(QueueField::Size)), 2),
            CC_QUEUE_MSIX_VECTOR => (u64::from(c.interrupt.queue_vector(sel)), 2),
            CC_QUEUE_ENABLE => (u64::from(c.read_queue(QueueField::Ready)), 2),
            // Queue i's notify_off is i: its address is NOTIFY_OFFSET + i * multiplier.
            CC_QUEUE_NOTIFY_OFF => (if sel < self.num_queues { sel as u64 } else { 0 }, 2),
            CC_QUEUE_DESC => (qword(QueueField::DescLow, QueueField::DescHigh), 8),
            CC_QUEUE_DRIVER => (qword(QueueField::DriverLow, QueueField::DriverHigh), 8),
            CC_QUEUE_DEVICE => (qword(QueueField::DeviceLow, QueueField::DeviceHigh), 8),
            o if (CC_QUEUE_DESC..COMMON_LEN).contains(&o) && o % 8 == 4 && data.len() == 4 => {
                // The high half of a 64-bit field, read on its own.
                let mut full = [0u8; 8];
                self.read_common(o - 4, &mut full);
                data.copy_from_slice(&full[4..]);
                return;
            }
            _ => (0, 0),
        };
        if width == 0 || !(data.len() == width || (width == 8 && data.len() == 4)) {
            warn!(
                "virtio-pci: {}-byte read of common config at {off:#x} ignored",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
    }

    fn write_common(&mut self, off: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        b[..data.len().min(8)].copy_from_slice(&data[..data.len().min(8)]);
        let v = u64::from_le_bytes(b);
        let c = &mut self.common;
        let sel = c.queue_sel as usize;
        let width_ok = |w: usize| data.len() == w;
        match off {
            CC_DEVICE_FEATURE_SELECT if width_ok(4) => c.device_features_sel = v as u32,
            CC_DRIVER_FEATURE_SELECT if width_ok(4) => c.driver_features_sel = v as u32,
            CC_DRIVER_FEATURE if width_ok(4) => c.write_driver_features(v as u32),
            CC_MSIX_CONFIG if width_ok(2) => {
                c.interrupt.set_config_vector(v as u16);
            }
            CC_DEVICE_STATUS if width_ok(1) => c.set_status(v as u32),
            CC_QUEUE_SELECT if width_ok(2) => c.queue_sel = v as u32,
            CC_QUEUE_SIZE if width_ok(2) => c.write_queue(QueueField::Size, v as u32),
            CC_QUEUE_MSIX_VECTOR if width_ok(2) => {
                if sel < self.num_queues && c.status() & super::STATUS_DRIVER_OK == 0 {
                    c.interrupt.set_queue_vector(sel, v as u16);
                } else {
                    warn!("virtio-pci: queue_msix_vector written for queue {sel} now; ignored");
                }
            }
            CC_QUEUE_ENABLE if width_ok(2) => c.write_queue(QueueField::Ready, v as u32),
            CC_QUEUE_DESC..COMMON_LEN if off.is_multiple_of(4) && (width_ok(4) || width_ok(8)) => {
                let base = off & !7;
                let (low, high) = match base {
                    CC_QUEUE_DESC => (QueueField::DescLow, QueueField::DescHigh),
                    CC_QUEUE_DRIVER => (QueueField::DriverLow, QueueField::DriverHigh),
                    _ => (QueueField::DeviceLow, QueueField::DeviceHigh),
                };
                if off == base {
                    c.write_queue(low, v as u32);
                    if data.len() == 8 {
                        c.write_queue(high, (v >> 32) as u32);
                    }
                } else if data.len() == 4 {
                    c.write_queue(high, v as u32);
                }
            }
            _ => warn!(
                "virtio-pci: {}-byte write of {v:#x} to common config at {off:#x} ignored",
                data.len()
            ),
        }
    }

    /// The MSI-X message control as it reads: table size, enable and function mask.
    fn msix_control(&self) -> u16 {
        ((self.msix.len() - 1) as u16) | self.msix.control_bits()
    }

    /// The BAR access the configuration access window names: (offset, length), if valid.
    fn pci_cfg_target(&self) -> Option<(u64, usize)> {
        let c = &self.config;
        let bar = c.get8(self.pci_cfg_cap + 4);
        let offset = u64::from(c.get32(self.pci_cfg_cap + 8));
        let len = c.get32(self.pci_cfg_cap + 12) as usize;
        (usize::from(bar) == BAR_INDEX
            && matches!(len, 1 | 2 | 4)
            && offset.is_multiple_of(len as u64)
            && offset + len as u64 <= BAR_SIZE)
            .then_some((offset, len))
    }
}

/// A virtio-pci function's state beyond its configuration space (which the bus carries).
#[derive(serde::Serialize, serde::Deserialize)]
struct PciSnapshot {
    common: super::CommonState,
    msix: crate::devices::pci::msix::MsixState,
    config_vector: u16,
    queue_vectors: Vec<u16>,
}

impl crate::devices::Persist for PciTransport {
    fn save(&mut self) -> Result<serde_json::Value, String> {
        let (config_vector, queue_vectors) = self
            .common
            .interrupt
            .vectors()
            .ok_or("a virtio-pci device without MSI-X vectors")?;
        crate::devices::to_state(&PciSnapshot {
            common: self.common.save(),
            msix: self.msix.save(),
            config_vector,
            queue_vectors,
        })
    }

    /// The bus restored the configuration space first: the queue notifications follow the
    /// BAR to where the snapshot has it.
    fn restore(&mut self, v: &serde_json::Value) -> Result<(), String> {
        let st: PciSnapshot = crate::devices::from_state(v)?;
        self.common
            .interrupt
            .restore_vectors(st.config_vector, &st.queue_vectors)?;
        self.msix.restore(&st.msix)?;
        self.common.restore(&st.common)?;
        let base = self.config.bar_address(BAR_INDEX);
        self.move_notifications(base)
    }

    fn kick(&mut self) {
        self.common.kick();
    }
}

fn notify_addr(base: u64, queue: usize) -> u64 {
    base + NOTIFY_OFFSET + queue as u64 * u64::from(NOTIFY_MULTIPLIER)
}

impl PciDevice for PciTransport {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn config_read(&mut self, off: usize, data: &mut [u8]) {
        let data_off = self.pci_cfg_cap + 16;
        if off == data_off && !data.is_empty() && data.len() <= 4 {
            match self.pci_cfg_target() {
                Some((bar_off, len)) => {
                    let mut buf = [0u8; 4];
                    self.bar_read(BAR_INDEX, bar_off, &mut buf[..len]);
                    let n = data.len().min(len);
                    data.fill(0);
                    data[..n].copy_from_slice(&buf[..n]);
                }
                None => data.fill(0xff),
            }
            return;
        }
        self.config.read(off, data);
        let ctl = self.msix_cap + MSIX_CAP_CONTROL;
        if touches(off, data.len(), ctl, 2) {
            let bytes = self.msix_control().to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                if let Some(v) = (off + i).checked_sub(ctl).and_then(|j| bytes.get(j)) {
                    *b = *v;
                }
            }
        }
    }

    fn config_write(&mut self, off: usize, data: &[u8]) {
        let data_off = self.pci_cfg_cap + 16;
        if off == data_off && !data.is_empty() && data.len() <= 4 {
            if let Some((bar_off, len)) = self.pci_cfg_target() {
                let mut buf = [0u8; 4];
                let n = data.len().min(len);
                buf[..n].copy_from_slice(&data[..n]);
                self.bar_write(BAR_INDEX, bar_off, &buf[..len]);
            }
            return;
        }
        let ctl = self.msix_cap + MSIX_CAP_CONTROL;
        if touches(off, data.len(), ctl, 2) {
            let mut bytes = self.msix_control().to_le_bytes();
            for (i, v) in data.iter().enumerate() {
                if let Some(b) = (off + i).checked_sub(ctl).and_then(|j| bytes.get_mut(j)) {
                    *b = *v;
                }
            }
            self.msix.write_control(u16::from_le_bytes(bytes));
        }
        self.config.write(off, data);
        if touches(off, data.len(), REG_COMMAND, 2)
            || touches(off, data.len(), REG_BAR0, REG_BAR_END - REG_BAR0)
        {
            self.follow_bar();
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar != BAR_INDEX {
            data.fill(0xff);
            return;
        }
        match offset {
            COMMON_OFFSET..ISR_OFFSET => self.read_common(offset, data),
            ISR_OFFSET if data.len() == 1 => data[0] = self.common.interrupt.take_status() as u8,
            DEVICE_OFFSET..NOTIFY_OFFSET => self
                .common
                .device()
                .read_config(offset - DEVICE_OFFSET, data),
            MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET => {
                self.msix.read_table(offset - MSIX_TABLE_OFFSET, data)
            }
            MSIX_PBA_OFFSET..BAR_SIZE => self.msix.read_pba(offset - MSIX_PBA_OFFSET, data),
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != BAR_INDEX {
            return;
        }
        match offset {
            COMMON_OFFSET..ISR_OFFSET => self.write_common(offset, data),
            DEVICE_OFFSET..NOTIFY_OFFSET => self
                .common
                .device()
                .write_config(offset - DEVICE_OFFSET, data),
            NOTIFY_OFFSET..MSIX_TABLE_OFFSET => {
                // Only seen when no ioeventfd caught it (the BAR was just moved).
                let queue = (offset - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER);
                self.common.notify(queue as u32);
            }
            MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET => {
                self.msix.write_table(offset - MSIX_TABLE_OFFSET, data)
            }
            _ => warn!(
                "virtio-pci: {}-byte write to read-only BAR offset {offset:#x} ignored",
                data.len()
            ),
        }
    }
}

/// The MSI-X vectors a virtio-pci device with `queues` queues asks for: one per queue and one
/// for configuration changes (what Linux's `vp_find_vqs_msix` tries first).
pub fn msix_vectors_for(queues: usize) -> usize {
    queues + 1
}

/// NO_VECTOR, for the tests of other modules.
pub const NO_VECTOR: u16 = VIRTIO_MSI_NO_VECTOR;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pci::config::REG_CAPABILITIES;
    use crate::devices::pci::msix::tests::table;
    use crate::devices::pci::msix::MSIX_ENABLE;
    use crate::devices::virtio::device::test_utils::guest_memory;
    use crate::devices::virtio::device::{MsixVectors, VIRTIO_F_VERSION_1};
    use crate::devices::virtio::transport::mmio::tests::DummyDevice;
    use crate::devices::virtio::transport::{
        STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
    };

    const BAR: u64 = 0xc000_0000;

    #[derive(Default, Clone)]
    struct Registry(Arc<Mutex<Vec<(bool, u64)>>>);

    impl NotifyRegistry for Registry {
        fn register(&self, _: &EventFd, addr: u64) -> Result<(), String> {
            self.0.lock().unwrap().push((true, addr));
            Ok(())
        }
        fn unregister(&self, _: &EventFd, addr: u64) -> Result<(), String> {
            self.0.lock().unwrap().push((false, addr));
            Ok(())
        }
    }

    struct Harness {
        t: PciTransport,
        dev: Arc<Mutex<DummyDevice>>,
        irq: EventFd,
        registry: Registry,
    }

    fn harness(queues: usize) -> Harness {
        let dev = Arc::new(Mutex::new(DummyDevice::new(queues)));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (msix, _) = table(msix_vectors_for(queues));
        let interrupt = Arc::new(VirtioInterrupt::with_msix(
            irq.try_clone().unwrap(),
            crate::devices::metrics::DeviceMetrics::unnamed(),
            MsixVectors::new(Arc::new(msix), queues),
        ));
        let registry = Registry::default();
        let t = PciTransport::new(
            guest_memory(),
            dev.clone(),
            interrupt,
            BAR,
            10,
            Box::new(registry.clone()),
        )
        .unwrap();
        Harness {
            t,
            dev,
            irq,
            registry,
        }
    }

    impl Harness {
        fn cfg(&mut self, off: usize, len: usize) -> u32 {
            let mut b = [0u8; 4];
            self.t.config_read(off, &mut b[..len]);
            u32::from_le_bytes(b)
        }
        fn r(&mut self, off: u64, len: usize) -> u64 {
            let mut b = [0u8; 8];
            self.t.bar_read(0, off, &mut b[..len]);
            u64::from_le_bytes(b)
        }
        fn w(&mut self, off: u64, len: usize, v: u64) {
            self.t.bar_write(0, off, &v.to_le_bytes()[..len]);
        }
        /// Brings the device up the way Linux's virtio_pci_modern does.
        fn bring_up(&mut self, queues: u16, msix: bool) {
            if msix {
                let ctl = self.t.msix_cap + MSIX_CAP_CONTROL;
                self.t.config_write(ctl, &MSIX_ENABLE.to_le_bytes());
                for v in 0..=u64::from(queues) {
                    self.w(MSIX_TABLE_OFFSET + 16 * v, 4, 0xfee0_0000);
                    self.w(MSIX_TABLE_OFFSET + 16 * v + 8, 4, 0x40 + v);
                    self.w(MSIX_TABLE_OFFSET + 16 * v + 12, 4, 0);
                }
            }
            self.w(CC_DEVICE_STATUS, 1, 0);
            self.w(CC_DEVICE_STATUS, 1, u64::from(STATUS_ACKNOWLEDGE));
            self.w(
                CC_DEVICE_STATUS,
                1,
                u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER),
            );
            self.w(CC_DRIVER_FEATURE_SELECT, 4, 1);
            self.w(CC_DRIVER_FEATURE, 4, VIRTIO_F_VERSION_1 >> 32);
            self.w(
                CC_DEVICE_STATUS,
                1,
                u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK),
            );
            assert_ne!(self.r(CC_DEVICE_STATUS, 1) as u32 & STATUS_FEATURES_OK, 0);
            if msix {
                self.w(CC_MSIX_CONFIG, 2, 0);
                assert_eq!(self.r(CC_MSIX_CONFIG, 2), 0);
            }
            for q in 0..queues {
                let base = 0x1_0000 * u64::from(q + 1);
                self.w(CC_QUEUE_SELECT, 2, u64::from(q));
                assert_eq!(self.r(CC_QUEUE_SIZE, 2), 16, "max size");
                self.w(CC_QUEUE_SIZE, 2, 16);
                if msix {
                    self.w(CC_QUEUE_MSIX_VECTOR, 2, u64::from(q) + 1);
                    assert_eq!(self.r(CC_QUEUE_MSIX_VECTOR, 2), u64::from(q) + 1);
                }
                self.w(CC_QUEUE_DESC, 4, base);
                self.w(CC_QUEUE_DESC + 4, 4, 0);
                self.w(CC_QUEUE_DRIVER, 8, base + 0x1000);
                self.w(CC_QUEUE_DEVICE, 4, base + 0x2000);
                self.w(CC_QUEUE_ENABLE, 2, 1);
                assert_eq!(self.r(CC_QUEUE_NOTIFY_OFF, 2), u64::from(q));
            }
            self.w(
                CC_DEVICE_STATUS,
                1,
                u64::from(
                    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
                ),
            );
        }
    }

    /// The vendor capabilities in list order: (offset, cfg_type, bar, offset, length).
    fn virtio_caps(h: &mut Harness) -> Vec<(usize, u8, u8, u32, u32)> {
        let mut caps = Vec::new();
        let mut off = h.cfg(REG_CAPABILITIES, 1) as usize;
        while off != 0 {
            let id = h.cfg(off, 1) as u8;
            if id == PCI_CAP_ID_VNDR {
                caps.push((
                    off,
                    h.cfg(off + 3, 1) as u8,
                    h.cfg(off + 4, 1) as u8,
                    h.cfg(off + 8, 4),
                    h.cfg(off + 12, 4),
                ));
            }
            off = h.cfg(off + 1, 1) as usize;
        }
        caps
    }

    #[test]
    fn identity_and_capability_chain() {
        let mut h = harness(2);
        assert_eq!(h.cfg(0, 4), 0x1042_1af4, "modern virtio-blk id");
        assert_eq!(h.cfg(0x08, 1), 1, "revision 1");
        assert_eq!(h.cfg(0x2c, 4), 0x1100_1af4);
        assert_eq!(h.cfg(0x3d, 1), 1, "INTA");
        assert_eq!(h.cfg(0x3c, 1), 10);
        let caps = virtio_caps(&mut h);
        let types: Vec<u8> = caps.iter().map(|c| c.1).collect();
        assert_eq!(types, vec![1, 2, 3, 4, 5]);
        assert!(caps.iter().all(|c| c.2 == 0), "all in BAR 0");
        assert_eq!((caps[0].3, caps[0].4), (0, 0x38), "common config");
        assert_eq!(caps[1].3, 0x3000, "notifications");
        assert_eq!(h.cfg(caps[1].0 + 16, 4), NOTIFY_MULTIPLIER);
        assert_eq!(h.cfg(caps[1].0 + 2, 1), 20, "notify cap length");
        // MSI-X: 3 vectors, table at 0x4000, PBA at 0x5000, both in BAR 0.
        let msix = h.t.msix_cap;
        assert_eq!(msix, 0x98, "the fuzz seeds of virtio_pci address it there");
        assert_eq!(h.cfg(msix, 1), u32::from(PCI_CAP_ID_MSIX));
        assert_eq!(h.cfg(msix + 2, 2), 2);
        assert_eq!(h.cfg(msix + 4, 4), 0x4000);
        assert_eq!(h.cfg(msix + 8, 4), 0x5000);
        // Every capability lies inside the BAR.
        assert!(caps
            .iter()
            .all(|c| u64::from(c.3) + u64::from(c.4) <= BAR_SIZE));
    }

    #[test]
    fn bar_sizing_and_the_notifications_follow_a_moved_bar() {
        let mut h = harness(2);
        assert_eq!(
            h.registry.0.lock().unwrap().as_slice(),
            &[(true, BAR + 0x3000), (true, BAR + 0x3004)]
        );
        // Linux sizing BAR 0 with decoding off, then restoring it.
        h.t.config_write(REG_COMMAND, &[0, 0]);
        h.t.config_write(REG_BAR0, &[0xff; 4]);
        assert_eq!(h.cfg(REG_BAR0, 4), !(BAR_SIZE as u32 - 1));
        h.t.config_write(REG_BAR0, &(BAR as u32).to_le_bytes());
        h.t.config_write(REG_COMMAND, &[COMMAND_MEMORY_ENABLE as u8, 0]);
        assert_eq!(h.registry.0.lock().unwrap().len(), 2, "nothing moved");
        // The driver moves it.
        h.t.config_write(REG_BAR0, &(0xc010_0000u32).to_le_bytes());
        let log = h.registry.0.lock().unwrap().clone();
        assert_eq!(
            &log[2..],
            &[
                (false, BAR + 0x3000),
                (false, BAR + 0x3004),
                (true, 0xc010_3000),
                (true, 0xc010_3004)
            ]
        );
    }

    #[test]
    fn handshake_with_msix_activates_and_interrupts_per_queue() {
        let mut h = harness(2);
        h.bring_up(2, true);
        assert_eq!(
            h.dev.lock().unwrap().activated,
            Some((2, VIRTIO_F_VERSION_1))
        );
        assert_eq!(h.t.status() & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
        // Queue 1 uses vector 2; no INTx, no ISR bit.
        h.t.common.interrupt.signal_used_queue(1);
        assert!(h.irq.read().is_err(), "no INTx with MSI-X on");
        assert_eq!(h.r(ISR_OFFSET, 1), 0);
        let pba = h.r(MSIX_PBA_OFFSET, 8);
        assert_eq!(pba, 0, "delivered, not pending");
        // Masking vector 2 pends the next one.
        h.w(MSIX_TABLE_OFFSET + 32 + 12, 4, 1);
        h.t.common.interrupt.signal_used_queue(1);
        assert_eq!(h.r(MSIX_PBA_OFFSET, 8), 0b100);
        h.w(MSIX_TABLE_OFFSET + 32 + 12, 4, 0);
        assert_eq!(h.r(MSIX_PBA_OFFSET, 8), 0);
    }

    #[test]
    fn intx_fallback_uses_the_isr_read_to_clear() {
        let mut h = harness(1);
        h.bring_up(1, false);
        assert!(h.dev.lock().unwrap().activated.is_some());
        h.t.common.interrupt.signal_used_queue(0);
        assert_eq!(h.irq.read().unwrap(), 1, "INTx pulse");
        assert_eq!(h.r(ISR_OFFSET, 1), 1, "queue bit");
        assert_eq!(h.r(ISR_OFFSET, 1), 0, "cleared by the read");
        h.t.common.interrupt.signal_config_change();
        assert_eq!(h.r(ISR_OFFSET, 1), 2);
    }

    #[test]
    fn vectors_past_the_table_read_back_no_vector() {
        let mut h = harness(1);
        h.w(CC_MSIX_CONFIG, 2, 9);
        assert_eq!(h.r(CC_MSIX_CONFIG, 2), u64::from(NO_VECTOR));
        h.w(CC_QUEUE_SELECT, 2, 0);
        h.w(CC_QUEUE_MSIX_VECTOR, 2, 1);
        assert_eq!(h.r(CC_QUEUE_MSIX_VECTOR, 2), 1);
        h.w(CC_QUEUE_SELECT, 2, 5);
        assert_eq!(h.r(CC_QUEUE_SIZE, 2), 0, "no such queue");
        assert_eq!(h.r(CC_QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    }

    #[test]
    fn config_window_reaches_the_bar() {
        let mut h = harness(1);
        let cap = h.t.pci_cfg_cap;
        // Read num_queues (common config 0x12) through the window.
        h.t.config_write(cap + 4, &[0]);
        h.t.config_write(cap + 8, &0x12u32.to_le_bytes());
        h.t.config_write(cap + 12, &2u32.to_le_bytes());
        assert_eq!(h.cfg(cap + 16, 2), 1);
        // A window onto another BAR or an odd length reads all ones.
        h.t.config_write(cap + 4, &[3]);
        assert_eq!(h.cfg(cap + 16, 4), 0xffff_ffff);
        h.t.config_write(cap + 4, &[0]);
        h.t.config_write(cap + 12, &3u32.to_le_bytes());
        assert_eq!(h.cfg(cap + 16, 4), 0xffff_ffff);
    }

    #[test]
    fn hostile_accesses_are_ignored() {
        let mut h = harness(2);
        // Odd widths and offsets in the common config, reads of write-only space.
        h.w(CC_DEVICE_STATUS, 4, 0xffff_ffff);
        assert_eq!(h.r(CC_DEVICE_STATUS, 1), 0);
        h.w(0x3b, 1, 0xff);
        assert_eq!(h.r(0x37, 2), 0);
        h.w(BAR_SIZE - 8, 8, u64::MAX);
        h.w(MSIX_TABLE_OFFSET + 1, 4, 1);
        h.t.bar_write(3, 0, &[1]);
        let mut b = [0u8; 4];
        h.t.bar_read(5, 0, &mut b);
        assert_eq!(b, [0xff; 4]);
        // Queue addresses after DRIVER_OK do not change.
        h.bring_up(2, true);
        h.w(CC_QUEUE_SELECT, 2, 0);
        h.w(CC_QUEUE_DESC, 8, 0xdead_0000);
        assert_eq!(h.r(CC_QUEUE_DESC, 8), 0x1_0000);
        // Hostile config space writes: ids, capability pointers stay.
        h.t.config_write(0, &[0; 4]);
        h.t.config_write(REG_CAPABILITIES, &[0]);
        assert_eq!(h.cfg(0, 4), 0x1042_1af4);
        assert_ne!(h.cfg(REG_CAPABILITIES, 1), 0);
        for off in 0..256 {
            h.t.config_write(off, &[0xff]);
        }
        assert_eq!(h.cfg(0, 4), 0x1042_1af4);
    }
}
