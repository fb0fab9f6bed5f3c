//! VM state: guest memory, the KVM VM and its vCPUs.

pub mod coalesced;
pub mod memory;
pub mod stats;
pub mod vcpu;
pub mod vm;
