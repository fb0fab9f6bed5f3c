//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI learns its CPUs,
//! its IOAPIC and how ISA and PCI interrupts are wired.
//!
//! The table is serialised by hand (little-endian fields, spec chapter 4) rather than through
//! `repr(packed)` structs, which keeps this module free of `unsafe`.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_START, BIOS_END, IOAPIC_NUM_PINS, IOAPIC_START, MPTABLE_START};
use crate::vstate::memory::GuestMemoryMmap;

const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const MPC_OEM: &[u8; 8] = b"FERROVM ";
const MPC_PRODUCT_ID: &[u8; 12] = b"MICROVM     ";
const MP_SPEC_REV: u8 = 4;
const MPF_SIZE: usize = 16;
const MPC_HEADER_SIZE: usize = 44;

const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Family 6 as reported in the processor entries' signature.
const CPU_STEPPING: u32 = 0x600;
/// Feature flags in processor entries: on-chip APIC and FPU.
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
/// Version numbers of an integrated local APIC / IOAPIC as KVM emulates them.
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const MPC_APIC_USABLE: u8 = 1;

const MP_IRQTYPE_INT: u8 = 0;
const MP_IRQTYPE_NMI: u8 = 1;
const MP_IRQTYPE_EXTINT: u8 = 3;
/// Polarity and trigger "conforms to the bus".
const MP_IRQFLAG_DEFAULT: u16 = 0;
/// Active high, edge triggered: what an irqfd pulse on the in-kernel IOAPIC is. PCI INTx is
/// level/low by default, but our PCI devices raise edges, and their drivers loop on the
/// device's status until nothing is pending, so no interrupt is lost.
const MP_IRQFLAG_EDGE_HIGH: u16 = 0x5;
const BUS_TYPE_ISA: &[u8; 6] = b"ISA   ";
/// Linux looks PCI interrupts up by MP bus id = PCI bus number (`IO_APIC_get_PCI_irq_vector`),
/// so with a PCI bus it is MP bus 0 and ISA moves to 1.
const BUS_ID_PCI: u8 = 0;
const BUS_TYPE_PCI: &[u8; 6] = b"PCI   ";

/// A PCI function's INTA# routed to an IOAPIC pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIrq {
    /// Device number on PCI bus 0.
    pub slot: u8,
    pub irq: u32,
}

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("The MP table for {0} vCPUs does not fit in the BIOS area")]
    TooLarge(u8),
    #[error("Failed to write the MP table to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// MP bus id of the ISA bus: 1 when PCI bus 0 takes id 0.
fn isa_bus_id(with_pci: bool) -> u8 {
    u8::from(with_pci)
}

/// APIC id of the IOAPIC: after the CPUs' ids so the two never clash.
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus + 1
}

