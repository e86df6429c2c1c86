//! The project's microVM kernel entered through PVH: its ELF vmlinux carries the
//! `XEN_ELFNOTE_PHYS32_ENTRY` note (`CONFIG_PVH=y` in guest/microvm.config), so `vmm` boots it in
//! 32-bit protected mode with `hvm_start_info` instead of through the 64-bit boot protocol.
//!
//! The command line, the memory map and the initramfs reach the kernel only through
//! `hvm_start_info` on this path (no zero page is written), so a shell with the right command line
//! and memory size shows that all three arrived. Two vCPUs show that the application processors,
//! which the kernel finds in the MP table and starts with INIT/SIPI, come up on this path too. `--boot-protocol linux64` boots the same vmlinux
//! through its 64-bit entry instead.

use integration_tests::{
    boot_timeout, guest_file, kvm_available, Guest, COMMAND_TIMEOUT, INIT_READY,
};

#[test]
fn microvm_elf_boots_through_pvh_with_its_cmdline_memory_initramfs_and_two_vcpus() {
    if !kvm_available(
        "microvm_elf_boots_through_pvh_with_its_cmdline_memory_initramfs_and_two_vcpus",
    ) {
        return;
    }
    let kernel = guest_file("microvm-elf");
    let initramfs = guest_file("initramfs");
    let mut guest = Guest::spawn(&[
        "--kernel".to_string(),
        kernel.display().to_string(),
        "--initramfs".to_string(),
        initramfs.display().to_string(),
        "--memory".to_string(),
        "256M".to_string(),
        "--cpus".to_string(),
        "2".to_string(),
        // Added to the default command line, which stays whole.
        "--append".to_string(),
        "vmm.test=appended".to_string(),
    ]);
    guest.wait_for(INIT_READY, boot_timeout());
    eprintln!(
        "microvm-elf through PVH: init ready after {:?}",
        guest.elapsed()
    );
    assert!(
        guest.vmm_log().contains("booting through PVH at "),
        "the VMM did not say it booted through PVH{}",
        guest.transcript()
    );
    guest.wait_for("# ", COMMAND_TIMEOUT);

    let cmdline = guest.run("cat /proc/cmdline", COMMAND_TIMEOUT);
    assert!(
        cmdline.contains("console=ttyS0")
            && cmdline.contains("reboot=k")
            && cmdline.contains("vmm.test=appended"),
        "/proc/cmdline: {cmdline}{}",
        guest.transcript()
    );
    let meminfo = guest.run("grep MemTotal /proc/meminfo", COMMAND_TIMEOUT);
    let kib: u64 = meminfo
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("unexpected meminfo line {meminfo:?}{}", guest.transcript()));
    assert!(
        kib > 200 << 10 && kib <= 256 << 10,
        "MemTotal {kib} kB for 256 MiB of RAM{}",
        guest.transcript()
    );

    let nproc = guest.run("nproc", COMMAND_TIMEOUT);
    assert_eq!(
        nproc.trim(),
        "2",
        "nproc with --cpus 2{}",
        guest.transcript()
    );

    guest.send("reboot");
    let status = guest.wait_exit(COMMAND_TIMEOUT);
    assert!(
        status.success(),
        "vmm ended with {status} after the guest's reboot{}",
        guest.transcript()
    );
}
