//! An NE2000-compatible NIC as the RTL8029 PCI card (10ec:8029) the stock `ne2k-pci` driver
//! knows: a National DP8390 register file (three pages), remote DMA through the data port,
//! a 32 KiB packet buffer with the receive ring, and the station address PROM.
//!
//! The register behaviour follows the DP8390D datasheet (NS, 1995): the command register
//! and its page select, interrupt status bits that the driver acknowledges by writing ones,
//! remote DMA with RDC on completion, the receive ring between PSTART and PSTOP with a 4-byte
//! header per frame, and the ring's BNRY/CURR pointers. A driver that programs nonsense
//! (pointers outside the buffer, a ring with PSTART >= PSTOP, a transmit longer than a
//! frame) gets the chip's error bits; memory outside the buffer reads as all ones.
//!
//! Frames arrive from the event loop through `receive`; a full ring keeps the frame with the
//! caller (no drop) and `rx_space` signals when the driver frees space (writes BNRY).

use log::{debug, warn};

use std::sync::Arc;

pub use super::nic_tap::{FrameSink, RxOutcome};
use super::nic_tap::{TapReceiver, VnetHdr};
use super::Signal;
use crate::devices::metrics::DeviceMetrics;
use crate::devices::pci::{PciConfig, PciDevice};

// Command register.
const CR_STP: u8 = 0x01;
const CR_STA: u8 = 0x02;
const CR_TXP: u8 = 0x04;
const CR_RD_MASK: u8 = 0x38;
const CR_RD_READ: u8 = 0x08;
const CR_RD_WRITE: u8 = 0x10;
const CR_PS_SHIFT: u8 = 6;

// Interrupt status/mask bits.
pub const ISR_PRX: u8 = 0x01;
pub const ISR_PTX: u8 = 0x02;
pub const ISR_TXE: u8 = 0x08;
pub const ISR_OVW: u8 = 0x10;
pub const ISR_RDC: u8 = 0x40;
pub const ISR_RST: u8 = 0x80;

// Receive configuration.
const RCR_AB: u8 = 0x04;
const RCR_AM: u8 = 0x08;
const RCR_PRO: u8 = 0x10;
// Receive status.
const RSR_PRX: u8 = 0x01;
const RSR_PHY: u8 = 0x20;
// Transmit status.
const TSR_PTX: u8 = 0x01;
const TSR_ABT: u8 = 0x08;
// Data configuration: word transfer select.
const DCR_WTS: u8 = 0x01;

/// NE2000 buffer memory: 16 KiB pages 0x40-0x7f... up to 0xc0, i.e. 0x4000-0xbfff.
const MEM_START: usize = 0x4000;
const MEM_END: usize = 0xc000;
const PAGE: usize = 256;
/// The PROM sits at remote address 0, each byte doubled (word mode).
const PROM_LEN: usize = 32;
/// Longest frame (without FCS) the chip sends; longer transmits abort.
pub const MAX_FRAME: usize = 1514;
const MIN_FRAME: usize = 60;

// BAR0 layout (ne2k-pci.c): the 8390 registers, the data port, the reset port.
const DATA_PORT: u64 = 0x10;
const RESET_PORT: u64 = 0x1f;
/// The data port (offset and length in BAR0), whose writes may be coalesced by KVM: during a
/// remote write they only fill buffer memory, which the guest cannot see before it reads a
/// register (ISR for RDC, or the data port itself), an exit that applies them first.
pub const COALESCED_PORTS: (u16, u32) = (DATA_PORT as u16, 8);
/// Size of the I/O BAR.
pub const BAR_SIZE: u32 = 0x20;

/// Register names by offset in BAR0, for the exit accounting (registers 1-15 change
/// meaning with the page select; they are counted together).
pub fn register_name(offset: u64) -> &'static str {
    match offset {
        0 => "cr",
        7 => "isr",
        1..=0x0f => "dp8390",
        DATA_PORT..=0x17 => "data",
        0x18..=RESET_PORT => "reset",
        _ => "",
    }
}

/// Traffic and event counts for accounting.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NicCounters {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_errors: u64,
    pub interrupts: u64,
}

/// The DP8390 core with its NE2000 buffer memory.
pub struct Ne2k {
    cr: u8,
    pstart: u8,
    pstop: u8,
    bnry: u8,
    tpsr: u8,
    tbcr: u16,
    isr: u8,
    rsar: u16,
    rbcr: u16,
    rcr: u8,
    tcr: u8,
    dcr: u8,
    imr: u8,
    par: [u8; 6],
    curr: u8,
    mar: [u8; 8],
    tsr: u8,
    rsr: u8,
    mem: Vec<u8>,
    irq: Box<dyn Signal>,
    rx_space: Box<dyn Signal>,
    /// A frame was refused for lack of space: signal `rx_space` when BNRY moves.
    rx_blocked: bool,
    sink: Box<dyn FrameSink>,
    config: PciConfig,
    pub counters: NicCounters,
    metrics: Arc<DeviceMetrics>,
}

