//! The device rows: the bench guest (`tests/bench-guest/`) measuring virtio-blk from guest
//! ring 3, on our VMM and on QEMU, per transport (virtio-pci: ours against `-M q35` with
//! `virtio-blk-pci`, and against Cloud Hypervisor where one is given; virtio-mmio: ours against
//! `-M microvm` with `virtio-blk-device`, and against Firecracker where one is given), on the
//! same image, alternating runs. Ours runs twice per round, on io_uring (the default) and on the
//! synchronous engine (`io_engine=sync`), for rows of their own that show what io_uring changes. Host CPU time is sampled from `/proc/PID/stat` when the guest starts
//! a test and when it prints the result, so it covers that test only; the vCPUs' guest time
//! (the guest's polling loop) is left out, leaving what the VMM and the host kernel spent for it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use integration_tests::bench::{
    guest_error, parse_guest_line, parse_proc_stat_cpu, Cell, GuestLine, ProcCpu, Row,
};
use integration_tests::bench_guest;

use crate::cloud_hypervisor::{self, CloudHypervisorVm};
use crate::firecracker::{self, FirecrackerVm};
use crate::Watchdog;

/// What the device rows need from the command line.
pub struct DeviceOptions {
    pub vmm: PathBuf,
    pub qemu: Option<PathBuf>,
    pub firecracker: Option<PathBuf>,
    pub cloud_hypervisor: Option<PathBuf>,
    pub runs: usize,
    pub secs: f64,
    pub image_mib: u64,
}

/// The blk tests, in the guest's order, and the figures each row shows.
const TESTS: &str = "qd1,qd32,seq,flush,mixed";

/// One figure of the table: the guest line's name, its field, the row's label and unit.
pub struct Figure {
    pub line: &'static str,
    pub field: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
}

/// One row of host CPU time: the VMM's CPU between the guest's `start TEST` line and the result
/// `line`, in microseconds per `count` field of the result line times `scale`.
pub struct CpuFigure {
    pub start: &'static str,
    pub line: &'static str,
    pub label: &'static str,
    pub count: &'static str,
    pub scale: f64,
    pub unit: &'static str,
}

const FIGURES: &[Figure] = &[
    Figure {
        line: "blk qd1 randread",
        field: "iops",
        label: "4 KiB randread qd1",
        unit: "IOPS",
    },
    Figure {
        line: "blk qd1 randread",
        field: "lat_mean_us",
        label: "  qd1 mean latency",
        unit: "us",
    },
    Figure {
        line: "blk qd1 randread",
        field: "lat_p99_us",
        label: "  qd1 p99 latency",
        unit: "us",
    },
    Figure {
        line: "blk qd32 randread",
        field: "iops",
        label: "4 KiB randread qd32",
        unit: "IOPS",
    },
    Figure {
        line: "blk qd32 randread",
        field: "lat_p99_us",
        label: "  qd32 p99 latency",
        unit: "us",
    },
    Figure {
        line: "blk seqread",
        field: "mb_s",
        label: "1 MiB seqread qd4",
        unit: "MB/s",
    },
    Figure {
        line: "blk seqwrite",
        field: "mb_s",
        label: "1 MiB seqwrite qd4",
        unit: "MB/s",
    },
    Figure {
        line: "blk flush",
        field: "ops_s",
        label: "4 KiB write + flush",
        unit: "ops/s",
    },
    Figure {
        line: "blk mixed",
        field: "read_iops",
        label: "randread qd31 beside write + flush",
        unit: "IOPS",
    },
    Figure {
        line: "blk mixed",
        field: "read_p99_us",
        label: "  its reads' p99 latency",
        unit: "us",
    },
    Figure {
        line: "blk mixed",
        field: "flush_ops_s",
        label: "  its write + flush",
        unit: "ops/s",
    },
];

/// Host CPU rows: per request for the random and flush tests, per MB for the sequential ones.
const CPU_FIGURES: &[CpuFigure] = &[
    cpu_per_request(
        "start blk qd1",
        "blk qd1 randread",
        "  host CPU per request, qd1",
    ),
    cpu_per_request(
        "start blk qd32",
        "blk qd32 randread",
        "  host CPU per request, qd32",
    ),
    cpu_per_mb(
        "start blk seqread",
        "blk seqread",
        "  host CPU per MB, seqread",
    ),
    cpu_per_mb(
        "start blk seqwrite",
        "blk seqwrite",
        "  host CPU per MB, seqwrite",
    ),
    cpu_per_request("start blk flush", "blk flush", "  host CPU per write+flush"),
    cpu_per_request(
        "start blk mixed",
        "blk mixed",
        "  host CPU per request, mixed",
    ),
];

