//! Loading a Linux kernel, its initrd and command line into guest memory, and describing
//! memory to it: the zero page for the Linux 64-bit boot protocol, or the `hvm_start_info`
//! for PVH when an ELF `vmlinux` carries the Xen PVH entry note.
//!
//! The heavy lifting is linux-loader's; this module adds the checks that turn a wrong file
//! into a message a user can act on (not a kernel, wrong architecture, truncated, too old,
//! does not fit in memory) before the loader sees it.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::*;
use crate::vstate::memory::{ram_ranges, GuestMemoryMmap};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;
/// A kernel vmlinux is a fixed-address executable; programs and libraries are ET_DYN.
const ET_EXEC: u16 = 2;
const PT_LOAD: u32 = 1;
/// "HdrS" at offset 0x202 marks a bzImage (Linux boot protocol 2.00+).
const BZIMAGE_MAGIC: u32 = 0x5372_6448;
const SETUP_HEADER_OFFSET: u64 = 0x1f1;
/// Boot protocol 2.12 added `xloadflags` and with it a declared 64-bit entry point.
const MIN_BOOT_PROTOCOL: u16 = 0x020c;
/// `xloadflags` bit: the kernel has the 64-bit entry at `code32_start + 0x200`.
const XLF_KERNEL_64: u16 = 1 << 0;
/// Offset of the 64-bit entry from the start of the protected-mode kernel.
const BZIMAGE_ENTRY_64_OFFSET: u64 = 0x200;
/// `loadflags` bit: the protected-mode code is loaded at 0x100000.
const LOADED_HIGH: u8 = 1 << 0;
/// `type_of_loader` value for a boot loader without an assigned id.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// Where a kernel without a header (ELF) may find its initrd at most: the boot protocol's
/// historic default `initrd_addr_max`.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;
/// Magic of `hvm_start_info` (xen/include/public/arch-x86/hvm/start_info.h).
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
const PAGE_SIZE: u64 = 4096;

