#![no_main]
//! A virtio-net queue and guest memory from fuzz bytes, as receive then transmit queue.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| devices::virtio::fuzz::net_queue(data));
