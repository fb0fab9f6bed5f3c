//! What every virtio device shares: the device trait the MMIO transport drives, the
//! interrupt status both sides touch, the activation hand-off from the vCPU thread to the
//! event loop, and the descriptor chain reader that refuses chains a guest made loop.

use std::io;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::Arc;

use log::error;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::guest_write::GuestWriter;
use crate::devices::metrics::DeviceMetrics;
use crate::devices::pci::msix::MsixTable;
use crate::vstate::memory::GuestMemoryMmap;

/// Feature bits every device here offers (virtio 1.x, section 6).
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Used/avail event indices, which let both sides suppress most notifications.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Interrupt status bits: virtio-mmio's InterruptStatus (virtio 1.x, 4.2.2) and
/// virtio-pci's ISR status (4.1.4.5) have the same two.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x1;
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x2;
/// "No MSI-X vector" for a queue or the configuration change (virtio 1.x, 4.1.5.1.2).
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the device expects {expected} queues, the driver set up {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("failed to signal activation to the event loop")]
    EventFd(#[source] io::Error),
    #[error("{0}")]
    Backend(String),
}

/// A virtio device as the MMIO transport sees it.
pub trait VirtioDevice: Send {
    /// The virtio device id (1 net, 2 block, 3 console).
    fn device_type(&self) -> u32;
    /// Largest size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver.
    fn avail_features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (ignored unless a device has writable
    /// fields).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::warn!(
            "virtio device {}: ignored {}-byte config write at {offset:#x}",
            self.device_type(),
            data.len()
        );
    }
    /// The eventfds KVM signals when the guest notifies each queue (ioeventfds).
    fn queue_events(&self) -> &[EventFd];
    /// Takes over the queues after DRIVER_OK. Runs on a vCPU thread: the device records what
    /// it needs and hands the rest to the event loop.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Returns to the state before activation (the driver wrote 0 to Status).
    fn reset(&mut self);
    /// The live state of the queues while activated: where the device got to in each ring
    /// (for snapshots; the transport's copies only hold what the driver configured).
    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>>;
    /// Finishes the requests the device has in flight (handed to I/O threads) before a
    /// snapshot; the default has none.
    fn quiesce(&mut self) {}
    /// Why the device's state cannot go into a snapshot or a migration, when it cannot.
    fn persist_refusal(&self) -> Option<&'static str> {
        None
    }
}

/// Everything a device receives when the driver sets DRIVER_OK.
pub struct Activation {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub interrupt: Arc<VirtioInterrupt>,
    pub acked_features: u64,
}

/// How a virtio device interrupts its driver, whatever the transport: the interrupt line
/// (virtio-mmio's, or virtio-pci's INTx) with its status register, which the transport
/// reads and acknowledges, and for virtio-pci the MSI-X vectors the driver assigned. The
/// device raises it from the event loop or an I/O thread without taking the transport's
/// lock. It also carries the device's counters, which the device picks up when activated.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    irq_evt: EventFd,
    metrics: Arc<DeviceMetrics>,
    msix: Option<MsixVectors>,
}

/// The MSI-X side of a virtio-pci device's interrupt: its table, and the vector the driver
/// gave the configuration change and each queue (virtio 1.x, 4.1.4.3: `config_msix_vector`,
/// `queue_msix_vector`).
pub struct MsixVectors {
    pub table: Arc<MsixTable>,
    config: AtomicU16,
    queues: Vec<AtomicU16>,
}

impl std::fmt::Debug for MsixVectors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsixVectors")
            .field("vectors", &self.table.len())
            .finish()
    }
}

impl MsixVectors {
    /// `table` for a device with `queues` queues, every vector unassigned.
    pub fn new(table: Arc<MsixTable>, queues: usize) -> Self {
        Self {
            table,
            config: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queues: (0..queues)
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
        }
    }
}

impl VirtioInterrupt {
    pub fn new(irq_evt: EventFd) -> Self {
        Self::with_metrics(irq_evt, DeviceMetrics::unnamed())
    }

