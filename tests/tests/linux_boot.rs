//! Real Linux guests booted by the `vmm` binary, driven over the serial console as a person would:
//! type a command, read the answer. Each boot checks several things, because on hosts where KVM
//! emulates the guest kernel a boot takes minutes.
//!
//! The kernels and the initramfs come from `scripts/guest-kit` (the README's test command builds
//! them first). A failing boot shows the guest console and the VMM log in its failure message.

use std::net::Ipv4Addr;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use integration_tests::netns::NetNs;
use integration_tests::{
    boot_timeout, guest_file, kvm_available, Guest, COMMAND_TIMEOUT, INIT_READY,
};

/// The stock kernel boots with the host to itself. Where its kernel is emulated (kvm-pvm hosts)
/// it is the slowest boot by far and the one nearest the boot timeout, and an emulated kernel
/// that shares its core slows more than in proportion: its timer interrupts cost the same
/// emulated work whatever share of the core it gets (before the guest was given ARAT and the
/// TSC-deadline timer, register samples of a stock boot beside the 4-vCPU one were all in its
/// PIT tick handler). The microVM kernel's boots may share the host. `scripts/test` goes further:
/// it runs the stock kernel's test in a process of its own, started first, with the one-vCPU
/// tests beside it at the lowest priority, and this file's other tests after it.
static HOST: RwLock<()> = RwLock::new(());

/// The whole host, for the stock kernel's boot.
fn host_alone() -> RwLockWriteGuard<'static, ()> {
    HOST.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A share of the host, for the microVM kernel's boots.
fn host_shared() -> RwLockReadGuard<'static, ()> {
    HOST.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Boots `kernel` (a guest-kit name) with the guest-kit initramfs and `extra` arguments, and waits
/// for the shell prompt.
fn boot(kernel: &str, extra: &[&str]) -> Guest {
    boot_in(None, kernel, extra)
}

/// `boot`, with the VMM inside network namespace `netns` when one is given.
fn boot_in(netns: Option<&NetNs>, kernel: &str, extra: &[&str]) -> Guest {
    let kernel = guest_file(kernel);
    let initramfs = guest_file("initramfs");
    let mut args = vec![
        "--kernel".to_string(),
        kernel.display().to_string(),
        "--initramfs".to_string(),
        initramfs.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut guest = match netns {
        Some(netns) => Guest::spawn_in_netns(netns.name(), &args),
        None => Guest::spawn(&args),
    };
    guest.wait_for(INIT_READY, boot_timeout());
    guest.wait_for("# ", COMMAND_TIMEOUT);
    eprintln!(
        "{kernel:?} {extra:?}: shell after {:?}",
        guest.elapsed(),
        kernel = args[1]
    );
    guest
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The guest's clock, read through `date`, agrees with the host's within a few seconds.
fn check_date(guest: &mut Guest) {
    let before = unix_now();
    let out = guest.run("date +%s", COMMAND_TIMEOUT);
    let after = unix_now();
    let guest_now: i64 = out
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("`date +%s` printed {out:?}{}", guest.transcript()));
    assert!(
        guest_now >= before - 3 && guest_now <= after + 3,
        "guest time {guest_now} is not within 3 s of the host's [{before}, {after}]{}",
        guest.transcript()
    );
}

/// `reboot` in the guest ends the VMM with status 0.
fn reboot_ends_the_vmm(mut guest: Guest) {
    guest.send("reboot");
    let status = guest.wait_exit(COMMAND_TIMEOUT);
    assert!(
        status.success(),
        "vmm ended with {status} after the guest's reboot{}",
        guest.transcript()
    );
}

fn mem_total_kib(guest: &mut Guest) -> u64 {
    let out = guest.run("grep MemTotal /proc/meminfo", COMMAND_TIMEOUT);
    out.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("unexpected meminfo line {out:?}{}", guest.transcript()))
}

#[test]
fn microvm_bzimage_sees_four_cpus_six_gib_and_the_right_time() {
    if !kvm_available("microvm_bzimage_sees_four_cpus_six_gib_and_the_right_time") {
        return;
    }
    let _host = host_shared();
    let mut guest = boot("microvm", &["--cpus", "4", "--memory", "6G"]);
    let nproc = guest.run("nproc", COMMAND_TIMEOUT);
    assert_eq!(nproc, "4", "nproc{}", guest.transcript());
    let kib = mem_total_kib(&mut guest);
    // MemTotal is RAM less what the kernel reserved for itself: within 5% of 6 GiB.
    let six_gib_kib = 6u64 << 20;
    assert!(
        kib > six_gib_kib * 95 / 100 && kib <= six_gib_kib,
        "MemTotal {kib} kB is not close to 6 GiB{}",
        guest.transcript()
    );
    check_date(&mut guest);
    let release = guest.run("uname -r", COMMAND_TIMEOUT);
    assert!(release.ends_with("-microvm"), "uname -r: {release}");
    reboot_ends_the_vmm(guest);
}