/// Errors loading a kernel or writing boot data.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("Failed to read the {what} {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a Linux kernel: {why}")]
    NotAKernel { path: PathBuf, why: &'static str },
    #[error("{path} is not an x86_64 kernel: {detail}")]
    WrongArch { path: PathBuf, detail: String },
    #[error("{path} is truncated or corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "The bzImage {path} uses boot protocol {major}.{minor:02}{no64}; ferrovm needs 2.12 or \
         later with a 64-bit entry point (Linux 3.8 or newer, built for x86_64)",
        major = version >> 8,
        minor = version & 0xff,
        no64 = if *version >= MIN_BOOT_PROTOCOL { " without a 64-bit entry point" } else { "" }
    )]
    BzImageTooOld { path: PathBuf, version: u16 },
    #[error(
        "Guest memory of {mem_mib} MiB is too small: the kernel needs up to {kernel_end:#x}{initrd} \
         but RAM below the MMIO gap ends at {ram_end:#x}; give a larger --memory",
        initrd = if *initrd_size > 0 { format!(" and the initrd {initrd_size} more bytes") } else { String::new() }
    )]
    MemoryTooSmall {
        mem_mib: u64,
        kernel_end: u64,
        initrd_size: u64,
        ram_end: u64,
    },
    #[error("Failed to load the kernel {path}")]
    Load {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("Failed to copy the initrd into guest memory")]
    InitrdCopy(#[source] vm_memory::GuestMemoryError),
    #[error("The kernel command line is invalid")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("Failed to write the kernel command line to guest memory")]
    CmdlineLoad(#[source] linux_loader::loader::Error),
    #[error("Failed to write the boot parameters to guest memory")]
    BootParams(#[source] linux_loader::configurator::Error),
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// Long mode with paging, `rsi` pointing at the zero page.
    Linux64,
    /// 32-bit protected mode without paging, `rbx` pointing at `hvm_start_info`.
    Pvh,
}

/// Where and how to start the kernel once it is in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelEntry {
    pub entry: GuestAddress,
    pub protocol: BootProtocol,
}

/// The kernel image formats ferrovm boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// One e820 entry: start, size, type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// A kernel file checked without touching guest memory.
#[derive(Debug, Clone)]
pub struct KernelImage {
    pub path: PathBuf,
    pub format: KernelFormat,
    /// First byte past everything the kernel may touch while it starts (image, bss and, for a
    /// bzImage, the in-place decompression buffer of `init_size` bytes).
    pub end: u64,
    /// The bzImage setup header, handed back in the zero page.
    header: Option<setup_header>,
}

/// Where everything goes: the output of `plan_boot`, the input of `load_kernel`.
#[derive(Debug, Clone)]
pub struct BootPlan {
    pub kernel: KernelImage,
    /// Initrd path, guest address and size.
    pub initrd: Option<(PathBuf, GuestAddress, u64)>,
}

/// Checks the kernel and initrd files and that they fit in `mem_size` bytes of guest RAM,
/// before any VM exists, so bad input is reported the same with or without KVM.
pub fn plan_boot(
    kernel: &Path,
    initrd: Option<&Path>,
    mem_size: u64,
) -> Result<BootPlan, BootError> {
    let image = inspect_kernel(kernel)?;
    let ram_end = ram_ranges(mem_size)[0].1 as u64;
    let too_small = |initrd_size| BootError::MemoryTooSmall {
        mem_mib: mem_size >> 20,
        kernel_end: image.end,
        initrd_size,
        ram_end,
    };
    if image.end > ram_end {
        return Err(too_small(0));
    }
    let initrd = match initrd {
        Some(path) => {
            let size = std::fs::metadata(path)
                .map_err(|source| BootError::Read {
                    what: "initrd",
                    path: path.into(),
                    source,
                })?
                .len();
            let addr_max = image
                .header
                .map(|h| u64::from(h.initrd_addr_max))
                .filter(|&m| m != 0)
                .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
            let addr = initrd_addr(ram_end, addr_max, size, image.end).ok_or(too_small(size))?;
            Some((path.to_path_buf(), GuestAddress(addr), size))
        }
        None => None,
    };
    Ok(BootPlan {
        kernel: image,
        initrd,
    })
}

/// The initrd goes at the top of low RAM (below the kernel's `initrd_addr_max`), page
/// aligned, as boot loaders place it; `None` if it would overlap the kernel.
fn initrd_addr(ram_end: u64, addr_max: u64, size: u64, kernel_end: u64) -> Option<u64> {
    ram_end
        .min(addr_max.saturating_add(1))
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|&a| a >= kernel_end)
}

/// Loads what `plan` describes into guest memory and writes the command line and the boot
/// parameters; returns where the boot vCPU starts.
/// `rsdp` is the address of the ACPI tables' root, handed to the kernel when the VM has
/// them.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    plan: &BootPlan,
    cmdline: &Cmdline,
    rsdp: Option<u64>,
) -> Result<KernelEntry, BootError> {
    let entry = load_image(mem, &plan.kernel)?;
    let initrd = match &plan.initrd {
        Some((path, addr, size)) => {
            let mut file = File::open(path).map_err(|source| BootError::Read {
                what: "initrd",
                path: path.clone(),
                source,
            })?;
            mem.read_exact_volatile_from(*addr, &mut file, *size as usize)
                .map_err(BootError::InitrdCopy)?;
            Some((*addr, *size))
        }
        None => None,
    };

    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(BootError::CmdlineLoad)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .as_bytes()
        .len();

    let e820 = e820_map(mem);
    match entry.protocol {
        BootProtocol::Pvh => write_pvh_start_info(mem, &e820, initrd, rsdp),
        BootProtocol::Linux64 => write_zero_page(
            mem,
            plan.kernel.header,
            &e820,
            initrd,
            cmdline_len as u32,
            rsdp,
        ),
    }?;
    Ok(entry)
}

