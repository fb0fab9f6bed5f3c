//! A host TAP device (Linux `Documentation/networking/tuntap.rst`): the other end of a
//! virtio-net NIC.
//!
//! The TAP is opened with IFF_VNET_HDR and a 12-byte header size, so every frame read from or
//! written to it starts with a `struct virtio_net_hdr_v1` (virtio 1.x, 5.1.6) and carries the
//! checksum and segmentation offload state between the guest and the host stack unchanged.
//! The file descriptor is non-blocking. All of the VMM's `unsafe` for TAP ioctls is here.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use log::{error, info};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

use crate::config::TapConfig;

/// The TUN/TAP control device, unless `FERROVM_TUN_DEVICE` names another (tests use it to
/// check the errors for a missing or wrong device).
pub const DEFAULT_TUN_DEVICE: &str = "/dev/net/tun";
/// The name asked for with tap=auto; the kernel replaces `%d` with the first free number.
pub const AUTO_TAP_NAME: &str = "fvmtap%d";
/// The name of the throwaway TAP `ferrovm check` creates to see whether it may.
pub const PROBE_TAP_NAME: &str = "fvmcheck%d";
/// Size of `struct virtio_net_hdr_v1`, the header on every frame (virtio 1.x, 5.1.6).
pub const VNET_HDR_LEN: i32 = 12;