    pub fn with_metrics(irq_evt: EventFd, metrics: Arc<DeviceMetrics>) -> Self {
        Self {
            status: AtomicU32::new(0),
            irq_evt,
            metrics,
            msix: None,
        }
    }

    /// The same with MSI-X vectors (virtio-pci); `irq_evt` is then the INTx fallback.
    pub fn with_msix(irq_evt: EventFd, metrics: Arc<DeviceMetrics>, msix: MsixVectors) -> Self {
        Self {
            msix: Some(msix),
            ..Self::with_metrics(irq_evt, metrics)
        }
    }

    /// The counters of the device this line belongs to.
    pub fn metrics(&self) -> &Arc<DeviceMetrics> {
        &self.metrics
    }

    /// The MSI-X table, for virtio-pci.
    pub fn msix_table(&self) -> Option<&Arc<MsixTable>> {
        self.msix.as_ref().map(|m| &m.table)
    }

    /// Raises the interrupt for status `bit`: through MSI-X `vector` while the driver has
    /// MSI-X enabled (no interrupt for NO_VECTOR, 4.1.5.1.2), else on the line.
    fn raise(&self, bit: u32, vector: Option<&AtomicU16>) {
        if let Some(msix) = &self.msix {
            if msix.table.enabled() {
                let v = vector.map_or(VIRTIO_MSI_NO_VECTOR, |v| v.load(Ordering::SeqCst));
                if v != VIRTIO_MSI_NO_VECTOR {
                    self.metrics.add_interrupt();
                    msix.table.trigger(usize::from(v));
                }
                return;
            }
        }
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.metrics.add_interrupt();
        if let Err(e) = self.irq_evt.write(1) {
            error!("virtio: failed to raise the interrupt: {e}");
        }
    }

    /// Tells the driver there are new entries in used ring `queue`.
    pub fn signal_used_queue(&self, queue: usize) {
        let vector = self.msix.as_ref().and_then(|m| m.queues.get(queue));
        self.raise(VIRTIO_MMIO_INT_VRING, vector);
    }

    /// Tells the driver the configuration space (or device status) changed.
    pub fn signal_config_change(&self) {
        let vector = self.msix.as_ref().map(|m| &m.config);
        self.raise(VIRTIO_MMIO_INT_CONFIG, vector);
    }

    /// The MSI-X vector of the configuration change (NO_VECTOR without MSI-X).
    pub fn config_vector(&self) -> u16 {
        self.msix
            .as_ref()
            .map_or(VIRTIO_MSI_NO_VECTOR, |m| m.config.load(Ordering::SeqCst))
    }

    /// The MSI-X vector of `queue`.
    pub fn queue_vector(&self, queue: usize) -> u16 {
        self.msix
            .as_ref()
            .and_then(|m| m.queues.get(queue))
            .map_or(VIRTIO_MSI_NO_VECTOR, |v| v.load(Ordering::SeqCst))
    }

    /// Assigns the configuration change's vector; returns what the register reads back:
    /// the vector, or NO_VECTOR if the table has no such entry (4.1.5.1.2: the device
    /// answers NO_VECTOR to a vector it cannot use).
    pub fn set_config_vector(&self, v: u16) -> u16 {
        match &self.msix {
            Some(m) => {
                let v = Self::usable(m, v);
                m.config.store(v, Ordering::SeqCst);
                v
            }
            None => VIRTIO_MSI_NO_VECTOR,
        }
    }

    /// Assigns `queue`'s vector; returns what the register reads back.
    pub fn set_queue_vector(&self, queue: usize, v: u16) -> u16 {
        match self
            .msix
            .as_ref()
            .and_then(|m| m.queues.get(queue).map(|q| (m, q)))
        {
            Some((m, q)) => {
                let v = Self::usable(m, v);
                q.store(v, Ordering::SeqCst);
                v
            }
            None => VIRTIO_MSI_NO_VECTOR,
        }
    }

