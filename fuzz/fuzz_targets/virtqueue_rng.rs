#![no_main]
//! A virtio-rng queue and guest memory built from fuzz bytes.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| virtio_rng::fuzz::rng_queue(data));
