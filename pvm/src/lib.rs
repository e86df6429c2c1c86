//! Booting Linux where KVM emulates the guest kernel (kvm-pvm hosts).
//!
//! On hosts without VMX/SVM, `/dev/kvm` is kvm-pvm: guest ring-3 code runs natively, but a
//! non-PVM guest kernel runs under KVM's instruction emulator (`arch/x86/kvm/emulate.c`), which
//! gives up (`KVM_EXIT_INTERNAL_ERROR`, suberror `KVM_INTERNAL_ERROR_EMULATION`) on a handful of
//! instructions. Three pieces cope with that (see `shared/pvm/README.md`):
//!
//! - [`probe`] runs one instruction per class in a throw-away VM ([`scratch`]) and records which
//!   classes the host's emulator cannot run. On a host with real VMX/SVM it finds nothing.
//! - [`hide`] turns a policy and the probe's findings into Linux command-line switches
//!   (`noxsave`, `clearcpuid=`), because on these hosts the guest's `cpuid` returns the host's
//!   values whatever `KVM_SET_CPUID2` says, so CPUID cannot hide anything.
//! - [`fallback`] carries out, in the VMM, the instructions that cannot be hidden (SSE and x87
//!   control instructions that x86-64 guarantees, `int3`), then resumes the vCPU.
//! - [`syscall`] repairs the ring-3 `syscall` transition that these hosts get wrong.
//!
//! A VMM uses it through [`layer`]: one call, [`set_up`], while it builds the VM, and one
//! [`cpu::ExitHook`] per vCPU, which the `cpu` crate's run loop offers each exit first. On a host
//! with VMX/SVM the probe finds nothing and the hook only ever sees exits KVM could not handle.

pub mod fallback;
pub mod hide;
pub mod layer;
pub mod probe;
pub mod scratch;
pub mod syscall;
#[cfg(any(test, feature = "fuzzing"))]
pub mod testing;

pub use fallback::{enable_exit_on_emulation_failure, FallbackError, InsnFallback};
pub use hide::{guest_cmdline_switches, hidden_features, CpuFeaturePolicy};
pub use layer::{set_up, KvmPvm, PreparedVm, TrampolinePages};
pub use probe::{probe_host, InsnClass, ProbeReport};
pub use scratch::ScratchVm;
pub use syscall::SyscallError;

/// Errors from the scratch VM and the host probe.
#[derive(Debug, thiserror::Error)]
pub enum PvmError {
    #[error("cannot create the scratch VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("cannot map the scratch VM's memory")]
    Memory(#[source] vm_memory::mmap::FromRangesError),
    #[error("KVM refused the scratch VM's memory slot")]
    Slot(#[source] kvm_ioctls::Error),
    #[error("cannot create the scratch VM's vCPU")]
    CreateVcpu(#[source] kvm_ioctls::Error),
    #[error("cannot set up the scratch vCPU: {what} failed")]
    Setup {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot write the scratch VM's memory at {addr:#x}")]
    Write {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("KVM_RUN failed in the scratch VM")]
    Run(#[source] kvm_ioctls::Error),
}
