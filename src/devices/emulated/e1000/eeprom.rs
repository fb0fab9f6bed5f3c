//! The 82540EM's serial EEPROM: a 64-word Microwire part (93C46-style) that the driver
//! bit-bangs through EECD (SK clock, CS chip select, DI data in, DO data out; 317453 section
//! 5.3 and 13.4.3), and the EERD read register that does the same in hardware.
//!
//! The image (section 5.6, "EEPROM Address Map") holds the MAC address in words 0-2, the
//! PCI ids in words 0x0b-0x0e and a checksum word at 0x3f chosen so that words 0x00-0x3f sum
//! to 0xBABA, which Linux's `e1000_validate_eeprom_checksum` checks at probe.
//!
//! Microwire protocol (as the 93C46 datasheet describes it, and as `e1000_shift_out_ee_bits`
//! and `e1000_shift_in_ee_bits` drive it): with CS high, DI is sampled on each rising edge of
//! SK; leading zeros are ignored until a start bit (1), then two opcode bits and six address
//! bits. After a READ (opcode 10) the part drives a dummy 0, then shifts the word out, most
//! significant bit first, one bit per rising edge, and goes on with the next word for as
//! long as the clock runs. Dropping CS ends the command. Writes (opcodes 01, 11 and the 00
//! group: EWEN/EWDS/ERAL/WRAL) are accepted and ignored: the image is read-only, as if the
//! part were write-protected.

use super::regs::{EERD_DONE, EERD_START};

/// Words in a 1 Kbit part (EECD.EE_SIZE reads 0).
pub const WORDS: usize = 64;
const ADDRESS_BITS: u32 = 6;
/// Word 0x3f: the checksum word.
const CHECKSUM_WORD: usize = 0x3f;
/// What words 0x00-0x3f must sum to (Linux's EEPROM_SUM).
pub const CHECKSUM_SUM: u16 = 0xbaba;

// EECD bits.
pub const EECD_SK: u32 = 1 << 0;
pub const EECD_CS: u32 = 1 << 1;
pub const EECD_DI: u32 = 1 << 2;
pub const EECD_DO: u32 = 1 << 3;
pub const EECD_REQ: u32 = 1 << 6;
pub const EECD_GNT: u32 = 1 << 7;
pub const EECD_PRES: u32 = 1 << 8;
/// The bits software may drive: SK, CS, DI, the flash write enable field, REQ.
const EECD_WRITABLE: u32 = EECD_SK | EECD_CS | EECD_DI | 0x30 | EECD_REQ;

/// Where the Microwire state machine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Phase {
    /// CS high, waiting for the start bit.
    Idle,
    /// Collecting the opcode and address: `bits` of them so far (start bit excluded).
    Command { value: u32, bits: u32 },
    /// Shifting out words from `addr`; `pos` data bits have been clocked out (the dummy 0
    /// shows while `pos` is 0 and no edge has come yet).
    Reading {
        addr: usize,
        pos: u32,
        started: bool,
    },
    /// A command that has no output (writes, EWEN/EWDS): clocks are ignored until CS drops.
    Ignoring,
}

/// The EEPROM and the EECD/EERD view of it.
#[derive(Clone)]
pub struct Eeprom {
    words: [u16; WORDS],
    /// The pins as software last wrote them.
    eecd: u32,
    phase: Phase,
    /// DO as the part drives it now.
    data_out: bool,
    eerd: u32,
}

/// The part's state for snapshots: the image and where a bit-banged access is.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct EepromState {
    words: Vec<u16>,
    eecd: u32,
    phase: Phase,
    data_out: bool,
    eerd: u32,
}

impl Eeprom {
    pub fn state(&self) -> EepromState {
        EepromState {
            words: self.words.to_vec(),
            eecd: self.eecd,
            phase: self.phase,
            data_out: self.data_out,
            eerd: self.eerd,
        }
    }

