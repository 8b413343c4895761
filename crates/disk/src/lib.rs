//! Disk images and the I/O on them. Today: raw files, with vectored I/O straight between the
//! file and guest buffers (no copy through the VMM): synchronous here, asynchronous through
//! an io_uring in [`uring`].

pub mod boot;
pub mod uring;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("disk {path}: opening it failed: {source}; check the path and its permissions")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk {path}: its size is {size} bytes, not a multiple of 512; pad it (e.g. truncate -s) or use another image")]
    UnalignedSize { path: PathBuf, size: u64 },
    #[error("disk {path}: reading its size failed: {source}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Most iovecs one vectored system call or io_uring operation takes (`UIO_MAXIOV`).
pub const IOV_MAX: usize = 1024;

/// An iovec over `len` bytes at `ptr`.
pub fn iov(ptr: *mut u8, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: ptr.cast(),
        iov_len: len,
    }
}

/// Moves past `done` transferred bytes of `iov[*start..]`: whole iovecs are skipped by
/// raising `start`, a partly transferred one is trimmed in place. Bytes beyond the iovecs are
/// ignored.
pub fn advance(iov: &mut [libc::iovec], start: &mut usize, done: usize) {
    let mut done = done;
    while *start < iov.len() {
        let first = &mut iov[*start];
        if done < first.iov_len {
            if done > 0 {
                // SAFETY: stays inside the same buffer: `done` < its length.
                first.iov_base = unsafe { first.iov_base.cast::<u8>().add(done) }.cast();
                first.iov_len -= done;
            }
            return;
        }
        done -= first.iov_len;
        *start += 1;
    }
}

/// A raw disk image.
#[derive(Debug)]
pub struct RawDisk {
    file: File,
    size: u64,
    read_only: bool,
}

