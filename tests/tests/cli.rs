//! Bad input from the user: one clear line on stderr, exit status 2, the user's files untouched.
//! The "kernel" is a tiny hand-made ELF, so no guest kit is needed.

use integration_tests::netns::NetNs;
use integration_tests::{
    hello_then_reset, kvm_available, run_vmm, temp_file, tiny_elf, vmm_binary,
};

/// Runs `vmm` with `args` and checks the error contract: status 2, exactly one stderr line that
/// contains `expected`, no panic or backtrace.
fn expect_user_error(args: &[&str], expected: &str) {
    let (status, _stdout, stderr) = run_vmm(args);
    check_user_error(args, status, &stderr, expected);
}

/// [`expect_user_error`] with the VMM in network namespace `netns`.
fn expect_user_error_in(netns: &NetNs, args: &[&str], expected: &str) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns.name()])
        .arg(vmm_binary())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("ip netns exec vmm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    check_user_error(args, out.status, &stderr, expected);
}

fn check_user_error(args: &[&str], status: std::process::ExitStatus, stderr: &str, expected: &str) {
    assert_eq!(
        status.code(),
        Some(2),
        "args {args:?}: status {status}, stderr {stderr:?}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "args {args:?}: expected one stderr line, got {stderr:?}"
    );
    assert!(
        lines[0].starts_with("vmm: ") && lines[0].contains(expected),
        "args {args:?}: {:?} does not name the problem ({expected:?})",
        lines[0]
    );
    assert!(!stderr.contains("panicked"), "args {args:?}: {stderr}");
}

/// A fresh copy per call: tests run in parallel, and one rewriting a file another is reading
/// would make it look like no kernel at all.
fn tiny_kernel() -> String {
    static COPIES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COPIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    temp_file(
        &format!("tiny-kernel-{n}.elf"),
        &tiny_elf(&hello_then_reset(b"x")),
    )
    .to_string_lossy()
    .into_owned()
}

#[test]
fn missing_kernel_is_named() {
    expect_user_error(
        &["--kernel", "/nonexistent/vmlinuz"],
        "/nonexistent/vmlinuz",
    );
}

#[test]
fn a_file_that_is_not_a_kernel_is_refused() {
    let text = temp_file(
        "not-a-kernel.txt",
        b"hello, I am a text file\n".repeat(100).as_slice(),
    );
    let before = std::fs::read(&text).unwrap();
    expect_user_error(&["--kernel", text.to_str().unwrap()], "kernel");
    assert_eq!(
        std::fs::read(&text).unwrap(),
        before,
        "the user's file changed"
    );
}

#[test]
fn unknown_options_are_refused() {
    expect_user_error(&["--kernel", "k", "--frobnicate"], "--frobnicate");
}

#[test]
fn missing_kernel_option_is_refused() {
    expect_user_error(&["--cpus", "2"], "--kernel");
}

#[test]
fn absurd_cpu_counts_are_refused() {
    let kernel = tiny_kernel();
    expect_user_error(&["--kernel", &kernel, "--cpus", "0"], "--cpus");
    expect_user_error(&["--kernel", &kernel, "--cpus", "100000"], "--cpus");
    expect_user_error(&["--kernel", &kernel, "--cpus", "many"], "many");
}

#[test]
fn absurd_memory_sizes_are_refused() {
    let kernel = tiny_kernel();
    expect_user_error(&["--kernel", &kernel, "--memory", "1M"], "too small");
    expect_user_error(
        &["--kernel", &kernel, "--memory", "100000G"],
        "more than this host has",
    );
    expect_user_error(&["--kernel", &kernel, "--memory", "12X"], "12X");
}

#[test]
fn missing_initramfs_is_named() {
    let kernel = tiny_kernel();
    expect_user_error(
        &[
            "--kernel",
            &kernel,
            "--initramfs",
            "/nonexistent/initrd.img",
        ],
        "/nonexistent/initrd.img",
    );
}

