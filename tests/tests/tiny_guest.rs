//! A tiny hand-made guest (a few instructions that write to COM1 and reset through the i8042)
//! exercises the boot path, the vCPU loop, the port bus, the UART and the reset line without Linux.

use std::time::Duration;

use integration_tests::{
    hello_then_reset, kvm_available, ring3_port_loop, temp_file, thread_names, tiny_elf,
    tiny_pvh_guest, Guest, TINY_PVH_MARKER,
};

#[test]
fn tiny_guest_prints_through_the_uart_and_resets_cleanly() {
    if !kvm_available("tiny_guest_prints_through_the_uart_and_resets_cleanly") {
        return;
    }
    let kernel = temp_file(
        "hello.elf",
        &tiny_elf(&hello_then_reset(b"hello from a tiny guest\n")),
    );
    let mut guest = Guest::spawn(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--cpu-features",
        "host",
    ]);
    guest.wait_for("hello from a tiny guest", Duration::from_secs(60));
    let status = guest.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "status {status}{}", guest.transcript());
}

/// The tiny PVH guest the bench runs: entered through PVH in 32-bit protected mode, it prints its
/// marker, writes QEMU's isa-debug-exit port (which nothing claims here, so it is ignored) and
/// resets through the i8042.
#[test]
fn tiny_pvh_guest_boots_through_pvh_prints_and_resets() {
    if !kvm_available("tiny_pvh_guest_boots_through_pvh_prints_and_resets") {
        return;
    }
    let kernel = temp_file("tiny-pvh.elf", &tiny_pvh_guest());
    let mut guest = Guest::spawn(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64M",
        "--log-level",
        "info",
    ]);
    guest.wait_for(TINY_PVH_MARKER, Duration::from_secs(60));
    let status = guest.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "status {status}{}", guest.transcript());
    let log = guest.vmm_log();
    assert!(
        log.contains("booting through PVH at 0x100000"),
        "the log does not say PVH{}",
        guest.transcript()
    );
}

/// The bench's exit-turnaround guest: ring 0 drops to ring 3, which writes the POST port 1000
/// times, each write one exit through the vCPU loop and the port bus.
#[test]
fn ring3_guest_port_writes_each_reach_the_vmm() {
    if !kvm_available("ring3_guest_port_writes_each_reach_the_vmm") {
        return;
    }
    let kernel = temp_file(
        "ring3-loop.elf",
        &tiny_elf(&ring3_port_loop(1000, 0x80, b"ring 3 done\n")),
    );
    let mut guest = Guest::spawn_logging(
        &["--kernel", kernel.to_str().unwrap(), "--memory", "64M"],
        "debug",
    );
    guest.wait_for("ring 3 done", Duration::from_secs(60));
    let status = guest.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "status {status}{}", guest.transcript());
    let log = guest.vmm_log();
    let exits: u64 = log
        .split("vCPU 0 ended after ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exit count in the log{}", guest.transcript()));
    // 1000 port writes, 12 bytes of message and the reset, plus whatever ring 0 needed.
    assert!(
        (1013..1100).contains(&exits),
        "{exits} exits{}",
        guest.transcript()
    );
}

#[test]
fn tiny_guest_on_four_vcpus_ends_every_thread() {
    if !kvm_available("tiny_guest_on_four_vcpus_ends_every_thread") {
        return;
    }
    let kernel = temp_file("hello4.elf", &tiny_elf(&hello_then_reset(b"four\n")));
    let mut guest = Guest::spawn(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--cpus",
        "4",
        "--memory",
        "64M",
    ]);
    guest.wait_for("four", Duration::from_secs(60));
    let status = guest.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "status {status}{}", guest.transcript());
}

#[test]
fn a_triple_fault_ends_the_vmm_with_status_zero() {
    if !kvm_available("a_triple_fault_ends_the_vmm_with_status_zero") {
        return;
    }
    // ud2 with the boot IDT's zero limit: #UD cannot be delivered, nor the #GP and #DF that follow,
    // so the vCPU shuts down like a PC resetting.
    let kernel = temp_file("triple-fault.elf", &tiny_elf(&[0x0f, 0x0b]));
    let mut guest = Guest::spawn(&["--kernel", kernel.to_str().unwrap()]);
    let status = guest.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "status {status}{}", guest.transcript());
}

#[test]
fn signals_dump_registers_or_end_the_vmm_cleanly() {
    if !kvm_available("signals_dump_registers_or_end_the_vmm_cleanly") {
        return;
    }
    // `jmp $`: a guest that never ends by itself; --rng adds the device I/O thread, which must
    // not take the signals either. Without ACPI, SIGTERM stops the guest at once (tests/acpi.rs
    // has the power button's way).
    let kernel = temp_file("spin.elf", &tiny_elf(&[0xeb, 0xfe]));
    let mut guest = Guest::spawn(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--rng",
        "--acpi",
        "off",
        "--log-level",
        "info",
    ]);
    guest.wait_for_log("first KVM_RUN", Duration::from_secs(60));
    guest.signal(libc::SIGUSR1);
    guest.wait_for_log("vCPU 0: rip 0x10000", Duration::from_secs(60));
    guest.signal(libc::SIGTERM);
    let status = guest.wait_exit(Duration::from_secs(60));
    assert_eq!(
        status.code(),
        Some(128 + 15),
        "status {status}{}",
        guest.transcript()
    );
    assert!(
        guest.vmm_log().contains("received signal 15"),
        "{}",
        guest.transcript()
    );
}

#[test]
fn each_virtio_device_is_served_by_a_thread_of_its_own() {
    if !kvm_available("each_virtio_device_is_served_by_a_thread_of_its_own") {
        return;
    }
    let kernel = temp_file("spin-workers.elf", &tiny_elf(&[0xeb, 0xfe]));
    let disks: Vec<String> = (0..2)
        .map(|i| {
            let image = temp_file(&format!("worker-disk{i}.img"), &vec![0u8; 1 << 20]);
            format!("path={}", image.display())
        })
        .collect();
    let mut guest = Guest::spawn(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--disk",
        &disks[0],
        "--disk",
        &disks[1],
        "--rng",
        "--acpi",
        "off",
    ]);
    guest.wait_for_log("first KVM_RUN", Duration::from_secs(60));
    let names = thread_names(guest.pid());
    for worker in ["virtio-blk0", "virtio-blk1", "virtio-rng0"] {
        assert_eq!(
            names.iter().filter(|n| *n == worker).count(),
            1,
            "one {worker} thread expected among {names:?}{}",
            guest.transcript()
        );
    }
    guest.signal(libc::SIGTERM);
    let status = guest.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(128 + 15), "{}", guest.transcript());
}