    /// Puts back what `state` saved (an image of another size, or a read address past
    /// it, is refused).
    pub fn set_state(&mut self, st: &EepromState) -> Result<(), String> {
        let words: [u16; WORDS] = st
            .words
            .as_slice()
            .try_into()
            .map_err(|_| format!("an EEPROM of {} words, not {WORDS}", st.words.len()))?;
        if let Phase::Reading { addr, .. } = st.phase {
            if addr >= WORDS {
                return Err(format!("an EEPROM read at word {addr}"));
            }
        }
        self.words = words;
        self.eecd = st.eecd;
        self.phase = st.phase;
        self.data_out = st.data_out;
        self.eerd = st.eerd;
        Ok(())
    }

    /// The image for station address `mac`, with the PCI ids of an 82540EM.
    pub fn new(mac: [u8; 6], device_id: u16, subsystem_id: u16, vendor_id: u16) -> Self {
        let mut words = [0u16; WORDS];
        for (i, pair) in mac.chunks(2).enumerate() {
            words[i] = u16::from_le_bytes([pair[0], pair[1]]);
        }
        // Word 0x04: LED settings 0xffff, which the driver reads as "use the defaults".
        words[0x04] = 0xffff;
        // Words 0x08-0x09: the printed board assembly number the driver logs.
        words[0x08] = 0x1000;
        words[0x09] = 0x0001;
        // Word 0x0a (initialization control 1): no power management (APM), no flow control
        // by default; bit 14:13 = 01 marks the word valid.
        words[0x0a] = 0x2000;
        words[0x0b] = subsystem_id;
        words[0x0c] = vendor_id;
        words[0x0d] = device_id;
        words[0x0e] = vendor_id;
        // Word 0x0f (initialization control 2): bits 13:12 (PAUSE, ASM_DIR) zero, so the
        // driver configures no flow control, which a TAP has no use for.
        words[0x0f] = 0x0000;
        let sum = words[..CHECKSUM_WORD]
            .iter()
            .fold(0u16, |a, w| a.wrapping_add(*w));
        words[CHECKSUM_WORD] = CHECKSUM_SUM.wrapping_sub(sum);
        Self {
            words,
            eecd: 0,
            phase: Phase::Idle,
            data_out: true,
            eerd: 0,
        }
    }

    /// The words (for tests and the reset-time load of the receive address).
    pub fn words(&self) -> &[u16; WORDS] {
        &self.words
    }

    /// EECD as read: the pins software drives, DO from the part, present, and the grant
    /// (the part is never busy with an automatic load, so a request is granted at once).
    pub fn read_eecd(&self) -> u32 {
        let mut v = (self.eecd & EECD_WRITABLE) | EECD_PRES;
        if self.eecd & EECD_REQ != 0 {
            v |= EECD_GNT;
        }
        if self.data_out {
            v |= EECD_DO;
        }
        v
    }

    /// A write to EECD: the pins change, and the part reacts to CS and clock edges. Without
    /// the grant (EE_REQ) the pins belong to the hardware's own EEPROM logic and software's
    /// SK/CS/DI are not connected.
    pub fn write_eecd(&mut self, v: u32) {
        let old = self.eecd;
        self.eecd = v & EECD_WRITABLE;
        if v & EECD_REQ == 0 {
            return;
        }
        if v & EECD_CS == 0 {
            // Chip deselected: any command ends, DO floats (reads high through the pull-up).
            self.phase = Phase::Idle;
            self.data_out = true;
            return;
        }
        if old & EECD_CS == 0 || old & EECD_REQ == 0 {
            // CS rising: a new command starts.
            self.phase = Phase::Idle;
        }
        let rising = old & EECD_SK == 0 && v & EECD_SK != 0;
        if rising {
            self.clock(v & EECD_DI != 0);
        }
    }

