//! An Intel 82540EM Gigabit Ethernet controller (PCI 8086:100e), the NIC QEMU's `pc` machine
//! and VirtualBox offer by default, as the stock Linux `e1000` driver drives it.
//!
//! The model follows the PCI/PCI-X Family of Gigabit Ethernet Controllers Software
//! Developer's Manual (Intel 317453, "8254x SDM"): the 128 KiB register file in memory BAR0
//! and its IOADDR/IODATA window in I/O BAR1 (13.2), the Microwire EEPROM behind EECD
//! (`eeprom`), the PHY behind MDIC (`phy`), the receive and transmit descriptor rings in
//! guest memory (3.2, 3.3; `rx`, `tx`), the checksum and TCP segmentation offloads
//! (`offload`), the interrupt cause and mask registers and interrupt moderation
//! (`moderation`), and the statistics registers (13.7).
//!
//! It is a pure state machine: register accesses come from the vCPUs (`PciDevice`), frames
//! from the event loop (`receive`), transmitted frames go to a `FrameSink`, the interrupt
//! line is a `Signal`, the moderation timers a `DelayTimer`. Guest memory is only touched
//! through `dma`, bounds-checked: a ring or buffer outside guest memory gets the hardware's
//! error handling (the frame dropped, an error bit, a counter), never a VMM crash, and
//! descriptors are written back only inside the ring.
//!
//! The interrupt: PCI INTx is a level, but ferrovm's INTx is an edge (an irqfd pulse,
//! declared edge/high in the MP table and the DSDT). The line "rises" whenever ICR & IMS
//! goes from zero to non-zero, including when an IMS write unmasks pending causes; the
//! driver's handler reads ICR (clearing it) every time, so no cause is left unseen.

mod eeprom;
pub mod host;
mod moderation;
pub mod offload;
mod phy;
pub mod regs;
mod rx;
mod tx;

use std::sync::Arc;

use log::{debug, warn};

use self::eeprom::Eeprom;
use self::moderation::Moderation;
use self::phy::Phy;
use self::regs::*;
use super::nic_tap::{FrameSink, RxOutcome, TapReceiver, VnetHdr};
use super::Signal;
use crate::devices::metrics::DeviceMetrics;
use crate::devices::pci::{PciConfig, PciDevice};
use crate::devices::virtio::guest_write::GuestWriter;
use crate::vstate::memory::GuestMemoryMmap;

pub use self::regs::{io_register_name, register_name, IO_SIZE, MMIO_SIZE};

/// Longest frame the NIC hands its sink: a TSO frame with a VLAN tag inserted.
pub const MAX_TX_FRAME: usize = tx::MAX_PACKET + 4;

/// PCI identity of the 82540EM (desktop adapter), as Linux's e1000_pci_tbl lists it.
pub const VENDOR_ID: u16 = 0x8086;
pub const DEVICE_ID: u16 = 0x100e;
const SUBSYSTEM_ID: u16 = 0x001e;
const REVISION: u8 = 0x03;

/// The model's clock and its one host timer, for the moderation delays.
pub trait DelayTimer: Send {
    /// Nanoseconds on a monotonic clock.
    fn now(&self) -> u64;
    /// Calls back (the device's `on_timer`) at `at` on that clock, or never (None).
    fn arm(&mut self, at: Option<u64>);
}

/// Traffic and event counts for accounting and tests.
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

/// One-time warnings, so a misbehaving driver does not flood the log.
#[derive(Default)]
struct Warned {
    rx_ring: bool,
    tx_ring: bool,
    rx_buffer: bool,
    tx_buffer: bool,
    tx_offload: bool,
    tx_send: bool,
}

