//! Targets for the emulated devices: sequences of port and MMIO accesses, decoded from the
//! input, against the pure state machines (no bus, no KVM), as a driver or a hostile guest
//! makes them, with guest memory the input fills for the bus masters (the e1000's rings, the
//! IDE bus master's PRD tables). Every access is 1, 2 or 4 bytes (8 for the e1000's MMIO),
//! like a KVM exit.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};

use super::{Input, MemDisk};
use crate::arch::x86_64::layout::{PCI_IO_WINDOW_LEN, PCI_IO_WINDOW_START};
use crate::devices::bus::BusDevice;
use crate::devices::emulated::e1000::{
    self, DelayTimer, E1000Resources, E1000, IO_SIZE as E1000_IO_SIZE, MMIO_SIZE as E1000_MMIO_SIZE,
};
use crate::devices::emulated::ide::{AtaDisk, BusMasterBlock, DmaContext, IdeChannel};
use crate::devices::emulated::ne2k::{FrameSink, Ne2k, BAR_SIZE, MAX_FRAME};
use crate::devices::emulated::nic_tap::{VnetHdr, VNET_F_NEEDS_CSUM};
use crate::devices::emulated::Signal;
use crate::devices::pci::piix;
use crate::devices::pci::{BarSpace, PciBus, PciDevice, PciWindow};
use crate::devices::virtio::guest_write::{set_guard_mode, GuardMode};
use crate::vstate::memory::GuestMemoryMmap;

/// Accesses one input makes at most (the state machines do bounded work per access).
const MAX_OPS: usize = 4096;
/// Sectors of the fuzzed IDE disks.
pub const IDE_DISK_SECTORS: u64 = 64;
/// Where the NE2000's BAR starts before the guest moves it.
const NIC_IO_BASE: u32 = PCI_IO_WINDOW_START as u32;
/// Where the IDE function's bus master registers (BAR4) start.
const BM_IO_BASE: u32 = PCI_IO_WINDOW_START as u32 + 0x200;
/// Guest memory of the bus master targets (rings, PRD tables and buffers).
pub const DMA_MEM_SIZE: u64 = 0x4_0000;

/// An interrupt line nobody listens to.
struct NoIrq;

impl Signal for NoIrq {
    fn signal(&self) {}
}

/// Where the NIC's frames go; a frame longer than the wire takes is a bug.
struct Wire;

impl FrameSink for Wire {
    fn send(&mut self, _hdr: &VnetHdr, frame: &[u8]) -> std::io::Result<()> {
        assert!(
            frame.len() <= MAX_FRAME,
            "ne2k: transmitted a {}-byte frame",
            frame.len()
        );
        Ok(())
    }
}

fn nic() -> Ne2k {
    Ne2k::new(
        [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        NIC_IO_BASE,
        11,
        Box::new(NoIrq),
        Box::new(NoIrq),
        Box::new(Wire),
    )
}

/// The access an `op` byte describes: bit 0 write, bits 1-2 size (1, 2, 4; 3 reads as 4).
fn access(op: u8) -> (bool, usize) {
    (op & 1 != 0, [1, 2, 4, 4][usize::from((op >> 1) & 3)])
}

/// The ATA command state machine of an IDE channel with a master disk and, if the first
/// input byte says so (bit 1), a slave; bit 0 makes the disks read-only.
///
/// Accesses: `op u8` (bit 0 write, bits 1-2 size, bits 3-5 command block register, bit 6
/// the control block: device control / alternate status), `value u32`.
pub fn ide(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    let readonly = flags & 1 != 0;
    let disk = || AtaDisk::new(Box::new(MemDisk::new(IDE_DISK_SECTORS)), readonly, "FUZZ");
    let slave = (flags & 2 != 0).then(disk);
    let mut ch = IdeChannel::new(Some(disk()), slave, Box::new(NoIrq));
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let op = input.u8();
        let value = input.u32().to_le_bytes();
        let (write, len) = access(op);
        let reg = u64::from((op >> 3) & 7);
        let mut buf = [0u8; 4];
        match (op & 0x40 != 0, write) {
            (false, false) => ch.read(reg, &mut buf[..len]),
            (false, true) => ch.write(reg, &value[..len]),
            (true, false) => {
                ch.read_alt_status();
            }
            (true, true) => ch.write_control(value[0]),
        }
    }
}

