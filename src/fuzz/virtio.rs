//! Virtio targets: the guest's rings and buffers come from the fuzz input, the device
//! processes its queues once, and the used rings are checked against what was offered.
//!
//! Input layout (every field read with [`Input`], so short inputs read as zeros):
//! ```text
//! flags u8                bit 0 EVENT_IDX, bit 1 read-only disk (block) / MRG_RXBUF (net),
//!                         bit 2 (block) the disk is an image file: the VMM's own backend,
//!                         whose I/O threads `preadv` straight into guest memory
//! per queue:  size_log2 u8 (size 1 << (v % 9)), avail_idx u16, used_event u16,
//!             ndesc u8, ndesc x 16-byte descriptors (addr u64, len u32, flags u16, next u16),
//!             navail u8, navail x u16 ring entries
//! data        u16-prefixed bytes, written at DATA_START (headers, payloads)
//! the rest    block: nothing; net: u16-prefixed frames the TAP delivers; console: host input
//! ```
//! Queue n's descriptor table is at n * QUEUE_STRIDE, its available ring 0x1000 and its used
//! ring 0x2000 further; guest memory is MEM_SIZE bytes from 0, so buffers can point outside.
//!
//! Every target runs with the guest-memory write guard on (`guest_write`): a device write
//! anywhere but the device-writable buffers of the chain it serves or that queue's used ring
//! panics, which the harness reports as a crash.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::{image_file, Input, MemDisk};
use crate::config::MacAddr;
use crate::devices::bus::BusDevice;
use crate::devices::disk::BlockBackend;
use crate::devices::pci::msix::{MsiMessage, MsiRouting, MsixTable, MsixVector};
use crate::devices::pci::PciDevice;
use crate::devices::virtio::device::MsixVectors;
use crate::devices::virtio::device::{
    Activation, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::devices::virtio::guest_write::{set_guard_mode, GuardMode};
use crate::devices::virtio::net::NetBackend;
use crate::devices::virtio::pci_transport::{self, NotifyRegistry};
use crate::devices::virtio::{MmioTransport, PciTransport, VirtioBlock, VirtioConsole, VirtioNet};
use crate::vstate::memory::GuestMemoryMmap;

/// Guest memory of every virtio target.
pub const MEM_SIZE: u64 = 0x2_0000;
/// Distance between the rings of consecutive queues.
pub const QUEUE_STRIDE: u64 = 0x4000;
pub const AVAIL_OFFSET: u64 = 0x1000;
pub const USED_OFFSET: u64 = 0x2000;
/// Where the input's data bytes go.
pub const DATA_START: u64 = 0x8000;
/// Disk size of the block target, in sectors.
pub const DISK_SECTORS: u64 = 64;

pub const FLAG_EVENT_IDX: u8 = 1;
/// Read-only disk (block), MRG_RXBUF acked (net).
pub const FLAG_DEVICE: u8 = 2;
/// The block target's disk is an image file (`RawFile`), not host memory.
pub const FLAG_FILE: u8 = 4;

const MAX_QUEUE_SIZE: u16 = 256;

/// Guest memory and queues decoded from an input.
struct Guest {
    mem: GuestMemoryMmap,
    flags: u8,
    queues: Vec<Queue>,
}

fn interrupt() -> Arc<VirtioInterrupt> {
    Arc::new(VirtioInterrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
    ))
}

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("guest memory")
}

