//! virtio-console (virtio 1.x, section 5.3) with a single port: the guest's /dev/hvc0.
//!
//! Output (transmitq) goes to the backend writer (stdout or a file); host input (stdin)
//! fills the guest's receive buffers. Host input is only read while the guest has a
//! receive buffer posted, so nothing typed is dropped; when the guest runs out, the event
//! loop stops watching stdin until the receive queue is notified again.

use std::io::{self, Write};

use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, error, warn};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

use super::device::{
    read_chain, rearm_notification, take_notifications, ActivateError, Activation, DeviceState,
    VirtioDevice, VIRTIO_F_VERSION_1,
};
use super::guest_write::{ChainWriter, ChainWrites};
use crate::devices::host_input::HostInput;
use crate::devices::metrics::DeviceMetrics;
use crate::vstate::memory::GuestMemoryMmap;

/// Virtio device id of a console.
pub const VIRTIO_ID_CONSOLE: u32 = 3;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// Largest transmit chain we copy out at once.
const TX_CHAIN_MAX: u64 = 1 << 20;

/// Errors creating the console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("Failed to create an eventfd for the virtio console")]
    EventFd(#[source] io::Error),
}

/// The console device.
pub struct VirtioConsole {
    output: Box<dyn Write + Send>,
    input: Option<Box<dyn HostInput>>,
    queue_sizes: [u16; 2],
    queue_evts: [EventFd; 2],
    activate_evt: EventFd,
    state: Option<DeviceState>,
    /// Which fds are in the event loop's interest list.
    queues_watched: bool,
    input_watched: bool,
    input_eof: bool,
    /// The device's counters, handed over with the interrupt line at activation.
    metrics: Arc<DeviceMetrics>,
}

impl VirtioConsole {
    /// A console writing guest output to `output` and, if given, feeding `input` to it.
    pub fn new(
        output: Box<dyn Write + Send>,
        input: Option<Box<dyn HostInput>>,
    ) -> Result<Self, ConsoleError> {
        let evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(ConsoleError::EventFd);
        Ok(Self {
            output,
            input,
            queue_sizes: [QUEUE_SIZE; 2],
            queue_evts: [evt()?, evt()?],
            activate_evt: evt()?,
            state: None,
            queues_watched: false,
            input_watched: false,
            input_eof: false,
            metrics: DeviceMetrics::unnamed(),
        })
    }

    /// Writes what the guest sent; every chain is completed, bad ones with length 0.
    pub(crate) fn process_tx(&mut self) {
        let Some(state) = self.state.as_mut() else {
            return;
        };
        let mut buf = Vec::new();
        let mut empty_rounds = 0;
        loop {
            if let Err(e) = state.writers[TX].disable_notification(&mut state.queues[TX]) {
                warn!("virtio-console: cannot disable tx notifications: {e}");
            }
            let mut popped = 0;
            while let Some(chain) = state.queues[TX].pop_descriptor_chain(&state.mem) {
                popped += 1;
                let head = chain.head_index();
                buf.clear();
                match read_chain(chain, QUEUE_SIZE)
                    .map_err(|e| e.to_string())
                    .and_then(|d| gather(&d, &state.mem, &mut buf))
                {
                    Ok(()) => {
                        self.metrics.add_bytes_from_guest(buf.len() as u64);
                        if let Err(e) = self
                            .output
                            .write_all(&buf)
                            .and_then(|_| self.output.flush())
                        {
                            warn!(
                                "virtio-console: output backend failed, {} bytes lost: {e}",
                                buf.len()
                            );
                        }
                    }
                    Err(e) => warn!("virtio-console: bad transmit chain: {e}"),
                }
                if let Err(e) = state.writers[TX].add_used_empty(&mut state.queues[TX], head) {
                    error!("virtio-console: cannot complete a transmit chain: {e}");
                }
            }
            // Found by fuzzing: a bogus available index used to spin the event loop here.
            if !rearm_notification(
                &mut state.queues[TX],
                &state.writers[TX],
                popped,
                &mut empty_rounds,
                "virtio-console",
            ) {
                break;
            }
        }
        state.notify_if_needed(TX);
    }

