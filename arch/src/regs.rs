//! Boot state of a vCPU: general and special registers, FPU, MSRs and the local APIC's LINT pins.
//!
//! The values follow the Linux 64-bit boot protocol (`Documentation/arch/x86/boot.rst`): long mode
//! with paging (Intel SDM Vol. 3A, 9.8.5 "Initializing IA-32e Mode"), flat `__BOOT_CS`/`__BOOT_DS`,
//! interrupts off, RSI = zero page. Each `boot_*` function computes the state as plain data (and is
//! unit-tested); the `setup_*` functions only add the ioctl.
//!
//! A PVH entry (Xen `docs/misc/pvh.pandoc`, "x86/HVM direct boot ABI") is [`pvh_regs`] and
//! [`pvh_sregs`]: 32-bit protected mode with paging off (CR0 = PE, CR4 = 0, EFER = 0), flat 32-bit
//! segments from [`crate::gdt::pvh_gdt`], interrupts off, EBX = `hvm_start_info`.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;

use crate::gdt::{boot_segments, pvh_gdt, segments_of, write_gdt_and_idt, write_gdt_and_idt_of};
use crate::layout::{BOOT_STACK_POINTER, GDT_ENTRIES, GDT_START, IDT_START, PML4_START};
use crate::paging::setup_identity_map;
use crate::{Error, Result};

/// Control-register and EFER bits (Intel SDM Vol. 3A, 2.5 and 2.2.1).
pub mod bits {
    /// CR0.PE: protected mode.
    pub const CR0_PE: u64 = 1 << 0;
    /// CR0.ET: extension type, hard-wired to 1 on modern CPUs.
    pub const CR0_ET: u64 = 1 << 4;
    /// CR0.PG: paging.
    pub const CR0_PG: u64 = 1 << 31;
    /// CR4.PAE: physical address extension, required for long mode.
    pub const CR4_PAE: u64 = 1 << 5;
    /// EFER.LME: long mode enable.
    pub const EFER_LME: u64 = 1 << 8;
    /// EFER.LMA: long mode active.
    pub const EFER_LMA: u64 = 1 << 10;
    /// RFLAGS bit 1 is reserved and always 1; IF stays clear.
    pub const RFLAGS_RESERVED: u64 = 1 << 1;
}

/// MSR indices (Intel SDM Vol. 4, "Model-Specific Registers").
pub mod msr_index {
    /// Time-stamp counter.
    pub const IA32_TSC: u32 = 0x10;
    /// `sysenter` code segment.
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    /// `sysenter` stack pointer.
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    /// `sysenter` entry point.
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    /// Miscellaneous feature enables.
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    /// MTRR default memory type.
    pub const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
    /// `syscall` segment selectors.
    pub const STAR: u32 = 0xc000_0081;
    /// 64-bit `syscall` entry point.
    pub const LSTAR: u32 = 0xc000_0082;
    /// Compatibility-mode `syscall` entry point.
    pub const CSTAR: u32 = 0xc000_0083;
    /// RFLAGS mask applied on `syscall` (`IA32_FMASK`).
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    /// GS base that `swapgs` swaps in.
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
}

/// IA32_MISC_ENABLE bit 0: fast-string operations (`rep movs`/`stos`) enabled, as firmware leaves
/// it; Linux only uses the fast `rep movsb` paths when it is set.
pub const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
/// IA32_MTRR_DEF_TYPE: MTRRs enabled (bit 11) with write-back (6) as the default memory type, as
/// firmware leaves it; with MTRRs off Linux would treat all memory as uncached and disable PAT.
pub const MTRR_DEF_TYPE_ENABLED_WB: u64 = (1 << 11) | 6;

/// x87 control word after FNINIT: all exceptions masked, 64-bit precision, round to nearest.
pub const FPU_CONTROL_WORD: u16 = 0x37f;
/// MXCSR at reset: all SSE exceptions masked, round to nearest.
pub const MXCSR_DEFAULT: u32 = 0x1f80;

/// Offset of the local APIC's LVT LINT0 register (Intel SDM Vol. 3A, 11.5.1).
pub const APIC_LVT_LINT0: usize = 0x350;
/// Offset of the local APIC's LVT LINT1 register.
pub const APIC_LVT_LINT1: usize = 0x360;
const APIC_DELIVERY_MODE_MASK: u32 = 0x700;
const APIC_DELIVERY_MODE_NMI: u32 = 0b100 << 8;
const APIC_DELIVERY_MODE_EXTINT: u32 = 0b111 << 8;

