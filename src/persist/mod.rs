//! Snapshots: a directory holding the VM's state (`state`) and its guest memory (`memory`).
//!
//! `state` is one versioned file with a checksum:
//! ```text
//! FERROVM-SNAPSHOT\n
//! format 1\n
//! length <bytes of the JSON below>\n
//! crc32 <IEEE CRC-32 of the JSON, 8 hex digits>\n
//! \n
//! <JSON: ferrovm's version, the VM configuration, the memory layout, the in-kernel
//!  devices, every vCPU, every device model>
//! ```
//! A file of another format version, or whose length or checksum does not match, is
//! refused with a message saying which. `memory` is guest RAM, region after region, pages of
//! zeros left as holes; it is mapped `MAP_PRIVATE` on restore, so restoring reads only the
//! pages the guest touches, and a restored VM never writes back into the snapshot (two
//! restores of one snapshot are independent clones). Its size is checked; its contents are
//! not checksummed, which would mean reading all of it.
//!
//! The state file is written last (to `state.tmp`, then renamed), so a directory with a
//! `state` file holds a complete snapshot.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::config::VmConfig;
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::VmState;

/// The format version this ferrovm writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const MAGIC: &str = "FERROVM-SNAPSHOT";
pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";
const PAGE: usize = 4096;
/// Largest state file read (the JSON of a VM is a few hundred KiB).
const MAX_STATE: u64 = 256 << 20;

