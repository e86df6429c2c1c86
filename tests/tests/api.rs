//! Firecracker's API on `--api-sock`, driven as Firecracker's getting-started guide drives it:
//! `curl --unix-socket` with JSON bodies, no client of our own.
//!
//! - a tiny ring-3 guest that prints a counter on COM1: configure, `InstanceStart`, its console,
//!   `PATCH /vm` Paused (the counter stands still) and Resumed (it goes on from where it stood),
//!   and every bad input answered with 400 while the guest keeps counting, a slow client that
//!   never finishes its request included;
//! - the same guest from `--config-file`, and the file's conflicts with the command line;
//! - the microVM kernel configured through the API, `SendCtrlAltDel` pressing its ACPI power
//!   button, and its init powering off: status 0.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::{
    boot_timeout, guest_file, kvm_available, ring3_counter, run_vmm, temp_file, tiny_elf, Guest,
    COMMAND_TIMEOUT, COUNTER_PREFIX, INIT_READY,
};

/// Spin iterations between the counter guest's lines: some tens of milliseconds natively.
const COUNTER_DELAY: u32 = 30_000_000;

/// A fresh directory for one test's socket and files.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-api-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One request through curl; returns the status code and the body.
fn curl(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut command = Command::new("curl");
    command
        .args([
            "--silent",
            "--show-error",
            "--max-time",
            "30",
            "--unix-socket",
        ])
        .arg(sock)
        .args(["-X", method, "-H", "Accept: application/json"])
        .args(["--write-out", "\n%{http_code}"]);
    if let Some(body) = body {
        command
            .args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(body);
    }
    command.arg(format!("http://localhost{path}"));
    let out = command
        .output()
        .expect("curl runs (scripts/prereqs test installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let code = code.trim().parse().unwrap_or_else(|_| {
        panic!(
            "curl {method} {path}: no status: {text:?} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, body.to_string())
}

/// A request that must succeed with 204.
fn ok(sock: &Path, method: &str, path: &str, body: &str, guest: &Guest) {
    let (code, answer) = curl(sock, method, path, Some(body));
    assert_eq!(
        code,
        204,
        "{method} {path} {body}: {answer}{}",
        guest.transcript()
    );
}

/// A request that must be refused with 400 and a fault message containing `needle`.
fn refused(sock: &Path, method: &str, path: &str, body: &str, needle: &str, guest: &Guest) {
    let (code, answer) = curl(sock, method, path, Some(body));
    assert_eq!(
        code,
        400,
        "{method} {path} {body}: {answer}{}",
        guest.transcript()
    );
    assert!(
        answer.starts_with("{\"fault_message\":") && answer.contains(needle),
        "{method} {path} {body}: {answer:?} lacks {needle:?}"
    );
}

fn wait_for_socket(sock: &Path, guest: &Guest) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "no API socket at {}{}",
            sock.display(),
            guest.transcript()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The counts the guest printed so far.
fn counts(guest: &Guest) -> Vec<u32> {
    guest
        .console()
        .lines()
        .filter_map(|line| line.trim().strip_prefix(COUNTER_PREFIX))
        .filter(|digits| digits.len() == 8)
        .filter_map(|digits| u32::from_str_radix(digits, 16).ok())
        .collect()
}

/// Waits until the guest printed more than `after` counts; returns them.
fn wait_for_counts(guest: &Guest, after: usize) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = counts(guest);
        if now.len() > after + 1 {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the counter stands at {} counts{}",
            now.len(),
            guest.transcript()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn state(sock: &Path) -> String {
    let (code, body) = curl(sock, "GET", "/", None);
    assert_eq!(code, 200, "{body}");
    body
}

/// Pauses and resumes the running counter guest, checking that it stands still while paused.
fn pause_and_resume(sock: &Path, guest: &Guest) {
    wait_for_counts(guest, 2);
    ok(sock, "PATCH", "/vm", r#"{"state": "Paused"}"#, guest);
    assert!(state(sock).contains("\"state\":\"Paused\""));
    let at_pause = guest.console();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        guest.console(),
        at_pause,
        "the console moved while paused{}",
        guest.transcript()
    );
    // Pausing a paused VM is no error, as in Firecracker.
    ok(sock, "PATCH", "/vm", r#"{"state": "Paused"}"#, guest);
    let before = counts(guest);
    ok(sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#, guest);
    assert!(state(sock).contains("\"state\":\"Running\""));
    let after = wait_for_counts(guest, before.len());
    // The count goes on from where it stood: nothing was lost or repeated.
    let resumed = &after[before.len().saturating_sub(1)..];
    assert!(
        resumed.windows(2).all(|w| w[1] == w[0] + 1),
        "counts around the pause: {resumed:?}"
    );
}

/// A client that sends half a request and then nothing: others are served meanwhile, and the
/// API closes it after its read timeout.
fn slow_client(sock: &Path) -> UnixStream {
    let mut stream = UnixStream::connect(sock).unwrap();
    stream
        .write_all(b"PUT /actions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{\"act")
        .unwrap();
    stream
}

fn assert_closed_by_server(mut stream: UnixStream) {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 64];
    let n = stream
        .read(&mut buf)
        .expect("the API closes a stalled client");
    assert_eq!(n, 0, "answered a half request: {:?}", &buf[..n]);
}

/// Bad bodies that must be 400 whatever the VM's state.
fn bad_bodies(sock: &Path, guest: &Guest, dir: &Path) {
    refused(
        sock,
        "PUT",
        "/machine-config",
        "{\"vcpu_count\": 1,",
        "deserializing",
        guest,
    );
    refused(
        sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128, "vcpus": 2}"#,
        "unknown field `vcpus`",
        guest,
    );
    refused(
        sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": "one", "mem_size_mib": 128}"#,
        "invalid type",
        guest,
    );
    refused(
        sock,
        "PUT",
        "/actions",
        r#"{"action_type": "Explode"}"#,
        "Explode",
        guest,
    );
    refused(sock, "GET", "/nowhere", "", "GET /nowhere", guest);
    let huge = format!("{{\"kernel_image_path\": \"{}\"}}", "x".repeat(100 * 1024));
    let huge_file = dir.join("huge.json");
    std::fs::write(&huge_file, huge).unwrap();
    refused(
        sock,
        "PUT",
        "/boot-source",
        &format!("@{}", huge_file.display()),
        "larger than the limit",
        guest,
    );
}

#[test]
fn the_api_configures_starts_pauses_and_resumes_a_guest_and_refuses_bad_input() {
    if !kvm_available("the_api_configures_starts_pauses_and_resumes_a_guest_and_refuses_bad_input")
    {
        return;
    }
    let dir = scratch("guide");
    let sock = dir.join("api.sock");
    let kernel = temp_file("api-counter.elf", &tiny_elf(&ring3_counter(COUNTER_DELAY)));
    let disk = dir.join("data.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut guest = Guest::spawn(&[
        "--api-sock".as_ref(),
        sock.as_os_str(),
        "--shutdown-timeout".as_ref(),
        "1".as_ref(),
    ]);
    wait_for_socket(&sock, &guest);
    assert!(state(&sock).contains("\"state\":\"Not started\""));

    // Before the start: bad input, and what needs a running VM.
    bad_bodies(&sock, &guest, &dir);
    refused(
        &sock,
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#,
        "/nonexistent/vmlinux",
        &guest,
    );
    refused(
        &sock,
        "PUT",
        "/drives/rootfs",
        &format!(
            r#"{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true, "is_read_only": false}}"#,
            dir.display()
        ),
        "is a directory",
        &guest,
    );
    refused(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128, "smt": true}"#,
        "smt",
        &guest,
    );
    refused(
        &sock,
        "PATCH",
        "/vm",
        r#"{"state": "Paused"}"#,
        "before starting",
        &guest,
    );
    refused(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
        "without kernel",
        &guest,
    );
    let stalled = slow_client(&sock);
    // A file that is no kernel passes PUT /boot-source (it exists) and fails InstanceStart,
    // after which the VM can still be configured and started.
    ok(
        &sock,
        "PUT",
        "/boot-source",
        &format!(r#"{{"kernel_image_path": "{}"}}"#, disk.display()),
        &guest,
    );
    refused(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
        "Failed to start the microVM",
        &guest,
    );
    assert!(state(&sock).contains("\"state\":\"Not started\""));

    // Firecracker's getting-started sequence.
    ok(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128}"#,
        &guest,
    );
    let (code, machine) = curl(&sock, "GET", "/machine-config", None);
    assert_eq!(code, 200);
    assert!(machine.contains("\"vcpu_count\":1") && machine.contains("\"mem_size_mib\":128"));
    ok(
        &sock,
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}}"#,
            kernel.display()
        ),
        &guest,
    );
    ok(
        &sock,
        "PUT",
        "/drives/data",
        &format!(
            r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false, "is_read_only": true}}"#,
            disk.display()
        ),
        &guest,
    );
    ok(&sock, "PUT", "/entropy", "{}", &guest);
    let started = Instant::now();
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
        &guest,
    );
    wait_for_counts(&guest, 0);
    eprintln!(
        "InstanceStart to the first counter line: {:?}",
        started.elapsed()
    );
    assert!(state(&sock).contains("\"state\":\"Running\""));
    let (code, config) = curl(&sock, "GET", "/vm/config", None);
    assert_eq!(code, 200);
    assert!(
        config.contains(&kernel.display().to_string())
            && config.contains("\"drive_id\":\"data\"")
            && config.contains("\"entropy\":{}"),
        "{config}"
    );

    // After the start: the pre-boot resources are fixed, bad input changes nothing.
    for (path, body) in [
        (
            "/actions",
            r#"{"action_type": "InstanceStart"}"#.to_string(),
        ),
        (
            "/boot-source",
            format!(r#"{{"kernel_image_path": "{}"}}"#, kernel.display()),
        ),
        (
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 256}"#.to_string(),
        ),
    ] {
        refused(&sock, "PUT", path, &body, "after starting", &guest);
    }
    bad_bodies(&sock, &guest, &dir);
    refused(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "FlushMetrics"}"#,
        "metrics",
        &guest,
    );
    pause_and_resume(&sock, &guest);
    assert_closed_by_server(stalled);
    let running = counts(&guest).len();
    wait_for_counts(&guest, running);

    // This guest runs with interrupts off and ignores the power button: after the shutdown
    // timeout the VMM stops it with SIGTERM's status.
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
        &guest,
    );
    guest.signal(libc::SIGTERM);
    let status = guest.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(128 + 15), "{}", guest.transcript());
    assert!(!sock.exists(), "the API socket outlived the VMM");
}

