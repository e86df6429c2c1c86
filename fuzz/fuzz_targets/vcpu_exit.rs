#![no_main]
//! Exits decoded from fuzz bytes into the VMM's buses with the real legacy devices.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vmm::fuzz::fuzz_vcpu_exits(data));
