//! Which instruction classes can the host's KVM not run in a ring-0 guest?
//!
//! One instruction per class runs in a [`ScratchVm`] followed by `hlt`, as
//! `shared/pvm/insn-probe.c` does. An instruction that ends in `KVM_EXIT_INTERNAL_ERROR` with the
//! emulation suberror (`Documentation/virt/kvm/api.rst`, `KVM_EXIT_INTERNAL_ERROR`) marks its class
//! as failing. Any other outcome (including a fault, when the host CPU lacks the feature) is not a
//! failure: a guest would not use the feature either. With VMX/SVM, ring-0 code runs on the CPU
//! and nothing fails.

use std::collections::BTreeSet;
use std::fmt;
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;

use super::fallback::enable_exit_on_emulation_failure;
use super::scratch::{ScratchExit, ScratchVm};
use super::PvmError;

/// Instruction classes the probe tries, named after the CPUID feature that gates them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum InsnClass {
    /// `xsave`, `xrstor`, `xgetbv` (CPUID.1:ECX.XSAVE).
    Xsave,
    /// `cmpxchg16b` (CPUID.1:ECX.CX16).
    Cx16,
    /// `popcnt` (CPUID.1:ECX.POPCNT).
    Popcnt,
    /// `wrpkru` (CPUID.7:ECX.PKU).
    Pku,
    /// VEX-encoded instructions such as `vzeroupper` (CPUID.1:ECX.AVX).
    Avx,
    /// `clac`, `stac` (CPUID.7:EBX.SMAP): the kernel runs them around every user-memory access.
    Smap,
    /// The SIMD extensions after SSE2, probed with `pshufb` (SSSE3): the kernel runs them only
    /// in optional code (crypto, checksums, the random pool's BLAKE2s), picked by CPUID.
    SimdExt,
    /// `ldmxcsr`, `pxor`, SSE moves: part of x86-64, so they cannot be hidden.
    Sse,
    /// `fnstsw`, `fwait`: part of x86-64, so they cannot be hidden.
    X87,
}

impl InsnClass {
    /// Whether a Linux command-line switch can stop the guest kernel from using the class.
    pub fn hideable(self) -> bool {
        !matches!(self, InsnClass::Sse | InsnClass::X87)
    }

    /// Lower-case name, as in `/proc/cpuinfo` where there is one.
    pub fn name(self) -> &'static str {
        match self {
            InsnClass::Xsave => "xsave",
            InsnClass::Cx16 => "cx16",
            InsnClass::Popcnt => "popcnt",
            InsnClass::Pku => "pku",
            InsnClass::Avx => "avx",
            InsnClass::Smap => "smap",
            InsnClass::SimdExt => "ssse3",
            InsnClass::Sse => "sse",
            InsnClass::X87 => "x87",
        }
    }
}

impl fmt::Display for InsnClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// One probed instruction: its class, its name and its bytes (run with `rdi` pointing at a zeroed,
/// 4 KiB-aligned page, `eax` = 7, `ecx` = `edx` = 0).
struct Probe {
    class: InsnClass,
    insn: &'static str,
    code: &'static [u8],
}