    fn usable(m: &MsixVectors, v: u16) -> u16 {
        if usize::from(v) < m.table.len() {
            v
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    /// The MSI-X vectors assigned: configuration change, then each queue (virtio-pci).
    pub fn vectors(&self) -> Option<(u16, Vec<u16>)> {
        self.msix.as_ref().map(|m| {
            (
                m.config.load(Ordering::SeqCst),
                m.queues.iter().map(|q| q.load(Ordering::SeqCst)).collect(),
            )
        })
    }

    /// Puts back the vectors `vectors` returned.
    pub fn restore_vectors(&self, config: u16, queues: &[u16]) -> Result<(), String> {
        let m = self
            .msix
            .as_ref()
            .ok_or("the snapshot has MSI-X vectors for a device without MSI-X")?;
        if queues.len() != m.queues.len() {
            return Err(format!(
                "the snapshot has vectors for {} queues, the device has {}",
                queues.len(),
                m.queues.len()
            ));
        }
        m.config.store(config, Ordering::SeqCst);
        for (q, &v) in m.queues.iter().zip(queues) {
            q.store(v, Ordering::SeqCst);
        }
        Ok(())
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// A read of virtio-pci's ISR status: the bits, cleared by the read (4.1.4.5.1).
    pub fn take_status(&self) -> u32 {
        self.status.swap(0, Ordering::SeqCst)
    }

    /// Sets status bits without raising the line (a restored snapshot's pending bits).
    pub fn set_status_bits(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
    }

    /// A write to InterruptACK clears the given bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears everything (device reset), including the vector assignments.
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        if let Some(m) = &self.msix {
            m.config.store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
            for q in &m.queues {
                q.store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
            }
        }
    }
}

/// Clears a queue's ioeventfd; its counter is the number of notifications KVM handled for
/// the guest since the last read, each one a VM exit that never reached userspace.
pub fn take_notifications(evt: &EventFd, metrics: &DeviceMetrics) {
    if let Ok(n) = evt.read() {
        metrics.add_notifications(n);
    }
}

/// What is wrong with a descriptor chain as a whole.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor chain loops, or is longer than the queue ({0} descriptors) or 4 GiB")]
    TooLong(u16),
    #[error("empty descriptor chain")]
    Empty,
}

/// Reads a whole chain. virtio-queue stops yielding after `queue size` descriptors or 4 GiB
/// of buffers; a last descriptor that still says NEXT means the guest built a loop or an
/// over-long chain (virtio 1.x 2.7.5.3.1: a chain must not be longer than the queue; 1.2
/// 2.7.5.2: nor than 2^32 bytes).
pub fn read_chain<M>(
    chain: DescriptorChain<M>,
    queue_size: u16,
) -> Result<Vec<Descriptor>, ChainError>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let descs: Vec<Descriptor> = chain.collect();
    match descs.last() {
        None => Err(ChainError::Empty),
        Some(last) if last.has_next() => Err(ChainError::TooLong(queue_size)),
        Some(_) => Ok(descs),
    }
}

/// The state of a device between activation and reset, common to all devices.
pub struct DeviceState {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    /// The only way to write guest memory for each queue (see `guest_write`).
    pub writers: Vec<GuestWriter>,
    pub interrupt: Arc<VirtioInterrupt>,
    pub acked_features: u64,
}

impl DeviceState {
    /// Checks the queue count and takes the activation.
    pub fn from_activation(a: Activation, expected_queues: usize) -> Result<Self, ActivateError> {
        if a.queues.len() != expected_queues {
            return Err(ActivateError::QueueCount {
                expected: expected_queues,
                got: a.queues.len(),
            });
        }
        let name = match a.interrupt.metrics().name.as_str() {
            "" => "virtio device",
            name => name,
        };
        Ok(Self {
            writers: GuestWriter::for_queues(&a.mem, name, &a.queues),
            mem: a.mem,
            queues: a.queues,
            interrupt: a.interrupt,
            acked_features: a.acked_features,
        })
    }

