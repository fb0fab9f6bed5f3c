//! The destination side: wait for one source, take its configuration, memory and state.
//!
//! This runs before the VM exists, on the main thread, before any seccomp filter. What it
//! returns ([`Incoming`]) is what `Vmm::incoming` builds the VM from; the connection stays
//! open so the build's outcome goes back to the source (OK, or ERROR with the reason).

use std::fs::File;
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use log::info;
use serde::Deserialize;
use serde_json::json;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::protocol::{records, Conn, Frame, Kind, ProtocolError, PAGE_SIZE};
use super::{Address, MigrationError};
use crate::config::VmConfig;
use crate::persist::{MemoryRegion, Snapshot};
use crate::vstate::memory::{
    create_guest_memory_with, map_file_memory, ram_ranges, GuestMemoryMmap, MemoryBacking,
};

/// How long the source may stay silent between frames (it pauses the VM and takes its
/// state; in test mode it hashes all of RAM).
const SOURCE_TIMEOUT: Duration = Duration::from_secs(300);

/// What the source sent first.
#[derive(Deserialize)]
struct Hello {
    ferrovm: String,
    local: bool,
    config: VmConfig,
    memory: Vec<MemoryRegion>,
}

/// A received VM, ready to be built.
pub struct Incoming {
    pub conn: Conn,
    pub snapshot: Box<Snapshot>,
    pub mem: GuestMemoryMmap,
    /// Local mode: each NIC's TAP (by NIC name), handed over by the source.
    pub taps: Vec<(String, OwnedFd)>,
    pub local: bool,
    /// When the source's state arrived (the guest is paused on the source from about then).
    pub state_at: Instant,
    pub source_version: String,
    pub pages: u64,
}

/// Tells the source the VM runs here (the source then exits).
pub fn accept(conn: &mut Conn, build_ms: u64) -> Result<(), ProtocolError> {
    conn.send_json(Kind::Ok, &json!({ "build_ms": build_ms }), None)
}

/// Tells the source the VM could not be built here (the source resumes it).
pub fn refuse(conn: &mut Conn, why: &str) {
    let _ = conn.send_json(Kind::Error, &json!({ "error": why }), None);
}

/// Listens on `addr` and takes one migration.
pub fn receive(addr: &Address) -> Result<Incoming, MigrationError> {
    let mut conn = wait_for_source(addr)?;
    conn.set_timeout(Some(SOURCE_TIMEOUT))
        .map_err(|e| MigrationError::Protocol(e.into()))?;
    match take(&mut conn) {
        Ok(p) => Ok(Incoming {
            conn,
            snapshot: p.snapshot,
            mem: p.mem,
            taps: p.taps,
            local: p.local,
            state_at: p.state_at,
            source_version: p.source_version,
            pages: p.pages,
        }),
        Err(e) => {
            // A source that sent garbage or gave up is told why, when it still listens.
            if !matches!(
                e,
                MigrationError::Protocol(ProtocolError::Peer(_) | ProtocolError::Closed)
            ) {
                let _ = conn.send_json(
                    Kind::Error,
                    &json!({ "error": crate::vmm::error_chain(&e) }),
                    None,
                );
            }
            Err(e)
        }
    }
}

fn wait_for_source(addr: &Address) -> Result<Conn, MigrationError> {
    let lerr = |e| MigrationError::Listen(addr.clone(), e);
    let aerr = |e| MigrationError::Accept(addr.clone(), e);
    let conn = match addr {
        Address::Unix(path) => {
            if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
                let _ = std::fs::remove_file(path);
            }
            let l = UnixListener::bind(path).map_err(lerr)?;
            eprintln!("ferrovm: waiting for a migration on {addr}");
            let (s, _) = l.accept().map_err(aerr)?;
            let _ = std::fs::remove_file(path);
            Conn::Unix(s)
        }
        Address::Tcp(a) => {
            let l = TcpListener::bind(a).map_err(lerr)?;
            eprintln!("ferrovm: waiting for a migration on {addr}");
            let (s, peer) = l.accept().map_err(aerr)?;
            info!("Migration connection from {peer}");
            let _ = s.set_nodelay(true);
            Conn::Tcp(s)
        }
    };
    Ok(conn)
}

