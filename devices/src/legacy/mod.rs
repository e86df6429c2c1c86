//! Legacy PC platform devices at their fixed ISA port addresses.
//!
//! Each device documents its port base and length as associated constants and implements
//! [`BusDevice`](crate::bus::BusDevice); every constructor works without files or KVM (output to
//! `std::io::sink()`, a [`ManualClock`]), so the fuzz entry points in [`crate::fuzz`] and the unit
//! tests build them directly.

mod acpi_pm;
mod calendar;
mod cmos;
mod debug_port;
mod i8042;
mod serial;

pub use acpi_pm::AcpiPm;
pub use cmos::{Clock, CmosRtc, HostClock, ManualClock};
pub use debug_port::DebugPort;
pub use i8042::I8042;
pub use serial::{EventFdTrigger, Uart8250};

/// Rate limit for logging a guest- or host-triggered failure that may repeat on every access:
/// logs the 1st, 2nd, 4th, 8th, ... occurrence, with the count so far.
#[derive(Debug, Default)]
pub(crate) struct LogLimiter {
    count: u64,
}

impl LogLimiter {
    /// Counts one occurrence; returns the count when this one should be logged.
    pub(crate) fn hit(&mut self) -> Option<u64> {
        self.count = self.count.saturating_add(1);
        self.count.is_power_of_two().then_some(self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::LogLimiter;

    #[test]
    fn log_limiter_logs_powers_of_two() {
        let mut limiter = LogLimiter::default();
        let logged: Vec<u64> = (0..20).filter_map(|_| limiter.hit()).collect();
        assert_eq!(logged, [1, 2, 4, 8, 16]);
    }
}
