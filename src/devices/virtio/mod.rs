//! Paravirtual devices: virtio 1.x over the virtio-mmio transport.

pub mod block;
pub mod console;
pub mod device;
pub mod guest_write;
pub mod mmio;
pub mod net;

pub use block::VirtioBlock;
pub use console::VirtioConsole;
pub use device::{VirtioDevice, VirtioInterrupt};
pub use mmio::MmioTransport;
pub use net::VirtioNet;
