#![no_main]
//! Arbitrary bytes as a bzImage or ELF kernel, host- and guest-decompressed.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vmm::fuzz::fuzz_kernel_loader(data));