#[test]
fn microvm_elf_vmlinux_through_the_64_bit_protocol_with_intx_virtio() {
    if !kvm_available("microvm_elf_vmlinux_through_the_64_bit_protocol_with_intx_virtio") {
        return;
    }
    let _host = host_shared();
    // The microVM kernel carries the PVH note (tests/pvh_boot.rs boots it that way); here it
    // goes through the 64-bit boot protocol, so that entry stays tested too. With `pci=nomsi`
    // the virtio-pci devices must work through their INTx lines on the IOAPIC.
    let disk = integration_tests::temp_file("intx-disk.img", &vec![0; 1 << 20]);
    let disk_arg = format!("path={},serial=intx-disk", disk.display());
    let mut guest = boot(
        "microvm-elf",
        &[
            "--boot-protocol",
            "linux64",
            "--cmdline",
            "console=ttyS0 reboot=k panic=1 quiet 8250.nr_uarts=1 i8042.noaux i8042.nomux \
             nokaslr tsc=reliable no_timer_check cryptomgr.notests pci=nomsi",
            "--disk",
            &disk_arg,
            "--rng",
        ],
    );
    assert!(
        guest
            .vmm_log()
            .contains("booting through the 64-bit Linux boot protocol at "),
        "the VMM did not say it used the 64-bit boot protocol{}",
        guest.transcript()
    );
    let echoed = guest.run("echo $((6 * 7))", COMMAND_TIMEOUT);
    assert_eq!(echoed, "42", "{}", guest.transcript());
    let cmdline = guest.run("cat /proc/cmdline", COMMAND_TIMEOUT);
    assert!(cmdline.contains("pci=nomsi"), "{cmdline}");
    let nproc = guest.run("nproc", COMMAND_TIMEOUT);
    assert_eq!(nproc, "1", "the default is one vCPU{}", guest.transcript());
    let io = guest.run(
        "echo intx-wrote-this > /tmp/w && dd if=/tmp/w of=/dev/vda conv=fsync 2>/dev/null && \
         head -c 65536 /dev/hwrng | wc -c && grep -c MSI /proc/interrupts; \
         grep virtio /proc/interrupts | grep -c IO-APIC",
        COMMAND_TIMEOUT,
    );
    assert_eq!(
        io.lines().map(str::trim).collect::<Vec<_>>(),
        ["65536", "0", "2"],
        "virtio-blk and virtio-rng over INTx (entropy bytes, MSI lines, IOAPIC virtio lines){}",
        guest.transcript()
    );
    reboot_ends_the_vmm(guest);
    let written = std::fs::read(&disk).unwrap();
    assert!(
        written.starts_with(b"intx-wrote-this\n"),
        "the host does not see the guest's write through INTx: {:?}",
        &written[..32]
    );
}

/// Debian's cloud kernel (`linux-image-cloud-amd64`) has no MP-table parser (no
/// `CONFIG_X86_MPPARSE`): it finds its second CPU only through the ACPI MADT, and powers off through
/// the FADT's PM1a block and the DSDT's `_S5`, which ends the VMM with status 0.
///
/// Where KVM emulates the guest kernel (kvm-pvm hosts) this boot takes 20 minutes or more:
/// `scripts/test` starts it in a process of its own once the one-vCPU tests are done, beside the
/// stock kernel's (see `HOST`).
#[test]
fn debian_cloud_kernel_sees_two_cpus_through_acpi_and_powers_off() {
    if !kvm_available("debian_cloud_kernel_sees_two_cpus_through_acpi_and_powers_off") {
        return;
    }
    let _host = host_alone();
    let mut guest = boot("cloud", &["--cpus", "2"]);
    let release = guest.run("uname -r", COMMAND_TIMEOUT);
    assert!(release.ends_with("-cloud-amd64"), "uname -r: {release}");
    let cpus = guest.run(
        "nproc; grep -c ^processor /proc/cpuinfo; cat /sys/devices/system/cpu/online",
        COMMAND_TIMEOUT,
    );
    assert_eq!(
        cpus.lines().map(str::trim).collect::<Vec<_>>(),
        ["2", "2", "0-1"],
        "the cloud kernel's CPUs{}",
        guest.transcript()
    );
    guest.send("poweroff -f");
    let status = guest.wait_exit(COMMAND_TIMEOUT);
    assert!(
        status.success(),
        "vmm ended with {status} after the guest's poweroff{}",
        guest.transcript()
    );
}

