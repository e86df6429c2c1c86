//! The kvm-pvm layer as a VMM uses it: one call while the VM is built ([`set_up`]), and an
//! [`ExitHook`] per vCPU ([`KvmPvm::exit_hook`]) that the `cpu` crate's run loop offers every
//! exit to before its generic decoder.
//!
//! Order matters for the VM's set-up time: once a VM has an in-kernel irqchip, each later memory
//! slot change or MSR filter waits for an SRCU grace period in the host kernel (5 to 19 ms on
//! kvm-pvm, against 0.1 ms before). [`set_up`] therefore runs the host probe beside the VMM's own
//! preparation (VM, guest memory, kernel loading) and installs the trampoline's MSR filter right
//! after it, before the VMM registers its memory slots and creates the irqchip.

use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;

use cpu::{ExitHook, HookAction, VcpuStop};

use crate::fallback::{enable_exit_on_emulation_failure, InsnFallback};
use crate::hide::{hidden_features, CpuFeaturePolicy};
use crate::syscall::{self, SyscallError, SyscallState, SyscallTrampoline};

/// Guest-physical pages the VMM sets aside for the `syscall` trampoline.
#[derive(Debug, Clone, Copy)]
pub struct TrampolinePages {
    /// [`syscall::TRAMPOLINE_PAGES`] pages of RAM the guest must not use (reserved in its e820 map).
    pub tables: u64,
    /// A page that no memory slot or device covers.
    pub unbacked: u64,
}

/// What [`set_up`] needs from the VMM's prepared VM.
pub trait PreparedVm {
    fn vm(&self) -> &VmFd;
    fn memory(&self) -> &GuestMemoryMmap;
}

/// What the layer decided for one VM: the guest's command-line switches and the trampoline.
#[derive(Debug, Clone, Default)]
pub struct KvmPvm {
    switches: Vec<String>,
    trampoline: Option<SyscallTrampoline>,
}

/// Runs `prepare` (the VMM's VM, memory and kernel loading) on this thread while the host probe
/// runs on another, then, where KVM emulates the guest kernel (something had to be hidden),
/// installs the `syscall` trampoline and its MSR filter, and asks KVM to report emulation
/// failures with their instruction bytes. Call it before the VM gets memory slots or an
/// irqchip (see the module documentation).
pub fn set_up<T, E>(
    kvm: &Kvm,
    policy: CpuFeaturePolicy,
    pages: TrampolinePages,
    prepare: impl FnOnce() -> Result<T, E>,
) -> Result<(KvmPvm, T), E>
where
    T: PreparedVm,
    E: From<SyscallError>,
{
    let (switches, prepared) = std::thread::scope(|scope| {
        let probe = scope.spawn(|| hidden_features(kvm, policy));
        let prepared = prepare();
        let switches = probe
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (switches, prepared)
    });
    let prepared = prepared?;
    let trampoline = if switches.is_empty() {
        None
    } else {
        SyscallTrampoline::install(
            prepared.vm(),
            prepared.memory(),
            pages.tables,
            pages.unbacked,
        )?
    };
    enable_exit_on_emulation_failure(prepared.vm());
    Ok((
        KvmPvm {
            switches,
            trampoline,
        },
        prepared,
    ))
}

impl KvmPvm {
    /// Kernel parameters that hide what the host's KVM cannot run (empty where it runs
    /// everything).
    pub fn cmdline_switches(&self) -> &[String] {
        &self.switches
    }

    /// The exit hook of one vCPU of the VM whose RAM is `mem`.
    pub fn exit_hook(&self, mem: &GuestMemoryMmap) -> Box<dyn ExitHook> {
        Box::new(PvmExitHook {
            mem: mem.clone(),
            fallback: InsnFallback::new(),
            trampoline: self.trampoline,
            syscall: SyscallState::default(),
            pending: Pending::Nothing,
        })
    }
}

/// An exit claimed by [`PvmExitHook::on_exit`], finished on the vCPU.
#[derive(Debug, Clone, Copy)]
enum Pending {
    Nothing,
    /// The guest wrote LSTAR (the only MSR the trampoline's filter hands to the VMM).
    LstarWrite(u64),
    /// KVM's emulator gave up: a `syscall` through the trampoline, or an instruction for the
    /// fallback.
    EmulationFailure,
}

