//! ACPI power management and the signal-driven shutdown, with tiny hand-made guests that drive
//! the PM1a block directly: S5 through `PM1a_CNT`, the power button through `PM1a_STS`/`PM1a_EN`.
//! (The Linux guest's side, its button driver and `poweroff`, is in `linux_boot.rs`.)

use std::time::{Duration, Instant};

use integration_tests::{kvm_available, temp_file, tiny_elf, Guest};

/// `PM1a_EVT_BLK` and `PM1a_CNT_BLK` (legacy::AcpiPm).
const PM1A_STS: u16 = 0x600;
const PM1A_EN: u16 = 0x602;
const PM1A_CNT: u16 = 0x604;
const PWRBTN: u16 = 1 << 8;
/// `SLP_TYP` = 5 (S5, as the DSDT's `\_S5` says) with `SLP_EN`.
const S5_SLP_EN: u16 = (5 << 10) | (1 << 13);

/// `mov dx, port; mov ax, value; out dx, ax`.
fn out16(port: u16, value: u16) -> Vec<u8> {
    let mut code = vec![0x66, 0xba];
    code.extend_from_slice(&port.to_le_bytes());
    code.extend_from_slice(&[0x66, 0xb8]);
    code.extend_from_slice(&value.to_le_bytes());
    code.extend_from_slice(&[0x66, 0xef]);
    code
}

/// 64-bit code: `before`, then prints `message` on COM1, then `after`, then halts forever. The
/// message is placed after the code.
fn with_message(before: &[u8], message: &[u8], after: &[u8]) -> Vec<u8> {
    const PRINT_LEN: usize = 20;
    const LEA_END: usize = 11;
    let total = before.len() + PRINT_LEN + after.len() + 3;
    let rel = (total - (before.len() + LEA_END)) as u32;
    let mut code = before.to_vec();
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    code.extend_from_slice(&[0x48, 0x8d, 0x35]); // lea rsi, [rip + rel]
    code.extend_from_slice(&rel.to_le_bytes());
    code.push(0xb9); // mov ecx, len
    code.extend_from_slice(&(message.len() as u32).to_le_bytes());
    code.extend_from_slice(&[0xac, 0xee, 0xe2, 0xfc]); // lodsb; out dx, al; loop
    code.extend_from_slice(after);
    code.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
    assert_eq!(code.len(), total);
    code.extend_from_slice(message);
    code
}

/// Polls `PM1a_STS` until the power button's status bit is set.
fn wait_for_power_button() -> Vec<u8> {
    let mut code = vec![0x66, 0xba];
    code.extend_from_slice(&PM1A_STS.to_le_bytes()); // mov dx, PM1a_STS
    code.extend_from_slice(&[0x66, 0xed]); // in ax, dx
    code.extend_from_slice(&[0x66, 0xa9]); // test ax, PWRBTN
    code.extend_from_slice(&PWRBTN.to_le_bytes());
    code.extend_from_slice(&[0x74, 0xf8]); // jz back to `in`
    code
}

#[test]
fn a_guest_entering_s5_ends_the_vmm_with_status_zero() {
    if !kvm_available("a_guest_entering_s5_ends_the_vmm_with_status_zero") {
        return;
    }
    let code = with_message(&[], b"powering off\n", &out16(PM1A_CNT, S5_SLP_EN));
    let kernel = temp_file("s5.elf", &tiny_elf(&code));
    let mut guest = Guest::spawn(&["--kernel", kernel.to_str().unwrap()]);
    guest.wait_for("powering off", Duration::from_secs(60));
    let status = guest.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", guest.transcript());
    assert!(
        guest.vmm_log().contains("the guest powered off"),
        "{}",
        guest.transcript()
    );
}