/// Tells an ELF vmlinux from a bzImage by their magic numbers.
pub fn detect_format(head: &[u8]) -> Option<KernelFormat> {
    if head.len() >= 4 && &head[..4] == ELF_MAGIC {
        return Some(KernelFormat::Elf);
    }
    if head.len() >= 0x206
        && u32::from_le_bytes(head[0x202..0x206].try_into().unwrap()) == BZIMAGE_MAGIC
    {
        return Some(KernelFormat::BzImage);
    }
    None
}

/// Reads and validates a kernel file's headers.
pub fn inspect_kernel(path: &Path) -> Result<KernelImage, BootError> {
    let read_err = |source| BootError::Read {
        what: "kernel",
        path: path.into(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let file_len = file.metadata().map_err(read_err)?.len();
    let mut head = vec![0u8; 4096.min(file_len as usize)];
    file.read_exact(&mut head).map_err(read_err)?;
    let (format, end, header) = match detect_format(&head) {
        Some(KernelFormat::Elf) => (
            KernelFormat::Elf,
            check_elf(path, &mut file, file_len)?,
            None,
        ),
        Some(KernelFormat::BzImage) => {
            let hdr = check_bzimage(path, &head, file_len)?;
            let end = u64::from(hdr.code32_start) + u64::from(hdr.init_size).max(file_len);
            (KernelFormat::BzImage, end, Some(hdr))
        }
        None => {
            return Err(BootError::NotAKernel {
                path: path.into(),
                why: "expected an ELF vmlinux or a bzImage (no ELF magic, no 'HdrS' boot \
                      signature at offset 0x202)",
            })
        }
    };
    Ok(KernelImage {
        path: path.to_path_buf(),
        format,
        end,
        header,
    })
}

fn load_image(mem: &GuestMemoryMmap, image: &KernelImage) -> Result<KernelEntry, BootError> {
    let path = &image.path;
    let mut file = File::open(path).map_err(|source| BootError::Read {
        what: "kernel",
        path: path.clone(),
        source,
    })?;
    let load_err = |source| BootError::Load {
        path: path.clone(),
        source,
    };
    let himem = Some(GuestAddress(HIMEM_START));
    match image.format {
        KernelFormat::Elf => {
            let res = Elf::load(mem, None, &mut file, himem).map_err(load_err)?;
            Ok(match res.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => KernelEntry {
                    entry: addr,
                    protocol: BootProtocol::Pvh,
                },
                _ => KernelEntry {
                    entry: res.kernel_load,
                    protocol: BootProtocol::Linux64,
                },
            })
        }
        KernelFormat::BzImage => {
            let res = BzImage::load(mem, None, &mut file, himem).map_err(load_err)?;
            Ok(KernelEntry {
                entry: GuestAddress(res.kernel_load.0 + BZIMAGE_ENTRY_64_OFFSET),
                protocol: BootProtocol::Linux64,
            })
        }
    }
}

fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// Validates an ELF kernel's header and program headers; returns the end of its highest
/// loadable segment (physical address + memory size).
fn check_elf(path: &Path, file: &mut File, file_len: u64) -> Result<u64, BootError> {
    let corrupt = |detail: String| BootError::Corrupt {
        path: path.into(),
        detail,
    };
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_exact(&mut ehdr))
        .map_err(|_| {
            corrupt(format!(
                "the ELF header needs 64 bytes, the file has {file_len}"
            ))
        })?;
    if ehdr[4] != ELFCLASS64 {
        return Err(BootError::WrongArch {
            path: path.into(),
            detail: "it is a 32-bit ELF file (ELF class 1); use a 64-bit vmlinux or a bzImage"
                .into(),
        });
    }
    if ehdr[5] != ELFDATA2LSB {
        return Err(BootError::WrongArch {
            path: path.into(),
            detail: "it is a big-endian ELF file".into(),
        });
    }
    let elf_type = le16(&ehdr, 16);
    if elf_type != ET_EXEC {
        return Err(BootError::NotAKernel {
            path: path.into(),
            why: "it is an ELF program or library, not an executable vmlinux (ET_EXEC)",
        });
    }
    let machine = le16(&ehdr, 18);
    if machine != EM_X86_64 {
        return Err(BootError::WrongArch {
            path: path.into(),
            detail: format!("its ELF machine type is {machine}, x86_64 is {EM_X86_64}"),
        });
    }
    let phoff = le64(&ehdr, 32);
    let phentsize = u64::from(le16(&ehdr, 54));
    let phnum = u64::from(le16(&ehdr, 56));
    if phentsize != 56 {
        return Err(corrupt(format!(
            "program header entry size {phentsize}, expected 56"
        )));
    }
    let ph_end = phoff
        .checked_add(phnum * phentsize)
        .filter(|&e| e <= file_len)
        .ok_or_else(|| corrupt(format!("{phnum} program headers at {phoff:#x} extend past the end of the file ({file_len} bytes)")))?;
    let mut phdrs = vec![0u8; (ph_end - phoff) as usize];
    file.seek(SeekFrom::Start(phoff))
        .and_then(|_| file.read_exact(&mut phdrs))
        .map_err(|e| corrupt(format!("cannot read the program headers: {e}")))?;

    let mut end = 0u64;
    let mut loadable = 0;
    for (i, ph) in phdrs.chunks_exact(56).enumerate() {
        if le32(ph, 0) != PT_LOAD {
            continue;
        }
        loadable += 1;
        let (offset, paddr, filesz, memsz) =
            (le64(ph, 8), le64(ph, 24), le64(ph, 32), le64(ph, 40));
        let file_end = offset.checked_add(filesz);
        if file_end.is_none_or(|e| e > file_len) {
            return Err(corrupt(format!(
                "segment {i} needs bytes up to {:#x} but the file has {file_len} bytes",
                offset.saturating_add(filesz)
            )));
        }
        if paddr < HIMEM_START {
            return Err(corrupt(format!(
                "segment {i} loads at {paddr:#x}, below 1 MiB where the boot data lives"
            )));
        }
        let seg_end = paddr
            .checked_add(memsz.max(filesz))
            .ok_or_else(|| corrupt(format!("segment {i} size overflows")))?;
        end = end.max(seg_end);
    }
    if loadable == 0 {
        return Err(corrupt("it has no loadable segment".into()));
    }
    file.seek(SeekFrom::Start(0))
        .map_err(|e| corrupt(format!("cannot seek: {e}")))?;
    Ok(end)
}

