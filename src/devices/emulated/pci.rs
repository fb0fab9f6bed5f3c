//! A PCI bus 0 with configuration mechanism #1 (ports 0xCF8/0xCFC, PCI Local Bus 3.0
//! section 3.2.2.3.2), enough for stock drivers to find their devices: a host bridge
//! (440FX), a PIIX3 ISA bridge and whatever devices are plugged in.
//!
//! BARs are assigned by the VMM, as firmware would, inside a fixed I/O window; the driver may
//! size them (write all ones, read the mask) and may move them within the window. I/O
//! accesses in the window are dispatched by the devices' current BARs, and only while I/O
//! decoding is enabled in their command register.

use std::sync::{Arc, Mutex, MutexGuard};

use log::debug;

use crate::devices::bus::BusDevice;
use crate::devices::metrics::DeviceMetrics;

/// Configuration space size of a conventional PCI function.
pub const CONFIG_SIZE: usize = 256;
const REG_COMMAND: usize = 0x04;
const REG_BAR0: usize = 0x10;
const REG_INTERRUPT_LINE: usize = 0x3c;
const REG_INTERRUPT_PIN: usize = 0x3d;
const COMMAND_IO_ENABLE: u16 = 0x1;
/// CONFIG_ADDRESS bit 31: the access is a configuration cycle.
const CONFIG_ENABLE: u32 = 1 << 31;
/// Header type bit 7: the device has more than one function.
pub const HEADER_MULTIFUNCTION: u8 = 0x80;

/// The 256-byte configuration space of one function, with a write mask per byte.
#[derive(Clone)]
pub struct PciConfig {
    bytes: [u8; CONFIG_SIZE],
    writable: [u8; CONFIG_SIZE],
    /// Size of each I/O BAR (0: no BAR).
    bar_sizes: [u32; 6],
}

impl PciConfig {
    /// A type-0 header for `vendor:device` of class `class`.`subclass`.`prog_if`.
    pub fn new(
        vendor: u16,
        device: u16,
        class: u8,
        subclass: u8,
        prog_if: u8,
        header_type: u8,
    ) -> Self {
        let mut c = Self {
            bytes: [0; CONFIG_SIZE],
            writable: [0; CONFIG_SIZE],
            bar_sizes: [0; 6],
        };
        c.set16(0x00, vendor);
        c.set16(0x02, device);
        c.bytes[0x09] = prog_if;
        c.bytes[0x0a] = subclass;
        c.bytes[0x0b] = class;
        c.bytes[0x0e] = header_type;
        // Command: I/O space, memory space, bus master may be toggled by the driver.
        c.writable[REG_COMMAND] = 0x07;
        c.writable[REG_INTERRUPT_LINE] = 0xff;
        c
    }

    pub fn set8(&mut self, off: usize, v: u8) {
        self.bytes[off] = v;
    }

    pub fn set16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    pub fn set32(&mut self, off: usize, v: u32) {
        self.bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    pub fn get16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }

    pub fn get32(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.bytes[off..off + 4].try_into().unwrap())
    }

    /// Lets the driver write these bytes (device-specific registers).
    pub fn make_writable(&mut self, off: usize, len: usize) {
        self.writable[off..off + len].fill(0xff);
    }

    /// Declares I/O BAR `n` of `size` bytes (a power of two, at least 4) at `addr`, with
    /// I/O decoding on, as firmware leaves it.
    pub fn set_io_bar(&mut self, n: usize, size: u32, addr: u32) {
        assert!(size.is_power_of_two() && size >= 4, "I/O BAR size");
        self.bar_sizes[n] = size;
        let off = REG_BAR0 + 4 * n;
        self.set32(off, (addr & !(size - 1)) | 0x1);
        // Address bits above the size are writable; bit 0 (I/O) and the size bits are not.
        self.writable[off..off + 4].copy_from_slice(&(!(size - 1) & 0xffff_fffc).to_le_bytes());
        let cmd = self.get16(REG_COMMAND) | COMMAND_IO_ENABLE;
        self.set16(REG_COMMAND, cmd);
    }

    /// INTx pin (1 = INTA) and the IRQ it is routed to.
    pub fn set_interrupt(&mut self, pin: u8, line: u8) {
        self.bytes[REG_INTERRUPT_PIN] = pin;
        self.bytes[REG_INTERRUPT_LINE] = line;
    }

    /// The I/O range BAR `n` decodes now, if I/O decoding is on.
    pub fn io_bar(&self, n: usize) -> Option<(u64, u64)> {
        let size = self.bar_sizes[n];
        if size == 0 || self.get16(REG_COMMAND) & COMMAND_IO_ENABLE == 0 {
            return None;
        }
        let base = self.get32(REG_BAR0 + 4 * n) & !0x3;
        Some((u64::from(base), u64::from(size)))
    }

    /// A configuration read of `data.len()` bytes at `off` (in range: aligned by the caller).
    pub fn read(&self, off: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.bytes.get(off + i).copied().unwrap_or(0xff);
        }
    }

    /// A configuration write: only writable bits change.
    pub fn write(&mut self, off: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            if let Some(b) = self.bytes.get_mut(off + i) {
                let m = self.writable[off + i];
                *b = (*b & !m) | (v & m);
            }
        }
    }
}

