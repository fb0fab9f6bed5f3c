//! An IDE/ATA channel with up to two hard disks, transferring data by programmed I/O or by
//! the PIIX's bus master DMA, as the stock `ata_piix` driver drives a PIIX IDE function in
//! legacy (compatibility) mode.
//!
//! The model follows ATA/ATAPI-7 volume 1 and 2 (the task file registers, the PIO data-in and
//! data-out protocols, the DMA protocol, LBA28 and LBA48 addressing with the HOB register
//! pairs, soft reset and the device signature). It is a pure state machine: the command block
//! (8 ports at 0x1f0/0x170) and the control block (0x3f6/0x376) call `read`/`write`, PIO data
//! goes through a sector buffer, the interrupt line is a callback. Commands complete
//! synchronously, so BSY is never seen set.
//!
//! DMA (READ/WRITE DMA and their EXT forms, on a drive that offers it, see `disk`): the
//! command leaves the drive waiting for the bus master; when the driver starts the channel's
//! bus master (`bmdma`, registers in the PIIX function's BAR4), the whole transfer moves
//! between the image and the guest buffers of the PRD table in one `preadv`/`pwritev`, then
//! the drive interrupts. Anything a driver must not do (a sector past the end, data access
//! without DRQ, an unknown command, a PRD table outside guest memory) gets the ATA or bus
//! master error the hardware would give, never a panic.

mod bmdma;
mod disk;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use log::{debug, warn};

use self::bmdma::{BmEvent, BusMaster, PrdError};
use super::{dma, Signal};
use crate::devices::bus::BusDevice;
use crate::devices::disk::SECTOR_SIZE;
use crate::devices::metrics::DeviceMetrics;
use crate::devices::virtio::guest_write::{ChainWrites, GuestWriter};
use crate::vstate::memory::GuestMemoryMmap;

pub use self::bmdma::{register_name as bm_register_name, CHANNEL_REGS as BM_CHANNEL_REGS};
pub use self::disk::AtaDisk;

/// Status register bits.
pub const ST_ERR: u8 = 0x01;
pub const ST_DRQ: u8 = 0x08;
pub const ST_DSC: u8 = 0x10;
pub const ST_DF: u8 = 0x20;
pub const ST_DRDY: u8 = 0x40;
pub const ST_BSY: u8 = 0x80;
/// Error register bits.
pub const ERR_ABRT: u8 = 0x04;
pub const ERR_IDNF: u8 = 0x10;
pub const ERR_UNC: u8 = 0x40;
/// Device control register bits.
const CTL_NIEN: u8 = 0x02;
const CTL_SRST: u8 = 0x04;
const CTL_HOB: u8 = 0x80;
/// Device register: LBA mode and the drive select bit.
const DEV_LBA: u8 = 0x40;
const DEV_DRV: u8 = 0x10;

// Command block register offsets.
pub const REG_DATA: u64 = 0;
pub const REG_ERROR_FEATURE: u64 = 1;
pub const REG_NSECT: u64 = 2;
pub const REG_LBAL: u64 = 3;
pub const REG_LBAM: u64 = 4;
pub const REG_LBAH: u64 = 5;
pub const REG_DEVICE: u64 = 6;
pub const REG_STATUS_COMMAND: u64 = 7;

// ATA commands served.
const CMD_DEVICE_RESET: u8 = 0x08;
const CMD_READ_SECTORS: u8 = 0x20;
const CMD_READ_SECTORS_NORETRY: u8 = 0x21;
const CMD_READ_SECTORS_EXT: u8 = 0x24;
const CMD_READ_NATIVE_MAX_EXT: u8 = 0x27;
const CMD_READ_MULTIPLE_EXT: u8 = 0x29;
const CMD_WRITE_SECTORS: u8 = 0x30;
const CMD_WRITE_SECTORS_NORETRY: u8 = 0x31;
const CMD_WRITE_SECTORS_EXT: u8 = 0x34;
const CMD_WRITE_MULTIPLE_EXT: u8 = 0x39;
const CMD_READ_DMA_EXT: u8 = 0x25;
const CMD_WRITE_DMA_EXT: u8 = 0x35;
const CMD_READ_VERIFY: u8 = 0x40;
const CMD_READ_VERIFY_EXT: u8 = 0x42;
const CMD_EXECUTE_DIAGNOSTIC: u8 = 0x90;
const CMD_INIT_DEV_PARAMS: u8 = 0x91;
const CMD_PACKET: u8 = 0xa0;
const CMD_IDENTIFY_PACKET: u8 = 0xa1;
const CMD_READ_DMA: u8 = 0xc8;
const CMD_READ_DMA_NORETRY: u8 = 0xc9;
const CMD_WRITE_DMA: u8 = 0xca;
const CMD_WRITE_DMA_NORETRY: u8 = 0xcb;
const CMD_READ_MULTIPLE: u8 = 0xc4;
const CMD_WRITE_MULTIPLE: u8 = 0xc5;
const CMD_SET_MULTIPLE: u8 = 0xc6;
const CMD_STANDBY_IMMEDIATE: u8 = 0xe0;
const CMD_IDLE_IMMEDIATE: u8 = 0xe1;
const CMD_CHECK_POWER_MODE: u8 = 0xe5;
const CMD_FLUSH_CACHE: u8 = 0xe7;
const CMD_IDENTIFY: u8 = 0xec;
const CMD_FLUSH_CACHE_EXT: u8 = 0xea;
const CMD_SET_FEATURES: u8 = 0xef;
const CMD_READ_NATIVE_MAX: u8 = 0xf8;

/// Largest READ/WRITE MULTIPLE block we accept (IDENTIFY word 47).
const MAX_MULTIPLE: u16 = 16;
/// LBA28 can address this many sectors.
const LBA28_MAX: u64 = 0x0fff_ffff;
const LBA48_MAX: u64 = (1 << 48) - 1;

/// SET FEATURES subcommand 03h: set the transfer mode from the count register.
const FEATURE_SET_TRANSFER_MODE: u8 = 0x03;

/// What a transfer in progress is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Transfer {
    None,
    /// Data-in (to the host); `lba` is the next sector to load, `left` the sectors still to
    /// go after the buffer, `block` the sectors per interrupt.
    ReadSectors {
        lba: u64,
        left: u64,
        block: u64,
    },
    /// IDENTIFY data: one buffer, then done.
    Identify,
    /// Data-out (from the host): the buffer holds `block` sectors for `lba`.
    WriteSectors {
        lba: u64,
        left: u64,
        block: u64,
    },
    /// A DMA command waits for the bus master: `left` sectors from `lba`, from the disk to
    /// memory unless `write`.
    Dma {
        lba: u64,
        left: u64,
        write: bool,
    },
}

/// What bus master DMA needs: guest memory, and the PIIX function's bus master enable (PCI
/// command bit 2), without which the function cannot master the bus.
pub struct DmaContext {
    pub mem: GuestMemoryMmap,
    pub bus_master: Arc<AtomicBool>,
}

/// A channel's DMA: its context and its one way of writing guest memory.
struct Dma {
    mem: GuestMemoryMmap,
    bus_master: Arc<AtomicBool>,
    writer: GuestWriter,
}

/// Statistics a channel keeps for the VMM's accounting.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IdeCounters {
    pub sectors_read: u64,
    pub sectors_written: u64,
    pub interrupts: u64,
    pub flushes: u64,
}