const fn cpu_per_request(
    start: &'static str,
    line: &'static str,
    label: &'static str,
) -> CpuFigure {
    CpuFigure {
        start,
        line,
        label,
        count: "reqs",
        scale: 1.0,
        unit: "us",
    }
}

/// 1 MiB requests, counted in MB.
const fn cpu_per_mb(start: &'static str, line: &'static str, label: &'static str) -> CpuFigure {
    CpuFigure {
        start,
        line,
        label,
        count: "reqs",
        scale: 1.048_576,
        unit: "us/MB",
    }
}

/// What a run calls with the name of each guest line as it appears (the network rows' sender
/// follows the receive tests with it).
pub type LineHook = Arc<dyn Fn(&str) + Send + Sync>;

/// One run's result lines, each with the VMM's CPU time when it appeared.
pub struct Run {
    lines: Vec<(GuestLine, Option<ProcCpu>)>,
    console: String,
    problem: Option<String>,
}

impl Run {
    /// A run that could not start.
    pub fn failed(problem: String) -> Run {
        Run {
            lines: Vec::new(),
            console: String::new(),
            problem: Some(problem),
        }
    }

    fn line(&self, name: &str) -> Option<&GuestLine> {
        self.lines.iter().map(|(l, _)| l).find(|l| l.name == name)
    }

    fn number(&self, name: &str, field: &str) -> Option<f64> {
        self.line(name)?.number(field)
    }

    /// Why the guest skipped the test of result line `name`, if it did (`skipped=REASON` in
    /// that line's place: a device without a feature the test needs).
    fn skipped(&self, name: &str) -> Option<&str> {
        self.line(name)?.field("skipped")
    }

    /// The VMM's CPU seconds between the `start` line and the result line.
    fn cpu_secs(&self, start: &str, result: &str) -> Option<f64> {
        let at = |name: &str| {
            self.lines
                .iter()
                .find(|(l, _)| l.name == name)
                .and_then(|(_, cpu)| *cpu)
        };
        let start = at(start)?;
        let end = at(result)?;
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        (hz > 0).then(|| end.vmm().saturating_sub(start.vmm()) as f64 / hz as f64)
    }

    /// Microseconds of host CPU per unit of `figure`.
    fn cpu_per_unit(&self, figure: &CpuFigure) -> Option<f64> {
        let secs = self.cpu_secs(figure.start, figure.line)?;
        let units = self.line(figure.line)?.number(figure.count)? * figure.scale;
        (units > 0.0).then(|| secs * 1e6 / units)
    }
}

fn read_cpu(pid: u32) -> Option<ProcCpu> {
    parse_proc_stat_cpu(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Runs one VMM with the guest until it exits (or `timeout`), sampling its CPU time at each
/// `bench:` line and handing each line's name to `on_line`. `ok_codes` are the exit codes of a
/// clean end.
pub fn run_guest(
    command: &mut Command,
    ok_codes: &[i32],
    timeout: Duration,
    on_line: Option<LineHook>,
) -> Run {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return Run::failed(format!("cannot run it: {e}")),
    };
    let pid = child.id();
    let stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let reader = thread::spawn(move || {
        let mut lines = Vec::new();
        let mut console = String::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(parsed) = parse_guest_line(&line) {
                let cpu = read_cpu(pid);
                if let Some(hook) = &on_line {
                    hook(&parsed.name);
                }
                lines.push((parsed, cpu));
            }
            console.push_str(&line);
            console.push('\n');
        }
        (lines, console)
    });
    let errors = thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let watchdog = Watchdog::start(pid as libc::pid_t, timeout, None);
    let status = child.wait();
    watchdog.finish();
    let (lines, console) = reader.join().unwrap_or_default();
    let stderr = errors.join().unwrap_or_default();
    let code = status.ok().and_then(|s| s.code());
    let problem = if let Some(e) = guest_error(&console) {
        Some(format!("guest: {e}"))
    } else if !code.is_some_and(|c| ok_codes.contains(&c)) {
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        Some(format!(
            "status {code:?}: {}",
            last.chars().take(200).collect::<String>()
        ))
    } else if !console.contains("bench: done") {
        Some("no `bench: done` line".to_string())
    } else {
        None
    };
    Run {
        lines,
        console,
        problem,
    }
}

