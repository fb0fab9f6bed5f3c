//! The one place that allocates ports, MMIO ranges and IRQs, and wires devices into the buses
//! and KVM. Everything the guest must be told about a device (kernel command line
//! parameters) is collected here too.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use event_manager::{MutEventSubscriber, SubscriberOps};
use kvm_ioctls::IoEventAddress;
use log::{info, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::acpi::{AcpiConfig, MmioDevice};
use crate::arch::x86_64::layout::{
    ACPI_PM_PORT, ACPI_PM_PORT_LEN, ACPI_SCI_IRQ, DEVICE_IRQS, I8042_PORT, I8042_PORT_LEN,
    IDE_PORT_LEN, IDE_PRIMARY_CTL_PORT, IDE_PRIMARY_IRQ, IDE_PRIMARY_PORT, IDE_SECONDARY_CTL_PORT,
    IDE_SECONDARY_IRQ, IDE_SECONDARY_PORT, PCI_CONFIG_PORT, PCI_CONFIG_PORT_LEN, PCI_IO_BAR_STRIDE,
    PCI_IO_WINDOW_LEN, PCI_IO_WINDOW_START, PCI_MMIO_WINDOW_LEN, PCI_MMIO_WINDOW_START,
    UART_PORT_LEN, VIRTIO_MMIO_SLOT_SIZE, VIRTIO_MMIO_START,
};
use crate::arch::x86_64::mptable::PciIrq;
use crate::config::{MacAddr, VirtioTransport, MAX_IDE_DISKS};
use crate::devices::bus::{Bus, BusDevice, BusError};
use crate::devices::emulated::e1000::host::{E1000Timer, HostTimer};
use crate::devices::emulated::e1000::{self, E1000Resources, E1000};
use crate::devices::emulated::ide::{
    self, AtaDisk, BusMasterBlock, CommandBlock, ControlBlock, DmaContext, IdeChannel,
};
use crate::devices::emulated::ne2k::{self, Ne2k};
use crate::devices::emulated::nic_tap::{NicTap, TapSink};
use crate::devices::legacy::serial;
use crate::devices::legacy::{AcpiPm, SerialDevice, I8042};
use crate::devices::metrics::{DeviceMetrics, Metered, MetricsRegistry, Space};
use crate::devices::pci::msix::{MsiMessage, MsiRouting, MsixTable, MsixVector};
use crate::devices::pci::{piix, BarSpace, PciBus, PciWindow};
use crate::devices::tap::Tap;
use crate::devices::virtio::device::MsixVectors;
use crate::devices::virtio::mmio::{self, MMIO_LEN, REG_QUEUE_NOTIFY};
use crate::devices::virtio::pci_transport::{
    self, NotifyRegistry, BAR_SIZE as VIRTIO_PCI_BAR_SIZE,
};
use crate::devices::virtio::{MmioTransport, PciTransport, VirtioDevice, VirtioInterrupt};
use crate::devices::{DeviceEventManager, Persist};
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vm::{GsiRouter, IoEvents, KvmVm, VmError};

/// Errors wiring devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("Failed to place the {0} on the bus")]
    Bus(&'static str, #[source] BusError),
    #[error("Failed to create an eventfd for the {0}")]
    EventFd(&'static str, #[source] std::io::Error),
    #[error("Failed to connect the {0}'s interrupt")]
    Irq(String, #[source] VmError),
    #[error("Failed to register the queue notifications of {0} with KVM")]
    IoEvent(String, #[source] kvm_ioctls::Error),
    #[error("No interrupt line left for {0}: at most {n} devices get one", n = DEVICE_IRQS.len())]
    OutOfIrqs(String),
    #[error("Too many IDE disks ({0}): the two IDE channels take at most {MAX_IDE_DISKS}")]
    TooManyIdeDisks(usize),
    #[error("No PCI slot or I/O space left for {0}")]
    OutOfPci(String),
    #[error("Failed to set up the MSI-X vectors of {0}")]
    Msix(String, #[source] VmError),
    #[error("Failed to put {0} on the PCI bus: {1}")]
    PciTransport(String, String),
    #[error("Failed to set the offloads of the TAP of {0}")]
    TapOffload(String, #[source] std::io::Error),
    #[error("Failed to create the interrupt moderation timer of {0}")]
    Timer(String, #[source] std::io::Error),
}

/// MSI-X programs KVM's GSI routing through the VM's router.
impl MsiRouting for GsiRouter {
    fn set_route(&self, gsi: u32, msg: MsiMessage) -> Result<(), String> {
        self.set_msi_route(gsi, msg.address, msg.data)
            .map_err(|e| e.to_string())
    }
}

/// virtio-pci moves its queue notifications through the VM's ioeventfds.
impl NotifyRegistry for IoEvents {
    fn register(&self, evt: &EventFd, addr: u64) -> Result<(), String> {
        self.register_mmio(evt, addr).map_err(|e| e.to_string())
    }
    fn unregister(&self, evt: &EventFd, addr: u64) -> Result<(), String> {
        self.unregister_mmio(evt, addr).map_err(|e| e.to_string())
    }
}

/// PCI slots: 0 host bridge, 1 PIIX3 (ISA bridge and IDE), NICs from 2.
const PCI_SLOT_PIIX: u8 = 1;
const PCI_FIRST_FREE_SLOT: u8 = 2;

/// PCI bus 0 while the VM is built.
struct PciState {
    bus: Arc<Mutex<PciBus>>,
    next_slot: u8,
    next_io: u16,
    /// Next free address in the PCI memory window.
    next_mem: u64,
    irqs: Vec<PciIrq>,
}

impl PciState {
    /// A naturally aligned memory BAR of `size` bytes, or None when the window is full.
    fn allocate_mem(&mut self, size: u64) -> Option<u64> {
        let base = self.next_mem.next_multiple_of(size);
        let end = base.checked_add(size)?;
        if end > PCI_MMIO_WINDOW_START + PCI_MMIO_WINDOW_LEN {
            return None;
        }
        self.next_mem = end;
        Some(base)
    }

    /// An I/O BAR of at most `PCI_IO_BAR_STRIDE` bytes, or None when the window is full.
    fn allocate_io(&mut self) -> Option<u16> {
        let base = self.next_io;
        let end = u32::from(base) + u32::from(PCI_IO_BAR_STRIDE);
        if end > u32::from(PCI_IO_WINDOW_START) + u32::from(PCI_IO_WINDOW_LEN) {
            return None;
        }
        self.next_io += PCI_IO_BAR_STRIDE;
        Some(base)
    }

    /// The next slot, if one is left.
    fn take_slot(&mut self) -> Option<u8> {
        let slot = self.next_slot;
        (slot < 32).then(|| {
            self.next_slot += 1;
            slot
        })
    }
}

/// Builds the port I/O and MMIO buses.
pub struct DeviceManager {
    pio_bus: Bus,
    mmio_bus: Bus,
    cmdline_extra: Vec<String>,
    /// How many of `DEVICE_IRQS` are taken.
    irqs_used: usize,
    /// How many virtio-mmio slots are taken.
    mmio_slots_used: u64,
    metrics: MetricsRegistry,
    pci: Option<PciState>,
    /// Whether a device had KVM coalesce writes to one of its ports.
    coalesced_pio: bool,
    /// Whether the guest reads ACPI tables (then virtio-mmio devices are described in the
    /// DSDT rather than on the kernel command line).
    acpi: bool,
    /// The virtio-mmio devices and UARTs, for the DSDT.
    mmio_devices: Vec<MmioDevice>,
    serial_ports: Vec<(u16, u32)>,
    /// Every device a snapshot carries, by a stable id, in restore order.
    persist: Vec<(String, Arc<Mutex<dyn Persist>>)>,
    /// Devices whose state snapshots cannot carry yet (a snapshot is refused, naming them).
    no_persist: Vec<String>,
    acpi_pm: Option<Arc<Mutex<AcpiPm>>>,
}

/// The built devices, as the running VM uses them.
pub struct Devices {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub metrics: MetricsRegistry,
    /// What snapshots save and restore, by id, in restore order.
    pub persist: Vec<(String, Arc<Mutex<dyn Persist>>)>,
    /// Devices a snapshot cannot carry yet.
    pub no_persist: Vec<String>,
    /// The ACPI PM registers (the power button), when the VM has ACPI.
    pub acpi_pm: Option<Arc<Mutex<AcpiPm>>>,
}

impl Default for DeviceManager {
    fn default() -> Self {
        Self::new(true)
    }
}

impl DeviceManager {
    /// A manager for a guest that reads ACPI tables (`acpi`) or only the MP table and its
    /// command line.
    pub fn new(acpi: bool) -> Self {
        Self {
            pio_bus: Bus::new(Space::Pio),
            mmio_bus: Bus::new(Space::Mmio),
            cmdline_extra: Vec::new(),
            irqs_used: 0,
            mmio_slots_used: 0,
            metrics: MetricsRegistry::new(),
            pci: None,
            coalesced_pio: false,
            acpi,
            mmio_devices: Vec::new(),
            serial_ports: Vec::new(),
            persist: Vec::new(),
            no_persist: Vec::new(),
            acpi_pm: None,
        }
    }

    /// Records a device a snapshot carries, under `id`.
    fn persist(&mut self, id: impl Into<String>, dev: Arc<Mutex<dyn Persist>>) {
        self.persist.push((id.into(), dev));
    }

    /// Attaches a 16550A named `name` (ttyS0, ttyS1) at `port`/`irq` writing guest output to
    /// `out`.
    pub fn attach_serial(
        &mut self,
        vm: &KvmVm,
        name: &str,
        port: u16,
        irq: u32,
        out: Box<dyn Write + Send>,
    ) -> Result<Arc<Mutex<SerialDevice>>, DeviceError> {
        const WHAT: &str = "serial port";
        let irq_evt =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| DeviceError::EventFd(WHAT, e))?;
        vm.register_irqfd(&irq_evt, irq)
            .map_err(|e| DeviceError::Irq(name.into(), e))?;
        let metrics = self.metrics.add(
            DeviceMetrics::new(name, "uart", "stream").with_register_names(serial::register_name),
            u64::from(port),
        );
        let serial = Arc::new(Mutex::new(
            SerialDevice::new(irq_evt, out, metrics.clone())
                .map_err(|e| DeviceError::EventFd(WHAT, e))?,
        ));
        self.pio_bus
            .insert_metered(
                serial.clone(),
                u64::from(port),
                u64::from(UART_PORT_LEN),
                Some(metrics),
            )
            .map_err(|e| DeviceError::Bus(WHAT, e))?;
        self.serial_ports.push((port, irq));
        self.persist(name, serial.clone());
        info!("{name}: 16550A at {port:#x}, IRQ {irq}");
        Ok(serial)
    }

    /// Puts the PCI bus in place (host bridge and PIIX3 ISA bridge) on first use.
    fn pci(&mut self) -> &mut PciState {
        if self.pci.is_none() {
            let state = Self::new_pci();
            // First in restore order among PCI devices: their configuration spaces (BARs
            // included) are back before the devices look at them.
            self.persist("pci0", state.bus.clone());
            self.pci = Some(state);
        }
        self.pci.as_mut().expect("just set")
    }

    fn new_pci() -> PciState {
        {
            let mut bus = PciBus::new();
            bus.add(0, 0, Arc::new(Mutex::new(piix::host_bridge())));
            bus.add(
                PCI_SLOT_PIIX,
                0,
                Arc::new(Mutex::new(piix::piix3_isa_bridge())),
            );
            PciState {
                bus: Arc::new(Mutex::new(bus)),
                next_slot: PCI_FIRST_FREE_SLOT,
                next_io: PCI_IO_WINDOW_START,
                next_mem: PCI_MMIO_WINDOW_START,
                irqs: Vec::new(),
            }
        }
    }

    /// Attaches emulated ATA disks (at most four) to the PIIX3 IDE function in legacy mode:
    /// primary master, primary slave, secondary master, secondary slave. The function's bus
    /// master registers (BAR4) get an I/O range of the PCI window; the channels do their DMA
    /// in `mem`.
    pub fn attach_ide(
        &mut self,
        vm: &KvmVm,
        mem: &GuestMemoryMmap,
        disks: Vec<AtaDisk>,
    ) -> Result<(), DeviceError> {
        if disks.is_empty() {
            return Ok(());
        }
        if disks.len() > MAX_IDE_DISKS {
            return Err(DeviceError::TooManyIdeDisks(disks.len()));
        }
        let bm_base = self
            .pci()
            .allocate_io()
            .ok_or_else(|| DeviceError::OutOfPci("the IDE bus master registers".into()))?;
        let bus_master = Arc::new(AtomicBool::new(false));
        let mut bm_channels = [None, None];
        let mut disks = disks.into_iter();
        let channels = [
            (
                "ide0",
                IDE_PRIMARY_PORT,
                IDE_PRIMARY_CTL_PORT,
                IDE_PRIMARY_IRQ,
            ),
            (
                "ide1",
                IDE_SECONDARY_PORT,
                IDE_SECONDARY_CTL_PORT,
                IDE_SECONDARY_IRQ,
            ),
        ];
        for (i, (name, port, ctl, irq)) in channels.into_iter().enumerate() {
            let (Some(master), slave) = (disks.next(), disks.next()) else {
                break;
            };
            let irq_evt = EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| DeviceError::EventFd("IDE channel", e))?;
            vm.register_irqfd(&irq_evt, irq)
                .map_err(|e| DeviceError::Irq(name.into(), e))?;
            let bm_regs = u64::from(bm_base) + ide::BM_CHANNEL_REGS * i as u64;
            let metrics = self.metrics.add(
                DeviceMetrics::new(name, "ide", "block")
                    .with_register_names(ide::register_name)
                    .with_register_range(
                        Space::Pio,
                        bm_regs,
                        ide::BM_CHANNEL_REGS,
                        ide::bm_register_name,
                    ),
                u64::from(port),
            );
            let channel = Arc::new(Mutex::new(
                IdeChannel::new(Some(master), slave, Box::new(irq_evt))
                    .with_metrics(metrics.clone())
                    .with_dma(DmaContext {
                        mem: mem.clone(),
                        bus_master: bus_master.clone(),
                    }),
            ));
            self.pio_bus
                .insert_metered(
                    Arc::new(Mutex::new(CommandBlock(channel.clone()))),
                    u64::from(port),
                    u64::from(IDE_PORT_LEN),
                    Some(metrics.clone()),
                )
                .map_err(|e| DeviceError::Bus("IDE command block", e))?;
            self.pio_bus
                .insert_metered(
                    Arc::new(Mutex::new(ControlBlock(channel.clone()))),
                    u64::from(ctl),
                    1,
                    Some(metrics.clone()),
                )
                .map_err(|e| DeviceError::Bus("IDE control block", e))?;
            bm_channels[i] = Some(piix::BmChannel {
                regs: Arc::new(Mutex::new(BusMasterBlock(channel.clone()))),
                metrics: Some(metrics),
            });
            let (data, len) = ide::COALESCED_DATA_PORT;
            match vm.coalesce_pio(port + data, len) {
                Ok(()) => self.coalesced_pio = true,
                Err(e) => warn!("{name}: data port writes will each exit: {e}"),
            }
            self.persist(name, channel.clone());
            info!(
                "{name}: IDE channel at {port:#x}/{ctl:#x}, IRQ {irq}, bus master at {bm_regs:#x}"
            );
        }
        let ide = piix::piix3_ide(u32::from(bm_base), bm_channels, bus_master);
        self.pci()
            .bus
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(PCI_SLOT_PIIX, 1, Arc::new(Mutex::new(ide)));
        Ok(())
    }

    /// Attaches an NE2000 (RTL8029) on its own PCI slot, on `tap`.
    pub fn attach_ne2k(
        &mut self,
        vm: &KvmVm,
        event_manager: &mut DeviceEventManager,
        name: &str,
        tap: Tap,
        mac: MacAddr,
    ) -> Result<(), DeviceError> {
        const WHAT: &str = "NE2000 NIC";
        let irq = self.allocate_irq(name)?;
        let pci = self.pci();
        let slot = pci
            .take_slot()
            .ok_or_else(|| DeviceError::OutOfPci(name.into()))?;
        let io_base = pci
            .allocate_io()
            .ok_or_else(|| DeviceError::OutOfPci(name.into()))?;
        let irq_evt =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| DeviceError::EventFd(WHAT, e))?;
        vm.register_irqfd(&irq_evt, irq)
            .map_err(|e| DeviceError::Irq(name.into(), e))?;
        let rx_space =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| DeviceError::EventFd(WHAT, e))?;
        let metrics = self.metrics.add(
            DeviceMetrics::new(name, "ne2k", "net").with_register_names(ne2k::register_name),
            u64::from(io_base),
        );
        let tx_tap = tap.try_clone().map_err(|e| DeviceError::EventFd(WHAT, e))?;
        let nic = Ne2k::new(
            mac.0,
            u32::from(io_base),
            irq as u8,
            Box::new(irq_evt),
            Box::new(
                rx_space
                    .try_clone()
                    .map_err(|e| DeviceError::EventFd(WHAT, e))?,
            ),
            Box::new(TapSink::new(tx_tap)),
        )
        .with_metrics(metrics.clone());
        let nic = Arc::new(Mutex::new(nic));
        self.persist(name, nic.clone());
        let pci = self.pci();
        pci.bus
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add_metered(slot, 0, nic.clone(), Some(metrics.clone()));
        pci.irqs.push(PciIrq { slot, irq });
        // The data port takes a frame as hundreds of `outsl` words, each an exit of its own
        // (KVM batches string input, not output); coalesced, they cost none until the driver
        // polls ISR for the end of the DMA, which drains them first.
        let (data, len) = ne2k::COALESCED_PORTS;
        match vm.coalesce_pio(io_base + data, len) {
            Ok(()) => self.coalesced_pio = true,
            Err(e) => warn!("{name}: data port writes will each exit: {e}"),
        }
        let rx = NicTap::new("ne2k", nic, tap, rx_space);
        event_manager.add_subscriber(Arc::new(Mutex::new(Metered::new(
            Arc::new(Mutex::new(rx)),
            metrics,
        ))));
        info!("{name}: NE2000 (RTL8029) at PCI 00:{slot:02x}.0, I/O {io_base:#x}, IRQ {irq}");
        Ok(())
    }

    /// Attaches an Intel 82540EM (e1000) on its own PCI slot, on `tap`: the 128 KiB memory
    /// BAR in the PCI memory window, the I/O BAR, INTA on an IRQ of its own (an irqfd
    /// pulse whenever ICR & IMS rises), receive and the moderation timer on the event
    /// loop. The TAP passes partial checksums (TUN_F_CSUM), which the NIC completes.
    pub fn attach_e1000(
        &mut self,
        vm: &KvmVm,
        mem: &GuestMemoryMmap,
        event_manager: &mut DeviceEventManager,
        name: &str,
        tap: Tap,
        mac: MacAddr,
    ) -> Result<(), DeviceError> {
        const WHAT: &str = "e1000 NIC";
        let irq = self.allocate_irq(name)?;
        let pci = self.pci();
        let out_of_pci = || DeviceError::OutOfPci(name.into());
        let slot = pci.take_slot().ok_or_else(out_of_pci)?;
        let io_base = pci.allocate_io().ok_or_else(out_of_pci)?;
        let mmio_base = pci.allocate_mem(e1000::MMIO_SIZE).ok_or_else(out_of_pci)?;
        let irq_evt = new_eventfd(WHAT)?;
        vm.register_irqfd(&irq_evt, irq)
            .map_err(|e| DeviceError::Irq(name.into(), e))?;
        let rx_space = new_eventfd(WHAT)?;
        let metrics = self.metrics.add(
            DeviceMetrics::new(name, "e1000", "net")
                .with_register_names(e1000::register_name)
                .with_register_range(
                    Space::Pio,
                    u64::from(io_base),
                    u64::from(e1000::IO_SIZE),
                    e1000::io_register_name,
                ),
            mmio_base,
        );
        tap.set_offload(libc::TUN_F_CSUM)
            .map_err(|e| DeviceError::TapOffload(name.into(), e))?;
        let tx_tap = tap.try_clone().map_err(|e| DeviceError::EventFd(WHAT, e))?;
        let timer = HostTimer::new().map_err(|e| DeviceError::Timer(name.into(), e))?;
        let timer_fd = timer.as_raw_fd();
        let nic = E1000::new(
            mac.0,
            E1000Resources {
                mmio_base,
                io_base: u32::from(io_base),
                irq_line: irq as u8,
            },
            mem.clone(),
            Box::new(irq_evt),
            Box::new(clone_eventfd(&rx_space, WHAT)?),
            Box::new(TapSink::new(tx_tap)),
            Box::new(timer),
        )
        .with_metrics(metrics.clone());
        let nic = Arc::new(Mutex::new(nic));
        let pci = self.pci();
        pci.bus
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add_metered(slot, 0, nic.clone(), Some(metrics.clone()));
        pci.irqs.push(PciIrq { slot, irq });
        let rx = NicTap::new("e1000", nic.clone(), tap, rx_space);
        event_manager.add_subscriber(Arc::new(Mutex::new(Metered::new(
            Arc::new(Mutex::new(rx)),
            metrics.clone(),
        ))));
        self.persist(name, nic.clone());
        let timer = E1000Timer::new(nic, timer_fd);
        event_manager.add_subscriber(Arc::new(Mutex::new(Metered::new(
            Arc::new(Mutex::new(timer)),
            metrics,
        ))));
        info!(
            "{name}: e1000 (82540EM) at PCI 00:{slot:02x}.0, MMIO {mmio_base:#x}, I/O {io_base:#x}, IRQ {irq}"
        );
        Ok(())
    }

    /// Attaches the i8042 controller; returns the eventfd it writes when the guest resets.
    pub fn attach_i8042(&mut self) -> Result<EventFd, DeviceError> {
        const WHAT: &str = "i8042 controller";
        let reset_evt = new_eventfd(WHAT)?;
        let dev = Arc::new(Mutex::new(I8042::new(clone_eventfd(&reset_evt, WHAT)?)));
        self.insert_pio(dev.clone(), I8042_PORT, I8042_PORT_LEN, WHAT)?;
        self.persist("i8042", dev);
        Ok(reset_evt)
    }

    /// Maps an unmetered port I/O device at `[port, port + len)`.
    fn insert_pio(
        &mut self,
        dev: Arc<Mutex<impl BusDevice + 'static>>,
        port: u16,
        len: u16,
        what: &'static str,
    ) -> Result<(), DeviceError> {
        self.pio_bus
            .insert(dev, u64::from(port), u64::from(len))
            .map_err(|e| DeviceError::Bus(what, e))
    }

    fn allocate_irq(&mut self, what: &str) -> Result<u32, DeviceError> {
        let irq = *DEVICE_IRQS
            .get(self.irqs_used)
            .ok_or_else(|| DeviceError::OutOfIrqs(what.into()))?;
        self.irqs_used += 1;
        Ok(irq)
    }

    /// Wires a virtio device in on `transport`: its event handler on the event loop, and
    /// either a virtio-pci function (`attach_virtio_pci`) or a virtio-mmio slot
    /// (`attach_virtio_mmio`).
    #[allow(clippy::too_many_arguments)]
    pub fn attach_virtio<D>(
        &mut self,
        vm: &KvmVm,
        mem: &GuestMemoryMmap,
        event_manager: &mut DeviceEventManager,
        device: D,
        transport: VirtioTransport,
        name: &str,
        what: &str,
    ) -> Result<Arc<Mutex<D>>, DeviceError>
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
    {
        let (model, class) = match device.device_type() {
            1 => ("virtio-net", "net"),
            2 => ("virtio-blk", "block"),
            3 => ("virtio-console", "stream"),
            26 => ("virtio-fs", "fs"),
            _ => ("virtio", "other"),
        };
        if let Some(why) = device.persist_refusal() {
            self.no_persist.push(format!("{what}: {why}"));
        }
        let device = Arc::new(Mutex::new(device));
        let metrics = match transport {
            VirtioTransport::Pci => {
                self.attach_virtio_pci(vm, mem, device.clone(), name, model, class, what)?
            }
            VirtioTransport::Mmio => {
                self.attach_virtio_mmio(vm, mem, device.clone(), name, model, class, what)?
            }
        };
        event_manager.add_subscriber(Arc::new(Mutex::new(Metered::new(device.clone(), metrics))));
        Ok(device)
    }

    /// A virtio-mmio slot with the transport, an IRQ through an irqfd, one ioeventfd per
    /// queue on QueueNotify (matched on the queue index, so a notify never exits to
    /// userspace), and the device described to the guest: in the DSDT, or with a
    /// `virtio_mmio.device=` parameter when the guest reads no ACPI tables.
    #[allow(clippy::too_many_arguments)]
    fn attach_virtio_mmio(
        &mut self,
        vm: &KvmVm,
        mem: &GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        name: &str,
        model: &'static str,
        class: &'static str,
        what: &str,
    ) -> Result<Arc<DeviceMetrics>, DeviceError> {
        let irq = self.allocate_irq(what)?;
        let base = VIRTIO_MMIO_START + self.mmio_slots_used * VIRTIO_MMIO_SLOT_SIZE;
        let irq_evt = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| DeviceError::EventFd("virtio device", e))?;
        vm.register_irqfd(&irq_evt, irq)
            .map_err(|e| DeviceError::Irq(what.into(), e))?;
        for (i, evt) in lock_dyn(&device).queue_events().iter().enumerate() {
            vm.fd()
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY),
                    i as u32,
                )
                .map_err(|e| DeviceError::IoEvent(what.into(), e))?;
        }
        let metrics = self.metrics.add(
            DeviceMetrics::new(name, model, class).with_register_names(mmio::register_name),
            base,
        );
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            mem.clone(),
            device,
            Arc::new(VirtioInterrupt::with_metrics(irq_evt, metrics.clone())),
        )));
        self.mmio_bus
            .insert_metered(transport.clone(), base, MMIO_LEN, Some(metrics.clone()))
            .map_err(|e| DeviceError::Bus("virtio device", e))?;
        self.persist(name, transport);
        self.mmio_slots_used += 1;
        self.mmio_devices.push(MmioDevice {
            base,
            len: MMIO_LEN,
            irq,
        });
        if !self.acpi {
            self.cmdline_extra.push(format!(
                "virtio_mmio.device={}K@{base:#x}:{irq}",
                MMIO_LEN >> 10
            ));
        }
        info!("{what}: virtio-mmio at {base:#x}, IRQ {irq}");
        Ok(metrics)
    }

    /// A virtio-pci function on its own slot: a memory BAR in the PCI window, one MSI-X
    /// vector per queue plus one for configuration changes (each a GSI with an irqfd, routed
    /// when the driver programs it), an INTx line for drivers without MSI-X, and the queue
    /// notifications as ioeventfds in the BAR.
    #[allow(clippy::too_many_arguments)]
    fn attach_virtio_pci(
        &mut self,
        vm: &KvmVm,
        mem: &GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        name: &str,
        model: &'static str,
        class: &'static str,
        what: &str,
    ) -> Result<Arc<DeviceMetrics>, DeviceError> {
        let irq = self.allocate_irq(what)?;
        let pci = self.pci();
        let slot = pci
            .take_slot()
            .ok_or_else(|| DeviceError::OutOfPci(what.into()))?;
        let bar = pci
            .allocate_mem(VIRTIO_PCI_BAR_SIZE)
            .ok_or_else(|| DeviceError::OutOfPci(what.into()))?;
        let intx_evt = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| DeviceError::EventFd("virtio device", e))?;
        vm.register_irqfd(&intx_evt, irq)
            .map_err(|e| DeviceError::Irq(what.into(), e))?;
        let queues = lock_dyn(&device).queue_max_sizes().len();
        let mut vectors = Vec::new();
        for _ in 0..pci_transport::msix_vectors_for(queues) {
            let gsi = vm
                .router()
                .allocate_msi_gsi()
                .map_err(|e| DeviceError::Msix(what.into(), e))?;
            let irqfd = EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| DeviceError::EventFd("MSI-X vector", e))?;
            vm.register_irqfd(&irqfd, gsi)
                .map_err(|e| DeviceError::Msix(what.into(), e))?;
            vectors.push(MsixVector { gsi, irqfd });
        }
        let table = Arc::new(MsixTable::new(vectors, vm.router().clone()));
        let metrics = self.metrics.add(
            DeviceMetrics::new(name, model, class)
                .with_register_names(pci_transport::register_name),
            bar,
        );
        let interrupt = Arc::new(VirtioInterrupt::with_msix(
            intx_evt,
            metrics.clone(),
            MsixVectors::new(table, queues),
        ));
        let transport = PciTransport::new(
            mem.clone(),
            device,
            interrupt,
            bar,
            irq as u8,
            Box::new(vm.ioevents()),
        )
        .map_err(|e| DeviceError::PciTransport(what.into(), e))?;
        let transport = Arc::new(Mutex::new(transport));
        let pci = self.pci();
        pci.bus
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add_metered(slot, 0, transport.clone(), Some(metrics.clone()));
        pci.irqs.push(PciIrq { slot, irq });
        // After the bus (registered when it was made): its configuration space, with the
        // BAR the notifications follow, is restored first.
        self.persist(name, transport);
        info!(
            "{what}: virtio-pci at 00:{slot:02x}.0, BAR {bar:#x}, INTx IRQ {irq}, {} MSI-X vectors",
            queues + 1
        );
        Ok(metrics)
    }

    /// Attaches the ACPI sleep and reset registers; returns the eventfd written when the
    /// guest powers off through S5 (a reset goes to `reset_evt`, as the i8042's does).
    pub fn attach_acpi_pm(
        &mut self,
        vm: &KvmVm,
        reset_evt: &EventFd,
    ) -> Result<EventFd, DeviceError> {
        const WHAT: &str = "ACPI power management registers";
        let off_evt = new_eventfd(WHAT)?;
        let sci = new_eventfd(WHAT)?;
        vm.register_irqfd(&sci, ACPI_SCI_IRQ)
            .map_err(|e| DeviceError::Irq("the ACPI SCI".into(), e))?;
        let dev = Arc::new(Mutex::new(
            AcpiPm::new(
                clone_eventfd(&off_evt, WHAT)?,
                clone_eventfd(reset_evt, WHAT)?,
            )
            .with_sci(sci),
        ));
        self.insert_pio(dev.clone(), ACPI_PM_PORT, ACPI_PM_PORT_LEN, WHAT)?;
        self.persist("acpi-pm", dev.clone());
        self.acpi_pm = Some(dev);
        Ok(off_evt)
    }

    /// What the ACPI tables must describe of the attached devices.
    pub fn acpi_config(&self, num_cpus: u8) -> AcpiConfig {
        AcpiConfig {
            num_cpus,
            pci: self.pci_irqs(),
            virtio_mmio: self.mmio_devices.clone(),
            serial_ports: self.serial_ports.clone(),
        }
    }

    /// Kernel command line parameters the attached devices need.
    pub fn cmdline_extra(&self) -> &[String] {
        &self.cmdline_extra
    }

    /// Whether the vCPUs must drain KVM's coalesced ring.
    pub fn uses_coalesced_pio(&self) -> bool {
        self.coalesced_pio
    }

    /// PCI INTx routing for the MP table; None when the VM has no PCI bus.
    pub fn pci_irqs(&self) -> Option<Vec<PciIrq>> {
        self.pci.as_ref().map(|p| p.irqs.clone())
    }

    /// The finished buses, to be shared by the vCPU threads, and the devices' counters.
    pub fn finish(mut self) -> Result<Devices, DeviceError> {
        if let Some(pci) = self.pci.take() {
            let decode = pci
                .bus
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .decode_map();
            self.pio_bus
                .insert(
                    Arc::new(Mutex::new(PciWindow::new(
                        BarSpace::Io,
                        u64::from(PCI_IO_WINDOW_START),
                        decode.clone(),
                    ))),
                    u64::from(PCI_IO_WINDOW_START),
                    u64::from(PCI_IO_WINDOW_LEN),
                )
                .map_err(|e| DeviceError::Bus("PCI I/O window", e))?;
            self.mmio_bus
                .insert(
                    Arc::new(Mutex::new(PciWindow::new(
                        BarSpace::Memory,
                        PCI_MMIO_WINDOW_START,
                        decode,
                    ))),
                    PCI_MMIO_WINDOW_START,
                    PCI_MMIO_WINDOW_LEN,
                )
                .map_err(|e| DeviceError::Bus("PCI memory window", e))?;
            self.pio_bus
                .insert(
                    pci.bus,
                    u64::from(PCI_CONFIG_PORT),
                    u64::from(PCI_CONFIG_PORT_LEN),
                )
                .map_err(|e| DeviceError::Bus("PCI configuration ports", e))?;
        }
        Ok(Devices {
            pio: Arc::new(self.pio_bus),
            mmio: Arc::new(self.mmio_bus),
            metrics: self.metrics,
            persist: self.persist,
            no_persist: self.no_persist,
            acpi_pm: self.acpi_pm,
        })
    }
}