/// Lays out `nqueues` queues and the data area in fresh guest memory, and turns the write
/// guard on.
fn guest(input: &mut Input, nqueues: usize) -> Guest {
    set_guard_mode(GuardMode::Panic);
    let mem = guest_memory();
    let flags = input.u8();
    let mut queues = Vec::with_capacity(nqueues);
    for n in 0..nqueues as u64 {
        let desc = n * QUEUE_STRIDE;
        let (avail, used) = (desc + AVAIL_OFFSET, desc + USED_OFFSET);
        let size = 1u16 << (input.u8() % 9);
        let avail_idx = input.u16();
        let used_event = input.u16();
        let ndesc = u64::from(input.u8()).min(u64::from(size));
        for i in 0..ndesc {
            write(&mem, desc + 16 * i, input.bytes(16));
        }
        let navail = u64::from(input.u8()).min(u64::from(size));
        for i in 0..navail {
            write(&mem, avail + 4 + 2 * i, &input.u16().to_le_bytes());
        }
        write(&mem, avail + 2, &avail_idx.to_le_bytes());
        write(
            &mem,
            avail + 4 + 2 * u64::from(size),
            &used_event.to_le_bytes(),
        );

        let mut q = Queue::new(MAX_QUEUE_SIZE).expect("queue");
        q.set_size(size);
        q.set_desc_table_address(Some(desc as u32), Some(0));
        q.set_avail_ring_address(Some(avail as u32), Some(0));
        q.set_used_ring_address(Some(used as u32), Some(0));
        q.set_event_idx(flags & FLAG_EVENT_IDX != 0);
        q.set_ready(true);
        assert!(q.is_valid(&mem), "the harness built an invalid queue");
        queues.push(q);
    }
    let data = input.blob();
    let room = (MEM_SIZE - DATA_START) as usize;
    write(&mem, DATA_START, &data[..data.len().min(room)]);
    Guest { mem, flags, queues }
}

fn write(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) {
    mem.write_slice(bytes, GuestAddress(addr))
        .expect("harness write inside guest memory");
}

fn read_u16(mem: &GuestMemoryMmap, addr: u64) -> u16 {
    mem.read_obj(GuestAddress(addr))
        .expect("ring inside guest memory")
}

fn read_u32(mem: &GuestMemoryMmap, addr: u64) -> u32 {
    mem.read_obj(GuestAddress(addr))
        .expect("ring inside guest memory")
}

/// A descriptor as the guest wrote it.
#[derive(Clone, Copy, Debug)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
}

impl Desc {
    fn writable(&self) -> bool {
        self.flags & VRING_DESC_F_WRITE as u16 != 0
    }
    fn in_memory(&self, mem: &GuestMemoryMmap) -> bool {
        mem.check_range(GuestAddress(self.addr), self.len as usize)
    }
}

/// What one queue looked like before the device ran, to check the used ring against.
struct Offer {
    base: u64,
    size: u16,
    /// The descriptor table and available ring bytes.
    rings: Vec<u8>,
    avail_idx: u16,
}

impl Offer {
    fn take(mem: &GuestMemoryMmap, n: usize, size: u16) -> Self {
        let base = n as u64 * QUEUE_STRIDE;
        let mut rings = vec![0u8; USED_OFFSET as usize];
        mem.read_slice(&mut rings, GuestAddress(base))
            .expect("rings inside guest memory");
        let avail_idx = read_u16(mem, base + AVAIL_OFFSET + 2);
        Self {
            base,
            size,
            rings,
            avail_idx,
        }
    }

    /// Chains the device may take: none when the index claims more than the queue holds
    /// (virtio-queue refuses to walk such a ring).
    fn offered(&self) -> u16 {
        if self.avail_idx > self.size {
            0
        } else {
            self.avail_idx
        }
    }

    fn head(&self, i: u16) -> u16 {
        let at = (AVAIL_OFFSET + 4 + 2 * u64::from(i % self.size)) as usize;
        u16::from_le_bytes([self.rings[at], self.rings[at + 1]])
    }

