//! ACPI with a real Linux guest: the project's microVM kernel (built with `CONFIG_ACPI`, its button
//! driver and evdev, see guest/microvm.config) and the guest-kit initramfs, whose init powers the
//! guest off when the ACPI power button is pressed.
//!
//! - the kernel takes its CPUs from the MADT and its PCI host bridge from the DSDT, and `poweroff`
//!   ends the VMM with status 0 through S5;
//! - SIGTERM presses the power button, the guest's own shutdown runs (init's `poweroff`), status 0;
//!   this one boots through PVH, where the RSDP's address travels in `hvm_start_info`;
//! - with `--acpi off` the same kernel falls back to the MP table and still sees both CPUs.
//!
//! A guest that ignores the button (status 143 after the timeout) is a tiny guest in `acpi.rs`.

use integration_tests::{
    boot_timeout, guest_file, kvm_available, Guest, COMMAND_TIMEOUT, INIT_READY,
};

/// What init prints once it listens to the power button.
const BUTTON_READY: &str = "vmm-guest: power button on /dev/input/event";

/// Boots guest-kit kernel `kernel` with the initramfs and `extra` arguments, up to the prompt.
fn boot(kernel: &str, extra: &[&str]) -> Guest {
    let mut args = vec![
        "--kernel".to_string(),
        guest_file(kernel).display().to_string(),
        "--initramfs".to_string(),
        guest_file("initramfs").display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut guest = Guest::spawn(&args);
    guest.wait_for(INIT_READY, boot_timeout());
    guest.wait_for("# ", COMMAND_TIMEOUT);
    eprintln!("{kernel} {extra:?}: shell after {:?}", guest.elapsed());
    guest
}

fn assert_in(haystack: &str, needle: &str, guest: &Guest) {
    assert!(
        haystack.contains(needle),
        "{needle:?} missing from:\n{haystack}{}",
        guest.transcript()
    );
}

#[test]
fn microvm_takes_two_cpus_from_the_madt_and_poweroff_ends_the_vmm_with_zero() {
    if !kvm_available("microvm_takes_two_cpus_from_the_madt_and_poweroff_ends_the_vmm_with_zero") {
        return;
    }
    let mut guest = boot("microvm", &["--cpus", "2"]);
    let nproc = guest.run("nproc", COMMAND_TIMEOUT);
    assert_eq!(nproc, "2", "nproc{}", guest.transcript());
    // Where the VMM hides XSAVE from the guest kernel, init's environment keeps glibc programs
    // off AVX (the kernel would not switch that state between them); elsewhere nothing is hidden.
    let hidden = guest.vmm_log().contains("hiding xsave");
    let environ = guest.run(
        "tr '\\0' '\\n' < /proc/1/environ | grep -c '^GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,'",
        COMMAND_TIMEOUT,
    );
    assert_eq!(
        environ,
        if hidden { "1" } else { "0" },
        "init's GLIBC_TUNABLES{}",
        guest.transcript()
    );
    let dmesg = guest.run("dmesg | grep -e ACPI -e PCI0", COMMAND_TIMEOUT);
    eprintln!("{dmesg}");
    assert_in(&dmesg, "ACPI: RSDP 0x00000000000E4000", &guest);
    assert_in(&dmesg, "Using ACPI (MADT) for SMP configuration", &guest);
    assert_in(
        &dmesg,
        "INT_SRC_OVR (bus 0 bus_irq 9 global_irq 9 high level)",
        &guest,
    );
    assert_in(&dmesg, "ACPI: PM: (supports S0 S5)", &guest);
    assert_in(&dmesg, "PCI Root Bridge [PCI0]", &guest);
    assert_in(&dmesg, "ACPI: button: Power Button [PWRF]", &guest);
    let sci = guest.run("grep acpi /proc/interrupts", COMMAND_TIMEOUT);
    assert_in(&sci, "9-fasteoi", &guest);

    guest.send("poweroff");
    let status = guest.wait_exit(COMMAND_TIMEOUT);
    assert_eq!(status.code(), Some(0), "{}", guest.transcript());
    assert_in(&guest.vmm_log(), "the guest entered S5", &guest);
}

#[test]
fn sigterm_runs_the_guests_own_shutdown_through_pvh_and_exits_zero() {
    if !kvm_available("sigterm_runs_the_guests_own_shutdown_through_pvh_and_exits_zero") {
        return;
    }
    // The guest kernel is emulated here: give its shutdown time.
    let mut guest = boot("microvm-elf", &["--shutdown-timeout", "600"]);
    assert_in(&guest.vmm_log(), "booting through PVH", &guest);
    // init starts listening before it starts the shell, whose prompt `boot` waited for.
    assert_in(&guest.console(), BUTTON_READY, &guest);
    guest.signal(libc::SIGTERM);
    guest.wait_for("vmm-guest: poweroff requested", COMMAND_TIMEOUT);
    let status = guest.wait_exit(COMMAND_TIMEOUT);
    assert_eq!(status.code(), Some(0), "{}", guest.transcript());
    let log = guest.vmm_log();
    assert_in(&log, "signal 15: pressed the power button;", &guest);
    assert_in(&log, "the guest entered S5", &guest);
}

#[test]
fn microvm_without_acpi_takes_its_cpus_from_the_mp_table() {
    if !kvm_available("microvm_without_acpi_takes_its_cpus_from_the_mp_table") {
        return;
    }
    let mut guest = boot("microvm", &["--cpus", "2", "--acpi", "off"]);
    let nproc = guest.run("nproc", COMMAND_TIMEOUT);
    assert_eq!(nproc, "2", "nproc{}", guest.transcript());
    let firmware = guest.run("ls /sys/firmware", COMMAND_TIMEOUT);
    assert!(
        !firmware.contains("acpi"),
        "/sys/firmware: {firmware}{}",
        guest.transcript()
    );
    // Without ACPI a power-off can only reset, which ends the VMM too. `reboot -f` asks the
    // kernel directly: busybox's `poweroff` has been seen to die with SIGSEGV in this guest on
    // kvm-pvm hosts (under investigation), which would leave the VM running.
    guest.send("reboot -f");
    let status = guest.wait_exit(COMMAND_TIMEOUT);
    assert_eq!(status.code(), Some(0), "{}", guest.transcript());
    assert!(
        !guest.console().contains("no MP table")
            && !guest.vmm_log().contains("ACPI tables written"),
        "{}",
        guest.transcript()
    );
}
