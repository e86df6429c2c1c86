//! A throw-away VM with one vCPU in 64-bit long mode at ring 0, for probing what the host's KVM
//! can run and for testing the instruction fallback against the real KVM.
//!
//! Layout of its 4 MiB of guest memory (Intel SDM vol. 3A, 4.5 "4-level paging" and 6.14.1
//! "64-bit mode IDT"):
//!
//! | address | contents |
//! |---|---|
//! | `GDT` 0x1000 | null, 64-bit code (selector 0x08), data (0x10) |
//! | `PML4` 0x2000, 0x3000, 0x4000 | identity map of 0–4 MiB with two 2 MiB pages |
//! | `IDT` 0x5000 | 256 interrupt gates, vector `v` pointing at `HANDLERS + 8 * v` |
//! | `HANDLERS` 0x6000 | per vector: `hlt; jmp $-1`, so a delivered exception ends in `KVM_EXIT_HLT` at a RIP that names the vector |
//! | `CODE` 0x10_0000 | the code under test, followed by `hlt` |
//! | `DATA` 0x18_0000 | a zeroed page the code may use (`rdi` points here) |
//! | `STACK_TOP` 0x20_0000 | initial `rsp` |
//!
//! Linear addresses at or above 4 MiB are not mapped (see [`UNMAPPED`]).

