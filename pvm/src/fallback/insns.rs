//! What each instruction the fallback handles does, after the Intel SDM vol. 2 pages of the same
//! name; the exceptions checked are those listed there for protected and 64-bit mode.

use std::sync::atomic::{AtomicBool, Ordering};

use iced_x86::{Code, Instruction, OpKind, Register};

use super::exec::{
    gp0, raise, unsupported, Completion, Exception, Exec, Step, BP_VECTOR, CR0_EM, CR0_MP, CR0_NE,
    CR0_TS, CR4_OSFXSR, CR4_OSXSAVE, MF_VECTOR, NM_VECTOR, UD_VECTOR,
};
use super::guest::{Access, XCR0_X87_SSE};

/// Carries out one decoded instruction.
pub type Handler = fn(&mut Exec<'_>, &Instruction) -> Step<Completion>;

/// One row of the table: the encodings a handler takes, and the name it is counted under.
pub struct Entry {
    pub name: &'static str,
    pub codes: &'static [Code],
    pub run: Handler,
}

/// Every instruction the fallback carries out.
pub const TABLE: &[Entry] = &[
    Entry {
        name: "int3",
        codes: &[Code::Int3],
        run: int3,
    },
    Entry {
        name: "fwait",
        codes: &[Code::Wait],
        run: fwait,
    },
    Entry {
        name: "clac",
        codes: &[Code::Clac],
        run: clac,
    },
    Entry {
        name: "stac",
        codes: &[Code::Stac],
        run: stac,
    },
    Entry {
        name: "fnstsw",
        codes: &[Code::Fnstsw_AX, Code::Fnstsw_m2byte],
        run: fnstsw,
    },
    Entry {
        name: "fnstcw",
        codes: &[Code::Fnstcw_m2byte],
        run: fnstcw,
    },
    Entry {
        name: "fldcw",
        codes: &[Code::Fldcw_m2byte],
        run: fldcw,
    },
    Entry {
        name: "ldmxcsr",
        codes: &[Code::Ldmxcsr_m32],
        run: ldmxcsr,
    },
    Entry {
        name: "stmxcsr",
        codes: &[Code::Stmxcsr_m32],
        run: stmxcsr,
    },
    Entry {
        name: "pxor",
        codes: &[Code::Pxor_xmm_xmmm128],
        run: xor_xmm,
    },
    Entry {
        name: "xorps",
        codes: &[Code::Xorps_xmm_xmmm128],
        run: xor_xmm,
    },
    Entry {
        name: "xorpd",
        codes: &[Code::Xorpd_xmm_xmmm128],
        run: xor_xmm,
    },
    Entry {
        name: "movaps",
        codes: &[Code::Movaps_xmm_xmmm128, Code::Movaps_xmmm128_xmm],
        run: mov_xmm_aligned,
    },
    Entry {
        name: "movapd",
        codes: &[Code::Movapd_xmm_xmmm128, Code::Movapd_xmmm128_xmm],
        run: mov_xmm_aligned,
    },
    Entry {
        name: "movdqa",
        codes: &[Code::Movdqa_xmm_xmmm128, Code::Movdqa_xmmm128_xmm],
        run: mov_xmm_aligned,
    },
    Entry {
        name: "movups",
        codes: &[Code::Movups_xmm_xmmm128, Code::Movups_xmmm128_xmm],
        run: mov_xmm_unaligned,
    },
    Entry {
        name: "movupd",
        codes: &[Code::Movupd_xmm_xmmm128, Code::Movupd_xmmm128_xmm],
        run: mov_xmm_unaligned,
    },
    Entry {
        name: "movdqu",
        codes: &[Code::Movdqu_xmm_xmmm128, Code::Movdqu_xmmm128_xmm],
        run: mov_xmm_unaligned,
    },
    Entry {
        name: "popcnt",
        codes: &[
            Code::Popcnt_r16_rm16,
            Code::Popcnt_r32_rm32,
            Code::Popcnt_r64_rm64,
        ],
        run: popcnt,
    },
    Entry {
        name: "cmpxchg16b",
        codes: &[Code::Cmpxchg16b_m128],
        run: cmpxchg16b,
    },
    Entry {
        name: "xgetbv",
        codes: &[Code::Xgetbv],
        run: xgetbv,
    },
    Entry {
        name: "vzeroupper",
        codes: &[Code::VEX_Vzeroupper],
        run: vzeroupper,
    },
    Entry {
        name: "lsl",
        codes: &[
            Code::Lsl_r16_rm16,
            Code::Lsl_r32_r32m16,
            Code::Lsl_r64_r64m16,
        ],
        run: lsl,
    },
];

/// The table row for `code`.
pub fn lookup(code: Code) -> Option<&'static Entry> {
    TABLE.iter().find(|entry| entry.codes.contains(&code))
}

