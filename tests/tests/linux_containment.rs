//! The containment of issue 14 with a Linux guest (the guest-kit microvm kernel and initramfs),
//! in one boot: every VMM thread under its seccomp filter while the guest's drivers use a disk and
//! the entropy device, and a write the guest flushed to its virtio-blk disk is in the image even
//! when the VMM is SIGKILLed right after the flush completed.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use integration_tests::{
    boot_timeout, guest_file, kvm_available, temp_file, Guest, COMMAND_TIMEOUT, INIT_READY,
};

/// Where in the disk the guest writes its mark: the sixth 4 KiB block.
const MARK_BLOCK: u64 = 5;

fn seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        threads.push((field("Name:"), field("Seccomp:")));
    }
    threads.sort();
    threads
}

#[test]
fn a_flushed_write_survives_sigkill_and_every_thread_is_filtered_under_linux() {
    if !kvm_available("a_flushed_write_survives_sigkill_and_every_thread_is_filtered_under_linux") {
        return;
    }
    let disk = temp_file("flush.img", &vec![0u8; 4 << 20]);
    let mut guest = Guest::spawn(&[
        "--kernel".to_string(),
        guest_file("microvm").display().to_string(),
        "--initramfs".into(),
        guest_file("initramfs").display().to_string(),
        "--cpus".into(),
        "2".into(),
        "--disk".into(),
        format!("path={}", disk.display()),
        "--rng".into(),
    ]);
    guest.wait_for(INIT_READY, boot_timeout());
    guest.wait_for("# ", COMMAND_TIMEOUT);

    // The drivers have probed both devices; the device worker has served them.
    let entropy = guest.run("head -c 64 /dev/hwrng | wc -c", COMMAND_TIMEOUT);
    assert_eq!(entropy, "64", "{}", guest.transcript());
    let threads = seccomp_modes(guest.pid());
    for expected in ["vcpu0", "vcpu1", "virtio-blk0", "virtio-rng0"] {
        assert!(
            threads.iter().any(|(name, _)| name == expected),
            "no {expected} thread: {threads:?}"
        );
    }
    for (name, mode) in &threads {
        assert_eq!(mode, "2", "thread {name} runs unfiltered: {threads:?}");
    }

    // dd's fsync sends the written block and a FLUSH; "FLUSHED" is printed only after both
    // completed. The VMM is killed as soon as the console shows it.
    let mark = format!("vmm-flush-mark-{}", std::process::id());
    guest.send(&format!(
        "echo -n {mark} > /tmp/mark && dd if=/tmp/mark of=/dev/vda bs=4096 seek={MARK_BLOCK} \
         conv=sync,fsync 2>/dev/null && echo FLUSH''ED"
    ));
    guest.wait_for("FLUSHED", COMMAND_TIMEOUT);
    guest.signal(libc::SIGKILL);
    let status = guest.wait_exit(Duration::from_secs(30));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    assert!(
        !guest.vmm_log().contains("seccomp filter"),
        "{}",
        guest.transcript()
    );

    let image = std::fs::File::open(&disk).unwrap();
    let mut block = vec![0u8; 4096];
    image.read_exact_at(&mut block, MARK_BLOCK * 4096).unwrap();
    assert_eq!(
        &block[..mark.len()],
        mark.as_bytes(),
        "the flushed block is not in the image"
    );
    assert!(block[mark.len()..].iter().all(|&b| b == 0));
}