use kvm_bindings::{kvm_dtable, kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::fallback::guest::{read_fpu, write_fpu};
use super::fallback::{InsnFallback, InternalErrorExit};
use super::PvmError;

/// Size of the scratch VM's memory.
pub const MEM_SIZE: usize = 4 << 20;
/// Guest-physical (and linear) address of the GDT.
pub const GDT: u64 = 0x1000;
/// The page-map level-4 table; `PML4 + 0x1000` is the PDPT and `PML4 + 0x2000` the page directory.
pub const PML4: u64 = 0x2000;
/// The 64-bit IDT (256 gates of 16 bytes).
pub const IDT: u64 = 0x5000;
/// Exception handler stubs, [`HANDLER_STRIDE`] bytes apart.
pub const HANDLERS: u64 = 0x6000;
/// Distance between two handler stubs.
pub const HANDLER_STRIDE: u64 = 8;
/// Where [`ScratchVm::load_code`] puts the code under test (and the initial RIP).
pub const CODE: u64 = 0x10_0000;
/// A page of zeroed data; the initial `rdi`.
pub const DATA: u64 = 0x18_0000;
/// The initial `rsp`.
pub const STACK_TOP: u64 = 0x20_0000;
/// A canonical linear address that the scratch page tables do not map.
pub const UNMAPPED: u64 = 0x4000_0000;
/// The code segment selector.
pub const CODE_SELECTOR: u16 = 0x08;

const DATA_SELECTOR: u16 = 0x10;
const HLT: u8 = 0xf4;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const CR4_OSXSAVE: u64 = 1 << 18;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// How a run of the scratch vCPU ended.
#[derive(Debug)]
pub enum ScratchExit {
    /// The guest executed `hlt` (the end of the code, or an exception handler stub).
    Hlt,
    /// `KVM_EXIT_INTERNAL_ERROR`; an emulation failure when `suberror` is 1.
    InternalError(InternalErrorExit),
    /// A triple fault.
    Shutdown,
    /// The fallback could not carry out an instruction (only from [`ScratchVm::run_with_fallback`]).
    FallbackFailed(String),
    /// Anything else, described.
    Other(String),
}

/// One VM, one vCPU and 4 MiB of memory, set up for ring-0 64-bit code.
pub struct ScratchVm {
    // Field order is drop order: the vCPU and the VM go before the memory they map.
    vcpu: VcpuFd,
    vm: VmFd,
    mem: GuestMemoryMmap,
    sregs: kvm_sregs,
}

impl ScratchVm {
    /// Creates the VM, its memory, page tables, GDT and IDT, and a vCPU with the host's supported
    /// CPUID, ready to run at [`CODE`].
    pub fn new(kvm: &Kvm) -> Result<Self, PvmError> {
        let vm = kvm.create_vm().map_err(PvmError::CreateVm)?;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .map_err(PvmError::Memory)?;
        let host = mem
            .get_host_address(GuestAddress(0))
            .map_err(|source| PvmError::Write { addr: 0, source })?;
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: host as u64,
        };
        // SAFETY: `host` is the start of the `MEM_SIZE`-byte anonymous mapping owned by `mem`, which
        // lives in the same `ScratchVm` and is dropped only after the VM fd is closed.
        unsafe { vm.set_user_memory_region(region) }.map_err(PvmError::Slot)?;
        write_tables(&mem)?;

        let vcpu = vm.create_vcpu(0).map_err(PvmError::CreateVcpu)?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(setup("KVM_GET_SUPPORTED_CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(setup("KVM_SET_CPUID2"))?;
        let sregs = long_mode_sregs(&vcpu)?;

        let mut scratch = ScratchVm {
            vcpu,
            vm,
            mem,
            sregs,
        };
        scratch.reset()?;
        Ok(scratch)
    }

    /// Puts the vCPU back at [`CODE`] with the initial registers, system registers, FPU state and
    /// no pending exception, and zeroes the [`DATA`] page.
    pub fn reset(&mut self) -> Result<(), PvmError> {
        self.vcpu
            .set_sregs(&self.sregs)
            .map_err(setup("KVM_SET_SREGS"))?;
        let regs = kvm_regs {
            rip: CODE,
            rsp: STACK_TOP,
            rdi: DATA,
            rax: 7,
            rflags: 2,
            ..Default::default()
        };
        self.vcpu.set_regs(&regs).map_err(setup("KVM_SET_REGS"))?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        write_fpu(&self.vcpu, &fpu).map_err(setup("KVM_SET_XSAVE"))?;
        let mut events = self
            .vcpu
            .get_vcpu_events()
            .map_err(setup("KVM_GET_VCPU_EVENTS"))?;
        events.exception = Default::default();
        self.vcpu
            .set_vcpu_events(&events)
            .map_err(setup("KVM_SET_VCPU_EVENTS"))?;
        self.write(DATA, &[0; 4096])
    }

    /// Writes `code` followed by `hlt` at [`CODE`].
    pub fn load_code(&self, code: &[u8]) -> Result<(), PvmError> {
        self.write(CODE, code)?;
        self.write(CODE + code.len() as u64, &[HLT])
    }

    /// Writes `bytes` to guest-physical `addr`.
    pub fn write(&self, addr: u64, bytes: &[u8]) -> Result<(), PvmError> {
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|source| PvmError::Write { addr, source })
    }

    /// Runs the vCPU until its first exit.
    pub fn run(&mut self) -> Result<ScratchExit, PvmError> {
        match self.vcpu.run().map_err(PvmError::Run)? {
            VcpuExit::Hlt => return Ok(ScratchExit::Hlt),
            VcpuExit::Shutdown => return Ok(ScratchExit::Shutdown),
            VcpuExit::InternalError => {}
            other => return Ok(ScratchExit::Other(format!("{other:?}"))),
        }
        let exit = InternalErrorExit::from_run(self.vcpu.get_kvm_run());
        Ok(ScratchExit::InternalError(exit))
    }

    /// Runs the vCPU, letting `fallback` carry out every instruction KVM's emulator gives up on,
    /// until some other exit or `max_exits` emulation failures.
    pub fn run_with_fallback(
        &mut self,
        fallback: &mut InsnFallback,
        max_exits: usize,
    ) -> Result<ScratchExit, PvmError> {
        for _ in 0..max_exits {
            match self.run()? {
                ScratchExit::InternalError(_) => {
                    if let Err(e) = fallback.handle_internal_error(&mut self.vcpu, &self.mem) {
                        return Ok(ScratchExit::FallbackFailed(e.to_string()));
                    }
                }
                exit => return Ok(exit),
            }
        }
        Ok(ScratchExit::Other(format!(
            "still failing after {max_exits} emulation failures"
        )))
    }

    /// The vCPU, for reading and changing its state.
    pub fn vcpu(&mut self) -> &mut VcpuFd {
        &mut self.vcpu
    }

    /// The vCPU's x87/SSE state, MXCSR included.
    pub fn fpu(&self) -> Result<kvm_fpu, PvmError> {
        read_fpu(&self.vcpu).map_err(setup("KVM_GET_XSAVE"))
    }

    /// Sets the vCPU's x87/SSE state, MXCSR included.
    pub fn set_fpu(&self, fpu: &kvm_fpu) -> Result<(), PvmError> {
        write_fpu(&self.vcpu, fpu).map_err(setup("KVM_SET_XSAVE"))
    }

    /// The VM.
    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    /// The guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The exception vector whose handler stub halted at `rip`, if `rip` is just past one.
    pub fn handler_vector(rip: u64) -> Option<u8> {
        let offset = rip.checked_sub(HANDLERS + 1)?;
        if offset % HANDLER_STRIDE != 0 {
            return None;
        }
        u8::try_from(offset / HANDLER_STRIDE).ok()
    }
}

fn setup(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> PvmError {
    move |source| PvmError::Setup { what, source }
}

/// The GDT, page tables, IDT and handler stubs described in the module docs.
fn write_tables(mem: &GuestMemoryMmap) -> Result<(), PvmError> {
    let write = |addr: u64, bytes: &[u8]| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| PvmError::Write { addr, source })
    };
    // Null, code: present, ring 0, execute/read, L=1 G=1; data: present, read/write, D/B=1 G=1.
    let gdt: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    write(GDT, &u64s(&gdt))?;
    // PML4[0] -> PDPT, PDPT[0] -> PD, PD[0..2] = 2 MiB pages (present, writable, PS).
    write(PML4, &u64s(&[(PML4 + 0x1000) | 3]))?;
    write(PML4 + 0x1000, &u64s(&[(PML4 + 0x2000) | 3]))?;
    write(PML4 + 0x2000, &u64s(&[0x83, (2 << 20) | 0x83]))?;

    let mut idt = Vec::with_capacity(256 * 16);
    let mut stubs = Vec::with_capacity(256 * HANDLER_STRIDE as usize);
    for vector in 0..256u64 {
        let handler = HANDLERS + vector * HANDLER_STRIDE;
        // 64-bit interrupt gate: present, DPL 0, type 0xe, IST 0.
        let low = (handler & 0xffff)
            | (u64::from(CODE_SELECTOR) << 16)
            | (0x8e << 40)
            | ((handler >> 16) & 0xffff) << 48;
        idt.extend_from_slice(&low.to_le_bytes());
        idt.extend_from_slice(&(handler >> 32).to_le_bytes());
        // hlt; jmp back to the hlt; padding.
        stubs.extend_from_slice(&[HLT, 0xeb, 0xfd, 0x90, 0x90, 0x90, 0x90, 0x90]);
    }
    write(IDT, &idt)?;
    write(HANDLERS, &stubs)
}

