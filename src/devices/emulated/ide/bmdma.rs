//! Bus master IDE DMA as the PIIX does it (Intel 82371SB datasheet, 2.7 "PCI Bus Master IDE
//! Registers" and 3.5 "Bus Master IDE Operation"; SFF-8038i "Bus Master Programming
//! Interface"): per channel a command register (start/stop, direction), a status register
//! (active, error, interrupt, drive DMA capable) and the address of a Physical Region
//! Descriptor table in guest memory. Each PRD is 8 bytes: a buffer address (bit 0 zero), a
//! byte count (bit 0 zero, 0 meaning 64 KiB) and, in bit 31 of the second dword, EOT.
//!
//! The engine here walks a table for a transfer of a given length and returns the guest
//! buffers, or the reason the hardware would fail it:
//!
//! - a PRD whose buffer crosses a 64 KiB boundary (the PIIX requires each region to stay
//!   inside one, and Linux's `ata_bmdma_fill_sg` splits them so): an error;
//! - a buffer or table entry outside guest memory (a master abort on real hardware): an
//!   error;
//! - a table that runs past the 64 KiB page it starts in without an EOT (the datasheet: the
//!   table must not cross a 64 KiB boundary): an error, so a table missing its EOT is
//!   walked at most 8192 entries;
//! - a table whose EOT comes before the transfer's end: the bytes it covers move, the rest
//!   waits for the driver to start the engine again (active clears, no interrupt: the
//!   "PRD exhausted" case of SFF-8038i table 3);
//! - a table longer than the transfer: fine, active stays set after the interrupt.
//!
//! What the channel does with the outcome (the ATA status, the interrupt) is in `super`.

use vm_memory::GuestAddress;

use crate::devices::disk::GuestBuf;
use crate::devices::emulated::dma;
use crate::vstate::memory::GuestMemoryMmap;

// Register offsets within a channel's 8-byte block.
pub const REG_COMMAND: u64 = 0;
pub const REG_STATUS: u64 = 2;
pub const REG_PRD: u64 = 4;
/// Size of one channel's block; the secondary channel's follows the primary's.
pub const CHANNEL_REGS: u64 = 8;

/// Command register: start/stop bus master, and the direction (set: the bus master writes
/// memory, i.e. a disk read).
pub const CMD_START: u8 = 1 << 0;
pub const CMD_WRITE_TO_MEMORY: u8 = 1 << 3;
/// Status register: active (read-only), error and interrupt (write 1 to clear), drive 0/1
/// DMA capable (read-write, for the driver's bookkeeping), simplex only (read-only, 0: both
/// channels may DMA at once).
pub const ST_ACTIVE: u8 = 1 << 0;
pub const ST_ERROR: u8 = 1 << 1;
pub const ST_INTR: u8 = 1 << 2;
pub const ST_DMA0: u8 = 1 << 5;
pub const ST_DMA1: u8 = 1 << 6;

/// PRD second dword, bit 31: end of table.
const PRD_EOT: u32 = 1 << 31;
const PRD_LEN: u64 = 8;
const BOUNDARY: u64 = 0x1_0000;

/// Register names of a channel's block, for the exit accounting.
pub fn register_name(offset: u64) -> &'static str {
    match offset {
        REG_COMMAND => "bm_command",
        REG_STATUS => "bm_status",
        REG_PRD..=7 => "bm_prd",
        _ => "bm",
    }
}

/// One channel's bus master registers.
#[derive(Debug, Default, Clone, Copy)]
pub struct BusMaster {
    pub command: u8,
    pub status: u8,
    pub prd: u32,
}

/// What a register write asks of the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BmEvent {
    None,
    /// START went from 0 to 1: run a pending DMA transfer.
    Started,
}

