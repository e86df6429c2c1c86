//! `vmm-bench`: what the VMM itself costs, side by side with QEMU's microvm machine.
//!
//! Run through `scripts/bench`, which builds the release `vmm`, installs QEMU and compiles the bare
//! C exit loop first. Every case runs alternately (ours, QEMU, ours, QEMU, ...) after one warm-up
//! run each, so that a change in the machine's load hits both sides alike. Processes are timed
//! from just before `fork` to the marker on their stdout and to their exit (`wait4`); the peak RSS
//! comes from runs of their own (`peak_rss_kib`). The statistics and parsing live in
//! `integration_tests::bench`.
//!
//! Usage: `vmm-bench --vmm PATH [--qemu PATH] [--exit-loop PATH] [--runs N] [--exits N]
//! [--linux-kernel PATH --linux-initramfs PATH [--linux-runs N]]
//! [--device-runs N] [--device-secs S] [--device-image-mib N] [--firecracker PATH]
//! [--cloud-hypervisor PATH] [--kvmtool PATH] [--cases tiny,exits,linux,devices,net,net-mq,api]`
//!
//! The device rows (`devices.rs` for virtio-blk, `net.rs` for virtio-net on one queue pair and
//! on two (`net-mq`), in a network namespace of its own) run the bench guest of `tests/bench-guest/`; the API rows
//! (`api.rs`) drive the control API as Firecracker's getting-started guide does, and Firecracker
//! itself where `--firecracker` names a binary, which the tiny-guest and virtio-mmio device rows
//! then also run (`firecracker.rs`); Cloud Hypervisor, where `--cloud-hypervisor` names one, runs
//! the tiny-guest and virtio-pci device rows (`cloud_hypervisor.rs`); kvmtool, where `--kvmtool`
//! names its `lkvm`, the tiny-guest rows (`kvmtool.rs`).

#[path = "vmm-bench/api.rs"]
mod api;
#[path = "vmm-bench/cloud_hypervisor.rs"]
mod cloud_hypervisor;
#[path = "vmm-bench/devices.rs"]
mod devices;
#[path = "vmm-bench/firecracker.rs"]
mod firecracker;
#[path = "vmm-bench/kvmtool.rs"]
mod kvmtool;
#[path = "vmm-bench/net.rs"]
mod net;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use integration_tests::bench::{
    exits_per_second, format_table, parse_exit_loop, parse_first_kvm_run, parse_kernel_cmdline,
    parse_kvm_internal_error, parse_vm_hwm_kib, Cell, Row,
};
use integration_tests::{
    ring3_port_loop, tiny_elf, tiny_flat_guest, tiny_guest_command, tiny_pvh_guest,
    tiny_pvh_guest_acpi_off, trace_from_exec, INIT_READY as LINUX_MARKER, TINY_PVH_MARKER,
};

/// How long one run of a tiny guest may take before it is killed and counted as failed.
pub(crate) const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a Linux boot may take to its init marker: minutes where the guest kernel is emulated.
const LINUX_TIMEOUT: Duration = Duration::from_secs(900);
/// The port the exit-turnaround guest writes: the POST port, a real device on our bus.
const EXIT_LOOP_PORT: u16 = 0x80;
/// What the exit-turnaround guest prints when its loop is done.
const EXIT_LOOP_MARKER: &str = "ring 3 loop done";

struct Options {
    vmm: PathBuf,
    qemu: Option<PathBuf>,
    firecracker: Option<PathBuf>,
    cloud_hypervisor: Option<PathBuf>,
    kvmtool: Option<PathBuf>,
    exit_loop: Option<PathBuf>,
    runs: usize,
    exits: u32,
    linux_kernel: Option<PathBuf>,
    linux_initramfs: Option<PathBuf>,
    linux_runs: usize,
    device_runs: usize,
    device_secs: f64,
    device_image_mib: u64,
    cases: Vec<String>,
}

impl Options {
    fn runs_case(&self, case: &str) -> bool {
        self.cases.iter().any(|c| c == case)
    }
}

/// Every case, in the order they run; all by default.
const CASES: [&str; 7] = ["tiny", "exits", "linux", "devices", "net", "net-mq", "api"];

