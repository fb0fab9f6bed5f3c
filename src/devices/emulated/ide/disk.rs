//! One ATA disk on a channel: its backend, its IDENTIFY DEVICE data (ATA/ATAPI-7 volume 1,
//! table 16) and the transfer mode SET FEATURES selected.
//!
//! A disk either offers DMA (`model=ide`) or not (`model=ide-pio`). With DMA, IDENTIFY says
//! so the way `ata_piix` and libata look for it: word 49 bit 8 (DMA supported), word 53
//! bit 2 (word 88 valid), multiword DMA modes 0-2 in word 63 and Ultra DMA modes 0-5 in
//! word 88, the selected mode in their high bytes. libata then picks the fastest mode both
//! the drive and the controller take (on the PIIX3, MWDMA2), sets it with SET FEATURES 03h
//! and issues READ/WRITE DMA. Without DMA those words are zero and libata stays on PIO.

use super::{LBA28_MAX, LBA48_MAX, MAX_MULTIPLE};
use crate::devices::disk::{BlockBackend, SECTOR_SIZE};

/// The transfer mode a SET FEATURES 03h selected (ATA-7 table 45, the count register).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TransferMode {
    Pio,
    MultiwordDma(u8),
    UltraDma(u8),
}

/// Highest multiword DMA and Ultra DMA modes offered.
const MAX_MWDMA: u8 = 2;
const MAX_UDMA: u8 = 5;

/// One disk on the channel.
pub struct AtaDisk {
    pub(super) backend: Box<dyn BlockBackend>,
    pub(super) readonly: bool,
    serial: String,
    pub(super) sectors: u64,
    pub(super) multiple: u16,
    /// Offers DMA (IDENTIFY words 49, 63, 88) and takes the DMA commands.
    pub(super) dma: bool,
    pub(super) mode: TransferMode,
}

/// What the guest set on a drive, for snapshots (the rest comes from its configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct DriveState {
    multiple: u16,
    mode: TransferMode,
}

impl AtaDisk {
    pub(super) fn state(&self) -> DriveState {
        DriveState {
            multiple: self.multiple,
            mode: self.mode,
        }
    }

    /// Puts back what `state` saved; a setting this drive could not have taken is refused.
    pub(super) fn set_state(&mut self, st: &DriveState) -> Result<(), String> {
        if st.multiple == 0 || st.multiple > MAX_MULTIPLE || !st.multiple.is_power_of_two() {
            return Err(format!("a READ MULTIPLE block of {} sectors", st.multiple));
        }
        let ok = match st.mode {
            TransferMode::Pio => true,
            TransferMode::MultiwordDma(m) => self.dma && m <= MAX_MWDMA,
            TransferMode::UltraDma(m) => self.dma && m <= MAX_UDMA,
        };
        if !ok {
            return Err(format!(
                "transfer mode {:?} on a drive {}",
                st.mode,
                if self.dma {
                    "offering DMA"
                } else {
                    "offering PIO only"
                }
            ));
        }
        self.multiple = st.multiple;
        self.mode = st.mode;
        Ok(())
    }

    /// A disk offering PIO only; `with_dma` makes it offer DMA.
    pub fn new(backend: Box<dyn BlockBackend>, readonly: bool, serial: &str) -> Self {
        let sectors = backend.size() / SECTOR_SIZE;
        Self {
            backend,
            readonly,
            serial: serial.to_string(),
            sectors,
            multiple: MAX_MULTIPLE,
            dma: false,
            mode: TransferMode::Pio,
        }
    }

    /// Whether the drive offers bus-master DMA.
    pub fn with_dma(mut self, dma: bool) -> Self {
        self.dma = dma;
        self
    }

    /// SET FEATURES 03h with `count`: PIO (00h, 01h, 08h-0Ch), multiword DMA (20h-22h) or
    /// Ultra DMA (40h-45h); false (the command aborts) for a mode the drive lacks.
    pub(super) fn set_transfer_mode(&mut self, count: u8) -> bool {
        let mode = match count {
            0x00 | 0x01 | 0x08..=0x0c => TransferMode::Pio,
            0x20..=0x27 if self.dma && count - 0x20 <= MAX_MWDMA => {
                TransferMode::MultiwordDma(count - 0x20)
            }
            0x40..=0x47 if self.dma && count - 0x40 <= MAX_UDMA => {
                TransferMode::UltraDma(count - 0x40)
            }
            _ => return false,
        };
        self.mode = mode;
        true
    }

