//! The fallback against the real KVM: tiny ring-0 guests in a [`ScratchVm`] run each handled
//! instruction, and the test checks registers and memory once the guest reaches `hlt`.
//!
//! These need `/dev/kvm`; without it they fail, unless `VMM_TESTS_SKIP_KVM=1` is set.

use std::time::Instant;

use kvm_bindings::kvm_regs;
use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress};

use super::{enable_exit_on_emulation_failure, InsnFallback};
use crate::probe::probe_host;
use crate::scratch::{ScratchExit, ScratchVm, CODE, DATA, STACK_TOP, UNMAPPED};

/// Opens `/dev/kvm`, or explains why the test cannot run.
fn kvm() -> Option<Kvm> {
    match Kvm::new() {
        Ok(kvm) => Some(kvm),
        Err(e) if std::env::var("VMM_TESTS_SKIP_KVM").as_deref() == Ok("1") => {
            eprintln!("skipped: /dev/kvm cannot be opened ({e}) and VMM_TESTS_SKIP_KVM=1");
            None
        }
        Err(e) => panic!(
            "this test needs /dev/kvm, which cannot be opened ({e}); \
             set VMM_TESTS_SKIP_KVM=1 to skip the KVM tests"
        ),
    }
}

/// A scratch VM with `code` loaded and, where KVM offers it, the emulation-failure exit enabled.
fn guest(code: &[u8]) -> Option<ScratchVm> {
    let kvm = kvm()?;
    let vm = ScratchVm::new(&kvm).expect("scratch VM");
    enable_exit_on_emulation_failure(vm.vm());
    vm.load_code(code).expect("load code");
    Some(vm)
}

fn set_regs(vm: &mut ScratchVm, change: impl FnOnce(&mut kvm_regs)) {
    let mut regs = vm.vcpu().get_regs().unwrap();
    change(&mut regs);
    vm.vcpu().set_regs(&regs).unwrap();
}

/// Runs to the `hlt` that follows `code`, with the fallback, and returns the registers.
fn run_to_end(vm: &mut ScratchVm, fallback: &mut InsnFallback, code_len: usize) -> kvm_regs {
    let exit = vm.run_with_fallback(fallback, 32).unwrap();
    let regs = vm.vcpu().get_regs().unwrap();
    assert!(
        matches!(exit, ScratchExit::Hlt),
        "{exit:?} at RIP {:#x}",
        regs.rip
    );
    assert_eq!(
        regs.rip,
        CODE + code_len as u64 + 1,
        "stopped at the wrong hlt"
    );
    regs
}

/// Runs until an exception handler stub halts; returns its vector and the stack pointer.
fn run_to_handler(vm: &mut ScratchVm, fallback: &mut InsnFallback) -> (u8, u64) {
    let exit = vm.run_with_fallback(fallback, 32).unwrap();
    assert!(matches!(exit, ScratchExit::Hlt), "{exit:?}");
    let regs = vm.vcpu().get_regs().unwrap();
    let vector = ScratchVm::handler_vector(regs.rip)
        .unwrap_or_else(|| panic!("halted at {:#x}, not in a handler", regs.rip));
    (vector, regs.rsp)
}

fn read_u64(vm: &ScratchVm, addr: u64) -> u64 {
    vm.memory().read_obj(GuestAddress(addr)).unwrap()
}

fn read_u32(vm: &ScratchVm, addr: u64) -> u32 {
    vm.memory().read_obj(GuestAddress(addr)).unwrap()
}

fn read_u16(vm: &ScratchVm, addr: u64) -> u16 {
    vm.memory().read_obj(GuestAddress(addr)).unwrap()
}

#[test]
fn probe_this_host() {
    let Some(kvm) = kvm() else { return };
    let start = Instant::now();
    let report = probe_host(&kvm).unwrap();
    let wall = start.elapsed();
    eprintln!("{report}");
    for result in &report.results {
        eprintln!(
            "  {:<10} {:<20} {:?}",
            result.class, result.insn, result.outcome
        );
    }
    eprintln!(
        "failing classes: {:?}; wall time {wall:?}",
        report.failing()
    );
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hardware = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if hardware {
        assert!(report.is_empty(), "a VMX/SVM host should run everything");
    }
    assert!(wall.as_secs_f64() < 1.0, "the probe took {wall:?}");
}

#[test]
fn ldmxcsr_then_stmxcsr() {
    // ldmxcsr [rdi]; stmxcsr [rdi+4]
    let code = [0x0f, 0xae, 0x17, 0x0f, 0xae, 0x5f, 0x04];
    let Some(mut vm) = guest(&code) else { return };
    vm.write(DATA, &0x9fc0u32.to_le_bytes()).unwrap();
    let mut fallback = InsnFallback::new();
    run_to_end(&mut vm, &mut fallback, code.len());
    assert_eq!(vm.fpu().unwrap().mxcsr, 0x9fc0);
    assert_eq!(read_u32(&vm, DATA + 4), 0x9fc0);
    eprintln!("emulated: {:?}", fallback.counts().collect::<Vec<_>>());
}

