//! A multiport virtio-console (virtio 1.x, 5.3 with VIRTIO_CONSOLE_F_MULTIPORT): named
//! generic ports, the guest's `/dev/vportNpM` (its name in
//! `/sys/class/virtio-ports/vportNpM/name`), as QEMU's `virtserialport` gives them.
//!
//! `ferrovm exec` carries CMD's stdin, stdout, stderr and exit status over these ports.
//! Ports are not terminals, so the bytes pass untouched; and a port has a host side the
//! device can close (a PORT_OPEN control message with value 0), after which the guest's
//! reads return end-of-file once the data already delivered is read: that is how the end of
//! the host's stdin reaches CMD.
//!
//! Control messages (5.3.6.2): the driver sends DEVICE_READY, the device answers one
//! DEVICE_ADD per port; the driver sends PORT_READY per port, the device answers PORT_OPEN
//! (host side connected) and then PORT_NAME, in that order so that once the guest sees the
//! name the port is already open on the host side (a read before that would see
//! end-of-file). The driver sends PORT_OPEN when a guest process opens or closes the port:
//! host input is only read while the guest has the port open, because the driver discards
//! data that arrives for a closed port.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, error, warn};
use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::console::{gather, scatter, VIRTIO_ID_CONSOLE};
use super::device::{
    read_chain, take_notifications, ActivateError, Activation, DeviceState, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use super::guest_write::ChainWrites;
use crate::devices::host_input::HostInput;
use crate::devices::metrics::DeviceMetrics;

/// The feature that gives the console several ports and the control queues.
const VIRTIO_CONSOLE_F_MULTIPORT: u64 = 1 << 1;
const QUEUE_SIZE: u16 = 128;
/// The control queues: receive (device to driver) and transmit (driver to device).
const CTRL_RX: usize = 2;
const CTRL_TX: usize = 3;

// Control events (5.3.6.2).
const DEVICE_READY: u16 = 0;
const DEVICE_ADD: u16 = 1;
const PORT_READY: u16 = 3;
const PORT_OPEN: u16 = 6;
const PORT_NAME: u16 = 7;

/// Most ports: queue indices must fit the event data space below.
pub const MAX_PORTS: usize = 16;

/// One port as configured.
pub struct PortConfig {
    pub name: String,
    /// Where what the guest writes goes (dropped if None).
    pub output: Option<Box<dyn Write + Send>>,
    /// What the guest reads; its end closes the port's host side.
    pub input: Option<Box<dyn HostInput>>,
}

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum PortsError {
    #[error("Failed to create an eventfd for the virtio-console ports")]
    EventFd(#[source] io::Error),
    #[error("A multiport console takes 1 to {MAX_PORTS} ports, not {0}")]
    Count(usize),
}

struct Port {
    cfg: PortConfig,
    /// A guest process has the port open (PORT_OPEN from the driver).
    guest_open: bool,
    input_watched: bool,
    input_eof: bool,
}

/// The device.
pub struct VirtioPorts {
    ports: Vec<Port>,
    queue_sizes: Vec<u16>,
    queue_evts: Vec<EventFd>,
    activate_evt: EventFd,
    state: Option<DeviceState>,
    /// Control messages waiting for a driver buffer on the control receive queue.
    ctrl_out: VecDeque<Vec<u8>>,
    queues_watched: bool,
    metrics: Arc<DeviceMetrics>,
}

/// The receive and transmit queues of port `p` (5.3.2: port 0 at 0/1, the control queues
/// at 2/3, port N at 2+2N/3+2N).
fn port_queues(p: usize) -> (usize, usize) {
    let rx = if p == 0 { 0 } else { 2 + 2 * p };
    (rx, rx + 1)
}

/// `struct virtio_console_control { le32 id; le16 event; le16 value; }`, then any payload.
fn control(id: u32, event: u16, value: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(8 + payload.len());
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(&event.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    m.extend_from_slice(payload);
    m
}

impl VirtioPorts {
    pub fn new(ports: Vec<PortConfig>) -> Result<Self, PortsError> {
        if ports.is_empty() || ports.len() > MAX_PORTS {
            return Err(PortsError::Count(ports.len()));
        }
        let nqueues = (ports.len() + 1) * 2;
        let queue_evts = (0..nqueues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(PortsError::EventFd))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            ports: ports
                .into_iter()
                .map(|cfg| Port {
                    cfg,
                    guest_open: false,
                    input_watched: false,
                    input_eof: false,
                })
                .collect(),
            queue_sizes: vec![QUEUE_SIZE; nqueues],
            queue_evts,
            activate_evt: EventFd::new(libc::EFD_NONBLOCK).map_err(PortsError::EventFd)?,
            state: None,
            ctrl_out: VecDeque::new(),
            queues_watched: false,
            metrics: DeviceMetrics::unnamed(),
        })
    }

    /// Handles the driver's control messages.
    pub(crate) fn process_ctrl_tx(&mut self, ops: &mut EventOps) {
        let mut msgs = Vec::new();
        {
            let Some(state) = self.state.as_mut() else {
                return;
            };
            let mut buf = Vec::new();
            while let Some(chain) = state.queues[CTRL_TX].pop_descriptor_chain(&state.mem) {
                let head = chain.head_index();
                buf.clear();
                match read_chain(chain, QUEUE_SIZE)
                    .map_err(|e| e.to_string())
                    .and_then(|d| gather(&d, &state.mem, &mut buf))
                {
                    Ok(()) if buf.len() >= 8 => msgs.push(buf.clone()),
                    Ok(()) => warn!("virtio-ports: short control message ({} bytes)", buf.len()),
                    Err(e) => warn!("virtio-ports: bad control chain: {e}"),
                }
                if let Err(e) =
                    state.writers[CTRL_TX].add_used_empty(&mut state.queues[CTRL_TX], head)
                {
                    error!("virtio-ports: cannot complete a control message: {e}");
                }
            }
            state.notify_if_needed(CTRL_TX);
        }
        for m in msgs {
            let id = u32::from_le_bytes([m[0], m[1], m[2], m[3]]);
            let event = u16::from_le_bytes([m[4], m[5]]);
            let value = u16::from_le_bytes([m[6], m[7]]);
            self.handle_control(id, event, value, ops);
        }
        self.flush_ctrl();
    }

    fn handle_control(&mut self, id: u32, event: u16, value: u16, ops: &mut EventOps) {
        debug!("virtio-ports: control id {id} event {event} value {value}");
        match event {
            DEVICE_READY if value == 1 => {
                for p in 0..self.ports.len() {
                    self.ctrl_out
                        .push_back(control(p as u32, DEVICE_ADD, 1, &[]));
                }
            }
            DEVICE_READY => warn!("virtio-ports: the driver failed to set up the device"),
            PORT_READY => {
                let Some(port) = self.ports.get(id as usize) else {
                    warn!("virtio-ports: PORT_READY for unknown port {id}");
                    return;
                };
                if value != 1 {
                    warn!(
                        "virtio-ports: the driver failed to add port {}",
                        port.cfg.name
                    );
                    return;
                }
                let name = port.cfg.name.clone().into_bytes();
                self.ctrl_out.push_back(control(id, PORT_OPEN, 1, &[]));
                self.ctrl_out.push_back(control(id, PORT_NAME, 1, &name));
            }
            PORT_OPEN => {
                let Some(port) = self.ports.get_mut(id as usize) else {
                    warn!("virtio-ports: PORT_OPEN for unknown port {id}");
                    return;
                };
                port.guest_open = value == 1;
                let open = port.guest_open;
                self.watch_input(id as usize, ops, open);
            }
            other => warn!("virtio-ports: unexpected control event {other} for port {id}"),
        }
    }

    /// Moves pending control messages into the driver's control receive buffers.
    fn flush_ctrl(&mut self) {
        let Some(state) = self.state.as_mut() else {
            return;
        };
        let mut sent = false;
        while !self.ctrl_out.is_empty() {
            let Some(chain) = state.queues[CTRL_RX].pop_descriptor_chain(&state.mem) else {
                break;
            };
            let head = chain.head_index();
            let msg = self.ctrl_out.pop_front().unwrap_or_default();
            let result = match read_chain(chain, QUEUE_SIZE) {
                Ok(d) if d.iter().all(|d| d.is_write_only()) => {
                    let chain = ChainWrites::new(head, &d);
                    let len = scatter(&d, &state.writers[CTRL_RX].chain(&chain), &msg);
                    state.writers[CTRL_RX].add_used(&mut state.queues[CTRL_RX], chain, len as u32)
                }
                _ => {
                    warn!("virtio-ports: bad control receive chain");
                    self.ctrl_out.push_front(msg);
                    state.writers[CTRL_RX].add_used_empty(&mut state.queues[CTRL_RX], head)
                }
            };
            if let Err(e) = result {
                error!("virtio-ports: cannot complete a control buffer: {e}");
            }
            sent = true;
        }
        if sent {
            state.notify_if_needed(CTRL_RX);
        }
    }

    /// Writes what the guest sent on port `p`.
    pub(crate) fn process_tx(&mut self, p: usize) {
        let Some(state) = self.state.as_mut() else {
            return;
        };
        let (_, tx) = port_queues(p);
        let port = &mut self.ports[p];
        let mut buf = Vec::new();
        let mut completed = false;
        loop {
            let _ = state.writers[tx].disable_notification(&mut state.queues[tx]);
            let mut popped = 0;
            while let Some(chain) = state.queues[tx].pop_descriptor_chain(&state.mem) {
                popped += 1;
                let head = chain.head_index();
                buf.clear();
                match read_chain(chain, QUEUE_SIZE)
                    .map_err(|e| e.to_string())
                    .and_then(|d| gather(&d, &state.mem, &mut buf))
                {
                    Ok(()) => {
                        self.metrics.add_bytes_from_guest(buf.len() as u64);
                        if let Some(out) = port.cfg.output.as_mut() {
                            if let Err(e) = out.write_all(&buf).and_then(|_| out.flush()) {
                                warn!(
                                    "virtio-ports: port {}: output failed, {} bytes lost: {e}",
                                    port.cfg.name,
                                    buf.len()
                                );
                            }
                        }
                    }
                    Err(e) => warn!("virtio-ports: port {}: bad chain: {e}", port.cfg.name),
                }
                if let Err(e) = state.writers[tx].add_used_empty(&mut state.queues[tx], head) {
                    error!("virtio-ports: cannot complete a transmit chain: {e}");
                }
                completed = true;
            }
            match state.writers[tx].enable_notification(&mut state.queues[tx]) {
                Ok(true) if popped > 0 => continue,
                _ => break,
            }
        }
        if completed {
            state.notify_if_needed(tx);
        }
    }

    /// Every port's pending output, written now (before the VM is torn down).
    pub fn drain_output(&mut self) {
        for p in 0..self.ports.len() {
            self.process_tx(p);
        }
    }

    /// Moves one read of port `p`'s host input into a posted receive buffer; returns
    /// whether to keep watching the input. At the input's end the host side is closed.
    pub(crate) fn process_rx(&mut self, p: usize) -> bool {
        let Some(state) = self.state.as_mut() else {
            return false;
        };
        let (rx, _) = port_queues(p);
        let port = &mut self.ports[p];
        let Some(input) = port.cfg.input.as_mut() else {
            return false;
        };
        if port.input_eof || !port.guest_open {
            return false;
        }
        let Some(chain) = state.queues[rx].pop_descriptor_chain(&state.mem) else {
            return false;
        };
        let head = chain.head_index();
        let descs = match read_chain(chain, QUEUE_SIZE) {
            Ok(d) if d.iter().all(|d| d.is_write_only()) => d,
            _ => {
                warn!("virtio-ports: bad receive chain");
                let _ = state.writers[rx].add_used_empty(&mut state.queues[rx], head);
                state.notify_if_needed(rx);
                return true;
            }
        };
        let mut buf = [0u8; 4096];
        let room = descs
            .iter()
            .map(|d| d.len() as usize)
            .sum::<usize>()
            .min(buf.len());
        let n = match input.read(&mut buf[..room]) {
            Ok(n) => n,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                state.queues[rx].go_to_previous_position();
                return true;
            }
            Err(e) => {
                warn!("virtio-ports: port {}: input failed: {e}", port.cfg.name);
                0
            }
        };
        if n == 0 {
            state.queues[rx].go_to_previous_position();
            port.input_eof = true;
            // Everything read so far is in the guest's used ring, ahead of this message:
            // the guest reads it all, then end-of-file.
            self.ctrl_out
                .push_back(control(p as u32, PORT_OPEN, 0, &[]));
            self.flush_ctrl();
            return false;
        }
        let chain = ChainWrites::new(head, &descs);
        let written = scatter(&descs, &state.writers[rx].chain(&chain), &buf[..n]);
        self.metrics.add_bytes_to_guest(written as u64);
        if let Err(e) = state.writers[rx].add_used(&mut state.queues[rx], chain, written as u32) {
            error!("virtio-ports: cannot complete a receive buffer: {e}");
        }
        state.notify_if_needed(rx);
        true
    }

    fn watch_input(&mut self, p: usize, ops: &mut EventOps, on: bool) {
        let port = &mut self.ports[p];
        let Some(input) = port.cfg.input.as_ref() else {
            return;
        };
        let on = on && port.guest_open && !port.input_eof;
        if on == port.input_watched {
            return;
        }
        let ev = Events::with_data_raw(input.as_raw_fd(), EVT_INPUT + p as u32, EventSet::IN);
        match if on { ops.add(ev) } else { ops.remove(ev) } {
            Ok(()) => port.input_watched = on,
            Err(e) => error!("virtio-ports: cannot change input polling: {e:?}"),
        }
    }
}

