//! When a queue pair's worker wakes to receive: receive moderation.
//!
//! A wake-up of the worker costs more host CPU than moving a frame, and a worker woken by the
//! tap for every frame drains it as fast as frames come, a few per wake-up. Measured on a
//! 2-core host with the bench guest's receive test: 50,000-70,000 wake-ups a second for
//! 250,000-280,000 frames, each wake-up preempting the guest's vCPU or the sender, where QEMU's
//! main loop woke 15,000-25,000 times for 330,000-380,000. Two rules cut that, as a NIC's
//! interrupt moderation and QEMU's tap handling do:
//!
//! - **Waiting for buffers**: while a frame waits for the driver to add receive buffers, the
//!   tap is not watched at all. The driver's notification (enabled while we wait, 2.7.10)
//!   resumes the pair; every frame the tap queues meanwhile would otherwise wake the worker to
//!   find no buffer again.
//! - **Polling while frames stream**: when [`RX_POLL_ENTER`] frames arrive within one
//!   [`RX_POLL_PERIOD`], the worker stops watching the tap and reads it on a timer instead,
//!   once per period, taking what queued meanwhile (the tap holds 500 frames, 1.4 ms at
//!   350,000 frames/s). A period that brings fewer than [`RX_POLL_EXIT`] frames ends the
//!   polling. A lone frame (a ping, a request) is read the moment it arrives; a stream's frames
//!   wait at most one period more.
//!
//! [`RxModeration`] only decides; the pair's worker ([`crate::NetQueuePair`]) arms the tap's
//! events and the timer as [`Watch`] says.

use std::time::{Duration, Instant};

/// How often a polling worker reads the tap.
pub const RX_POLL_PERIOD: Duration = Duration::from_micros(100);
/// Frames within one [`RX_POLL_PERIOD`] (160,000 frames/s) that turn polling on.
pub const RX_POLL_ENTER: usize = 16;
/// A polling period that brings fewer frames (40,000 frames/s) turns polling off.
pub const RX_POLL_EXIT: usize = 4;

/// What woke the worker for a receive round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxWake {
    /// The tap became readable.
    Tap,
    /// The polling timer expired.
    Timer,
    /// The driver added receive buffers (its notification), or the device started.
    Buffers,
}

/// How the worker learns of frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxMode {
    /// From the tap's readability.
    Events,
    /// From the timer, every [`RX_POLL_PERIOD`].
    Polling,
    /// From the driver's notification: a frame waits for receive buffers.
    WaitingForBuffers,
}

/// What the worker watches after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watch {
    /// The tap's readability.
    pub tap: bool,
    /// The polling timer, armed for one [`RX_POLL_PERIOD`].
    pub timer: bool,
}

/// The receive side's mode and the frame count that decides when to poll.
#[derive(Debug)]
pub struct RxModeration {
    mode: RxMode,
    window_start: Instant,
    window_frames: usize,
}

impl Default for RxModeration {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl RxModeration {
    /// Starts in [`RxMode::Events`].
    pub fn new(now: Instant) -> Self {
        Self {
            mode: RxMode::Events,
            window_start: now,
            window_frames: 0,
        }
    }

    /// The current mode.
    pub fn mode(&self) -> RxMode {
        self.mode
    }

    /// Back to [`RxMode::Events`] (the device was reset or started).
    pub fn reset(&mut self, now: Instant) {
        *self = Self::new(now);
    }

    /// After a receive round woken by `wake` that delivered `delivered` frames: the next mode,
    /// and what to watch for the next round. `frame_waits` says whether a frame is left
    /// waiting for receive buffers.
    pub fn after_round(
        &mut self,
        wake: RxWake,
        delivered: usize,
        frame_waits: bool,
        now: Instant,
    ) -> Watch {
        self.mode = if frame_waits {
            RxMode::WaitingForBuffers
        } else {
            match self.mode {
                RxMode::Polling if wake == RxWake::Timer && delivered < RX_POLL_EXIT => {
                    self.restart_window(now);
                    RxMode::Events
                }
                RxMode::Polling => RxMode::Polling,
                RxMode::Events | RxMode::WaitingForBuffers => {
                    if now.duration_since(self.window_start) >= RX_POLL_PERIOD {
                        self.restart_window(now);
                    }
                    self.window_frames += delivered;
                    if self.window_frames >= RX_POLL_ENTER {
                        RxMode::Polling
                    } else {
                        RxMode::Events
                    }
                }
            }
        };
        self.watch()
    }