/// An IDE channel: the task file shared by both drive positions, and the drives.
pub struct IdeChannel {
    drives: [Option<AtaDisk>; 2],
    irq: Box<dyn Signal>,
    // Task file. Each of these is a two-deep FIFO for LBA48: `*_hob` holds the previous write.
    feature: u8,
    nsect: u8,
    lbal: u8,
    lbam: u8,
    lbah: u8,
    hob_feature: u8,
    hob_nsect: u8,
    hob_lbal: u8,
    hob_lbam: u8,
    hob_lbah: u8,
    device: u8,
    status: u8,
    error: u8,
    control: u8,
    transfer: Transfer,
    buffer: Vec<u8>,
    pos: usize,
    /// The channel's bus master registers (in the PIIX function's BAR4).
    bm: BusMaster,
    dma: Option<Dma>,
    pub counters: IdeCounters,
    metrics: Arc<DeviceMetrics>,
}

/// A channel's state for snapshots: the task file with its HOB bytes, the command in
/// progress and its sector buffer (a PIO transfer stopped halfway goes on where it was),
/// the bus master registers, and per drive what the guest set (the READ/WRITE MULTIPLE
/// block and the transfer mode). DMA runs to completion inside the register write that
/// starts it, so none is ever in flight. The disks' contents are in their image files,
/// which the snapshot names; the PIIX function's configuration (bus mastering among it)
/// goes with the PCI bus.
#[derive(serde::Serialize, serde::Deserialize)]
struct IdeSnapshot {
    /// feature nsect lbal lbam lbah, then their HOB bytes, device status error control
    taskfile: [u8; 14],
    transfer: Transfer,
    buffer: Vec<u8>,
    pos: usize,
    bm_command: u8,
    bm_status: u8,
    bm_prd: u32,
    /// Per drive position: present, then its settings.
    drives: [Option<disk::DriveState>; 2],
}

impl crate::devices::Persist for IdeChannel {
    fn save(&mut self) -> Result<serde_json::Value, String> {
        crate::devices::to_state(&IdeSnapshot {
            taskfile: [
                self.feature,
                self.nsect,
                self.lbal,
                self.lbam,
                self.lbah,
                self.hob_feature,
                self.hob_nsect,
                self.hob_lbal,
                self.hob_lbam,
                self.hob_lbah,
                self.device,
                self.status,
                self.error,
                self.control,
            ],
            transfer: self.transfer,
            buffer: self.buffer.clone(),
            pos: self.pos,
            bm_command: self.bm.command,
            bm_status: self.bm.status,
            bm_prd: self.bm.prd,
            drives: [
                self.drives[0].as_ref().map(AtaDisk::state),
                self.drives[1].as_ref().map(AtaDisk::state),
            ],
        })
    }

    fn restore(&mut self, v: &serde_json::Value) -> Result<(), String> {
        let s: IdeSnapshot = crate::devices::from_state(v)?;
        for (i, (mine, theirs)) in self.drives.iter().zip(&s.drives).enumerate() {
            if mine.is_some() != theirs.is_some() {
                return Err(format!(
                    "the snapshot has {} drive {i} on this channel, this VM {}",
                    if theirs.is_some() { "a" } else { "no" },
                    if mine.is_some() { "has one" } else { "none" }
                ));
            }
        }
        // A buffer longer than any transfer, or a position past it, would have the data
        // port read outside it.
        let max = usize::from(MAX_MULTIPLE) * SECTOR_SIZE as usize;
        if s.buffer.len() > max || s.pos > s.buffer.len() {
            return Err(format!(
                "an IDE sector buffer of {} bytes at position {} (at most {max})",
                s.buffer.len(),
                s.pos
            ));
        }
        if let Transfer::ReadSectors { block, .. } | Transfer::WriteSectors { block, .. } =
            s.transfer
        {
            if block == 0 || block > u64::from(MAX_MULTIPLE) {
                return Err(format!("an IDE transfer of {block} sectors per block"));
            }
        }
        let t = s.taskfile;
        (self.feature, self.nsect, self.lbal, self.lbam, self.lbah) =
            (t[0], t[1], t[2], t[3], t[4]);
        (
            self.hob_feature,
            self.hob_nsect,
            self.hob_lbal,
            self.hob_lbam,
            self.hob_lbah,
        ) = (t[5], t[6], t[7], t[8], t[9]);
        (self.device, self.status, self.error, self.control) = (t[10], t[11], t[12], t[13]);
        self.transfer = s.transfer;
        self.buffer = s.buffer;
        self.pos = s.pos;
        self.bm = BusMaster {
            command: s.bm_command,
            status: s.bm_status,
            prd: s.bm_prd,
        };
        for (d, st) in self.drives.iter_mut().zip(&s.drives) {
            if let (Some(d), Some(st)) = (d, st) {
                d.set_state(st)?;
            }
        }
        Ok(())
    }
}

impl IdeChannel {
    /// A channel with a master and an optional slave disk.
    pub fn new(master: Option<AtaDisk>, slave: Option<AtaDisk>, irq: Box<dyn Signal>) -> Self {
        let mut ch = Self {
            drives: [master, slave],
            irq,
            feature: 0,
            nsect: 0,
            lbal: 0,
            lbam: 0,
            lbah: 0,
            hob_feature: 0,
            hob_nsect: 0,
            hob_lbal: 0,
            hob_lbam: 0,
            hob_lbah: 0,
            device: 0,
            status: 0,
            error: 0,
            control: 0,
            transfer: Transfer::None,
            buffer: Vec::new(),
            pos: 0,
            bm: BusMaster::default(),
            dma: None,
            counters: IdeCounters::default(),
            metrics: DeviceMetrics::unnamed(),
        };
        // The drive DMA capable bits the firmware would have set.
        for (i, d) in ch.drives.iter().enumerate() {
            if d.as_ref().is_some_and(|d| d.dma) {
                ch.bm.status |= bmdma::ST_DMA0 << i;
            }
        }
        ch.reset_signature();
        ch
    }

    /// Lets the channel's bus master reach guest memory (after `with_metrics`: the writer
    /// is named after the channel).
    pub fn with_dma(mut self, ctx: DmaContext) -> Self {
        let name = if self.metrics.name.is_empty() {
            "ide"
        } else {
            &self.metrics.name
        };
        self.dma = Some(Dma {
            writer: GuestWriter::bus_master(ctx.mem.clone(), name),
            mem: ctx.mem,
            bus_master: ctx.bus_master,
        });
        self
    }

