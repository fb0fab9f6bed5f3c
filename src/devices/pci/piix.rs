//! The chipset functions of bus 0: the Intel 440FX host bridge, which Linux's PCI sanity
//! check looks for, and the PIIX3 ISA bridge and IDE function in slot 1 (Intel 82371SB
//! datasheet).

use super::config::{ConfigOnly, PciConfig, COMMAND_IO_ENABLE, HEADER_MULTIFUNCTION, REG_COMMAND};

/// The Intel 440FX host bridge.
pub fn host_bridge() -> ConfigOnly {
    ConfigOnly(PciConfig::new(0x8086, 0x1237, 0x06, 0x00, 0x00, 0))
}

/// The PIIX3 ISA bridge: function 0 of the slot whose function 1 is the IDE controller.
pub fn piix3_isa_bridge() -> ConfigOnly {
    ConfigOnly(PciConfig::new(
        0x8086,
        0x7000,
        0x06,
        0x01,
        0x00,
        HEADER_MULTIFUNCTION,
    ))
}

/// IDETIM registers of the PIIX IDE function: bit 15 enables decoding of a channel's legacy
/// ports, which `ata_piix` checks before it probes the channel.
const PIIX_IDETIM_PRIMARY: usize = 0x40;
const PIIX_IDETIM_SECONDARY: usize = 0x42;
const PIIX_IDETIM_DECODE: u16 = 0x8000;

/// The PIIX3 IDE function (8086:7010) in legacy mode: both channels at the ISA addresses and
/// IRQs 14/15, no bus master DMA (BAR4 left zero, so the driver uses PIO). A channel with no
/// disk is left disabled, which spares the guest probing it.
pub fn piix3_ide(primary: bool, secondary: bool) -> ConfigOnly {
    // Class 01 (storage) 01 (IDE), prog-if 0x80: bus master capable, both channels in
    // compatibility mode with fixed modes.
    let mut c = PciConfig::new(0x8086, 0x7010, 0x01, 0x01, 0x80, 0);
    for (reg, on) in [
        (PIIX_IDETIM_PRIMARY, primary),
        (PIIX_IDETIM_SECONDARY, secondary),
    ] {
        c.set16(reg, if on { PIIX_IDETIM_DECODE } else { 0 });
        // The driver programs timings in the low bits; the decode bit stays ours.
        c.set_writable_mask(reg, 0x7fff, 2);
    }
    // The slave timing register (SIDETIM) and UDMA control, which the driver may write.
    c.make_writable(0x44, 1);
    c.make_writable(0x48, 4);
    let cmd = c.get16(REG_COMMAND) | COMMAND_IO_ENABLE;
    c.set16(REG_COMMAND, cmd);
    ConfigOnly(c)
}
