//! Per-vCPU CPUID: KVM's supported set with the topology of a single package of `num_cpus` cores,
//! one thread each, APIC ID = vCPU index.
//!
//! Leaves (Intel SDM Vol. 2A, CPUID; AMD APM Vol. 3, Appendix E):
//! - 1: EBX\[31:24\] initial APIC ID, EBX\[23:16\] addressable logical processors (a power of two),
//!   EDX\[28\] HTT when there is more than one, ECX\[31\] "running under a hypervisor";
//! - 4 (Intel): EAX\[31:26\] cores per package − 1, EAX\[25:14\] threads sharing each cache − 1;
//! - 1: ECX\[24\] TSC-deadline timer where KVM has `KVM_CAP_TSC_DEADLINE_TIMER` (KVM emulates it
//!   but leaves the bit out of its supported list);
//! - 6: thermal and power management, cleared (a guest cannot use it) but for EAX\[2\] ARAT: KVM's
//!   LAPIC timer runs in every C-state. With ARAT and the TSC-deadline timer Linux needs no PIT
//!   tick at boot (`apic_needs_pit`), which matters where its kernel is emulated: there a 250 Hz
//!   PIT tick took longer to handle than its period and the boot never got past its tick handler;
//! - 0xb and 0x1f: x2APIC topology, level 0 SMT (1 thread), level 1 core (`num_cpus`), EDX = x2APIC
//!   ID on every sub-leaf;
//! - 0x8000_0001 (AMD): ECX\[1\] CmpLegacy when there is more than one core;
//! - 0x8000_0008 (AMD): ECX\[7:0\] cores − 1, ECX\[15:12\] APIC ID bits for the core;
//! - 0x8000_001d (AMD): EAX\[25:14\] threads sharing each cache − 1;
//! - 0x8000_001e (AMD): extended APIC ID, core ID, one thread per core, node 0.
//!
//! Nothing else is hidden. On kvm-pvm hosts the guest's `cpuid` returns the host's values whatever
//! is set here (see the project's PVM notes); the kernel command line must hide features there.

use kvm_bindings::{
    kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::mptable::MAX_CPUS;
use crate::{Error, Result};

/// Whose CPUID conventions to follow for topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuVendor {
    /// Intel: cores per package also in leaf 4.
    Intel,
    /// AMD and Hygon.
    Amd,
    /// Anyone else: only the vendor-neutral leaves (1, 0xb, 0x1f) carry topology.
    Other,
}

