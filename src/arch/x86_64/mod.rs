//! x86_64: the memory layout, kernel loading and boot parameters, vCPU register state (at
//! boot, and snapshots for crash reports), CPUID, the MP table and the ACPI tables.

pub mod acpi;
pub mod boot;
pub mod cpu_state;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