    /// Moves one read of host input into a posted receive buffer. Called only when the
    /// input is readable, so the read does not block. Returns false when input should stop
    /// being watched: the guest has no buffer posted (a receive-queue notification turns it
    /// back on) or the input ended.
    pub(crate) fn process_rx(&mut self) -> bool {
        let Some(state) = self.state.as_mut() else {
            return false;
        };
        let Some(input) = self.input.as_mut() else {
            return false;
        };
        if self.input_eof {
            return false;
        }
        let (head, descs) = loop {
            let Some(chain) = state.queues[RX].pop_descriptor_chain(&state.mem) else {
                return false;
            };
            let head = chain.head_index();
            match read_chain(chain, QUEUE_SIZE) {
                Ok(d) if d.iter().all(|d| d.is_write_only()) => break (head, d),
                _ => {
                    warn!(
                        "virtio-console: bad receive chain (looping, too long or device-readable)"
                    );
                    if let Err(e) = state.writers[RX].add_used_empty(&mut state.queues[RX], head) {
                        error!("virtio-console: cannot complete a receive buffer: {e}");
                    }
                }
            }
        };
        let mut buf = [0u8; 4096];
        let room = descs
            .iter()
            .map(|d| d.len() as usize)
            .sum::<usize>()
            .min(buf.len());
        let n = match input.read(&mut buf[..room]) {
            Ok(0) => {
                self.input_eof = true;
                0
            }
            Ok(n) => n,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                0
            }
            Err(e) => {
                warn!("virtio-console: reading input failed, input disabled: {e}");
                self.input_eof = true;
                0
            }
        };
        if n == 0 {
            // Nothing to give: the buffer goes back to the ring, unused.
            state.queues[RX].go_to_previous_position();
        } else {
            let chain = ChainWrites::new(head, &descs);
            let written = scatter(&descs, &state.writers[RX].chain(&chain), &buf[..n]);
            self.metrics.add_bytes_to_guest(written as u64);
            if let Err(e) = state.writers[RX].add_used(&mut state.queues[RX], chain, written as u32)
            {
                error!("virtio-console: cannot complete a receive buffer: {e}");
            }
        }
        state.notify_if_needed(RX);
        !self.input_eof
    }

    fn watch_input(&mut self, ops: &mut EventOps, on: bool) {
        let Some(input) = self.input.as_ref() else {
            return;
        };
        if on == self.input_watched || (on && self.input_eof) {
            return;
        }
        let ev = Events::with_data_raw(input.as_raw_fd(), EVT_INPUT, EventSet::IN);
        let res = if on { ops.add(ev) } else { ops.remove(ev) };
        match res {
            Ok(()) => self.input_watched = on,
            Err(e) => error!("virtio-console: cannot change input polling: {e:?}"),
        }
    }
}

/// Copies the device-readable buffers of a chain; device-writable ones are an error.
pub(crate) fn gather(
    descs: &[Descriptor],
    mem: &GuestMemoryMmap,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let total: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
    if total > TX_CHAIN_MAX {
        return Err(format!("{total} bytes in one chain"));
    }
    for d in descs {
        if d.is_write_only() {
            return Err("device-writable buffer on the transmit queue".into());
        }
        let start = out.len();
        out.resize(start + d.len() as usize, 0);
        mem.read_slice(&mut out[start..], d.addr())
            .map_err(|e| format!("buffer outside guest memory: {e}"))?;
    }
    Ok(())
}

/// Copies `data` into a chain's buffers; returns how many bytes landed.
pub(crate) fn scatter(descs: &[Descriptor], dst: &ChainWriter, mut data: &[u8]) -> usize {
    let mut written = 0;
    for d in descs {
        if data.is_empty() {
            break;
        }
        let n = (d.len() as usize).min(data.len());
        if let Err(e) = dst.write_slice(&data[..n], d.addr()) {
            warn!("virtio-console: receive buffer outside guest memory: {e}");
            break;
        }
        written += n;
        data = &data[n..];
    }
    written
}

