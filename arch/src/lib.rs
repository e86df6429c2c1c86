//! x86_64 platform setup for a KVM guest booted through the Linux 64-bit boot protocol or PVH.
//!
//! The 64-bit protocol (Linux `Documentation/arch/x86/boot.rst`, "64-bit Boot Protocol") wants the
//! vCPU in long mode with paging on, a GDT holding flat `__BOOT_CS` (0x10) and `__BOOT_DS` (0x18),
//! interrupts off and RSI pointing at the zero page (`struct boot_params`). PVH (Xen
//! `docs/misc/pvh.pandoc`) wants 32-bit flat protected mode with paging off and EBX pointing at
//! `struct hvm_start_info`. This crate builds everything either state and the guest's first look
//! at the platform need:
//!
//! - [`layout`]: where each boot structure lives in guest-physical memory;
//! - [`platform::create_platform`]: in-kernel IOAPIC/PIC/LAPIC and PIT, KVM's private TSS pages;
//! - [`mptable::MpTable`]: the Intel MultiProcessor Specification 1.4 table (CPUs, IOAPIC, IRQs);
//! - [`gdt`], [`paging`], [`regs`]: the boot GDT, identity page tables and vCPU registers and MSRs;
//! - [`cpuid`]: per-vCPU CPUID (APIC IDs and topology);
//! - [`bootparams`]: the e820 map and the zero page;
//! - [`pvh`]: `hvm_start_info`, its module list and memory map, for a PVH entry;
//! - [`acpi`]: the ACPI tables (RSDP, XSDT, FADT, FACS, MADT, DSDT).
//!
//! Call order (KVM requires the first step before any vCPU exists):
//! `create_platform` → guest memory → `MpTable::write`, `write_boot_params` (or
//! `pvh::write_start_info`) → per vCPU: [`configure_vcpu`] (or the individual `setup_*`
//! functions).

#![warn(missing_docs)]
#![cfg(target_arch = "x86_64")]

pub mod acpi;
pub mod bootparams;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod paging;
pub mod platform;
pub mod pvh;
pub mod regs;

use kvm_bindings::CpuId;
use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;

pub use bootparams::{
    build_boot_params, e820_entries, ram_regions, write_boot_params, BootParamsConfig, E820Entry,
    E820Kind, InitrdRange,
};
pub use cpuid::{filter_cpuid, setup_cpuid, supported_cpuid, CpuVendor};
pub use mptable::{IntxPin, MpTable, PciIntxRoute};
pub use platform::create_platform;
pub use regs::{
    setup_fpu, setup_lint, setup_msrs, setup_regs, setup_regs_pvh, setup_sregs, setup_sregs_pvh,
};