/// A PCI function.
pub trait PciDevice: Send {
    fn config(&self) -> &PciConfig;
    fn config_mut(&mut self) -> &mut PciConfig;
    /// An access to I/O BAR `bar` at `offset`.
    fn io_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn io_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// A function with nothing but configuration space (bridges).
pub struct ConfigOnly(pub PciConfig);

impl PciDevice for ConfigOnly {
    fn config(&self) -> &PciConfig {
        &self.0
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.0
    }
}

/// The Intel 440FX host bridge, which Linux's PCI sanity check looks for.
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
        c.writable[reg] = 0xff;
        c.writable[reg + 1] = 0x7f;
    }
    // The slave timing register (SIDETIM) and UDMA control, which the driver may write.
    c.make_writable(0x44, 1);
    c.make_writable(0x48, 4);
    let cmd = c.get16(REG_COMMAND) | COMMAND_IO_ENABLE;
    c.set16(REG_COMMAND, cmd);
    ConfigOnly(c)
}

type SharedPci = Arc<Mutex<dyn PciDevice>>;
/// (device, function), the function, and the counters of its BAR accesses.
type PciSlot = ((u8, u8), SharedPci, Option<Arc<DeviceMetrics>>);

fn lock(d: &SharedPci) -> MutexGuard<'_, dyn PciDevice + 'static> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

/// Bus 0: configuration mechanism #1 on 0xCF8-0xCFF.
#[derive(Default)]
pub struct PciBus {
    address: u32,
    devices: Vec<PciSlot>,
}

impl PciBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Plugs `dev` in at `slot`.`function`.
    pub fn add(&mut self, slot: u8, function: u8, dev: SharedPci) {
        self.add_metered(slot, function, dev, None);
    }

    /// Plugs `dev` in at `slot`.`function`, counting exits on its BARs in `metrics`.
    pub fn add_metered(
        &mut self,
        slot: u8,
        function: u8,
        dev: SharedPci,
        metrics: Option<Arc<DeviceMetrics>>,
    ) {
        assert!(slot < 32 && function < 8);
        self.devices.push(((slot, function), dev, metrics));
    }

    fn target(&self) -> Option<(&SharedPci, usize)> {
        if self.address & CONFIG_ENABLE == 0 {
            return None;
        }
        let bus = (self.address >> 16) & 0xff;
        let slot = ((self.address >> 11) & 0x1f) as u8;
        let func = ((self.address >> 8) & 0x7) as u8;
        let reg = (self.address & 0xfc) as usize;
        if bus != 0 {
            return None;
        }
        self.devices
            .iter()
            .find(|((s, f), _, _)| *s == slot && *f == func)
            .map(|(_, d, _)| (d, reg))
    }

    /// The function whose I/O BAR covers `port`, with the BAR index and offset.
    pub fn io_target(&self, port: u64) -> Option<IoTarget> {
        for (_, dev, metrics) in &self.devices {
            let d = lock(dev);
            for bar in 0..6 {
                if let Some((base, size)) = d.config().io_bar(bar) {
                    if (base..base + size).contains(&port) {
                        return Some(IoTarget {
                            dev: dev.clone(),
                            bar,
                            offset: port - base,
                            metrics: metrics.clone(),
                        });
                    }
                }
            }
        }
        None
    }
}

