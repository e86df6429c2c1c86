//! The virtio-net rows: the bench guest's network tests (`tests/bench-guest/net.c`) on our VMM
//! and on QEMU (`-M q35` with `virtio-net-pci` for virtio-pci, `-M microvm` with
//! `virtio-net-device` for virtio-mmio, its tap backend with vhost off, and with vhost on where
//! the host has `/dev/vhost-net`; on virtio-mmio with one pair also Firecracker, and on
//! virtio-pci Cloud Hypervisor, where one is given), alternating runs, on one tap in a network namespace the bench
//! creates. The host's side ([`NetPeer`]) takes the guest's frames on a UDP socket and sends the
//! guest frames while a receive test runs. Frames are counted by the guest: those the device
//! finished sending, those it received.
//!
//! The `net-mq` case runs the same tests on two queue pairs (`VIRTIO_NET_F_MQ`): a multi-queue
//! tap, `--net tap=NAME,queues=2` against QEMU's `queues=2` and `mq=on`, the guest's
//! `bench.netq=2`, and the host sending from several ports so that its frames spread over both
//! receive queues.

use std::net::UdpSocket;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use integration_tests::bench::Row;
use integration_tests::bench_guest::{self, net_cmdline, NetPeer, NET_HOST_IP};
use integration_tests::netns::{NetNs, TAP_MAX_MTU};

use crate::cloud_hypervisor::{self, CloudHypervisorVm};
use crate::devices::{
    failed_row, qemu_for_bench_guest, run_guest, CpuFigure, DeviceOptions, Figure, LineHook, Run,
    Side,
};
use crate::firecracker::{self, FirecrackerVm};

/// The network tests, in the guest's order.
const TESTS: &str = "tx64,tx1500,rx64,rx1500,rx65535";

const FIGURES: &[Figure] = &[
    fps("net tx64", "guest -> tap, 64 B frames"),
    fps("net tx1500", "guest -> tap, 1500 B frames"),
    fps("net rx64", "tap -> guest, 64 B frames"),
    fps("net rx1500", "tap -> guest, 1500 B frames"),
    fps("net rx65535", "tap -> guest, 64 KiB frames, merged"),
];

const CPU_FIGURES: &[CpuFigure] = &[
    per_frame("start net tx64", "net tx64", "  host CPU per frame, tx64"),
    per_frame(
        "start net tx1500",
        "net tx1500",
        "  host CPU per frame, tx1500",
    ),
    per_frame("start net rx64", "net rx64", "  host CPU per frame, rx64"),
    per_frame(
        "start net rx1500",
        "net rx1500",
        "  host CPU per frame, rx1500",
    ),
    per_frame(
        "start net rx65535",
        "net rx65535",
        "  host CPU per frame, rx65535",
    ),
];

const fn fps(line: &'static str, label: &'static str) -> Figure {
    Figure {
        line,
        field: "fps",
        label,
        unit: "frames/s",
    }
}

const fn per_frame(start: &'static str, line: &'static str, label: &'static str) -> CpuFigure {
    CpuFigure {
        start,
        line,
        label,
        count: "frames",
        scale: 1.0,
        unit: "us",
    }
}

/// The namespace and tap of the bench (one at a time: the bench runs one VMM at a time).
const NETNS: &str = "vmm-bench-net";
const TAP: &str = "vmmbench0";
/// How each VMM's command runs inside that namespace.
const IN_NETNS: [&str; 4] = ["ip", "netns", "exec", NETNS];

/// The guest's command line for `pairs` queue pairs.
fn guest_cmdline(o: &DeviceOptions, pairs: usize) -> String {
    format!("{} bench.netq={pairs}", net_cmdline(TESTS, o.secs))
}

fn our_command(o: &DeviceOptions, guest: &Path, transport: &str, pairs: usize) -> Command {
    let mut command = crate::wrapped_command(&o.vmm, &IN_NETNS);
    command
        .arg("--kernel")
        .arg(guest)
        .args(["--memory", "256M", "--transport", transport, "--net"])
        .arg(format!("tap={TAP},queues={pairs}"))
        .arg("--cmdline")
        .arg(guest_cmdline(o, pairs))
        .env_remove("RUST_LOG");
    command
}

/// QEMU on the same tap: q35 with a modern-only `virtio-net-pci` (no option ROM), or microvm
/// with modern virtio-mmio (as for the disk rows).
/// With more than one pair: `queues=N` on the tap, `mq=on` on the device (and on PCI a vector
/// per queue, the control queue's and the configuration's).
fn qemu_command(
    qemu: &Path,
    o: &DeviceOptions,
    guest: &Path,
    transport: &str,
    vhost: bool,
    pairs: usize,
) -> Command {
    let mut device = if transport == "pci" {
        "virtio-net-pci,netdev=n0,disable-legacy=on,romfile=".to_string()
    } else {
        "virtio-net-device,netdev=n0".to_string()
    };
    let mut tap_queues = String::new();
    if pairs > 1 {
        tap_queues = format!(",queues={pairs}");
        device.push_str(",mq=on");
        if transport == "pci" {
            device.push_str(&format!(",vectors={}", 2 * pairs + 2));
        }
    }
    let vhost = if vhost { "on" } else { "off" };
    let mut command =
        qemu_for_bench_guest(crate::wrapped_command(qemu, &IN_NETNS), transport, guest);
    command
        .arg("-netdev")
        .arg(format!(
            "tap,id=n0,ifname={TAP},script=no,downscript=no,vhost={vhost}{tap_queues}"
        ))
        .args(["-device", &device, "-append"])
        .arg(guest_cmdline(o, pairs));
    command
}