#[test]
fn an_initramfs_that_does_not_fit_is_refused() {
    if !kvm_available("an_initramfs_that_does_not_fit_is_refused") {
        return;
    }
    let kernel = tiny_kernel();
    let big = temp_file("big-initramfs.cpio", &vec![0u8; 80 << 20]);
    expect_user_error(
        &[
            "--kernel",
            &kernel,
            "--initramfs",
            big.to_str().unwrap(),
            "--memory",
            "64M",
        ],
        "initramfs",
    );
}

/// Disk images the VMM must refuse, each named in its error line and left as it was.
#[test]
fn bad_disks_are_refused_and_left_untouched() {
    if !kvm_available("bad_disks_are_refused_and_left_untouched") {
        return;
    }
    let kernel = tiny_kernel();
    expect_user_error(
        &["--kernel", &kernel, "--disk", "path=/nonexistent/disk.img"],
        "/nonexistent/disk.img",
    );
    let dir = std::env::temp_dir();
    expect_user_error(
        &[
            "--kernel",
            &kernel,
            "--disk",
            &format!("path={}", dir.display()),
        ],
        "is a directory",
    );
    expect_user_error(
        &[
            "--kernel",
            &kernel,
            "--disk",
            "path=disk.img,readonly=maybe",
        ],
        "readonly=maybe",
    );
    let odd = temp_file("odd-size.img", &[0x5a; 1000]);
    let odd_arg = format!("path={}", odd.display());
    expect_user_error(
        &["--kernel", &kernel, "--disk", &odd_arg],
        "not a multiple of 512",
    );
    assert_eq!(
        std::fs::read(&odd).unwrap(),
        [0x5a; 1000],
        "odd-size.img changed"
    );
    let disk = temp_file("twice.img", &[0xa5; 4096]);
    let disk_arg = format!("path={}", disk.display());
    expect_user_error(
        &[
            "--kernel", &kernel, "--disk", &disk_arg, "--disk", &disk_arg,
        ],
        "given twice",
    );
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        [0xa5; 4096],
        "twice.img changed"
    );
}

/// Taps the VMM must refuse: one that does not exist, an interface that is not a tap, a
/// malformed MAC address, queue pairs out of range, and more than one queue pair on a tap made
/// with one queue.
#[test]
fn bad_taps_are_refused() {
    if !kvm_available("bad_taps_are_refused") {
        return;
    }
    let kernel = tiny_kernel();
    expect_user_error(
        &["--kernel", &kernel, "--net", "tap=notap-xyz0"],
        "no network interface named \"notap-xyz0\"",
    );
    expect_user_error(
        &["--kernel", &kernel, "--net", "tap=lo"],
        "cannot attach to tap \"lo\"",
    );
    expect_user_error(
        &["--kernel", &kernel, "--net", "tap=vmmtap0,mac=zz:11"],
        "zz:11",
    );
    expect_user_error(
        &["--kernel", &kernel, "--net", "tap=vmmtap0,queues=17"],
        "1 to 16 queue pairs",
    );
    let id = std::process::id() % 100_000;
    let netns = NetNs::new(
        &format!("vmm-cli-{id}"),
        "vmmcli0",
        std::net::Ipv4Addr::new(192, 0, 2, 1),
    );
    expect_user_error_in(
        &netns,
        &["--kernel", &kernel, "--net", "tap=vmmcli0,queues=2"],
        "tap \"vmmcli0\" has one queue; for more, create it with \
         `ip tuntap add dev vmmcli0 mode tap multi_queue`",
    );
}

#[test]
fn help_documents_every_option_with_an_example() {
    let (status, stdout, _) = run_vmm(&["--help"]);
    assert!(status.success());
    for option in [
        "--kernel",
        "--initramfs",
        "--cmdline",
        "--cpus",
        "--memory",
        "--cpu-features",
        "--kernel-decompress",
        "--boot-protocol",
        "--disk",
        "--net",
        "--rng",
        "--transport",
        "--log-level",
        "--append",
        "--serial",
        "--log-file",
        "--metrics-file",
        "--metrics-interval",
    ] {
        assert!(
            stdout.contains(option),
            "--help does not mention {option}:\n{stdout}"
        );
    }
    assert!(stdout.contains("Examples:"), "{stdout}");
    // The default command line and the exit statuses are spelled out.
    assert!(
        stdout.contains("Default kernel command line") && stdout.contains("console=ttyS0"),
        "{stdout}"
    );
    for row in ["Exit status:", "  0 ", "  1 ", "  2 ", "  128+N "] {
        assert!(stdout.contains(row), "--help lacks {row:?}:\n{stdout}");
    }
}

