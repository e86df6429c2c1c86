//! Virtio devices and their transports (Virtual I/O Device (VIRTIO) Version 1.2).
//!
//! A device (blk, net, rng) implements [`VirtioDevice`]: the features it offers, its
//! configuration space, and what it does once the driver has set it up (activation, with the
//! queues the transport negotiated) and when the driver resets it. A transport (virtio-mmio,
//! virtio-pci) decodes registers over the one [`transport::TransportCore`], which owns the
//! device status, feature negotiation and the queues until activation, and raises interrupts
//! through a [`VirtioInterrupt`] the VMM wires to KVM. Neither knows anything of KVM: queue
//! notifications arrive on `EventFd`s the VMM registers as ioeventfds, and interrupts leave
//! through `EventFd`s it registers as irqfds.

#![warn(missing_docs)]

pub mod events;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
pub mod iovec;
pub mod mmio;
pub mod pci;
pub mod poll;
pub mod queue;
pub mod transport;

use std::sync::Arc;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Device status bits (section 2.1).
pub mod status {
    /// The guest OS has found the device and recognised it as a virtio device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest OS knows how to drive the device.
    pub const DRIVER: u8 = 2;
    /// The driver is set up and ready: the device may use its queues (activation).
    pub const DRIVER_OK: u8 = 4;
    /// The driver has acknowledged the features it understands; feature negotiation is over
    /// (section 3.1.1). A device that refuses the subset leaves it clear, which the driver
    /// sees when it reads the status back.
    pub const FEATURES_OK: u8 = 8;
    /// Set by the device: it hit an error it cannot recover from and needs a reset (2.1.2).
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// Set by the driver: something went wrong and it gave up on the device.
    pub const FAILED: u8 = 0x80;
}

/// Device IDs (section 5).
pub mod device_type {
    /// Network card (section 5.1).
    pub const NET: u32 = 1;
    /// Block device (section 5.2).
    pub const BLOCK: u32 = 2;
    /// Entropy source (section 5.4).
    pub const RNG: u32 = 4;
}

/// Why an interrupt is raised (section 2.3 for the configuration change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptKind {
    /// The device's configuration space changed.
    Config,
    /// The device used buffers of this queue.
    Queue(u16),
}

/// How a device signals its driver; the transport implements it (ISR bit plus an irqfd for
/// virtio-mmio and INTx, an MSI-X vector per queue for virtio-pci).
pub trait VirtioInterrupt: Send + Sync {
    /// Raises the interrupt for `kind`.
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()>;

    /// The device found its queues inconsistent and stops serving them: the transport sets
    /// DEVICE_NEEDS_RESET and sends a configuration-change notification (2.1.2); the driver's
    /// reset brings the device back. The interrupt a transport core hands to a device at
    /// activation implements it; others only send the notification.
    fn set_needs_reset(&self) -> std::io::Result<()> {
        self.trigger(InterruptKind::Config)
    }
}

/// One negotiated queue handed to the device at activation: the queue itself and the eventfd
/// that fires when the driver notifies it.
pub struct ActiveQueue {
    /// The split virtqueue (section 2.7) as the driver configured it: size, ring addresses,
    /// ready.
    pub queue: virtio_queue::Queue,
    /// Written by KVM (an ioeventfd on the queue's notify address) when the driver notifies
    /// the queue (section 2.9).
    pub notify: EventFd,
}

/// Errors a device reports when it cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The transport handed over a different number of queues than the device uses.
    #[error("the device got {got} queues and needs {want}")]
    QueueCount {
        /// Queues handed to the device.
        got: usize,
        /// Queues the device needs.
        want: usize,
    },
    /// The device's backend (image, tap, entropy source) cannot serve it.
    #[error("the device cannot start: {0}")]
    Backend(String),
}

/// A virtio device, independent of its transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (see [`device_type`]).
    fn device_type(&self) -> u32;
    /// The largest size of each queue the device uses; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Feature bits the device offers (including `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// The features the driver accepted (a subset of [`features`](Self::features), checked by
    /// the transport).
    fn ack_features(&mut self, features: u64);
    /// Reads the device configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space; most devices ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with its queues as the driver set them up: all of them, in index
    /// order, those the driver did not enable not ready (`Queue::ready()` false; the runtime
    /// never serves them).
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError>;
    /// The driver reset the device: stop using the queues and return to the initial state.
    /// Returns false if the device cannot be reset (the transport then sets DEVICE_NEEDS_RESET).
    fn reset(&mut self) -> bool;
    /// The device's counters, for the VMM's metrics.
    fn metrics(&self) -> Option<Arc<bus::metrics::DeviceMetrics>> {
        None
    }
}
