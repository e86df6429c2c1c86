//! Rate limits for log lines a guest can cause.
//!
//! A guest that hammers a register, retries FEATURES_OK or posts malformed chains in a loop must
//! not fill the host's disk with log lines. Every such line goes through
//! [`guest_log!`](crate::guest_log): each call site has its own token bucket ([`RateLimit`], a
//! burst of [`CALLSITE_BURST`] lines, then one per [`CALLSITE_PERIOD`]) and all of them share
//! one more bucket ([`GLOBAL_BURST`], then one line per [`GLOBAL_PERIOD`]), so a guest hammering
//! every register at once still leaves a few kilobytes a minute. Lines dropped at a call site
//! are counted and the count is logged with that site's next line ("N similar messages
//! suppressed").

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[doc(hidden)]
pub use log as __log;

/// Lines a call site may log at once.
pub const CALLSITE_BURST: u32 = 8;
/// How often a call site earns one more line.
pub const CALLSITE_PERIOD: Duration = Duration::from_secs(5);
/// Lines all call sites together may log at once.
pub const GLOBAL_BURST: u32 = 64;
/// How often all call sites together earn one more line.
pub const GLOBAL_PERIOD: Duration = Duration::from_secs(1);

/// Bucket state: tokens left, when the last token was earned, lines dropped since the last one
/// logged.
#[derive(Debug)]
struct Bucket {
    tokens: u32,
    since: Option<Instant>,
    suppressed: u64,
}

/// A token bucket of log lines.
#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    period: Duration,
    bucket: Mutex<Bucket>,
}

impl RateLimit {
    /// A call site's bucket.
    pub const fn new() -> Self {
        Self::with(CALLSITE_BURST, CALLSITE_PERIOD)
    }

    /// A bucket of `burst` lines that earns one more each `period`.
    pub const fn with(burst: u32, period: Duration) -> Self {
        Self {
            burst,
            period,
            bucket: Mutex::new(Bucket {
                tokens: burst,
                since: None,
                suppressed: 0,
            }),
        }
    }

    /// Takes a token at `now`: `Some(suppressed)` (lines dropped before this one) if the line
    /// may be logged, `None` (and one more dropped) if not.
    pub fn take_at(&self, now: Instant) -> Option<u64> {
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let since = *b.since.get_or_insert(now);
        let elapsed = now.saturating_duration_since(since);
        let earned = (elapsed.as_nanos() / self.period.as_nanos().max(1)) as u64;
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            b.tokens = b.tokens.saturating_add(earned).min(self.burst);
            b.since = Some(since + self.period.saturating_mul(earned));
        }
        if b.tokens == 0 {
            b.suppressed = b.suppressed.saturating_add(1);
            return None;
        }
        b.tokens -= 1;
        Some(std::mem::take(&mut b.suppressed))
    }

    /// Whether a line may be logged now, counting it as dropped if not.
    pub fn take(&self) -> Option<u64> {
        self.take_at(Instant::now())
    }

    /// Gives back a token taken with [`take`](Self::take) whose line was not logged.
    fn give_back(&self, suppressed: u64) {
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        b.tokens = (b.tokens + 1).min(self.burst);
        b.suppressed = b.suppressed.saturating_add(suppressed).saturating_add(1);
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// The bucket every call site shares.
static GLOBAL: RateLimit = RateLimit::with(GLOBAL_BURST, GLOBAL_PERIOD);

/// Whether a line of `site` may be logged (its bucket and the shared one both allow it):
/// `Some(n)` with the lines `site` dropped before it.
pub fn admit(site: &RateLimit) -> Option<u64> {
    let suppressed = site.take()?;
    if GLOBAL.take().is_none() {
        site.give_back(suppressed);
        return None;
    }
    Some(suppressed)
}

/// Logs a warning a guest can cause, rate-limited per call site (see [`crate::ratelimit`]).
#[macro_export]
macro_rules! guest_log {
    ($($arg:tt)+) => {{
        static SITE: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if let Some(suppressed) = $crate::ratelimit::admit(&SITE) {
            if suppressed > 0 {
                $crate::ratelimit::__log::warn!(
                    "{} ({suppressed} similar messages suppressed)",
                    format_args!($($arg)+)
                );
            } else {
                $crate::ratelimit::__log::warn!($($arg)+);
            }
        }
    }};
}

/// A logger for tests that counts the bytes logged on the threads that asked for it (for this
/// crate's and the device crates' tests: `fuzzing` feature).
#[cfg(any(test, feature = "fuzzing"))]
pub mod capture {
    use std::cell::Cell;
    use std::sync::Once;

    thread_local! {
        static BYTES: Cell<Option<usize>> = const { Cell::new(None) };
    }

    struct Counter;

    impl log::Log for Counter {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            let len = record.args().to_string().len() + 1;
            BYTES.with(|b| b.set(b.get().map(|n| n + len)));
        }
        fn flush(&self) {}
    }

    static COUNTER: Counter = Counter;
    static INSTALL: Once = Once::new();

    /// Runs `f` and returns how many bytes of log lines it produced on this thread.
    pub fn logged_bytes(f: impl FnOnce()) -> usize {
        INSTALL.call_once(|| {
            let _ = log::set_logger(&COUNTER);
            log::set_max_level(log::LevelFilter::Trace);
        });
        BYTES.with(|b| b.set(Some(0)));
        f();
        BYTES.with(|b| b.take()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_a_burst_then_one_line_per_period_and_counts_the_rest() {
        let limit = RateLimit::with(3, Duration::from_secs(1));
        let t0 = Instant::now();
        let burst: Vec<_> = (0..10).map(|_| limit.take_at(t0)).collect();
        assert_eq!(burst[..3], [Some(0), Some(0), Some(0)]);
        assert!(burst[3..].iter().all(Option::is_none));
        // One period later: one line, reporting the seven dropped.
        assert_eq!(limit.take_at(t0 + Duration::from_millis(1500)), Some(7));
        assert_eq!(limit.take_at(t0 + Duration::from_millis(1600)), None);
        // A long pause refills the burst, no more.
        let later = t0 + Duration::from_secs(100);
        assert_eq!(limit.take_at(later), Some(1));
        assert_eq!(limit.take_at(later), Some(0));
        assert_eq!(limit.take_at(later), Some(0));
        assert_eq!(limit.take_at(later), None);
    }

    #[test]
    fn a_hot_call_site_logs_a_bounded_number_of_lines() {
        let bytes = capture::logged_bytes(|| {
            for i in 0..100_000u32 {
                crate::guest_log!("test: hammered register write {i:#x}");
            }
        });
        // (How many of the burst get out depends on the shared bucket, which other tests
        // running now also draw on.)
        assert!(
            bytes <= CALLSITE_BURST as usize * 64,
            "{bytes} bytes logged"
        );
    }
}
