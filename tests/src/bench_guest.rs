//! The bench guest (`tests/bench-guest/`): a PVH ELF whose ring-3 polling driver measures the
//! virtio-blk and virtio-net data paths and prints one `bench: ...` line per figure on COM1.
//! Built from source with the machine's gcc (no binary is committed); the test command runs it
//! once against our VMM and `vmm-bench` runs it against ours and QEMU.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// The flags the guest is built with: freestanding, no red zone (nothing may clobber the stack
/// below RSP) and no SSE (ring 3 has no FPU state set up by the stub).
pub const CFLAGS: &[&str] = &[
    "-ffreestanding",
    "-nostdlib",
    "-static",
    "-fno-pic",
    "-no-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wl,--build-id=none",
    "-Wl,--no-warn-rwx-segments",
];

/// The guest's source directory in the workspace.
pub fn source_dir() -> PathBuf {
    crate::workspace_root().join("tests/bench-guest")
}

/// Compiles the guest into `out_dir` with `$CC` (default `gcc`) and returns the ELF's path, or
/// gcc's complaint.
pub fn build(out_dir: &Path) -> Result<PathBuf, String> {
    let src = source_dir();
    let out = out_dir.join("bench-guest.elf");
    let cc = std::env::var("CC").unwrap_or_else(|_| "gcc".into());
    let output = Command::new(&cc)
        .args(CFLAGS)
        .arg(format!("-Wl,-T,{}", src.join("link.ld").display()))
        .arg(src.join("entry.S"))
        // attack.c and net.c are #included by bench.c: they share the driver's statics.
        .arg(src.join("bench.c"))
        .arg("-o")
        .arg(&out)
        .output()
        .map_err(|e| format!("cannot run {cc}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{cc} failed to build the bench guest ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(out)
}

/// The word the guest expects at u64 index `word` (0..64) of 512-byte `sector` of the image
/// (`PATTERN` in bench.c).
pub fn pattern_word(sector: u64, word: u64) -> u64 {
    ((sector << 8) | word) ^ 0x5a5a_5a5a_0000_0000
}

/// Writes a disk image of `sectors` 512-byte sectors filled with [`pattern_word`].
pub fn write_pattern_image(path: &Path, sectors: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut sector_bytes = [0u8; 512];
    for sector in 0..sectors {
        for (word, chunk) in sector_bytes.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&pattern_word(sector, word as u64).to_le_bytes());
        }
        file.write_all(&sector_bytes)?;
    }
    file.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// A fresh directory `vmm-NAME-PID` in the temporary directory with the bench guest built into
/// it: (directory, guest ELF). Panics with the compiler's complaint.
pub fn build_in_temp(name: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("vmm-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let elf = build(&dir).unwrap_or_else(|e| panic!("{e}"));
    (dir, elf)
}

/// Waits for the guest's `done` line (within `timeout`) and the VMM's exit, and checks that the
/// guest stopped on no error of its own and the VMM exited 0. Returns the console.
pub fn expect_clean_finish(guest: &mut crate::Guest, done: &str, timeout: Duration) -> String {
    guest.wait_for(done, timeout);
    let status = guest.wait_exit(Duration::from_secs(30));
    let console = guest.console();
    assert!(
        crate::bench::guest_error(&console).is_none() && status.success(),
        "status {status}{}",
        guest.transcript()
    );
    console
}

/// The guest's command line: the tests to run and the seconds each takes.
pub fn cmdline(tests: &str, secs: f64) -> String {
    format!("bench.blk={tests} bench.secs={secs:.3}")
}

/// The guest's command line for the network tests (`tx64,rx1500`, ...; see `net.c`).
pub fn net_cmdline(tests: &str, secs: f64) -> String {
    format!("bench.net={tests} bench.secs={secs:.3}")
}

/// The host's address on the bench's tap: the guest sends its frames to it, port [`NET_PORT`].
pub const NET_HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 1);
/// Where the host's frames for the guest go: the tap's broadcast address, port [`NET_PORT`].
pub const NET_BROADCAST: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 255);
/// The UDP port of the guest's frames and of the host's.
pub const NET_PORT: u16 = 5009;
/// The host's sender uses this many source ports (from `NET_PORT + 1`), one flow each, so that a
/// multi-queue tap spreads its frames over the guest's receive queues.
pub const NET_SENDER_FLOWS: u16 = 16;
/// The largest frame the host sends: a UDP datagram in an IP packet of a tap's largest MTU
/// (`netns::TAP_MAX_MTU`) behind its Ethernet header, as a Linux guest receives TCP with GSO.
pub const MAX_FRAME: usize = 65_535;
/// Ethernet, IPv4 and UDP headers: a frame of N bytes carries N - 42 bytes of UDP payload.
const FRAME_OVERHEAD: usize = 42;

