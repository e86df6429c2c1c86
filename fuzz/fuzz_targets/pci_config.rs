#![no_main]
//! Configuration cycles (ports 0xcf8/0xcfc) against the PCI root bus with a virtio function.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| virtio::pci::fuzz_pci_config(data));
