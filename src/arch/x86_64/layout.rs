//! Every fixed guest-physical address, I/O port and IRQ the VMM uses on x86_64.
//!
//! Nothing else in the crate hard-codes one of these numbers: device wiring, boot structures and
//! the e820 map all refer to the constants here, so the whole memory map can be read in one place.
//!
//! ```text
//! 0x0000_0500  GDT                      0x0009_fc00  EBDA (reserved in e820)
//! 0x0000_0520  IDT (empty)              0x000e_0000  ACPI: RSDP, XSDT, FADT, MADT, DSDT (reserved)
//! 0x0000_6000  PVH start info + memmap  0x000f_0000  MP table (BIOS area, reserved)
//! 0x0000_7000  zero page (boot_params)  0x0010_0000  kernel (HIMEM_START)
//! 0x0000_8ff0  boot stack top           ...          initrd at the top of low RAM
//! 0x0000_9000  PML4, PDPT, PD           0xc000_0000  MMIO gap: PCI BARs, virtio-mmio slots,
//! 0x0002_0000  kernel command line                   IOAPIC, LAPIC
//!                                       0x1_0000_0000 RAM above 4 GiB when memory > 3 GiB
//! ```
//!
//! ```text
//! I/O ports: 0x60/0x64 i8042, 0x170/0x1f0 IDE, 0x2f8/0x3f8 UARTs, 0x600 ACPI PM1 and
//! reset registers, 0xcf8 PCI configuration, 0xc000-0xffff PCI I/O BARs
//! ```

/// Start of the GDT the vCPUs boot with.
pub const BOOT_GDT_START: u64 = 0x500;
/// Start of the (empty) IDT the vCPUs boot with.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its memory map and module list.
pub const PVH_INFO_START: u64 = 0x6000;
/// The zero page (`struct boot_params`) for the Linux 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU (grows down, below the page tables).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page table of the identity map used to enter long mode.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the identity map.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory of the identity map (2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line the x86 kernel accepts (`COMMAND_LINE_SIZE` since Linux 2.6.x).
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// Start of the Extended BIOS Data Area; RAM below it is the usable low memory.
pub const EBDA_START: u64 = 0x9fc00;
/// The ACPI tables: the RSDP first, where the kernel scans for it (0xe0000-0xfffff), then
/// the tables it points to. Reserved in the e820 map together with the BIOS area.
pub const ACPI_START: u64 = 0xe0000;
/// Room for the tables (they must end before the MP table).
pub const ACPI_MAX_SIZE: u64 = MPTABLE_START - ACPI_START;
/// Start of the BIOS ROM area, one of the three places the kernel scans for an MP table.
pub const MPTABLE_START: u64 = 0xf0000;
/// End of the legacy (real-mode) region.
pub const BIOS_END: u64 = 0x10_0000;
/// Where high memory starts and the kernel is loaded (the boot protocol's default).
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO gap; guest RAM above this goes above 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The memory window where PCI memory BARs are placed (each naturally aligned), below the
/// virtio-mmio slots; the DSDT's host bridge declares it.
pub const PCI_MMIO_WINDOW_START: u64 = 0xc000_0000;
pub const PCI_MMIO_WINDOW_LEN: u64 = 0x1000_0000;
/// First virtio-mmio slot; each device gets `VIRTIO_MMIO_SLOT_SIZE` bytes.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio slot.
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;
/// Default IOAPIC base address (where the MP table tells the guest to find it).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Default local APIC base address.
pub const APIC_START: u64 = 0xfee0_0000;
/// Three pages KVM needs for the TSS on Intel (`KVM_SET_TSS_ADDR`), inside the MMIO gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// The identity map built for long mode covers this much (1 GiB of 2 MiB pages).
pub const IDENTITY_MAP_SIZE: u64 = 1 << 30;

/// Legacy COM1: the console UART.
pub const COM1_PORT: u16 = 0x3f8;
/// IRQ of COM1.
pub const COM1_IRQ: u32 = 4;
/// Legacy COM2: the data-channel UART.
pub const COM2_PORT: u16 = 0x2f8;
/// IRQ of COM2.
pub const COM2_IRQ: u32 = 3;
/// Number of I/O ports a 16550A occupies.
pub const UART_PORT_LEN: u16 = 8;
/// The i8042 keyboard controller's data and command/status ports (0x60 and 0x64).
pub const I8042_PORT: u16 = 0x60;
/// The i8042 spans 0x60..=0x64.
pub const I8042_PORT_LEN: u16 = 5;
/// Primary IDE channel: command block, control block, IRQ (ISA compatibility mode).
pub const IDE_PRIMARY_PORT: u16 = 0x1f0;
pub const IDE_PRIMARY_CTL_PORT: u16 = 0x3f6;
pub const IDE_PRIMARY_IRQ: u32 = 14;
/// Secondary IDE channel.
pub const IDE_SECONDARY_PORT: u16 = 0x170;
pub const IDE_SECONDARY_CTL_PORT: u16 = 0x376;
pub const IDE_SECONDARY_IRQ: u32 = 15;
/// Ports of an IDE command block.
pub const IDE_PORT_LEN: u16 = 8;
/// The ACPI fixed hardware the FADT names: the PM1a event block (status +0, enable +2),
/// the PM1a control block (+4) and the reset register (+6).
pub const ACPI_PM_PORT: u16 = 0x600;
pub const ACPI_PM_PORT_LEN: u16 = 8;
/// The ACPI system control interrupt (the FADT's SCI_INT), the PC's traditional IRQ 9.
pub const ACPI_SCI_IRQ: u32 = 9;
/// PCI configuration mechanism #1: CONFIG_ADDRESS at 0xcf8, CONFIG_DATA at 0xcfc.
pub const PCI_CONFIG_PORT: u16 = 0xcf8;
pub const PCI_CONFIG_PORT_LEN: u16 = 8;
/// The I/O window where PCI I/O BARs are assigned (as firmware would, above the ISA ports).
pub const PCI_IO_WINDOW_START: u16 = 0xc000;
pub const PCI_IO_WINDOW_LEN: u16 = 0x4000;
/// Spacing of the BARs the VMM assigns in the window.
pub const PCI_IO_BAR_STRIDE: u16 = 0x100;
/// Number of IOAPIC pins the in-kernel irqchip has (and the MP table declares).
pub const IOAPIC_NUM_PINS: u32 = 24;
/// IRQs handed to devices that are not at a fixed legacy place, in order: the free ISA ones
/// (not 1 keyboard, 3/4 serial, 8 RTC, 12 mouse, 13 FPU, 14/15 IDE) and then the IOAPIC-only
/// pins 16-23.
pub const DEVICE_IRQS: &[u32] = &[5, 6, 7, 9, 10, 11, 16, 17, 18, 19, 20, 21, 22, 23];
