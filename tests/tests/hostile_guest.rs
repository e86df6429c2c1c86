//! Hostile-driver attacks on virtio-blk from the bench guest (`bench.attack=`, in
//! `tests/bench-guest/attack.c`), on both transports, against our VMM (issue 14). Each attack
//! hands the device something a correct driver never would; the guest then checks that a good
//! 4 KiB read still returns the image's pattern. Per attack these tests check the outcome the
//! virtio 1.2 spec asks for, that the good read worked without a reset the device did not ask
//! for (`then=ok`), and for the whole run that the VMM stayed up, exited 0 and kept its stderr
//! under 64 KiB.

use std::time::Duration;

use integration_tests::bench::parse_guest_lines;
use integration_tests::bench_guest::{
    build_in_temp, expect_clean_finish, pattern_word, write_pattern_image,
};
use integration_tests::{kvm_available, Guest};

const IMAGE_SECTORS: u64 = 16 << 11;

/// The most a guest may make the VMM log in one run (issue 14: under 64 KiB for a minute of
/// hammering).
const STDERR_LIMIT: usize = 64 << 10;

/// Outcomes a chain the device cannot parse may get: it cannot find a status byte to write, so
/// it returns the chain with nothing written (`nostatus`), or asks for a reset (virtio 1.2
/// 2.1.2). Never `silent`: the driver would wait forever.
const UNPARSEABLE: &[&str] = &["nostatus", "ioerr", "needs_reset"];

/// Each attack and the outcomes the spec allows for it.
const ATTACKS: &[(&str, &[&str])] = &[
    // Descriptor chains that loop or leave the table (2.7.5.2, 2.7.5.3).
    ("loop", UNPARSEABLE),
    ("self_loop", UNPARSEABLE),
    ("next_oob", UNPARSEABLE),
    ("indirect_nested", UNPARSEABLE),
    ("indirect_long", UNPARSEABLE),
    ("indirect_loop", UNPARSEABLE),
    // INDIRECT together with NEXT: the driver MUST NOT (2.7.5.3.1); the device may serve the
    // table or refuse the chain, but must answer.
    ("indirect_next", &["ok", "nostatus", "ioerr", "needs_reset"]),
    // 254 descriptors of 1 MiB aliasing one buffer: beyond seg_max and the request-size cap.
    ("alias_chain", &["ioerr"]),
    // The data buffer is the descriptor table: the device overwrites the chain it walks.
    ("over_ring", &["ok", "ioerr", "nostatus"]),
    // Buffers outside RAM: past its end, across 0xc0000000, 4 GiB long. The status byte is
    // fine, so IOERR is what the spec asks (5.2.6); today the whole chain is refused as
    // unreadable (`nostatus`), see `buffers_outside_ram_get_ioerr`.
    ("past_ram", &["ioerr", "nostatus"]),
    ("pci_hole", &["ioerr", "nostatus"]),
    ("ram_end", &["ioerr", "nostatus"]),
    ("huge_len", &["ioerr", "nostatus"]),
    // Sectors beyond the disk (5.2.6.1: IOERR).
    ("sector_2_64", &["ioerr"]),
    ("sector_end", &["ioerr"]),
    // A read of no bytes: nothing to do, or refused.
    ("zero_len", &["ok", "ioerr"]),
    // No device-writable status byte.
    ("no_status", UNPARSEABLE),
    ("status_ro", UNPARSEABLE),
    ("header_only", UNPARSEABLE),
    // Unknown request type, and discard / write-zeroes the driver did not negotiate (5.2.6.1).
    ("bad_type", &["unsupp"]),
    ("discard", &["unsupp"]),
    ("write_zeroes", &["unsupp"]),
    // Register pokes: odd sizes and offsets all over common, device and notify configuration,
    // ISR, MSI-X table and PBA (PCI) or the virtio-mmio window; a notification storm of an empty
    // queue; string I/O on the PCI configuration ports.
    ("notify_storm", &["ok"]),
    ("config_space", &["ok"]),
    ("msix", &["ok"]),
    ("string_io", &["ok"]),
];