#[test]
fn ldmxcsr_reserved_bit_delivers_gp() {
    let code = [0x0f, 0xae, 0x17];
    let Some(mut vm) = guest(&code) else { return };
    vm.write(DATA, &0x1_0000u32.to_le_bytes()).unwrap();
    let mut fallback = InsnFallback::new();
    let (vector, rsp) = run_to_handler(&mut vm, &mut fallback);
    assert_eq!(vector, 13);
    // Frame: error code, RIP, CS, RFLAGS, RSP, SS.
    assert_eq!(rsp, STACK_TOP - 48);
    assert_eq!(read_u64(&vm, rsp), 0);
    assert_eq!(read_u64(&vm, rsp + 8), CODE);
    assert_eq!(vm.fpu().unwrap().mxcsr, 0x1f80);
}

#[test]
fn x87_control_instructions() {
    // fnstsw ax; fnstsw [rdi]; fnstcw [rdi+2]; fldcw [rdi+4]; fwait
    let code = [
        0xdf, 0xe0, 0xdd, 0x3f, 0xd9, 0x7f, 0x02, 0xd9, 0x6f, 0x04, 0x9b,
    ];
    let Some(mut vm) = guest(&code) else { return };
    let mut fpu = vm.fpu().unwrap();
    fpu.fsw = 0x3800;
    vm.set_fpu(&fpu).unwrap();
    vm.write(DATA + 4, &0x027fu16.to_le_bytes()).unwrap();
    set_regs(&mut vm, |r| r.rax = 0xdead_0000);
    let mut fallback = InsnFallback::new();
    let regs = run_to_end(&mut vm, &mut fallback, code.len());
    assert_eq!(regs.rax, 0xdead_3800);
    assert_eq!(read_u16(&vm, DATA), 0x3800);
    assert_eq!(read_u16(&vm, DATA + 2), 0x037f);
    assert_eq!(vm.fpu().unwrap().fcw, 0x027f);
    eprintln!("emulated: {:?}", fallback.counts().collect::<Vec<_>>());
}

#[test]
fn fwait_with_unmasked_exception_delivers_mf() {
    let code = [0x9b];
    let Some(mut vm) = guest(&code) else { return };
    let mut fpu = vm.fpu().unwrap();
    fpu.fcw = 0x037e;
    fpu.fsw = 0x0081;
    vm.set_fpu(&fpu).unwrap();
    let mut fallback = InsnFallback::new();
    let (vector, rsp) = run_to_handler(&mut vm, &mut fallback);
    assert_eq!(vector, 16);
    assert_eq!(read_u64(&vm, rsp), CODE);
}

#[test]
fn sse_xor_and_moves() {
    // pxor xmm0, xmm0; pxor xmm1, [rdi]; movdqu [rdi+0x11], xmm1; movaps [rdi+0x20], xmm0
    let code = [
        0x66, 0x0f, 0xef, 0xc0, 0x66, 0x0f, 0xef, 0x0f, 0xf3, 0x0f, 0x7f, 0x4f, 0x11, 0x0f, 0x29,
        0x47, 0x20,
    ];
    let Some(mut vm) = guest(&code) else { return };
    let mut fpu = vm.fpu().unwrap();
    fpu.xmm[0] = [0xaa; 16];
    fpu.xmm[1] = 0x00ff_00ffu128.to_le_bytes();
    vm.set_fpu(&fpu).unwrap();
    vm.write(DATA, &0x0f0f_0f0fu128.to_le_bytes()).unwrap();
    vm.write(DATA + 0x20, &[0x55; 16]).unwrap();
    let mut fallback = InsnFallback::new();
    run_to_end(&mut vm, &mut fallback, code.len());
    let fpu = vm.fpu().unwrap();
    assert_eq!(fpu.xmm[0], [0; 16]);
    assert_eq!(fpu.xmm[1], 0x0ff0_0ff0u128.to_le_bytes());
    let mut stored = [0u8; 16];
    vm.memory()
        .read_slice(&mut stored, GuestAddress(DATA + 0x11))
        .unwrap();
    assert_eq!(stored, 0x0ff0_0ff0u128.to_le_bytes());
    vm.memory()
        .read_slice(&mut stored, GuestAddress(DATA + 0x20))
        .unwrap();
    assert_eq!(stored, [0; 16]);
    eprintln!("emulated: {:?}", fallback.counts().collect::<Vec<_>>());
}

#[test]
fn popcnt_register_and_memory() {
    // popcnt rax, rbx; popcnt ecx, [rdi]
    let code = [0xf3, 0x48, 0x0f, 0xb8, 0xc3, 0xf3, 0x0f, 0xb8, 0x0f];
    let Some(mut vm) = guest(&code) else { return };
    vm.write(DATA, &0xffff_ffffu32.to_le_bytes()).unwrap();
    set_regs(&mut vm, |r| {
        r.rbx = 0xf0f0;
        r.rcx = u64::MAX;
    });
    let mut fallback = InsnFallback::new();
    let regs = run_to_end(&mut vm, &mut fallback, code.len());
    assert_eq!(regs.rax, 8);
    assert_eq!(regs.rcx, 32);
    assert_eq!(regs.rflags & 0x8d5, 0);
}