/// The frame size of a network test's line (`start net rx64`, `net rx64 fps=...`) when it is a
/// receive test (`rxN`, or `holdN`, whose guest withholds its buffers for a while), for the
/// host's sender.
pub fn rx_frame_size(line_name: &str) -> Option<usize> {
    let test = line_name
        .strip_prefix("start net ")
        .or_else(|| line_name.strip_prefix("net "))?;
    test.strip_prefix("rx")
        .or_else(|| test.strip_prefix("hold"))?
        .parse()
        .ok()
}

/// The host's side of the network tests, on the tap's address in the bench's namespace: a sink
/// that takes the guest's frames (so that the host's stack answers none of them) and counts those
/// carrying the guest's payload, and a sender that floods the tap's broadcast address with
/// frames of the size [`NetPeer::send`] sets while a receive test runs, from
/// [`NET_SENDER_FLOWS`] ports in turn.
pub struct NetPeer {
    frame_size: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl NetPeer {
    /// Binds the sink and the sender; `bind` makes a UDP socket on the address given, inside the
    /// namespace of the tap (see `NetNs::inside`).
    pub fn new(bind: impl Fn(SocketAddrV4) -> std::io::Result<UdpSocket>) -> std::io::Result<Self> {
        let sink = bind(SocketAddrV4::new(NET_HOST_IP, NET_PORT))?;
        let senders = (1..=NET_SENDER_FLOWS)
            .map(|i| {
                let socket = bind(SocketAddrV4::new(NET_HOST_IP, NET_PORT + i))?;
                socket.set_broadcast(true)?;
                Ok(socket)
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        sink.set_read_timeout(Some(Duration::from_millis(50)))?;
        let frame_size = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let sent = Arc::new(AtomicU64::new(0));
        let sink_thread = {
            let (stop, received) = (stop.clone(), received.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = sink.recv(&mut buf) {
                        if n >= 8 && &buf[..8] == b"vmmbench" {
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        };
        let sender_thread = {
            let (stop, size, sent) = (stop.clone(), frame_size.clone(), sent.clone());
            thread::spawn(move || {
                let payload = vec![0x5au8; MAX_FRAME - FRAME_OVERHEAD];
                let to = SocketAddrV4::new(NET_BROADCAST, NET_PORT);
                while !stop.load(Ordering::Relaxed) {
                    let frame = size.load(Ordering::Relaxed);
                    if frame < FRAME_OVERHEAD {
                        thread::sleep(Duration::from_micros(200));
                        continue;
                    }
                    // A full tap queue drops (ENOBUFS is not reported for UDP); an error is
                    // the namespace going away at the end.
                    for sender in senders.iter().cycle().take(64) {
                        if sender
                            .send_to(&payload[..frame - FRAME_OVERHEAD], to)
                            .is_ok()
                        {
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        };
        Ok(NetPeer {
            frame_size,
            stop,
            received,
            sent,
            threads: vec![sink_thread, sender_thread],
        })
    }

    /// Sends `frame_size`-byte frames (at least 60, at most [`MAX_FRAME`]; over 1,514 the tap's
    /// MTU must allow them, see `NetNs::set_mtu`) until told 0.
    pub fn send(&self, frame_size: usize) {
        let size = if frame_size == 0 {
            0
        } else {
            frame_size.clamp(60, MAX_FRAME)
        };
        self.frame_size.store(size, Ordering::Relaxed);
    }

    /// Follows the guest's lines: sends while a receive test runs (from its `start net rxN` line
    /// to its result line).
    pub fn follow(&self, line_name: &str) {
        match rx_frame_size(line_name) {
            Some(size) if line_name.starts_with("start ") => self.send(size),
            Some(_) => self.send(0),
            None => {}
        }
    }

    /// The guest's frames the sink took so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// The frames the sender handed to the host's stack so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

impl Drop for NetPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_names_sector_and_word() {
        assert_eq!(pattern_word(0, 0), 0x5a5a_5a5a_0000_0000);
        assert_eq!(pattern_word(1, 2), 0x5a5a_5a5a_0000_0102);
        assert_ne!(pattern_word(7, 3), pattern_word(3, 7));
    }

    #[test]
    fn cmdline_has_both_parameters() {
        assert_eq!(
            cmdline("qd1,flush", 0.5),
            "bench.blk=qd1,flush bench.secs=0.500"
        );
        assert_eq!(
            net_cmdline("tx64,rx1500", 2.0),
            "bench.net=tx64,rx1500 bench.secs=2.000"
        );
    }

    #[test]
    fn receive_tests_name_their_frame_size() {
        assert_eq!(rx_frame_size("start net rx64"), Some(64));
        assert_eq!(rx_frame_size("net rx1500"), Some(1500));
        assert_eq!(rx_frame_size("start net rx65535"), Some(65535));
        assert_eq!(rx_frame_size("start net hold64"), Some(64));
        assert_eq!(rx_frame_size("net hold64 starved"), None);
        assert_eq!(rx_frame_size("start net tx64"), None);
        assert_eq!(rx_frame_size("net device"), None);
        assert_eq!(rx_frame_size("start blk qd1"), None);
    }
}