impl CpuVendor {
    /// The vendor named by leaf 0 (EBX, EDX, ECX spell it), `Other` if leaf 0 is missing.
    pub fn from_cpuid(entries: &[kvm_cpuid_entry2]) -> Self {
        let Some(leaf0) = entries.iter().find(|e| e.function == 0) else {
            return Self::Other;
        };
        let mut name = [0u8; 12];
        name[0..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
        name[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
        name[8..12].copy_from_slice(&leaf0.ecx.to_le_bytes());
        match &name {
            b"GenuineIntel" => Self::Intel,
            b"AuthenticAMD" | b"HygonGenuine" => Self::Amd,
            _ => Self::Other,
        }
    }
}

const LEAF1_EDX_HTT: u32 = 1 << 28;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const EXT1_ECX_CMP_LEGACY: u32 = 1 << 1;
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

/// Bits needed to number `n` items (0 for 1, 1 for 2, 2 for 3 or 4, ...).
fn id_bits(n: u8) -> u32 {
    u32::from(n).max(1).next_power_of_two().trailing_zeros()
}

/// Threads sharing a cache of `level` − 1: one thread per core, so only the last level (L3) is
/// shared, by the whole package.
fn cache_sharing(level: u32, num_cpus: u8) -> u32 {
    if level >= 3 {
        u32::from(num_cpus) - 1
    } else {
        0
    }
}

/// Rewrites `entries` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `cpu_id` of `num_cpus`.
///
/// Takes a `Vec` because leaves 0xb and 0x1f are rebuilt with one entry per sub-leaf, which KVM's
/// supported list does not contain. `num_cpus` is clamped to 1..=254 and `cpu_id` is used as given.
pub fn filter_cpuid(
    entries: &mut Vec<kvm_cpuid_entry2>,
    cpu_id: u8,
    num_cpus: u8,
    vendor: CpuVendor,
) {
    let num_cpus = num_cpus.clamp(1, MAX_CPUS);
    let apic_id = u32::from(cpu_id);
    let core_bits = id_bits(num_cpus);
    let max_basic_leaf = entries
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);

    for entry in entries.iter_mut() {
        match entry.function {
            1 => {
                let logical = (1u32 << core_bits).min(0xff);
                entry.ebx = (entry.ebx & 0xffff) | (logical << 16) | (apic_id << 24);
                if num_cpus > 1 {
                    entry.edx |= LEAF1_EDX_HTT;
                } else {
                    entry.edx &= !LEAF1_EDX_HTT;
                }
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
            }
            // Sub-leaves with cache type 0 (EAX[4:0]) end the cache list; they stay as they are.
            4 if entry.eax & 0x1f != 0 => {
                let level = (entry.eax >> 5) & 0x7;
                let cores = (u32::from(num_cpus) - 1).min(0x3f);
                entry.eax =
                    (entry.eax & 0x3fff) | (cache_sharing(level, num_cpus) << 14) | (cores << 26);
            }
            6 => {
                entry.eax = LEAF6_EAX_ARAT;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            0x8000_0001 if vendor == CpuVendor::Amd => {
                if num_cpus > 1 {
                    entry.ecx |= EXT1_ECX_CMP_LEGACY;
                } else {
                    entry.ecx &= !EXT1_ECX_CMP_LEGACY;
                }
            }
            0x8000_0008 if vendor == CpuVendor::Amd => {
                entry.ecx = (entry.ecx & !0xf0ff) | (core_bits << 12) | (u32::from(num_cpus) - 1);
            }
            0x8000_001d if vendor == CpuVendor::Amd && entry.eax & 0x1f != 0 => {
                let level = (entry.eax >> 5) & 0x7;
                entry.eax = (entry.eax & !(0xfff << 14)) | (cache_sharing(level, num_cpus) << 14);
            }
            0x8000_001e if vendor == CpuVendor::Amd => {
                entry.eax = apic_id;
                // Core ID in EBX[7:0], threads per core - 1 = 0 in EBX[15:8].
                entry.ebx = (entry.ebx & !0xffff) | apic_id;
                // Node 0 of one node per package.
                entry.ecx = 0;
                entry.edx = 0;
            }
            _ => {}
        }
    }

    for leaf in [0xb, 0x1f] {
        let present = entries.iter().any(|e| e.function == leaf);
        // Leaf 0xb exists whenever the basic range reaches it; 0x1f only if KVM listed it.
        if present || (leaf == 0xb && max_basic_leaf >= 0xb) {
            entries.retain(|e| e.function != leaf);
            entries.extend(topology_leaf(leaf, apic_id, num_cpus));
        }
    }
}

/// The three sub-leaves of an extended topology leaf (0xb or 0x1f): SMT, core, end of list.
fn topology_leaf(function: u32, apic_id: u32, num_cpus: u8) -> [kvm_cpuid_entry2; 3] {
    let sub = |index: u32, eax: u32, ebx: u32, level_type: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: index | (level_type << 8),
        edx: apic_id,
        ..Default::default()
    };
    [
        // One thread per core: no bits to shift away to reach the core ID.
        sub(0, 0, 1, TOPOLOGY_LEVEL_SMT),
        sub(
            1,
            id_bits(num_cpus),
            u32::from(num_cpus),
            TOPOLOGY_LEVEL_CORE,
        ),
        // Level type 0 marks the end.
        sub(2, 0, 0, 0),
    ]
}

/// Leaf 6 EAX\[2\]: the APIC timer always runs (Intel SDM Vol. 2A, CPUID leaf 6).
pub const LEAF6_EAX_ARAT: u32 = 1 << 2;
/// Leaf 1 ECX\[24\]: the LAPIC timer has TSC-deadline mode.
pub const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;

/// What the host's KVM supports (`KVM_GET_SUPPORTED_CPUID`), the base of every vCPU's CPUID, plus
/// the TSC-deadline timer where KVM offers it (it is a capability, not in the supported list).
///
/// The ioctl takes about a millisecond on kvm-pvm, so a VMM fetches it once for all its vCPUs.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::GetSupportedCpuid)?;
    if kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
        for entry in cpuid.as_mut_slice() {
            if entry.function == 1 {
                entry.ecx |= LEAF1_ECX_TSC_DEADLINE;
            }
        }
    }
    Ok(cpuid)
}