/// The 82540EM.
pub struct E1000 {
    config: PciConfig,
    /// Registers whose writes are stored as they are (`regs::is_plain`), by offset / 4.
    plain: Vec<u32>,
    ctrl: u32,
    mdic: u32,
    icr: u32,
    ims: u32,
    itr: u32,
    rctl: u32,
    tctl: u32,
    rdlen: u32,
    rdh: u32,
    rdt: u32,
    rdtr: u32,
    radv: u32,
    tdlen: u32,
    tdh: u32,
    tdt: u32,
    tidv: u32,
    tadv: u32,
    /// The register IODATA reaches.
    ioaddr: u32,
    /// The statistics block, by (offset - STATS_START) / 4.
    stats: [u32; 64],
    eeprom: Eeprom,
    phy: Phy,
    moderation: Moderation,
    /// The line is up: an edge was sent and ICR & IMS has not been zero since.
    asserted: bool,
    /// The deadline the host timer is armed for.
    armed: Option<u64>,
    tx: tx::TxState,
    /// A frame was refused for lack of descriptors: signal `rx_space` when RDT moves.
    rx_blocked: bool,
    /// The received frame as it goes to guest memory (reused).
    rx_buf: Vec<u8>,
    mem: GuestMemoryMmap,
    /// The one way the NIC writes guest memory (see `devices::virtio::guest_write`).
    writer: GuestWriter,
    irq: Box<dyn Signal>,
    rx_space: Box<dyn Signal>,
    sink: Box<dyn FrameSink>,
    timer: Box<dyn DelayTimer>,
    warned: Warned,
    pub counters: NicCounters,
    metrics: Arc<DeviceMetrics>,
}

/// Where a device's BARs go and its INTA is routed.
#[derive(Debug, Clone, Copy)]
pub struct E1000Resources {
    /// Address of the 128 KiB memory BAR.
    pub mmio_base: u64,
    /// Address of the I/O BAR.
    pub io_base: u32,
    pub irq_line: u8,
}

/// The NIC's state for snapshots: the register file, the statistics, the EEPROM and PHY,
/// the transmit contexts and a packet being assembled, and the moderation timers with
/// their times relative to the moment of the snapshot (the restored process's clock starts
/// elsewhere). Receive and transmit finish inside the call that starts them, so nothing
/// is in flight. The PCI configuration space goes with the bus.
#[derive(serde::Serialize, serde::Deserialize)]
struct E1000Snapshot {
    plain: Vec<u32>,
    /// ctrl mdic icr ims itr rctl tctl rdlen rdh rdt rdtr radv tdlen tdh tdt tidv tadv ioaddr
    regs: [u32; 18],
    stats: Vec<u32>,
    eeprom: eeprom::EepromState,
    phy: Phy,
    moderation: Moderation,
    asserted: bool,
    tx: tx::TxState,
    rx_blocked: bool,
}

impl crate::devices::Persist for E1000 {
    fn save(&mut self) -> Result<serde_json::Value, String> {
        crate::devices::to_state(&E1000Snapshot {
            plain: self.plain.clone(),
            regs: [
                self.ctrl,
                self.mdic,
                self.icr,
                self.ims,
                self.itr,
                self.rctl,
                self.tctl,
                self.rdlen,
                self.rdh,
                self.rdt,
                self.rdtr,
                self.radv,
                self.tdlen,
                self.tdh,
                self.tdt,
                self.tidv,
                self.tadv,
                self.ioaddr,
            ],
            stats: self.stats.to_vec(),
            eeprom: self.eeprom.state(),
            phy: self.phy.clone(),
            moderation: self.moderation.relative_to(self.timer.now()),
            asserted: self.asserted,
            tx: self.tx.clone(),
            rx_blocked: self.rx_blocked,
        })
    }

    fn restore(&mut self, v: &serde_json::Value) -> Result<(), String> {
        let s: E1000Snapshot = crate::devices::from_state(v)?;
        if s.plain.len() != self.plain.len() {
            return Err(format!(
                "an e1000 register file of {} registers, not {}",
                s.plain.len(),
                self.plain.len()
            ));
        }
        let stats: [u32; 64] = s
            .stats
            .as_slice()
            .try_into()
            .map_err(|_| format!("{} e1000 statistics registers, not 64", s.stats.len()))?;
        s.tx.check()?;
        self.eeprom.set_state(&s.eeprom)?;
        let r = s.regs;
        (
            self.ctrl, self.mdic, self.icr, self.ims, self.itr, self.rctl, self.tctl,
        ) = (r[0], r[1], r[2], r[3], r[4], r[5], r[6]);
        (
            self.rdlen, self.rdh, self.rdt, self.rdtr, self.radv, self.tdlen,
        ) = (r[7], r[8], r[9], r[10], r[11], r[12]);
        (self.tdh, self.tdt, self.tidv, self.tadv, self.ioaddr) =
            (r[13], r[14], r[15], r[16], r[17]);
        self.plain = s.plain;
        self.stats = stats;
        self.phy = s.phy;
        self.moderation = s.moderation.absolute_from(self.timer.now());
        self.asserted = s.asserted;
        self.tx = s.tx;
        self.rx_blocked = s.rx_blocked;
        // This process's timer is not armed yet.
        self.armed = None;
        self.sync_timer();
        Ok(())
    }

