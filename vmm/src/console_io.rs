//! Where the guest's serial console goes (`--serial`): this terminal, a file, a Unix socket, a
//! pseudo-terminal, or nowhere.
//!
//! The UART writes through a [`ConsoleOutput`]; the console loop ([`crate::console`]) reads the
//! guest's input from the descriptor of the same place ([`ConsoleInput`]), raw, without a
//! buffered reader, so that epoll and the bytes available agree. Output never blocks a vCPU: a
//! socket client or a pty nobody reads loses bytes rather than stalling the guest.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// `--serial`: where the console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialMode {
    /// This process's stdin and stdout (the default).
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// A Unix socket the VMM listens on; one client at a time gets output and gives input.
    Socket(PathBuf),
    /// A new pseudo-terminal, whose path the VMM prints.
    Pty,
    /// Nothing: output is dropped, there is no input.
    Off,
}

/// Parses `stdio`, `file=PATH`, `socket=PATH`, `pty` or `off`.
pub fn parse_serial(text: &str) -> Result<SerialMode, String> {
    match text.split_once('=') {
        None => match text {
            "stdio" => Ok(SerialMode::Stdio),
            "pty" => Ok(SerialMode::Pty),
            "off" => Ok(SerialMode::Off),
            _ => Err(format!(
                "{text:?} is not a console: expected stdio, file=PATH, socket=PATH, pty or off"
            )),
        },
        Some((kind, path)) if !path.is_empty() => match kind {
            "file" => Ok(SerialMode::File(path.into())),
            "socket" => Ok(SerialMode::Socket(path.into())),
            _ => Err(format!(
                "{kind:?} is not a console kind: expected file=PATH or socket=PATH"
            )),
        },
        Some((kind, _)) => Err(format!("{kind}= needs a path")),
    }
}

/// Errors in setting up the console.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the console file {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} exists and is not a socket; refusing to replace it with the console socket")]
    NotASocket(PathBuf),
    #[error("cannot listen on the console socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create a pseudo-terminal for the console: {0}")]
    Pty(#[source] io::Error),
}

impl Error {
    /// Whether the user's `--serial` is to blame (exit status 2).
    pub fn is_user_input(&self) -> bool {
        !matches!(self, Error::Pty(_))
    }
}

/// What the guest wrote to its console, for the status line and the metrics.
#[derive(Debug)]
pub struct ConsoleStats {
    started: Instant,
    /// Bytes the guest wrote.
    pub bytes_out: AtomicU64,
    /// When the guest last wrote, in milliseconds since `started` (0: never).
    last_output_ms: AtomicU64,
    /// The guest's last write to our stdout did not end a line: a shell's prompt waiting for
    /// input, which the status line would draw over.
    mid_line: AtomicBool,
}

impl ConsoleStats {
    pub fn new(started: Instant) -> Self {
        Self {
            started,
            bytes_out: AtomicU64::new(0),
            last_output_ms: AtomicU64::new(0),
            mid_line: AtomicBool::new(false),
        }
    }

    /// Whether the guest's console output on our stdout stopped in the middle of a line.
    pub fn mid_line(&self) -> bool {
        self.mid_line.load(Ordering::Relaxed)
    }

    /// Notes where the guest's output on our stdout stopped: at the start of a line or not.
    fn wrote_to_terminal(&self, buf: &[u8]) {
        if let Some(&last) = buf.last() {
            self.mid_line.store(last != b'\n', Ordering::Relaxed);
        }
    }

    /// How long ago the guest last wrote (since the start when it never did).
    pub fn quiet_for(&self) -> std::time::Duration {
        let now = self.started.elapsed();
        let last = std::time::Duration::from_millis(self.last_output_ms.load(Ordering::Relaxed));
        now.saturating_sub(last)
    }

    fn wrote(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_output_ms.store(ms.max(1), Ordering::Relaxed);
    }
}

/// The socket client shared by the output (writes) and the console loop (reads, accepts).
pub type SharedClient = Arc<Mutex<Option<UnixStream>>>;

enum Target {
    Stdout,
    File(File),
    Socket(SharedClient),
    Pty(File),
    Off,
}

