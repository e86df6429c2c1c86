//! A `syscall` that lands in ring 0 on hosts whose KVM emulates the guest kernel.
//!
//! Measured on kvm-pvm: when guest user code (which runs natively there) executes `syscall`, KVM
//! loads RIP from LSTAR, RCX and R11, and masks RFLAGS, but leaves CS and SS at their ring-3
//! values. The kernel's entry code then runs at CPL 3, its first fetch from a supervisor page
//! faults, and the process dies with SIGSEGV: no 64-bit user space can make a system call. (A
//! `sysretq` from the emulated kernel does work.)
//!
//! The VMM repairs the transition. It intercepts the guest's writes of LSTAR (an MSR filter with
//! `KVM_CAP_X86_USER_SPACE_MSR`), keeps the kernel's entry point for itself, and points the real
//! LSTAR at a trampoline: one user-readable page in an unused hole of the x86-64 kernel address
//! space (PGD slot 509, `0xfffffe8000000000`, between the CPU entry area and the ESP fix-up
//! stacks, which Linux never maps; see Documentation/x86/x86_64/mm.rst), user-accessible and backed
//! by a guest-physical page that no memory slot covers. A `syscall` now fetches its first
//! instruction from MMIO at CPL 3, which KVM cannot emulate: with
//! `KVM_CAP_EXIT_ON_EMULATION_FAILURE` that is an exit to the VMM, which loads the kernel's CS and
//! SS from STAR, sets RIP to the kernel's entry point, and resumes. The guest kernel sees exactly
//! what a `syscall` on hardware gives it, at the cost of one exit. (Two cheaper-looking exits do
//! not work: a ring-3 `out` faults on the kernel's I/O bitmap, and the "hypervisor hole" at
//! `0xffff800000000000` is kept by kvm-pvm for itself, so a fetch there faults.) A `syscall` now runs that instruction at CPL 3 and exits to the VMM, which
//! loads the kernel's CS and SS from STAR, sets RIP to the kernel's entry point, and resumes: the
//! guest kernel sees exactly what a `syscall` on hardware gives it, at the cost of one exit.
//!
//! The trampoline's page tables live in guest-physical pages the platform reserves in the e820
//! map. Its PGD entry is written into the page table that is live when the kernel sets LSTAR
//! (`syscall_init`, during early boot, on `swapper_pg_dir`), from which every process's page table
//! copies its kernel half.

