//! The library crates' examples run and say what their READMEs promise: each is a program an
//! engineer from another VMM would try first, so a broken one is a broken front door.
//!
//! The tests run the example binaries cargo built beside them (`cargo test --workspace` builds
//! every example; `scripts/test` also runs `cargo build --workspace --examples` first).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use integration_tests::{guest_file, kvm_available, temp_file, tiny_pvh_guest, TINY_LOAD};

/// The example binary `name`: target/<profile>/examples/<name>.
fn example(name: &str) -> PathBuf {
    // target/<profile>/deps/<test-exe> -> target/<profile>/examples/<name>
    let exe = std::env::current_exe().expect("the test knows its own path");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executables live in target/<profile>/deps")
        .join("examples")
        .join(name);
    assert!(
        path.exists(),
        "the example {name} is missing at {}: run `cargo build --workspace --examples` first (the README's test command does)",
        path.display()
    );
    path
}

/// Runs example `name` with `args`; returns its output, stdout as text.
fn run(name: &str, args: &[&str]) -> (Output, String) {
    let output = Command::new(example(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the example {name}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    (output, stdout)
}

/// Runs example `name` and fails with its output unless it exits successfully.
fn run_ok(name: &str, args: &[&str]) -> String {
    let (output, stdout) = run(name, args);
    assert!(
        output.status.success(),
        "{name} {args:?} failed ({}):\n{stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The hex number after `label` on the line that starts with it.
fn hex_after(stdout: &str, label: &str) -> u64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no line starting with {label:?} in:\n{stdout}"));
    let word = line[label.len()..]
        .split_whitespace()
        .next()
        .unwrap_or_default();
    let digits = word.split("..").next().unwrap_or_default();
    u64::from_str_radix(digits.trim_start_matches("0x"), 16)
        .unwrap_or_else(|_| panic!("{label:?} is not followed by a hex number in {line:?}"))
}

#[test]
fn cpu_port_writes_runs_its_guest_to_the_done_port() {
    if !kvm_available("cpu_port_writes_runs_its_guest_to_the_done_port") {
        return;
    }
    let stdout = run_ok("port_writes", &[]);
    let writes: Vec<&str> = stdout.lines().filter(|l| l.starts_with("port ")).collect();
    assert_eq!(
        writes,
        [
            "port 0x03f8 <- [6f]",
            "port 0x03f8 <- [6b]",
            "port 0x03f8 <- [0a]",
            "port 0x00f4 <- [0a]",
        ],
        "{stdout}"
    );
    assert!(
        stdout.contains(r#"the guest wrote "ok\n" to COM1 in "#),
        "{stdout}"
    );
}

/// The microvm bzImage and the initramfs come from the guest kit, which the test command builds
/// only where KVM tests run; hence the KVM check, though loading needs no KVM.
#[test]
fn boot_load_kernel_places_a_bzimage_and_its_initramfs() {
    if !kvm_available("boot_load_kernel_places_a_bzimage_and_its_initramfs") {
        return;
    }
    let kernel = guest_file("microvm");
    let initramfs = guest_file("initramfs");
    let stdout = run_ok(
        "load_kernel",
        &[kernel.to_str().unwrap(), initramfs.to_str().unwrap()],
    );
    assert!(
        stdout.contains("(BzImage { decompressed_on_host: true })"),
        "{stdout}"
    );
    assert!(
        stdout.contains("protocol   the 64-bit Linux boot protocol"),
        "{stdout}"
    );
    let entry = hex_after(&stdout, "entry");
    let kernel_end = hex_after(&stdout, "kernel end");
    let initramfs_start = hex_after(&stdout, "initramfs");
    // The kernel loads at or above 1 MiB, its entry inside it, the initramfs page-aligned above
    // it and inside the example's 512 MiB.
    assert!(
        (0x10_0000..kernel_end).contains(&entry),
        "entry {entry:#x}, end {kernel_end:#x}\n{stdout}"
    );
    assert!(initramfs_start >= kernel_end, "{stdout}");
    assert_eq!(initramfs_start % 4096, 0, "{stdout}");
    let size = std::fs::metadata(&initramfs).unwrap().len();
    assert!(initramfs_start + size <= 512 << 20, "{stdout}");
    assert!(
        stdout.contains(&format!("({size} bytes)")),
        "the initramfs line gives the file's size {size}:\n{stdout}"
    );
    let boot_protocol = stdout
        .lines()
        .find(|l| l.starts_with("setup hdr  boot protocol 2."))
        .unwrap_or_else(|| panic!("no setup header line:\n{stdout}"));
    assert!(boot_protocol.contains("cmdline_size"), "{stdout}");
}

#[test]
fn boot_load_kernel_enters_a_pvh_elf_at_its_note_and_rejects_other_files() {
    let kernel = temp_file("example-pvh.elf", &tiny_pvh_guest());
    let stdout = run_ok("load_kernel", &[kernel.to_str().unwrap()]);
    assert!(stdout.contains("(Elf)"), "{stdout}");
    assert!(stdout.contains("protocol   PVH"), "{stdout}");
    assert_eq!(hex_after(&stdout, "entry"), TINY_LOAD, "{stdout}");
    assert_eq!(hex_after(&stdout, "PVH note"), TINY_LOAD, "{stdout}");

    let not_a_kernel = temp_file("example-not-a-kernel", b"#!/bin/sh\necho hi\n");
    let (output, stdout) = run("load_kernel", &[not_a_kernel.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stdout}");
    assert_eq!(
        stderr.trim(),
        "load_kernel: the kernel image is not a bzImage or ELF vmlinux"
    );
}

#[test]
fn arch_boot_tables_reads_back_what_the_kernel_would_find() {
    let stdout = run_ok("boot_tables", &["3"]);
    let processors: Vec<&str> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("processor"))
        .collect();
    assert_eq!(
        processors,
        [
            "  processor  APIC ID 0, boot CPU",
            "  processor  APIC ID 1",
            "  processor  APIC ID 2",
        ],
        "{stdout}"
    );
    // The IOAPIC takes the first ID after the vCPUs; the two PCI devices' INTA# reach pins 16, 17.
    assert!(
        stdout.contains("  IOAPIC     ID 3 at 0xfec00000"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  I/O int    bus 0 IRQ 0x04 -> IOAPIC 3 pin 16"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  I/O int    bus 0 IRQ 0x08 -> IOAPIC 3 pin 17"),
        "{stdout}"
    );
    for e820 in [
        "  e820 0x0000000000..0x000009fc00 RAM",
        "  e820 0x000009fc00..0x0000100000 reserved",
        "  e820 0x0000100000..0x0010000000 RAM",
    ] {
        assert!(stdout.contains(e820), "missing {e820:?}:\n{stdout}");
    }
    let rsdp = hex_after(&stdout, "ACPI tables, RSDP at");
    assert!(
        stdout.contains(&format!("acpi_rsdp_addr {rsdp:#x}")),
        "the zero page points at the RSDP:\n{stdout}"
    );
    let tables: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains(", checksum "))
        .collect();
    assert_eq!(tables.len(), 6, "{stdout}");
    assert!(
        tables.iter().all(|l| l.ends_with("checksum ok")),
        "{stdout}"
    );

    let (output, _) = run("boot_tables", &["0"]);
    assert!(!output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stderr).trim(),
        "boot_tables: a guest needs 1 to 254 vCPUs, not 0"
    );
}

#[test]
fn memory_layout_splits_ram_around_the_hole() {
    // The layout needs no KVM; registering the slots does.
    let kvm = std::path::Path::new("/dev/kvm").exists();
    let stdout = run_ok("layout", &["6144"]);
    let regions: Vec<&str> = stdout.lines().filter(|l| l.starts_with("region")).collect();
    assert_eq!(regions.len(), 2, "{stdout}");
    assert!(
        regions[0].starts_with("region    0x0000000000..0x00c0000000 at host")
            && regions[0].ends_with("-> slot 0"),
        "{stdout}"
    );
    assert!(
        regions[1].starts_with("region    0x0100000000..0x01c0000000 at host")
            && regions[1].ends_with("-> slot 1"),
        "{stdout}"
    );
    if kvm {
        assert!(stdout.contains("registered 2 of KVM's "), "{stdout}");
    } else {
        assert!(stdout.contains("no /dev/kvm"), "{stdout}");
    }
}

#[test]
fn pvm_probe_reports_every_class_and_the_switches_that_hide_them() {
    if !kvm_available("pvm_probe_reports_every_class_and_the_switches_that_hide_them") {
        return;
    }
    let stdout = run_ok("probe", &[]);
    let probed: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains(" runs") || l.contains(" gives up"))
        .collect();
    assert!(probed.len() >= 8, "one line per probe:\n{stdout}");
    let switches = stdout
        .lines()
        .find_map(|l| l.strip_prefix("kernel command line:"))
        .unwrap_or_else(|| panic!("no command-line switches:\n{stdout}"));
    // Whatever this host is, what is hidden and the switches agree.
    if stdout.contains("hidden: nothing") {
        assert_eq!(switches.trim(), "", "{stdout}");
    } else {
        assert!(switches.contains("mitigations=off"), "{stdout}");
        assert!(switches.contains("clearcpuid="), "{stdout}");
    }
}

#[test]
fn devices_serves_a_virtio_blk_read_from_a_hand_built_queue() {
    // No KVM: the example plays the driver in plain guest memory.
    let stdout = run_ok("virtio_blk", &[]);
    for line in [
        "virtio-blk: device type 2, 1 queue(s)",
        "interrupt: Queue(0)",
        "used ring: idx 1, 513 bytes written",
        "status: OK (0)",
        "data: \"sector 3\"",
    ] {
        assert!(stdout.contains(line), "{line:?} missing from:\n{stdout}");
    }
}