/// The UART's output: writes to the chosen place and counts what the guest wrote.
pub struct ConsoleOutput {
    target: Target,
    stats: Arc<ConsoleStats>,
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stats.wrote(buf.len());
        match &mut self.target {
            Target::Stdout => {
                // The status line shares the terminal: it goes before the guest speaks.
                crate::status::erase();
                self.stats.wrote_to_terminal(buf);
                let mut out = io::stdout().lock();
                out.write_all(buf)?;
                out.flush()?;
            }
            Target::File(file) => file.write_all(buf)?,
            // A reader that is gone or slow loses output; the guest never waits for it.
            Target::Socket(client) => {
                if let Some(stream) = client.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                    let _ = stream.write(buf);
                }
            }
            Target::Pty(master) => {
                let _ = master.write(buf);
            }
            Target::Off => {}
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where the console loop reads the guest's input from.
pub enum ConsoleInput {
    /// Our stdin.
    Stdin,
    /// A descriptor we own (a pty's master side).
    Owned(OwnedFd),
    /// A listening socket; its accepted client is in `client`.
    Listener {
        listener: SocketListener,
        client: SharedClient,
    },
    /// No input.
    None,
}

/// A listening console socket, removed from the file system when dropped.
pub struct SocketListener {
    pub listener: UnixListener,
    path: PathBuf,
}

impl Drop for SocketListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl ConsoleInput {
    /// The descriptor epoll watches first: stdin, the pty, or the listening socket.
    pub fn fd(&self) -> Option<RawFd> {
        match self {
            ConsoleInput::Stdin => Some(libc::STDIN_FILENO),
            ConsoleInput::Owned(fd) => Some(fd.as_raw_fd()),
            ConsoleInput::Listener { listener, .. } => Some(listener.listener.as_raw_fd()),
            ConsoleInput::None => None,
        }
    }
}

/// The console's two ends, and the pty's other side kept open so that the master never sees a
/// hang-up while nobody has it open.
pub struct ConsoleBackend {
    pub output: ConsoleOutput,
    pub input: ConsoleInput,
    pub stats: Arc<ConsoleStats>,
    /// Whether the console is this terminal (raw mode and Ctrl-A apply).
    pub stdio: bool,
    /// A description for the start-up line.
    pub description: String,
    /// The pty's slave side, to keep open for as long as the console lives.
    pub pty_peer: Option<File>,
}

/// Opens the console `mode` describes.
pub fn open(mode: &SerialMode, started: Instant) -> Result<ConsoleBackend, Error> {
    let stats = Arc::new(ConsoleStats::new(started));
    let (target, input, description, peer) = match mode {
        SerialMode::Stdio => (
            Target::Stdout,
            ConsoleInput::Stdin,
            "stdio".to_string(),
            None,
        ),
        SerialMode::Off => (Target::Off, ConsoleInput::None, "off".to_string(), None),
        SerialMode::File(path) => {
            let file = open_console_file(path)?;
            (
                Target::File(file),
                ConsoleInput::None,
                format!("file {}", path.display()),
                None,
            )
        }
        SerialMode::Socket(path) => {
            let listener = listen(path)?;
            let client: SharedClient = Arc::new(Mutex::new(None));
            (
                Target::Socket(client.clone()),
                ConsoleInput::Listener { listener, client },
                format!("socket {}", path.display()),
                None,
            )
        }
        SerialMode::Pty => {
            let (master, slave, path) = open_pty().map_err(Error::Pty)?;
            let output = master.try_clone().map_err(Error::Pty)?;
            // Said outside the log too: without it the console cannot be found.
            eprintln!("vmm: the guest's console is on {path}");
            log::info!("serial console on the pseudo-terminal {path}");
            (
                Target::Pty(output),
                ConsoleInput::Owned(OwnedFd::from(master)),
                format!("pty {path}"),
                Some(slave),
            )
        }
    };
    Ok(ConsoleBackend {
        output: ConsoleOutput {
            target,
            stats: stats.clone(),
        },
        input,
        stats,
        stdio: matches!(mode, SerialMode::Stdio),
        description,
        pty_peer: peer,
    })
}

/// Opens (creating or appending to) a regular file for the console; never blocks on a FIFO.
fn open_console_file(path: &Path) -> Result<File, Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| Error::File {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.is_dir() {
            return Err(err(io::Error::from_raw_os_error(libc::EISDIR)));
        }
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(err)
}

/// Listens on `path`, replacing a stale socket left by an earlier run (never any other file).
fn listen(path: &Path) -> Result<SocketListener, Error> {
    let err = |source| Error::Socket {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(err(io::Error::from_raw_os_error(libc::EADDRINUSE)));
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        Ok(_) => return Err(Error::NotASocket(path.to_path_buf())),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    Ok(SocketListener {
        listener,
        path: path.to_path_buf(),
    })
}

/// Opens a pseudo-terminal in raw mode: its master (non-blocking), its slave, and the slave's path.
fn open_pty() -> io::Result<(File, File, String)> {
    // SAFETY: posix_openpt has no memory effects; the result is checked.
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK) };
    if master < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let master = unsafe { File::from_raw_fd(master) };
    // SAFETY: grantpt and unlockpt act on our own valid master descriptor.
    if unsafe { libc::grantpt(master.as_raw_fd()) } != 0
        || unsafe { libc::unlockpt(master.as_raw_fd()) } != 0
    {
        return Err(io::Error::last_os_error());
    }
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: the buffer and its length are valid; ptsname_r writes a NUL-terminated name.
    let ret = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    use std::os::unix::fs::OpenOptionsExt;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&path)?;
    // SAFETY: termios is plain data filled by tcgetattr, whose result is checked.
    let mut tio: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and valid pointers to a termios.
    unsafe {
        if libc::tcgetattr(slave.as_raw_fd(), &mut tio) != 0 {
            return Err(io::Error::last_os_error());
        }
        libc::cfmakeraw(&mut tio);
        if libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &tio) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((master, slave, path))
}

