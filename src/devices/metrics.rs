//! Per-device accounting: the VM exits a device caused (by address space, register and
//! direction), the queue notifications KVM handled in the kernel for it, the interrupts it
//! raised, the bytes it moved and the time its handlers took.
//!
//! The counts are what explain the gap between the emulated and the paravirtual model of a
//! device class, so they are taken where the events happen and never estimated: exits in
//! the bus dispatch (one `KVM_EXIT_IO`/`KVM_EXIT_MMIO` is one exit, even a `rep insw` that
//! moves a whole sector), notifications from the ioeventfd counters, interrupts where a
//! device signals its irqfd, bytes where a request completes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};

/// Which address space an exit came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Space {
    Pio,
    Mmio,
}

impl Space {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pio => "pio",
            Self::Mmio => "mmio",
        }
    }
}

/// Names a register from its offset in the device's range, for the report.
pub type RegisterNames = fn(u64) -> &'static str;

fn no_names(_: u64) -> &'static str {
    ""
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RegisterCount {
    pub reads: u64,
    pub writes: u64,
}

/// The counters of one device.
#[derive(Debug)]
pub struct DeviceMetrics {
    /// What the guest calls it, e.g. `vda`, `eth0`, `ttyS1`, `ide0`.
    pub name: String,
    /// The device model: `virtio-blk`, `ide`, `virtio-net`, `ne2k`, `e1000`, `uart`,
    /// `virtio-console`.
    pub model: &'static str,
    /// The device class the bench compares models within: `block`, `net`, `stream`, `system`.
    pub class: &'static str,
    register_names: RegisterNames,
    /// Register blocks named apart from the device's base (an I/O BAR next to a memory
    /// BAR, a bus master block): (space, base, length, names).
    register_ranges: Vec<(Space, u64, u64, RegisterNames)>,
    /// (space, absolute address) -> accesses. Under a mutex: the bus already serializes
    /// accesses to one device, so this lock is never contended on the exit path.
    registers: Mutex<BTreeMap<(Space, u64), RegisterCount>>,
    exits: AtomicU64,
    notifications: AtomicU64,
    coalesced: AtomicU64,
    interrupts: AtomicU64,
    bytes_to_guest: AtomicU64,
    bytes_from_guest: AtomicU64,
    vcpu_ns: AtomicU64,
    event_loop_ns: AtomicU64,
}

impl DeviceMetrics {
    pub fn new(name: impl Into<String>, model: &'static str, class: &'static str) -> Self {
        Self {
            name: name.into(),
            model,
            class,
            register_names: no_names,
            register_ranges: Vec::new(),
            registers: Mutex::new(BTreeMap::new()),
            exits: AtomicU64::new(0),
            notifications: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            interrupts: AtomicU64::new(0),
            bytes_to_guest: AtomicU64::new(0),
            bytes_from_guest: AtomicU64::new(0),
            vcpu_ns: AtomicU64::new(0),
            event_loop_ns: AtomicU64::new(0),
        }
    }

    /// Names registers in the report with `names(offset)`.
    pub fn with_register_names(mut self, names: RegisterNames) -> Self {
        self.register_names = names;
        self
    }

    /// Names the registers of `[base, base + len)` in `space` with `names(offset)`, the
    /// offset counted from `base`.
    pub fn with_register_range(
        mut self,
        space: Space,
        base: u64,
        len: u64,
        names: RegisterNames,
    ) -> Self {
        self.register_ranges.push((space, base, len, names));
        self
    }