    /// The chain at `head` as the guest wrote it, following NEXT only; None if it loops, is
    /// longer than the queue or 4 GiB, or is indirect (which these checks leave to the
    /// devices).
    fn chain(&self, head: u16) -> Option<Vec<Desc>> {
        let mut out = Vec::new();
        let mut total = 0u32;
        let mut i = head;
        while i < self.size && out.len() < usize::from(self.size) {
            let at = 16 * usize::from(i);
            let b = &self.rings[at..at + 16];
            let d = Desc {
                addr: u64::from_le_bytes(b[0..8].try_into().unwrap()),
                len: u32::from_le_bytes(b[8..12].try_into().unwrap()),
                flags: u16::from_le_bytes(b[12..14].try_into().unwrap()),
            };
            if d.flags & VRING_DESC_F_INDIRECT as u16 != 0 {
                return None;
            }
            // virtio-queue stops a chain past 4 GiB in all (virtio 1.2, 2.7.5.2).
            total = total.checked_add(d.len)?;
            out.push(d);
            if d.flags & VRING_DESC_F_NEXT as u16 == 0 {
                return Some(out);
            }
            i = u16::from_le_bytes(b[14..16].try_into().unwrap());
        }
        None
    }

    /// Whether the device may write into the ring area: a device-writable or indirect
    /// descriptor reaching below DATA_START. The guest may aim buffers at its own rings,
    /// and then the rings say whatever the device wrote there.
    fn may_write_rings(&self) -> bool {
        (0..usize::from(self.size)).any(|i| {
            let b = &self.rings[16 * i..16 * i + 16];
            let addr = u64::from_le_bytes(b[0..8].try_into().unwrap());
            let flags = u16::from_le_bytes(b[12..14].try_into().unwrap());
            let risky = (VRING_DESC_F_WRITE | VRING_DESC_F_INDIRECT) as u16;
            flags & risky != 0 && addr < DATA_START
        })
    }

    /// Checks the used ring: no more entries than chains offered, each naming a descriptor
    /// of the queue, and (while the guest's rings are as the guest left them: the device's
    /// own writes may land on them) no more bytes than the chain could take. Checks nothing
    /// when a buffer of any of `all` may overlap the rings. Returns the used entries
    /// (head, len).
    fn check_used(&self, all: &[Offer], mem: &GuestMemoryMmap, what: &str) -> Vec<(u16, u32)> {
        if all.iter().any(Offer::may_write_rings) {
            return Vec::new();
        }
        let used = self.base + USED_OFFSET;
        let used_idx = read_u16(mem, used + 2);
        assert!(
            used_idx <= self.offered(),
            "{what}: {used_idx} used entries for {} chains offered",
            self.offered()
        );
        let mut after = vec![0u8; USED_OFFSET as usize];
        mem.read_slice(&mut after, GuestAddress(self.base)).unwrap();
        let intact = after == self.rings;
        (0..used_idx)
            .map(|i| {
                let elem = used + 4 + 8 * u64::from(i % self.size);
                let (id, len) = (read_u32(mem, elem), read_u32(mem, elem + 4));
                assert!(
                    id < u32::from(self.size),
                    "{what}: used entry {i} names descriptor {id} of a {}-entry queue",
                    self.size
                );
                if let Some(chain) = self.chain(id as u16).filter(|_| intact) {
                    let room: u64 = chain
                        .iter()
                        .filter(|d| d.writable())
                        .map(|d| u64::from(d.len))
                        .sum();
                    assert!(
                        u64::from(len) <= room,
                        "{what}: used entry {i} says {len} bytes written into a chain with \
                         {room} writable bytes"
                    );
                }
                (id as u16, len)
            })
            .collect()
    }
}

fn activation(g: Guest, features: u64) -> (Activation, GuestMemoryMmap) {
    let mem = g.mem.clone();
    let event_idx = if g.flags & FLAG_EVENT_IDX != 0 {
        VIRTIO_RING_F_EVENT_IDX
    } else {
        0
    };
    let a = Activation {
        mem: g.mem,
        queues: g.queues,
        interrupt: interrupt(),
        acked_features: VIRTIO_F_VERSION_1 | event_idx | features,
    };
    (a, mem)
}