const RFLAGS_CF: u64 = 1;
const RFLAGS_PF: u64 = 1 << 2;
const RFLAGS_AF: u64 = 1 << 4;
const RFLAGS_ZF: u64 = 1 << 6;
const RFLAGS_SF: u64 = 1 << 7;
const RFLAGS_OF: u64 = 1 << 11;

/// INT3: a trap, so the #BP is delivered with RIP already past the instruction.
fn int3(_: &mut Exec<'_>, _: &Instruction) -> Step<Completion> {
    Ok(Completion::NextThenRaise(Exception::new(BP_VECTOR)))
}

/// RFLAGS.AC, which CLAC and STAC clear and set (SDM vol. 2: CLAC, STAC).
const RFLAGS_AC: u64 = 1 << 18;

/// CLAC/STAC are #UD outside ring 0 (and without SMAP, which a guest that runs them assumes).
fn smap_access(exec: &mut Exec<'_>, set: bool) -> Step<Completion> {
    if exec.cpl() != 0 {
        return raise(UD_VECTOR);
    }
    if set {
        exec.regs.rflags |= RFLAGS_AC;
    } else {
        exec.regs.rflags &= !RFLAGS_AC;
    }
    Ok(Completion::Next)
}

fn clac(exec: &mut Exec<'_>, _: &Instruction) -> Step<Completion> {
    smap_access(exec, false)
}

fn stac(exec: &mut Exec<'_>, _: &Instruction) -> Step<Completion> {
    smap_access(exec, true)
}

/// #NM for x87 instructions when CR0.EM or CR0.TS is set.
fn x87_usable(exec: &Exec<'_>) -> Step<()> {
    if exec.sregs.cr0 & (CR0_EM | CR0_TS) != 0 {
        return raise(NM_VECTOR);
    }
    Ok(())
}

/// Whether an x87 exception flagged in FSW is unmasked in FCW (SDM vol. 1, 8.5).
fn x87_exception_pending(fsw: u16, fcw: u16) -> bool {
    fsw & 0x3f & !(fcw & 0x3f) != 0
}

/// What WAIT/FWAIT and waiting x87 instructions check first: #NM when CR0.MP and CR0.TS
/// are both set, #MF when an unmasked x87 exception is pending (with CR0.NE clear the CPU would
/// signal FERR# to an external interrupt controller instead; that is only logged).
fn x87_wait(exec: &mut Exec<'_>) -> Step<()> {
    if exec.sregs.cr0 & (CR0_MP | CR0_TS) == (CR0_MP | CR0_TS) {
        return raise(NM_VECTOR);
    }
    let ne = exec.sregs.cr0 & CR0_NE != 0;
    let fpu = exec.fpu()?;
    if x87_exception_pending(fpu.fsw, fpu.fcw) {
        if ne {
            return raise(MF_VECTOR);
        }
        log::warn!(
            "x87 exception pending (FSW {:#06x}) with CR0.NE clear: not signalled",
            fpu.fsw
        );
    }
    Ok(())
}

fn fwait(exec: &mut Exec<'_>, _: &Instruction) -> Step<Completion> {
    x87_wait(exec)?;
    Ok(Completion::Next)
}

/// Stores a 16-bit value into operand 0, `ax` or memory.
fn store16(exec: &mut Exec<'_>, insn: &Instruction, value: u16) -> Step<Completion> {
    match insn.op0_kind() {
        OpKind::Register => exec.set_gpr(insn.op0_register(), value.into())?,
        _ => {
            let addr = exec.linear_address(insn, 0)?;
            exec.write(addr, &value.to_le_bytes())?;
        }
    }
    Ok(Completion::Next)
}

fn fnstsw(exec: &mut Exec<'_>, insn: &Instruction) -> Step<Completion> {
    x87_usable(exec)?;
    let fsw = exec.fpu()?.fsw;
    store16(exec, insn, fsw)
}

fn fnstcw(exec: &mut Exec<'_>, insn: &Instruction) -> Step<Completion> {
    x87_usable(exec)?;
    let fcw = exec.fpu()?.fcw;
    store16(exec, insn, fcw)
}

