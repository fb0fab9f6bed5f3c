//! An address space (port I/O or MMIO) mapping ranges to devices.
//!
//! Devices see offsets from the start of their range, never absolute addresses, so the same
//! device model can sit at any port or slot. The bus is filled while the VM is built and is
//! immutable once vCPUs run, so lookups take no lock; each device has its own mutex.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::metrics::{DeviceMetrics, Space};

/// A device reachable through a bus.
pub trait BusDevice: Send {
    /// Reads `data.len()` bytes at `offset` within the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` within the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
    /// For a device that forwards accesses to others (a PCI I/O window): the counters of
    /// the device that served the last access.
    fn served_by(&self) -> Option<Arc<DeviceMetrics>> {
        None
    }
}

/// Errors building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("Failed to map a device at {base:#x}+{len:#x}: it overlaps the device at {other_base:#x}+{other_len:#x}")]
    Overlap {
        base: u64,
        len: u64,
        other_base: u64,
        other_len: u64,
    },
    #[error("Failed to map a device at {base:#x}: an empty or wrapping range of {len:#x} bytes")]
    BadRange { base: u64, len: u64 },
}

/// A shared, lockable device as the bus holds it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
    metrics: Option<Arc<DeviceMetrics>>,
}

/// Address ranges to devices.
#[derive(Clone)]
pub struct Bus {
    space: Space,
    // Keyed by base address; ranges never overlap, so the entry with the greatest base <= addr
    // is the only candidate for addr.
    ranges: BTreeMap<u64, Entry>,
}

impl Default for Bus {
    fn default() -> Self {
        Self::new(Space::Pio)
    }
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ranges.iter().map(|(b, e)| (*b, e.len)))
            .finish()
    }
}

impl Bus {
    /// An empty bus for `space` (which the exit counts are filed under).
    pub fn new(space: Space) -> Self {
        Self {
            space,
            ranges: BTreeMap::new(),
        }
    }

    /// Maps `device` at `[base, base + len)`; overlapping an existing range is an error.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        self.insert_metered(device, base, len, None)
    }

    /// Like `insert`, counting every exit the range causes in `metrics`.
    pub fn insert_metered(
        &mut self,
        device: SharedDevice,
        base: u64,
        len: u64,
        metrics: Option<Arc<DeviceMetrics>>,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        let clash = self
            .ranges
            .range(..end)
            .next_back()
            .filter(|(b, e)| **b + e.len > base);
        if let Some((other_base, other)) = clash {
            return Err(BusError::Overlap {
                base,
                len,
                other_base: *other_base,
                other_len: other.len,
            });
        }
        self.ranges.insert(
            base,
            Entry {
                len,
                device,
                metrics,
            },
        );
        Ok(())
    }

    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, &Entry)> {
        let (base, entry) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        // An access must lie wholly inside one device.
        (offset + size as u64 <= entry.len).then_some((offset, entry))
    }

    /// Dispatches a read; returns false (leaving `data` as all ones, like a floating bus)
    /// when no device claims the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let size = data.len();
        self.read_string(addr, size, data)
    }

    /// Dispatches a write; returns false when no device claims the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        self.write_string(addr, data.len(), data)
    }

    /// Dispatches one exit of string port I/O (`rep insw` and the like, which KVM batches
    /// into one exit): `data.len() / size` reads of `size` bytes at the same address.
    pub fn read_string(&self, addr: u64, size: usize, data: &mut [u8]) -> bool {
        let Some((offset, entry)) = self.resolve(addr, size.max(1)) else {
            data.fill(0xff);
            return false;
        };
        let start = Instant::now();
        let mut dev = lock(&entry.device);
        for chunk in data.chunks_mut(size.max(1)) {
            dev.read(offset, chunk);
        }
        let served_by = dev.served_by();
        drop(dev);
        self.record(entry, served_by, addr, false, start);
        true
    }

    /// Dispatches one exit of string port I/O: `data.len() / size` writes at `addr`.
    pub fn write_string(&self, addr: u64, size: usize, data: &[u8]) -> bool {
        let Some((offset, entry)) = self.resolve(addr, size.max(1)) else {
            return false;
        };
        let start = Instant::now();
        let mut dev = lock(&entry.device);
        for chunk in data.chunks(size.max(1)) {
            dev.write(offset, chunk);
        }
        let served_by = dev.served_by();
        drop(dev);
        self.record(entry, served_by, addr, true, start);
        true
    }

    /// Applies a write KVM coalesced (no exit happened): dispatched like a write, counted
    /// as coalesced, not as an exit.
    pub fn write_coalesced(&self, addr: u64, data: &[u8]) -> bool {
        let Some((offset, entry)) = self.resolve(addr, data.len()) else {
            return false;
        };
        let mut dev = lock(&entry.device);
        dev.write(offset, data);
        let served_by = dev.served_by();
        drop(dev);
        if let Some(m) = entry.metrics.as_ref().or(served_by.as_ref()) {
            m.add_coalesced();
        }
        true
    }

    fn record(
        &self,
        entry: &Entry,
        served_by: Option<Arc<DeviceMetrics>>,
        addr: u64,
        write: bool,
        start: Instant,
    ) {
        let metrics = entry.metrics.as_ref().or(served_by.as_ref());
        if let Some(m) = metrics {
            m.record_exit(self.space, addr, write, start.elapsed());
        }
    }
}