fn usage() -> String {
    "usage: vmm-bench --vmm PATH [--qemu PATH] [--exit-loop PATH] [--runs N] [--exits N] \
     [--linux-kernel PATH --linux-initramfs PATH [--linux-runs N]] [--device-runs N] \
     [--device-secs S] [--device-image-mib N] [--firecracker PATH] \
     [--cloud-hypervisor PATH] [--kvmtool PATH] [--cases tiny,exits,linux,devices,net,net-mq,api]"
        .into()
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        vmm: PathBuf::new(),
        qemu: None,
        firecracker: None,
        cloud_hypervisor: None,
        kvmtool: None,
        exit_loop: None,
        runs: 10,
        exits: 20_000,
        linux_kernel: None,
        linux_initramfs: None,
        linux_runs: 3,
        device_runs: 3,
        device_secs: 2.0,
        device_image_mib: 256,
        cases: CASES.map(String::from).to_vec(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--vmm" => options.vmm = PathBuf::from(value()?),
            "--qemu" => options.qemu = Some(PathBuf::from(value()?)),
            "--firecracker" => options.firecracker = Some(PathBuf::from(value()?)),
            "--cloud-hypervisor" => options.cloud_hypervisor = Some(PathBuf::from(value()?)),
            "--kvmtool" => options.kvmtool = Some(PathBuf::from(value()?)),
            "--exit-loop" => options.exit_loop = Some(PathBuf::from(value()?)),
            "--runs" => {
                options.runs = value()?
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or("--runs needs a positive number")?
            }
            "--exits" => {
                options.exits = value()?
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or("--exits needs a positive number")?
            }
            "--linux-kernel" => options.linux_kernel = Some(PathBuf::from(value()?)),
            "--linux-initramfs" => options.linux_initramfs = Some(PathBuf::from(value()?)),
            "--linux-runs" => {
                options.linux_runs = value()?.parse().ok().ok_or("--linux-runs needs a number")?
            }
            "--device-runs" => {
                options.device_runs = value()?
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or("--device-runs needs a positive number")?
            }
            "--device-secs" => {
                options.device_secs = value()?
                    .parse()
                    .ok()
                    .filter(|s: &f64| *s > 0.0 && *s < 3600.0)
                    .ok_or("--device-secs needs a number of seconds")?
            }
            "--device-image-mib" => {
                options.device_image_mib = value()?
                    .parse()
                    .ok()
                    .filter(|n| (16..=65536).contains(n))
                    .ok_or("--device-image-mib needs 16 to 65536")?
            }
            "--cases" => {
                options.cases = value()?.split(',').map(String::from).collect();
                if let Some(bad) = options.cases.iter().find(|c| !CASES.contains(&c.as_str())) {
                    return Err(format!("unknown case {bad:?} in --cases"));
                }
            }
            "-h" | "--help" => return Err(usage()),
            other => return Err(format!("unknown argument {other:?}\n{}", usage())),
        }
    }
    if options.vmm.as_os_str().is_empty() {
        return Err(format!("--vmm is required\n{}", usage()));
    }
    if options.linux_kernel.is_some() != options.linux_initramfs.is_some() {
        return Err(format!(
            "--linux-kernel and --linux-initramfs go together\n{}",
            usage()
        ));
    }
    Ok(options)
}

/// One timed process run.
struct Timed {
    /// Process start to the first appearance of the marker on stdout.
    to_marker: Option<Duration>,
    /// Process start to its exit.
    to_exit: Duration,
    /// `wait4` status: the exit code, or None when a signal ended it.
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Timed {
    /// Why this run does not count, if it does not: `ok_codes` are the exit codes of a clean end.
    fn problem(&self, ok_codes: &[i32], marker: Option<&str>) -> Option<String> {
        let last_line = |text: &str| {
            text.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .chars()
                .take(200)
                .collect::<String>()
        };
        if !self.code.is_some_and(|c| ok_codes.contains(&c)) {
            return Some(format!(
                "status {:?}: {}",
                self.code,
                last_line(&self.stderr)
            ));
        }
        if marker.is_some() && self.to_marker.is_none() {
            return Some(format!(
                "no marker on stdout (got {:?})",
                last_line(&self.stdout)
            ));
        }
        None
    }
}

/// Collects a pipe's bytes on a thread; with `marker`, notes when it first appears, and then
/// raises `stop` when one is given.
pub(crate) fn collect(
    mut pipe: impl Read + Send + 'static,
    start: Instant,
    marker: Option<String>,
    stop: Option<Arc<AtomicBool>>,
) -> thread::JoinHandle<(String, Option<Duration>)> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let mut seen = None;
        let mut buf = [0u8; 4096];
        loop {
            let n = match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            bytes.extend_from_slice(&buf[..n]);
            if seen.is_none() {
                if let Some(m) = &marker {
                    // Search only the tail the new bytes can complete the marker in.
                    let from = bytes.len().saturating_sub(n + m.len());
                    if bytes[from..].windows(m.len()).any(|w| w == m.as_bytes()) {
                        seen = Some(start.elapsed());
                        if let Some(stop) = &stop {
                            stop.store(true, Ordering::Release);
                        }
                    }
                }
            }
        }
        (String::from_utf8_lossy(&bytes).into_owned(), seen)
    })
}

