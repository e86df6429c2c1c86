//! The state one emulated instruction works on: registers read once, FPU state loaded on demand,
//! operand addresses and guest memory through the guest's page tables, and the exceptions an
//! instruction may raise instead of completing (Intel SDM vol. 3A, 6.15 "Exception and interrupt
//! reference").

use iced_x86::{Instruction, OpKind, Register};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};

use super::guest::{Access, GuestCpu};
use super::paging::{Paging, Translation};
use super::FallbackErrorKind;

pub const BP_VECTOR: u8 = 3;
pub const UD_VECTOR: u8 = 6;
pub const NM_VECTOR: u8 = 7;
pub const SS_VECTOR: u8 = 12;
pub const GP_VECTOR: u8 = 13;
pub const PF_VECTOR: u8 = 14;
pub const MF_VECTOR: u8 = 16;

pub const CR0_PE: u64 = 1;
pub const CR0_MP: u64 = 1 << 1;
pub const CR0_EM: u64 = 1 << 2;
pub const CR0_TS: u64 = 1 << 3;
pub const CR0_NE: u64 = 1 << 5;
pub const CR4_OSFXSR: u64 = 1 << 9;
pub const CR4_OSXSAVE: u64 = 1 << 18;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_VM: u64 = 1 << 17;

const PAGE_SIZE: u64 = 4096;

/// An exception the instruction raises in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exception {
    pub vector: u8,
    pub error_code: Option<u32>,
    /// The faulting linear address, for #PF.
    pub cr2: Option<u64>,
}

impl Exception {
    pub fn new(vector: u8) -> Self {
        Exception {
            vector,
            error_code: None,
            cr2: None,
        }
    }

    pub fn with_code(vector: u8, code: u32) -> Self {
        Exception {
            vector,
            error_code: Some(code),
            cr2: None,
        }
    }

    /// A #PF at `addr` with the error code a page walk gave.
    pub fn page_fault_code(addr: u64, error_code: u32) -> Self {
        Exception {
            vector: PF_VECTOR,
            error_code: Some(error_code),
            cr2: Some(addr),
        }
    }
}

/// Why an instruction did not complete.
#[derive(Debug)]
pub enum Abort {
    /// It faults in the guest: inject the exception, leave RIP at the instruction.
    Raise(Exception),
    /// The fallback cannot carry it out.
    Fail(FallbackErrorKind),
}

impl From<FallbackErrorKind> for Abort {
    fn from(kind: FallbackErrorKind) -> Self {
        Abort::Fail(kind)
    }
}

pub type Step<T> = Result<T, Abort>;

/// How an instruction that did not fault ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// Advance RIP past it.
    Next,
    /// Advance RIP past it, then deliver a trap (`int3`).
    NextThenRaise(Exception),
}

/// Raises `vector` without an error code.
pub fn raise<T>(vector: u8) -> Step<T> {
    Err(Abort::Raise(Exception::new(vector)))
}

/// Raises #GP(0).
pub fn gp0<T>() -> Step<T> {
    Err(Abort::Raise(Exception::with_code(GP_VECTOR, 0)))
}

/// Fails with an instruction form the fallback does not carry out.
pub fn unsupported<T>(what: &'static str) -> Step<T> {
    Err(Abort::Fail(FallbackErrorKind::Unsupported(what)))
}

/// The code size of the vCPU from CR0.PE, EFER.LMA, CS.L, CS.D and RFLAGS.VM.
pub fn bitness(sregs: &kvm_sregs, rflags: u64) -> u32 {
    if sregs.cr0 & CR0_PE == 0 || rflags & RFLAGS_VM != 0 {
        16
    } else if sregs.efer & EFER_LMA != 0 && sregs.cs.l != 0 {
        64
    } else if sregs.cs.db != 0 {
        32
    } else {
        16
    }
}

/// The vCPU state one instruction sees and changes.
pub struct Exec<'a> {
    pub cpu: &'a mut dyn GuestCpu,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub bitness: u32,
    fpu: Option<kvm_fpu>,
    fpu_dirty: bool,
    mxcsr_mask: &'a mut Option<u32>,
}