fn counter_config(dir: &Path) -> PathBuf {
    let kernel = temp_file(
        "api-file-counter.elf",
        &tiny_elf(&ring3_counter(COUNTER_DELAY)),
    );
    let file = dir.join("vm.json");
    std::fs::write(
        &file,
        format!(
            r#"{{
  "boot-source": {{ "kernel_image_path": "{}", "boot_args": "console=ttyS0" }},
  "drives": [],
  "machine-config": {{ "vcpu_count": 2, "mem_size_mib": 128, "smt": false }},
  "network-interfaces": [],
  "entropy": {{}}
}}"#,
            kernel.display()
        ),
    )
    .unwrap();
    file
}

#[test]
fn a_config_file_starts_the_same_guest_at_once() {
    if !kvm_available("a_config_file_starts_the_same_guest_at_once") {
        return;
    }
    let dir = scratch("file");
    let sock = dir.join("api.sock");
    let file = counter_config(&dir);
    let mut guest = Guest::spawn(&[
        "--config-file".as_ref(),
        file.as_os_str(),
        "--api-sock".as_ref(),
        sock.as_os_str(),
        "--shutdown-timeout".as_ref(),
        "1".as_ref(),
    ]);
    wait_for_socket(&sock, &guest);
    wait_for_counts(&guest, 0);
    assert!(state(&sock).contains("\"state\":\"Running\""));
    let (code, machine) = curl(&sock, "GET", "/machine-config", None);
    assert_eq!(code, 200);
    assert!(machine.contains("\"vcpu_count\":2"), "{machine}");
    refused(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
        "after starting",
        &guest,
    );
    pause_and_resume(&sock, &guest);
    guest.signal(libc::SIGTERM);
    let status = guest.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(128 + 15), "{}", guest.transcript());
}