    /// A receive the old process held back looks again for descriptors, and a raised
    /// line is raised again (the driver reads ICR; an interrupt with nothing pending is
    /// one it ignores).
    fn kick(&mut self) {
        self.rx_space.signal();
        if self.asserted && self.icr & self.ims != 0 {
            self.irq.signal();
        }
    }
}

impl E1000 {
    /// A NIC with station address `mac` (stored in its EEPROM) at `res`, doing DMA in `mem`.
    pub fn new(
        mac: [u8; 6],
        res: E1000Resources,
        mem: GuestMemoryMmap,
        irq: Box<dyn Signal>,
        rx_space: Box<dyn Signal>,
        sink: Box<dyn FrameSink>,
        timer: Box<dyn DelayTimer>,
    ) -> Self {
        // Class 02 (network) 00 (Ethernet).
        let mut config = PciConfig::new(VENDOR_ID, DEVICE_ID, 0x02, 0x00, 0x00, 0);
        config.set_ids(REVISION, VENDOR_ID, SUBSYSTEM_ID);
        config.set_mem_bar(0, MMIO_SIZE, res.mmio_base, false, false);
        config.set_io_bar(1, IO_SIZE, res.io_base);
        config.set_interrupt(1, res.irq_line);
        let mut nic = Self {
            config,
            plain: vec![0; (MMIO_SIZE / 4) as usize],
            ctrl: 0,
            mdic: 0,
            icr: 0,
            ims: 0,
            itr: 0,
            rctl: 0,
            tctl: 0,
            rdlen: 0,
            rdh: 0,
            rdt: 0,
            rdtr: 0,
            radv: 0,
            tdlen: 0,
            tdh: 0,
            tdt: 0,
            tidv: 0,
            tadv: 0,
            ioaddr: 0,
            stats: [0; 64],
            eeprom: Eeprom::new(mac, DEVICE_ID, SUBSYSTEM_ID, VENDOR_ID),
            phy: Phy::default(),
            moderation: Moderation::default(),
            asserted: false,
            armed: None,
            tx: tx::TxState::default(),
            rx_blocked: false,
            rx_buf: Vec::new(),
            writer: GuestWriter::bus_master(mem.clone(), "e1000"),
            mem,
            irq,
            rx_space,
            sink,
            timer,
            warned: Warned::default(),
            counters: NicCounters::default(),
            metrics: DeviceMetrics::unnamed(),
        };
        nic.reset();
        nic
    }

    /// Counts interrupts and traffic into `metrics` as well.
    pub fn with_metrics(mut self, metrics: Arc<DeviceMetrics>) -> Self {
        self.writer = GuestWriter::bus_master(self.mem.clone(), &metrics.name);
        self.metrics = metrics;
        self
    }

    /// A device reset (CTRL.RST, or power-on): the MAC's registers to their defaults, the
    /// receive address reloaded from the EEPROM (5.6.1), the rings and timers stopped. PCI
    /// configuration and the PHY are not touched (the PHY has its own reset).
    fn reset(&mut self) {
        self.plain.fill(0);
        self.ctrl = 0;
        self.mdic = MDIC_READY;
        self.icr = 0;
        self.ims = 0;
        self.itr = 0;
        self.rctl = 0;
        self.tctl = 0;
        self.rdlen = 0;
        self.rdh = 0;
        self.rdt = 0;
        self.rdtr = 0;
        self.radv = 0;
        self.tdlen = 0;
        self.tdh = 0;
        self.tdt = 0;
        self.tidv = 0;
        self.tadv = 0;
        self.eeprom.reset();
        self.moderation.reset();
        self.asserted = false;
        self.tx = tx::TxState::default();
        self.set_plain(VET, 0x8100);
        // The 48 KiB packet buffer split 48/16 between receive and transmit.
        self.set_plain(PBA, 0x0030);
        let w = self.eeprom.words();
        let ral = u32::from(w[0]) | u32::from(w[1]) << 16;
        let rah = u32::from(w[2]) | RAH_AV;
        self.set_plain(RA, ral);
        self.set_plain(RA + 4, rah);
        self.sync_timer();
    }

    fn plain_reg(&self, off: u64) -> u32 {
        self.plain[(off / 4) as usize]
    }

    fn set_plain(&mut self, off: u64, v: u32) {
        self.plain[(off / 4) as usize] = v;
    }

