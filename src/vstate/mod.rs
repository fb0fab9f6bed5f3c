//! VM state: guest memory, the KVM VM and its vCPUs.

pub mod coalesced;
pub mod memory;
pub mod stats;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
