//! The VMM's main loop: the guest console's input, and the events that end the VM.
//!
//! The main thread waits (epoll) on the console's input (stdin, a pty, or a console socket and
//! its one client, see [`crate::console_io`]), the i8042 reset line, the vCPUs' exit event and a
//! signalfd for SIGINT/SIGTERM/SIGHUP, so that every way a VM can end goes through one place and
//! the terminal is restored. SIGUSR1 asks every vCPU to log its registers, to see where a guest
//! that prints nothing is spending its time. On a terminal, Ctrl-A then `x` quits, as in QEMU; Ctrl-A twice sends a
//! Ctrl-A to the guest.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use legacy::Uart8250;

use crate::console_io::{read_fd, ConsoleInput};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

const INPUT: u64 = 0;
const RESET: u64 = 1;
const VCPU_EXIT: u64 = 2;
const SIGNAL: u64 = 3;
const POWER_OFF: u64 = 4;
/// A client knocking on the console socket.
const LISTENER: u64 = 5;

/// Ctrl-A, the console escape key.
const ESCAPE: u8 = 0x01;

/// Errors of the console loop.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot watch the console and VM events: {0}")]
    Epoll(#[source] std::io::Error),
    #[error("cannot set up signal handling: {0}")]
    Signal(#[source] std::io::Error),
}

/// Why the console loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    GuestReset,
    VcpuExited,
    Signal(u32),
    UserQuit,
    /// The guest entered ACPI S5 (soft-off).
    GuestPowerOff,
    /// The deadline of [`Console::set_deadline`] passed (the guest did not power off in time).
    ShutdownTimedOut,
    /// Not an end: the user asked for a register dump (SIGUSR1).
    DumpRequested,
    /// Not an end: the period of [`Console::set_tick`] passed.
    Tick,
    /// Every vCPU halted with interrupts disabled (`cli; hlt`): the guest stopped itself.
    GuestHalted,
    /// The thread serving the virtio devices ended: the VM cannot go on.
    DeviceWorkerDied,
    /// An API thread asked for the VMM to stop ([`crate::VmControl::fail`]).
    ApiFailed,
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndReason::GuestReset => write!(f, "the guest reset the machine"),
            EndReason::VcpuExited => write!(f, "a vCPU stopped"),
            EndReason::Signal(n) => write!(f, "the VMM received signal {n}"),
            EndReason::UserQuit => write!(f, "the user pressed Ctrl-A x"),
            EndReason::GuestPowerOff => write!(f, "the guest powered off"),
            EndReason::ShutdownTimedOut => write!(f, "the guest did not power off in time"),
            EndReason::DumpRequested => write!(f, "a register dump was asked for"),
            EndReason::Tick => write!(f, "a periodic check"),
            EndReason::DeviceWorkerDied => write!(f, "the virtio device thread ended"),
            EndReason::ApiFailed => write!(f, "an API thread failed"),
            EndReason::GuestHalted => write!(
                f,
                "every vCPU halted with interrupts disabled (the guest stopped itself)"
            ),
        }
    }
}

/// The signals that end the VMM, which only the main loop handles.
fn termination_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a sigset_t; valid signal numbers.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::sigaddset(&mut set, libc::SIGQUIT);
    }
    set
}

/// Blocks the termination signals in the calling thread, for threads started before the console
/// (the API thread), so that a signal reaches the main loop instead of killing the process.
pub fn block_termination_signals_here() -> std::io::Result<()> {
    let set = termination_signals();
    // SAFETY: a valid set; the old mask is not wanted.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(std::io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

/// Takes a pending termination signal, if one arrived while blocked (before the console exists:
/// the API waiting for `InstanceStart`).
pub fn take_pending_termination_signal() -> Option<u32> {
    let set = termination_signals();
    let now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid set and timespec; the siginfo is not wanted. A zero timeout only polls.
    let signal = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &now) };
    u32::try_from(signal).ok().filter(|&s| s > 0)
}

