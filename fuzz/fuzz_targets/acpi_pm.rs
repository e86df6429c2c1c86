#![no_main]
//! Register access streams and power-button presses against the ACPI PM1a blocks at 0x600.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| legacy::fuzz::fuzz_acpi_pm(data));