    /// Counts interrupts and sectors moved into `metrics` as well.
    pub fn with_metrics(mut self, metrics: Arc<DeviceMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    fn selected(&self) -> usize {
        usize::from(self.device & DEV_DRV != 0)
    }

    fn drive(&mut self) -> Option<&mut AtaDisk> {
        let i = self.selected();
        self.drives[i].as_mut()
    }

    fn no_drives(&self) -> bool {
        self.drives.iter().all(Option::is_none)
    }

    /// The state after power-on or a reset: the ATA signature in the task file, diagnostic
    /// code 1 (no error), the drive ready (ATA-7 9.12 and 9.2).
    fn reset_signature(&mut self) {
        self.nsect = 1;
        self.lbal = 1;
        self.lbam = 0;
        self.lbah = 0;
        self.device = 0;
        self.error = 1;
        self.status = ST_DRDY | ST_DSC;
        self.transfer = Transfer::None;
        self.buffer.clear();
        self.pos = 0;
    }

    fn interrupt(&mut self) {
        if self.control & CTL_NIEN == 0 {
            // The bus master latches the drive's interrupt, whatever the command was.
            self.bm.status |= bmdma::ST_INTR;
            self.counters.interrupts += 1;
            self.metrics.add_interrupt();
            self.irq.signal();
        }
    }

    fn abort(&mut self, error: u8) {
        self.error = error;
        self.status = ST_DRDY | ST_ERR;
        self.transfer = Transfer::None;
        self.buffer.clear();
        self.pos = 0;
        self.interrupt();
    }

    fn complete(&mut self) {
        self.error = 0;
        self.status = ST_DRDY | ST_DSC;
        self.transfer = Transfer::None;
        self.interrupt();
    }

    fn lba28(&self) -> u64 {
        u64::from(self.device & 0x0f) << 24
            | u64::from(self.lbah) << 16
            | u64::from(self.lbam) << 8
            | u64::from(self.lbal)
    }

    fn lba48(&self) -> u64 {
        u64::from(self.hob_lbah) << 40
            | u64::from(self.hob_lbam) << 32
            | u64::from(self.hob_lbal) << 24
            | u64::from(self.lbah) << 16
            | u64::from(self.lbam) << 8
            | u64::from(self.lbal)
    }

    /// Sector count of a command: 0 means 256 (LBA28) or 65536 (LBA48).
    fn count(&self, ext: bool) -> u64 {
        if ext {
            match u64::from(self.hob_nsect) << 8 | u64::from(self.nsect) {
                0 => 65536,
                n => n,
            }
        } else {
            match self.nsect {
                0 => 256,
                n => u64::from(n),
            }
        }
    }

    /// Sets the task file to the address of the last sector touched, as a device does after
    /// an error so the driver can report it.
    fn set_lba(&mut self, lba: u64, ext: bool) {
        self.lbal = lba as u8;
        self.lbam = (lba >> 8) as u8;
        self.lbah = (lba >> 16) as u8;
        if ext {
            self.hob_lbal = (lba >> 24) as u8;
            self.hob_lbam = (lba >> 32) as u8;
            self.hob_lbah = (lba >> 40) as u8;
        } else {
            self.device = (self.device & 0xf0) | ((lba >> 24) as u8 & 0x0f);
        }
    }

    /// Loads the next block of a read into the buffer and asks the host to take it.
    fn load_read_block(&mut self) {
        let Transfer::ReadSectors { lba, left, block } = self.transfer else {
            return;
        };
        let n = block.min(left);
        self.buffer.resize((n * SECTOR_SIZE) as usize, 0);
        let i = self.selected();
        let result = match self.drives[i].as_mut() {
            Some(d) => d.backend.read_at(lba * SECTOR_SIZE, &mut self.buffer),
            None => Err(io::Error::other("no drive")),
        };
        match result {
            Ok(()) => {
                self.counters.sectors_read += n;
                self.metrics.add_bytes_to_guest(n * SECTOR_SIZE);
                self.pos = 0;
                self.transfer = Transfer::ReadSectors {
                    lba: lba + n,
                    left: left - n,
                    block,
                };
                self.status = ST_DRDY | ST_DSC | ST_DRQ;
                self.interrupt();
            }
            Err(e) => {
                warn!("ide: read of sectors {lba}+{n} failed: {e}");
                self.set_lba(lba, true);
                self.abort(ERR_UNC);
            }
        }
    }

    /// Prepares the buffer for the next block of a write.
    fn expect_write_block(&mut self, raise: bool) {
        let Transfer::WriteSectors { left, block, .. } = self.transfer else {
            return;
        };
        self.buffer.clear();
        self.buffer
            .resize((block.min(left) * SECTOR_SIZE) as usize, 0);
        self.pos = 0;
        self.status = ST_DRDY | ST_DSC | ST_DRQ;
        if raise {
            self.interrupt();
        }
    }

    /// The host filled the buffer: write it out and go on or finish.
    fn commit_write_block(&mut self) {
        let Transfer::WriteSectors { lba, left, block } = self.transfer else {
            return;
        };
        let n = block.min(left);
        let buf = std::mem::take(&mut self.buffer);
        let result = match self.drive() {
            Some(d) => d.backend.write_at(lba * SECTOR_SIZE, &buf),
            None => Err(io::Error::other("no drive")),
        };
        self.buffer = buf;
        match result {
            Ok(()) => {
                self.counters.sectors_written += n;
                self.metrics.add_bytes_from_guest(n * SECTOR_SIZE);
                if left == n {
                    self.complete();
                } else {
                    self.transfer = Transfer::WriteSectors {
                        lba: lba + n,
                        left: left - n,
                        block,
                    };
                    self.expect_write_block(true);
                }
            }
            Err(e) => {
                warn!("ide: write of sectors {lba}+{n} failed: {e}");
                self.set_lba(lba, true);
                self.abort(ERR_UNC);
            }
        }
    }

    /// Checks a transfer's range; returns the sectors per interrupt, or aborts.
    /// Checks the addressing of a READ/WRITE SECTORS or MULTIPLE command and returns its
    /// sector count and DRQ block size; None when the command was aborted (CHS addressing,
    /// which IDENTIFY does not offer, or sectors out of range).
    fn pio_extent(
        &mut self,
        lba: u64,
        ext: bool,
        multi: bool,
        multiple: u64,
    ) -> Option<(u64, u64)> {
        if self.device & DEV_LBA == 0 && !ext {
            self.abort(ERR_ABRT);
            return None;
        }
        let count = self.count(ext);
        if !self.check_range(lba, count, ext) {
            return None;
        }
        Some((count, if multi { multiple } else { 1 }))
    }

    fn check_range(&mut self, lba: u64, count: u64, ext: bool) -> bool {
        let sectors = self.drive().map_or(0, |d| d.sectors);
        if lba.checked_add(count).is_none_or(|end| end > sectors) {
            debug!("ide: sectors {lba}+{count} past the end ({sectors} sectors)");
            self.set_lba(lba.min(sectors), ext);
            self.abort(ERR_IDNF | ERR_ABRT);
            return false;
        }
        true
    }

    fn command(&mut self, cmd: u8) {
        if self.drive().is_none() {
            // Commands to an absent drive are ignored, as by real hardware (no one answers).
            return;
        }
        if self.status & ST_BSY != 0 || self.transfer != Transfer::None && cmd != CMD_DEVICE_RESET {
            // A command in the middle of a transfer: the drive aborts it and the transfer.
            warn!("ide: command {cmd:#04x} while a transfer is in progress; aborted");
            self.abort(ERR_ABRT);
            return;
        }
        let ext = matches!(
            cmd,
            CMD_READ_SECTORS_EXT
                | CMD_READ_MULTIPLE_EXT
                | CMD_WRITE_SECTORS_EXT
                | CMD_WRITE_MULTIPLE_EXT
                | CMD_READ_VERIFY_EXT
                | CMD_READ_DMA_EXT
                | CMD_WRITE_DMA_EXT
        );
        let lba = if ext { self.lba48() } else { self.lba28() };
        let multiple = u64::from(self.drive().map_or(1, |d| d.multiple));
        match cmd {
            CMD_IDENTIFY => {
                let id = self.drive().map(|d| d.identify()).unwrap();
                self.buffer = id.iter().flat_map(|w| w.to_le_bytes()).collect();
                self.pos = 0;
                self.transfer = Transfer::Identify;
                self.error = 0;
                self.status = ST_DRDY | ST_DSC | ST_DRQ;
                self.interrupt();
            }
            CMD_READ_SECTORS
            | CMD_READ_SECTORS_NORETRY
            | CMD_READ_SECTORS_EXT
            | CMD_READ_MULTIPLE
            | CMD_READ_MULTIPLE_EXT => {
                let multi = matches!(cmd, CMD_READ_MULTIPLE | CMD_READ_MULTIPLE_EXT);
                let Some((count, block)) = self.pio_extent(lba, ext, multi, multiple) else {
                    return;
                };
                self.transfer = Transfer::ReadSectors {
                    lba,
                    left: count,
                    block,
                };
                self.load_read_block();
            }
            CMD_WRITE_SECTORS
            | CMD_WRITE_SECTORS_NORETRY
            | CMD_WRITE_SECTORS_EXT
            | CMD_WRITE_MULTIPLE
            | CMD_WRITE_MULTIPLE_EXT => {
                if self.drive().is_some_and(|d| d.readonly) {
                    // A write-protected medium: ATA reports the command aborted.
                    self.abort(ERR_ABRT);
                    return;
                }
                let multi = matches!(cmd, CMD_WRITE_MULTIPLE | CMD_WRITE_MULTIPLE_EXT);
                let Some((count, block)) = self.pio_extent(lba, ext, multi, multiple) else {
                    return;
                };
                self.transfer = Transfer::WriteSectors {
                    lba,
                    left: count,
                    block,
                };
                // PIO data-out: DRQ without an interrupt for the first block (ATA-7 11.7).
                self.expect_write_block(false);
            }
            CMD_READ_DMA
            | CMD_READ_DMA_NORETRY
            | CMD_READ_DMA_EXT
            | CMD_WRITE_DMA
            | CMD_WRITE_DMA_NORETRY
            | CMD_WRITE_DMA_EXT => {
                let write = matches!(
                    cmd,
                    CMD_WRITE_DMA | CMD_WRITE_DMA_NORETRY | CMD_WRITE_DMA_EXT
                );
                let (dma, readonly) = self.drive().map_or((false, false), |d| (d.dma, d.readonly));
                if !dma || write && readonly {
                    // A drive without DMA aborts the command; so does a write-protected one.
                    self.abort(ERR_ABRT);
                    return;
                }
                let Some((count, _)) = self.pio_extent(lba, ext, false, 1) else {
                    return;
                };
                self.transfer = Transfer::Dma {
                    lba,
                    left: count,
                    write,
                };
                // DMA data transfer: the drive asserts DMARQ (DRQ) and waits for the bus
                // master (ATA-7 vol. 2, 11.4).
                self.error = 0;
                self.status = ST_DRDY | ST_DSC | ST_DRQ;
                if self.bm.command & bmdma::CMD_START != 0 {
                    self.run_dma();
                }
            }
            CMD_READ_VERIFY | CMD_READ_VERIFY_EXT => {
                let count = self.count(ext);
                if self.check_range(lba, count, ext) {
                    self.complete();
                }
            }
            CMD_FLUSH_CACHE | CMD_FLUSH_CACHE_EXT => {
                self.counters.flushes += 1;
                let result = self.drive().map(|d| d.backend.flush());
                match result {
                    Some(Ok(())) => self.complete(),
                    Some(Err(e)) => {
                        warn!("ide: flush failed: {e}");
                        self.abort(ERR_ABRT);
                    }
                    None => self.abort(ERR_ABRT),
                }
            }
            CMD_SET_MULTIPLE => {
                let n = u16::from(self.nsect);
                if n == 0 || n > MAX_MULTIPLE || !n.is_power_of_two() {
                    self.abort(ERR_ABRT);
                } else {
                    if let Some(d) = self.drive() {
                        d.multiple = n;
                    }
                    self.complete();
                }
            }
            CMD_READ_NATIVE_MAX | CMD_READ_NATIVE_MAX_EXT => {
                let max = self.drive().map_or(0, |d| d.sectors).saturating_sub(1);
                self.set_lba(
                    max.min(if cmd == CMD_READ_NATIVE_MAX {
                        LBA28_MAX
                    } else {
                        LBA48_MAX
                    }),
                    cmd == CMD_READ_NATIVE_MAX_EXT,
                );
                self.complete();
            }
            CMD_SET_FEATURES if self.feature == FEATURE_SET_TRANSFER_MODE => {
                let count = self.nsect;
                if self.drive().is_some_and(|d| d.set_transfer_mode(count)) {
                    self.complete();
                } else {
                    self.abort(ERR_ABRT);
                }
            }
            CMD_SET_FEATURES | CMD_INIT_DEV_PARAMS | CMD_IDLE_IMMEDIATE | CMD_STANDBY_IMMEDIATE => {
                self.complete()
            }
            CMD_CHECK_POWER_MODE => {
                self.complete();
                self.nsect = 0xff; // active or idle
            }
            CMD_EXECUTE_DIAGNOSTIC => {
                self.reset_signature();
                self.interrupt();
            }
            // ATAPI commands on an ATA device abort, which is how drivers tell the two apart.
            CMD_PACKET | CMD_IDENTIFY_PACKET | CMD_DEVICE_RESET => self.abort(ERR_ABRT),
            other => {
                debug!("ide: unsupported command {other:#04x}");
                self.abort(ERR_ABRT);
            }
        }
    }

    /// Reads the channel's bus master registers.
    pub fn bm_read(&self, offset: u64, data: &mut [u8]) {
        self.bm.read(offset, data);
    }

    /// Writes the channel's bus master registers; starting the engine runs a waiting DMA
    /// command.
    pub fn bm_write(&mut self, offset: u64, data: &[u8]) {
        if self.bm.write(offset, data) == BmEvent::Started
            && matches!(self.transfer, Transfer::Dma { .. })
        {
            self.run_dma();
        }
    }

    /// Moves a DMA command's sectors between the disk and the guest buffers of the PRD
    /// table, then completes it: the bus master's status says how it went (interrupt,
    /// active, error), the drive's status and error registers what the command did.
    fn run_dma(&mut self) {
        let Transfer::Dma { lba, left, write } = self.transfer else {
            return;
        };
        let Some(ctx) = &self.dma else {
            debug!("ide: bus master started on a channel without DMA; nothing moves");
            return;
        };
        if !ctx.bus_master.load(Ordering::Relaxed) {
            // Bus mastering is off in the PCI command register: the engine cannot run. It
            // stays active, and the drive waits, until the driver stops it.
            debug!("ide: bus master started with bus mastering disabled; nothing moves");
            return;
        }
        let to_memory = self.bm.command & bmdma::CMD_WRITE_TO_MEMORY != 0;
        if to_memory == write {
            warn!(
                "ide: bus master direction ({}) does not match the {} command; aborted",
                if to_memory {
                    "to memory"
                } else {
                    "from memory"
                },
                if write { "WRITE DMA" } else { "READ DMA" }
            );
            self.dma_failed();
            return;
        }
        let prd = match bmdma::walk(&ctx.mem, self.bm.prd, left * SECTOR_SIZE) {
            Ok(p) => p,
            Err(e) => {
                let what = match e {
                    PrdError::CrossesBoundary { .. } | PrdError::TableTooLong => "invalid",
                    _ => "outside guest memory",
                };
                warn!(
                    "ide: PRD table at {:#x} {what} ({e:?}); DMA aborted",
                    self.bm.prd
                );
                self.dma_failed();
                return;
            }
        };
        let sectors = (prd.covered / SECTOR_SIZE).min(left);
        // What the transfer may write: the regions of the PRD table.
        let allowed: Vec<(u64, u64)> = prd.bufs.iter().map(|b| (b.addr.0, b.len as u64)).collect();
        let allowed = ChainWrites::buffers(&allowed);
        let mut bufs = prd.bufs;
        bmdma::truncate(&mut bufs, sectors * SECTOR_SIZE);
        let offset = lba * SECTOR_SIZE;
        let i = self.selected();
        let result = match self.drives[i].as_mut() {
            Some(d) if sectors > 0 => {
                let disk = d.backend.as_mut();
                if write {
                    dma::guest_to_disk(disk, &ctx.mem, &bufs, offset)
                } else {
                    dma::disk_to_guest(disk, &ctx.writer.chain(&allowed), &bufs, offset)
                }
            }
            Some(_) => Ok(()),
            None => Err(io::Error::other("no drive")),
        };
        if let Err(e) = result {
            warn!(
                "ide: DMA {} of sectors {lba}+{sectors} failed: {e}",
                if write { "write" } else { "read" }
            );
            self.bm.status &= !bmdma::ST_ACTIVE;
            self.set_lba(lba, true);
            self.abort(ERR_UNC);
            return;
        }
        let bytes = sectors * SECTOR_SIZE;
        if write {
            self.counters.sectors_written += sectors;
            self.metrics.add_bytes_from_guest(bytes);
        } else {
            self.counters.sectors_read += sectors;
            self.metrics.add_bytes_to_guest(bytes);
        }
        if sectors < left {
            // The table ended first: the engine stops without an interrupt and the drive
            // waits for the rest, which a restarted engine with a new table moves
            // (SFF-8038i table 3: active 0, interrupt 0).
            self.transfer = Transfer::Dma {
                lba: lba + sectors,
                left: left - sectors,
                write,
            };
            self.bm.status &= !bmdma::ST_ACTIVE;
            return;
        }
        if prd.exhausted {
            self.bm.status &= !bmdma::ST_ACTIVE;
        }
        self.complete();
    }

    /// The bus master could not do the transfer (a master abort: a table or buffer outside
    /// guest memory, or an invalid table): its error bit, the engine stopped, and the
    /// command aborted with an interrupt so the driver learns at once.
    fn dma_failed(&mut self) {
        self.bm.status = (self.bm.status | bmdma::ST_ERROR) & !bmdma::ST_ACTIVE;
        self.abort(ERR_ABRT);
    }

    /// Reads a command block register (`offset` 0-7) of `data.len()` bytes (the data register
    /// may be read 16 or 32 bits wide).
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == REG_DATA {
            self.read_data(data);
            return;
        }
        let hob = self.control & CTL_HOB != 0;
        let value = if self.no_drives() {
            0xff
        } else {
            match offset {
                REG_ERROR_FEATURE => self.error,
                REG_NSECT => {
                    if hob {
                        self.hob_nsect
                    } else {
                        self.nsect
                    }
                }
                REG_LBAL => {
                    if hob {
                        self.hob_lbal
                    } else {
                        self.lbal
                    }
                }
                REG_LBAM => {
                    if hob {
                        self.hob_lbam
                    } else {
                        self.lbam
                    }
                }
                REG_LBAH => {
                    if hob {
                        self.hob_lbah
                    } else {
                        self.lbah
                    }
                }
                REG_DEVICE => self.device | 0xa0,
                REG_STATUS_COMMAND => self.read_status(),
                _ => 0xff,
            }
        };
        data.fill(0);
        data[0] = value;
    }

