//! Polling a device's available rings between notifications.
//!
//! A driver's notification (section 2.9) is a write to a device register: a VM exit, then an
//! eventfd that wakes the device's worker, most often on a CPU that went idle meanwhile. At
//! queue depth 1 the two are most of a request's latency. A worker that polls keeps looking at
//! the available rings for a short while after it served them, with the driver asked not to
//! notify (VIRTIO_F_EVENT_IDX's `avail_event` set behind the driver's index, 2.7.10, or
//! VIRTQ_USED_F_NO_NOTIFY, 2.7.7): the driver's next request is seen without an exit or a
//! wake-up. The same idea as QEMU's iothread `poll-max-ns` and vhost-net's `busy_poll`.
//!
//! The window adapts, so that a guest that goes quiet costs little CPU: a poll that finds work
//! opens the whole window for the next one, a poll that finds nothing halves it, and below an
//! eighth of it the worker stops polling for [`REST`] wake-ups before it tries again. A device
//! that waits on I/O of its own ([`PolledQueues::waiting`]) is not polled: the driver is
//! waiting on the device then, and the completion wakes the worker anyway.
//!
//! Polling only pays where the worker has a CPU to itself. On a CPU it shares with the driver's
//! vCPU, a spinning worker holds the vCPU off until the window ends, and nothing comes. So after
//! [`SPIN`] without work the worker yields the CPU between looks; a yield that lasted longer
//! than [`CONTENDED`] means someone else ran, and the worker stops polling for [`REST`]
//! wake-ups, twice as many each time again (up to [`MAX_REST`]) until a poll finds work.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::events::DeviceRuntime;

/// A device whose worker may poll its queues' available rings.
pub trait PolledQueues {
    /// The device's runtime, which holds its queues.
    fn runtime(&mut self) -> &mut DeviceRuntime;

    /// Whether the device waits on work of its own that wakes the worker when it is done (I/O
    /// in flight): polling the rings then only burns CPU.
    fn waiting(&self) -> bool {
        false
    }
}

/// A polled device as the worker holds it: the same device the loop dispatches events to.
pub type SharedPoller = Arc<Mutex<dyn PolledQueues + Send>>;

/// Wake-ups the worker sleeps through without polling once polls kept finding nothing.
pub const REST: u32 = 64;

/// The longest rest after polls found the CPU contended: [`REST`] doubled six times.
pub const MAX_REST: u32 = REST << 6;

/// How long a poll spins before it lets other threads of its CPU run between looks.
pub const SPIN: Duration = Duration::from_micros(20);

/// A yield of the CPU that lasts longer than this means another thread wanted it: the
/// driver's vCPU, maybe, which cannot send what the worker waits for while the worker spins.
pub const CONTENDED: Duration = Duration::from_micros(50);

/// How long the next poll may last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollWindow {
    max: Duration,
    window: Duration,
    rest: u32,
    /// The rest after the next poll that finds the CPU contended.
    contended_rest: u32,
}

impl PollWindow {
    /// A window of at most `max` (zero: never poll).
    pub fn new(max: Duration) -> Self {
        Self {
            max,
            window: max,
            rest: 0,
            contended_rest: REST,
        }
    }

    /// How long to poll after this wake-up, or `None` not to.
    pub fn start(&mut self) -> Option<Duration> {
        if self.max.is_zero() {
            return None;
        }
        if self.rest > 0 {
            self.rest -= 1;
            if self.rest == 0 {
                self.window = self.max;
            }
            return None;
        }
        Some(self.window)
    }

    /// A poll found work: the next may last the whole window.
    pub fn found(&mut self) {
        self.window = self.max;
        self.contended_rest = REST;
    }

    /// A poll found another thread waiting for the CPU: no polls for [`REST`] wake-ups, twice
    /// as many each time it happens again before a poll finds work (up to [`MAX_REST`]).
    pub fn contended(&mut self) {
        self.rest = self.contended_rest;
        self.contended_rest = (self.contended_rest * 2).min(MAX_REST);
    }

    /// A poll ran out its window: the next lasts half as long, or none for [`REST`] wake-ups.
    pub fn missed(&mut self) {
        self.window /= 2;
        if self.window < self.max / 8 {
            self.rest = REST;
        }
    }
}

fn lock(poller: &SharedPoller) -> MutexGuard<'_, dyn PolledQueues + Send + 'static> {
    poller.lock().unwrap_or_else(|poisoned| {
        poller.clear_poison();
        poisoned.into_inner()
    })
}

/// The polled devices of one worker.
pub(crate) struct Pollers {
    devices: Vec<SharedPoller>,
    window: PollWindow,
}

