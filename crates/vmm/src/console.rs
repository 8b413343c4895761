//! The serial console on the terminal: raw mode while the VM runs (restored on every exit
//! path: return, signal, panic), unbuffered output, and input with Ctrl-A escapes: Ctrl-A x
//! quits, Ctrl-A p presses the ACPI power button, Ctrl-A Ctrl-A sends a Ctrl-A.

use std::io::{self, Write};
use std::sync::OnceLock;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("putting the terminal in raw mode failed: {0}")]
    RawMode(io::Error),
}

const CTRL_A: u8 = 0x01;
const QUIT_KEY: u8 = b'x';
const POWER_BUTTON_KEY: u8 = b'p';

/// What the user typed, with the escape taken out.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ConsoleInput {
    pub for_guest: Vec<u8>,
    pub quit: bool,
    /// Ctrl-A p: press the guest's ACPI power button.
    pub power_button: bool,
}

/// Recognises Ctrl-A sequences across reads.
#[derive(Debug, Default)]
pub struct EscapeParser {
    after_ctrl_a: bool,
}

impl EscapeParser {
    pub fn feed(&mut self, input: &[u8]) -> ConsoleInput {
        let mut out = ConsoleInput::default();
        for &b in input {
            if self.after_ctrl_a {
                self.after_ctrl_a = false;
                match b {
                    QUIT_KEY | b'X' => {
                        out.quit = true;
                        return out;
                    }
                    POWER_BUTTON_KEY | b'P' => out.power_button = true,
                    CTRL_A => out.for_guest.push(CTRL_A),
                    other => out.for_guest.extend_from_slice(&[CTRL_A, other]),
                }
            } else if b == CTRL_A {
                self.after_ctrl_a = true;
            } else {
                out.for_guest.push(b);
            }
        }
        out
    }
}

/// Guest console output straight to file descriptor 1, one write per call and no buffer, so
/// a prompt without a newline shows at once.
pub struct StdoutWriter;

impl Write for StdoutWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: writes from a valid slice to fd 1, which the process owns for its life.
            let n = unsafe { libc::write(1, buf.as_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The terminal settings to put back; readable from a signal handler.
static SAVED_TERMIOS: OnceLock<libc::termios> = OnceLock::new();

fn restore_terminal() {
    if let Some(saved) = SAVED_TERMIOS.get() {
        // SAFETY: tcsetattr with a valid termios copy; async-signal-safe.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, saved) };
    }
}

extern "C" fn restore_and_exit(signal: libc::c_int) {
    restore_terminal();
    // SAFETY: _exit is async-signal-safe and ends the process at once.
    unsafe { libc::_exit(128 + signal) };
}

/// Raw mode on the terminal on stdin, if there is one; restored when dropped.
pub struct RawTerminal(());

impl RawTerminal {
    pub fn enter() -> Result<Option<RawTerminal>, Error> {
        // SAFETY: isatty only inspects fd 0.
        if unsafe { libc::isatty(0) } != 1 {
            return Ok(None);
        }
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is a terminal and `saved` is a valid termios to fill.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return Err(Error::RawMode(io::Error::last_os_error()));
        }
        let _ = SAVED_TERMIOS.set(saved);
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the termios copy in place.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output processing so a guest's bare "\n" still starts a new line.
        raw.c_oflag |= libc::OPOST | libc::ONLCR;
        for signal in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT, libc::SIGQUIT] {
            // SAFETY: the handler only calls async-signal-safe functions.
            unsafe { libc::signal(signal, restore_and_exit as *const () as libc::sighandler_t) };
        }
        let previous_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            previous_hook(info);
        }));
        // SAFETY: fd 0 is a terminal and `raw` a valid termios.
        if unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) } != 0 {
            return Err(Error::RawMode(io::Error::last_os_error()));
        }
        Ok(Some(RawTerminal(())))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore_terminal();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_input_passes_through() {
        let mut p = EscapeParser::default();
        assert_eq!(
            p.feed(b"ls -l\r"),
            ConsoleInput {
                for_guest: b"ls -l\r".to_vec(),
                quit: false,
                power_button: false,
            }
        );
    }

    #[test]
    fn ctrl_a_x_quits_even_split_across_reads() {
        let mut p = EscapeParser::default();
        let first = p.feed(b"ab\x01");
        assert_eq!(first.for_guest, b"ab");
        assert!(!first.quit);
        assert!(p.feed(b"x").quit);
    }

    #[test]
    fn ctrl_a_p_presses_the_power_button() {
        let mut p = EscapeParser::default();
        let input = p.feed(b"a\x01pb");
        assert!(input.power_button && !input.quit);
        assert_eq!(input.for_guest, b"ab");
    }

    #[test]
    fn ctrl_a_ctrl_a_sends_one_ctrl_a_and_others_pass() {
        let mut p = EscapeParser::default();
        assert_eq!(p.feed(b"\x01\x01").for_guest, vec![CTRL_A]);
        assert_eq!(p.feed(b"\x01c").for_guest, vec![CTRL_A, b'c']);
        assert_eq!(
            p.feed(b"\x03").for_guest,
            vec![0x03],
            "Ctrl-C goes to the guest"
        );
    }
}