const PROBES: &[Probe] = &[
    Probe {
        class: InsnClass::Xsave,
        insn: "xsave64 [rdi]",
        code: &[0x48, 0x0f, 0xae, 0x27],
    },
    Probe {
        class: InsnClass::Xsave,
        insn: "xrstor64 [rdi]",
        code: &[0x48, 0x0f, 0xae, 0x2f],
    },
    Probe {
        class: InsnClass::Xsave,
        insn: "xgetbv",
        code: &[0x0f, 0x01, 0xd0],
    },
    Probe {
        class: InsnClass::Cx16,
        insn: "cmpxchg16b [rdi]",
        code: &[0x48, 0x0f, 0xc7, 0x0f],
    },
    Probe {
        class: InsnClass::Popcnt,
        insn: "popcnt rax, rax",
        code: &[0xf3, 0x48, 0x0f, 0xb8, 0xc0],
    },
    Probe {
        class: InsnClass::Pku,
        insn: "wrpkru",
        code: &[0x0f, 0x01, 0xef],
    },
    Probe {
        class: InsnClass::Avx,
        insn: "vzeroupper",
        code: &[0xc5, 0xf8, 0x77],
    },
    Probe {
        class: InsnClass::Smap,
        insn: "clac",
        code: &[0x0f, 0x01, 0xca],
    },
    Probe {
        class: InsnClass::SimdExt,
        insn: "pshufb xmm0, xmm0",
        code: &[0x66, 0x0f, 0x38, 0x00, 0xc0],
    },
    Probe {
        class: InsnClass::Sse,
        insn: "ldmxcsr [rdi]",
        code: &[0x0f, 0xae, 0x17],
    },
    Probe {
        class: InsnClass::Sse,
        insn: "pxor xmm0, xmm0",
        code: &[0x66, 0x0f, 0xef, 0xc0],
    },
    Probe {
        class: InsnClass::Sse,
        insn: "movaps xmm0, [rdi]",
        code: &[0x0f, 0x28, 0x07],
    },
    Probe {
        class: InsnClass::Sse,
        insn: "movdqu xmm0, [rdi]",
        code: &[0xf3, 0x0f, 0x6f, 0x07],
    },
    Probe {
        class: InsnClass::X87,
        insn: "fnstsw ax",
        code: &[0xdf, 0xe0],
    },
    Probe {
        class: InsnClass::X87,
        insn: "fwait",
        code: &[0x9b],
    },
];

/// What happened to one probed instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// It ran and the guest reached the following `hlt`.
    Ran,
    /// KVM's emulator gave up on it; these are the bytes KVM reported, if any.
    EmulationFailed(Vec<u8>),
    /// Some other exit (a fault without IDT ends in a triple fault), described.
    OtherExit(String),
}

/// The result of one probed instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    pub class: InsnClass,
    pub insn: &'static str,
    pub outcome: ProbeOutcome,
}

/// What [`probe_host`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeReport {
    /// One entry per probed instruction, in probe order.
    pub results: Vec<ProbeResult>,
    /// Wall time of the whole probe, VM creation included.
    pub elapsed: Duration,
    /// The TSC frequency KVM gives a vCPU, in kHz, for guests that cannot calibrate it.
    pub tsc_khz: Option<u32>,
}

impl ProbeReport {
    /// A report in which exactly `classes` fail (for callers that know the answer, and tests).
    pub fn with_failing(classes: &[InsnClass]) -> Self {
        let results = classes
            .iter()
            .map(|&class| ProbeResult {
                class,
                insn: class.name(),
                outcome: ProbeOutcome::EmulationFailed(Vec::new()),
            })
            .collect();
        ProbeReport {
            results,
            elapsed: Duration::ZERO,
            tsc_khz: None,
        }
    }

    /// The classes with at least one instruction KVM's emulator could not run.
    pub fn failing(&self) -> BTreeSet<InsnClass> {
        self.results
            .iter()
            .filter(|r| matches!(r.outcome, ProbeOutcome::EmulationFailed(_)))
            .map(|r| r.class)
            .collect()
    }

    /// Whether some instruction of `class` failed.
    pub fn fails(&self, class: InsnClass) -> bool {
        self.failing().contains(&class)
    }

    /// True when nothing failed, as on a host with VMX/SVM.
    pub fn is_empty(&self) -> bool {
        self.failing().is_empty()
    }
}

impl fmt::Display for ProbeReport {
    /// One line: the failing instructions, or that there are none.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let failed: Vec<&str> = self
            .results
            .iter()
            .filter(|r| matches!(r.outcome, ProbeOutcome::EmulationFailed(_)))
            .map(|r| r.insn)
            .collect();
        if failed.is_empty() {
            write!(f, "KVM runs every probed instruction")?;
        } else {
            write!(f, "KVM's emulator cannot run: {}", failed.join(", "))?;
        }
        write!(f, " (probe took {} µs)", self.elapsed.as_micros())
    }
}

