//! A vhost-user frontend (the vhost-user protocol, QEMU `docs/interop/vhost-user.rst`): a
//! device whose queues an external process serves. The frontend hands the backend guest
//! memory (the memfd regions), each queue's size, addresses and position, the eventfd KVM
//! signals on a guest notification ("kick") and an eventfd the backend signals when it used
//! buffers ("call"), which the device turns into an interrupt on its transport.
//!
//! The messages go through rust-vmm's `vhost` crate; this module decides their order:
//! `connect` (SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES) when the VM is built,
//! `start` (SET_FEATURES, SET_MEM_TABLE, then per ring NUM, BASE, ADDR, KICK, CALL, ENABLE)
//! when the driver sets DRIVER_OK, `stop` (GET_VRING_BASE per ring, which stops it) when
//! the driver resets the device.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use log::debug;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserVirtioFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::memory::GuestMemoryMmap;

/// Errors talking to a vhost-user backend.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error("Failed to {0} (vhost-user)")]
    Request(&'static str, #[source] vhost::Error),
    #[error("Failed to share guest memory with the backend: {0}")]
    Memory(String),
    #[error("Failed to find queue {queue}'s {what} in guest memory")]
    RingAddress { queue: usize, what: &'static str },
}

/// The protocol features this frontend uses when the backend offers them. None of the
/// optional ones are needed for virtio-fs (the frontend serves the configuration space
/// itself, one request queue needs no MQ); the negotiation itself is what enables
/// SET_VRING_ENABLE (vhost-user "Ring states": with PROTOCOL_FEATURES rings start disabled).
const WANTED_PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::empty();

/// A connection to one backend.
pub struct VhostUserConnection {
    frontend: Frontend,
    /// The virtio feature bits the backend offers (GET_FEATURES).
    backend_features: u64,
    /// Whether VHOST_USER_F_PROTOCOL_FEATURES was negotiated.
    protocol_features: bool,
}

impl VhostUserConnection {
    /// Takes over a connected socket and does the first exchange: SET_OWNER, GET_FEATURES
    /// and, when offered, the protocol feature negotiation.
    pub fn connect(stream: UnixStream, num_queues: usize) -> Result<Self, VhostUserError> {
        let mut frontend = Frontend::from_stream(stream, num_queues as u64);
        frontend
            .set_owner()
            .map_err(|e| VhostUserError::Request("set the owner", e))?;
        let backend_features = frontend
            .get_features()
            .map_err(|e| VhostUserError::Request("get the backend's features", e))?;
        let protocol_features =
            backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        if protocol_features {
            let offered = frontend
                .get_protocol_features()
                .map_err(|e| VhostUserError::Request("get the protocol features", e))?;
            frontend
                .set_protocol_features(offered & WANTED_PROTOCOL_FEATURES)
                .map_err(|e| VhostUserError::Request("set the protocol features", e))?;
        }
        debug!("vhost-user: backend features {backend_features:#x}");
        Ok(Self {
            frontend,
            backend_features,
            protocol_features,
        })
    }

    /// The virtio feature bits the backend offers, without the vhost-user one.
    pub fn backend_features(&self) -> u64 {
        self.backend_features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    /// The socket, to watch for the backend hanging up.
    pub fn socket_fd(&self) -> RawFd {
        self.frontend.as_raw_fd()
    }

    /// Starts the backend on the driver's queues: features, memory table, then each ring.
    /// `kicks[i]` is what KVM signals when the guest notifies queue i, `calls[i]` what the
    /// backend signals when it used buffers of queue i.
    pub fn start(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &[Queue],
        acked_features: u64,
        kicks: &[EventFd],
        calls: &[EventFd],
    ) -> Result<(), VhostUserError> {
        let mut features = acked_features;
        if self.protocol_features {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.frontend
            .set_features(features)
            .map_err(|e| VhostUserError::Request("set the features", e))?;
        let regions = memory_regions(mem)?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(|e| VhostUserError::Request("set the memory table", e))?;
        for (i, q) in queues.iter().enumerate() {
            self.frontend
                .set_vring_num(i, q.size())
                .map_err(|e| VhostUserError::Request("set a ring's size", e))?;
            self.frontend
                .set_vring_base(i, q.next_avail())
                .map_err(|e| VhostUserError::Request("set a ring's base", e))?;
            let config = ring_addresses(mem, i, q)?;
            self.frontend
                .set_vring_addr(i, &config)
                .map_err(|e| VhostUserError::Request("set a ring's addresses", e))?;
            self.frontend
                .set_vring_kick(i, &kicks[i])
                .map_err(|e| VhostUserError::Request("set a ring's kick eventfd", e))?;
            self.frontend
                .set_vring_call(i, &calls[i])
                .map_err(|e| VhostUserError::Request("set a ring's call eventfd", e))?;
        }
        if self.protocol_features {
            for i in 0..queues.len() {
                self.frontend
                    .set_vring_enable(i, true)
                    .map_err(|e| VhostUserError::Request("enable a ring", e))?;
            }
        }
        Ok(())
    }

    /// Stops every ring (GET_VRING_BASE stops a ring, vhost-user "Ring states"); returns
    /// where the backend was in each available ring.
    pub fn stop(&mut self, num_queues: usize) -> Result<Vec<u32>, VhostUserError> {
        (0..num_queues)
            .map(|i| {
                self.frontend
                    .get_vring_base(i)
                    .map_err(|e| VhostUserError::Request("stop a ring", e))
            })
            .collect()
    }
}

/// Guest memory as the backend maps it: every region with its memfd and offset, and the
/// address it has in this process (what ring addresses are given in).
fn memory_regions(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, VhostUserError> {
    mem.iter()
        .map(|r| {
            VhostUserMemoryRegionInfo::from_guest_region(r).map_err(|_| {
                VhostUserError::Memory(
                    "guest RAM is not shared (a vhost-user device needs it backed by a memfd)"
                        .into(),
                )
            })
        })
        .collect()
}

/// A ring's addresses as vhost-user wants them: in this process's address space (vhost-user
/// SET_VRING_ADDR, "a ring address is a user address"), not guest-physical.
fn ring_addresses(
    mem: &GuestMemoryMmap,
    queue: usize,
    q: &Queue,
) -> Result<VringConfigData, VhostUserError> {
    let host = |gpa: u64, what| {
        mem.get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|_| VhostUserError::RingAddress { queue, what })
    };
    // The whole ring must be in one region, as the backend maps regions separately.
    let size = u64::from(q.size());
    for (gpa, len, what) in [
        (q.desc_table(), 16 * size, "descriptor table"),
        (q.avail_ring(), 6 + 2 * size, "available ring"),
        (q.used_ring(), 6 + 8 * size, "used ring"),
    ] {
        let end = gpa
            .checked_add(len - 1)
            .ok_or(VhostUserError::RingAddress { queue, what })?;
        let same_region = mem
            .find_region(GuestAddress(gpa))
            .zip(mem.find_region(GuestAddress(end)))
            .is_some_and(|(a, b)| std::ptr::eq(a, b));
        if !same_region {
            return Err(VhostUserError::RingAddress { queue, what });
        }
    }
    Ok(VringConfigData {
        queue_max_size: q.max_size(),
        queue_size: q.size(),
        flags: 0,
        desc_table_addr: host(q.desc_table(), "descriptor table")?,
        used_ring_addr: host(q.used_ring(), "used ring")?,
        avail_ring_addr: host(q.avail_ring(), "available ring")?,
        log_addr: None,
    })
}

/// A vhost-user backend that records what the frontend sends, for device tests: it runs
/// the `vhost` crate's backend request handler on one end of a socket pair, in a thread.
#[cfg(test)]
pub(crate) mod fake {
    use std::fs::File;
    use std::os::unix::net::UnixStream;
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;

    use vhost::vhost_user::message::*;
    use vhost::vhost_user::{
        Backend, BackendReqHandler, Error, GpuBackend, Result, VhostUserBackendReqHandlerMut,
    };
    use vhost::VhostUserMemoryRegionBase;

    /// What the fake backend saw.
    #[derive(Default)]
    pub struct Seen {
        /// Requests in order, by name.
        pub requests: Vec<&'static str>,
        pub acked_features: u64,
        /// (guest address, size, user address, mmap offset) per region, and their files.
        pub regions: Vec<(u64, u64, u64, u64)>,
        pub region_files: Vec<File>,
        pub vring_num: [u32; 2],
        /// (descriptor, used, available) user addresses per ring.
        pub vring_addr: [(u64, u64, u64); 2],
        pub kick: [Option<File>; 2],
        pub call: [Option<File>; 2],
        pub enabled: [bool; 2],
    }

    /// VERSION_1, EVENT_IDX and the vhost-user bit, as virtiofsd offers.
    pub const FEATURES: u64 =
        (1 << 32) | (1 << 29) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

    struct Handler(Arc<Mutex<Seen>>);

    impl Handler {
        fn log(&self, what: &'static str) {
            self.0.lock().unwrap().requests.push(what);
        }
    }

    /// A running fake backend.
    pub struct FakeBackend {
        pub seen: Arc<Mutex<Seen>>,
        /// Its end of the socket, to hang up with.
        back: UnixStream,
        thread: Option<JoinHandle<()>>,
    }

    impl FakeBackend {
        /// Starts the backend; returns it and the frontend's end of the socket. It serves
        /// until either end closes.
        pub fn start() -> (Self, UnixStream) {
            let (front, back) = UnixStream::pair().unwrap();
            let seen = Arc::new(Mutex::new(Seen::default()));
            let handler = Arc::new(Mutex::new(Handler(seen.clone())));
            let theirs = back.try_clone().unwrap();
            let thread = std::thread::spawn(move || {
                let mut req = BackendReqHandler::from_stream(theirs, handler);
                while req.handle_request().is_ok() {}
            });
            let fake = Self {
                seen,
                back,
                thread: Some(thread),
            };
            (fake, front)
        }

        /// The requests seen so far.
        pub fn requests(&self) -> Vec<&'static str> {
            self.seen.lock().unwrap().requests.clone()
        }

        /// Waits (2 s at most) until the backend handled `n` requests: without REPLY_ACK
        /// the frontend does not wait for it.
        pub fn wait_requests(&self, n: usize) -> Vec<&'static str> {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            loop {
                let reqs = self.requests();
                if reqs.len() >= n || std::time::Instant::now() > deadline {
                    return reqs;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }

        /// Hangs up, as a virtiofsd that crashed.
        pub fn hang_up(&mut self) {
            let _ = self.back.shutdown(std::net::Shutdown::Both);
            if let Some(t) = self.thread.take() {
                t.join().unwrap();
            }
        }
    }

    impl VhostUserBackendReqHandlerMut for Handler {
        fn set_owner(&mut self) -> Result<()> {
            self.log("SET_OWNER");
            Ok(())
        }
        fn reset_owner(&mut self) -> Result<()> {
            Err(Error::InvalidOperation("reset_owner"))
        }
        fn reset_device(&mut self) -> Result<()> {
            Err(Error::InvalidOperation("reset_device"))
        }
        fn get_features(&mut self) -> Result<u64> {
            self.log("GET_FEATURES");
            Ok(FEATURES)
        }
        fn set_features(&mut self, features: u64) -> Result<()> {
            self.log("SET_FEATURES");
            self.0.lock().unwrap().acked_features = features;
            Ok(())
        }
        fn set_mem_table(
            &mut self,
            ctx: &[VhostUserMemoryRegion],
            files: Vec<File>,
            _postcopy: Option<bool>,
        ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
            self.log("SET_MEM_TABLE");
            let mut seen = self.0.lock().unwrap();
            seen.regions = ctx
                .iter()
                .map(|r| (r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset))
                .collect();
            seen.region_files = files;
            Ok(None)
        }
        fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
            self.log("SET_VRING_NUM");
            self.0.lock().unwrap().vring_num[index as usize] = num;
            Ok(())
        }
        fn set_vring_addr(
            &mut self,
            index: u32,
            _flags: VhostUserVringAddrFlags,
            descriptor: u64,
            used: u64,
            available: u64,
            _log: u64,
        ) -> Result<()> {
            self.log("SET_VRING_ADDR");
            self.0.lock().unwrap().vring_addr[index as usize] = (descriptor, used, available);
            Ok(())
        }
        fn set_vring_base(&mut self, _index: u32, _base: u32) -> Result<()> {
            self.log("SET_VRING_BASE");
            Ok(())
        }
        fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
            self.log("GET_VRING_BASE");
            self.0.lock().unwrap().enabled[index as usize] = false;
            Ok(VhostUserVringState::new(index, 0))
        }
        fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
            self.log("SET_VRING_KICK");
            self.0.lock().unwrap().kick[index as usize] = fd;
            Ok(())
        }
        fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
            self.log("SET_VRING_CALL");
            self.0.lock().unwrap().call[index as usize] = fd;
            Ok(())
        }
        fn set_vring_err(&mut self, _index: u8, _fd: Option<File>) -> Result<()> {
            Err(Error::InvalidOperation("set_vring_err"))
        }
        fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
            self.log("GET_PROTOCOL_FEATURES");
            Ok(VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK)
        }
        fn set_protocol_features(&mut self, _features: u64) -> Result<()> {
            self.log("SET_PROTOCOL_FEATURES");
            Ok(())
        }
        fn get_queue_num(&mut self) -> Result<u64> {
            Ok(2)
        }
        fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
            self.log("SET_VRING_ENABLE");
            self.0.lock().unwrap().enabled[index as usize] = enable;
            Ok(())
        }
        fn get_config(&mut self, _: u32, _: u32, _: VhostUserConfigFlags) -> Result<Vec<u8>> {
            Err(Error::InvalidOperation("get_config"))
        }
        fn set_config(&mut self, _: u32, _: &[u8], _: VhostUserConfigFlags) -> Result<()> {
            Err(Error::InvalidOperation("set_config"))
        }
        fn set_backend_req_fd(&mut self, _backend: Backend) {}
        fn set_gpu_socket(&mut self, _gpu: GpuBackend) -> Result<()> {
            Err(Error::InvalidOperation("set_gpu_socket"))
        }
        fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
            Err(Error::InvalidOperation("get_shared_object"))
        }
        fn get_inflight_fd(
            &mut self,
            _inflight: &VhostUserInflight,
        ) -> Result<(VhostUserInflight, File)> {
            Err(Error::InvalidOperation("get_inflight_fd"))
        }
        fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> Result<()> {
            Err(Error::InvalidOperation("set_inflight_fd"))
        }
        fn get_max_mem_slots(&mut self) -> Result<u64> {
            Ok(8)
        }
        fn add_mem_region(
            &mut self,
            _region: &VhostUserSingleMemoryRegion,
            _fd: File,
            _postcopy: Option<bool>,
        ) -> Result<Option<VhostUserMemoryRegionBase>> {
            Err(Error::InvalidOperation("add_mem_region"))
        }
        fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> Result<()> {
            Err(Error::InvalidOperation("remove_mem_region"))
        }
        fn set_device_state_fd(
            &mut self,
            _direction: VhostTransferStateDirection,
            _phase: VhostTransferStatePhase,
            _fd: File,
        ) -> Result<Option<File>> {
            Err(Error::InvalidOperation("set_device_state_fd"))
        }
        fn check_device_state(&mut self) -> Result<()> {
            Err(Error::InvalidOperation("check_device_state"))
        }
        fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
            Err(Error::InvalidOperation("get_shmem_config"))
        }
        fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> Result<()> {
            Err(Error::InvalidOperation("set_log_base"))
        }
    }
}
