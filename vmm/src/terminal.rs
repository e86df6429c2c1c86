//! The host terminal in raw mode while the guest owns the console.
//!
//! Raw mode hands every key (Ctrl-C included) to the guest's serial port. The saved settings are
//! restored when the guard drops and, because a panic may abort without unwinding, from a panic hook
//! as well. A signal that would end the process before the console loop takes the termination
//! signals over (or ever: a crash, SIGABRT) restores them from a signal handler, then ends the
//! process as the signal would have.

use std::sync::{Mutex, OnceLock};

/// Terminal settings to put back, shared with the panic hook.
static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

/// The same settings for the signal handler, which may not take a lock.
static SAVED_FOR_SIGNALS: OnceLock<libc::termios> = OnceLock::new();

/// Signals whose default action ends the process while the terminal is raw.
const FATAL_SIGNALS: [libc::c_int; 9] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGABRT,
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
];

/// Restores the terminal and ends the process with `signal`'s default action.
extern "C" fn restore_and_reraise(signal: libc::c_int) {
    if let Some(original) = SAVED_FOR_SIGNALS.get() {
        // SAFETY: tcsetattr is async-signal-safe; `original` is a valid termios.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, original) };
    }
    // SAFETY: signal, pthread_sigmask and raise are async-signal-safe; the default action ends
    // the process (or dumps core) as the signal would have without us.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(signal);
    }
}

fn install_signal_restore() {
    for signal in FATAL_SIGNALS {
        // SAFETY: the handler only calls async-signal-safe functions.
        unsafe {
            libc::signal(
                signal,
                restore_and_reraise as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
}

/// Puts stdin's terminal in raw mode for as long as it lives; does nothing when stdin is not a
/// terminal (tests and scripts pipe the console).
pub struct RawTerminal {
    active: bool,
}

impl RawTerminal {
    /// `console_here` says whether the guest's console is this terminal (`--serial stdio`).
    pub fn new(console_here: bool) -> std::io::Result<Self> {
        // SAFETY: isatty only inspects the descriptor.
        if !console_here || unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return Ok(RawTerminal { active: false });
        }
        // SAFETY: termios is plain data; tcgetattr fills it and we check the result.
        let mut original: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: a valid descriptor and a valid pointer to a termios.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut original) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut raw = original;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output processing so the VMM's own messages still start at column 0.
        raw.c_oflag |= libc::OPOST | libc::ONLCR;
        // SAFETY: a valid descriptor and a valid termios.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(original);
        let _ = SAVED_FOR_SIGNALS.set(original);
        install_signal_restore();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
        Ok(RawTerminal { active: true })
    }
}

/// Puts back the settings saved by [`RawTerminal::new`], if any.
pub fn restore() {
    let saved = SAVED.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(original) = saved {
        // SAFETY: a valid descriptor and the termios tcgetattr gave us.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &original) };
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if self.active {
            restore();
        }
    }
}
