//! Counters of one vCPU's exits, by reason, for the VMM's metrics and status line.
//!
//! The vCPU thread bumps one relaxed atomic per exit; any thread may read them while it runs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kvm_ioctls::VcpuExit;

/// The exit reasons counted, in the order of [`VcpuMetrics::by_reason`].
pub const EXIT_REASONS: [&str; 11] = [
    "io_in",
    "io_out",
    "mmio_read",
    "mmio_write",
    "hlt",
    "intr",
    "shutdown",
    "system_event",
    "internal_error",
    "fail_entry",
    "other",
];

/// Where an exit is counted in [`EXIT_REASONS`].
fn reason_index(exit: &VcpuExit<'_>) -> usize {
    match exit {
        VcpuExit::IoIn(..) => 0,
        VcpuExit::IoOut(..) => 1,
        VcpuExit::MmioRead(..) => 2,
        VcpuExit::MmioWrite(..) => 3,
        VcpuExit::Hlt => 4,
        VcpuExit::Intr => 5,
        VcpuExit::Shutdown => 6,
        VcpuExit::SystemEvent(..) => 7,
        VcpuExit::InternalError => 8,
        VcpuExit::FailEntry(..) => 9,
        _ => 10,
    }
}

/// One vCPU's counters.
#[derive(Debug, Default)]
pub struct VcpuMetrics {
    exits: [AtomicU64; EXIT_REASONS.len()],
    /// `KVM_RUN` calls that returned EINTR/EAGAIN (kicks), not counted as exits.
    interrupted: AtomicU64,
    /// Whether the vCPU thread is in its run loop.
    running: AtomicBool,
    /// Whether the last probe found the vCPU halted with interrupts disabled.
    halted: AtomicBool,
}

impl VcpuMetrics {
    /// Counts one exit.
    pub fn record(&self, exit: &VcpuExit<'_>) {
        self.exits[reason_index(exit)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_interrupted(&self) {
        self.interrupted.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set_running(&self, running: bool) {
        self.running.store(running, Ordering::Relaxed);
    }

    pub(crate) fn set_halted(&self, halted: bool) {
        if self.halted.load(Ordering::Relaxed) != halted {
            self.halted.store(halted, Ordering::Relaxed);
        }
    }

    /// Whether the vCPU was, when last probed ([`crate::VcpuHandle::probe`]), halted with
    /// interrupts disabled: nothing but an NMI or INIT can wake it.
    pub fn is_halted_for_good(&self) -> bool {
        self.halted.load(Ordering::Relaxed)
    }

    /// Whether the vCPU thread is running the guest (started and not yet stopped).
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    /// Every exit so far.
    pub fn total(&self) -> u64 {
        self.exits.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Exits by reason, named as in [`EXIT_REASONS`], and the kicks.
    pub fn by_reason(&self) -> Vec<(&'static str, u64)> {
        EXIT_REASONS
            .iter()
            .zip(&self.exits)
            .map(|(name, count)| (*name, count.load(Ordering::Relaxed)))
            .chain(std::iter::once((
                "interrupted",
                self.interrupted.load(Ordering::Relaxed),
            )))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_counted_by_reason() {
        let metrics = VcpuMetrics::default();
        let mut data = [0u8; 1];
        metrics.record(&VcpuExit::IoOut(0x3f8, b"x"));
        metrics.record(&VcpuExit::IoOut(0x3f8, b"y"));
        metrics.record(&VcpuExit::IoIn(0x3fd, &mut data));
        metrics.record(&VcpuExit::Hlt);
        metrics.record_interrupted();
        let counts = metrics.by_reason();
        let get = |name| counts.iter().find(|(n, _)| *n == name).unwrap().1;
        assert_eq!(get("io_out"), 2);
        assert_eq!(get("io_in"), 1);
        assert_eq!(get("hlt"), 1);
        assert_eq!(get("interrupted"), 1);
        assert_eq!(metrics.total(), 4);
    }
}
