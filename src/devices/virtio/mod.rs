//! Paravirtual devices: virtio 1.x over the virtio-mmio transport.

pub mod block;
pub mod device;
pub mod mmio;

pub use block::VirtioBlock;
pub use device::{VirtioDevice, VirtioInterrupt};
pub use mmio::MmioTransport;
