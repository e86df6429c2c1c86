#![no_main]
//! A virtio-net queue and guest memory from fuzz bytes, as receive then transmit queue.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| virtio_net::fuzz::net_queue(data));