fn unexpected(f: &Frame, want: &'static str) -> MigrationError {
    match f.kind {
        Kind::Abort => MigrationError::Protocol(
            Frame {
                kind: f.kind,
                payload: f.payload.clone(),
                fd: None,
            }
            .into_peer_error(),
        ),
        got => MigrationError::Protocol(ProtocolError::Unexpected { got, want }),
    }
}

/// What `take` receives.
struct Parts {
    snapshot: Box<Snapshot>,
    mem: GuestMemoryMmap,
    taps: Vec<(String, OwnedFd)>,
    local: bool,
    state_at: Instant,
    source_version: String,
    pages: u64,
}

fn take(conn: &mut Conn) -> Result<Parts, MigrationError> {
    conn.send_preamble()?;
    conn.read_preamble()?;
    let first = conn.recv()?;
    if first.kind != Kind::Config {
        return Err(unexpected(&first, "the configuration"));
    }
    let hello: Hello = first.json()?;
    let cfg = &hello.config;
    cfg.validate_machine()
        .map_err(|e| MigrationError::Refused(crate::vmm::error_chain(&e)))?;
    let want: Vec<(u64, u64)> = ram_ranges(cfg.mem_bytes())
        .iter()
        .map(|(a, l)| (a.0, *l as u64))
        .collect();
    let got: Vec<(u64, u64)> = hello.memory.iter().map(|r| (r.guest_addr, r.len)).collect();
    if want != got {
        return Err(MigrationError::Refused(format!(
            "its memory layout {got:x?} is not the one this ferrovm gives {} MiB ({want:x?})",
            cfg.mem_mib
        )));
    }
    let mem = if hello.local {
        let fd = first.fd.ok_or_else(|| {
            MigrationError::Refused("local mode, but the memory fd did not come".into())
        })?;
        let file = File::from(fd);
        let regions: Vec<_> = hello
            .memory
            .iter()
            .map(|r| (GuestAddress(r.guest_addr), r.len as usize, r.file_offset))
            .collect();
        map_file_memory(&file, &regions, true)
            .map_err(|e| MigrationError::Memory(format!("mapped: {e}")))?
    } else {
        let backing = if cfg.needs_shared_memory() {
            MemoryBacking::Shared
        } else {
            MemoryBacking::Private
        };
        create_guest_memory_with(cfg.mem_bytes(), backing)
            .map_err(|e| MigrationError::Memory(format!("created: {e}")))?
    };
    info!(
        "Incoming migration from ferrovm {}: {} MiB, {} vCPUs, {}",
        hello.ferrovm,
        cfg.mem_mib,
        cfg.vcpus,
        if hello.local {
            "local (memory handed over)"
        } else {
            "memory copied"
        }
    );
    conn.send_json(Kind::Ok, &json!({}), None)?;

    let mut pages = 0u64;
    let mut snapshot: Option<Box<Snapshot>> = None;
    let mut state_at = Instant::now();
    let mut taps = Vec::new();
    loop {
        let f = conn.recv()?;
        match f.kind {
            Kind::Pages if !hello.local => pages += write_pages(&mem, &f.payload)?,
            Kind::State => {
                let snap: Snapshot = f.json()?;
                if snap.vcpus.len() != usize::from(cfg.vcpus) {
                    return Err(MigrationError::Refused(format!(
                        "{} vCPU states for {} vCPUs",
                        snap.vcpus.len(),
                        cfg.vcpus
                    )));
                }
                state_at = Instant::now();
                snapshot = Some(Box::new(snap));
                conn.send_json(Kind::Ok, &json!({}), None)?;
            }
            Kind::Verify => {
                #[derive(Deserialize)]
                struct Verify {
                    ram_hash: String,
                }
                let v: Verify = f.json()?;
                let mine = super::dirty::ram_hash(&mem);
                if mine != v.ram_hash {
                    return Err(MigrationError::Refused(format!(
                        "guest RAM differs after the transfer: the source's hash is {}, this \
                         side's {mine} (a write the dirty tracking missed)",
                        v.ram_hash
                    )));
                }
                info!("Guest RAM hash {mine} matches the source's");
                conn.send_json(Kind::Ok, &json!({ "ram_hash": mine }), None)?;
            }
            Kind::Tap if hello.local => {
                #[derive(Deserialize)]
                struct Tap {
                    nic: String,
                }
                let t: Tap = f.json()?;
                let fd = f.fd.ok_or_else(|| {
                    MigrationError::Refused(format!("the fd of {}'s TAP did not come", t.nic))
                })?;
                taps.push((t.nic, fd));
            }
            Kind::Commit => break,
            _ => return Err(unexpected(&f, "pages, the state or the commit")),
        }
    }
    let snapshot = snapshot.ok_or(MigrationError::Protocol(ProtocolError::Unexpected {
        got: Kind::Commit,
        want: "the state",
    }))?;
    if serde_json::to_value(&snapshot.config).ok() != serde_json::to_value(&hello.config).ok() {
        return Err(MigrationError::Refused(
            "the state is of another configuration than the one announced".into(),
        ));
    }
    Ok(Parts {
        snapshot,
        mem,
        taps,
        local: hello.local,
        state_at,
        source_version: hello.ferrovm,
        pages,
    })
}

