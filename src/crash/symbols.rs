//! The guest kernel's text symbols, to show an address as `symbol+0xoff/0xsize` the way the
//! kernel's own oops does (`%pS`, kallsyms: the size runs to the next symbol).
//!
//! Two sources: the `.symtab` of an ELF `vmlinux` (a small ELF64 reader: section headers,
//! the symbol table and its string table; System V gABI, "Sections" and "Symbol Table"), or
//! a `System.map` (`nm -n` output: address, type, name per line). Which one is picked, and
//! where a System.map is looked for, is [`SymbolSource::find`]. The file is opened while the
//! VM is built and only read when a crash report needs it, so a VM that does not crash pays
//! nothing and the main thread's seccomp filter needs no `open`.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Errors finding or reading a symbol table.
#[derive(Debug, thiserror::Error)]
pub enum SymbolError {
    #[error("Failed to open the System.map {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Failed to read the System.map {path}: its first line is not `ADDRESS TYPE NAME`")]
    NotSystemMap { path: PathBuf },
    #[error("Failed to read the symbols of {path}: {why}")]
    Read { path: PathBuf, why: String },
}

/// A symbol: start address, name, and the distance to the next symbol (0 for the last).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Symbol {
    addr: u64,
    size: u64,
    name: String,
}

/// Text symbols sorted by address.
#[derive(Debug, Default)]
pub struct SymbolTable {
    symbols: Vec<Symbol>,
}

/// Past the last symbol, addresses this close still belong to it.
const LAST_SYMBOL_REACH: u64 = 0x1000;

impl SymbolTable {
    /// A table from (address, name) pairs in any order; sizes run to the next address.
    fn from_symbols(mut pairs: Vec<(u64, String)>) -> Self {
        pairs.sort();
        pairs.dedup_by_key(|(addr, _)| *addr);
        let mut symbols: Vec<Symbol> = pairs
            .into_iter()
            .map(|(addr, name)| Symbol {
                addr,
                size: 0,
                name,
            })
            .collect();
        for i in 1..symbols.len() {
            symbols[i - 1].size = symbols[i].addr - symbols[i - 1].addr;
        }
        Self { symbols }
    }

    /// Parses `nm -n` output: `ffffffff81000000 T _text`; text symbols (T, t, W, w) only.
    pub fn from_system_map(text: impl BufRead) -> Self {
        let pairs = text
            .lines()
            .map_while(Result::ok)
            .filter_map(|line| {
                let (addr, kind, name) = parse_map_line(&line)?;
                matches!(kind, 'T' | 't' | 'W' | 'w').then(|| (addr, name.to_owned()))
            })
            .collect();
        Self::from_symbols(pairs)
    }

    /// Reads the `.symtab` of an ELF64 little-endian file: function and untyped symbols
    /// defined in executable sections.
    pub fn from_elf(file: &impl FileExt) -> Result<Self, String> {
        let elf = Elf::headers(file)?;
        let (symtab, strtab) = elf
            .symtab()
            .ok_or("no .symtab section (a stripped kernel)")?;
        let syms = read_section(file, symtab)?;
        let names = read_section(file, strtab)?;
        let mut pairs = Vec::new();
        for sym in syms.chunks_exact(SYM_LEN) {
            let name_off = u32le(sym, 0) as usize;
            let kind = sym[4] & 0xf;
            let shndx = usize::from(u16le(sym, 6));
            let value = u64le(sym, 8);
            let executable = elf
                .sections
                .get(shndx)
                .is_some_and(|s| s.flags & SHF_EXECINSTR != 0);
            if !(kind == STT_FUNC || kind == STT_NOTYPE) || !executable || value == 0 {
                continue;
            }
            let name = names
                .get(name_off..)
                .and_then(|n| n.split(|&b| b == 0).next())
                .filter(|n| !n.is_empty())
                .map(|n| String::from_utf8_lossy(n).into_owned());
            if let Some(name) = name {
                pairs.push((value, name));
            }
        }
        if pairs.is_empty() {
            return Err("no text symbols in .symtab".into());
        }
        Ok(Self::from_symbols(pairs))
    }

    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// `addr` as `symbol+0xoff/0xsize` (or `symbol+0xoff` past the last symbol); None when
    /// it is below every symbol or far past the last.
    pub fn describe(&self, addr: u64) -> Option<String> {
        let i = self
            .symbols
            .partition_point(|s| s.addr <= addr)
            .checked_sub(1)?;
        let s = &self.symbols[i];
        let off = addr - s.addr;
        if s.size == 0 {
            (off < LAST_SYMBOL_REACH).then(|| format!("{}+{off:#x}", s.name))
        } else {
            Some(format!("{}+{off:#x}/{:#x}", s.name, s.size))
        }
    }
}