/// FLDCW checks for pending unmasked exceptions before loading; one it unmasks is raised by the
/// next waiting instruction.
fn fldcw(exec: &mut Exec<'_>, insn: &Instruction) -> Step<Completion> {
    x87_usable(exec)?;
    x87_wait(exec)?;
    let addr = exec.linear_address(insn, 0)?;
    let mut value = [0; 2];
    exec.read(addr, &mut value, Access::Read)?;
    exec.fpu_mut()?.fcw = u16::from_le_bytes(value);
    Ok(Completion::Next)
}

/// #UD without SSE enabled (CR0.EM set or CR4.OSFXSR clear), #NM with CR0.TS.
fn sse_usable(exec: &Exec<'_>) -> Step<()> {
    if exec.sregs.cr0 & CR0_EM != 0 || exec.sregs.cr4 & CR4_OSFXSR == 0 {
        return raise(UD_VECTOR);
    }
    if exec.sregs.cr0 & CR0_TS != 0 {
        return raise(NM_VECTOR);
    }
    Ok(())
}

/// LDMXCSR: #GP(0) when a bit outside MXCSR_MASK is set.
fn ldmxcsr(exec: &mut Exec<'_>, insn: &Instruction) -> Step<Completion> {
    sse_usable(exec)?;
    let addr = exec.linear_address(insn, 0)?;
    let mut value = [0; 4];
    exec.read(addr, &mut value, Access::Read)?;
    let value = u32::from_le_bytes(value);
    if value & !exec.mxcsr_mask()? != 0 {
        return gp0();
    }
    exec.fpu_mut()?.mxcsr = value;
    Ok(Completion::Next)
}

fn stmxcsr(exec: &mut Exec<'_>, insn: &Instruction) -> Step<Completion> {
    sse_usable(exec)?;
    let mxcsr = exec.fpu()?.mxcsr;
    let addr = exec.linear_address(insn, 0)?;
    exec.write(addr, &mxcsr.to_le_bytes())?;
    Ok(Completion::Next)
}

/// The index into `kvm_fpu.xmm` of an XMM register.
fn xmm_index(reg: Register) -> Step<usize> {
    match reg.is_xmm().then(|| reg.number()) {
        Some(index) if index < 16 => Ok(index),
        _ => unsupported("a register operand other than xmm0-xmm15"),
    }
}

/// The 16 bytes of an `xmm/m128` operand. Legacy SSE requires 16-byte aligned memory operands
/// except for the unaligned moves: #GP(0) otherwise.
fn xmm_source(
    exec: &mut Exec<'_>,
    insn: &Instruction,
    operand: u32,
    aligned: bool,
) -> Step<[u8; 16]> {
    if insn.op_kind(operand) == OpKind::Register {
        let index = xmm_index(insn.op_register(operand))?;
        return Ok(exec.fpu()?.xmm[index]);
    }
    let addr = exec.linear_address(insn, operand)?;
    if aligned && addr % 16 != 0 {
        return gp0();
    }
    let mut value = [0; 16];
    exec.read(addr, &mut value, Access::Read)?;
    Ok(value)
}

/// PXOR, XORPS, XORPD xmm, xmm/m128: a bitwise XOR whatever the element type.
fn xor_xmm(exec: &mut Exec<'_>, insn: &Instruction) -> Step<Completion> {
    sse_usable(exec)?;
    let dst = xmm_index(insn.op0_register())?;
    let src = xmm_source(exec, insn, 1, true)?;
    let fpu = exec.fpu_mut()?;
    for (d, s) in fpu.xmm[dst].iter_mut().zip(src) {
        *d ^= s;
    }
    Ok(Completion::Next)
}

/// 128-bit moves in either direction.
fn mov_xmm(exec: &mut Exec<'_>, insn: &Instruction, aligned: bool) -> Step<Completion> {
    sse_usable(exec)?;
    let value = xmm_source(exec, insn, 1, aligned)?;
    if insn.op0_kind() == OpKind::Register {
        let dst = xmm_index(insn.op0_register())?;
        exec.fpu_mut()?.xmm[dst] = value;
    } else {
        let addr = exec.linear_address(insn, 0)?;
        if aligned && addr % 16 != 0 {
            return gp0();
        }
        exec.write(addr, &value)?;
    }
    Ok(Completion::Next)
}