/// Blocks the signals that end the VMM and returns a signalfd that reports them. Threads spawned
/// afterwards (the vCPUs) inherit the mask, so the main loop alone sees these signals.
fn block_termination_signals() -> Result<OwnedFd, Error> {
    block_termination_signals_here().map_err(Error::Signal)?;
    let set = termination_signals();
    // SAFETY: a valid set; -1 asks for a new descriptor, which we own on success.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(Error::Signal(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The console and VM-event loop.
pub struct Console {
    epoll: Epoll,
    serial: Arc<Mutex<Uart8250>>,
    signals: OwnedFd,
    input: ConsoleInput,
    /// The descriptor input comes from now: stdin, the pty, or the socket's client.
    input_fd: Option<RawFd>,
    /// Whether `input_fd` is in the epoll set (it leaves it while `pending` waits for FIFO room).
    input_watched: bool,
    /// Bytes read that the UART's FIFO could not take yet.
    pending: Vec<u8>,
    escape: bool,
    is_tty: bool,
    /// When [`Console::serve`] gives up waiting, if ever.
    deadline: Option<std::time::Instant>,
    /// How often [`Console::serve`] returns [`EndReason::Tick`], and when it next does.
    tick: Option<(std::time::Duration, std::time::Instant)>,
}

impl Console {
    /// `stdio` says whether the input is this terminal (Ctrl-A x quits there).
    pub fn new(
        serial: Arc<Mutex<Uart8250>>,
        input: ConsoleInput,
        stdio: bool,
        reset_evt: &EventFd,
        exit_evt: &EventFd,
    ) -> Result<Self, Error> {
        let signals = block_termination_signals()?;
        let epoll = Epoll::new().map_err(Error::Epoll)?;
        let add = |fd: RawFd, token: u64| {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(Error::Epoll)
        };
        add(reset_evt.as_raw_fd(), RESET)?;
        add(exit_evt.as_raw_fd(), VCPU_EXIT)?;
        add(signals.as_raw_fd(), SIGNAL)?;
        let mut input_fd = None;
        match &input {
            ConsoleInput::Listener { listener, .. } => {
                add(listener.listener.as_raw_fd(), LISTENER)?;
            }
            // stdin may be /dev/null or a regular file, which epoll refuses: the guest then gets
            // no input.
            other => {
                input_fd = other.fd().filter(|fd| add(*fd, INPUT).is_ok());
            }
        }
        // SAFETY: isatty only inspects the descriptor.
        let is_tty = stdio && unsafe { libc::isatty(libc::STDIN_FILENO) } == 1;
        Ok(Console {
            epoll,
            serial,
            signals,
            input,
            input_watched: input_fd.is_some(),
            input_fd,
            pending: Vec::new(),
            escape: false,
            is_tty,
            deadline: None,
            tick: None,
        })
    }

    /// Also ends [`Console::serve`] when `evt` (the ACPI power-off event) is signalled.
    pub fn watch_power_off(&mut self, evt: &EventFd) -> Result<(), Error> {
        self.epoll
            .ctl(
                ControlOperation::Add,
                evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, POWER_OFF),
            )
            .map_err(Error::Epoll)
    }

    /// Makes [`Console::serve`] return [`EndReason::ShutdownTimedOut`] at `deadline`.
    pub fn set_deadline(&mut self, deadline: Option<std::time::Instant>) {
        self.deadline = deadline;
    }

    /// Makes [`Console::serve`] return [`EndReason::Tick`] every `period`.
    pub fn set_tick(&mut self, period: std::time::Duration) {
        self.tick = Some((period, std::time::Instant::now() + period));
    }

    /// Serves the console until something ends the VM or asks for a register dump.
    pub fn serve(&mut self) -> Result<EndReason, Error> {
        let mut events = [EpollEvent::default(); 8];
        loop {
            // While the UART's FIFO is full, poll for room instead of reading more input.
            let mut timeout = if self.pending.is_empty() { -1 } else { 10 };
            if let Some(deadline) = self.deadline {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Ok(EndReason::ShutdownTimedOut);
                }
                // Rounded up, so that the wait does not end just before the deadline.
                let ms = i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX);
                timeout = if timeout < 0 { ms } else { timeout.min(ms) };
            }
            if let Some((period, next)) = self.tick {
                let now = std::time::Instant::now();
                if now >= next {
                    self.tick = Some((period, now + period));
                    return Ok(EndReason::Tick);
                }
                let ms = i32::try_from((next - now).as_millis() + 1).unwrap_or(i32::MAX);
                timeout = if timeout < 0 { ms } else { timeout.min(ms) };
            }
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Epoll(e)),
            };
            for event in &events[..n] {
                match event.data() {
                    INPUT => {
                        if let Some(reason) = self.read_input() {
                            return Ok(reason);
                        }
                    }
                    LISTENER => self.accept_client(),
                    RESET => return Ok(EndReason::GuestReset),
                    VCPU_EXIT => return Ok(EndReason::VcpuExited),
                    POWER_OFF => return Ok(EndReason::GuestPowerOff),
                    SIGNAL => match self.read_signal() {
                        n if n == libc::SIGUSR1 as u32 => return Ok(EndReason::DumpRequested),
                        0 => {}
                        n => return Ok(EndReason::Signal(n)),
                    },
                    _ => {}
                }
            }
            self.flush_pending();
        }
    }

    fn read_signal(&self) -> u32 {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reading at most `size` bytes into a struct of that size from our own descriptor.
        let n = unsafe {
            libc::read(
                self.signals.as_raw_fd(),
                &mut info as *mut _ as *mut libc::c_void,
                size,
            )
        };
        if n as usize == size {
            info.ssi_signo
        } else {
            0
        }
    }

    /// Takes the console socket's next client: it gets the output and gives the input until it
    /// hangs up, and the listener waits (others queue) meanwhile.
    fn accept_client(&mut self) {
        let ConsoleInput::Listener { listener, client } = &self.input else {
            return;
        };
        let stream = match listener.listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    log::warn!("console socket: cannot accept a client: {e}");
                }
                return;
            }
        };
        if let Err(e) = stream.set_nonblocking(true) {
            log::warn!("console socket: {e}");
            return;
        }
        let fd = stream.as_raw_fd();
        let listener_fd = listener.listener.as_raw_fd();
        *client.lock().unwrap_or_else(|e| e.into_inner()) = Some(stream);
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, listener_fd, EpollEvent::default());
        self.input_fd = Some(fd);
        self.input_watched = false;
        self.watch_input(true);
        log::info!("console socket: a client connected");
    }

    /// Reads what the console's input has, one `read` of the raw descriptor, and moves it to the
    /// guest. Returns a reason when the user asked to quit.
    fn read_input(&mut self) -> Option<EndReason> {
        let fd = self.input_fd?;
        let mut buf = [0u8; 4096];
        match read_fd(fd, &mut buf) {
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::Interrupted => {}
            Ok(0) | Err(_) => {
                // End of input: the guest keeps running without a keyboard; a socket waits for
                // its next client.
                self.stop_reading_input();
            }
            Ok(n) => {
                for &byte in &buf[..n] {
                    if self.is_tty && self.escape {
                        self.escape = false;
                        match byte {
                            b'x' | b'X' => return Some(EndReason::UserQuit),
                            ESCAPE => self.pending.push(ESCAPE),
                            other => self.pending.extend_from_slice(&[ESCAPE, other]),
                        }
                    } else if self.is_tty && byte == ESCAPE {
                        self.escape = true;
                    } else {
                        self.pending.push(byte);
                    }
                }
            }
        }
        None
    }

    fn stop_reading_input(&mut self) {
        self.watch_input(false);
        self.input_fd = None;
        if let ConsoleInput::Listener { listener, client } = &self.input {
            // Dropping the client closes its descriptor, after epoll no longer watches it.
            client.lock().unwrap_or_else(|e| e.into_inner()).take();
            let fd = listener.listener.as_raw_fd();
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, LISTENER),
            ) {
                log::warn!("console socket: cannot wait for the next client: {e}");
            }
            log::info!("console socket: the client left; waiting for the next one");
        }
    }

    /// Adds the input to or removes it from the epoll set.
    fn watch_input(&mut self, watch: bool) {
        let Some(fd) = self.input_fd else {
            return;
        };
        if watch == self.input_watched {
            return;
        }
        let result = if watch {
            self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, INPUT),
            )
        } else {
            self.epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        };
        match result {
            Ok(()) => self.input_watched = watch,
            Err(e) => log::warn!("cannot change the console input watch: {e}"),
        }
    }

    /// Hands pending input to the UART; stops reading input while the FIFO is full.
    fn flush_pending(&mut self) {
        if !self.pending.is_empty() {
            let taken = self
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .enqueue_input(&self.pending);
            self.pending.drain(..taken.min(self.pending.len()));
        }
        self.watch_input(self.pending.is_empty());
    }
}