/// virtio-blk: descriptor chain parsing and the request handler (read, write, flush,
/// get-id, anything else) on a 32 KiB in-memory disk.
pub fn block(data: &[u8]) {
    let mut input = Input::new(data);
    let g = guest(&mut input, 1);
    let readonly = g.flags & FLAG_DEVICE != 0;
    let offer = Offer::take(&g.mem, 0, g.queues[0].size());
    // A status byte the device did not write reads 0xff.
    let single = (offer.offered() == 1)
        .then(|| offer.chain(offer.head(0)))
        .flatten();
    if let Some(status) = single.as_ref().and_then(|c| c.last()) {
        let _ = g.mem.write_obj(0xffu8, GuestAddress(status.addr));
    }
    let disk: Box<dyn BlockBackend> = if g.flags & FLAG_FILE != 0 {
        Box::new(image_file(DISK_SECTORS))
    } else {
        Box::new(MemDisk::new(DISK_SECTORS))
    };
    // Named after the target: the runner tells its I/O thread's panics by the name.
    let mut dev = VirtioBlock::new("virtio_block".into(), disk, readonly, "fuzz-disk")
        .expect("virtio-blk device");
    let (activation, mem) = activation(g, 0);
    dev.activate(activation).expect("activate");
    dev.process_queue();
    // Waits for the I/O thread to complete what it took.
    dev.reset();
    drop(dev);

    let used = offer.check_used(std::slice::from_ref(&offer), &mem, "virtio-blk");
    if let (Some(chain), [(_, len)]) = (single, used.as_slice()) {
        check_block_status(&mem, &chain, *len);
    }
}

/// The status a lone request got must say what was wrong with it (virtio 1.x, 5.2.6).
fn check_block_status(mem: &GuestMemoryMmap, chain: &[Desc], used_len: u32) {
    let (Some(status), true) = (chain.last(), chain.len() >= 2) else {
        return;
    };
    if !status.writable() || status.len == 0 || !mem.check_range(GuestAddress(status.addr), 1) {
        assert_eq!(
            used_len, 0,
            "virtio-blk: a chain without status used {used_len} bytes"
        );
        return;
    }
    let got: u8 = mem.read_obj(GuestAddress(status.addr)).unwrap();
    let ok = VIRTIO_BLK_S_OK as u8;
    assert!(
        [ok, VIRTIO_BLK_S_IOERR as u8, VIRTIO_BLK_S_UNSUPP as u8].contains(&got),
        "virtio-blk: status byte {got:#x} after a request with a status descriptor"
    );
    // The header and status need 16 and 1 bytes only, whatever their descriptors say.
    if chain[1..chain.len() - 1].iter().any(|d| !d.in_memory(mem)) {
        assert_ne!(
            got, ok,
            "virtio-blk: a data buffer outside guest memory passed"
        );
    }
    if got == ok {
        assert!(
            used_len >= 1,
            "virtio-blk: OK status not counted in the used length"
        );
    } else {
        assert_eq!(
            used_len, 1,
            "virtio-blk: a failed request used more than its status"
        );
    }
}

/// A TAP made of the frames in the input; what the guest sends is counted and dropped.
struct FuzzTap {
    rx: VecDeque<Vec<u8>>,
    sent: Arc<Mutex<Vec<usize>>>,
    fd: EventFd,
}

impl NetBackend for FuzzTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let frame = self.rx.pop_front().ok_or(io::ErrorKind::WouldBlock)?;
        // A datagram read truncates to the buffer, as from a TAP.
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.sent.lock().unwrap().push(frame.len());
        Ok(frame.len())
    }
    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for FuzzTap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Most frames one net input delivers.
const MAX_RX_FRAMES: usize = 16;