/// Our VMM with the disk on `engine` (`async`: io_uring, the default; `sync`).
fn our_command(
    o: &DeviceOptions,
    guest: &Path,
    image: &Path,
    transport: &str,
    engine: &str,
) -> Command {
    let mut command = Command::new(&o.vmm);
    command
        .arg("--kernel")
        .arg(guest)
        .args(["--memory", "256M", "--transport", transport, "--disk"])
        .arg(format!("path={},io_engine={engine}", image.display()))
        .arg("--cmdline")
        .arg(bench_guest::cmdline(TESTS, o.secs))
        .env_remove("RUST_LOG");
    command
}

/// QEMU with the same image on virtio-blk over io_uring: q35 with a modern-only
/// `virtio-blk-pci`, or microvm (ACPI off, so that QEMU lists its virtio-mmio windows on the
/// command line as `virtio_mmio.device=`) with modern virtio-mmio. No `-cpu host` (see
/// `qemu_tiny_command`).
fn qemu_command(
    qemu: &Path,
    o: &DeviceOptions,
    guest: &Path,
    image: &Path,
    transport: &str,
) -> Command {
    let device = if transport == "pci" {
        "virtio-blk-pci,drive=d0,disable-legacy=on"
    } else {
        "virtio-blk-device,drive=d0"
    };
    let mut command = qemu_for_bench_guest(Command::new(qemu), transport, guest);
    command
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=d0,format=raw,aio=io_uring",
            image.display()
        ))
        .args(["-device", device, "-append"])
        .arg(bench_guest::cmdline(TESTS, o.secs));
    command
}

