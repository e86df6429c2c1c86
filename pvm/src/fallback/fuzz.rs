//! Fuzzing entry point for the instruction fallback: one emulation failure, with the vCPU state,
//! the page mappings and guest memory all taken from the fuzz input, carried out on a vCPU made
//! of plain data ([`FuzzCpu`]). The cargo-fuzz target `insn_fallback` is a one-line wrapper, and
//! a saved input replays in a plain `#[test]`.
//!
//! Input layout (missing bytes read as zero):
//!
//! | bytes   | meaning                                                                    |
//! |---------|----------------------------------------------------------------------------|
//! | 0       | mode: bits 1:0 pick 64-bit ring 0, 64-bit ring 3, 32-bit, or real mode;    |
//! |         | bit 2 RFLAGS.AC, bit 3 clears CR4.OSFXSR, bit 4 sets CR0.EM, bit 5 CR0.TS, |
//! |         | bit 6 puts RIP 8 bytes before a page end, bit 7 leaves a stale #UD pending |
//! | 1       | bits 3:0: instruction bytes in the exit (0 = none, fetch from memory);     |
//! |         | bit 4: suberror other than emulation; bits 6:5 XCR0; bit 7 MXCSR_MASK 0    |
//! | 2..17   | the 15 instruction bytes (also written to memory at RIP)                   |
//! | 17..19  | pages present: bit `n` maps every linear page whose number is `n` mod 16;  |
//! |         | 0 selects page-table mode instead (below)                                  |
//! | 19..21  | pages read-only, same numbering; in page-table mode: bits 3:0 put CR3 at   |
//! |         | that page, bit 4 sets CR4.SMAP, 5 CR4.SMEP, 6 EFER.NXE, 7 clears CR0.WP    |
//! | 21..23  | FCW; 23..25 FSW; 25..29 MXCSR                                              |
//! | 29..157 | RAX..R15, little-endian                                                     |
//! | 29..    | also the pattern repeated over the 64 KiB of guest memory                  |
//!
//! With a page mask, every linear address maps to guest-physical `addr mod 64 KiB`, so whatever
//! address a register forms, the access lands in memory the input filled, and no IDT exists. In
//! page-table mode the fallback walks the guest's 4-level tables (in the memory the input filled,
//! table addresses taken mod 64 KiB), so that pages past 64 KiB stand for device memory, and an
//! IDT of 256 gates sits at 0xf000.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events};

use super::guest::{Access, GuestCpu};
use super::paging::{self, Paging, Translation, PF_PRESENT, PF_USER, PF_WRITE};
use super::{FallbackErrorKind, InsnFallback, InternalErrorExit, MAX_INSN_LEN};

/// Guest memory of the fuzz vCPU.
const MEM_SIZE: usize = 0x1_0000;
const PAGE_SHIFT: u32 = 12;
const HEADER_LEN: usize = 29;
/// The IDT's linear address in page-table mode.
const IDT_BASE: u64 = 0xf000;
const RIP: u64 = 0x1000;
/// RIP 8 bytes before the end of page 1, so a long instruction straddles into page 2.
const RIP_NEAR_PAGE_END: u64 = 0x1ff8;

/// A vCPU and its memory as plain data, built from fuzz input.
pub struct FuzzCpu {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: kvm_fpu,
    pub events: kvm_vcpu_events,
    pub xcr0: u64,
    pub mxcsr_mask: u32,
    /// Bit `n`: linear pages with number `n` mod 16 are present.
    pub present: u16,
    /// Bit `n`: those pages are read-only.
    pub read_only: u16,
    pub mem: Vec<u8>,
}

/// Fixed-width little-endian fields of the input, zero past its end.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn byte(&self, at: usize) -> u8 {
        self.0.get(at).copied().unwrap_or(0)
    }

    fn le<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut out = [0u8; N];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = self.byte(at.saturating_add(i));
        }
        out
    }

    fn u16(&self, at: usize) -> u16 {
        u16::from_le_bytes(self.le(at))
    }

    fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.le(at))
    }

    fn u64(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.le(at))
    }
}

fn segment(selector: u16, type_: u8, dpl: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db,
        s: 1,
        l,
        g: 1,
        ..Default::default()
    }
}

