//! Disk backends shared by the paravirtual (virtio-blk) and emulated (IDE) disk models: the
//! same raw image serves both, so the two can be compared on the same data.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::GuestAddress;

use crate::devices::virtio::guest_write::{guest_slices, ChainWriter, GuestSlice};
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
    /// Reads `len` bytes at `offset` into guest memory at `addr`, a buffer of the chain
    /// `dst` writes (the only way a backend writes guest memory, see `guest_write`).
    fn read_to(
        &mut self,
        dst: &ChainWriter,
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
    /// Makes everything written so far durable, through any handle on this disk.
    fn flush(&mut self) -> io::Result<()>;
    /// Reads one request's worth of data at `offset` into guest buffers, one after the other.
    fn read_vectored_to(
        &mut self,
        dst: &ChainWriter,
        bufs: &[GuestBuf],
        offset: u64,
    ) -> io::Result<()> {
        each_buf(bufs, offset, |b, at| self.read_to(dst, b.addr, at, b.len))
    }
    /// Writes the guest buffers, one after the other, at `offset`.
    fn write_vectored_from(
        &mut self,
        mem: &GuestMemoryMmap,
        bufs: &[GuestBuf],
        offset: u64,
    ) -> io::Result<()> {
        each_buf(bufs, offset, |b, at| {
            self.write_from(mem, b.addr, at, b.len)
        })
    }
    /// Another handle on the same disk, for a thread of its own: I/O through either handle
    /// reaches the same data, and `flush` on either covers writes done through both.
    /// Backends that cannot be shared say `Unsupported`; their requests then run one at a time.
    fn try_clone(&self) -> io::Result<Box<dyn BlockBackend>> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// Calls `f` on each buffer with the disk offset it starts at, the buffers being contiguous
/// on the disk from `offset`.
pub(crate) fn each_buf(
    bufs: &[GuestBuf],
    mut offset: u64,
    mut f: impl FnMut(&GuestBuf, u64) -> io::Result<()>,
) -> io::Result<()> {
    for b in bufs {
        f(b, offset)?;
        offset += b.len as u64;
    }
    Ok(())
}

/// A guest buffer of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestBuf {
    pub addr: GuestAddress,
    pub len: usize,
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

    /// A second handle on the image (a migration flushes it before the destination opens
    /// the file).
    pub fn try_clone_file(&self) -> std::io::Result<File> {
        self.file.try_clone()
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
        dst: &ChainWriter,
        addr: GuestAddress,
        offset: u64,
        len: usize,
    ) -> io::Result<()> {
        self.read_vectored_to(dst, &[GuestBuf { addr, len }], offset)
    }

    fn write_from(
        &mut self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        offset: u64,
        len: usize,
    ) -> io::Result<()> {
        self.write_vectored_from(mem, &[GuestBuf { addr, len }], offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn read_vectored_to(
        &mut self,
        dst: &ChainWriter,
        bufs: &[GuestBuf],
        offset: u64,
    ) -> io::Result<()> {
        dst.write_raw(bufs, |slices| {
            guest_io_at(&self.file, slices, offset, Direction::FileToGuest)
        })
    }

    fn write_vectored_from(
        &mut self,
        mem: &GuestMemoryMmap,
        bufs: &[GuestBuf],
        offset: u64,
    ) -> io::Result<()> {
        let slices = guest_slices(mem, bufs)?;
        guest_io_at(&self.file, &slices, offset, Direction::GuestToFile)
    }

    /// A duplicated descriptor: every access is positional, so the shared file offset of
    /// the two descriptors never matters.
    fn try_clone(&self) -> io::Result<Box<dyn BlockBackend>> {
        Ok(Box::new(Self {
            file: self.file.try_clone()?,
            size: self.size,
        }))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    FileToGuest,
    GuestToFile,
}

/// At most this many buffers per preadv/pwritev (Linux's UIO_MAXIOV).
const IOV_MAX: usize = 1024;

/// Moves data between the file at `offset` and guest buffers (their host mappings, one
/// slice per buffer and guest memory region) with preadv/pwritev: one system call for a
/// whole request whatever its number of segments, no bounce buffer, and no file offset
/// shared between the threads that use duplicates of the descriptor.
fn guest_io_at(
    file: &File,
    slices: &[GuestSlice<'_>],
    mut offset: u64,
    direction: Direction,
) -> io::Result<()> {
    let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
    let mut iovs: Vec<libc::iovec> = guards
        .iter()
        .zip(slices)
        .map(|(g, s)| libc::iovec {
            iov_base: g.as_ptr().cast(),
            iov_len: s.len(),
        })
        .collect();
    let mut next = 0;
    while next < iovs.len() {
        let batch = &iovs[next..iovs.len().min(next + IOV_MAX)];
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let count = batch.len() as libc::c_int;
        let done = match direction {
            // SAFETY: every iovec points into a slice of guest memory that get_slices
            // bounds-checked against a mapped guest region; `slices` and `guards` keep those
            // mappings and pointers alive until after the call, and the kernel writes at most
            // iov_len bytes into each. The guest may touch the same memory meanwhile, which is the
            // volatile-memory contract vm-memory's own read_volatile works under.
            Direction::FileToGuest => unsafe {
                libc::preadv(file.as_raw_fd(), batch.as_ptr(), count, off)
            },
            // SAFETY: as above; the kernel only reads from the iovecs.
            Direction::GuestToFile => unsafe {
                libc::pwritev(file.as_raw_fd(), batch.as_ptr(), count, off)
            },
        };
        let mut done = match done {
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            0 => {
                return Err(match direction {
                    Direction::FileToGuest => io::ErrorKind::UnexpectedEof.into(),
                    Direction::GuestToFile => io::ErrorKind::WriteZero.into(),
                })
            }
            n => n as usize,
        };
        offset += done as u64;
        // Skip what was transferred: whole iovecs, then part of the next one.
        while done > 0 {
            let iov = &mut iovs[next];
            if done >= iov.iov_len {
                done -= iov.iov_len;
                next += 1;
            } else {
                iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(done).cast();
                iov.iov_len -= done;
                done = 0;
            }
        }
    }
    Ok(())
}

impl AsRawFd for RawFile {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::guest_write::test_utils::{test_writer, writable_chain};
    use vm_memory::Bytes;

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
        let writer = test_writer(&mem);
        let chain = writable_chain(&[(0x1000, 512), (0x3000, 512)]);
        let dst = writer.chain(&chain);
        disk.read_to(&dst, GuestAddress(0x3000), 2048, 512).unwrap();
        mem.read_slice(&mut back, GuestAddress(0x3000)).unwrap();
        assert_eq!(back, [9u8; 512]);
        assert!(
            disk.read_to(&dst, GuestAddress(0x1000), 8192, 512).is_err(),
            "past EOF"
        );
        assert!(
            disk.read_at(8000, &mut back).is_err(),
            "short read past EOF"
        );
    }

    fn buf(addr: u64, len: usize) -> GuestBuf {
        GuestBuf {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn raw_file_vectored_io_spans_buffers_regions_and_clones() {
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        f.as_file().set_len(16384).unwrap();
        let mut disk = RawFile::open(f.as_path(), false).unwrap();
        // Two regions, so the buffer at 0xff00 is backed by two host mappings.
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x1_0000), 0x1_0000),
        ])
        .unwrap();
        let pattern: Vec<u8> = (0..1536u32).map(|i| (i % 251) as u8).collect();
        mem.write_slice(&pattern[..512], GuestAddress(0x1000))
            .unwrap();
        mem.write_slice(&pattern[512..], GuestAddress(0xff00))
            .unwrap();
        let bufs = [buf(0x1000, 512), buf(0xff00, 1024)];
        disk.write_vectored_from(&mem, &bufs, 4096).unwrap();
        let mut back = vec![0u8; 1536];
        disk.read_at(4096, &mut back).unwrap();
        assert_eq!(back, pattern);

        // A clone reads what the first handle wrote, into other buffers, at its own offset.
        let mut clone = disk.try_clone().unwrap();
        let bufs = [buf(0x8000, 1024), buf(0x2000, 512)];
        let writer = test_writer(&mem);
        let chain = writable_chain(&[(0x8000, 1024), (0x2000, 512)]);
        clone
            .read_vectored_to(&writer.chain(&chain), &bufs, 4096)
            .unwrap();
        let mut got = vec![0u8; 1536];
        mem.read_slice(&mut got[..1024], GuestAddress(0x8000))
            .unwrap();
        mem.read_slice(&mut got[1024..], GuestAddress(0x2000))
            .unwrap();
        assert_eq!(got, pattern);
        clone.flush().unwrap();

        // Past the end of the file, or of guest memory: an error, not a short transfer.
        assert!(clone
            .read_vectored_to(&writer.chain(&chain), &bufs, 16384 - 512)
            .is_err());
        let outside = [buf(0x1_ff00, 512)];
        assert!(clone.write_vectored_from(&mem, &outside, 0).is_err());
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