/// When a run ends of its own accord, and when the bench ends it.
#[derive(Clone, Copy)]
struct Ending<'a> {
    /// Killed (SIGKILL) after this long, and counted as failed.
    timeout: Duration,
    /// Ended with SIGTERM as soon as the marker is on stdout: a guest that keeps running after it.
    stop_at_marker: bool,
    /// Ended with SIGTERM as soon as this appears on stderr: a VMM that stops its guest but not
    /// itself (QEMU pauses on a KVM internal error).
    stop_on_stderr: Option<&'a str>,
}

/// A guest that ends by itself within [`RUN_TIMEOUT`].
const RUNS_TO_ITS_END: Ending<'static> = Ending {
    timeout: RUN_TIMEOUT,
    stop_at_marker: false,
    stop_on_stderr: None,
};

fn run_timed(command: &mut Command, marker: Option<&str>) -> std::io::Result<Timed> {
    run_ending(command, marker, RUNS_TO_ITS_END)
}

/// Kills a child that runs past its time (SIGKILL) and, when `stop` is raised, ends it with
/// SIGTERM. The child's pid cannot be reused while the watchdog runs: the child stays a zombie
/// until its waiter reaps it, and the waiter calls `finish` right after.
pub(crate) struct Watchdog {
    done: Arc<AtomicBool>,
    thread: thread::JoinHandle<()>,
}

impl Watchdog {
    pub(crate) fn start(
        pid: libc::pid_t,
        timeout: Duration,
        stop: Option<Arc<AtomicBool>>,
    ) -> Watchdog {
        let done = Arc::new(AtomicBool::new(false));
        let thread = {
            let done = done.clone();
            thread::spawn(move || {
                let deadline = Instant::now() + timeout;
                let mut stopped = false;
                while !done.load(Ordering::Acquire) {
                    if !stopped && stop.as_ref().is_some_and(|s| s.load(Ordering::Acquire)) {
                        stopped = true;
                        // SAFETY: kill only sends a signal to our own child, not yet reaped.
                        unsafe { libc::kill(pid, libc::SIGTERM) };
                    }
                    if Instant::now() >= deadline {
                        // SAFETY: kill only sends a signal to our own child, not yet reaped.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                        return;
                    }
                    thread::sleep(Duration::from_millis(20));
                }
            })
        };
        Watchdog { done, thread }
    }

    /// Stops watching: call it as soon as the child is reaped.
    pub(crate) fn finish(self) {
        self.done.store(true, Ordering::Release);
        let _ = self.thread.join();
    }
}

/// Runs `command` with stdin on /dev/null until it ends (see `Ending`), timing it from just
/// before the fork.
fn run_ending(
    command: &mut Command,
    marker: Option<&str>,
    ending: Ending,
) -> std::io::Result<Timed> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = command.spawn()?;
    let pid = child.id() as libc::pid_t;
    let stop = Arc::new(AtomicBool::new(false));
    let stdout = collect(
        child.stdout.take().expect("piped"),
        start,
        marker.map(str::to_string),
        ending.stop_at_marker.then(|| stop.clone()),
    );
    let stderr = collect(
        child.stderr.take().expect("piped"),
        start,
        ending.stop_on_stderr.map(str::to_string),
        Some(stop.clone()),
    );

    let watchdog = Watchdog::start(pid, ending.timeout, Some(stop));
    let mut status = 0;
    // SAFETY: waits for our own child with a valid pointer to its status.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    let to_exit = start.elapsed();
    watchdog.finish();
    if waited != pid {
        return Err(std::io::Error::last_os_error());
    }
    let (stdout, to_marker) = stdout.join().unwrap_or_default();
    let (stderr, _) = stderr.join().unwrap_or_default();
    // std's Child must not wait for the pid we reaped; dropping it does not wait.
    drop(child);
    Ok(Timed {
        to_marker,
        to_exit,
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        stdout,
        stderr,
    })
}

