//! Hiding CPU features the host's KVM cannot emulate, through the guest kernel's command line.
//!
//! On kvm-pvm hosts the guest's `cpuid` returns the host's values whatever `KVM_SET_CPUID2` set,
//! so only Linux's own switches can hide a feature. What Linux 6.1 does with them
//! (`arch/x86/kernel/cpu/common.c`, `cpu_parse_early_param`, run from `early_identify_cpu` before
//! the FPU is set up):
//!
//! - `clearcpuid=X[,X...]` takes decimal `X86_FEATURE_*` bit numbers
//!   (`arch/x86/include/asm/cpufeatures.h`: word * 32 + bit) or `/proc/cpuinfo` names; the names
//!   work only with `CONFIG_X86_FEATURE_NAMES`, which `tinyconfig` turns off, and kernels before
//!   5.19 accept numbers only. So we write numbers.
//! - `noxsave` is `setup_clear_cpu_cap(X86_FEATURE_XSAVE)`, the same as `clearcpuid=154`; we pass
//!   both, as the README's boots did and because older kernels know only `noxsave` early enough.
//!   `noxsave` is not registered with `__setup`, so Linux also hands it to init as an argument.
//! - Clearing a bit clears what depends on it (`arch/x86/kernel/cpu/cpuid-deps.c`): XSAVE takes
//!   AVX (and with it AVX2, FMA, AVX-512, VAES...), PKU, XSAVEOPT, XSAVEC, XSAVES and XGETBV1 along.
//!   `setup_pku` checks X86_FEATURE_PKU, so clearing PKU keeps the kernel from `wrpkru`.
//!
//! Hiding XSAVE from the kernel does not hide AVX from the guest's user space. Guest user code
//! runs natively under the host's CR4 and XCR0, so `cpuid` reports OSXSAVE, `xgetbv` reports the
//! host's YMM and ZMM state, and glibc picks its AVX2 and AVX-512 (EVEX) string functions. A
//! kernel without XSAVE switches tasks with `fxsave`/`fxrstor`, which carry only x87 and
//! XMM0-15: the upper halves of YMM, ZMM16-31 and the mask registers leak from one process into
//! the next, and glibc's `memcpy` and `strlen` in the preempted process return garbage (seen:
//! busybox's `mount`, `gzip` and `poweroff` dying with SIGSEGV, more often on busy hosts, where
//! guest preemption is more frequent). So with XSAVE or AVX hidden, the command line also carries
//! `GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,...`: the kernel passes a `NAME=value` parameter whose
//! name has no dot to init as an environment variable, and every glibc program init starts
//! inherits it and keeps to SSE2, which `fxsave` does switch. Programs that pick AVX without
//! glibc (or guests whose init clears its environment) are not covered by this.
//!
//! x87 and SSE (`fnstsw`, `fwait`, `ldmxcsr`, `pxor`) are part of x86-64 and cannot be hidden; the
//! instruction fallback carries them out. The SIMD extensions after SSE2 (SSSE3, SSE4.x, AES-NI,
//! PCLMULQDQ, SHA-NI, GFNI) can: the kernel uses them only in code it picks by CPUID, such as the
//! random pool's BLAKE2s, which would otherwise send hundreds of instructions per call to the
//! fallback.

use std::fmt;
use std::str::FromStr;

use kvm_ioctls::Kvm;

use super::probe::{InsnClass, ProbeReport};
use super::probe_cache::probe_host_cached;

/// Which CPU features the guest kernel is told to leave alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuFeaturePolicy {
    /// Hide nothing: the guest uses what the host CPU offers.
    Host,
    /// Hide everything hideable that some KVM emulator is known to fail on, without probing.
    Safe,
    /// Probe the host and hide what fails there (nothing on hosts with VMX/SVM).
    #[default]
    Auto,
}

/// A policy name that is not `host`, `safe` or `auto`.
#[derive(Debug, thiserror::Error)]
#[error("unknown CPU feature policy `{0}`: expected host, safe or auto")]
pub struct ParsePolicyError(String);

impl FromStr for CpuFeaturePolicy {
    type Err = ParsePolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "host" => Ok(CpuFeaturePolicy::Host),
            "safe" => Ok(CpuFeaturePolicy::Safe),
            "auto" => Ok(CpuFeaturePolicy::Auto),
            other => Err(ParsePolicyError(other.to_string())),
        }
    }
}

impl fmt::Display for CpuFeaturePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuFeaturePolicy::Host => "host",
            CpuFeaturePolicy::Safe => "safe",
            CpuFeaturePolicy::Auto => "auto",
        })
    }
}

/// One feature hidden from the guest kernel, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HiddenFeature {
    /// The instruction class the host cannot run.
    pub class: InsnClass,
    /// The `X86_FEATURE_*` bits passed to `clearcpuid=`; empty when another hidden feature's
    /// bit already clears them.
    pub bits: &'static [u16],
    /// For the log.
    pub reason: String,
}

