//! `--metrics-file`: one JSON object per line, as Firecracker writes them, every
//! `--metrics-interval` seconds and once more at exit.
//!
//! The counters belong to the crates that count: each vCPU's exits by reason
//! ([`cpu::VcpuMetrics`]), each device's requests, bytes, errors and interrupts
//! ([`bus::metrics::DeviceMetrics`]), and the bytes the guest wrote to its console. The VMM only
//! collects them; [`Metrics::flush`] writes a line now (the API's `FlushMetrics` calls it). The
//! kvm-pvm fallback's instruction counts live on the vCPU threads, so the line written at exit
//! carries them.
//!
//! A line:
//! `{"uptime_ms":1234,"vcpus":[{"id":0,"running":true,"exits":{"io_in":3,...}}],
//!   "devices":{"serial":{"bytes_out":120},"virtio-blk0":{"requests":5,...}},"emulated":[...]}`

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bus::metrics::DeviceMetrics;
use cpu::VcpuMetrics;

use crate::console_io::ConsoleStats;

/// Errors of the metrics file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the {what} {path}: {source}")]
    Open {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What the metrics read.
pub struct Sources {
    pub started: Instant,
    pub vcpus: Vec<Arc<VcpuMetrics>>,
    pub devices: Vec<(String, Arc<DeviceMetrics>)>,
    pub console: Arc<ConsoleStats>,
}

struct Inner {
    file: Mutex<File>,
    sources: Sources,
}

/// The metrics file and its sources; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

/// Opens the metrics file for appending.
pub fn open_file(path: &Path) -> Result<File, Error> {
    open_append(path, "metrics file")
}

/// Opens `path` (the `what`: "log file", "metrics file") for appending; refuses what is not a
/// regular file or a character device (a FIFO would block, a directory cannot be written).
pub fn open_append(path: &Path, what: &'static str) -> Result<File, Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| Error::Open {
        what,
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        // A terminal or /dev/null is fine; a FIFO would block until a reader came.
        let kind = meta.file_type();
        if !(kind.is_file() || kind.is_char_device()) {
            return Err(err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or a character device",
            )));
        }
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(err)
}

impl Metrics {
    pub fn new(file: File, sources: Sources) -> Self {
        Self {
            inner: Arc::new(Inner {
                file: Mutex::new(file),
                sources,
            }),
        }
    }

    /// The counters as one JSON object (no newline). `emulated` are the kvm-pvm fallback's
    /// instruction counts per vCPU, known when the vCPUs have stopped.
    pub fn line(&self, emulated: &[(usize, Vec<(String, u64)>)]) -> String {
        let sources = &self.inner.sources;
        let mut out = String::with_capacity(512);
        let _ = write!(
            out,
            "{{\"uptime_ms\":{},\"vcpus\":[",
            sources.started.elapsed().as_millis()
        );
        for (id, vcpu) in sources.vcpus.iter().enumerate() {
            if id > 0 {
                out.push(',');
            }
            let _ = write!(
                out,
                "{{\"id\":{id},\"running\":{},\"exits\":{{",
                vcpu.is_running()
            );
            for (name, count) in vcpu.by_reason() {
                let _ = write!(out, "\"{name}\":{count},");
            }
            // Exits proper; `interrupted` counts the VMM's own kicks.
            let _ = write!(out, "\"total\":{}}}}}", vcpu.total());
        }
        let _ = write!(
            out,
            "],\"devices\":{{\"serial\":{{\"bytes_out\":{}}}",
            sources.console.bytes_out.load(Ordering::Relaxed)
        );
        for (name, device) in &sources.devices {
            let _ = write!(out, ",{}:{{", json_string(name));
            for (i, (counter, value)) in device.snapshot().iter().enumerate() {
                let comma = if i > 0 { "," } else { "" };
                let _ = write!(out, "{comma}\"{counter}\":{value}");
            }
            out.push('}');
        }
        out.push('}');
        if !emulated.is_empty() {
            out.push_str(",\"emulated\":[");
            for (i, (id, counts)) in emulated.iter().enumerate() {
                let comma = if i > 0 { "," } else { "" };
                let _ = write!(out, "{comma}{{\"vcpu\":{id},\"instructions\":{{");
                for (j, (name, count)) in counts.iter().enumerate() {
                    let comma = if j > 0 { "," } else { "" };
                    let _ = write!(out, "{comma}{}:{count}", json_string(name));
                }
                out.push_str("}}");
            }
            out.push(']');
        }
        out.push('}');
        out
    }

