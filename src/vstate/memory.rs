//! Guest memory: host mappings laid out around the 32-bit MMIO gap, either anonymous and
//! private (the default) or one memfd mapped shared, which another process (a vhost-user
//! backend such as virtiofsd) can map too.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};

use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

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
    #[error("Failed to create a memfd for {mib} MiB of shared guest memory")]
    Memfd {
        mib: u64,
        #[source]
        source: std::io::Error,
    },
}

/// How guest RAM is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryBacking {
    /// Anonymous private memory: only this process sees it.
    #[default]
    Private,
    /// One memfd mapped `MAP_SHARED`: what vhost-user backends map (the memfd goes to them in
    /// `VHOST_USER_SET_MEM_TABLE`), as QEMU's `memory-backend-memfd,share=on` does.
    Shared,
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
    create_guest_memory_with(size, MemoryBacking::Private)
}

/// Maps `size` bytes of guest memory backed as `backing` says. Shared memory is one memfd
/// of `size` bytes: the range below the MMIO gap at offset 0, the rest at the offset where
/// the first ends, so each guest byte has one place in the file (`guest_memfd` returns it).
pub fn create_guest_memory_with(
    size: u64,
    backing: MemoryBacking,
) -> Result<GuestMemoryMmap, MemoryError> {
    let mib = size >> 20;
    let ranges = ram_ranges(size);
    let files: Vec<Option<FileOffset>> = match backing {
        MemoryBacking::Private => vec![None; ranges.len()],
        MemoryBacking::Shared => {
            let memfd = create_memfd(size).map_err(|source| MemoryError::Memfd { mib, source })?;
            let mut offset = 0u64;
            let mut files = Vec::with_capacity(ranges.len());
            for (_, len) in &ranges {
                let f = memfd
                    .try_clone()
                    .map_err(|source| MemoryError::Memfd { mib, source })?;
                files.push(Some(FileOffset::new(f, offset)));
                offset += *len as u64;
            }
            files
        }
    };
    GuestMemoryMmap::from_ranges_with_files(
        ranges
            .into_iter()
            .zip(files)
            .map(|((addr, len), file)| (addr, len, file)),
    )
    .map_err(|source| MemoryError::Map { mib, source })
}