/// The chip's state for snapshots: the register file and the 16 KiB buffer memory
/// (receive ring and transmit buffers included). The PCI configuration space goes with the
/// bus.
#[derive(serde::Serialize, serde::Deserialize)]
struct Ne2kSnapshot {
    /// cr pstart pstop bnry tpsr isr rcr tcr dcr imr curr tsr rsr
    regs: [u8; 13],
    tbcr: u16,
    rsar: u16,
    rbcr: u16,
    par: [u8; 6],
    mar: [u8; 8],
    mem: Vec<u8>,
    rx_blocked: bool,
}

impl crate::devices::Persist for Ne2k {
    fn save(&mut self) -> Result<serde_json::Value, String> {
        crate::devices::to_state(&Ne2kSnapshot {
            regs: [
                self.cr,
                self.pstart,
                self.pstop,
                self.bnry,
                self.tpsr,
                self.isr,
                self.rcr,
                self.tcr,
                self.dcr,
                self.imr,
                self.curr,
                self.tsr,
                self.rsr,
            ],
            tbcr: self.tbcr,
            rsar: self.rsar,
            rbcr: self.rbcr,
            par: self.par,
            mar: self.mar,
            mem: self.mem.clone(),
            rx_blocked: self.rx_blocked,
        })
    }

    fn restore(&mut self, v: &serde_json::Value) -> Result<(), String> {
        let s: Ne2kSnapshot = crate::devices::from_state(v)?;
        if s.mem.len() != self.mem.len() {
            return Err(format!("NE2000 buffer memory of {} bytes", s.mem.len()));
        }
        let r = s.regs;
        (
            self.cr,
            self.pstart,
            self.pstop,
            self.bnry,
            self.tpsr,
            self.isr,
            self.rcr,
        ) = (r[0], r[1], r[2], r[3], r[4], r[5], r[6]);
        (self.tcr, self.dcr, self.imr, self.curr, self.tsr, self.rsr) =
            (r[7], r[8], r[9], r[10], r[11], r[12]);
        self.tbcr = s.tbcr;
        self.rsar = s.rsar;
        self.rbcr = s.rbcr;
        self.par = s.par;
        self.mar = s.mar;
        self.mem = s.mem;
        self.rx_blocked = s.rx_blocked;
        Ok(())
    }

    /// A receive the old process had held back waits for room: look again; and an
    /// interrupt pending in ISR is raised again.
    fn kick(&mut self) {
        self.rx_space.signal();
        if self.isr & self.imr != 0 {
            self.irq.signal();
        }
    }
}

impl Ne2k {
    /// A NIC with station address `mac`, BAR0 at `io_base`, INTA routed to `irq_line`.
    pub fn new(
        mac: [u8; 6],
        io_base: u32,
        irq_line: u8,
        irq: Box<dyn Signal>,
        rx_space: Box<dyn Signal>,
        sink: Box<dyn FrameSink>,
    ) -> Self {
        let mut mem = vec![0u8; MEM_END];
        let mut prom = [0u8; 16];
        prom[..6].copy_from_slice(&mac);
        // 'W' 'W' at the end marks a word-wide (NE2000, not NE1000) card.
        prom[14] = 0x57;
        prom[15] = 0x57;
        for (i, b) in prom.iter().enumerate() {
            mem[2 * i] = *b;
            mem[2 * i + 1] = *b;
        }
        let mut config = PciConfig::new(0x10ec, 0x8029, 0x02, 0x00, 0x00, 0);
        config.set_io_bar(0, BAR_SIZE, io_base);
        config.set_interrupt(1, irq_line);
        Self {
            cr: CR_STP | 0x20,
            pstart: 0,
            pstop: 0,
            bnry: 0,
            tpsr: 0,
            tbcr: 0,
            isr: ISR_RST,
            rsar: 0,
            rbcr: 0,
            rcr: 0,
            tcr: 0,
            dcr: 0,
            imr: 0,
            par: [0; 6],
            curr: 0,
            mar: [0; 8],
            tsr: 0,
            rsr: 0,
            mem,
            irq,
            rx_space,
            rx_blocked: false,
            sink,
            config,
            counters: NicCounters::default(),
            metrics: DeviceMetrics::unnamed(),
        }
    }

