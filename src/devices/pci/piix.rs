//! The chipset functions of bus 0: the Intel 440FX host bridge, which Linux's PCI sanity
//! check looks for, and the PIIX3 ISA bridge and IDE function in slot 1 (Intel 82371SB
//! datasheet).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::config::{
    ConfigOnly, PciConfig, PciDevice, COMMAND_BUS_MASTER, COMMAND_IO_ENABLE, HEADER_MULTIFUNCTION,
    REG_COMMAND,
};
use crate::devices::bus::BusDevice;
use crate::devices::metrics::DeviceMetrics;

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

/// BAR4 of the IDE function: the bus master IDE registers, 8 bytes per channel.
pub const BMIDE_BAR: usize = 4;
pub const BMIDE_SIZE: u32 = 16;
const BMIDE_CHANNEL: u64 = 8;

/// A channel's bus master register block, as the IDE function reaches it, and the counters
/// its accesses go to.
pub struct BmChannel {
    pub regs: Arc<Mutex<dyn BusDevice>>,
    pub metrics: Option<Arc<DeviceMetrics>>,
}

/// The PIIX3 IDE function (8086:7010) in legacy mode: both channels at the ISA addresses and
/// IRQs 14/15, and bus master IDE at BAR4 (82371SB datasheet 2.5.1 and 2.7). A channel with
/// no disk is left disabled (its decode bit clear), which spares the guest probing it. The
/// bus master enable bit of the command register is shared with the channels, whose DMA
/// engines do nothing without it.
pub struct PiixIde {
    config: PciConfig,
    channels: [Option<BmChannel>; 2],
    bus_master: Arc<AtomicBool>,
}

/// The IDE function with its bus master registers at `bm_base`; `bus_master` follows the
/// command register's bus master enable.
pub fn piix3_ide(
    bm_base: u32,
    channels: [Option<BmChannel>; 2],
    bus_master: Arc<AtomicBool>,
) -> PiixIde {
    // Class 01 (storage) 01 (IDE), prog-if 0x80: bus master capable, both channels in
    // compatibility mode with fixed modes.
    let mut c = PciConfig::new(0x8086, 0x7010, 0x01, 0x01, 0x80, 0);
    for (reg, on) in [
        (PIIX_IDETIM_PRIMARY, channels[0].is_some()),
        (PIIX_IDETIM_SECONDARY, channels[1].is_some()),
    ] {
        c.set16(reg, if on { PIIX_IDETIM_DECODE } else { 0 });
        // The driver programs timings in the low bits; the decode bit stays ours.
        c.set_writable_mask(reg, 0x7fff, 2);
    }
    // The slave timing register (SIDETIM) and UDMA control, which the driver may write.
    c.make_writable(0x44, 1);
    c.make_writable(0x48, 4);
    c.set_io_bar(BMIDE_BAR, BMIDE_SIZE, bm_base);
    let cmd = c.get16(REG_COMMAND) | COMMAND_IO_ENABLE;
    c.set16(REG_COMMAND, cmd);
    bus_master.store(cmd & COMMAND_BUS_MASTER != 0, Ordering::Relaxed);
    PiixIde {
        config: c,
        channels,
        bus_master,
    }
}

impl PiixIde {
    fn channel(&self, bar: usize, offset: u64) -> Option<&BmChannel> {
        if bar != BMIDE_BAR {
            return None;
        }
        self.channels
            .get((offset / BMIDE_CHANNEL) as usize)
            .and_then(Option::as_ref)
    }
}

impl PciDevice for PiixIde {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn config_write(&mut self, off: usize, data: &[u8]) {
        self.config.write(off, data);
        let on = self.config.command() & COMMAND_BUS_MASTER != 0;
        self.bus_master.store(on, Ordering::Relaxed);
    }

    fn config_restored(&mut self) {
        let on = self.config.command() & COMMAND_BUS_MASTER != 0;
        self.bus_master.store(on, Ordering::Relaxed);
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match self.channel(bar, offset) {
            Some(ch) => lock(&ch.regs).read(offset % BMIDE_CHANNEL, data),
            // A channel with no disk: its registers read as zero.
            None => data.fill(0),
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if let Some(ch) = self.channel(bar, offset) {
            lock(&ch.regs).write(offset % BMIDE_CHANNEL, data);
        }
    }

    fn bar_metrics(&self, bar: usize, offset: u64) -> Option<Arc<DeviceMetrics>> {
        self.channel(bar, offset).and_then(|c| c.metrics.clone())
    }
}

fn lock(d: &Arc<Mutex<dyn BusDevice>>) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pci::config::REG_BAR0;

    struct Regs(u8);
    impl BusDevice for Regs {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn bar4_reaches_each_channels_block_and_bus_mastering_follows_the_command_register() {
        let bm = Arc::new(AtomicBool::new(true));
        let primary = Arc::new(Mutex::new(Regs(0x10)));
        let mut ide = piix3_ide(
            0xc100,
            [
                Some(BmChannel {
                    regs: primary.clone(),
                    metrics: None,
                }),
                None,
            ],
            bm.clone(),
        );
        assert!(
            !bm.load(Ordering::Relaxed),
            "firmware leaves bus mastering off"
        );
        assert_eq!(ide.config().io_bar(BMIDE_BAR), Some((0xc100, 16)));
        assert_eq!(
            ide.config().get32(REG_BAR0),
            0,
            "legacy mode: BAR0-3 unused"
        );
        assert_eq!(
            ide.config().get16(PIIX_IDETIM_SECONDARY) & PIIX_IDETIM_DECODE,
            0
        );
        let mut d = [0u8; 1];
        ide.bar_read(BMIDE_BAR, 2, &mut d);
        assert_eq!(d[0], 0x12);
        ide.bar_read(BMIDE_BAR, 10, &mut d);
        assert_eq!(d[0], 0, "no secondary channel");
        ide.bar_write(BMIDE_BAR, 0, &[0x40]);
        assert_eq!(primary.lock().unwrap().0, 0x40);
        ide.config_write(
            REG_COMMAND,
            &(COMMAND_IO_ENABLE | COMMAND_BUS_MASTER).to_le_bytes(),
        );
        assert!(bm.load(Ordering::Relaxed), "pci_set_master");
        ide.config_write(REG_COMMAND, &COMMAND_IO_ENABLE.to_le_bytes());
        assert!(!bm.load(Ordering::Relaxed));
    }
}
