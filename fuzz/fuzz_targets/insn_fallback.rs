#![no_main]
//! The kvm-pvm layer's instruction fallback on fuzz-built vCPU state and instruction bytes.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pvm::fallback::fuzz::fuzz_insn_fallback(data));