use kvm_bindings::{kvm_msr_entry, kvm_segment, Msrs};
use kvm_ioctls::{Cap, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Virtual address of the trampoline: the start of an unused 512 GiB hole of the kernel half.
pub const TRAMPOLINE_VA: u64 = 0xffff_fe80_0000_0000;
/// Guest-physical pages the trampoline's page tables need: a PUD, a PMD and a page table.
pub const TRAMPOLINE_PAGES: u64 = 3;

const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const PGD_SLOT: u64 = (TRAMPOLINE_VA >> 39) & 0x1ff;
/// Present, writable (an upper level only), user.
const TABLE_FLAGS: u64 = 0x7;
/// Present, read-only, user, executable.
const CODE_FLAGS: u64 = 0x5;
/// RFLAGS.RF, which KVM leaves set after the failed fetch.
const RFLAGS_RF: u64 = 1 << 16;
const RFLAGS_IF: u64 = 1 << 9;
/// CR3 bits that hold the page-table address (PCID and flags below, reserved bits above).
const CR3_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Errors setting up or running the trampoline.
#[derive(Debug, thiserror::Error)]
pub enum SyscallError {
    #[error("cannot write the syscall trampoline into guest memory: {0}")]
    Memory(#[source] vm_memory::GuestMemoryError),
    #[error("KVM refused {what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SyscallError {
    move |source| SyscallError::Kvm { what, source }
}

/// The trampoline of one VM: where its page tables are, and the unbacked page it maps.
#[derive(Debug, Clone, Copy)]
pub struct SyscallTrampoline {
    base: u64,
    mmio_page: u64,
}

impl SyscallTrampoline {
    /// Writes the trampoline's page tables at `base` ([`TRAMPOLINE_PAGES`] pages the guest must
    /// not use), mapping `mmio_page` (a guest-physical page that no memory slot or device covers),
    /// and makes KVM hand the guest's LSTAR writes to the VMM. Returns None, with a log line, when
    /// KVM cannot filter MSR writes or report emulation failures.
    pub fn install(
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        base: u64,
        mmio_page: u64,
    ) -> Result<Option<Self>, SyscallError> {
        if !vm.check_extension(Cap::X86UserSpaceMsr)
            || vm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_EXIT_ON_EMULATION_FAILURE))
                <= 0
        {
            log::warn!("KVM cannot hand MSR writes or emulation failures to the VMM: guest system calls will fail");
            return Ok(None);
        }
        let trampoline = SyscallTrampoline { base, mmio_page };
        for (addr, bytes) in trampoline.pages() {
            mem.write_slice(&bytes, GuestAddress(addr))
                .map_err(SyscallError::Memory)?;
        }
        let cap = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
            args: [u64::from(kvm_bindings::KVM_MSR_EXIT_REASON_FILTER), 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&cap)
            .map_err(kvm("handing MSR writes to the VMM"))?;
        // A clear bit denies, which with the capability above means an exit to the VMM.
        let deny = [0u8; 1];
        vm.set_msr_filter(
            MsrFilterDefaultAction::ALLOW,
            &[MsrFilterRange {
                flags: MsrFilterRangeFlags::WRITE,
                base: MSR_LSTAR,
                msr_count: 1,
                bitmap: &deny,
            }],
        )
        .map_err(kvm("an MSR filter for LSTAR"))?;
        log::info!(
            "system calls go through a trampoline at {TRAMPOLINE_VA:#x} (guest-physical {base:#x})"
        );
        Ok(Some(trampoline))
    }

    /// A trampoline at `base` mapping `mmio_page`, with nothing written or installed.
    #[cfg(test)]
    pub(crate) fn for_tests(base: u64, mmio_page: u64) -> Self {
        SyscallTrampoline { base, mmio_page }
    }

    /// The three page-table pages: PUD, PMD, page table.
    fn pages(&self) -> [(u64, Vec<u8>); 3] {
        let pud = self.base;
        let pmd = pud + 0x1000;
        let pt = pmd + 0x1000;
        let table = |index: u64, entry: u64| {
            let mut page = vec![0u8; 0x1000];
            let at = (index * 8) as usize;
            page[at..at + 8].copy_from_slice(&entry.to_le_bytes());
            page
        };
        [
            (pud, table((TRAMPOLINE_VA >> 30) & 0x1ff, pmd | TABLE_FLAGS)),
            (pmd, table((TRAMPOLINE_VA >> 21) & 0x1ff, pt | TABLE_FLAGS)),
            (
                pt,
                table((TRAMPOLINE_VA >> 12) & 0x1ff, self.mmio_page | CODE_FLAGS),
            ),
        ]
    }

    /// The guest kernel wrote `value` to LSTAR: keep it as the real entry point, give the CPU the
    /// trampoline instead, and map the trampoline in the live top-level page table.
    pub fn on_lstar_write(
        &self,
        vcpu: &VcpuFd,
        mem: &GuestMemoryMmap,
        value: u64,
    ) -> Result<(), SyscallError> {
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_LSTAR,
            data: TRAMPOLINE_VA,
            ..Default::default()
        }])
        .expect("one entry fits");
        vcpu.set_msrs(&msrs).map_err(kvm("setting LSTAR"))?;
        let sregs = vcpu.get_sregs().map_err(kvm("reading CR3"))?;
        let pgd = sregs.cr3 & CR3_ADDR_MASK;
        mem.write_obj(self.base | TABLE_FLAGS, GuestAddress(pgd + PGD_SLOT * 8))
            .map_err(SyscallError::Memory)?;
        log::debug!("guest LSTAR {value:#x}; trampoline mapped in page table {pgd:#x}");
        Ok(())
    }
}

/// Per-vCPU state of the trampoline.
#[derive(Debug, Default)]
pub struct SyscallState {
    /// The kernel's entry point, as it wrote it to LSTAR.
    pub lstar: Option<u64>,
    /// STAR and SFMASK, read once: the kernel sets them at boot and never again.
    star_mask: Option<(u64, u64)>,
}

/// The segment `syscall` loads into CS: flat 64-bit code at CPL 0 (SDM vol. 2, SYSCALL).
pub fn kernel_code_segment(selector: u16) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: selector & 0xfffc,
        type_: 11,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    }
}

/// The segment `syscall` loads into SS: flat writable data at CPL 0.
pub fn kernel_stack_segment(selector: u16) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: selector & 0xfffc,
        type_: 3,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        ..Default::default()
    }
}

/// What the VMM changes on a trampoline exit, as a pure function of the registers so that it can
/// be tested without KVM: returns false (and changes nothing) when the exit did not come from
/// the trampoline.
pub fn complete_syscall(
    regs: &mut kvm_bindings::kvm_regs,
    sregs: &mut kvm_bindings::kvm_sregs,
    lstar: u64,
    star: u64,
    sfmask: u64,
) -> bool {
    if sregs.cs.dpl != 3 || regs.rip != TRAMPOLINE_VA {
        return false;
    }
    regs.rflags &= !RFLAGS_RF;
    // A real `syscall` masked RFLAGS (clearing IF, which ring 3 cannot clear itself); a jump to
    // the trampoline did not, so it gets the same masking a `syscall` would have applied.
    if regs.rflags & RFLAGS_IF != 0 {
        regs.r11 = regs.rflags;
        regs.rflags = (regs.rflags & !sfmask) | 0x2;
    }
    let cs = ((star >> 32) & 0xffff) as u16;
    sregs.cs = kernel_code_segment(cs);
    sregs.ss = kernel_stack_segment(cs.wrapping_add(8));
    regs.rip = lstar;
    true
}

