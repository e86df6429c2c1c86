//! The host terminal in raw mode while the guest owns the console.
//!
//! Raw mode hands every key (Ctrl-C included) to the guest's serial port. The saved settings are
//! restored when the guard drops and, because a panic may abort without unwinding, from a panic hook
//! as well.

use std::sync::Mutex;

/// Terminal settings to put back, shared with the panic hook.
static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Puts stdin's terminal in raw mode for as long as it lives; does nothing when stdin is not a
/// terminal (tests and scripts pipe the console).
pub struct RawTerminal {
    active: bool,
}

impl RawTerminal {
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
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