impl<'a> Exec<'a> {
    pub fn new(
        cpu: &'a mut dyn GuestCpu,
        regs: kvm_regs,
        sregs: kvm_sregs,
        mxcsr_mask: &'a mut Option<u32>,
    ) -> Self {
        let bitness = bitness(&sregs, regs.rflags);
        Exec {
            cpu,
            regs,
            sregs,
            bitness,
            fpu: None,
            fpu_dirty: false,
            mxcsr_mask,
        }
    }

    /// The x87/SSE state, read from the vCPU on first use.
    pub fn fpu(&mut self) -> Step<&kvm_fpu> {
        Ok(self.load_fpu()?)
    }

    /// The x87/SSE state for changing; it is written back when the instruction completes.
    pub fn fpu_mut(&mut self) -> Step<&mut kvm_fpu> {
        self.fpu_dirty = true;
        self.load_fpu()
    }

    fn load_fpu(&mut self) -> Step<&mut kvm_fpu> {
        let fpu = match self.fpu.take() {
            Some(fpu) => fpu,
            None => self.cpu.fpu()?,
        };
        Ok(self.fpu.insert(fpu))
    }

    /// The FPU state to write back, if an instruction changed it.
    pub fn dirty_fpu(&self) -> Option<&kvm_fpu> {
        self.fpu.as_ref().filter(|_| self.fpu_dirty)
    }

    /// The guest's MXCSR_MASK, asked of the vCPU once.
    pub fn mxcsr_mask(&mut self) -> Step<u32> {
        if let Some(mask) = *self.mxcsr_mask {
            return Ok(mask);
        }
        let mask = self.cpu.mxcsr_mask()?;
        *self.mxcsr_mask = Some(mask);
        Ok(mask)
    }

    /// The current privilege level.
    pub fn cpl(&self) -> u8 {
        if self.sregs.cr0 & CR0_PE == 0 {
            0
        } else if self.regs.rflags & RFLAGS_VM != 0 {
            3
        } else {
            (self.sregs.cs.selector & 3) as u8
        }
    }

    /// What a page walk needs of the vCPU's state.
    pub fn paging(&self) -> Paging {
        Paging::of(&self.regs, &self.sregs)
    }

    /// A general-purpose register's value (any width).
    pub fn gpr(&self, reg: Register) -> Option<u64> {
        read_gpr(&self.regs, reg)
    }

    /// Writes a general-purpose register with x86 semantics: 32-bit writes clear bits 63:32,
    /// 8- and 16-bit writes keep the rest.
    pub fn set_gpr(&mut self, reg: Register, value: u64) -> Step<()> {
        if write_gpr(&mut self.regs, reg, value) {
            Ok(())
        } else {
            unsupported("a register operand that is not a general-purpose register")
        }
    }

    /// A segment's base as used for addressing: only FS and GS have one in 64-bit mode.
    pub fn segment_base(&self, seg: Register) -> Option<u64> {
        let s = &self.sregs;
        let base = match seg {
            Register::FS => s.fs.base,
            Register::GS => s.gs.base,
            _ if self.bitness == 64 => 0,
            Register::ES => s.es.base,
            Register::CS => s.cs.base,
            Register::SS => s.ss.base,
            Register::DS => s.ds.base,
            _ => return None,
        };
        Some(base)
    }

