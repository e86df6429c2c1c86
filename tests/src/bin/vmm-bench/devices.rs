//! The device rows: the bench guest (`tests/bench-guest/`) measuring virtio-blk from guest
//! ring 3, on our VMM and on QEMU, per transport (virtio-pci: ours against `-M q35` with
//! `virtio-blk-pci`; virtio-mmio: ours against `-M microvm` with `virtio-blk-device`), on the same
//! image, alternating runs. Ours runs twice per round, on io_uring (the default) and on the
//! synchronous engine (`io_engine=sync`), for rows of their own that show what io_uring changes. Host CPU time is sampled from `/proc/PID/stat` when the guest starts
//! a test and when it prints the result, so it covers that test only; the vCPUs' guest time
//! (the guest's polling loop) is left out, leaving what the VMM and the host kernel spent for it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use integration_tests::bench::{
    guest_error, parse_guest_line, parse_proc_stat_cpu, Cell, GuestLine, ProcCpu, Row,
};
use integration_tests::bench_guest;

/// What the device rows need from the command line.
pub struct DeviceOptions {
    pub vmm: PathBuf,
    pub qemu: Option<PathBuf>,
    pub runs: usize,
    pub secs: f64,
    pub image_mib: u64,
}

/// The blk tests, in the guest's order, and the figures each row shows.
const TESTS: &str = "qd1,qd32,seq,flush";

/// One figure of the table: the guest line's name, its field, the row's label and unit.
struct Figure {
    line: &'static str,
    field: &'static str,
    label: &'static str,
    unit: &'static str,
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
];

/// Host CPU rows: per request for the random and flush tests, per MB for the sequential ones.
const CPU_FIGURES: &[(&str, &str, &str)] = &[
    ("qd1", "blk qd1 randread", "  host CPU per request, qd1"),
    ("qd32", "blk qd32 randread", "  host CPU per request, qd32"),
    ("seqread", "blk seqread", "  host CPU per MB, seqread"),
    ("seqwrite", "blk seqwrite", "  host CPU per MB, seqwrite"),
    ("flush", "blk flush", "  host CPU per write+flush"),
];

/// One run's result lines, each with the VMM's CPU time when it appeared.
struct Run {
    lines: Vec<(GuestLine, Option<ProcCpu>)>,
    console: String,
    problem: Option<String>,
}

impl Run {
    fn line(&self, name: &str) -> Option<&GuestLine> {
        self.lines.iter().map(|(l, _)| l).find(|l| l.name == name)
    }

    fn number(&self, name: &str, field: &str) -> Option<f64> {
        self.line(name)?.number(field)
    }

    /// The VMM's CPU seconds between `bench: start blk TEST` and the result line.
    fn cpu_secs(&self, test: &str, result: &str) -> Option<f64> {
        let at = |name: &str| {
            self.lines
                .iter()
                .find(|(l, _)| l.name == name)
                .and_then(|(_, cpu)| *cpu)
        };
        let start = at(&format!("start blk {test}"))?;
        let end = at(result)?;
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        (hz > 0).then(|| end.vmm().saturating_sub(start.vmm()) as f64 / hz as f64)
    }

    /// Microseconds of host CPU per request, or per MB for the sequential tests.
    fn cpu_per_unit(&self, test: &str, result: &str) -> Option<f64> {
        let secs = self.cpu_secs(test, result)?;
        let line = self.line(result)?;
        let units = if test.starts_with("seq") {
            line.number("reqs")? * 1.048_576
        } else {
            line.number("reqs")?
        };
        (units > 0.0).then(|| secs * 1e6 / units)
    }
}

