//! The CPUID table each vCPU sees: what KVM supports on this host, with the topology filled
//! in per vCPU and a few features removed. What is removed, and why:
//!
//! | leaf | what | why |
//! |---|---|---|
//! | 0x1 ECX bit 5 | VMX | Keel offers no nested virtualization |
//! | 0x80000001 ECX bit 2 | SVM | the same, on AMD |
//! | 0x1 ECX bit 3, leaf 0x5 | MONITOR/MWAIT | KVM does not let a guest sleep with MWAIT; guests idle with HLT |
//! | 0x6 | thermal and power management | the host owns power management |
//! | 0xa | architectural performance monitoring | Keel gives guests no PMU |
//!
//! What is set: the APIC id, logical processor count and HTT bit in leaf 0x1, cores per
//! package in leaf 0x4, the x2APIC topology in leaves 0xb and 0x1f (one thread per core, all
//! cores in one package), and the hypervisor bit (leaf 0x1 ECX bit 31). KVM's own leaves
//! 0x40000000 and up stay as KVM reports them, so a guest knows it runs on KVM.

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_MONITOR: u32 = 0x5;
const LEAF_THERMAL_POWER: u32 = 0x6;
const LEAF_PERF_MONITORING: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;

const ECX_MONITOR: u32 = 1 << 3;
const ECX_VMX: u32 = 1 << 5;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const EXT_ECX_SVM: u32 = 1 << 2;

/// x2APIC topology level types (leaf 0xb/0x1f ECX[15:8]).
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to hold `count` distinct ids.
fn id_bits(count: u32) -> u32 {
    32 - count.saturating_sub(1).leading_zeros()
}

/// Adjusts KVM's supported CPUID entries for vCPU `cpu_index` of `cpu_count`.
pub fn filter_entries(entries: &mut [kvm_cpuid_entry2], cpu_index: u32, cpu_count: u32) {
    let apic_id = cpu_index;
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((cpu_count & 0xff) << 16);
                e.ecx = (e.ecx | ECX_HYPERVISOR) & !(ECX_VMX | ECX_MONITOR);
                if cpu_count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: addressable core ids in the package, minus one.
                let cores = (1u32 << id_bits(cpu_count)) - 1;
                e.eax = (e.eax & 0x03ff_ffff) | (cores << 26);
            }
            LEAF_MONITOR | LEAF_THERMAL_POWER | LEAF_PERF_MONITORING => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = id_bits(cpu_count);
                        e.ebx = cpu_count;
                        e.ecx = (LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            LEAF_EXT_FEATURES => e.ecx &= !EXT_ECX_SVM,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn find(entries: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn id_bits_counts_what_the_ids_need() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(32), 5);
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit_without_vmx() {
        let mut e = vec![entry(1, 0)];
        filter_entries(&mut e, 3, 4);
        let l = find(&e, 1, 0);
        assert_eq!(l.ebx >> 24, 3);
        assert_eq!((l.ebx >> 16) & 0xff, 4);
        assert_eq!(l.ebx & 0xffff, 0xffff, "CLFLUSH size and brand index stay");
        assert_ne!(l.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(l.ecx & (ECX_VMX | ECX_MONITOR), 0);
        assert_ne!(l.edx & EDX_HTT, 0);
        let mut single = vec![entry(1, 0)];
        filter_entries(&mut single, 0, 1);
        assert_eq!(find(&single, 1, 0).edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_leaves_describe_one_package() {
        let mut e = vec![entry(0xb, 0), entry(0xb, 1), entry(0xb, 2), entry(0x1f, 1)];
        filter_entries(&mut e, 5, 6);
        let smt = find(&e, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 5));
        let core = find(&e, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
        let end = find(&e, 0xb, 2);
        assert_eq!((end.eax, end.ebx, end.ecx & 0xff00), (0, 0, 0));
        assert_eq!(find(&e, 0x1f, 1).ebx, 6);
    }

    #[test]
    fn removed_leaves_are_zero_and_svm_is_gone() {
        let mut e = vec![
            entry(5, 0),
            entry(6, 0),
            entry(0xa, 0),
            entry(0x8000_0001, 0),
        ];
        filter_entries(&mut e, 0, 1);
        for f in [5, 6, 0xa] {
            let l = find(&e, f, 0);
            assert_eq!((l.eax, l.ebx, l.ecx, l.edx), (0, 0, 0, 0));
        }
        assert_eq!(find(&e, 0x8000_0001, 0).ecx & EXT_ECX_SVM, 0);
    }

    #[test]
    fn cache_leaf_counts_cores() {
        let mut e = vec![entry(4, 0)];
        filter_entries(&mut e, 0, 4);
        assert_eq!(find(&e, 4, 0).eax >> 26, 3);
    }
}
