//! A 16550A UART: vm-superio's register model behind the bus, raising its IRQ through an
//! eventfd (registered as an irqfd), with host input fed from the event loop.
//!
//! Input flow control: the event loop only reads the host side while the UART's 64-byte FIFO
//! has room; when the guest drains the FIFO, vm-superio's `in_buffer_empty` event wakes the
//! loop through `buffer_ready` to read more. Host input is never dropped.

use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{error, warn};
use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;
use crate::devices::host_input::HostInput;
use crate::devices::metrics::DeviceMetrics;

/// 16550A register names by offset, for the exit accounting.
pub fn register_name(offset: u64) -> &'static str {
    match offset {
        0 => "rbr/thr",
        1 => "ier",
        2 => "iir/fcr",
        3 => "lcr",
        4 => "mcr",
        5 => "lsr",
        6 => "msr",
        7 => "scr",
        _ => "",
    }
}

/// Raises an interrupt by writing to an eventfd that KVM watches as an irqfd.
#[derive(Debug)]
pub struct EventFdTrigger {
    evt: EventFd,
    metrics: Arc<DeviceMetrics>,
}

impl EventFdTrigger {
    pub fn new(evt: EventFd, metrics: Arc<DeviceMetrics>) -> Self {
        Self { evt, metrics }
    }

    fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            evt: self.evt.try_clone()?,
            metrics: self.metrics.clone(),
        })
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.metrics.add_interrupt();
        self.evt.write(1)
    }
}

/// Counts the bytes the guest moves, and signals the event loop when the guest has emptied
/// the receive FIFO.
#[derive(Debug)]
pub struct SerialEventsNotifier {
    buffer_ready: EventFd,
    metrics: Arc<DeviceMetrics>,
}

impl SerialEventsNotifier {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            buffer_ready: self.buffer_ready.try_clone()?,
            metrics: self.metrics.clone(),
        })
    }
}

impl SerialEvents for SerialEventsNotifier {
    fn buffer_read(&self) {
        self.metrics.add_bytes_to_guest(1);
    }
    fn out_byte(&self) {
        self.metrics.add_bytes_from_guest(1);
    }
    fn tx_lost_byte(&self) {
        warn!("serial: lost an output byte (the output backend failed)");
    }
    fn in_buffer_empty(&self) {
        if let Err(e) = self.buffer_ready.write(1) {
            error!("serial: failed to signal an empty input buffer: {e}");
        }
    }
}

/// The UART as a bus device.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, SerialEventsNotifier, Box<dyn Write + Send>>,
    /// The interrupt enable, line control and modem control registers as the guest last
    /// wrote them.
    ier: u8,
    lcr: u8,
    mcr: u8,
}

const IER_OFFSET: u64 = 1;
const IER_RDI: u8 = 0x01;
const LCR_OFFSET: u64 = 3;
/// With LCR.DLAB set, offset 1 is the divisor latch, not IER.
const LCR_DLAB: u8 = 0x80;
const MCR_OFFSET: u64 = 4;
/// MCR.OUT2 gates the UART's interrupt line on a PC: set while a driver has the port open.
const MCR_OUT2: u8 = 0x08;
/// MCR.LOOP: loopback, where the receiver sees the transmitter, not the line.
const MCR_LOOP: u8 = 0x10;

/// A UART's state for snapshots: vm-superio's registers and receive FIFO, and what the
/// wrapper tracks of the guest's writes.
#[derive(serde::Serialize, serde::Deserialize)]
struct SerialSnapshot {
    regs: [u8; 9],
    in_buffer: Vec<u8>,
    ier: u8,
    lcr: u8,
    mcr: u8,
}

impl crate::devices::Persist for SerialDevice {
    fn save(&mut self) -> Result<serde_json::Value, String> {
        let st = self.serial.state();
        crate::devices::to_state(&SerialSnapshot {
            regs: [
                st.baud_divisor_low,
                st.baud_divisor_high,
                st.interrupt_enable,
                st.interrupt_identification,
                st.line_control,
                st.line_status,
                st.modem_control,
                st.modem_status,
                st.scratch,
            ],
            in_buffer: st.in_buffer,
            ier: self.ier,
            lcr: self.lcr,
            mcr: self.mcr,
        })
    }

