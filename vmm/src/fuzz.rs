//! Fuzzing entry points that need more than one crate, and the table of every fuzz target.
//!
//! - [`fuzz_vcpu_exits`]: exits decoded from fuzz bytes by [`cpu::fuzz_exit`] (the decoder the
//!   vCPU loop uses) into the VMM's port and MMIO buses with the real legacy devices on them,
//!   built by [`legacy_buses`] with [`crate::legacy_ports::port_bus`], as `Vmm::build` builds them.
//! - [`fuzz_kernel_loader`]: [`boot::load_kernel`] on arbitrary bytes into 64 MiB of guest RAM,
//!   with host and in-guest decompression.
//!
//! The cargo-fuzz targets in `fuzz/` are one-line wrappers over the functions in [`TARGETS`];
//! this module's tests replay the seed corpus of each (`fuzz/seeds/<target>/`), so saved
//! inputs, crash regressions included, run in `cargo test --workspace` without libFuzzer.

use std::io::Cursor;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use bus::Bus;
use cpu::ExitAction;
use legacy::{CmosRtc, DebugPort, ManualClock, Uart8250, I8042};

use crate::{Buses, Error, Result};

/// A fuzz target's entry point: any input is valid, and a panic is a finding.
pub type FuzzFn = fn(&[u8]);

/// Every fuzz target by its cargo-fuzz name, with the function its wrapper calls.
pub const TARGETS: &[(&str, FuzzFn)] = &[
    ("vcpu_exit", fuzz_vcpu_exits),
    // The device and kvm-pvm harnesses are built for tests and with the `fuzzing` feature
    // only (the libraries' own `fuzzing` features).
    #[cfg(any(test, feature = "fuzzing"))]
    ("serial", legacy::fuzz::fuzz_serial),
    #[cfg(any(test, feature = "fuzzing"))]
    ("cmos", legacy::fuzz::fuzz_cmos),
    #[cfg(any(test, feature = "fuzzing"))]
    ("i8042", legacy::fuzz::fuzz_i8042),
    #[cfg(any(test, feature = "fuzzing"))]
    ("acpi_pm", legacy::fuzz::fuzz_acpi_pm),
    ("kernel_loader", fuzz_kernel_loader),
    #[cfg(any(test, feature = "fuzzing"))]
    ("insn_fallback", pvm::fallback::fuzz::fuzz_insn_fallback),
    #[cfg(any(test, feature = "fuzzing"))]
    ("pci_config", virtio::pci::fuzz_pci_config),
    #[cfg(any(test, feature = "fuzzing"))]
    ("virtio_pci", virtio::pci::fuzz_virtio_pci),
    #[cfg(any(test, feature = "fuzzing"))]
    #[cfg(feature = "virtio-blk")]
    ("virtqueue_blk", virtio_blk::fuzz::blk_queue),
    #[cfg(any(test, feature = "fuzzing"))]
    #[cfg(feature = "virtio-net")]
    ("virtqueue_net", virtio_net::fuzz::net_queue),
    #[cfg(any(test, feature = "fuzzing"))]
    #[cfg(feature = "virtio-rng")]
    ("virtqueue_rng", virtio_rng::fuzz::rng_queue),
    #[cfg(any(test, feature = "fuzzing"))]
    #[cfg(feature = "virtio-blk")]
    ("virtio_mmio", virtio_blk::fuzz::mmio_transport),
];

/// The guest RAM size the fuzzed legacy devices are told about (the CMOS memory registers).
const FUZZ_RAM: u64 = 512 << 20;
/// The fuzzed RTC's time: 2026-11-23 15:50:15.9 UTC, near a second boundary.
const FUZZ_EPOCH: Duration = Duration::new(1_795_449_015, 900_000_000);

