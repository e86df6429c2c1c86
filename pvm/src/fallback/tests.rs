//! Every handled instruction against the fake vCPU, with hand-computed results.

use super::*;
use crate::testing::FakeCpu;

/// Runs the fallback on `bytes` (as reported by KVM) at the fake vCPU's RIP.
fn run(cpu: &mut FakeCpu, bytes: &[u8]) -> Result<(), FallbackError> {
    InsnFallback::new().handle(cpu, &InternalErrorExit::emulation_failure(bytes))
}

fn xmm(value: u128) -> [u8; 16] {
    value.to_le_bytes()
}

/// The exception the fallback injected, as (vector, error code).
fn injected(cpu: &FakeCpu) -> Option<(u8, Option<u32>)> {
    let e = cpu.events.exception;
    (e.injected != 0).then(|| (e.nr, (e.has_error_code != 0).then_some(e.error_code)))
}

const GP0: Option<(u8, Option<u32>)> = Some((13, Some(0)));

#[test]
fn exit_bytes_round_trip() {
    let exit = InternalErrorExit::emulation_failure(&[0x0f, 0xae, 0x54, 0x24, 0x04]);
    assert!(exit.is_emulation_failure());
    assert_eq!(exit.data[0], 1);
    // insn_size 5, then the bytes, then 0x90 padding, little-endian.
    assert_eq!(exit.data[1], 0x9090_0424_54ae_0f05);
    assert_eq!(exit.insn_bytes(), vec![0x0f, 0xae, 0x54, 0x24, 0x04]);
}

#[test]
fn exit_without_bytes_flag_has_no_bytes() {
    let mut exit = InternalErrorExit::emulation_failure(&[0x9b]);
    exit.data[0] = 0;
    assert!(exit.insn_bytes().is_empty());
    let old_style = InternalErrorExit {
        suberror: 1,
        ndata: 0,
        data: [0; 16],
    };
    assert!(old_style.insn_bytes().is_empty());
    let other = InternalErrorExit {
        suberror: 3,
        ..InternalErrorExit::emulation_failure(&[0x9b])
    };
    assert!(!other.is_emulation_failure());
    assert!(other.insn_bytes().is_empty());
}

#[test]
fn int3_delivers_bp_after_the_instruction() {
    let mut cpu = FakeCpu::new();
    run(&mut cpu, &[0xcc]).unwrap();
    assert_eq!(cpu.regs.rip, 0x1001);
    assert_eq!(injected(&cpu), Some((3, None)));
}

#[test]
fn clac_and_stac_clear_and_set_rflags_ac() {
    let mut cpu = FakeCpu::new();
    cpu.regs.rflags = 0x2 | (1 << 18);
    run(&mut cpu, &[0x0f, 0x01, 0xca]).unwrap();
    assert_eq!(cpu.regs.rflags, 0x2);
    assert_eq!(cpu.regs.rip, 0x1003);
    cpu.regs.rip = 0x1000;
    run(&mut cpu, &[0x0f, 0x01, 0xcb]).unwrap();
    assert_eq!(cpu.regs.rflags, 0x2 | (1 << 18));
    assert_eq!(cpu.regs.rip, 0x1003);
    assert_eq!(injected(&cpu), None);
}

#[test]
fn fwait_without_pending_exception_is_a_nop() {
    let mut cpu = FakeCpu::new();
    cpu.fpu.fsw = 0x0001; // invalid operation, masked by FCW 0x37f
    run(&mut cpu, &[0x9b]).unwrap();
    assert_eq!(cpu.regs.rip, 0x1001);
    assert_eq!(injected(&cpu), None);
    assert_eq!(cpu.set_events_calls, 0);
    assert_eq!(cpu.set_fpu_calls, 0);
}

#[test]
fn fwait_with_unmasked_exception_raises_mf() {
    let mut cpu = FakeCpu::new();
    cpu.fpu.fsw = 0x0081;
    cpu.fpu.fcw = 0x037e;
    run(&mut cpu, &[0x9b]).unwrap();
    assert_eq!(cpu.regs.rip, 0x1000);
    assert_eq!(injected(&cpu), Some((16, None)));
}

#[test]
fn fwait_with_mp_and_ts_raises_nm() {
    let mut cpu = FakeCpu::new();
    cpu.sregs.cr0 |= 1 << 3; // TS; MP is set already
    run(&mut cpu, &[0x9b]).unwrap();
    assert_eq!(cpu.regs.rip, 0x1000);
    assert_eq!(injected(&cpu), Some((7, None)));
}

