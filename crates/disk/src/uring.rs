//! Asynchronous I/O on a [`RawDisk`] through an io_uring: vectored reads and writes and
//! `fdatasync`, queued by the caller under a `user_data` of its choosing and submitted
//! together; their completions are reaped when the ring's eventfd fires.
//!
//! The ring does not know what its operations mean: a short read or write completes with the
//! bytes transferred, and the caller decides whether to queue the rest.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::register::Restriction;
use io_uring::{opcode, squeue, types, IoUring, Probe};

use crate::{Image, IOV_MAX};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the io_uring engine serves raw images, not {0}")]
    NotRaw(crate::Format),
    #[error("creating an io_uring failed: {0}; io_uring may be disabled (sysctl kernel.io_uring_disabled, a seccomp filter) or RLIMIT_MEMLOCK too low")]
    Setup(#[source] io::Error),
    #[error("this kernel's io_uring cannot probe its operations: {0}; it is older than Linux 5.6")]
    Probe(#[source] io::Error),
    #[error("this kernel's io_uring lacks {0}")]
    Unsupported(&'static str),
    #[error("creating the io_uring's completion eventfd failed: {0}")]
    EventFd(#[source] io::Error),
    #[error("registering the completion eventfd with the io_uring failed: {0}")]
    RegisterEventFd(#[source] io::Error),
    #[error(
        "restricting the io_uring to its operations failed: {0}; Linux 5.10 or newer is needed"
    )]
    Restrict(#[source] io::Error),
}

/// An io_uring whose operations all go to one disk.
pub struct Uring {
    ring: IoUring,
    /// Written by the kernel for each completion.
    eventfd: File,
    /// Held so that `fd` stays open while operations may be in flight.
    _disk: Arc<Image>,
    fd: RawFd,
    /// Queued operations not yet handed to the kernel.
    unsubmitted: usize,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("entries", &self.ring.params().sq_entries())
            .field("eventfd", &self.eventfd.as_raw_fd())
            .finish()
    }
}

impl Uring {
    /// A ring on `disk` with room for `entries` queued operations (a power of two) and
    /// twice as many completions.
    pub fn new(disk: Arc<Image>, entries: u32) -> Result<Self, Error> {
        let disk_fd = disk.raw_fd().ok_or(Error::NotRaw(disk.format()))?;
        // Created disabled, restricted to the operations it serves, then enabled: seccomp
        // does not see what the kernel does for a ring, so the ring itself is limited.
        let ring = IoUring::builder()
            .setup_r_disabled()
            .build(entries)
            .map_err(Error::Setup)?;
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(Error::Probe)?;
        for (code, name) in [
            (opcode::Readv::CODE, "IORING_OP_READV"),
            (opcode::Writev::CODE, "IORING_OP_WRITEV"),
            (opcode::Fsync::CODE, "IORING_OP_FSYNC"),
        ] {
            if !probe.is_supported(code) {
                return Err(Error::Unsupported(name));
            }
        }
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::EventFd(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let eventfd = unsafe { File::from_raw_fd(fd) };
        ring.submitter()
            .register_eventfd(eventfd.as_raw_fd())
            .map_err(Error::RegisterEventFd)?;
        // No other opcode, no SQE flag (no fixed files, links or drains), and no further
        // registration once enabled.
        let mut allowed = [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
            Restriction::sqe_flags_allowed(0),
        ];
        let submitter = ring.submitter();
        submitter
            .register_restrictions(&mut allowed)
            .map_err(Error::Restrict)?;
        submitter.register_enable_rings().map_err(Error::Restrict)?;
        Ok(Self {
            ring,
            eventfd,
            fd: disk_fd,
            _disk: disk,
            unsubmitted: 0,
        })
    }

    /// The eventfd the kernel writes when a completion arrives (non-blocking).
    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Queues a read from `offset` into the first [`IOV_MAX`] of `iov`.
    ///
    /// # Safety
    ///
    /// `iov` and the buffers it points at must stay valid, unmoved and otherwise unused
    /// until the completion with `user_data` has been reaped.
    pub unsafe fn readv(
        &mut self,
        iov: &[libc::iovec],
        offset: u64,
        user_data: u64,
    ) -> io::Result<()> {
        let fd = types::Fd(self.fd);
        let count = iov.len().min(IOV_MAX) as u32;
        let entry = opcode::Readv::new(fd, iov.as_ptr(), count)
            .offset(offset)
            .build()
            .user_data(user_data);
        // SAFETY: the caller keeps `iov` and its buffers alive until the completion.
        unsafe { self.push(&entry) }
    }

    /// Queues a write of the first [`IOV_MAX`] of `iov` at `offset`.
    ///
    /// # Safety
    ///
    /// As for [`Uring::readv`]: `iov` and its buffers stay valid until the completion.
    pub unsafe fn writev(
        &mut self,
        iov: &[libc::iovec],
        offset: u64,
        user_data: u64,
    ) -> io::Result<()> {
        let fd = types::Fd(self.fd);
        let count = iov.len().min(IOV_MAX) as u32;
        let entry = opcode::Writev::new(fd, iov.as_ptr(), count)
            .offset(offset)
            .build()
            .user_data(user_data);
        // SAFETY: the caller keeps `iov` and its buffers alive until the completion.
        unsafe { self.push(&entry) }
    }

    /// Queues an `fdatasync` of the disk. It covers what was written to the file before it
    /// starts, not operations still queued or in flight beside it: the caller orders it.
    pub fn fdatasync(&mut self, user_data: u64) -> io::Result<()> {
        let fd = types::Fd(self.fd);
        let entry = opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(user_data);
        // SAFETY: an fsync refers to no memory.
        unsafe { self.push(&entry) }
    }

    /// # Safety
    ///
    /// Whatever memory `entry` points at stays valid until its completion is reaped.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        for _ in 0..2 {
            // SAFETY: the caller's guarantee covers the memory the entry points at.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                self.unsubmitted += 1;
                return Ok(());
            }
            // The submission queue is full: hand it to the kernel and try again.
            self.submit()?;
        }
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "the io_uring submission queue stays full",
        ))
    }

    /// Hands every queued operation to the kernel. An error leaves the rest queued for the
    /// next call.
    pub fn submit(&mut self) -> io::Result<()> {
        while self.unsubmitted > 0 {
            match self.ring.submit() {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WouldBlock,
                        "the kernel took none of the queued io_uring operations",
                    ))
                }
                Ok(n) => self.unsubmitted = self.unsubmitted.saturating_sub(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Operations queued but not yet handed to the kernel.
    pub fn unsubmitted(&self) -> usize {
        self.unsubmitted
    }

    /// Moves every completion that has arrived into `out` as `(user_data, result)`: the
    /// result is the bytes transferred, 0 for an fdatasync that succeeded, or `-errno`.
    pub fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        out.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
    }

    /// Consumes the eventfd's count. Call it before [`Uring::reap`]: a completion arriving
    /// after the reap then writes the eventfd again, and is not missed.
    pub fn clear_eventfd(&self) {
        let mut count = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live 8-byte array; the eventfd is
        // non-blocking, so an empty count fails with EAGAIN, which is fine.
        unsafe { libc::read(self.eventfd.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
    }

    /// Waits at most `timeout` for the eventfd to signal a completion; false if it did not.
    pub fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.eventfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: polls one live pollfd for at most `ms` milliseconds.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n > 0 {
                return true;
            }
            if n == 0 || left.is_zero() {
                return false;
            }
            // Interrupted: wait for what is left.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iov;
    use std::io::Write;

    fn disk(name: &str, bytes: usize) -> (std::path::PathBuf, Arc<Image>) {
        let path = std::env::temp_dir().join(format!("keel-uring-{}-{name}", std::process::id()));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&vec![0x55; bytes])
            .unwrap();
        let disk = Arc::new(Image::Raw(crate::RawDisk::open(&path, false).unwrap()));
        (path, disk)
    }

    fn ring(disk: &Arc<Image>) -> Uring {
        Uring::new(disk.clone(), 8).expect("io_uring is needed for this test")
    }

    /// Waits for `n` completions, at most 10 s.
    fn completions(ring: &mut Uring, n: usize) -> Vec<(u64, i32)> {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while out.len() < n && Instant::now() < deadline {
            ring.clear_eventfd();
            ring.reap(&mut out);
            if out.len() < n {
                ring.wait(Duration::from_millis(100));
            }
        }
        out
    }

    #[test]
    fn write_fdatasync_read_complete_with_their_user_data() {
        let (path, disk) = disk("rw", 8192);
        let mut ring = ring(&disk);
        let mut data = vec![7u8; 4096];
        let wiov = [iov(data.as_mut_ptr(), 4096)];
        // SAFETY: `wiov` and `data` live until the completion is reaped below.
        unsafe { ring.writev(&wiov, 4096, 1) }.unwrap();
        ring.submit().unwrap();
        assert_eq!(completions(&mut ring, 1), vec![(1, 4096)]);
        ring.fdatasync(2).unwrap();
        let mut back = vec![0u8; 8192];
        let riov = [iov(back.as_mut_ptr(), 8192)];
        // SAFETY: as above, for `riov` and `back`.
        unsafe { ring.readv(&riov, 0, 3) }.unwrap();
        ring.submit().unwrap();
        let mut done = completions(&mut ring, 2);
        done.sort();
        assert_eq!(done, vec![(2, 0), (3, 8192)]);
        assert!(back[..4096].iter().all(|&b| b == 0x55));
        assert!(back[4096..].iter().all(|&b| b == 7));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_read_past_the_end_completes_short() {
        let (path, disk) = disk("short", 4096);
        let mut ring = ring(&disk);
        let mut back = vec![0u8; 8192];
        let riov = [iov(back.as_mut_ptr(), 8192)];
        // SAFETY: `riov` and `back` live until the completion is reaped below.
        unsafe { ring.readv(&riov, 2048, 9) }.unwrap();
        ring.submit().unwrap();
        assert_eq!(completions(&mut ring, 1), vec![(9, 2048)]);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_full_submission_queue_is_submitted_to_make_room() {
        let (path, disk) = disk("full", 4096);
        let mut ring = ring(&disk);
        for i in 0..12 {
            ring.fdatasync(i).unwrap();
        }
        ring.submit().unwrap();
        assert_eq!(ring.unsubmitted(), 0);
        assert_eq!(completions(&mut ring, 12).len(), 12);
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod restriction_tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_ring_refuses_every_operation_but_its_own() {
        let path = std::env::temp_dir().join(format!("keel-uring-restrict-{}", std::process::id()));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&[0x55; 4096])
            .unwrap();
        let disk = Arc::new(Image::Raw(crate::RawDisk::open(&path, false).unwrap()));
        let mut ring = Uring::new(disk, 8).expect("io_uring is needed for this test");
        // An openat through the ring (which seccomp would not see), a plain read, a nop.
        let name = c"/etc/passwd";
        let refused = [
            opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), name.as_ptr())
                .build()
                .user_data(1),
            opcode::Nop::new().build().user_data(2),
        ];
        for entry in &refused {
            // SAFETY: the path is a static string; a nop refers to no memory.
            unsafe { ring.push(entry) }.unwrap();
        }
        // Its own operation goes through; with an SQE flag (a link) it is refused.
        ring.fdatasync(3).unwrap();
        let linked = opcode::Fsync::new(types::Fd(ring.fd))
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(4);
        // SAFETY: an fsync refers to no memory.
        unsafe { ring.push(&linked) }.unwrap();
        let _ = ring.submit();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while out.len() < 4 && Instant::now() < deadline {
            ring.clear_eventfd();
            ring.reap(&mut out);
            if out.len() < 4 {
                ring.wait(Duration::from_millis(20));
            }
        }
        out.sort();
        assert_eq!(
            out,
            vec![
                (1, -libc::EACCES),
                (2, -libc::EACCES),
                (3, 0),
                (4, -libc::EACCES)
            ]
        );
        let _ = std::fs::remove_file(path);
    }
}