    /// Counts interrupts and traffic into `metrics` as well.
    pub fn with_metrics(mut self, metrics: Arc<DeviceMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    fn page(&self) -> u8 {
        self.cr >> CR_PS_SHIFT
    }

    fn update_irq(&mut self) {
        if self.isr & self.imr & 0x7f != 0 {
            self.counters.interrupts += 1;
            self.metrics.add_interrupt();
            self.irq.signal();
        }
    }

    fn set_isr(&mut self, bits: u8) {
        let new = bits & !self.isr;
        self.isr |= bits;
        if new & self.imr != 0 {
            self.counters.interrupts += 1;
            self.metrics.add_interrupt();
            self.irq.signal();
        }
    }

    fn reset(&mut self) {
        self.cr = CR_STP | 0x20;
        self.isr = ISR_RST;
        self.imr = 0;
        self.rbcr = 0;
    }

    /// Buffer memory as remote DMA sees it; outside the PROM and the buffer reads all ones.
    fn mem_read(&self, addr: usize) -> u8 {
        if addr < PROM_LEN || (MEM_START..MEM_END).contains(&addr) {
            self.mem[addr]
        } else {
            0xff
        }
    }

    fn mem_write(&mut self, addr: usize, v: u8) {
        if (MEM_START..MEM_END).contains(&addr) {
            self.mem[addr] = v;
        }
    }

    /// Remote DMA through the data port: `width` bytes per access (2 in word mode for byte
    /// and word accesses, as the card's bus interface does; 4 for dword accesses).
    fn dma_read(&mut self, data: &mut [u8]) {
        let width = self.dma_width(data.len());
        let mut tmp = [0xffu8; 4];
        if self.cr & CR_RD_MASK == CR_RD_READ && self.rbcr > 0 {
            for b in tmp.iter_mut().take(width) {
                *b = self.mem_read(usize::from(self.rsar));
                self.dma_advance();
            }
        }
        for (i, d) in data.iter_mut().enumerate() {
            *d = tmp[i.min(3)];
        }
    }

    fn dma_write(&mut self, data: &[u8]) {
        if self.cr & CR_RD_MASK != CR_RD_WRITE || self.rbcr == 0 {
            debug!("ne2k: data port write with no remote write in progress; ignored");
            return;
        }
        let width = self.dma_width(data.len());
        for i in 0..width {
            let v = data.get(i).copied().unwrap_or(0);
            self.mem_write(usize::from(self.rsar), v);
            self.dma_advance();
        }
    }

    fn dma_width(&self, access: usize) -> usize {
        match (access, self.dcr & DCR_WTS != 0) {
            (4, _) => 4,
            (_, true) => 2,
            _ => 1,
        }
    }

    fn dma_advance(&mut self) {
        if self.rbcr == 0 {
            return;
        }
        self.rsar = self.rsar.wrapping_add(1);
        // Remote reads of the receive ring wrap like the ring does.
        if self.pstop > self.pstart && self.rsar == u16::from(self.pstop) << 8 {
            self.rsar = u16::from(self.pstart) << 8;
        }
        self.rbcr -= 1;
        if self.rbcr == 0 {
            self.set_isr(ISR_RDC);
        }
    }

    fn write_cr(&mut self, v: u8) {
        self.cr = v;
        if v & CR_STP != 0 {
            self.isr |= ISR_RST;
            return;
        }
        self.isr &= !ISR_RST;
        let rd = v & CR_RD_MASK;
        if (rd == CR_RD_READ || rd == CR_RD_WRITE) && self.rbcr == 0 {
            // A zero-length remote DMA completes at once.
            self.set_isr(ISR_RDC);
        }
        if v & CR_TXP != 0 && v & CR_STA != 0 {
            self.transmit();
        }
    }

    fn transmit(&mut self) {
        let start = usize::from(self.tpsr) * PAGE;
        let len = usize::from(self.tbcr);
        let end = start + len;
        self.cr &= !CR_TXP;
        if len > MAX_FRAME + 4 || start < MEM_START || end > MEM_END || len == 0 {
            warn!("ne2k: transmit of {len} bytes at {start:#x} refused (oversized or outside the buffer)");
            self.counters.tx_errors += 1;
            self.tsr = TSR_ABT;
            self.set_isr(ISR_TXE);
            return;
        }
        // A 4-byte slack for an FCS the driver may count is not sent.
        let frame_len = len.min(MAX_FRAME);
        let frame = self.mem[start..start + frame_len].to_vec();
        // Zero header: the NE2000 knows no offloads.
        match self.sink.send(&VnetHdr::default(), &frame) {
            Ok(()) => {
                self.counters.tx_frames += 1;
                self.counters.tx_bytes += frame_len as u64;
                self.metrics.add_bytes_from_guest(frame_len as u64);
                self.tsr = TSR_PTX;
                self.set_isr(ISR_PTX);
            }
            Err(e) => {
                // Counted in tx_errors; only the first failure of a run is worth a line (a
                // deleted TAP fails every frame, and says so itself).
                if self.counters.tx_errors == 0 {
                    warn!("ne2k: sending a frame failed: {e} (later failures are counted, not logged)");
                }
                self.counters.tx_errors += 1;
                self.tsr = TSR_ABT;
                self.set_isr(ISR_TXE);
            }
        }
    }

    fn accepts(&self, frame: &[u8]) -> bool {
        if self.rcr & RCR_PRO != 0 {
            return true;
        }
        let dst = &frame[..6];
        if dst == [0xff; 6] {
            return self.rcr & RCR_AB != 0;
        }
        if dst[0] & 1 != 0 {
            if self.rcr & RCR_AM == 0 {
                return false;
            }
            let bit = multicast_bit(dst);
            return self.mar[bit >> 3] & (1 << (bit & 7)) != 0;
        }
        dst == self.par
    }

    /// Offers one received frame (without FCS) to the NIC.
    pub fn receive(&mut self, frame: &[u8]) -> RxOutcome {
        if self.cr & CR_STP != 0 || frame.len() < 14 || frame.len() > MAX_FRAME + 4 {
            self.counters.rx_dropped += 1;
            return RxOutcome::Dropped;
        }
        if !self.accepts(frame) {
            return RxOutcome::Dropped;
        }
        let (pstart, pstop) = (usize::from(self.pstart), usize::from(self.pstop));
        if pstart >= pstop || pstart * PAGE < MEM_START || pstop * PAGE > MEM_END {
            warn!("ne2k: receive ring {pstart:#x}..{pstop:#x} is not inside the buffer; frame dropped");
            self.counters.rx_dropped += 1;
            return RxOutcome::Dropped;
        }
        let curr = usize::from(self.curr);
        if !(pstart..pstop).contains(&curr) {
            self.counters.rx_dropped += 1;
            return RxOutcome::Dropped;
        }
        let padded = frame.len().max(MIN_FRAME);
        let total = padded + 4;
        // Room for the FCS the chip stores after the data (we have none to store): the driver
        // checks the header's next-page pointer against 1 + (count >> 8), which only
        // matches a frame laid out with those 4 bytes.
        let pages = (total + 4).div_ceil(PAGE);
        // Free pages between CURR and BNRY; one page stays empty so CURR never meets BNRY.
        let ring = pstop - pstart;
        let bnry = usize::from(self.bnry).clamp(pstart, pstop - 1);
        let used = (curr + ring - bnry) % ring;
        let free = ring - used;
        if pages >= free {
            // Real hardware would drop the frame and raise OVW, whose recovery in the driver
            // stops the chip for milliseconds; holding the frame back costs the guest nothing.
            // The frames in the ring are announced again in case the driver missed them.
            self.rx_blocked = true;
            self.set_isr(ISR_PRX);
            return RxOutcome::NoSpace;
        }
        let mut next = curr + pages;
        if next >= pstop {
            next -= ring;
        }
        let status = RSR_PRX | if frame[0] & 1 != 0 { RSR_PHY } else { 0 };
        let header = [status, next as u8, total as u8, (total >> 8) as u8];
        let mut addr = curr * PAGE;
        let mut put = |b: u8| {
            self.mem[addr] = b;
            addr += 1;
            if addr == pstop * PAGE {
                addr = pstart * PAGE;
            }
        };
        for b in header
            .iter()
            .chain(frame.iter())
            .copied()
            .chain(std::iter::repeat_n(0, padded - frame.len()))
        {
            put(b);
        }
        self.curr = next as u8;
        self.rsr = status;
        self.counters.rx_frames += 1;
        self.counters.rx_bytes += frame.len() as u64;
        self.metrics.add_bytes_to_guest(frame.len() as u64);
        self.set_isr(ISR_PRX);
        RxOutcome::Accepted
    }

    /// Whether the receive ring holds frames the driver has not consumed: the page after
    /// BNRY (the driver's last read page) is not CURR (the chip's next write page).
    fn ring_has_frames(&self) -> bool {
        if self.pstart >= self.pstop || self.cr & CR_STP != 0 {
            return false;
        }
        let mut next = self.bnry.wrapping_add(1);
        if next >= self.pstop || next < self.pstart {
            next = self.pstart;
        }
        next != self.curr
    }

    /// Reads an 8390 register (`offset` 0-15) in the current page.
    fn read_reg(&mut self, offset: u64) -> u8 {
        if offset == 0 {
            return self.cr;
        }
        match (self.page(), offset) {
            (0, 3) => self.bnry,
            (0, 4) => self.tsr,
            (0, 7) => self.isr,
            (0, 8) => self.rsar as u8,
            (0, 9) => (self.rsar >> 8) as u8,
            // RTL8029 identification: 'P', 'C'.
            (0, 0x0a) => 0x50,
            (0, 0x0b) => 0x43,
            (0, 0x0c) => self.rsr,
            (0, _) => 0,
            (1, 1..=6) => self.par[offset as usize - 1],
            (1, 7) => self.curr,
            (1, 8..=15) => self.mar[offset as usize - 8],
            (2, 1) => self.pstart,
            (2, 2) => self.pstop,
            (2, 4) => self.tpsr,
            (2, 0x0c) => self.rcr,
            (2, 0x0d) => self.tcr,
            (2, 0x0e) => self.dcr,
            (2, 0x0f) => self.imr,
            _ => 0xff,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u8) {
        if offset == 0 {
            self.write_cr(v);
            return;
        }
        match (self.page(), offset) {
            (0, 1) => self.pstart = v,
            (0, 2) => self.pstop = v,
            (0, 3) => {
                self.bnry = v;
                if self.rx_blocked {
                    self.rx_blocked = false;
                    self.rx_space.signal();
                }
            }
            (0, 4) => self.tpsr = v,
            (0, 5) => self.tbcr = (self.tbcr & 0xff00) | u16::from(v),
            (0, 6) => self.tbcr = (self.tbcr & 0x00ff) | u16::from(v) << 8,
            (0, 7) => {
                // Writing ones acknowledges; RST is read-only. PRX stays set while the ring
                // holds frames the driver has not read: a frame that lands between the
                // driver's last look at CURR and its acknowledgement would otherwise sit
                // unseen, and with the ring full no new frame would ever announce it.
                self.isr &= !(v & 0x7f);
                if self.ring_has_frames() {
                    self.isr |= ISR_PRX;
                }
                self.update_irq();
            }
            (0, 8) => self.rsar = (self.rsar & 0xff00) | u16::from(v),
            (0, 9) => self.rsar = (self.rsar & 0x00ff) | u16::from(v) << 8,
            (0, 0x0a) => self.rbcr = (self.rbcr & 0xff00) | u16::from(v),
            (0, 0x0b) => self.rbcr = (self.rbcr & 0x00ff) | u16::from(v) << 8,
            (0, 0x0c) => self.rcr = v,
            (0, 0x0d) => self.tcr = v,
            (0, 0x0e) => self.dcr = v,
            (0, 0x0f) => {
                self.imr = v;
                self.update_irq();
            }
            (1, 1..=6) => self.par[offset as usize - 1] = v,
            (1, 7) => self.curr = v,
            (1, 8..=15) => self.mar[offset as usize - 8] = v,
            (page, _) => {
                debug!("ne2k: write of {v:#04x} to page {page} register {offset:#x} ignored")
            }
        }
    }
}

/// The multicast hash index: the top 6 bits of the big-endian CRC-32 of the address, the
/// same function Linux's 8390 driver uses to fill MAR (`ether_crc(ETH_ALEN, addr) >> 26`).
fn multicast_bit(addr: &[u8]) -> usize {
    let mut crc = 0xffff_ffffu32;
    for &byte in addr {
        let mut d = byte;
        for _ in 0..8 {
            let carry = ((crc >> 31) as u8 ^ d) & 1;
            crc <<= 1;
            d >>= 1;
            if carry != 0 {
                crc = (crc ^ 0x04c1_1db6) | 1;
            }
        }
    }
    (crc >> 26) as usize
}

impl TapReceiver for Ne2k {
    fn receive_from_tap(&mut self, _hdr: &VnetHdr, frame: &[u8]) -> RxOutcome {
        self.receive(frame)
    }
}

impl PciDevice for Ne2k {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        match offset {
            0..=0x0f => {
                data.fill(0);
                data[0] = self.read_reg(offset);
            }
            DATA_PORT..=0x17 => self.dma_read(data),
            0x18..=RESET_PORT => {
                // Reading the reset port resets the chip (ne2k_pci_reset_8390).
                self.reset();
                data.fill(0);
            }
            _ => data.fill(0xff),
        }
    }

    fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) {
        match offset {
            0..=0x0f => self.write_reg(offset, data[0]),
            DATA_PORT..=0x17 => self.dma_write(data),
            0x18..=RESET_PORT => {}
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Counter(Arc<AtomicU32>);
    impl Signal for Counter {
        fn signal(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<Vec<u8>>>>);
    impl FrameSink for Sink {
        fn send(&mut self, _hdr: &VnetHdr, frame: &[u8]) -> std::io::Result<()> {
            self.0.lock().unwrap().push(frame.to_vec());
            Ok(())
        }
    }

    const MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];

    struct H {
        nic: Ne2k,
        irqs: Arc<AtomicU32>,
        space: Arc<AtomicU32>,
        sent: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    impl H {
        fn new() -> Self {
            let irq = Counter::default();
            let space = Counter::default();
            let sink = Sink::default();
            let (irqs, sp, sent) = (irq.0.clone(), space.0.clone(), sink.0.clone());
            H {
                nic: Ne2k::new(
                    MAC,
                    0xc000,
                    10,
                    Box::new(irq),
                    Box::new(space),
                    Box::new(sink),
                ),
                irqs,
                space: sp,
                sent,
            }
        }
        fn w(&mut self, off: u64, v: u8) {
            self.nic.bar_write(0, off, &[v]);
        }
        fn r(&mut self, off: u64) -> u8 {
            let mut b = [0u8];
            self.nic.bar_read(0, off, &mut b);
            b[0]
        }
        fn rw(&mut self) -> u16 {
            let mut b = [0u8; 2];
            self.nic.bar_read(0, DATA_PORT, &mut b);
            u16::from_le_bytes(b)
        }

        /// What ne2k-pci's probe and NS8390_init do: word mode, ring 0x46-0x80, start.
        fn init(&mut self) {
            self.w(0, 0x21); // page 0, no DMA, stop
            self.w(0x0e, 0x49); // DCR: word mode
            self.w(0x0a, 0);
            self.w(0x0b, 0);
            self.w(0x0c, RCR_AB); // accept broadcast
            self.w(0x0d, 0x02); // loopback while setting up
            self.w(0x04, 0x40); // TPSR
            self.w(0x01, 0x46); // PSTART
            self.w(0x03, 0x46); // BNRY
            self.w(0x02, 0x80); // PSTOP
            self.w(0x07, 0xff); // clear ISR
            self.w(0x0f, 0x00);
            self.w(0, 0x61); // page 1, stop
            for (i, b) in MAC.iter().enumerate() {
                self.w(1 + i as u64, *b);
            }
            self.w(0x07, 0x47); // CURR = PSTART + 1
            self.w(0, 0x22); // page 0, start
            self.w(0x0d, 0x00);
            self.w(0x0f, 0x3f); // IMR: all but RDC
        }

        fn remote_read(&mut self, addr: u16, len: u16) -> Vec<u8> {
            self.w(0x0a, len as u8);
            self.w(0x0b, (len >> 8) as u8);
            self.w(0x08, addr as u8);
            self.w(0x09, (addr >> 8) as u8);
            self.w(0, 0x0a); // remote read, start
            let mut out = Vec::new();
            for _ in 0..len.div_ceil(2) {
                out.extend_from_slice(&self.rw().to_le_bytes());
            }
            out.truncate(len as usize);
            out
        }
    }

    fn frame(dst: [u8; 6], len: usize) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 9, 0x08, 0x00]);
        f.extend((0..len - 14).map(|i| i as u8));
        f
    }