#[test]
fn cmpxchg16b_swaps_then_loads() {
    // cmpxchg16b [rdi]; cmpxchg16b [rdi]
    let code = [0x48, 0x0f, 0xc7, 0x0f, 0x48, 0x0f, 0xc7, 0x0f];
    let Some(mut vm) = guest(&code) else { return };
    vm.write(DATA, &(1u128 | 2 << 64).to_le_bytes()).unwrap();
    set_regs(&mut vm, |r| (r.rax, r.rdx, r.rbx, r.rcx) = (1, 2, 3, 4));
    let mut fallback = InsnFallback::new();
    let regs = run_to_end(&mut vm, &mut fallback, code.len());
    assert_eq!(read_u64(&vm, DATA), 3);
    assert_eq!(read_u64(&vm, DATA + 8), 4);
    // The second compare failed: RDX:RAX loaded, ZF clear.
    assert_eq!((regs.rax, regs.rdx), (3, 4));
    assert_eq!(regs.rflags & 0x40, 0);
}

#[test]
fn xgetbv_reads_xcr0() {
    let code = [0x0f, 0x01, 0xd0];
    let Some(mut vm) = guest(&code) else { return };
    let osxsave = vm.vcpu().get_sregs().unwrap().cr4 & (1 << 18) != 0;
    let xcrs = vm.vcpu().get_xcrs().unwrap();
    let xcr0 = xcrs
        .xcrs
        .iter()
        .find(|x| x.xcr == 0)
        .map_or(0x3, |x| x.value);
    set_regs(&mut vm, |r| (r.rax, r.rcx, r.rdx) = (u64::MAX, 0, u64::MAX));
    let mut fallback = InsnFallback::new();
    let regs = run_to_end(&mut vm, &mut fallback, code.len());
    let expected = if osxsave { xcr0 } else { 0x3 };
    assert_eq!(
        (regs.rax, regs.rdx),
        (expected & 0xffff_ffff, expected >> 32)
    );
}

#[test]
fn vzeroupper_without_avx_state() {
    let code = [0xc5, 0xf8, 0x77];
    let Some(mut vm) = guest(&code) else { return };
    let mut fallback = InsnFallback::new();
    let exit = vm.run_with_fallback(&mut fallback, 4).unwrap();
    assert!(matches!(exit, ScratchExit::Hlt), "{exit:?}");
    let rip = vm.vcpu().get_regs().unwrap().rip;
    if fallback.counts().any(|(name, _)| name == "vzeroupper") {
        // The fallback treats it as a no-op while AVX state is off.
        assert_eq!(rip, CODE + code.len() as u64 + 1);
    } else {
        // The CPU ran it: #UD, since XCR0 does not enable AVX state.
        assert_eq!(ScratchVm::handler_vector(rip), Some(6));
    }
}

#[test]
fn int3_delivers_bp_past_the_instruction() {
    let code = [0xcc];
    let Some(mut vm) = guest(&code) else { return };
    let mut fallback = InsnFallback::new();
    let (vector, rsp) = run_to_handler(&mut vm, &mut fallback);
    assert_eq!(vector, 3);
    // Frame without error code: RIP, CS, RFLAGS, RSP, SS.
    assert_eq!(rsp, STACK_TOP - 40);
    assert_eq!(read_u64(&vm, rsp), CODE + 1);
    assert_eq!(read_u64(&vm, rsp + 24), STACK_TOP);
}

#[test]
fn unmapped_operand_delivers_pf() {
    let code = [0x0f, 0xae, 0x17];
    let Some(mut vm) = guest(&code) else { return };
    set_regs(&mut vm, |r| r.rdi = UNMAPPED + 0x10);
    let mut fallback = InsnFallback::new();
    let (vector, rsp) = run_to_handler(&mut vm, &mut fallback);
    assert_eq!(vector, 14);
    assert_eq!(
        read_u64(&vm, rsp),
        0,
        "error code: not present, read, supervisor"
    );
    assert_eq!(read_u64(&vm, rsp + 8), CODE);
    assert_eq!(vm.vcpu().get_sregs().unwrap().cr2, UNMAPPED + 0x10);
}

#[test]
fn without_the_exit_capability_too() {
    // fwait; fnstsw ax
    let code = [0x9b, 0xdf, 0xe0];
    let Some(kvm) = kvm() else { return };
    let mut vm = ScratchVm::new(&kvm).unwrap();
    vm.load_code(&code).unwrap();
    let mut fallback = InsnFallback::new();
    let regs = run_to_end(&mut vm, &mut fallback, code.len());
    assert_eq!(regs.rax & 0xffff, u64::from(vm.fpu().unwrap().fsw));
}
