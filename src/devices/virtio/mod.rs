//! Paravirtual devices: virtio 1.x over the virtio-pci or the virtio-mmio transport.

pub mod block;
pub mod console;
pub mod device;
pub mod fs;
pub mod guest_write;

pub mod net;
pub mod ports;
pub mod transport;
pub mod vhost_user;

pub use block::VirtioBlock;
pub use console::VirtioConsole;
pub use device::{VirtioDevice, VirtioInterrupt};
pub use fs::VirtioFs;
pub use net::VirtioNet;
pub use transport::mmio::{self, MmioTransport};
pub use transport::pci::{self as pci_transport, PciTransport};
