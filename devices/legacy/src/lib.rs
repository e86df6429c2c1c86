//! Legacy PC platform devices at their fixed ISA port addresses.
//!
//! Each device documents its port base and length as associated constants and implements
//! [`BusDevice`](bus::BusDevice); every constructor works without files or KVM (output to
//! `std::io::sink()`, a [`ManualClock`]), so the fuzz entry points in `legacy::fuzz` (feature
//! `fuzzing`) and the unit tests build them directly. Log lines a guest can cause go through
//! [`bus::guest_log!`].

#![warn(missing_docs)]

mod acpi_pm;
mod calendar;
mod cmos;
mod debug_port;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
mod i8042;
mod serial;

pub use acpi_pm::AcpiPm;
pub use cmos::{Clock, CmosRtc, HostClock, ManualClock};
pub use debug_port::DebugPort;
pub use i8042::I8042;
pub use serial::{EventFdTrigger, Uart8250};
