//! The one way a device writes guest memory, and the write guard that checks each write.
//!
//! A virtio device may write two things only: the device-writable buffers of the chain it
//! is serving (virtio 1.x, 2.7.4 "Message Framing": "the device MUST NOT write to a
//! device-readable buffer") and the used ring of that chain's queue (2.7.8, including
//! `used.flags` and `avail_event`, 2.7.10). Every write a device makes goes through a
//! [`GuestWriter`] (one per queue), with the chain's [`ChainWrites`] (what that chain
//! allows) for buffer writes. With the guard on, each write is compared with what the
//! descriptors allowed *before* it happens, and a write outside stops the VMM at once with a
//! message naming the device, the queue and the address: a VMM that writes where it should
//! not corrupts the guest's memory, which the guest then dies of far away from the cause.
//!
//! A chain's `ChainWrites` is moved into the call that puts it in the used ring: once the
//! driver has it back, nothing can write through it any more.
//!
//! Every writer, each through this module (a new one must be added here and use it):
//! - virtio-blk (`block.rs`): read data into the request's buffers, on the I/O threads,
//!   by `preadv` straight into their host mappings (`disk.rs`, through
//!   [`ChainWriter::write_raw`]) or by a backend's copy ([`ChainWriter::write_slice`]); the
//!   GET_ID string (event loop); the status byte and the used entry of every request (I/O
//!   threads, or the event loop for refused chains); notification suppression.
//! - virtio-net (`net.rs`): received frames scattered into receive buffers and the used
//!   entries of one frame published together ([`GuestWriter::add_used_together`]);
//!   transmit completions (used length 0); notification suppression of both queues.
//! - virtio-console (`console.rs`): host input copied into receive buffers; completions of
//!   both queues; notification suppression.
//! - the emulated bus masters, through `devices::emulated::dma` with a
//!   [`GuestWriter::bus_master`] each and [`ChainWrites::buffers`] for what one transfer may
//!   write: the e1000's received frames (into the buffers its receive descriptors give) and
//!   its descriptor write-backs (inside the ring), and the IDE bus master's DMA reads
//!   (`preadv` into the regions of the PRD table).
//!
//! What writes no guest memory, and so needs no guard: the IDE disk in PIO mode (through its
//! own sector buffer: `read_at`/`write_at` on host buffers), the NE2000 (its receive ring is the
//! card's own 16 KiB buffer, reached by the driver through the remote DMA data port), the
//! UARTs, the i8042 and PCI configuration space. The boot-time writes (kernel, initrd, zero
//! page, command line, MP table, GDT and page tables) happen before any vCPU runs.
//!
//! Dirty-page tracking (live migration) hooks in at [`GuestWriter::wrote`], which every
//! path calls after its write: copies through the `GuestMemoryMmap<AtomicBitmap>` mark
//! their pages themselves, the raw `preadv` path is marked there (`vstate::memory::
//! mark_dirty`). `crate::migration::dirty` lists every writer of guest memory, this module's
//! and the others.
//!
//! The guard is a test mode: `FERROVM_WRITE_GUARD=1` in the VMM's environment (the guest
//! tests set it for every VM), on in the unit tests and fuzz targets (where a violation
//! panics, for the harness to catch). Off, it costs one relaxed atomic load per write.

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::MS;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::devices::disk::{guest_io_error, GuestBuf};
use crate::vstate::memory::GuestMemoryMmap;

/// A host mapping of guest memory, as [`ChainWriter::write_raw`] hands it out.
pub type GuestSlice<'a> = vm_memory::VolatileSlice<'a, MS<'a, GuestMemoryMmap>>;

/// What the guard does with a write outside what the descriptors allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardMode {
    /// No checks.
    Off,
    /// Print the violation and abort the process (the VMM with FERROVM_WRITE_GUARD=1).
    Abort,
    /// Panic (unit tests and fuzz targets, whose harness catches it).
    Panic,
}

