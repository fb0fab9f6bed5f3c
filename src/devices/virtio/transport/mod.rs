//! The virtio transports: virtio-mmio (`mmio`) and virtio-pci (`pci`), both virtio 1.x
//! "modern" only. A device never knows which one carries it: both drive the same
//! `VirtioDevice` trait through `VirtioCommon`, which holds what the two share (device
//! status, feature negotiation, the queues' configuration, activation and reset; virtio 1.x
//! chapters 2 and 3), while each transport maps its own register layout onto it.

pub mod mmio;
pub mod pci;

use std::sync::{Arc, Mutex, MutexGuard};

use log::{debug, warn};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::device::{
    Activation, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::vstate::memory::GuestMemoryMmap;

// Device status bits (virtio 1.x, 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 64;
pub const STATUS_FAILED: u32 = 128;

/// A queue configuration field the driver writes before DRIVER_OK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueField {
    Size,
    Ready,
    DescLow,
    DescHigh,
    DriverLow,
    DriverHigh,
    DeviceLow,
    DeviceHigh,
}

/// The transport-independent state of a virtio device, for snapshots.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommonState {
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub config_generation: u32,
    /// The queues as the driver configured them.
    #[serde(with = "queue_states")]
    pub queues: Vec<QueueState>,
    /// Where the activated device got to in each ring.
    #[serde(with = "opt_queue_states")]
    pub live: Option<Vec<QueueState>>,
    /// The interrupt status register (ISR) bits not yet acknowledged.
    pub interrupt_status: u32,
}

/// `QueueState` as a tuple (virtio-queue gives it no serde).
type QueueTuple = (u16, u16, u16, bool, u16, bool, u64, u64, u64);

fn to_tuple(q: &QueueState) -> QueueTuple {
    (
        q.max_size,
        q.next_avail,
        q.next_used,
        q.event_idx_enabled,
        q.size,
        q.ready,
        q.desc_table,
        q.avail_ring,
        q.used_ring,
    )
}

fn from_tuple(t: QueueTuple) -> QueueState {
    QueueState {
        max_size: t.0,
        next_avail: t.1,
        next_used: t.2,
        event_idx_enabled: t.3,
        size: t.4,
        ready: t.5,
        desc_table: t.6,
        avail_ring: t.7,
        used_ring: t.8,
    }
}

mod queue_states {
    use super::*;
    pub fn serialize<S: serde::Serializer>(q: &[QueueState], s: S) -> Result<S::Ok, S::Error> {
        q.iter().map(to_tuple).collect::<Vec<_>>().serialize(s)
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<QueueState>, D::Error> {
        Ok(Vec::<QueueTuple>::deserialize(d)?
            .into_iter()
            .map(from_tuple)
            .collect())
    }
}

mod opt_queue_states {
    use super::*;
    pub fn serialize<S: serde::Serializer>(
        q: &Option<Vec<QueueState>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        q.as_ref()
            .map(|v| v.iter().map(to_tuple).collect::<Vec<_>>())
            .serialize(s)
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<QueueState>>, D::Error> {
        Ok(Option::<Vec<QueueTuple>>::deserialize(d)?
            .map(|v| v.into_iter().map(from_tuple).collect()))
    }
}

/// What both transports keep about a device: status, features and queues.
pub struct VirtioCommon {
    /// The transport's name, for messages ("virtio-mmio", "virtio-pci").
    name: &'static str,
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    pub(crate) interrupt: Arc<VirtioInterrupt>,
    pub(crate) queues: Vec<Queue>,
    pub(crate) device_features_sel: u32,
    pub(crate) driver_features_sel: u32,
    acked_features: u64,
    pub(crate) queue_sel: u32,
    status: u32,
    pub(crate) config_generation: u32,
}

pub(crate) fn lock(
    dev: &Arc<Mutex<dyn VirtioDevice>>,
) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

fn new_queues(dev: &dyn VirtioDevice) -> Vec<Queue> {
    dev.queue_max_sizes()
        .iter()
        .map(|&max| Queue::new(max).expect("device queue sizes are powers of two up to 32768"))
        .collect()
}

impl VirtioCommon {
    pub fn new(
        name: &'static str,
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Self {
        let queues = new_queues(&*lock(&device));
        Self {
            name,
            device,
            mem,
            interrupt,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
        }
    }

    pub fn device(&self) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
        lock(&self.device)
    }

