//! The configuration space of one PCI function (PCI Local Bus 3.0, chapter 6): the type-0
//! header, base address registers, the capability list, and the write mask that keeps
//! read-only bits read-only. Pure data: a device model embeds one and the bus reads and
//! writes it through `PciDevice`.

use std::sync::Arc;

use crate::devices::metrics::DeviceMetrics;

/// Configuration space size of a conventional PCI function.
pub const CONFIG_SIZE: usize = 256;
pub const REG_VENDOR_ID: usize = 0x00;
pub const REG_COMMAND: usize = 0x04;
pub const REG_STATUS: usize = 0x06;
pub const REG_REVISION: usize = 0x08;
pub const REG_BAR0: usize = 0x10;
/// One past the last BAR (BAR5 at 0x24).
pub const REG_BAR_END: usize = 0x28;
pub const REG_SUBSYSTEM_VENDOR: usize = 0x2c;
pub const REG_SUBSYSTEM_ID: usize = 0x2e;
pub const REG_CAPABILITIES: usize = 0x34;
pub const REG_INTERRUPT_LINE: usize = 0x3c;
pub const REG_INTERRUPT_PIN: usize = 0x3d;
/// Command register bits (6.2.2).
pub const COMMAND_IO_ENABLE: u16 = 1 << 0;
pub const COMMAND_MEMORY_ENABLE: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// INTx# disable (PCI 2.3): the function must not assert its interrupt pin.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register bit 4: the capability list at 0x34 is valid (6.2.3).
const STATUS_CAPABILITIES: u16 = 1 << 4;
/// Capabilities start after the type-0 header.
const FIRST_CAPABILITY: usize = 0x40;
/// Header type bit 7: the device has more than one function.
pub const HEADER_MULTIFUNCTION: u8 = 0x80;
/// BAR type bits (6.2.5.1).
const BAR_IO: u32 = 0x1;
const BAR_MEM_64: u32 = 0x4;
const BAR_MEM_PREFETCH: u32 = 0x8;

/// What a base address register decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BarKind {
    #[default]
    None,
    Io,
    /// 32-bit memory space.
    Mem32,
    /// 64-bit memory space: this BAR and the next hold the address.
    Mem64,
    /// The upper half of the 64-bit BAR before it.
    Mem64Upper,
}

/// Address space of a BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarSpace {
    Io,
    Memory,
}

/// The range a BAR decodes right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarRange {
    pub space: BarSpace,
    pub base: u64,
    pub size: u64,
}