const MODE_UNSET: u8 = 0;
const MODE_OFF: u8 = 1;
const MODE_ABORT: u8 = 2;
const MODE_PANIC: u8 = 3;

static MODE: AtomicU8 = AtomicU8::new(MODE_UNSET);

/// The environment variable that turns the guard on in the VMM.
pub const WRITE_GUARD_ENV: &str = "FERROVM_WRITE_GUARD";

/// The guard's mode: set by [`set_guard_mode`], else from `FERROVM_WRITE_GUARD` (1: abort),
/// read once; on (panicking) in unit tests.
pub fn guard_mode() -> GuardMode {
    match MODE.load(Ordering::Relaxed) {
        MODE_OFF => GuardMode::Off,
        MODE_ABORT => GuardMode::Abort,
        MODE_PANIC => GuardMode::Panic,
        _ => {
            let mode = if cfg!(test) {
                GuardMode::Panic
            } else if std::env::var(WRITE_GUARD_ENV).as_deref() == Ok("1") {
                GuardMode::Abort
            } else {
                GuardMode::Off
            };
            set_guard_mode(mode);
            mode
        }
    }
}

/// Sets the guard's mode for the whole process.
pub fn set_guard_mode(mode: GuardMode) {
    let v = match mode {
        GuardMode::Off => MODE_OFF,
        GuardMode::Abort => MODE_ABORT,
        GuardMode::Panic => MODE_PANIC,
    };
    MODE.store(v, Ordering::Relaxed);
}

fn guard_on() -> bool {
    guard_mode() != GuardMode::Off
}

/// `len` bytes at `start`, as a range that cannot overflow (a guest may describe a buffer
/// that wraps; writing there fails in guest memory anyway).
fn span(start: u64, len: u64) -> Range<u64> {
    start..start.saturating_add(len)
}

/// What one descriptor chain lets the device write: its device-writable buffers. Kept only
/// while the guard is on (the head always).
#[derive(Debug)]
pub struct ChainWrites {
    head: u16,
    writable: Vec<Range<u64>>,
}

impl ChainWrites {
    /// The chain headed by `head` whose descriptors are `descs`.
    pub fn new(head: u16, descs: &[Descriptor]) -> Self {
        let writable = if guard_on() {
            descs
                .iter()
                .filter(|d| d.is_write_only())
                .map(|d| span(d.addr().0, u64::from(d.len())))
                .collect()
        } else {
            Vec::new()
        };
        Self { head, writable }
    }

    /// A chain the device did not read (it loops, or is refused before its buffers are
    /// looked at): it allows no write.
    pub fn unread(head: u16) -> Self {
        Self {
            head,
            writable: Vec::new(),
        }
    }

    /// What one transfer of an emulated bus master may write: the guest ranges (address,
    /// length) its descriptors give (receive buffers, a descriptor ring, PRD regions).
    pub fn buffers(ranges: &[(u64, u64)]) -> Self {
        let writable = if guard_on() {
            ranges.iter().map(|&(addr, len)| span(addr, len)).collect()
        } else {
            Vec::new()
        };
        Self { head: 0, writable }
    }

    /// The descriptor index the chain starts at, which its used entry names.
    pub fn head(&self) -> u16 {
        self.head
    }
}

/// One queue's writer: the device's only way to write guest memory for that queue.
#[derive(Clone, Debug)]
pub struct GuestWriter {
    mem: GuestMemoryMmap,
    device: Arc<str>,
    queue: usize,
    /// `struct virtq_used`: flags, idx, ring[size], avail_event (virtio 1.x, 2.7.8).
    used: Range<u64>,
}

/// Bytes before the used ring's first element: `flags` and `idx`.
const USED_HEADER_LEN: u64 = 4;
/// `struct virtq_used_elem { le32 id; le32 len; }`.
const USED_ELEM_LEN: u64 = 8;

