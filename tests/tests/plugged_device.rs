//! A device from outside the workspace: `examples/fixed-entropy` is a crate of its own that
//! defines a virtio entropy device and attaches it through `vmm::plug::ExtraDevices`. The microvm
//! kernel's virtio-rng driver finds it, and what the guest reads from `/dev/hwrng` is the
//! device's pattern.

use std::path::{Path, PathBuf};

use integration_tests::{
    boot_timeout, guest_file, kvm_available, Guest, COMMAND_TIMEOUT, INIT_READY,
};

/// The pattern `FixedEntropy` repeats (examples/fixed-entropy/src/main.rs).
const PATTERN: &str = "fixed-entropy-0\n";

/// The example's binary, beside the test's own target directory.
fn fixed_entropy_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executables live in target/<profile>/deps")
        .join("vmm-fixed-entropy");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (the README's test command does)",
        path.display()
    );
    path
}

#[test]
fn a_virtio_device_from_another_crate_serves_the_guest() {
    if !kvm_available("a_virtio_device_from_another_crate_serves_the_guest") {
        return;
    }
    let kernel = guest_file("microvm");
    let initramfs = guest_file("initramfs");
    let mut guest = Guest::spawn_program(
        &fixed_entropy_binary(),
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initramfs",
            initramfs.to_str().unwrap(),
        ],
    );
    guest.wait_for(INIT_READY, boot_timeout());
    guest.wait_for("# ", COMMAND_TIMEOUT);
    let current = guest.run("cat /sys/class/misc/hw_random/rng_current", COMMAND_TIMEOUT);
    assert!(
        current.starts_with("virtio_rng"),
        "the guest's hwrng is {current:?}{}",
        guest.transcript()
    );
    // Four lines of the pattern, wherever in it the driver's reads began.
    let read = guest.run(
        "head -c 256 /dev/hwrng | tr -c 'a-z0-9\\n-' '?' | sort | uniq -c",
        COMMAND_TIMEOUT,
    );
    let line = PATTERN.trim_end();
    assert!(
        read.lines().any(|l| l
            .trim_start()
            .split_once(' ')
            .is_some_and(|(n, text)| text == line && n.parse::<u32>().is_ok_and(|n| n >= 14))),
        "/dev/hwrng did not give the device's pattern: {read:?}{}",
        guest.transcript()
    );
    assert!(
        guest.vmm_log().contains("fixed-entropy"),
        "the VMM did not name the plugged device{}",
        guest.transcript()
    );
    guest.send("poweroff");
    let status = guest.wait_exit(COMMAND_TIMEOUT);
    assert_eq!(status.code(), Some(0), "{}", guest.transcript());
}