/// The VMM's buses with the legacy devices and nothing that needs KVM or the host: the UART
/// writes to a sink, the RTC runs on a manual clock stopped at a fixed time, and the interrupt
/// and reset eventfds are registered nowhere. The MMIO bus is empty, as in `Vmm::build`.
pub fn legacy_buses() -> Result<Buses> {
    let eventfd = || EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd);
    let serial = Arc::new(Mutex::new(Uart8250::new(
        Box::new(std::io::sink()),
        eventfd()?,
    )));
    let i8042 = Arc::new(Mutex::new(I8042::new(eventfd()?, Some(eventfd()?))));
    let cmos = CmosRtc::with_clock(FUZZ_RAM, 0, Box::new(ManualClock::new(FUZZ_EPOCH)));
    let pio = crate::legacy_ports::port_bus(serial, i8042, cmos, DebugPort::new(Instant::now()))?;
    Ok(Buses {
        pio,
        mmio: Arc::new(Bus::new()),
    })
}

/// Bytes of input per exit: what [`cpu::fuzz_exit`] reads (kind, 8 address bytes, size, 8 data
/// bytes).
pub const EXIT_RECORD_LEN: usize = 18;

/// Plays `input` as a sequence of exits, [`EXIT_RECORD_LEN`] bytes each (a shorter last one is
/// zero-padded), against one set of [`legacy_buses`], so that device state carries over from
/// one exit to the next.
pub fn fuzz_vcpu_exits(input: &[u8]) {
    let buses = match legacy_buses() {
        Ok(buses) => buses,
        Err(e) => {
            log::warn!("{e}");
            return;
        }
    };
    for record in input.chunks(EXIT_RECORD_LEN) {
        let action = cpu::fuzz_exit(record, &buses);
        assert_eq!(action, ExitAction::Resume, "a device access must resume");
    }
}

/// Guest RAM for [`fuzz_kernel_loader`]: large enough for a small real kernel, small enough
/// that the decompression limit (the guest's RAM) bounds every allocation to 64 MiB.
pub const KERNEL_FUZZ_RAM: u64 = 64 << 20;