impl GuestWriter {
    /// The writer of queue `index` of `device` (as the guest knows it: vda, eth0, hvc0), whose
    /// used ring is where `queue` says.
    pub fn new(mem: GuestMemoryMmap, device: &str, index: usize, queue: &Queue) -> Self {
        let size = u64::from(queue.size());
        Self {
            mem,
            device: device.into(),
            queue: index,
            used: span(
                queue.used_ring(),
                USED_HEADER_LEN + USED_ELEM_LEN * size + 2,
            ),
        }
    }

    /// The writer of an emulated bus master (an e1000, an IDE channel), `device` as the
    /// guest knows it: no queue and no used ring, every write it makes is a buffer write of
    /// a [`ChainWrites::buffers`].
    pub fn bus_master(mem: GuestMemoryMmap, device: &str) -> Self {
        Self {
            mem,
            device: device.into(),
            queue: 0,
            used: 0..0,
        }
    }

    /// One writer per queue, in queue order.
    pub fn for_queues(mem: &GuestMemoryMmap, device: &str, queues: &[Queue]) -> Vec<Self> {
        queues
            .iter()
            .enumerate()
            .map(|(i, q)| Self::new(mem.clone(), device, i, q))
            .collect()
    }

    /// Guest memory, for reading.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Writes into the buffers of `chain`.
    pub fn chain<'a>(&'a self, chain: &'a ChainWrites) -> ChainWriter<'a> {
        ChainWriter {
            writer: self,
            chain,
        }
    }

    /// Where every write lands, after it happened: the dirty-page tracking hook. Writes
    /// through vm-memory set their pages' dirty bits themselves; the raw `preadv` path
    /// ([`ChainWriter::write_raw`]) does not, so every write marks its pages here.
    #[inline]
    fn wrote(&self, addr: u64, len: u64) {
        crate::vstate::memory::mark_dirty(&self.mem, addr, len);
    }

    /// Stops everything when a write of `len` bytes at `addr` is outside `allowed` and the
    /// used ring (a `chain` of None: a used ring write).
    fn check(&self, chain: Option<&ChainWrites>, addr: u64, len: u64) {
        let mode = guard_mode();
        if mode == GuardMode::Off {
            return;
        }
        let write = span(addr, len);
        let inside = |r: &Range<u64>| r.start <= write.start && write.end <= r.end;
        let allowed = match chain {
            Some(c) => c.writable.iter().any(inside),
            None => inside(&self.used),
        };
        if allowed {
            return;
        }
        let what = match chain {
            Some(c) => {
                let bufs: Vec<String> = c
                    .writable
                    .iter()
                    .map(|r| format!("{:#x}+{:#x}", r.start, r.end - r.start))
                    .collect();
                format!(
                    "outside the device-writable buffers of chain {} ({})",
                    c.head,
                    if bufs.is_empty() {
                        "none".to_owned()
                    } else {
                        bufs.join(", ")
                    }
                )
            }
            None => "outside the queue's used ring".to_owned(),
        };
        let msg = format!(
            "write guard: {} queue {}: {len}-byte write at {addr:#x} is {what}; used ring {:#x}+{:#x}",
            self.device,
            self.queue,
            self.used.start,
            self.used.end - self.used.start
        );
        match mode {
            GuardMode::Panic => panic!("{msg}"),
            _ => {
                log::error!("{msg}");
                eprintln!("ferrovm: {msg}; stopping the VMM ({WRITE_GUARD_ENV}=1)");
                std::process::abort();
            }
        }
    }

    /// Checks a used-ring write of `len` bytes at `offset` into the ring `queue` describes.
    fn check_used(&self, queue: &Queue, offset: u64, len: u64) -> Result<u64, virtio_queue::Error> {
        let addr = queue
            .used_ring()
            .checked_add(offset)
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        self.check(None, addr, len);
        Ok(addr)
    }

