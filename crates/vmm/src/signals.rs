//! Signals of a VMM that runs detached (`keel vmm`): SIGHUP and SIGPIPE are ignored, so the
//! VMM outlives its parent's terminal and its clients' sockets; SIGTERM and SIGINT are blocked
//! and read from a signalfd on the event loop, where they become a stop command like any other.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The signals that stop the VM.
const STOP_SIGNALS: [(libc::c_int, &str); 2] =
    [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")];

/// A signalfd for the stop signals.
pub struct Signals {
    fd: OwnedFd,
}

impl Signals {
    /// Ignores SIGHUP and SIGPIPE and routes the stop signals to a signalfd. Call before any
    /// other thread starts: threads inherit the blocked mask, so no vCPU thread is ever killed
    /// by SIGTERM's default action. A signal that arrives before the event loop runs waits.
    pub fn take_over() -> io::Result<Self> {
        for signal in [libc::SIGHUP, libc::SIGPIPE] {
            // SAFETY: installs the SIG_IGN disposition; no handler code runs.
            if unsafe { libc::signal(signal, libc::SIG_IGN) } == libc::SIG_ERR {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: sigset_t is plain data; sigemptyset initialises it below.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t owned by this frame.
        unsafe { libc::sigemptyset(&mut set) };
        for (signal, _) in STOP_SIGNALS {
            // SAFETY: `set` is a valid, initialised sigset_t and `signal` a valid signal number.
            unsafe { libc::sigaddset(&mut set, signal) };
        }
        // SAFETY: `set` is valid; the old mask is not wanted (null).
        let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        // SAFETY: creates a new signalfd for a valid set; the result is checked below.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by signalfd and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// The next pending stop signal's name, or None when none is pending.
    pub fn read(&self) -> Option<&'static str> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info`, which is that large.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        if n != size as isize {
            return None;
        }
        STOP_SIGNALS
            .iter()
            .find(|(signal, _)| *signal as u32 == info.ssi_signo)
            .map(|(_, name)| *name)
            .or(Some("a stop signal"))
    }
}

impl AsRawFd for Signals {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