/// A memfd of `size` bytes, close-on-exec; its pages are allocated as the guest touches them.
fn create_memfd(size: u64) -> std::io::Result<File> {
    // SAFETY: the name is a NUL-terminated string that outlives the call; the flags are
    // valid; the return value is checked before it is used as an fd.
    let fd = unsafe { libc::memfd_create(c"ferrovm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create just returned this fd, which nothing else owns.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size)?;
    Ok(file)
}

/// The memfd behind shared guest memory (None for private memory): what a vhost-user
/// backend maps, and what a migration would hand over.
pub fn guest_memfd(mem: &GuestMemoryMmap) -> Option<&File> {
    mem.iter()
        .next()
        .and_then(|r| r.file_offset())
        .map(|f| f.file())
}

/// Maps a snapshot's memory file copy-on-write (`MAP_PRIVATE`): each region `(guest
/// address, length, offset in the file)` reads its pages from the file as the guest touches
/// them (restoring reads nothing up front), and the guest's writes stay in this process.
pub fn map_snapshot_memory(
    file: &std::fs::File,
    regions: &[(GuestAddress, usize, u64)],
) -> Result<GuestMemoryMmap, SnapshotMemoryError> {
    map_file_memory(file, regions, false)
}

/// Maps guest memory from `file`, each region `(guest address, length, offset in the file)`:
/// copy-on-write (a snapshot), or `shared` (a memfd another VMM process handed over: local
/// migration, where both processes see the same pages).
pub fn map_file_memory(
    file: &std::fs::File,
    regions: &[(GuestAddress, usize, u64)],
    shared: bool,
) -> Result<GuestMemoryMmap, SnapshotMemoryError> {
    let flags = if shared {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE | libc::MAP_NORESERVE
    };
    let mut out = Vec::with_capacity(regions.len());
    for &(addr, len, offset) in regions {
        let fo =
            vm_memory::FileOffset::new(file.try_clone().map_err(SnapshotMemoryError::Dup)?, offset);
        let mapping =
            vm_memory::MmapRegion::build(Some(fo), len, libc::PROT_READ | libc::PROT_WRITE, flags)
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

/// Calls `f` with the `len` bytes at `offset` of `region`, read where they are mapped rather
/// than copied out first: for scanning RAM for zero pages (snapshots, live migration), where
/// a copy of all of RAM cost as much again as the scan (in the nested sandbox, whose TCG
/// runs glibc's `rep movsb` byte by byte, it was most of a 256 MiB pass). None when the
/// range is not inside the region. The guest may write these bytes meanwhile, as it may
/// during a copy: the scan sees old or new values, and the dirty log (migration) or the
/// paused vCPUs (snapshots) make up for it.
pub fn read_in_place<R>(
    region: &GuestRegionMmap,
    offset: u64,
    len: usize,
    f: impl FnOnce(&[u8]) -> R,
) -> Option<R> {
    bytes_in_place(region, offset, len).map(f)
}

/// The `len` bytes at `offset` of `region` as they are mapped, for as long as `region` is
/// borrowed (see `read_in_place`): live migration hands them to `writev`.
pub fn bytes_in_place(region: &GuestRegionMmap, offset: u64, len: usize) -> Option<&[u8]> {
    let end = offset.checked_add(len as u64)?;
    if len == 0 {
        return Some(&[]);
    }
    if end > region.len() {
        return None;
    }
    let ptr = region
        .get_host_address(vm_memory::MemoryRegionAddress(offset))
        .ok()?;
    // SAFETY: `ptr` is the host address of `offset` in the region's mapping, which is
    // `region.len()` bytes long and stays mapped while `region` is borrowed, which the
    // returned slice's lifetime is tied to; `offset + len` was checked to be within it.
    // Bytes the guest (a vCPU or the VMM's device threads) changes meanwhile are read as
    // either value, never out of bounds.
    Some(unsafe { std::slice::from_raw_parts(ptr as *const u8, len) })
}

/// Whether a page of guest memory (or the tail of one, at most 4 KiB) is all zeros: a
/// comparison with a zero page, which is the C library's vectorized memcmp (fast in a
/// debug build, and under TCG, too), for the snapshot's holes and migration's zero pages.
pub fn is_zero_page(bytes: &[u8]) -> bool {
    static ZERO: [u8; 4096] = [0; 4096];
    bytes == &ZERO[..bytes.len()]
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
    fn memory_is_read_in_place_inside_its_region_only() {
        use vm_memory::Bytes;
        let mem = create_guest_memory(16 << 20).unwrap();
        mem.write_slice(b"ferrovm", GuestAddress(0x5000)).unwrap();
        let region = mem.iter().next().unwrap();
        let got = read_in_place(region, 0x5000, 7, |b| b.to_vec()).unwrap();
        assert_eq!(got, b"ferrovm");
        let len = region.len();
        assert_eq!(read_in_place(region, len - 4, 4, |b| b.len()), Some(4));
        assert_eq!(
            read_in_place(region, len - 4, 5, |b| b.len()),
            None,
            "past the end"
        );
        assert_eq!(
            read_in_place(region, u64::MAX, 2, |b| b.len()),
            None,
            "overflow"
        );
        assert_eq!(read_in_place(region, len + 10, 0, |b| b.len()), Some(0));
    }

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
    fn shared_memory_is_one_memfd_seen_through_every_mapping() {
        use std::os::unix::fs::FileExt;
        use vm_memory::Bytes;
        let size = MMIO_GAP_START + (16 << 20);
        let mem = create_guest_memory_with(size, MemoryBacking::Shared).unwrap();
        let memfd = guest_memfd(&mem).expect("a memfd");
        assert_eq!(memfd.metadata().unwrap().len(), size);
        // Every region maps the same file, one after the other.
        let offsets: Vec<u64> = mem
            .iter()
            .map(|r| r.file_offset().unwrap().start())
            .collect();
        assert_eq!(offsets, vec![0, MMIO_GAP_START]);
        // A guest write is in the file (MAP_SHARED), at its place: above 4 GiB the file
        // continues where the low range ends.
        mem.write_obj(0x1234_5678u32, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0xdead_beefu32, GuestAddress(MMIO_GAP_END + 8))
            .unwrap();
        let mut b = [0u8; 4];
        memfd.read_exact_at(&mut b, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0x1234_5678);
        memfd.read_exact_at(&mut b, MMIO_GAP_START + 8).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0xdead_beef);
        // And a write to the file (what the backend does) is what the guest reads.
        memfd.write_all_at(&7u32.to_le_bytes(), 0x2000).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x2000)).unwrap(), 7);
    }

    #[test]
    fn private_memory_has_no_memfd() {
        let mem = create_guest_memory(16 << 20).unwrap();
        assert!(guest_memfd(&mem).is_none());
    }

    #[test]
    fn low_ram_end_is_end_of_first_region() {
        let mem = create_guest_memory(64 << 20).unwrap();
        assert_eq!(low_ram_end(&mem), 64 << 20);
    }
}