    /// The used element `next_used + ahead` goes to, checked.
    fn used_slot(&self, queue: &Queue, ahead: u16) -> Result<u64, virtio_queue::Error> {
        let slot = u64::from(queue.next_used().wrapping_add(ahead) % queue.size());
        self.check_used(queue, USED_HEADER_LEN + USED_ELEM_LEN * slot, USED_ELEM_LEN)
    }

    /// Returns `chain` to the driver with `len` bytes written (virtio-queue writes the
    /// element and publishes the used index).
    pub fn add_used(
        &self,
        queue: &mut Queue,
        chain: ChainWrites,
        len: u32,
    ) -> Result<(), virtio_queue::Error> {
        self.add_used_head(queue, chain.head, len)
    }

    /// Returns a chain with nothing written into it: a transmit chain, or one refused.
    pub fn add_used_empty(&self, queue: &mut Queue, head: u16) -> Result<(), virtio_queue::Error> {
        self.add_used_head(queue, head, 0)
    }

    fn add_used_head(
        &self,
        queue: &mut Queue,
        head: u16,
        len: u32,
    ) -> Result<(), virtio_queue::Error> {
        if queue.size() == 0 {
            return Err(virtio_queue::Error::InvalidSize);
        }
        let elem = self.used_slot(queue, 0)?;
        let idx = self.check_used(queue, 2, 2)?;
        queue.add_used(&self.mem, head, len)?;
        self.wrote(elem, USED_ELEM_LEN);
        self.wrote(idx, 2);
        Ok(())
    }

    /// Returns the buffers of one frame to the driver so that it sees them together: a
    /// driver polling the used ring (Linux NAPI) that saw the first buffer of a frame before
    /// the others would count those as missing and drop the frame (virtio 1.x 5.1.6.4.2,
    /// `num_buffers`). virtio-queue publishes the used index on every `add_used`, so all but
    /// the last element are written here first, and the last `add_used` publishes them all
    /// (its index store has Release ordering).
    pub fn add_used_together(
        &self,
        queue: &mut Queue,
        entries: Vec<(ChainWrites, u32)>,
    ) -> Result<(), virtio_queue::Error> {
        let mut entries = entries;
        let Some((last, last_len)) = entries.pop() else {
            return Ok(());
        };
        let size = queue.size();
        if size == 0 {
            return Err(virtio_queue::Error::InvalidSize);
        }
        if last.head >= size || entries.iter().any(|(c, _)| c.head >= size) {
            return Err(virtio_queue::Error::InvalidDescriptorIndex);
        }
        for (i, (chain, len)) in entries.iter().enumerate() {
            let addr = self.used_slot(queue, i as u16)?;
            let mut elem = [0u8; USED_ELEM_LEN as usize];
            elem[..4].copy_from_slice(&u32::from(chain.head).to_le_bytes());
            elem[4..].copy_from_slice(&len.to_le_bytes());
            self.mem
                .write_slice(&elem, GuestAddress(addr))
                .map_err(virtio_queue::Error::GuestMemory)?;
            self.wrote(addr, USED_ELEM_LEN);
        }
        let next = queue.next_used();
        queue.set_next_used(next.wrapping_add(entries.len() as u16));
        self.add_used(queue, last, last_len)
    }

    /// Asks the driver to notify again (`used.flags`, or `avail_event` with EVENT_IDX);
    /// returns whether chains arrived meanwhile.
    pub fn enable_notification(&self, queue: &mut Queue) -> Result<bool, virtio_queue::Error> {
        let at = self.check_notification(queue)?;
        let more = queue.enable_notification(&self.mem)?;
        self.wrote(at, 2);
        Ok(more)
    }

    /// Asks the driver not to notify (a no-op with EVENT_IDX, virtio 1.x 2.7.10).
    pub fn disable_notification(&self, queue: &mut Queue) -> Result<(), virtio_queue::Error> {
        let at = self.check_notification(queue)?;
        queue.disable_notification(&self.mem)?;
        self.wrote(at, 2);
        Ok(())
    }