/// General registers at the 64-bit entry point.
pub fn boot_regs(entry: u64, zero_page: u64) -> kvm_regs {
    kvm_regs {
        rflags: bits::RFLAGS_RESERVED,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: zero_page,
        ..Default::default()
    }
}

/// Puts long mode with the boot GDT, empty IDT and identity page tables into `sregs`.
///
/// CR0, CR4 and EFER are replaced rather than OR-ed: KVM's reset CR0 has CD and NW set, and a
/// booting kernel expects caches on. Everything else (APIC base, LDT, CR8) keeps KVM's values.
pub fn boot_sregs(sregs: &mut kvm_sregs) {
    let (code, data, tss) = boot_segments();
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (GDT_ENTRIES * 8 - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;

    sregs.cr0 = bits::CR0_PE | bits::CR0_ET | bits::CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 = bits::CR4_PAE;
    sregs.efer = bits::EFER_LME | bits::EFER_LMA;
}

/// General registers at a PVH entry point: EBX holds the address of `hvm_start_info`.
///
/// The ABI leaves the stack unspecified; the boot stack is given anyway so that an entry that
/// pushes before setting its own does not fault.
pub fn pvh_regs(entry: u64, start_info: u64) -> kvm_regs {
    kvm_regs {
        rflags: bits::RFLAGS_RESERVED,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rbx: start_info,
        ..Default::default()
    }
}

/// Puts 32-bit flat protected mode with paging off into `sregs`, on the PVH GDT and the empty
/// IDT: CR0 = PE (and ET, which the CPU keeps set), CR3 = CR4 = EFER = 0.
///
/// As in [`boot_sregs`], the control registers are replaced, not OR-ed, and the APIC base, LDT and
/// CR8 keep KVM's values.
pub fn pvh_sregs(sregs: &mut kvm_sregs) {
    let (code, data, tss) = segments_of(&pvh_gdt());
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (GDT_ENTRIES * 8 - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;

    sregs.cr0 = bits::CR0_PE | bits::CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
}

/// FPU state after FNINIT, with the default MXCSR.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: FPU_CONTROL_WORD,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    }
}

/// The MSRs every vCPU starts with: syscall/sysenter targets cleared, TSC at 0, fast strings and
/// write-back MTRR default on.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    use msr_index::*;
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(IA32_SYSENTER_CS, 0),
        entry(IA32_SYSENTER_ESP, 0),
        entry(IA32_SYSENTER_EIP, 0),
        entry(STAR, 0),
        entry(CSTAR, 0),
        entry(KERNEL_GS_BASE, 0),
        entry(SYSCALL_MASK, 0),
        entry(LSTAR, 0),
        entry(IA32_TSC, 0),
        entry(IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(IA32_MTRR_DEF_TYPE, MTRR_DEF_TYPE_ENABLED_WB),
    ]
}

/// Reads a 32-bit local APIC register from KVM's register page.
pub fn lapic_register(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    if let Some(reg) = offset
        .checked_add(4)
        .and_then(|end| lapic.regs.get(offset..end))
    {
        for (b, r) in bytes.iter_mut().zip(reg) {
            *b = *r as u8;
        }
    }
    u32::from_le_bytes(bytes)
}

/// Writes a 32-bit local APIC register into KVM's register page (ignored past its end).
pub fn set_lapic_register(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    if let Some(reg) = offset
        .checked_add(4)
        .and_then(|end| lapic.regs.get_mut(offset..end))
    {
        for (r, b) in reg.iter_mut().zip(value.to_le_bytes()) {
            *r = b as _;
        }
    }
}

/// Sets LINT0 to ExtINT (the 8259 PIC's output, virtual wire mode) and LINT1 to NMI, as the MP
/// table's local interrupt entries say (MP spec 5.1) and as PC firmware leaves them.
pub fn set_lint_delivery_modes(lapic: &mut kvm_lapic_state) {
    for (offset, mode) in [
        (APIC_LVT_LINT0, APIC_DELIVERY_MODE_EXTINT),
        (APIC_LVT_LINT1, APIC_DELIVERY_MODE_NMI),
    ] {
        let value = lapic_register(lapic, offset);
        set_lapic_register(lapic, offset, (value & !APIC_DELIVERY_MODE_MASK) | mode);
    }
}

/// Sets RIP to `entry`, RSI to `zero_page`, the boot stack, and RFLAGS with interrupts off.
pub fn setup_regs(vcpu: &VcpuFd, entry: u64, zero_page: u64) -> Result<()> {
    vcpu.set_regs(&boot_regs(entry, zero_page))
        .map_err(Error::SetRegs)
}

