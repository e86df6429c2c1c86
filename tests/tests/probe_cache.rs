//! The CPU feature probe's cache (`pvm::probe_cache`): a second start on the same host reads the
//! probe's answer instead of running the scratch VM again, and `VMM_PROBE_CACHE=off` probes.

use std::process::{Command, Stdio};

use integration_tests::{kvm_available, temp_file, tiny_pvh_guest, vmm_binary, TINY_PVH_MARKER};

/// Runs the tiny PVH guest to its reset with the probe cache in `cache` and returns the VMM's log.
fn start(kernel: &std::path::Path, cache: &str) -> String {
    let out = Command::new(vmm_binary())
        .args(["--kernel", kernel.to_str().unwrap()])
        .args(["--memory", "64M", "--log-level", "info"])
        .env("VMM_PROBE_CACHE", cache)
        .stdin(Stdio::null())
        .output()
        .expect("cannot start the vmm binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success() && stdout.contains(TINY_PVH_MARKER),
        "status {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stderr
}

#[test]
fn a_second_start_uses_the_cached_probe() {
    if !kvm_available("a_second_start_uses_the_cached_probe") {
        return;
    }
    let kernel = temp_file("probe-cache-pvh.elf", &tiny_pvh_guest());
    let dir = kernel.parent().unwrap().join("probe-cache");
    let _ = std::fs::remove_dir_all(&dir);
    let dir = dir.to_str().unwrap();
    let first = start(&kernel, dir);
    if first.contains("no probe: KVM uses VMX/SVM") {
        // A hardware-virtualization host: nothing to probe, nothing to cache.
        assert!(!std::path::Path::new(dir).join("cpu-probe").exists());
        return;
    }
    assert!(
        first.contains("CPU feature probe:") && first.contains("probe took"),
        "the first start did not probe:\n{first}"
    );
    assert!(
        std::path::Path::new(dir).join("cpu-probe").is_file(),
        "no cache file in {dir}"
    );
    let second = start(&kernel, dir);
    assert!(
        second.contains("cached answer for this host"),
        "the second start did not use the cache:\n{second}"
    );
    // The cached answer hides what the probe's did.
    let switches = |log: &str| {
        log.lines()
            .find(|l| l.contains("guest command line gets"))
            .map(|l| l.split_once("gets").unwrap().1.to_string())
    };
    assert_eq!(switches(&first), switches(&second));
    // Bypassed, it probes again.
    let off = start(&kernel, "off");
    assert!(
        off.contains("probe took"),
        "VMM_PROBE_CACHE=off used a cache:\n{off}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