    /// One rising edge of SK with `di` on the data input.
    fn clock(&mut self, di: bool) {
        self.phase = match self.phase {
            Phase::Idle if di => Phase::Command { value: 0, bits: 0 },
            Phase::Idle => Phase::Idle,
            Phase::Command { value, bits } => {
                let value = value << 1 | u32::from(di);
                let bits = bits + 1;
                if bits < 2 + ADDRESS_BITS {
                    Phase::Command { value, bits }
                } else if value >> ADDRESS_BITS == 0b10 {
                    // READ: the dummy zero comes out now.
                    self.data_out = false;
                    Phase::Reading {
                        addr: (value & ((1 << ADDRESS_BITS) - 1)) as usize,
                        pos: 0,
                        started: false,
                    }
                } else {
                    Phase::Ignoring
                }
            }
            Phase::Reading { addr, pos, started } => {
                // Each edge after the address shifts the next bit out; reads run on into the
                // following words (sequential read).
                let pos = if started { pos + 1 } else { 0 };
                let word = self.words[(addr + (pos / 16) as usize) % WORDS];
                self.data_out = word >> (15 - pos % 16) & 1 != 0;
                Phase::Reading {
                    addr,
                    pos,
                    started: true,
                }
            }
            Phase::Ignoring => Phase::Ignoring,
        };
    }

    pub fn read_eerd(&self) -> u32 {
        self.eerd
    }

    /// EERD: writing START with an address reads that word at once (13.4.4); DONE and the
    /// data read back. An address past the part reads all ones.
    pub fn write_eerd(&mut self, v: u32) {
        if v & EERD_START == 0 {
            self.eerd = v & 0xff00;
            return;
        }
        let addr = ((v >> 8) & 0xff) as usize;
        let data = self.words.get(addr).copied().unwrap_or(0xffff);
        self.eerd = u32::from(data) << 16 | (addr as u32) << 8 | EERD_DONE;
    }