    fn status(&self) -> u32 {
        // Link up at 1000 Mb/s full duplex once the driver set link up; the copper PHY
        // auto-negotiated at power-on, so the link is there from the start.
        STATUS_FD | STATUS_LU | STATUS_SPEED_1000
    }

    /// Reads the 32-bit register at `off` (dword aligned, inside the BAR).
    fn read_reg(&mut self, off: u64) -> u32 {
        match off {
            CTRL | CTRL_DUP => self.ctrl,
            STATUS => self.status(),
            EECD => self.eeprom.read_eecd(),
            EERD => self.eeprom.read_eerd(),
            MDIC => self.mdic,
            ICR => {
                // Read to clear (13.4.17); the line drops with it.
                let v = self.icr;
                self.icr = 0;
                self.update_irq();
                v
            }
            ITR => self.itr,
            IMS => self.ims,
            RCTL => self.rctl,
            TCTL => self.tctl,
            RDLEN => self.rdlen,
            RDH => self.rdh,
            RDT => self.rdt,
            RDTR => self.rdtr,
            RADV => self.radv,
            TDLEN => self.tdlen,
            TDH => self.tdh,
            TDT => self.tdt,
            TIDV => self.tidv,
            TADV => self.tadv,
            STATS_START..STATS_END => self.read_stat(off),
            _ if is_plain(off) => self.plain_reg(off),
            // Write-only (ICS, IMC), fiber-only (RXCW) and reserved registers read 0.
            _ => 0,
        }
    }

    fn write_reg(&mut self, off: u64, v: u32) {
        match off {
            CTRL | CTRL_DUP => {
                if v & CTRL_RST != 0 {
                    // Self-clearing global reset.
                    self.reset();
                    return;
                }
                if v & CTRL_PHY_RST != 0 {
                    self.phy = Phy::default();
                }
                self.ctrl = v & !(CTRL_RST | CTRL_PHY_RST);
            }
            STATUS => {}
            EECD => self.eeprom.write_eecd(v),
            EERD => self.eeprom.write_eerd(v),
            MDIC => {
                self.mdic = self.phy.mdic(v);
                if v & MDIC_INT_EN != 0 {
                    self.set_cause(ICR_MDAC);
                }
            }
            ICR => {
                // Writing ones clears those causes.
                self.icr &= !v;
                self.update_irq();
            }
            ITR => {
                self.itr = v & 0xffff;
                self.moderation.set_itr(self.itr);
            }
            ICS => self.set_cause(v & ICR_ALL),
            IMS => {
                self.ims |= v & ICR_ALL;
                self.update_irq();
            }
            IMC => {
                self.ims &= !v;
                self.update_irq();
            }
            RCTL => {
                self.rctl = v;
                self.rx_room();
            }
            TCTL => {
                self.tctl = v;
                self.process_tx();
            }
            RDLEN => self.rdlen = v & 0xf_ff80,
            RDH => self.rdh = v & 0xffff,
            RDT => {
                self.rdt = v & 0xffff;
                self.rx_room();
            }
            RDTR => {
                self.rdtr = v & 0xffff;
                if v & RDTR_FPD != 0 && self.moderation.flush_rx() {
                    self.set_cause(ICR_RXT0);
                }
            }
            RADV => self.radv = v & 0xffff,
            TDLEN => self.tdlen = v & 0xf_ff80,
            TDH => self.tdh = v & 0xffff,
            TDT => {
                self.tdt = v & 0xffff;
                self.process_tx();
            }
            TIDV => self.tidv = v & 0xffff,
            TADV => self.tadv = v & 0xffff,
            // The statistics are read-only (clear on read).
            STATS_START..STATS_END => {}
            _ if is_plain(off) => self.set_plain(off, v),
            _ => debug!("e1000: write of {v:#x} to register {off:#x} ignored"),
        }
    }

    /// A statistics register: clear on read, except that the low half of a 64-bit octet
    /// counter reads without clearing and reading the high half clears both (13.7).
    fn read_stat(&mut self, off: u64) -> u32 {
        let i = ((off - STATS_START) / 4) as usize;
        let v = self.stats[i];
        match off {
            GORCL | GOTCL | TORL | TOTL => {}
            GORCH | GOTCH | TORH | TOTH => {
                self.stats[i] = 0;
                self.stats[i - 1] = 0;
            }
            _ => self.stats[i] = 0,
        }
        v
    }