    /// The word notification suppression writes: `avail_event` after the ring with
    /// EVENT_IDX, else `used.flags`.
    fn check_notification(&self, queue: &Queue) -> Result<u64, virtio_queue::Error> {
        let offset = if queue.event_idx_enabled() {
            USED_HEADER_LEN + USED_ELEM_LEN * u64::from(queue.size())
        } else {
            0
        };
        self.check_used(queue, offset, 2)
    }
}

/// Writes into the buffers of one chain.
pub struct ChainWriter<'a> {
    writer: &'a GuestWriter,
    chain: &'a ChainWrites,
}

impl ChainWriter<'_> {
    /// Guest memory, for reading.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.writer.mem
    }

    /// Copies `data` to `addr`.
    pub fn write_slice(&self, data: &[u8], addr: GuestAddress) -> Result<(), GuestMemoryError> {
        let len = data.len() as u64;
        self.writer.check(Some(self.chain), addr.0, len);
        let result = self.writer.mem.write_slice(data, addr);
        self.writer.wrote(addr.0, len);
        result
    }

    /// Writes `val` at `addr`.
    pub fn write_obj<T: ByteValued>(
        &self,
        val: T,
        addr: GuestAddress,
    ) -> Result<(), GuestMemoryError> {
        let len = std::mem::size_of::<T>() as u64;
        self.writer.check(Some(self.chain), addr.0, len);
        let result = self.writer.mem.write_obj(val, addr);
        self.writer.wrote(addr.0, len);
        result
    }

    /// Lets `io` fill `bufs` through their host mappings (one slice per buffer and guest
    /// memory region, in order), as `preadv` does: the buffers are checked before, and
    /// marked written after.
    pub fn write_raw<R>(
        &self,
        bufs: &[GuestBuf],
        io: impl FnOnce(&[GuestSlice<'_>]) -> io::Result<R>,
    ) -> io::Result<R> {
        for b in bufs {
            self.writer.check(Some(self.chain), b.addr.0, b.len as u64);
        }
        let slices = guest_slices(&self.writer.mem, bufs)?;
        let result = io(&slices);
        for b in bufs {
            self.writer.wrote(b.addr.0, b.len as u64);
        }
        result
    }
}

/// The host mappings of `bufs`, in order: a buffer spanning two guest memory regions gives
/// two slices.
pub fn guest_slices<'a>(
    mem: &'a GuestMemoryMmap,
    bufs: &[GuestBuf],
) -> io::Result<Vec<GuestSlice<'a>>> {
    let mut slices = Vec::with_capacity(bufs.len());
    for b in bufs {
        for slice in mem.get_slices(b.addr, b.len) {
            let slice = slice.map_err(guest_io_error)?;
            if !slice.is_empty() {
                slices.push(slice);
            }
        }
    }
    Ok(slices)
}

#[cfg(test)]
pub(crate) mod test_utils {
    //! Writers for tests that call a writer directly, without a device.

    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::{Queue, QueueT};

    use super::{ChainWrites, GuestWriter};
    use crate::vstate::memory::GuestMemoryMmap;

    /// The writer of a 256-entry queue whose used ring is at 0.
    pub fn test_writer(mem: &GuestMemoryMmap) -> GuestWriter {
        GuestWriter::new(mem.clone(), "test", 0, &Queue::new(256).unwrap())
    }

    /// A chain of device-writable buffers (address, length).
    pub fn writable_chain(bufs: &[(u64, u32)]) -> ChainWrites {
        let descs: Vec<Descriptor> = bufs
            .iter()
            .map(|&(addr, len)| Descriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0))
            .collect();
        ChainWrites::new(0, &descs)
    }
}

