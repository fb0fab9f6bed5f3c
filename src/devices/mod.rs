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

/// A device whose state snapshots carry (`crate::persist`): `save` and `restore` next to
/// each device model, every state in the one versioned format (a JSON value per device).
pub trait Persist: Send {
    /// The device's state; in-flight work is finished first.
    fn save(&mut self) -> Result<serde_json::Value, String>;
    /// Puts `state` back into a device built from the same configuration.
    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String>;
    /// After a restore, before the vCPUs run: poke whatever may wait on a notification or
    /// an interrupt lost with the old process.
    fn kick(&mut self) {}
}

/// Serializes a device's state struct for `Persist::save`.
pub fn to_state<T: serde::Serialize>(s: &T) -> Result<serde_json::Value, String> {
    serde_json::to_value(s).map_err(|e| e.to_string())
}

/// Reads a device's state struct for `Persist::restore`.
pub fn from_state<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> Result<T, String> {
    T::deserialize(v).map_err(|e| format!("malformed device state: {e}"))
}

/// A device (or other handler) as the event loop holds it.
pub type EventSubscriber = Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>>;
/// The one event loop for device I/O, run on the VMM's main thread.
pub type DeviceEventManager = event_manager::EventManager<EventSubscriber>;