/// The peak resident memory of one run of `command` (which must end by itself), in KiB: its
/// `VmHWM`, read from /proc when it exits (stopped there by `PTRACE_O_TRACEEXIT`, before its
/// memory is released).
///
/// Not the `ru_maxrss` of `wait4`: Linux carries a process's peak across `exec`, so the
/// `ru_maxrss` of a child of this bench is at least the bench's own resident memory, more than
/// a small VMM's. A run of its own, so that the timed runs are not traced.
fn peak_rss_kib(command: &mut Command) -> std::io::Result<u64> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    trace_from_exec(command);
    let child = command.spawn()?;
    let pid = child.id() as libc::pid_t;
    // A run that does not end is killed; a traced process still dies of SIGKILL.
    let watchdog = Watchdog::start(pid, RUN_TIMEOUT, None);
    let mut peak = None;
    let mut first_stop = true;
    let result = loop {
        let mut status = 0;
        // SAFETY: waits for our own child with a valid pointer to its status.
        if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
            break Err(std::io::Error::last_os_error());
        }
        if !libc::WIFSTOPPED(status) {
            break peak.ok_or_else(|| {
                std::io::Error::other(format!("it ended (wait status {status:#x}) unseen"))
            });
        }
        let signal = libc::WSTOPSIG(status);
        let deliver = if first_stop {
            // The stop at exec: from now on, stop again when it exits.
            first_stop = false;
            let options = libc::PTRACE_O_TRACEEXIT | libc::PTRACE_O_EXITKILL;
            // SAFETY: sets the tracing options of our own stopped child.
            unsafe { libc::ptrace(libc::PTRACE_SETOPTIONS, pid, 0usize, options as usize) };
            0
        } else if signal == libc::SIGTRAP && status >> 16 == libc::PTRACE_EVENT_EXIT {
            peak = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| parse_vm_hwm_kib(&s));
            0
        } else {
            // Its own signals go on to it.
            signal
        };
        // SAFETY: resumes our own stopped child, delivering `deliver` (0: none).
        unsafe { libc::ptrace(libc::PTRACE_CONT, pid, 0usize, deliver as usize) };
    };
    watchdog.finish();
    // std's Child must not wait for the pid we reaped; dropping it does not wait.
    drop(child);
    result
}

