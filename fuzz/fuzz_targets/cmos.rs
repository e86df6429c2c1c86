#![no_main]
//! Register access streams against the CMOS RTC at 0x70, on a manual clock.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| legacy::fuzz::fuzz_cmos(data));