    fn read_status(&self) -> u8 {
        // A selected position with no drive reads as 0 (nothing drives the bus bits).
        if self.drives[self.selected()].is_none() {
            0
        } else {
            self.status
        }
    }

    /// The alternate status register (control block, read): status without side effects.
    pub fn read_alt_status(&self) -> u8 {
        if self.no_drives() {
            0xff
        } else {
            self.read_status()
        }
    }

    fn read_data(&mut self, data: &mut [u8]) {
        let reading = matches!(
            self.transfer,
            Transfer::ReadSectors { .. } | Transfer::Identify
        );
        if !reading || self.status & ST_DRQ == 0 {
            // No data-in in progress: the bus floats.
            data.fill(0xff);
            return;
        }
        let n = data.len().min(self.buffer.len() - self.pos);
        data[..n].copy_from_slice(&self.buffer[self.pos..self.pos + n]);
        data[n..].fill(0xff);
        self.pos += n;
        if self.pos == self.buffer.len() {
            match self.transfer {
                Transfer::ReadSectors { left: 0, .. } | Transfer::Identify => {
                    self.status = ST_DRDY | ST_DSC;
                    self.transfer = Transfer::None;
                }
                _ => self.load_read_block(),
            }
        }
    }

    fn write_data(&mut self, data: &[u8]) {
        if !matches!(self.transfer, Transfer::WriteSectors { .. }) || self.status & ST_DRQ == 0 {
            debug!("ide: data written with no data-out transfer; ignored");
            return;
        }
        let n = data.len().min(self.buffer.len() - self.pos);
        self.buffer[self.pos..self.pos + n].copy_from_slice(&data[..n]);
        self.pos += n;
        if self.pos == self.buffer.len() {
            self.commit_write_block();
        }
    }