    /// Adds to a 32-bit statistics counter (they stick at the maximum).
    fn count(&mut self, off: u64, n: u32) {
        let i = ((off - STATS_START) / 4) as usize;
        self.stats[i] = self.stats[i].saturating_add(n);
    }

    /// Adds to a 64-bit octet counter held in two registers (low at `off`).
    fn count64(&mut self, off: u64, n: u64) {
        let i = ((off - STATS_START) / 4) as usize;
        let v = (u64::from(self.stats[i + 1]) << 32 | u64::from(self.stats[i])).saturating_add(n);
        self.stats[i] = v as u32;
        self.stats[i + 1] = (v >> 32) as u32;
    }

    /// Counts a frame of `len` bytes (FCS included) in the size buckets starting at
    /// `bucket64` (PRC64.. or PTC64..: 64, 65-127, 128-255, 256-511, 512-1023, 1024-1522).
    fn count_size(&mut self, bucket64: u64, len: u64) {
        let b = match len {
            ..=64 => 0,
            65..=127 => 1,
            128..=255 => 2,
            256..=511 => 3,
            512..=1023 => 4,
            1024..=1522 => 5,
            _ => return,
        };
        self.count(bucket64 + 4 * b, 1);
    }

    /// Sets interrupt causes that are not delayed.
    fn set_cause(&mut self, bits: u32) {
        self.icr |= bits;
        self.update_irq();
    }

    /// Raises the line when ICR & IMS has become non-zero and ITR allows it; holds the
    /// edge for the timer when ITR does not.
    fn update_irq(&mut self) {
        if self.icr & self.ims == 0 {
            self.asserted = false;
            self.moderation.cancel_assert();
        } else if !self.asserted && self.moderation.may_assert(self.timer.now()) {
            self.asserted = true;
            self.counters.interrupts += 1;
            self.metrics.add_interrupt();
            self.irq.signal();
        }
        self.sync_timer();
    }

    /// Keeps the host timer on the earliest moderation deadline.
    fn sync_timer(&mut self) {
        let d = self.moderation.deadline();
        if d != self.armed {
            self.armed = d;
            self.timer.arm(d);
        }
    }

    /// The host timer fired: delayed causes whose time came are set, a held edge goes out.
    pub fn on_timer(&mut self) {
        let fired = self.moderation.expired(self.timer.now());
        if fired.rx {
            self.icr |= ICR_RXT0;
        }
        if fired.tx {
            self.icr |= ICR_TXDW;
        }
        self.update_irq();
        // Always re-arm: the host timer must forget the expiry it just reported.
        self.armed = self.moderation.deadline();
        self.timer.arm(self.armed);
    }

    /// An access of `data.len()` bytes at `offset` in the memory BAR. The registers are 32
    /// bits wide and the driver accesses them so; a narrower read returns its part of the
    /// register, a narrower write is ignored (the 8254x takes dword writes only), and an
    /// 8-byte access is two registers.
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let at = offset + 4 * i as u64;
            let v = if at < MMIO_SIZE {
                self.read_reg(at & !3)
            } else {
                0
            };
            let shift = (at & 3) as usize;
            let bytes = v.to_le_bytes();
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = bytes.get(shift + j).copied().unwrap_or(0);
            }
        }
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        if offset & 3 != 0 || !data.len().is_multiple_of(4) {
            debug!(
                "e1000: {}-byte write at {offset:#x} is not a dword write; ignored",
                data.len()
            );
            return;
        }
        for (i, chunk) in data.chunks(4).enumerate() {
            let at = offset + 4 * i as u64;
            if at < MMIO_SIZE {
                self.write_reg(at, u32::from_le_bytes(chunk.try_into().unwrap()));
            }
        }
    }

    /// The I/O BAR: IOADDR selects a register, IODATA reads or writes it (13.2.2).
    fn io_read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            IOADDR => self.ioaddr,
            IODATA => self.read_reg(u64::from(self.ioaddr)),
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn io_write(&mut self, offset: u64, data: &[u8]) {
        let Ok(v) = <[u8; 4]>::try_from(data).map(u32::from_le_bytes) else {
            debug!("e1000: {}-byte I/O write ignored", data.len());
            return;
        };
        match offset {
            IOADDR => self.ioaddr = v & 0x1_fffc,
            IODATA => self.write_reg(u64::from(self.ioaddr), v),
            _ => {}
        }
    }

    /// The driver may have made room for a frame that was refused.
    fn rx_room(&mut self) {
        if self.rx_blocked {
            self.rx_blocked = false;
            self.rx_space.signal();
        }
    }
}