/// `program` run through `wrapper` (`ip netns exec NS`), or directly when `wrapper` is empty.
pub(crate) fn wrapped_command(program: &Path, wrapper: &[&str]) -> Command {
    match wrapper.split_first() {
        Some((first, rest)) => {
            let mut command = Command::new(first);
            command.args(rest).arg(program);
            command
        }
        None => Command::new(program),
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// How a peer of the tiny-guest rows is started, for each run.
type PeerCommand<'a> = Box<dyn Fn() -> std::io::Result<Command> + 'a>;

/// A peer of the tiny-guest rows besides QEMU, run where its binary was given.
struct TinyPeer<'a> {
    name: &'static str,
    absent: &'static str,
    command: Option<PeerCommand<'a>>,
    samples: TinySamples,
}

impl<'a> TinyPeer<'a> {
    fn new(name: &'static str, absent: &'static str, command: Option<PeerCommand<'a>>) -> Self {
        TinyPeer {
            name,
            absent,
            command,
            samples: TinySamples::default(),
        }
    }

    /// One timed run and one for the peak RSS, kept unless `warmup`; the peer must exit 0.
    fn run(&mut self, warmup: bool) {
        let Some(command) = &self.command else {
            return;
        };
        let run = command().and_then(|mut c| run_timed(&mut c, Some(TINY_PVH_MARKER)));
        if !warmup {
            self.samples.add(run, &[0], TINY_PVH_MARKER);
            self.samples
                .add_rss(command().and_then(|mut c| peak_rss_kib(&mut c)));
        }
    }

    /// Its rows beside `ours`, or one saying it was not given.
    fn rows(&self, ours: &TinySamples) -> Vec<Row> {
        if self.command.is_none() {
            return vec![Row {
                case: format!("tiny PVH guest, {}", self.name),
                unit: "-".into(),
                ours: Cell::NotMeasured("see the rows above".into()),
                other: Cell::NotMeasured(self.absent.into()),
            }];
        }
        let theirs = &self.samples;
        [
            (
                "start -> marker",
                "ms",
                &ours.to_marker,
                &theirs.to_marker,
                "no marker seen",
            ),
            (
                "start -> exit",
                "ms",
                &ours.to_exit,
                &theirs.to_exit,
                "no clean exit",
            ),
            (
                "peak RSS",
                "MiB",
                &ours.rss_mib,
                &theirs.rss_mib,
                "no clean exit",
            ),
        ]
        .into_iter()
        .map(|(what, unit, our_samples, their_samples, missing)| Row {
            case: format!("tiny PVH guest, {}: {what}", self.name),
            unit: unit.into(),
            ours: ours.cell(our_samples, missing),
            other: theirs.cell(their_samples, missing),
        })
        .collect()
    }
}

/// Samples of one side of the tiny-guest cases.
#[derive(Default)]
struct TinySamples {
    to_marker: Vec<f64>,
    to_exit: Vec<f64>,
    rss_mib: Vec<f64>,
    setup: Vec<f64>,
    failure: Option<String>,
}

impl TinySamples {
    fn add(&mut self, run: std::io::Result<Timed>, ok_codes: &[i32], marker: &str) {
        let run = match run {
            Ok(run) => run,
            Err(e) => {
                self.failure.get_or_insert(format!("cannot run it: {e}"));
                return;
            }
        };
        if let Some(problem) = run.problem(ok_codes, Some(marker)) {
            self.failure.get_or_insert(problem);
            return;
        }
        self.to_marker.extend(run.to_marker.map(ms));
        self.to_exit.push(ms(run.to_exit));
        self.setup.extend(parse_first_kvm_run(&run.stderr).map(ms));
    }

    /// The peak RSS of a run of its own (see `peak_rss_kib`).
    fn add_rss(&mut self, peak: std::io::Result<u64>) {
        match peak {
            Ok(kib) => self.rss_mib.push(kib as f64 / 1024.0),
            Err(e) => {
                self.failure
                    .get_or_insert(format!("cannot measure its peak RSS: {e}"));
            }
        }
    }

    fn cell(&self, samples: &[f64], what: &str) -> Cell {
        match (&self.failure, samples.is_empty()) {
            (Some(why), true) => Cell::Failed(why.clone()),
            _ => Cell::from_samples(samples, what),
        }
    }
}

/// QEMU's microvm machine with everything the tiny guest does not need switched off, and the
/// isa-debug-exit device at the port the guest writes (microvm has no i8042).
///
/// No `-cpu host`: on kvm-pvm QEMU 7.2 then aborts at start (`kvm_buf_set_msrs: Assertion
/// 'ret == cpu->kvm_msr_buf->nmsrs' failed`, an MSR the host's KVM refuses), so QEMU runs with
/// its default CPU model, which kvm-pvm accepts.
fn qemu_tiny_command(qemu: &Path, guest: &Path) -> Command {
    let mut command = Command::new(qemu);
    command
        .args([
            "-M",
            "microvm,x-option-roms=off,rtc=off,pit=off,pic=off,isa-serial=on",
            "-enable-kvm",
            "-m",
            "128",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=4",
            "-kernel",
        ])
        .arg(guest);
    command
}

/// Our VMM booting a Linux kernel and initramfs with its defaults (1 vCPU, 512 MiB).
fn our_linux_command(vmm: &Path, kernel: &Path, initramfs: &Path) -> Command {
    let mut command = Command::new(vmm);
    command
        .arg("--kernel")
        .arg(kernel)
        .arg("--initramfs")
        .arg(initramfs)
        .args(["--log-level", "info"])
        .env_remove("RUST_LOG");
    command
}

/// QEMU's microvm machine on the same kernel, initramfs, RAM and kernel command line. An ELF
/// kernel with the PVH note is entered through PVH by both.
fn qemu_linux_command(qemu: &Path, kernel: &Path, initramfs: &Path, cmdline: &str) -> Command {
    let mut command = Command::new(qemu);
    command
        .args([
            "-M",
            "microvm,x-option-roms=off",
            "-enable-kvm",
            "-m",
            "512",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-kernel",
        ])
        .arg(kernel)
        .arg("-initrd")
        .arg(initramfs)
        .arg("-append")
        .arg(cmdline);
    command
}

/// A Linux boot to the init marker: the VM is stopped there; QEMU also when KVM fails under it.
const LINUX_ENDING: Ending<'static> = Ending {
    timeout: LINUX_TIMEOUT,
    stop_at_marker: true,
    stop_on_stderr: Some("KVM internal error"),
};

