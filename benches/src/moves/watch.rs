//! Waiting for a file to be written to (inotify): when a restored guest's first output lands
//! in its console log.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};

/// An inotify watch for writes to one file.
pub struct Written {
    fd: libc::c_int,
}

impl Written {
    pub fn watch(path: &Path) -> Result<Written> {
        // SAFETY: inotify_init1 takes flags only.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if fd < 0 {
            bail!("inotify_init1: {}", std::io::Error::last_os_error());
        }
        let name = CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: a NUL-terminated path and a descriptor this function made.
        if unsafe { libc::inotify_add_watch(fd, name.as_ptr(), libc::IN_MODIFY) } < 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: closes the descriptor made above.
            unsafe { libc::close(fd) };
            bail!("watching {}: {e}", path.display());
        }
        Ok(Written { fd })
    }

    /// Waits up to `timeout` for a write; false if none came.
    pub fn wait(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: polls one live pollfd.
        unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
    }
}

impl Drop for Written {
    fn drop(&mut self) {
        // SAFETY: the descriptor is this watch's own.
        unsafe { libc::close(self.fd) };
    }
}