    /// The name of the register at `addr`, the device's registers starting at `base`.
    fn register_name(&self, space: Space, addr: u64, base: u64) -> &'static str {
        self.register_ranges
            .iter()
            .find(|(s, b, len, _)| *s == space && addr >= *b && addr - *b < *len)
            .map(|(_, b, _, names)| names(addr - b))
            .unwrap_or_else(|| (self.register_names)(addr.wrapping_sub(base)))
    }

    /// Counters that belong to no device in particular (tests, unnamed helpers).
    pub fn unnamed() -> Arc<Self> {
        Arc::new(Self::new("", "", ""))
    }

    /// One exit to userspace on `addr` (`offset` into the device), handled in `took`.
    pub fn record_exit(&self, space: Space, addr: u64, write: bool, took: Duration) {
        self.exits.fetch_add(1, Ordering::Relaxed);
        self.vcpu_ns
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        let mut regs = self.registers.lock().unwrap_or_else(|p| p.into_inner());
        let c = regs.entry((space, addr)).or_default();
        if write {
            c.writes += 1;
        } else {
            c.reads += 1;
        }
    }

    /// Guest notifications KVM turned into eventfd signals without an exit to userspace.
    pub fn add_notifications(&self, n: u64) {
        self.notifications.fetch_add(n, Ordering::Relaxed);
    }

    /// A write KVM recorded in the coalesced ring (no exit to userspace), applied now.
    pub fn add_coalesced(&self) {
        self.coalesced.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add_interrupt(&self) {
        self.interrupts.fetch_add(1, Ordering::Relaxed);
    }

    /// Payload moved into the guest (disk reads, received frames, console input).
    pub fn add_bytes_to_guest(&self, n: u64) {
        self.bytes_to_guest.fetch_add(n, Ordering::Relaxed);
    }

    /// Payload moved out of the guest (disk writes, sent frames, console output).
    pub fn add_bytes_from_guest(&self, n: u64) {
        self.bytes_from_guest.fetch_add(n, Ordering::Relaxed);
    }

    /// Time the event loop spent on this device's behalf.
    pub fn add_event_loop_time(&self, took: Duration) {
        self.event_loop_ns
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn exits(&self) -> u64 {
        self.exits.load(Ordering::Relaxed)
    }
    pub fn notifications(&self) -> u64 {
        self.notifications.load(Ordering::Relaxed)
    }
    pub fn coalesced(&self) -> u64 {
        self.coalesced.load(Ordering::Relaxed)
    }
    pub fn interrupts(&self) -> u64 {
        self.interrupts.load(Ordering::Relaxed)
    }
    pub fn bytes_to_guest(&self) -> u64 {
        self.bytes_to_guest.load(Ordering::Relaxed)
    }
    pub fn bytes_from_guest(&self) -> u64 {
        self.bytes_from_guest.load(Ordering::Relaxed)
    }

    /// Accesses per register so far.
    pub fn registers(&self) -> BTreeMap<(Space, u64), RegisterCount> {
        self.registers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn write_json(&self, out: &mut String, base: u64) {
        let _ = write!(
            out,
            "{{\"name\":{},\"model\":{},\"class\":{},\"exits\":{},\"notifications\":{},\
             \"coalesced\":{},\"interrupts\":{},\"bytes_to_guest\":{},\"bytes_from_guest\":{},\
             \"vcpu_handling_ns\":{},\"event_loop_ns\":{},\"registers\":[",
            json_str(&self.name),
            json_str(self.model),
            json_str(self.class),
            self.exits(),
            self.notifications(),
            self.coalesced(),
            self.interrupts(),
            self.bytes_to_guest(),
            self.bytes_from_guest(),
            self.vcpu_ns.load(Ordering::Relaxed),
            self.event_loop_ns.load(Ordering::Relaxed),
        );
        for (i, ((space, addr), c)) in self.registers().iter().enumerate() {
            let name = self.register_name(*space, *addr, base);
            let _ = write!(
                out,
                "{}{{\"space\":\"{}\",\"address\":\"{addr:#x}\",\"register\":{},\
                 \"reads\":{},\"writes\":{}}}",
                if i > 0 { "," } else { "" },
                space.as_str(),
                json_str(name),
                c.reads,
                c.writes
            );
        }
        out.push_str("]}");
    }
}

/// `s` as a JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// An event-loop handler whose time is charged to a device.
pub struct Metered<T> {
    inner: Arc<Mutex<T>>,
    metrics: Arc<DeviceMetrics>,
}

impl<T> Metered<T> {
    pub fn new(inner: Arc<Mutex<T>>, metrics: Arc<DeviceMetrics>) -> Self {
        Self { inner, metrics }
    }
}

impl<T: MutEventSubscriber> MutEventSubscriber for Metered<T> {
    fn init(&mut self, ops: &mut EventOps) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let start = Instant::now();
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .process(events, ops);
        self.metrics.add_event_loop_time(start.elapsed());
    }
}

/// Produces a JSON value for the report when it is written (KVM's own counters).
pub type ReportSource = Box<dyn Fn() -> String + Send>;

/// Every device's counters, in attach order.
pub struct MetricsRegistry {
    start: Instant,
    /// (counters, base address of the device's registers for naming them).
    devices: Vec<(Arc<DeviceMetrics>, u64)>,
    /// The report's `kvm` object: KVM's counters of every exit, read when written.
    kvm: Option<ReportSource>,
    /// The crash report as a JSON object, once the guest crashed, under this key (`crash`,
    /// or `stop` for the report of a guest stopped from outside).
    crash: Option<(&'static str, String)>,
}

impl Default for MetricsRegistry {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            devices: Vec::new(),
            kvm: None,
            crash: None,
        }
    }
}

