//! Which guest pages changed: KVM's dirty log OR'ed with the VMM's own bitmap.
//!
//! KVM's log (`KVM_MEM_LOG_DIRTY_PAGES` on every slot, read and cleared by
//! `KVM_GET_DIRTY_LOG`) sees what the guest's vCPUs write, and what KVM itself writes into
//! guest memory on their behalf (kvmclock and steal-time pages, PV EOI, async page faults:
//! KVM marks those through `mark_page_dirty`). It does not see the VMM's writes: they are
//! plain stores through the VMM's own mapping. Those are in the dirty bitmap every guest
//! memory region carries (vm-memory's `AtomicBitmap`, see `vstate::memory`).
//!
//! Every path in the VMM that writes guest memory, and how it is tracked:
//! - virtio used rings, `used_event`/`avail_event`, and every device-writable buffer of the
//!   virtio devices (block reads, the GET_ID string and status bytes; net receive; console
//!   and multiport-console receive; virtio-fs's ENOTCONN replies): all through
//!   `devices::virtio::guest_write`, whose writes go through vm-memory (which marks their
//!   pages) or, for virtio-blk's `preadv` straight into guest buffers, are marked by hand in
//!   `GuestWriter::wrote`;
//! - the boot-time writes (kernel, initrd, zero page, ACPI and MP tables, page tables):
//!   through vm-memory, and long before any migration;
//! - snapshot restore maps memory from a file and writes nothing;
//! - the destination of a migration writes the pages it receives (tracking there is for a
//!   later migration and starts clean);
//! - the emulated bus masters (the e1000's receive buffers and descriptor write-backs, the
//!   IDE bus master's DMA reads): through `devices::emulated::dma` and a
//!   `GuestWriter::bus_master`, marked like the virtio writes (those devices are not in
//!   snapshots yet, so a VM with them is not migrated either);
//! - devices that write no guest memory: the IDE disk in PIO mode (its own sector buffer),
//!   the NE2000 (its ring is the card's RAM), the UARTs, the i8042, the ACPI PM block, PCI
//!   configuration space and MSI-X tables (VMM memory, not guest memory);
//! - not trackable here: a vhost-user backend (virtiofsd) writes guest memory from its own
//!   process, so a VM with virtio-fs is not migrated (`persist_refusal`).
//!
//! KVM's log is read-and-clear, and so is taking the VMM's bitmap: pages taken but not sent
//! when a migration fails are put back into the VMM's bitmap ([`Tracker::put_back`]), so a
//! later attempt's first full pass and any consumer of the bitmap still see them.

use std::sync::Arc;

use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::protocol::{PAGES_PER_RECORD, PAGE_SIZE};
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vm::{dirty_log, set_memory_slots, VmError};

/// A test knob: leave the VMM's bitmap out (`FERROVM_MIGRATION_TEST_NO_VMM_DIRTY=1`), so
/// the device writes made during a migration are lost: the RAM hash check must then fail.
pub const NO_VMM_DIRTY_ENV: &str = "FERROVM_MIGRATION_TEST_NO_VMM_DIRTY";

/// One bit per page, per memory region (region `i` is KVM slot `i`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyPages {
    /// Per region: its length in bytes and its bitmap (64 pages a word).
    regions: Vec<(u64, Vec<u64>)>,
}

impl DirtyPages {
    fn words(len: u64) -> usize {
        len.div_ceil(PAGE_SIZE).div_ceil(64) as usize
    }

    /// No page of `mem`.
    pub fn none(mem: &GuestMemoryMmap) -> Self {
        Self {
            regions: mem
                .iter()
                .map(|r| (r.len(), vec![0; Self::words(r.len())]))
                .collect(),
        }
    }

    /// Every page of `mem` (the first pass).
    pub fn all(mem: &GuestMemoryMmap) -> Self {
        let mut d = Self::none(mem);
        for (len, bits) in &mut d.regions {
            let pages = len.div_ceil(PAGE_SIZE);
            for p in 0..pages {
                bits[(p / 64) as usize] |= 1 << (p % 64);
            }
        }
        d
    }

    /// Adds the pages set in `bits` to region `region` (bits past its end are ignored).
    pub fn add(&mut self, region: usize, bits: &[u64]) {
        if let Some((_, mine)) = self.regions.get_mut(region) {
            for (m, b) in mine.iter_mut().zip(bits) {
                *m |= b;
            }
        }
    }

    /// Every page of `other` too.
    pub fn merge(&mut self, other: &DirtyPages) {
        for (i, (_, bits)) in other.regions.iter().enumerate() {
            self.add(i, bits);
        }
    }

    /// How many pages are set.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|(_, b)| b.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    pub fn bytes(&self) -> u64 {
        self.count() * PAGE_SIZE
    }

    /// The set pages as runs: (region, first page, pages), at most `PAGES_PER_RECORD` each.
    pub fn runs(&self) -> Vec<(usize, u64, u64)> {
        let mut out = Vec::new();
        for (r, (len, bits)) in self.regions.iter().enumerate() {
            let pages = len.div_ceil(PAGE_SIZE);
            let mut p = 0;
            while p < pages {
                let word = bits[(p / 64) as usize];
                if word == 0 && p.is_multiple_of(64) {
                    p += 64;
                    continue;
                }
                if word & (1 << (p % 64)) == 0 {
                    p += 1;
                    continue;
                }
                let start = p;
                while p < pages
                    && p - start < PAGES_PER_RECORD
                    && bits[(p / 64) as usize] & (1 << (p % 64)) != 0
                {
                    p += 1;
                }
                out.push((r, start, p - start));
            }
        }
        out
    }

    /// Region `r`'s bitmap.
    pub fn region_bits(&self, r: usize) -> &[u64] {
        &self.regions[r].1
    }
}

