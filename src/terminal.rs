//! Raw mode for the controlling terminal while the guest owns it, restored on every way out:
//! normal return (the guard's `Drop`), an error, a handled signal, and a panic (the hook
//! installed by `install_panic_restore`).

use std::io::{self, IsTerminal};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Mutex, OnceLock};

/// The terminal settings to put back, shared with the panic hook.
static SAVED: Mutex<Option<(RawFd, libc::termios)>> = Mutex::new(None);
/// The same settings for signal handlers, which cannot take a lock; putting them back twice
/// is harmless, so this copy is never cleared.
static SAVED_FOR_SIGNALS: OnceLock<(RawFd, libc::termios)> = OnceLock::new();

/// While alive, the terminal on `fd` is in raw mode.
pub struct RawTerminal {
    fd: RawFd,
}

impl RawTerminal {
    /// Puts stdin in raw mode if it is a terminal; `None` when it is not (a pipe or file).
    pub fn stdin() -> io::Result<Option<Self>> {
        let stdin = io::stdin();
        if !stdin.is_terminal() {
            return Ok(None);
        }
        Self::enter(stdin.as_raw_fd()).map(Some)
    }

    fn enter(fd: RawFd) -> io::Result<Self> {
        let mut saved = MaybeUninit::<libc::termios>::uninit();
        // SAFETY: tcgetattr fills the termios it is given and we check its result before
        // reading it.
        if unsafe { libc::tcgetattr(fd, saved.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: tcgetattr succeeded, so the struct is initialised.
        let saved = unsafe { saved.assume_init() };
        let mut raw = saved;
        // cfmakeraw, but keep output post-processing so host-side lines stay intact; guest
        // bytes (including ^C) all go to the guest.
        raw.c_iflag &= !(libc::IGNBRK
            | libc::BRKINT
            | libc::PARMRK
            | libc::ISTRIP
            | libc::INLCR
            | libc::IGNCR
            | libc::ICRNL
            | libc::IXON);
        raw.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::ISIG | libc::IEXTEN);
        raw.c_cflag &= !(libc::CSIZE | libc::PARENB);
        raw.c_cflag |= libc::CS8;
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        set_attrs(fd, &raw)?;
        *SAVED.lock().unwrap_or_else(|p| p.into_inner()) = Some((fd, saved));
        let _ = SAVED_FOR_SIGNALS.set((fd, saved));
        Ok(Self { fd })
    }
}

fn set_attrs(fd: RawFd, t: &libc::termios) -> io::Result<()> {
    // SAFETY: `t` is a valid termios and tcsetattr only reads it.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Puts back the saved settings, if any are still pending.
pub fn restore() {
    let saved = SAVED.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some((fd, t)) = saved {
        let _ = set_attrs(fd, &t);
    }
}

/// `restore` for a signal handler that ends the process: no lock, no allocation, one
/// tcsetattr (async-signal-safe).
pub fn restore_from_signal_handler() {
    if let Some((fd, t)) = SAVED_FOR_SIGNALS.get() {
        let _ = set_attrs(*fd, t);
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        debug_assert!(self.fd >= 0);
        restore();
    }
}

/// Makes a panic restore the terminal before the message is printed.
pub fn install_panic_restore() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        previous(info);
    }));
}
