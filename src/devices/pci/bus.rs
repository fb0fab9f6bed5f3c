//! PCI bus 0 with configuration mechanism #1 (ports 0xCF8/0xCFC, PCI Local Bus 3.0
//! section 3.2.2.3.2), and the windows through which the functions' BARs are reached.
//!
//! BARs are assigned by the VMM, as firmware would, inside fixed I/O and memory windows; the
//! driver may size them (write all ones, read the mask) and may move them within a window.
//! Accesses are dispatched by the functions' current BARs, and only while the command
//! register enables decoding of that space. The decoded ranges are kept in a table that
//! every configuration write refreshes, so an access looks up one table instead of asking
//! every function.

use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use log::debug;

use super::config::{BarRange, BarSpace, PciDevice};
use crate::devices::bus::BusDevice;
use crate::devices::metrics::DeviceMetrics;

/// CONFIG_ADDRESS bit 31: the access is a configuration cycle.
const CONFIG_ENABLE: u32 = 1 << 31;
/// Offsets in the 0xCF8 window.
const CONFIG_ADDRESS: u64 = 0;
const CONFIG_DATA: u64 = 4;

/// A function as the bus holds it.
pub type SharedPci = Arc<Mutex<dyn PciDevice>>;
/// (device, function), the function, and the counters of its BAR accesses.
type PciSlot = ((u8, u8), SharedPci, Option<Arc<DeviceMetrics>>);

fn lock(d: &SharedPci) -> MutexGuard<'_, dyn PciDevice + 'static> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

/// One BAR that decodes now.
#[derive(Clone)]
struct Decoded {
    range: BarRange,
    bar: usize,
    dev: SharedPci,
    metrics: Option<Arc<DeviceMetrics>>,
}

/// The BARs that decode now, shared by the bus (which refreshes it) and the windows.
#[derive(Clone, Default)]
pub struct DecodeMap(Arc<RwLock<Vec<Decoded>>>);

impl DecodeMap {
    /// The BAR decoding `len` bytes at `addr` in `space`, with the offset into it.
    fn find(&self, space: BarSpace, addr: u64, len: usize) -> Option<(Decoded, u64)> {
        let map = self.0.read().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .find(|d| {
                d.range.space == space
                    && addr >= d.range.base
                    && addr + len as u64 <= d.range.base + d.range.size
            })
            .map(|d| (d.clone(), addr - d.range.base))
    }
}

/// Bus 0: configuration mechanism #1 on 0xCF8-0xCFF.
#[derive(Default)]
pub struct PciBus {
    address: u32,
    devices: Vec<PciSlot>,
    decode: DecodeMap,
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
        self.refresh_decode();
    }

    /// The decode table, for the windows.
    pub fn decode_map(&self) -> DecodeMap {
        self.decode.clone()
    }

    /// Slots that have a function, in order.
    pub fn slots(&self) -> Vec<u8> {
        let mut s: Vec<u8> = self.devices.iter().map(|((s, _), _, _)| *s).collect();
        s.dedup();
        s
    }

    /// Rebuilds the decode table from every function's BARs and command register.
    fn refresh_decode(&self) {
        let mut map = Vec::new();
        for (_, dev, metrics) in &self.devices {
            let d = lock(dev);
            for bar in 0..6 {
                if let Some(range) = d.config().bar_range(bar) {
                    map.push(Decoded {
                        range,
                        bar,
                        dev: dev.clone(),
                        metrics: metrics.clone(),
                    });
                }
            }
        }
        *self.decode.0.write().unwrap_or_else(|p| p.into_inner()) = map;
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
}

/// The bus's state: CONFIG_ADDRESS and every function's configuration space (the device
/// models carry the rest of their state themselves).
impl crate::devices::Persist for PciBus {
    fn save(&mut self) -> Result<serde_json::Value, String> {
        let functions: Vec<(u8, u8, Vec<u8>)> = self
            .devices
            .iter()
            .map(|((s, f), d, _)| (*s, *f, lock(d).config().raw().to_vec()))
            .collect();
        Ok(serde_json::json!({ "address": self.address, "functions": functions }))
    }

    fn restore(&mut self, v: &serde_json::Value) -> Result<(), String> {
        #[derive(serde::Deserialize)]
        struct St {
            address: u32,
            functions: Vec<(u8, u8, Vec<u8>)>,
        }
        let st: St = crate::devices::from_state(v)?;
        if st.functions.len() != self.devices.len() {
            return Err(format!(
                "the snapshot has {} PCI functions, this VM {}",
                st.functions.len(),
                self.devices.len()
            ));
        }
        for ((slot, func, bytes), ((s, f), dev, _)) in st.functions.iter().zip(&self.devices) {
            if (slot, func) != (s, f) {
                return Err(format!(
                    "PCI function {slot:02x}.{func} where {s:02x}.{f} is"
                ));
            }
            let mut dev = lock(dev);
            dev.config_mut().set_raw(bytes)?;
            dev.config_restored();
        }
        self.address = st.address;
        self.refresh_decode();
        Ok(())
    }
}

impl BusDevice for PciBus {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            CONFIG_ADDRESS if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            CONFIG_DATA..=7 => {
                let within = (offset - CONFIG_DATA) as usize;
                match self.target() {
                    Some((dev, reg)) => lock(dev).config_read(reg + within, data),
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
                    lock(dev).config_write(reg + within, data);
                    // A BAR or the command register may have changed.
                    self.refresh_decode();
                }
            }
            _ => debug!("pci: {}-byte write at {offset:#x} ignored", data.len()),
        }
    }
}