/// One vCPU's share of the layer: the instruction fallback and the trampoline's state.
pub struct PvmExitHook {
    mem: GuestMemoryMmap,
    fallback: InsnFallback,
    trampoline: Option<SyscallTrampoline>,
    syscall: SyscallState,
    pending: Pending,
}

impl PvmExitHook {
    fn lstar_write(&mut self, vcpu: &VcpuFd, value: u64) -> Result<(), VcpuStop> {
        let Some(trampoline) = self.trampoline else {
            return Ok(());
        };
        trampoline
            .on_lstar_write(vcpu, &self.mem, value)
            .map_err(|e| VcpuStop::Failed(e.to_string()))?;
        self.syscall.lstar = Some(value);
        Ok(())
    }

    fn emulation_failure(&mut self, vcpu: &mut VcpuFd) -> Result<(), VcpuStop> {
        if self.trampoline.is_some() {
            match syscall::on_trampoline_exit(vcpu, &mut self.syscall) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(VcpuStop::Failed(e.to_string())),
            }
        }
        self.fallback
            .handle_internal_error(vcpu, &self.mem)
            .map_err(|e| VcpuStop::Failed(format!("KVM internal error: {e}")))
    }
}

impl ExitHook for PvmExitHook {
    fn on_exit(&mut self, exit: &mut VcpuExit<'_>) -> HookAction {
        self.pending = match exit {
            VcpuExit::X86Wrmsr(msr) if self.trampoline.is_some() => {
                // The write succeeds as far as the guest can tell.
                *msr.error = 0;
                Pending::LstarWrite(msr.data)
            }
            VcpuExit::InternalError => Pending::EmulationFailure,
            _ => return HookAction::NotMine,
        };
        HookAction::NeedsVcpu
    }

    fn with_vcpu(&mut self, vcpu: &mut VcpuFd) -> Result<(), VcpuStop> {
        match std::mem::replace(&mut self.pending, Pending::Nothing) {
            Pending::Nothing => Ok(()),
            Pending::LstarWrite(value) => self.lstar_write(vcpu, value),
            Pending::EmulationFailure => self.emulation_failure(vcpu),
        }
    }

    fn counts(&self) -> Vec<(String, u64)> {
        self.fallback
            .counts()
            .map(|(name, count)| (name.to_string(), count))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use kvm_ioctls::{MsrExitReason, WriteMsrExit};
    use vm_memory::GuestAddress;

    use super::*;

    fn hook(trampoline: Option<SyscallTrampoline>) -> Box<dyn ExitHook> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        KvmPvm {
            switches: Vec::new(),
            trampoline,
        }
        .exit_hook(&mem)
    }

    fn lstar_write(error: &mut u8) -> VcpuExit<'_> {
        VcpuExit::X86Wrmsr(WriteMsrExit {
            error,
            reason: MsrExitReason::Filter,
            index: 0xc000_0082,
            data: 0xffff_ffff_8100_0000,
        })
    }

    #[test]
    fn emulation_failures_are_claimed_device_exits_are_not() {
        let mut hook = hook(None);
        assert_eq!(
            hook.on_exit(&mut VcpuExit::InternalError),
            HookAction::NeedsVcpu
        );
        assert_eq!(
            hook.on_exit(&mut VcpuExit::IoOut(0x3f8, b"x")),
            HookAction::NotMine
        );
        assert_eq!(hook.on_exit(&mut VcpuExit::Hlt), HookAction::NotMine);
        // Without a trampoline an MSR exit is nothing of ours: the decoder reports it.
        let mut error = 1;
        assert_eq!(
            hook.on_exit(&mut lstar_write(&mut error)),
            HookAction::NotMine
        );
        assert_eq!(error, 1);
    }

    #[test]
    fn lstar_writes_succeed_for_the_guest_when_the_trampoline_is_in() {
        let mut hook = hook(Some(SyscallTrampoline::for_tests(0xe_0000, 0xffff_f000)));
        let mut error = 1;
        assert_eq!(
            hook.on_exit(&mut lstar_write(&mut error)),
            HookAction::NeedsVcpu
        );
        assert_eq!(error, 0);
    }
}
