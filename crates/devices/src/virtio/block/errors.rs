//! Why a request failed, typed: each failure is counted and logged at a limited rate (a
//! guest can make failures as fast as it can queue requests), and answered with its status.
//! A failed flush is sticky: the kernel reports a writeback error once, so after one
//! failure every later flush of the disk fails too, until the VM is restarted; otherwise a
//! later flush would "succeed" over pages that never reached the disk.

use std::io;
use std::time::{Duration, Instant};

use super::request::ParseError;
use super::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP};

#[derive(Debug, thiserror::Error)]
pub enum ExecuteError {
    #[error("malformed request: {0}")]
    Parse(#[from] ParseError),
    #[error("{len} bytes at sector {sector} run past the end of the disk")]
    OutOfRange { sector: u64, len: u64 },
    #[error("a write to a read-only disk")]
    ReadOnly,
    #[error("its buffers are not all in guest memory")]
    Buffers,
    #[error("every request slot is taken")]
    NoSlot,
    #[error("the io_uring refused it: {0}")]
    Ring(#[source] io::Error),
    #[error("{op} failed: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{op} reached the end of the file early (the image shrank?)")]
    Short { op: &'static str },
    #[error(
        "an earlier flush of this disk failed: every later flush fails until the VM is restarted"
    )]
    FlushFailedBefore,
    #[error("unsupported request: {0}")]
    Unsupported(&'static str),
}

impl ExecuteError {
    /// The status the guest gets.
    pub fn status(&self) -> u8 {
        match self {
            ExecuteError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }

    /// An errno from a completion (a negative result).
    pub fn from_completion(op: &'static str, result: i32) -> ExecuteError {
        if result < 0 {
            ExecuteError::Io {
                op,
                source: io::Error::from_raw_os_error(-result),
            }
        } else {
            ExecuteError::Short { op }
        }
    }
}

/// At most one log line per this interval per disk; the rest are counted.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Counts failures and logs them at a limited rate.
#[derive(Debug, Default)]
pub struct ErrorLog {
    /// Every failure so far.
    pub count: u64,
    /// Failures not logged since the last line.
    suppressed: u64,
    last_logged: Option<Instant>,
}

impl ErrorLog {
    /// Records `e` for the disk called `serial`; returns the status to answer.
    pub fn record(&mut self, serial: &str, e: &ExecuteError) -> u8 {
        self.count += 1;
        let now = Instant::now();
        if self
            .last_logged
            .is_some_and(|t| now.duration_since(t) < LOG_INTERVAL)
        {
            self.suppressed += 1;
        } else {
            let more = match self.suppressed {
                0 => String::new(),
                n => format!(" ({n} more failed since the last report)"),
            };
            eprintln!("keel: disk {serial}: a request failed: {e}{more}");
            self.suppressed = 0;
            self.last_logged = Some(now);
        }
        e.status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_all_counted_and_logged_at_a_limited_rate() {
        let mut log = ErrorLog::default();
        for _ in 0..1000 {
            let status = log.record("d", &ExecuteError::ReadOnly);
            assert_eq!(status, VIRTIO_BLK_S_IOERR);
        }
        assert_eq!(log.count, 1000);
        assert_eq!(log.suppressed, 999, "one line, the rest counted");
        assert_eq!(
            log.record("d", &ExecuteError::Unsupported("x")),
            VIRTIO_BLK_S_UNSUPP
        );
    }

    #[test]
    fn completion_errors_keep_their_cause() {
        let e = ExecuteError::from_completion("fdatasync", -libc::EIO);
        assert!(e.to_string().contains("fdatasync failed"), "{e}");
        assert!(
            matches!(e, ExecuteError::Io { ref source, .. } if source.raw_os_error() == Some(libc::EIO))
        );
        let short = ExecuteError::from_completion("read", 0);
        assert!(short.to_string().contains("end of the file"), "{short}");
    }
}