    fn restore(&mut self, v: &serde_json::Value) -> Result<(), String> {
        let s: SerialSnapshot = crate::devices::from_state(v)?;
        let r = s.regs;
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: s.in_buffer,
        };
        // vm-superio rebuilds a UART from a state; the wrapper keeps its eventfds and output.
        let trigger = self
            .serial
            .interrupt_evt()
            .try_clone()
            .map_err(|e| e.to_string())?;
        let events = self
            .serial
            .events()
            .try_clone()
            .map_err(|e| e.to_string())?;
        let placeholder = Serial::with_events(
            trigger.try_clone().map_err(|e| e.to_string())?,
            events.try_clone().map_err(|e| e.to_string())?,
            Box::new(io::sink()) as Box<dyn Write + Send>,
        );
        let out = std::mem::replace(&mut self.serial, placeholder).into_writer();
        self.serial = Serial::from_state(&state, trigger, events, out)
            .map_err(|e| format!("vm-superio refused the UART state: {e:?}"))?;
        self.ier = s.ier;
        self.lcr = s.lcr;
        self.mcr = s.mcr;
        Ok(())
    }
}

impl SerialDevice {
    /// A UART raising `irq_evt` and writing guest output to `out`, counting into `metrics`.
    pub fn new(
        irq_evt: EventFd,
        out: Box<dyn Write + Send>,
        metrics: Arc<DeviceMetrics>,
    ) -> io::Result<Self> {
        let buffer_ready = EventFd::new(libc::EFD_NONBLOCK)?;
        Ok(Self {
            serial: Serial::with_events(
                EventFdTrigger::new(irq_evt, metrics.clone()),
                SerialEventsNotifier {
                    buffer_ready,
                    metrics,
                },
                out,
            ),
            ier: 0,
            lcr: 0,
            mcr: 0,
        })
    }

    /// Whether the guest is ready to receive: its driver has the receive interrupt enabled
    /// and routed (MCR.OUT2), outside loopback. Linux's 8250 driver does that only once a
    /// tty has the port open; before, it probes the chip (IER set to 0x0f for a moment, then
    /// the receive register read to clear it) and drains the receive register while it
    /// starts the port. Host input is held back until then (and while the console code
    /// masks interrupts to print), so bytes piped in during boot reach the reader instead of
    /// being thrown away by a probe.
    pub fn is_receiving(&self) -> bool {
        self.ier & IER_RDI != 0 && self.mcr & (MCR_OUT2 | MCR_LOOP) == MCR_OUT2
    }

    /// How many input bytes the guest can take now.
    pub fn input_room(&self) -> usize {
        if self.is_receiving() {
            self.serial.fifo_capacity()
        } else {
            0
        }
    }

    /// The eventfd that fires when the receive FIFO has been drained by the guest.
    pub fn buffer_ready_evt(&self) -> io::Result<EventFd> {
        self.serial.events().buffer_ready.try_clone()
    }

    /// Room left in the receive FIFO.
    pub fn fifo_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// Queues host input for the guest; returns how many bytes fit.
    pub fn enqueue(&mut self, bytes: &[u8]) -> usize {
        match self.serial.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                warn!("serial: failed to queue input: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            warn!(
                "serial: {}-byte read at offset {offset} ignored",
                data.len()
            );
            data.fill(0xff);
            return;
        }
        data[0] = self.serial.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            warn!(
                "serial: {}-byte write at offset {offset} ignored",
                data.len()
            );
            return;
        }
        let was_receiving = self.is_receiving();
        match offset {
            IER_OFFSET if self.lcr & LCR_DLAB == 0 => self.ier = data[0],
            LCR_OFFSET => self.lcr = data[0],
            MCR_OFFSET => self.mcr = data[0],
            _ => {}
        }
        if !was_receiving && self.is_receiving() {
            // Wake the event loop so held-back input starts flowing.
            self.serial.events().in_buffer_empty();
        }
        if let Err(e) = self.serial.write(offset as u8, data[0]) {
            warn!("serial: write to register {offset} failed: {e:?}");
        }
    }
}

const EVT_INPUT: u32 = 0;
const EVT_BUFFER_READY: u32 = 1;

/// Event-loop side of a serial port: moves host input into the UART.
pub struct SerialInputHandler {
    device: Arc<Mutex<SerialDevice>>,
    input: Box<dyn HostInput>,
    buffer_ready: EventFd,
    /// Input is registered with the event loop (false while the FIFO is full or after EOF).
    polling_input: bool,
    eof: bool,
}

impl SerialInputHandler {
    pub fn new(device: Arc<Mutex<SerialDevice>>, input: Box<dyn HostInput>) -> io::Result<Self> {
        let buffer_ready = lock(&device).buffer_ready_evt()?;
        Ok(Self {
            device,
            input,
            buffer_ready,
            polling_input: false,
            eof: false,
        })
    }

    fn input_fd(&self) -> RawFd {
        self.input.as_raw_fd()
    }