impl BusMaster {
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let bytes = [
            self.command,
            0,
            self.status,
            0,
            self.prd as u8,
            (self.prd >> 8) as u8,
            (self.prd >> 16) as u8,
            (self.prd >> 24) as u8,
        ];
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    /// A write of `data` at `offset`, byte by byte (drivers use byte accesses for command
    /// and status and a dword for the table address).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> BmEvent {
        let mut event = BmEvent::None;
        for (i, &v) in data.iter().enumerate() {
            match offset + i as u64 {
                REG_COMMAND => {
                    let was = self.command & CMD_START != 0;
                    self.command = v & (CMD_START | CMD_WRITE_TO_MEMORY);
                    match (was, v & CMD_START != 0) {
                        (false, true) => {
                            self.status |= ST_ACTIVE;
                            event = BmEvent::Started;
                        }
                        // Stopping the engine ends whatever it was doing.
                        (true, false) => self.status &= !ST_ACTIVE,
                        _ => {}
                    }
                }
                REG_STATUS => {
                    self.status &= !(v & (ST_ERROR | ST_INTR));
                    self.status = (self.status & !(ST_DMA0 | ST_DMA1)) | (v & (ST_DMA0 | ST_DMA1));
                }
                // The table address is dword aligned: bits 1:0 are reserved.
                o @ REG_PRD..=7 => {
                    let shift = 8 * (o - REG_PRD);
                    self.prd = (self.prd & !(0xff << shift)) | u32::from(v) << shift;
                    self.prd &= !3;
                }
                _ => {}
            }
        }
        event
    }
}

/// Why the bus master would fail a transfer (it sets the error bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrdError {
    /// A table entry lies outside guest memory.
    TableOutsideMemory { entry: u64 },
    /// The table ran past the 64 KiB page it started in without an EOT.
    TableTooLong,
    /// A region crosses a 64 KiB boundary.
    CrossesBoundary { addr: u64, len: u64 },
    /// A region's buffer lies outside guest memory.
    BufferOutsideMemory { addr: u64, len: u64 },
}

/// The guest buffers a table gives a transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prd {
    pub bufs: Vec<GuestBuf>,
    /// Bytes the buffers hold (less than asked for when the table ended first).
    pub covered: u64,
    /// The transfer used the table up to the end of its EOT region (active then clears).
    pub exhausted: bool,
}

/// Walks the table at `table` for a transfer of `want` bytes.
pub fn walk(mem: &GuestMemoryMmap, table: u32, want: u64) -> Result<Prd, PrdError> {
    let start = u64::from(table & !3);
    let mut entry = start;
    let mut bufs = Vec::new();
    let mut covered = 0u64;
    let mut exhausted = false;
    while covered < want {
        if entry / BOUNDARY != start / BOUNDARY {
            return Err(PrdError::TableTooLong);
        }
        let mut e = [0u8; 8];
        if !dma::read(mem, entry, &mut e) {
            return Err(PrdError::TableOutsideMemory { entry });
        }
        let addr = u64::from(u32::from_le_bytes([e[0], e[1], e[2], e[3]]) & !1);
        let flags = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
        let len = match u64::from(flags & 0xfffe) {
            0 => BOUNDARY,
            n => n,
        };
        if addr % BOUNDARY + len > BOUNDARY {
            return Err(PrdError::CrossesBoundary { addr, len });
        }
        let take = len.min(want - covered);
        if !dma::in_guest(mem, addr, take as usize) {
            return Err(PrdError::BufferOutsideMemory { addr, len: take });
        }
        bufs.push(GuestBuf {
            addr: GuestAddress(addr),
            len: take as usize,
        });
        covered += take;
        entry += PRD_LEN;
        if flags & PRD_EOT != 0 {
            exhausted = take == len;
            break;
        }
    }
    Ok(Prd {
        bufs,
        covered,
        exhausted,
    })
}

