//! Live migration: a running VM moves to another ferrovm process, on this host or another,
//! while the guest keeps running; it stops only for the final copy (the downtime).
//!
//! The destination waits with `ferrovm run --incoming unix:PATH|tcp:HOST:PORT` and takes the
//! VM's whole configuration from the stream. The source is told through its control socket
//! (`ferrovm migrate --api-sock SRC --to ADDR`, or `PUT /api/v1/vm.migrate`), and its
//! migration thread (`send`) then:
//! 1. connects, exchanges the preamble (protocol version), sends the configuration and the
//!    memory layout (`protocol::Kind::Config`); the destination maps its memory;
//! 2. copies guest memory while the guest runs (iterative pre-copy): the first pass sends all
//!    of RAM (zero pages as 16-byte records), each later pass what was dirtied meanwhile
//!    (`dirty`: KVM's dirty log OR the VMM's own bitmap), until the time the rest would take
//!    at the measured bandwidth is under the downtime limit (default 300 ms, as QEMU and
//!    Cloud Hypervisor use), or the pass or time limit is reached;
//! 3. asks the event loop to pause the vCPUs and take the device and vCPU state (the
//!    snapshot's serializers, in-flight I/O finished first), sends the last dirty pages and
//!    the state;
//! 4. has the event loop let go of the host resources the destination opens: the disks are
//!    flushed, each TAP's queue is detached (a multi-queue TAP) so that the destination can
//!    attach its own, then sends COMMIT; the destination opens the disks and TAPs, restores
//!    every device and vCPU, answers OK and runs the guest; the source exits 0.
//!
//! Any error before the destination's final OK (it died, the connection broke, it speaks
//! another version, it refused the state) aborts: the source re-attaches its TAPs and
//! resumes the guest as it was, and the dirty pages it had taken but not sent go back into
//! the VMM's bitmap.
//!
//! Local mode (`--local`, Unix sockets only): the guest-memory memfd (`--memory-shared`) and
//! the TAP fds go over the socket (SCM_RIGHTS) and no memory is copied: the source pauses at
//! once, and the downtime is the state transfer and the destination's build.
//!
//! After the destination resumes, each NIC announces the guest's MAC: a gratuitous ARP for
//! the guest's address when the NIC has seen the guest use one, else a RARP broadcast as
//! QEMU's announce-self sends, so switches learn where the guest is now.

pub mod dirty;
pub mod protocol;
pub mod receive;
pub mod send;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the destination listens; `unix:PATH` or `tcp:IP:PORT` in JSON as on the command
/// line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    /// A resolved address: the control API takes numbers only (the VMM's sandbox opens no
    /// resolver files); `ferrovm migrate` resolves names first.
    Tcp(SocketAddr),
}

impl FromStr for Address {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path, e.g. unix:/run/ferrovm-mig.sock".into());
            }
            return Ok(Self::Unix(path.into()));
        }
        if let Some(addr) = s.strip_prefix("tcp:") {
            return addr.parse().map(Self::Tcp).map_err(|_| {
                format!(
                    "tcp:{addr} is not an IP address and port (e.g. tcp:192.0.2.1:4444 or \
                     tcp:[::1]:4444)"
                )
            });
        }
        Err(format!(
            "'{s}' is not a migration address: give unix:PATH or tcp:HOST:PORT"
        ))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl Serialize for Address {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Resolves a `tcp:HOST:PORT` with a host name into numbers (for the client, which may open
/// the resolver's files); other addresses are parsed as they are.
pub fn resolve(s: &str) -> Result<Address, String> {
    if let Some(hostport) = s.strip_prefix("tcp:") {
        if hostport.parse::<SocketAddr>().is_err() {
            use std::net::ToSocketAddrs;
            let addr = hostport
                .to_socket_addrs()
                .map_err(|e| format!("cannot resolve {hostport}: {e}"))?
                .next()
                .ok_or_else(|| format!("{hostport} resolves to no address"))?;
            return Ok(Address::Tcp(addr));
        }
    }
    s.parse()
}

/// Default longest downtime the pre-copy aims for.
pub const DEFAULT_DOWNTIME_MS: u64 = 300;
/// Default most passes over memory before the switch-over happens anyway.
pub const DEFAULT_MAX_PASSES: u32 = 30;
/// Default longest pre-copy before the switch-over happens anyway.
pub const DEFAULT_TIMEOUT_S: u64 = 120;

/// What a migration is asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateParams {
    pub to: Address,
    /// Hand memory and TAPs over by fd instead of copying (same host, Unix socket).
    #[serde(default)]
    pub local: bool,
    #[serde(default = "default_downtime")]
    pub downtime_ms: u64,
    #[serde(default = "default_passes")]
    pub max_passes: u32,
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
}

fn default_downtime() -> u64 {
    DEFAULT_DOWNTIME_MS
}
fn default_passes() -> u32 {
    DEFAULT_MAX_PASSES
}
fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_S
}