/// Reads what is available on `fd` into `buf` (one `read`, no buffering). `Ok(0)` is the end.
pub fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: reading at most `buf.len()` bytes into a valid buffer.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The status line stays off a shell's prompt: output that stops mid-line (the prompt, and
    /// the cursor query busybox's shell sends after it) marks the terminal, a finished line or
    /// a kernel's "\r\n" clears the mark.
    #[test]
    fn output_that_stops_mid_line_is_noted() {
        let stats = ConsoleStats::new(Instant::now());
        assert!(!stats.mid_line(), "nothing written yet");
        stats.wrote_to_terminal(b"[    0.000000] Linux version 6.1.0\r\n");
        assert!(!stats.mid_line());
        stats.wrote_to_terminal(b"~ # ");
        stats.wrote_to_terminal(b"\x1b[6n");
        assert!(stats.mid_line());
        stats.wrote_to_terminal(b"");
        assert!(stats.mid_line(), "an empty write changes nothing");
        stats.wrote_to_terminal(b"ls\r\n");
        assert!(!stats.mid_line());
    }

    #[test]
    fn serial_modes_parse() {
        assert_eq!(parse_serial("stdio"), Ok(SerialMode::Stdio));
        assert_eq!(parse_serial("off"), Ok(SerialMode::Off));
        assert_eq!(parse_serial("pty"), Ok(SerialMode::Pty));
        assert_eq!(
            parse_serial("file=/tmp/c.log"),
            Ok(SerialMode::File("/tmp/c.log".into()))
        );
        assert_eq!(
            parse_serial("socket=/tmp/c.sock"),
            Ok(SerialMode::Socket("/tmp/c.sock".into()))
        );
        for bad in ["", "tty", "file=", "socket", "tcp=1.2.3.4:5"] {
            assert!(parse_serial(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_pty_carries_bytes_both_ways() {
        let (master, slave, path) = open_pty().unwrap();
        assert!(path.starts_with("/dev/pts/"), "{path}");
        (&slave).write_all(b"to guest").unwrap();
        let mut buf = [0u8; 64];
        let mut got = Vec::new();
        for _ in 0..100 {
            match read_fd(master.as_raw_fd(), &mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            if got.len() >= 8 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(got, b"to guest");
    }

    #[test]
    fn a_console_socket_refuses_to_replace_a_file() {
        let dir = std::env::temp_dir().join(format!("vmm-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("precious");
        std::fs::write(&file, b"keep").unwrap();
        assert!(matches!(listen(&file), Err(Error::NotASocket(_))));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
        let sock = dir.join("console.sock");
        let listener = listen(&sock).unwrap();
        // A live socket is not taken over.
        assert!(listen(&sock).is_err());
        drop(listener);
        assert!(!sock.exists(), "the socket is removed at exit");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
