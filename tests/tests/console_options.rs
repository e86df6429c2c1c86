//! The console, log, metrics and status-line options, and the exit-status contract, with tiny
//! hand-made guests (no guest kit needed): `--serial file|socket|off`, `--append`, `--log-file`,
//! `--metrics-file`, the status line on a terminal (never over a line the guest left unfinished)
//! and not on a pipe, and each exit status.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{
    hello_then_reset, kvm_available, pvh_elf, pvh_hello_then_exit, ring3_port_loop, temp_file,
    tiny_elf, vmm_binary, Guest,
};

/// Where the VMM puts the kernel command line (`arch::layout::CMDLINE_START`).
const CMDLINE_START: u32 = 0x2_0000;

/// 64-bit code that prints the NUL-terminated kernel command line the VMM wrote at
/// [`CMDLINE_START`] on COM1, a newline, and resets through the i8042.
fn print_cmdline_then_reset() -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    code.push(0xbe); // mov esi, imm32
    code.extend_from_slice(&CMDLINE_START.to_le_bytes());
    code.extend_from_slice(&[
        0xac, // lodsb
        0x84, 0xc0, // test al, al
        0x74, 0x03, // jz to the newline
        0xee, // out dx, al
        0xeb, 0xf8, // jmp back to lodsb
        0xb0, 0x0a, // mov al, '\n'
        0xee, // out dx, al
        0xb0, 0xfe, // mov al, 0xfe
        0xe6, 0x64, // out 0x64, al: i8042 pulse reset line
        0xf4, // hlt
        0xeb, 0xfd, // jmp back to hlt
    ]);
    code
}

/// 64-bit code: prints `message`, then loops forever without output.
fn hello_then_spin(message: &[u8]) -> Vec<u8> {
    let mut code = hello_then_reset(message);
    // Replace the reset (`mov al, 0xfe; out 0x64, al`) with a tight loop: `jmp $`.
    let at = code
        .windows(4)
        .position(|w| w == [0xb0, 0xfe, 0xe6, 0x64])
        .unwrap();
    code[at..at + 4].copy_from_slice(&[0xeb, 0xfe, 0x90, 0x90]);
    code
}

fn kernel(name: &str, code: &[u8]) -> String {
    temp_file(name, &tiny_elf(code))
        .to_string_lossy()
        .into_owned()
}

fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    path
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn console_to_a_file_and_the_log_to_another() {
    if !kvm_available("console_to_a_file_and_the_log_to_another") {
        return;
    }
    let kernel = kernel("hello-file.elf", &hello_then_reset(b"hello file console\n"));
    let console = temp_path("console.txt");
    let log = temp_path("vmm.log");
    let mut guest = Guest::spawn(&[
        "--kernel",
        &kernel,
        "--serial",
        &format!("file={}", console.display()),
        "--log-file",
        log.to_str().unwrap(),
        "--log-level",
        "info",
    ]);
    let status = guest.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{}", guest.transcript());
    let text = std::fs::read_to_string(&console).unwrap();
    assert_eq!(text, "hello file console\n");
    assert!(
        guest.console().is_empty(),
        "nothing on stdout: {:?}",
        guest.console()
    );
    let log_text = std::fs::read_to_string(&log).unwrap();
    // The start-up line says what was built.
    let startup = log_text
        .lines()
        .find(|l| l.contains("VM built in"))
        .unwrap_or_else(|| panic!("no start-up line in {log_text}"));
    for part in [
        "kernel ",
        "64-bit Linux",
        "1 vCPU",
        "512 MiB",
        "COM1 8250 at port 0x3f8 IRQ 4",
        "console: file",
        "i8042 at port 0x60 IRQ 1",
    ] {
        assert!(startup.contains(part), "{part:?} missing from {startup:?}");
    }
    assert!(log_text.contains("stopping the VM"), "{log_text}");
}

#[test]
fn console_off_prints_nothing_and_the_guest_still_runs() {
    if !kvm_available("console_off_prints_nothing_and_the_guest_still_runs") {
        return;
    }
    let kernel = kernel(
        "hello-off.elf",
        &hello_then_reset(b"you should not see this\n"),
    );
    let mut guest = Guest::spawn(&["--kernel", &kernel, "--serial", "off"]);
    let status = guest.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{}", guest.transcript());
    assert_eq!(guest.console(), "");
}