    #[test]
    fn pci_identity_is_an_rtl8029() {
        let h = H::new();
        let c = h.nic.config();
        assert_eq!(c.get32(0), 0x8029_10ec);
        assert_eq!(c.io_bar(0), Some((0xc000, 0x20)));
        let mut pin = [0u8; 2];
        c.read(0x3c, &mut pin);
        assert_eq!(pin, [10, 1]);
    }

    #[test]
    fn station_prom_reads_the_mac_the_way_ne2k_pci_does() {
        let mut h = H::new();
        h.w(0, 0x21);
        h.w(0x0e, 0x49); // word mode
        h.w(0x0a, 32);
        h.w(0x0b, 0);
        h.w(0x08, 0);
        h.w(0x09, 0);
        h.w(0, 0x0a);
        // ne2k-pci reads 32 bytes with inb; each byte access moves a word in word mode.
        let prom: Vec<u8> = (0..32).map(|_| h.r(DATA_PORT)).collect();
        assert_eq!(&prom[..6], &MAC);
        assert_eq!(&prom[14..16], &[0x57, 0x57]);
    }

    #[test]
    fn reset_port_sets_isr_rst() {
        let mut h = H::new();
        h.init();
        assert_eq!(h.r(0x07) & ISR_RST, 0);
        let v = h.r(RESET_PORT);
        h.w(RESET_PORT, v);
        assert_ne!(h.r(0x07) & ISR_RST, 0);
    }

