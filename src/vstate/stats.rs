//! KVM's own per-vCPU counters, read through its binary statistics interface
//! (`KVM_GET_STATS_FD`, Linux 5.14+, Documentation/virt/kvm/api.rst 4.133): every exit KVM
//! counts, including those it handles without coming back to the VMM (ioeventfd
//! notifications, HLT, LAPIC EOIs, MSR writes, EPT faults), so that the device models can
//! be compared on all exits and not only those that reach ferrovm.
//!
//! One stats fd per vCPU is opened when the vCPU is created (before the seccomp filters),
//! its header and descriptors parsed once; a report reads each fd's data block with one
//! `pread` and sums the counters over vCPUs (cumulative and instant values summed, peaks
//! taken as the largest; histograms are left out). A host kernel without the interface is
//! reported as such, never as zeros.

use std::fmt::Write as _;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;

use kvm_bindings::{
    KVMIO, KVM_CAP_BINARY_STATS_FD, KVM_STATS_TYPE_CUMULATIVE, KVM_STATS_TYPE_INSTANT,
    KVM_STATS_TYPE_MASK, KVM_STATS_TYPE_PEAK,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);

/// Bytes of `struct kvm_stats_header` and of a `struct kvm_stats_desc` before its name.
const HEADER_LEN: usize = 24;
const DESC_LEN: usize = 16;
/// Sanity bounds on what a header may announce (the kernel's are far smaller).
const MAX_DESCS: usize = 4096;
const MAX_NAME: usize = 256;

/// How a counter combines over vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Summed (cumulative counts and instant values).
    Sum,
    /// The largest (peaks).
    Max,
}

/// One scalar statistic: its name and where its value is in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Desc {
    name: String,
    kind: Kind,
    /// Offset of the value from the start of the data block.
    offset: u64,
}

/// A parsed stats fd layout.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    descs: Vec<Desc>,
    data_offset: u64,
    /// Bytes of the data block the scalars span.
    data_len: usize,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
}

/// Parses the header (`header`, the first 24 bytes of the file) and the descriptor block
/// (`descs`, read from the offset the header gives). Histograms are skipped.
fn parse(header: &[u8], descs: &[u8]) -> Result<Layout, String> {
    if header.len() < HEADER_LEN {
        return Err("short header".into());
    }
    let name_size = u32_at(header, 4) as usize;
    let num_desc = u32_at(header, 8) as usize;
    let data_offset = u64::from(u32_at(header, 20));
    if name_size > MAX_NAME || num_desc > MAX_DESCS {
        return Err(format!(
            "implausible header ({num_desc} descriptors, names of {name_size} bytes)"
        ));
    }
    let stride = DESC_LEN + name_size;
    if descs.len() < stride * num_desc {
        return Err("short descriptor block".into());
    }
    let mut out = Vec::new();
    let mut data_len = 0usize;
    for d in descs.chunks_exact(stride).take(num_desc) {
        let flags = u32_at(d, 0);
        let size = u16::from_ne_bytes([d[6], d[7]]);
        let offset = u32_at(d, 8);
        let name_bytes = &d[DESC_LEN..];
        let end = name_bytes
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(name_bytes.len());
        let name = String::from_utf8_lossy(&name_bytes[..end]).into_owned();
        let kind = match flags & KVM_STATS_TYPE_MASK {
            KVM_STATS_TYPE_CUMULATIVE | KVM_STATS_TYPE_INSTANT => Kind::Sum,
            KVM_STATS_TYPE_PEAK => Kind::Max,
            _ => continue,
        };
        if size != 1 || name.is_empty() {
            continue;
        }
        data_len = data_len.max(offset as usize + 8);
        out.push(Desc {
            name,
            kind,
            offset: u64::from(offset),
        });
    }
    Ok(Layout {
        descs: out,
        data_offset,
        data_len,
    })
}

/// Reads the layout of a stats file.
fn read_layout(file: &File) -> io::Result<Layout> {
    let mut header = [0u8; HEADER_LEN];
    file.read_exact_at(&mut header, 0)?;
    let name_size = u32_at(&header, 4) as usize;
    let num_desc = u32_at(&header, 8) as usize;
    let desc_offset = u64::from(u32_at(&header, 16));
    let len = (DESC_LEN + name_size.min(MAX_NAME)) * num_desc.min(MAX_DESCS);
    let mut descs = vec![0u8; len];
    file.read_exact_at(&mut descs, desc_offset)?;
    parse(&header, &descs).map_err(io::Error::other)
}