    /// Moves as much input as the FIFO takes; returns false when the FIFO is full.
    fn pump_input(&mut self) -> bool {
        let mut dev = lock(&self.device);
        let room = dev.input_room();
        if room == 0 {
            return false;
        }
        let mut buf = [0u8; 64];
        match self.input.read(&mut buf[..room.min(64)]) {
            Ok(0) => {
                self.eof = true;
                true
            }
            Ok(n) => {
                let queued = dev.enqueue(&buf[..n]);
                debug_assert_eq!(queued, n, "read no more than the FIFO's room");
                dev.input_room() > 0
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                true
            }
            Err(e) => {
                warn!("serial: reading input failed, input disabled: {e}");
                self.eof = true;
                true
            }
        }
    }

    fn set_input_polling(&mut self, ops: &mut EventOps, on: bool) {
        if on == self.polling_input {
            return;
        }
        let ev = Events::with_data_raw(self.input_fd(), EVT_INPUT, EventSet::IN);
        let res = if on { ops.add(ev) } else { ops.remove(ev) };
        match res {
            Ok(()) => self.polling_input = on,
            Err(e) => error!(
                "serial: failed to {} input polling: {e:?}",
                if on { "start" } else { "stop" }
            ),
        }
    }
}

impl MutEventSubscriber for SerialInputHandler {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.buffer_ready,
            EVT_BUFFER_READY,
            EventSet::IN,
        )) {
            error!("serial: failed to register the buffer-ready event: {e:?}");
        }
        self.set_input_polling(ops, true);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            EVT_INPUT => {
                let has_room = if events.event_set().contains(EventSet::IN) {
                    self.pump_input()
                } else {
                    // HUP/ERR without data: the input side is gone.
                    self.eof = true;
                    true
                };
                if self.eof || !has_room {
                    self.set_input_polling(ops, false);
                }
            }
            EVT_BUFFER_READY => {
                let _ = self.buffer_ready.read();
                if !self.eof {
                    self.set_input_polling(ops, true);
                }
            }
            other => warn!("serial: unexpected event data {other}"),
        }
    }
}