/// Runs every probe in one scratch VM and reports which classes the host's KVM cannot run.
pub fn probe_host(kvm: &Kvm) -> Result<ProbeReport, PvmError> {
    let start = Instant::now();
    let mut vm = ScratchVm::new(kvm)?;
    // Without it, KVM queues a #UD along with the exit (x86.c, handle_emulation_failure).
    enable_exit_on_emulation_failure(vm.vm());
    let mut results = Vec::with_capacity(PROBES.len());
    for probe in PROBES {
        vm.reset()?;
        vm.load_code(probe.code)?;
        let outcome = match vm.run()? {
            ScratchExit::Hlt => ProbeOutcome::Ran,
            ScratchExit::InternalError(exit) if exit.is_emulation_failure() => {
                // KVM reports the 15 bytes it fetched; keep those of the probed instruction.
                let mut bytes = exit.insn_bytes();
                bytes.truncate(probe.code.len());
                ProbeOutcome::EmulationFailed(bytes)
            }
            other => ProbeOutcome::OtherExit(format!("{other:?}")),
        };
        log::debug!("probe {}: {outcome:?}", probe.insn);
        results.push(ProbeResult {
            class: probe.class,
            insn: probe.insn,
            outcome,
        });
    }
    Ok(ProbeReport {
        results,
        elapsed: start.elapsed(),
        tsc_khz: vm.vcpu().get_tsc_khz().ok(),
    })
}

/// The TSC frequency a vCPU of this host runs at, in kHz (from a scratch VM).
pub fn host_tsc_khz(kvm: &Kvm) -> Option<u32> {
    let mut vm = ScratchVm::new(kvm).ok()?;
    vm.vcpu().get_tsc_khz().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_decode_as_named() {
        use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};
        let mut formatter = IntelFormatter::new();
        formatter
            .options_mut()
            .set_memory_size_options(iced_x86::MemorySizeOptions::Never);
        formatter
            .options_mut()
            .set_space_after_operand_separator(true);
        for probe in PROBES {
            let insn = Decoder::new(64, probe.code, DecoderOptions::NONE).decode();
            assert_eq!(insn.len(), probe.code.len(), "{}", probe.insn);
            let mut text = String::new();
            formatter.format(&insn, &mut text);
            assert_eq!(text, probe.insn);
        }
    }

    #[test]
    fn failing_collects_classes() {
        let report = ProbeReport {
            results: vec![
                ProbeResult {
                    class: InsnClass::Xsave,
                    insn: "xsave64 [rdi]",
                    outcome: ProbeOutcome::Ran,
                },
                ProbeResult {
                    class: InsnClass::Xsave,
                    insn: "xgetbv",
                    outcome: ProbeOutcome::EmulationFailed(vec![0x0f, 0x01, 0xd0]),
                },
                ProbeResult {
                    class: InsnClass::Pku,
                    insn: "wrpkru",
                    outcome: ProbeOutcome::OtherExit("Shutdown".into()),
                },
            ],
            elapsed: Duration::from_micros(1500),
            tsc_khz: None,
        };
        assert_eq!(report.failing(), BTreeSet::from([InsnClass::Xsave]));
        assert!(report.fails(InsnClass::Xsave));
        assert!(!report.fails(InsnClass::Pku));
        assert!(!report.is_empty());
        assert_eq!(
            report.to_string(),
            "KVM's emulator cannot run: xgetbv (probe took 1500 µs)"
        );
        assert!(ProbeReport::default().is_empty());
    }

    #[test]
    fn only_sse_and_x87_are_unhidable() {
        assert!(InsnClass::Xsave.hideable());
        assert!(InsnClass::Avx.hideable());
        assert!(!InsnClass::Sse.hideable());
        assert!(!InsnClass::X87.hideable());
    }
}
