//! KVM's coalesced I/O ring: port writes KVM records in a shared page instead of exiting to
//! the VMM (`KVM_REGISTER_COALESCED_MMIO` with `pio = 1`).
//!
//! A device may let a port be coalesced when a write to it has no effect the guest can see
//! before its next exit to the VMM: the NE2000's data port during a remote DMA write is the
//! case (the driver polls ISR for the DMA's completion, an exit that sees the data first).
//! The ring is one page per VM; every vCPU thread drains it, in order and under one lock,
//! before it handles its own exit, so a coalesced write is always applied before any later
//! access that could observe it.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{fence, Ordering};
use std::sync::Mutex;

use kvm_bindings::{kvm_coalesced_mmio, kvm_coalesced_mmio_ring, KVM_COALESCED_MMIO_PAGE_OFFSET};
use kvm_ioctls::VcpuFd;
use std::os::fd::AsRawFd;

/// The mapped ring page.
struct RingPage {
    ring: NonNull<kvm_coalesced_mmio_ring>,
    page_size: usize,
}

// SAFETY: the page is plain shared memory that stays mapped as long as the value lives; all
// access from this side goes through `CoalescedRing`'s mutex.
unsafe impl Send for RingPage {}

impl Drop for RingPage {
    fn drop(&mut self) {
        // SAFETY: the page was mapped by `CoalescedRing::map` with this size and nothing
        // refers to it once the value is dropped.
        unsafe { libc::munmap(self.ring.as_ptr().cast(), self.page_size) };
    }
}

/// One coalesced access, as the buses take it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoalescedWrite {
    pub pio: bool,
    pub addr: u64,
    pub data: Vec<u8>,
}

/// The VM's coalesced ring, shared by the vCPU threads.
pub struct CoalescedRing {
    page: Mutex<RingPage>,
}

impl CoalescedRing {
    /// Maps the ring through any vCPU of the VM (they all share one page).
    pub fn map(vcpu: &VcpuFd) -> io::Result<Self> {
        // SAFETY: sysconf has no memory effects.
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page_size <= 0 {
            return Err(io::Error::last_os_error());
        }
        let page_size = page_size as usize;
        // SAFETY: a fresh shared mapping of one page of the vCPU fd at the offset KVM
        // documents for the coalesced ring; the result is checked before use.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                (KVM_COALESCED_MMIO_PAGE_OFFSET as usize * page_size) as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ring = NonNull::new(addr.cast()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self {
            page: Mutex::new(RingPage { ring, page_size }),
        })
    }

    /// Takes every recorded write out of the ring, oldest first, and hands each to `apply`
    /// (still under the lock, so writes from several vCPUs reach devices in ring order).
    pub fn drain(&self, mut apply: impl FnMut(CoalescedWrite)) {
        let page = self.page.lock().unwrap_or_else(|p| p.into_inner());
        let max = ((page.page_size - std::mem::size_of::<kvm_coalesced_mmio_ring>())
            / std::mem::size_of::<kvm_coalesced_mmio>()) as u32;
        let ring = page.ring.as_ptr();
        loop {
            // SAFETY: `ring` points at the mapped ring header; `first` and `last` are u32
            // fields the kernel (`last`) and we (`first`) update; volatile because the
            // kernel writes concurrently from other vCPUs.
            let (first, last) = unsafe {
                (
                    std::ptr::addr_of!((*ring).first).read_volatile(),
                    std::ptr::addr_of!((*ring).last).read_volatile(),
                )
            };
            if first == last || first >= max {
                break;
            }
            // The kernel fills an entry before it publishes it by moving `last`.
            fence(Ordering::Acquire);
            // SAFETY: `first < max`, so the entry lies inside the mapped page after the
            // header (the kernel sizes the ring the same way).
            let entry: kvm_coalesced_mmio = unsafe {
                std::ptr::addr_of!((*ring).coalesced_mmio)
                    .cast::<kvm_coalesced_mmio>()
                    .add(first as usize)
                    .read_volatile()
            };
            fence(Ordering::Release);
            // SAFETY: as above; only this side writes `first`, under the lock.
            unsafe { std::ptr::addr_of_mut!((*ring).first).write_volatile((first + 1) % max) };
            let len = (entry.len as usize).min(entry.data.len());
            // SAFETY: `pio` is the union member KVM fills for every entry.
            let pio = unsafe { entry.__bindgen_anon_1.pio } != 0;
            apply(CoalescedWrite {
                pio,
                addr: entry.phys_addr,
                data: entry.data[..len].to_vec(),
            });
        }
    }
}
