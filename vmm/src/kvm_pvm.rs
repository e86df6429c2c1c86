//! The kvm-pvm layer (crate `vmmkit-pvm`, cargo feature `pvm`, on by default), as [`crate::Vmm`]
//! uses it: [`set_up`] while the VM is built, then the guest's command-line switches and one exit
//! hook per vCPU from the [`HostLayer`] it returns. Without the feature the same calls build a VM
//! with neither, which suits hosts with VMX/SVM.

use kvm_ioctls::Kvm;
use vm_memory::GuestMemoryMmap;

use crate::config::ConfigError;

/// The `--cpu-features` policy.
#[cfg(feature = "pvm")]
pub(crate) type Policy = pvm::CpuFeaturePolicy;

/// The `--cpu-features` policy, which means nothing without kvm-pvm support.
#[cfg(not(feature = "pvm"))]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy;

/// Parses `--cpu-features` (`host`, `safe` or `auto`).
#[cfg(feature = "pvm")]
pub(crate) fn policy(name: &str) -> Result<Policy, ConfigError> {
    name.parse()
        .map_err(|_| ConfigError::CpuFeatures(name.to_string()))
}

/// Checks `--cpu-features` (`host`, `safe` or `auto`).
#[cfg(not(feature = "pvm"))]
pub(crate) fn policy(name: &str) -> Result<Policy, ConfigError> {
    match name {
        "host" | "safe" | "auto" => Ok(Policy),
        _ => Err(ConfigError::CpuFeatures(name.to_string())),
    }
}

/// What the layer contributes to one VM.
pub(crate) struct HostLayer {
    #[cfg(feature = "pvm")]
    pvm: pvm::KvmPvm,
}

#[cfg(feature = "pvm")]
impl pvm::PreparedVm for crate::Prepared {
    fn vm(&self) -> &kvm_ioctls::VmFd {
        &self.vm
    }
    fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

/// Runs `prepare` beside the host probe and installs what the host needs before the VM gets
/// memory slots and an irqchip (see `pvm::layer`).
#[cfg(feature = "pvm")]
pub(crate) fn set_up(
    kvm: &Kvm,
    policy: Policy,
    prepare: impl FnOnce() -> crate::Result<crate::Prepared>,
) -> crate::Result<(HostLayer, crate::Prepared)> {
    let pages = pvm::TrampolinePages {
        tables: arch::layout::VMM_RESERVED_START,
        unbacked: arch::layout::VMM_UNBACKED_PAGE,
    };
    let (pvm, prepared) = pvm::set_up(kvm, policy, pages, prepare)?;
    Ok((HostLayer { pvm }, prepared))
}

/// Runs `prepare`: without kvm-pvm support there is nothing to probe or install.
#[cfg(not(feature = "pvm"))]
pub(crate) fn set_up(
    _kvm: &Kvm,
    _policy: Policy,
    prepare: impl FnOnce() -> crate::Result<crate::Prepared>,
) -> crate::Result<(HostLayer, crate::Prepared)> {
    log::debug!("built without kvm-pvm support: --cpu-features has no effect");
    Ok((HostLayer {}, prepare()?))
}

#[cfg(feature = "pvm")]
impl HostLayer {
    /// Kernel parameters that hide what the host's KVM cannot run.
    pub(crate) fn cmdline_switches(&self) -> &[String] {
        self.pvm.cmdline_switches()
    }

    /// The exit hook of one vCPU: the instruction fallback and the `syscall` trampoline.
    pub(crate) fn exit_hook(&self, mem: &GuestMemoryMmap) -> Option<Box<dyn cpu::ExitHook>> {
        Some(self.pvm.exit_hook(mem))
    }
}

#[cfg(not(feature = "pvm"))]
impl HostLayer {
    /// Nothing to hide.
    pub(crate) fn cmdline_switches(&self) -> &[String] {
        &[]
    }

    /// No exit hook: the generic decoder sees every exit.
    pub(crate) fn exit_hook(&self, _mem: &GuestMemoryMmap) -> Option<Box<dyn cpu::ExitHook>> {
        None
    }
}