/// Debian's unmodified kernel, the README's default guest: it loads its own virtio modules from the
/// initramfs and finds a disk and the entropy device on the PCI bus. Where KVM emulates the guest
/// kernel (kvm-pvm) this is the longest test, twenty to forty-five minutes to the shell:
/// `scripts/test` starts it as soon as the VMM is built, beside the rest (see `HOST`).
#[test]
fn debian_stock_kernel_finds_its_virtio_devices_and_panics_cleanly() {
    if !kvm_available("debian_stock_kernel_finds_its_virtio_devices_and_panics_cleanly") {
        return;
    }
    let _host = host_alone();
    // A disk, a network device and the entropy device over virtio-pci: the stock kernel finds all
    // three with its own modules, with nothing on its command line. The VMM and its tap live in a
    // network namespace of the test's own.
    let disk = integration_tests::temp_file("stock-disk.img", &vec![0x5a; 1 << 20]);
    let disk_arg = format!("path={},readonly=on,serial=stock-disk", disk.display());
    let host_ip = Ipv4Addr::new(192, 0, 2, 1);
    let netns = NetNs::new(
        &format!("vmm-test-stock-{}", std::process::id() % 100_000),
        "vmtap0",
        host_ip,
    );
    let net_arg = format!("tap={},mac=52:54:00:12:34:33", netns.tap());
    let mut guest = boot_in(
        Some(&netns),
        "stock",
        &["--disk", &disk_arg, "--net", &net_arg, "--rng"],
    );
    let release = guest.run("uname -r", COMMAND_TIMEOUT);
    assert!(release.ends_with("-amd64"), "uname -r: {release}");
    let devices = guest.run(
        "cat /sys/block/vda/serial; echo; cat /sys/block/vda/ro; \
         head -c 4096 /dev/vda | od -An -v -tx1 | sort -u | tr -d ' '; \
         head -c 65536 /dev/hwrng | wc -c",
        COMMAND_TIMEOUT,
    );
    assert_eq!(
        devices.lines().map(str::trim).collect::<Vec<_>>(),
        [
            "stock-disk",
            "1",
            "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a",
            "65536"
        ],
        "the stock kernel's view of the virtio-pci disk and entropy device{}",
        guest.transcript()
    );
    let ping = guest.run(
        &format!(
            "ip addr add 192.0.2.2/24 dev eth0 && ip link set eth0 up && \
             cat /sys/class/net/eth0/address && ping -c 2 -W 10 {host_ip} | grep transmitted"
        ),
        COMMAND_TIMEOUT,
    );
    assert!(
        ping.starts_with("52:54:00:12:34:33")
            && ping.contains("2 packets transmitted, 2 packets received"),
        "the stock kernel's virtio-net device: {ping}{}",
        guest.transcript()
    );
    let modules = guest.run("cut -d' ' -f1 /proc/modules", COMMAND_TIMEOUT);
    for module in [
        "virtio_pci",
        "virtio_blk",
        "virtio_net",
        "virtio_rng",
        "ext4",
    ] {
        assert!(
            modules.lines().any(|m| m.trim() == module),
            "{module} is not loaded: {modules}{}",
            guest.transcript()
        );
    }
    let mem = mem_total_kib(&mut guest);
    assert!(
        mem > 400 << 10 && mem <= 512 << 10,
        "MemTotal {mem} kB for the 512 MiB default"
    );
    check_date(&mut guest);
    // A kernel panic with panic=1 resets the machine, which ends the VMM with status 0.
    guest.send("echo c > /proc/sysrq-trigger");
    let status = guest.wait_exit(COMMAND_TIMEOUT);
    assert!(
        status.success(),
        "vmm ended with {status} after a guest panic{}",
        guest.transcript()
    );
    assert!(
        guest.console().contains("Kernel panic"),
        "the guest did not panic{}",
        guest.transcript()
    );
}