/// Errors opening or setting up a TAP device. Causes the user can act on are spelled out in
/// the message with the remedy (like the KVM device errors); anything else keeps the OS
/// error as its source.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("Failed to open TAP device {name}: {tun} does not exist (load the tun module: `modprobe tun`)")]
    NoTunDevice { name: String, tun: PathBuf },
    #[error("Failed to open TAP device {name}: permission denied on {tun} (run as root, or give your user read and write access to {tun})")]
    TunPermission { name: String, tun: PathBuf },
    #[error(
        "Failed to open TAP device {name}: {tun} is not the TUN/TAP control device (it does not \
         answer TUNSETIFF)"
    )]
    NotTunDevice { name: String, tun: PathBuf },
    #[error("Failed to open TAP device {name}: operation not permitted (needs CAP_NET_ADMIN, or create it with `ip tuntap add {name} mode tap user $USER`)")]
    NotPermitted { name: String },
    #[error("Failed to create a TAP device for tap=auto: operation not permitted (needs CAP_NET_ADMIN; or create one with `ip tuntap add NAME mode tap user $USER` and give tap=NAME)")]
    AutoNotPermitted,
    #[error("Failed to open TAP device {name}: an interface with that name exists and is not a TAP device (give the name of a TAP, e.g. one made with `ip tuntap add NAME mode tap`)")]
    NotTap { name: String },
    #[error("Failed to open TAP device {name}: it is in use by another process (each NIC needs a TAP of its own)")]
    Busy { name: String },
    #[error("Failed to open TAP device {name}")]
    Open {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("Failed to {what} of TAP device {name}")]
    Setup {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` with the one union member used here (`ifr_flags`); 40 bytes like the
/// kernel's, which copies the whole struct in and out.
#[repr(C)]
#[derive(Default)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    /// An ifreq naming `name`, which the caller has checked fits (IFNAMSIZ - 1 bytes).
    fn with_name(name: &str) -> Self {
        let mut req = Self::default();
        let n = name.len().min(libc::IFNAMSIZ - 1);
        req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        req
    }

    fn name(&self) -> String {
        CStr::from_bytes_until_nul(&self.name)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// An open TAP device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    created: bool,
    /// Set, for every handle on the queue, once the interface was seen deleted.
    gone: Arc<AtomicBool>,
    /// A multi-queue TAP (IFF_MULTI_QUEUE): its queue can be detached for another process
    /// to attach its own (live migration).
    multi_queue: bool,
}

impl Tap {
    /// Opens the TAP of `cfg`: an existing TAP by name (created, and removed again when the
    /// VMM exits, if it does not exist and we may), or with tap=auto a new one named
    /// `fvmtapN` by the kernel. A TAP the VMM created is brought up.
    pub fn open(cfg: &TapConfig) -> Result<Self, TapError> {
        let tun = tun_device_path();
        let tap = match cfg {
            TapConfig::Named(name) => Self::open_at(&tun, name, false)?,
            TapConfig::Auto => Self::open_at(&tun, AUTO_TAP_NAME, true)?,
        };
        if tap.created {
            tap.bring_up()?;
            info!(
                "Created TAP device {} (removed when ferrovm exits) and brought it up",
                tap.name
            );
        } else {
            info!("Opened TAP device {}", tap.name);
        }
        Ok(tap)
    }

    /// Whether this process may create TAP devices (what tap=auto needs): creates one named
    /// `fvmcheckN` and closes it, which deletes it again (it is not persistent). Returns the
    /// name the kernel gave it.
    pub fn probe_create() -> Result<String, TapError> {
        let tap = Self::open_at(&tun_device_path(), PROBE_TAP_NAME, true)?;
        Ok(tap.name.clone())
    }

    /// Opens `name` through the control device `tun`, without bringing anything up.
    fn open_at(tun: &Path, name: &str, auto: bool) -> Result<Self, TapError> {
        let shown = if auto { "(tap=auto)" } else { name };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(tun)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => TapError::NoTunDevice {
                    name: shown.into(),
                    tun: tun.into(),
                },
                Some(libc::EACCES | libc::EPERM) => TapError::TunPermission {
                    name: shown.into(),
                    tun: tun.into(),
                },
                _ => TapError::Open {
                    name: shown.into(),
                    source: e,
                },
            })?;
        let existed = !auto && Path::new("/sys/class/net").join(name).exists();
        // Multi-queue where the TAP allows it: one created here always is; an existing one
        // only if it was made so (`ip tuntap add ... multi_queue`), the kernel refusing
        // (EINVAL) the flag that does not match how it was made.
        let base = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        let mut multi_queue = true;
        let mut req = IfReq::with_name(name);
        req.flags = (base | libc::IFF_MULTI_QUEUE) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes back a `struct ifreq`; `req` is one (same size
        // and layout for the name and flags), valid and exclusively borrowed for the call.
        let mut ret = unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF, &mut req) };
        if ret < 0 && existed && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
            multi_queue = false;
            req = IfReq::with_name(name);
            req.flags = base as libc::c_short;
            // SAFETY: as above.
            ret = unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF, &mut req) };
        }
        if ret < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) if auto => TapError::AutoNotPermitted,
                Some(libc::EPERM | libc::EACCES) => TapError::NotPermitted { name: name.into() },
                Some(libc::EINVAL) if existed => TapError::NotTap { name: name.into() },
                Some(libc::EBUSY) => TapError::Busy { name: name.into() },
                Some(libc::ENOTTY | libc::EBADF) => TapError::NotTunDevice {
                    name: shown.into(),
                    tun: tun.into(),
                },
                _ => TapError::Open {
                    name: shown.into(),
                    source: e,
                },
            });
        }
        // A multi-queue TAP takes a queue from every process that opens it: one already
        // attached elsewhere (its queue count is now above one) is another VM's.
        if multi_queue && existed && attached_queues(name) > 1 {
            return Err(TapError::Busy { name: name.into() });
        }
        let tap = Self {
            file,
            name: req.name(),
            created: !existed,
            gone: Arc::default(),
            multi_queue,
        };
        tap.set_vnet_hdr_len()?;
        // A TAP that lived before (persistent) may keep the offloads of its last user.
        tap.set_offload(0).map_err(|source| TapError::Setup {
            name: tap.name.clone(),
            what: "clear the offloads",
            source,
        })?;
        Ok(tap)
    }

    /// A second handle on the same queue, for a device that sends from a vCPU thread while
    /// the event loop receives.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
            name: self.name.clone(),
            created: self.created,
            gone: self.gone.clone(),
            multi_queue: self.multi_queue,
        })
    }

    /// A TAP another process had open and handed over (local migration): the same queue,
    /// with the header size and offloads it had.
    pub fn from_fd(fd: &OwnedFd) -> io::Result<Self> {
        let file = File::from(fd.try_clone()?);
        let mut req = IfReq::default();
        // SAFETY: TUNGETIFF writes a `struct ifreq` (name and flags) through the pointer;
        // `req` is one, valid and exclusively borrowed for the call.
        if unsafe { ioctl_with_mut_ref(&file, libc::TUNGETIFF, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            file,
            name: req.name(),
            created: false,
            gone: Arc::default(),
            multi_queue: i32::from(req.flags) & libc::IFF_MULTI_QUEUE != 0,
        })
    }

    /// The fd, for handing over to another process.
    pub fn into_file(self) -> File {
        self.file
    }

    /// Whether the TAP is multi-queue (its queue can be detached and attached again).
    pub fn multi_queue(&self) -> bool {
        self.multi_queue
    }

    /// Detaches (`on` false) or re-attaches this handle's queue (TUNSETQUEUE): a detached
    /// queue gets no frames, and another process may attach a queue of its own.
    pub fn set_queue_attached(&self, on: bool) -> io::Result<()> {
        let req = IfReq {
            flags: if on {
                libc::IFF_ATTACH_QUEUE
            } else {
                libc::IFF_DETACH_QUEUE
            } as libc::c_short,
            ..IfReq::default()
        };
        // SAFETY: TUNSETQUEUE reads a `struct ifreq` (the flags); `req` is one, valid for
        // the call.
        if unsafe { ioctl_with_ref(&self.file, libc::TUNSETQUEUE, &req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends one frame (virtio-net header first) announcing `mac` on the link after a
    /// migration: a RARP broadcast from it, as QEMU's announce-self sends, so switches and
    /// bridges learn the port the guest is behind now.
    pub fn announce(&self, mac: [u8; 6]) -> io::Result<usize> {
        self.write_frame(&announce_frame(mac))
    }

    /// The interface name (the kernel's choice with tap=auto).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this VMM created the interface (tap=auto, or a name that did not exist).
    pub fn created(&self) -> bool {
        self.created
    }

    fn set_vnet_hdr_len(&self) -> Result<(), TapError> {
        let len: libc::c_int = VNET_HDR_LEN;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer; `len` is a valid int
        // that outlives the call.
        let ret = unsafe { ioctl_with_ref(&self.file, libc::TUNSETVNETHDRSZ, &len) };
        if ret < 0 {
            return Err(TapError::Setup {
                name: self.name.clone(),
                what: "set the virtio header size",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Tells the TAP which offloads the guest takes (TUN_F_CSUM, TUN_F_TSO4, ...): the host
    /// may then hand over frames with partial checksums or up to 64 KiB long.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no memory of ours.
        let ret =
            unsafe { ioctl_with_val(&self.file, libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            self.note_error(&e);
            return Err(e);
        }
        Ok(())
    }

    /// Sets IFF_UP on the interface (SIOCGIFFLAGS/SIOCSIFFLAGS on an AF_INET socket).
    fn bring_up(&self) -> Result<(), TapError> {
        let fail = |source| TapError::Setup {
            name: self.name.clone(),
            what: "bring up the link",
            source,
        };
        // SAFETY: socket() takes no pointers; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(fail(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a socket just created and owned by nobody else.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = IfReq::with_name(&self.name);
        // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of a `struct ifreq`;
        // `req` matches its layout and is exclusively borrowed for the call.
        if unsafe { ioctl_with_mut_ref(&sock, libc::SIOCGIFFLAGS, &mut req) } < 0 {
            return Err(fail(io::Error::last_os_error()));
        }
        req.flags |= libc::IFF_UP as libc::c_short;
        // SAFETY: SIOCSIFFLAGS reads a `struct ifreq`, which `req` is, valid for the call.
        if unsafe { ioctl_with_ref(&sock, libc::SIOCSIFFLAGS, &req) } < 0 {
            return Err(fail(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Reads one frame (virtio-net header first); WouldBlock when none is queued.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf).inspect_err(|e| self.note_error(e))
    }

    /// Writes one frame (virtio-net header first) in a single write.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file)
            .write(frame)
            .inspect_err(|e| self.note_error(e))
    }

    /// Whether the interface was deleted while open: its fd then fails every read and
    /// write, and epoll reports it ready forever, so a device must stop watching it.
    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Relaxed)
    }

    /// Says once, for all handles, that the interface is gone (the kernel detaches the queue
    /// and answers EBADFD from then on).
    fn note_error(&self, e: &io::Error) {
        if e.raw_os_error() == Some(libc::EBADFD) && !self.gone.swap(true, Ordering::Relaxed) {
            error!(
                "TAP {} is gone (deleted while the VM runs): its NIC drops every frame from now on",
                self.name
            );
        }
    }
}

/// How many queues the interface has attached (its `queues/rx-N` in sysfs; 0 when it
/// cannot be read).
fn attached_queues(name: &str) -> usize {
    std::fs::read_dir(Path::new("/sys/class/net").join(name).join("queues"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                .count()
        })
        .unwrap_or(0)
}

/// A RARP request (RFC 903, ethertype 0x8035) broadcast from `mac`, asking for its own
/// address, padded to the Ethernet minimum, after a zeroed virtio-net header.
pub fn announce_frame(mac: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN as usize];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x80, 0x35]);
    // htype Ethernet, ptype IPv4, hlen 6, plen 4, op 3 (request reverse).
    f.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x03]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(VNET_HDR_LEN as usize + 60, 0);
    f
}

/// The TUN/TAP control device: `FERROVM_TUN_DEVICE`, else /dev/net/tun.
pub fn tun_device_path() -> PathBuf {
    std::env::var_os("FERROVM_TUN_DEVICE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_TUN_DEVICE))
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announcement_is_a_rarp_broadcast_from_the_mac() {
        let mac = [0x02, 0x46, 1, 2, 3, 4];
        let f = announce_frame(mac);
        let eth = &f[VNET_HDR_LEN as usize..];
        assert_eq!(eth.len(), 60, "padded to the Ethernet minimum");
        assert_eq!(&eth[..6], &[0xff; 6]);
        assert_eq!(&eth[6..12], &mac);
        assert_eq!(&eth[12..14], &[0x80, 0x35]);
        assert_eq!(&eth[20..22], &[0, 3], "op: request reverse");
        assert_eq!(&eth[22..28], &mac);
        assert_eq!(&eth[32..38], &mac);
    }

    #[test]
    fn ifreq_has_the_kernel_size() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        let req = IfReq::with_name("fvmtap%d");
        assert_eq!(req.name(), "fvmtap%d");
        // A name at the limit keeps its terminating NUL.
        let req = IfReq::with_name("0123456789abcdefgh");
        assert_eq!(req.name(), "0123456789abcde");
    }

    #[test]
    fn missing_control_device_says_to_load_tun() {
        let err = Tap::open_at(Path::new("/nonexistent/tun"), "tap0", false).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("Failed to open TAP device tap0: "), "{msg}");
        assert!(msg.contains("/nonexistent/tun does not exist"), "{msg}");
        assert!(msg.contains("modprobe tun"), "{msg}");
    }

    #[test]
    fn wrong_control_device_is_refused() {
        let err = Tap::open_at(Path::new("/dev/null"), "tap0", false).unwrap_err();
        assert!(matches!(err, TapError::NotTunDevice { .. }), "{err}");
        let err = Tap::open_at(Path::new("/dev/null"), AUTO_TAP_NAME, true).unwrap_err();
        assert!(err.to_string().contains("(tap=auto)"), "{err}");
    }

    #[test]
    fn permission_errors_say_what_to_do() {
        let msg = TapError::NotPermitted {
            name: "tap0".into(),
        }
        .to_string();
        assert_eq!(
            msg,
            "Failed to open TAP device tap0: operation not permitted (needs CAP_NET_ADMIN, or \
             create it with `ip tuntap add tap0 mode tap user $USER`)"
        );
        assert!(TapError::AutoNotPermitted
            .to_string()
            .contains("CAP_NET_ADMIN"));
    }
}
