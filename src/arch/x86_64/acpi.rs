//! The ACPI tables (ACPI 6.5) a guest reads instead of, or besides, the MP table: every table
//! in one place, its numbers from `layout`.
//!
//! ```text
//! RSDP (0xe0000, where the kernel scans) -> XSDT -> FADT -> DSDT, FACS
//!                                                -> MADT
//! ```
//! - FADT: the PM1a event and control blocks, the SCI on IRQ 9 and a reset register, all on
//!   I/O ports (`ACPI_PM_PORT`); no SMI command port (the platform is always in ACPI mode),
//!   no PM timer, no GPE blocks; an 8042, no VGA, no CMOS RTC. Not "hardware-reduced": on
//!   such a platform Linux drops the 8259s and with them the fixed ISA interrupt numbers
//!   that `ata_piix` in legacy mode (IRQ 14/15) and the ISA UARTs request, so the IDE disk
//!   would not probe (measured: `ata_piix: probe failed with error -22`).
//! - MADT: a local APIC per vCPU, the IOAPIC, the 8259s' presence (PCAT_COMPAT), and the ISA
//!   interrupt overrides (ISA IRQ n is GSI n, edge-triggered, active high, as KVM's
//!   in-kernel irqchip wires them; the SCI level-triggered).
//! - DSDT: `\_S5_` (power off), the PCI host bridge with `_CRS` windows matching what the
//!   VMM assigns and a `_PRT` that routes each slot's INTA# through a link device, the COM
//!   ports, the i8042 and the virtio-mmio devices (`LNRO0005`, as Firecracker and QEMU's
//!   microvm describe them).
//!
//! PCI INTx is declared edge-triggered and active high, in the `_PRT`'s link devices as in
//! the MP table: ferrovm raises PCI interrupts as irqfd pulses, and a pulse on a
//! level-triggered IOAPIC pin that is still being serviced would be lost.

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, Interrupt, Memory32Fixed, Method,
    Name, Package, Path, ResourceTemplate, IO,
};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    ACPI_MAX_SIZE, ACPI_PM_PORT, ACPI_SCI_IRQ, ACPI_START, APIC_START, I8042_PORT, IOAPIC_NUM_PINS,
    IOAPIC_START, PCI_CONFIG_PORT, PCI_CONFIG_PORT_LEN, PCI_MMIO_WINDOW_LEN, PCI_MMIO_WINDOW_START,
};
use super::mptable::{ioapic_id, PciIrq};
use crate::vstate::memory::GuestMemoryMmap;

const OEM_ID: [u8; 6] = *b"FRROVM";
const OEM_TABLE_ID: [u8; 8] = *b"FERROVM ";
const OEM_REVISION: u32 = 1;
/// DSDT revision 2: 64-bit integers in AML.
const DSDT_REVISION: u8 = 2;
/// MADT revision 5 (ACPI 6.x).
const MADT_REVISION: u8 = 5;

/// Offsets of the registers behind `ACPI_PM_PORT`: PM1a status and enable (the event
/// block, 4 bytes), PM1a control (2 bytes), reset (1 byte).
pub const PM1_STATUS_OFFSET: u16 = 0;
pub const PM1_ENABLE_OFFSET: u16 = 2;
pub const PM1_CONTROL_OFFSET: u16 = 4;
pub const RESET_OFFSET: u16 = 6;
const PM1_EVT_LEN: u8 = 4;
const PM1_CNT_LEN: u8 = 2;
/// What the guest writes to the reset register to reset the machine.
pub const RESET_VALUE: u8 = 1;
/// The S5 (soft off) sleep type the DSDT's `\_S5_` gives; the guest writes it to PM1
/// control's SLP_TYP field with SLP_EN to power off.
pub const S5_SLEEP_TYPE: u8 = 5;

/// FADT IA-PC boot architecture flags (5.2.9.3).
const IAPC_8042: u16 = 1 << 1;
const IAPC_NO_VGA: u16 = 1 << 2;
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;

/// MADT flags: the PC's dual 8259s are present (5.2.12).
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT interrupt source override (5.2.12.5), and its flags: active high, edge or level
/// triggered.
const MADT_ISO: u8 = 2;
const MPS_INTI_EDGE_HIGH: u16 = 0x5;
const MPS_INTI_LEVEL_HIGH: u16 = 0xd;
/// ISA IRQs: the overrides cover them.
const ISA_IRQS: u32 = 16;