/// The first `bytes` of `bufs`.
pub fn truncate(bufs: &mut Vec<GuestBuf>, bytes: u64) {
    let mut left = bytes as usize;
    bufs.retain_mut(|b| {
        let keep = left > 0;
        b.len = b.len.min(left);
        left -= b.len;
        keep
    });
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::emulated::dma::tests::guest_memory;
    use vm_memory::Bytes;

    pub const MEM: usize = 4 << 20;

    /// Writes a PRD table at `at`: (address, count, eot).
    pub fn table(mem: &GuestMemoryMmap, at: u64, entries: &[(u32, u32, bool)]) {
        for (i, &(addr, count, eot)) in entries.iter().enumerate() {
            let flags = (count & 0xffff) | if eot { PRD_EOT } else { 0 };
            mem.write_obj(addr, GuestAddress(at + 8 * i as u64))
                .unwrap();
            mem.write_obj(flags, GuestAddress(at + 8 * i as u64 + 4))
                .unwrap();
        }
    }

    fn lens(p: &Prd) -> Vec<usize> {
        p.bufs.iter().map(|b| b.len).collect()
    }

    #[test]
    fn a_table_gives_its_regions_in_order() {
        let mem = guest_memory(MEM);
        table(
            &mem,
            0x1000,
            &[(0x10000, 0x800, false), (0x30000, 0x200, true)],
        );
        let p = walk(&mem, 0x1000, 0xa00).unwrap();
        assert_eq!(p.bufs[0].addr, GuestAddress(0x10000));
        assert_eq!(p.bufs[1].addr, GuestAddress(0x30000));
        assert_eq!(lens(&p), [0x800, 0x200]);
        assert!(p.exhausted, "ended at the end of the EOT region");
        assert_eq!(p.covered, 0xa00);
    }

    #[test]
    fn zero_count_means_64_kib() {
        let mem = guest_memory(MEM);
        table(&mem, 0x1000, &[(0x20000, 0, true)]);
        let p = walk(&mem, 0x1000, 0x1_0000).unwrap();
        assert_eq!(lens(&p), [0x1_0000]);
        assert!(p.exhausted);
        // A shorter transfer uses part of it; the table is not exhausted.
        let p = walk(&mem, 0x1000, 0x200).unwrap();
        assert_eq!(lens(&p), [0x200]);
        assert!(!p.exhausted);
    }

    #[test]
    fn a_region_crossing_64_kib_is_an_error() {
        let mem = guest_memory(MEM);
        table(&mem, 0x1000, &[(0x1_ff00, 0x200, true)]);
        assert_eq!(
            walk(&mem, 0x1000, 0x200),
            Err(PrdError::CrossesBoundary {
                addr: 0x1_ff00,
                len: 0x200
            })
        );
        // 64 KiB from an unaligned start crosses too.
        table(&mem, 0x1000, &[(0x2_0010, 0, true)]);
        assert!(matches!(
            walk(&mem, 0x1000, 0x200),
            Err(PrdError::CrossesBoundary { .. })
        ));
        // Ending exactly at the boundary is fine.
        table(&mem, 0x1000, &[(0x1_fe00, 0x200, true)]);
        assert!(walk(&mem, 0x1000, 0x200).is_ok());
    }

    #[test]
    fn a_missing_eot_is_bounded_by_the_tables_64_kib_page() {
        let mem = guest_memory(MEM);
        // The transfer is covered before the table would need an EOT: fine.
        table(
            &mem,
            0x2_0000,
            &[(0x10000, 0x200, false), (0x10200, 0x200, false)],
        );
        let p = walk(&mem, 0x2_0000, 0x400).unwrap();
        assert_eq!(p.covered, 0x400);
        assert!(!p.exhausted, "no EOT seen: active stays");
        // Entries of 2 bytes with no EOT run off the table's 64 KiB page: an error, after
        // at most 8192 entries, not a walk through all of memory.
        let entries: Vec<(u32, u32, bool)> = (0..8192).map(|_| (0x40000, 2, false)).collect();
        table(&mem, 0x2_0000, &entries);
        assert_eq!(walk(&mem, 0x2_0000, 1 << 20), Err(PrdError::TableTooLong));
    }

    #[test]
    fn addresses_outside_guest_memory_are_errors() {
        let mem = guest_memory(MEM);
        table(&mem, 0x1000, &[(MEM as u32 + 0x1000, 0x200, true)]);
        assert_eq!(
            walk(&mem, 0x1000, 0x200),
            Err(PrdError::BufferOutsideMemory {
                addr: MEM as u64 + 0x1000,
                len: 0x200
            })
        );
        assert_eq!(
            walk(&mem, MEM as u32 - 4, 0x200),
            Err(PrdError::TableOutsideMemory {
                entry: MEM as u64 - 4
            })
        );
        assert!(matches!(
            walk(&mem, 0xf000_0000, 0x200),
            Err(PrdError::TableOutsideMemory { .. })
        ));
    }

    #[test]
    fn an_early_eot_covers_less_than_asked() {
        let mem = guest_memory(MEM);
        table(&mem, 0x1000, &[(0x10000, 0x300, true)]);
        let p = walk(&mem, 0x1000, 0x1000).unwrap();
        assert_eq!(p.covered, 0x300);
        let mut bufs = p.bufs.clone();
        truncate(&mut bufs, 0x200);
        assert_eq!(bufs[0].len, 0x200, "whole sectors of it");
    }

    mod channel {
        use super::super::super::tests::{lba28_cmd, lba48_cmd, rd, wr, CountIrq, MemDisk};
        use super::super::super::*;
        use super::super::*;
        use super::{table, MEM};
        use crate::devices::emulated::dma::tests::guest_memory;
        use std::sync::atomic::AtomicU32;
        use vm_memory::Bytes;

        const SECTORS: u64 = 512;
        const TABLE: u32 = 0x1000;

        struct H {
            ch: IdeChannel,
            disk: MemDisk,
            mem: GuestMemoryMmap,
            irqs: Arc<AtomicU32>,
            bus_master: Arc<AtomicBool>,
        }

        fn h_with(dma: bool, readonly: bool) -> H {
            let mem = guest_memory(MEM);
            let disk = MemDisk::new(SECTORS);
            let irq = CountIrq::default();
            let irqs = irq.0.clone();
            let bus_master = Arc::new(AtomicBool::new(true));
            let ch = IdeChannel::new(
                Some(AtaDisk::new(Box::new(disk.clone()), readonly, "DMA").with_dma(dma)),
                None,
                Box::new(irq),
            )
            .with_dma(DmaContext {
                mem: mem.clone(),
                bus_master: bus_master.clone(),
            });
            H {
                ch,
                disk,
                mem,
                irqs,
                bus_master,
            }
        }

        fn h() -> H {
            h_with(true, false)
        }

        impl H {
            /// ata_bmdma_setup: the table, the direction, the status cleared.
            fn setup(&mut self, to_memory: bool) {
                self.ch.bm_write(REG_PRD, &TABLE.to_le_bytes());
                let dir = if to_memory { CMD_WRITE_TO_MEMORY } else { 0 };
                self.ch.bm_write(REG_COMMAND, &[dir]);
                self.ch.bm_write(REG_STATUS, &[ST_INTR | ST_ERROR]);
            }
            /// ata_bmdma_start.
            fn start(&mut self) {
                let dir = self.ch.bm.command & CMD_WRITE_TO_MEMORY;
                self.ch.bm_write(REG_COMMAND, &[dir | CMD_START]);
            }
            fn bm_status(&self) -> u8 {
                let mut b = [0u8];
                self.ch.bm_read(REG_STATUS, &mut b);
                b[0]
            }
            fn irqs(&self) -> u32 {
                self.irqs.load(std::sync::atomic::Ordering::SeqCst)
            }
            fn mem_at(&self, addr: u64, len: usize) -> Vec<u8> {
                let mut b = vec![0u8; len];
                self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
                b
            }
            fn disk_at(&self, sector: u64, len: usize) -> Vec<u8> {
                let o = (sector * 512) as usize;
                self.disk.data.lock().unwrap()[o..o + len].to_vec()
            }
        }

        #[test]
        fn read_dma_fills_the_prd_buffers_and_interrupts_once() {
            let mut h = h();
            table(
                &h.mem,
                u64::from(TABLE),
                &[(0x10000, 0x600, false), (0x30000, 0x200, true)],
            );
            h.setup(true);
            lba28_cmd(&mut h.ch, 7, 4, CMD_READ_DMA);
            assert_eq!(h.irqs(), 0, "waits for the bus master");
            assert_ne!(rd(&mut h.ch, REG_STATUS_COMMAND) & ST_DRQ, 0);
            h.start();
            assert_eq!(h.irqs(), 1);
            assert_eq!(h.mem_at(0x10000, 0x600), h.disk_at(7, 0x600));
            assert_eq!(h.mem_at(0x30000, 0x200), h.disk_at(10, 0x200));
            assert_eq!(h.bm_status() & (ST_INTR | ST_ACTIVE | ST_ERROR), ST_INTR);
            assert_eq!(rd(&mut h.ch, REG_STATUS_COMMAND), ST_DRDY | ST_DSC);
            assert_eq!(h.ch.counters.sectors_read, 4);
            // ata_bmdma_stop, then the interrupt acknowledged by writing it back.
            h.ch.bm_write(REG_COMMAND, &[CMD_WRITE_TO_MEMORY]);
            let st = h.bm_status();
            h.ch.bm_write(REG_STATUS, &[st]);
            assert_eq!(h.bm_status() & ST_INTR, 0);
        }

        #[test]
        fn write_dma_ext_reaches_the_disk_and_start_may_come_first() {
            let mut h = h();
            table(&h.mem, u64::from(TABLE), &[(0x20000, 0x400, true)]);
            h.mem
                .write_slice(&[0x5a; 0x400], GuestAddress(0x20000))
                .unwrap();
            h.setup(false);
            h.start();
            assert_eq!(h.irqs(), 0, "started with nothing to do");
            lba48_cmd(&mut h.ch, 300, 2, CMD_WRITE_DMA_EXT);
            assert_eq!(h.irqs(), 1);
            assert_eq!(h.disk_at(300, 0x400), vec![0x5a; 0x400]);
            assert_eq!(h.ch.counters.sectors_written, 2);
        }

        #[test]
        fn a_prd_crossing_64_kib_sets_the_error_bit_and_moves_nothing() {
            let mut h = h();
            table(&h.mem, u64::from(TABLE), &[(0x1_ff00, 0x200, true)]);
            h.setup(true);
            lba28_cmd(&mut h.ch, 0, 1, CMD_READ_DMA);
            let before = h.mem_at(0x1_ff00, 0x200);
            h.start();
            assert_eq!(
                h.bm_status() & (ST_ERROR | ST_ACTIVE | ST_INTR),
                ST_ERROR | ST_INTR
            );
            assert_eq!(rd(&mut h.ch, REG_STATUS_COMMAND) & ST_ERR, ST_ERR);
            assert_ne!(rd(&mut h.ch, REG_ERROR_FEATURE) & ERR_ABRT, 0);
            assert_eq!(h.irqs(), 1, "the driver hears of it at once");
            assert_eq!(h.mem_at(0x1_ff00, 0x200), before);
        }

        #[test]
        fn a_zero_count_moves_64_kib() {
            let mut h = h();
            table(&h.mem, u64::from(TABLE), &[(0x40000, 0, true)]);
            h.setup(true);
            lba28_cmd(&mut h.ch, 0, 128, CMD_READ_DMA);
            h.start();
            assert_eq!(h.mem_at(0x40000, 0x1_0000), h.disk_at(0, 0x1_0000));
            assert_eq!(
                h.bm_status() & (ST_INTR | ST_ACTIVE),
                ST_INTR,
                "table used up"
            );
        }

        #[test]
        fn a_table_without_eot_longer_than_the_transfer_leaves_active_set() {
            let mut h = h();
            table(
                &h.mem,
                u64::from(TABLE),
                &[(0x10000, 0x200, false), (0x11000, 0x200, false)],
            );
            h.setup(true);
            lba28_cmd(&mut h.ch, 1, 1, CMD_READ_DMA);
            h.start();
            assert_eq!(h.bm_status() & (ST_INTR | ST_ACTIVE), ST_INTR | ST_ACTIVE);
            assert_eq!(rd(&mut h.ch, REG_STATUS_COMMAND), ST_DRDY | ST_DSC);
            // A table with no EOT at all and regions too small: it runs off its 64 KiB page.
            let tiny: Vec<(u32, u32, bool)> = (0..8192).map(|_| (0x50000, 2, false)).collect();
            table(&h.mem, 0x6_0000, &tiny);
            h.ch.bm_write(REG_COMMAND, &[CMD_WRITE_TO_MEMORY]);
            h.ch.bm_write(REG_PRD, &0x6_0000u32.to_le_bytes());
            lba28_cmd(&mut h.ch, 0, 255, CMD_READ_DMA);
            h.start();
            assert_ne!(h.bm_status() & ST_ERROR, 0);
        }

        #[test]
        fn an_early_eot_stops_the_engine_and_a_new_table_moves_the_rest() {
            let mut h = h();
            table(&h.mem, u64::from(TABLE), &[(0x10000, 0x400, true)]);
            h.setup(true);
            lba28_cmd(&mut h.ch, 20, 4, CMD_READ_DMA);
            h.start();
            assert_eq!(h.irqs(), 0, "the drive is not done");
            assert_eq!(h.bm_status() & (ST_INTR | ST_ACTIVE), 0);
            assert_ne!(rd(&mut h.ch, REG_STATUS_COMMAND) & ST_DRQ, 0);
            assert_eq!(h.mem_at(0x10000, 0x400), h.disk_at(20, 0x400));
            table(&h.mem, 0x2000, &[(0x20000, 0x400, true)]);
            h.ch.bm_write(REG_COMMAND, &[CMD_WRITE_TO_MEMORY]);
            h.ch.bm_write(REG_PRD, &0x2000u32.to_le_bytes());
            h.start();
            assert_eq!(h.irqs(), 1);
            assert_eq!(h.mem_at(0x20000, 0x400), h.disk_at(22, 0x400));
            assert_eq!(rd(&mut h.ch, REG_STATUS_COMMAND), ST_DRDY | ST_DSC);
        }

        #[test]
        fn buffers_or_tables_outside_guest_memory_set_the_error_bit() {
            for (prd, entries) in [
                (TABLE, vec![(MEM as u32 + 0x1000, 0x200, true)]),
                (
                    TABLE,
                    vec![(0x10000, 0x100, false), (0xfee0_0000, 0x200, true)],
                ),
                (MEM as u32 - 4, vec![]),
                (0xfee0_0000, vec![]),
            ] {
                let mut h = h();
                table(&h.mem, u64::from(TABLE), &entries);
                h.setup(true);
                h.ch.bm_write(REG_PRD, &prd.to_le_bytes());
                lba28_cmd(&mut h.ch, 0, 1, CMD_READ_DMA);
                h.start();
                assert_ne!(h.bm_status() & ST_ERROR, 0, "table at {prd:#x}");
                assert_eq!(rd(&mut h.ch, REG_STATUS_COMMAND) & ST_ERR, ST_ERR);
                assert_eq!(h.mem_at(0x10000, 0x200), vec![0; 0x200], "nothing moved");
                // The channel goes on: a good transfer after the bad one.
                table(&h.mem, u64::from(TABLE), &[(0x10000, 0x200, true)]);
                h.setup(true);
                lba28_cmd(&mut h.ch, 3, 1, CMD_READ_DMA);
                h.start();
                assert_eq!(h.bm_status() & ST_ERROR, 0);
                assert_eq!(h.mem_at(0x10000, 0x200), h.disk_at(3, 0x200));
            }
        }

        #[test]
        fn wrong_direction_no_bus_mastering_and_pio_only_drives() {
            let mut h = h();
            table(&h.mem, u64::from(TABLE), &[(0x10000, 0x200, true)]);
            h.setup(false); // from memory, for a READ DMA
            lba28_cmd(&mut h.ch, 0, 1, CMD_READ_DMA);
            h.start();
            assert_ne!(h.bm_status() & ST_ERROR, 0);
            // Bus mastering off in the PCI command register: nothing moves until it is on.
            let mut h = h_with(true, false);
            table(&h.mem, u64::from(TABLE), &[(0x10000, 0x200, true)]);
            h.bus_master
                .store(false, std::sync::atomic::Ordering::SeqCst);
            h.setup(true);
            lba28_cmd(&mut h.ch, 5, 1, CMD_READ_DMA);
            h.start();
            assert_eq!(h.irqs(), 0);
            assert_eq!(h.mem_at(0x10000, 0x200), vec![0; 0x200]);
            assert_ne!(rd(&mut h.ch, REG_STATUS_COMMAND) & ST_DRQ, 0);
            // A PIO-only drive and a read-only one abort.
            let mut p = h_with(false, false);
            lba28_cmd(&mut p.ch, 0, 1, CMD_READ_DMA);
            assert_ne!(rd(&mut p.ch, REG_ERROR_FEATURE) & ERR_ABRT, 0);
            let mut r = h_with(true, true);
            lba28_cmd(&mut r.ch, 0, 1, CMD_WRITE_DMA);
            assert_ne!(rd(&mut r.ch, REG_ERROR_FEATURE) & ERR_ABRT, 0);
            // Past the end of the disk: IDNF, as for PIO.
            let mut e = h_with(true, false);
            lba28_cmd(&mut e.ch, SECTORS as u32, 1, CMD_READ_DMA);
            assert_ne!(rd(&mut e.ch, REG_ERROR_FEATURE) & ERR_IDNF, 0);
        }

        #[test]
        fn set_features_transfer_mode_and_dma_capable_bits() {
            let mut h = h();
            assert_ne!(h.bm_status() & ST_DMA0, 0, "drive 0 DMA capable");
            assert_eq!(h.bm_status() & ST_DMA1, 0, "no drive 1");
            wr(&mut h.ch, REG_ERROR_FEATURE, FEATURE_SET_TRANSFER_MODE);
            wr(&mut h.ch, REG_NSECT, 0x22);
            wr(&mut h.ch, REG_STATUS_COMMAND, CMD_SET_FEATURES);
            assert_eq!(rd(&mut h.ch, REG_STATUS_COMMAND) & ST_ERR, 0);
            let mut p = h_with(false, false);
            assert_eq!(p.bm_status() & ST_DMA0, 0);
            wr(&mut p.ch, REG_ERROR_FEATURE, FEATURE_SET_TRANSFER_MODE);
            wr(&mut p.ch, REG_NSECT, 0x22);
            wr(&mut p.ch, REG_STATUS_COMMAND, CMD_SET_FEATURES);
            assert_eq!(rd(&mut p.ch, REG_STATUS_COMMAND) & ST_ERR, ST_ERR);
        }
    }

    #[test]
    fn registers_start_stop_and_clear_by_writing_ones() {
        let mut bm = BusMaster::default();
        assert_eq!(
            bm.write(REG_PRD, &0x1234_5677u32.to_le_bytes()),
            BmEvent::None
        );
        assert_eq!(bm.prd, 0x1234_5674, "dword aligned");
        assert_eq!(bm.write(REG_COMMAND, &[CMD_WRITE_TO_MEMORY]), BmEvent::None);
        assert_eq!(
            bm.write(REG_COMMAND, &[CMD_WRITE_TO_MEMORY | CMD_START]),
            BmEvent::Started
        );
        assert_ne!(bm.status & ST_ACTIVE, 0);
        assert_eq!(
            bm.write(REG_COMMAND, &[CMD_WRITE_TO_MEMORY | CMD_START]),
            BmEvent::None,
            "already started"
        );
        bm.status |= ST_INTR | ST_ERROR;
        bm.write(REG_STATUS, &[ST_INTR | ST_DMA0 | ST_ACTIVE]);
        assert_eq!(bm.status & (ST_INTR | ST_ERROR), ST_ERROR);
        assert_ne!(bm.status & ST_DMA0, 0);
        assert_ne!(bm.status & ST_ACTIVE, 0, "active is read-only");
        bm.write(REG_COMMAND, &[0]);
        assert_eq!(bm.status & ST_ACTIVE, 0);
        let mut d = [0u8; 4];
        bm.read(REG_PRD, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1234_5674);
    }
}