impl MetricsRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a device whose registers start at `base`; returns the shared counters.
    pub fn add(&mut self, metrics: DeviceMetrics, base: u64) -> Arc<DeviceMetrics> {
        let m = Arc::new(metrics);
        self.devices.push((m.clone(), base));
        m
    }

    /// Adds a top-level `kvm` object to the report, `source` giving it when written.
    pub fn set_kvm_report(&mut self, source: ReportSource) {
        self.kvm = Some(source);
    }

    pub fn devices(&self) -> impl Iterator<Item = &Arc<DeviceMetrics>> {
        self.devices.iter().map(|(m, _)| m)
    }

    /// Adds the crash report (a JSON object) to the report, as `crash`.
    pub fn set_crash(&mut self, json: String) {
        self.crash = Some(("crash", json));
    }

    /// Adds the report of a guest stopped from outside (a JSON object), as `stop`.
    pub fn set_stop(&mut self, json: String) {
        self.crash = Some(("stop", json));
    }

    /// The report: `{"uptime_ns": N, "devices": [...], "kvm": {...}}` (`kvm` once the VM
    /// has vCPUs), and `"crash": {...}` after a guest crash, `"stop": {...}` when a signal
    /// or the time limit stopped the guest.
    pub fn to_json(&self) -> String {
        let mut out = format!(
            "{{\"uptime_ns\":{},\"devices\":[",
            self.start.elapsed().as_nanos()
        );
        for (i, (m, base)) in self.devices.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            m.write_json(&mut out, *base);
        }
        out.push(']');
        if let Some(kvm) = &self.kvm {
            let _ = write!(out, ",\"kvm\":{}", kvm());
        }
        if let Some((key, report)) = &self.crash {
            let _ = write!(out, ",\"{key}\":{report}");
        }
        out.push_str("}\n");
        out
    }

    /// Writes the report to `path` atomically (a reader never sees half a file).
    pub fn write_to(&self, path: &Path) -> std::io::Result<()> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::write(&tmp, self.to_json())?;
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_report_has_every_counter() {
        let mut reg = MetricsRegistry::new();
        let names: RegisterNames = |off| if off == 0 { "data" } else { "" };
        let m = reg.add(
            DeviceMetrics::new("ide0 \"x\"", "ide", "block").with_register_names(names),
            0x1f0,
        );
        m.record_exit(Space::Pio, 0x1f0, false, Duration::from_nanos(10));
        m.record_exit(Space::Pio, 0x1f0, true, Duration::from_nanos(5));
        m.record_exit(Space::Pio, 0x1f7, false, Duration::from_nanos(1));
        m.add_interrupt();
        m.add_bytes_to_guest(512);
        m.add_notifications(3);
        let json = reg.to_json();
        assert!(json.contains("\"name\":\"ide0 \\\"x\\\"\""), "{json}");
        assert!(json.contains("\"exits\":3,\"notifications\":3,\"coalesced\":0,\"interrupts\":1,\"bytes_to_guest\":512,\"bytes_from_guest\":0,\"vcpu_handling_ns\":16"), "{json}");
        assert!(json.contains("{\"space\":\"pio\",\"address\":\"0x1f0\",\"register\":\"data\",\"reads\":1,\"writes\":1}"), "{json}");
        assert!(json.contains("{\"space\":\"pio\",\"address\":\"0x1f7\",\"register\":\"\",\"reads\":1,\"writes\":0}"), "{json}");
    }

    #[test]
    fn register_ranges_name_blocks_apart_from_the_base() {
        let mut reg = MetricsRegistry::new();
        let mmio: RegisterNames = |off| if off == 0xc0 { "icr" } else { "" };
        let io: RegisterNames = |off| if off == 4 { "iodata" } else { "" };
        let m = reg.add(
            DeviceMetrics::new("eth0", "e1000", "net")
                .with_register_names(mmio)
                .with_register_range(Space::Pio, 0xc100, 0x40, io),
            0xc000_0000,
        );
        m.record_exit(Space::Mmio, 0xc000_00c0, false, Duration::ZERO);
        m.record_exit(Space::Pio, 0xc104, true, Duration::ZERO);
        // A port below the range is not named by it.
        m.record_exit(Space::Pio, 0xc0c0, false, Duration::ZERO);
        let json = reg.to_json();
        assert!(
            json.contains("\"address\":\"0xc00000c0\",\"register\":\"icr\""),
            "{json}"
        );
        assert!(
            json.contains("\"address\":\"0xc104\",\"register\":\"iodata\""),
            "{json}"
        );
        assert!(
            json.contains("\"address\":\"0xc0c0\",\"register\":\"\""),
            "{json}"
        );
    }

    #[test]
    fn the_kvm_object_is_read_when_the_report_is_written() {
        let mut reg = MetricsRegistry::new();
        assert!(!reg.to_json().contains("\"kvm\""));
        let n = Arc::new(AtomicU64::new(5));
        let src = n.clone();
        reg.set_kvm_report(Box::new(move || {
            format!(
                "{{\"counters\":{{\"exits\":{}}}}}",
                src.load(Ordering::Relaxed)
            )
        }));
        assert!(reg
            .to_json()
            .ends_with(",\"kvm\":{\"counters\":{\"exits\":5}}}\n"));
        n.store(7, Ordering::Relaxed);
        assert!(reg.to_json().contains("\"exits\":7"));
    }

    #[test]
    fn report_file_is_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("ferrovm-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.json");
        let mut reg = MetricsRegistry::new();
        reg.add(DeviceMetrics::new("ttyS0", "uart", "stream"), 0x3f8);
        reg.write_to(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("{\"uptime_ns\":"));
        assert!(!dir.join("m.json.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