#[test]
fn sigterm_presses_the_power_button_and_a_guest_that_handles_it_exits_zero() {
    if !kvm_available("sigterm_presses_the_power_button_and_a_guest_that_handles_it_exits_zero") {
        return;
    }
    // Enable the button, say so, wait for a press, power off.
    let mut after = wait_for_power_button();
    after.extend_from_slice(&out16(PM1A_CNT, S5_SLP_EN));
    let code = with_message(&out16(PM1A_EN, PWRBTN), b"button armed\n", &after);
    let kernel = temp_file("button.elf", &tiny_elf(&code));
    let mut guest = Guest::spawn(&["--kernel", kernel.to_str().unwrap()]);
    guest.wait_for("button armed", Duration::from_secs(60));
    // The guest spins on the status bit until the press.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        guest.vmm_log().contains("first KVM_RUN") && !guest.vmm_log().contains("stopping"),
        "{}",
        guest.transcript()
    );
    guest.signal(libc::SIGTERM);
    let status = guest.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", guest.transcript());
    let log = guest.vmm_log();
    assert!(
        log.contains("pressed the power button;"),
        "{}",
        guest.transcript()
    );
    assert!(
        log.contains("the guest powered off"),
        "{}",
        guest.transcript()
    );
}

/// A guest that never looks at the button: spins in `jmp $`.
fn spinning_guest(name: &str) -> std::path::PathBuf {
    temp_file(name, &tiny_elf(&[0xeb, 0xfe]))
}

#[test]
fn a_guest_that_ignores_the_button_is_stopped_after_the_timeout_with_143() {
    if !kvm_available("a_guest_that_ignores_the_button_is_stopped_after_the_timeout_with_143") {
        return;
    }
    let kernel = spinning_guest("ignore-button.elf");
    let mut guest = Guest::spawn(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--shutdown-timeout",
        "2",
    ]);
    guest.wait_for_log("first KVM_RUN", Duration::from_secs(60));
    let signalled = Instant::now();
    guest.signal(libc::SIGTERM);
    let status = guest.wait_exit(Duration::from_secs(30));
    let waited = signalled.elapsed();
    assert_eq!(status.code(), Some(128 + 15), "{}", guest.transcript());
    assert!(
        waited >= Duration::from_secs(2),
        "stopped after {waited:?}, before the timeout{}",
        guest.transcript()
    );
    assert!(
        guest.vmm_log().contains("the guest has not enabled it"),
        "{}",
        guest.transcript()
    );
    assert!(
        guest.vmm_log().contains("did not power off within 2s"),
        "{}",
        guest.transcript()
    );
}

#[test]
fn a_second_signal_stops_at_once() {
    if !kvm_available("a_second_signal_stops_at_once") {
        return;
    }
    let kernel = spinning_guest("second-signal.elf");
    let mut guest = Guest::spawn(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--shutdown-timeout",
        "600",
    ]);
    guest.wait_for_log("first KVM_RUN", Duration::from_secs(60));
    guest.signal(libc::SIGINT);
    guest.wait_for_log("pressed the power button", Duration::from_secs(30));
    guest.signal(libc::SIGTERM);
    let status = guest.wait_exit(Duration::from_secs(30));
    // The status of the signal that started the shutdown.
    assert_eq!(status.code(), Some(128 + 2), "{}", guest.transcript());
}

#[test]
fn without_acpi_sigterm_stops_at_once_and_the_pm_ports_are_unclaimed() {
    if !kvm_available("without_acpi_sigterm_stops_at_once_and_the_pm_ports_are_unclaimed") {
        return;
    }
    // The S5 write goes nowhere, so this guest only halts.
    let code = with_message(&[], b"trying S5\n", &out16(PM1A_CNT, S5_SLP_EN));
    let kernel = temp_file("no-acpi.elf", &tiny_elf(&code));
    let mut guest = Guest::spawn(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--acpi",
        "off",
        "--shutdown-timeout",
        "600",
    ]);
    guest.wait_for("trying S5", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(300));
    guest.signal(libc::SIGTERM);
    let status = guest.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(128 + 15), "{}", guest.transcript());
    let log = guest.vmm_log();
    assert!(
        !log.contains("ACPI tables written"),
        "{}",
        guest.transcript()
    );
    assert!(!log.contains("powered off"), "{}", guest.transcript());
}