/// Segments, control registers and EFER for the mode in bits 1:0 of `mode`.
fn sregs_for(mode: u8) -> kvm_sregs {
    const CR0_PROTECTED: u64 = 0x8001_0033; // PE|MP|ET|NE|WP|PG
    const CR0_REAL: u64 = 0x10; // ET
    const CR4_LONG: u64 = (1 << 5) | (1 << 9) | (1 << 10) | (1 << 18); // PAE|OSFXSR|OSXMMEXCPT|OSXSAVE
    const EFER_LONG: u64 = (1 << 8) | (1 << 10); // LME|LMA
    let (cs, ds, cr0, cr4, efer) = match mode & 3 {
        0 => (
            segment(0x08, 11, 0, 1, 0),
            segment(0x10, 3, 0, 0, 1),
            CR0_PROTECTED,
            CR4_LONG,
            EFER_LONG,
        ),
        1 => (
            segment(0x33, 11, 3, 1, 0),
            segment(0x2b, 3, 3, 0, 1),
            CR0_PROTECTED,
            CR4_LONG,
            EFER_LONG,
        ),
        2 => (
            segment(0x08, 11, 0, 0, 1),
            segment(0x10, 3, 0, 0, 1),
            CR0_PROTECTED & !(1 << 31),
            CR4_LONG & !(1 << 5),
            0,
        ),
        _ => {
            let real = kvm_segment {
                limit: 0xffff,
                g: 0,
                db: 0,
                ..segment(0, 3, 0, 0, 0)
            };
            (kvm_segment { type_: 11, ..real }, real, CR0_REAL, 1 << 9, 0)
        }
    };
    kvm_sregs {
        cs,
        ds,
        es: ds,
        fs: ds,
        gs: ds,
        ss: ds,
        cr0,
        cr4,
        efer,
        ..Default::default()
    }
}

/// Fills `mem` with `pattern` repeated, in a logarithmic number of copies: a byte-by-byte loop
/// would dominate the fuzzer's time, every iteration being instrumented.
fn fill_repeating(mem: &mut [u8], pattern: &[u8]) {
    let mut filled = pattern.len().min(mem.len());
    mem[..filled].copy_from_slice(&pattern[..filled]);
    if filled == 0 {
        return;
    }
    // `filled` stays a multiple of the pattern's length, so each copy continues the pattern.
    while filled < mem.len() {
        let n = filled.min(mem.len() - filled);
        mem.copy_within(..n, filled);
        filled += n;
    }
}

