//! VM-wide KVM setup that must precede every vCPU (KVM API, `Documentation/virt/kvm/api.rst`:
//! `KVM_SET_TSS_ADDR`, `KVM_SET_IDENTITY_MAP_ADDR`, `KVM_CREATE_IRQCHIP`, `KVM_CREATE_PIT2`), and
//! the PIT's lost-tick policy (`KVM_REINJECT_CONTROL`), which may follow.
//!
//! With the in-kernel irqchip KVM routes GSI *n* to IOAPIC pin *n* (and, for *n* < 16, to PIC IRQ *n*)
//! until the VMM installs its own routing; the in-kernel PIT raises GSI 0. The MP table
//! ([`crate::mptable`]) describes exactly that wiring.

use std::os::fd::AsRawFd;

use kvm_bindings::{kvm_pit_config, kvm_reinject_control, KVM_PIT_SPEAKER_DUMMY};
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

/// `KVM_REINJECT_CONTROL`: `_IO(KVMIO, 0x71)`, with a `struct kvm_reinject_control` argument.
const KVM_REINJECT_CONTROL: libc::c_ulong = 0xae71;

/// Has KVM drop the PIT ticks a guest did not take in time instead of delivering every one of
/// them later (the default, QEMU's `lost_tick_policy=delay`; `discard` here).
///
/// Linux keeps time from its clocksource, not by counting ticks, so a lost tick costs it nothing.
/// Re-injection, though, feeds a guest that is slower than its tick one missed tick after
/// another: until the LAPIC timer takes over late in its boot, Linux ticks from the PIT, and
/// where its kernel is emulated (kvm-pvm hosts) a 250 Hz tick handler can take longer than the
/// tick period. With re-injection such a guest spent every register sample in the timer
/// interrupt, IRQ 0 always pending, and never finished its boot.
///
/// It can be called while the guest runs, and a VMM may want to: turning re-injection off waits
/// for an SRCU grace period in the host kernel (KVM unregisters the PIT's IRQ-acknowledge
/// notifier), 16 ms measured on kvm-pvm, and nothing programs the PIT in a guest's first
/// milliseconds.
pub fn discard_lost_pit_ticks(vm: &VmFd) -> Result<()> {
    let control = kvm_reinject_control {
        pit_reinject: 0,
        ..Default::default()
    };
    // SAFETY: KVM_REINJECT_CONTROL reads one `kvm_reinject_control`, which lives across the call;
    // the VM descriptor is valid for as long as `vm` is.
    let ret = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_REINJECT_CONTROL, &control) };
    if ret < 0 {
        return Err(Error::PitReinject(std::io::Error::last_os_error()));
    }
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
    fn pit_reinject_control_is_io_kvmio_0x71() {
        // _IO(type, nr) = type << 8 | nr; KVMIO is 0xae.
        assert_eq!(KVM_REINJECT_CONTROL, (0xae << 8) | 0x71);
        assert_eq!(std::mem::size_of::<kvm_reinject_control>(), 32);
    }

    /// Needs /dev/kvm.
    #[test]
    fn lost_tick_discarding_needs_the_pit() {
        let kvm = test_kvm();
        let vm = kvm.create_vm().expect("KVM_CREATE_VM failed");
        // Without a PIT KVM has nothing to configure (ENXIO); with one it accepts.
        assert!(discard_lost_pit_ticks(&vm).is_err());
        create_platform(&vm).unwrap();
        discard_lost_pit_ticks(&vm).unwrap();
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
