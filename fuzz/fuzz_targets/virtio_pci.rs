#![no_main]
//! Virtio PCI transport registers: status, features, queues, notify, ISR, MSI-X table, PBA.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| virtio::pci::fuzz_virtio_pci(data));
