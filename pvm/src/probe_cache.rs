//! Making the host probe cost nothing where it is not needed.
//!
//! The probe ([`probe_host`]) runs a scratch VM, which is the critical path to a guest's first
//! instruction. Two shortcuts, both only ever used to *skip the probe*:
//!
//! - [`host_kind`]: `/sys/module` names KVM's vendor module. Where it is `kvm_intel` or `kvm_amd`
//!   (and no `kvm_pvm`), ring-0 code runs on the CPU and the probe would find nothing. Where it is
//!   `kvm_pvm`, or nothing is known, the probe runs.
//! - [`ProbeCache`]: the probe's answer, kept in a small file keyed by everything that decides it
//!   — the running kernel instance (`boot_id`, which also pins the TSC frequency the report
//!   carries), the kernel build (`/proc/version`), the KVM modules' `srcversion` and parameters,
//!   and the CPU model and flags — plus the file format's version. It lives in
//!   `$XDG_RUNTIME_DIR/vmm` (a per-user tmpfs that a reboot empties, matching the key) or else
//!   `$XDG_CACHE_HOME/vmm` / `~/.cache/vmm`; `VMM_PROBE_CACHE=off` bypasses it and
//!   `VMM_PROBE_CACHE=/some/dir` moves it. It is written atomically (a temporary file renamed
//!   over the old one); a missing, unreadable, truncated, corrupt or foreign file is ignored and
//!   the host probed again; an unwritable directory only costs the next start its probe.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use kvm_ioctls::Kvm;

use crate::probe::{probe_host, ProbeOutcome, ProbeReport, ProbeResult, PROBES};
use crate::PvmError;

/// First line of a cache file; the number changes whenever the probe list or the format does.
const MAGIC: &str = "vmmkit-probe-cache 1";
/// The cache file's name inside the cache directory.
const FILE_NAME: &str = "cpu-probe";
/// Environment variable: `off` bypasses the cache, an absolute path is the directory to use.
pub const ENV: &str = "VMM_PROBE_CACHE";

/// What `/sys/module` says about the host's KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// `kvm_intel` or `kvm_amd` without `kvm_pvm`: ring-0 guest code runs on the CPU.
    HardwareVirt,
    /// `kvm_pvm`: KVM emulates the guest kernel, so the probe is needed.
    Pvm,
    /// Neither is visible (no sysfs, another vendor module): probe to be safe.
    Unknown,
}

/// Classifies the host from the module directories under `sys_module` (`/sys/module`).
pub fn host_kind_in(sys_module: &Path) -> HostKind {
    let has = |name: &str| sys_module.join(name).is_dir();
    if has("kvm_pvm") {
        HostKind::Pvm
    } else if has("kvm_intel") || has("kvm_amd") {
        HostKind::HardwareVirt
    } else {
        HostKind::Unknown
    }
}

/// Classifies this host (see [`HostKind`]).
pub fn host_kind() -> HostKind {
    host_kind_in(Path::new("/sys/module"))
}

/// The probe's answer stored for one host, under one key.
#[derive(Debug, Clone)]
pub struct ProbeCache {
    path: PathBuf,
    key: String,
}

impl ProbeCache {
    /// The cache for this host, unless `VMM_PROBE_CACHE=off` or no directory can be named.
    pub fn for_host() -> Option<Self> {
        let dir = cache_dir(|name| std::env::var_os(name))?;
        Some(Self::at(dir.join(FILE_NAME), host_key()))
    }

    /// A cache at `path` under `key` (for tests and other hosts' keys).
    pub fn at(path: PathBuf, key: String) -> Self {
        ProbeCache { path, key }
    }

    /// The file this cache reads and writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored report, if the file exists, is well-formed and carries this host's key.
    pub fn load(&self) -> Option<ProbeReport> {
        let start = Instant::now();
        let text = fs::read_to_string(&self.path).ok()?;
        let mut report = decode(&text, &self.key)?;
        report.elapsed = start.elapsed();
        report.from_cache = true;
        Some(report)
    }