/// A virtio-mmio device to describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub len: u64,
    pub irq: u32,
}

/// Everything the tables describe.
#[derive(Debug, Clone, Default)]
pub struct AcpiConfig {
    pub num_cpus: u8,
    /// PCI bus 0 and the INTA# routing of its slots, when the VM has a PCI bus.
    pub pci: Option<Vec<PciIrq>>,
    pub virtio_mmio: Vec<MmioDevice>,
    /// The UARTs: I/O port and IRQ.
    pub serial_ports: Vec<(u16, u32)>,
}

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("The ACPI tables ({0} bytes) do not fit below the MP table")]
    TooLarge(usize),
    #[error("Failed to write the ACPI tables to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// Bytes of already serialized AML, to nest in other AML objects.
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn aml_bytes(a: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    v
}

/// An edge-triggered, active-high, exclusive interrupt resource.
fn edge_irq(irq: u32) -> Interrupt {
    Interrupt::new(true, true, false, false, irq)
}

/// The PCI host bridge with its resource windows and interrupt routing.
fn pci_host_bridge(slots: &[PciIrq]) -> Vec<u8> {
    let mut out = Vec::new();
    // One link device per routed slot: its fixed IRQ, declared edge/high.
    let mut links = Vec::new();
    for (i, s) in slots.iter().enumerate() {
        let name = format!("LK{i:02X}");
        let irq = edge_irq(s.irq);
        let res = ResourceTemplate::new(vec![&irq]);
        let uid = i as u32;
        let sta = 0x0bu8;
        let link = aml_bytes(&Device::new(
            Path::new(&name),
            vec![
                &Name::new("_HID".into(), &EISAName::new("PNP0C0F")),
                &Name::new("_UID".into(), &uid),
                &Name::new("_STA".into(), &sta),
                &Name::new("_PRS".into(), &res),
                &Name::new("_CRS".into(), &res),
                // The routing is fixed: setting and disabling it change nothing.
                &Method::new("_SRS".into(), 1, false, vec![]),
                &Method::new("_DIS".into(), 0, false, vec![]),
            ],
        ));
        links.push((name, link));
    }
    for (_, bytes) in &links {
        out.extend_from_slice(bytes);
    }

    let bus = AddressSpace::new_bus_number(0u16, 0);
    let cfg_ports = IO::new(
        PCI_CONFIG_PORT,
        PCI_CONFIG_PORT,
        1,
        PCI_CONFIG_PORT_LEN as u8,
    );
    let io_low = AddressSpace::new_io(0u16, PCI_CONFIG_PORT - 1, None);
    let io_high = AddressSpace::new_io(PCI_CONFIG_PORT + PCI_CONFIG_PORT_LEN, 0xffff, None);
    let mem = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO_WINDOW_START as u32,
        (PCI_MMIO_WINDOW_START + PCI_MMIO_WINDOW_LEN - 1) as u32,
        None,
    );
    let crs = ResourceTemplate::new(vec![&bus, &cfg_ports, &io_low, &io_high, &mem]);
    // _PRT entries: (slot << 16 | 0xffff, pin 0 = INTA#, link, 0).
    let addrs: Vec<u32> = slots
        .iter()
        .map(|s| u32::from(s.slot) << 16 | 0xffff)
        .collect();
    let paths: Vec<Path> = links.iter().map(|(n, _)| Path::new(n)).collect();
    let entries: Vec<Package> = addrs
        .iter()
        .zip(&paths)
        .map(|(a, p)| Package::new(vec![a, &aml::ZERO, p, &aml::ZERO]))
        .collect();
    let entry_refs: Vec<&dyn Aml> = entries.iter().map(|e| e as &dyn Aml).collect();
    let prt = Package::new(entry_refs);
    let zero = 0u8;
    let bridge = aml_bytes(&Device::new(
        "PCI0".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0A03")),
            &Name::new("_ADR".into(), &zero),
            &Name::new("_SEG".into(), &zero),
            &Name::new("_UID".into(), &zero),
            &Name::new("_BBN".into(), &zero),
            &Name::new("_CRS".into(), &crs),
            &Name::new("_PRT".into(), &prt),
        ],
    ));
    out.extend_from_slice(&bridge);
    out
}

