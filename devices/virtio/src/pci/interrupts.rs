//! Interrupts of a virtio PCI function: MSI-X vectors per queue and for configuration changes
//! (virtio 1.2 section 4.1.5.1.2), the ISR status byte (4.1.4.5) and INTx before the driver
//! enables MSI-X.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use vmm_sys_util::eventfd::EventFd;

use super::layout::NO_VECTOR;
use crate::{InterruptKind, VirtioInterrupt};
use pci::Msix;

/// ISR status bits (4.1.4.5).
pub(super) const ISR_QUEUE: u8 = 1;
pub(super) const ISR_CONFIG: u8 = 2;

/// The legacy interrupt line: `evt` is written to raise it (the VMM registers it as an irqfd
/// on `irq`'s GSI); `irq` is what the Interrupt Line register reads at first.
#[derive(Debug)]
pub struct IntxLine {
    /// The IRQ (GSI) INTA# is routed to; the Interrupt Line register's first value.
    pub irq: u8,
    /// Written to assert the line: the VMM registers it with KVM as an irqfd on `irq`.
    pub evt: EventFd,
}

/// MSI-X vector assignments, shared with the device through [`Interrupts`].
pub(super) struct Vectors {
    pub(super) msix: Option<Msix>,
    pub(super) config: u16,
    pub(super) queues: Vec<u16>,
}

/// The interrupt state both the transport (on vCPU threads) and the device (on its own
/// thread) use; the device sees it as its [`VirtioInterrupt`].
pub(super) struct Interrupts {
    pub(super) isr: AtomicU8,
    pub(super) config_generation: AtomicU8,
    pub(super) intx: Option<EventFd>,
    /// Command register bit 10, mirrored for the device's thread.
    pub(super) intx_disabled: AtomicBool,
    pub(super) vectors: Mutex<Vectors>,
}

impl Interrupts {
    /// Whether the function has an unacknowledged INTx: ISR bits set and MSI-X off.
    pub(super) fn intx_pending(&self) -> bool {
        let msix_enabled = self.vectors().msix.as_ref().is_some_and(Msix::enabled);
        self.isr.load(Ordering::SeqCst) != 0 && !msix_enabled
    }

    /// Raises INTx again if the function still has ISR bits set, MSI-X is off and the command
    /// register lets INTx through.
    pub(super) fn reassert_intx(&self) -> io::Result<()> {
        match &self.intx {
            Some(evt) if self.intx_pending() && !self.intx_disabled.load(Ordering::SeqCst) => {
                evt.write(1)
            }
            _ => Ok(()),
        }
    }

    pub(super) fn vectors(&self) -> MutexGuard<'_, Vectors> {
        self.vectors.lock().unwrap_or_else(|poisoned| {
            self.vectors.clear_poison();
            poisoned.into_inner()
        })
    }
}

impl VirtioInterrupt for Interrupts {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        if kind == InterruptKind::Config {
            // Lets a driver reading the configuration see that it changed (4.1.4.3.1), and
            // the ISR bit is set even with MSI-X (4.1.4.5.1).
            self.config_generation.fetch_add(1, Ordering::SeqCst);
            self.isr.fetch_or(ISR_CONFIG, Ordering::SeqCst);
        }
        {
            let mut vectors = self.vectors();
            let vector = match kind {
                InterruptKind::Config => vectors.config,
                InterruptKind::Queue(index) => vectors
                    .queues
                    .get(usize::from(index))
                    .copied()
                    .unwrap_or(NO_VECTOR),
            };
            if let Some(msix) = vectors.msix.as_mut().filter(|msix| msix.enabled()) {
                // With MSI-X enabled, NO_VECTOR means no interrupt at all (4.1.5.1.2).
                return match vector {
                    NO_VECTOR => Ok(()),
                    vector => msix.trigger(vector),
                };
            }
        }
        if let InterruptKind::Queue(_) = kind {
            self.isr.fetch_or(ISR_QUEUE, Ordering::SeqCst);
        }
        match &self.intx {
            Some(evt) if !self.intx_disabled.load(Ordering::SeqCst) => evt.write(1),
            _ => Ok(()),
        }
    }
}

/// Keeps INTx level-triggered, as PCI defines it (PCI 3.0 section 2.2.6): the VMM registers the
/// line's irqfd with a resample eventfd (KVM's `KVM_IRQFD_FLAG_RESAMPLE`), so the IOAPIC pin
/// stays asserted from the device's interrupt until the guest's EOI; KVM then lowers it and
/// signals the resample eventfd, and this subscriber raises the line again while the function
/// still has ISR bits set. Without it the irqfd pulses the pin, and an interrupt the device
/// raises between the driver's ISR read and its EOI is lost (the IOAPIC ignores a pulse while
/// the previous one awaits its EOI).
///
/// Run it on the device's worker (an event-manager subscriber); it knows nothing of KVM.
pub struct IntxResampler {
    interrupts: Arc<Interrupts>,
    resample: EventFd,
}

impl IntxResampler {
    pub(super) fn new(interrupts: Arc<Interrupts>, resample: EventFd) -> Self {
        Self {
            interrupts,
            resample,
        }
    }

    /// The guest acknowledged the line: raise it again if the function is still pending.
    pub fn resample(&self) -> io::Result<()> {
        // Nonblocking: nothing to read means a spurious wake-up, and the check is harmless.
        let _ = self.resample.read();
        self.interrupts.reassert_intx()
    }
}

impl MutEventSubscriber for IntxResampler {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        if let Err(e) = self.resample() {
            bus::guest_log!("virtio-pci: cannot raise INTx again after the guest's EOI: {e}");
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.resample, EventSet::IN)) {
            log::error!("cannot watch the INTx resample eventfd: {e}");
        }
    }
}

/// `vector` if the function has it, otherwise NO_VECTOR, which tells the driver the
/// assignment failed (4.1.5.1.2).
pub(super) fn checked_vector(vectors: &Vectors, vector: u16) -> u16 {
    match &vectors.msix {
        Some(msix) if vector < msix.vectors() => vector,
        _ => NO_VECTOR,
    }
}