/// Classes that can be hidden, in the order they are considered.
const HIDEABLE: [InsnClass; 7] = [
    InsnClass::Xsave,
    InsnClass::Avx,
    InsnClass::Pku,
    InsnClass::Cx16,
    InsnClass::Popcnt,
    InsnClass::Smap,
    InsnClass::SimdExt,
];

/// The `X86_FEATURE_*` bits of a hideable class (Linux 6.1 cpufeatures.h).
fn feature_bits(class: InsnClass) -> &'static [u16] {
    match class {
        InsnClass::Cx16 => &[4 * 32 + 13],
        InsnClass::Popcnt => &[4 * 32 + 23],
        InsnClass::Xsave => &[4 * 32 + 26],
        InsnClass::Avx => &[4 * 32 + 28],
        InsnClass::Pku => &[16 * 32 + 3],
        InsnClass::Smap => &[9 * 32 + 20],
        // PCLMULQDQ, SSSE3, SSE4.1, SSE4.2, AES, F16C, SHA_NI, GFNI: everything that depends on
        // SSE2 in cpuid-deps.c but SSE3 (whose instructions the kernel does not use). VAES and
        // VPCLMULQDQ depend on AVX.
        InsnClass::SimdExt => &[
            4 * 32 + 1,
            4 * 32 + 9,
            4 * 32 + 19,
            4 * 32 + 20,
            4 * 32 + 25,
            4 * 32 + 29,
            9 * 32 + 29,
            16 * 32 + 8,
        ],
        InsnClass::Sse | InsnClass::X87 => &[],
    }
}

/// Features that clearing XSAVE clears too (cpuid-deps.c).
fn implied_by_xsave(class: InsnClass) -> bool {
    matches!(class, InsnClass::Avx | InsnClass::Pku)
}

/// What `policy` hides, given the probe's `report` (`None`: no probe ran; `Auto` then hides
/// what `Safe` does, so the guest boots on any host).
pub fn hidden(policy: CpuFeaturePolicy, report: Option<&ProbeReport>) -> Vec<HiddenFeature> {
    let (classes, why): (Vec<InsnClass>, &str) = match (policy, report) {
        (CpuFeaturePolicy::Host, _) => return Vec::new(),
        (CpuFeaturePolicy::Auto, Some(report)) => (
            HIDEABLE.into_iter().filter(|c| report.fails(*c)).collect(),
            "the host's KVM emulator failed on it in the probe",
        ),
        (CpuFeaturePolicy::Safe, _) => (HIDEABLE.to_vec(), "the safe policy hides it"),
        (CpuFeaturePolicy::Auto, None) => (
            HIDEABLE.to_vec(),
            "no probe result, so the safe choice hides it",
        ),
    };
    let xsave = classes.contains(&InsnClass::Xsave);
    classes
        .into_iter()
        .map(|class| {
            let implied = xsave && implied_by_xsave(class);
            let reason = match class {
                _ if implied => format!("{class}: {why}; cleared along with xsave"),
                InsnClass::SimdExt => format!(
                    "ssse3: {why}; the guest kernel uses its generic C code instead of SSSE3, \
                     SSE4.1/4.2, AES-NI, PCLMULQDQ, SHA-NI and GFNI"
                ),
                InsnClass::Xsave => format!(
                    "xsave: {why}; the guest kernel saves FPU state with fxsave instead, and \
                     loses AVX, AVX2, AVX-512, PKU and xsaveopt/xsavec/xsaves with it"
                ),
                _ => format!("{class}: {why}"),
            };
            HiddenFeature {
                class,
                bits: if implied { &[] } else { feature_bits(class) },
                reason,
            }
        })
        .collect()
}

/// Init's environment variable that keeps glibc in guest user space off the vector state a guest
/// kernel without XSAVE does not switch between tasks (see the module doc): AVX, AVX2, FMA, F16C
/// and every AVX-512 subset glibc selects code by.
pub const GLIBC_SSE2_ONLY: &str = "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-FMA,-F16C,\
-AVX512F,-AVX512CD,-AVX512BW,-AVX512DQ,-AVX512VL,-AVX_Fast_Unaligned_Load";