/// The 256-byte configuration space of one function, with a write mask per byte.
#[derive(Clone)]
pub struct PciConfig {
    bytes: [u8; CONFIG_SIZE],
    writable: [u8; CONFIG_SIZE],
    /// Size and kind of each BAR.
    bars: [(BarKind, u64); 6],
    /// Where the next capability goes, and the next-pointer of the last one.
    next_capability: usize,
    last_capability_next: Option<usize>,
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
            bars: [(BarKind::None, 0); 6],
            next_capability: FIRST_CAPABILITY,
            last_capability_next: None,
        };
        c.set16(REG_VENDOR_ID, vendor);
        c.set16(0x02, device);
        c.bytes[0x09] = prog_if;
        c.bytes[0x0a] = subclass;
        c.bytes[0x0b] = class;
        c.bytes[0x0e] = header_type;
        // Command: I/O space, memory space, bus master and INTx disable may be toggled.
        c.writable[REG_COMMAND] = 0x07;
        c.writable[REG_COMMAND + 1] = (COMMAND_INTX_DISABLE >> 8) as u8;
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

    pub fn get8(&self, off: usize) -> u8 {
        self.bytes[off]
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

    /// Sets the write mask of `len` bytes at `off` (little-endian `mask`).
    pub fn set_writable_mask(&mut self, off: usize, mask: u32, len: usize) {
        self.writable[off..off + len].copy_from_slice(&mask.to_le_bytes()[..len]);
    }

    /// Revision id and subsystem ids.
    pub fn set_ids(&mut self, revision: u8, subsystem_vendor: u16, subsystem_id: u16) {
        self.bytes[REG_REVISION] = revision;
        self.set16(REG_SUBSYSTEM_VENDOR, subsystem_vendor);
        self.set16(REG_SUBSYSTEM_ID, subsystem_id);
    }

    /// Declares I/O BAR `n` of `size` bytes (a power of two, at least 4) at `addr`, with
    /// I/O decoding on, as firmware leaves it.
    pub fn set_io_bar(&mut self, n: usize, size: u32, addr: u32) {
        assert!(size.is_power_of_two() && size >= 4, "I/O BAR size");
        self.bars[n] = (BarKind::Io, u64::from(size));
        let off = REG_BAR0 + 4 * n;
        self.set32(off, (addr & !(size - 1)) | BAR_IO);
        // Address bits above the size are writable; bit 0 (I/O) and the size bits are not,
        // so writing all ones reads back the size (6.2.5.1).
        self.set_writable_mask(off, !(size - 1) & 0xffff_fffc, 4);
        let cmd = self.get16(REG_COMMAND) | COMMAND_IO_ENABLE;
        self.set16(REG_COMMAND, cmd);
    }

    /// Declares memory BAR `n` of `size` bytes (a power of two, at least 16) at `addr`,
    /// 64-bit (taking BAR `n + 1` too) or 32-bit, with memory decoding on.
    pub fn set_mem_bar(&mut self, n: usize, size: u64, addr: u64, is_64: bool, prefetch: bool) {
        assert!(size.is_power_of_two() && size >= 16, "memory BAR size");
        assert!(addr & (size - 1) == 0, "memory BAR alignment");
        let off = REG_BAR0 + 4 * n;
        let mut low = (addr as u32) & 0xffff_fff0;
        if prefetch {
            low |= BAR_MEM_PREFETCH;
        }
        if is_64 {
            assert!(n < 5, "a 64-bit BAR needs the next one");
            self.bars[n] = (BarKind::Mem64, size);
            self.bars[n + 1] = (BarKind::Mem64Upper, 0);
            self.set32(off, low | BAR_MEM_64);
            self.set32(off + 4, (addr >> 32) as u32);
            let mask = !(size - 1);
            self.set_writable_mask(off, (mask as u32) & 0xffff_fff0, 4);
            self.set_writable_mask(off + 4, (mask >> 32) as u32, 4);
        } else {
            assert!(addr + size <= 1 << 32, "32-bit BAR above 4 GiB");
            self.bars[n] = (BarKind::Mem32, size);
            self.set32(off, low);
            self.set_writable_mask(off, (!(size - 1) as u32) & 0xffff_fff0, 4);
        }
        let cmd = self.get16(REG_COMMAND) | COMMAND_MEMORY_ENABLE;
        self.set16(REG_COMMAND, cmd);
    }

    /// INTx pin (1 = INTA) and the IRQ it is routed to.
    pub fn set_interrupt(&mut self, pin: u8, line: u8) {
        self.bytes[REG_INTERRUPT_PIN] = pin;
        self.bytes[REG_INTERRUPT_LINE] = line;
    }

    /// Appends a capability (`body` without the id and next-pointer bytes) to the list;
    /// returns its offset. The bytes are read-only until `make_writable`.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> usize {
        let off = self.next_capability;
        let len = 2 + body.len();
        assert!(
            off + len <= CONFIG_SIZE,
            "capabilities overflow config space"
        );
        self.bytes[off] = id;
        self.bytes[off + 1] = 0;
        self.bytes[off + 2..off + len].copy_from_slice(body);
        match self.last_capability_next {
            Some(next) => self.bytes[next] = off as u8,
            None => {
                self.bytes[REG_CAPABILITIES] = off as u8;
                let status = self.get16(REG_STATUS) | STATUS_CAPABILITIES;
                self.set16(REG_STATUS, status);
            }
        }
        self.last_capability_next = Some(off + 1);
        // Capabilities are dword aligned (6.7).
        self.next_capability = (off + len).next_multiple_of(4);
        off
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.get16(REG_COMMAND)
    }

    /// The kind of BAR `n`.
    pub fn bar_kind(&self, n: usize) -> BarKind {
        self.bars[n].0
    }

    /// The address BAR `n` holds (both halves of a 64-bit BAR), decoding on or off.
    pub fn bar_address(&self, n: usize) -> Option<u64> {
        let off = REG_BAR0 + 4 * n;
        match self.bars[n].0 {
            BarKind::None | BarKind::Mem64Upper => None,
            BarKind::Io => Some(u64::from(self.get32(off) & !0x3)),
            BarKind::Mem32 => Some(u64::from(self.get32(off) & !0xf)),
            BarKind::Mem64 => {
                Some(u64::from(self.get32(off) & !0xf) | (u64::from(self.get32(off + 4)) << 32))
            }
        }
    }

    /// The range BAR `n` decodes now: its address while its space's decoding is on in the
    /// command register.
    pub fn bar_range(&self, n: usize) -> Option<BarRange> {
        let (kind, size) = self.bars[n];
        let cmd = self.command();
        let space = match kind {
            BarKind::Io if cmd & COMMAND_IO_ENABLE != 0 => BarSpace::Io,
            BarKind::Mem32 | BarKind::Mem64 if cmd & COMMAND_MEMORY_ENABLE != 0 => BarSpace::Memory,
            _ => return None,
        };
        let base = self.bar_address(n)?;
        // A BAR mid-sizing (all ones) or wrapping decodes nothing.
        base.checked_add(size)?;
        Some(BarRange { space, base, size })
    }

    /// The I/O range BAR `n` decodes now, if it is an I/O BAR with decoding on.
    pub fn io_bar(&self, n: usize) -> Option<(u64, u64)> {
        self.bar_range(n)
            .filter(|r| r.space == BarSpace::Io)
            .map(|r| (r.base, r.size))
    }

    /// The 256 bytes as they are (for snapshots).
    pub fn raw(&self) -> &[u8; CONFIG_SIZE] {
        &self.bytes
    }

    /// Overwrites the bytes, write masks aside (restoring a snapshot of the same function).
    pub fn set_raw(&mut self, bytes: &[u8]) -> Result<(), String> {
        if bytes.len() != CONFIG_SIZE {
            return Err(format!(
                "a configuration space of {} bytes, not {CONFIG_SIZE}",
                bytes.len()
            ));
        }
        self.bytes.copy_from_slice(bytes);
        Ok(())
    }

    /// A configuration read of `data.len()` bytes at `off`; past the end reads all ones.
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