/// Where an I/O access in the window goes.
pub struct IoTarget {
    pub dev: SharedPci,
    pub bar: usize,
    pub offset: u64,
    pub metrics: Option<Arc<DeviceMetrics>>,
}

/// Offsets in the 0xCF8 window.
const CONFIG_ADDRESS: u64 = 0;
const CONFIG_DATA: u64 = 4;

impl BusDevice for PciBus {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            CONFIG_ADDRESS if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            CONFIG_DATA..=7 => {
                let within = (offset - CONFIG_DATA) as usize;
                match self.target() {
                    Some((dev, reg)) => lock(dev).config().read(reg + within, data),
                    // No function there: master abort, all ones.
                    None => data.fill(0xff),
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            CONFIG_ADDRESS if data.len() == 4 => {
                self.address = u32::from_le_bytes(data.try_into().unwrap());
            }
            CONFIG_DATA..=7 => {
                let within = (offset - CONFIG_DATA) as usize;
                if let Some((dev, reg)) = self.target() {
                    lock(dev).config_mut().write(reg + within, data);
                }
            }
            _ => debug!("pci: {}-byte write at {offset:#x} ignored", data.len()),
        }
    }
}

/// The I/O port window where PCI BARs live; forwards each access to the function whose BAR
/// decodes it now.
pub struct PciIoWindow {
    bus: Arc<Mutex<PciBus>>,
    base: u64,
    /// The counters of the function that served the last access.
    last: Option<Arc<DeviceMetrics>>,
}

impl PciIoWindow {
    pub fn new(bus: Arc<Mutex<PciBus>>, base: u64) -> Self {
        Self {
            bus,
            base,
            last: None,
        }
    }

    fn target(&mut self, offset: u64) -> Option<IoTarget> {
        let t = self
            .bus
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .io_target(self.base + offset);
        self.last = t.as_ref().and_then(|t| t.metrics.clone());
        t
    }
}

impl BusDevice for PciIoWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.target(offset) {
            Some(t) => lock(&t.dev).io_read(t.bar, t.offset, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(t) = self.target(offset) {
            lock(&t.dev).io_write(t.bar, t.offset, data);
        }
    }

