//! What contains the VMM if a guest gets in (issue 14): every thread of a running VMM under its
//! seccomp filter, the control API's threads included, guest RAM out of core dumps, and disk
//! images locked against a second VMM. Tiny hand-made guests; the Linux-guest side (a flush that
//! survives SIGKILL) is in `linux_containment.rs`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use integration_tests::{hello_then_reset, kvm_available, run_vmm, temp_file, tiny_elf, Guest};

/// 64-bit code: prints `message` on COM1, then halts with interrupts on, forever (nothing
/// interrupts it: no timer is programmed), so the VMM keeps running with every thread idle.
fn hello_then_idle(message: &[u8]) -> Vec<u8> {
    let mut code = vec![
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0x48, 0x8d, 0x35, 0x0d, 0x00, 0x00, 0x00, // lea rsi, [rip + 13] (the message)
        0xb9, // mov ecx, imm32
    ];
    code.extend_from_slice(&(message.len() as u32).to_le_bytes());
    code.extend_from_slice(&[
        0xac, // lodsb
        0xee, // out dx, al
        0xe2, 0xfc, // loop back to lodsb
        0xfb, // sti
        0xf4, // hlt
        0xeb, 0xfd, // jmp back to hlt
    ]);
    assert_eq!(code.len(), 24);
    code.extend_from_slice(message);
    code
}

/// The name (`comm`) and `Seccomp:` mode of every thread of process `pid`.
fn thread_seccomp(pid: u32) -> Vec<(String, String)> {
    let mut threads = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return threads;
    };
    for task in tasks.flatten() {
        let (Ok(name), Ok(status)) = (
            std::fs::read_to_string(task.path().join("comm")),
            std::fs::read_to_string(task.path().join("status")),
        ) else {
            continue;
        };
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .map(|v| v.trim().to_string())
            .unwrap_or_default();
        threads.push((name.trim_end().to_string(), mode));
    }
    threads.sort();
    threads
}

/// The threads of `pid` named `name`, with their `Seccomp:` mode.
fn named<'a>(threads: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    threads
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, mode)| mode.as_str())
        .collect()
}

/// Whether some mapping of `pid` at least `len` bytes long has the `dd` (MADV_DONTDUMP) flag.
fn has_dontdump_mapping(pid: u32, len: u64) -> bool {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut size = 0u64;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((start, end)) = range.split_once('-') {
                if let (Ok(start), Ok(end)) =
                    (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
                {
                    size = end - start;
                    continue;
                }
            }
        }
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if size >= len && flags.split_whitespace().any(|f| f == "dd") {
                return true;
            }
        }
    }
    false
}