/// Linux to its init marker, ours and QEMU alternately: seconds to the marker, or why not.
fn linux_row(options: &Options, kernel: &Path, initramfs: &Path) -> Row {
    let mut ours = Vec::new();
    let mut ours_failure = None;
    let mut other = Vec::new();
    let mut other_failure = None;
    // QEMU gets the command line our VMM built (ours plus what it hid from the guest).
    let mut cmdline = None;
    for round in 0..=options.linux_runs {
        let warmup = round == 0;
        progress_round("Linux to its init marker", round, options.linux_runs);
        match run_ending(
            &mut our_linux_command(&options.vmm, kernel, initramfs),
            Some(LINUX_MARKER),
            LINUX_ENDING,
        ) {
            Ok(run) => {
                if cmdline.is_none() {
                    cmdline = parse_kernel_cmdline(&run.stderr).map(str::to_string);
                }
                match run.to_marker {
                    Some(t) if !warmup => ours.push(t.as_secs_f64()),
                    Some(_) => {}
                    None => {
                        ours_failure.get_or_insert(
                            run.problem(&[0], Some(LINUX_MARKER))
                                .unwrap_or_else(|| "no marker before the timeout".to_string()),
                        );
                    }
                }
            }
            Err(e) => {
                ours_failure.get_or_insert(format!("cannot run it: {e}"));
            }
        }
        let (Some(qemu), Some(cmdline)) = (&options.qemu, &cmdline) else {
            continue;
        };
        match run_ending(
            &mut qemu_linux_command(qemu, kernel, initramfs, cmdline),
            Some(LINUX_MARKER),
            LINUX_ENDING,
        ) {
            Ok(run) => match run.to_marker {
                Some(t) if !warmup => other.push(t.as_secs_f64()),
                Some(_) => {}
                None => {
                    let why = parse_kvm_internal_error(&run.stderr)
                        .map(|e| format!("{e}, {:.1} s after start", run.to_exit.as_secs_f64()))
                        .or_else(|| run.problem(&[0], Some(LINUX_MARKER)))
                        .unwrap_or_else(|| "no marker before the timeout".to_string());
                    other_failure.get_or_insert(why);
                }
            },
            Err(e) => {
                other_failure.get_or_insert(format!("cannot run it: {e}"));
            }
        }
    }
    let cell = |samples: &[f64], failure: Option<String>| match (failure, samples.is_empty()) {
        (Some(why), true) => Cell::Failed(why),
        _ => Cell::from_samples(samples, "no runs"),
    };
    let other = match (&options.qemu, &cmdline) {
        (None, _) => Cell::NotMeasured("no QEMU (--qemu)".into()),
        (Some(_), None) => Cell::NotMeasured("our log had no `kernel command line:` line".into()),
        (Some(_), Some(_)) => cell(&other, other_failure),
    };
    Row {
        case: format!(
            "Linux {} to its init marker",
            kernel.file_name().unwrap_or_default().to_string_lossy()
        ),
        unit: "s".into(),
        ours: cell(&ours, ours_failure),
        other,
    }
}

fn write_guest(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, bytes)?;
    Ok(path)
}

fn progress(text: &str) {
    eprintln!("vmm-bench: {text}");
}

/// Says which round of `case` starts: round 0 is the warm-up, whose samples are not kept.
fn progress_round(case: &str, round: usize, runs: usize) {
    if round == 0 {
        progress(&format!("{case}, warm-up"));
    } else {
        progress(&format!("{case}, round {round} of {runs}"));
    }
}

