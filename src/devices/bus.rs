//! An address space (port I/O or MMIO) mapping ranges to devices.
//!
//! Devices see offsets from the start of their range, never absolute addresses, so the same
//! device model can sit at any port or slot. The bus is filled while the VM is built and is
//! immutable once vCPUs run, so lookups take no lock; each device has its own mutex.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through a bus.
pub trait BusDevice: Send {
    /// Reads `data.len()` bytes at `offset` within the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` within the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
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
}

/// Address ranges to devices.
#[derive(Clone, Default)]
pub struct Bus {
    // Keyed by base address; ranges never overlap, so the entry with the greatest base <= addr
    // is the only candidate for addr.
    ranges: BTreeMap<u64, Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ranges.iter().map(|(b, e)| (*b, e.len)))
            .finish()
    }
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` at `[base, base + len)`; overlapping an existing range is an error.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
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
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (base, entry) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        // An access must lie wholly inside one device.
        (offset + size as u64 <= entry.len).then_some((offset, &entry.device))
    }

    /// Dispatches a read; returns false (leaving `data` as all ones, like a floating bus)
    /// when no device claims the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false when no device claims the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
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
        let mut bus = Bus::new();
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
        let mut bus = Bus::new();
        bus.insert(probe(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 4];
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b, [0xff; 4]);
        assert!(!bus.read(0x3f7, &mut b[..1]));
        assert!(!bus.write(0x3f0, &[1]));
    }

    #[test]
    fn access_straddling_the_end_is_unclaimed() {
        let mut bus = Bus::new();
        bus.insert(probe(), 0x1000, 0x10).unwrap();
        let mut b = [0u8; 4];
        assert!(bus.read(0x100c, &mut b));
        assert!(!bus.read(0x100e, &mut b));
    }

    #[test]
    fn overlaps_are_rejected() {
        let mut bus = Bus::new();
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
    fn empty_and_wrapping_ranges_are_rejected() {
        let mut bus = Bus::new();
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