#[test]
fn fnstsw_ax_keeps_the_upper_bits() {
    let mut cpu = FakeCpu::new();
    cpu.regs.rax = 0xffff_ffff_ffff_0000;
    cpu.fpu.fsw = 0x3800; // TOP = 7
    run(&mut cpu, &[0xdf, 0xe0]).unwrap();
    assert_eq!(cpu.regs.rax, 0xffff_ffff_ffff_3800);
    assert_eq!(cpu.regs.rip, 0x1002);
}

#[test]
fn fnstsw_memory() {
    let mut cpu = FakeCpu::new();
    cpu.regs.rdi = 0x2000;
    cpu.fpu.fsw = 0x3800;
    run(&mut cpu, &[0xdd, 0x3f]).unwrap();
    assert_eq!(cpu.get(0x2000, 2), &[0x00, 0x38]);
    assert_eq!(cpu.regs.rip, 0x1002);
}

#[test]
fn fnstsw_with_ts_raises_nm() {
    let mut cpu = FakeCpu::new();
    cpu.sregs.cr0 |= 1 << 3;
    cpu.regs.rax = 0x1234;
    run(&mut cpu, &[0xdf, 0xe0]).unwrap();
    assert_eq!(cpu.regs.rax, 0x1234);
    assert_eq!(injected(&cpu), Some((7, None)));
}

#[test]
fn wait_before_fnstsw_is_its_own_instruction() {
    // `fstsw ax` is `9b df e0`: KVM fails on the `9b` first, then on `df e0`.
    let mut cpu = FakeCpu::new();
    cpu.fpu.fsw = 0x0020;
    let mut fallback = InsnFallback::new();
    let exit = InternalErrorExit::emulation_failure(&[0x9b, 0xdf, 0xe0]);
    fallback.handle(&mut cpu, &exit).unwrap();
    assert_eq!(cpu.regs.rip, 0x1001);
    let exit = InternalErrorExit::emulation_failure(&[0xdf, 0xe0]);
    fallback.handle(&mut cpu, &exit).unwrap();
    assert_eq!(cpu.regs.rax & 0xffff, 0x0020);
    assert_eq!(cpu.regs.rip, 0x1003);
    assert_eq!(
        fallback.counts().collect::<Vec<_>>(),
        vec![("fnstsw", 1), ("fwait", 1)]
    );
}

#[test]
fn fnstcw_and_fldcw() {
    let mut cpu = FakeCpu::new();
    cpu.regs.rdi = 0x2000;
    run(&mut cpu, &[0xd9, 0x3f]).unwrap();
    assert_eq!(cpu.get(0x2000, 2), &[0x7f, 0x03]);

    cpu.put(0x2000, &[0x7f, 0x02]);
    run(&mut cpu, &[0xd9, 0x2f]).unwrap();
    assert_eq!(cpu.fpu.fcw, 0x027f);
    assert_eq!(cpu.set_fpu_calls, 1);
    assert_eq!(cpu.regs.rip, 0x1004);
}

#[test]
fn ldmxcsr_from_the_kernel() {
    // kernel_fpu_begin: ldmxcsr [rsp+4]
    let mut cpu = FakeCpu::new();
    cpu.put(0x8004, &0x9fc0u32.to_le_bytes());
    run(&mut cpu, &[0x0f, 0xae, 0x54, 0x24, 0x04]).unwrap();
    assert_eq!(cpu.fpu.mxcsr, 0x9fc0);
    assert_eq!(cpu.regs.rip, 0x1005);
}

#[test]
fn ldmxcsr_reserved_bits_raise_gp() {
    let mut cpu = FakeCpu::new();
    cpu.regs.rdi = 0x2000;
    cpu.put(0x2000, &0x1_0000u32.to_le_bytes());
    run(&mut cpu, &[0x0f, 0xae, 0x17]).unwrap();
    assert_eq!(injected(&cpu), GP0);
    assert_eq!(cpu.fpu.mxcsr, 0x1f80);
    assert_eq!(cpu.regs.rip, 0x1000);

    // DAZ (bit 6) is reserved when MXCSR_MASK lacks it.
    let mut cpu = FakeCpu::new();
    cpu.mxcsr_mask = 0xffbf;
    cpu.regs.rdi = 0x2000;
    cpu.put(0x2000, &0x1fc0u32.to_le_bytes());
    run(&mut cpu, &[0x0f, 0xae, 0x17]).unwrap();
    assert_eq!(injected(&cpu), GP0);
}

#[test]
fn ldmxcsr_without_osfxsr_raises_ud() {
    let mut cpu = FakeCpu::new();
    cpu.sregs.cr4 &= !(1 << 9);
    run(&mut cpu, &[0x0f, 0xae, 0x17]).unwrap();
    assert_eq!(injected(&cpu), Some((6, None)));
}