impl FuzzCpu {
    /// The vCPU and memory `input` describes (see the module documentation), and the exit.
    pub fn from_input(input: &[u8]) -> (FuzzCpu, InternalErrorExit) {
        let f = Fields(input);
        let mode = f.byte(0);
        let exit_flags = f.byte(1);
        let insn: [u8; MAX_INSN_LEN] = f.le(2);

        let mut sregs = sregs_for(mode);
        let (present, read_only) = (f.u16(17), f.u16(19));
        if present == 0 {
            sregs.cr3 = u64::from(read_only & 0xf) << PAGE_SHIFT;
            if read_only & (1 << 4) != 0 {
                sregs.cr4 |= 1 << 21;
            }
            if read_only & (1 << 5) != 0 {
                sregs.cr4 |= 1 << 20;
            }
            if read_only & (1 << 6) != 0 {
                sregs.efer |= 1 << 11;
            }
            if read_only & (1 << 7) != 0 {
                sregs.cr0 &= !(1 << 16);
            }
            sregs.idt.base = IDT_BASE;
            sregs.idt.limit = 0xfff;
        }
        if mode & (1 << 3) != 0 {
            sregs.cr4 &= !(1 << 9);
        }
        if mode & (1 << 4) != 0 {
            sregs.cr0 |= 1 << 2;
        }
        if mode & (1 << 5) != 0 {
            sregs.cr0 |= 1 << 3;
        }
        let mut regs = kvm_regs {
            rax: f.u64(HEADER_LEN),
            rbx: f.u64(HEADER_LEN + 8),
            rcx: f.u64(HEADER_LEN + 16),
            rdx: f.u64(HEADER_LEN + 24),
            rsi: f.u64(HEADER_LEN + 32),
            rdi: f.u64(HEADER_LEN + 40),
            rsp: f.u64(HEADER_LEN + 48),
            rbp: f.u64(HEADER_LEN + 56),
            r8: f.u64(HEADER_LEN + 64),
            r9: f.u64(HEADER_LEN + 72),
            r10: f.u64(HEADER_LEN + 80),
            r11: f.u64(HEADER_LEN + 88),
            r12: f.u64(HEADER_LEN + 96),
            r13: f.u64(HEADER_LEN + 104),
            r14: f.u64(HEADER_LEN + 112),
            r15: f.u64(HEADER_LEN + 120),
            rip: if mode & (1 << 6) != 0 {
                RIP_NEAR_PAGE_END
            } else {
                RIP
            },
            rflags: 2,
        };
        if mode & (1 << 2) != 0 {
            regs.rflags |= 1 << 18;
        }
        let mut events = kvm_vcpu_events::default();
        if mode & (1 << 7) != 0 {
            events.exception.pending = 1;
            events.exception.nr = 6;
        }
        let fpu = kvm_fpu {
            fcw: f.u16(21),
            fsw: f.u16(23),
            mxcsr: f.u32(25),
            ..Default::default()
        };

        // The pattern fills memory, then the instruction goes at RIP.
        let pattern = input.get(HEADER_LEN..).unwrap_or_default();
        let mut mem = vec![0u8; MEM_SIZE];
        fill_repeating(&mut mem, pattern);
        for (i, &byte) in insn.iter().enumerate() {
            let at = (regs.rip as usize).wrapping_add(i) % MEM_SIZE;
            if let Some(slot) = mem.get_mut(at) {
                *slot = byte;
            }
        }

        let in_exit = usize::from(exit_flags & 0x0f).min(MAX_INSN_LEN);
        let mut exit = InternalErrorExit::emulation_failure(&insn[..in_exit]);
        if in_exit == 0 {
            // KVM without KVM_CAP_EXIT_ON_EMULATION_FAILURE reports no bytes.
            exit.data[0] = 0;
        }
        if exit_flags & (1 << 4) != 0 {
            exit.suberror = 3;
        }
        let cpu = FuzzCpu {
            regs,
            sregs,
            fpu,
            events,
            xcr0: [0x1, 0x3, 0x7, 0xe7][usize::from((exit_flags >> 5) & 3)],
            mxcsr_mask: if exit_flags & (1 << 7) != 0 {
                0
            } else {
                0xffff
            },
            present,
            read_only,
            mem,
        };
        (cpu, exit)
    }

    fn page_bit(gva: u64) -> u16 {
        1 << ((gva >> PAGE_SHIFT) & 15)
    }

    fn range(&self, gpa: u64, len: usize) -> Result<std::ops::Range<usize>, FallbackErrorKind> {
        usize::try_from(gpa)
            .ok()
            .and_then(|start| Some(start..start.checked_add(len)?))
            .filter(|range| range.end <= self.mem.len())
            .ok_or(FallbackErrorKind::GuestMemory {
                gpa,
                source: vm_memory::GuestMemoryError::InvalidGuestAddress(vm_memory::GuestAddress(
                    gpa,
                )),
            })
    }
}