struct Run {
    guest: Guest,
    dir: std::path::PathBuf,
    image: std::path::PathBuf,
}

/// Boots the bench guest with `bench.attack=attacks` and waits for it to finish: the VMM must
/// exit 0 within a minute, the guest must not have stopped on an error, and the VMM's stderr
/// must stay under [`STDERR_LIMIT`].
fn run(test: &str, transport: &str, attacks: &str, disk_options: &str) -> Option<Run> {
    if !kvm_available(test) {
        return None;
    }
    let (dir, guest_elf) = build_in_temp(&format!("hostile-{test}"));
    let image = dir.join("disk.img");
    write_pattern_image(&image, IMAGE_SECTORS).unwrap();
    let disk = format!("path={}{disk_options}", image.display());
    let mut guest = Guest::spawn(&[
        "--kernel",
        guest_elf.to_str().unwrap(),
        "--memory",
        "128M",
        "--transport",
        transport,
        "--disk",
        &disk,
        "--cmdline",
        &format!("bench.attack={attacks}"),
    ]);
    expect_clean_finish(&mut guest, "bench: done attacks", Duration::from_secs(60));
    let log = guest.vmm_log().len();
    assert!(
        log < STDERR_LIMIT,
        "the VMM logged {log} bytes under attack{}",
        guest.transcript()
    );
    Some(Run { guest, dir, image })
}

