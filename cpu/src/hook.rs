//! A layer that sees every exit before the generic decoder ([`crate::handle_exit`]).
//!
//! Some hosts need more than device dispatch: on kvm-pvm hosts, for instance, KVM's instruction
//! emulator gives up on instructions a VMM can carry out, and the guest's `syscall` needs help to
//! reach ring 0 (the `vmmkit-pvm` crate). Such a layer implements [`ExitHook`]; the run loop
//! offers it each exit first, and only what it leaves alone reaches the decoder. The vCPU crate
//! itself knows nothing of any such host.

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::exit::VcpuStop;

/// What an [`ExitHook`] did with an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookAction {
    /// Not this hook's exit: the generic decoder takes it.
    NotMine,
    /// Consumed: re-enter the guest.
    Handled,
    /// Consumed, but finishing it needs the vCPU (registers, events), which the exit still
    /// borrows: the run loop calls [`ExitHook::with_vcpu`] next.
    NeedsVcpu,
    /// Consumed, and the vCPU must stop for good.
    Stop(VcpuStop),
}

/// Per-vCPU code the run loop calls on every exit, before the generic decoder.
pub trait ExitHook: Send {
    /// Looks at `exit` first. The hook may change what the exit returns to the guest (the data of
    /// an MSR read, the error of an MSR write) but may not touch the vCPU here.
    fn on_exit(&mut self, exit: &mut VcpuExit<'_>) -> HookAction;

    /// Finishes the exit [`Self::on_exit`] claimed with [`HookAction::NeedsVcpu`]. `Ok` re-enters
    /// the guest.
    fn with_vcpu(&mut self, vcpu: &mut VcpuFd) -> Result<(), VcpuStop>;

    /// What the hook carried out for this vCPU, by name, for the vCPU's final report.
    fn counts(&self) -> Vec<(String, u64)> {
        Vec::new()
    }
}