/// Writes the boot GDT, IDT and page tables to `mem` and puts the vCPU in long mode on them.
///
/// The tables are the same for every vCPU, so calling this once per vCPU rewrites identical bytes.
pub fn setup_sregs(mem: &GuestMemoryMmap, vcpu: &VcpuFd) -> Result<()> {
    write_gdt_and_idt(mem)?;
    setup_identity_map(mem)?;
    let mut sregs = vcpu.get_sregs().map_err(Error::GetSregs)?;
    boot_sregs(&mut sregs);
    vcpu.set_sregs(&sregs).map_err(Error::SetSregs)
}

/// Sets RIP to the PVH `entry`, EBX to `start_info`, and RFLAGS with interrupts off.
pub fn setup_regs_pvh(vcpu: &VcpuFd, entry: u64, start_info: u64) -> Result<()> {
    vcpu.set_regs(&pvh_regs(entry, start_info))
        .map_err(Error::SetRegs)
}

/// Writes the PVH GDT and the empty IDT to `mem` and puts the vCPU in 32-bit protected mode on
/// them, paging off. No page tables are needed: the kernel builds its own.
pub fn setup_sregs_pvh(mem: &GuestMemoryMmap, vcpu: &VcpuFd) -> Result<()> {
    write_gdt_and_idt_of(mem, &pvh_gdt())?;
    let mut sregs = vcpu.get_sregs().map_err(Error::GetSregs)?;
    pvh_sregs(&mut sregs);
    vcpu.set_sregs(&sregs).map_err(Error::SetSregs)
}

/// Initialises the x87 and SSE control state.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<()> {
    vcpu.set_fpu(&boot_fpu()).map_err(Error::SetFpu)
}

/// Sets the boot MSRs; fails naming the first MSR KVM did not accept.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<()> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(|_| Error::TooManyMsrs)?;
    let set = vcpu.set_msrs(&msrs).map_err(Error::SetMsrs)?;
    if set != entries.len() {
        return Err(Error::MsrRefused {
            set,
            total: entries.len(),
            refused: entries.get(set).map_or(0, |e| e.index),
        });
    }
    Ok(())
}

