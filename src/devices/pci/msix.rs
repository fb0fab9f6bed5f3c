//! MSI-X (PCI Local Bus 3.0, section 6.8.2): the capability's message control, the vector
//! table and the pending bit array a function exposes in a BAR, and delivery.
//!
//! Each vector is a GSI of its own with an irqfd registered on it, so a device raises an
//! interrupt with one eventfd write from whatever thread it runs on, and the message the
//! driver programmed becomes that GSI's MSI route (`MsiRouting`). A vector the driver
//! masked (or every vector, while the function is masked) is not delivered: its pending bit
//! is set instead, and unmasking delivers it (6.8.2.9). A route is (re)programmed only
//! when its vector can deliver, so the driver's usual sequence (mask, write address and
//! data, unmask) costs one routing update.

use std::sync::{Arc, Mutex, MutexGuard};

use log::{error, warn};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

/// Capability id of MSI-X.
pub const PCI_CAP_ID_MSIX: u8 = 0x11;
/// Bytes of one table entry: message address low/high, data, vector control.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Vector control bit 0: the vector is masked.
const VECTOR_MASKED: u32 = 1;
/// Message control bits.
pub const MSIX_ENABLE: u16 = 1 << 15;
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// Offset of message control within the capability.
pub const MSIX_CAP_CONTROL: usize = 2;
/// Most vectors a table can have (the table size field is 11 bits).
pub const MSIX_MAX_VECTORS: usize = 2048;

/// An MSI message: the address and data the function would write (on x86, an address in the
/// LAPIC range naming the destination, and the vector).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// What MSI-X needs from the platform: a route from each vector's GSI to its message.
pub trait MsiRouting: Send + Sync {
    /// Points `gsi` at `msg`.
    fn set_route(&self, gsi: u32, msg: MsiMessage) -> Result<(), String>;
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    ctrl: u32,
}

impl Entry {
    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.addr_lo) | (u64::from(self.addr_hi) << 32),
            data: self.data,
        }
    }
}

struct State {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    /// The message each vector's GSI is routed to now.
    routed: Vec<Option<MsiMessage>>,
}

/// The table's state, for snapshots: each entry (address low/high, data, control), the
/// pending bits, and message control's enable and function mask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    pub entries: Vec<(u32, u32, u32, u32)>,
    pub pending: Vec<bool>,
    pub enabled: bool,
    pub function_masked: bool,
}

/// One vector's way to the guest: its GSI and the irqfd that raises it.
pub struct MsixVector {
    pub gsi: u32,
    pub irqfd: EventFd,
}

/// The MSI-X table of one function, shared by the transport (the driver's accesses, on vCPU
/// threads) and the device (interrupts, on the event loop and I/O threads).
pub struct MsixTable {
    state: Mutex<State>,
    vectors: Vec<MsixVector>,
    routing: Arc<dyn MsiRouting>,
}