#[test]
fn config_file_mistakes_are_one_line_and_status_2() {
    let dir = scratch("file-errors");
    let file = counter_config(&dir);
    let broken = dir.join("broken.json");
    std::fs::write(
        &broken,
        r#"{"boot-source": {"kernel_image_path": "/x"}, "color": 1}"#,
    )
    .unwrap();
    let missing = dir.join("missing.json");
    let cases: [(Vec<&std::ffi::OsStr>, &str); 4] = [
        (
            vec![
                "--config-file".as_ref(),
                file.as_os_str(),
                "--cpus".as_ref(),
                "2".as_ref(),
            ],
            "--cpus conflicts with --config-file",
        ),
        (
            vec![
                "--config-file".as_ref(),
                file.as_os_str(),
                "--kernel".as_ref(),
                file.as_os_str(),
            ],
            "--kernel conflicts with --config-file",
        ),
        (
            vec!["--config-file".as_ref(), broken.as_os_str()],
            "unknown field `color`",
        ),
        (
            vec!["--config-file".as_ref(), missing.as_os_str()],
            "cannot read the configuration file",
        ),
    ];
    for (args, needle) in cases {
        let (status, _, stderr) = run_vmm(&args);
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    // An API socket path that is taken.
    let (status, _, stderr) = run_vmm(&[
        "--config-file".as_ref(),
        file.as_os_str(),
        "--api-sock".as_ref(),
        file.as_os_str(),
    ]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot listen on the API socket"),
        "{stderr}"
    );
    let before = std::fs::read(&file).unwrap();
    let (status, _, _) = run_vmm(&[
        "--config-file".as_ref(),
        file.as_os_str(),
        "--memory".as_ref(),
        "64".as_ref(),
    ]);
    assert_eq!(status.code(), Some(2));
    assert_eq!(
        std::fs::read(&file).unwrap(),
        before,
        "the file was changed"
    );
}

#[test]
fn send_ctrl_alt_del_powers_off_the_microvm_kernel_through_its_acpi_power_button() {
    if !kvm_available(
        "send_ctrl_alt_del_powers_off_the_microvm_kernel_through_its_acpi_power_button",
    ) {
        return;
    }
    let dir = scratch("linux");
    let sock = dir.join("api.sock");
    let mut guest = Guest::spawn(&[
        "--api-sock".as_ref(),
        sock.as_os_str(),
        "--shutdown-timeout".as_ref(),
        "600".as_ref(),
    ]);
    wait_for_socket(&sock, &guest);
    ok(
        &sock,
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path": "{}", "initrd_path": "{}"}}"#,
            guest_file("microvm").display(),
            guest_file("initramfs").display()
        ),
        &guest,
    );
    ok(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 256}"#,
        &guest,
    );
    let started = Instant::now();
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
        &guest,
    );
    guest.wait_for("\n", boot_timeout());
    eprintln!(
        "InstanceStart to the guest's first console line: {:?}",
        started.elapsed()
    );
    guest.wait_for(INIT_READY, boot_timeout());
    guest.wait_for(
        "vmm-guest: power button on /dev/input/event",
        COMMAND_TIMEOUT,
    );
    // init prints that line when it starts `dd` on the device in the background; a press before
    // `dd` has the device open is lost, so wait until some process holds it.
    guest.wait_for("# ", COMMAND_TIMEOUT);
    guest.run(
        "until ls -l /proc/[0-9]*/fd 2>/dev/null | grep -q /dev/input/event; do sleep 1; done",
        COMMAND_TIMEOUT,
    );
    eprintln!("InstanceStart to init: {:?}", started.elapsed());
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
        &guest,
    );
    guest.wait_for("vmm-guest: poweroff requested", COMMAND_TIMEOUT);
    let status = guest.wait_exit(COMMAND_TIMEOUT);
    assert_eq!(status.code(), Some(0), "{}", guest.transcript());
    assert!(
        guest.vmm_log().contains("the guest entered S5"),
        "{}",
        guest.transcript()
    );
}

