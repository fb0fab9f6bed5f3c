//! Emulated hardware that stock drivers use without knowing they run in a VM (full
//! virtualization): pure register-level state machines, wired in by the device manager.

pub mod ide;
pub mod pci;