impl MsixTable {
    /// A table of `vectors.len()` vectors, all masked, MSI-X disabled (the reset state).
    pub fn new(vectors: Vec<MsixVector>, routing: Arc<dyn MsiRouting>) -> Self {
        let n = vectors.len();
        assert!((1..=MSIX_MAX_VECTORS).contains(&n), "MSI-X table size");
        Self {
            state: Mutex::new(State {
                entries: vec![
                    Entry {
                        ctrl: VECTOR_MASKED,
                        ..Default::default()
                    };
                    n
                ],
                pending: vec![false; n],
                enabled: false,
                function_masked: false,
                routed: vec![None; n],
            }),
            vectors,
            routing,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    /// Bytes of the table (a BAR region must hold this much).
    pub fn table_size(&self) -> u64 {
        self.len() as u64 * MSIX_ENTRY_SIZE
    }

    /// Bytes of the pending bit array (whole qwords).
    pub fn pba_size(&self) -> u64 {
        self.len().div_ceil(64) as u64 * 8
    }

    /// The capability's body after id and next pointer: message control (table size - 1),
    /// then table and PBA offsets with their BAR indicator in the low 3 bits.
    pub fn capability_body(&self, bar: u8, table_offset: u32, pba_offset: u32) -> [u8; 10] {
        assert!(table_offset.is_multiple_of(8) && pba_offset.is_multiple_of(8) && bar < 6);
        let mut b = [0u8; 10];
        b[0..2].copy_from_slice(&((self.len() - 1) as u16).to_le_bytes());
        b[2..6].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        b[6..10].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        b
    }

    /// Whether the driver enabled MSI-X (then INTx is off, 6.8.2.3).
    pub fn enabled(&self) -> bool {
        self.lock().enabled
    }

    /// The enable and function mask bits of message control.
    pub fn control_bits(&self) -> u16 {
        let s = self.lock();
        (if s.enabled { MSIX_ENABLE } else { 0 })
            | (if s.function_masked {
                MSIX_FUNCTION_MASK
            } else {
                0
            })
    }

    /// A write of message control: enable and function mask are the writable bits.
    pub fn write_control(&self, value: u16) {
        let mut s = self.lock();
        s.enabled = value & MSIX_ENABLE != 0;
        s.function_masked = value & MSIX_FUNCTION_MASK != 0;
        for v in 0..self.len() {
            self.sync(&mut s, v);
        }
    }

    fn deliverable(s: &State, v: usize) -> bool {
        s.enabled && !s.function_masked && s.entries[v].ctrl & VECTOR_MASKED == 0
    }

    /// Brings vector `v`'s route up to date and delivers its pending interrupt, if it can
    /// deliver now.
    fn sync(&self, s: &mut State, v: usize) {
        if !Self::deliverable(s, v) {
            return;
        }
        let msg = s.entries[v].message();
        if s.routed[v] != Some(msg) {
            match self.routing.set_route(self.vectors[v].gsi, msg) {
                Ok(()) => s.routed[v] = Some(msg),
                Err(e) => {
                    error!("msi-x: failed to route vector {v}: {e}");
                    return;
                }
            }
        }
        if s.pending[v] {
            s.pending[v] = false;
            self.fire(v);
        }
    }

    fn fire(&self, v: usize) {
        if let Err(e) = self.vectors[v].irqfd.write(1) {
            error!("msi-x: failed to raise vector {v}: {e}");
        }
    }

    /// Raises vector `v`: delivered now, or left pending while masked. Returns whether it
    /// was delivered. A vector past the table is refused (the driver programmed a queue
    /// with a vector the function does not have).
    pub fn trigger(&self, v: usize) -> bool {
        if v >= self.len() {
            warn!(
                "msi-x: interrupt on vector {v}, past the {}-entry table",
                self.len()
            );
            return false;
        }
        let mut s = self.lock();
        if Self::deliverable(&s, v) && s.routed[v].is_some() {
            drop(s);
            self.fire(v);
            true
        } else {
            s.pending[v] = true;
            false
        }
    }

    /// The table's state for a snapshot.
    pub fn save(&self) -> MsixState {
        let s = self.lock();
        MsixState {
            entries: s
                .entries
                .iter()
                .map(|e| (e.addr_lo, e.addr_hi, e.data, e.ctrl))
                .collect(),
            pending: s.pending.clone(),
            enabled: s.enabled,
            function_masked: s.function_masked,
        }
    }

    /// Puts a snapshot's table back and routes every vector that can deliver (the new VM's
    /// routing table starts without them).
    pub fn restore(&self, st: &MsixState) -> Result<(), String> {
        let mut s = self.lock();
        if st.entries.len() != s.entries.len() || st.pending.len() != s.pending.len() {
            return Err(format!(
                "the snapshot's MSI-X table has {} vectors, the device {}",
                st.entries.len(),
                s.entries.len()
            ));
        }
        for (e, &(addr_lo, addr_hi, data, ctrl)) in s.entries.iter_mut().zip(&st.entries) {
            *e = Entry {
                addr_lo,
                addr_hi,
                data,
                ctrl,
            };
        }
        s.pending = st.pending.clone();
        s.enabled = st.enabled;
        s.function_masked = st.function_masked;
        s.routed.iter_mut().for_each(|r| *r = None);
        for v in 0..self.len() {
            self.sync(&mut s, v);
        }
        Ok(())
    }

    /// A read of the table at `offset` (dword or qword, naturally aligned; 6.8.2).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        if !valid(offset, data.len(), self.table_size()) {
            warn!(
                "msi-x: {}-byte table read at {offset:#x} ignored",
                data.len()
            );
            data.fill(0xff);
            return;
        }
        let s = self.lock();
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let off = offset + 4 * i as u64;
            let e = &s.entries[(off / MSIX_ENTRY_SIZE) as usize];
            let v = match off % MSIX_ENTRY_SIZE {
                0 => e.addr_lo,
                4 => e.addr_hi,
                8 => e.data,
                _ => e.ctrl,
            };
            chunk.copy_from_slice(&v.to_le_bytes());
        }
    }

    /// A write of the table at `offset` (dword or qword, naturally aligned).
    pub fn write_table(&self, offset: u64, data: &[u8]) {
        if !valid(offset, data.len(), self.table_size()) {
            warn!(
                "msi-x: {}-byte table write at {offset:#x} ignored",
                data.len()
            );
            return;
        }
        let mut s = self.lock();
        let v = (offset / MSIX_ENTRY_SIZE) as usize;
        for (i, chunk) in data.chunks(4).enumerate() {
            let value = u32::from_le_bytes(chunk.try_into().unwrap());
            let e = &mut s.entries[v];
            match (offset + 4 * i as u64) % MSIX_ENTRY_SIZE {
                // The address is dword aligned: bits 1:0 are read-only zero.
                0 => e.addr_lo = value & !0x3,
                4 => e.addr_hi = value,
                8 => e.data = value,
                // Only the mask bit of vector control is defined.
                _ => e.ctrl = value & VECTOR_MASKED,
            }
        }
        self.sync(&mut s, v);
    }

    /// A read of the pending bit array (read-only).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        if !valid(offset, data.len(), self.pba_size()) {
            data.fill(0xff);
            return;
        }
        let s = self.lock();
        for (i, b) in data.iter_mut().enumerate() {
            let first = (offset as usize + i) * 8;
            *b = (0..8)
                .filter(|bit| s.pending.get(first + bit).copied().unwrap_or(false))
                .fold(0u8, |acc, bit| acc | 1 << bit);
        }
    }
}

