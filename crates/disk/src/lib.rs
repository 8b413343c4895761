//! Disk images and the I/O on them. Today: raw files, with vectored I/O straight between the
//! file and guest buffers (no copy through the VMM): synchronous here, asynchronous through
//! an io_uring in [`uring`]. A file may be opened for direct I/O (`O_DIRECT`, the host's
//! page cache bypassed); see [`direct`] for its alignment rules and the bounce buffer that
//! carries a transfer whose buffers do not meet them.

pub mod boot;
pub mod copy;
pub mod direct;
pub mod image;
mod lock;
pub mod qcow2;
pub mod uring;
pub mod vectored;
pub mod vmdk;

pub use image::{Format, Image, ImageFiles};
pub use lock::{arbiter_first, lock, unlock, write_locked};

use direct::{DioAlign, Refusal, BOUNCE_CHUNK};

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
    #[error("disk {path}: direct=on: its file system refuses O_DIRECT ({source}); use direct=off")]
    DirectRefused {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk {path} is in use: {holder} holds its lock; a writable image is used by one VM at a time, and a read-only one only beside other readers")]
    Locked { path: PathBuf, holder: &'static str },
    #[error("disk {path}: locking it failed: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk {path}: direct=on: its file system does no direct I/O on it (statx reports no direct-I/O alignment); use direct=off")]
    DirectUnsupported { path: PathBuf },
    #[error("disk {path}: direct=on: direct I/O on it needs offsets aligned to {offset} bytes ({how}), more than Keel's 512-byte sectors; use direct=off")]
    DirectCoarse {
        path: PathBuf,
        offset: u32,
        how: &'static str,
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
    /// Opened with `O_DIRECT`, with these alignment rules.
    direct: Option<DioAlign>,
}

impl RawDisk {
    /// Opens the image through the host's page cache. It is opened with `O_NOATIME` where
    /// the caller may (it owns the file, or has CAP_FOWNER): a guest's reads then do not
    /// update the image's access time, which costs the kernel a clock read and a check on
    /// every read (and, under `relatime`, an inode write after each write); otherwise
    /// without it.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, Error> {
        Self::open_with(path, read_only, false)
    }

    /// [`RawDisk::open`], with `O_DIRECT` when `direct` is set: reads and writes bypass the
    /// host's page cache (a write is still only durable after [`RawDisk::flush`]). Refused
    /// when the file system refuses `O_DIRECT` or its direct-I/O offset alignment
    /// (`statx(STATX_DIOALIGN)`, 4096 assumed when it reports none) is coarser than a
    /// 512-byte sector.
    pub fn open_with(path: &Path, read_only: bool, direct: bool) -> Result<Self, Error> {
        let file = Self::open_file(path, read_only, direct)?;
        Self::from_file(file, path, read_only, direct)
    }

    /// Opens the image file as [`RawDisk::open_with`] would, and takes its lock, without
    /// checking it further: for a launcher that hands the descriptor to a VMM, which makes
    /// it a disk with [`RawDisk::from_file`].
    pub fn open_file(path: &Path, read_only: bool, direct: bool) -> Result<File, Error> {
        let extra = if direct { libc::O_DIRECT } else { 0 };
        let open = |flags| {
            OpenOptions::new()
                .read(true)
                .write(!read_only)
                .custom_flags(flags | extra)
                .open(path)
        };
        let file = match open(libc::O_NOATIME) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0),
            result => result,
        }
        .map_err(|source| {
            let path = path.to_path_buf();
            if direct && source.raw_os_error() == Some(libc::EINVAL) {
                Error::DirectRefused { path, source }
            } else {
                Error::Open { path, source }
            }
        })?;
        lock(&file, path, read_only)?;
        Ok(file)
    }

    /// The disk on an image file opened already (by [`RawDisk::open_file`], or by the host
    /// daemon, which hands it over as a descriptor); `path` names it in messages. The file's
    /// lock is taken (again: a lock its opener took on the same open file stays).
    pub fn from_file(
        file: File,
        path: &Path,
        read_only: bool,
        direct: bool,
    ) -> Result<Self, Error> {
        Self::from_file_locking(file, path, read_only, direct, true)
    }

    /// [`RawDisk::from_file`], taking the lock only when `take_lock` (see
    /// [`image::ImageFiles::lock_deferred`]).
    pub fn from_file_locking(
        file: File,
        path: &Path,
        read_only: bool,
        direct: bool,
        take_lock: bool,
    ) -> Result<Self, Error> {
        if take_lock {
            lock(&file, path, read_only)?;
        }
        let direct = if direct {
            let report = direct::statx_dioalign(file.as_raw_fd());
            let align = direct::alignment(report).map_err(|refusal| match refusal {
                Refusal::Unsupported => Error::DirectUnsupported {
                    path: path.to_path_buf(),
                },
                Refusal::Coarse { offset, reported } => Error::DirectCoarse {
                    path: path.to_path_buf(),
                    offset,
                    how: if reported {
                        "as statx STATX_DIOALIGN reports"
                    } else {
                        "assumed: its file system does not report it through statx STATX_DIOALIGN"
                    },
                },
            })?;
            Some(align)
        } else {
            None
        };
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
            direct,
        })
    }

    /// A read-only disk on `file` without taking its lock (disk boot's view of a disk whose
    /// VM holds the lock on the same open file).
    pub fn unlocked_reader(file: File, path: &Path) -> Result<Self, Error> {
        let size = file
            .metadata()
            .map_err(|source| Error::Size {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        Ok(Self {
            file,
            size,
            read_only: true,
            direct: None,
        })
    }

    /// The direct-I/O alignment, when the file was opened with `O_DIRECT`.
    pub fn direct(&self) -> Option<DioAlign> {
        self.direct
    }

    /// Whether a transfer of `buffers` at `offset` can go straight between them and the file
    /// (always, without direct I/O); otherwise [`RawDisk::read_at`] and
    /// [`RawDisk::write_at`] carry it through a bounce buffer.
    pub fn fits(&self, buffers: &[libc::iovec], offset: u64) -> bool {
        self.direct.is_none_or(|a| a.fits(buffers, offset))
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Reads into `buffers` in full from `offset`, or fails; a short read past the end is an
    /// error. The iovecs must point at live memory of their lengths for the call. With
    /// direct I/O, buffers that do not meet its rules are read through a bounce buffer.
    pub fn read_at(&self, buffers: &[libc::iovec], offset: u64) -> io::Result<()> {
        self.transfer_at(buffers, offset, false)
    }

    /// Writes `buffers` in full at `offset`: when this returns Ok the data is in the file.
    /// With direct I/O, buffers that do not meet its rules are written through a bounce
    /// buffer.
    pub fn write_at(&self, buffers: &[libc::iovec], offset: u64) -> io::Result<()> {
        self.transfer_at(buffers, offset, true)
    }

    fn transfer_at(&self, buffers: &[libc::iovec], offset: u64, write: bool) -> io::Result<()> {
        if self.fits(buffers, offset) {
            match self.vectored(buffers, offset, write) {
                // Buffers that met the rules as statx gave them and still did not suit the
                // file system go through the bounce buffer rather than fail.
                Err(e) if self.direct.is_some() && e.raw_os_error() == Some(libc::EINVAL) => {}
                result => return result,
            }
        }
        self.bounced(buffers, offset, write)
    }

    /// [`RawDisk::read_at`] or [`RawDisk::write_at`] through an aligned bounce buffer, at most
    /// [`BOUNCE_CHUNK`] bytes at a time, whatever the buffers' alignment. For a file opened
    /// with direct I/O, the offset and the total length must be multiples of its offset
    /// alignment (a sector at most, as the file was checked when it was opened).
    pub fn bounced(&self, buffers: &[libc::iovec], offset: u64, write: bool) -> io::Result<()> {
        let total: usize = buffers.iter().map(|b| b.iov_len).sum();
        let (align, unit) = match self.direct {
            Some(a) => (a.bounce_align(), u64::from(a.offset.max(1))),
            None => (4096, 1),
        };
        if !offset.is_multiple_of(unit) || !(total as u64).is_multiple_of(unit) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("direct I/O of {total} bytes at {offset}: not in whole {unit}-byte units"),
            ));
        }
        let mut bounce = direct::Bounce::new(total.min(BOUNCE_CHUNK), align)?;
        let mut done = 0;
        while done < total {
            // BOUNCE_CHUNK is a multiple of any offset alignment up to a sector.
            let n = (total - done).min(bounce.capacity());
            let at = offset + done as u64;
            let piece = [bounce.iov(n)];
            if write {
                // SAFETY: the caller's iovecs point at live memory of their lengths.
                unsafe { bounce.gather(buffers, done, n) };
                self.vectored(&piece, at, true)?;
            } else {
                self.vectored(&piece, at, false)?;
                // SAFETY: as above.
                unsafe { bounce.scatter(buffers, done, n) };
            }
            done += n;
        }
        Ok(())
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
        vectored::transfer_all(
            self.file.as_raw_fd(),
            buffers,
            offset,
            write,
            vectored::PastEnd::Error,
        )
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
    /// Returns the bytes of zeroes written by hand: 0 when the file system zeroed the range
    /// itself, `len` when it could not.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<u64> {
        let first = if may_unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        if self.fallocate(first, offset, len).is_ok() {
            return Ok(0);
        }
        // Page-aligned, so that direct I/O takes it as it is.
        let mut zeroes = direct::Bounce::new(64 * 1024, 4096)?;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.capacity() as u64) as usize;
            self.write_at(&[zeroes.iov(n)], offset + done)?;
            done += n as u64;
        }
        Ok(len)
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

    fn direct_image(name: &str, bytes: usize) -> (PathBuf, RawDisk) {
        let path =
            std::env::temp_dir().join(format!("keel-disk-direct-{}-{name}", std::process::id()));
        let data: Vec<u8> = (0..bytes).map(|i| (i / 512) as u8 ^ (i as u8)).collect();
        std::fs::write(&path, data).unwrap();
        let disk = RawDisk::open_with(&path, false, true)
            .expect("O_DIRECT on TMPDIR: run the tests with TMPDIR on a disk-backed file system");
        (path, disk)
    }

    fn expected(offset: usize, len: usize) -> Vec<u8> {
        (offset..offset + len)
            .map(|i| (i / 512) as u8 ^ (i as u8))
            .collect()
    }

    #[test]
    fn direct_images_are_opened_with_o_direct_and_their_alignment() {
        let (path, disk) = direct_image("flags", 8192);
        // SAFETY: F_GETFL on an open fd takes no pointer.
        let flags = unsafe { libc::fcntl(disk.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(flags & libc::O_DIRECT, 0, "flags {flags:#o}");
        assert_ne!(flags & libc::O_NOATIME, 0, "flags {flags:#o}");
        let align = disk.direct().unwrap();
        assert!(align.offset <= 512 && align.mem > 0, "{align:?}");
        // Its lock goes with it: only then may the image be opened for writing again.
        drop(disk);
        assert_eq!(RawDisk::open(&path, false).unwrap().direct(), None);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_writable_image_is_locked_against_every_other_open_and_a_read_only_one_is_shared() {
        let path = std::env::temp_dir().join(format!("keel-lock-{}.img", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let writer = RawDisk::open(&path, false).unwrap();
        for read_only in [false, true] {
            let Err(e) = RawDisk::open(&path, read_only) else {
                panic!("opened while written (read_only {read_only})");
            };
            assert!(matches!(e, Error::Locked { .. }), "{e}");
            assert!(e.to_string().contains("is in use"), "{e}");
        }
        drop(writer);
        let readers = [
            RawDisk::open(&path, true).unwrap(),
            RawDisk::open(&path, true).unwrap(),
        ];
        let Err(e) = RawDisk::open(&path, false) else {
            panic!("opened for writing while read");
        };
        assert!(matches!(e, Error::Locked { .. }), "{e}");
        drop(readers);
        RawDisk::open(&path, false).unwrap();
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn direct_aligned_transfers_go_straight_to_the_file() {
        let (path, disk) = direct_image("aligned", 64 * 1024);
        let mut a = direct::Bounce::new(4096, 4096).unwrap();
        let mut b = direct::Bounce::new(8192, 4096).unwrap();
        let bufs = [a.iov(4096), b.iov(8192)];
        assert!(disk.fits(&bufs, 8192));
        // SAFETY: the iovecs point at `a` and `b`, live for these calls.
        unsafe {
            std::ptr::write_bytes(bufs[0].iov_base.cast::<u8>(), 0x11, 4096);
            std::ptr::write_bytes(bufs[1].iov_base.cast::<u8>(), 0x22, 8192);
        }
        disk.write_at(&bufs, 8192).unwrap();
        disk.flush().unwrap();
        let file = std::fs::read(&path).unwrap();
        assert!(file[8192..12288].iter().all(|&x| x == 0x11));
        assert!(file[12288..20480].iter().all(|&x| x == 0x22));
        assert_eq!(&file[..8192], &expected(0, 8192)[..]);
        let mut c = direct::Bounce::new(16384, 4096).unwrap();
        let back = [c.iov(16384)];
        disk.read_at(&back, 4096).unwrap();
        let mut out = vec![0u8; 16384];
        // SAFETY: `out` is live for the call.
        unsafe { c.scatter(&[iov(out.as_mut_ptr(), 16384)], 0, 16384) };
        assert_eq!(out, file[4096..20480]);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn direct_misaligned_buffers_go_through_a_bounce_buffer() {
        let (path, disk) = direct_image("misaligned", 4 << 20);
        // Odd addresses and lengths that are not sectors, in three iovecs: 3 MiB + 512 in all,
        // more than one bounce buffer's worth.
        let mut mem = vec![0u8; (3 << 20) + 4096];
        let base = mem.as_mut_ptr().wrapping_add(1);
        let lens = [100usize, (3 << 20) - 200, 612];
        let mut bufs = Vec::new();
        let mut at = 0;
        for len in lens {
            bufs.push(iov(base.wrapping_add(at), len));
            at += len + 3;
        }
        let total: usize = lens.iter().sum();
        assert_eq!(total, (3 << 20) + 512);
        assert!(!disk.fits(&bufs, 512));
        let pattern = |i: usize| (i % 251) as u8;
        let mut k = 0;
        for b in &bufs {
            for j in 0..b.iov_len {
                // SAFETY: inside `mem`, which `bufs` points into.
                unsafe { *b.iov_base.cast::<u8>().add(j) = pattern(k) };
                k += 1;
            }
        }
        disk.write_at(&bufs, 512).unwrap();
        let file = std::fs::read(&path).unwrap();
        assert!((0..total).all(|i| file[512 + i] == pattern(i)), "written");
        assert_eq!(&file[..512], &expected(0, 512)[..]);
        assert_eq!(
            &file[512 + total..],
            &expected(512 + total, file.len() - 512 - total)[..]
        );
        // Read back the file's first bytes into the same odd buffers.
        disk.read_at(&bufs, 0).unwrap();
        let mut k = 0;
        for b in &bufs {
            for j in 0..b.iov_len {
                // SAFETY: as above.
                let got = unsafe { *b.iov_base.cast::<u8>().add(j) };
                assert_eq!(got, file[k], "byte {k}");
                k += 1;
            }
        }
        drop(mem);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn direct_transfers_of_partial_sectors_are_refused_not_attempted() {
        let (path, disk) = direct_image("partial", 8192);
        let mut buf = vec![0u8; 100];
        let e = disk.read_at(&[iov(buf.as_mut_ptr(), 100)], 0).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        disk.write_zeroes(512, 1024, false).unwrap();
        let file = std::fs::read(&path).unwrap();
        assert!(file[512..1536].iter().all(|&x| x == 0));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn direct_is_refused_where_the_file_system_reports_no_alignment() {
        // This kernel's tmpfs takes O_DIRECT but reports no STATX_DIOALIGN: 4096 is assumed,
        // coarser than a sector, so the start fails with what to do.
        let shm = Path::new("/dev/shm");
        assert!(shm.is_dir(), "this test needs a tmpfs at /dev/shm");
        let path = shm.join(format!("keel-disk-direct-{}", std::process::id()));
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let file = File::open(&path).unwrap();
        assert_eq!(
            direct::statx_dioalign(file.as_raw_fd()),
            None,
            "tmpfs reports its direct-I/O alignment now: find another file system for this test"
        );
        let e = RawDisk::open_with(&path, false, true).unwrap_err();
        let _ = std::fs::remove_file(&path);
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("disk {}: direct=on:", path.display())),
            "{msg}"
        );
        assert!(msg.contains("4096 bytes"), "{msg}");
        assert!(msg.contains("does not report it"), "{msg}");
        assert!(msg.ends_with("use direct=off"), "{msg}");
        assert!(!msg.contains('\n'));
    }
}