/// `ADDRESS TYPE NAME`, the name without a trailing module tag.
fn parse_map_line(line: &str) -> Option<(u64, char, &str)> {
    let mut words = line.split_whitespace();
    let addr = u64::from_str_radix(words.next()?, 16).ok()?;
    let kind = words.next()?;
    let name = words.next()?;
    let mut chars = kind.chars();
    match (chars.next(), chars.next()) {
        (Some(k), None) if k.is_ascii_alphabetic() => Some((addr, k, name)),
        _ => None,
    }
}

// ELF64 (System V gABI): header and section header fields used here.
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EHDR_LEN: usize = 64;
const SHDR_LEN: usize = 64;
const SYM_LEN: usize = 24;
const SHT_SYMTAB: u32 = 2;
const SHF_EXECINSTR: u64 = 0x4;
const STT_NOTYPE: u8 = 0;
const STT_FUNC: u8 = 2;
/// More than any kernel has; a bigger count is a corrupt header.
const MAX_SECTIONS: usize = 1 << 16;
/// A symbol or string table this large is not a kernel's.
const MAX_TABLE_LEN: u64 = 256 << 20;

#[derive(Clone, Copy, Debug)]
struct Section {
    kind: u32,
    flags: u64,
    offset: u64,
    size: u64,
    link: u32,
}

struct Elf {
    sections: Vec<Section>,
}

fn u16le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64le(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn read_at(file: &impl FileExt, offset: u64, len: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)
        .map_err(|e| format!("cannot read {len} bytes at {offset:#x}: {e}"))?;
    Ok(buf)
}

fn read_section(file: &impl FileExt, s: Section) -> Result<Vec<u8>, String> {
    if s.size > MAX_TABLE_LEN {
        return Err(format!("a {}-byte symbol section", s.size));
    }
    read_at(file, s.offset, s.size as usize)
}

impl Elf {
    /// Reads the ELF header and the section headers.
    fn headers(file: &impl FileExt) -> Result<Self, String> {
        let h = read_at(file, 0, EHDR_LEN)?;
        if &h[..4] != ELF_MAGIC || h[4] != ELFCLASS64 || h[5] != ELFDATA2LSB {
            return Err("not a 64-bit little-endian ELF file".into());
        }
        let shoff = u64le(&h, 0x28);
        let shentsize = usize::from(u16le(&h, 0x3a));
        let shnum = usize::from(u16le(&h, 0x3c));
        if shnum == 0 || shnum > MAX_SECTIONS || shentsize != SHDR_LEN {
            return Err("no usable section headers".into());
        }
        let table = read_at(file, shoff, shnum * SHDR_LEN)?;
        let sections = table
            .chunks_exact(SHDR_LEN)
            .map(|s| Section {
                kind: u32le(s, 4),
                flags: u64le(s, 8),
                offset: u64le(s, 24),
                size: u64le(s, 32),
                link: u32le(s, 40),
            })
            .collect();
        Ok(Self { sections })
    }

    /// The symbol table and the string table its names are in.
    fn symtab(&self) -> Option<(Section, Section)> {
        let symtab = *self.sections.iter().find(|s| s.kind == SHT_SYMTAB)?;
        let strtab = *self.sections.get(symtab.link as usize)?;
        Some((symtab, strtab))
    }
}

/// Where a kernel's symbols come from, opened while the VM is built.
#[derive(Debug)]
pub struct SymbolSource {
    pub path: PathBuf,
    file: File,
    elf: bool,
}

impl SymbolSource {
    /// `system_map` if given (an error if it cannot be opened or is no System.map); else the
    /// kernel's own `.symtab` when it is an ELF file that has one; else a System.map beside
    /// the kernel ([`system_map_candidates`]). None when there is nothing.
    pub fn find(kernel: &Path, system_map: Option<&Path>) -> Result<Option<Self>, SymbolError> {
        if let Some(path) = system_map {
            return Self::system_map(path).map(Some);
        }
        if let Ok(file) = File::open(kernel) {
            if Elf::headers(&file).is_ok_and(|e| e.symtab().is_some()) {
                return Ok(Some(Self {
                    path: kernel.to_owned(),
                    file,
                    elf: true,
                }));
            }
        }
        Ok(system_map_candidates(kernel)
            .iter()
            .find_map(|p| Self::system_map(p).ok()))
    }

    fn system_map(path: &Path) -> Result<Self, SymbolError> {
        let file = File::open(path).map_err(|source| SymbolError::Open {
            path: path.to_owned(),
            source,
        })?;
        // The first line is enough to tell a System.map from another file.
        let mut first = String::new();
        let looks_right = BufReader::new((&file).take(4096))
            .read_line(&mut first)
            .is_ok_and(|_| parse_map_line(&first).is_some());
        if !looks_right {
            return Err(SymbolError::NotSystemMap {
                path: path.to_owned(),
            });
        }
        Ok(Self {
            path: path.to_owned(),
            file,
            elf: false,
        })
    }