fn main() -> ExitCode {
    let options = match parse_options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let dir = std::env::temp_dir().join(format!("vmm-bench-{}", std::process::id()));
    let guests = std::fs::create_dir_all(&dir).and_then(|()| {
        let tiny = write_guest(&dir, "tiny-pvh.elf", &tiny_pvh_guest())?;
        let tiny_acpi_off = write_guest(&dir, "tiny-pvh-acpi-off.elf", &tiny_pvh_guest_acpi_off())?;
        let tiny_flat = write_guest(&dir, "tiny-flat.bin", &tiny_flat_guest())?;
        let marker = format!("{EXIT_LOOP_MARKER}\n");
        let loop_n = write_guest(
            &dir,
            "ring3-loop.elf",
            &tiny_elf(&ring3_port_loop(
                options.exits,
                EXIT_LOOP_PORT,
                marker.as_bytes(),
            )),
        )?;
        let loop_0 = write_guest(
            &dir,
            "ring3-loop-0.elf",
            &tiny_elf(&ring3_port_loop(0, EXIT_LOOP_PORT, marker.as_bytes())),
        )?;
        Ok((tiny, tiny_acpi_off, tiny_flat, loop_n, loop_0))
    });
    let (tiny, tiny_acpi_off, tiny_flat, loop_n, loop_0) = match guests {
        Ok(paths) => paths,
        Err(e) => {
            eprintln!(
                "vmm-bench: cannot write the guests to {}: {e}",
                dir.display()
            );
            return ExitCode::from(1);
        }
    };

    let mut rows = Vec::new();
    if options.runs_case("tiny") {
        // Tiny PVH guest: ours (default flags), QEMU, ours without the CPU feature probe.
        let mut ours = TinySamples::default();
        let mut ours_host = TinySamples::default();
        let mut qemu = TinySamples::default();
        let fc_config = firecracker::FirecrackerVm {
            kernel: &tiny,
            cmdline: "",
            mem_mib: 128,
            disk: None,
            tap: None,
        }
        .write_config(&dir, "firecracker-tiny");
        let ch_vm = cloud_hypervisor::CloudHypervisorVm {
            kernel: &tiny_acpi_off,
            cmdline: "",
            mem_mib: 128,
            disk: None,
            tap: None,
        };
        // All end with status 0: Firecracker and kvmtool on the guest's i8042 reset, Cloud
        // Hypervisor on its ACPI soft-off.
        let mut peers = [
            TinyPeer::new(
                "Firecracker",
                firecracker::ABSENT,
                options.firecracker.as_ref().map(|binary| {
                    Box::new(|| match &fc_config {
                        Ok(config) => Ok(firecracker::command(binary, config, &[])),
                        Err(e) => Err(std::io::Error::other(e.clone())),
                    }) as PeerCommand
                }),
            ),
            TinyPeer::new(
                "Cloud Hypervisor",
                cloud_hypervisor::ABSENT,
                options
                    .cloud_hypervisor
                    .as_ref()
                    .map(|binary| Box::new(|| Ok(ch_vm.command(binary, &[]))) as PeerCommand),
            ),
            TinyPeer::new(
                "kvmtool (the same code, flat)",
                kvmtool::ABSENT,
                options.kvmtool.as_ref().map(|lkvm| {
                    Box::new(|| Ok(kvmtool::command(lkvm, &tiny_flat, &dir))) as PeerCommand
                }),
            ),
        ];
        for round in 0..=options.runs {
            let warmup = round == 0;
            progress_round("tiny PVH guest", round, options.runs);
            let run = run_timed(
                &mut tiny_guest_command(&options.vmm, &tiny, &[]),
                Some(TINY_PVH_MARKER),
            );
            if !warmup {
                ours.add(run, &[0], TINY_PVH_MARKER);
                ours.add_rss(peak_rss_kib(&mut tiny_guest_command(
                    &options.vmm,
                    &tiny,
                    &[],
                )));
            }
            if let Some(q) = &options.qemu {
                // isa-debug-exit ends QEMU with (0 << 1) | 1.
                let run = run_timed(&mut qemu_tiny_command(q, &tiny), Some(TINY_PVH_MARKER));
                if !warmup {
                    qemu.add(run, &[1], TINY_PVH_MARKER);
                    qemu.add_rss(peak_rss_kib(&mut qemu_tiny_command(q, &tiny)));
                }
            }
            for peer in &mut peers {
                peer.run(warmup);
            }
            let run = run_timed(
                &mut tiny_guest_command(&options.vmm, &tiny, &["--cpu-features", "host"]),
                Some(TINY_PVH_MARKER),
            );
            if !warmup {
                ours_host.add(run, &[0], TINY_PVH_MARKER);
            }
        }
        let no_qemu = || Cell::NotMeasured("no QEMU (--qemu)".to_string());
        let qemu_cell = |samples: &[f64], what: &str| {
            if options.qemu.is_some() {
                qemu.cell(samples, what)
            } else {
                no_qemu()
            }
        };
        rows.extend([
            Row {
                case: "tiny PVH guest: start -> marker".into(),
                unit: "ms".into(),
                ours: ours.cell(&ours.to_marker, "no marker seen"),
                other: qemu_cell(&qemu.to_marker, "no marker seen"),
            },
            Row {
                case: "tiny PVH guest: start -> exit".into(),
                unit: "ms".into(),
                ours: ours.cell(&ours.to_exit, "no clean exit"),
                other: qemu_cell(&qemu.to_exit, "no clean exit"),
            },
            Row {
                case: "tiny PVH guest: peak RSS".into(),
                unit: "MiB".into(),
                ours: ours.cell(&ours.rss_mib, "no clean exit"),
                other: qemu_cell(&qemu.rss_mib, "no clean exit"),
            },
            Row {
                case: "VMM setup: start -> first KVM_RUN".into(),
                unit: "ms".into(),
                ours: ours.cell(&ours.setup, "the log had no `first KVM_RUN after` line"),
                other: Cell::NotMeasured("QEMU does not log it".into()),
            },
            Row {
                case: "  same, --cpu-features host (no probe)".into(),
                unit: "ms".into(),
                ours: ours_host.cell(
                    &ours_host.setup,
                    "the log had no `first KVM_RUN after` line",
                ),
                other: Cell::NotMeasured("QEMU does not log it".into()),
            },
            Row {
                case: "  tiny guest start -> exit, --cpu-features host".into(),
                unit: "ms".into(),
                ours: ours_host.cell(&ours_host.to_exit, "no clean exit"),
                other: qemu_cell(&qemu.to_exit, "no clean exit"),
            },
        ]);
        for peer in &peers {
            rows.extend(peer.rows(&ours));
        }
    }

    if options.runs_case("exits") {
        // Exit turnaround: ours with `exits` port writes minus ours with none, against the C loop.
        let mut ours_rate = Vec::new();
        let mut ours_failure = None;
        let mut c_rate = Vec::new();
        let mut c_failure = None;
        for round in 0..=options.runs {
            let warmup = round == 0;
            progress_round(
                &format!("exit turnaround ({} exits)", options.exits),
                round,
                options.runs,
            );
            let with = run_timed(
                &mut tiny_guest_command(&options.vmm, &loop_n, &[]),
                Some(EXIT_LOOP_MARKER),
            );
            let without = run_timed(
                &mut tiny_guest_command(&options.vmm, &loop_0, &[]),
                Some(EXIT_LOOP_MARKER),
            );
            match (with, without) {
                (Ok(with), Ok(without)) => {
                    let problem = with
                        .problem(&[0], Some(EXIT_LOOP_MARKER))
                        .or_else(|| without.problem(&[0], Some(EXIT_LOOP_MARKER)));
                    match problem {
                        Some(p) => {
                            ours_failure.get_or_insert(p);
                        }
                        None if !warmup => ours_rate.extend(exits_per_second(
                            u64::from(options.exits),
                            with.to_exit,
                            without.to_exit,
                        )),
                        None => {}
                    }
                }
                (Err(e), _) | (_, Err(e)) => {
                    ours_failure.get_or_insert(format!("cannot run it: {e}"));
                }
            }
            if let Some(c) = &options.exit_loop {
                match run_timed(Command::new(c).arg(options.exits.to_string()), None) {
                    Ok(run) => match (run.problem(&[0], None), parse_exit_loop(&run.stdout)) {
                        (None, Some(rate)) if !warmup => c_rate.push(rate),
                        (None, Some(_)) => {}
                        (Some(p), _) => {
                            c_failure.get_or_insert(p);
                        }
                        (None, None) => {
                            c_failure.get_or_insert(format!(
                                "unexpected output {:?}",
                                run.stdout.trim()
                            ));
                        }
                    },
                    Err(e) => {
                        c_failure.get_or_insert(format!("cannot run it: {e}"));
                    }
                }
            }
        }
        let cell = |rate: &[f64], failure: Option<String>| match (failure, rate.is_empty()) {
            (Some(why), true) => Cell::Failed(why),
            _ => Cell::from_samples(rate, "no runs"),
        };
        rows.push(Row {
            case: format!(
                "exit turnaround, ring-3 `out` (vs bare C loop, {})",
                options.exits
            ),
            unit: "exits/s".into(),
            ours: cell(&ours_rate, ours_failure),
            other: match &options.exit_loop {
                Some(_) => cell(&c_rate, c_failure),
                None => Cell::NotMeasured("no exit-loop binary (--exit-loop)".into()),
            },
        });
    }

    match (&options.linux_kernel, &options.linux_initramfs) {
        (Some(kernel), Some(initramfs)) if options.linux_runs > 0 && options.runs_case("linux") => {
            rows.push(linux_row(&options, kernel, initramfs));
        }
        _ => {}
    }

    let device_options = devices::DeviceOptions {
        vmm: options.vmm.clone(),
        qemu: options.qemu.clone(),
        firecracker: options.firecracker.clone(),
        cloud_hypervisor: options.cloud_hypervisor.clone(),
        runs: options.device_runs,
        secs: options.device_secs,
        image_mib: options.device_image_mib,
    };
    if options.runs_case("devices") {
        rows.extend(devices::device_rows(&device_options, &dir, &progress_round));
    }
    if options.runs_case("net") {
        rows.extend(net::net_rows(&device_options, &dir, &progress_round, 1));
    }
    if options.runs_case("net-mq") {
        rows.extend(net::net_rows(&device_options, &dir, &progress_round, 2));
    }

    if options.runs_case("api") {
        let api_options = api::ApiOptions {
            vmm: options.vmm.clone(),
            firecracker: options.firecracker.clone(),
            runs: options.runs,
        };
        rows.extend(api::api_rows(&api_options, &dir, &tiny, &progress_round));
    }

    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "\n{} runs per case ({} for Linux, {} of {} s for the bench guest's virtio-blk and \
         virtio-net tests) after one warm-up; median (min-max). \"other\" is QEMU microvm (q35 \
         for virtio-pci; its tap with vhost off or on as the row says), or the bare C KVM_RUN \
         loop for exit turnaround, or Firecracker for the API rows and those that name it, or ours with io_engine=sync \
         for the \"io_uring vs sync engine\" rows. Host CPU leaves out the vCPUs' guest time.\n",
        options.runs, options.linux_runs, options.device_runs, options.device_secs
    );
    print!("{}", format_table(&rows, "other"));
    ExitCode::SUCCESS
}