/// Locks a device even if a previous holder panicked: device state is plain data and a
/// poisoned lock must not take the whole VM down with it.
fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records accesses and answers reads with the low byte of the offset.
    #[derive(Default)]
    struct Probe {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    fn probe() -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe::default()))
    }

    #[test]
    fn devices_see_offsets() {
        let mut bus = Bus::default();
        let p = probe();
        bus.insert(p.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b[0], 5);
        assert!(bus.write(0x3f8, &[0x41]));
        assert_eq!(p.lock().unwrap().writes, vec![(0, vec![0x41])]);
    }

    #[test]
    fn unmapped_reads_float_high() {
        let mut bus = Bus::default();
        bus.insert(probe(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 4];
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b, [0xff; 4]);
        assert!(!bus.read(0x3f7, &mut b[..1]));
        assert!(!bus.write(0x3f0, &[1]));
    }

    #[test]
    fn access_straddling_the_end_is_unclaimed() {
        let mut bus = Bus::default();
        bus.insert(probe(), 0x1000, 0x10).unwrap();
        let mut b = [0u8; 4];
        assert!(bus.read(0x100c, &mut b));
        assert!(!bus.read(0x100e, &mut b));
    }

    #[test]
    fn overlaps_are_rejected() {
        let mut bus = Bus::default();
        bus.insert(probe(), 0x100, 0x10).unwrap();
        for (base, len) in [(0x100, 1), (0x10f, 4), (0xf8, 0x10), (0x0, 0x1000)] {
            let err = bus.insert(probe(), base, len).unwrap_err();
            assert!(
                matches!(
                    err,
                    BusError::Overlap {
                        other_base: 0x100,
                        ..
                    }
                ),
                "{base:#x}"
            );
        }
        // Adjacent on both sides is fine.
        bus.insert(probe(), 0xf0, 0x10).unwrap();
        bus.insert(probe(), 0x110, 0x10).unwrap();
    }

    #[test]
    fn string_io_is_one_exit_of_many_accesses() {
        let mut bus = Bus::new(Space::Pio);
        let p = probe();
        let m = Arc::new(DeviceMetrics::new("probe", "test", "test"));
        bus.insert_metered(p.clone(), 0x1f0, 8, Some(m.clone()))
            .unwrap();
        // rep outsw of 4 words: one exit, four 2-byte writes at the same register.
        assert!(bus.write_string(0x1f0, 2, &[1, 2, 3, 4, 5, 6, 7, 8]));
        let mut words = [0u8; 6];
        assert!(bus.read_string(0x1f2, 2, &mut words));
        assert_eq!(words, [2; 6]);
        assert!(bus.write(0x1f7, &[0xec]));
        let writes = &p.lock().unwrap().writes;
        assert_eq!(writes.len(), 5);
        assert_eq!(writes[3], (0, vec![7, 8]));
        assert_eq!(m.exits(), 3);
        let regs = m.registers();
        assert_eq!(regs[&(Space::Pio, 0x1f0)].writes, 1);
        assert_eq!(regs[&(Space::Pio, 0x1f2)].reads, 1);
        assert_eq!(regs[&(Space::Pio, 0x1f7)].writes, 1);
        assert_eq!(regs.len(), 3);
        // Unclaimed accesses count nowhere.
        assert!(!bus.read(0x1f8, &mut [0u8; 1]));
        assert_eq!(m.exits(), 3);
    }

    #[test]
    fn empty_and_wrapping_ranges_are_rejected() {
        let mut bus = Bus::default();
        assert!(matches!(
            bus.insert(probe(), 0x10, 0),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(probe(), u64::MAX, 2),
            Err(BusError::BadRange { .. })
        ));
    }
}