impl GuestCpu for FuzzCpu {
    fn regs(&mut self) -> Result<kvm_regs, FallbackErrorKind> {
        Ok(self.regs)
    }
    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), FallbackErrorKind> {
        self.regs = *regs;
        Ok(())
    }
    fn sregs(&mut self) -> Result<kvm_sregs, FallbackErrorKind> {
        Ok(self.sregs)
    }
    fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<(), FallbackErrorKind> {
        self.sregs = *sregs;
        Ok(())
    }
    fn fpu(&mut self) -> Result<kvm_fpu, FallbackErrorKind> {
        Ok(self.fpu)
    }
    fn set_fpu(&mut self, fpu: &kvm_fpu) -> Result<(), FallbackErrorKind> {
        self.fpu = *fpu;
        Ok(())
    }
    fn vcpu_events(&mut self) -> Result<kvm_vcpu_events, FallbackErrorKind> {
        Ok(self.events)
    }
    fn set_vcpu_events(&mut self, events: &kvm_vcpu_events) -> Result<(), FallbackErrorKind> {
        self.events = *events;
        Ok(())
    }
    fn xcr0(&mut self) -> Result<u64, FallbackErrorKind> {
        Ok(self.xcr0)
    }
    fn mxcsr_mask(&mut self) -> Result<u32, FallbackErrorKind> {
        Ok(self.mxcsr_mask)
    }
    fn translate(
        &mut self,
        gva: u64,
        access: Access,
        paging: &Paging,
    ) -> Result<Translation, FallbackErrorKind> {
        if self.present == 0 {
            let mem = &self.mem;
            return paging::translate(paging, gva, access, &mut |gpa, size| {
                let mut entry = [0u8; 8];
                for (i, byte) in entry.iter_mut().take(size).enumerate() {
                    *byte = mem[(gpa as usize).wrapping_add(i) % MEM_SIZE];
                }
                Ok(u64::from_le_bytes(entry))
            });
        }
        let bit = Self::page_bit(gva);
        let mut code = if paging.cpl == 3 { PF_USER } else { 0 };
        if access == Access::Write {
            code |= PF_WRITE;
        }
        if self.present & bit == 0 {
            return Ok(Translation::Fault(code));
        }
        if access == Access::Write && self.read_only & bit != 0 {
            return Ok(Translation::Fault(code | PF_PRESENT));
        }
        Ok(Translation::Mapped(gva % MEM_SIZE as u64))
    }
    fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), FallbackErrorKind> {
        let range = self.range(gpa, buf.len())?;
        buf.copy_from_slice(&self.mem[range]);
        Ok(())
    }
    fn write_phys(&mut self, gpa: u64, buf: &[u8]) -> Result<(), FallbackErrorKind> {
        let range = self.range(gpa, buf.len())?;
        self.mem[range].copy_from_slice(buf);
        Ok(())
    }
}