/// Writes one PAGES frame into guest memory; returns the pages it held. A record outside
/// guest memory is the source's error, not a reason to write anywhere else.
fn write_pages(mem: &GuestMemoryMmap, payload: &[u8]) -> Result<u64, MigrationError> {
    let mut n = 0;
    let zero = [0u8; PAGE_SIZE as usize];
    for r in records(payload)? {
        let len = u64::from(r.pages) * PAGE_SIZE;
        let outside = || {
            MigrationError::Protocol(ProtocolError::Malformed {
                kind: Kind::Pages,
                why: format!("{} pages at {:#x} are outside guest memory", r.pages, r.gpa),
            })
        };
        let region = mem.find_region(GuestAddress(r.gpa)).ok_or_else(outside)?;
        if r.gpa - region.start_addr().0 + len > region.len() {
            return Err(outside());
        }
        match r.data {
            Some(d) => mem
                .write_slice(d, GuestAddress(r.gpa))
                .map_err(|_| outside())?,
            None => {
                // Only pages that are not zero already: writing touches (allocates) them.
                for p in 0..u64::from(r.pages) {
                    let at = GuestAddress(r.gpa + p * PAGE_SIZE);
                    let mut cur = [0u8; PAGE_SIZE as usize];
                    mem.read_slice(&mut cur, at).map_err(|_| outside())?;
                    if cur != zero {
                        mem.write_slice(&zero, at).map_err(|_| outside())?;
                    }
                }
            }
        }
        n += u64::from(r.pages);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::protocol::push_record;

    #[test]
    fn pages_land_where_they_say_and_outside_is_refused() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_obj(0xffu8, GuestAddress(0x3000)).unwrap();
        let mut frame = Vec::new();
        push_record(&mut frame, 0x1000, 1, Some(&[5u8; 4096]));
        push_record(&mut frame, 0x3000, 1, None);
        assert_eq!(write_pages(&mem, &frame).unwrap(), 2);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1fff)).unwrap(), 5);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 0);
        let mut bad = Vec::new();
        push_record(&mut bad, 0xff000, 2, None);
        let e = crate::vmm::error_chain(&write_pages(&mem, &bad).unwrap_err());
        assert!(e.contains("outside guest memory"), "{e}");
    }
}