/// Errors writing or reading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("Failed to create the snapshot directory {0}")]
    CreateDir(PathBuf, #[source] io::Error),
    #[error("The snapshot directory {0} already holds a snapshot; give a new or empty directory")]
    NotEmpty(PathBuf),
    #[error("Failed to write {0}")]
    Write(PathBuf, #[source] io::Error),
    #[error("Failed to read {0}")]
    Read(PathBuf, #[source] io::Error),
    #[error("{0} is not a ferrovm snapshot (no {MAGIC} header)")]
    NotASnapshot(PathBuf),
    #[error("{path} is a snapshot of format {found}; this ferrovm ({version}) reads format {FORMAT_VERSION} only", version = env!("CARGO_PKG_VERSION"))]
    Version { path: PathBuf, found: String },
    #[error("{path} is damaged: {why}")]
    Damaged { path: PathBuf, why: String },
    #[error("Failed to serialize the VM state")]
    Serialize(#[source] serde_json::Error),
}

/// Where each guest memory region is in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    pub guest_addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// Everything in a snapshot but guest memory.
#[derive(Serialize, Deserialize)]
pub struct Snapshot {
    /// The ferrovm that wrote it, for messages.
    pub ferrovm: String,
    pub config: VmConfig,
    pub memory: Vec<MemoryRegion>,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    /// Each device model's state, by the id the device manager gives it.
    pub devices: BTreeMap<String, serde_json::Value>,
    /// Milliseconds the guest had run when the snapshot was taken.
    pub uptime_ms: u64,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("ferrovm", &self.ferrovm)
            .field("vcpus", &self.vcpus.len())
            .field("devices", &self.devices.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The memory layout of `mem` as the memory file holds it.
pub fn memory_layout(mem: &GuestMemoryMmap) -> Vec<MemoryRegion> {
    let mut off = 0;
    mem.iter()
        .map(|r| {
            let m = MemoryRegion {
                guest_addr: r.start_addr().0,
                len: r.len(),
                file_offset: off,
            };
            off += r.len();
            m
        })
        .collect()
}

/// Creates `dir` for a new snapshot (it may exist, empty).
pub fn create_dir(dir: &Path) -> Result<(), PersistError> {
    std::fs::create_dir_all(dir).map_err(|e| PersistError::CreateDir(dir.into(), e))?;
    let busy = std::fs::read_dir(dir)
        .map_err(|e| PersistError::CreateDir(dir.into(), e))?
        .next()
        .is_some();
    if busy {
        return Err(PersistError::NotEmpty(dir.into()));
    }
    Ok(())
}

/// Writes guest memory to `dir/memory`, skipping zero pages (left as holes); returns the
/// bytes written.
pub fn write_memory(dir: &Path, mem: &GuestMemoryMmap) -> Result<u64, PersistError> {
    let path = dir.join(MEMORY_FILE);
    let werr = |e| PersistError::Write(path.clone(), e);
    let file = File::create(&path).map_err(werr)?;
    let layout = memory_layout(mem);
    let total: u64 = layout.iter().map(|r| r.len).sum();
    file.set_len(total).map_err(werr)?;
    let mut written = 0u64;
    const CHUNK: u64 = 1 << 20;
    for (region, m) in mem.iter().zip(&layout) {
        let mut off = 0u64;
        while off < m.len {
            let n = CHUNK.min(m.len - off) as usize;
            // Runs of non-zero pages, each one pwrite, straight from guest memory (read in
            // place: the vCPUs are paused).
            crate::vstate::memory::read_in_place(region, off, n, |buf| -> io::Result<()> {
                let zero =
                    |q: usize| crate::vstate::memory::is_zero_page(&buf[q..(q + PAGE).min(n)]);
                let mut p = 0;
                while p < n {
                    if zero(p) {
                        p += PAGE;
                        continue;
                    }
                    let start = p;
                    while p < n && !zero(p) {
                        p += PAGE;
                    }
                    let end = p.min(n);
                    file.write_all_at(&buf[start..end], m.file_offset + off + start as u64)?;
                    written += (end - start) as u64;
                }
                Ok(())
            })
            .ok_or_else(|| werr(io::Error::other("guest memory outside its region")))?
            .map_err(werr)?;
            off += n as u64;
        }
    }
    file.sync_all().map_err(werr)?;
    Ok(written)
}

/// IEEE CRC-32 (the zlib/PNG one).
pub fn crc32(data: &[u8]) -> u32 {
    let mut table = [0u32; 256];
    for (i, t) in table.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
        *t = c;
    }
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// Writes `snap` to `dir/state` (through `state.tmp`); returns the file's size.
pub fn write_state(dir: &Path, snap: &Snapshot) -> Result<u64, PersistError> {
    let json = serde_json::to_vec(snap).map_err(PersistError::Serialize)?;
    let tmp = dir.join("state.tmp");
    let path = dir.join(STATE_FILE);
    let werr = |e| PersistError::Write(path.clone(), e);
    let mut f = File::create(&tmp).map_err(werr)?;
    write!(
        f,
        "{MAGIC}\nformat {FORMAT_VERSION}\nlength {}\ncrc32 {:08x}\n\n",
        json.len(),
        crc32(&json)
    )
    .map_err(werr)?;
    f.write_all(&json).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    std::fs::rename(&tmp, &path).map_err(werr)?;
    Ok(std::fs::metadata(&path).map_err(werr)?.len())
}

/// Reads and checks `dir/state`.
pub fn read_state(dir: &Path) -> Result<Snapshot, PersistError> {
    let path = dir.join(STATE_FILE);
    let mut data = Vec::new();
    File::open(&path)
        .map_err(|e| PersistError::Read(path.clone(), e))?
        .take(MAX_STATE)
        .read_to_end(&mut data)
        .map_err(|e| PersistError::Read(path.clone(), e))?;
    parse_state(&path, &data)
}

fn parse_state(path: &Path, data: &[u8]) -> Result<Snapshot, PersistError> {
    let damaged = |why: String| PersistError::Damaged {
        path: path.into(),
        why,
    };
    let mut lines = data.splitn(6, |&b| b == b'\n');
    let mut next = || {
        lines
            .next()
            .map(|l| String::from_utf8_lossy(l).into_owned())
    };
    if next().as_deref() != Some(MAGIC) {
        return Err(PersistError::NotASnapshot(path.into()));
    }
    let format = next().unwrap_or_default();
    match format.strip_prefix("format ") {
        Some(v) if v == FORMAT_VERSION.to_string() => {}
        Some(v) => {
            return Err(PersistError::Version {
                path: path.into(),
                found: v.into(),
            })
        }
        None => return Err(damaged("no format line".into())),
    }
    let length: usize = next()
        .and_then(|l| l.strip_prefix("length ")?.parse().ok())
        .ok_or_else(|| damaged("no length line".into()))?;
    let crc = next()
        .and_then(|l| u32::from_str_radix(l.strip_prefix("crc32 ")?, 16).ok())
        .ok_or_else(|| damaged("no checksum line".into()))?;
    if next().as_deref() != Some("") {
        return Err(damaged("no blank line after the header".into()));
    }
    let json = lines.next().unwrap_or_default();
    if json.len() != length {
        return Err(damaged(format!(
            "the header says {length} bytes of state, the file has {} (cut short?)",
            json.len()
        )));
    }
    if crc32(json) != crc {
        return Err(damaged("the checksum does not match the contents".into()));
    }
    serde_json::from_slice(json).map_err(|e| damaged(format!("unreadable state: {e}")))
}

/// Opens `dir/memory` for mapping and checks its size against the layout.
pub fn open_memory(dir: &Path, layout: &[MemoryRegion]) -> Result<File, PersistError> {
    let path = dir.join(MEMORY_FILE);
    let file = OpenOptions::new()
        .read(true)
        .open(&path)
        .map_err(|e| PersistError::Read(path.clone(), e))?;
    let want: u64 = layout.iter().map(|r| r.len).sum();
    let have = file
        .metadata()
        .map_err(|e| PersistError::Read(path.clone(), e))?
        .len();
    if have != want {
        return Err(PersistError::Damaged {
            path,
            why: format!("guest memory of {want} bytes expected, the file has {have}"),
        });
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    fn header(json: &[u8], format: &str, crc: u32) -> Vec<u8> {
        let mut v = format!(
            "{MAGIC}\nformat {format}\nlength {}\ncrc32 {crc:08x}\n\n",
            json.len()
        )
        .into_bytes();
        v.extend_from_slice(json);
        v
    }

    #[test]
    fn damaged_truncated_and_foreign_state_files_are_refused() {
        let p = Path::new("/snap/state");
        let json = br#"{"x": 1}"#;
        let good = header(json, "1", crc32(json));
        // Well-formed header, but not a Snapshot: unreadable state, still "damaged".
        assert!(matches!(
            parse_state(p, &good),
            Err(PersistError::Damaged { .. })
        ));
        let err = parse_state(p, &header(json, "2", crc32(json))).unwrap_err();
        assert!(matches!(err, PersistError::Version { .. }));
        assert!(err.to_string().contains("format 2"), "{err}");
        let mut flipped = good.clone();
        let n = flipped.len();
        flipped[n - 2] ^= 1;
        let err = parse_state(p, &flipped).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        let err = parse_state(p, &good[..good.len() - 3]).unwrap_err();
        assert!(err.to_string().contains("cut short"), "{err}");
        assert!(matches!(
            parse_state(p, b"\x7fELF garbage"),
            Err(PersistError::NotASnapshot(_))
        ));
        assert!(matches!(
            parse_state(p, b""),
            Err(PersistError::NotASnapshot(_))
        ));
    }

    #[test]
    fn memory_is_written_sparse_and_sized_to_the_layout() {
        let dir = std::env::temp_dir().join(format!("ferrovm-persist-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        create_dir(&dir).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_slice(&[7u8; 100], GuestAddress(0x3000)).unwrap();
        mem.write_slice(&[9u8; 5000], GuestAddress(0x8_0000))
            .unwrap();
        let written = write_memory(&dir, &mem).unwrap();
        assert_eq!(written, 3 * 4096, "one page, then two pages");
        let layout = memory_layout(&mem);
        let f = open_memory(&dir, &layout).unwrap();
        let mut b = [0u8; 4];
        f.read_exact_at(&mut b, 0x3000).unwrap();
        assert_eq!(b, [7; 4]);
        f.read_exact_at(&mut b, 0x8_1000 + 900).unwrap();
        assert_eq!(b, [9; 4]);
        assert!(matches!(create_dir(&dir), Err(PersistError::NotEmpty(_))));
        let short = [MemoryRegion {
            guest_addr: 0,
            len: 2 << 20,
            file_offset: 0,
        }];
        assert!(matches!(
            open_memory(&dir, &short),
            Err(PersistError::Damaged { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