    /// Stores `report` atomically: a temporary file in the same directory renamed over the old.
    pub fn store(&self, report: &ProbeReport) -> std::io::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
        let result = (|| {
            let mut file = fs::File::create(&tmp)?;
            file.write_all(encode(report, &self.key).as_bytes())?;
            file.sync_data()?;
            fs::rename(&tmp, &self.path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

/// The directory the cache lives in, from the environment `var` (see the module documentation).
fn cache_dir(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
    let absolute = |value: std::ffi::OsString| {
        let path = PathBuf::from(value);
        path.is_absolute().then_some(path)
    };
    if let Some(value) = var(ENV) {
        if value == "off" {
            return None;
        }
        if let Some(dir) = absolute(value) {
            return Some(dir);
        }
    }
    if let Some(dir) = var("XDG_RUNTIME_DIR").and_then(absolute) {
        return Some(dir.join("vmm"));
    }
    if let Some(dir) = var("XDG_CACHE_HOME").and_then(absolute) {
        return Some(dir.join("vmm"));
    }
    var("HOME")
        .and_then(absolute)
        .map(|home| home.join(".cache").join("vmm"))
}

/// Everything the probe's answer depends on, as text (compared exactly, never parsed).
pub fn host_key() -> String {
    let read = |path: &str| fs::read_to_string(path).unwrap_or_else(|_| "?".to_string());
    let mut key = String::new();
    let _ = writeln!(key, "probes {}", PROBES.len());
    let _ = writeln!(
        key,
        "boot_id {}",
        read("/proc/sys/kernel/random/boot_id").trim()
    );
    let _ = writeln!(key, "kernel {}", read("/proc/version").trim());
    for module in ["kvm", "kvm_pvm", "kvm_intel", "kvm_amd"] {
        let dir = Path::new("/sys/module").join(module);
        if !dir.is_dir() {
            continue;
        }
        let srcversion = fs::read_to_string(dir.join("srcversion")).unwrap_or_default();
        let _ = writeln!(key, "module {module} {}", srcversion.trim());
        let mut params: Vec<_> = fs::read_dir(dir.join("parameters"))
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        params.sort();
        for param in params {
            let value = fs::read_to_string(&param).unwrap_or_else(|_| "?".to_string());
            let name = param.file_name().unwrap_or_default().to_string_lossy();
            let _ = writeln!(key, "param {module}.{name} {}", value.trim());
        }
    }
    // The first CPU's model and flags (the probe's answer follows the CPU's features).
    let cpuinfo = read("/proc/cpuinfo");
    for line in cpuinfo.lines().take_while(|l| !l.trim().is_empty()) {
        if [
            "vendor_id",
            "cpu family",
            "model",
            "model name",
            "stepping",
            "flags",
        ]
        .iter()
        .any(|field| line.split(':').next().map(str::trim) == Some(field))
        {
            let _ = writeln!(key, "cpu {}", line.trim());
        }
    }
    key
}

/// The file's text: magic, the TSC frequency, the failing instructions, then the key.
fn encode(report: &ProbeReport, key: &str) -> String {
    let mut text = format!("{MAGIC}\n");
    match report.tsc_khz {
        Some(khz) => {
            let _ = writeln!(text, "tsc_khz {khz}");
        }
        None => text.push_str("tsc_khz -\n"),
    }
    for result in &report.results {
        if matches!(result.outcome, ProbeOutcome::EmulationFailed(_)) {
            let _ = writeln!(text, "fails {}", result.insn);
        }
    }
    let _ = write!(text, "key {}\n{key}", key.len());
    text
}

/// Parses a cache file; `None` for anything but a complete file with exactly `key`.
fn decode(text: &str, key: &str) -> Option<ProbeReport> {
    let (head, rest) = text.split_once("\nkey ")?;
    let (len, stored_key) = rest.split_once('\n')?;
    if len.parse::<usize>().ok()? != stored_key.len() || stored_key != key {
        return None;
    }
    let mut lines = head.lines();
    if lines.next()? != MAGIC {
        return None;
    }
    let tsc_khz = match lines.next()?.strip_prefix("tsc_khz ")? {
        "-" => None,
        khz => Some(khz.parse().ok()?),
    };
    let mut failing = Vec::new();
    for line in lines {
        let insn = line.strip_prefix("fails ")?;
        // Only names of this build's probes: a foreign or damaged file is refused.
        PROBES.iter().find(|p| p.insn == insn)?;
        failing.push(insn);
    }
    let results = PROBES
        .iter()
        .map(|probe| ProbeResult {
            class: probe.class,
            insn: probe.insn,
            outcome: if failing.contains(&probe.insn) {
                ProbeOutcome::EmulationFailed(probe.code.to_vec())
            } else {
                ProbeOutcome::Ran
            },
        })
        .collect();
    Some(ProbeReport {
        results,
        tsc_khz,
        ..Default::default()
    })
}

/// The probe's answer for this host at the least cost: nothing to probe on a VMX/SVM host
/// (an empty report), the cached answer where one matches, else a fresh probe (then cached).
pub fn probe_host_cached(kvm: &Kvm) -> Result<ProbeReport, PvmError> {
    if host_kind() == HostKind::HardwareVirt {
        log::debug!("KVM runs on VMX/SVM here (kvm_intel/kvm_amd loaded): no probe needed");
        return Ok(ProbeReport {
            skipped: true,
            ..Default::default()
        });
    }
    let start = Instant::now();
    let cache = ProbeCache::for_host();
    if let Some(mut report) = cache.as_ref().and_then(ProbeCache::load) {
        // What the cache cost, the host key's sysfs reads included.
        report.elapsed = start.elapsed();
        return Ok(report);
    }
    let report = probe_host(kvm)?;
    if let Some(cache) = &cache {
        if let Err(e) = cache.store(&report) {
            log::debug!(
                "cannot keep the CPU feature probe's answer in {}: {e}",
                cache.path().display()
            );
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::InsnClass;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("pvm-probe-cache-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn sample() -> ProbeReport {
        let mut report = ProbeReport::with_failing(&[]);
        report.results = PROBES
            .iter()
            .map(|p| ProbeResult {
                class: p.class,
                insn: p.insn,
                outcome: if matches!(p.class, InsnClass::Xsave | InsnClass::Sse) {
                    ProbeOutcome::EmulationFailed(p.code.to_vec())
                } else {
                    ProbeOutcome::Ran
                },
            })
            .collect();
        report.tsc_khz = Some(2_445_406);
        report
    }

    #[test]
    fn a_stored_answer_reads_back_under_the_same_key() {
        let dir = temp_dir("roundtrip");
        let cache = ProbeCache::at(dir.join(FILE_NAME), "host A\nline 2\n".into());
        assert!(cache.load().is_none(), "nothing stored yet");
        cache.store(&sample()).unwrap();
        let loaded = cache.load().expect("the stored answer");
        assert!(loaded.from_cache);
        assert_eq!(loaded.results, sample().results);
        assert_eq!(loaded.failing(), sample().failing());
        assert_eq!(loaded.tsc_khz, Some(2_445_406));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn another_key_is_a_miss() {
        let dir = temp_dir("key");
        let path = dir.join(FILE_NAME);
        ProbeCache::at(path.clone(), "host A\n".into())
            .store(&sample())
            .unwrap();
        assert!(ProbeCache::at(path.clone(), "host B\n".into())
            .load()
            .is_none());
        assert!(ProbeCache::at(path.clone(), "host A\nmore\n".into())
            .load()
            .is_none());
        assert!(ProbeCache::at(path, "host \n".into()).load().is_none());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn truncated_corrupt_or_foreign_files_are_ignored() {
        let key = "host A\n";
        let good = encode(&sample(), key);
        assert!(decode(&good, key).is_some());
        for cut in 0..good.len() {
            assert!(decode(&good[..cut], key).is_none(), "truncated at {cut}");
        }
        let bad = [
            good.replace(MAGIC, "vmmkit-probe-cache 0"),
            good.replace("tsc_khz 2445406", "tsc_khz lots"),
            good.replace("fails xgetbv", "fails hlt"),
            good.replace("fails xgetbv", "garbage"),
            format!("{good}x"),
            "\0\0\0\0".to_string(),
            String::new(),
        ];
        for text in &bad {
            assert!(decode(text, key).is_none(), "accepted {text:?}");
        }
        // Non-UTF-8 bytes on disk are a miss too.
        let dir = temp_dir("corrupt");
        let cache = ProbeCache::at(dir.join(FILE_NAME), key.into());
        fs::write(cache.path(), [0xff, 0xfe, 0x00, 0x41]).unwrap();
        assert!(cache.load().is_none());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn store_replaces_the_file_atomically_and_leaves_no_temporary() {
        let dir = temp_dir("atomic");
        let cache = ProbeCache::at(dir.join(FILE_NAME), "host A\n".into());
        fs::write(cache.path(), "an old, foreign file").unwrap();
        cache.store(&sample()).unwrap();
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(FILE_NAME)]);
        assert!(cache.load().is_some());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_unwritable_directory_is_an_error_not_a_panic() {
        let dir = temp_dir("unwritable");
        let blocker = dir.join("file");
        fs::write(&blocker, "").unwrap();
        // A regular file where the directory should be: neither creatable nor writable.
        let cache = ProbeCache::at(blocker.join("sub").join(FILE_NAME), "k\n".into());
        assert!(cache.store(&sample()).is_err());
        assert!(cache.load().is_none());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_environment_picks_the_directory() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            }
        };
        assert_eq!(cache_dir(env(&[(ENV, "off"), ("HOME", "/h")])), None);
        assert_eq!(
            cache_dir(env(&[(ENV, "/d"), ("HOME", "/h")])),
            Some(PathBuf::from("/d"))
        );
        assert_eq!(
            cache_dir(env(&[("XDG_RUNTIME_DIR", "/run/user/1"), ("HOME", "/h")])),
            Some(PathBuf::from("/run/user/1/vmm"))
        );
        assert_eq!(
            cache_dir(env(&[("XDG_CACHE_HOME", "/c"), ("HOME", "/h")])),
            Some(PathBuf::from("/c/vmm"))
        );
        assert_eq!(
            cache_dir(env(&[("HOME", "/h")])),
            Some(PathBuf::from("/h/.cache/vmm"))
        );
        assert_eq!(cache_dir(env(&[("HOME", "relative")])), None);
    }

    #[test]
    fn sysfs_modules_classify_the_host() {
        let dir = temp_dir("sysfs");
        assert_eq!(host_kind_in(&dir), HostKind::Unknown);
        fs::create_dir(dir.join("kvm_intel")).unwrap();
        assert_eq!(host_kind_in(&dir), HostKind::HardwareVirt);
        fs::create_dir(dir.join("kvm_pvm")).unwrap();
        assert_eq!(host_kind_in(&dir), HostKind::Pvm);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_host_key_names_the_kernel_and_cpu() {
        let key = host_key();
        assert!(key.contains("\nkernel "), "{key}");
        assert_eq!(key, host_key(), "the key is stable between calls");
    }
}