/// The kernel parameters that hide `hidden` features, e.g. `["noxsave", "clearcpuid=141,151,154"]`.
///
/// Whenever anything is hidden the guest kernel runs under KVM's instruction emulator, and three
/// more switches go with it:
/// - `mitigations=off`: the emulator does not speculate, so speculative-execution mitigations
///   (retpolines, return thunks, RSB filling) protect nothing and multiply emulated instructions;
/// - `nopv`: the guest sees the host's CPUID, KVM's paravirtual features included, but a
///   hypercall (`vmcall`) from the emulated kernel never completes there (seen: an SMP guest's
///   first PV IPI hangs its vCPU), so the guest must not use them;
/// - `tsc_early_khz=`: without kvm-clock the guest calibrates the TSC against the PIT, which fails
///   under the emulator; the VMM knows the frequency from KVM;
/// - `nowatchdog`: at emulated speed every long kernel loop looks like a soft lockup, and the
///   watchdog's reports and backtraces cost more emulated time.
pub fn switches_for(hidden: &[HiddenFeature], tsc_khz: Option<u32>) -> Vec<String> {
    let mut switches = Vec::new();
    if hidden.is_empty() {
        return switches;
    }
    switches.push("mitigations=off".to_string());
    switches.push("nopv".to_string());
    switches.push("nowatchdog".to_string());
    if let Some(khz) = tsc_khz.filter(|k| *k > 0) {
        switches.push(format!("tsc_early_khz={khz}"));
    }
    if hidden.iter().any(|h| h.class == InsnClass::Xsave) {
        switches.push("noxsave".to_string());
    }
    if hidden
        .iter()
        .any(|h| matches!(h.class, InsnClass::Xsave | InsnClass::Avx))
    {
        switches.push(GLIBC_SSE2_ONLY.to_string());
    }
    let mut bits: Vec<u16> = hidden.iter().flat_map(|h| h.bits.iter().copied()).collect();
    bits.sort_unstable();
    bits.dedup();
    if !bits.is_empty() {
        let list: Vec<String> = bits.iter().map(u16::to_string).collect();
        switches.push(format!("clearcpuid={}", list.join(",")));
    }
    switches
}

/// The kernel parameters to append to the guest's command line under `policy`.
pub fn guest_cmdline_switches(
    policy: CpuFeaturePolicy,
    report: Option<&ProbeReport>,
) -> Vec<String> {
    switches_for(&hidden(policy, report), report.and_then(|r| r.tsc_khz))
}