/// virtio-net: the transmit path (gathering chains into frames) and the receive path
/// (frames from the TAP scattered into receive buffers, mergeable or not).
pub fn net(data: &[u8]) {
    let mut input = Input::new(data);
    let g = guest(&mut input, 2);
    let mut rx = VecDeque::new();
    while !input.is_empty() && rx.len() < MAX_RX_FRAMES {
        rx.push_back(input.blob().to_vec());
    }
    let sent = Arc::new(Mutex::new(Vec::new()));
    let tap = FuzzTap {
        rx,
        sent: sent.clone(),
        fd: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
    };
    let mrg = if g.flags & FLAG_DEVICE != 0 {
        1 << VIRTIO_NET_F_MRG_RXBUF
    } else {
        0
    };
    let offers = [
        Offer::take(&g.mem, 0, g.queues[0].size()),
        Offer::take(&g.mem, 1, g.queues[1].size()),
    ];
    let mut dev = VirtioNet::new(
        "virtio_net".into(),
        Box::new(tap),
        MacAddr([0x02, 0, 0, 0, 0, 0x01]),
    )
    .expect("virtio-net device");
    let (activation, mem) = activation(g, mrg);
    dev.activate(activation).expect("activate");
    dev.process_tx();
    // Each round takes at least one frame off the TAP or stops wanting it.
    for _ in 0..=MAX_RX_FRAMES {
        if !dev.process_rx() {
            break;
        }
    }
    check_rx_tx(&offers, &mem, "virtio-net");
    let stats = dev.stats();
    assert_eq!(stats.tx_frames, sent.lock().unwrap().len() as u64);
}

/// Checks a receive (0) and a transmit (1) queue's used rings; the device must not have
/// written into any transmit buffer.
fn check_rx_tx(offers: &[Offer; 2], mem: &GuestMemoryMmap, what: &str) {
    offers[0].check_used(offers, mem, &format!("{what} rx"));
    let tx = offers[1].check_used(offers, mem, &format!("{what} tx"));
    assert!(
        tx.iter().all(|&(_, len)| len == 0),
        "{what}: the device wrote into a transmit buffer: {tx:?}"
    );
}

/// Most host input one console input carries (a pipe takes it without blocking).
const MAX_CONSOLE_INPUT: usize = 4096;

/// virtio-console: guest output gathered from transmit chains, host input scattered into
/// receive buffers.
pub fn console(data: &[u8]) {
    let mut input = Input::new(data);
    let g = guest(&mut input, 2);
    let host = input.bytes(MAX_CONSOLE_INPUT);
    let (reader, mut writer) = io::pipe().expect("pipe");
    writer.write_all(host).expect("pipe write");
    // Closed, so that the device sees the end of the input after it.
    drop(writer);
    let offers = [
        Offer::take(&g.mem, 0, g.queues[0].size()),
        Offer::take(&g.mem, 1, g.queues[1].size()),
    ];
    let mut dev = VirtioConsole::new(Box::new(io::sink()), Some(Box::new(reader)))
        .expect("virtio-console device");
    let (activation, mem) = activation(g, 0);
    dev.activate(activation).expect("activate");
    dev.process_tx();
    for _ in 0..=usize::from(MAX_QUEUE_SIZE) {
        if !dev.process_rx() {
            break;
        }
    }
    check_rx_tx(&offers, &mem, "virtio-console");
}

/// Accesses one MMIO input makes at most.
const MAX_MMIO_OPS: usize = 512;

/// Guest memory with the input's blob at DATA_START, and a console to drive; the write
/// guard on.
fn console_guest(input: &mut Input) -> (GuestMemoryMmap, Arc<Mutex<VirtioConsole>>) {
    set_guard_mode(GuardMode::Panic);
    let mem = guest_memory();
    let blob = input.blob();
    write(
        &mem,
        DATA_START,
        &blob[..blob.len().min((MEM_SIZE - DATA_START) as usize)],
    );
    let console = Arc::new(Mutex::new(
        VirtioConsole::new(Box::new(io::sink()), None).expect("virtio-console device"),
    ));
    (mem, console)
}