fn mov_xmm_aligned(exec: &mut Exec<'_>, insn: &Instruction) -> Step<Completion> {
    mov_xmm(exec, insn, true)
}

fn mov_xmm_unaligned(exec: &mut Exec<'_>, insn: &Instruction) -> Step<Completion> {
    mov_xmm(exec, insn, false)
}

/// Reads an `r/m` operand of `size` bytes (2, 4 or 8).
fn read_rm(exec: &mut Exec<'_>, insn: &Instruction, operand: u32, size: usize) -> Step<u64> {
    if insn.op_kind(operand) == OpKind::Register {
        return match exec.gpr(insn.op_register(operand)) {
            Some(value) => Ok(value),
            None => unsupported("a register operand that is not a general-purpose register"),
        };
    }
    let addr = exec.linear_address(insn, operand)?;
    let mut bytes = [0; 8];
    let Some(buf) = bytes.get_mut(..size) else {
        return unsupported("an operand wider than 8 bytes");
    };
    exec.read(addr, buf, Access::Read)?;
    Ok(u64::from_le_bytes(bytes))
}

/// POPCNT: ZF is set when the source is zero; CF, OF, SF, AF and PF are cleared.
fn popcnt(exec: &mut Exec<'_>, insn: &Instruction) -> Step<Completion> {
    let dst = insn.op0_register();
    let src = read_rm(exec, insn, 1, dst.size())?;
    exec.set_gpr(dst, src.count_ones().into())?;
    let flags = RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF;
    exec.regs.rflags &= !flags;
    if src == 0 {
        exec.regs.rflags |= RFLAGS_ZF;
    }
    Ok(Completion::Next)
}

/// CMPXCHG16B m128: compares RDX:RAX with the operand; if equal, stores RCX:RBX and sets ZF,
/// otherwise loads the operand into RDX:RAX and clears ZF. #GP(0) unless 16-byte aligned.
/// Not atomic with respect to other vCPUs: the hide policies keep Linux from using it.
fn cmpxchg16b(exec: &mut Exec<'_>, insn: &Instruction) -> Step<Completion> {
    let addr = exec.linear_address(insn, 0)?;
    if addr % 16 != 0 {
        return gp0();
    }
    let mut current = [0; 16];
    // The CPU always writes the destination, so it must be writable even when the compare fails.
    exec.read(addr, &mut current, Access::Write)?;
    let (lo, hi) = current.split_at(8);
    let lo = u64::from_le_bytes(lo.try_into().unwrap_or_default());
    let hi = u64::from_le_bytes(hi.try_into().unwrap_or_default());
    if (lo, hi) == (exec.regs.rax, exec.regs.rdx) {
        let mut new = [0; 16];
        new[..8].copy_from_slice(&exec.regs.rbx.to_le_bytes());
        new[8..].copy_from_slice(&exec.regs.rcx.to_le_bytes());
        exec.write(addr, &new)?;
        exec.regs.rflags |= RFLAGS_ZF;
    } else {
        exec.regs.rax = lo;
        exec.regs.rdx = hi;
        exec.regs.rflags &= !RFLAGS_ZF;
    }
    Ok(Completion::Next)
}

static LENIENT_XGETBV: AtomicBool = AtomicBool::new(false);

/// XGETBV: EDX:EAX = XCR[ECX]. ECX = 1 (XINUSE) answers XCR0, which claims every enabled
/// component in use; that is allowed. With CR4.OSXSAVE clear (XSAVE hidden) the CPU would raise
/// #UD; we answer x87|SSE instead, so a guest that probes anyway sees XSAVE as unusable.
fn xgetbv(exec: &mut Exec<'_>, _: &Instruction) -> Step<Completion> {
    let value = if exec.sregs.cr4 & CR4_OSXSAVE == 0 {
        if !LENIENT_XGETBV.swap(true, Ordering::Relaxed) {
            log::warn!("guest ran xgetbv with CR4.OSXSAVE clear: answering XCR0 = x87|SSE");
        }
        XCR0_X87_SSE
    } else {
        match exec.regs.rcx as u32 {
            0 | 1 => exec.cpu.xcr0()?,
            _ => return gp0(),
        }
    };
    exec.regs.rax = value & 0xffff_ffff;
    exec.regs.rdx = value >> 32;
    Ok(Completion::Next)
}

