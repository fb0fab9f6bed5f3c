//! Targets for the emulated devices: sequences of port accesses, decoded from the input,
//! against the pure state machines (no bus, no KVM), as a driver or a hostile guest makes
//! them. Every access is 1, 2 or 4 bytes, like a KVM port I/O exit.

use std::sync::{Arc, Mutex};

use super::{Input, MemDisk};
use crate::arch::x86_64::layout::{PCI_IO_WINDOW_LEN, PCI_IO_WINDOW_START};
use crate::devices::bus::BusDevice;
use crate::devices::emulated::ide::{AtaDisk, IdeChannel};
use crate::devices::emulated::ne2k::{FrameSink, Ne2k, BAR_SIZE, MAX_FRAME};
use crate::devices::emulated::nic_tap::VnetHdr;
use crate::devices::emulated::Signal;
use crate::devices::pci::piix;
use crate::devices::pci::{BarSpace, PciBus, PciDevice, PciWindow};

/// Accesses one input makes at most (the state machines do bounded work per access).
const MAX_OPS: usize = 4096;
/// Sectors of the fuzzed IDE disks.
pub const IDE_DISK_SECTORS: u64 = 64;
/// Where the NE2000's BAR starts before the guest moves it.
const NIC_IO_BASE: u32 = PCI_IO_WINDOW_START as u32;

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
/// bridge and IDE function, the NIC in slot 2): configuration mechanism #1 and the I/O
/// window, which forwards to whatever the BARs decode after the guest reprogrammed them.
///
/// Accesses: `op u8` (bit 0 write, bits 1-2 size, bit 3 the I/O window instead of
/// 0xcf8-0xcff), `offset u16`, `value u32`.
pub fn pci(data: &[u8]) {
    let mut input = Input::new(data);
    let mut bus = PciBus::new();
    bus.add(0, 0, Arc::new(Mutex::new(piix::host_bridge())));
    bus.add(1, 0, Arc::new(Mutex::new(piix::piix3_isa_bridge())));
    bus.add(1, 1, Arc::new(Mutex::new(piix::piix3_ide(true, true))));
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
