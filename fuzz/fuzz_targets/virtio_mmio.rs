#![no_main]
//! The virtio-mmio transport with a virtio-blk device: register accesses, then guest memory.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| virtio_blk::fuzz::mmio_transport(data));