fn read_cpu(pid: u32) -> Option<ProcCpu> {
    parse_proc_stat_cpu(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Runs one VMM with the guest until it exits (or `timeout`), sampling its CPU time at each
/// `bench:` line. `ok_codes` are the exit codes of a clean end.
fn run_guest(command: &mut Command, ok_codes: &[i32], timeout: Duration) -> Run {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            return Run {
                lines: Vec::new(),
                console: String::new(),
                problem: Some(format!("cannot run it: {e}")),
            }
        }
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
                lines.push((parsed, read_cpu(pid)));
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
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        thread::spawn(move || {
            let deadline = Instant::now() + timeout;
            while !done.load(Ordering::Acquire) {
                if Instant::now() >= deadline {
                    // SAFETY: kill only signals our own child, which is not reaped before
                    // `done` is set.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                    return;
                }
                thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let status = child.wait();
    done.store(true, Ordering::Release);
    let _ = watchdog.join();
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
    let (machine, device) = if transport == "pci" {
        ("q35", "virtio-blk-pci,drive=d0,disable-legacy=on")
    } else {
        (
            "microvm,x-option-roms=off,rtc=off,isa-serial=on,acpi=off",
            "virtio-blk-device,drive=d0",
        )
    };
    let mut command = Command::new(qemu);
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
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=d0,format=raw,aio=io_uring",
            image.display()
        ))
        .args(["-device", device, "-kernel"])
        .arg(guest)
        .arg("-append")
        .arg(bench_guest::cmdline(TESTS, o.secs));
    command
}

/// Samples of one side of one transport.
#[derive(Default)]
struct Side {
    figures: Vec<Vec<f64>>,
    cpu: Vec<Vec<f64>>,
    failure: Option<String>,
    console_of_failure: Option<String>,
}

impl Side {
    fn new() -> Side {
        Side {
            figures: vec![Vec::new(); FIGURES.len()],
            cpu: vec![Vec::new(); CPU_FIGURES.len()],
            ..Side::default()
        }
    }

    fn add(&mut self, run: Run) {
        if let Some(p) = run.problem {
            if self.failure.is_none() {
                self.failure = Some(p);
                self.console_of_failure = Some(run.console);
            }
            return;
        }
        for (samples, f) in self.figures.iter_mut().zip(FIGURES) {
            samples.extend(run.number(f.line, f.field));
        }
        for (samples, (test, line, _)) in self.cpu.iter_mut().zip(CPU_FIGURES) {
            samples.extend(run.cpu_per_unit(test, line));
        }
    }

    fn cell(&self, samples: &[f64]) -> Cell {
        match (&self.failure, samples.is_empty()) {
            (Some(why), true) => Cell::Failed(why.clone()),
            _ => Cell::from_samples(samples, "no such line"),
        }
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
        let mut ours = Side::new();
        let mut ours_sync = Side::new();
        let mut qemu = Side::new();
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
                );
                if round > 0 {
                    qemu.add(run);
                }
            }
        }
        for side in [&ours, &ours_sync, &qemu] {
            if let (Some(why), Some(console)) = (&side.failure, &side.console_of_failure) {
                eprintln!("vmm-bench: a {transport} device run failed: {why}\n{console}");
            }
        }
        let qemu_cell = |side: &Side, samples: &[f64]| match &o.qemu {
            Some(_) => side.cell(samples),
            None => Cell::NotMeasured("no QEMU (--qemu)".into()),
        };
        for (i, f) in FIGURES.iter().enumerate() {
            rows.push(Row {
                case: format!("virtio-blk {transport}: {}", f.label),
                unit: f.unit.into(),
                ours: ours.cell(&ours.figures[i]),
                other: qemu_cell(&qemu, &qemu.figures[i]),
            });
        }
        for (i, (test, _, label)) in CPU_FIGURES.iter().enumerate() {
            rows.push(Row {
                case: format!("virtio-blk {transport}:{label}"),
                unit: cpu_unit(test).into(),
                ours: ours.cell(&ours.cpu[i]),
                other: qemu_cell(&qemu, &qemu.cpu[i]),
            });
        }
        // The io_uring step itself: ours against ours on the synchronous engine.
        for (i, f) in FIGURES.iter().enumerate() {
            rows.push(Row {
                case: format!(
                    "virtio-blk {transport}, io_uring vs sync engine: {}",
                    f.label
                ),
                unit: f.unit.into(),
                ours: ours.cell(&ours.figures[i]),
                other: ours_sync.cell(&ours_sync.figures[i]),
            });
        }
        for (i, (test, _, label)) in CPU_FIGURES.iter().enumerate() {
            rows.push(Row {
                case: format!("virtio-blk {transport}, io_uring vs sync engine:{label}"),
                unit: cpu_unit(test).into(),
                ours: ours.cell(&ours.cpu[i]),
                other: ours_sync.cell(&ours_sync.cpu[i]),
            });
        }
    }
    rows
}

/// Host CPU per MB for the sequential tests, per request for the others.
fn cpu_unit(test: &str) -> &'static str {
    if test.starts_with("seq") {
        "us/MB"
    } else {
        "us"
    }
}

fn failed_row(case: &str, why: &str) -> Row {
    Row {
        case: case.into(),
        unit: "-".into(),
        ours: Cell::Failed(why.lines().next().unwrap_or("").to_string()),
        other: Cell::NotMeasured("not run".into()),
    }
}