/// The DSDT's body: everything under `\_SB_` and `\_S5_`.
fn dsdt_body(cfg: &AcpiConfig) -> Vec<u8> {
    let mut sb = Vec::new();
    if let Some(slots) = &cfg.pci {
        sb.extend_from_slice(&pci_host_bridge(slots));
    }
    for (i, &(port, irq)) in cfg.serial_ports.iter().enumerate() {
        let io = IO::new(port, port, 1, 8);
        let int = edge_irq(irq);
        let uid = i as u32 + 1;
        let dev = aml_bytes(&Device::new(
            Path::new(&format!("COM{}", i + 1)),
            vec![
                &Name::new("_HID".into(), &EISAName::new("PNP0501")),
                &Name::new("_UID".into(), &uid),
                &Name::new("_CRS".into(), &ResourceTemplate::new(vec![&io, &int])),
            ],
        ));
        sb.extend_from_slice(&dev);
    }
    // The keyboard controller (no keyboard is attached; the guest may probe it, and it
    // resets the machine).
    let data = IO::new(I8042_PORT, I8042_PORT, 1, 1);
    let cmd = IO::new(I8042_PORT + 4, I8042_PORT + 4, 1, 1);
    let kbd_irq = edge_irq(1);
    let ps2 = aml_bytes(&Device::new(
        "PS2K".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0303")),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![&data, &cmd, &kbd_irq]),
            ),
        ],
    ));
    sb.extend_from_slice(&ps2);
    for (i, d) in cfg.virtio_mmio.iter().enumerate() {
        let mem = Memory32Fixed::new(true, d.base as u32, d.len as u32);
        let int = edge_irq(d.irq);
        let uid = i as u32;
        let one = 1u8;
        let dev = aml_bytes(&Device::new(
            Path::new(&format!("VR{i:02X}")),
            vec![
                &Name::new("_HID".into(), &"LNRO0005"),
                &Name::new("_UID".into(), &uid),
                // Cache coherent DMA.
                &Name::new("_CCA".into(), &one),
                &Name::new("_CRS".into(), &ResourceTemplate::new(vec![&mem, &int])),
            ],
        ));
        sb.extend_from_slice(&dev);
    }
    let mut body = aml_bytes(&aml::Scope::new("\\_SB_".into(), vec![&Raw(sb)]));
    // \_S5_: Package { SLP_TYPa, SLP_TYPb }.
    let s5 = Package::new(vec![&S5_SLEEP_TYPE, &S5_SLEEP_TYPE]);
    body.extend_from_slice(&aml_bytes(&Name::new("\\_S5_".into(), &s5)));
    body
}

fn madt(cfg: &AcpiConfig) -> Sdt {
    let mut t = Sdt::new(
        *b"APIC",
        44,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    t.write_u32(36, APIC_START as u32);
    t.write_u32(40, MADT_PCAT_COMPAT);
    let mut entries = Vec::new();
    for cpu in 0..cfg.num_cpus {
        ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled).to_aml_bytes(&mut entries);
    }
    IoApic::new(ioapic_id(cfg.num_cpus), IOAPIC_START as u32, 0).to_aml_bytes(&mut entries);
    for irq in 0..ISA_IRQS {
        // Type, length, bus 0 (ISA), source IRQ, GSI, flags.
        entries.extend_from_slice(&[MADT_ISO, 10, 0, irq as u8]);
        entries.extend_from_slice(&irq.to_le_bytes());
        let flags = if irq == ACPI_SCI_IRQ {
            MPS_INTI_LEVEL_HIGH
        } else {
            MPS_INTI_EDGE_HIGH
        };
        entries.extend_from_slice(&flags.to_le_bytes());
    }
    const { assert!(ISA_IRQS <= IOAPIC_NUM_PINS) };
    t.append_slice(&entries);
    t
}