#[test]
fn stmxcsr_stores() {
    let mut cpu = FakeCpu::new();
    cpu.regs.rdi = 0x2000;
    run(&mut cpu, &[0x0f, 0xae, 0x1f]).unwrap();
    assert_eq!(cpu.get(0x2000, 4), &[0x80, 0x1f, 0, 0]);
    assert_eq!(cpu.regs.rip, 0x1003);
}

#[test]
fn pxor_registers() {
    let mut cpu = FakeCpu::new();
    cpu.fpu.xmm[0] = xmm(0x1234);
    run(&mut cpu, &[0x66, 0x0f, 0xef, 0xc0]).unwrap();
    assert_eq!(cpu.fpu.xmm[0], [0; 16]);
    assert_eq!(cpu.regs.rip, 0x1004);

    // pxor xmm9, xmm2
    cpu.fpu.xmm[9] = xmm(0xff00_ff00);
    cpu.fpu.xmm[2] = xmm(0x0ff0_0ff0 | 1 << 127);
    run(&mut cpu, &[0x66, 0x44, 0x0f, 0xef, 0xca]).unwrap();
    assert_eq!(cpu.fpu.xmm[9], xmm(0xf0f0_f0f0 | 1 << 127));
    assert_eq!(cpu.regs.rip, 0x1009);
}

#[test]
fn pxor_memory_must_be_aligned() {
    let mut cpu = FakeCpu::new();
    cpu.regs.rdi = 0x2000;
    cpu.put(0x2000, &xmm(0xf0));
    cpu.fpu.xmm[1] = xmm(0xff);
    run(&mut cpu, &[0x66, 0x0f, 0xef, 0x0f]).unwrap();
    assert_eq!(cpu.fpu.xmm[1], xmm(0x0f));

    cpu.regs.rdi = 0x2008;
    run(&mut cpu, &[0x66, 0x0f, 0xef, 0x0f]).unwrap();
    assert_eq!(injected(&cpu), GP0);
    assert_eq!(cpu.fpu.xmm[1], xmm(0x0f));
}

#[test]
fn xorps_and_xorpd() {
    let mut cpu = FakeCpu::new();
    cpu.fpu.xmm[1] = xmm(0b1100);
    cpu.fpu.xmm[2] = xmm(0b1010);
    run(&mut cpu, &[0x0f, 0x57, 0xca]).unwrap();
    assert_eq!(cpu.fpu.xmm[1], xmm(0b0110));
    run(&mut cpu, &[0x66, 0x0f, 0x57, 0xca]).unwrap();
    assert_eq!(cpu.fpu.xmm[1], xmm(0b1100));
    assert_eq!(cpu.regs.rip, 0x1007);
}

#[test]
fn sse_moves() {
    let mut cpu = FakeCpu::new();
    cpu.regs.rdi = 0x2000;
    cpu.put(0x2000, &xmm(0x0011_2233_4455_6677_8899_aabb_ccdd_eeff));
    // movaps xmm0, [rdi]
    run(&mut cpu, &[0x0f, 0x28, 0x07]).unwrap();
    assert_eq!(
        cpu.fpu.xmm[0],
        xmm(0x0011_2233_4455_6677_8899_aabb_ccdd_eeff)
    );
    // movaps [rdi], xmm1
    cpu.fpu.xmm[1] = xmm(7);
    run(&mut cpu, &[0x0f, 0x29, 0x0f]).unwrap();
    assert_eq!(cpu.get(0x2000, 16), &xmm(7));
    // movdqu xmm0, [rdi+1]: unaligned is fine.
    run(&mut cpu, &[0xf3, 0x0f, 0x6f, 0x47, 0x01]).unwrap();
    assert_eq!(cpu.fpu.xmm[0], xmm(0));
    assert_eq!(injected(&cpu), None);
    // movaps xmm0, [rdi+1]: #GP.
    run(&mut cpu, &[0x0f, 0x28, 0x47, 0x01]).unwrap();
    assert_eq!(injected(&cpu), GP0);
}

#[test]
fn movdqu_store_across_a_page() {
    let mut cpu = FakeCpu::new();
    cpu.regs.rdi = 0x2ff8;
    cpu.fpu.xmm[2] = xmm(0x0f0e_0d0c_0b0a_0908_0706_0504_0302_0100);
    run(&mut cpu, &[0xf3, 0x0f, 0x7f, 0x17]).unwrap();
    let expected: Vec<u8> = (0..16).collect();
    assert_eq!(cpu.get(0x2ff8, 16), expected.as_slice());
}