impl RawDisk {
    /// Opens the image. It is opened with `O_NOATIME` where the caller may (it owns the
    /// file, or has CAP_FOWNER): a guest's reads then do not update the image's access time,
    /// which costs the kernel a clock read and a check on every read (and, under `relatime`,
    /// an inode write after each write); otherwise without it.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, Error> {
        let open = |flags| {
            OpenOptions::new()
                .read(true)
                .write(!read_only)
                .custom_flags(flags)
                .open(path)
        };
        let file = match open(libc::O_NOATIME) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0),
            result => result,
        }
        .map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let size = file
            .metadata()
            .map_err(|source| Error::Size {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        if size % 512 != 0 {
            return Err(Error::UnalignedSize {
                path: path.to_path_buf(),
                size,
            });
        }
        Ok(Self {
            file,
            size,
            read_only,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Reads into `buffers` in full from `offset`, or fails; a short read past the end is an
    /// error. The iovecs must point at live memory of their lengths for the call.
    pub fn read_at(&self, buffers: &[libc::iovec], offset: u64) -> io::Result<()> {
        self.vectored(buffers, offset, false)
    }

    /// Writes `buffers` in full at `offset`: when this returns Ok the data is in the file.
    pub fn write_at(&self, buffers: &[libc::iovec], offset: u64) -> io::Result<()> {
        self.vectored(buffers, offset, true)
    }

    /// Reads what the page cache holds of `buffers` from `offset` without blocking
    /// (`preadv2` with `RWF_NOWAIT`), at most [`IOV_MAX`] iovecs: the bytes read, which may
    /// be fewer than asked (the rest is not cached, or lies past the end of the file).
    /// `WouldBlock` when the first page is not cached; other errors when the file system
    /// cannot read without blocking at all. The iovecs must point at live memory of their
    /// lengths for the call.
    pub fn read_nowait(&self, buffers: &[libc::iovec], offset: u64) -> io::Result<usize> {
        let batch = &buffers[..buffers.len().min(IOV_MAX)];
        // SAFETY: every iovec points at a live buffer of its length (the caller's guarantee);
        // the kernel writes only inside them, and `batch.len()` is at most IOV_MAX.
        let n = unsafe {
            libc::preadv2(
                self.file.as_raw_fd(),
                batch.as_ptr(),
                batch.len() as i32,
                offset as i64,
                libc::RWF_NOWAIT,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn vectored(&self, buffers: &[libc::iovec], offset: u64, write: bool) -> io::Result<()> {
        // The common case, every byte in one call, needs no copy of the iovecs; a partial
        // transfer goes on with a copy it can trim.
        let first = &buffers[..buffers.len().min(IOV_MAX)];
        let total: usize = buffers.iter().map(|b| b.iov_len).sum();
        let n = loop {
            match self.transfer(first, offset, write) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
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
            done = match self.transfer(batch, offset, write) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                result => result?,
            };
        }
    }

    /// One `preadv` or `pwritev` of at most IOV_MAX iovecs; no progress at all (the end of
    /// the file) is an error.
    fn transfer(&self, batch: &[libc::iovec], offset: u64, write: bool) -> io::Result<usize> {
        if batch.iter().all(|b| b.iov_len == 0) {
            return Ok(0);
        }
        // SAFETY: every iovec points at a live guest buffer of its length (the caller's
        // guarantee); the kernel reads or writes only inside them. `batch` has at most
        // IOV_MAX entries.
        let n = unsafe {
            if write {
                libc::pwritev(
                    self.file.as_raw_fd(),
                    batch.as_ptr(),
                    batch.len() as i32,
                    offset as i64,
                )
            } else {
                libc::preadv(
                    self.file.as_raw_fd(),
                    batch.as_ptr(),
                    batch.len() as i32,
                    offset as i64,
                )
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

    /// Makes written data durable.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Frees the range (reads back as zeroes); the file keeps its size.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// Zeroes the range, by the cheapest means the file system offers.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        let first = if may_unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        if self.fallocate(first, offset, len).is_ok() {
            return Ok(());
        }
        let zeroes = vec![0u8; 64 * 1024];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            let buf = iov(zeroes.as_ptr() as *mut u8, n);
            self.write_at(&[buf], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on an owned fd with plain integer arguments.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, len as i64) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl AsRawFd for RawDisk {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn image(bytes: usize) -> (PathBuf, RawDisk) {
        let path = std::env::temp_dir().join(format!(
            "keel-disk-{}-{bytes}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&vec![0xaa; bytes])
            .unwrap();
        let disk = RawDisk::open(&path, false).unwrap();
        (path, disk)
    }

    #[test]
    fn vectored_write_then_read_round_trips() {
        let (path, disk) = image(8192);
        let mut a = vec![1u8; 512];
        let mut b = vec![2u8; 1024];
        let bufs = [iov(a.as_mut_ptr(), 512), iov(b.as_mut_ptr(), 1024)];
        disk.write_at(&bufs, 1024).unwrap();
        disk.flush().unwrap();
        let mut back = vec![0u8; 1536];
        disk.read_at(&[iov(back.as_mut_ptr(), 1536)], 1024).unwrap();
        assert!(back[..512].iter().all(|&x| x == 1) && back[512..].iter().all(|&x| x == 2));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn reading_past_the_end_fails() {
        let (path, disk) = image(1024);
        let mut buf = vec![0u8; 1024];
        let err = disk
            .read_at(&[iov(buf.as_mut_ptr(), 1024)], 512)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn discard_and_write_zeroes_read_back_as_zero() {
        let (path, disk) = image(16384);
        disk.discard(4096, 4096).unwrap();
        disk.write_zeroes(8192, 512, false).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert!(data[4096..8192].iter().all(|&x| x == 0));
        assert!(data[8192..8704].iter().all(|&x| x == 0));
        assert!(data[..4096].iter().all(|&x| x == 0xaa));
        assert_eq!(data.len(), 16384);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn advance_skips_whole_iovecs_and_trims_a_partial_one() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        let mut v = vec![
            iov(a.as_mut_ptr(), 8),
            iov(std::ptr::null_mut(), 0),
            iov(b.as_mut_ptr(), 8),
        ];
        let mut start = 0;
        advance(&mut v, &mut start, 3);
        assert_eq!((start, v[0].iov_len), (0, 5));
        assert_eq!(v[0].iov_base, a[3..].as_mut_ptr().cast());
        advance(&mut v, &mut start, 5);
        assert_eq!(start, 2, "the empty iovec is skipped too");
        advance(&mut v, &mut start, 100);
        assert_eq!(start, 3);
    }

    #[test]
    fn more_iovecs_than_one_call_takes_are_transferred_in_batches() {
        let (path, disk) = image(4096 * 2);
        let mut data: Vec<u8> = (0..3000).map(|i| i as u8).collect();
        // 3000 one-byte iovecs: three system calls.
        let bufs: Vec<libc::iovec> = (0..3000).map(|i| iov(data[i..].as_mut_ptr(), 1)).collect();
        disk.write_at(&bufs, 512).unwrap();
        let file = std::fs::read(&path).unwrap();
        assert_eq!(&file[512..3512], &data[..]);
        data.fill(0);
        disk.read_at(&bufs, 512).unwrap();
        assert_eq!(&file[512..3512], &data[..]);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn nowait_reads_what_the_page_cache_holds() {
        let (path, disk) = image(64 * 1024);
        let mut buf = vec![0u8; 8192];
        let bufs = [iov(buf.as_mut_ptr(), 8192)];
        // Just written: cached.
        assert_eq!(disk.read_nowait(&bufs, 4096).unwrap(), 8192);
        assert!(buf.iter().all(|&b| b == 0xaa));
        disk.flush().unwrap();
        // SAFETY: fadvise on an open fd with plain integer arguments.
        unsafe { libc::posix_fadvise(disk.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        match disk.read_nowait(&bufs, 4096) {
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
            // A file system that keeps no page cache of its own (tmpfs) never misses.
            Ok(n) => assert_eq!(n, 8192),
        }
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn images_are_opened_without_access_time_updates_where_allowed() {
        let (path, disk) = image(4096);
        // SAFETY: F_GETFL on an open fd takes no pointer.
        let flags = unsafe { libc::fcntl(disk.as_raw_fd(), libc::F_GETFL) };
        assert!(flags >= 0);
        // The test's own file: its owner may always ask for O_NOATIME.
        assert_ne!(flags & libc::O_NOATIME, 0, "flags {flags:#o}");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn unaligned_images_are_refused() {
        let path = std::env::temp_dir().join(format!("keel-disk-odd-{}", std::process::id()));
        std::fs::write(&path, [0u8; 100]).unwrap();
        let e = RawDisk::open(&path, true).unwrap_err();
        assert!(e.to_string().contains("not a multiple of 512"));
        let _ = std::fs::remove_file(path);
    }
}