/// Validates a bzImage's setup header (Documentation/arch/x86/boot.rst) and returns it.
fn check_bzimage(path: &Path, head: &[u8], file_len: u64) -> Result<setup_header, BootError> {
    let corrupt = |detail: String| BootError::Corrupt {
        path: path.into(),
        detail,
    };
    let off = SETUP_HEADER_OFFSET as usize;
    let hdr_len = std::mem::size_of::<setup_header>();
    if head.len() < off + hdr_len {
        return Err(corrupt("the setup header is cut short".into()));
    }
    let hdr: setup_header = vm_memory::ByteValued::from_slice(&head[off..off + hdr_len])
        .copied()
        .ok_or_else(|| corrupt("the setup header is cut short".into()))?;
    let version = hdr.version;
    let xloadflags = hdr.xloadflags;
    if version < MIN_BOOT_PROTOCOL || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::BzImageTooOld {
            path: path.into(),
            version,
        });
    }
    if hdr.loadflags & LOADED_HIGH == 0 {
        return Err(corrupt("it is a zImage loaded low, not a bzImage".into()));
    }
    let setup_sects = if hdr.setup_sects == 0 {
        4
    } else {
        u64::from(hdr.setup_sects)
    };
    let expected = (setup_sects + 1) * 512 + u64::from(hdr.syssize) * 16;
    if file_len < expected {
        return Err(corrupt(format!(
            "the header announces {expected} bytes but the file has {file_len}"
        )));
    }
    Ok(hdr)
}