/// Reads from `stream` until `needle` arrives.
fn read_until(stream: &mut UnixStream, needle: &str, timeout: Duration) -> String {
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains(needle) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {needle:?}; got {:?}",
            String::from_utf8_lossy(&got)
        );
        match stream.read(&mut buf) {
            Ok(0) => panic!(
                "the console socket closed; got {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// 64-bit code that echoes every byte COM1 receives, until it receives `q`, then resets.
fn serial_echo_until_q() -> Vec<u8> {
    vec![
        0x66, 0xba, 0xfd, 0x03, // wait: mov dx, 0x3fd (line status)
        0xec, // in al, dx
        0xa8, 0x01, // test al, 1 (data ready)
        0x74, 0xfb, // jz wait (back to `in`)
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xec, // in al, dx
        0xee, // out dx, al
        0x3c, b'q', // cmp al, 'q'
        0x75, 0xed, // jne wait
        0xb0, 0xfe, // mov al, 0xfe
        0xe6, 0x64, // out 0x64, al
        0xf4, 0xeb, 0xfd, // hlt; jmp hlt
    ]
}

#[test]
fn console_on_a_socket_takes_clients_one_after_another() {
    if !kvm_available("console_on_a_socket_takes_clients_one_after_another") {
        return;
    }
    let kernel = kernel("echo-socket.elf", &serial_echo_until_q());
    let socket = temp_path("console.sock");
    let mut guest = Guest::spawn(&[
        "--kernel",
        &kernel,
        "--serial",
        &format!("socket={}", socket.display()),
    ]);
    wait_until("the console socket", Duration::from_secs(60), || {
        socket.exists()
    });
    // A first client types and sees the guest's echo, then leaves.
    let mut first = UnixStream::connect(&socket).unwrap();
    first.write_all(b"abc").unwrap();
    assert!(read_until(&mut first, "abc", Duration::from_secs(60)).contains("abc"));
    drop(first);
    // A second client connects later and is heard as well.
    let mut second = UnixStream::connect(&socket).unwrap();
    let mut echoed = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    // Until the VMM has noticed the first client left, the second waits in the backlog: retry.
    while !echoed.contains("xyz") {
        assert!(
            Instant::now() < deadline,
            "the second client was never served"
        );
        second.write_all(b"xyz").unwrap();
        second
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut buf = [0u8; 256];
        if let Ok(n) = second.read(&mut buf) {
            echoed.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    second.write_all(b"q").unwrap();
    let status = guest.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{}", guest.transcript());
    assert!(!socket.exists(), "the socket is removed at exit");
    assert!(guest.console().is_empty(), "{:?}", guest.console());
}

#[test]
fn append_adds_to_the_default_command_line_and_cmdline_replaces_it() {
    if !kvm_available("append_adds_to_the_default_command_line_and_cmdline_replaces_it") {
        return;
    }
    let kernel = kernel("print-cmdline.elf", &print_cmdline_then_reset());
    let mut guest = Guest::spawn(&["--kernel", &kernel, "--append", "vmm.test=appended"]);
    let line = guest.wait_for("\n", Duration::from_secs(60));
    assert!(
        line.starts_with("console=ttyS0 reboot=k panic=1") && line.contains(" vmm.test=appended"),
        "{line:?}"
    );
    assert_eq!(guest.wait_exit(Duration::from_secs(30)).code(), Some(0));

    let mut guest = Guest::spawn(&[
        "--kernel",
        &kernel,
        "--cmdline",
        "only=this",
        "--append",
        "and=that",
    ]);
    let line = guest.wait_for("\n", Duration::from_secs(60));
    assert!(line.starts_with("only=this and=that"), "{line:?}");
    assert!(!line.contains("console=ttyS0"), "{line:?}");
    assert_eq!(guest.wait_exit(Duration::from_secs(30)).code(), Some(0));
}

#[test]
fn metrics_lines_are_json_and_their_counters_grow() {
    if !kvm_available("metrics_lines_are_json_and_their_counters_grow") {
        return;
    }
    // Enough port writes from ring 3 to keep the guest busy for a few seconds.
    let kernel = kernel(
        "metrics.elf",
        &ring3_port_loop(200_000, 0x510, b"metrics guest done\n"),
    );
    let metrics = temp_path("metrics.jsonl");
    let mut guest = Guest::spawn(&[
        "--kernel",
        &kernel,
        "--metrics-file",
        metrics.to_str().unwrap(),
        "--metrics-interval",
        "1",
    ]);
    guest.wait_for("metrics guest done", Duration::from_secs(300));
    assert_eq!(guest.wait_exit(Duration::from_secs(60)).code(), Some(0));
    let text = std::fs::read_to_string(&metrics).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        lines.len() >= 2,
        "expected periodic lines and a last one: {text}"
    );
    let io_out = |v: &serde_json::Value| v["vcpus"][0]["exits"]["io_out"].as_u64().unwrap();
    let uptime = |v: &serde_json::Value| v["uptime_ms"].as_u64().unwrap();
    for pair in lines.windows(2) {
        assert!(io_out(&pair[0]) <= io_out(&pair[1]), "{text}");
        assert!(uptime(&pair[0]) <= uptime(&pair[1]), "{text}");
    }
    let last = lines.last().unwrap();
    assert!(io_out(last) >= 200_000, "{last}");
    assert!(
        io_out(last) > io_out(&lines[0]),
        "the counters grew: {text}"
    );
    assert_eq!(
        last["devices"]["serial"]["bytes_out"].as_u64(),
        Some("metrics guest done\n".len() as u64)
    );
    assert_eq!(last["vcpus"][0]["running"], serde_json::Value::Bool(false));
}

#[test]
fn virtio_devices_have_counters_in_the_metrics() {
    if !kvm_available("virtio_devices_have_counters_in_the_metrics") {
        return;
    }
    let kernel = kernel("metrics-rng.elf", &hello_then_reset(b"bye\n"));
    let metrics = temp_path("metrics-rng.jsonl");
    let mut guest = Guest::spawn(&[
        "--kernel",
        &kernel,
        "--rng",
        "--metrics-file",
        metrics.to_str().unwrap(),
    ]);
    assert_eq!(guest.wait_exit(Duration::from_secs(60)).code(), Some(0));
    let text = std::fs::read_to_string(&metrics).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let rng = &last["devices"]["virtio-rng0"];
    for counter in ["requests", "bytes", "errors", "interrupts"] {
        assert_eq!(rng[counter].as_u64(), Some(0), "{counter} in {last}");
    }
}

/// Runs the VMM with stderr on a pseudo-terminal (stdin and stdout on pipes) and returns what
/// the terminal showed and the exit status.
fn run_with_stderr_on_a_pty(args: &[&str]) -> (String, Option<i32>) {
    run_with_stderr_on_a_pty_for(args, None)
}

/// [`run_with_stderr_on_a_pty`], killing the VMM after `limit` if it is given.
fn run_with_stderr_on_a_pty_for(args: &[&str], limit: Option<Duration>) -> (String, Option<i32>) {
    let mut master = 0;
    let mut slave = 0;
    // SAFETY: openpty fills two descriptors; the name, termios and winsize pointers may be null.
    let ret = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(ret, 0, "openpty");
    use std::os::fd::FromRawFd;
    // SAFETY: fresh descriptors owned by nobody else.
    let (mut master, slave) = unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    };
    let mut child = Command::new(vmm_binary())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(slave))
        .spawn()
        .unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once the child (the last holder of the slave) has exited.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&all).into_owned()
    });
    if let Some(limit) = limit {
        std::thread::sleep(limit);
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    (reader.join().unwrap(), status.code())
}