impl VirtioDevice for VirtioPorts {
    /// The ports' open state and pending control messages are not saved.
    fn persist_refusal(&self) -> Option<&'static str> {
        Some("the state of its ports is not saved")
    }
    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.state
            .as_ref()
            .map(|st| st.queues.iter().map(|q| q.state()).collect())
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_CONSOLE_F_MULTIPORT
    }

    /// `struct virtio_console_config { le16 cols; le16 rows; le32 max_nr_ports; le32
    /// emerg_wr; }`: only `max_nr_ports` (5.3.4).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 12];
        config[4..8].copy_from_slice(&(self.ports.len() as u32).to_le_bytes());
        data.fill(0);
        if let Some(src) = usize::try_from(offset).ok().and_then(|o| config.get(o..)) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.metrics = activation.interrupt.metrics().clone();
        let n = self.queue_sizes.len();
        self.state = Some(DeviceState::from_activation(activation, n)?);
        self.activate_evt.write(1).map_err(ActivateError::EventFd)
    }

    fn reset(&mut self) {
        self.state = None;
        self.ctrl_out.clear();
        for p in &mut self.ports {
            p.guest_open = false;
        }
    }
}

const EVT_ACTIVATE: u32 = 0;
/// EVT_QUEUE + queue index.
const EVT_QUEUE: u32 = 0x100;
/// EVT_INPUT + port index.
const EVT_INPUT: u32 = 0x200;