/// Runs the network cases on `pairs` queue pairs and returns their rows.
pub fn net_rows(
    o: &DeviceOptions,
    dir: &Path,
    progress: &dyn Fn(&str, usize, usize),
    pairs: usize,
) -> Vec<Row> {
    let guest = match bench_guest::build(dir) {
        Ok(g) => g,
        Err(e) => return vec![failed_row("bench guest", &e)],
    };
    let netns = if pairs > 1 {
        NetNs::new_multi_queue(NETNS, TAP, NET_HOST_IP)
    } else {
        NetNs::new(NETNS, TAP, NET_HOST_IP)
    };
    netns.set_mtu(TAP_MAX_MTU);
    let device = if pairs > 1 {
        format!("virtio-net, {pairs} pairs,")
    } else {
        "virtio-net".to_string()
    };
    let peer = match NetPeer::new(|addr| netns.inside(move || UdpSocket::bind(addr))) {
        Ok(peer) => Arc::new(peer),
        Err(e) => return vec![failed_row("virtio-net host sockets", &e.to_string())],
    };
    let vhost = Path::new("/dev/vhost-net").exists();
    let timeout = Duration::from_secs_f64(o.secs * 10.0 + 300.0);
    let mut rows = Vec::new();
    for transport in ["pci", "mmio"] {
        let mut ours = Side::new(FIGURES, CPU_FIGURES);
        let mut qemu = Side::new(FIGURES, CPU_FIGURES);
        let mut qemu_vhost = Side::new(FIGURES, CPU_FIGURES);
        let mut fc = Side::new(FIGURES, CPU_FIGURES);
        let mut ch = Side::new(FIGURES, CPU_FIGURES);
        // Cloud Hypervisor has virtio-pci only.
        let ch_binary = o.cloud_hypervisor.as_ref().filter(|_| transport == "pci");
        // Firecracker has virtio-mmio only, and one queue pair per device.
        let fc_binary = o
            .firecracker
            .as_ref()
            .filter(|_| transport == "mmio" && pairs == 1);
        let cmdline = guest_cmdline(o, pairs);
        let fc_config = FirecrackerVm {
            kernel: &guest,
            cmdline: &cmdline,
            mem_mib: 256,
            disk: None,
            tap: Some(TAP),
        }
        .write_config(dir, "firecracker-net");
        let ch_vm = CloudHypervisorVm {
            kernel: &guest,
            cmdline: &cmdline,
            mem_mib: 256,
            disk: None,
            tap: Some((TAP, pairs)),
        };
        for round in 0..=o.runs {
            progress(&format!("{device} bench guest, {transport}"), round, o.runs);
            let follow = {
                let peer = peer.clone();
                Some(Arc::new(move |name: &str| peer.follow(name)) as LineHook)
            };
            let run = run_guest(
                &mut our_command(o, &guest, transport, pairs),
                &[0],
                timeout,
                follow.clone(),
            );
            peer.send(0);
            if round > 0 {
                ours.add(run);
            }
            // isa-debug-exit ends QEMU with (0 << 1) | 1.
            for (side, with_vhost) in [(&mut qemu, false), (&mut qemu_vhost, true)] {
                let Some(q) = o.qemu.as_ref().filter(|_| vhost || !with_vhost) else {
                    continue;
                };
                let run = run_guest(
                    &mut qemu_command(q, o, &guest, transport, with_vhost, pairs),
                    &[1],
                    timeout,
                    follow.clone(),
                );
                peer.send(0);
                if round > 0 {
                    side.add(run);
                }
            }
            if let Some(binary) = fc_binary {
                let run = match &fc_config {
                    Ok(config) => run_guest(
                        &mut firecracker::command(binary, config, &IN_NETNS),
                        &[0],
                        timeout,
                        follow.clone(),
                    ),
                    Err(e) => Run::failed(e.clone()),
                };
                peer.send(0);
                if round > 0 {
                    fc.add(run);
                }
            }
            if let Some(binary) = ch_binary {
                let run = run_guest(
                    &mut ch_vm.command(binary, &IN_NETNS),
                    &[0],
                    timeout,
                    follow.clone(),
                );
                peer.send(0);
                if round > 0 {
                    ch.add(run);
                }
            }
        }
        for (side, vmm) in [
            (&ours, "our"),
            (&qemu, "QEMU vhost=off"),
            (&qemu_vhost, "QEMU vhost=on"),
            (&fc, "Firecracker"),
            (&ch, "Cloud Hypervisor"),
        ] {
            side.report_failure(&format!("{vmm} {device} {transport}"));
        }
        let prefix = format!("{device} {transport}");
        if o.qemu.is_none() {
            rows.extend(ours.rows_against(Err("no QEMU (--qemu)"), &prefix));
        } else {
            rows.extend(ours.rows_against(Ok(&qemu), &format!("{prefix} (QEMU vhost=off)")));
            // Without vhost-net, one row says why, rather than a column of them.
            rows.extend(ours.rows_against_peer(
                vhost.then_some(&qemu_vhost),
                "no /dev/vhost-net on this host",
                &format!("{prefix} (QEMU vhost=on)"),
            ));
        }
        if transport == "mmio" && pairs == 1 {
            rows.extend(ours.rows_against_peer(
                fc_binary.map(|_| &fc),
                firecracker::ABSENT,
                &format!("{prefix} (Firecracker)"),
            ));
        }
        if transport == "pci" {
            rows.extend(ours.rows_against_peer(
                ch_binary.map(|_| &ch),
                cloud_hypervisor::ABSENT,
                &format!("{prefix} (Cloud Hypervisor)"),
            ));
        }
    }
    rows
}