    /// Writes a command block register.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == REG_DATA {
            self.write_data(data);
            return;
        }
        let v = data[0];
        // Writing any task file register clears HOB (ATA-7 6.23).
        self.control &= !CTL_HOB;
        match offset {
            REG_ERROR_FEATURE => {
                self.hob_feature = self.feature;
                self.feature = v;
            }
            REG_NSECT => {
                self.hob_nsect = self.nsect;
                self.nsect = v;
            }
            REG_LBAL => {
                self.hob_lbal = self.lbal;
                self.lbal = v;
            }
            REG_LBAM => {
                self.hob_lbam = self.lbam;
                self.lbam = v;
            }
            REG_LBAH => {
                self.hob_lbah = self.lbah;
                self.lbah = v;
            }
            REG_DEVICE => self.device = v & !0xa0,
            REG_STATUS_COMMAND => self.command(v),
            _ => {}
        }
    }

    /// Writes the device control register (control block).
    pub fn write_control(&mut self, v: u8) {
        let was_reset = self.control & CTL_SRST != 0;
        self.control = v;
        if v & CTL_SRST != 0 {
            self.status = ST_BSY;
            self.transfer = Transfer::None;
        } else if was_reset {
            // End of a soft reset: both drives show their signature.
            self.reset_signature();
            for d in self.drives.iter_mut().flatten() {
                d.multiple = MAX_MULTIPLE;
            }
        }
    }
}

/// The data register (offset, length) whose writes KVM may coalesce. A sector goes out as
/// 256 `outsw` words, each an exit of its own (KVM batches string input, not output). The
/// words only fill the sector buffer; the last one commits the block and raises INTRQ,
/// which the driver cannot see before its next register access: libata reads the
/// alternate status right after each block (`ata_sff_sync`), an exit that applies the
/// coalesced words first. A driver that instead sleeps until the interrupt is served by
/// the VMM's periodic vCPU kick, which drains too. Four bytes: ata_piix moves data 32 bits
/// at a time; the zone then also holds the feature, count and LBA-low registers, whose
/// writes are likewise invisible until the command register is written, an exit.
pub const COALESCED_DATA_PORT: (u16, u32) = (REG_DATA as u16, 4);

/// A channel as the port bus sees it: one shared channel behind two ranges.
pub type SharedChannel = Arc<Mutex<IdeChannel>>;

fn lock(ch: &SharedChannel) -> MutexGuard<'_, IdeChannel> {
    ch.lock().unwrap_or_else(|p| p.into_inner())
}

/// The command block (eight ports at 0x1f0 or 0x170).
pub struct CommandBlock(pub SharedChannel);

impl BusDevice for CommandBlock {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.0).read(offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.0).write(offset, data);
    }
}