    /// The 256-word IDENTIFY DEVICE block (ATA-7 table 16).
    pub(super) fn identify(&self) -> [u16; 256] {
        let mut id = [0u16; 256];
        let lba28 = self.sectors.min(LBA28_MAX);
        // Legacy geometry for the capacity, capped like every drive larger than 8 GB.
        let cyls = (self.sectors / (16 * 63)).clamp(1, 16383) as u16;
        id[0] = 0x0040; // fixed disk, ATA device
        id[1] = cyls;
        id[3] = 16;
        id[6] = 63;
        put_string(&mut id[10..20], &self.serial);
        put_string(&mut id[23..27], env!("CARGO_PKG_VERSION"));
        put_string(&mut id[27..47], "FERROVM HARDDISK");
        id[47] = 0x8000 | MAX_MULTIPLE;
        id[49] = 1 << 9; // LBA supported
        id[50] = 0x4000;
        id[53] = 0x0003; // words 54-58 and 64-70 valid
        id[54] = cyls;
        id[55] = 16;
        id[56] = 63;
        let chs = u32::from(cyls) * 16 * 63;
        id[57] = chs as u16;
        id[58] = (chs >> 16) as u16;
        id[59] = 0x0100 | self.multiple;
        id[60] = lba28 as u16;
        id[61] = (lba28 >> 16) as u16;
        id[64] = 0x0003; // PIO modes 3 and 4
                         // Cycle times (ns): multiword DMA minimum and recommended, PIO without and with
                         // IORDY flow control.
        id[65] = 120;
        id[66] = 120;
        id[67] = 120;
        id[68] = 120;
        if self.dma {
            id[49] |= 1 << 8; // DMA supported
            id[53] |= 1 << 2; // word 88 valid
            let (mw, udma) = match self.mode {
                TransferMode::MultiwordDma(m) => (1 << m, 0),
                TransferMode::UltraDma(m) => (0, 1 << m),
                TransferMode::Pio => (0, 0),
            };
            id[63] = ((1 << (MAX_MWDMA + 1)) - 1) | mw << 8;
            id[88] = ((1 << (MAX_UDMA + 1)) - 1) | udma << 8;
        }
        id[80] = 0x00f0; // ATA/ATAPI-4 to -7
        id[82] = 1 << 5 | 1 << 14; // write cache, NOP
        id[83] = 1 << 14 | 1 << 13 | 1 << 12 | 1 << 10; // FLUSH CACHE (EXT), LBA48
        id[84] = 1 << 14;
        id[85] = 1 << 5 | 1 << 14; // write cache enabled: the driver sends flushes
        id[86] = 1 << 13 | 1 << 12 | 1 << 10;
        id[87] = 1 << 14;
        for (i, w) in id[100..104].iter_mut().enumerate() {
            *w = (self.sectors.min(LBA48_MAX) >> (16 * i)) as u16;
        }
        id
    }
}

/// ATA strings are space padded, with the two bytes of each word swapped.
fn put_string(words: &mut [u16], s: &str) {
    let mut bytes = vec![b' '; words.len() * 2];
    for (i, b) in s
        .bytes()
        .filter(|b| b.is_ascii_graphic() || *b == b' ')
        .take(bytes.len())
        .enumerate()
    {
        bytes[i] = b;
    }
    for (w, pair) in words.iter_mut().zip(bytes.chunks(2)) {
        *w = u16::from(pair[0]) << 8 | u16::from(pair[1]);
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::MemDisk;
    use super::*;

    fn disk(dma: bool) -> AtaDisk {
        AtaDisk::new(Box::new(MemDisk::new(64)), false, "D").with_dma(dma)
    }

    #[test]
    fn identify_offers_dma_only_when_the_drive_has_it() {
        let pio = disk(false).identify();
        assert_eq!(pio[49] & (1 << 8), 0);
        assert_eq!((pio[63], pio[88]), (0, 0));
        assert_eq!(pio[53] & (1 << 2), 0);
        let dma = disk(true).identify();
        assert_ne!(dma[49] & (1 << 8), 0, "DMA supported");
        assert_ne!(dma[53] & (1 << 2), 0, "word 88 valid");
        assert_eq!(dma[63], 0x0007, "MWDMA 0-2, none selected");
        assert_eq!(dma[88], 0x003f, "UDMA 0-5, none selected");
    }

    #[test]
    fn set_features_selects_one_mode_and_identify_shows_it() {
        let mut d = disk(true);
        assert!(d.set_transfer_mode(0x22));
        assert_eq!(d.identify()[63], 0x0407, "MWDMA2 selected");
        assert_eq!(d.identify()[88] >> 8, 0);
        assert!(d.set_transfer_mode(0x45));
        assert_eq!(d.identify()[88], 0x203f, "UDMA5 selected");
        assert_eq!(d.identify()[63] >> 8, 0, "only one mode selected");
        assert!(!d.set_transfer_mode(0x46), "UDMA6 not offered");
        assert!(d.set_transfer_mode(0x0c), "PIO 4");
        assert_eq!(d.identify()[88] >> 8, 0);
        let mut p = disk(false);
        assert!(!p.set_transfer_mode(0x22), "no DMA on a PIO-only drive");
        assert!(p.set_transfer_mode(0x08));
    }
}