/// The guest's physical memory map: low RAM, the reserved EBDA and BIOS areas (where the
/// ACPI tables and the MP table live), RAM from 1 MiB, and RAM above 4 GiB when there is any.
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<E820Entry> {
    use vm_memory::GuestMemoryRegion;
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: 0xa0000 - EBDA_START,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: ACPI_START,
            size: BIOS_END - ACPI_START,
            kind: E820_RESERVED,
        },
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    e820: &[E820Entry],
    initrd: Option<(GuestAddress, u64)>,
    cmdline_len: u32,
    rsdp: Option<u64>,
) -> Result<(), BootError> {
    let mut params = boot_params {
        // Boot protocol 2.14: where the ACPI RSDP is, so the kernel need not scan for it.
        acpi_rsdp_addr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    if let Some(h) = header {
        params.hdr = h;
    } else {
        params.hdr.boot_flag = BOOT_FLAG_MAGIC;
        params.hdr.header = BZIMAGE_MAGIC;
        params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr.0 as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::BootParams)
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    e820: &[E820Entry],
    initrd: Option<(GuestAddress, u64)>,
    rsdp: Option<u64>,
) -> Result<(), BootError> {
    let info_size = std::mem::size_of::<hvm_start_info>() as u64;
    let memmap_addr = PVH_INFO_START + info_size;
    let memmap_size = (e820.len() * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
    let modlist_addr = memmap_addr + memmap_size;

    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        // Version 1 adds the memory map.
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: memmap_addr,
        memmap_entries: e820.len() as u32,
        rsdp_paddr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    if initrd.is_some() {
        info.nr_modules = 1;
        info.modlist_paddr = modlist_addr;
    }
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(memmap_addr));
    if let Some((addr, size)) = initrd {
        params.set_modules(
            &[hvm_modlist_entry {
                paddr: addr.0,
                size,
                ..Default::default()
            }],
            GuestAddress(modlist_addr),
        );
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(BootError::BootParams)
}

/// Builds the kernel command line from the user's line plus the VMM's own parameters, keeping
/// anything after ` -- ` (arguments for init) at the end where the kernel expects it.
pub fn build_cmdline(user: &str, extra: &[String]) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::try_from(user, CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    for e in extra {
        cmdline.insert_str(e).map_err(BootError::Cmdline)?;
    }
    Ok(cmdline)
}

/// Minimal kernel images, for the loader's tests and the fuzz seeds.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod test_images {
    use super::*;
    use vm_memory::ByteValued;

    /// A minimal x86_64 ELF with one PT_LOAD segment of `code` at `paddr` and, optionally,
    /// a PT_NOTE carrying the Xen PVH entry note.
    pub fn make_elf(paddr: u64, code: &[u8], memsz: u64, pvh_entry: Option<u32>) -> Vec<u8> {
        let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
        let phoff = 64u64;
        let data_off = phoff + 56 * u64::from(phnum);
        let note_off = data_off + code.len() as u64;
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(ELF_MAGIC);
        b[4] = ELFCLASS64;
        b[5] = ELFDATA2LSB;
        b[6] = 1;
        b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        b[24..32].copy_from_slice(&paddr.to_le_bytes()); // e_entry
        b[32..40].copy_from_slice(&phoff.to_le_bytes());
        b[52..54].copy_from_slice(&64u16.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&phnum.to_le_bytes());
        let mut ph = |ty: u32, off: u64, addr: u64, filesz: u64, memsz: u64| {
            let mut p = vec![0u8; 56];
            p[0..4].copy_from_slice(&ty.to_le_bytes());
            p[8..16].copy_from_slice(&off.to_le_bytes());
            p[16..24].copy_from_slice(&addr.to_le_bytes());
            p[24..32].copy_from_slice(&addr.to_le_bytes());
            p[32..40].copy_from_slice(&filesz.to_le_bytes());
            p[40..48].copy_from_slice(&memsz.to_le_bytes());
            p[48..56].copy_from_slice(&4u64.to_le_bytes());
            b.extend_from_slice(&p);
        };
        ph(PT_LOAD, data_off, paddr, code.len() as u64, memsz);
        let mut note = Vec::new();
        if let Some(entry) = pvh_entry {
            // Elf64_Nhdr: namesz, descsz, type (XEN_ELFNOTE_PHYS32_ENTRY = 18), "Xen\0", entry.
            note.extend_from_slice(&4u32.to_le_bytes());
            note.extend_from_slice(&4u32.to_le_bytes());
            note.extend_from_slice(&18u32.to_le_bytes());
            note.extend_from_slice(b"Xen\0");
            note.extend_from_slice(&entry.to_le_bytes());
            ph(4, note_off, 0, note.len() as u64, note.len() as u64);
        }
        b.extend_from_slice(code);
        b.extend_from_slice(&note);
        b
    }

    /// A minimal bzImage: boot sector + one setup sector + `payload`, with a 2.15 header.
    pub fn make_bzimage(version: u16, xloadflags: u16, payload: &[u8], init_size: u32) -> Vec<u8> {
        let mut b = vec![0u8; 1024];
        let mut hdr = setup_header {
            setup_sects: 1,
            boot_flag: BOOT_FLAG_MAGIC,
            header: BZIMAGE_MAGIC,
            version,
            loadflags: LOADED_HIGH,
            code32_start: HIMEM_START as u32,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            xloadflags,
            init_size,
            ..Default::default()
        };
        hdr.syssize = payload.len().div_ceil(16) as u32;
        let off = SETUP_HEADER_OFFSET as usize;
        b[off..off + std::mem::size_of::<setup_header>()].copy_from_slice(hdr.as_slice());
        b.extend_from_slice(payload);
        b.resize(1024 + hdr.syssize as usize * 16, 0);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::test_images::{make_bzimage, make_elf};
    use super::*;
    use crate::vstate::memory::create_guest_memory;
    use std::io::Write;
    use vmm_sys_util::tempfile::TempFile;

    const MIB: u64 = 1 << 20;

    fn file_with(content: &[u8]) -> TempFile {
        let f = TempFile::new().unwrap();
        f.as_file().write_all(content).unwrap();
        f
    }

    fn cmdline() -> Cmdline {
        build_cmdline("console=ttyS0", &[]).unwrap()
    }

    /// Plans and loads like the VMM does.
    fn boot(
        mem: &GuestMemoryMmap,
        kernel: &Path,
        initrd: Option<&Path>,
    ) -> Result<KernelEntry, BootError> {
        use vm_memory::GuestMemoryRegion;
        let size = mem.iter().map(|r| r.len()).sum();
        let plan = plan_boot(kernel, initrd, size)?;
        load_kernel(mem, &plan, &cmdline(), Some(ACPI_START))
    }

    #[test]
    fn detects_formats() {
        assert_eq!(detect_format(b"\x7fELF\x02\x01"), Some(KernelFormat::Elf));
        let bz = make_bzimage(0x020f, XLF_KERNEL_64, &[0x90; 32], 0x1000);
        assert_eq!(detect_format(&bz), Some(KernelFormat::BzImage));
        assert_eq!(detect_format(&[0u8; 4096]), None);
        assert_eq!(detect_format(b"\x7fEL"), None);
    }

    #[test]
    fn loads_elf_via_linux64_and_writes_zero_page() {
        let mem = create_guest_memory(64 * MIB).unwrap();
        let code = [0xf4u8; 64];
        let k = file_with(&make_elf(0x100_0000, &code, 0x2000, None));
        let entry = boot(&mem, k.as_path(), None).unwrap();
        assert_eq!(entry.protocol, BootProtocol::Linux64);
        assert_eq!(entry.entry, GuestAddress(0x100_0000));
        let mut loaded = [0u8; 64];
        mem.read_slice(&mut loaded, GuestAddress(0x100_0000))
            .unwrap();
        assert_eq!(loaded, code);

        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.header }, BZIMAGE_MAGIC);
        assert_eq!(hdr.type_of_loader, LOADER_TYPE_UNDEFINED);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, "console=ttyS0".len() as u32);
        assert_eq!({ hdr.ramdisk_size }, 0);
        assert_eq!(params.e820_entries, 4);
        assert_eq!(
            { params.acpi_rsdp_addr },
            ACPI_START,
            "RSDP in the zero page"
        );
        let mut cl = [0u8; 14];
        mem.read_slice(&mut cl, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&cl, b"console=ttyS0\0");
    }

    #[test]
    fn elf_with_pvh_note_boots_via_pvh() {
        let mem = create_guest_memory(64 * MIB).unwrap();
        let k = file_with(&make_elf(0x100_0000, &[0xf4; 16], 16, Some(0x100_0008)));
        let initrd = file_with(&[0xabu8; 5000]);
        let entry = boot(&mem, k.as_path(), Some(initrd.as_path())).unwrap();
        assert_eq!(entry.protocol, BootProtocol::Pvh);
        assert_eq!(entry.entry, GuestAddress(0x100_0008));

        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.memmap_entries, 4);
        assert_eq!(info.rsdp_paddr, ACPI_START, "RSDP in the start info");
        assert_eq!(info.nr_modules, 1);
        let first: hvm_memmap_table_entry = mem.read_obj(GuestAddress(info.memmap_paddr)).unwrap();
        assert_eq!(
            (first.addr, first.size, first.type_),
            (0, EBDA_START, E820_RAM)
        );
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!(module.size, 5000);
        assert_eq!(module.paddr % PAGE_SIZE, 0);
        assert!(module.paddr + module.size <= 64 * MIB);
        let byte: u8 = mem.read_obj(GuestAddress(module.paddr + 4999)).unwrap();
        assert_eq!(byte, 0xab);
    }

    #[test]
    fn loads_bzimage_with_64bit_entry_and_initrd() {
        let mem = create_guest_memory(64 * MIB).unwrap();
        let payload = [0x90u8; 4096];
        let k = file_with(&make_bzimage(
            0x020f,
            XLF_KERNEL_64,
            &payload,
            8 * MIB as u32,
        ));
        let initrd = file_with(&[7u8; 10000]);
        let entry = boot(&mem, k.as_path(), Some(initrd.as_path())).unwrap();
        assert_eq!(entry.protocol, BootProtocol::Linux64);
        assert_eq!(
            entry.entry,
            GuestAddress(HIMEM_START + BZIMAGE_ENTRY_64_OFFSET)
        );
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.version }, 0x020f);
        assert_eq!({ hdr.ramdisk_size }, 10000);
        let rd = u64::from(hdr.ramdisk_image);
        assert_eq!(rd % PAGE_SIZE, 0);
        assert!(
            rd >= HIMEM_START + 8 * MIB,
            "initrd must not overlap the decompressor"
        );
        assert!(rd + 10000 <= 64 * MIB);
    }

    #[test]
    fn rejects_old_bzimage() {
        let mem = create_guest_memory(64 * MIB).unwrap();
        let k = file_with(&make_bzimage(0x020a, 0, &[0; 64], 0x1000));
        let err = boot(&mem, k.as_path(), None).unwrap_err();
        assert!(matches!(
            err,
            BootError::BzImageTooOld {
                version: 0x020a,
                ..
            }
        ));
        assert!(err.to_string().contains("boot protocol 2.10"), "{err}");

        let k = file_with(&make_bzimage(0x020f, 0, &[0; 64], 0x1000));
        let err = boot(&mem, k.as_path(), None).unwrap_err();
        assert!(
            err.to_string().contains("without a 64-bit entry point"),
            "{err}"
        );
    }

    #[test]
    fn rejects_truncated_bzimage() {
        let mem = create_guest_memory(64 * MIB).unwrap();
        let mut img = make_bzimage(0x020f, XLF_KERNEL_64, &[0; 8192], 0x1000);
        img.truncate(3000);
        let k = file_with(&img);
        let err = boot(&mem, k.as_path(), None).unwrap_err();
        assert!(matches!(err, BootError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn rejects_random_bytes() {
        let mem = create_guest_memory(64 * MIB).unwrap();
        let noise: Vec<u8> = (0..8192u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let k = file_with(&noise);
        let err = boot(&mem, k.as_path(), None).unwrap_err();
        assert!(matches!(err, BootError::NotAKernel { .. }));
        assert!(err.to_string().contains("is not a Linux kernel"));
    }

    #[test]
    fn rejects_truncated_elf() {
        let mem = create_guest_memory(64 * MIB).unwrap();
        let mut img = make_elf(0x100_0000, &[0x90; 4096], 4096, None);
        img.truncate(img.len() - 100);
        let k = file_with(&img);
        let err = boot(&mem, k.as_path(), None).unwrap_err();
        assert!(matches!(err, BootError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("segment 0"), "{err}");

        let k = file_with(&img[..40]);
        let err = boot(&mem, k.as_path(), None).unwrap_err();
        assert!(err.to_string().contains("ELF header"), "{err}");
    }

    #[test]
    fn rejects_non_x86_64_elf() {
        let mem = create_guest_memory(64 * MIB).unwrap();
        let mut img = make_elf(0x100_0000, &[0; 16], 16, None);
        img[18] = 183; // EM_AARCH64
        let k = file_with(&img);
        let err = boot(&mem, k.as_path(), None).unwrap_err();
        assert!(matches!(err, BootError::WrongArch { .. }), "{err}");
        img[4] = 1;
        let k = file_with(&img);
        let err = boot(&mem, k.as_path(), None).unwrap_err();
        assert!(err.to_string().contains("32-bit"), "{err}");
    }

    #[test]
    fn rejects_kernel_larger_than_memory() {
        let mem = create_guest_memory(16 * MIB).unwrap();
        let k = file_with(&make_elf(0x100_0000, &[0; 16], 32 * MIB, None));
        let err = boot(&mem, k.as_path(), None).unwrap_err();
        assert!(matches!(err, BootError::MemoryTooSmall { .. }), "{err}");
        assert!(err.to_string().contains("give a larger --memory"));
    }

    #[test]
    fn rejects_initrd_that_does_not_fit() {
        let mem = create_guest_memory(16 * MIB).unwrap();
        let k = file_with(&make_elf(0x20_0000, &[0; 16], 4 * MIB, None));
        let initrd = file_with(&vec![0u8; 12 * MIB as usize]);
        let err = boot(&mem, k.as_path(), Some(initrd.as_path())).unwrap_err();
        assert!(
            matches!(err, BootError::MemoryTooSmall { initrd_size, .. } if initrd_size == 12 * MIB)
        );
        assert!(err.to_string().contains("initrd"), "{err}");
    }

    #[test]
    fn e820_map_covers_ram_and_reserves_bios_areas() {
        let mem = create_guest_memory(128 * MIB).unwrap();
        let map = e820_map(&mem);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820_RAM
            }
        );
        assert!(map.iter().any(|e| e.kind == E820_RESERVED
            && e.addr <= ACPI_START
            && e.addr + e.size >= BIOS_END));
        assert_eq!(
            map.last().unwrap(),
            &E820Entry {
                addr: HIMEM_START,
                size: 128 * MIB - HIMEM_START,
                kind: E820_RAM
            }
        );
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, 128 * MIB - (BIOS_END - EBDA_START));
    }

    #[test]
    fn e820_map_splits_around_the_mmio_gap() {
        let mem = create_guest_memory(4096 * MIB).unwrap();
        let map = e820_map(&mem);
        let high = map.last().unwrap();
        assert_eq!(high.addr, MMIO_GAP_END);
        assert_eq!(high.size, 4096 * MIB - MMIO_GAP_START);
        assert!(map
            .iter()
            .all(|e| e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END));
    }

    #[test]
    fn cmdline_keeps_init_args_last() {
        let cl = build_cmdline(
            "console=ttyS0 -- echo hi",
            &["virtio_mmio.device=4K@0xd0000000:5".to_string()],
        )
        .unwrap();
        let s = cl.as_cstring().unwrap().into_string().unwrap();
        assert_eq!(
            s,
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 -- echo hi"
        );
    }

    #[test]
    fn cmdline_rejects_overflow() {
        let long = "a".repeat(CMDLINE_MAX_SIZE - 10);
        let err = build_cmdline(&long, &["0123456789abcdef".to_string()]).unwrap_err();
        assert!(matches!(err, BootError::Cmdline(_)));
    }
}