/// Table and PBA accesses are dwords or qwords at their natural alignment, inside a region
/// of `size` bytes.
fn valid(offset: u64, len: usize, size: u64) -> bool {
    matches!(len, 4 | 8)
        && offset.is_multiple_of(len as u64)
        && offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= size)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Records the routes programmed.
    #[derive(Default)]
    pub struct Routes(pub Mutex<Vec<(u32, MsiMessage)>>);

    impl MsiRouting for Routes {
        fn set_route(&self, gsi: u32, msg: MsiMessage) -> Result<(), String> {
            self.0.lock().unwrap().push((gsi, msg));
            Ok(())
        }
    }

    pub fn table(n: usize) -> (MsixTable, Arc<Routes>) {
        let routes = Arc::new(Routes::default());
        let vectors = (0..n)
            .map(|i| MsixVector {
                gsi: 24 + i as u32,
                irqfd: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            })
            .collect();
        (MsixTable::new(vectors, routes.clone()), routes)
    }

    fn fired(t: &MsixTable, v: usize) -> u64 {
        t.vectors[v].irqfd.read().unwrap_or(0)
    }

    fn w32(t: &MsixTable, off: u64, v: u32) {
        t.write_table(off, &v.to_le_bytes());
    }

    /// Programs vector `v` the way Linux does: masked, address, data, unmask.
    fn program(t: &MsixTable, v: u64, data: u32) {
        let base = v * MSIX_ENTRY_SIZE;
        w32(t, base + 12, 1);
        w32(t, base, 0xfee0_0000);
        w32(t, base + 4, 0);
        w32(t, base + 8, data);
        w32(t, base + 12, 0);
    }

    #[test]
    fn masked_vectors_pend_and_unmasking_delivers() {
        let (t, routes) = table(3);
        t.write_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        program(&t, 1, 0x41);
        assert!(
            routes.0.lock().unwrap().is_empty(),
            "function masked: no route yet"
        );
        assert!(!t.trigger(1));
        let mut pba = [0u8; 8];
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b010, "vector 1 pending");
        assert_eq!(fired(&t, 1), 0);
        // Unmask the function: the route is set, the pending interrupt delivered.
        t.write_control(MSIX_ENABLE);
        assert_eq!(
            routes.0.lock().unwrap().as_slice(),
            &[(
                25,
                MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x41
                }
            )]
        );
        assert_eq!(fired(&t, 1), 1);
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        // Now it delivers directly.
        assert!(t.trigger(1));
        assert_eq!(fired(&t, 1), 1);
        // Vector 0 was never unmasked.
        assert!(!t.trigger(0));
        assert_eq!(fired(&t, 0), 0);
    }

    #[test]
    fn vector_mask_bit_pends_and_reprogramming_reroutes_once() {
        let (t, routes) = table(2);
        t.write_control(MSIX_ENABLE);
        program(&t, 0, 0x30);
        assert_eq!(routes.0.lock().unwrap().len(), 1);
        // Linux moving the vector's affinity: mask, new message, unmask.
        w32(&t, 12, 1);
        assert!(!t.trigger(0), "masked");
        w32(&t, 8, 0x31);
        assert_eq!(routes.0.lock().unwrap().len(), 1, "no route while masked");
        w32(&t, 12, 0);
        assert_eq!(routes.0.lock().unwrap().len(), 2);
        assert_eq!(routes.0.lock().unwrap()[1].1.data, 0x31);
        assert_eq!(fired(&t, 0), 1, "the pended interrupt arrives on unmask");
        // Reading back the entry.
        let mut q = [0u8; 8];
        t.read_table(8, &mut q);
        assert_eq!(u32::from_le_bytes(q[0..4].try_into().unwrap()), 0x31);
        assert_eq!(u32::from_le_bytes(q[4..8].try_into().unwrap()), 0);
    }

    #[test]
    fn disabled_msix_delivers_nothing() {
        let (t, _) = table(1);
        program(&t, 0, 0x30);
        assert!(!t.enabled());
        assert!(!t.trigger(0));
        assert_eq!(fired(&t, 0), 0);
        t.write_control(MSIX_ENABLE);
        assert_eq!(fired(&t, 0), 1, "pending since before enable");
        assert_eq!(t.control_bits(), MSIX_ENABLE);
    }

    #[test]
    fn hostile_accesses_are_refused() {
        let (t, routes) = table(2);
        let mut b = [0u8; 2];
        t.read_table(0, &mut b);
        assert_eq!(b, [0xff; 2], "16-bit read");
        t.write_table(2, &[1, 2, 3, 4]);
        t.write_table(32, &[0; 4]);
        t.write_table(u64::MAX - 3, &[0; 4]);
        let mut q = [0u8; 8];
        t.read_pba(8, &mut q);
        assert_eq!(q, [0xff; 8], "past the PBA");
        assert!(!t.trigger(7), "no such vector");
        assert!(routes.0.lock().unwrap().is_empty());
        // Reserved vector control bits read as zero.
        w32(&t, 12, 0xffff_ffff);
        t.read_table(12, &mut q[..4]);
        assert_eq!(q[..4], [1, 0, 0, 0]);
    }

    #[test]
    fn state_round_trips_and_restoring_reroutes() {
        let (t, _) = table(2);
        t.write_control(MSIX_ENABLE);
        program(&t, 1, 0x55);
        w32(&t, 12, 1);
        assert!(!t.trigger(0), "vector 0 masked: pends");
        let st = t.save();
        let (t2, routes2) = table(2);
        t2.restore(&st).unwrap();
        assert_eq!(t2.save(), st);
        assert_eq!(
            routes2.0.lock().unwrap().as_slice(),
            &[(
                25,
                MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x55
                }
            )],
            "the deliverable vector is routed again"
        );
        let (t3, _) = table(3);
        assert!(t3.restore(&st).is_err(), "another table size");
    }

    #[test]
    fn capability_body_encodes_size_and_offsets() {
        let (t, _) = table(4);
        let b = t.capability_body(0, 0x4000, 0x5000);
        assert_eq!(u16::from_le_bytes([b[0], b[1]]), 3);
        assert_eq!(u32::from_le_bytes(b[2..6].try_into().unwrap()), 0x4000);
        assert_eq!(u32::from_le_bytes(b[6..10].try_into().unwrap()), 0x5000);
        assert_eq!(t.pba_size(), 8);
        assert_eq!(t.table_size(), 64);
    }
}
