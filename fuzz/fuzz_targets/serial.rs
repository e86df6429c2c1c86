#![no_main]
//! Register access streams against the 8250 UART at 0x3f8.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| legacy::fuzz::fuzz_serial(data));