    /// The part after a device reset: the image stays, the interface is idle.
    pub fn reset(&mut self) {
        self.eecd = 0;
        self.phase = Phase::Idle;
        self.data_out = true;
        self.eerd = 0;
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// What Linux's e1000 does for one word (e1000_acquire_eeprom, e1000_shift_out_ee_bits
    /// with the READ opcode and the address, e1000_shift_in_ee_bits(16),
    /// e1000_release_eeprom), through the register alone.
    pub fn linux_read_word(e: &mut Eeprom, addr: u16) -> u16 {
        let mut eecd = e.read_eecd();
        eecd |= EECD_REQ;
        e.write_eecd(eecd);
        assert_ne!(e.read_eecd() & EECD_GNT, 0, "grant");
        eecd &= !(EECD_DI | EECD_SK);
        e.write_eecd(eecd);
        eecd |= EECD_CS;
        e.write_eecd(eecd);
        let shift_out = |e: &mut Eeprom, eecd: &mut u32, data: u16, count: u32| {
            for i in (0..count).rev() {
                *eecd &= !EECD_DI;
                if data >> i & 1 != 0 {
                    *eecd |= EECD_DI;
                }
                e.write_eecd(*eecd);
                *eecd |= EECD_SK;
                e.write_eecd(*eecd);
                *eecd &= !EECD_SK;
                e.write_eecd(*eecd);
            }
            *eecd &= !EECD_DI;
            e.write_eecd(*eecd);
        };
        shift_out(e, &mut eecd, 0b110, 3);
        shift_out(e, &mut eecd, addr, 6);
        let mut data = 0u16;
        for _ in 0..16 {
            data <<= 1;
            eecd |= EECD_SK;
            e.write_eecd(eecd);
            if e.read_eecd() & EECD_DO != 0 {
                data |= 1;
            }
            eecd &= !EECD_SK;
            e.write_eecd(eecd);
        }
        // Release: CS and DI low, one more clock, REQ dropped.
        eecd &= !(EECD_CS | EECD_DI);
        e.write_eecd(eecd);
        eecd |= EECD_SK;
        e.write_eecd(eecd);
        eecd &= !EECD_SK;
        e.write_eecd(eecd);
        eecd &= !EECD_REQ;
        e.write_eecd(eecd);
        data
    }

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    #[test]
    fn bit_banged_reads_return_the_image_and_it_sums_to_baba() {
        let mut e = Eeprom::new(MAC, 0x100e, 0x001e, 0x8086);
        let words: Vec<u16> = (0..WORDS as u16)
            .map(|a| linux_read_word(&mut e, a))
            .collect();
        assert_eq!(&words[..], &e.words()[..]);
        assert_eq!(words[0], 0x5452, "MAC bytes 0-1, little-endian");
        assert_eq!(words[2], 0x5634);
        assert_eq!(words[0x0d], 0x100e);
        let sum = words.iter().fold(0u16, |a, w| a.wrapping_add(*w));
        assert_eq!(sum, CHECKSUM_SUM);
    }

    #[test]
    fn checksum_holds_for_every_mac() {
        for mac in [[0u8; 6], [0xff; 6], [0x02, 0, 0, 0, 0, 1]] {
            let e = Eeprom::new(mac, 0x100e, 0x001e, 0x8086);
            let sum = e.words().iter().fold(0u16, |a, w| a.wrapping_add(*w));
            assert_eq!(sum, CHECKSUM_SUM, "{mac:02x?}");
        }
    }

    #[test]
    fn without_the_grant_the_pins_do_nothing() {
        let mut e = Eeprom::new(MAC, 0x100e, 0x001e, 0x8086);
        assert_eq!(e.read_eecd() & EECD_GNT, 0);
        // Clock a READ of word 0 without EE_REQ: the part never answers.
        for bit in [1, 1, 0, 0, 0, 0, 0, 0, 0] {
            let di = if bit == 1 { EECD_DI } else { 0 };
            e.write_eecd(EECD_CS | di);
            e.write_eecd(EECD_CS | di | EECD_SK);
        }
        assert!(matches!(e.phase, Phase::Idle));
        assert_ne!(e.read_eecd() & EECD_PRES, 0);
    }

    #[test]
    fn sequential_read_runs_into_the_next_word_and_leading_zeros_are_ignored() {
        let mut e = Eeprom::new(MAC, 0x100e, 0x001e, 0x8086);
        let clock = |e: &mut Eeprom, di: bool| {
            let d = if di { EECD_DI } else { 0 };
            e.write_eecd(EECD_REQ | EECD_CS | d);
            e.write_eecd(EECD_REQ | EECD_CS | d | EECD_SK);
            e.read_eecd() & EECD_DO != 0
        };
        e.write_eecd(EECD_REQ);
        // Two leading zeros, start bit, opcode 10, address 1.
        for b in [0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1] {
            clock(&mut e, b == 1);
        }
        assert_eq!(e.read_eecd() & EECD_DO, 0, "dummy zero");
        let mut got = 0u32;
        for _ in 0..32 {
            got = got << 1 | u32::from(clock(&mut e, false));
        }
        let w = e.words();
        assert_eq!(got, u32::from(w[1]) << 16 | u32::from(w[2]));
        // Dropping CS ends the read; DO floats high.
        e.write_eecd(EECD_REQ);
        assert_ne!(e.read_eecd() & EECD_DO, 0);
    }

    #[test]
    fn writes_are_ignored_and_leave_the_image() {
        let mut e = Eeprom::new(MAC, 0x100e, 0x001e, 0x8086);
        let before = *e.words();
        e.write_eecd(EECD_REQ);
        // WRITE (01) word 0 with 0x0000.
        for b in [1u32, 0, 1, 0, 0, 0, 0, 0, 0]
            .into_iter()
            .chain(std::iter::repeat_n(0, 16))
        {
            let d = if b == 1 { EECD_DI } else { 0 };
            e.write_eecd(EECD_REQ | EECD_CS | d);
            e.write_eecd(EECD_REQ | EECD_CS | d | EECD_SK);
        }
        e.write_eecd(EECD_REQ);
        assert_eq!(*e.words(), before);
        assert_eq!(linux_read_word(&mut e, 0), before[0]);
    }

    #[test]
    fn eerd_reads_a_word_in_one_access() {
        let mut e = Eeprom::new(MAC, 0x100e, 0x001e, 0x8086);
        e.write_eerd(0x0d << 8 | EERD_START);
        let v = e.read_eerd();
        assert_ne!(v & EERD_DONE, 0);
        assert_eq!(v >> 16, 0x100e);
        e.write_eerd(0xff << 8 | EERD_START);
        assert_eq!(e.read_eerd() >> 16, 0xffff, "past the part");
    }
}