fn u64s(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// System registers for 64-bit ring-0 code with the tables above. CR4.OSXSAVE is dropped when the
/// host refuses it (no XSAVE), so `xgetbv` then simply faults.
fn long_mode_sregs(vcpu: &VcpuFd) -> Result<kvm_sregs, PvmError> {
    let mut sregs = vcpu.get_sregs().map_err(setup("KVM_GET_SREGS"))?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: CODE_SELECTOR,
        type_: 11,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: DATA_SELECTOR,
        type_: 3,
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt = kvm_dtable {
        base: GDT,
        limit: 3 * 8 - 1,
        ..Default::default()
    };
    sregs.idt = kvm_dtable {
        base: IDT,
        limit: 256 * 16 - 1,
        ..Default::default()
    };
    sregs.cr3 = PML4;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_OSXSAVE;
    if vcpu.set_sregs(&sregs).is_err() {
        sregs.cr4 &= !CR4_OSXSAVE;
        vcpu.set_sregs(&sregs).map_err(setup("KVM_SET_SREGS"))?;
    }
    Ok(sregs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handler_vector_names_the_stub() {
        assert_eq!(ScratchVm::handler_vector(HANDLERS + 1), Some(0));
        assert_eq!(ScratchVm::handler_vector(HANDLERS + 3 * 8 + 1), Some(3));
        assert_eq!(ScratchVm::handler_vector(HANDLERS + 255 * 8 + 1), Some(255));
        assert_eq!(ScratchVm::handler_vector(HANDLERS + 256 * 8 + 1), None);
        assert_eq!(ScratchVm::handler_vector(HANDLERS + 4), None);
        assert_eq!(ScratchVm::handler_vector(CODE), None);
        assert_eq!(ScratchVm::handler_vector(0), None);
    }

    #[test]
    fn tables_are_where_the_docs_say() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        write_tables(&mem).unwrap();
        let read = |addr: u64| mem.read_obj::<u64>(GuestAddress(addr)).unwrap();
        assert_eq!(read(GDT + 8), 0x00af_9b00_0000_ffff);
        assert_eq!(read(PML4), 0x3003);
        assert_eq!(read(PML4 + 0x1000), 0x4003);
        assert_eq!(read(PML4 + 0x2008), 0x20_0083);
        // Vector 3's gate: handler 0x6018, selector 8, type 0x8e.
        assert_eq!(read(IDT + 3 * 16), 0x0000_8e00_0008_6018);
        assert_eq!(read(IDT + 3 * 16 + 8), 0);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(HANDLERS + 3 * 8)).unwrap(),
            HLT
        );
    }
}
