//! What one MSI-X interrupt costs the thread that raises it, delivered the two ways the VMM can:
//! a write to the vector's irqfd (KVM routes it through the GSI table) and a `KVM_SIGNAL_MSI`
//! ioctl (the fallback); and what a route change (`KVM_SET_GSI_ROUTING`) costs the vCPU thread
//! that makes it. Both deliveries target a vCPU whose local APIC is enabled, so KVM does the
//! whole acceptance; the vCPU does not run, so no exit is part of the figure.
//!
//! `cargo bench -p vmm --bench msi_delivery` prints medians of alternating rounds and the
//! ratio irqfd / ioctl, measured side by side in one run (needs /dev/kvm).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use pci::MsiInterruptController;
use vmm::msi_routing::{GsiRouter, IrqfdMsi};

const APIC_BASE: u64 = 0xfee0_0000;
/// Offset of the spurious-interrupt vector register in the local APIC page; bit 8 enables it.
const APIC_SVR: usize = 0xf0;
/// Offset of the interrupt request register (eight 32-bit words, 16 bytes apart).
const APIC_IRR: usize = 0x200;

fn per_op(start: Instant, ops: u32) -> Duration {
    start.elapsed() / ops
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs a few operations only.
    let full = std::env::args().any(|a| a == "--bench");
    let (rounds, ops, route_changes) = if full { (11, 100_000, 20) } else { (1, 10, 2) };

    let kvm = Kvm::new().expect("/dev/kvm");
    let vm = Arc::new(kvm.create_vm().expect("KVM_CREATE_VM"));
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let mut lapic = vcpu.get_lapic().expect("KVM_GET_LAPIC");
    // The registers are the APIC page's bytes, as C chars.
    lapic.regs[APIC_SVR + 1] |= 1;
    vcpu.set_lapic(&lapic).expect("KVM_SET_LAPIC");

    let router = Arc::new(GsiRouter::new(Box::new(vm.clone())));
    let msi = IrqfdMsi::new(router.clone(), 2);
    // Vector 0 goes through its irqfd; the ioctl sends the same kind of message directly.
    msi.update_route(0, APIC_BASE, 0x40, false)
        .expect("KVM_SET_GSI_ROUTING");
    let direct = kvm_bindings::kvm_msi {
        address_lo: APIC_BASE as u32,
        data: 0x41,
        ..Default::default()
    };

    // Both ways reach the local APIC: vectors 0x40 and 0x41 wait in its IRR (byte 2 of the
    // register at 0x200 holds vectors 0x40-0x47).
    assert_eq!(
        vm.signal_msi(direct).expect("KVM_SIGNAL_MSI"),
        1,
        "delivered to one vCPU"
    );
    msi.trigger(0).expect("irqfd write");
    let irr = |lapic: &kvm_bindings::kvm_lapic_state| lapic.regs[APIC_IRR + 2 * 16] as u8;
    let deadline = Instant::now() + Duration::from_secs(1);
    while irr(&vcpu.get_lapic().expect("KVM_GET_LAPIC")) != 0b11 {
        assert!(
            Instant::now() < deadline,
            "the irqfd's interrupt never reached the APIC"
        );
        std::thread::yield_now();
    }
    let mut irqfd = Vec::new();
    let mut ioctl = Vec::new();
    for _ in 0..rounds {
        let start = Instant::now();
        for _ in 0..ops {
            msi.trigger(0).expect("irqfd write");
        }
        irqfd.push(per_op(start, ops));
        let start = Instant::now();
        for _ in 0..ops {
            vm.signal_msi(direct).expect("KVM_SIGNAL_MSI");
        }
        ioctl.push(per_op(start, ops));
    }

    let mut changes = Vec::new();
    for i in 0..route_changes {
        let start = Instant::now();
        msi.update_route(0, APIC_BASE, 0x41 + (i % 2), false)
            .expect("KVM_SET_GSI_ROUTING");
        changes.push(start.elapsed());
    }

    let (irqfd, ioctl) = (median(irqfd), median(ioctl));
    println!("msi_delivery ({rounds} alternating rounds of {ops} interrupts, medians)");
    println!("  irqfd write          {:>10.2?} per interrupt", irqfd);
    println!("  KVM_SIGNAL_MSI       {:>10.2?} per interrupt", ioctl);
    println!(
        "  irqfd / ioctl        {:>10.2}",
        irqfd.as_secs_f64() / ioctl.as_secs_f64()
    );
    println!(
        "  route change         {:>10.2?} (median of {route_changes} KVM_SET_GSI_ROUTING)",
        median(changes)
    );
    assert_eq!(router.pushes(), 1 + u64::from(route_changes));
}
