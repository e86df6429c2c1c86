//! Counters of one device, kept by the device and read by the VMM for its metrics.
//!
//! Relaxed atomics: the device's worker bumps them, any thread may read a snapshot while it runs.

use std::sync::atomic::{AtomicU64, Ordering};

/// What a device did.
#[derive(Debug, Default)]
pub struct DeviceMetrics {
    /// Requests (descriptor chains) completed.
    pub requests: AtomicU64,
    /// Bytes the device wrote into the driver's buffers (the used lengths).
    pub bytes: AtomicU64,
    /// Failures a guest caused or the backend reported (each one the device logs, rate-limited).
    pub errors: AtomicU64,
    /// Interrupts raised to the driver.
    pub interrupts: AtomicU64,
}

impl DeviceMetrics {
    /// Adds `n` to one of the counters.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The counters, by name.
    pub fn snapshot(&self) -> [(&'static str, u64); 4] {
        [
            ("requests", self.requests.load(Ordering::Relaxed)),
            ("bytes", self.bytes.load(Ordering::Relaxed)),
            ("errors", self.errors.load(Ordering::Relaxed)),
            ("interrupts", self.interrupts.load(Ordering::Relaxed)),
        ]
    }
}