impl TapReceiver for E1000 {
    fn receive_from_tap(&mut self, hdr: &VnetHdr, frame: &[u8]) -> RxOutcome {
        self.receive(hdr, frame)
    }
}

impl PciDevice for E1000 {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match bar {
            0 => self.mmio_read(offset, data),
            1 => self.io_read(offset, data),
            _ => data.fill(0xff),
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match bar {
            0 => self.mmio_write(offset, data),
            1 => self.io_write(offset, data),
            _ => warn!("e1000: write to BAR {bar} ignored"),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::eeprom::tests::linux_read_word;
    use super::eeprom::{CHECKSUM_SUM, EECD_CS, EECD_DI, EECD_DO, EECD_GNT, EECD_REQ, EECD_SK};
    use super::*;
    use crate::devices::emulated::dma::tests::guest_memory;
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    pub struct Counter(pub Arc<AtomicU32>);
    impl Signal for Counter {
        fn signal(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Frames sent, with their headers.
    pub type Sent = Arc<Mutex<Vec<(VnetHdr, Vec<u8>)>>>;

    #[derive(Clone, Default)]
    pub struct Sink(pub Sent);
    impl FrameSink for Sink {
        fn send(&mut self, hdr: &VnetHdr, frame: &[u8]) -> std::io::Result<()> {
            self.0.lock().unwrap().push((*hdr, frame.to_vec()));
            Ok(())
        }
    }

    /// A clock the test moves by hand; remembers what the device armed.
    #[derive(Clone, Default)]
    pub struct Clock {
        pub now: Arc<AtomicU64>,
        pub armed: Arc<Mutex<Option<u64>>>,
    }
    impl DelayTimer for Clock {
        fn now(&self) -> u64 {
            self.now.load(Ordering::SeqCst)
        }
        fn arm(&mut self, at: Option<u64>) {
            *self.armed.lock().unwrap() = at;
        }
    }

    pub const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    pub const MEM_SIZE: usize = 1 << 20;
    pub const RES: E1000Resources = E1000Resources {
        mmio_base: 0xc000_0000,
        io_base: 0xc000,
        irq_line: 11,
    };

    /// A NIC on 1 MiB of guest memory, with its observers.
    pub struct H {
        pub nic: E1000,
        pub mem: GuestMemoryMmap,
        pub irqs: Arc<AtomicU32>,
        pub space: Arc<AtomicU32>,
        pub sent: Sent,
        pub clock: Clock,
    }

    impl H {
        pub fn new() -> Self {
            let mem = guest_memory(MEM_SIZE);
            let (irq, space, sink, clock) = (
                Counter::default(),
                Counter::default(),
                Sink::default(),
                Clock::default(),
            );
            H {
                irqs: irq.0.clone(),
                space: space.0.clone(),
                sent: sink.0.clone(),
                nic: E1000::new(
                    MAC,
                    RES,
                    mem.clone(),
                    Box::new(irq),
                    Box::new(space),
                    Box::new(sink),
                    Box::new(clock.clone()),
                ),
                mem,
                clock,
            }
        }

        pub fn w(&mut self, off: u64, v: u32) {
            self.nic.bar_write(0, off, &v.to_le_bytes());
        }

        pub fn r(&mut self, off: u64) -> u32 {
            let mut b = [0u8; 4];
            self.nic.bar_read(0, off, &mut b);
            u32::from_le_bytes(b)
        }

        pub fn irqs(&self) -> u32 {
            self.irqs.load(Ordering::SeqCst)
        }

        pub fn advance(&mut self, ns: u64) {
            self.clock.now.fetch_add(ns, Ordering::SeqCst);
        }

        /// Moves the clock to the armed deadline and fires the timer, as the event loop does.
        pub fn fire_timer(&mut self) {
            let at = self.clock.armed.lock().unwrap().expect("a timer is armed");
            let now = self.clock.now.load(Ordering::SeqCst);
            self.clock.now.store(at.max(now), Ordering::SeqCst);
            self.nic.on_timer();
        }
    }

    #[test]
    fn pci_identity_and_bars_are_what_e1000_probes() {
        let h = H::new();
        let c = h.nic.config();
        assert_eq!(c.get32(0), 0x100e_8086);
        assert_eq!(c.get8(0x0b), 0x02, "network controller");
        assert_eq!(
            c.bar_range(0).map(|r| (r.base, r.size)),
            Some((0xc000_0000, 0x2_0000))
        );
        assert_eq!(c.io_bar(1), Some((0xc000, u64::from(IO_SIZE))));
        assert_eq!(c.get8(0x3d), 1, "INTA");
    }

    #[test]
    fn the_mac_is_in_the_eeprom_and_the_receive_address() {
        let mut h = H::new();
        // What e1000_read_eeprom bit-bangs (the register path is `eecd_bit_banging_...`).
        let mut e = h.nic.eeprom.clone();
        let words: Vec<u16> = (0..64).map(|a| linux_read_word(&mut e, a)).collect();
        let sum = words.iter().fold(0u16, |a, w| a.wrapping_add(*w));
        assert_eq!(sum, CHECKSUM_SUM);
        assert_eq!(
            [words[0], words[1], words[2]]
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect::<Vec<_>>(),
            MAC
        );
        let ral = h.r(RA);
        let rah = h.r(RA + 4);
        assert_eq!(ral.to_le_bytes(), MAC[..4]);
        assert_eq!(
            rah & 0xffff,
            u32::from(u16::from_le_bytes([MAC[4], MAC[5]]))
        );
        assert_ne!(rah & RAH_AV, 0);
    }

    #[test]
    fn eecd_bit_banging_through_the_register() {
        let mut h = H::new();
        let mut eecd = h.r(EECD) | EECD_REQ;
        h.w(EECD, eecd);
        assert_ne!(h.r(EECD) & EECD_GNT, 0);
        eecd |= EECD_CS;
        h.w(EECD, eecd);
        let clock = |h: &mut H, di: bool| -> bool {
            let d = if di { EECD_DI } else { 0 };
            h.w(EECD, eecd | d);
            h.w(EECD, eecd | d | EECD_SK);
            let out = h.r(EECD) & EECD_DO != 0;
            h.w(EECD, eecd | d);
            out
        };
        // READ word 0x0d (device id).
        for b in [1, 1, 0, 0, 0, 1, 1, 0, 1] {
            clock(&mut h, b == 1);
        }
        let mut w = 0u16;
        for _ in 0..16 {
            w = w << 1 | u16::from(clock(&mut h, false));
        }
        assert_eq!(w, DEVICE_ID);
        eecd &= !EECD_CS;
        let _ = eecd;
    }

    #[test]
    fn global_reset_restores_defaults_and_goes_through_the_io_bar() {
        let mut h = H::new();
        h.w(RCTL, RCTL_EN);
        h.w(IMS, ICR_RXT0);
        h.w(RA, 0x1111_1111);
        // e1000_reset_hw issues the reset through IOADDR/IODATA on the 82540.
        h.nic.bar_write(1, IOADDR, &(CTRL as u32).to_le_bytes());
        h.nic.bar_write(1, IODATA, &CTRL_RST.to_le_bytes());
        assert_eq!(h.r(RCTL), 0);
        assert_eq!(h.r(IMS), 0);
        assert_eq!(h.r(CTRL) & CTRL_RST, 0, "self-clearing");
        assert_eq!(h.r(RA).to_le_bytes(), MAC[..4], "reloaded from the EEPROM");
        let mut b = [0u8; 4];
        h.nic.bar_read(1, IOADDR, &mut b);
        assert_eq!(u32::from_le_bytes(b), CTRL as u32);
        h.nic.bar_read(1, IODATA, &mut b);
        assert_eq!(u32::from_le_bytes(b) & STATUS_LU, 0, "IODATA reads CTRL");
        h.nic.bar_write(1, IOADDR, &(STATUS as u32).to_le_bytes());
        h.nic.bar_read(1, IODATA, &mut b);
        assert_ne!(u32::from_le_bytes(b) & STATUS_LU, 0, "link up");
    }

    #[test]
    fn mdic_reaches_the_phy() {
        let mut h = H::new();
        h.w(
            MDIC,
            2 << MDIC_REG_SHIFT | 1 << MDIC_PHY_SHIFT | MDIC_OP_READ,
        );
        let v = h.r(MDIC);
        assert_ne!(v & MDIC_READY, 0);
        assert_eq!(v & 0xffff, 0x0141);
        h.w(
            MDIC,
            2 << MDIC_REG_SHIFT | 3 << MDIC_PHY_SHIFT | MDIC_OP_READ,
        );
        assert_ne!(h.r(MDIC) & MDIC_ERROR, 0, "PHY address 3 does not answer");
    }

    #[test]
    fn icr_is_read_to_clear_and_edges_follow_ims() {
        let mut h = H::new();
        h.w(ICS, ICR_LSC);
        assert_eq!(h.irqs(), 0, "masked");
        h.w(IMS, ICR_LSC | ICR_RXT0);
        assert_eq!(h.irqs(), 1, "unmasking a pending cause raises the line");
        h.w(ICS, ICR_RXT0);
        assert_eq!(h.irqs(), 1, "already up: no second edge");
        assert_eq!(h.r(ICR), ICR_LSC | ICR_RXT0);
        assert_eq!(h.r(ICR), 0, "read to clear");
        h.w(ICS, ICR_RXT0);
        assert_eq!(h.irqs(), 2, "a new cause after the read is a new edge");
        // The driver's handler: read ICR, mask everything, later unmask.
        h.r(ICR);
        h.w(IMC, !0);
        h.w(ICS, ICR_RXT0);
        assert_eq!(h.irqs(), 2, "masked while NAPI polls");
        h.w(IMS, ICR_RXT0);
        assert_eq!(h.irqs(), 3, "unmasked with a cause pending");
        // Writing ICR clears the written causes only.
        h.w(ICS, ICR_LSC);
        h.w(ICR, ICR_RXT0);
        assert_eq!(h.r(ICR), ICR_LSC);
        assert_eq!(h.r(IMS), ICR_RXT0);
    }

    #[test]
    fn itr_holds_the_next_edge_until_the_interval_passed() {
        let mut h = H::new();
        h.w(ITR, 1000); // 256 µs
        h.w(IMS, ICR_RXT0);
        h.w(ICS, ICR_RXT0);
        assert_eq!(h.irqs(), 1);
        h.r(ICR);
        h.advance(10_000);
        h.w(ICS, ICR_RXT0);
        assert_eq!(h.irqs(), 1, "within 256 µs of the last");
        assert_eq!(*h.clock.armed.lock().unwrap(), Some(256_000));
        h.fire_timer();
        assert_eq!(h.irqs(), 2, "released when the interval ends");
        assert_eq!(*h.clock.armed.lock().unwrap(), None);
        // A held edge whose cause was read meanwhile is not sent: the timer is disarmed.
        h.r(ICR);
        h.w(ICS, ICR_RXT0);
        assert_eq!(h.irqs(), 2);
        assert_eq!(*h.clock.armed.lock().unwrap(), Some(512_000));
        h.r(ICR);
        assert_eq!(*h.clock.armed.lock().unwrap(), None);
        h.advance(1_000_000);
        h.nic.on_timer();
        assert_eq!(h.irqs(), 2, "a late expiry sends nothing");
    }

    #[test]
    fn statistics_clear_on_read_and_octets_clear_with_the_high_half() {
        let mut h = H::new();
        h.nic.count(GPRC, 3);
        h.nic.count64(GORCL, (5 << 32) | 7);
        assert_eq!(h.r(GPRC), 3);
        assert_eq!(h.r(GPRC), 0);
        assert_eq!(h.r(GORCL), 7);
        assert_eq!(h.r(GORCL), 7, "the low half alone does not clear");
        assert_eq!(h.r(GORCH), 5);
        assert_eq!((h.r(GORCL), h.r(GORCH)), (0, 0));
        h.w(GPRC, 9);
        assert_eq!(h.r(GPRC), 0, "read-only");
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let mut h = H::new();
        h.w(IMS, ICR_RXT0);
        // A byte write is ignored; a byte read returns part of the register.
        h.nic.bar_write(0, IMC, &[0xff]);
        assert_eq!(h.r(IMS), ICR_RXT0);
        let mut b = [0u8; 1];
        h.nic.bar_read(0, STATUS, &mut b);
        assert_eq!(b[0] as u32, h.r(STATUS) & 0xff);
        // Past the BAR, and 8-byte accesses.
        let mut q = [0u8; 8];
        h.nic.bar_read(0, MMIO_SIZE - 4, &mut q);
        h.nic.bar_write(0, IMS, &[0; 8]);
        h.nic.bar_read(3, 0, &mut q);
        assert_eq!(q, [0xff; 8]);
        h.nic.bar_write(1, IOADDR, &[1, 2]);
        h.nic.bar_write(1, IOADDR, &0xffff_ffffu32.to_le_bytes());
        let mut d = [0u8; 4];
        h.nic.bar_read(1, IODATA, &mut d);
        h.nic.bar_write(1, IODATA, &[0; 4]);
    }
}