/// The outcome of each attack in `expected`, checked against what the spec allows, and the good
/// read after it.
fn check(run: &Run, expected: &[(&str, &[&str])]) {
    let lines = parse_guest_lines(&run.guest.console());
    let mut wrong = Vec::new();
    for (name, allowed) in expected {
        let line = lines
            .iter()
            .find(|l| l.name == format!("attack {name}"))
            .unwrap_or_else(|| panic!("no line for attack {name}{}", run.guest.transcript()));
        let outcome = line.field("outcome").unwrap_or("");
        let then = line.field("then").unwrap_or("");
        if !allowed.contains(&outcome) || then != "ok" {
            wrong.push(format!(
                "{name}: outcome={outcome} (allowed {allowed:?}) then={then}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "attacks answered wrongly:\n{}{}",
        wrong.join("\n"),
        run.guest.transcript()
    );
}

fn names(attacks: &[(&str, &[&str])]) -> String {
    attacks
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(",")
}

fn every_attack(transport: &str) {
    let test = format!("virtio_blk_survives_every_attack_on_{transport}");
    let Some(run) = run(&test, transport, &names(ATTACKS), "") else {
        return;
    };
    check(&run, ATTACKS);
    let _ = std::fs::remove_dir_all(&run.dir);
}

#[test]
fn virtio_blk_survives_every_attack_on_pci() {
    every_attack("pci");
}

#[test]
fn virtio_blk_survives_every_attack_on_mmio() {
    every_attack("mmio");
}

/// An available index more than a queue size ahead of the used index is a broken ring: the
/// device sets DEVICE_NEEDS_RESET (virtio 1.2 2.1.2) and a reset brings it back.
fn avail_ahead(transport: &str) {
    let test = format!("an_avail_index_far_ahead_needs_reset_on_{transport}");
    let expected: &[(&str, &[&str])] = &[("avail_ahead", &["needs_reset"])];
    let Some(run) = run(&test, transport, &names(expected), "") else {
        return;
    };
    check(&run, expected);
    let _ = std::fs::remove_dir_all(&run.dir);
}

#[test]
fn an_avail_index_far_ahead_needs_reset_on_pci() {
    avail_ahead("pci");
}

#[test]
fn an_avail_index_far_ahead_needs_reset_on_mmio() {
    avail_ahead("mmio");
}

/// Writes, discards and write-zeroes to a read-only disk fail (5.2.6.2: IOERR for writes when
/// VIRTIO_BLK_F_RO is offered; discard and write-zeroes were not negotiated) and leave the image
/// as it was.
fn read_only(transport: &str) {
    let test = format!("a_read_only_disk_refuses_writes_on_{transport}");
    let expected: &[(&str, &[&str])] = &[
        ("write", &["ioerr"]),
        ("discard", &["ioerr", "unsupp"]),
        ("write_zeroes", &["ioerr", "unsupp"]),
    ];
    let Some(run) = run(&test, transport, &names(expected), ",readonly=on") else {
        return;
    };
    check(&run, expected);
    let bytes = std::fs::read(&run.image).unwrap();
    for sector in IMAGE_SECTORS - 8..IMAGE_SECTORS {
        for word in 0..64 {
            let at = (sector * 512 + word * 8) as usize;
            let got = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
            assert_eq!(got, pattern_word(sector, word), "sector {sector} changed");
        }
    }
    let _ = std::fs::remove_dir_all(&run.dir);
}

#[test]
fn a_read_only_disk_refuses_writes_on_pci() {
    read_only("pci");
}

#[test]
fn a_read_only_disk_refuses_writes_on_mmio() {
    read_only("mmio");
}

/// What the spec asks of the device: a buffer outside RAM with a good status byte gets IOERR
/// (5.2.6), and a head index outside the queue, which can never be returned on the used ring,
/// gets DEVICE_NEEDS_RESET (2.1.2) instead of silence.
fn strict(transport: &str) {
    let test = format!("strict_{transport}");
    let expected: &[(&str, &[&str])] = &[
        ("past_ram", &["ioerr"]),
        ("pci_hole", &["ioerr"]),
        ("ram_end", &["ioerr"]),
        ("huge_len", &["ioerr"]),
        ("head_oob", &["needs_reset"]),
    ];
    let Some(run) = run(&test, transport, &names(expected), "") else {
        return;
    };
    check(&run, expected);
    let _ = std::fs::remove_dir_all(&run.dir);
}

#[test]
fn buffers_outside_ram_get_ioerr_and_bad_heads_need_reset_on_pci() {
    strict("pci");
}

#[test]
fn buffers_outside_ram_get_ioerr_and_bad_heads_need_reset_on_mmio() {
    strict("mmio");
}

/// Stop wins under attack (issue 14): while the guest hammers the disk with oversized aliased
/// chains, notification storms and broken loops, SIGTERM (with no grace period for an ACPI
/// power-off, which this guest does not handle) ends the VMM within a second, status 128+15.
fn sigterm_under_attack(transport: &str) {
    let test = format!("sigterm_ends_the_vmm_under_attack_on_{transport}");
    if !kvm_available(&test) {
        return;
    }
    let (dir, guest_elf) = build_in_temp(&format!("hostile-{test}"));
    let image = dir.join("disk.img");
    write_pattern_image(&image, IMAGE_SECTORS).unwrap();
    let disk = format!("path={}", image.display());
    let mut guest = Guest::spawn(&[
        "--kernel",
        guest_elf.to_str().unwrap(),
        "--memory",
        "128M",
        "--transport",
        transport,
        "--disk",
        &disk,
        "--shutdown-timeout",
        "0",
        "--cmdline",
        "bench.attack=alias_chain,notify_storm,loop bench.attack_rounds=1000000",
    ]);
    // Two rounds done: the attacks are under way.
    guest.wait_for("bench: attack loop", Duration::from_secs(60));
    guest.wait_for("bench: attack loop", Duration::from_secs(60));
    let sent = std::time::Instant::now();
    guest.signal(libc::SIGTERM);
    let status = guest.wait_exit(Duration::from_secs(10));
    let took = sent.elapsed();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.code().or(status.signal().map(|s| 128 + s)),
        Some(128 + libc::SIGTERM),
        "status {status}{}",
        guest.transcript()
    );
    // wait_exit lets the pipes drain for 50 ms after the exit.
    assert!(
        took < Duration::from_secs(1),
        "SIGTERM took {took:?} to end the VMM{}",
        guest.transcript()
    );
    let log = guest.vmm_log().len();
    assert!(log < STDERR_LIMIT, "the VMM logged {log} bytes");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_ends_the_vmm_under_attack_on_pci() {
    sigterm_under_attack("pci");
}

#[test]
fn sigterm_ends_the_vmm_under_attack_on_mmio() {
    sigterm_under_attack("mmio");
}
