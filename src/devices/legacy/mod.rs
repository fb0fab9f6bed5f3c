//! Legacy PC devices every x86 guest expects.

pub mod acpi_pm;
pub mod i8042;
pub mod serial;

pub use acpi_pm::AcpiPm;
pub use i8042::I8042;
pub use serial::{SerialDevice, SerialInputHandler};