/// Dirty tracking of one VM's memory while a migration runs.
pub struct Tracker {
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    vmm_bits: bool,
}

impl Tracker {
    /// Turns KVM's dirty logging on for every slot and forgets what both logs held: from
    /// now on, every page written is reported.
    pub fn start(vm: Arc<VmFd>, mem: GuestMemoryMmap) -> Result<Self, VmError> {
        set_memory_slots(&vm, &mem, true)?;
        let vmm_bits = std::env::var(NO_VMM_DIRTY_ENV).as_deref() != Ok("1");
        if !vmm_bits {
            log::warn!(
                "{NO_VMM_DIRTY_ENV}=1: the VMM's own writes are not tracked (a test mode that loses them)"
            );
        }
        let t = Self { vm, mem, vmm_bits };
        t.take()?;
        Ok(t)
    }

    /// What was written since the last call (both logs are cleared).
    pub fn take(&self) -> Result<DirtyPages, VmError> {
        let mut d = DirtyPages::none(&self.mem);
        for (i, region) in self.mem.iter().enumerate() {
            let kvm = dirty_log(&self.vm, i as u32, region.len())?;
            d.add(i, &kvm);
            let vmm = std::ops::Deref::deref(region).bitmap().get_and_reset();
            if self.vmm_bits {
                d.add(i, &vmm);
            }
        }
        Ok(d)
    }

    /// Puts pages taken but not sent back into the VMM's bitmap (they are not lost when a
    /// migration fails).
    pub fn put_back(&self, pages: &DirtyPages) {
        put_back(&self.mem, pages);
    }

    /// Turns KVM's dirty logging off again.
    pub fn stop(&self) -> Result<(), VmError> {
        set_memory_slots(&self.vm, &self.mem, false)
    }
}

/// Sets `pages` in the VMM's bitmap of `mem`.
pub fn put_back(mem: &GuestMemoryMmap, pages: &DirtyPages) {
    for (i, region) in mem.iter().enumerate() {
        let bitmap = std::ops::Deref::deref(region).bitmap();
        for (w, word) in pages.region_bits(i).iter().enumerate() {
            let mut word = *word;
            while word != 0 {
                let b = word.trailing_zeros() as u64;
                word &= word - 1;
                bitmap.set_bit((w as u64 * 64 + b) as usize);
            }
        }
    }
}

/// A hash of all guest memory, region after region (the migration's test mode compares the
/// two sides' at the switch-over): std's SipHash with fixed keys, so two processes of one
/// ferrovm build agree. Not cryptographic: it catches lost writes.
pub fn ram_hash(mem: &GuestMemoryMmap) -> String {
    use std::hash::Hasher;
    #[allow(deprecated)] // SipHasher: fixed keys and a fixed algorithm, unlike DefaultHasher.
    let mut h = std::hash::SipHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    for region in mem.iter() {
        h.write_u64(region.start_addr().0);
        let mut off = 0u64;
        while off < region.len() {
            let n = (region.len() - off).min(buf.len() as u64) as usize;
            let Ok(slice) = region.get_slice(vm_memory::MemoryRegionAddress(off), n) else {
                break;
            };
            slice.copy_to(&mut buf[..n]);
            h.write(&buf[..n]);
            off += n as u64;
        }
    }
    format!("{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn runs_cover_exactly_the_set_pages() {
        let m = mem();
        let mut d = DirtyPages::none(&m);
        assert_eq!(d.count(), 0);
        assert!(d.runs().is_empty());
        // Pages 1-3 and 70, and 255 (the last).
        d.add(0, &[0b1110, 1 << 6, 0, 1 << 63]);
        assert_eq!(d.count(), 5);
        assert_eq!(d.runs(), vec![(0, 1, 3), (0, 70, 1), (0, 255, 1)]);
        let all = DirtyPages::all(&m);
        assert_eq!(all.count(), 256);
        assert_eq!(all.runs(), vec![(0, 0, 256)]);
    }

    #[test]
    fn a_run_is_cut_at_the_record_size() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let runs = DirtyPages::all(&m).runs();
        assert_eq!(runs.len(), 8);
        assert!(runs.iter().all(|r| r.2 == PAGES_PER_RECORD));
    }

    #[test]
    fn vmm_writes_are_in_the_bitmap_and_can_be_put_back() {
        let m = mem();
        // Clear what creating the memory left.
        for r in m.iter() {
            std::ops::Deref::deref(r).bitmap().reset();
        }
        m.write_obj(0xdead_beef_u32, GuestAddress(0x5004)).unwrap();
        crate::vstate::memory::mark_dirty(&m, 0x9ff0, 0x20);
        let bits = std::ops::Deref::deref(m.iter().next().unwrap())
            .bitmap()
            .get_and_reset();
        let mut d = DirtyPages::none(&m);
        d.add(0, &bits);
        assert_eq!(d.runs(), vec![(0, 5, 1), (0, 9, 2)]);
        // Taken and cleared; put back, it is there again.
        put_back(&m, &d);
        let again = std::ops::Deref::deref(m.iter().next().unwrap())
            .bitmap()
            .get_and_reset();
        assert_eq!(again, bits);
    }

    #[test]
    fn the_ram_hash_sees_one_changed_byte() {
        let m = mem();
        let h0 = ram_hash(&m);
        assert_eq!(h0, ram_hash(&m));
        m.write_obj(1u8, GuestAddress(0xf_fff0)).unwrap();
        assert_ne!(h0, ram_hash(&m));
    }
}