    /// The device status as the driver last set it (plus NEEDS_RESET from the device).
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The 32 feature bits the device-features selector picks.
    pub fn device_features_word(&self) -> u32 {
        let features = self.device().avail_features();
        match self.device_features_sel {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        }
    }

    /// The 32 feature bits the driver accepted that the driver-features selector picks.
    pub fn driver_features_word(&self) -> u32 {
        match self.driver_features_sel {
            0 => self.acked_features as u32,
            1 => (self.acked_features >> 32) as u32,
            _ => 0,
        }
    }

    pub fn write_driver_features(&mut self, value: u32) {
        // Features are negotiated between DRIVER and FEATURES_OK only (virtio 1.x, 3.1.1).
        if self.status & (STATUS_DRIVER | STATUS_FEATURES_OK) != STATUS_DRIVER {
            warn!(
                "{}: driver features written in status {:#x}; ignored",
                self.name, self.status
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            sel => warn!(
                "{}: driver features written with selector {sel}; ignored",
                self.name
            ),
        }
    }

    pub fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    /// Queue configuration may only change before the driver declares the device ready.
    fn queue_config_writable(&self) -> bool {
        self.status & STATUS_DRIVER_OK == 0
    }

    /// A write of one field of the selected queue's configuration.
    pub fn write_queue(&mut self, field: QueueField, value: u32) {
        if !self.queue_config_writable() {
            warn!(
                "{}: queue field {field:?} written after DRIVER_OK; ignored",
                self.name
            );
            return;
        }
        let name = self.name;
        let Some(q) = self.queues.get_mut(self.queue_sel as usize) else {
            warn!("{name}: queue field {field:?} written with no such queue selected");
            return;
        };
        match field {
            QueueField::Size => {
                // Queue::set_size refuses sizes that are zero, above the max or not a power
                // of two; the driver then sees the device misbehave and fails cleanly.
                q.set_size(value as u16);
                if u32::from(q.size()) != value {
                    warn!("{name}: invalid queue size {value} refused");
                }
            }
            QueueField::Ready => q.set_ready(value == 1),
            QueueField::DescLow => q.set_desc_table_address(Some(value), None),
            QueueField::DescHigh => q.set_desc_table_address(None, Some(value)),
            QueueField::DriverLow => q.set_avail_ring_address(Some(value), None),
            QueueField::DriverHigh => q.set_avail_ring_address(None, Some(value)),
            QueueField::DeviceLow => q.set_used_ring_address(Some(value), None),
            QueueField::DeviceHigh => q.set_used_ring_address(None, Some(value)),
        }
    }

    /// A read of one field of the selected queue's configuration (0 without a queue).
    pub fn read_queue(&self, field: QueueField) -> u32 {
        let Some(q) = self.selected_queue() else {
            return 0;
        };
        match field {
            QueueField::Size => u32::from(q.size()),
            QueueField::Ready => u32::from(q.ready()),
            QueueField::DescLow => q.desc_table() as u32,
            QueueField::DescHigh => (q.desc_table() >> 32) as u32,
            QueueField::DriverLow => q.avail_ring() as u32,
            QueueField::DriverHigh => (q.avail_ring() >> 32) as u32,
            QueueField::DeviceLow => q.used_ring() as u32,
            QueueField::DeviceHigh => (q.used_ring() >> 32) as u32,
        }
    }

    /// A notification that did not go through an ioeventfd: forwarded to the queue's.
    pub fn notify(&self, queue: u32) {
        let dev = self.device();
        match dev.queue_events().get(queue as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    warn!(
                        "{}: failed to forward a notify for queue {queue}: {e}",
                        self.name
                    );
                }
            }
            None => warn!(
                "{}: notify for queue {queue}, which does not exist",
                self.name
            ),
        }
    }

    /// A write of the device status (virtio 1.x, 2.1 and 3.1.1).
    pub fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & self.status != self.status & !STATUS_NEEDS_RESET {
            // Only a reset may clear bits (virtio 1.x, 2.1.2).
            warn!(
                "{}: status {:#x} -> {value:#x} clears bits; ignored",
                self.name, self.status
            );
            return;
        }
        let mut value = value | (self.status & STATUS_NEEDS_RESET);
        let new = value & !self.status;
        if new & STATUS_FEATURES_OK != 0 && !self.features_acceptable() {
            // Leaving FEATURES_OK clear tells the driver the subset was refused (3.1.1).
            value &= !STATUS_FEATURES_OK;
        }
        if new & STATUS_DRIVER_OK != 0 {
            if value & STATUS_FEATURES_OK == 0 {
                warn!("{}: DRIVER_OK without FEATURES_OK; ignored", self.name);
                return;
            }
            if let Err(msg) = self.activate() {
                warn!(
                    "{}: device {} not activated: {msg}",
                    self.name,
                    self.device().device_type()
                );
                value |= STATUS_NEEDS_RESET;
                self.status = value;
                self.interrupt.signal_config_change();
                return;
            }
        }
        self.status = value;
    }