    /// The linear address of memory operand `operand`. Raises #GP(0) (#SS(0) for stack
    /// references) for a non-canonical address in 64-bit mode. Segment limits are not checked.
    pub fn linear_address(&self, insn: &Instruction, operand: u32) -> Step<u64> {
        if insn.op_kind(operand) != OpKind::Memory {
            return unsupported("a memory operand form other than [base+index*scale+disp]");
        }
        let address = insn.virtual_address(operand, 0, |reg, _, _| {
            if reg.is_segment_register() {
                self.segment_base(reg)
            } else {
                self.gpr(reg)
            }
        });
        let Some(address) = address else {
            return unsupported("an address built from registers the fallback cannot read");
        };
        if self.bitness != 64 {
            return Ok(address & 0xffff_ffff);
        }
        let bits = if self.sregs.cr4 & CR4_LA57 != 0 {
            57
        } else {
            48
        };
        let shift = 64 - bits;
        if ((address << shift) as i64 >> shift) as u64 != address {
            let stack = matches!(insn.memory_base(), Register::RSP | Register::RBP)
                || insn.memory_segment() == Register::SS;
            let vector = if stack { SS_VECTOR } else { GP_VECTOR };
            return Err(Abort::Raise(Exception::with_code(vector, 0)));
        }
        Ok(address)
    }

    /// Translates every page of `len` bytes at `addr` first, so that a fault leaves nothing half
    /// done, and returns the guest-physical pieces.
    fn pieces(&mut self, addr: u64, len: usize, access: Access) -> Step<Vec<(u64, usize)>> {
        let mut pieces = Vec::with_capacity(2);
        let paging = self.paging();
        for (linear, chunk) in page_chunks(addr, len) {
            match self.cpu.translate(linear, access, &paging)? {
                Translation::Mapped(gpa) => pieces.push((gpa, chunk)),
                Translation::Fault(code) => {
                    return Err(Abort::Raise(Exception::page_fault_code(linear, code)));
                }
            }
        }
        Ok(pieces)
    }

    /// Reads guest memory at linear `addr`, translated for `access`.
    pub fn read(&mut self, addr: u64, buf: &mut [u8], access: Access) -> Step<()> {
        let mut done = 0;
        for (gpa, len) in self.pieces(addr, buf.len(), access)? {
            self.cpu.read_phys(gpa, &mut buf[done..done + len])?;
            done += len;
        }
        Ok(())
    }

    /// Writes guest memory at linear `addr`.
    pub fn write(&mut self, addr: u64, buf: &[u8]) -> Step<()> {
        let mut done = 0;
        for (gpa, len) in self.pieces(addr, buf.len(), Access::Write)? {
            self.cpu.write_phys(gpa, &buf[done..done + len])?;
            done += len;
        }
        Ok(())
    }
}

/// Splits `len` bytes at linear `addr` at 4 KiB page boundaries: (linear address, length) pairs.
pub fn page_chunks(addr: u64, len: usize) -> impl Iterator<Item = (u64, usize)> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let linear = addr.wrapping_add(done as u64);
        let in_page = (PAGE_SIZE - linear % PAGE_SIZE) as usize;
        let chunk = in_page.min(len - done);
        done += chunk;
        Some((linear, chunk))
    })
}

/// The `kvm_regs` field holding a 64-bit general-purpose register.
fn gpr_slot(regs: &mut kvm_regs, full: Register) -> Option<&mut u64> {
    Some(match full {
        Register::RAX => &mut regs.rax,
        Register::RCX => &mut regs.rcx,
        Register::RDX => &mut regs.rdx,
        Register::RBX => &mut regs.rbx,
        Register::RSP => &mut regs.rsp,
        Register::RBP => &mut regs.rbp,
        Register::RSI => &mut regs.rsi,
        Register::RDI => &mut regs.rdi,
        Register::R8 => &mut regs.r8,
        Register::R9 => &mut regs.r9,
        Register::R10 => &mut regs.r10,
        Register::R11 => &mut regs.r11,
        Register::R12 => &mut regs.r12,
        Register::R13 => &mut regs.r13,
        Register::R14 => &mut regs.r14,
        Register::R15 => &mut regs.r15,
        _ => return None,
    })
}

fn is_high_byte(reg: Register) -> bool {
    matches!(
        reg,
        Register::AH | Register::CH | Register::DH | Register::BH
    )
}