#[test]
fn write_to_a_read_only_second_page_changes_nothing() {
    let mut cpu = FakeCpu::new();
    cpu.regs.rdi = 0x2ff8;
    cpu.read_only.insert(0x3);
    cpu.fpu.xmm[2] = xmm(u128::MAX);
    run(&mut cpu, &[0xf3, 0x0f, 0x7f, 0x17]).unwrap();
    assert_eq!(cpu.get(0x2ff8, 16), &[0; 16]);
    // Present (the page is mapped, only not writable) and write.
    assert_eq!(injected(&cpu), Some((14, Some(0b11))));
    assert_eq!(cpu.sregs.cr2, 0x3000);
    assert_eq!(cpu.regs.rip, 0x1000);
}

#[test]
fn popcnt_widths_and_flags() {
    let mut cpu = FakeCpu::new();
    cpu.regs.rbx = 0xff00_0000_0000_000f;
    cpu.regs.rflags = 0x2 | 0x1 | 0x40 | 0x80 | 0x800; // CF ZF SF OF
    run(&mut cpu, &[0xf3, 0x48, 0x0f, 0xb8, 0xc3]).unwrap();
    assert_eq!(cpu.regs.rax, 12);
    assert_eq!(cpu.regs.rflags, 0x2);

    // popcnt ecx, [rdi] of zero: ZF, and the upper half of rcx is cleared.
    cpu.regs.rdi = 0x2000;
    cpu.regs.rcx = u64::MAX;
    run(&mut cpu, &[0xf3, 0x0f, 0xb8, 0x0f]).unwrap();
    assert_eq!(cpu.regs.rcx, 0);
    assert_eq!(cpu.regs.rflags, 0x42);

    // popcnt ax, dx counts only dx.
    cpu.regs.rax = 0x1111_0000;
    cpu.regs.rdx = 0x1_ffff;
    run(&mut cpu, &[0x66, 0xf3, 0x0f, 0xb8, 0xc2]).unwrap();
    assert_eq!(cpu.regs.rax, 0x1111_0010);
    assert_eq!(cpu.regs.rflags, 0x2);
}