/// Runs the fallback once on the vCPU, exit and memory `input` describes, and checks that it
/// either left RIP alone (a fault, or an error for the run loop) or moved it past one
/// instruction.
pub fn fuzz_insn_fallback(input: &[u8]) {
    let (mut cpu, exit) = FuzzCpu::from_input(input);
    let rip_before = cpu.regs.rip;
    let result = InsnFallback::new().handle(&mut cpu, &exit);
    let advanced = cpu.regs.rip.wrapping_sub(rip_before);
    let one_insn = (1..=MAX_INSN_LEN as u64).contains(&advanced);
    match result {
        Ok(()) => assert!(advanced == 0 || one_insn, "RIP moved by {advanced:#x}"),
        Err(e) => assert_eq!(advanced, 0, "RIP moved by {advanced:#x} although {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mode 0 (64-bit ring 0), `len` exit bytes, `insn`, every page present and writable.
    fn input(mode: u8, exit_len: u8, insn: &[u8], tail: &[u8]) -> Vec<u8> {
        let mut input = vec![mode, exit_len];
        let mut bytes = [0x90u8; MAX_INSN_LEN];
        bytes[..insn.len()].copy_from_slice(insn);
        input.extend_from_slice(&bytes);
        input.extend_from_slice(&[0xff, 0xff, 0, 0]); // present, read-only
        input.extend_from_slice(&0x037fu16.to_le_bytes()); // FCW
        input.extend_from_slice(&0u16.to_le_bytes()); // FSW
        input.extend_from_slice(&0x1f80u32.to_le_bytes()); // MXCSR
        assert_eq!(input.len(), HEADER_LEN);
        input.extend_from_slice(tail);
        input
    }

    #[test]
    fn layout_builds_the_documented_state() {
        let mut tail = vec![0u8; 128];
        tail[..8].copy_from_slice(&0x2000u64.to_le_bytes()); // RAX
        let (cpu, exit) = FuzzCpu::from_input(&input(0x41, 3, &[0x0f, 0x01, 0xca], &tail));
        assert_eq!(cpu.regs.rax, 0x2000);
        assert_eq!(cpu.regs.rip, RIP_NEAR_PAGE_END);
        assert_eq!(cpu.sregs.cs.l, 1);
        assert_eq!(cpu.fpu.mxcsr, 0x1f80);
        assert_eq!(cpu.xcr0, 0x1);
        assert_eq!(exit.insn_bytes(), [0x0f, 0x01, 0xca]);
        assert_eq!(
            cpu.mem[RIP_NEAR_PAGE_END as usize..][..3],
            [0x0f, 0x01, 0xca]
        );
        // The pattern repeats over memory: RAX's low byte every 128 bytes.
        assert_eq!(cpu.mem[0x100], 0x00);
        assert_eq!(cpu.mem[0x101], 0x20);
    }

    #[test]
    fn stac_through_fuzz_input_sets_ac_and_advances() {
        let data = input(0, 3, &[0x0f, 0x01, 0xcb], &[]);
        let (mut cpu, exit) = FuzzCpu::from_input(&data);
        InsnFallback::new().handle(&mut cpu, &exit).unwrap();
        assert_eq!(cpu.regs.rip, RIP + 3);
        assert_eq!(cpu.regs.rflags, 2 | (1 << 18));
        fuzz_insn_fallback(&data);
    }

    #[test]
    fn instruction_fetched_from_memory_when_the_exit_has_no_bytes() {
        // stmxcsr [rax] with RAX = 0x3000: MXCSR lands in memory.
        let mut tail = vec![0u8; 128];
        tail[..8].copy_from_slice(&0x3000u64.to_le_bytes());
        let data = input(0, 0, &[0x0f, 0xae, 0x18], &tail);
        let (mut cpu, exit) = FuzzCpu::from_input(&data);
        assert!(exit.insn_bytes().is_empty());
        InsnFallback::new().handle(&mut cpu, &exit).unwrap();
        assert_eq!(cpu.regs.rip, RIP + 3);
        assert_eq!(cpu.mem[0x3000..0x3004], 0x1f80u32.to_le_bytes());
    }

    #[test]
    fn unmapped_write_raises_a_page_fault_without_moving_rip() {
        // stmxcsr [rax] with every page read-only.
        let mut data = input(0, 3, &[0x0f, 0xae, 0x18], &[0; 128]);
        data[19] = 0xff;
        data[20] = 0xff;
        let (mut cpu, exit) = FuzzCpu::from_input(&data);
        InsnFallback::new().handle(&mut cpu, &exit).unwrap();
        assert_eq!(cpu.regs.rip, RIP);
        assert_eq!(cpu.events.exception.nr, 14);
        assert_eq!(cpu.events.exception.injected, 1);
        fuzz_insn_fallback(&data);
    }

    #[test]
    fn memory_repeats_the_pattern() {
        let mut mem = [0u8; 10];
        fill_repeating(&mut mem, &[1, 2, 3]);
        assert_eq!(mem, [1, 2, 3, 1, 2, 3, 1, 2, 3, 1]);
        let mut mem = [9u8; 4];
        fill_repeating(&mut mem, &[]);
        assert_eq!(mem, [9; 4]);
        fill_repeating(&mut mem, &[5; 6]);
        assert_eq!(mem, [5; 4]);
    }

    /// The page-table seeds of `fuzz/make_seeds.py` reach the paths they are named after.
    #[test]
    fn page_table_seeds_raise_what_the_cpu_would() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/insn_fallback");
        // (seed, vector, error code, CR2)
        let cases: [(&str, u8, Option<u32>, Option<u64>); 6] = [
            ("xsave-ring3-ud", 6, None, None),
            ("walk-read-only", 14, Some(0b11), Some(0x3000)),
            ("walk-smap", 14, Some(0b1), Some(0x3000)),
            ("walk-device-ring0", 6, None, None),
            ("walk-device-ring3", 6, None, None),
            ("walk-nx-fetch", 14, Some(0b1_0101), Some(RIP)),
        ];
        for (name, vector, code, cr2) in cases {
            let input = std::fs::read(dir.join(name)).unwrap();
            let (mut cpu, exit) = FuzzCpu::from_input(&input);
            let result = InsnFallback::new().handle(&mut cpu, &exit);
            assert!(result.is_ok(), "{name}: {result:?}");
            let e = cpu.events.exception;
            assert_eq!((e.injected, e.nr), (1, vector), "{name}");
            assert_eq!(
                (e.has_error_code != 0).then_some(e.error_code),
                code,
                "{name}"
            );
            if let Some(cr2) = cr2 {
                assert_eq!(cpu.sregs.cr2, cr2, "{name}");
            }
            assert_eq!(cpu.regs.rip, RIP, "{name}");
        }
    }

    #[test]
    fn short_and_empty_inputs_are_valid() {
        fuzz_insn_fallback(&[]);
        fuzz_insn_fallback(&[3]);
        fuzz_insn_fallback(&[0xff; 40]);
    }
}
