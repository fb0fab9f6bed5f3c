//! Guest memory: anonymous host mappings laid out around the 32-bit MMIO gap.

use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// The guest memory type used throughout the VMM. Each region carries a dirty bitmap (one
/// bit per 4 KiB page) that every write through vm-memory sets, and that the VMM's own raw
/// writes set by hand (`devices::virtio::guest_write`): live migration ORs it with KVM's
/// dirty log, which sees only the guest's writes (`crate::migration::dirty`).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One region of guest memory.
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "Failed to map {mib} MiB of guest memory (the host refused the mapping: check free \
         memory and `ulimit -v`, or give a smaller --memory)"
    )]
    Map {
        mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// The guest-physical RAM ranges for `size` bytes of memory: everything below the MMIO gap,
/// the rest from 4 GiB up, so devices and the APICs can live at their usual addresses.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize),
        ]
    }
}

/// Maps `size` bytes of anonymous, private guest memory.
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    GuestMemoryMmap::from_ranges(&ram_ranges(size)).map_err(|source| MemoryError::Map {
        mib: size >> 20,
        source,
    })
}

/// Maps a snapshot's memory file copy-on-write (`MAP_PRIVATE`): each region `(guest
/// address, length, offset in the file)` reads its pages from the file as the guest touches
/// them (restoring reads nothing up front), and the guest's writes stay in this process.
pub fn map_snapshot_memory(
    file: &std::fs::File,
    regions: &[(GuestAddress, usize, u64)],
) -> Result<GuestMemoryMmap, SnapshotMemoryError> {
    let mut out = Vec::with_capacity(regions.len());
    for &(addr, len, offset) in regions {
        let fo =
            vm_memory::FileOffset::new(file.try_clone().map_err(SnapshotMemoryError::Dup)?, offset);
        let mapping = vm_memory::MmapRegion::build(
            Some(fo),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| SnapshotMemoryError::Map(e.to_string()))?;
        out.push(
            GuestRegionMmap::new(mapping, addr).ok_or_else(|| {
                SnapshotMemoryError::Map("a region past the address space".into())
            })?,
        );
    }
    GuestMemoryMmap::from_regions(out).map_err(|e| SnapshotMemoryError::Map(e.to_string()))
}

/// Errors mapping a snapshot's memory.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotMemoryError {
    #[error("Failed to duplicate the memory file's descriptor")]
    Dup(#[source] std::io::Error),
    #[error("Failed to map the snapshot's guest memory: {0}")]
    Map(String),
}

/// Sets the dirty bits of the pages `len` bytes at `addr` touch, for a write the VMM made
/// through a raw pointer (vm-memory's own writes set them already). Addresses outside guest
/// memory are ignored: nothing was written there.
pub fn mark_dirty(mem: &GuestMemoryMmap, addr: u64, len: u64) {
    let end = addr.saturating_add(len);
    let mut at = addr;
    while at < end {
        let Some(region) = mem.find_region(GuestAddress(at)) else {
            return;
        };
        let offset = at - region.start_addr().0;
        let n = (end - at).min(region.len() - offset);
        region.bitmap().mark_dirty(offset as usize, n as usize);
        at += n;
    }
}

/// End (exclusive) of the RAM below the MMIO gap: where boot data must live.
pub fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .next()
        .map(|r| r.start_addr().0 + r.len())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range() {
        let r = ram_ranges(256 << 20);
        assert_eq!(r, vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn memory_exactly_up_to_the_gap_is_one_range() {
        let r = ram_ranges(MMIO_GAP_START);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let size = 4u64 << 30;
        let r = ram_ranges(size);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(r[1].0, GuestAddress(MMIO_GAP_END));
        let total: usize = r.iter().map(|(_, l)| l).sum();
        assert_eq!(total as u64, size);
    }

    #[test]
    fn low_ram_end_is_end_of_first_region() {
        let mem = create_guest_memory(64 << 20).unwrap();
        assert_eq!(low_ram_end(&mem), 64 << 20);
    }
}
