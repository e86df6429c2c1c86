#![no_main]
//! Register access streams against the i8042 controller at 0x60.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| legacy::fuzz::fuzz_i8042(data));