/// VZEROUPPER: nothing to do when AVX state is not enabled (XSAVE or AVX hidden). With AVX enabled
/// it would have to clear the upper YMM halves through KVM_SET_XSAVE, which is not done.
fn vzeroupper(exec: &mut Exec<'_>, _: &Instruction) -> Step<Completion> {
    if exec.sregs.cr4 & CR4_OSXSAVE != 0 && exec.cpu.xcr0()? & 0x4 != 0 {
        return unsupported(
            "vzeroupper with AVX state enabled in XCR0 (hide AVX with the safe or auto policy)",
        );
    }
    Ok(Completion::Next)
}

/// LSL r, r/m16: loads the byte-granular limit of the segment the selector names and sets ZF, or
/// clears ZF and leaves the destination alone when the descriptor is out of the table, of a type
/// without a limit, or not visible at the current privilege (SDM vol. 2: LSL). Linux's NMI and
/// debug entry (paranoid_entry) reads its CPU number this way with FSGSBASE, which the emulator
/// cannot do. Only ring 0 is served: the descriptor read is a supervisor access, which the
/// fallback's page walk models for ring 0 alone (ring-3 LSL runs natively anyway).
fn lsl(exec: &mut Exec<'_>, insn: &Instruction) -> Step<Completion> {
    if exec.cpl() != 0 {
        return unsupported("lsl outside ring 0");
    }
    let selector = read_rm(exec, insn, 1, 2)? as u16;
    match segment_limit(exec, selector)? {
        Some(limit) => {
            let dst = insn.op0_register();
            let value = if dst.size() == 2 {
                limit & 0xffff
            } else {
                limit
            };
            exec.set_gpr(dst, value.into())?;
            exec.regs.rflags |= RFLAGS_ZF;
        }
        None => exec.regs.rflags &= !RFLAGS_ZF,
    }
    Ok(Completion::Next)
}

/// The limit LSL reports for `selector` at CPL 0, or `None` where LSL clears ZF.
fn segment_limit(exec: &mut Exec<'_>, selector: u16) -> Step<Option<u32>> {
    let index = u64::from(selector >> 3);
    if selector & 4 == 0 && index == 0 {
        return Ok(None);
    }
    let (base, limit) = if selector & 4 != 0 {
        let ldt = &exec.sregs.ldt;
        if ldt.unusable != 0 {
            return Ok(None);
        }
        (ldt.base, u64::from(ldt.limit))
    } else {
        (exec.sregs.gdt.base, u64::from(exec.sregs.gdt.limit))
    };
    if index * 8 + 7 > limit {
        return Ok(None);
    }
    let mut raw = [0; 8];
    exec.read(base.wrapping_add(index * 8), &mut raw, Access::Read)?;
    let desc = u64::from_le_bytes(raw);
    let kind = (desc >> 40) & 0xf;
    let system = desc & (1 << 44) == 0;
    let dpl = ((desc >> 45) & 3) as u16;
    let rpl = selector & 3;
    let conforming_code = !system && kind & 0b1100 == 0b1100;
    // Of the system types, 64-bit mode gives a limit only to the LDT and to (busy) 64-bit TSSs;
    // legacy modes add the 16-bit TSSs.
    let has_limit = if !system {
        true
    } else if exec.bitness == 64 {
        matches!(kind, 2 | 9 | 11)
    } else {
        matches!(kind, 1 | 2 | 3 | 9 | 11)
    };
    // At CPL 0 only the selector's RPL can exceed the DPL.
    if !has_limit || (!conforming_code && rpl > dpl) {
        return Ok(None);
    }
    let mut limit = ((desc & 0xffff) | ((desc >> 32) & 0xf_0000)) as u32;
    if desc & (1 << 55) != 0 {
        limit = (limit << 12) | 0xfff;
    }
    Ok(Some(limit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_one_row() {
        let mut seen = std::collections::HashSet::new();
        for entry in TABLE {
            for code in entry.codes {
                assert!(seen.insert(*code), "{code:?} is in two rows");
                assert_eq!(lookup(*code).map(|e| e.name), Some(entry.name));
            }
        }
        assert!(lookup(Code::Nopd).is_none());
    }

    #[test]
    fn pending_x87_exceptions() {
        // Invalid operation flagged (bit 0) and masked (FCW default 0x37f): nothing pending.
        assert!(!x87_exception_pending(0x0001, 0x037f));
        // Unmasked.
        assert!(x87_exception_pending(0x0001, 0x037e));
        // Only non-exception bits (C0-C3, TOP, busy) in FSW.
        assert!(!x87_exception_pending(0xff00, 0x0000));
    }
}
