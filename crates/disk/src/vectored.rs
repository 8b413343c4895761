//! Positioned vectored I/O in full: `preadv`/`pwritev` of at most [`IOV_MAX`] iovecs a call,
//! going on after a partial transfer. Raw disks and the files under qcow2 images use it.

use std::io;
use std::os::fd::RawFd;

use crate::{advance, IOV_MAX};

/// What a read that reaches the end of the file gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PastEnd {
    /// An error: a raw disk ends where its file does.
    Error,
    /// Zeroes: clusters of an image file not written yet.
    Zeroes,
}

/// Reads into or writes `buffers` in full at `offset` of `fd`. The iovecs must point at live
/// memory of their lengths for the call.
pub fn transfer_all(
    fd: RawFd,
    buffers: &[libc::iovec],
    offset: u64,
    write: bool,
    past_end: PastEnd,
) -> io::Result<()> {
    // The common case, every byte in one call, needs no copy of the iovecs; a partial
    // transfer goes on with a copy it can trim.
    let first = &buffers[..buffers.len().min(IOV_MAX)];
    let total: usize = buffers.iter().map(|b| b.iov_len).sum();
    let zero_rest = |rest: &[libc::iovec]| {
        for b in rest {
            // SAFETY: a live buffer of its length (the caller's guarantee).
            unsafe { std::ptr::write_bytes(b.iov_base.cast::<u8>(), 0, b.iov_len) };
        }
    };
    let at_end = |e: &io::Error| {
        !write && past_end == PastEnd::Zeroes && e.kind() == io::ErrorKind::UnexpectedEof
    };
    let n = loop {
        match transfer(fd, first, offset, write) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if at_end(&e) => {
                zero_rest(buffers);
                return Ok(());
            }
            result => break result?,
        }
    };
    if n == total {
        return Ok(());
    }
    let mut iov = buffers.to_vec();
    let mut start = 0;
    let mut done = n;
    let mut offset = offset;
    loop {
        offset += done as u64;
        advance(&mut iov, &mut start, done);
        if start == iov.len() {
            return Ok(());
        }
        let batch = &iov[start..iov.len().min(start + IOV_MAX)];
        done = match transfer(fd, batch, offset, write) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) if at_end(&e) => {
                zero_rest(&iov[start..]);
                return Ok(());
            }
            result => result?,
        };
    }
}

/// One `preadv` or `pwritev` of at most IOV_MAX iovecs; no progress at all (the end of the
/// file) is an error.
fn transfer(fd: RawFd, batch: &[libc::iovec], offset: u64, write: bool) -> io::Result<usize> {
    if batch.iter().all(|b| b.iov_len == 0) {
        return Ok(0);
    }
    let at = i64::try_from(offset).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "offset past what a file can hold",
        )
    })?;
    // SAFETY: every iovec points at a live buffer of its length (the caller's guarantee); the
    // kernel reads or writes only inside them. `batch` has at most IOV_MAX entries.
    let n = unsafe {
        if write {
            libc::pwritev(fd, batch.as_ptr(), batch.len() as i32, at)
        } else {
            libc::preadv(fd, batch.as_ptr(), batch.len() as i32, at)
        }
    };
    match n {
        n if n < 0 => Err(io::Error::last_os_error()),
        0 => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "past the end of the disk",
        )),
        n => Ok(n as usize),
    }
}