#[cfg(test)]
mod tests {
    use std::panic::{catch_unwind, AssertUnwindSafe};

    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    use super::*;
    use crate::devices::virtio::device::test_utils::{guest_memory, DATA_START};

    /// The guard's message when `f` is stopped by it, None when it passes.
    fn violation(f: impl FnOnce()) -> Option<String> {
        assert_eq!(
            guard_mode(),
            GuardMode::Panic,
            "unit tests run with the guard on"
        );
        let err = catch_unwind(AssertUnwindSafe(f)).err()?;
        Some(
            err.downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "a panic without a message".into()),
        )
    }

    fn chain(descs: &[(u64, u32, bool)]) -> ChainWrites {
        let descs: Vec<Descriptor> = descs
            .iter()
            .map(|&(addr, len, w)| {
                let flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                Descriptor::new(addr, len, flags, 0)
            })
            .collect();
        ChainWrites::new(7, &descs)
    }

    #[test]
    fn writes_inside_the_writable_buffers_pass_and_land() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let q: Queue = vq.create_queue().unwrap();
        let w = GuestWriter::new(mem.clone(), "vda", 0, &q);
        let c = chain(&[(DATA_START, 16, false), (DATA_START + 0x1000, 512, true)]);
        let dst = w.chain(&c);
        dst.write_slice(&[1; 512], GuestAddress(DATA_START + 0x1000))
            .unwrap();
        dst.write_obj(2u8, GuestAddress(DATA_START + 0x11ff))
            .unwrap();
        let bufs = [GuestBuf {
            addr: GuestAddress(DATA_START + 0x1100),
            len: 0x100,
        }];
        let n = dst
            .write_raw(&bufs, |slices| {
                assert_eq!(slices.len(), 1);
                slices[0].write_slice(&[3; 0x10], 0).unwrap();
                Ok(slices[0].len())
            })
            .unwrap();
        assert_eq!(n, 0x100);
        let mut got = [0u8; 512];
        mem.read_slice(&mut got, GuestAddress(DATA_START + 0x1000))
            .unwrap();
        assert_eq!((got[0], got[0x100], got[0x110], got[511]), (1, 3, 1, 2));
    }

    #[test]
    fn a_write_outside_the_chain_is_stopped_before_it_lands() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let q: Queue = vq.create_queue().unwrap();
        let w = GuestWriter::new(mem.clone(), "vda", 0, &q);
        let c = chain(&[(DATA_START, 16, false), (DATA_START + 0x1000, 512, true)]);
        // Into the device-readable header.
        let msg = violation(|| {
            let _ = w.chain(&c).write_slice(&[9; 4], GuestAddress(DATA_START));
        })
        .expect("a write into a device-readable buffer");
        assert!(msg.contains("vda queue 0"), "{msg}");
        assert!(msg.contains(&format!("{:#x}", DATA_START)), "{msg}");
        assert!(msg.contains("chain 7"), "{msg}");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA_START)).unwrap(), 0);
        // One byte past the writable buffer, by every kind of write.
        let past = GuestAddress(DATA_START + 0x1000 + 512);
        assert!(violation(|| {
            let _ = w.chain(&c).write_slice(&[9; 2], GuestAddress(past.0 - 1));
        })
        .is_some());
        assert!(violation(|| {
            let _ = w.chain(&c).write_obj(9u32, GuestAddress(past.0 - 2));
        })
        .is_some());
        let bufs = [GuestBuf {
            addr: GuestAddress(DATA_START + 0x1000),
            len: 513,
        }];
        assert!(violation(|| {
            let _ = w.chain(&c).write_raw(&bufs, |_| Ok(()));
        })
        .is_some());
        assert_eq!(mem.read_obj::<u8>(past).unwrap(), 0);
        // A chain that was never read allows nothing.
        let none = ChainWrites::unread(3);
        let msg = violation(|| {
            let _ = w
                .chain(&none)
                .write_obj(1u8, GuestAddress(DATA_START + 0x1000));
        })
        .unwrap();
        assert!(msg.contains("(none)"), "{msg}");
    }

    #[test]
    fn the_vmm_mode_aborts_with_a_line_naming_device_queue_and_address() {
        const CHILD: &str = "FERROVM_TEST_GUARD_ABORT_CHILD";
        if std::env::var_os(CHILD).is_some() {
            // In a process of its own: Abort is what FERROVM_WRITE_GUARD=1 gives the VMM.
            set_guard_mode(GuardMode::Abort);
            let mem = guest_memory();
            let q: Queue = MockSplitQueue::new(&mem, 16).create_queue().unwrap();
            let w = GuestWriter::new(mem, "vdb", 0, &q);
            let _ = w
                .chain(&ChainWrites::unread(5))
                .write_obj(1u8, GuestAddress(DATA_START));
            unreachable!("the guard let the write through");
        }
        let name = "devices::virtio::guest_write::tests::the_vmm_mode_aborts_with_a_line_naming_device_queue_and_address";
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{stderr}");
        let line = stderr
            .lines()
            .find(|l| l.starts_with("ferrovm: write guard:"))
            .unwrap_or_else(|| panic!("no guard line:\n{stderr}"));
        assert!(
            line.contains("vdb queue 0: 1-byte write at 0x100000"),
            "{line}"
        );
        assert!(
            line.ends_with("stopping the VMM (FERROVM_WRITE_GUARD=1)"),
            "{line}"
        );
    }

    #[test]
    fn used_ring_writes_must_go_to_the_queue_the_writer_was_made_for() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        let w = GuestWriter::new(mem.clone(), "eth0", 1, &q);
        w.disable_notification(&mut q).unwrap();
        w.add_used(&mut q, ChainWrites::unread(0), 0).unwrap();
        assert!(w.enable_notification(&mut q).is_ok());
        q.set_event_idx(true);
        assert!(w.enable_notification(&mut q).is_ok());
        assert_eq!(vq.used().idx().load(), 1);
        // The queue moved (a reset and a new set-up) and the device kept its old writer.
        let other = MockSplitQueue::create(&mem, GuestAddress(0x8_0000), 16);
        let mut moved: Queue = other.create_queue().unwrap();
        let msg = violation(|| {
            let _ = w.add_used(&mut moved, ChainWrites::unread(0), 0);
        })
        .expect("a used entry written into another ring");
        assert!(msg.contains("eth0 queue 1"), "{msg}");
        assert!(msg.contains("used ring"), "{msg}");
        assert_eq!(other.used().idx().load(), 0, "nothing was written");
        assert!(violation(|| {
            let _ = w.disable_notification(&mut moved);
        })
        .is_some());
    }

    #[test]
    fn buffers_of_a_frame_are_completed_in_order_across_the_ring_end() {
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 4);
        let mut q: Queue = vq.create_queue().unwrap();
        let w = GuestWriter::new(mem.clone(), "eth0", 0, &q);
        q.set_next_used(2);
        let entries = |e: &[(u16, u32)]| {
            e.iter()
                .map(|&(h, l)| (ChainWrites::unread(h), l))
                .collect()
        };
        w.add_used_together(&mut q, entries(&[(3, 100), (0, 200), (1, 50)]))
            .unwrap();
        assert_eq!(vq.used().idx().load(), 5);
        let elem = |i: usize| {
            let e = vq.used().ring().ref_at(i).unwrap().load();
            (e.id(), e.len())
        };
        assert_eq!([elem(2), elem(3), elem(0)], [(3, 100), (0, 200), (1, 50)]);
        // A bad head (never one popped from the queue) changes nothing.
        assert!(w
            .add_used_together(&mut q, entries(&[(0, 1), (4, 1)]))
            .is_err());
        assert_eq!((q.next_used(), vq.used().idx().load()), (5, 5));
    }
}
