//! Disk backends shared by the paravirtual (virtio-blk) and emulated (IDE) disk models: the
//! same raw image serves both, so the two can be compared on the same data.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress};

use crate::vstate::memory::GuestMemoryMmap;

/// Disks are addressed in 512-byte sectors by both models.
pub const SECTOR_SIZE: u64 = 512;

/// Errors opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("Failed to open the disk image {path}{ro}", ro = if *readonly { " read-only" } else { " for reading and writing" })]
    Open {
        path: PathBuf,
        readonly: bool,
        #[source]
        source: io::Error,
    },
    #[error("Failed to find the size of the disk image {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("The disk image {path} is {size} bytes, not a multiple of 512")]
    Unaligned { path: PathBuf, size: u64 },
}

/// Where a disk's data lives, for every disk model.
pub trait BlockBackend: Send {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset` into a host buffer (the emulated IDE disk moves
    /// data through its port-I/O sector buffer).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `buf` at `offset`.
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Reads `len` bytes at `offset` into guest memory at `addr`.
    fn read_to(
        &mut self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        offset: u64,
        len: usize,
    ) -> io::Result<()>;
    /// Writes `len` bytes from guest memory at `addr` to `offset`.
    fn write_from(
        &mut self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        offset: u64,
        len: usize,
    ) -> io::Result<()>;
    /// Makes everything written so far durable.
    fn flush(&mut self) -> io::Result<()>;
}

/// A raw image file.
pub struct RawFile {
    file: File,
    size: u64,
}

impl RawFile {
    /// Opens `path`, read-only or read-write; the size must be a whole number of sectors.
    pub fn open(path: &Path, readonly: bool) -> Result<Self, DiskError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: path.into(),
                readonly,
                source,
            })?;
        // seek(End) also gives the size of a block device, where metadata().len() is 0.
        let size = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|source| DiskError::Size {
                path: path.into(),
                source,
            })?;
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(DiskError::Unaligned {
                path: path.into(),
                size,
            });
        }
        Ok(Self { file, size })
    }
}

pub(crate) fn guest_io_error(e: vm_memory::GuestMemoryError) -> io::Error {
    io::Error::other(e.to_string())
}

impl BlockBackend for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn read_to(
        &mut self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        offset: u64,
        len: usize,
    ) -> io::Result<()> {
        self.file.seek(SeekFrom::Start(offset))?;
        mem.read_exact_volatile_from(addr, &mut self.file, len)
            .map_err(guest_io_error)
    }

    fn write_from(
        &mut self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        offset: u64,
        len: usize,
    ) -> io::Result<()> {
        self.file.seek(SeekFrom::Start(offset))?;
        mem.write_all_volatile_to(addr, &mut self.file, len)
            .map_err(guest_io_error)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

impl AsRawFd for RawFile {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_file_backend_reads_writes_and_flushes() {
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        f.as_file().set_len(8192).unwrap();
        let mut disk = RawFile::open(f.as_path(), false).unwrap();
        assert_eq!(disk.size(), 8192);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_slice(&[7u8; 512], GuestAddress(0x1000)).unwrap();
        disk.write_from(&mem, GuestAddress(0x1000), 1024, 512)
            .unwrap();
        disk.flush().unwrap();
        let mut back = [0u8; 512];
        disk.read_at(1024, &mut back).unwrap();
        assert_eq!(back, [7u8; 512]);
        disk.write_at(2048, &[9u8; 512]).unwrap();
        disk.read_to(&mem, GuestAddress(0x3000), 2048, 512).unwrap();
        mem.read_slice(&mut back, GuestAddress(0x3000)).unwrap();
        assert_eq!(back, [9u8; 512]);
        assert!(
            disk.read_to(&mem, GuestAddress(0x1000), 8192, 512).is_err(),
            "past EOF"
        );
        assert!(
            disk.read_at(8000, &mut back).is_err(),
            "short read past EOF"
        );
    }

    #[test]
    fn raw_file_open_errors() {
        let err = RawFile::open(Path::new("/nonexistent/disk.img"), false)
            .err()
            .unwrap();
        assert!(err
            .to_string()
            .contains("Failed to open the disk image /nonexistent/disk.img"));
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        f.as_file().set_len(1000).unwrap();
        let err = RawFile::open(f.as_path(), true).err().unwrap();
        assert!(matches!(err, DiskError::Unaligned { size: 1000, .. }));
    }
}