/// Sets vCPU `cpu_id`'s CPUID from `supported` (see [`supported_cpuid`]), with the topology of
/// `num_cpus` vCPUs.
pub fn setup_cpuid(supported: &CpuId, vcpu: &VcpuFd, cpu_id: u8, num_cpus: u8) -> Result<()> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(Error::InvalidCpuCount(num_cpus));
    }
    if cpu_id >= num_cpus {
        return Err(Error::InvalidCpuId { cpu_id, num_cpus });
    }
    let mut entries = supported.as_slice().to_vec();
    let vendor = CpuVendor::from_cpuid(&entries);
    filter_cpuid(&mut entries, cpu_id, num_cpus, vendor);
    let cpuid =
        CpuId::from_entries(&entries).map_err(|_| Error::TooManyCpuidEntries(entries.len()))?;
    vcpu.set_cpuid2(&cpuid).map_err(Error::SetCpuid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_kvm;

    fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    /// "AuthenticAMD" split over EBX, EDX, ECX.
    fn amd_leaf0(max_leaf: u32) -> kvm_cpuid_entry2 {
        leaf(0, 0, max_leaf, 0x6874_7541, 0x444d_4163, 0x6974_6e65)
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("leaf {function:#x}.{index} missing"))
    }

    #[test]
    fn detects_vendors() {
        assert_eq!(CpuVendor::from_cpuid(&[amd_leaf0(0x10)]), CpuVendor::Amd);
        let intel = leaf(0, 0, 0x16, 0x756e_6547, 0x6c65_746e, 0x4965_6e69);
        assert_eq!(CpuVendor::from_cpuid(&[intel]), CpuVendor::Intel);
        assert_eq!(CpuVendor::from_cpuid(&[]), CpuVendor::Other);
    }

    #[test]
    fn leaf1_apic_id_count_htt_hypervisor() {
        // CLFLUSH size 8 in EBX[15:8] must survive; the host's APIC ID 0x0b and count 0x20 must not.
        let mut entries = vec![amd_leaf0(0x10), leaf(1, 0, 0x00a2_0f12, 0x0b20_0800, 0, 0)];
        filter_cpuid(&mut entries, 2, 3, CpuVendor::Amd);
        let l1 = find(&entries, 1, 0);
        // 3 vCPUs need 2 ID bits, so 4 addressable IDs.
        assert_eq!(l1.ebx, 0x0204_0800);
        assert_eq!(l1.edx, 1 << 28);
        assert_eq!(l1.ecx, 1 << 31);
        assert_eq!(l1.eax, 0x00a2_0f12);

        let mut single = vec![leaf(1, 0, 0, 0, 0, 1 << 28)];
        filter_cpuid(&mut single, 0, 1, CpuVendor::Other);
        assert_eq!(single[0].ebx, 0x0001_0000);
        assert_eq!(single[0].edx, 0);
    }

    #[test]
    fn leaf_b_is_rebuilt_per_vcpu() {
        // KVM reports leaf 0xb as a single all-zero sub-leaf.
        let mut entries = vec![amd_leaf0(0x10), leaf(0xb, 0, 0, 0, 0, 0)];
        filter_cpuid(&mut entries, 5, 6, CpuVendor::Amd);
        let subs: Vec<_> = entries.iter().filter(|e| e.function == 0xb).collect();
        assert_eq!(subs.len(), 3);
        let smt = find(&entries, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 5));
        assert_eq!(smt.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
        let core = find(&entries, 0xb, 1);
        // 6 vCPUs: 3 bits of core ID.
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
        let end = find(&entries, 0xb, 2);
        assert_eq!((end.eax, end.ebx, end.ecx, end.edx), (0, 0, 2, 5));
    }

    #[test]
    fn leaf_b_not_added_below_its_basic_range() {
        let mut entries = vec![amd_leaf0(0xa)];
        filter_cpuid(&mut entries, 0, 2, CpuVendor::Amd);
        assert!(entries.iter().all(|e| e.function != 0xb));
        assert!(entries.iter().all(|e| e.function != 0x1f));
    }

    #[test]
    fn leaf_1f_mirrors_b_when_present() {
        let mut entries = vec![amd_leaf0(0x1f), leaf(0x1f, 0, 1, 2, 3, 4)];
        filter_cpuid(&mut entries, 1, 2, CpuVendor::Intel);
        assert_eq!(entries.iter().filter(|e| e.function == 0x1f).count(), 3);
        let core = find(&entries, 0x1f, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (1, 2, 0x201, 1));
    }

    #[test]
    fn leaf4_cores_and_cache_sharing() {
        // L1d (type 1, level 1) and L3 (type 3, level 3) with host counts in the upper bits.
        let l1d = 0xfc00_4000 | (1 << 5) | 1;
        let l3 = 0xfc00_4000 | (3 << 5) | 3;
        let mut entries = vec![
            leaf(4, 0, l1d, 7, 7, 7),
            leaf(4, 3, l3, 7, 7, 7),
            leaf(4, 4, 0, 0, 0, 0),
        ];
        filter_cpuid(&mut entries, 0, 4, CpuVendor::Intel);
        // Cores - 1 = 3 in EAX[31:26]; L1 private (0), L3 shared by 4 (3 << 14).
        assert_eq!(find(&entries, 4, 0).eax, (3 << 26) | (1 << 5) | 1);
        assert_eq!(
            find(&entries, 4, 3).eax,
            (3 << 26) | (3 << 14) | (3 << 5) | 3
        );
        assert_eq!(find(&entries, 4, 3).ebx, 7);
        assert_eq!(find(&entries, 4, 4).eax, 0);
    }

    #[test]
    fn leaf6_is_cleared_but_for_arat() {
        let mut entries = vec![leaf(6, 0, 0x77, 0x2, 0x9, 0x1)];
        filter_cpuid(&mut entries, 0, 1, CpuVendor::Intel);
        let l6 = find(&entries, 6, 0);
        assert_eq!((l6.eax, l6.ebx, l6.ecx, l6.edx), (LEAF6_EAX_ARAT, 0, 0, 0));
    }

    #[test]
    fn amd_extended_topology() {
        let mut entries = vec![
            amd_leaf0(0x10),
            leaf(0x8000_0001, 0, 0, 0, 1 << 22, 0),
            // Host: PerfTscSize bits 17:16 = 0, ApicIdSize 7, 128 cores.
            leaf(0x8000_0008, 0, 0x3030, 0, 0x0000_707f, 0),
            // L1d level 1 and L3 level 3, host sharing counts 1 and 15.
            leaf(0x8000_001d, 0, (1 << 14) | (1 << 5) | 1, 0, 0, 0),
            leaf(0x8000_001d, 3, (15 << 14) | (3 << 5) | 3, 0, 0, 0),
            leaf(0x8000_001e, 0, 0x40, 0x0000_0120, 0x0000_0003, 0),
        ];
        filter_cpuid(&mut entries, 3, 4, CpuVendor::Amd);
        // CmpLegacy set, TOPOEXT kept.
        assert_eq!(find(&entries, 0x8000_0001, 0).ecx, (1 << 22) | (1 << 1));
        // 4 cores: NC = 3, ApicIdSize = 2.
        assert_eq!(find(&entries, 0x8000_0008, 0).ecx, 0x2003);
        assert_eq!(find(&entries, 0x8000_001d, 0).eax, (1 << 5) | 1);
        assert_eq!(find(&entries, 0x8000_001d, 3).eax, (3 << 14) | (3 << 5) | 3);
        let e = find(&entries, 0x8000_001e, 0);
        assert_eq!((e.eax, e.ebx, e.ecx, e.edx), (3, 3, 0, 0));
    }

    #[test]
    fn intel_ignores_amd_leaves() {
        let mut entries = vec![leaf(0x8000_0008, 0, 0x3030, 0, 0x7f, 0)];
        filter_cpuid(&mut entries, 1, 2, CpuVendor::Intel);
        assert_eq!(find(&entries, 0x8000_0008, 0).ecx, 0x7f);
    }

    #[test]
    fn rejects_bad_ids_before_touching_kvm() {
        let kvm = test_kvm();
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let supported = supported_cpuid(&kvm).unwrap();
        assert!(matches!(
            setup_cpuid(&supported, &vcpu, 0, 0),
            Err(Error::InvalidCpuCount(0))
        ));
        assert!(matches!(
            setup_cpuid(&supported, &vcpu, 2, 2),
            Err(Error::InvalidCpuId {
                cpu_id: 2,
                num_cpus: 2
            })
        ));
    }

    /// Needs /dev/kvm: KVM accepts the filtered table and hands it back.
    #[test]
    fn sets_cpuid_on_kvm() {
        let kvm = test_kvm();
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(1).unwrap();
        setup_cpuid(&supported_cpuid(&kvm).unwrap(), &vcpu, 1, 2).unwrap();
        let set = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
        let l1 = find(set.as_slice(), 1, 0);
        assert_eq!(l1.ebx >> 24, 1);
        assert_ne!(l1.ecx & (1 << 31), 0);
        // KVM with an in-kernel irqchip emulates the TSC-deadline timer; the guest is told so.
        if kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
            assert_ne!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        }
        assert_eq!(find(set.as_slice(), 6, 0).eax, LEAF6_EAX_ARAT);
    }
}
