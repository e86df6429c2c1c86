//! VM-wide KVM setup that must precede every vCPU (KVM API, `Documentation/virt/kvm/api.rst`:
//! `KVM_SET_TSS_ADDR`, `KVM_SET_IDENTITY_MAP_ADDR`, `KVM_CREATE_IRQCHIP`, `KVM_CREATE_PIT2`).
//!
//! With the in-kernel irqchip KVM routes GSI *n* to IOAPIC pin *n* (and, for *n* < 16, to PIC IRQ *n*)
//! until the VMM installs its own routing; the in-kernel PIT raises GSI 0. The MP table
//! ([`crate::mptable`]) describes exactly that wiring.

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;

use crate::layout::{KVM_IDENTITY_MAP_START, KVM_TSS_START};
use crate::{Error, Result};

/// The PIT configuration we ask for: a dummy speaker port, so port 0x61 reads come from KVM too.
pub fn pit_config() -> kvm_pit_config {
    kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    }
}

/// Creates the in-kernel interrupt controllers and PIT and places KVM's private pages.
///
/// Call once per VM, before the first vCPU: KVM (on Intel without unrestricted guest) needs the TSS
/// and identity-map pages before a vCPU runs, and a vCPU only gets an in-kernel LAPIC if the irqchip
/// already exists when it is created. Register guest memory first where set-up time matters: with
/// an in-kernel irqchip, each later memory slot change waits for an SRCU grace period in KVM.
pub fn create_platform(vm: &VmFd) -> Result<()> {
    vm.set_tss_address(KVM_TSS_START as usize)
        .map_err(Error::SetTssAddress)?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_START)
        .map_err(Error::SetIdentityMapAddress)?;
    vm.create_irq_chip().map_err(Error::CreateIrqChip)?;
    vm.create_pit2(pit_config()).map_err(Error::CreatePit)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_kvm;

    #[test]
    fn pit_has_dummy_speaker() {
        assert_eq!(pit_config().flags, 1);
        assert_eq!(pit_config().pad, [0; 15]);
    }

    /// Needs /dev/kvm.
    #[test]
    fn creates_platform_on_kvm() {
        let kvm = test_kvm();
        let vm = kvm.create_vm().expect("KVM_CREATE_VM failed");
        create_platform(&vm).unwrap();
        // A second irqchip is refused, which shows the first one exists.
        assert!(vm.create_irq_chip().is_err());
        // The vCPU created afterwards has an in-kernel LAPIC.
        let vcpu = vm.create_vcpu(0).unwrap();
        assert!(vcpu.get_lapic().is_ok());
    }
}
