#![no_main]
//! A virtio-blk queue and guest memory from fuzz bytes, against an in-memory disk.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| virtio_blk::fuzz::blk_queue(data));