    fn features_acceptable(&self) -> bool {
        let avail = self.device().avail_features();
        if self.acked_features & !avail != 0 {
            warn!(
                "{}: driver accepted features {:#x} the device does not offer",
                self.name,
                self.acked_features & !avail
            );
            return false;
        }
        if self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            warn!(
                "{}: driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)",
                self.name
            );
            return false;
        }
        true
    }

    fn activate(&mut self) -> Result<(), String> {
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        for (i, q) in self.queues.iter_mut().enumerate() {
            if !q.ready() {
                return Err(format!("queue {i} is not ready"));
            }
            if !q.is_valid(&self.mem) {
                return Err(format!("queue {i} has bad addresses or size"));
            }
            q.set_event_idx(event_idx);
        }
        // The device gets its own copies; the transport keeps its own so the queue registers
        // still read back what the driver wrote.
        let activation = Activation {
            mem: self.mem.clone(),
            queues: self
                .queues
                .iter()
                .map(|q| {
                    Queue::try_from(q.state()).expect("a validated queue restores from its state")
                })
                .collect(),
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
        };
        self.device()
            .activate(activation)
            .map_err(|e| e.to_string())
    }

    /// The state for a snapshot, after the device finished what it had in flight.
    pub fn save(&self) -> CommonState {
        let mut dev = self.device();
        dev.quiesce();
        CommonState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(|q| q.state()).collect(),
            live: dev.queue_states(),
            interrupt_status: self.interrupt.status(),
        }
    }

    /// Puts a snapshot's state back into a device built from the same configuration: the
    /// registers, the queues, and, for a device the driver had set going, its activation
    /// from where its rings were.
    pub fn restore(&mut self, st: &CommonState) -> Result<(), String> {
        let n = self.queues.len();
        if st.queues.len() != n || st.live.as_ref().is_some_and(|l| l.len() != n) {
            return Err(format!(
                "the snapshot has {} queues for a device with {n}",
                st.queues.len()
            ));
        }
        let queue = |q: &QueueState| {
            Queue::try_from(*q).map_err(|e| format!("a queue of the snapshot is invalid: {e:?}"))
        };
        self.queues = st.queues.iter().map(queue).collect::<Result<_, _>>()?;
        self.device_features_sel = st.device_features_sel;
        self.driver_features_sel = st.driver_features_sel;
        self.acked_features = st.acked_features;
        self.queue_sel = st.queue_sel;
        self.status = st.status;
        self.config_generation = st.config_generation;
        self.interrupt.ack(u32::MAX);
        if st.interrupt_status != 0 {
            self.interrupt.set_status_bits(st.interrupt_status);
        }
        if let Some(live) = &st.live {
            let activation = Activation {
                mem: self.mem.clone(),
                queues: live.iter().map(queue).collect::<Result<_, _>>()?,
                interrupt: self.interrupt.clone(),
                acked_features: self.acked_features,
            };
            self.device()
                .activate(activation)
                .map_err(|e| format!("the device does not take its restored queues: {e}"))?;
        }
        Ok(())
    }

    /// After a restore: every queue of an active device gets a notification and the driver
    /// an interrupt, so nothing waits on one lost with the old process.
    pub fn kick(&self) {
        if self.status & STATUS_DRIVER_OK == 0 {
            return;
        }
        let dev = self.device();
        for (i, evt) in dev.queue_events().iter().enumerate() {
            let _ = evt.write(1);
            self.interrupt.signal_used_queue(i);
        }
    }

    /// Back to the state before the driver found the device (status 0 written).
    pub fn reset(&mut self) {
        debug!("{}: device reset", self.name);
        let mut dev = lock(&self.device);
        dev.reset();
        self.queues = new_queues(&*dev);
        drop(dev);
        self.interrupt.reset();
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.status = 0;
    }
}