impl VirtioDevice for VirtioConsole {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        // No MULTIPORT, no SIZE: one port, /dev/hvc0, sized by the guest's tty layer.
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // All config fields depend on features we do not offer.
        data.fill(0);
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.metrics = activation.interrupt.metrics().clone();
        self.state = Some(DeviceState::from_activation(activation, 2)?);
        self.activate_evt.write(1).map_err(ActivateError::EventFd)
    }

    fn reset(&mut self) {
        self.state = None;
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.state
            .as_ref()
            .map(|st| st.queues.iter().map(|q| q.state()).collect())
    }
}

const EVT_ACTIVATE: u32 = 0;
const EVT_RX: u32 = 1;
const EVT_TX: u32 = 2;
const EVT_INPUT: u32 = 3;

impl MutEventSubscriber for VirtioConsole {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            EVT_ACTIVATE,
            EventSet::IN,
        )) {
            error!("virtio-console: cannot watch the activation event: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            EVT_ACTIVATE => {
                let _ = self.activate_evt.read();
                if !self.queues_watched {
                    let rx = Events::with_data(&self.queue_evts[RX], EVT_RX, EventSet::IN);
                    let tx = Events::with_data(&self.queue_evts[TX], EVT_TX, EventSet::IN);
                    match ops.add(rx).and_then(|_| ops.add(tx)) {
                        Ok(()) => self.queues_watched = true,
                        Err(e) => error!("virtio-console: cannot watch the queues: {e:?}"),
                    }
                }
                debug!("virtio-console: activated");
                self.process_tx();
                self.watch_input(ops, true);
            }
            EVT_TX => {
                take_notifications(&self.queue_evts[TX], &self.metrics);
                self.process_tx();
            }
            EVT_RX => {
                // The guest posted receive buffers: input may flow again.
                take_notifications(&self.queue_evts[RX], &self.metrics);
                self.watch_input(ops, true);
            }
            EVT_INPUT => {
                let more = if events.event_set().contains(EventSet::IN) {
                    self.process_rx()
                } else {
                    self.input_eof = true;
                    false
                };
                self.watch_input(ops, more);
            }
            other => warn!("virtio-console: unexpected event {other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::device::test_utils::{guest_memory, DATA_START};
    use crate::devices::virtio::device::VirtioInterrupt;
    use std::sync::{Arc, Mutex};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Address, GuestAddress};

    const F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
    const F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

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

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    struct Harness<'a> {
        rxq: MockSplitQueue<'a, GuestMemoryMmap>,
        txq: MockSplitQueue<'a, GuestMemoryMmap>,
        dev: VirtioConsole,
        out: SharedBuf,
        input: std::io::PipeWriter,
    }

    fn harness(mem: &GuestMemoryMmap) -> Harness<'_> {
        let out = SharedBuf::default();
        let (r, w) = std::io::pipe().unwrap();
        let mut dev = VirtioConsole::new(Box::new(out.clone()), Some(Box::new(r))).unwrap();
        let rxq = MockSplitQueue::create(mem, GuestAddress(0), QUEUE_SIZE);
        let txq = MockSplitQueue::create(mem, GuestAddress(0x8000), QUEUE_SIZE);
        let queues: Vec<Queue> = vec![rxq.create_queue().unwrap(), txq.create_queue().unwrap()];
        dev.activate(Activation {
            mem: mem.clone(),
            queues,
            interrupt: Arc::new(VirtioInterrupt::new(
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            )),
            acked_features: VIRTIO_F_VERSION_1,
        })
        .unwrap();
        Harness {
            rxq,
            txq,
            dev,
            out,
            input: w,
        }
    }

    #[test]
    fn guest_output_reaches_the_backend() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        mem.write_slice(b"hello ", GuestAddress(DATA_START))
            .unwrap();
        mem.write_slice(b"hvc0\n", GuestAddress(DATA_START + 0x100))
            .unwrap();
        h.txq
            .add_desc_chains(
                &[
                    desc(DATA_START, 6, F_NEXT, 1),
                    desc(DATA_START + 0x100, 5, 0, 0),
                ],
                0,
            )
            .unwrap();
        h.dev.process_tx();
        assert_eq!(&*h.out.0.lock().unwrap(), b"hello hvc0\n");
        assert_eq!(h.txq.used().idx().load(), 1);
    }

    #[test]
    fn bad_transmit_chains_are_completed_and_skipped() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        mem.write_slice(b"ok", GuestAddress(DATA_START + 0x200))
            .unwrap();
        h.txq
            .add_desc_chains(
                &[
                    desc(0xffff_0000_0000, 16, 0, 0),  // outside guest memory
                    desc(DATA_START, 4, F_WRITE, 0),   // device-writable
                    desc(DATA_START + 0x200, 2, 0, 0), // fine
                ],
                0,
            )
            .unwrap();
        h.dev.process_tx();
        assert_eq!(&*h.out.0.lock().unwrap(), b"ok");
        assert_eq!(h.txq.used().idx().load(), 3, "every chain completed");
    }

    /// Regression (fuzz/corpus/virtio_console/regress-bogus-avail-index): process_tx spun
    /// forever on an available index the queue refuses to walk.
    #[test]
    fn bogus_avail_index_does_not_hang_the_device() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        // The guest claims 1000 new entries in a 256-entry queue.
        mem.write_obj(1000u16, h.txq.avail_addr().unchecked_add(2))
            .unwrap();
        h.dev.process_tx();
        assert_eq!(h.txq.used().idx().load(), 0);
    }

    #[test]
    fn host_input_fills_receive_buffers() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        h.input.write_all(b"typed\n").unwrap();
        h.rxq
            .add_desc_chains(&[desc(DATA_START, 64, F_WRITE, 0)], 0)
            .unwrap();
        assert!(h.dev.process_rx(), "keep watching input");
        let used = h.rxq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(used.len(), 6);
        let mut got = [0u8; 6];
        mem.read_slice(&mut got, GuestAddress(DATA_START)).unwrap();
        assert_eq!(&got, b"typed\n");
    }

    #[test]
    fn without_receive_buffers_input_waits_in_the_host() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        h.input.write_all(b"later").unwrap();
        assert!(!h.dev.process_rx(), "no buffers: stop watching input");
        // The bytes are still in the pipe: a buffer posted later gets them.
        h.rxq
            .add_desc_chains(&[desc(DATA_START, 64, F_WRITE, 0)], 0)
            .unwrap();
        h.dev.process_rx();
        let mut got = [0u8; 5];
        mem.read_slice(&mut got, GuestAddress(DATA_START)).unwrap();
        assert_eq!(&got, b"later");
    }

    #[test]
    fn device_readable_receive_buffer_is_refused() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        h.input.write_all(b"x").unwrap();
        h.rxq
            .add_desc_chains(
                &[
                    desc(DATA_START, 64, 0, 0),
                    desc(DATA_START + 0x100, 64, F_WRITE, 0),
                ],
                0,
            )
            .unwrap();
        assert!(h.dev.process_rx());
        let first = h.rxq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(first.len(), 0, "refused");
        let second = h.rxq.used().ring().ref_at(1).unwrap().load();
        assert_eq!(second.len(), 1, "the next buffer got the byte");
    }

    #[test]
    fn end_of_input_stops_watching() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        h.rxq
            .add_desc_chains(&[desc(DATA_START, 64, F_WRITE, 0)], 0)
            .unwrap();
        drop(std::mem::replace(&mut h.input, std::io::pipe().unwrap().1));
        assert!(!h.dev.process_rx(), "EOF");
        assert_eq!(h.rxq.used().idx().load(), 0, "the buffer was not consumed");
    }

    #[test]
    fn features_and_config() {
        let mem = guest_memory();
        let h = harness(&mem);
        assert_eq!(h.dev.avail_features(), VIRTIO_F_VERSION_1);
        assert_eq!(h.dev.device_type(), VIRTIO_ID_CONSOLE);
        let mut cfg = [0xffu8; 8];
        h.dev.read_config(0, &mut cfg);
        assert_eq!(cfg, [0; 8]);
    }
}