#[test]
fn unknown_log_levels_are_refused() {
    expect_user_error(&["--kernel", "k", "--log-level", "verbose"], "verbose");
}

#[test]
fn bad_serial_log_and_metrics_destinations_are_refused() {
    let kernel = tiny_kernel();
    expect_user_error(&["--kernel", &kernel, "--serial", "tcp=1.2.3.4"], "tcp");
    expect_user_error(&["--kernel", &kernel, "--serial", "file="], "file=");
    let dir = std::env::temp_dir();
    let dir = dir.to_str().unwrap();
    expect_user_error(
        &["--kernel", &kernel, "--serial", &format!("file={dir}")],
        dir,
    );
    // A console socket never replaces the user's file.
    let precious = temp_file("precious.txt", b"keep me");
    expect_user_error(
        &[
            "--kernel",
            &kernel,
            "--serial",
            &format!("socket={}", precious.display()),
        ],
        "not a socket",
    );
    assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");
    expect_user_error(&["--kernel", &kernel, "--log-file", dir], "log file");
    expect_user_error(
        &["--kernel", &kernel, "--metrics-file", dir],
        "metrics file",
    );
    expect_user_error(
        &["--kernel", &kernel, "--metrics-interval", "0"],
        "at least 1 second",
    );
}

/// Makes a FIFO at a fresh path.
fn fifo(name: &str) -> String {
    let path = temp_file(name, b"");
    std::fs::remove_file(&path).unwrap();
    let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    path.to_string_lossy().into_owned()
}

/// Runs `expect_user_error` on a thread and fails if the VMM takes more than a few seconds (a
/// FIFO opened for reading blocks until a writer comes).
fn expect_user_error_soon(args: Vec<String>, expected: &'static str) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        expect_user_error(&args, expected);
        let _ = tx.send(());
    });
    rx.recv_timeout(std::time::Duration::from_secs(20))
        .expect("the vmm blocked on a file that is not a regular file");
}

#[test]
fn kernels_and_initramfs_must_be_regular_files() {
    let dir = std::env::temp_dir().to_string_lossy().into_owned();
    expect_user_error(&["--kernel", &dir], "is a directory, not a regular file");
    expect_user_error(&["--kernel", "/dev/null"], "is a character device");
    let pipe = fifo("kernel.fifo");
    expect_user_error_soon(vec!["--kernel".into(), pipe], "is a FIFO");
    let socket_path = temp_file("kernel.sock", b"");
    std::fs::remove_file(&socket_path).unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(&socket_path).unwrap();
    expect_user_error(&["--kernel", socket_path.to_str().unwrap()], "is a socket");
    let kernel = tiny_kernel();
    expect_user_error(&["--kernel", &kernel, "--initramfs", &dir], "initramfs");
    let pipe = fifo("initramfs.fifo");
    expect_user_error_soon(
        vec!["--kernel".into(), kernel, "--initramfs".into(), pipe],
        "is a FIFO",
    );
}

#[test]
fn disks_must_be_regular_files_or_block_devices() {
    if !kvm_available("disks_must_be_regular_files_or_block_devices") {
        return;
    }
    let kernel = tiny_kernel();
    let dir = std::env::temp_dir().to_string_lossy().into_owned();
    for (path, kind) in [
        (dir, "a directory"),
        ("/dev/null".to_string(), "a character device"),
        (fifo("disk.fifo"), "a FIFO"),
    ] {
        expect_user_error_soon(
            vec![
                "--kernel".into(),
                kernel.clone(),
                "--disk".into(),
                format!("path={path},readonly=on"),
            ],
            kind,
        );
    }
}