/// The virtio-mmio register file: reads and writes of any size at any offset of the
/// transport's page (a console behind it), then the console's queues as the driver set
/// them up, if it activated the device.
///
/// Input: `data` as for the other virtio targets (u16-prefixed, at DATA_START), then accesses
/// of `op u8` (bit 0 write, bits 1-2 size 1/2/4/8), `offset u16` (within 0x200), `value u64`.
pub fn mmio(data: &[u8]) {
    let mut input = Input::new(data);
    let (mem, console) = console_guest(&mut input);
    let mut transport = MmioTransport::new(mem, console.clone(), interrupt());
    for _ in 0..MAX_MMIO_OPS {
        if input.is_empty() {
            break;
        }
        let op = input.u8();
        let len = 1usize << ((op >> 1) & 3);
        let offset = u64::from(input.u16() % 0x200);
        let value = input.u64().to_le_bytes();
        if op & 1 != 0 {
            transport.write(offset, &value[..len]);
        } else {
            let mut buf = [0u8; 8];
            transport.read(offset, &mut buf[..len]);
        }
    }
    let mut console = console.lock().unwrap();
    console.process_tx();
    console.process_rx();
}

/// MSI-X routes that go nowhere: the fuzz target has no KVM.
struct NoRoutes;

impl MsiRouting for NoRoutes {
    fn set_route(&self, _: u32, _: MsiMessage) -> Result<(), String> {
        Ok(())
    }
}

/// Queue notifications that register nowhere.
struct NoNotify;

impl NotifyRegistry for NoNotify {
    fn register(&self, _: &EventFd, _: u64) -> Result<(), String> {
        Ok(())
    }
    fn unregister(&self, _: &EventFd, _: u64) -> Result<(), String> {
        Ok(())
    }
}

/// The virtio-pci transport of a console: guest memory from a blob, then configuration
/// space and BAR 0 accesses (common config, ISR, device config, notifications, the MSI-X
/// table and PBA) of any size at any offset, then the queues as set up.
///
/// Input: the data blob (u16-prefixed, written at DATA_START), then per access op u8 (bit 0
/// write, bits 1-2 log2 size, bit 3 configuration space rather than BAR 0), offset u16,
/// value u64.
pub fn pci(data: &[u8]) {
    let mut input = Input::new(data);
    let (mem, console) = console_guest(&mut input);
    let queues = console.lock().unwrap().queue_max_sizes().len();
    let vectors = (0..pci_transport::msix_vectors_for(queues))
        .map(|i| MsixVector {
            gsi: 24 + i as u32,
            irqfd: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        })
        .collect();
    let table = Arc::new(MsixTable::new(vectors, Arc::new(NoRoutes)));
    let interrupt = Arc::new(VirtioInterrupt::with_msix(
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        crate::devices::metrics::DeviceMetrics::unnamed(),
        MsixVectors::new(table, queues),
    ));
    let mut t = PciTransport::new(
        mem,
        console.clone(),
        interrupt.clone(),
        0xc000_0000,
        5,
        Box::new(NoNotify),
    )
    .expect("virtio-pci transport");
    for _ in 0..MAX_MMIO_OPS {
        if input.is_empty() {
            break;
        }
        let op = input.u8();
        let len = 1usize << ((op >> 1) & 3);
        let offset = input.u16();
        let value = input.u64().to_le_bytes();
        let mut buf = [0u8; 8];
        match (op & 8 != 0, op & 1 != 0) {
            (true, true) => t.config_write(usize::from(offset) % 256, &value[..len]),
            (true, false) => t.config_read(usize::from(offset) % 256, &mut buf[..len]),
            (false, true) => t.bar_write(
                0,
                u64::from(offset) % pci_transport::BAR_SIZE,
                &value[..len],
            ),
            (false, false) => t.bar_read(
                0,
                u64::from(offset) % pci_transport::BAR_SIZE,
                &mut buf[..len],
            ),
        }
    }
    // Whatever the driver did, interrupts go somewhere or pend, never panic.
    interrupt.signal_used_queue(0);
    interrupt.signal_used_queue(usize::MAX);
    interrupt.signal_config_change();
    let mut console = console.lock().unwrap();
    console.process_tx();
    console.process_rx();
}
