//! The bench's arithmetic and parsing, apart from the processes it runs so that unit tests cover
//! them (`src/bin/vmm-bench.rs` runs the cases; `scripts/bench` builds and starts it).
//!
//! Everything here is plain data: samples in, a table out. A parser that finds nothing returns
//! `None`, and the table prints the reason instead of a number, so a changed log line can never
//! make the bench silently print nothing.

use std::fmt::Write as _;
use std::time::Duration;

/// Median, minimum and maximum of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub count: usize,
}

impl Stats {
    /// The statistics of `samples`, or `None` when there are none (or one is not a number). The
    /// median of an even count is the mean of the middle two.
    pub fn of(samples: &[f64]) -> Option<Stats> {
        if samples.is_empty() || samples.iter().any(|s| s.is_nan()) {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Stats {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            count: n,
        })
    }
}

/// Parses a duration as Rust's `Debug` prints it: `27.797344ms`, `1.5s`, `950µs` (or `us`),
/// `12ns`.
pub fn parse_debug_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    let scale = match unit {
        "s" => 1.0,
        "ms" => 1e-3,
        "µs" | "us" => 1e-6,
        "ns" => 1e-9,
        _ => return None,
    };
    Duration::try_from_secs_f64(value * scale).ok()
}

/// The VMM's own measure of its set-up time, from the info-level line `first KVM_RUN after X`
/// (counted from the start of `Vmm::build`, a few hundred microseconds after `exec`).
pub fn parse_first_kvm_run(log: &str) -> Option<Duration> {
    log.lines().find_map(|line| {
        let (_, rest) = line.split_once("first KVM_RUN after ")?;
        parse_debug_duration(rest.split_whitespace().next()?)
    })
}

/// The kernel command line our VMM passed, from its info-level `kernel command line: ...` line, so
/// that the other VMM can boot the same kernel with the very same line.
pub fn parse_kernel_cmdline(log: &str) -> Option<&str> {
    log.lines().find_map(|line| {
        let (_, rest) = line.split_once("kernel command line: ")?;
        Some(rest.trim()).filter(|s| !s.is_empty())
    })
}

/// What stopped a QEMU guest whose KVM exit QEMU could not handle: its `KVM internal error.
/// Suberror: N` report, with the guest's RIP from the register dump that follows.
pub fn parse_kvm_internal_error(stderr: &str) -> Option<String> {
    let (_, rest) = stderr.split_once("KVM internal error. Suberror: ")?;
    let suberror = rest.split_whitespace().next()?;
    let what = if suberror == "1" {
        "emulation failure".to_string()
    } else {
        format!("suberror {suberror}")
    };
    let rip = rest
        .split_whitespace()
        .find_map(|word| word.strip_prefix("RIP="))
        .map(|rip| format!(" at RIP={rip}"))
        .unwrap_or_default();
    Some(format!("KVM internal error ({what}){rip}"))
}

/// Exits per second from the output of `tests/bench/exit-loop.c`:
/// `20000 PIO exits in 1.234 s = 16207 exits/s (61.70 us each)`.
pub fn parse_exit_loop(output: &str) -> Option<f64> {
    output.lines().find_map(|line| {
        let (_, rest) = line.split_once(" = ")?;
        let (number, unit) = rest.split_once(' ')?;
        if !unit.starts_with("exits/s") {
            return None;
        }
        number.parse().ok().filter(|v: &f64| v.is_finite())
    })
}

/// Exits per second of a guest that does `exits` more exits in `with` than in `without` (two runs
/// of the same VMM, timed the same way): the difference cancels start-up and tear-down.
pub fn exits_per_second(exits: u64, with: Duration, without: Duration) -> Option<f64> {
    let extra = with.checked_sub(without)?.as_secs_f64();
    (extra > 0.0).then(|| exits as f64 / extra)
}

/// One `bench: ...` line of the bench guest (`tests/bench-guest/bench.c`): the words before the
/// first `key=value` name it (`blk qd1 randread`, `start blk qd1`, `tsc`), the rest are its
/// fields.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestLine {
    pub name: String,
    pub fields: Vec<(String, String)>,
}

impl GuestLine {
    /// The field `key`, as text.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The field `key`, as a finite number.
    pub fn number(&self, key: &str) -> Option<f64> {
        self.field(key)?
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite())
    }
}