/// The control block port (0x3f6 or 0x376): alternate status when read, device control when
/// written.
pub struct ControlBlock(pub SharedChannel);

impl BusDevice for ControlBlock {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = lock(&self.0).read_alt_status();
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        lock(&self.0).write_control(data[0]);
    }
}

/// A channel's bus master register block (8 bytes of the PIIX function's BAR4).
pub struct BusMasterBlock(pub SharedChannel);

impl BusDevice for BusMasterBlock {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.0).bm_read(offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.0).bm_write(offset, data);
    }
}

/// Register names for the exit accounting, by offset from the command block; the control
/// block is 0x206 above it on both channels.
pub fn register_name(offset: u64) -> &'static str {
    match offset {
        0 => "data",
        1 => "error/feature",
        2 => "nsect",
        3 => "lbal",
        4 => "lbam",
        5 => "lbah",
        6 => "device",
        7 => "status/command",
        0x206 => "altstatus/control",
        _ => "",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::disk::BlockBackend;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};
    use vm_memory::Bytes;

    /// An in-memory disk.
    #[derive(Clone)]
    pub struct MemDisk {
        pub data: Arc<Mutex<Vec<u8>>>,
        pub flushes: Arc<AtomicU32>,
    }

    impl MemDisk {
        pub fn new(sectors: u64) -> Self {
            let data = (0..sectors * 512)
                .map(|i| (i / 512) as u8 ^ (i as u8))
                .collect();
            Self {
                data: Arc::new(Mutex::new(data)),
                flushes: Arc::new(AtomicU32::new(0)),
            }
        }
    }

    impl BlockBackend for MemDisk {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let d = self.data.lock().unwrap();
            let o = offset as usize;
            let src = d
                .get(o..o + buf.len())
                .ok_or_else(|| io::Error::other("past EOF"))?;
            buf.copy_from_slice(src);
            Ok(())
        }
        fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
            let mut d = self.data.lock().unwrap();
            let o = offset as usize;
            d.get_mut(o..o + buf.len())
                .ok_or_else(|| io::Error::other("past EOF"))?
                .copy_from_slice(buf);
            Ok(())
        }
        fn read_to(
            &mut self,
            dst: &crate::devices::virtio::guest_write::ChainWriter,
            addr: vm_memory::GuestAddress,
            offset: u64,
            len: usize,
        ) -> io::Result<()> {
            let mut buf = vec![0u8; len];
            self.read_at(offset, &mut buf)?;
            dst.write_slice(&buf, addr).map_err(io::Error::other)
        }
        fn write_from(
            &mut self,
            mem: &GuestMemoryMmap,
            addr: vm_memory::GuestAddress,
            offset: u64,
            len: usize,
        ) -> io::Result<()> {
            let mut buf = vec![0u8; len];
            mem.read_slice(&mut buf, addr).map_err(io::Error::other)?;
            self.write_at(offset, &buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[derive(Clone, Default)]
    pub struct CountIrq(pub Arc<AtomicU32>);
    impl Signal for CountIrq {
        fn signal(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    const SECTORS: u64 = 256;

    fn channel(readonly: bool) -> (IdeChannel, MemDisk, Arc<AtomicU32>) {
        let disk = MemDisk::new(SECTORS);
        let irq = CountIrq::default();
        let count = irq.0.clone();
        let ch = IdeChannel::new(
            Some(AtaDisk::new(Box::new(disk.clone()), readonly, "SER-1")),
            None,
            Box::new(irq),
        );
        (ch, disk, count)
    }

    pub fn rd(ch: &mut IdeChannel, off: u64) -> u8 {
        let mut b = [0u8];
        ch.read(off, &mut b);
        b[0]
    }

    pub fn wr(ch: &mut IdeChannel, off: u64, v: u8) {
        ch.write(off, &[v]);
    }

    fn read_words(ch: &mut IdeChannel, n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..n {
            let mut w = [0u8; 2];
            ch.read(REG_DATA, &mut w);
            out.extend_from_slice(&w);
        }
        out
    }

    pub fn lba28_cmd(ch: &mut IdeChannel, lba: u32, count: u8, cmd: u8) {
        wr(ch, REG_NSECT, count);
        wr(ch, REG_LBAL, lba as u8);
        wr(ch, REG_LBAM, (lba >> 8) as u8);
        wr(ch, REG_LBAH, (lba >> 16) as u8);
        wr(ch, REG_DEVICE, DEV_LBA | ((lba >> 24) as u8 & 0xf));
        wr(ch, REG_STATUS_COMMAND, cmd);
    }

    pub fn lba48_cmd(ch: &mut IdeChannel, lba: u64, count: u16, cmd: u8) {
        // High bytes first, as libata's ata_sff_tf_load does.
        wr(ch, REG_NSECT, (count >> 8) as u8);
        wr(ch, REG_LBAL, (lba >> 24) as u8);
        wr(ch, REG_LBAM, (lba >> 32) as u8);
        wr(ch, REG_LBAH, (lba >> 40) as u8);
        wr(ch, REG_NSECT, count as u8);
        wr(ch, REG_LBAL, lba as u8);
        wr(ch, REG_LBAM, (lba >> 8) as u8);
        wr(ch, REG_LBAH, (lba >> 16) as u8);
        wr(ch, REG_DEVICE, DEV_LBA);
        wr(ch, REG_STATUS_COMMAND, cmd);
    }

    #[test]
    fn power_on_signature_says_ata_disk() {
        let (mut ch, _, _) = channel(false);
        assert_eq!(rd(&mut ch, REG_NSECT), 1);
        assert_eq!(rd(&mut ch, REG_LBAL), 1);
        assert_eq!(
            (rd(&mut ch, REG_LBAM), rd(&mut ch, REG_LBAH)),
            (0, 0),
            "ATA, not ATAPI"
        );
        assert_eq!(rd(&mut ch, REG_STATUS_COMMAND), ST_DRDY | ST_DSC);
    }

    #[test]
    fn identify_reports_size_model_lba48_and_flush() {
        let (mut ch, _, irqs) = channel(false);
        wr(&mut ch, REG_DEVICE, 0);
        wr(&mut ch, REG_STATUS_COMMAND, CMD_IDENTIFY);
        assert_eq!(irqs.load(Ordering::SeqCst), 1);
        assert_ne!(rd(&mut ch, REG_STATUS_COMMAND) & ST_DRQ, 0);
        let bytes = read_words(&mut ch, 256);
        let w = |i: usize| u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]);
        assert_eq!(
            rd(&mut ch, REG_STATUS_COMMAND) & ST_DRQ,
            0,
            "all 512 bytes taken"
        );
        assert_eq!(u32::from(w(60)) | u32::from(w(61)) << 16, SECTORS as u32);
        assert_eq!(u64::from(w(100)) | u64::from(w(101)) << 16, SECTORS);
        assert_ne!(w(83) & (1 << 10), 0, "LBA48");
        assert_ne!(w(83) & (1 << 12), 0, "FLUSH CACHE");
        assert_ne!(w(86) & (1 << 13), 0, "FLUSH CACHE EXT enabled");
        assert_ne!(w(85) & (1 << 5), 0, "write cache enabled");
        assert_ne!(w(49) & (1 << 9), 0, "LBA");
        assert_eq!(w(49) & (1 << 8), 0, "no DMA");
        // Model string, byte-swapped per word.
        let model: Vec<u8> = (27..47).flat_map(|i| w(i).to_be_bytes()).collect();
        assert_eq!(
            std::str::from_utf8(&model).unwrap().trim_end(),
            "FERROVM HARDDISK"
        );
        let serial: Vec<u8> = (10..20).flat_map(|i| w(i).to_be_bytes()).collect();
        assert_eq!(std::str::from_utf8(&serial).unwrap().trim_end(), "SER-1");
    }

    #[test]
    fn read_sectors_lba28_one_interrupt_per_sector() {
        let (mut ch, disk, irqs) = channel(false);
        lba28_cmd(&mut ch, 5, 2, CMD_READ_SECTORS);
        let got = read_words(&mut ch, 512);
        assert_eq!(&got[..], &disk.data.lock().unwrap()[5 * 512..7 * 512]);
        assert_eq!(irqs.load(Ordering::SeqCst), 2);
        assert_eq!(rd(&mut ch, REG_STATUS_COMMAND), ST_DRDY | ST_DSC);
        assert_eq!(ch.counters.sectors_read, 2);
    }

    #[test]
    fn read_multiple_ext_with_32bit_data_access() {
        let (mut ch, disk, irqs) = channel(false);
        lba48_cmd(&mut ch, 100, 20, CMD_READ_MULTIPLE_EXT);
        let mut got = Vec::new();
        for _ in 0..20 * 128 {
            let mut d = [0u8; 4];
            ch.read(REG_DATA, &mut d);
            got.extend_from_slice(&d);
        }
        assert_eq!(&got[..], &disk.data.lock().unwrap()[100 * 512..120 * 512]);
        assert_eq!(irqs.load(Ordering::SeqCst), 2, "16 sectors then 4");
    }

    /// A READ MULTIPLE EXT stopped in the middle of its first block, snapshotted, and
    /// restored into a new channel on the same disk: the rest of the data comes out of the
    /// new one, with the block size the guest set and the same interrupts.
    #[test]
    fn a_snapshot_taken_halfway_through_a_pio_read_goes_on_in_a_new_channel() {
        use crate::devices::Persist;
        let (mut ch, disk, irqs) = channel(false);
        wr(&mut ch, REG_NSECT, 8);
        wr(&mut ch, REG_STATUS_COMMAND, CMD_SET_MULTIPLE);
        lba48_cmd(&mut ch, 100, 20, CMD_READ_MULTIPLE_EXT);
        let mut got = read_words(&mut ch, 3 * 256 + 17);
        let state = ch.save().unwrap();
        // Through JSON, as a snapshot file holds it.
        let state: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
        let irq2 = CountIrq::default();
        let mut restored = IdeChannel::new(
            Some(AtaDisk::new(Box::new(disk.clone()), false, "SER-1")),
            None,
            Box::new(irq2.clone()),
        );
        restored.restore(&state).unwrap();
        assert_eq!(
            restored.save().unwrap(),
            state,
            "what was restored saves the same"
        );
        got.extend(read_words(&mut restored, (20 * 256) - (3 * 256 + 17)));
        assert_eq!(&got[..], &disk.data.lock().unwrap()[100 * 512..120 * 512]);
        assert_eq!(
            irqs.load(Ordering::SeqCst),
            2,
            "SET MULTIPLE, the first block"
        );
        assert_eq!(
            irq2.0.load(Ordering::SeqCst),
            2,
            "blocks 2 and 3 (8 + 4 sectors) on the new channel"
        );
        assert_eq!(rd(&mut restored, REG_STATUS_COMMAND) & ST_DRQ, 0, "done");
    }

    #[test]
    fn snapshots_of_another_channel_or_impossible_states_are_refused() {
        use crate::devices::Persist;
        let (mut ch, disk, _) = channel(false);
        let good = ch.save().unwrap();
        // The same channel with a slave drive it does not have.
        let mut two = IdeChannel::new(
            Some(AtaDisk::new(Box::new(disk.clone()), false, "SER-1")),
            Some(AtaDisk::new(Box::new(disk.clone()), false, "SER-2")),
            Box::new(CountIrq::default()),
        );
        let err = two.restore(&good).unwrap_err();
        assert!(err.contains("drive 1"), "{err}");
        let mut bad = good.clone();
        bad["pos"] = serde_json::json!(10);
        let err = ch.restore(&bad).unwrap_err();
        assert!(err.contains("sector buffer"), "{err}");
        let mut bad = good.clone();
        bad["transfer"] =
            serde_json::json!({"ReadSectors": {"lba": 0, "left": 1, "block": 1000000}});
        let err = ch.restore(&bad).unwrap_err();
        assert!(err.contains("sectors per block"), "{err}");
        // A DMA mode on a PIO-only drive.
        let mut bad = good.clone();
        bad["drives"][0] = serde_json::json!({"multiple": 16, "mode": {"UltraDma": 5}});
        let err = ch.restore(&bad).unwrap_err();
        assert!(err.contains("PIO only"), "{err}");
        assert!(ch.restore(&serde_json::json!({"x": 1})).is_err());
    }

    #[test]
    fn write_sectors_ext_reaches_the_disk_and_flush_syncs() {
        let (mut ch, disk, irqs) = channel(false);
        lba48_cmd(&mut ch, 0x10, 2, CMD_WRITE_SECTORS_EXT);
        assert_eq!(
            irqs.load(Ordering::SeqCst),
            0,
            "no interrupt before the first block"
        );
        assert_ne!(rd(&mut ch, REG_STATUS_COMMAND) & ST_DRQ, 0);
        for i in 0..512u32 {
            ch.write(REG_DATA, &(i as u16).to_le_bytes());
        }
        assert_eq!(irqs.load(Ordering::SeqCst), 2);
        assert_eq!(rd(&mut ch, REG_STATUS_COMMAND), ST_DRDY | ST_DSC);
        let d = disk.data.lock().unwrap();
        assert_eq!(&d[0x10 * 512..0x10 * 512 + 4], &[0, 0, 1, 0]);
        drop(d);
        wr(&mut ch, REG_STATUS_COMMAND, CMD_FLUSH_CACHE_EXT);
        assert_eq!(disk.flushes.load(Ordering::SeqCst), 1);
        assert_eq!(rd(&mut ch, REG_STATUS_COMMAND) & ST_ERR, 0);
    }

    #[test]
    fn past_the_end_is_idnf() {
        let (mut ch, _, irqs) = channel(false);
        lba28_cmd(&mut ch, SECTORS as u32 - 1, 2, CMD_READ_SECTORS);
        assert_eq!(rd(&mut ch, REG_STATUS_COMMAND) & (ST_ERR | ST_DRQ), ST_ERR);
        assert_ne!(rd(&mut ch, REG_ERROR_FEATURE) & ERR_IDNF, 0);
        assert_eq!(irqs.load(Ordering::SeqCst), 1);
        lba48_cmd(&mut ch, LBA48_MAX, 1, CMD_WRITE_SECTORS_EXT);
        assert_ne!(rd(&mut ch, REG_ERROR_FEATURE) & ERR_IDNF, 0);
    }

    #[test]
    fn readonly_disk_aborts_writes() {
        let (mut ch, disk, _) = channel(true);
        let before = disk.data.lock().unwrap().clone();
        lba28_cmd(&mut ch, 0, 1, CMD_WRITE_SECTORS);
        assert_eq!(rd(&mut ch, REG_STATUS_COMMAND) & ST_ERR, ST_ERR);
        assert_ne!(rd(&mut ch, REG_ERROR_FEATURE) & ERR_ABRT, 0);
        for _ in 0..256 {
            ch.write(REG_DATA, &[0xee, 0xee]);
        }
        assert_eq!(*disk.data.lock().unwrap(), before);
    }

    #[test]
    fn data_access_in_the_wrong_state_is_harmless() {
        let (mut ch, disk, _) = channel(false);
        let before = disk.data.lock().unwrap().clone();
        let mut d = [0u8; 2];
        ch.read(REG_DATA, &mut d);
        assert_eq!(d, [0xff, 0xff]);
        ch.write(REG_DATA, &[1, 2]);
        assert_eq!(*disk.data.lock().unwrap(), before);
        // A command in the middle of a read aborts it.
        lba28_cmd(&mut ch, 0, 4, CMD_READ_SECTORS);
        read_words(&mut ch, 10);
        wr(&mut ch, REG_STATUS_COMMAND, CMD_IDENTIFY);
        assert_eq!(rd(&mut ch, REG_STATUS_COMMAND) & (ST_ERR | ST_DRQ), ST_ERR);
    }

    #[test]
    fn unknown_and_atapi_commands_abort() {
        for cmd in [0x00u8, CMD_PACKET, CMD_IDENTIFY_PACKET, 0xff] {
            let (mut ch, _, _) = channel(false);
            wr(&mut ch, REG_STATUS_COMMAND, cmd);
            assert_eq!(rd(&mut ch, REG_STATUS_COMMAND) & ST_ERR, ST_ERR, "{cmd:#x}");
            assert_ne!(rd(&mut ch, REG_ERROR_FEATURE) & ERR_ABRT, 0);
        }
    }

    #[test]
    fn absent_slave_reads_zero_status_and_ignores_commands() {
        let (mut ch, _, irqs) = channel(false);
        wr(&mut ch, REG_DEVICE, DEV_DRV);
        assert_eq!(rd(&mut ch, REG_STATUS_COMMAND), 0);
        wr(&mut ch, REG_STATUS_COMMAND, CMD_IDENTIFY);
        assert_eq!(irqs.load(Ordering::SeqCst), 0);
        let mut ch = IdeChannel::new(None, None, Box::new(CountIrq::default()));
        assert_eq!(
            rd(&mut ch, REG_STATUS_COMMAND),
            0xff,
            "empty channel floats"
        );
    }

    #[test]
    fn hob_reads_back_the_previous_writes() {
        let (mut ch, _, _) = channel(false);
        wr(&mut ch, REG_LBAL, 0x12);
        wr(&mut ch, REG_LBAL, 0x34);
        ch.write_control(CTL_HOB);
        assert_eq!(rd(&mut ch, REG_LBAL), 0x12);
        ch.write_control(0);
        assert_eq!(rd(&mut ch, REG_LBAL), 0x34);
    }

    #[test]
    fn soft_reset_restores_the_signature_and_nien_masks_interrupts() {
        let (mut ch, _, irqs) = channel(false);
        lba28_cmd(&mut ch, 0, 1, CMD_READ_SECTORS);
        ch.write_control(CTL_SRST);
        assert_eq!(ch.read_alt_status() & ST_BSY, ST_BSY);
        ch.write_control(CTL_NIEN);
        assert_eq!(rd(&mut ch, REG_NSECT), 1);
        assert_eq!(ch.read_alt_status(), ST_DRDY | ST_DSC);
        let before = irqs.load(Ordering::SeqCst);
        lba28_cmd(&mut ch, 0, 1, CMD_READ_SECTORS);
        assert_eq!(irqs.load(Ordering::SeqCst), before, "nIEN set");
        assert_ne!(ch.read_alt_status() & ST_DRQ, 0);
    }

    #[test]
    fn set_multiple_validates_the_block_size() {
        let (mut ch, _, _) = channel(false);
        wr(&mut ch, REG_NSECT, 3);
        wr(&mut ch, REG_STATUS_COMMAND, CMD_SET_MULTIPLE);
        assert_eq!(rd(&mut ch, REG_STATUS_COMMAND) & ST_ERR, ST_ERR);
        wr(&mut ch, REG_NSECT, 8);
        wr(&mut ch, REG_STATUS_COMMAND, CMD_SET_MULTIPLE);
        assert_eq!(rd(&mut ch, REG_STATUS_COMMAND) & ST_ERR, 0);
    }

    #[test]
    fn chs_addressing_is_refused() {
        let (mut ch, _, _) = channel(false);
        wr(&mut ch, REG_NSECT, 1);
        wr(&mut ch, REG_DEVICE, 0); // LBA bit clear
        wr(&mut ch, REG_STATUS_COMMAND, CMD_READ_SECTORS);
        assert_eq!(rd(&mut ch, REG_STATUS_COMMAND) & ST_ERR, ST_ERR);
    }

    /// The accounting of a driver's PIO read, access by access: what the VMM reports must
    /// match what the guest did exactly, since it is what explains the model's cost.
    #[test]
    fn metrics_count_a_pio_read_exactly() {
        use crate::devices::bus::Bus;
        use crate::devices::metrics::Space;

        let (ch, _disk, irqs) = channel(false);
        let m = Arc::new(DeviceMetrics::new("ide0", "ide", "block"));
        let ch = Arc::new(Mutex::new(ch.with_metrics(m.clone())));
        let mut bus = Bus::new(Space::Pio);
        bus.insert_metered(
            Arc::new(Mutex::new(CommandBlock(ch.clone()))),
            0x1f0,
            8,
            Some(m.clone()),
        )
        .unwrap();
        bus.insert_metered(
            Arc::new(Mutex::new(ControlBlock(ch))),
            0x3f6,
            1,
            Some(m.clone()),
        )
        .unwrap();
        // READ SECTORS, 2 sectors from LBA 5: six task file writes (ata_sff_tf_load order).
        for (port, v) in [
            (0x1f2, 2u8),
            (0x1f3, 5),
            (0x1f4, 0),
            (0x1f5, 0),
            (0x1f6, 0xe0),
            (0x1f7, CMD_READ_SECTORS),
        ] {
            assert!(bus.write(port, &[v]));
        }
        let mut sector = vec![0u8; 512];
        for _ in 0..2 {
            // Per DRQ block: the interrupt handler reads status, then one `rep insw`.
            let mut st = [0u8];
            assert!(bus.read(0x1f7, &mut st));
            assert_eq!(st[0] & ST_DRQ, ST_DRQ);
            assert!(bus.read_string(0x1f0, 2, &mut sector));
        }
        let mut alt = [0u8];
        assert!(bus.read(0x3f6, &mut alt));
        assert_eq!(alt[0] & (ST_DRQ | ST_BSY | ST_ERR), 0);

        assert_eq!(m.exits(), 6 + 2 * 2 + 1);
        let regs = m.registers();
        assert_eq!(regs[&(Space::Pio, 0x1f0)].reads, 2, "one exit per sector");
        assert_eq!(regs[&(Space::Pio, 0x1f7)].reads, 2);
        assert_eq!(regs[&(Space::Pio, 0x1f7)].writes, 1);
        assert_eq!(regs[&(Space::Pio, 0x1f2)].writes, 1);
        assert_eq!(regs[&(Space::Pio, 0x3f6)].reads, 1);
        assert_eq!(regs.len(), 8, "0x1f0, 0x1f2-0x1f7, 0x3f6");
        assert_eq!(m.bytes_to_guest(), 1024);
        assert_eq!(m.bytes_from_guest(), 0);
        // PIO data-in interrupts once per DRQ block (ATA-7 vol. 2, 11.6).
        assert_eq!(m.interrupts(), 2);
        assert_eq!(u64::from(irqs.load(Ordering::SeqCst)), m.interrupts());
    }
}