fn new_eventfd(what: &'static str) -> Result<EventFd, DeviceError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|e| DeviceError::EventFd(what, e))
}

fn clone_eventfd(evt: &EventFd, what: &'static str) -> Result<EventFd, DeviceError> {
    evt.try_clone().map_err(|e| DeviceError::EventFd(what, e))
}

fn lock_dyn(
    d: &Arc<Mutex<dyn VirtioDevice>>,
) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_memory_bars_are_aligned_and_stay_in_the_window() {
        let mut dm = DeviceManager::new(true);
        let pci = dm.pci();
        let a = pci.allocate_mem(0x8000).unwrap();
        let b = pci.allocate_mem(0x2_0000).unwrap();
        let c = pci.allocate_mem(0x8000).unwrap();
        assert_eq!(a, PCI_MMIO_WINDOW_START);
        assert_eq!(b % 0x2_0000, 0);
        assert!(b >= a + 0x8000 && c >= b + 0x2_0000);
        assert!(
            pci.allocate_mem(PCI_MMIO_WINDOW_LEN).is_none(),
            "window full"
        );
        // The window lies in the MMIO gap, clear of RAM and of the virtio-mmio slots.
        const {
            assert!(PCI_MMIO_WINDOW_START >= crate::arch::x86_64::layout::MMIO_GAP_START);
            assert!(PCI_MMIO_WINDOW_START + PCI_MMIO_WINDOW_LEN <= VIRTIO_MMIO_START);
        }
    }

    #[test]
    fn i8042_answers_on_its_ports() {
        let mut dm = DeviceManager::new(true);
        let reset = dm.attach_i8042().unwrap();
        let pio = dm.finish().unwrap().pio;
        assert!(pio.write(0x64, &[0xfe]));
        assert_eq!(reset.read().unwrap(), 1);
        let mut b = [0u8];
        assert!(pio.read(0x60, &mut b));
    }
}