/// Parses one line of the bench guest's console; `None` for anything else (other output, a
/// line cut off in the middle of the prefix).
pub fn parse_guest_line(line: &str) -> Option<GuestLine> {
    let rest = line
        .trim_end_matches(['\r', '\n'])
        .strip_prefix("bench: ")?;
    let mut name = Vec::new();
    let mut fields = Vec::new();
    for word in rest.split_whitespace() {
        match word.split_once('=') {
            Some((key, value)) if !key.is_empty() => {
                fields.push((key.to_string(), value.to_string()))
            }
            _ if fields.is_empty() => name.push(word),
            // A bare word after the fields (free text, as in `error`) belongs to no field.
            _ => {}
        }
    }
    (!name.is_empty()).then(|| GuestLine {
        name: name.join(" "),
        fields,
    })
}

/// Every bench-guest line of a console transcript, in order.
pub fn parse_guest_lines(console: &str) -> Vec<GuestLine> {
    console.lines().filter_map(parse_guest_line).collect()
}

/// The guest's own complaint (`bench: error ...`), if it stopped on one.
pub fn guest_error(console: &str) -> Option<&str> {
    console
        .lines()
        .find_map(|line| line.trim_end().strip_prefix("bench: error "))
}

/// CPU time of a process from its `/proc/PID/stat`, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcCpu {
    /// utime + stime (field 14 + 15): everything, a vCPU's time in the guest included.
    pub total: u64,
    /// guest_time (field 43): time spent running vCPUs, already inside `total`.
    pub guest: u64,
}

impl ProcCpu {
    /// What the VMM itself used: the total without the time its vCPUs ran guest code.
    pub fn vmm(&self) -> u64 {
        self.total.saturating_sub(self.guest)
    }
}

/// Parses `/proc/PID/stat`: fields are counted after the command name, which is in parentheses
/// and may itself hold spaces and parentheses.
pub fn parse_proc_stat_cpu(stat: &str) -> Option<ProcCpu> {
    let (_, after_comm) = stat.rsplit_once(')')?;
    // Index 0 is field 3 (state): utime is field 14, stime 15, guest_time 43.
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    Some(ProcCpu {
        total: field(14)?.checked_add(field(15)?)?,
        guest: field(43)?,
    })
}

/// `VmHWM`, a process's peak resident memory in KiB, from the text of `/proc/PID/status`.
pub fn parse_vm_hwm_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
}

/// One side of a row: statistics, or why there are none.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Measured(Stats),
    /// The case ran and failed, with the reason.
    Failed(String),
    /// The case does not apply or was not run, with the reason.
    NotMeasured(String),
}

impl Cell {
    /// Statistics of `samples`, or `Failed(reason)` when there are none.
    pub fn from_samples(samples: &[f64], reason_if_empty: &str) -> Cell {
        match Stats::of(samples) {
            Some(stats) => Cell::Measured(stats),
            None => Cell::Failed(reason_if_empty.to_string()),
        }
    }

    fn median(&self) -> Option<f64> {
        match self {
            Cell::Measured(s) => Some(s.median),
            _ => None,
        }
    }

    fn show(&self) -> String {
        match self {
            Cell::Measured(s) => {
                format!("{} ({}-{})", number(s.median), number(s.min), number(s.max))
            }
            Cell::Failed(why) => format!("failed: {why}"),
            Cell::NotMeasured(why) => format!("not measured: {why}"),
        }
    }
}

/// A number with as many decimals as its size deserves.
fn number(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// One line of the table: a case, its unit, our figure and the one we compare against.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub case: String,
    pub unit: String,
    pub ours: Cell,
    pub other: Cell,
}

impl Row {
    /// ours / other, from the medians.
    pub fn ratio(&self) -> Option<f64> {
        let (ours, other) = (self.ours.median()?, self.other.median()?);
        (other != 0.0).then(|| ours / other)
    }
}

