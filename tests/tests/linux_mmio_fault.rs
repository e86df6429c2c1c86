//! A user process of a Linux guest cannot end the VM (issue 14): on kvm-pvm hosts KVM emulates
//! every access to a device page, ring 3 included, and gives up on instructions its emulator
//! lacks. The process that runs one against an MMIO page must get the fault a CPU would raise
//! (#UD, which Linux delivers as SIGILL), and the VM must run on.
//!
//! The process is `tests/guest-progs/mmio_fault.c`, built here with gcc and appended to the
//! guest-kit initramfs as a second cpio archive (the kernel unpacks concatenated archives,
//! `Documentation/driver-api/early-userspace/buffer-format.rst`). It maps a virtio-pci memory BAR
//! through sysfs, drops to uid 65534 and runs the instruction. One boot checks both cases.

use std::path::Path;
use std::process::Command;

use integration_tests::{
    boot_timeout, guest_file, kvm_available, workspace_root, Guest, COMMAND_TIMEOUT, INIT_READY,
};

/// One newc ("070701") cpio member, its name and data padded to 4 bytes.
fn newc_member(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        0,
        0,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for field in fields {
        out.extend_from_slice(format!("{field:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// A cpio archive holding `/name` as an executable with `data`, trailer included.
fn newc_archive(name: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    newc_member(&mut out, 1, name, 0o100_755, data);
    newc_member(&mut out, 0, "TRAILER!!!", 0, &[]);
    out
}

/// Builds the guest program with gcc, statically linked.
fn build_program(dir: &Path) -> Vec<u8> {
    let source = workspace_root().join("tests/guest-progs/mmio_fault.c");
    let binary = dir.join("mmio_fault");
    let out = Command::new("gcc")
        .args(["-static", "-O1", "-Wall", "-o"])
        .arg(&binary)
        .arg(&source)
        .output()
        .expect("cannot run gcc (scripts/prereqs installs it)");
    assert!(
        out.status.success(),
        "gcc failed on {}:\n{}",
        source.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(binary).unwrap()
}

#[test]
fn newc_members_are_aligned_and_named() {
    let archive = newc_archive("x", b"abcde");
    assert_eq!(&archive[..6], b"070701");
    // 110-byte header + "x\0" -> 112, data 5 -> 117, padded to 120; then the trailer.
    assert_eq!(&archive[110..112], b"x\0");
    assert_eq!(&archive[112..117], b"abcde");
    assert_eq!(&archive[120..126], b"070701");
    assert!(archive.len().is_multiple_of(4));
    // filesize field (7th) and namesize field (12th).
    assert_eq!(&archive[6 + 6 * 8..6 + 7 * 8], b"00000005");
    assert_eq!(&archive[6 + 11 * 8..6 + 12 * 8], b"00000002");
}

#[test]
fn a_guest_process_faults_on_an_unemulatable_mmio_access_and_the_vm_runs_on() {
    if !kvm_available("a_guest_process_faults_on_an_unemulatable_mmio_access_and_the_vm_runs_on") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("vmm-tests-mmio-fault-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let program = build_program(&dir);
    let mut initramfs = std::fs::read(guest_file("initramfs")).unwrap();
    // Archives start on a 4-byte boundary.
    while !initramfs.len().is_multiple_of(4) {
        initramfs.push(0);
    }
    initramfs.extend_from_slice(&newc_archive("mmio_fault", &program));
    let initramfs_path = dir.join("initramfs.cpio");
    std::fs::write(&initramfs_path, &initramfs).unwrap();

    let kernel = guest_file("microvm");
    let mut guest = Guest::spawn(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initramfs",
        initramfs_path.to_str().unwrap(),
        "--rng",
    ]);
    guest.wait_for(INIT_READY, boot_timeout());
    guest.wait_for("# ", COMMAND_TIMEOUT);

    for insn in ["pshufb", "popcnt"] {
        let out = guest.run(
            &format!("/mmio_fault {insn}; echo status=$?"),
            COMMAND_TIMEOUT,
        );
        assert!(
            out.contains("mmio_fault: mapped /sys/bus/pci/devices/"),
            "{insn}: the program found no BAR to map: {out}{}",
            guest.transcript()
        );
        assert!(
            !out.contains("survived"),
            "{insn}: the instruction on a device page did not fault: {out}{}",
            guest.transcript()
        );
        assert!(
            out.contains("status=132") || out.contains("status=139"),
            "{insn}: the shell did not report SIGILL/SIGSEGV: {out}{}",
            guest.transcript()
        );
    }
    let alive = guest.run("echo $((40 + 2))", COMMAND_TIMEOUT);
    assert!(
        alive.contains("42"),
        "the VM does not answer after the faults: {alive}{}",
        guest.transcript()
    );
    assert!(
        guest.vmm_log().contains("#UD raised") || guest.vmm_log().contains("gets vector"),
        "the VMM log does not say it faulted the process{}",
        guest.transcript()
    );
    // The shell's exit reboots the guest: a clean stop, not the VMM giving up.
    guest.send("exit");
    let status = guest.wait_exit(COMMAND_TIMEOUT);
    assert!(status.success(), "status {status}{}", guest.transcript());
    let _ = std::fs::remove_dir_all(dir);
}
