//! The control-API case: how long from `PUT /actions {"action_type":"InstanceStart"}` on the API
//! socket to the guest's first console line, driven exactly as Firecracker's getting-started guide
//! drives a VMM (configure the boot source and the machine, then start), so that the same driver
//! times Firecracker where `--firecracker PATH` names one.
//!
//! Each run starts the VMM with `--api-sock`, waits for the socket, configures the tiny PVH guest
//! (128 MiB, 1 vCPU), and times from just before the InstanceStart request is written to the
//! request's answer (204) and to the guest's marker on the VMM's stdout. The VMM ends when the
//! guest resets.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::bench::{Cell, Row};
use integration_tests::TINY_PVH_MARKER;

use super::{collect, ms, RUN_TIMEOUT};

/// What the API case needs.
pub struct ApiOptions {
    pub vmm: PathBuf,
    pub firecracker: Option<PathBuf>,
    pub runs: usize,
}

/// One side's samples.
#[derive(Default)]
struct ApiSamples {
    to_answer: Vec<f64>,
    to_marker: Vec<f64>,
    failure: Option<String>,
}

impl ApiSamples {
    fn add(&mut self, run: Result<(Duration, Duration), String>) {
        match run {
            Ok((answer, marker)) => {
                self.to_answer.push(ms(answer));
                self.to_marker.push(ms(marker));
            }
            Err(why) => {
                self.failure.get_or_insert(why);
            }
        }
    }

    fn cell(&self, samples: &[f64]) -> Cell {
        match (&self.failure, samples.is_empty()) {
            (Some(why), true) => Cell::Failed(why.clone()),
            _ => Cell::from_samples(samples, "no runs"),
        }
    }
}

/// Sends one HTTP/1.1 request on a fresh connection and returns the status code.
fn request(socket: &Path, method: &str, path: &str, body: &str) -> Result<u16, String> {
    let mut stream =
        UnixStream::connect(socket).map_err(|e| format!("connect {}: {e}", socket.display()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let text = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(text.as_bytes())
        .map_err(|e| format!("{method} {path}: {e}"))?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 512];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("{method} {path}: no answer: {e}")),
        }
    }
    let status = String::from_utf8_lossy(&answer);
    status
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("{method} {path}: not an HTTP answer: {status:?}"))
}

/// Waits until the API socket accepts connections.
fn wait_for_socket(socket: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if UnixStream::connect(socket).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Err(format!("no API socket at {} after 10 s", socket.display()))
}

/// One run: returns (InstanceStart -> 204, InstanceStart -> marker).
fn run_once(
    mut command: Command,
    socket: &Path,
    guest: &Path,
) -> Result<(Duration, Duration), String> {
    let _ = std::fs::remove_file(socket);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawned = Instant::now();
    let mut child = command.spawn().map_err(|e| format!("cannot run it: {e}"))?;
    let stdout = collect(
        child.stdout.take().expect("piped"),
        spawned,
        Some(TINY_PVH_MARKER.to_string()),
        None,
    );
    let stderr = collect(child.stderr.take().expect("piped"), spawned, None, None);
    let driven = (|| {
        wait_for_socket(socket)?;
        let boot_source = format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}}"#,
            guest.display()
        );
        for (path, body) in [
            ("/boot-source", boot_source.as_str()),
            (
                "/machine-config",
                r#"{"vcpu_count": 1, "mem_size_mib": 128}"#,
            ),
        ] {
            match request(socket, "PUT", path, body)? {
                204 => {}
                code => return Err(format!("PUT {path}: status {code}")),
            }
        }
        let started = spawned.elapsed();
        let code = request(
            socket,
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#,
        )?;
        let answered = spawned.elapsed();
        if code != 204 {
            return Err(format!("InstanceStart: status {code}"));
        }
        Ok((started, answered))
    })();
    // The guest resets after its marker; a VMM that does not end is killed.
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline && driven.is_ok() => {
                std::thread::sleep(Duration::from_millis(5))
            }
            _ => {
                let _ = child.kill();
                break child.wait().ok();
            }
        }
    };
    let (_, marker) = stdout.join().unwrap_or_default();
    let (stderr_text, _) = stderr.join().unwrap_or_default();
    let (started, answered) = driven?;
    let marker = marker.ok_or_else(|| {
        format!(
            "no marker on stdout ({status:?}): {}",
            stderr_text.lines().last().unwrap_or("")
        )
    })?;
    Ok((answered - started, marker.saturating_sub(started)))
}

/// The API rows: ours, and Firecracker's where a binary is given.
pub fn api_rows(
    options: &ApiOptions,
    dir: &Path,
    guest: &Path,
    progress: &dyn Fn(&str, usize, usize),
) -> Vec<Row> {
    let socket = dir.join("api.sock");
    let mut ours = ApiSamples::default();
    let mut firecracker = ApiSamples::default();
    for round in 0..=options.runs {
        let warmup = round == 0;
        progress("API: InstanceStart", round, options.runs);
        let mut command = Command::new(&options.vmm);
        command
            .arg("--api-sock")
            .arg(&socket)
            .env_remove("RUST_LOG");
        let run = run_once(command, &socket, guest);
        if !warmup {
            ours.add(run);
        }
        if let Some(fc) = &options.firecracker {
            let mut command = Command::new(fc);
            command.arg("--api-sock").arg(&socket);
            let run = run_once(command, &socket, guest);
            if !warmup {
                firecracker.add(run);
            }
        }
    }
    let _ = std::fs::remove_file(&socket);
    let other = |samples: &ApiSamples, which: fn(&ApiSamples) -> &[f64]| match &options.firecracker
    {
        Some(_) => samples.cell(which(samples)),
        None => Cell::NotMeasured("no Firecracker (--firecracker)".into()),
    };
    vec![
        Row {
            case: "API: InstanceStart -> 204".into(),
            unit: "ms".into(),
            ours: ours.cell(&ours.to_answer),
            other: other(&firecracker, |s| &s.to_answer),
        },
        Row {
            case: "API: InstanceStart -> first console line".into(),
            unit: "ms".into(),
            ours: ours.cell(&ours.to_marker),
            other: other(&firecracker, |s| &s.to_marker),
        },
    ]
}