#[test]
fn sigterm_before_instance_start_ends_the_vmm_with_143_and_removes_its_socket() {
    let dir = scratch("signal");
    let sock = dir.join("api.sock");
    let mut guest = Guest::spawn(&["--api-sock".as_ref(), sock.as_os_str()]);
    wait_for_socket(&sock, &guest);
    // SIGUSR1 (a register dump) has nothing to dump yet and changes nothing.
    guest.signal(libc::SIGUSR1);
    assert!(state(&sock).contains("\"state\":\"Not started\""));
    guest.signal(libc::SIGTERM);
    let status = guest.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(128 + 15), "{}", guest.transcript());
    assert!(!sock.exists(), "the API socket outlived the VMM");
}

#[test]
fn flush_metrics_writes_a_line_now_and_is_refused_without_a_metrics_file() {
    if !kvm_available("flush_metrics_writes_a_line_now_and_is_refused_without_a_metrics_file") {
        return;
    }
    let dir = scratch("flush");
    let sock = dir.join("api.sock");
    let file = counter_config(&dir);
    let metrics = dir.join("metrics.json");
    // An hour between lines: only FlushMetrics (and the exit) can write one.
    let mut guest = Guest::spawn(&[
        "--config-file".as_ref(),
        file.as_os_str(),
        "--api-sock".as_ref(),
        sock.as_os_str(),
        "--metrics-file".as_ref(),
        metrics.as_os_str(),
        "--metrics-interval".as_ref(),
        "3600".as_ref(),
        "--shutdown-timeout".as_ref(),
        "1".as_ref(),
    ]);
    wait_for_socket(&sock, &guest);
    wait_for_counts(&guest, 0);
    let lines = |path: &Path| {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let before = lines(&metrics);
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "FlushMetrics"}"#,
        &guest,
    );
    let after = lines(&metrics);
    assert_eq!(after, before + 1, "{}", guest.transcript());
    let last = std::fs::read_to_string(&metrics).unwrap();
    let last = last.lines().last().unwrap();
    assert!(
        last.starts_with('{') && last.contains("\"vcpus\""),
        "{last}"
    );
    guest.signal(libc::SIGTERM);
    let status = guest.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(128 + 15), "{}", guest.transcript());

    // Without --metrics-file, Firecracker's answer.
    let dir = scratch("flush-none");
    let sock = dir.join("api.sock");
    let file = counter_config(&dir);
    let mut guest = Guest::spawn(&[
        "--config-file".as_ref(),
        file.as_os_str(),
        "--api-sock".as_ref(),
        sock.as_os_str(),
        "--shutdown-timeout".as_ref(),
        "1".as_ref(),
    ]);
    wait_for_socket(&sock, &guest);
    wait_for_counts(&guest, 0);
    refused(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "FlushMetrics"}"#,
        "not configured",
        &guest,
    );
    guest.signal(libc::SIGTERM);
    let status = guest.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(128 + 15), "{}", guest.transcript());
}