fn lock(dev: &Arc<Mutex<SerialDevice>>) -> std::sync::MutexGuard<'_, SerialDevice> {
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output sink the test can inspect after the device owns it.
    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const DATA: u64 = 0;
    const IIR: u64 = 2;
    const LSR: u64 = 5;
    const LSR_DATA_READY: u8 = 1;
    const LSR_THR_EMPTY: u8 = 0x20;

    fn device() -> (SerialDevice, EventFd, SharedBuf) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = SharedBuf::default();
        let dev = SerialDevice::new(
            irq.try_clone().unwrap(),
            Box::new(out.clone()),
            DeviceMetrics::unnamed(),
        )
        .unwrap();
        (dev, irq, out)
    }

    fn rd(dev: &mut SerialDevice, off: u64) -> u8 {
        let mut b = [0u8];
        dev.read(off, &mut b);
        b[0]
    }

    #[test]
    fn guest_output_reaches_backend() {
        let (mut dev, _irq, out) = device();
        for b in b"hello\n" {
            dev.write(DATA, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hello\n");
        assert_ne!(rd(&mut dev, LSR) & LSR_THR_EMPTY, 0);
    }

    #[test]
    fn thr_empty_interrupt_fires_when_enabled() {
        let (mut dev, irq, _out) = device();
        dev.write(IER_OFFSET, &[0x2]); // ETBEI
        assert_eq!(
            irq.read().unwrap(),
            1,
            "enabling THRE with an empty THR raises the IRQ"
        );
        assert_eq!(rd(&mut dev, IIR) & 0xf, 0x2, "IIR says THR empty");
        dev.write(DATA, b"x");
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(rd(&mut dev, IIR) & 0xf, 0x2, "IIR says THR empty");
    }

    #[test]
    fn input_is_queued_and_read_back_with_irq() {
        let (mut dev, irq, _out) = device();
        dev.write(IER_OFFSET, &[0x1]); // ERBFI
        assert_eq!(dev.enqueue(b"ab"), 2);
        assert_eq!(irq.read().unwrap(), 1);
        assert_ne!(rd(&mut dev, LSR) & LSR_DATA_READY, 0);
        assert_eq!(rd(&mut dev, DATA), b'a');
        assert_eq!(rd(&mut dev, DATA), b'b');
        assert_eq!(rd(&mut dev, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn fifo_fills_and_drain_signals_buffer_ready() {
        let (mut dev, _irq, _out) = device();
        let ready = dev.buffer_ready_evt().unwrap();
        let big = [b'z'; 100];
        assert_eq!(dev.enqueue(&big), 64);
        assert_eq!(dev.fifo_capacity(), 0);
        assert_eq!(dev.enqueue(&big), 0);
        for _ in 0..64 {
            assert_eq!(rd(&mut dev, DATA), b'z');
        }
        assert_eq!(ready.read().unwrap(), 1);
    }

    #[test]
    fn wide_accesses_are_ignored() {
        let (mut dev, _irq, out) = device();
        dev.write(DATA, b"ab");
        assert!(out.0.lock().unwrap().is_empty());
        let mut b = [0u8; 2];
        dev.read(LSR, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }

    #[test]
    fn divisor_latch_writes_do_not_count_as_ier() {
        let (mut dev, _irq, _out) = device();
        dev.write(MCR_OFFSET, &[MCR_OUT2]);
        dev.write(LCR_OFFSET, &[LCR_DLAB | 0x03]);
        dev.write(IER_OFFSET, &[0x01]); // divisor high byte
        assert!(!dev.is_receiving());
        dev.write(LCR_OFFSET, &[0x03]);
        dev.write(IER_OFFSET, &[0x01]);
        assert!(dev.is_receiving());
    }

    /// What Linux's 8250 driver does when a tty opens the port: DTR, RTS and OUT2, then the
    /// receive interrupt.
    fn open_port(dev: &mut SerialDevice) {
        dev.write(MCR_OFFSET, &[0x0b]);
        dev.write(IER_OFFSET, &[IER_RDI | 0x04]);
    }

    #[test]
    fn input_waits_through_the_drivers_probe() {
        let (mut dev, _irq, _out) = device();
        // 8250 autoconfig: the IER existence test, then loopback with OUT2 set.
        dev.write(IER_OFFSET, &[0x0f]);
        assert!(
            !dev.is_receiving(),
            "IER alone is the probe, not an open port"
        );
        dev.write(IER_OFFSET, &[0]);
        dev.write(MCR_OFFSET, &[MCR_LOOP | 0x0a]);
        dev.write(IER_OFFSET, &[0x0f]);
        assert!(!dev.is_receiving(), "loopback is not the line");
        dev.write(IER_OFFSET, &[0]);
        dev.write(MCR_OFFSET, &[0]);
        open_port(&mut dev);
        assert!(dev.is_receiving());
        assert_eq!(dev.input_room(), 64);
        // The tty closed: OUT2 and the interrupts go off again.
        dev.write(IER_OFFSET, &[0]);
        dev.write(MCR_OFFSET, &[0]);
        assert_eq!(dev.input_room(), 0);
    }

    #[test]
    fn input_waits_until_the_guest_opens_the_port() {
        let (dev, _irq, _out) = device();
        let ready = dev.buffer_ready_evt().unwrap();
        let dev = Arc::new(Mutex::new(dev));
        let (r, mut w) = std::io::pipe().unwrap();
        w.write_all(b"early").unwrap();
        let mut h = SerialInputHandler::new(dev.clone(), Box::new(r)).unwrap();
        assert!(
            !h.pump_input(),
            "no room while the receive interrupt is off"
        );
        assert_eq!(lock(&dev).fifo_capacity(), 64, "nothing queued");
        open_port(&mut lock(&dev));
        assert_eq!(
            ready.read().unwrap(),
            1,
            "opening the port wakes the input side"
        );
        assert!(h.pump_input());
        for b in b"early" {
            assert_eq!(rd(&mut lock(&dev), DATA), *b);
        }
    }

    #[test]
    fn input_handler_respects_fifo_room() {
        let (mut dev, _irq, _out) = device();
        open_port(&mut dev);
        let dev = Arc::new(Mutex::new(dev));
        let (r, mut w) = std::io::pipe().unwrap();
        w.write_all(&[b'q'; 100]).unwrap();
        drop(w);
        let mut h = SerialInputHandler::new(dev.clone(), Box::new(r)).unwrap();
        assert!(!h.pump_input(), "the FIFO is full after one read");
        assert_eq!(lock(&dev).fifo_capacity(), 0, "filled exactly to 64 bytes");
        for _ in 0..64 {
            assert_eq!(rd(&mut lock(&dev), DATA), b'q');
        }
        // Nothing was lost: the other 36 bytes were left in the pipe.
        assert!(h.pump_input());
        assert_eq!(lock(&dev).fifo_capacity(), 64 - 36);
        assert!(!h.eof);
        h.pump_input();
        assert!(h.eof, "EOF seen once the pipe is drained");
    }
}