    /// Signals the driver if the queue's notification suppression allows it.
    pub fn notify_if_needed(&mut self, queue: usize) {
        if wants_interrupt(&mut self.queues[queue], &self.mem) {
            self.interrupt.signal_used_queue(queue);
        }
    }
}

/// Re-enables notifications after a drain of `popped` chains; returns whether to drain
/// again because more chains arrived meanwhile. A chain can legitimately arrive between the
/// last pop and the re-arm, so an empty drain followed by "more" is drained again, but only
/// a few times in a row (`empty_rounds`, kept by the caller across drains): an available
/// index the queue refuses to walk (the driver claiming more entries than the queue holds)
/// also reads as "more", and draining again would pop nothing, forever. That stops here,
/// with a warning.
pub fn rearm_notification(
    queue: &mut Queue,
    writer: &GuestWriter,
    popped: usize,
    empty_rounds: &mut u32,
    name: &str,
) -> bool {
    /// Empty drains in a row that are still taken for a race with the driver.
    const RACE_ROUNDS: u32 = 3;
    match writer.enable_notification(queue) {
        Ok(true) if popped > 0 => {
            *empty_rounds = 0;
            true
        }
        Ok(true) if *empty_rounds < RACE_ROUNDS => {
            *empty_rounds += 1;
            true
        }
        Ok(true) => {
            log::warn!("{name}: the available ring index is invalid; queue ignored until the next notification");
            *empty_rounds = 0;
            false
        }
        Ok(false) => {
            *empty_rounds = 0;
            false
        }
        Err(e) => {
            log::warn!("{name}: cannot re-enable notifications: {e}");
            false
        }
    }
}

/// Whether the driver wants an interrupt for what was added to the used ring since the last
/// call (virtio 1.x "Used Buffer Notification Suppression": `used_event` with EVENT_IDX,
/// else always); when the ring cannot be read, yes.
pub fn wants_interrupt(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    queue.needs_notification(mem).unwrap_or_else(|e| {
        log::warn!("virtio: cannot read the used event of a queue: {e}; notifying");
        true
    })
}

#[cfg(test)]
pub(crate) mod test_utils {
    //! Guest memory and mock queues for device tests.

    use vm_memory::GuestAddress;

    use crate::vstate::memory::GuestMemoryMmap;

    /// Where test buffers go: above the mock queues, which virtio-queue lays out from 0.
    pub const DATA_START: u64 = 0x10_0000;
    /// Size of the test guest memory.
    pub const MEM_SIZE: u64 = 0x40_0000;

    /// 4 MiB of guest memory at address 0.
    pub fn guest_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_utils::guest_memory;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    const F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;

    #[test]
    fn interrupt_status_is_set_and_acked() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = VirtioInterrupt::new(evt.try_clone().unwrap());
        irq.signal_used_queue(0);
        irq.signal_config_change();
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(evt.read().unwrap(), 2);
        irq.ack(VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_CONFIG);
        irq.reset();
        assert_eq!(irq.status(), 0);
    }

    #[test]
    fn well_formed_chain_is_read_whole() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(0x10_1000, 16, F_NEXT, 1)),
            RawDescriptor::from(SplitDescriptor::new(0x10_2000, 512, F_NEXT, 2)),
            RawDescriptor::from(SplitDescriptor::new(0x10_3000, 1, 0, 0)),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        let got = read_chain(chain, 16).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[1].addr(), GuestAddress(0x10_2000));
    }

    #[test]
    fn looping_chain_is_refused() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 4);
        // 0 -> 1 -> 0 -> ...
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(0x10_1000, 16, F_NEXT, 1)),
            RawDescriptor::from(SplitDescriptor::new(0x10_2000, 16, F_NEXT, 0)),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        assert_eq!(read_chain(chain, 4).unwrap_err(), ChainError::TooLong(4));
    }
}