#[test]
fn cmpxchg16b_equal_stores() {
    let mut cpu = FakeCpu::new();
    cpu.regs.rdi = 0x2000;
    cpu.put(0x2000, &[1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
    (cpu.regs.rax, cpu.regs.rdx, cpu.regs.rbx, cpu.regs.rcx) = (1, 2, 3, 4);
    run(&mut cpu, &[0xf0, 0x48, 0x0f, 0xc7, 0x0f]).unwrap();
    assert_eq!(
        cpu.get(0x2000, 16),
        &[3, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(cpu.regs.rflags & 0x40, 0x40);
    assert_eq!(cpu.regs.rip, 0x1005);
}

#[test]
fn cmpxchg16b_different_loads() {
    let mut cpu = FakeCpu::new();
    cpu.regs.rdi = 0x2000;
    cpu.regs.rflags = 0x42;
    cpu.put(0x2000, &[5, 0, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0]);
    (cpu.regs.rax, cpu.regs.rdx, cpu.regs.rbx, cpu.regs.rcx) = (1, 2, 3, 4);
    run(&mut cpu, &[0x48, 0x0f, 0xc7, 0x0f]).unwrap();
    assert_eq!((cpu.regs.rax, cpu.regs.rdx), (5, 6));
    assert_eq!(cpu.get(0x2000, 1), &[5]);
    assert_eq!(cpu.regs.rflags, 0x2);
}

#[test]
fn cmpxchg16b_faults() {
    let mut cpu = FakeCpu::new();
    cpu.regs.rdi = 0x2008;
    run(&mut cpu, &[0x48, 0x0f, 0xc7, 0x0f]).unwrap();
    assert_eq!(injected(&cpu), GP0);

    // A read-only page faults even when the compare would fail.
    let mut cpu = FakeCpu::new();
    cpu.regs.rdi = 0x2000;
    cpu.regs.rax = 9;
    cpu.read_only.insert(0x2);
    run(&mut cpu, &[0x48, 0x0f, 0xc7, 0x0f]).unwrap();
    assert_eq!(injected(&cpu), Some((14, Some(0b11))));
    assert_eq!(cpu.regs.rax, 9);
}

#[test]
fn xgetbv_reads_xcr0() {
    let mut cpu = FakeCpu::new();
    cpu.xcr0 = 0x2_0000_0007;
    cpu.regs.rax = u64::MAX;
    cpu.regs.rdx = u64::MAX;
    run(&mut cpu, &[0x0f, 0x01, 0xd0]).unwrap();
    assert_eq!((cpu.regs.rax, cpu.regs.rdx), (7, 2));
    assert_eq!(cpu.regs.rip, 0x1003);

    cpu.regs.rcx = 2;
    run(&mut cpu, &[0x0f, 0x01, 0xd0]).unwrap();
    assert_eq!(injected(&cpu), GP0);
}

#[test]
fn xgetbv_with_xsave_hidden_answers_x87_sse() {
    let mut cpu = FakeCpu::new();
    cpu.sregs.cr4 &= !(1 << 18);
    run(&mut cpu, &[0x0f, 0x01, 0xd0]).unwrap();
    assert_eq!((cpu.regs.rax, cpu.regs.rdx), (3, 0));
}

#[test]
fn vzeroupper_without_avx_is_a_nop() {
    let mut cpu = FakeCpu::new();
    cpu.xcr0 = 0x3;
    run(&mut cpu, &[0xc5, 0xf8, 0x77]).unwrap();
    assert_eq!(cpu.regs.rip, 0x1003);

    cpu.xcr0 = 0x7;
    let err = run(&mut cpu, &[0xc5, 0xf8, 0x77]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot emulate `vzeroupper` (c5 f8 77) at RIP 0x1003: the fallback does not handle \
         vzeroupper with AVX state enabled in XCR0 (hide AVX with the safe or auto policy)"
    );
}

#[test]
fn unmapped_operand_raises_pf() {
    let mut cpu = FakeCpu::new();
    cpu.regs.rdi = 0x20000;
    run(&mut cpu, &[0x0f, 0xae, 0x17]).unwrap();
    assert_eq!(injected(&cpu), Some((14, Some(0))));
    assert_eq!(cpu.sregs.cr2, 0x20000);
    assert_eq!(cpu.regs.rip, 0x1000);
}

#[test]
fn non_canonical_operand_raises_gp() {
    let mut cpu = FakeCpu::new();
    cpu.regs.rdi = 0x8000_0000_0000_0000;
    run(&mut cpu, &[0x0f, 0xae, 0x17]).unwrap();
    assert_eq!(injected(&cpu), GP0);
    // Through rsp it is #SS(0).
    let mut cpu = FakeCpu::new();
    cpu.regs.rsp = 0x0000_8000_0000_0000;
    run(&mut cpu, &[0x0f, 0xae, 0x54, 0x24, 0x04]).unwrap();
    assert_eq!(injected(&cpu), Some((12, Some(0))));
}

#[test]
fn fs_base_is_added() {
    let mut cpu = FakeCpu::new();
    cpu.sregs.fs.base = 0x3000;
    cpu.regs.rdi = 0x10;
    // stmxcsr fs:[rdi]
    run(&mut cpu, &[0x64, 0x0f, 0xae, 0x1f]).unwrap();
    assert_eq!(cpu.get(0x3010, 4), &[0x80, 0x1f, 0, 0]);
}

#[test]
fn bytes_missing_from_the_exit_are_fetched() {
    let mut cpu = FakeCpu::new();
    cpu.put(0x1000, &[0x0f, 0xae, 0x54, 0x24, 0x04]);
    cpu.put(0x8004, &0x1f80u32.to_le_bytes());
    cpu.fpu.mxcsr = 0;
    let mut exit = InternalErrorExit::emulation_failure(&[]);
    exit.data[0] = 0;
    InsnFallback::new().handle(&mut cpu, &exit).unwrap();
    assert_eq!(cpu.fpu.mxcsr, 0x1f80);
    assert_eq!(cpu.regs.rip, 0x1005);

    // A truncated copy in the exit is completed from memory too.
    cpu.regs.rip = 0x1000;
    cpu.fpu.mxcsr = 0;
    run(&mut cpu, &[0x0f, 0xae]).unwrap();
    assert_eq!(cpu.fpu.mxcsr, 0x1f80);
}

#[test]
fn a_stale_ud_from_kvm_is_dropped() {
    let mut cpu = FakeCpu::new();
    cpu.events.exception.injected = 1;
    cpu.events.exception.nr = 6;
    run(&mut cpu, &[0x9b]).unwrap();
    assert_eq!(injected(&cpu), None);
    assert_eq!(cpu.events.exception.nr, 0);
    assert_eq!(cpu.regs.rip, 0x1001);
}

#[test]
fn protected_mode_32_bit() {
    let mut cpu = FakeCpu::new();
    cpu.sregs.efer = 0;
    cpu.sregs.cr4 = 1 << 9;
    cpu.sregs.cs.l = 0;
    cpu.sregs.cs.db = 1;
    cpu.regs.rip = 0x1000;
    cpu.regs.rsp = 0x1_0000_8000; // only esp counts
    cpu.put(0x8004, &0x1f81u32.to_le_bytes());
    run(&mut cpu, &[0x0f, 0xae, 0x54, 0x24, 0x04]).unwrap();
    assert_eq!(cpu.fpu.mxcsr, 0x1f81);
    assert_eq!(cpu.regs.rip, 0x1005);
}

#[test]
fn real_mode_uses_segment_bases() {
    let mut cpu = FakeCpu::new();
    cpu.sregs.cr0 = 0x10;
    cpu.sregs.efer = 0;
    cpu.sregs.cs.l = 0;
    cpu.sregs.cs.db = 0;
    cpu.sregs.ds.base = 0x2000;
    cpu.regs.rip = 0x0100;
    cpu.regs.rbx = 0x10;
    // fnstcw [bx]
    run(&mut cpu, &[0xd9, 0x3f]).unwrap();
    assert_eq!(cpu.get(0x2010, 2), &[0x7f, 0x03]);
    assert_eq!(cpu.regs.rip, 0x0102);
}

#[test]
fn counts_by_mnemonic() {
    let mut cpu = FakeCpu::new();
    let mut fallback = InsnFallback::new();
    for bytes in [&[0x9b][..], &[0xdf, 0xe0], &[0x9b], &[0xcc]] {
        let exit = InternalErrorExit::emulation_failure(bytes);
        fallback.handle(&mut cpu, &exit).unwrap();
    }
    assert_eq!(
        fallback.counts().collect::<Vec<_>>(),
        vec![("fnstsw", 1), ("fwait", 2), ("int3", 1)]
    );
}

#[test]
fn unhandled_instruction_error_names_everything() {
    let mut cpu = FakeCpu::new();
    cpu.regs.rip = 0xffff_ffff_8100_1234;
    let err = run(&mut cpu, &[0x0f, 0xae, 0x27]).unwrap_err();
    assert!(matches!(err.kind, FallbackErrorKind::NoHandler));
    assert_eq!(
        err.to_string(),
        "cannot emulate `xsave [rdi]` (0f ae 27) at RIP 0xffffffff81001234: the fallback does \
         not handle this instruction"
    );
    assert_eq!(cpu.regs.rip, 0xffff_ffff_8100_1234);
    assert_eq!(cpu.set_regs_calls, 0);
}

#[test]
fn other_suberrors_are_not_handled() {
    let mut cpu = FakeCpu::new();
    let exit = InternalErrorExit {
        suberror: 3,
        ndata: 0,
        data: [0; 16],
    };
    let err = InsnFallback::new().handle(&mut cpu, &exit).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot emulate the instruction (bytes unknown) at RIP 0x1000: KVM reported internal \
         error suberror 3, which is not an emulation failure"
    );
}

#[test]
fn undecodable_bytes() {
    // `push es` does not exist in 64-bit mode.
    let mut cpu = FakeCpu::new();
    cpu.put(0x1000, &[0x06]);
    let err = run(&mut cpu, &[0x06]).unwrap_err();
    assert!(matches!(err.kind, FallbackErrorKind::Undecodable), "{err}");
    assert!(err
        .to_string()
        .starts_with("cannot emulate the instruction (06 00 00"));
}

#[test]
fn unfetchable_rip() {
    let mut cpu = FakeCpu::new();
    cpu.regs.rip = 0x4000_0000;
    let err = run(&mut cpu, &[]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot emulate the instruction (bytes unknown) at RIP 0x40000000: the instruction bytes \
         cannot be read: its linear address 0x40000000 is not mapped"
    );
}

/// `xsave [rdi]`, which the fallback does not carry out.
const XSAVE_RDI: [u8; 3] = [0x0f, 0xae, 0x27];

#[test]
fn an_instruction_it_lacks_raises_ud_in_ring3() {
    let mut cpu = FakeCpu::new().in_ring3();
    let mut fallback = InsnFallback::new();
    let exit = InternalErrorExit::emulation_failure(&XSAVE_RDI);
    fallback.handle(&mut cpu, &exit).unwrap();
    assert_eq!(injected(&cpu), Some((6, None)));
    assert_eq!(cpu.regs.rip, 0x1000);
    assert_eq!(cpu.set_regs_calls, 0);
    assert_eq!(
        fallback.counts().collect::<Vec<_>>(),
        vec![("#UD raised", 1)]
    );
}

#[test]
fn an_instruction_it_lacks_raises_ud_in_ring0_when_the_idt_has_a_gate() {
    let mut cpu = FakeCpu::new().with_idt(0x4000, |v| v == 6);
    run(&mut cpu, &XSAVE_RDI).unwrap();
    assert_eq!(injected(&cpu), Some((6, None)));

    // A kernel without a #UD gate could not handle it: the VM stops, saying why.
    let mut cpu = FakeCpu::new().with_idt(0x4000, |v| v != 6);
    let err = run(&mut cpu, &XSAVE_RDI).unwrap_err();
    assert!(matches!(err.kind, FallbackErrorKind::NoHandler), "{err}");
    assert_eq!(injected(&cpu), None);
    // Nor could one whose IDT is too short for vector 6.
    let mut cpu = FakeCpu::new().with_idt(0x4000, |_| true);
    cpu.sregs.idt.limit = 6 * 16 - 1;
    assert!(run(&mut cpu, &XSAVE_RDI).is_err());
}

#[test]
fn undecodable_bytes_raise_ud_in_ring3() {
    let mut cpu = FakeCpu::new().in_ring3();
    cpu.put(0x1000, &[0x06]);
    run(&mut cpu, &[0x06]).unwrap();
    assert_eq!(injected(&cpu), Some((6, None)));
}

#[test]
fn an_operand_on_a_device_page_raises_ud() {
    // pxor xmm1, [rdi] with rdi on a page that is not RAM: the fallback cannot read it.
    let mut cpu = FakeCpu::new().in_ring3();
    cpu.regs.rdi = 0x7000;
    cpu.unbacked.insert(0x7);
    cpu.fpu.xmm[1] = xmm(0x55);
    run(&mut cpu, &[0x66, 0x0f, 0xef, 0x0f]).unwrap();
    assert_eq!(injected(&cpu), Some((6, None)));
    assert_eq!(cpu.fpu.xmm[1], xmm(0x55));
    assert_eq!(cpu.regs.rip, 0x1000);

    // In ring 0 without an IDT that stops the VM, naming the address.
    let mut cpu = FakeCpu::new();
    cpu.regs.rdi = 0x7000;
    cpu.unbacked.insert(0x7);
    let err = run(&mut cpu, &[0x66, 0x0f, 0xef, 0x0f]).unwrap_err();
    assert!(
        err.to_string().contains("0x17000 is not guest RAM"),
        "{err}"
    );
}

#[test]
fn an_unfetchable_rip_raises_pf_with_the_fetch_address() {
    let mut cpu = FakeCpu::new().in_ring3();
    cpu.regs.rip = 0x4000_0000;
    run(&mut cpu, &[]).unwrap();
    // Not present, user, instruction fetch.
    assert_eq!(injected(&cpu), Some((14, Some(0b1_0100))));
    assert_eq!(cpu.sregs.cr2, 0x4000_0000);

    // An instruction that runs into an unmapped page: the fault names that page.
    let mut cpu = FakeCpu::new().in_ring3();
    cpu.regs.rip = 0xfffe;
    cpu.put(0xfffe, &[0x0f, 0xae]);
    let mut exit = InternalErrorExit::emulation_failure(&[]);
    exit.data[0] = 0;
    InsnFallback::new().handle(&mut cpu, &exit).unwrap();
    assert_eq!(injected(&cpu), Some((14, Some(0b1_0100))));
    assert_eq!(cpu.sregs.cr2, 0x1_0000);
}

#[test]
fn kvm_failures_still_stop_the_vm_from_ring3() {
    let mut cpu = FakeCpu::new().in_ring3();
    let exit = InternalErrorExit {
        suberror: 3,
        ndata: 0,
        data: [0; 16],
    };
    assert!(InsnFallback::new().handle(&mut cpu, &exit).is_err());
    assert_eq!(injected(&cpu), None);
}

/// A GDT at 0x3000 with Linux's layout where it matters here: a flat 64-bit code segment (1),
/// the per-CPU segment Linux reads its CPU and node numbers from (15: limit = cpu | node << 12,
/// DPL 3), a page-granular data segment (16), a 64-bit TSS (17-18), a DPL 0 data segment (19)
/// and a call gate (20); `limit` bytes of it are valid.
fn with_gdt(cpu: &mut FakeCpu, limit: u16) {
    let descriptor = |limit: u32, access: u8, flags: u8| -> [u8; 8] {
        let mut d = [0; 8];
        d[0..2].copy_from_slice(&(limit as u16).to_le_bytes());
        d[5] = access;
        d[6] = (flags << 4) | ((limit >> 16) as u8 & 0xf);
        d
    };
    let entries: [(u64, [u8; 8]); 7] = [
        (1, descriptor(0xfffff, 0x9b, 0xa)),
        (15, descriptor(0x2003, 0xf3, 0x0)),
        (16, descriptor(0xfffff, 0x93, 0xc)),
        (17, descriptor(0x67, 0x89, 0x0)),
        (18, [0; 8]),
        (19, descriptor(0x1234, 0x93, 0x0)),
        (20, descriptor(0x5678, 0x8c, 0x0)),
    ];
    for (index, bytes) in entries {
        cpu.put(0x3000 + index * 8, &bytes);
    }
    cpu.sregs.gdt.base = 0x3000;
    cpu.sregs.gdt.limit = limit;
}

/// `lsl rax, rax` and `lsl ax, ax`.
const LSL_RAX: [u8; 4] = [0x48, 0x0f, 0x03, 0xc0];
const LSL_AX: [u8; 4] = [0x66, 0x0f, 0x03, 0xc0];

#[test]
fn lsl_reads_linuxs_cpu_number_from_the_gdt() {
    let mut cpu = FakeCpu::new();
    with_gdt(&mut cpu, 21 * 8 - 1);
    cpu.regs.rax = 0x7b; // GDT_ENTRY_CPUNODE, RPL 3
    cpu.regs.rflags = 0x2;
    run(&mut cpu, &LSL_RAX).unwrap();
    assert_eq!(cpu.regs.rax, 0x2003, "CPU 3 on node 2");
    assert_eq!(cpu.regs.rflags, 0x42);
    assert_eq!(cpu.regs.rip, 0x1004);
    assert_eq!(injected(&cpu), None);
}

#[test]
fn lsl_scales_page_granular_limits_and_takes_tss_limits() {
    let mut cpu = FakeCpu::new();
    with_gdt(&mut cpu, 21 * 8 - 1);
    cpu.regs.rax = 16 << 3;
    run(&mut cpu, &LSL_RAX).unwrap();
    assert_eq!(cpu.regs.rax, 0xffff_ffff);
    cpu.regs.rip = 0x1000;
    cpu.regs.rax = 17 << 3;
    run(&mut cpu, &LSL_RAX).unwrap();
    assert_eq!(cpu.regs.rax, 0x67);
    // The 16-bit form writes AX alone.
    cpu.regs.rip = 0x1000;
    cpu.regs.rax = 0xdead_0000_0000 | (1 << 3);
    run(&mut cpu, &LSL_AX).unwrap();
    assert_eq!(cpu.regs.rax, 0xdead_0000_ffff);
    assert_eq!(cpu.regs.rflags & 0x40, 0x40);
}

#[test]
fn lsl_clears_zf_and_keeps_the_destination_where_there_is_no_limit_to_load() {
    let mut cpu = FakeCpu::new();
    with_gdt(&mut cpu, 21 * 8 - 1);
    // Null selector; past the GDT's limit; RPL 3 on a DPL 0 segment; a call gate; the LDT, which
    // the vCPU does not have.
    for selector in [0, 3, 21 << 3, (19 << 3) | 3, 20 << 3, 4] {
        cpu.regs.rip = 0x1000;
        cpu.regs.rax = selector;
        cpu.regs.rflags = 0x42;
        cpu.sregs.ldt.unusable = 1;
        run(&mut cpu, &LSL_RAX).unwrap();
        assert_eq!(cpu.regs.rflags, 0x2, "ZF for selector {selector:#x}");
        assert_eq!(
            cpu.regs.rax, selector,
            "destination for selector {selector:#x}"
        );
        assert_eq!(cpu.regs.rip, 0x1004);
    }
    // A GDT whose limit cuts the descriptor in half.
    with_gdt(&mut cpu, 15 * 8 + 3);
    cpu.regs.rip = 0x1000;
    cpu.regs.rax = 0x7b;
    cpu.regs.rflags = 0x42;
    run(&mut cpu, &LSL_RAX).unwrap();
    assert_eq!((cpu.regs.rax, cpu.regs.rflags), (0x7b, 0x2));
    assert_eq!(injected(&cpu), None);
}

#[test]
fn lsl_from_ring3_raises_ud() {
    let mut cpu = FakeCpu::new().in_ring3();
    with_gdt(&mut cpu, 21 * 8 - 1);
    cpu.regs.rax = 0x7b;
    run(&mut cpu, &LSL_RAX).unwrap();
    assert_eq!(injected(&cpu), Some((6, None)));
    assert_eq!(cpu.regs.rax, 0x7b);
}
