//! Virtio devices seen from inside real guests: disks (ext4 made on the host, written in the
//! guest, read back on the host after the guest rebooted), a read-only disk, two disks with their
//! serials, and the entropy device, over both transports.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use integration_tests::{guest_file, kvm_available, Guest};

const BOOT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// A fresh ext4 image of `mib` MiB in a temporary directory, made with the host's mkfs.ext4.
fn ext4_image(name: &str, mib: u64) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-virtio-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(mib << 20).unwrap();
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&path)
        .status()
        .expect("mkfs.ext4 (e2fsprogs) is installed by scripts/guest-kit");
    assert!(status.success(), "mkfs.ext4 failed");
    path
}

/// A file's content inside an ext4 image, read on the host with debugfs.
fn debugfs_cat(image: &Path, file: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {file}")])
        .arg(image)
        .output()
        .expect("debugfs (e2fsprogs) is installed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn boot_microvm(extra: &[String]) -> Guest {
    let mut args = vec![
        "--kernel".to_string(),
        guest_file("microvm").display().to_string(),
        "--initramfs".to_string(),
        guest_file("initramfs").display().to_string(),
    ];
    args.extend_from_slice(extra);
    let mut guest = Guest::spawn(&args);
    guest.wait_for("vmm-guest: init ready", BOOT_TIMEOUT);
    guest.wait_for("# ", COMMAND_TIMEOUT);
    guest
}

/// The whole disk and entropy check on one transport.
fn disks_and_entropy(transport: &str) {
    let data = ext4_image(&format!("data-{transport}.img"), 64);
    let ro = ext4_image(&format!("ro-{transport}.img"), 16);
    let ro_sum = sha256(&ro);
    let mut guest = boot_microvm(&[
        "--transport".into(),
        transport.into(),
        "--disk".into(),
        format!("path={},serial=data-{transport}", data.display()),
        "--disk".into(),
        format!("path={},readonly=on,serial=ro-{transport}", ro.display()),
        "--rng".into(),
    ]);

    // Two disks, in order, with their serials.
    let serials = guest.run(
        "cat /sys/block/vda/serial; echo; cat /sys/block/vdb/serial; echo",
        COMMAND_TIMEOUT,
    );
    assert_eq!(
        serials.lines().map(str::trim).collect::<Vec<_>>(),
        [format!("data-{transport}"), format!("ro-{transport}")],
        "{}",
        guest.transcript()
    );

    // A file written and synced in the guest.
    let written = guest.run(
        "mkdir -p /mnt/data && mount /dev/vda /mnt/data && \
         echo 'virtio-blk wrote this' > /mnt/data/hello.txt && sync && echo WRITTEN",
        COMMAND_TIMEOUT,
    );
    assert!(
        written.ends_with("WRITTEN"),
        "{written}{}",
        guest.transcript()
    );

    // The read-only disk refuses writes.
    let ro_out = guest.run(
        "cat /sys/block/vdb/ro; \
         dd if=/dev/zero of=/dev/vdb bs=4096 count=1 conv=fsync 2>&1 || echo REFUSED",
        COMMAND_TIMEOUT,
    );
    assert!(ro_out.starts_with('1'), "vdb is not read-only: {ro_out}");
    assert!(
        ro_out.contains("REFUSED"),
        "a write to vdb succeeded: {ro_out}"
    );

    // 1 MiB from the entropy device is not constant: gzip cannot shrink it (1 MiB of one repeated
    // byte compresses to about 1 KiB). gzip runs natively in the guest with few system calls.
    let rng = guest.run(
        "head -c 1048576 /dev/hwrng > /tmp/r && wc -c < /tmp/r && gzip -c /tmp/r | wc -c",
        COMMAND_TIMEOUT,
    );
    let numbers: Vec<u64> = rng.lines().filter_map(|l| l.trim().parse().ok()).collect();
    assert_eq!(numbers.first(), Some(&1_048_576), "{rng}");
    assert!(
        numbers.get(1).copied().unwrap_or(0) > 1_000_000,
        "1 MiB of /dev/hwrng compresses well, so it is not random: {rng}"
    );

    // The guest reboots; the host then reads what it wrote.
    guest.send("reboot");
    let status = guest.wait_exit(COMMAND_TIMEOUT);
    assert!(status.success(), "status {status}{}", guest.transcript());
    assert_eq!(
        debugfs_cat(&data, "/hello.txt"),
        "virtio-blk wrote this\n",
        "the host does not see the guest's write{}",
        guest.transcript()
    );
    assert_eq!(sha256(&ro), ro_sum, "the read-only image changed");
}

#[test]
fn virtio_mmio_disks_and_entropy() {
    if !kvm_available("virtio_mmio_disks_and_entropy") {
        return;
    }
    disks_and_entropy("mmio");
}

#[test]
fn virtio_pci_disks_and_entropy() {
    if !kvm_available("virtio_pci_disks_and_entropy") {
        return;
    }
    disks_and_entropy("pci");
}