/// `command` (QEMU, or `ip netns exec ... QEMU`) with the bench guest on `transport`'s machine:
/// q35 for virtio-pci, microvm (ACPI off, so that QEMU lists its virtio-mmio windows on the
/// command line as `virtio_mmio.device=`) with modern virtio-mmio; 256 MiB, the serial console
/// on stdout, and `isa-debug-exit` for the guest's stop. The caller adds the device and
/// `-append`.
pub fn qemu_for_bench_guest(mut command: Command, transport: &str, guest: &Path) -> Command {
    let machine = if transport == "pci" {
        "q35"
    } else {
        "microvm,x-option-roms=off,rtc=off,isa-serial=on,acpi=off"
    };
    command
        .args([
            "-M",
            machine,
            "-enable-kvm",
            "-m",
            "256",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-display", "none", "-serial", "stdio", "-no-reboot"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .args(["-global", "virtio-mmio.force-legacy=off"])
        .arg("-kernel")
        .arg(guest);
    command
}

/// Samples of one side (a VMM, one way of running it) of one transport.
pub struct Side {
    figures: &'static [Figure],
    cpu_figures: &'static [CpuFigure],
    samples: Vec<Vec<f64>>,
    cpu: Vec<Vec<f64>>,
    /// Per figure, why the guest skipped its test, if it ever did.
    skipped: Vec<Option<String>>,
    failure: Option<String>,
    console_of_failure: Option<String>,
}

impl Side {
    pub fn new(figures: &'static [Figure], cpu_figures: &'static [CpuFigure]) -> Side {
        Side {
            figures,
            cpu_figures,
            samples: vec![Vec::new(); figures.len()],
            cpu: vec![Vec::new(); cpu_figures.len()],
            skipped: vec![None; figures.len()],
            failure: None,
            console_of_failure: None,
        }
    }

    pub fn add(&mut self, run: Run) {
        if let Some(p) = run.problem {
            if self.failure.is_none() {
                self.failure = Some(p);
                self.console_of_failure = Some(run.console);
            }
            return;
        }
        for ((samples, skipped), f) in self
            .samples
            .iter_mut()
            .zip(&mut self.skipped)
            .zip(self.figures)
        {
            samples.extend(run.number(f.line, f.field));
            if let Some(why) = run.skipped(f.line) {
                skipped.get_or_insert_with(|| why.to_string());
            }
        }
        for (samples, f) in self.cpu.iter_mut().zip(self.cpu_figures) {
            samples.extend(run.cpu_per_unit(f));
        }
    }

    /// The cell of `samples`; `line` is their result line, which the guest may have skipped.
    fn cell(&self, samples: &[f64], line: &str) -> Cell {
        let skipped = self
            .figures
            .iter()
            .zip(&self.skipped)
            .find_map(|(f, why)| why.as_deref().filter(|_| f.line == line));
        match (&self.failure, skipped, samples.is_empty()) {
            (Some(why), _, true) => Cell::Failed(why.clone()),
            (None, Some(why), true) => Cell::NotMeasured(format!("the guest skipped it: {why}")),
            _ => Cell::from_samples(samples, "no such line"),
        }
    }

    /// Says on stderr why a run of this side failed, with its console.
    pub fn report_failure(&self, what: &str) {
        if let (Some(why), Some(console)) = (&self.failure, &self.console_of_failure) {
            eprintln!("vmm-bench: a {what} run failed: {why}\n{console}");
        }
    }

    /// The rows against a peer that may be absent: all of them against `peer`, or one row
    /// saying why it was not measured.
    pub fn rows_against_peer(&self, peer: Option<&Side>, absent: &str, prefix: &str) -> Vec<Row> {
        match peer {
            Some(peer) => self.rows_against(Ok(peer), prefix),
            None => vec![Row {
                case: prefix.into(),
                unit: "-".into(),
                ours: Cell::NotMeasured("see the rows above".into()),
                other: Cell::NotMeasured(absent.into()),
            }],
        }
    }

    /// The rows of this side's figures against `other`'s (`Err`: not measured, and why),
    /// labelled `prefix: LABEL`.
    pub fn rows_against(&self, other: Result<&Side, &str>, prefix: &str) -> Vec<Row> {
        let other_cell = |i: usize, cpu: bool| match other {
            Ok(o) if cpu => o.cell(&o.cpu[i], o.cpu_figures[i].line),
            Ok(o) => o.cell(&o.samples[i], o.figures[i].line),
            Err(why) => Cell::NotMeasured(why.to_string()),
        };
        let figures = self.figures.iter().enumerate().map(|(i, f)| Row {
            case: format!("{prefix}: {}", f.label),
            unit: f.unit.into(),
            ours: self.cell(&self.samples[i], f.line),
            other: other_cell(i, false),
        });
        let cpu = self.cpu_figures.iter().enumerate().map(|(i, f)| Row {
            case: format!("{prefix}:{}", f.label),
            unit: f.unit.into(),
            ours: self.cell(&self.cpu[i], f.line),
            other: other_cell(i, true),
        });
        figures.chain(cpu).collect()
    }
}

/// Runs the device cases and returns their rows.
pub fn device_rows(
    o: &DeviceOptions,
    dir: &Path,
    progress: &dyn Fn(&str, usize, usize),
) -> Vec<Row> {
    let guest = match bench_guest::build(dir) {
        Ok(g) => g,
        Err(e) => return vec![failed_row("bench guest", &e)],
    };
    let image = dir.join("bench-disk.img");
    if let Err(e) = bench_guest::write_pattern_image(&image, o.image_mib << 11) {
        return vec![failed_row("bench disk image", &e.to_string())];
    }
    let timeout = Duration::from_secs_f64(o.secs * 10.0 + 300.0);
    let mut rows = Vec::new();
    for transport in ["pci", "mmio"] {
        let mut ours = Side::new(FIGURES, CPU_FIGURES);
        let mut ours_sync = Side::new(FIGURES, CPU_FIGURES);
        let mut qemu = Side::new(FIGURES, CPU_FIGURES);
        let mut fc = Side::new(FIGURES, CPU_FIGURES);
        let mut ch = Side::new(FIGURES, CPU_FIGURES);
        // Firecracker has virtio-mmio only, Cloud Hypervisor virtio-pci only.
        let fc_binary = o.firecracker.as_ref().filter(|_| transport == "mmio");
        let ch_binary = o.cloud_hypervisor.as_ref().filter(|_| transport == "pci");
        let cmdline = bench_guest::cmdline(TESTS, o.secs);
        let ch_vm = CloudHypervisorVm {
            kernel: &guest,
            cmdline: &cmdline,
            mem_mib: 256,
            disk: Some(&image),
            tap: None,
        };
        let fc_config = FirecrackerVm {
            kernel: &guest,
            cmdline: &cmdline,
            mem_mib: 256,
            disk: Some(&image),
            tap: None,
        }
        .write_config(dir, "firecracker-blk");
        for round in 0..=o.runs {
            progress(
                &format!("virtio-blk bench guest, {transport}"),
                round,
                o.runs,
            );
            // Ours on io_uring, ours on the synchronous engine (the step before), then QEMU.
            for (side, engine) in [(&mut ours, "async"), (&mut ours_sync, "sync")] {
                let run = run_guest(
                    &mut our_command(o, &guest, &image, transport, engine),
                    &[0],
                    timeout,
                    None,
                );
                if round > 0 {
                    side.add(run);
                }
            }
            if let Some(q) = &o.qemu {
                // isa-debug-exit ends QEMU with (0 << 1) | 1.
                let run = run_guest(
                    &mut qemu_command(q, o, &guest, &image, transport),
                    &[1],
                    timeout,
                    None,
                );
                if round > 0 {
                    qemu.add(run);
                }
            }
            if let Some(binary) = fc_binary {
                let run = match &fc_config {
                    Ok(config) => run_guest(
                        &mut firecracker::command(binary, config, &[]),
                        &[0],
                        timeout,
                        None,
                    ),
                    Err(e) => Run::failed(e.clone()),
                };
                if round > 0 {
                    fc.add(run);
                }
            }
            if let Some(binary) = ch_binary {
                let run = run_guest(&mut ch_vm.command(binary, &[]), &[0], timeout, None);
                if round > 0 {
                    ch.add(run);
                }
            }
        }
        for (side, vmm) in [
            (&ours, "our"),
            (&ours_sync, "our sync-engine"),
            (&qemu, "QEMU"),
            (&fc, "Firecracker"),
            (&ch, "Cloud Hypervisor"),
        ] {
            side.report_failure(&format!("{vmm} virtio-blk {transport}"));
        }
        let qemu_side = match &o.qemu {
            Some(_) => Ok(&qemu),
            None => Err("no QEMU (--qemu)"),
        };
        rows.extend(ours.rows_against(qemu_side, &format!("virtio-blk {transport}")));
        if transport == "mmio" {
            rows.extend(ours.rows_against_peer(
                fc_binary.map(|_| &fc),
                firecracker::ABSENT,
                "virtio-blk mmio, Firecracker",
            ));
        } else {
            rows.extend(ours.rows_against_peer(
                ch_binary.map(|_| &ch),
                cloud_hypervisor::ABSENT,
                "virtio-blk pci, Cloud Hypervisor",
            ));
        }
        // The io_uring step itself: ours against ours on the synchronous engine.
        rows.extend(ours.rows_against(
            Ok(&ours_sync),
            &format!("virtio-blk {transport}, io_uring vs sync engine"),
        ));
    }
    rows
}

pub fn failed_row(case: &str, why: &str) -> Row {
    Row {
        case: case.into(),
        unit: "-".into(),
        ours: Cell::Failed(why.lines().next().unwrap_or("").to_string()),
        other: Cell::NotMeasured("not run".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIGURES: &[Figure] = &[
        Figure {
            line: "net rx64",
            field: "fps",
            label: "tap -> guest, 64 B frames",
            unit: "frames/s",
        },
        Figure {
            line: "net rx65535",
            field: "fps",
            label: "tap -> guest, 64 KiB frames, merged",
            unit: "frames/s",
        },
    ];

    fn run(console: &[&str]) -> Run {
        Run {
            lines: console
                .iter()
                .map(|l| (parse_guest_line(l).expect("a bench line"), None))
                .collect(),
            console: console.join("\n"),
            problem: None,
        }
    }

    /// A test the guest skipped (a device without the feature it needs) is not measured, with
    /// the guest's reason, where a missing line is a failure.
    #[test]
    fn a_skipped_test_is_not_measured_and_says_why() {
        let mut side = Side::new(FIGURES, &[]);
        side.add(run(&[
            "bench: net rx64 fps=1000 frames=2000",
            "bench: net rx65535 skipped=no-mergeable-buffers",
        ]));
        let rows = side.rows_against(Err("-"), "virtio-net");
        assert!(matches!(rows[0].ours, Cell::Measured(_)));
        match &rows[1].ours {
            Cell::NotMeasured(why) => assert!(why.contains("no-mergeable-buffers"), "{why}"),
            other => panic!("expected not measured, got {other:?}"),
        }
        let mut silent = Side::new(FIGURES, &[]);
        silent.add(run(&["bench: net rx64 fps=1000 frames=2000"]));
        let rows = silent.rows_against(Err("-"), "virtio-net");
        assert!(matches!(&rows[1].ours, Cell::Failed(why) if why == "no such line"));
    }
}