/// A guest silent for several seconds (ring-3 port writes), then one line.
fn quiet_guest() -> String {
    kernel(
        "quiet.elf",
        &ring3_port_loop(150_000, 0x510, b"quiet guest spoke\n"),
    )
}

#[test]
fn the_status_line_shows_on_a_terminal_while_the_guest_is_quiet() {
    if !kvm_available("the_status_line_shows_on_a_terminal_while_the_guest_is_quiet") {
        return;
    }
    let kernel = quiet_guest();
    let start = Instant::now();
    let (terminal, status) = run_with_stderr_on_a_pty(&["--kernel", &kernel]);
    assert_eq!(status, Some(0), "{terminal}");
    if start.elapsed() < Duration::from_secs(5) {
        // A host with VMX/SVM runs the loop too fast for the line to appear.
        eprintln!("the guest was not quiet long enough to see the status line");
        return;
    }
    assert!(
        terminal.contains("exits/s") && terminal.contains("vCPUs running 1/1"),
        "{terminal:?}"
    );
    // Updated in place and erased at the end: no newline in or after it.
    let last = terminal.rfind("exits/s").unwrap();
    assert!(terminal[last..].contains("\r\x1b[K"), "{terminal:?}");
    assert!(!terminal[last..].contains('\n'), "{terminal:?}");
}