fn fadt(dsdt_addr: u64, facs_addr: u64) -> Vec<u8> {
    // A register block of `bytes` bytes, accessed `access` bytes at a time.
    let io = |port: u16, bytes: u8, access: AccessSize| {
        GAS::new(GasSpace::SystemIo, 8 * bytes, 0, access, port.into())
    };
    let evt = ACPI_PM_PORT + PM1_STATUS_OFFSET;
    let cnt = ACPI_PM_PORT + PM1_CONTROL_OFFSET;
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .firmware_ctrl_64(facs_addr)
        .flag(Flags::ResetRegSup)
        // Power button: a fixed feature (PM1 PWRBTN_STS), so PwrButton stays clear; no
        // sleep button.
        .flag(Flags::SlpButton);
    f.sci_int = (ACPI_SCI_IRQ as u16).into();
    // No SMI command port: the platform is in ACPI mode from the start (SCI_EN reads 1).
    f.pm1a_evt_blk = u32::from(evt).into();
    f.pm1a_cnt_blk = u32::from(cnt).into();
    f.pm1_evt_len = PM1_EVT_LEN;
    f.pm1_cnt_len = PM1_CNT_LEN;
    // The same blocks as GAS; ACPICA checks that both forms agree.
    f.x_pm1a_evt_blk = io(evt, PM1_EVT_LEN, AccessSize::WordAccess);
    f.x_pm1a_cnt_blk = io(cnt, PM1_CNT_LEN, AccessSize::WordAccess);
    f.iapc_boot_arch = (IAPC_8042 | IAPC_NO_VGA | IAPC_NO_CMOS_RTC).into();
    f.reset_reg = io(ACPI_PM_PORT + RESET_OFFSET, 1, AccessSize::ByteAccess);
    f.reset_value = RESET_VALUE;
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"FERROVM\0").into();
    aml_bytes(&f.finalize())
}

fn align16(x: usize) -> usize {
    x.next_multiple_of(16)
}

/// Serialises every table as laid out from `base` (the RSDP first); returns the bytes.
pub fn build(cfg: &AcpiConfig, base: u64) -> Vec<u8> {
    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&dsdt_body(cfg));
    let madt = madt(cfg);

    let rsdp_off = 0;
    let xsdt_off = align16(Rsdp::len());
    let xsdt_len = 36 + 2 * 8;
    // The FACS must be 64-byte aligned (5.2.10).
    let facs_off = (xsdt_off + xsdt_len).next_multiple_of(64);
    let fadt_off = align16(facs_off + FACS::len());
    let madt_off = align16(fadt_off + acpi_tables::fadt::FADT::len());
    let dsdt_off = align16(madt_off + madt.len());
    let end = dsdt_off + dsdt.len();
    let addr = |off: usize| base + off as u64;

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(addr(fadt_off));
    xsdt.add_entry(addr(madt_off));
    let rsdp = Rsdp::new(OEM_ID, addr(xsdt_off));

    let mut blob = vec![0u8; end];
    let mut put = |off: usize, bytes: &[u8]| blob[off..off + bytes.len()].copy_from_slice(bytes);
    put(rsdp_off, &aml_bytes(&rsdp));
    put(xsdt_off, &aml_bytes(&xsdt));
    put(facs_off, &aml_bytes(&FACS::new()));
    put(fadt_off, &fadt(addr(dsdt_off), addr(facs_off)));
    put(madt_off, madt.as_slice());
    put(dsdt_off, dsdt.as_slice());
    blob
}