/// A window of the I/O or memory space where PCI BARs live; forwards each access to the
/// function whose BAR decodes it now.
pub struct PciWindow {
    space: BarSpace,
    base: u64,
    decode: DecodeMap,
    /// The counters of the function that served the last access.
    last: Option<Arc<DeviceMetrics>>,
}

impl PciWindow {
    /// A window of `space` whose bus offset 0 is address `base`.
    pub fn new(space: BarSpace, base: u64, decode: DecodeMap) -> Self {
        Self {
            space,
            base,
            decode,
            last: None,
        }
    }
}

impl BusDevice for PciWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.decode.find(self.space, self.base + offset, data.len()) {
            Some((d, off)) => {
                let mut dev = lock(&d.dev);
                dev.bar_read(d.bar, off, data);
                self.last = dev.bar_metrics(d.bar, off).or_else(|| d.metrics.clone());
            }
            None => {
                self.last = None;
                data.fill(0xff);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match self.decode.find(self.space, self.base + offset, data.len()) {
            Some((d, off)) => {
                let mut dev = lock(&d.dev);
                dev.bar_write(d.bar, off, data);
                self.last = dev.bar_metrics(d.bar, off).or_else(|| d.metrics.clone());
            }
            None => self.last = None,
        }
    }

    fn served_by(&self) -> Option<Arc<DeviceMetrics>> {
        self.last.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::{PciConfig, REG_COMMAND};
    use super::super::piix::host_bridge;
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
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(bar as u8 * 0x10 + offset as u8);
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
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

    fn cfg_write32(bus: &mut PciBus, slot: u32, reg: u32, v: u32) {
        bus.write(CONFIG_ADDRESS, &addr(slot, 0, reg));
        bus.write(CONFIG_DATA, &v.to_le_bytes());
    }

    fn setup() -> (PciBus, Arc<Mutex<Probe>>) {
        let mut bus = PciBus::new();
        bus.add(0, 0, Arc::new(Mutex::new(host_bridge())));
        let mut cfg = PciConfig::new(0x10ec, 0x8029, 0x02, 0x00, 0x00, 0);
        cfg.set_io_bar(0, 0x20, 0xc000);
        cfg.set_mem_bar(1, 0x1000, 0xc000_1000, false, false);
        cfg.set_interrupt(1, 10);
        let probe = Arc::new(Mutex::new(Probe { cfg, last: None }));
        bus.add(2, 0, probe.clone());
        (bus, probe)
    }

    #[test]
    fn mechanism_one_finds_functions_and_floats_elsewhere() {
        let (mut bus, _) = setup();
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
        // Another bus number: nothing there.
        bus.write(CONFIG_ADDRESS, &(CONFIG_ENABLE | 1 << 16).to_le_bytes());
        bus.read(CONFIG_DATA, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn byte_and_word_config_accesses() {
        let (mut bus, _) = setup();
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
        let (mut bus, _) = setup();
        cfg_write32(&mut bus, 2, 0x10, 0xffff_ffff);
        assert_eq!(
            cfg_read32(&mut bus, 2, 0, 0x10),
            0xffff_ffe1,
            "32-byte I/O BAR"
        );
        cfg_write32(&mut bus, 2, 0x10, 0xc040);
        assert_eq!(cfg_read32(&mut bus, 2, 0, 0x10), 0xc041);
        cfg_write32(&mut bus, 2, 0x14, 0xffff_ffff);
        assert_eq!(
            cfg_read32(&mut bus, 2, 0, 0x14),
            0xffff_f000,
            "4 KiB memory BAR"
        );
        cfg_write32(&mut bus, 2, 0, 0);
        assert_eq!(
            cfg_read32(&mut bus, 2, 0, 0),
            0x8029_10ec,
            "ids are read-only"
        );
    }

    #[test]
    fn windows_follow_the_bars_and_the_command_register() {
        let (mut bus, probe) = setup();
        let mut io = PciWindow::new(BarSpace::Io, 0xc000, bus.decode_map());
        let mut mem = PciWindow::new(BarSpace::Memory, 0xc000_0000, bus.decode_map());
        let mut d = [0u8; 1];
        io.read(0x10, &mut d);
        assert_eq!(d[0], 0x10);
        io.write(0x1f, &[7]);
        assert_eq!(probe.lock().unwrap().last, Some((0, 0x1f, vec![7])));
        io.read(0x20, &mut d);
        assert_eq!(d[0], 0xff, "past the BAR");
        mem.read(0x1003, &mut d);
        assert_eq!(d[0], 0x13, "BAR 1 offset 3");
        mem.read(0x0fff, &mut d);
        assert_eq!(d[0], 0xff, "below the memory BAR");
        let mut q = [0u8; 4];
        mem.read(0x1ffe, &mut q);
        assert_eq!(q, [0xff; 4], "an access straddling the end of the BAR");
        // The driver moves the I/O BAR.
        cfg_write32(&mut bus, 2, 0x10, 0xc100);
        io.read(0x105, &mut d);
        assert_eq!(d[0], 5);
        io.read(0x5, &mut d);
        assert_eq!(d[0], 0xff);
        // I/O decoding off: the I/O BAR is gone, memory stays.
        bus.write(CONFIG_ADDRESS, &addr(2, 0, REG_COMMAND as u32));
        bus.write(CONFIG_DATA, &[0x2, 0]);
        io.read(0x105, &mut d);
        assert_eq!(d[0], 0xff);
        mem.read(0x1003, &mut d);
        assert_eq!(d[0], 0x13);
        assert!(mem.served_by().is_none(), "unmetered probe");
    }
}