/// Errors of the x86_64 platform setup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `KVM_SET_TSS_ADDR` failed.
    #[error("KVM refused the TSS address")]
    SetTssAddress(#[source] kvm_ioctls::Error),
    /// `KVM_SET_IDENTITY_MAP_ADDR` failed.
    #[error("KVM refused the identity map address")]
    SetIdentityMapAddress(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_IRQCHIP` failed.
    #[error("cannot create the in-kernel interrupt controllers")]
    CreateIrqChip(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_PIT2` failed.
    #[error("cannot create the in-kernel PIT")]
    CreatePit(#[source] kvm_ioctls::Error),
    /// `KVM_REINJECT_CONTROL` failed.
    #[error("KVM refused to stop re-injecting the PIT's lost ticks")]
    PitReinject(#[source] std::io::Error),

    /// A vCPU count of 0 or above [`mptable::MAX_CPUS`].
    #[error("a guest needs 1 to {max} vCPUs, not {0}", max = mptable::MAX_CPUS)]
    InvalidCpuCount(u8),
    /// A vCPU index at or above the vCPU count.
    #[error("vCPU {cpu_id} does not exist in a guest of {num_cpus} vCPUs")]
    InvalidCpuId {
        /// The vCPU asked for.
        cpu_id: u8,
        /// vCPUs in the guest.
        num_cpus: u8,
    },
    /// The MP table does not fit in `layout::MPTABLE_START..MPTABLE_END`.
    #[error("the MP table is {size} bytes but only {room} fit between {start:#x} and {end:#x}; use fewer vCPUs or PCI routes", start = layout::MPTABLE_START, end = layout::MPTABLE_END)]
    MpTableTooLarge {
        /// Bytes the table needs.
        size: usize,
        /// Bytes the area holds.
        room: usize,
    },
    /// The ACPI tables do not fit in `layout::ACPI_START..ACPI_END`.
    #[error("the ACPI tables are {size} bytes but only {room} fit between {start:#x} and {end:#x}", start = layout::ACPI_START, end = layout::ACPI_END)]
    AcpiTablesTooLarge {
        /// Bytes the tables need.
        size: usize,
        /// Bytes the area holds.
        room: usize,
    },
    /// A PCI device number above 31.
    #[error("PCI device {0} does not exist: bus 0 has devices 0 to 31")]
    InvalidPciDevice(u8),
    /// An IOAPIC pin that cannot carry PCI interrupts (ISA pins, or above 23).
    #[error("IOAPIC pin {0} cannot take PCI interrupts: use a pin from 3 to 23")]
    InvalidIoapicPin(u8),
    /// The same device and pin routed twice.
    #[error("PCI device {device} pin {pin:?} is routed twice")]
    DuplicatePciRoute {
        /// PCI device number.
        device: u8,
        /// Its interrupt pin.
        pin: IntxPin,
    },

    /// Writing a boot structure (named first) to guest memory failed.
    #[error("cannot write the {0} to guest memory")]
    WriteGuestMemory(&'static str, #[source] vm_memory::GuestMemoryError),
    /// linux-loader could not write the zero page.
    #[error("cannot write the zero page to guest memory")]
    WriteBootParams(#[source] linux_loader::configurator::Error),
    /// linux-loader could not write `hvm_start_info`.
    #[error("cannot write the PVH start info to guest memory")]
    WriteStartInfo(#[source] linux_loader::configurator::Error),

    /// A RAM region that wraps past 2^64.
    #[error("RAM region at {start:#x} of {len:#x} bytes runs past the end of the address space")]
    RamRegionOverflow {
        /// The region's start.
        start: u64,
        /// Its length.
        len: u64,
    },
    /// Two RAM regions overlap at the given address.
    #[error("RAM regions overlap at {0:#x}")]
    RamRegionsOverlap(u64),
    /// More e820 entries than the zero page's 128.
    #[error("the e820 map needs {0} entries but the zero page holds {max}", max = bootparams::E820_MAX_ENTRIES)]
    TooManyE820Entries(usize),
    /// A command line longer than the kernel's `cmdline_size`.
    #[error("the command line is {len} bytes but the kernel accepts at most {max}")]
    CmdlineTooLong {
        /// The command line's length.
        len: usize,
        /// The kernel's `cmdline_size`.
        max: u32,
    },
    /// A command-line size of 0 (it counts the NUL).
    #[error("the command line size must count its terminating NUL, so it cannot be 0")]
    EmptyCmdline,

    /// `KVM_GET_SREGS` failed.
    #[error("cannot read the vCPU special registers")]
    GetSregs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_SREGS` failed.
    #[error("KVM refused the vCPU special registers")]
    SetSregs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_REGS` failed.
    #[error("KVM refused the vCPU general registers")]
    SetRegs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_FPU` failed.
    #[error("KVM refused the vCPU FPU state")]
    SetFpu(#[source] kvm_ioctls::Error),
    /// `KVM_SET_MSRS` failed.
    #[error("KVM refused the boot MSRs")]
    SetMsrs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_MSRS` stopped before the last MSR.
    #[error("KVM set only {set} of {total} boot MSRs and stopped at MSR {refused:#x}")]
    MsrRefused {
        /// MSRs KVM set.
        set: usize,
        /// MSRs asked for.
        total: usize,
        /// The index of the first MSR KVM refused.
        refused: u32,
    },
    /// More MSRs than one `kvm_msrs` holds.
    #[error("too many MSR entries for one KVM call")]
    TooManyMsrs,
    /// `KVM_GET_LAPIC` failed.
    #[error("cannot read the local APIC state")]
    GetLapic(#[source] kvm_ioctls::Error),
    /// `KVM_SET_LAPIC` failed.
    #[error("KVM refused the local APIC state")]
    SetLapic(#[source] kvm_ioctls::Error),
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("cannot read the CPUID that KVM supports")]
    GetSupportedCpuid(#[source] kvm_ioctls::Error),
    /// More CPUID entries than `kvm_cpuid2` holds.
    #[error("{0} CPUID entries are more than KVM takes")]
    TooManyCpuidEntries(usize),
    /// `KVM_SET_CPUID2` failed.
    #[error("KVM refused the vCPU CPUID")]
    SetCpuid(#[source] kvm_ioctls::Error),
}

/// Result of this crate's functions.
pub type Result<T> = std::result::Result<T, Error>;

/// The CPU mode a vCPU starts the kernel in, and the boot information it is handed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootMode {
    /// Linux 64-bit boot protocol: long mode on identity page tables, RSI = the zero page.
    Linux64 {
        /// Guest-physical address of the zero page.
        zero_page: u64,
    },
    /// PVH: 32-bit flat protected mode, paging off, EBX = `hvm_start_info`.
    Pvh {
        /// Guest-physical address of `hvm_start_info` (see [`pvh::write_start_info`]).
        start_info: u64,
    },
}

/// What one vCPU needs to start at the kernel's entry point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuBootConfig {
    /// This vCPU's index, which is also its APIC ID.
    pub cpu_id: u8,
    /// vCPUs in the guest.
    pub num_cpus: u8,
    /// Guest-physical address of the entry point: `startup_64` for [`BootMode::Linux64`], the
    /// `XEN_ELFNOTE_PHYS32_ENTRY` address for [`BootMode::Pvh`].
    pub entry: u64,
    /// The mode to enter in.
    pub mode: BootMode,
}

/// Prepares one vCPU for the kernel's entry: CPUID, MSRs, registers, FPU and LAPIC LINT pins.
///
/// Every vCPU gets the same boot state; the application processors keep it only until the kernel
/// wakes them with INIT/SIPI, which resets them (PVH changes nothing there: the kernel still finds
/// the APs in the MP table and starts them in real mode). CPUID comes first because KVM checks
/// some MSRs against it; `supported_cpuid` is [`supported_cpuid`]'s answer, fetched once per VM.
/// The in-kernel irqchip must exist already (see [`create_platform`]).
pub fn configure_vcpu(
    supported_cpuid: &CpuId,
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    config: &VcpuBootConfig,
) -> Result<()> {
    setup_cpuid(supported_cpuid, vcpu, config.cpu_id, config.num_cpus)?;
    setup_msrs(vcpu)?;
    match config.mode {
        BootMode::Linux64 { zero_page } => {
            setup_regs(vcpu, config.entry, zero_page)?;
            setup_sregs(mem, vcpu)?;
        }
        BootMode::Pvh { start_info } => {
            setup_regs_pvh(vcpu, config.entry, start_info)?;
            setup_sregs_pvh(mem, vcpu)?;
        }
    }
    setup_fpu(vcpu)?;
    setup_lint(vcpu)
}

/// Opens `/dev/kvm` for tests that need it, failing loudly (never skipping) when it is missing.
#[cfg(test)]
pub(crate) fn test_kvm() -> kvm_ioctls::Kvm {
    kvm_ioctls::Kvm::new().unwrap_or_else(|e| {
        panic!(
            "this test needs a usable /dev/kvm and could not open it ({e}); run it on a KVM host"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::VcpuExit;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    /// A VM with the platform and 4 MiB of RAM registered, for the vCPU tests.
    fn test_vm(kvm: &kvm_ioctls::Kvm) -> (kvm_ioctls::VmFd, GuestMemoryMmap) {
        let vm = kvm.create_vm().expect("KVM_CREATE_VM failed");
        create_platform(&vm).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        for (slot, region) in mem.iter().enumerate() {
            let region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping of `memory_size` bytes owned by `mem`, which
            // the caller keeps alive as long as the VM.
            unsafe { vm.set_user_memory_region(region_desc) }.unwrap();
        }
        (vm, mem)
    }

    /// Needs /dev/kvm: a vCPU set up for PVH runs 32-bit code at the entry point and finds
    /// `hvm_start_info` through EBX.
    #[test]
    fn vcpu_starts_in_32_bit_mode_with_start_info_in_ebx() {
        let kvm = test_kvm();
        let (vm, mem) = test_vm(&kvm);
        let e820 = e820_entries(&ram_regions(&mem)).unwrap();
        let start_info = pvh::write_start_info(
            &mem,
            &pvh::PvhConfig {
                cmdline_addr: GuestAddress(layout::CMDLINE_START),
                initrd: None,
                e820: &e820,
                acpi_rsdp: None,
            },
        )
        .unwrap();
        MpTable::new(1).unwrap().write(&mem).unwrap();

        // mov eax, [ebx] (the magic); mov dx, 0x3f8; out dx, eax; hlt. In 32-bit code `mov dx`
        // needs the operand-size prefix and `out dx, eax` does not: a 64-bit or 16-bit decode of
        // these bytes would write a different width.
        let code = [0x8b, 0x03, 0x66, 0xba, 0xf8, 0x03, 0xef, 0xf4];
        let entry = layout::HIMEM_START;
        mem.write_slice(&code, GuestAddress(entry)).unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let boot = VcpuBootConfig {
            cpu_id: 0,
            num_cpus: 1,
            entry,
            mode: BootMode::Pvh {
                start_info: start_info.0,
            },
        };
        configure_vcpu(&supported_cpuid(&kvm).unwrap(), &vcpu, &mem, &boot).unwrap();

        match vcpu.run().expect("KVM_RUN failed") {
            VcpuExit::IoOut(port, data) => {
                assert_eq!(port, 0x3f8);
                assert_eq!(data, &pvh::XEN_HVM_START_MAGIC_VALUE.to_le_bytes()[..]);
            }
            other => panic!("expected the port write, got {other:?}"),
        }
    }

    /// Needs /dev/kvm: a vCPU set up by this crate runs in long mode at the entry point, through
    /// the boot GDT and page tables, and finds the zero page in RSI.
    #[test]
    fn vcpu_starts_in_long_mode_with_zero_page_in_rsi() {
        let kvm = test_kvm();
        let (vm, mem) = test_vm(&kvm);

        let e820 = e820_entries(&ram_regions(&mem)).unwrap();
        let config = BootParamsConfig {
            setup_header: None,
            cmdline_addr: GuestAddress(layout::CMDLINE_START),
            cmdline_size: 1,
            initrd: None,
            e820: &e820,
            acpi_rsdp: None,
        };
        write_boot_params(&mem, &config).unwrap();
        MpTable::new(2).unwrap().write(&mem).unwrap();

        // mov al, [rsi + 0x210] (type_of_loader); mov dx, 0x3f8; out dx, al; hlt
        let code = [
            0x8a, 0x86, 0x10, 0x02, 0x00, 0x00, 0x66, 0xba, 0xf8, 0x03, 0xee, 0xf4,
        ];
        let entry = layout::HIMEM_START + 0x200;
        mem.write_slice(&code, GuestAddress(entry)).unwrap();

        let vcpus: Vec<_> = (0..2u8)
            .map(|cpu_id| {
                let vcpu = vm.create_vcpu(u64::from(cpu_id)).unwrap();
                let boot = VcpuBootConfig {
                    cpu_id,
                    num_cpus: 2,
                    entry,
                    mode: BootMode::Linux64 {
                        zero_page: layout::ZERO_PAGE_START,
                    },
                };
                configure_vcpu(&supported_cpuid(&kvm).unwrap(), &vcpu, &mem, &boot).unwrap();
                vcpu
            })
            .collect();

        let mut bsp = vcpus.into_iter().next().unwrap();
        match bsp.run().expect("KVM_RUN failed") {
            VcpuExit::IoOut(port, data) => assert_eq!((port, data), (0x3f8, &[0xff][..])),
            other => panic!("expected the port write, got {other:?}"),
        }
    }
}