#[test]
fn every_thread_runs_under_its_seccomp_filter_and_guest_ram_is_not_dumped() {
    if !kvm_available("every_thread_runs_under_its_seccomp_filter_and_guest_ram_is_not_dumped") {
        return;
    }
    let kernel = temp_file("seccomp-idle.elf", &tiny_elf(&hello_then_idle(b"idle\n")));
    let mut guest = Guest::spawn(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--cpus",
        "2",
        "--memory",
        "64M",
        "--rng",
        "--shutdown-timeout",
        "1",
    ]);
    guest.wait_for("idle", Duration::from_secs(60));
    let pid = guest.pid();
    // The device worker confines itself when it starts, which the guest does not wait for.
    let deadline = Instant::now() + Duration::from_secs(10);
    let threads = loop {
        let threads = thread_seccomp(pid);
        if threads.iter().all(|(_, mode)| mode == "2") || Instant::now() > deadline {
            break threads;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let names: Vec<&str> = threads.iter().map(|(name, _)| name.as_str()).collect();
    for expected in ["vcpu0", "vcpu1", "virtio-rng0", "vmm"] {
        assert!(
            names.contains(&expected),
            "no {expected} thread: {threads:?}"
        );
    }
    for (name, mode) in &threads {
        assert_eq!(
            mode, "2",
            "thread {name} runs without its filter: {threads:?}"
        );
    }
    assert!(
        has_dontdump_mapping(pid, 64 << 20),
        "no 64 MiB mapping of guest RAM is marked dd (MADV_DONTDUMP)"
    );
    // And the filters let the VM stop the usual way (the power button, a timeout, the stop).
    guest.signal(libc::SIGTERM);
    let status = guest.wait_exit(Duration::from_secs(60));
    assert!(status.code().is_some(), "{status}{}", guest.transcript());
    assert!(
        !guest.vmm_log().contains("seccomp filter"),
        "{}",
        guest.transcript()
    );
}

/// One request on a kept-alive API connection: the answer's status code and body.
fn request(stream: &mut UnixStream, method: &str, path: &str, body: &str) -> (u16, String) {
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&answer).into_owned();
        if let Some((head, rest)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .map_or(0, |n| n.trim().parse::<usize>().unwrap());
            if rest.len() >= length {
                let status = head.split(' ').nth(1).unwrap().parse().unwrap();
                return (status, rest.to_string());
            }
        }
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "the API closed the connection: {text:?}");
        answer.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn the_api_threads_run_under_their_seccomp_filters() {
    if !kvm_available("the_api_threads_run_under_their_seccomp_filters") {
        return;
    }
    let kernel = temp_file("seccomp-api.elf", &tiny_elf(&hello_then_idle(b"idle\n")));
    let sock = temp_file("seccomp-api.sock", b"");
    std::fs::remove_file(&sock).unwrap();
    let mut guest = Guest::spawn(&[
        "--api-sock".as_ref(),
        sock.as_os_str(),
        "--shutdown-timeout".as_ref(),
        "1".as_ref(),
    ]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut client = loop {
        match UnixStream::connect(&sock) {
            Ok(stream) => break stream,
            Err(e) => assert!(Instant::now() < deadline, "no API socket: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    client
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let pid = guest.pid();

    // Before the start, with no VM yet: the accept thread, and the thread of this connection
    // once it answered, each under its filter.
    assert_eq!(request(&mut client, "GET", "/", "").0, 200);
    let threads = thread_seccomp(pid);
    assert_eq!(named(&threads, "api"), ["2"], "{threads:?}");
    assert_eq!(named(&threads, "api-conn"), ["2"], "{threads:?}");

    // The VM configured and started on the same connection (the pre-boot checks of the kernel
    // file run on the main thread, which the API threads' filters do not let them do).
    for (path, body) in [
        (
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 64}"#.to_string(),
        ),
        (
            "/boot-source",
            format!(r#"{{"kernel_image_path": "{}"}}"#, kernel.display()),
        ),
        ("/entropy", "{}".to_string()),
        (
            "/actions",
            r#"{"action_type": "InstanceStart"}"#.to_string(),
        ),
    ] {
        let (status, answer) = request(&mut client, "PUT", path, &body);
        assert_eq!(status, 204, "PUT {path}: {answer}{}", guest.transcript());
    }
    guest.wait_for("idle", Duration::from_secs(60));

    // Every thread filtered, the API's among them (the device worker confines itself when it
    // starts, which the guest does not wait for). A request each round keeps this connection
    // and its thread alive.
    let deadline = Instant::now() + Duration::from_secs(10);
    let threads = loop {
        assert_eq!(request(&mut client, "GET", "/", "").0, 200);
        let threads = thread_seccomp(pid);
        if threads.iter().all(|(_, mode)| mode == "2") || Instant::now() > deadline {
            break threads;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for expected in ["vcpu0", "vcpu1", "virtio-rng0", "vmm", "api", "api-conn"] {
        assert!(
            !named(&threads, expected).is_empty(),
            "no {expected} thread: {threads:?}"
        );
    }
    for (name, mode) in &threads {
        assert_eq!(
            mode, "2",
            "thread {name} runs without its filter: {threads:?}"
        );
    }
    // The running VM's requests pass the filters: pause, resume, the power button.
    for (method, path, body) in [
        ("PATCH", "/vm", r#"{"state": "Paused"}"#),
        ("PATCH", "/vm", r#"{"state": "Resumed"}"#),
        ("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#),
    ] {
        let (status, answer) = request(&mut client, method, path, body);
        assert_eq!(
            status,
            204,
            "{method} {path}: {answer}{}",
            guest.transcript()
        );
    }
    guest.signal(libc::SIGTERM);
    let status = guest.wait_exit(Duration::from_secs(60));
    assert_eq!(
        status.code(),
        Some(128 + 15),
        "{status}{}",
        guest.transcript()
    );
    assert!(
        !guest.vmm_log().contains("seccomp filter"),
        "{}",
        guest.transcript()
    );
    assert!(!sock.exists(), "the API socket outlived the VMM");
}

#[test]
fn seccomp_off_says_so() {
    if !kvm_available("seccomp_off_says_so") {
        return;
    }
    let kernel = temp_file("seccomp-off.elf", &tiny_elf(&hello_then_reset(b"x")));
    let (status, _, stderr) = run_vmm(&["--kernel", kernel.to_str().unwrap(), "--seccomp", "off"]);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("--seccomp off: NO seccomp filters"),
        "{stderr}"
    );
}

/// A disk image of 1 MiB with recognisable content.
fn image(name: &str) -> (PathBuf, Vec<u8>) {
    let content: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
    (temp_file(name, &content), content)
}

fn disk_arg(path: &Path, read_only: bool) -> String {
    let ro = if read_only { ",readonly=on" } else { "" };
    format!("path={}{ro}", path.display())
}

/// Starts a VMM that holds `path` as a disk, and waits until its guest runs.
fn holder(path: &Path, read_only: bool) -> Guest {
    let kernel = temp_file("lock-holder.elf", &tiny_elf(&hello_then_idle(b"holding\n")));
    let mut guest = Guest::spawn(&[
        "--kernel".to_string(),
        kernel.display().to_string(),
        "--disk".into(),
        disk_arg(path, read_only),
    ]);
    guest.wait_for("holding", Duration::from_secs(60));
    guest
}

/// Runs a second VMM on `path` to completion: its status and stderr.
fn second(path: &Path, read_only: bool) -> (Option<i32>, String) {
    let kernel = temp_file("lock-second.elf", &tiny_elf(&hello_then_reset(b"x")));
    let (status, _, stderr) = run_vmm(&[
        "--kernel".to_string(),
        kernel.display().to_string(),
        "--disk".into(),
        disk_arg(path, read_only),
    ]);
    (status.code(), stderr)
}

fn assert_refused(result: (Option<i32>, String), path: &Path) {
    let (code, stderr) = result;
    assert_eq!(code, Some(2), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line: {stderr:?}");
    assert!(
        lines[0].starts_with("vmm: disk image ") && lines[0].contains("is in use by another VMM"),
        "{stderr}"
    );
    assert!(lines[0].contains(&path.display().to_string()), "{stderr}");
}

#[test]
fn a_writable_image_takes_one_vmm_and_read_only_images_are_shared() {
    if !kvm_available("a_writable_image_takes_one_vmm_and_read_only_images_are_shared") {
        return;
    }
    let (path, content) = image("locked.img");
    let link = path.with_file_name("locked-link.img");
    let _ = std::fs::remove_file(&link);
    std::fs::hard_link(&path, &link).unwrap();

    let mut first = holder(&path, false);
    assert_refused(second(&path, false), &path);
    assert_refused(second(&link, false), &link);
    assert_refused(second(&path, true), &path);
    assert!(
        std::fs::read(&path).unwrap() == content,
        "the image changed"
    );
    first.signal(libc::SIGKILL);
    first.wait_exit(Duration::from_secs(30));

    // The lock goes with the process that held it.
    let (code, stderr) = second(&link, false);
    assert_eq!(code, Some(0), "{stderr}");

    let mut reader = holder(&path, true);
    let (code, stderr) = second(&link, true);
    assert_eq!(code, Some(0), "a second reader is refused: {stderr}");
    assert_refused(second(&link, false), &link);
    reader.signal(libc::SIGKILL);
    reader.wait_exit(Duration::from_secs(30));
    assert!(
        std::fs::read(&path).unwrap() == content,
        "the image changed"
    );
}