    #[test]
    fn transmit_sends_the_frame_from_buffer_memory() {
        let mut h = H::new();
        h.init();
        let f = frame([0xff; 6], 100);
        // Remote write of the frame to page 0x40.
        h.w(0x0a, 100);
        h.w(0x0b, 0);
        h.w(0x08, 0);
        h.w(0x09, 0x40);
        h.w(0, 0x12); // remote write, start
        for pair in f.chunks(2) {
            h.nic.bar_write(0, DATA_PORT, pair);
        }
        assert_ne!(h.r(0x07) & ISR_RDC, 0, "remote DMA complete");
        h.w(0x07, ISR_RDC);
        h.w(0x04, 0x40);
        h.w(0x05, 100);
        h.w(0x06, 0);
        let before = h.irqs.load(Ordering::SeqCst);
        h.w(0, 0x26); // start + transmit
        assert_eq!(*h.sent.lock().unwrap(), vec![f]);
        assert_ne!(h.r(0x07) & ISR_PTX, 0);
        assert_eq!(h.r(0x04) & TSR_PTX, TSR_PTX);
        assert_eq!(h.r(0) & CR_TXP, 0, "TXP clears when done");
        assert_eq!(h.irqs.load(Ordering::SeqCst), before + 1);
    }

    #[test]
    fn oversized_or_misplaced_transmit_is_aborted() {
        let mut h = H::new();
        h.init();
        h.w(0x04, 0x40);
        h.w(0x05, 0x00);
        h.w(0x06, 0x10); // 4096 bytes
        h.w(0, 0x26);
        assert_ne!(h.r(0x07) & ISR_TXE, 0);
        assert_eq!(h.r(0x04) & TSR_ABT, TSR_ABT);
        h.w(0x07, 0xff);
        h.w(0x04, 0xf0); // outside the buffer
        h.w(0x05, 64);
        h.w(0x06, 0);
        h.w(0, 0x26);
        assert_ne!(h.r(0x07) & ISR_TXE, 0);
        assert!(h.sent.lock().unwrap().is_empty());
        assert_eq!(h.nic.counters.tx_errors, 2);
    }