/// Whether a configuration access of `len` bytes at `off` touches `[start, start + size)`.
pub fn touches(off: usize, len: usize, start: usize, size: usize) -> bool {
    off < start + size && start < off + len
}

/// A PCI function as the bus sees it.
pub trait PciDevice: Send {
    fn config(&self) -> &PciConfig;
    fn config_mut(&mut self) -> &mut PciConfig;
    /// A configuration read; devices whose registers have side effects override it.
    fn config_read(&mut self, off: usize, data: &mut [u8]) {
        self.config().read(off, data);
    }
    /// A configuration write; devices whose registers have side effects override it.
    fn config_write(&mut self, off: usize, data: &[u8]) {
        self.config_mut().write(off, data);
    }
    /// An access to BAR `bar` (I/O or memory) at `offset`.
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
    /// The counters an access to BAR `bar` at `offset` is charged to, when not the
    /// function's own (one function serving several devices, as the PIIX bus master
    /// registers serve two IDE channels).
    fn bar_metrics(&self, _bar: usize, _offset: u64) -> Option<Arc<DeviceMetrics>> {
        None
    }
    /// The configuration space was put back from a snapshot: state derived from it (the
    /// PIIX's bus master enable) follows.
    fn config_restored(&mut self) {}
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

#[cfg(test)]
mod tests {
    use super::*;