/// Writes the tables into guest memory at `ACPI_START`; returns the RSDP's address (for the
/// zero page and the PVH start info).
pub fn setup_acpi(mem: &GuestMemoryMmap, cfg: &AcpiConfig) -> Result<u64, AcpiError> {
    let blob = build(cfg, ACPI_START);
    if blob.len() as u64 > ACPI_MAX_SIZE {
        return Err(AcpiError::TooLarge(blob.len()));
    }
    mem.write_slice(&blob, GuestAddress(ACPI_START))
        .map_err(AcpiError::Write)?;
    Ok(ACPI_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// Walks the tables the way the kernel does and checks each one's checksum and length;
    /// returns (signature, offset, bytes) per table.
    fn parse(blob: &[u8], base: u64) -> Vec<([u8; 4], usize, Vec<u8>)> {
        assert_eq!(&blob[..8], b"RSD PTR ");
        assert_eq!(sum(&blob[..20]), 0, "RSDP checksum");
        assert_eq!(sum(&blob[..36]), 0, "RSDP extended checksum");
        assert_eq!(blob[15], 2, "ACPI 2.0+ RSDP");
        let table = |addr: u64| -> ([u8; 4], usize, Vec<u8>) {
            let off = (addr - base) as usize;
            let len = u32_at(blob, off + 4) as usize;
            let t = blob[off..off + len].to_vec();
            assert_eq!(
                sum(&t),
                0,
                "checksum of {}",
                String::from_utf8_lossy(&t[..4])
            );
            (t[..4].try_into().unwrap(), off, t)
        };
        let xsdt = table(u64_at(blob, 24));
        assert_eq!(&xsdt.0, b"XSDT");
        let mut out = vec![xsdt.clone()];
        for i in 0..(xsdt.2.len() - 36) / 8 {
            let t = table(u64_at(&xsdt.2, 36 + 8 * i));
            if &t.0 == b"FACP" {
                let dsdt = table(u64_at(&t.2, 140));
                assert_eq!(&dsdt.0, b"DSDT");
                out.push(dsdt);
            }
            out.push(t);
        }
        out
    }

    fn find<'a>(tables: &'a [([u8; 4], usize, Vec<u8>)], sig: &[u8; 4]) -> &'a [u8] {
        &tables.iter().find(|t| &t.0 == sig).unwrap().2
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    fn config() -> AcpiConfig {
        AcpiConfig {
            num_cpus: 4,
            pci: Some(vec![PciIrq { slot: 2, irq: 5 }, PciIrq { slot: 3, irq: 6 }]),
            virtio_mmio: vec![MmioDevice {
                base: 0xd000_0000,
                len: 0x1000,
                irq: 7,
            }],
            serial_ports: vec![(0x3f8, 4), (0x2f8, 3)],
        }
    }

    #[test]
    fn tables_chain_from_the_rsdp_with_valid_checksums() {
        let blob = build(&config(), ACPI_START);
        let tables = parse(&blob, ACPI_START);
        let sigs: Vec<&[u8; 4]> = tables.iter().map(|t| &t.0).collect();
        assert_eq!(sigs, vec![b"XSDT", b"DSDT", b"FACP", b"APIC"]);
        assert!((blob.len() as u64) < ACPI_MAX_SIZE);
        assert!(tables.iter().all(|t| t.1 % 16 == 0), "16-byte aligned");
    }

    #[test]
    fn fadt_names_the_pm1_blocks_the_sci_the_reset_register_and_the_facs() {
        let blob = build(&config(), ACPI_START);
        let tables = parse(&blob, ACPI_START);
        let f = find(&tables, b"FACP");
        assert_eq!(f.len(), 276, "ACPI 6 FADT");
        let flags = u32_at(f, 112);
        assert_eq!(flags & Flags::HwReducedAcpi as u32, 0, "legacy PICs kept");
        assert_ne!(flags & Flags::ResetRegSup as u32, 0);
        assert_eq!(u16::from_le_bytes([f[46], f[47]]), 9, "SCI_INT");
        assert_eq!(u32_at(f, 48), 0, "no SMI_CMD: always in ACPI mode");
        assert_eq!(u32_at(f, 56), u32::from(ACPI_PM_PORT), "PM1a_EVT_BLK");
        assert_eq!(u32_at(f, 64), u32::from(ACPI_PM_PORT + 4), "PM1a_CNT_BLK");
        assert_eq!((f[88], f[89]), (4, 2), "PM1 event and control lengths");
        // X_PM1a_EVT_BLK (148) and X_PM1a_CNT_BLK (172) agree with the 32-bit fields.
        assert_eq!((f[148], f[149]), (1, 32), "the whole 4-byte event block");
        assert_eq!((f[172], f[173]), (1, 16));
        assert_eq!(u64_at(f, 152), u64::from(ACPI_PM_PORT));
        assert_eq!(u64_at(f, 176), u64::from(ACPI_PM_PORT + 4));
        // RESET_REG: system I/O, 8 bits, at the reset port; value 1.
        assert_eq!(f[116], 1);
        assert_eq!(f[117], 8);
        assert_eq!(u64_at(f, 120), u64::from(ACPI_PM_PORT + RESET_OFFSET));
        assert_eq!(f[128], RESET_VALUE);
        let boot_arch = u16::from_le_bytes([f[109], f[110]]);
        assert_eq!(boot_arch, IAPC_8042 | IAPC_NO_VGA | IAPC_NO_CMOS_RTC);
        // X_FIRMWARE_CTRL: a 64-byte aligned FACS.
        let facs = u64_at(f, 132);
        assert_eq!(facs % 64, 0);
        let off = (facs - ACPI_START) as usize;
        assert_eq!(&blob[off..off + 4], b"FACS");
        assert_eq!(u32_at(&blob, off + 4), 64);
    }

    #[test]
    fn madt_has_a_local_apic_per_vcpu_the_ioapic_and_isa_overrides() {
        for cpus in [1u8, 4, 32] {
            let cfg = AcpiConfig {
                num_cpus: cpus,
                ..config()
            };
            let blob = build(&cfg, ACPI_START);
            let tables = parse(&blob, ACPI_START);
            let m = find(&tables, b"APIC");
            assert_eq!(u32_at(m, 36), APIC_START as u32);
            assert_eq!(u32_at(m, 40), MADT_PCAT_COMPAT);
            let mut off = 44;
            let (mut lapics, mut ioapics, mut isos) = (Vec::new(), 0, 0);
            while off < m.len() {
                let (ty, len) = (m[off], m[off + 1] as usize);
                match ty {
                    0 => {
                        assert_eq!(len, 8);
                        assert_eq!(u32_at(m, off + 4), 1, "enabled");
                        lapics.push(m[off + 3]);
                    }
                    1 => {
                        assert_eq!(len, 12);
                        assert_eq!(m[off + 2], ioapic_id(cpus));
                        assert_eq!(u32_at(m, off + 4), IOAPIC_START as u32);
                        ioapics += 1;
                    }
                    2 => {
                        assert_eq!(len, 10);
                        assert_eq!(u32::from(m[off + 3]), u32_at(m, off + 4), "identity");
                        let flags = u16::from_le_bytes([m[off + 8], m[off + 9]]);
                        let want = if m[off + 3] == 9 { 0xd } else { 0x5 };
                        assert_eq!(flags, want, "IRQ {}", m[off + 3]);
                        isos += 1;
                    }
                    other => panic!("unexpected MADT entry {other}"),
                }
                off += len;
            }
            assert_eq!(off, m.len());
            assert_eq!(lapics, (0..cpus).collect::<Vec<_>>());
            assert_eq!((ioapics, isos), (1, 16));
        }
    }

    #[test]
    fn dsdt_holds_the_configured_devices() {
        let blob = build(&config(), ACPI_START);
        let tables = parse(&blob, ACPI_START);
        let d = find(&tables, b"DSDT");
        for name in [
            &b"PCI0"[..],
            b"_PRT",
            b"LK00",
            b"LK01",
            b"COM1",
            b"COM2",
            b"PS2K",
            b"VR00",
            b"LNRO0005",
            b"_S5_",
        ] {
            assert!(contains(d, name), "{}", String::from_utf8_lossy(name));
        }
        // The virtio-mmio window: Memory32Fixed with base and length.
        let mut m32 = vec![0x86, 9, 0, 1];
        m32.extend_from_slice(&0xd000_0000u32.to_le_bytes());
        m32.extend_from_slice(&0x1000u32.to_le_bytes());
        assert!(contains(d, &m32));
        // The host bridge's memory window.
        assert!(contains(d, &(PCI_MMIO_WINDOW_START as u32).to_le_bytes()));
        // PCI slot 3's _PRT address (0x0003ffff).
        assert!(contains(d, &0x0003_ffffu32.to_le_bytes()));

        // Without a PCI bus or virtio-mmio devices, none of it.
        let bare = AcpiConfig {
            num_cpus: 1,
            serial_ports: vec![(0x3f8, 4)],
            ..Default::default()
        };
        let blob = build(&bare, ACPI_START);
        let tables = parse(&blob, ACPI_START);
        let d = find(&tables, b"DSDT");
        assert!(!contains(d, b"PCI0") && !contains(d, b"LNRO") && !contains(d, b"COM2"));
        assert!(contains(d, b"COM1") && contains(d, b"_S5_"));
    }

    #[test]
    fn tables_land_in_guest_memory_at_the_scan_area() {
        let mem = crate::vstate::memory::create_guest_memory(64 << 20).unwrap();
        let rsdp = setup_acpi(&mem, &config()).unwrap();
        assert_eq!(rsdp, ACPI_START);
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(rsdp)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        assert!((0xe0000..0x100000).contains(&rsdp), "in the BIOS scan area");
    }
}