/// The table: one row per case, the medians with min-max, and the ratio ours / other.
pub fn format_table(rows: &[Row], other_name: &str) -> String {
    let header = [
        "case".to_string(),
        "unit".to_string(),
        "ours median (min-max)".to_string(),
        format!("{other_name} median (min-max)"),
        "ours/other".to_string(),
    ];
    let body: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            [
                r.case.clone(),
                r.unit.clone(),
                r.ours.show(),
                r.other.show(),
                r.ratio().map_or("-".to_string(), |x| format!("{x:.2}")),
            ]
        })
        .collect();
    let mut widths = header.clone().map(|h| h.chars().count());
    for line in &body {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in std::iter::once(&header).chain(body.iter()) {
        let cells: Vec<String> = line
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_cmdline_from_our_log() {
        let log = "[vmm 2026-12-04T14:20:07Z INFO] hiding cx16: ...\n\
                   [vmm 2026-12-04T14:20:07Z INFO] kernel command line: console=ttyS0 panic=1 noxsave\n";
        assert_eq!(
            parse_kernel_cmdline(log),
            Some("console=ttyS0 panic=1 noxsave")
        );
        assert_eq!(parse_kernel_cmdline("kernel command line: \n"), None);
        assert_eq!(parse_kernel_cmdline("no such line"), None);
    }

    #[test]
    fn qemu_internal_error_names_the_failure_and_rip() {
        let stderr = "KVM internal error. Suberror: 1\nextra data[0]: 0x0000000000000001\n\
                      emulation failure\nRAX=0000000000000000 RBX=000000000000001c\n\
                      RIP=ffffffff81ae1604 RFL=00000246 [---Z-P-] CPL=0\n";
        assert_eq!(
            parse_kvm_internal_error(stderr).as_deref(),
            Some("KVM internal error (emulation failure) at RIP=ffffffff81ae1604")
        );
        assert_eq!(
            parse_kvm_internal_error("KVM internal error. Suberror: 3\n").as_deref(),
            Some("KVM internal error (suberror 3)")
        );
        assert_eq!(
            parse_kvm_internal_error("qemu: terminating on signal 15"),
            None
        );
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        let odd = Stats::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!(
            (odd.median, odd.min, odd.max, odd.count),
            (3.0, 1.0, 5.0, 3)
        );
        let even = Stats::of(&[4.0, 1.0, 3.0, 10.0]).unwrap();
        assert_eq!((even.median, even.min, even.max), (3.5, 1.0, 10.0));
        assert_eq!(Stats::of(&[7.0]).unwrap().median, 7.0);
    }

    #[test]
    fn no_samples_no_stats() {
        assert_eq!(Stats::of(&[]), None);
        assert_eq!(Stats::of(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn debug_durations_parse_in_every_unit() {
        let ms = |v: f64| Duration::from_secs_f64(v / 1e3);
        assert_eq!(parse_debug_duration("27.797344ms"), Some(ms(27.797344)));
        assert_eq!(parse_debug_duration("1.5s"), Some(ms(1500.0)));
        assert_eq!(parse_debug_duration("950µs"), Some(ms(0.95)));
        assert_eq!(parse_debug_duration("950us"), Some(ms(0.95)));
        assert_eq!(parse_debug_duration("12ns"), Some(Duration::from_nanos(12)));
        assert_eq!(parse_debug_duration("12"), None);
        assert_eq!(parse_debug_duration("ms"), None);
        assert_eq!(parse_debug_duration("3.2 parsecs"), None);
    }

    #[test]
    fn first_kvm_run_is_found_in_the_log() {
        let log =
            "[vmm 2026-11-23T19:16:45.469168Z INFO] VM built in 27.533329ms: 1 vCPUs, 64 MiB\n\
                   [vmm 2026-11-23T19:16:45.469430Z INFO] first KVM_RUN after 27.797344ms\n\
                   [vmm 2026-11-23T19:16:45.501078Z INFO] i8042: the guest reset the CPU\n";
        assert_eq!(
            parse_first_kvm_run(log),
            Some(Duration::from_secs_f64(0.027797344))
        );
        assert_eq!(parse_first_kvm_run("VM built in 3ms\n"), None);
        assert_eq!(parse_first_kvm_run(""), None);
    }

    #[test]
    fn exit_loop_output_parses() {
        let out = "20000 PIO exits in 1.234 s = 16207 exits/s (61.70 us each)\n";
        assert_eq!(parse_exit_loop(out), Some(16207.0));
        assert_eq!(parse_exit_loop("exit 17\n"), None);
        assert_eq!(parse_exit_loop("a = b c\n"), None);
    }

    #[test]
    fn exit_rate_from_two_runs() {
        let rate = exits_per_second(
            20_000,
            Duration::from_millis(1030),
            Duration::from_millis(30),
        );
        assert_eq!(rate, Some(20_000.0));
        assert_eq!(
            exits_per_second(1, Duration::from_millis(5), Duration::from_millis(9)),
            None
        );
    }

    #[test]
    fn table_shows_medians_ranges_ratios_and_reasons() {
        let rows = [
            Row {
                case: "tiny guest: start -> marker".into(),
                unit: "ms".into(),
                ours: Cell::from_samples(&[9.0, 8.0, 10.0], "no runs"),
                other: Cell::from_samples(&[60.0, 62.0, 70.0], "no runs"),
            },
            Row {
                case: "setup".into(),
                unit: "ms".into(),
                ours: Cell::from_samples(&[], "the log had no first KVM_RUN line"),
                other: Cell::NotMeasured("QEMU does not log it".into()),
            },
        ];
        let table = format_table(&rows, "QEMU");
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("case"), "{table}");
        assert!(lines[0].contains("QEMU median (min-max)"), "{table}");
        assert!(lines[1].contains("9.00 (8.00-10.0)"), "{table}");
        assert!(lines[1].contains("62.0 (60.0-70.0)"), "{table}");
        assert!(lines[1].trim_end().ends_with("0.15"), "{table}");
        assert!(
            lines[2].contains("failed: the log had no first KVM_RUN line"),
            "{table}"
        );
        assert!(
            lines[2].contains("not measured: QEMU does not log it"),
            "{table}"
        );
        assert!(lines[2].trim_end().ends_with('-'), "{table}");
    }
    #[test]
    fn guest_result_lines_parse() {
        let console = "noise\n\
            bench: tsc khz=2596146 source=kvmclock\n\
            bench: start blk qd1\r\n\
            bench: blk qd1 randread iops=6084 lat_mean_us=163.7 lat_p50_us=98.2 lat_p99_us=4041.5 lat_max_us=7093.0 reqs=3043 \
            verify=ok\n\
            bench: blk seqread mb_s=2025.8 reqs=978 req_kib=1024 qd=4\n\
            bench: done notifications=4437\n";
        let lines = parse_guest_lines(console);
        let names: Vec<&str> = lines.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "tsc",
                "start blk qd1",
                "blk qd1 randread",
                "blk seqread",
                "done"
            ]
        );
        let qd1 = &lines[2];
        assert_eq!(qd1.number("iops"), Some(6084.0));
        assert_eq!(qd1.number("lat_p99_us"), Some(4041.5));
        assert_eq!(qd1.number("lat_max_us"), Some(7093.0));
        assert_eq!(qd1.field("verify"), Some("ok"));
        assert_eq!(qd1.number("verify"), None);
        assert_eq!(qd1.number("missing"), None);
        assert_eq!(lines[1].fields, []);
        assert_eq!(lines[0].field("source"), Some("kvmclock"));
        assert_eq!(guest_error(console), None);
    }

    #[test]
    fn guest_errors_and_junk() {
        let console = "bench: error used length larger than the buffers 0x1001\n";
        assert_eq!(
            guest_error(console),
            Some("used length larger than the buffers 0x1001")
        );
        assert_eq!(parse_guest_line("bench: "), None);
        assert_eq!(parse_guest_line("ench: blk x=1"), None);
        assert_eq!(
            parse_guest_line("bench: iops=5"),
            None,
            "a line needs a name"
        );
        let nan = parse_guest_line("bench: blk qd1 randread iops=NaN").unwrap();
        assert_eq!(nan.number("iops"), None);
    }

    #[test]
    fn proc_stat_cpu_times() {
        // Fields 3 to 52 as Linux 6.1 prints them: state, then numbers.
        let fields: Vec<String> = (3..=52)
            .map(|n| match n {
                3 => "S".to_string(),
                14 => "120".to_string(),
                15 => "35".to_string(),
                43 => "97".to_string(),
                _ => "1".to_string(),
            })
            .collect();
        let stat = format!("4242 (vmm (x) y) {}\n", fields.join(" "));
        let stat = stat.as_str();
        let cpu = parse_proc_stat_cpu(stat).unwrap();
        assert_eq!(
            cpu,
            ProcCpu {
                total: 155,
                guest: 97
            }
        );
        assert_eq!(cpu.vmm(), 58);
        assert_eq!(parse_proc_stat_cpu("4242 (vmm) S 1 2"), None);
        assert_eq!(parse_proc_stat_cpu("no parenthesis"), None);
    }

    #[test]
    fn the_peak_resident_memory_is_read_from_proc_status() {
        let status = "Name:\tvmm\nVmPeak:\t  137000 kB\nVmSize:\t  136000 kB\nVmHWM:\t    1104 kB\nVmRSS:\t    1090 kB\n";
        assert_eq!(parse_vm_hwm_kib(status), Some(1104));
        assert_eq!(
            parse_vm_hwm_kib("Name:\tzombie\nState:\tZ (zombie)\n"),
            None
        );
        assert_eq!(parse_vm_hwm_kib("VmHWM:\t  12 MB\n"), None);
    }
}