    fn w32(c: &mut PciConfig, off: usize, v: u32) {
        c.write(off, &v.to_le_bytes());
    }

    fn r32(c: &PciConfig, off: usize) -> u32 {
        let mut d = [0u8; 4];
        c.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn memory_bar_sizing_32_and_64_bit() {
        let mut c = PciConfig::new(0x1af4, 0x1042, 1, 0, 0, 0);
        c.set_mem_bar(0, 0x8000, 0xc000_0000, false, false);
        c.set_mem_bar(2, 0x2_0000, 0xc002_0000, true, true);
        // Sizing: write all ones, read back the mask with the type bits.
        w32(&mut c, 0x10, 0xffff_ffff);
        assert_eq!(r32(&c, 0x10), 0xffff_8000);
        w32(&mut c, 0x18, 0xffff_ffff);
        w32(&mut c, 0x1c, 0xffff_ffff);
        assert_eq!(r32(&c, 0x18), 0xfffe_0000 | BAR_MEM_64 | BAR_MEM_PREFETCH);
        assert_eq!(r32(&c, 0x1c), 0xffff_ffff);
        // Mid-sizing the BAR decodes nothing rather than a wrapped range.
        assert_eq!(c.bar_range(2), None);
        // Restore.
        w32(&mut c, 0x10, 0xc000_0000);
        w32(&mut c, 0x18, 0xc002_0000);
        w32(&mut c, 0x1c, 0);
        assert_eq!(
            c.bar_range(0),
            Some(BarRange {
                space: BarSpace::Memory,
                base: 0xc000_0000,
                size: 0x8000
            })
        );
        assert_eq!(c.bar_address(2), Some(0xc002_0000));
        assert_eq!(c.bar_kind(3), BarKind::Mem64Upper);
        assert_eq!(c.bar_range(3), None);
        // Memory decoding off: nothing decodes.
        c.write(REG_COMMAND, &[0, 0]);
        assert_eq!(c.bar_range(0), None);
        // Unused BARs read as zero and stay zero.
        w32(&mut c, 0x24, 0xffff_ffff);
        assert_eq!(r32(&c, 0x24), 0);
    }

    #[test]
    fn capability_list_is_linked_and_flagged() {
        let mut c = PciConfig::new(0x1af4, 0x1041, 2, 0, 0, 0);
        let a = c.add_capability(0x09, &[16, 1, 0, 0]);
        let b = c.add_capability(0x11, &[0; 10]);
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x48, "dword aligned after a 6-byte capability");
        assert_eq!(c.get8(REG_CAPABILITIES), 0x40);
        assert_ne!(c.get16(REG_STATUS) & STATUS_CAPABILITIES, 0);
        assert_eq!(c.get8(a + 1), b as u8);
        assert_eq!(c.get8(b + 1), 0, "end of list");
        // Read-only unless made writable.
        c.write(a + 2, &[0xaa]);
        assert_eq!(c.get8(a + 2), 16);
    }

    #[test]
    fn status_and_ids_are_read_only() {
        let mut c = PciConfig::new(0x8086, 0x100e, 2, 0, 0, 0);
        c.set_ids(3, 0x8086, 0x001e);
        w32(&mut c, 0, 0);
        w32(&mut c, 0x08, 0);
        w32(&mut c, 0x2c, 0);
        assert_eq!(r32(&c, 0), 0x100e_8086);
        assert_eq!(c.get8(REG_REVISION), 3);
        assert_eq!(c.get16(REG_SUBSYSTEM_ID), 0x001e);
        // Bus master and INTx disable are writable.
        c.write(
            REG_COMMAND,
            &(COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE).to_le_bytes(),
        );
        assert_eq!(c.command(), COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE);
    }
}
