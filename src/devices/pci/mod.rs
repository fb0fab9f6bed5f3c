//! PCI bus 0: configuration space (`config`), the bus with configuration mechanism #1 and
//! the BAR windows (`bus`), MSI-X (`msix`) and the chipset functions (`piix`). The virtio-pci
//! transport, the IDE controller and the NICs all sit on it.

pub mod bus;
pub mod config;
pub mod msix;
pub mod piix;

pub use bus::{DecodeMap, PciBus, PciWindow, SharedPci};
pub use config::{BarSpace, ConfigOnly, PciConfig, PciDevice};
