//! PCI: a root bus reached through configuration mechanism #1, type 0 configuration headers
//! with memory BARs, and MSI-X (PCI Local Bus Specification 3.0: section 3.2.2.3.2 for
//! mechanism #1, chapter 6 for configuration space, 6.8.2 for MSI-X).
//!
//! The pieces, and how the VMM wires them:
//!
//! - [`PciRootBus`] answers ports `0xcf8..0xd00` (insert it on the port I/O bus at
//!   [`PciRootBus::PORT_BASE`]), holds a host bridge at 00:00.0 and up to 31 devices on bus 0,
//!   and allocates their BARs from the MMIO window it is given.
//! - A device implements [`PciDevice`]; [`PciRootBus::add_device`] returns the BARs it placed,
//!   and the VMM puts a [`BarMmio`] for each on the MMIO bus.
//! - When the guest moves a BAR, the root bus calls the handler set with
//!   [`PciRootBus::set_bar_move_handler`] with a [`BarMove`], after releasing the device's
//!   lock, so the handler may lock the device (to re-register its ioeventfds, for instance).
//! - MSI-X delivery goes through an [`MsiInterruptController`] the VMM implements with KVM.

#![warn(missing_docs)]

mod config;
mod msix;
mod root;

use std::sync::{Mutex, MutexGuard};

#[cfg(any(test, feature = "fuzzing"))]
pub mod testing;
pub use config::{
    command, offset, status, BarKind, PciBar, PciConfigSpace, PciHeader, CONFIG_SPACE_SIZE,
    NUM_BARS, NUM_REGS,
};
pub use msix::{
    MsiInterruptController, Msix, CONTROL_WRITABLE as MSIX_CONTROL_WRITABLE,
    ENTRY_SIZE as MSIX_ENTRY_SIZE, MAX_VECTORS as MSIX_MAX_VECTORS, MSIX_CAPABILITY_ID,
};
pub use root::{BarMmio, BarMoveHandler, PciRootBus, HOST_BRIDGE_DEVICE_ID, HOST_BRIDGE_VENDOR_ID};

/// Number of device slots on a bus.
pub const SLOTS: u8 = 32;

/// A PCI function on bus 0. Every access comes from the guest: implementations must not panic
/// on any register, offset or length.
pub trait PciDevice: Send {
    /// The 32-bit configuration register `reg` (0..64).
    fn read_config_register(&mut self, reg: usize) -> u32;
    /// Writes `data` (1, 2 or 4 bytes) at byte `offset` of register `reg`; returns the BAR move
    /// the write caused, if any.
    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarMove>;
    /// The memory BARs and where they are mapped now.
    fn bars(&self) -> Vec<PciBarRange>;
    /// Places BAR `index` at `addr`, before the guest runs.
    fn set_bar_address(&mut self, index: u8, addr: u64) -> Result<(), PciError>;
    /// A read of BAR `bar` at `offset` from its base.
    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]);
    /// A write to BAR `bar` at `offset` from its base.
    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]);
}

/// Where one memory BAR is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciBarRange {
    /// BAR number (0..6).
    pub index: u8,
    /// Guest-physical address the BAR decodes now.
    pub addr: u64,
    /// Size of the BAR in bytes, a power of two.
    pub size: u64,
    /// 32- or 64-bit decode.
    pub kind: BarKind,
}

/// The guest programmed BAR `bar` of a device to a new address: the VMM must move the BAR's
/// MMIO range (and any ioeventfds inside it) from `old` to `new`.
///
/// A 64-bit BAR programmed one half at a time reports a move per half. Writes of all-ones
/// (sizing) and the restore of the address that follows them report nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarMove {
    /// BAR number (0..6); for a 64-bit BAR, the number of its lower register.
    pub bar: u8,
    /// Guest-physical address the BAR decoded before the write.
    pub old: u64,
    /// Guest-physical address it decodes after the write.
    pub new: u64,
    /// Size of the BAR in bytes.
    pub size: u64,
}

/// Errors of the PCI crate. All of them come from the VMM's own set-up (a device asking for
/// an impossible BAR, a full bus); nothing a guest writes returns one.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// The BAR number is past the six of a type 0 header, or a 64-bit BAR would start in the
    /// last one, which has no upper half.
    #[error("BAR {0} does not exist or does not fit in the header")]
    InvalidBarIndex(usize),
    /// The BAR (or the upper half of a 64-bit one) was already declared.
    #[error("BAR {0} is already in use")]
    BarInUse(usize),
    /// A memory BAR must be a power of two of at least 16 bytes, below 4 GiB for a 32-bit one
    /// (section 6.2.5.1).
    #[error("a BAR of {0:#x} bytes is not a power of two of at least 16 bytes that fits its type")]
    InvalidBarSize(u64),
    /// The address is not aligned to the BAR's size or does not fit its type.
    #[error("BAR {index} cannot be placed at {addr:#x}")]
    InvalidBarAddress {
        /// BAR number.
        index: usize,
        /// The refused address.
        addr: u64,
    },
    /// No room left for the capability between 0x40 and the end of configuration space.
    #[error("the capability does not fit in the configuration space")]
    CapabilityFull,
    /// An MSI-X table has 1 to 2048 entries (section 6.8.2.3).
    #[error("an MSI-X table of {0} vectors is not in 1..=2048")]
    InvalidVectorCount(u16),
    /// All 31 device slots of bus 0 (beside the host bridge) are taken.
    #[error("bus 0 has no free device slot")]
    BusFull,
    /// The MMIO window given to [`PciRootBus::new`] is empty or wraps.
    #[error("the PCI MMIO window at {base:#x} with size {size:#x} is invalid")]
    Window {
        /// Base of the window.
        base: u64,
        /// Size of the window.
        size: u64,
        /// Why the allocator refused it.
        #[source]
        source: vm_allocator::Error,
    },
    /// The MMIO window has no aligned room left for a device's BAR.
    #[error("no room for BAR {index} of {size:#x} bytes in the PCI MMIO window")]
    OutOfSpace {
        /// BAR number.
        index: u8,
        /// Size of the BAR.
        size: u64,
        /// Why the allocator refused it.
        #[source]
        source: vm_allocator::Error,
    },
}

/// Locks a device, recovering from a poisoned mutex as [`bus`] does: a device that
/// panicked once keeps the state it was left in.
fn lock<T: ?Sized>(device: &Mutex<T>) -> MutexGuard<'_, T> {
    device.lock().unwrap_or_else(|poisoned| {
        log::error!("a PCI device panicked earlier; using its state as it was left");
        device.clear_poison();
        poisoned.into_inner()
    })
}