impl MigrateParams {
    /// Checks what a request gave; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.local && !matches!(self.to, Address::Unix(_)) {
            return Err(format!(
                "local migration hands file descriptors over a Unix socket: give unix:PATH, not {}",
                self.to
            ));
        }
        if self.downtime_ms == 0 {
            return Err("downtime_ms must be at least 1".into());
        }
        if self.max_passes == 0 {
            return Err("max_passes must be at least 1".into());
        }
        if self.timeout_s == 0 {
            return Err("timeout_s must be at least 1".into());
        }
        Ok(())
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_s)
    }
}

/// The test mode that hashes all guest RAM on both sides at the switch-over
/// (`FERROVM_MIGRATION_VERIFY=1` in the source's environment): the destination refuses to
/// run a guest whose memory differs from the source's.
pub const VERIFY_ENV: &str = "FERROVM_MIGRATION_VERIFY";

/// Errors of a migration, on either side.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("Failed to connect to the destination {0}")]
    Connect(Address, #[source] std::io::Error),
    #[error("Failed to listen for a migration on {0}")]
    Listen(Address, #[source] std::io::Error),
    #[error("Failed to accept the migration connection on {0}")]
    Accept(Address, #[source] std::io::Error),
    #[error("The migration stream failed")]
    Protocol(#[from] protocol::ProtocolError),
    #[error("The destination cannot take this VM: {0}")]
    Refused(String),
    #[error("Guest memory cannot be {0}")]
    Memory(String),
    #[error("Failed to track dirty pages")]
    Dirty(#[source] crate::vstate::vm::VmError),
    #[error("The migration was cancelled: {0}")]
    Cancelled(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_bad_ones_are_named() {
        assert_eq!(
            "unix:/run/m.sock".parse::<Address>(),
            Ok(Address::Unix("/run/m.sock".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<Address>().unwrap().to_string(),
            "tcp:127.0.0.1:4444"
        );
        assert!("tcp:[::1]:4444".parse::<Address>().is_ok());
        let e = "tcp:somehost:4444".parse::<Address>().unwrap_err();
        assert!(e.contains("not an IP address"), "{e}");
        assert!("unix:".parse::<Address>().is_err());
        let e = "/run/m.sock".parse::<Address>().unwrap_err();
        assert!(e.contains("unix:PATH or tcp:HOST:PORT"), "{e}");
        match resolve("tcp:localhost:4444").unwrap() {
            Address::Tcp(a) => assert!(a.ip().is_loopback() && a.port() == 4444, "{a}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn params_take_defaults_and_are_checked() {
        let p: MigrateParams = serde_json::from_str(r#"{"to": "unix:/m"}"#).unwrap();
        assert_eq!(p.downtime_ms, DEFAULT_DOWNTIME_MS);
        assert!(p.validate().is_ok());
        let p = MigrateParams {
            to: Address::Tcp("127.0.0.1:1".parse().unwrap()),
            local: true,
            ..p
        };
        assert!(p.validate().unwrap_err().contains("Unix socket"));
    }
}