/// Programs LINT0 as ExtINT and LINT1 as NMI in the vCPU's in-kernel local APIC.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<()> {
    let mut lapic = vcpu.get_lapic().map_err(Error::GetLapic)?;
    set_lint_delivery_modes(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(Error::SetLapic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::create_platform;
    use crate::test_kvm;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn regs_enter_at_entry_with_zero_page() {
        let regs = boot_regs(0x100_0200, 0x7000);
        assert_eq!(regs.rip, 0x100_0200);
        assert_eq!(regs.rsi, 0x7000);
        assert_eq!((regs.rsp, regs.rbp), (0x8ff0, 0x8ff0));
        assert_eq!(regs.rflags, 2);
        assert_eq!((regs.rax, regs.rdi, regs.rcx), (0, 0, 0));
    }

    #[test]
    fn sregs_are_long_mode() {
        let mut sregs = kvm_sregs {
            cr0: 0x6000_0010,
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        boot_sregs(&mut sregs);
        assert_eq!(sregs.cr0, 0x8000_0011);
        assert_eq!(sregs.cr3, 0x9000);
        assert_eq!(sregs.cr4, 0x20);
        assert_eq!(sregs.efer, 0x500);
        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (0x500, 47));
        assert_eq!((sregs.idt.base, sregs.idt.limit), (0x530, 7));
        assert_eq!(sregs.apic_base, 0xfee0_0900, "kept from KVM");
        assert_eq!(sregs.cs.selector, 0x10);
        assert_eq!((sregs.cs.l, sregs.cs.db, sregs.cs.present), (1, 0, 1));
        for seg in [sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss] {
            assert_eq!(seg.selector, 0x18);
            assert_eq!((seg.base, seg.limit, seg.type_), (0, 0xffff_ffff, 3));
        }
        assert_eq!(
            (sregs.tr.selector, sregs.tr.type_, sregs.tr.s),
            (0x20, 0xb, 0)
        );
    }

    #[test]
    fn pvh_regs_enter_at_entry_with_start_info_in_rbx() {
        let regs = pvh_regs(0x100_0500, 0x6000);
        assert_eq!(regs.rip, 0x100_0500);
        assert_eq!(regs.rbx, 0x6000);
        assert_eq!(regs.rflags, 2, "IF, TF and VM clear");
        assert_eq!((regs.rsi, regs.rax), (0, 0));
    }

    #[test]
    fn pvh_sregs_are_flat_32_bit_protected_mode_without_paging() {
        let mut sregs = kvm_sregs {
            cr0: 0x6000_0010,
            cr4: 0x20,
            efer: 0x500,
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        pvh_sregs(&mut sregs);
        assert_eq!(sregs.cr0, 0x11, "PE and ET only: no paging, caches on");
        assert_eq!((sregs.cr3, sregs.cr4, sregs.efer), (0, 0, 0));
        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (0x500, 47));
        assert_eq!((sregs.idt.base, sregs.idt.limit), (0x530, 7));
        assert_eq!(sregs.apic_base, 0xfee0_0900, "kept from KVM");
        let cs = sregs.cs;
        assert_eq!((cs.selector, cs.base, cs.limit), (0x10, 0, 0xffff_ffff));
        assert_eq!((cs.type_, cs.db, cs.l, cs.g, cs.present), (0xb, 1, 0, 1, 1));
        for seg in [sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss] {
            assert_eq!(seg.selector, 0x18);
            assert_eq!(
                (seg.base, seg.limit, seg.type_, seg.db),
                (0, 0xffff_ffff, 3, 1)
            );
        }
        let tr = sregs.tr;
        assert_eq!((tr.selector, tr.base, tr.limit), (0x20, 0, 0x67));
        assert_eq!(
            (tr.type_, tr.s, tr.present),
            (0xb, 0, 1),
            "a busy 32-bit TSS"
        );
    }

    #[test]
    fn fpu_control_words() {
        let fpu = boot_fpu();
        assert_eq!(
            (fpu.fcw, fpu.mxcsr, fpu.fsw, fpu.ftwx),
            (0x37f, 0x1f80, 0, 0)
        );
    }

    #[test]
    fn msr_list() {
        let msrs: Vec<(u32, u64)> = boot_msr_entries()
            .iter()
            .map(|e| (e.index, e.data))
            .collect();
        assert_eq!(
            msrs,
            vec![
                (0x174, 0),
                (0x175, 0),
                (0x176, 0),
                (0xc000_0081, 0),
                (0xc000_0083, 0),
                (0xc000_0102, 0),
                (0xc000_0084, 0),
                (0xc000_0082, 0),
                (0x10, 0),
                (0x1a0, 1),
                (0x2ff, 0x806),
            ]
        );
    }

    #[test]
    fn lint_modes_keep_other_bits() {
        let mut lapic = kvm_lapic_state::default();
        // LINT0 masked (bit 16) with fixed delivery and vector 0x30; LINT1 all zero.
        set_lapic_register(&mut lapic, APIC_LVT_LINT0, 0x1_0030);
        set_lint_delivery_modes(&mut lapic);
        assert_eq!(lapic_register(&lapic, APIC_LVT_LINT0), 0x1_0730);
        assert_eq!(lapic_register(&lapic, APIC_LVT_LINT1), 0x400);
        // Little-endian bytes in the register page.
        assert_eq!(lapic.regs[0x351] as u8, 0x07);
        assert_eq!(lapic.regs[0x361] as u8, 0x04);
    }

    #[test]
    fn lapic_register_out_of_range_is_harmless() {
        let mut lapic = kvm_lapic_state::default();
        set_lapic_register(&mut lapic, 1022, u32::MAX);
        assert_eq!(lapic_register(&lapic, 1022), 0);
        assert_eq!(lapic_register(&lapic, usize::MAX - 1), 0);
    }

    /// Needs /dev/kvm: the whole boot state goes through the real ioctls.
    #[test]
    fn boot_state_on_kvm() {
        let kvm = test_kvm();
        let vm = kvm.create_vm().expect("KVM_CREATE_VM failed");
        create_platform(&vm).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();

        setup_msrs(&vcpu).unwrap();
        setup_regs(&vcpu, 0x10_0200, 0x7000).unwrap();
        setup_sregs(&mem, &vcpu).unwrap();
        setup_fpu(&vcpu).unwrap();
        setup_lint(&vcpu).unwrap();

        let regs = vcpu.get_regs().unwrap();
        assert_eq!((regs.rip, regs.rsi, regs.rsp), (0x10_0200, 0x7000, 0x8ff0));
        let sregs = vcpu.get_sregs().unwrap();
        assert_eq!(sregs.cr3, 0x9000);
        assert_eq!(sregs.efer & 0x500, 0x500);
        assert_eq!(sregs.cs.selector, 0x10);
        assert_eq!(sregs.cs.l, 1);
        let lapic = vcpu.get_lapic().unwrap();
        assert_eq!(lapic_register(&lapic, APIC_LVT_LINT0) & 0x700, 0x700);
        assert_eq!(lapic_register(&lapic, APIC_LVT_LINT1) & 0x700, 0x400);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, 0xa003);
    }
}