/// Largest frame the NE2000 input offers the receiver (bigger than any legal one).
const MAX_RX_FRAME: usize = 2048;

/// The DP8390 register file, remote DMA, transmit and the receive ring of an NE2000.
///
/// Accesses: `op u8` (bit 0 write, bits 1-2 size, bit 3: offer a frame to the receiver
/// instead, a u16-prefixed frame follows), `offset u8` (within the 0x20-byte BAR),
/// `value u32`.
pub fn ne2k(data: &[u8]) {
    let mut input = Input::new(data);
    let mut nic = nic();
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let op = input.u8();
        if op & 8 != 0 {
            let frame = input.blob();
            nic.receive(&frame[..frame.len().min(MAX_RX_FRAME)]);
            continue;
        }
        let offset = u64::from(input.u8()) % u64::from(BAR_SIZE);
        let value = input.u32().to_le_bytes();
        let (write, len) = access(op);
        let mut buf = [0u8; 4];
        if write {
            nic.bar_write(0, offset, &value[..len]);
        } else {
            nic.bar_read(0, offset, &mut buf[..len]);
        }
    }
}

/// PCI bus 0 as the VMM builds it with IDE disks and an NE2000 (host bridge, PIIX3 ISA
/// bridge and IDE function with its bus master registers in BAR4, the NIC in slot 2):
/// configuration mechanism #1 and the I/O window, which forwards to whatever the BARs
/// decode after the guest reprogrammed them.
///
/// Accesses: `op u8` (bit 0 write, bits 1-2 size, bit 3 the I/O window instead of
/// 0xcf8-0xcff), `offset u16`, `value u32`.
pub fn pci(data: &[u8]) {
    let mut input = Input::new(data);
    let mut bus = PciBus::new();
    bus.add(0, 0, Arc::new(Mutex::new(piix::host_bridge())));
    bus.add(1, 0, Arc::new(Mutex::new(piix::piix3_isa_bridge())));
    let bus_master = Arc::new(AtomicBool::new(false));
    let channels = dma_channels(&bus_master);
    bus.add(
        1,
        1,
        Arc::new(Mutex::new(piix::piix3_ide(
            BM_IO_BASE, channels, bus_master,
        ))),
    );
    bus.add(2, 0, Arc::new(Mutex::new(nic())));
    let mut window = PciWindow::new(
        BarSpace::Io,
        u64::from(PCI_IO_WINDOW_START),
        bus.decode_map(),
    );
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let op = input.u8();
        let offset = u64::from(input.u16());
        let value = input.u32().to_le_bytes();
        let (write, len) = access(op);
        let mut buf = [0u8; 4];
        let io = op & 8 != 0;
        match (io, write) {
            (false, false) => bus.read(offset % 8, &mut buf[..len]),
            (false, true) => bus.write(offset % 8, &value[..len]),
            (true, false) => {
                window.read(offset % u64::from(PCI_IO_WINDOW_LEN), &mut buf[..len]);
            }
            (true, true) => window.write(offset % u64::from(PCI_IO_WINDOW_LEN), &value[..len]),
        }
    }
}

fn dma_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), DMA_MEM_SIZE as usize)]).unwrap()
}

/// Writes a u16-prefixed blob from the input at an address it gives (`u32`, wrapped into
/// guest memory; what does not fit is cut).
fn poke(input: &mut Input, mem: &GuestMemoryMmap) {
    let addr = u64::from(input.u32()) % DMA_MEM_SIZE;
    let blob = input.blob();
    let room = (DMA_MEM_SIZE - addr) as usize;
    mem.write_slice(&blob[..blob.len().min(room)], GuestAddress(addr))
        .unwrap();
}