/// What one look at the rings found.
enum Look {
    /// Chains are available: their queues' eventfds were signalled.
    Found,
    /// A device waits on its own I/O: stop polling.
    Waiting,
    /// Nothing.
    Nothing,
}

impl Pollers {
    pub(crate) fn new(max: Duration) -> Self {
        Self {
            devices: Vec::new(),
            window: PollWindow::new(max),
        }
    }

    pub(crate) fn add(&mut self, poller: SharedPoller) {
        self.devices.push(poller);
    }

    pub(crate) fn set_max(&mut self, max: Duration) {
        self.window = PollWindow::new(max);
    }

    /// After the loop dispatched a wake-up's events: polls the rings for the window, serving
    /// what they bring through `serve` (a dispatch round that does not wait; it returns whether
    /// it dispatched anything), and hands the queues back to notifications at the end.
    pub(crate) fn poll<E>(
        &mut self,
        stop: &dyn Fn() -> bool,
        serve: &mut dyn FnMut() -> Result<bool, E>,
    ) -> Result<(), E> {
        if self.devices.is_empty() {
            return Ok(());
        }
        let Some(mut window) = self.window.start() else {
            return Ok(());
        };
        if self.quiet() {
            self.resume();
            return Ok(());
        }
        let mut last_work = Instant::now();
        let mut deadline = last_work + window;
        let result = loop {
            let look = self.look();
            let served = match serve() {
                Ok(served) => served,
                Err(e) => break Err(e),
            };
            if stop() || matches!(look, Look::Waiting) {
                break Ok(());
            }
            if served {
                // A device served may be waiting on its own I/O now, and a queue the driver
                // has just enabled is asked not to notify too.
                if self.quiet() {
                    break Ok(());
                }
                if matches!(look, Look::Found) {
                    self.window.found();
                    window = self.window.window;
                }
                last_work = Instant::now();
                deadline = last_work + window;
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                self.window.missed();
                break Ok(());
            }
            if now - last_work < SPIN {
                std::hint::spin_loop();
                continue;
            }
            // On a CPU it shares, a worker that spins keeps the driver from running: past a
            // short spin, let whoever waits run, and stop polling if someone did.
            std::thread::yield_now();
            if now.elapsed() > CONTENDED {
                self.window.contended();
                break Ok(());
            }
        };
        self.resume();
        result
    }

    /// Asks every driver not to notify; returns whether a device waits on its own I/O.
    fn quiet(&self) -> bool {
        let mut waiting = false;
        for device in &self.devices {
            let mut device = lock(device);
            waiting |= device.waiting();
            device.runtime().quiet_notifications();
        }
        waiting
    }

    fn look(&self) -> Look {
        let mut look = Look::Nothing;
        for device in &self.devices {
            let mut device = lock(device);
            if device.waiting() {
                return Look::Waiting;
            }
            if device.runtime().kick_available() {
                look = Look::Found;
            }
        }
        look
    }

    fn resume(&self) {
        for device in &self.devices {
            lock(device).runtime().resume_notifications();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn a_window_halves_on_misses_rests_then_opens_again() {
        let max = Duration::from_micros(64);
        let mut w = PollWindow::new(max);
        assert_eq!(w.start(), Some(max));
        w.missed();
        assert_eq!(w.start(), Some(max / 2));
        w.found();
        assert_eq!(w.start(), Some(max));
        w.missed();
        w.missed();
        w.missed();
        assert_eq!(w.start(), Some(max / 8));
        w.missed();
        for _ in 0..REST {
            assert_eq!(w.start(), None);
        }
        assert_eq!(w.start(), Some(max));
    }

    #[test]
    fn contention_rests_longer_each_time_until_a_poll_finds_work() {
        let max = Duration::from_micros(64);
        let mut w = PollWindow::new(max);
        let mut rests = Vec::new();
        for _ in 0..8 {
            w.contended();
            let mut skipped = 0;
            while w.start().is_none() {
                skipped += 1;
            }
            rests.push(skipped);
        }
        assert_eq!(rests, [64, 128, 256, 512, 1024, 2048, 4096, 4096]);
        w.found();
        w.contended();
        let mut skipped = 0;
        while w.start().is_none() {
            skipped += 1;
        }
        assert_eq!(skipped, REST);
        assert_eq!(w.start(), Some(max));
    }

    #[test]
    fn a_zero_window_never_polls() {
        let mut w = PollWindow::new(Duration::ZERO);
        assert_eq!(w.start(), None);
        w.found();
        assert_eq!(w.start(), None);
    }
}