/// Serialises the floating pointer followed by the configuration table, as laid out at `base`.
/// With `pci_irqs` (possibly empty but for a PCI bus), a PCI bus and its INTx routing appear.
pub fn build(num_cpus: u8, pci_irqs: Option<&[PciIrq]>, base: u64) -> Vec<u8> {
    let ioapic = ioapic_id(num_cpus);
    let isa = isa_bus_id(pci_irqs.is_some());
    let mut entries = Vec::new();
    let mut count: u16 = 0;

    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }

    if pci_irqs.is_some() {
        entries.extend_from_slice(&[MP_BUS, BUS_ID_PCI]);
        entries.extend_from_slice(BUS_TYPE_PCI);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, isa]);
    entries.extend_from_slice(BUS_TYPE_ISA);
    count += 1;

    entries.extend_from_slice(&[MP_IOAPIC, ioapic, IOAPIC_VERSION, MPC_APIC_USABLE]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;

    // Every IOAPIC pin is wired 1:1 to the ISA IRQ of the same number, which is how KVM's
    // default GSI routing connects its in-kernel PIC and IOAPIC.
    for pin in 0..IOAPIC_NUM_PINS as u8 {
        entries.push(MP_INTSRC);
        entries.push(MP_IRQTYPE_INT);
        entries.extend_from_slice(&MP_IRQFLAG_DEFAULT.to_le_bytes());
        entries.extend_from_slice(&[isa, pin, ioapic, pin]);
        count += 1;
    }
    // PCI source "IRQ" is (device << 2) | pin, pin 0 = INTA# (MP spec D.3).
    for p in pci_irqs.unwrap_or_default() {
        entries.push(MP_INTSRC);
        entries.push(MP_IRQTYPE_INT);
        entries.extend_from_slice(&MP_IRQFLAG_EDGE_HIGH.to_le_bytes());
        entries.extend_from_slice(&[BUS_ID_PCI, p.slot << 2, ioapic, p.irq as u8]);
        count += 1;
    }

    // LINT0 of every local APIC carries the 8259 (ExtINT), LINT1 the NMI: virtual wire mode.
    for (kind, dest_apic, lint) in [(MP_IRQTYPE_EXTINT, 0u8, 0u8), (MP_IRQTYPE_NMI, 0xff, 1)] {
        entries.push(MP_LINTSRC);
        entries.push(kind);
        entries.extend_from_slice(&MP_IRQFLAG_DEFAULT.to_le_bytes());
        entries.extend_from_slice(&[isa, 0, dest_apic, lint]);
        count += 1;
    }

    let table_addr = base + MPF_SIZE as u64;
    let table_len = MPC_HEADER_SIZE + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(MPC_SIGNATURE);
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(MP_SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(MPC_OEM);
    table.extend_from_slice(MPC_PRODUCT_ID);
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length/checksum
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(MPF_SIZE);
    mpf.extend_from_slice(MPF_SIGNATURE);
    mpf.extend_from_slice(&(table_addr as u32).to_le_bytes());
    mpf.push(1); // length in 16-byte paragraphs
    mpf.push(MP_SPEC_REV);
    mpf.push(0); // checksum, below
    mpf.extend_from_slice(&[0u8; 5]); // feature bytes: table present, no IMCR
    mpf[10] = checksum(&mpf);

    mpf.extend_from_slice(&table);
    mpf
}

/// Writes the MP table into the BIOS area where the kernel scans for it.
pub fn setup_mptable(
    mem: &GuestMemoryMmap,
    num_cpus: u8,
    pci_irqs: Option<&[PciIrq]>,
) -> Result<(), MptableError> {
    let bytes = build(num_cpus, pci_irqs, MPTABLE_START);
    if MPTABLE_START + bytes.len() as u64 > BIOS_END {
        return Err(MptableError::TooLarge(num_cpus));
    }
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(MptableError::Write)
}

/// The byte that makes `data` sum to zero modulo 256.
fn checksum(data: &[u8]) -> u8 {
    data.iter().fold(0u8, |acc, b| acc.wrapping_sub(*b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    fn sum(data: &[u8]) -> u8 {
        data.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    /// Parses the entries back the way Linux's `smp_read_mpc` walks them.
    fn parse_entries(table: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut off = MPC_HEADER_SIZE;
        while off < table.len() {
            let len = if table[off] == MP_PROCESSOR { 20 } else { 8 };
            out.push((table[off], table[off..off + len].to_vec()));
            off += len;
        }
        out
    }

    #[test]
    fn floating_pointer_is_valid_and_points_at_table() {
        let b = build(2, None, MPTABLE_START);
        assert_eq!(&b[..4], MPF_SIGNATURE);
        assert_eq!(sum(&b[..16]), 0);
        let ptr = u32::from_le_bytes(b[4..8].try_into().unwrap()) as u64;
        assert_eq!(ptr, MPTABLE_START + 16);
        assert_eq!(b[9], MP_SPEC_REV);
    }

    #[test]
    fn table_checksum_length_and_count_are_right() {
        for cpus in [1u8, 4, 32] {
            let b = build(cpus, Some(&[PciIrq { slot: 2, irq: 5 }]), MPTABLE_START);
            let table = &b[16..];
            assert_eq!(&table[..4], MPC_SIGNATURE);
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "checksum with {cpus} cpus");
            let count = u16::from_le_bytes([table[34], table[35]]) as usize;
            assert_eq!(count, parse_entries(table).len());
            let lapic = u32::from_le_bytes(table[36..40].try_into().unwrap()) as u64;
            assert_eq!(lapic, APIC_START);
        }
    }

    #[test]
    fn one_processor_entry_per_cpu_with_bsp_first() {
        let b = build(4, None, MPTABLE_START);
        let cpus: Vec<_> = parse_entries(&b[16..])
            .into_iter()
            .filter(|(t, _)| *t == MP_PROCESSOR)
            .map(|(_, e)| e)
            .collect();
        assert_eq!(cpus.len(), 4);
        for (i, e) in cpus.iter().enumerate() {
            assert_eq!(e[1] as usize, i, "APIC id");
            assert_eq!(e[3] & CPU_ENABLED, CPU_ENABLED);
            assert_eq!(e[3] & CPU_BOOTPROCESSOR != 0, i == 0);
        }
    }

    #[test]
    fn ioapic_and_interrupt_routing() {
        let b = build(3, None, MPTABLE_START);
        let entries = parse_entries(&b[16..]);
        let ioapics: Vec<_> = entries.iter().filter(|(t, _)| *t == MP_IOAPIC).collect();
        assert_eq!(ioapics.len(), 1);
        let io = &ioapics[0].1;
        assert_eq!(io[1], ioapic_id(3));
        assert_eq!(
            u32::from_le_bytes(io[4..8].try_into().unwrap()) as u64,
            IOAPIC_START
        );

        let intsrc: Vec<_> = entries.iter().filter(|(t, _)| *t == MP_INTSRC).collect();
        assert_eq!(intsrc.len(), IOAPIC_NUM_PINS as usize);
        // COM1's IRQ 4 reaches IOAPIC pin 4.
        let com1 = intsrc.iter().find(|(_, e)| e[5] == 4).unwrap();
        assert_eq!((com1.1[6], com1.1[7]), (ioapic_id(3), 4));

        let lint: Vec<_> = entries.iter().filter(|(t, _)| *t == MP_LINTSRC).collect();
        assert_eq!(lint.len(), 2);
        assert_eq!(lint[0].1[1], MP_IRQTYPE_EXTINT);
        assert_eq!(lint[1].1[1], MP_IRQTYPE_NMI);
    }

    #[test]
    fn pci_interrupts_are_routed_from_the_pci_bus() {
        let irqs = [PciIrq { slot: 2, irq: 9 }, PciIrq { slot: 3, irq: 17 }];
        let b = build(1, Some(&irqs), MPTABLE_START);
        let entries = parse_entries(&b[16..]);
        let buses: Vec<_> = entries.iter().filter(|(t, _)| *t == MP_BUS).collect();
        assert_eq!(buses.len(), 2);
        // PCI bus 0 must be MP bus 0: Linux matches the MP bus id to the PCI bus number.
        assert_eq!(&buses[0].1[1..8], b"\x00PCI   ");
        assert_eq!(&buses[1].1[1..8], b"\x01ISA   ");
        // ISA interrupts then come from bus 1.
        let com1 = entries
            .iter()
            .find(|(t, e)| *t == MP_INTSRC && e[5] == 4 && e[4] != BUS_ID_PCI)
            .unwrap();
        assert_eq!(com1.1[4], 1);
        let pci: Vec<_> = entries
            .iter()
            .filter(|(t, e)| *t == MP_INTSRC && e[4] == BUS_ID_PCI)
            .map(|(_, e)| (e[5], e[7], u16::from_le_bytes([e[2], e[3]])))
            .collect();
        assert_eq!(pci, vec![(2 << 2, 9, 0x5), (3 << 2, 17, 0x5)]);
        // Without PCI devices there is no PCI bus at all.
        let b = build(1, None, MPTABLE_START);
        assert!(!parse_entries(&b[16..])
            .iter()
            .any(|(t, e)| *t == MP_BUS && &e[2..8] == BUS_TYPE_PCI));
    }

    #[test]
    fn largest_table_fits_in_bios_area_and_is_written() {
        let mem = create_guest_memory(32 << 20).unwrap();
        let pci: Vec<_> = (2..10)
            .map(|slot| PciIrq {
                slot,
                irq: 16 + u32::from(slot),
            })
            .collect();
        setup_mptable(&mem, crate::config::MAX_VCPUS, Some(&pci)).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(&sig, MPF_SIGNATURE);
    }
}
