//! The copper PHY behind MDIC: a Marvell 88E1011 (PHY id 0x01410c20, the one Linux's e1000
//! expects next to an 82540), at MDIO address 1, with the link up at 1000 Mb/s full duplex
//! and auto-negotiation complete. Registers 0-15 are IEEE 802.3 clause 22; 16-20 are the
//! Marvell-specific ones the driver programs (PSCR, PSSR, EPSCR).
//!
//! MDIC (317453 section 13.4.7): a write starts a read or write of PHY register REGADD at
//! PHYADD; the model completes it at once, so READY is set when the driver first polls. An
//! address other than the PHY's sets ERROR, as the MDIO bus gives no answer there.

use super::regs::{
    MDIC_DATA_MASK, MDIC_ERROR, MDIC_OP_READ, MDIC_OP_WRITE, MDIC_PHY_SHIFT, MDIC_READY,
    MDIC_REG_SHIFT,
};

/// The MDIO address of the PHY.
pub const PHY_ADDR: u32 = 1;

const PHY_CTRL: usize = 0;
const PHY_STATUS: usize = 1;
const PHY_ID1: usize = 2;
const PHY_ID2: usize = 3;
const PHY_AUTONEG_ADV: usize = 4;
const PHY_LP_ABILITY: usize = 5;
const PHY_AUTONEG_EXP: usize = 6;
const PHY_1000T_CTRL: usize = 9;
const PHY_1000T_STATUS: usize = 10;
const PHY_EXT_STATUS: usize = 15;
const M88_PSCR: usize = 16;
const M88_PSSR: usize = 17;
const M88_EPSCR: usize = 20;

/// PHY_CTRL bits that act and clear themselves: reset and restart auto-negotiation.
const CTRL_RESET: u16 = 1 << 15;
const CTRL_RESTART_AN: u16 = 1 << 9;
/// Power-on PHY_CTRL: auto-negotiation on, full duplex, 1000 Mb/s selected.
const CTRL_DEFAULT: u16 = 0x1140;
/// Link up, auto-negotiation complete and able, 10/100/1000 abilities, extended status.
const STATUS_VALUE: u16 = 0x796d;
/// The link partner: 10/100 half and full duplex, symmetric pause, auto-negotiation acked.
const LP_ABILITY_VALUE: u16 = 0x45e1;
/// Link partner auto-negotiation able.
const AUTONEG_EXP_VALUE: u16 = 0x0001;
/// Local and remote receivers OK, partner 1000BASE-T full and half duplex capable.
const STATUS_1000T_VALUE: u16 = 0x3c00;
/// 1000BASE-T full and half duplex capable.
const EXT_STATUS_VALUE: u16 = 0x3000;
/// 88E1011 PHY specific status: 1000 Mb/s, full duplex, speed and duplex resolved, link.
const PSSR_VALUE: u16 = 0xac00;

/// The PHY's registers.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Phy {
    regs: [u16; 32],
}

impl Default for Phy {
    fn default() -> Self {
        let mut regs = [0u16; 32];
        regs[PHY_CTRL] = CTRL_DEFAULT;
        regs[PHY_ID1] = 0x0141;
        regs[PHY_ID2] = 0x0c20;
        regs[PHY_AUTONEG_ADV] = 0x0de1;
        regs[PHY_1000T_CTRL] = 0x0e00;
        regs[M88_PSCR] = 0x0068;
        regs[M88_EPSCR] = 0x0d60;
        Self { regs }
    }
}

impl Phy {
    fn read(&self, reg: usize) -> u16 {
        match reg {
            PHY_STATUS => STATUS_VALUE,
            PHY_LP_ABILITY => LP_ABILITY_VALUE,
            PHY_AUTONEG_EXP => AUTONEG_EXP_VALUE,
            PHY_1000T_STATUS => STATUS_1000T_VALUE,
            PHY_EXT_STATUS => EXT_STATUS_VALUE,
            M88_PSSR => PSSR_VALUE,
            _ => self.regs[reg],
        }
    }

    fn write(&mut self, reg: usize, v: u16) {
        match reg {
            // Reset and restart complete at once; the link stays up.
            PHY_CTRL => self.regs[PHY_CTRL] = v & !(CTRL_RESET | CTRL_RESTART_AN),
            // Read-only: the identifiers and the status registers.
            PHY_STATUS | PHY_ID1 | PHY_ID2 | PHY_LP_ABILITY | PHY_AUTONEG_EXP
            | PHY_1000T_STATUS | PHY_EXT_STATUS | M88_PSSR => {}
            _ => self.regs[reg] = v,
        }
    }

    /// Carries out the MDI operation a write of `v` to MDIC starts; returns MDIC as the
    /// driver then reads it.
    pub fn mdic(&mut self, v: u32) -> u32 {
        let reg = ((v >> MDIC_REG_SHIFT) & 0x1f) as usize;
        let phy = (v >> MDIC_PHY_SHIFT) & 0x1f;
        let op = v & (3 << 26);
        let base = v & !(MDIC_READY | MDIC_ERROR | MDIC_DATA_MASK);
        if phy != PHY_ADDR || (op != MDIC_OP_READ && op != MDIC_OP_WRITE) {
            return base | (v & MDIC_DATA_MASK) | MDIC_READY | MDIC_ERROR;
        }
        if op == MDIC_OP_READ {
            base | u32::from(self.read(reg)) | MDIC_READY
        } else {
            self.write(reg, v as u16);
            base | (v & MDIC_DATA_MASK) | MDIC_READY
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(p: &mut Phy, phy: u32, reg: u32) -> u32 {
        p.mdic(reg << MDIC_REG_SHIFT | phy << MDIC_PHY_SHIFT | MDIC_OP_READ)
    }

    #[test]
    fn identifies_as_an_88e1011_with_the_link_up() {
        let mut p = Phy::default();
        let id = (read(&mut p, 1, 2) & 0xffff) << 16 | (read(&mut p, 1, 3) & 0xffff);
        assert_eq!(id & 0xffff_fff0, 0x0141_0c20, "M88E1011_I_PHY_ID");
        let st = read(&mut p, 1, 1);
        assert_ne!(st & MDIC_READY, 0);
        assert_eq!(st & MDIC_ERROR, 0);
        assert_ne!(st & 1 << 2, 0, "link status");
        assert_ne!(st & 1 << 5, 0, "auto-negotiation complete");
    }

    #[test]
    fn writes_stick_reset_clears_itself_and_other_addresses_fail() {
        let mut p = Phy::default();
        p.mdic(4 << MDIC_REG_SHIFT | 1 << MDIC_PHY_SHIFT | MDIC_OP_WRITE | 0x01e1);
        assert_eq!(read(&mut p, 1, 4) & 0xffff, 0x01e1);
        p.mdic(1 << MDIC_PHY_SHIFT | MDIC_OP_WRITE | 0x9140);
        assert_eq!(read(&mut p, 1, 0) & 0xffff, 0x1140, "reset bit self-clears");
        p.mdic(1 << MDIC_REG_SHIFT | 1 << MDIC_PHY_SHIFT | MDIC_OP_WRITE);
        assert_eq!(read(&mut p, 1, 1) & 0xffff, u32::from(STATUS_VALUE));
        let r = read(&mut p, 2, 1);
        assert_ne!(r & MDIC_ERROR, 0, "no PHY at address 2");
        assert_ne!(r & MDIC_READY, 0);
    }
}