    /// Writes one line now.
    pub fn flush(&self) -> io::Result<()> {
        self.write_line(&self.line(&[]))
    }

    /// Writes the last line, with the fallback's instruction counts.
    pub fn flush_final(&self, emulated: &[(usize, Vec<(String, u64)>)]) -> io::Result<()> {
        self.write_line(&self.line(emulated))
    }

    fn write_line(&self, line: &str) -> io::Result<()> {
        let mut file = self.inner.file.lock().unwrap_or_else(|e| e.into_inner());
        file.write_all(format!("{line}\n").as_bytes())?;
        file.flush()
    }
}

/// Quotes `text` as a JSON string.
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Writes a line every `interval` until dropped.
pub struct Flusher {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    /// Starts the thread that writes a line every `interval`; `thread_start` runs first on it
    /// (the VMM confines the thread there) and ends it on an error.
    pub fn start(
        metrics: Metrics,
        interval: Duration,
        thread_start: crate::ThreadStart,
    ) -> io::Result<Flusher> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                if let Err(e) = thread_start() {
                    log::error!("metrics thread: {e}");
                    return;
                }
                let (lock, cvar) = &*thread_stop;
                let mut stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
                // A stop that came before this thread first waited is seen here, not missed.
                while !*stopped {
                    let (guard, timeout) = cvar
                        .wait_timeout(stopped, interval)
                        .unwrap_or_else(|e| e.into_inner());
                    stopped = guard;
                    if timeout.timed_out() && !*stopped {
                        if let Err(e) = metrics.flush() {
                            log::warn!("cannot write metrics: {e}");
                        }
                    }
                }
            })?;
        Ok(Flusher {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        let (lock, cvar) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cvar.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flusher_stopped_at_once_does_not_wait_for_its_interval() {
        let path = std::env::temp_dir().join(format!("vmm-flusher-{}", std::process::id()));
        let metrics = Metrics::new(
            open_file(&path).unwrap(),
            Sources {
                started: Instant::now(),
                vcpus: Vec::new(),
                devices: Vec::new(),
                console: Arc::new(ConsoleStats::new(Instant::now())),
            },
        );
        let start = Instant::now();
        for _ in 0..20 {
            drop(
                Flusher::start(
                    metrics.clone(),
                    Duration::from_secs(60),
                    Box::new(|| Ok(())),
                )
                .unwrap(),
            );
        }
        assert!(start.elapsed() < Duration::from_secs(5));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_line_holds_every_counter() {
        let path = std::env::temp_dir().join(format!("vmm-metrics-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let device = Arc::new(DeviceMetrics::default());
        DeviceMetrics::add(&device.requests, 3);
        let metrics = Metrics::new(
            open_file(&path).unwrap(),
            Sources {
                started: Instant::now(),
                vcpus: vec![Arc::new(VcpuMetrics::default())],
                devices: vec![("virtio-blk0".into(), device)],
                console: Arc::new(ConsoleStats::new(Instant::now())),
            },
        );
        metrics.flush().unwrap();
        metrics
            .flush_final(&[(0, vec![("mov \"x\"".into(), 7)])])
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("{\"uptime_ms\":"), "{}", lines[0]);
        assert!(lines[0].contains(
            "\"virtio-blk0\":{\"requests\":3,\"bytes\":0,\"errors\":0,\"interrupts\":0}"
        ));
        assert!(lines[0].contains("\"exits\":{\"io_in\":0,"));
        assert!(lines[0].contains("\"interrupted\":0,\"total\":0}"));
        assert!(
            lines[1].contains("\"emulated\":[{\"vcpu\":0,\"instructions\":{\"mov \\\"x\\\"\":7}}]")
        );
        assert!(!lines[0].contains("emulated"));
    }
}