/// The IDE channels of the `pci` target: a DMA master on each, the primary with a PIO-only
/// slave, doing DMA in their own guest memory when `bus_master` (the function's command
/// register bit) allows.
fn dma_channels(bus_master: &Arc<AtomicBool>) -> [Option<piix::BmChannel>; 2] {
    let mem = dma_memory();
    let disk = |dma: bool| {
        AtaDisk::new(Box::new(MemDisk::new(IDE_DISK_SECTORS)), false, "FUZZ").with_dma(dma)
    };
    let channel = |slave: Option<AtaDisk>| {
        let ch = IdeChannel::new(Some(disk(true)), slave, Box::new(NoIrq)).with_dma(DmaContext {
            mem: mem.clone(),
            bus_master: bus_master.clone(),
        });
        Some(piix::BmChannel {
            regs: Arc::new(Mutex::new(BusMasterBlock(Arc::new(Mutex::new(ch))))),
            metrics: None,
        })
    };
    [channel(Some(disk(false))), channel(None)]
}

/// The IDE bus master DMA engine: an IDE channel with a DMA master and a PIO-only slave
/// disk, its bus master registers and the guest memory its PRD tables and buffers are in.
///
/// Input: `flags u8` (bit 0: bus mastering off in the PCI command register, bit 1: the disks
/// read-only), then ops: `op u8`, bits 0-2 the kind:
/// 0 a command block register write (bits 3-5 the register, `value u8`),
/// 1 a command block register read (bits 3-5), 2 a data register read or write (bit 3 write,
/// `value u32`, 4 bytes), 3 a device control write (`value u8`), 4 a bus master register
/// write (bits 3-5 the offset, bit 6 a dword access, `value u32`), 5 a bus master register
/// read (bits 3-5), 6 guest memory written (`addr u32`, u16-prefixed bytes: PRD tables,
/// buffers), 7 the bus master enable set to bit 3.
///
/// Checks: besides no panic and no overflow, every disk access stays on the disk (the fuzz
/// disk panics otherwise), whatever the PRD tables say, and the write guard (panicking)
/// that DMA writes land in the table's regions only.
pub fn bmdma(data: &[u8]) {
    set_guard_mode(GuardMode::Panic);
    let mut input = Input::new(data);
    let flags = input.u8();
    let mem = dma_memory();
    let bus_master = Arc::new(AtomicBool::new(flags & 1 == 0));
    let disk = |dma: bool| {
        AtaDisk::new(
            Box::new(MemDisk::new(IDE_DISK_SECTORS)),
            flags & 2 != 0,
            "FUZZ",
        )
        .with_dma(dma)
    };
    let mut ch = IdeChannel::new(Some(disk(true)), Some(disk(false)), Box::new(NoIrq)).with_dma(
        DmaContext {
            mem: mem.clone(),
            bus_master: bus_master.clone(),
        },
    );
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let op = input.u8();
        let sub = u64::from((op >> 3) & 7);
        let mut buf = [0u8; 4];
        match op & 7 {
            0 => ch.write(sub.max(1), &[input.u8()]),
            1 => ch.read(sub.max(1), &mut buf[..1]),
            2 => {
                let v = input.u32().to_le_bytes();
                if op & 8 != 0 {
                    ch.write(0, &v);
                } else {
                    ch.read(0, &mut buf);
                }
            }
            3 => ch.write_control(input.u8()),
            4 => {
                let v = input.u32().to_le_bytes();
                let len = if op & 0x40 != 0 { 4 } else { 1 };
                ch.bm_write(sub, &v[..len]);
            }
            5 => ch.bm_read(sub, &mut buf[..1]),
            6 => poke(&mut input, &mem),
            _ => bus_master.store(op & 8 != 0, Ordering::Relaxed),
        }
    }
}

/// A moderation clock the input moves.
struct FuzzClock(Arc<AtomicU64>);