    /// What the current mode watches.
    pub fn watch(&self) -> Watch {
        Watch {
            tap: self.mode == RxMode::Events,
            timer: self.mode == RxMode::Polling,
        }
    }

    fn restart_window(&mut self, now: Instant) {
        self.window_start = now;
        self.window_frames = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENTS: Watch = Watch {
        tap: true,
        timer: false,
    };
    const POLLING: Watch = Watch {
        tap: false,
        timer: true,
    };
    const NOTHING: Watch = Watch {
        tap: false,
        timer: false,
    };

    #[test]
    fn a_stream_turns_polling_on_and_a_quiet_period_turns_it_off() {
        let t0 = Instant::now();
        let mut m = RxModeration::new(t0);
        // 5 frames per wake-up, 20 us apart: the fourth wake-up makes 20 within 100 us.
        for i in 0..3 {
            let now = t0 + Duration::from_micros(20 * i);
            assert_eq!(m.after_round(RxWake::Tap, 5, false, now), EVENTS);
        }
        let now = t0 + Duration::from_micros(60);
        assert_eq!(m.after_round(RxWake::Tap, 5, false, now), POLLING);
        assert_eq!(m.mode(), RxMode::Polling);
        // Busy periods keep it polling; so does a notification of buffers in between.
        let now = now + RX_POLL_PERIOD;
        assert_eq!(m.after_round(RxWake::Timer, 30, false, now), POLLING);
        assert_eq!(m.after_round(RxWake::Buffers, 0, false, now), POLLING);
        // A period with fewer than RX_POLL_EXIT frames: back to the tap's events.
        let now = now + RX_POLL_PERIOD;
        assert_eq!(
            m.after_round(RxWake::Timer, RX_POLL_EXIT - 1, false, now),
            EVENTS
        );
        // And the count starts again: one more frame does not turn polling back on.
        assert_eq!(m.after_round(RxWake::Tap, 1, false, now), EVENTS);
    }

    #[test]
    fn frames_spread_out_never_turn_polling_on() {
        let t0 = Instant::now();
        let mut m = RxModeration::new(t0);
        // 15 frames a period, 1,000 periods: 150,000 frames/s stays event-driven.
        for i in 0..1000u32 {
            let now = t0 + RX_POLL_PERIOD * i + Duration::from_nanos(1);
            assert_eq!(
                m.after_round(RxWake::Tap, RX_POLL_ENTER - 1, false, now),
                EVENTS
            );
        }
    }

    #[test]
    fn a_frame_waiting_for_buffers_watches_nothing_until_the_driver_adds_some() {
        let t0 = Instant::now();
        for start_polling in [false, true] {
            let mut m = RxModeration::new(t0);
            if start_polling {
                assert_eq!(
                    m.after_round(RxWake::Tap, RX_POLL_ENTER, false, t0),
                    POLLING
                );
            }
            let wake = if start_polling {
                RxWake::Timer
            } else {
                RxWake::Tap
            };
            assert_eq!(m.after_round(wake, 3, true, t0), NOTHING);
            assert_eq!(m.mode(), RxMode::WaitingForBuffers);
            // Buffers that still leave the frame waiting: still nothing to watch.
            assert_eq!(m.after_round(RxWake::Buffers, 0, true, t0), NOTHING);
            // Enough buffers: the tap again, or the timer if frames keep streaming.
            let later = t0 + RX_POLL_PERIOD * 2;
            assert_eq!(m.after_round(RxWake::Buffers, 2, false, later), EVENTS);
            assert_eq!(m.after_round(RxWake::Buffers, 0, true, later), NOTHING);
            assert_eq!(
                m.after_round(RxWake::Buffers, RX_POLL_ENTER, false, later),
                POLLING
            );
        }
    }

    #[test]
    fn reset_goes_back_to_the_taps_events() {
        let t0 = Instant::now();
        let mut m = RxModeration::new(t0);
        m.after_round(RxWake::Tap, 100, false, t0);
        assert_eq!(m.mode(), RxMode::Polling);
        m.reset(t0);
        assert_eq!(m.mode(), RxMode::Events);
        assert_eq!(m.watch(), EVENTS);
        assert_eq!(m.after_round(RxWake::Tap, 1, false, t0), EVENTS);
    }
}