    #[test]
    fn receive_fills_the_ring_with_header_and_the_driver_reads_it_back() {
        let mut h = H::new();
        h.init();
        let f = frame(MAC, 300);
        assert_eq!(h.nic.receive(&f), RxOutcome::Accepted);
        assert_ne!(h.r(0x07) & ISR_PRX, 0);
        h.w(0, 0x62);
        let curr = h.r(0x07);
        h.w(0, 0x22);
        assert_eq!(curr, 0x47 + 2, "304 bytes take two pages");
        let hdr = h.remote_read(0x4700, 4);
        assert_eq!(hdr, vec![RSR_PRX, 0x49, 0x30, 0x01]);
        let body = h.remote_read(0x4704, 300);
        assert_eq!(body, f);
    }

    #[test]
    fn short_frames_are_padded_to_60_bytes() {
        let mut h = H::new();
        h.init();
        assert_eq!(h.nic.receive(&frame(MAC, 42)), RxOutcome::Accepted);
        let hdr = h.remote_read(0x4700, 4);
        assert_eq!(u16::from_le_bytes([hdr[2], hdr[3]]), 64);
    }

    #[test]
    fn frames_wrap_around_the_end_of_the_ring() {
        let mut h = H::new();
        h.init();
        // Put CURR and BNRY near the end of the ring.
        h.w(0x03, 0x7e);
        h.w(0, 0x62);
        h.w(0x07, 0x7f);
        h.w(0, 0x22);
        let f = frame(MAC, 600);
        assert_eq!(h.nic.receive(&f), RxOutcome::Accepted);
        h.w(0, 0x62);
        assert_eq!(h.r(0x07), 0x46 + 2, "604 bytes: pages 0x7f, 0x46, 0x47");
        h.w(0, 0x22);
        // Remote read wraps at PSTOP like the ring.
        assert_eq!(h.remote_read(0x7f04, 600), f);
    }

