//! DMA by the emulated bus masters (the e1000's descriptor rings and buffers, the IDE bus
//! master's PRD tables and sectors): the one place they read and write guest memory.
//!
//! Every access is checked against guest memory first and then done whole or not at all, so
//! a descriptor or PRD pointing outside the guest's RAM (or straddling its end) changes
//! nothing and the device reports the hardware's error instead. Every write into guest
//! memory by these devices goes through [`write`] or [`disk_to_guest`], with a
//! `ChainWriter` of the device's `GuestWriter::bus_master` saying what the transfer may
//! write: the virtio devices' choke point (`devices::virtio::guest_write`), where the write
//! guard checks each write and the dirty-page log (live migration) marks it.

use std::io;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::devices::disk::{BlockBackend, GuestBuf};
use crate::devices::virtio::guest_write::ChainWriter;
use crate::vstate::memory::GuestMemoryMmap;

/// Whether `[addr, addr + len)` lies in guest RAM.
pub fn in_guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> bool {
    len == 0 || mem.check_range(GuestAddress(addr), len)
}

/// Writes `data` at guest address `addr` through `dst`; false (nothing written) outside
/// guest memory.
pub fn write(dst: &ChainWriter, addr: u64, data: &[u8]) -> bool {
    if data.is_empty() {
        return true;
    }
    in_guest(dst.mem(), addr, data.len()) && dst.write_slice(data, GuestAddress(addr)).is_ok()
}

/// Reads `buf.len()` bytes at guest address `addr`; false outside guest memory.
pub fn read(mem: &GuestMemoryMmap, addr: u64, buf: &mut [u8]) -> bool {
    buf.is_empty()
        || in_guest(mem, addr, buf.len()) && mem.read_slice(buf, GuestAddress(addr)).is_ok()
}

/// Reads the disk at `offset` into the guest buffers `bufs` (one `preadv` for a raw image)
/// through `dst`; the caller has checked they lie in guest memory.
pub fn disk_to_guest(
    disk: &mut dyn BlockBackend,
    dst: &ChainWriter,
    bufs: &[GuestBuf],
    offset: u64,
) -> io::Result<()> {
    disk.read_vectored_to(dst, bufs, offset)
}

/// Writes the guest buffers `bufs` to the disk at `offset` (one `pwritev`).
pub fn guest_to_disk(
    disk: &mut dyn BlockBackend,
    mem: &GuestMemoryMmap,
    bufs: &[GuestBuf],
    offset: u64,
) -> io::Result<()> {
    disk.write_vectored_from(mem, bufs, offset)
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::devices::virtio::guest_write::{ChainWrites, GuestWriter};

    /// Guest memory for device tests: one anonymous region of `len` bytes at 0.
    pub fn guest_memory(len: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)]).unwrap()
    }

    #[test]
    fn accesses_are_whole_or_nothing() {
        let mem = guest_memory(0x1000);
        let writer = GuestWriter::bus_master(mem.clone(), "test");
        let allowed = ChainWrites::buffers(&[(0, 0x1000), (0x1000, 16), (0x5000, 0)]);
        let w = writer.chain(&allowed);
        assert!(write(&w, 0xff0, &[1; 16]));
        assert!(!write(&w, 0xff8, &[2; 16]), "straddles the end");
        let mut b = [0u8; 16];
        assert!(read(&mem, 0xff0, &mut b));
        assert_eq!(b, [1; 16], "the refused write changed nothing");
        assert!(!read(&mem, 0x1000, &mut b));
        assert!(!write(&w, u64::MAX - 3, &[0; 8]), "wraps");
        assert!(write(&w, 0x5000, &[]), "an empty write is no access");
    }
}
