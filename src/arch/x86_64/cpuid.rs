//! Per-vCPU CPUID: what KVM supports, with the topology rewritten so each vCPU sees its own
//! APIC id and the guest sees one socket of `num_cpus` single-threaded cores, and the
//! hypervisor bit set so the kernel looks for KVM's paravirtual leaves (kvm-clock).

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const ECX_AMD_CMP_LEGACY: u32 = 1 << 1;
/// CLFLUSH line size in 8-byte units (64 bytes), CPUID.1:EBX[15:8].
const CLFLUSH_SIZE: u32 = 8;

/// Topology level types in CPUID.0xB/0x1F:ECX[15:8].
const LEVEL_TYPE_INVALID: u32 = 0;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Number of APIC-id bits needed to number `n` cores.
fn id_bits(n: u8) -> u32 {
    (u32::from(n).max(1) - 1)
        .checked_ilog2()
        .map_or(0, |b| b + 1)
}

/// Rewrites `entries` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `apic_id` of `num_cpus`.
pub fn filter_cpuid(entries: &mut [kvm_cpuid_entry2], apic_id: u8, num_cpus: u8) {
    let id = u32::from(apic_id);
    let n = u32::from(num_cpus);
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (id << 24) | (n << 16) | (CLFLUSH_SIZE << 8) | (e.ebx & 0xff);
                e.ecx |= ECX_HYPERVISOR;
                if num_cpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                let level = (e.eax >> 5) & 0x7;
                // Caches up to L2 are per core; L3 is shared by the whole package.
                let sharing = if level >= 3 { n - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((n - 1) << 26);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                let (shift, count, kind) = match e.index {
                    0 => (0, 1, LEVEL_TYPE_SMT),
                    1 => (id_bits(num_cpus), n, LEVEL_TYPE_CORE),
                    _ => (0, 0, LEVEL_TYPE_INVALID),
                };
                e.eax = shift;
                e.ebx = count;
                e.ecx = (kind << 8) | (e.index & 0xff);
                e.edx = id;
            }
            LEAF_AMD_FEATURES => {
                if num_cpus > 1 {
                    e.ecx |= ECX_AMD_CMP_LEGACY;
                } else {
                    e.ecx &= !ECX_AMD_CMP_LEGACY;
                }
            }
            LEAF_AMD_SIZE_IDS => {
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(num_cpus) << 12) | (n - 1);
            }
            LEAF_AMD_EXT_APIC_ID => {
                e.eax = id;
                // Compute unit id = core id; one thread per compute unit; node 0.
                e.ebx = id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            // Looks like a host value that must be replaced or kept.
            eax: 0xdead_0000 | 0x63,
            ebx: 0x0102_0304,
            ecx: 0,
            edx: 0,
            ..Default::default()
        }
    }

    fn entries() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(LEAF_FEATURES, 0),
            leaf(LEAF_CACHE_PARAMS, 0),
            leaf(LEAF_TOPOLOGY, 0),
            leaf(LEAF_TOPOLOGY, 1),
            leaf(LEAF_TOPOLOGY, 2),
            leaf(LEAF_AMD_FEATURES, 0),
            leaf(LEAF_AMD_SIZE_IDS, 0),
            leaf(LEAF_AMD_EXT_APIC_ID, 0),
        ]
    }

    fn find(e: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *e.iter().find(|x| x.function == f && x.index == i).unwrap()
    }

    #[test]
    fn id_bits_counts_apic_id_width() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
        assert_eq!(id_bits(32), 5);
    }

    #[test]
    fn each_vcpu_sees_its_apic_id_and_hypervisor_bit() {
        for id in 0..4u8 {
            let mut e = entries();
            filter_cpuid(&mut e, id, 4);
            let l1 = find(&e, LEAF_FEATURES, 0);
            assert_eq!(l1.ebx >> 24, u32::from(id));
            assert_eq!((l1.ebx >> 16) & 0xff, 4);
            assert_eq!((l1.ebx >> 8) & 0xff, CLFLUSH_SIZE);
            assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
            assert_ne!(l1.edx & EDX_HTT, 0);
            for sub in 0..3 {
                assert_eq!(find(&e, LEAF_TOPOLOGY, sub).edx, u32::from(id));
            }
            assert_eq!(find(&e, LEAF_AMD_EXT_APIC_ID, 0).eax, u32::from(id));
        }
    }

    #[test]
    fn topology_is_one_socket_of_single_thread_cores() {
        let mut e = entries();
        filter_cpuid(&mut e, 0, 6);
        let smt = find(&e, LEAF_TOPOLOGY, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8), (0, 1, LEVEL_TYPE_SMT));
        let core = find(&e, LEAF_TOPOLOGY, 1);
        assert_eq!((core.eax, core.ebx, core.ecx >> 8), (3, 6, LEVEL_TYPE_CORE));
        let end = find(&e, LEAF_TOPOLOGY, 2);
        assert_eq!((end.ebx, end.ecx >> 8), (0, LEVEL_TYPE_INVALID));
        let cache = find(&e, LEAF_CACHE_PARAMS, 0);
        assert_eq!(cache.eax >> 26, 5, "cores per package - 1");
        assert_eq!(cache.eax & 0x3fff, 0x63, "cache type/level bits kept");
        let amd = find(&e, LEAF_AMD_SIZE_IDS, 0);
        assert_eq!(amd.ecx & 0xff, 5);
        assert_eq!((amd.ecx >> 12) & 0xf, 3);
        assert_ne!(find(&e, LEAF_AMD_FEATURES, 0).ecx & ECX_AMD_CMP_LEGACY, 0);
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let mut e = entries();
        e[0].edx = EDX_HTT;
        filter_cpuid(&mut e, 0, 1);
        assert_eq!(find(&e, LEAF_FEATURES, 0).edx & EDX_HTT, 0);
        assert_eq!(find(&e, LEAF_AMD_SIZE_IDS, 0).ecx & 0xff, 0);
    }
}