/// Reads a general-purpose register of any width from `regs`.
pub fn read_gpr(regs: &kvm_regs, reg: Register) -> Option<u64> {
    if !reg.is_gpr() {
        return None;
    }
    let mut copy = *regs;
    let full = *gpr_slot(&mut copy, reg.full_register())?;
    Some(match reg.size() {
        8 => full,
        4 => full & 0xffff_ffff,
        2 => full & 0xffff,
        _ if is_high_byte(reg) => (full >> 8) & 0xff,
        _ => full & 0xff,
    })
}

/// Writes a general-purpose register of any width into `regs`; false if `reg` is not one.
pub fn write_gpr(regs: &mut kvm_regs, reg: Register, value: u64) -> bool {
    if !reg.is_gpr() {
        return false;
    }
    let size = reg.size();
    let high = is_high_byte(reg);
    let Some(slot) = gpr_slot(regs, reg.full_register()) else {
        return false;
    };
    *slot = match size {
        8 => value,
        4 => value & 0xffff_ffff,
        2 => (*slot & !0xffff) | (value & 0xffff),
        _ if high => (*slot & !0xff00) | ((value & 0xff) << 8),
        _ => (*slot & !0xff) | (value & 0xff),
    };
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_segment;

    #[test]
    fn gpr_widths() {
        let mut regs = kvm_regs {
            rax: 0x1122_3344_5566_7788,
            ..Default::default()
        };
        assert_eq!(read_gpr(&regs, Register::RAX), Some(0x1122_3344_5566_7788));
        assert_eq!(read_gpr(&regs, Register::EAX), Some(0x5566_7788));
        assert_eq!(read_gpr(&regs, Register::AX), Some(0x7788));
        assert_eq!(read_gpr(&regs, Register::AH), Some(0x77));
        assert_eq!(read_gpr(&regs, Register::AL), Some(0x88));
        assert_eq!(read_gpr(&regs, Register::XMM0), None);

        assert!(write_gpr(&mut regs, Register::AX, 0xabcd));
        assert_eq!(regs.rax, 0x1122_3344_5566_abcd);
        assert!(write_gpr(&mut regs, Register::AH, 0x1ef));
        assert_eq!(regs.rax, 0x1122_3344_5566_efcd);
        assert!(write_gpr(&mut regs, Register::EAX, 0x1_0000_0001));
        assert_eq!(regs.rax, 1);
        assert!(write_gpr(&mut regs, Register::R15D, 5));
        assert_eq!(regs.r15, 5);
        assert!(!write_gpr(&mut regs, Register::CR0, 5));
    }

    #[test]
    fn bitness_from_modes() {
        let mut sregs = kvm_sregs::default();
        assert_eq!(bitness(&sregs, 2), 16);
        sregs.cr0 = CR0_PE;
        assert_eq!(bitness(&sregs, 2), 16);
        sregs.cs = kvm_segment {
            db: 1,
            ..Default::default()
        };
        assert_eq!(bitness(&sregs, 2), 32);
        assert_eq!(bitness(&sregs, 2 | RFLAGS_VM), 16);
        sregs.efer = EFER_LMA;
        sregs.cs.l = 1;
        sregs.cs.db = 0;
        assert_eq!(bitness(&sregs, 2), 64);
    }

    #[test]
    fn chunks_split_at_pages() {
        let chunks: Vec<_> = page_chunks(0x2ff8, 16).collect();
        assert_eq!(chunks, vec![(0x2ff8, 8), (0x3000, 8)]);
        let chunks: Vec<_> = page_chunks(0x3000, 4).collect();
        assert_eq!(chunks, vec![(0x3000, 4)]);
        let chunks: Vec<_> = page_chunks(u64::MAX - 1, 4).collect();
        assert_eq!(chunks, vec![(u64::MAX - 1, 2), (0, 2)]);
        assert_eq!(page_chunks(0x1000, 0).count(), 0);
    }

    #[test]
    fn page_fault_carries_cr2_and_its_code() {
        let pf = Exception::page_fault_code(0x1234, 0b11);
        assert_eq!(pf.vector, 14);
        assert_eq!(pf.error_code, Some(0b11));
        assert_eq!(pf.cr2, Some(0x1234));
    }
}