/// Probes the host when `policy` is `Auto`, logs what is hidden and why (and what cannot be
/// hidden), and returns the kernel parameters to append.
pub fn hidden_features(kvm: &Kvm, policy: CpuFeaturePolicy) -> Vec<String> {
    let report = match policy {
        CpuFeaturePolicy::Auto => match probe_host_cached(kvm) {
            Ok(report) => {
                log::info!("CPU feature probe: {report}");
                Some(report)
            }
            Err(e) => {
                log::warn!("cannot probe what the host's KVM runs, hiding the safe set: {e}");
                None
            }
        },
        _ => None,
    };
    let hidden = hidden(policy, report.as_ref());
    for feature in &hidden {
        log::info!("hiding {}", feature.reason);
    }
    if let Some(report) = &report {
        for class in report.failing().into_iter().filter(|c| !c.hideable()) {
            log::info!(
                "{class} fails under the host's KVM emulator and cannot be hidden; \
                 the instruction fallback carries it out"
            );
        }
    }
    let tsc_khz = match &report {
        Some(report) => report.tsc_khz,
        None if !hidden.is_empty() => crate::probe::host_tsc_khz(kvm),
        None => None,
    };
    let switches = switches_for(&hidden, tsc_khz);
    if !switches.is_empty() {
        log::info!(
            "guest command line gets `{}` (CPU feature policy {policy})",
            switches.join(" ")
        );
    }
    switches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_parses() {
        assert_eq!(
            "host".parse::<CpuFeaturePolicy>().unwrap(),
            CpuFeaturePolicy::Host
        );
        assert_eq!(
            "safe".parse::<CpuFeaturePolicy>().unwrap(),
            CpuFeaturePolicy::Safe
        );
        assert_eq!(
            "auto".parse::<CpuFeaturePolicy>().unwrap(),
            CpuFeaturePolicy::Auto
        );
        let err = "Auto".parse::<CpuFeaturePolicy>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown CPU feature policy `Auto`: expected host, safe or auto"
        );
        assert_eq!(CpuFeaturePolicy::default(), CpuFeaturePolicy::Auto);
        assert_eq!(CpuFeaturePolicy::Safe.to_string(), "safe");
    }

    #[test]
    fn host_hides_nothing() {
        let report = ProbeReport::with_failing(&[InsnClass::Xsave]);
        assert!(guest_cmdline_switches(CpuFeaturePolicy::Host, Some(&report)).is_empty());
        assert!(guest_cmdline_switches(CpuFeaturePolicy::Host, None).is_empty());
    }

    #[test]
    fn safe_hides_everything_hideable() {
        // cx16 = 4*32+13, popcnt = 4*32+23, xsave = 4*32+26, smap = 9*32+20; AVX and PKU go
        // with XSAVE; the SIMD extensions are pclmulqdq 129, ssse3 137, sse4_1 147, sse4_2 148,
        // aes 153, f16c 157, sha_ni 317, gfni 520.
        let expected = vec![
            "mitigations=off".to_string(),
            "nopv".to_string(),
            "nowatchdog".to_string(),
            "noxsave".to_string(),
            GLIBC_SSE2_ONLY.to_string(),
            "clearcpuid=129,137,141,147,148,151,153,154,157,308,317,520".to_string(),
        ];
        assert_eq!(
            guest_cmdline_switches(CpuFeaturePolicy::Safe, None),
            expected
        );
        // Safe ignores the probe.
        let empty = ProbeReport::default();
        assert_eq!(
            guest_cmdline_switches(CpuFeaturePolicy::Safe, Some(&empty)),
            expected
        );
        // Auto without a probe result falls back to the safe set.
        assert_eq!(
            guest_cmdline_switches(CpuFeaturePolicy::Auto, None),
            expected
        );
    }

    #[test]
    fn auto_hides_what_failed() {
        let report = ProbeReport::with_failing(&[InsnClass::Popcnt, InsnClass::Sse]);
        assert_eq!(
            guest_cmdline_switches(CpuFeaturePolicy::Auto, Some(&report)),
            vec![
                "mitigations=off".to_string(),
                "nopv".to_string(),
                "nowatchdog".to_string(),
                "clearcpuid=151".to_string()
            ]
        );
        // This host: everything fails.
        let report = ProbeReport::with_failing(&[
            InsnClass::Xsave,
            InsnClass::Cx16,
            InsnClass::Popcnt,
            InsnClass::Pku,
            InsnClass::Avx,
            InsnClass::Smap,
            InsnClass::SimdExt,
            InsnClass::Sse,
            InsnClass::X87,
        ]);
        assert_eq!(
            guest_cmdline_switches(CpuFeaturePolicy::Auto, Some(&report)),
            vec![
                "mitigations=off".to_string(),
                "nopv".to_string(),
                "nowatchdog".to_string(),
                "noxsave".to_string(),
                GLIBC_SSE2_ONLY.to_string(),
                "clearcpuid=129,137,141,147,148,151,153,154,157,308,317,520".to_string()
            ]
        );
    }

    #[test]
    fn avx_and_pku_without_xsave_get_their_own_bits() {
        let report = ProbeReport::with_failing(&[InsnClass::Pku, InsnClass::Avx]);
        // avx = 4*32+28 = 156, pku = 16*32+3 = 515.
        assert_eq!(
            guest_cmdline_switches(CpuFeaturePolicy::Auto, Some(&report)),
            vec![
                "mitigations=off".to_string(),
                "nopv".to_string(),
                "nowatchdog".to_string(),
                GLIBC_SSE2_ONLY.to_string(),
                "clearcpuid=156,515".to_string()
            ]
        );
    }

    #[test]
    fn a_known_tsc_frequency_is_passed_on() {
        let mut report = ProbeReport::with_failing(&[InsnClass::Popcnt]);
        report.tsc_khz = Some(2_445_406);
        let switches = guest_cmdline_switches(CpuFeaturePolicy::Auto, Some(&report));
        assert!(switches.contains(&"tsc_early_khz=2445406".to_string()));
        // Nothing hidden: a hardware host, where the guest calibrates for itself.
        let clean = ProbeReport {
            tsc_khz: Some(2_445_406),
            ..Default::default()
        };
        assert!(guest_cmdline_switches(CpuFeaturePolicy::Auto, Some(&clean)).is_empty());
    }

    #[test]
    fn a_clean_probe_hides_nothing() {
        let report = ProbeReport::default();
        assert!(guest_cmdline_switches(CpuFeaturePolicy::Auto, Some(&report)).is_empty());
        let report = ProbeReport::with_failing(&[InsnClass::X87, InsnClass::Sse]);
        assert!(guest_cmdline_switches(CpuFeaturePolicy::Auto, Some(&report)).is_empty());
    }

    #[test]
    fn reasons_name_the_class_and_the_cause() {
        let report = ProbeReport::with_failing(&[InsnClass::Xsave, InsnClass::Avx]);
        let hidden = hidden(CpuFeaturePolicy::Auto, Some(&report));
        assert_eq!(hidden.len(), 2);
        assert_eq!(hidden[0].class, InsnClass::Xsave);
        assert_eq!(hidden[0].bits, &[154]);
        assert!(hidden[0]
            .reason
            .starts_with("xsave: the host's KVM emulator failed"));
        assert_eq!(hidden[1].class, InsnClass::Avx);
        assert!(hidden[1].bits.is_empty());
        assert_eq!(
            hidden[1].reason,
            "avx: the host's KVM emulator failed on it in the probe; cleared along with xsave"
        );
    }
}
