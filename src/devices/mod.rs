//! Devices: the bus they sit on, the manager that wires them in, and the device models.

pub mod bus;
pub mod disk;
pub mod emulated;
pub mod host_input;
pub mod legacy;
pub mod manager;
pub mod metrics;
pub mod pci;
pub mod tap;
pub mod virtio;
pub mod virtiofsd;

pub use bus::{Bus, BusDevice, BusError};

use std::sync::{Arc, Mutex};

/// A device (or other handler) as the event loop holds it.
pub type EventSubscriber = Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>>;
/// The one event loop for device I/O, run on the VMM's main thread.
pub type DeviceEventManager = event_manager::EventManager<EventSubscriber>;