    /// What the table is read from, for the report.
    pub fn describe(&self) -> String {
        let kind = if self.elf {
            "ELF .symtab"
        } else {
            "System.map"
        };
        format!("{} ({kind})", self.path.display())
    }

    /// Reads the table (positional reads or a sequential read of the open file).
    pub fn load(&self) -> Result<SymbolTable, SymbolError> {
        let read_err = |why: String| SymbolError::Read {
            path: self.path.clone(),
            why,
        };
        if self.elf {
            SymbolTable::from_elf(&self.file).map_err(read_err)
        } else {
            // The first line was read at `find`: start over from the beginning.
            let reader = PositionalReader {
                file: &self.file,
                offset: 0,
            };
            let table = SymbolTable::from_system_map(BufReader::new(reader));
            if table.is_empty() {
                return Err(read_err("no text symbols".into()));
            }
            Ok(table)
        }
    }
}

/// Reads a file from `offset` on with pread, leaving the file's own offset alone.
struct PositionalReader<'a> {
    file: &'a File,
    offset: u64,
}

impl Read for PositionalReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}

/// Where a System.map for `kernel` may be: `System.map-<release>` beside a kernel named
/// `vmlinuz-<release>` (or vmlinux-, bzImage-), as Debian installs them under /boot, then
/// `System.map` in the same directory, as a kernel build leaves it.
pub fn system_map_candidates(kernel: &Path) -> Vec<PathBuf> {
    let dir = kernel.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    if let Some(name) = kernel.file_name().and_then(|n| n.to_str()) {
        for prefix in ["vmlinuz-", "vmlinux-", "bzImage-"] {
            if let Some(release) = name.strip_prefix(prefix).filter(|r| !r.is_empty()) {
                out.push(dir.join(format!("System.map-{release}")));
            }
        }
    }
    out.push(dir.join("System.map"));
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const MAP: &str = "\
ffffffff81000000 T _text
ffffffff81026650 T native_machine_shutdown
ffffffff81026680 t native_machine_halt
ffffffff810266e0 T machine_emergency_restart
ffffffff81026700 D some_data
ffffffff81026890 t native_machine_emergency_restart
ffffffff81026a40 T native_machine_restart
ffffffff81e00000 T _etext
";

    #[test]
    fn system_map_addresses_are_symbolized_as_the_kernel_does() {
        let t = SymbolTable::from_system_map(MAP.as_bytes());
        assert_eq!(t.len(), 7, "the data symbol is left out");
        assert_eq!(
            t.describe(0xffff_ffff_8102_68a4).as_deref(),
            Some("native_machine_emergency_restart+0x14/0x1b0")
        );
        assert_eq!(
            t.describe(0xffff_ffff_8102_6650).as_deref(),
            Some("native_machine_shutdown+0x0/0x30")
        );
        // The data symbol does not end machine_emergency_restart.
        assert_eq!(
            t.describe(0xffff_ffff_8102_6710).as_deref(),
            Some("machine_emergency_restart+0x30/0x1b0")
        );
        assert_eq!(t.describe(0x40_1000), None, "user space");
        assert_eq!(
            t.describe(0xffff_ffff_81e0_0010).as_deref(),
            Some("_etext+0x10")
        );
        assert_eq!(t.describe(0xffff_ffff_8200_0000), None, "far past the text");
    }

    /// A minimal ELF64 with a .text section and a .symtab naming `syms` (all in .text).
    pub fn tiny_elf_with_symbols(syms: &[(&str, u64, u8)]) -> Vec<u8> {
        let mut strtab = vec![0u8];
        let mut symtab = vec![0u8; SYM_LEN];
        for &(name, value, kind) in syms {
            let mut s = [0u8; SYM_LEN];
            s[..4].copy_from_slice(&(strtab.len() as u32).to_le_bytes());
            s[4] = kind;
            s[6..8].copy_from_slice(&1u16.to_le_bytes()); // in section 1, .text
            s[8..16].copy_from_slice(&value.to_le_bytes());
            symtab.extend_from_slice(&s);
            strtab.extend_from_slice(name.as_bytes());
            strtab.push(0);
        }
        let symtab_off = EHDR_LEN as u64;
        let strtab_off = symtab_off + symtab.len() as u64;
        let shoff = strtab_off + strtab.len() as u64;
        let mut f = vec![0u8; EHDR_LEN];
        f[..4].copy_from_slice(ELF_MAGIC);
        f[4] = ELFCLASS64;
        f[5] = ELFDATA2LSB;
        f[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        f[0x3a..0x3c].copy_from_slice(&(SHDR_LEN as u16).to_le_bytes());
        f[0x3c..0x3e].copy_from_slice(&4u16.to_le_bytes());
        f.extend_from_slice(&symtab);
        f.extend_from_slice(&strtab);
        let shdr = |kind: u32, flags: u64, off: u64, size: u64, link: u32| {
            let mut s = [0u8; SHDR_LEN];
            s[4..8].copy_from_slice(&kind.to_le_bytes());
            s[8..16].copy_from_slice(&flags.to_le_bytes());
            s[24..32].copy_from_slice(&off.to_le_bytes());
            s[32..40].copy_from_slice(&size.to_le_bytes());
            s[40..44].copy_from_slice(&link.to_le_bytes());
            s
        };
        f.extend_from_slice(&[0u8; SHDR_LEN]);
        f.extend_from_slice(&shdr(1, 0x6, 0, 0, 0)); // .text: PROGBITS, alloc+exec
        f.extend_from_slice(&shdr(SHT_SYMTAB, 0, symtab_off, symtab.len() as u64, 3));
        f.extend_from_slice(&shdr(3, 0, strtab_off, strtab.len() as u64, 0)); // STRTAB
        f
    }

    #[test]
    fn elf_symtab_gives_the_text_symbols() {
        let elf = tiny_elf_with_symbols(&[
            ("do_idle", 0xffff_ffff_8107_0000, STT_FUNC),
            ("default_idle", 0xffff_ffff_8107_0200, STT_FUNC),
            ("a_file", 0xffff_ffff_8107_0100, 4), // STT_FILE: not a place in the code
            ("entry_SYSCALL_64", 0xffff_ffff_8107_0400, STT_NOTYPE),
        ]);
        let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
        std::fs::write(file.as_path(), &elf).unwrap();
        let t = SymbolTable::from_elf(file.as_file()).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(
            t.describe(0xffff_ffff_8107_0123).as_deref(),
            Some("do_idle+0x123/0x200")
        );
        assert_eq!(
            t.describe(0xffff_ffff_8107_0401).as_deref(),
            Some("entry_SYSCALL_64+0x1")
        );
        let source = SymbolSource::find(file.as_path(), None).unwrap().unwrap();
        assert!(source.describe().ends_with("(ELF .symtab)"));
        assert_eq!(source.load().unwrap().len(), 3);
    }

    #[test]
    fn a_stripped_or_foreign_file_has_no_table() {
        let from = |bytes: &[u8]| {
            let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
            std::fs::write(file.as_path(), bytes).unwrap();
            SymbolTable::from_elf(file.as_file())
        };
        let mut stripped = tiny_elf_with_symbols(&[("x", 0x1000, STT_FUNC)]);
        // Section 2 is no longer a symbol table.
        let shoff = u64le(&stripped, 0x28) as usize;
        stripped[shoff + 2 * SHDR_LEN + 4] = 1;
        assert!(from(&stripped).unwrap_err().contains("no .symtab"));
        assert!(from(&[0u8; 100]).unwrap_err().contains("not a 64-bit"));
        assert!(from(b"\x7fELF").is_err(), "short file");
    }

    #[test]
    fn system_maps_are_found_beside_the_kernel() {
        assert_eq!(
            system_map_candidates(Path::new("/boot/vmlinuz-6.1.0-18-amd64")),
            [
                PathBuf::from("/boot/System.map-6.1.0-18-amd64"),
                PathBuf::from("/boot/System.map")
            ]
        );
        assert_eq!(
            system_map_candidates(Path::new("build/bzImage")),
            [PathBuf::from("build/System.map")]
        );
        let dir = std::env::temp_dir().join(format!("ferrovm-symbols-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("vmlinuz-6.1.0-test");
        std::fs::write(&kernel, b"not an ELF").unwrap();
        assert!(SymbolSource::find(&kernel, None).unwrap().is_none());
        std::fs::write(dir.join("System.map-6.1.0-test"), MAP).unwrap();
        let found = SymbolSource::find(&kernel, None).unwrap().unwrap();
        assert_eq!(found.path, dir.join("System.map-6.1.0-test"));
        assert_eq!(found.load().unwrap().len(), 7);
        // Given explicitly, a file that is no System.map is an error naming it.
        let err = SymbolSource::find(&kernel, Some(&kernel)).unwrap_err();
        assert!(err.to_string().contains("vmlinuz-6.1.0-test"), "{err}");
        let err = SymbolSource::find(&kernel, Some(&dir.join("missing"))).unwrap_err();
        assert!(
            err.to_string().starts_with("Failed to open the System.map"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