impl MutEventSubscriber for VirtioPorts {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            EVT_ACTIVATE,
            EventSet::IN,
        )) {
            error!("virtio-ports: cannot watch the activation event: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let data = events.data();
        if data == EVT_ACTIVATE {
            let _ = self.activate_evt.read();
            if !self.queues_watched {
                for (i, evt) in self.queue_evts.iter().enumerate() {
                    if let Err(e) =
                        ops.add(Events::with_data(evt, EVT_QUEUE + i as u32, EventSet::IN))
                    {
                        error!("virtio-ports: cannot watch queue {i}: {e:?}");
                    }
                }
                self.queues_watched = true;
            }
            self.process_ctrl_tx(ops);
            return;
        }
        if data >= EVT_INPUT {
            let p = (data - EVT_INPUT) as usize;
            // A hung-up pipe reads as end-of-file once drained, so HANG_UP needs no case.
            let more = self.process_rx(p);
            self.watch_input(p, ops, more);
            return;
        }
        let q = (data - EVT_QUEUE) as usize;
        let Some(evt) = self.queue_evts.get(q) else {
            warn!("virtio-ports: unexpected event {data}");
            return;
        };
        take_notifications(evt, &self.metrics);
        match q {
            CTRL_RX => self.flush_ctrl(),
            CTRL_TX => self.process_ctrl_tx(ops),
            _ => {
                let p = if q < 2 { 0 } else { (q - 2) / 2 };
                if q % 2 == 1 {
                    self.process_tx(p);
                } else {
                    // The guest posted receive buffers: input may flow again.
                    self.watch_input(p, ops, true);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::sync::Mutex;

    use event_manager::{EventManager, SubscriberOps};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::device::test_utils::{guest_memory, DATA_START};
    use crate::devices::virtio::device::VirtioInterrupt;
    use crate::vstate::memory::GuestMemoryMmap;

    const F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Harness<'a> {
        mem: &'a GuestMemoryMmap,
        dev: Arc<Mutex<VirtioPorts>>,
        ev: EventManager<Arc<Mutex<VirtioPorts>>>,
        queues: Vec<MockSplitQueue<'a, GuestMemoryMmap>>,
        out: Sink,
        input: Option<std::io::PipeWriter>,
        /// Next free data address for buffers.
        next: u64,
    }

    impl Harness<'_> {
        fn run(&mut self) {
            for _ in 0..3 {
                self.ev.run_with_timeout(20).unwrap();
            }
        }
        fn kick(&mut self, q: usize) {
            self.dev.lock().unwrap().queue_events()[q].write(1).unwrap();
            self.run();
        }
        /// Posts a device-writable buffer on queue `q`; returns its address.
        fn post_rx(&mut self, q: usize, len: u32) -> u64 {
            let addr = self.next;
            self.next += 0x1000;
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, F_WRITE, 0));
            let idx = self.queues[q].avail().idx().load();
            self.queues[q].add_desc_chains(&[d], idx).unwrap();
            addr
        }
        /// Sends a driver-readable buffer with `data` on queue `q`.
        fn send(&mut self, q: usize, data: &[u8]) {
            let addr = self.next;
            self.next += 0x1000;
            self.mem.write_slice(data, GuestAddress(addr)).unwrap();
            let d = RawDescriptor::from(SplitDescriptor::new(addr, data.len() as u32, 0, 0));
            let idx = self.queues[q].avail().idx().load();
            self.queues[q].add_desc_chains(&[d], idx).unwrap();
            self.kick(q);
        }
        /// The control messages the device sent, (id, event, value, payload).
        fn control_sent(&self, addrs: &[u64]) -> Vec<(u32, u16, u16, Vec<u8>)> {
            let used = &self.queues[CTRL_RX].used();
            (0..used.idx().load())
                .map(|i| {
                    let e = used.ring().ref_at(i as usize).unwrap().load();
                    let addr = addrs[e.id() as usize];
                    let mut m = vec![0u8; e.len() as usize];
                    self.mem.read_slice(&mut m, GuestAddress(addr)).unwrap();
                    (
                        u32::from_le_bytes(m[0..4].try_into().unwrap()),
                        u16::from_le_bytes(m[4..6].try_into().unwrap()),
                        u16::from_le_bytes(m[6..8].try_into().unwrap()),
                        m[8..].to_vec(),
                    )
                })
                .collect()
        }
    }

    /// Two ports: 0 "stdin" (host input), 1 "stdout" (output to a sink); activated.
    fn harness(mem: &GuestMemoryMmap) -> Harness<'_> {
        let out = Sink::default();
        let (r, w) = std::io::pipe().unwrap();
        let dev = VirtioPorts::new(vec![
            PortConfig {
                name: "stdin".into(),
                output: None,
                input: Some(Box::new(r)),
            },
            PortConfig {
                name: "stdout".into(),
                output: Some(Box::new(out.clone())),
                input: None,
            },
        ])
        .unwrap();
        assert_eq!(dev.queue_max_sizes().len(), 6);
        let dev = Arc::new(Mutex::new(dev));
        let mut ev = EventManager::new().unwrap();
        ev.add_subscriber(dev.clone());
        let queues: Vec<_> = (0..6)
            .map(|i| MockSplitQueue::create(mem, GuestAddress(i * 0x4000), QUEUE_SIZE))
            .collect();
        let qs: Vec<Queue> = queues.iter().map(|q| q.create_queue().unwrap()).collect();
        dev.lock()
            .unwrap()
            .activate(Activation {
                mem: mem.clone(),
                queues: qs,
                interrupt: Arc::new(VirtioInterrupt::new(
                    EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                )),
                acked_features: VIRTIO_F_VERSION_1 | VIRTIO_CONSOLE_F_MULTIPORT,
            })
            .unwrap();
        let mut h = Harness {
            mem,
            dev,
            ev,
            queues,
            out,
            input: Some(w),
            next: DATA_START,
        };
        h.run();
        h
    }

    #[test]
    fn config_space_gives_the_port_count() {
        let mem = guest_memory();
        let h = harness(&mem);
        let mut cfg = [0xffu8; 12];
        h.dev.lock().unwrap().read_config(0, &mut cfg);
        assert_eq!(cfg, [0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
        assert_ne!(
            h.dev.lock().unwrap().avail_features() & VIRTIO_CONSOLE_F_MULTIPORT,
            0
        );
    }

    #[test]
    fn ports_are_added_then_opened_before_they_are_named() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        let bufs: Vec<u64> = (0..8).map(|_| h.post_rx(CTRL_RX, 64)).collect();
        h.send(CTRL_TX, &control(0, DEVICE_READY, 1, &[]));
        h.send(CTRL_TX, &control(1, PORT_READY, 1, &[]));
        let sent = h.control_sent(&bufs);
        assert_eq!(
            sent,
            [
                (0, DEVICE_ADD, 1, vec![]),
                (1, DEVICE_ADD, 1, vec![]),
                (1, PORT_OPEN, 1, vec![]),
                (1, PORT_NAME, 1, b"stdout".to_vec()),
            ]
        );
    }

    #[test]
    fn guest_output_reaches_the_ports_host_side() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        let (_, tx) = port_queues(1);
        assert_eq!(tx, 5);
        h.send(tx, b"\x00\xffbinary\r\n");
        assert_eq!(&*h.out.0.lock().unwrap(), b"\x00\xffbinary\r\n");
    }

    #[test]
    fn input_flows_only_once_the_guest_opened_the_port_and_its_end_closes_the_host_side() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        let bufs: Vec<u64> = (0..8).map(|_| h.post_rx(CTRL_RX, 64)).collect();
        let (rx, _) = port_queues(0);
        let data_buf = h.post_rx(rx, 64);
        h.input.as_mut().unwrap().write_all(b"abc").unwrap();
        h.kick(rx);
        assert_eq!(
            h.queues[rx].used().idx().load(),
            0,
            "not open in the guest yet"
        );
        h.send(CTRL_TX, &control(0, PORT_OPEN, 1, &[]));
        assert_eq!(h.queues[rx].used().idx().load(), 1);
        let mut got = [0u8; 3];
        mem.read_slice(&mut got, GuestAddress(data_buf)).unwrap();
        assert_eq!(&got, b"abc");
        // The host's input ends: with a buffer posted, the device reads the end and closes
        // the port's host side.
        h.input = None;
        h.post_rx(rx, 64);
        h.kick(rx);
        assert_eq!(h.control_sent(&bufs), [(0, PORT_OPEN, 0, vec![])]);
        assert_eq!(
            h.queues[rx].used().idx().load(),
            1,
            "the last buffer is not used"
        );
    }
}