/// A guest that writes a shell's prompt and waits for input leaves its line unfinished: the
/// status line, which rewrites the current line, must stay away, however long the guest is
/// silent. After a finished line the same silence shows it (six seconds each: the line comes
/// after three).
#[test]
fn no_status_line_over_a_line_the_guest_left_unfinished() {
    if !kvm_available("no_status_line_over_a_line_the_guest_left_unfinished") {
        return;
    }
    let silence = Some(Duration::from_secs(6));
    let prompt = kernel("prompt.elf", &hello_then_spin(b"~ # "));
    let (terminal, _) = run_with_stderr_on_a_pty_for(&["--kernel", &prompt], silence);
    assert!(!terminal.contains("exits/s"), "{terminal:?}");
    let line = kernel("line.elf", &hello_then_spin(b"a whole line\n"));
    let (terminal, _) = run_with_stderr_on_a_pty_for(&["--kernel", &line], silence);
    assert!(
        terminal.contains("exits/s") && terminal.contains("vCPUs running 1/1"),
        "{terminal:?}"
    );
}

#[test]
fn no_status_line_when_stderr_is_a_pipe() {
    if !kvm_available("no_status_line_when_stderr_is_a_pipe") {
        return;
    }
    let kernel = quiet_guest();
    let mut guest = Guest::spawn(&["--kernel", &kernel]);
    guest.wait_for("quiet guest spoke", Duration::from_secs(300));
    assert_eq!(guest.wait_exit(Duration::from_secs(30)).code(), Some(0));
    assert!(!guest.vmm_log().contains("exits/s"), "{}", guest.vmm_log());
    assert!(!guest.console().contains("exits/s"), "{}", guest.console());
}

// The exit-status contract (README, `vmm --help`).

#[test]
fn exit_status_0_when_the_guest_resets() {
    if !kvm_available("exit_status_0_when_the_guest_resets") {
        return;
    }
    let kernel = kernel("reset.elf", &hello_then_reset(b"resetting\n"));
    let mut guest = Guest::spawn(&["--kernel", &kernel]);
    assert_eq!(guest.wait_exit(Duration::from_secs(60)).code(), Some(0));
    // Through PVH, past a write to QEMU's debug-exit port.
    let pvh = temp_file("pvh-exit.elf", &pvh_elf(&pvh_hello_then_exit(b"pvh bye\n")));
    let mut guest = Guest::spawn(&["--kernel", pvh.to_str().unwrap()]);
    assert_eq!(guest.wait_exit(Duration::from_secs(60)).code(), Some(0));
    assert_eq!(guest.console(), "pvh bye\n");
}

#[test]
fn exit_status_1_when_the_vm_cannot_go_on() {
    if !kvm_available("exit_status_1_when_the_vm_cannot_go_on") {
        return;
    }
    // Ring 0 jumps into MMIO that nothing backs: no instruction to fetch, the VM stops.
    let kernel = kernel(
        "jump-to-mmio.elf",
        &[0xb8, 0x00, 0x00, 0x00, 0xd0, 0xff, 0xe0], // mov eax, 0xd0000000; jmp rax
    );
    let mut guest = Guest::spawn(&["--kernel", &kernel]);
    let status = guest.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{}", guest.transcript());
    let errors: Vec<String> = guest
        .vmm_log()
        .lines()
        .filter(|l| l.starts_with("vmm: "))
        .map(str::to_string)
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("0xd0000000"), "{errors:?}");
}

#[test]
fn exit_status_128_plus_the_signal() {
    if !kvm_available("exit_status_128_plus_the_signal") {
        return;
    }
    let kernel = kernel("spin.elf", &hello_then_spin(b"spinning\n"));
    for (signal, status) in [
        (libc::SIGTERM, 143),
        (libc::SIGINT, 130),
        (libc::SIGHUP, 129),
        (libc::SIGQUIT, 131),
    ] {
        // Without ACPI no power button is pressed: the signal stops the guest at once.
        let mut guest = Guest::spawn(&["--kernel", &kernel, "--acpi", "off"]);
        guest.wait_for("spinning", Duration::from_secs(60));
        guest.signal(signal);
        let got = guest.wait_exit(Duration::from_secs(10));
        assert_eq!(
            got.code(),
            Some(status),
            "signal {signal}{}",
            guest.transcript()
        );
        let log = guest.vmm_log();
        assert_eq!(
            log.lines().filter(|l| l.starts_with("vmm: ")).count(),
            1,
            "one line says why: {log}"
        );
    }
}

