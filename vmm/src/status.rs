//! Signs of life on a slow boot: where the guest kernel is emulated a `quiet` boot prints nothing
//! for minutes. When stderr is a terminal and the guest has been silent for a few seconds, one line
//! on stderr says what the VM is doing (time since start, vCPUs running, exits per second, bytes the
//! guest wrote), updated in place, and erased before the guest's console writes again. Never when
//! stderr is not a terminal, never on stdout, and never over a line the guest left unfinished
//! (a shell's prompt waiting for input: a line drawn there would wipe the prompt out).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::console_io::ConsoleStats;

/// How long the guest must be silent before the line shows.
pub const QUIET_BEFORE_STATUS: Duration = Duration::from_secs(3);
/// How often the line updates.
const PERIOD: Duration = Duration::from_secs(1);

/// Whether the line is on the screen; checked by every console write, so a plain load.
static SHOWN: AtomicBool = AtomicBool::new(false);
/// Serialises drawing and erasing.
static DRAWING: Mutex<()> = Mutex::new(());

/// Erases the status line if it is shown (before the guest's output or a log line).
pub fn erase() {
    if !SHOWN.load(Ordering::Acquire) {
        return;
    }
    let _guard = DRAWING.lock().unwrap_or_else(|e| e.into_inner());
    if SHOWN.swap(false, Ordering::AcqRel) {
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(b"\r\x1b[K");
        let _ = err.flush();
    }
}

/// What the line reports, sampled once a period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    pub vcpus_running: usize,
    pub vcpus: usize,
    pub exits: u64,
}

/// Formats the line (without the carriage return and clearing).
pub fn format_line(
    elapsed: Duration,
    quiet: Duration,
    sample: Sample,
    exits_per_sec: u64,
    bytes_out: u64,
) -> String {
    let secs = elapsed.as_secs();
    format!(
        "[vmm {:02}:{:02}:{:02}] vCPUs running {}/{}, {} exits/s, guest wrote {} bytes, silent for {}s",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        sample.vcpus_running,
        sample.vcpus,
        exits_per_sec,
        bytes_out,
        quiet.as_secs()
    )
}

/// The status thread's handle: dropping it stops the thread and erases the line.
pub struct StatusLine {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StatusLine {
    /// Starts the status line when stderr is a terminal; `sample` reads the vCPUs' counters.
    pub fn start(
        started: Instant,
        stats: Arc<ConsoleStats>,
        sample: impl Fn() -> Sample + Send + 'static,
        thread_start: crate::ThreadStart,
    ) -> Option<StatusLine> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDERR_FILENO) } != 1 {
            return None;
        }
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("status".into())
            .spawn(move || {
                if let Err(e) = thread_start() {
                    log::error!("status line thread: {e}");
                    return;
                }
                let mut last = (Instant::now(), sample().exits);
                let (lock, cvar) = &*thread_stop;
                loop {
                    {
                        let stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
                        let (stopped, _) = cvar
                            .wait_timeout_while(stopped, PERIOD, |stopped| !*stopped)
                            .unwrap_or_else(|e| e.into_inner());
                        if *stopped {
                            return;
                        }
                    }
                    let now = sample();
                    let dt = last.0.elapsed().as_secs_f64().max(0.001);
                    let rate = (now.exits.saturating_sub(last.1) as f64 / dt) as u64;
                    last = (Instant::now(), now.exits);
                    let quiet = stats.quiet_for();
                    if quiet < QUIET_BEFORE_STATUS || stats.mid_line() {
                        // The guest spoke elsewhere (a file, a socket): the line goes too. Or
                        // it left a line unfinished on the terminal (a shell's prompt waiting
                        // for input), which the line would wipe out.
                        erase();
                        continue;
                    }
                    let line = format_line(
                        started.elapsed(),
                        quiet,
                        now,
                        rate,
                        stats.bytes_out.load(Ordering::Relaxed),
                    );
                    let _guard = DRAWING.lock().unwrap_or_else(|e| e.into_inner());
                    let mut err = std::io::stderr().lock();
                    let _ = write!(err, "\r\x1b[K{line}");
                    let _ = err.flush();
                    SHOWN.store(true, Ordering::Release);
                }
            })
            .ok()?;
        Some(StatusLine {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for StatusLine {
    fn drop(&mut self) {
        let (lock, cvar) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cvar.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        erase();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_says_time_vcpus_rate_and_bytes() {
        let line = format_line(
            Duration::from_secs(3725),
            Duration::from_secs(7),
            Sample {
                vcpus_running: 2,
                vcpus: 2,
                exits: 10,
            },
            1234,
            56,
        );
        assert!(line.starts_with("[vmm 01:02:05]"), "{line}");
        assert!(line.contains("2/2") && line.contains("1234 exits/s") && line.contains("56 bytes"));
        assert!(line.ends_with("silent for 7s"), "{line}");
        assert!(!line.contains('\n'));
    }
}