/// Loads `input` as a kernel image, once with host decompression and once for the guest's own
/// decompressor, into fresh 64 MiB guest memories. A kernel that loads must end inside RAM.
pub fn fuzz_kernel_loader(input: &[u8]) {
    for decompress in [boot::Decompress::Host, boot::Decompress::Guest] {
        let Ok(mem) =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), KERNEL_FUZZ_RAM as usize)])
        else {
            return;
        };
        let opts = boot::KernelOptions {
            decompress,
            ..Default::default()
        };
        if let Ok(kernel) = boot::load_kernel(&mem, &mut Cursor::new(input), &opts) {
            assert!(
                kernel.kernel_end.0 <= KERNEL_FUZZ_RAM,
                "the kernel ends at {:#x}, past the end of RAM",
                kernel.kernel_end.0
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::fs;
    use std::path::{Path, PathBuf};

    use super::*;

    fn seeds_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds")
    }

    /// Every file of every target's seed corpus (crash regressions included) through the
    /// target's entry point; every target has seeds and every seed directory has a target.
    #[test]
    fn seed_corpora_replay() {
        let dirs: BTreeSet<String> = fs::read_dir(seeds_dir())
            .expect("fuzz/seeds is missing")
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let targets: BTreeSet<String> = TARGETS.iter().map(|(name, _)| name.to_string()).collect();
        assert_eq!(dirs, targets, "seed directories and fuzz targets differ");
        for (name, run) in TARGETS {
            let dir = seeds_dir().join(name);
            let mut files: Vec<PathBuf> = fs::read_dir(&dir)
                .unwrap()
                .map(|entry| entry.unwrap().path())
                .collect();
            files.sort();
            assert!(!files.is_empty(), "{name} has no seeds");
            for file in files {
                let input = fs::read(&file).unwrap();
                eprintln!("replaying {}", file.display());
                run(&input);
            }
        }
    }

    #[test]
    fn legacy_devices_answer_at_their_ports() {
        let buses = legacy_buses().unwrap();
        let mut byte = [0u8];
        // CMOS register 0x0a (status A) reads its reset value 0x26 (32.768 kHz, 1024 Hz).
        assert!(buses.pio.write(0x70, &[0x0a]));
        assert!(buses.pio.read(0x71, &mut byte));
        assert_eq!(byte, [0x26]);
        // The POST port reads back the last code.
        assert!(buses.pio.write(0x80, &[0x5a]));
        assert!(buses.pio.read(0x80, &mut byte));
        assert_eq!(byte, [0x5a]);
        // UART scratch register (offset 7) holds what was written.
        assert!(buses.pio.write(0x3ff, &[0xa5]));
        assert!(buses.pio.read(0x3ff, &mut byte));
        assert_eq!(byte, [0xa5]);
        // The i8042 claims 0x60..=0x64 (0x62 reads as all ones); 0x65 is nobody's.
        assert!(buses.pio.read(0x64, &mut byte));
        assert!(buses.pio.read(0x62, &mut byte));
        assert_eq!(byte, [0xff]);
        assert!(!buses.pio.read(0x65, &mut byte));
        assert_eq!(byte, [0xff]);
    }

    #[test]
    fn exits_reach_the_legacy_devices() {
        // out 0x70 <- 0x0a; out 0x80 <- 0x33: two records, the second one short.
        let mut input = vec![1, 0x70, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a, 0, 0, 0, 0, 0, 0, 0];
        input.extend_from_slice(&[1, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0x33]);
        fuzz_vcpu_exits(&input);
        fuzz_vcpu_exits(&[]);
        fuzz_vcpu_exits(&[2; 100]);
    }

    fn load_seed(name: &str, decompress: boot::Decompress) -> boot::Result<boot::LoadedKernel> {
        let image = fs::read(seeds_dir().join("kernel_loader").join(name)).unwrap();
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), KERNEL_FUZZ_RAM as usize)])
                .unwrap();
        boot::load_kernel(
            &mem,
            &mut Cursor::new(image),
            &boot::KernelOptions {
                decompress,
                ..Default::default()
            },
        )
    }

    /// The kernel seeds are real images that load, so the fuzzer starts past the header checks.
    #[test]
    fn kernel_seeds_load() {
        let elf = load_seed("tiny-vmlinux", boot::Decompress::Host).unwrap();
        assert_eq!(elf.entry, GuestAddress(0x100_0000));
        assert_eq!(elf.kernel_end, GuestAddress(0x101_0000));
        for name in ["bzimage-gzip", "bzimage-bzip2", "bzimage-xz"] {
            let host = load_seed(name, boot::Decompress::Host).unwrap();
            assert_eq!(
                host.format,
                boot::KernelFormat::BzImage {
                    decompressed_on_host: true
                },
                "{name}"
            );
            assert_eq!(host.entry, GuestAddress(0x100_0000), "{name}");
            // In-guest decompression: loaded at pref_address, entered 0x200 in, init_size room.
            let guest = load_seed(name, boot::Decompress::Guest).unwrap();
            assert_eq!(guest.entry, GuestAddress(0x100_0200), "{name}");
            assert_eq!(guest.kernel_end, GuestAddress(0x140_0000), "{name}");
        }
        // LZO is left to the guest even when the host is asked to decompress.
        let lzo = load_seed("bzimage-lzo", boot::Decompress::Host).unwrap();
        assert_eq!(
            lzo.format,
            boot::KernelFormat::BzImage {
                decompressed_on_host: false
            }
        );
        assert!(matches!(
            load_seed("elf-outside-ram", boot::Decompress::Host),
            Err(boot::Error::KernelOutsideRam { .. })
        ));
    }

    #[test]
    fn kernel_loader_rejects_garbage_and_empty_images() {
        fuzz_kernel_loader(&[]);
        fuzz_kernel_loader(b"\x7fELF");
        fuzz_kernel_loader(&[0u8; 4096]);
    }
}