#[test]
fn exit_status_0_for_a_guest_that_halts_with_interrupts_off() {
    if !kvm_available("exit_status_0_for_a_guest_that_halts_with_interrupts_off") {
        return;
    }
    let mut code = hello_then_reset(b"halting for good\n");
    // `cli; hlt` instead of the reset.
    let at = code
        .windows(4)
        .position(|w| w == [0xb0, 0xfe, 0xe6, 0x64])
        .unwrap();
    code[at..at + 4].copy_from_slice(&[0xfa, 0xf4, 0x90, 0x90]);
    let kernel = kernel("cli-hlt.elf", &code);
    let mut guest = Guest::spawn(&["--kernel", &kernel]);
    guest.wait_for("halting for good", Duration::from_secs(60));
    let status = guest.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", guest.transcript());
    assert!(
        guest.vmm_log().contains("halted with interrupts disabled"),
        "{}",
        guest.transcript()
    );
}

/// A pseudo-terminal pair: (master, slave).
fn open_pty() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty fills two descriptors; the name, termios and winsize pointers may be null.
    let ret = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(ret, 0, "openpty");
    // SAFETY: fresh descriptors owned by nobody else.
    unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    }
}

fn local_flags(terminal: &std::fs::File) -> libc::tcflag_t {
    use std::os::fd::AsRawFd;
    // SAFETY: termios is plain data that tcgetattr fills; the result is checked.
    let mut tio: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a valid pointer.
    assert_eq!(
        unsafe { libc::tcgetattr(terminal.as_raw_fd(), &mut tio) },
        0
    );
    tio.c_lflag
}

/// The VMM with its console on a terminal (stdin and stdout on a pty) leaves the terminal as it
/// found it whichever way it ends: the guest's reset, a signal, SIGQUIT, a failed VM.
#[test]
fn the_terminal_is_restored_on_every_exit_path() {
    if !kvm_available("the_terminal_is_restored_on_every_exit_path") {
        return;
    }
    let reset = kernel("tty-reset.elf", &hello_then_reset(b"tty bye\n"));
    let spin = kernel("tty-spin.elf", &hello_then_spin(b"tty spinning\n"));
    let fail = kernel("tty-fail.elf", &[0xb8, 0x00, 0x00, 0x00, 0xd0, 0xff, 0xe0]);
    for (kernel, signal, expected) in [
        (&reset, None, 0),
        (&fail, None, 1),
        (&spin, Some(libc::SIGTERM), 143),
        (&spin, Some(libc::SIGQUIT), 131),
    ] {
        let (mut master, slave) = open_pty();
        let before = local_flags(&slave);
        assert_ne!(before & libc::ICANON, 0, "a fresh pty is canonical");
        let mut child = Command::new(vmm_binary())
            .args(["--kernel", kernel, "--acpi", "off"])
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait for the guest's first words, which also means the terminal is raw by now.
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains("tty ") && signal.is_some() {
            let n = master.read(&mut buf).unwrap();
            seen.extend_from_slice(&buf[..n]);
        }
        if let Some(signal) = signal {
            assert_eq!(local_flags(&slave) & libc::ICANON, 0, "raw while running");
            // SAFETY: signals our own child.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(expected), "{kernel} {signal:?}");
        assert_eq!(
            local_flags(&slave),
            before,
            "{kernel} {signal:?}: the terminal was left changed"
        );
    }
}

#[test]
fn console_on_a_pty_named_on_stderr() {
    if !kvm_available("console_on_a_pty_named_on_stderr") {
        return;
    }
    let kernel = kernel("echo-pty.elf", &serial_echo_until_q());
    let mut guest = Guest::spawn(&["--kernel", &kernel, "--serial", "pty"]);
    guest.wait_for_log(
        "the guest's console is on /dev/pts/",
        Duration::from_secs(60),
    );
    let log = guest.vmm_log();
    let path = log
        .lines()
        .find_map(|l| l.strip_prefix("vmm: the guest's console is on "))
        .unwrap()
        .trim()
        .to_string();
    let mut pty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    pty.write_all(b"hi").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while !String::from_utf8_lossy(&got).contains("hi") {
        let n = pty.read(&mut buf).unwrap();
        got.extend_from_slice(&buf[..n]);
    }
    pty.write_all(b"q").unwrap();
    assert_eq!(guest.wait_exit(Duration::from_secs(60)).code(), Some(0));
    assert!(guest.console().is_empty());
}