/// One vCPU's stats fd.
pub struct VcpuStats {
    file: File,
    layout: Layout,
}

impl VcpuStats {
    /// The values of this vCPU's scalars, in layout order.
    fn values(&self) -> io::Result<Vec<u64>> {
        let mut data = vec![0u8; self.layout.data_len];
        self.file
            .read_exact_at(&mut data, self.layout.data_offset)?;
        Ok(self
            .layout
            .descs
            .iter()
            .map(|d| {
                let at = d.offset as usize;
                u64::from_ne_bytes(data[at..at + 8].try_into().unwrap())
            })
            .collect())
    }
}

/// KVM's counters for every vCPU of the VM, or why there are none.
pub enum KvmStats {
    Available(Vec<VcpuStats>),
    Unavailable(String),
}

/// Opens the stats fd of a vCPU.
fn open_fd(vcpu: &VcpuFd) -> io::Result<File> {
    // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1; it touches no
    // memory of ours.
    let fd = unsafe { ioctl(vcpu, KVM_GET_STATS_FD()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a file descriptor KVM just created for us and nobody else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

impl KvmStats {
    /// Opens every vCPU's stats fd; on a host without them, says why.
    pub fn open<'a>(vm: &VmFd, vcpus: impl Iterator<Item = &'a VcpuFd>) -> Self {
        if vm.check_extension_raw(u64::from(KVM_CAP_BINARY_STATS_FD)) <= 0 {
            return Self::Unavailable(
                "the host kernel has no KVM binary statistics (KVM_CAP_BINARY_STATS_FD, Linux 5.14+)"
                    .into(),
            );
        }
        let mut all = Vec::new();
        for (i, vcpu) in vcpus.enumerate() {
            let opened = open_fd(vcpu).and_then(|file| {
                let layout = read_layout(&file)?;
                Ok(VcpuStats { file, layout })
            });
            match opened {
                Ok(s) => all.push(s),
                Err(e) => {
                    return Self::Unavailable(format!(
                        "Failed to read the KVM statistics of vCPU {i}: {e}"
                    ))
                }
            }
        }
        Self::Available(all)
    }

    /// The counters summed over vCPUs, by name, in KVM's order.
    fn totals(&self) -> io::Result<Vec<(String, u64)>> {
        let Self::Available(vcpus) = self else {
            return Ok(Vec::new());
        };
        let mut totals: Vec<(String, Kind, u64)> = Vec::new();
        for v in vcpus {
            for (d, value) in v.layout.descs.iter().zip(v.values()?) {
                match totals.iter_mut().find(|(n, _, _)| *n == d.name) {
                    Some((_, Kind::Sum, t)) => *t = t.saturating_add(value),
                    Some((_, Kind::Max, t)) => *t = (*t).max(value),
                    None => totals.push((d.name.clone(), d.kind, value)),
                }
            }
        }
        Ok(totals.into_iter().map(|(n, _, v)| (n, v)).collect())
    }

    /// The report's `kvm` object: `{"available": true, "vcpus": N, "counters": {...}}`, or
    /// `{"available": false, "why": "..."}`.
    pub fn to_json(&self) -> String {
        let why = match self {
            Self::Unavailable(why) => why.clone(),
            Self::Available(vcpus) => match self.totals() {
                Ok(totals) => {
                    let mut out = format!(
                        "{{\"available\":true,\"vcpus\":{},\"counters\":{{",
                        vcpus.len()
                    );
                    for (i, (name, v)) in totals.iter().enumerate() {
                        let sep = if i > 0 { "," } else { "" };
                        // KVM's names are C identifiers: no escaping needed.
                        let _ = write!(out, "{sep}\"{name}\":{v}");
                    }
                    out.push_str("}}");
                    return out;
                }
                Err(e) => format!("Failed to read the KVM statistics: {e}"),
            },
        };
        format!(
            "{{\"available\":false,\"why\":\"{}\"}}",
            why.replace('\\', "\\\\").replace('"', "\\\"")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A stats file laid out as api.rst 4.133 describes: header, id, descriptors, data.
    fn stats_file(entries: &[(&str, u32, u16, u64)]) -> File {
        let name_size = 32usize;
        let id_offset = 24u32;
        let desc_offset = id_offset + name_size as u32;
        let desc_len = (16 + name_size) * entries.len();
        let data_offset = (desc_offset as usize + desc_len).next_multiple_of(8) as u32;
        let mut b = Vec::new();
        for v in [
            0u32,
            name_size as u32,
            entries.len() as u32,
            id_offset,
            desc_offset,
            data_offset,
        ] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        let mut id = b"kvm-1234/vcpu-0".to_vec();
        id.resize(name_size, 0);
        b.extend_from_slice(&id);
        let mut data = Vec::new();
        for (name, flags, size, value) in entries {
            b.extend_from_slice(&flags.to_ne_bytes());
            b.extend_from_slice(&0i16.to_ne_bytes());
            b.extend_from_slice(&size.to_ne_bytes());
            b.extend_from_slice(&(data.len() as u32).to_ne_bytes());
            b.extend_from_slice(&0u32.to_ne_bytes());
            let mut n = name.as_bytes().to_vec();
            n.resize(name_size, 0);
            b.extend_from_slice(&n);
            for k in 0..u64::from(*size) {
                data.extend_from_slice(&(value + k).to_ne_bytes());
            }
        }
        b.resize(data_offset as usize, 0);
        b.extend_from_slice(&data);
        let path = std::env::temp_dir().join(format!(
            "ferrovm-kvm-stats-{}-{}",
            std::process::id(),
            entries.len() + entries.first().map_or(0, |e| e.3 as usize)
        ));
        let mut f = File::create(&path).unwrap();
        f.write_all(&b).unwrap();
        let f = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    const CUMULATIVE: u32 = KVM_STATS_TYPE_CUMULATIVE;
    const PEAK: u32 = KVM_STATS_TYPE_PEAK;
    const LOG_HIST: u32 = 4;

    fn vcpu(entries: &[(&str, u32, u16, u64)]) -> VcpuStats {
        let file = stats_file(entries);
        let layout = read_layout(&file).unwrap();
        VcpuStats { file, layout }
    }

    #[test]
    fn counters_are_summed_over_vcpus_peaks_maxed_and_histograms_skipped() {
        let a = vcpu(&[
            ("exits", CUMULATIVE, 1, 100),
            ("halt_poll_success_hist", LOG_HIST, 32, 7),
            ("io_exits", CUMULATIVE, 1, 40),
            ("max_mmu_page_hash_collisions", PEAK, 1, 3),
        ]);
        assert_eq!(a.layout.descs.len(), 3, "the histogram is left out");
        let b = vcpu(&[
            ("exits", CUMULATIVE, 1, 1),
            ("halt_poll_success_hist", LOG_HIST, 32, 1),
            ("io_exits", CUMULATIVE, 1, 2),
            ("max_mmu_page_hash_collisions", PEAK, 1, 9),
        ]);
        let stats = KvmStats::Available(vec![a, b]);
        let json = stats.to_json();
        assert_eq!(
            json,
            "{\"available\":true,\"vcpus\":2,\"counters\":{\"exits\":101,\"io_exits\":42,\
             \"max_mmu_page_hash_collisions\":9}}"
        );
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["counters"]["exits"], 101);
    }

    #[test]
    fn a_host_without_stats_says_why_instead_of_zeros() {
        let json = KvmStats::Unavailable("no \"stats\" here".into()).to_json();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["available"], false);
        assert_eq!(v["why"], "no \"stats\" here");
        assert!(v.get("counters").is_none());
    }

    #[test]
    fn implausible_or_short_layouts_are_refused() {
        let mut header = [0u8; HEADER_LEN];
        header[8..12].copy_from_slice(&1_000_000u32.to_ne_bytes());
        assert!(parse(&header, &[]).is_err());
        header[8..12].copy_from_slice(&2u32.to_ne_bytes());
        header[4..8].copy_from_slice(&8u32.to_ne_bytes());
        assert!(
            parse(&header, &[0; 24]).is_err(),
            "two descriptors need 48 bytes"
        );
        assert!(parse(&header[..10], &[]).is_err());
    }
}
