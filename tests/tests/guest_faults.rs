//! Faults the hardware would raise must reach the guest: an instruction the VMM's fallback cannot
//! carry out (KVM's emulator lacks it, and its operand is a device page) faults in the guest
//! rather than ending the VM, and the fallback's writes honour the guest's page protection.
//!
//! The fallback matters where KVM emulates the guest kernel (kvm-pvm), and wherever KVM's
//! emulator meets an instruction it lacks against an MMIO page (any host, from ring 3 too).

use std::time::Duration;

use integration_tests::guests::{faults_in_the_guest, PF_MARKER, STILL_RUNNING_MARKER, UD_MARKER};
use integration_tests::{kvm_available, temp_file, tiny_elf, Guest};

#[test]
fn unrunnable_instructions_fault_in_the_guest_and_the_vm_runs_on() {
    if !kvm_available("unrunnable_instructions_fault_in_the_guest_and_the_vm_runs_on") {
        return;
    }
    let kernel = temp_file("guest-faults.elf", &tiny_elf(&faults_in_the_guest()));
    let mut guest = Guest::spawn(&["--kernel", kernel.to_str().unwrap(), "--memory", "64M"]);
    let status = guest.wait_exit(Duration::from_secs(60));
    let console = guest.console();
    assert!(
        console.contains(PF_MARKER),
        "the write to a read-only page did not fault{}",
        guest.transcript()
    );
    assert!(
        console.contains(UD_MARKER),
        "ring 3 did not get #UD{}",
        guest.transcript()
    );
    assert!(
        console.contains(STILL_RUNNING_MARKER),
        "the guest did not run on after the faults{}",
        guest.transcript()
    );
    assert!(status.success(), "status {status}{}", guest.transcript());
}