/// Handles an emulation failure that may be the trampoline's fetch. Returns false when it was not.
pub fn on_trampoline_exit(vcpu: &VcpuFd, state: &mut SyscallState) -> Result<bool, SyscallError> {
    let Some(lstar) = state.lstar else {
        return Ok(false);
    };
    let mut regs = vcpu.get_regs().map_err(kvm("reading registers"))?;
    let mut sregs = vcpu.get_sregs().map_err(kvm("reading segments"))?;
    let (star, sfmask) = match state.star_mask {
        Some(v) => v,
        None => {
            let mut msrs = Msrs::from_entries(&[
                kvm_msr_entry {
                    index: MSR_STAR,
                    ..Default::default()
                },
                kvm_msr_entry {
                    index: MSR_SYSCALL_MASK,
                    ..Default::default()
                },
            ])
            .expect("two entries fit");
            vcpu.get_msrs(&mut msrs).map_err(kvm("reading STAR"))?;
            let entries = msrs.as_slice();
            let v = (entries[0].data, entries[1].data);
            if v.1 != 0 {
                state.star_mask = Some(v);
            }
            v
        }
    };
    if !complete_syscall(&mut regs, &mut sregs, lstar, star, sfmask) {
        return Ok(false);
    }
    log::trace!("system call {} from {:#x}", regs.rax, regs.rcx);
    vcpu.set_sregs(&sregs)
        .map_err(kvm("loading kernel segments"))?;
    vcpu.set_regs(&regs).map_err(kvm("setting RIP"))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_regs, kvm_sregs};

    const LINUX_STAR: u64 = (0x23 << 48) | (0x10 << 32);
    const LINUX_SFMASK: u64 = 0x47700;
    const ENTRY: u64 = 0xffff_ffff_8140_0040;

    fn at_trampoline(rflags: u64) -> (kvm_regs, kvm_sregs) {
        let regs = kvm_regs {
            rip: TRAMPOLINE_VA,
            rflags: rflags | RFLAGS_RF,
            rcx: 0x40_1000,
            r11: 0x246,
            ..Default::default()
        };
        let mut sregs = kvm_sregs::default();
        sregs.cs.selector = 0x33;
        sregs.cs.dpl = 3;
        sregs.ss.selector = 0x2b;
        sregs.ss.dpl = 3;
        (regs, sregs)
    }

    #[test]
    fn a_syscall_enters_the_kernel_at_cpl0() {
        let (mut regs, mut sregs) = at_trampoline(0x2);
        assert!(complete_syscall(
            &mut regs,
            &mut sregs,
            ENTRY,
            LINUX_STAR,
            LINUX_SFMASK
        ));
        assert_eq!(regs.rip, ENTRY);
        assert_eq!((sregs.cs.selector, sregs.cs.dpl, sregs.cs.l), (0x10, 0, 1));
        assert_eq!((sregs.ss.selector, sregs.ss.dpl, sregs.ss.db), (0x18, 0, 1));
        // What the CPU's own syscall handling set stays as it is.
        assert_eq!((regs.rcx, regs.r11, regs.rflags), (0x40_1000, 0x246, 0x2));
    }

    #[test]
    fn a_jump_to_the_trampoline_gets_syscall_masking() {
        let (mut regs, mut sregs) = at_trampoline(0x246);
        assert!(complete_syscall(
            &mut regs,
            &mut sregs,
            ENTRY,
            LINUX_STAR,
            LINUX_SFMASK
        ));
        assert_eq!(regs.r11, 0x246);
        assert_eq!(regs.rflags & RFLAGS_IF, 0);
        assert_eq!(regs.rflags, 0x2 | (0x246 & !LINUX_SFMASK));
    }

    #[test]
    fn other_port_writes_are_left_alone() {
        let (mut regs, mut sregs) = at_trampoline(0x2);
        regs.rip = 0x40_2000;
        assert!(!complete_syscall(
            &mut regs,
            &mut sregs,
            ENTRY,
            LINUX_STAR,
            LINUX_SFMASK
        ));
        assert_eq!(regs.rip, 0x40_2000);
        let (mut regs, mut sregs) = at_trampoline(0x2);
        sregs.cs.dpl = 0;
        assert!(!complete_syscall(
            &mut regs,
            &mut sregs,
            ENTRY,
            LINUX_STAR,
            LINUX_SFMASK
        ));
        assert_eq!(sregs.cs.selector, 0x33);
    }

    #[test]
    fn trampoline_pages_map_the_unused_hole() {
        let t = SyscallTrampoline {
            base: 0xe_0000,
            mmio_page: 0xffff_f000,
        };
        let pages = t.pages();
        assert_eq!(PGD_SLOT, 509);
        // 0xfffffe8000000000: PUD, PMD and PT index 0.
        assert_eq!(&pages[0].1[..8], &(0xe_1000u64 | 7).to_le_bytes());
        assert_eq!(&pages[1].1[..8], &(0xe_2000u64 | 7).to_le_bytes());
        assert_eq!(&pages[2].1[..8], &(0xffff_f000u64 | 5).to_le_bytes());
    }
}
