//! ferrovm: a micro-VMM on KVM that boots a Linux kernel and gives the guest emulated and
//! paravirtual devices for the same jobs, so the two models can be measured side by side.
//!
//! The boot sequence, as `vmm::Vmm::build` runs it:
//! 1. `config` validates every user-facing value.
//! 2. `vstate::vm` opens KVM, checks capabilities, creates the VM with an in-kernel IOAPIC,
//!    PIC and PIT; `vstate::memory` maps guest RAM around the 32-bit MMIO gap.
//! 3. `devices::manager` wires devices onto the port-I/O and MMIO buses and their IRQs.
//! 4. `arch::x86_64::boot` loads the kernel (ELF vmlinux via PVH or the 64-bit protocol, or
//!    a bzImage), the initrd and the command line, and writes the zero page or PVH start info;
//!    `arch::x86_64::mptable` describes CPUs and interrupt routing.
//! 5. `vstate::vcpu` configures each vCPU (CPUID, MSRs, LAPIC, boot registers) and runs it on
//!    its own thread; exits are dispatched to the buses.
//! 6. `vmm::Vmm::run` runs the event loop (device I/O, lifecycle, signals) until the guest
//!    reboots, powers off or crashes.
//!
//! `seccomp` puts every thread under an allow-list of syscalls once its setup is done.
//! `crash` says where a guest died (registers, symbols, the console's last lines).
//! `check` tells whether the host has what ferrovm needs (`ferrovm check`, and the start-up
//! check for hardware virtualization under /dev/kvm).

pub mod api;
pub mod arch;
pub mod check;
pub mod config;
pub mod crash;
pub mod devices;
pub mod exec;
/// Fuzz targets and the bounded runner CI uses (tests and the `fuzzing` feature only).
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
pub mod leftovers;
pub mod migration;
pub mod persist;
pub mod seccomp;
pub mod terminal;
pub mod vmm;
pub mod vstate;

pub use config::VmConfig;
pub use vmm::{ExitReason, Outcome, Vmm, VmmError};