    #[test]
    fn full_ring_keeps_the_frame_and_signals_space_when_bnry_moves() {
        let mut h = H::new();
        h.init();
        let f = frame(MAC, 1500);
        let mut accepted = 0;
        while h.nic.receive(&f) == RxOutcome::Accepted {
            accepted += 1;
            assert!(accepted < 100);
        }
        assert_eq!(
            accepted,
            (0x80 - 0x46 - 1) / 6,
            "six pages per 1504-byte frame"
        );
        assert_eq!(h.r(0x07) & ISR_OVW, 0, "no overrun: the frame waits");
        // The driver acknowledged PRX at some point but the ring is full: PRX stays.
        h.w(0x07, ISR_PRX);
        assert_ne!(h.r(0x07) & ISR_PRX, 0, "unread frames keep PRX set");
        assert_eq!(h.space.load(Ordering::SeqCst), 0);
        h.w(0x03, 0x46 + 12);
        assert_eq!(h.space.load(Ordering::SeqCst), 1);
        assert_eq!(h.nic.receive(&f), RxOutcome::Accepted);
    }

    #[test]
    fn address_filter() {
        let mut h = H::new();
        h.init();
        assert_eq!(
            h.nic.receive(&frame([0x02, 9, 9, 9, 9, 9], 60)),
            RxOutcome::Dropped
        );
        assert_eq!(
            h.nic.receive(&frame([0xff; 6], 60)),
            RxOutcome::Accepted,
            "broadcast"
        );
        assert_eq!(
            h.nic.receive(&frame([0x01, 0, 0x5e, 0, 0, 1], 60)),
            RxOutcome::Dropped,
            "multicast off"
        );
        h.w(0x0c, RCR_PRO);
        assert_eq!(
            h.nic.receive(&frame([0x02, 9, 9, 9, 9, 9], 60)),
            RxOutcome::Accepted
        );
    }