impl DelayTimer for FuzzClock {
    fn now(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    fn arm(&mut self, _at: Option<u64>) {}
}

/// Where the e1000's frames go: each must be one the host would take.
struct CheckedSink;

impl FrameSink for CheckedSink {
    fn send(&mut self, hdr: &VnetHdr, frame: &[u8]) -> std::io::Result<()> {
        let len = frame.len();
        assert!(len <= e1000::MAX_TX_FRAME, "e1000: sent a {len}-byte frame");
        if hdr.flags & VNET_F_NEEDS_CSUM != 0 {
            let end = usize::from(hdr.csum_start) + usize::from(hdr.csum_offset) + 2;
            assert!(
                end <= len,
                "e1000: partial checksum field past a {len}-byte frame: {hdr:?}"
            );
        }
        if hdr.gso_type != 0 {
            assert!(
                hdr.gso_size > 0 && usize::from(hdr.hdr_len) <= len,
                "e1000: GSO header does not fit a {len}-byte frame: {hdr:?}"
            );
        }
        Ok(())
    }
}

/// Largest frame the e1000 input offers the receiver (bigger than the jumbo limit).
const MAX_E1000_RX_FRAME: usize = 17_000;

/// The e1000 (82540EM): register accesses through both BARs, frames offered to the
/// receiver, the moderation timer firing, and guest memory (descriptor rings, buffers).
///
/// Input: ops until the end, `op u8`, bits 0-1 the kind:
/// 0 a register access (bit 2 write, bit 3 the I/O BAR, bits 4-5 size 1, 2, 4 or 8 bytes,
/// `offset u32` wrapped into the BAR, `value u64`),
/// 1 a frame offered to the receiver (10 bytes of virtio-net header as the TAP gives it,
/// then a u16-prefixed frame),
/// 2 time passing (`u16` µs) and the moderation timer firing,
/// 3 guest memory written (`addr u32`, u16-prefixed bytes).
///
/// Checks: besides no panic and no overflow, every frame sent is one the host would take
/// (no longer than a TSO frame, checksum and segmentation offsets inside it), and the write
/// guard (panicking) that every guest write lands in a receive buffer or the ring.
pub fn e1000(data: &[u8]) {
    set_guard_mode(GuardMode::Panic);
    let mut input = Input::new(data);
    let mem = dma_memory();
    let clock = Arc::new(AtomicU64::new(0));
    let mut nic = E1000::new(
        [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        E1000Resources {
            mmio_base: 0xc000_0000,
            io_base: NIC_IO_BASE,
            irq_line: 11,
        },
        mem.clone(),
        Box::new(NoIrq),
        Box::new(NoIrq),
        Box::new(CheckedSink),
        Box::new(FuzzClock(clock.clone())),
    );
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let op = input.u8();
        match op & 3 {
            0 => {
                let io = op & 8 != 0;
                let len = [1, 2, 4, 8][usize::from((op >> 4) & 3)];
                let size = if io {
                    u64::from(E1000_IO_SIZE)
                } else {
                    E1000_MMIO_SIZE
                };
                let offset = u64::from(input.u32()) % size;
                let value = input.u64().to_le_bytes();
                let bar = usize::from(io);
                let mut buf = [0u8; 8];
                if op & 4 != 0 {
                    nic.bar_write(bar, offset, &value[..len]);
                } else {
                    nic.bar_read(bar, offset, &mut buf[..len]);
                }
            }
            1 => {
                let hdr = VnetHdr::from_bytes(&{
                    let mut h = [0u8; 12];
                    let b = input.bytes(10);
                    h[..b.len()].copy_from_slice(b);
                    h
                });
                let frame = input.blob();
                nic.receive(&hdr, &frame[..frame.len().min(MAX_E1000_RX_FRAME)]);
            }
            2 => {
                clock.fetch_add(u64::from(input.u16()) * 1000, Ordering::Relaxed);
                nic.on_timer();
            }
            _ => poke(&mut input, &mem),
        }
    }
}
