//! Devices: the bus they sit on, the manager that wires them in, and the device models.

pub mod bus;
pub mod legacy;
pub mod manager;

pub use bus::{Bus, BusDevice, BusError};