    #[test]
    fn stopped_nic_or_bad_ring_drops() {
        let mut h = H::new();
        assert_eq!(
            h.nic.receive(&frame(MAC, 60)),
            RxOutcome::Dropped,
            "stopped after reset"
        );
        h.init();
        h.w(0, 0x21);
        h.w(0x01, 0x90); // PSTART above PSTOP
        h.w(0, 0x22);
        assert_eq!(h.nic.receive(&frame(MAC, 60)), RxOutcome::Dropped);
        assert_eq!(
            h.nic.receive(&vec![0u8; 3000]),
            RxOutcome::Dropped,
            "oversized"
        );
    }

    #[test]
    fn memory_outside_the_buffer_reads_ones_and_ignores_writes() {
        let mut h = H::new();
        h.init();
        assert_eq!(h.remote_read(0xc000, 4), vec![0xff; 4]);
        assert_eq!(h.remote_read(0x2000, 2), vec![0xff; 2]);
        let before = h.nic.mem.clone();
        for page in [0xd0u8, 0x00, 0x20] {
            h.w(0x0a, 2);
            h.w(0x0b, 0);
            h.w(0x08, 0x00);
            h.w(0x09, page);
            h.w(0, 0x12);
            h.nic.bar_write(0, DATA_PORT, &[1, 2]);
        }
        assert!(
            h.nic.mem == before,
            "the PROM and the space around the buffer are not writable"
        );
    }

    /// Linux's ei_receive drops the whole ring when a header's next pointer is not
    /// 1 + (count >> 8) pages on (or one more): check it for every frame length.
    #[test]
    fn next_page_pointer_is_what_the_driver_expects_for_every_length() {
        for len in 14..=MAX_FRAME {
            let mut h = H::new();
            h.init();
            assert_eq!(h.nic.receive(&frame(MAC, len)), RxOutcome::Accepted);
            let hdr = h.remote_read(0x4700, 4);
            let count = usize::from(hdr[2]) | usize::from(hdr[3]) << 8;
            let expected = 0x47 + 1 + (count >> 8);
            let next = usize::from(hdr[1]);
            assert!(
                next == expected || next == expected + 1,
                "frame of {len} bytes: count {count}, next {next:#x}, driver expects {expected:#x}"
            );
        }
    }

    #[test]
    fn interrupts_follow_the_mask_and_acks() {
        let mut h = H::new();
        h.init();
        h.w(0x0f, 0); // mask all
        let before = h.irqs.load(Ordering::SeqCst);
        h.nic.receive(&frame(MAC, 60));
        assert_eq!(h.irqs.load(Ordering::SeqCst), before);
        h.w(0x0f, ISR_PRX); // unmasking a pending bit raises the line
        assert_eq!(h.irqs.load(Ordering::SeqCst), before + 1);
        // Acknowledged before the frame is read: PRX stays, and the line is raised again.
        h.w(0x07, ISR_PRX);
        assert_eq!(h.r(0x07) & ISR_PRX, ISR_PRX);
        assert_eq!(h.irqs.load(Ordering::SeqCst), before + 2);
        // The driver consumed the frame (BNRY = the page before CURR): the ack clears it.
        h.w(0x03, 0x47);
        h.w(0x07, ISR_PRX);
        assert_eq!(h.r(0x07) & ISR_PRX, 0);
    }

    #[test]
    fn multicast_frames_pass_only_with_their_hash_bit_set() {
        let addr = [0x01, 0x00, 0x5e, 0x00, 0x00, 0x01];
        let bit = multicast_bit(&addr);
        let mut h = H::new();
        h.init();
        h.w(0x0c, RCR_AM);
        h.w(0, 0x62);
        // Every bit but this one: still dropped.
        for i in 0..8u64 {
            let byte = if i as usize == bit >> 3 {
                !(1u8 << (bit & 7))
            } else {
                0xff
            };
            h.w(8 + i, byte);
        }
        h.w(0, 0x22);
        assert_eq!(h.nic.receive(&frame(addr, 60)), RxOutcome::Dropped);
        h.w(0, 0x62);
        h.w(8 + (bit >> 3) as u64, 0xff);
        h.w(0, 0x22);
        assert_eq!(h.nic.receive(&frame(addr, 60)), RxOutcome::Accepted);
    }
}