    fn served_by(&self) -> Option<Arc<DeviceMetrics>> {
        self.last.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Probe {
        cfg: PciConfig,
        last: Option<(usize, u64, Vec<u8>)>,
    }

    impl PciDevice for Probe {
        fn config(&self) -> &PciConfig {
            &self.cfg
        }
        fn config_mut(&mut self) -> &mut PciConfig {
            &mut self.cfg
        }
        fn io_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(bar as u8 * 0x10 + offset as u8);
        }
        fn io_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.last = Some((bar, offset, data.to_vec()));
        }
    }

    fn addr(slot: u32, func: u32, reg: u32) -> [u8; 4] {
        (CONFIG_ENABLE | slot << 11 | func << 8 | reg).to_le_bytes()
    }

    fn cfg_read32(bus: &mut PciBus, slot: u32, func: u32, reg: u32) -> u32 {
        bus.write(CONFIG_ADDRESS, &addr(slot, func, reg));
        let mut d = [0u8; 4];
        bus.read(CONFIG_DATA, &mut d);
        u32::from_le_bytes(d)
    }

    fn setup() -> (Arc<Mutex<PciBus>>, Arc<Mutex<Probe>>) {
        let mut bus = PciBus::new();
        bus.add(0, 0, Arc::new(Mutex::new(host_bridge())));
        let mut cfg = PciConfig::new(0x10ec, 0x8029, 0x02, 0x00, 0x00, 0);
        cfg.set_io_bar(0, 0x20, 0xc000);
        cfg.set_interrupt(1, 10);
        let probe = Arc::new(Mutex::new(Probe { cfg, last: None }));
        bus.add(2, 0, probe.clone());
        (Arc::new(Mutex::new(bus)), probe)
    }

    #[test]
    fn mechanism_one_finds_functions_and_floats_elsewhere() {
        let (bus, _) = setup();
        let mut bus = bus.lock().unwrap();
        assert_eq!(cfg_read32(&mut bus, 0, 0, 0), 0x1237_8086);
        assert_eq!(cfg_read32(&mut bus, 2, 0, 0), 0x8029_10ec);
        assert_eq!(cfg_read32(&mut bus, 2, 0, 8) >> 8, 0x02_0000, "class code");
        assert_eq!(cfg_read32(&mut bus, 5, 0, 0), 0xffff_ffff, "empty slot");
        assert_eq!(cfg_read32(&mut bus, 2, 1, 0), 0xffff_ffff, "no function 1");
        // The enable bit off: not a configuration cycle.
        bus.write(CONFIG_ADDRESS, &0u32.to_le_bytes());
        let mut d = [0u8; 4];
        bus.read(CONFIG_DATA, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Linux's type-1 probe writes 0x80000000 and expects to read it back.
        bus.write(CONFIG_ADDRESS, &CONFIG_ENABLE.to_le_bytes());
        bus.read(CONFIG_ADDRESS, &mut d);
        assert_eq!(u32::from_le_bytes(d), CONFIG_ENABLE);
    }

    #[test]
    fn byte_and_word_config_accesses() {
        let (bus, _) = setup();
        let mut bus = bus.lock().unwrap();
        bus.write(CONFIG_ADDRESS, &addr(2, 0, 0x3c));
        let mut b = [0u8; 1];
        bus.read(CONFIG_DATA + 1, &mut b);
        assert_eq!(b[0], 1, "interrupt pin at 0x3d");
        bus.read(CONFIG_DATA, &mut b);
        assert_eq!(b[0], 10, "interrupt line at 0x3c");
        let mut w = [0u8; 2];
        bus.write(CONFIG_ADDRESS, &addr(2, 0, 0));
        bus.read(CONFIG_DATA + 2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x8029);
    }

    #[test]
    fn bar_sizing_and_read_only_ids() {
        let (bus, _) = setup();
        let mut bus = bus.lock().unwrap();
        bus.write(CONFIG_ADDRESS, &addr(2, 0, 0x10));
        bus.write(CONFIG_DATA, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(
            cfg_read32(&mut bus, 2, 0, 0x10),
            0xffff_ffe1,
            "32-byte I/O BAR"
        );
        bus.write(CONFIG_ADDRESS, &addr(2, 0, 0x10));
        bus.write(CONFIG_DATA, &0xc040u32.to_le_bytes());
        assert_eq!(cfg_read32(&mut bus, 2, 0, 0x10), 0xc041);
        bus.write(CONFIG_ADDRESS, &addr(2, 0, 0));
        bus.write(CONFIG_DATA, &0u32.to_le_bytes());
        assert_eq!(
            cfg_read32(&mut bus, 2, 0, 0),
            0x8029_10ec,
            "ids are read-only"
        );
    }

    #[test]
    fn io_window_follows_the_bar_and_the_command_register() {
        let (bus, probe) = setup();
        let mut win = PciIoWindow::new(bus.clone(), 0xc000);
        let mut d = [0u8; 1];
        win.read(0x10, &mut d);
        assert_eq!(d[0], 0x10);
        win.write(0x1f, &[7]);
        assert_eq!(probe.lock().unwrap().last, Some((0, 0x1f, vec![7])));
        win.read(0x20, &mut d);
        assert_eq!(d[0], 0xff, "past the BAR");
        // The driver moves the BAR.
        {
            let mut b = bus.lock().unwrap();
            b.write(CONFIG_ADDRESS, &addr(2, 0, 0x10));
            b.write(CONFIG_DATA, &0xc100u32.to_le_bytes());
        }
        win.read(0x105, &mut d);
        assert_eq!(d[0], 5);
        win.read(0x5, &mut d);
        assert_eq!(d[0], 0xff);
        // I/O decoding off: nothing answers.
        {
            let mut b = bus.lock().unwrap();
            b.write(CONFIG_ADDRESS, &addr(2, 0, 0x04));
            b.write(CONFIG_DATA, &[0, 0]);
        }
        win.read(0x105, &mut d);
        assert_eq!(d[0], 0xff);
    }
}
