//! Guest-facing devices and the I/O bus that routes port and MMIO accesses to them.
//!
//! The crate knows nothing of KVM: a device raises its interrupt by writing to an
//! [`EventFd`](vmm_sys_util::eventfd::EventFd) that the VMM registers as a KVM irqfd, and a vCPU
//! thread reaches a device through [`bus::Bus`], which the VMM builds before the vCPUs start
//! and then shares read-only.
//!
//! - [`bus`]: address-range routing, one mutex per device, all-ones for unclaimed reads.
//! - [`legacy`]: the PC platform devices a Linux guest expects to find at fixed ports
//!   (8250 UART, MC146818 CMOS RTC, i8042, POST debug port).
//! - [`virtio`]: the virtio device trait, devices and transports.
//! - [`pci`]: the PCI root bus (configuration mechanism #1), configuration space, BARs and
//!   MSI-X, on which the virtio PCI transport sits.
//! - [`ratelimit`]: [`guest_log!`], the rate-limited log line for anything a guest can cause.
//! - `fuzz` (and `pci::fuzz_*`, `virtio::fuzz`): entry points that feed a byte stream of
//!   register accesses to one device, for the fuzz targets and for replaying their findings in
//!   plain tests; and `testing`, the crate's test doubles. Both are built for tests and with
//!   the `fuzzing` feature only.

#![warn(missing_docs)]

pub mod bus;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
pub mod legacy;
pub mod metrics;
// Being rewritten around one virtio transport core; documented as part of that.
#[allow(missing_docs)]
pub mod pci;
pub mod ratelimit;
#[cfg(any(test, feature = "fuzzing"))]
pub mod testing;
#[allow(missing_docs)]
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};

/// Errors of the `devices` crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A device could not be placed on a bus.
    #[error("cannot place the device on the bus")]
    Bus(#[from] BusError),
}
