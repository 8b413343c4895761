//! Disk images and the I/O on them. Today: raw files, with synchronous vectored I/O straight
//! between the file and guest buffers (no copy through the VMM).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
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

/// A raw disk image.
/// An iovec over `len` bytes at `ptr`.
pub fn iov(ptr: *mut u8, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: ptr.cast(),
        iov_len: len,
    }
}

#[derive(Debug)]
pub struct RawDisk {
    file: File,
    size: u64,
    read_only: bool,
}

impl RawDisk {
    pub fn open(path: &Path, read_only: bool) -> Result<Self, Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
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

    fn vectored(&self, buffers: &[libc::iovec], offset: u64, write: bool) -> io::Result<()> {
        let mut iov = buffers.to_vec();
        let mut start = 0;
        let mut offset = offset;
        while start < iov.len() {
            let batch = &iov[start..iov.len().min(start + 1024)];
            // SAFETY: every iovec points at a live guest buffer of its length (the caller's
            // guarantee); the kernel reads or writes only inside them.
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
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "past the end of the disk",
                ));
            }
            offset += n as u64;
            // Advance past what was transferred, trimming a partly done buffer.
            let mut done = n as usize;
            while done > 0 && start < iov.len() {
                if done >= iov[start].iov_len {
                    done -= iov[start].iov_len;
                    start += 1;
                } else {
                    // SAFETY: stays inside the same buffer: `done` < its length.
                    iov[start].iov_base =
                        unsafe { iov[start].iov_base.cast::<u8>().add(done) }.cast();
                    iov[start].iov_len -= done;
                    done = 0;
                }
            }
        }
        Ok(())
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
    fn unaligned_images_are_refused() {
        let path = std::env::temp_dir().join(format!("keel-disk-odd-{}", std::process::id()));
        std::fs::write(&path, [0u8; 100]).unwrap();
        let e = RawDisk::open(&path, true).unwrap_err();
        assert!(e.to_string().contains("not a multiple of 512"));
        let _ = std::fs::remove_file(path);
    }
}
