//! Fuzz targets: each takes arbitrary bytes, builds a device the way the VMM does, drives it
//! as a hostile guest (or a corrupt kernel file) would, and checks what the device must
//! guarantee whatever it is fed: no panic or overflow, an error status for a bad request, a
//! used ring that only holds what the driver offered.
//!
//! The targets are plain functions so that two harnesses share them: the cargo-fuzz crate in
//! `fuzz/` (coverage-guided, nightly only) and [`runner`], a deterministic mutator CI runs on
//! stable for a fixed number of iterations (`scripts/fuzz`). The seed inputs come from
//! [`seeds`], which also writes them to `fuzz/corpus/<target>/`.
//!
//! Compiled for unit tests and with the `fuzzing` feature only; the VMM binary has none of it.

pub mod emulated;
pub mod kernel;
pub mod runner;
pub mod seeds;
pub mod virtio;

use std::io;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};

use crate::devices::disk::{guest_io_error, BlockBackend, RawFile};
use crate::devices::virtio::guest_write::ChainWriter;
use crate::vstate::memory::GuestMemoryMmap;

/// A fuzz target: its name (the corpus directory and the cargo-fuzz target) and entry point.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
}

/// Every target, in the order the runner runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "virtio_block",
        run: virtio::block,
    },
    Target {
        name: "virtio_net",
        run: virtio::net,
    },
    Target {
        name: "virtio_console",
        run: virtio::console,
    },
    Target {
        name: "virtio_mmio",
        run: virtio::mmio,
    },
    Target {
        name: "virtio_pci",
        run: virtio::pci,
    },
    Target {
        name: "ide",
        run: emulated::ide,
    },
    Target {
        name: "ne2k",
        run: emulated::ne2k,
    },
    Target {
        name: "pci",
        run: emulated::pci,
    },
    Target {
        name: "e1000",
        run: emulated::e1000,
    },
    Target {
        name: "bmdma",
        run: emulated::bmdma,
    },
    Target {
        name: "kernel_loader",
        run: kernel::loader,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// Fuzz input read as a stream of little-endian values. Past the end everything reads as
/// zero, so every input decodes to something and a mutation never makes it unreadable.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A length-prefixed (u16) byte string.
    pub fn blob(&mut self) -> &'a [u8] {
        let n = self.u16();
        self.bytes(usize::from(n))
    }
}

/// The writing side of [`Input`], for the seed generator.
#[derive(Default)]
pub struct InputBuilder(pub Vec<u8>);

impl InputBuilder {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    pub fn blob(&mut self, b: &[u8]) -> &mut Self {
        self.u16(b.len() as u16).bytes(b)
    }
}

/// A raw image file of `sectors` sectors, sector n filled with byte n, as the VMM opens a
/// `--disk` (its I/O threads then `preadv` into guest memory). The file is unlinked at
/// once; the backend keeps it open.
pub fn image_file(sectors: u64) -> RawFile {
    let file = vmm_sys_util::tempfile::TempFile::new().expect("temporary disk image");
    let data: Vec<u8> = (0..sectors * 512).map(|i| (i / 512) as u8).collect();
    std::fs::write(file.as_path(), data).expect("write the temporary disk image");
    RawFile::open(file.as_path(), false).expect("open the temporary disk image")
}

/// A disk in host memory, shared by the virtio-blk and IDE targets. One handle only
/// (`try_clone` is unsupported), so virtio-blk serves requests on one I/O thread, in order.
#[derive(Clone)]
pub struct MemDisk(Arc<Mutex<Vec<u8>>>);

impl MemDisk {
    /// `sectors` sectors, sector n filled with byte n.
    pub fn new(sectors: u64) -> Self {
        let data = (0..sectors * 512).map(|i| (i / 512) as u8).collect();
        Self(Arc::new(Mutex::new(data)))
    }

    /// `len` bytes at `offset`; the device checked the range, so a bad one is a bug there.
    fn range(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let size = self.0.lock().unwrap().len();
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        match start.checked_add(len) {
            Some(end) if end <= size => Ok(start..end),
            _ => panic!("disk access {offset:#x}+{len:#x} past the end of a {size}-byte disk"),
        }
    }
}

impl BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.0.lock().unwrap()[r]);
        Ok(())
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let r = self.range(offset, buf.len())?;
        self.0.lock().unwrap()[r].copy_from_slice(buf);
        Ok(())
    }
    fn read_to(
        &mut self,
        dst: &ChainWriter,
        addr: GuestAddress,
        offset: u64,
        len: usize,
    ) -> io::Result<()> {
        let r = self.range(offset, len)?;
        dst.write_slice(&self.0.lock().unwrap()[r], addr)
            .map_err(guest_io_error)
    }
    fn write_from(
        &mut self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        offset: u64,
        len: usize,
    ) -> io::Result<()> {
        let r = self.range(offset, len)?;
        mem.read_slice(&mut self.0.lock().unwrap()[r], addr)
            .map_err(guest_io_error)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
