//! The file under a qcow2 image, as the format driver (imago) sees it, and the write order
//! that makes a flush mean what it says.
//!
//! The driver keeps L2 tables and refcount blocks in write-back caches and writes them
//! refcounts first when allocating, L2 entries first when freeing, but without a sync in
//! between: on a power cut the disk may keep any subset of unsynced writes, so an L2 entry
//! could survive without the refcount that owns its cluster, or without the data it points
//! at. Keel gives the driver two views of one file: a data view (guest data, copy-on-write
//! copies, zeroes) and a metadata view. A metadata write first makes everything written
//! before it durable (one `fdatasync`, only when something is unsynced), so on the disk
//! every table update lands after the data and tables it depends on. Metadata is written
//! only when the caches are flushed (a guest flush) or evicted, so a guest that overwrites
//! allocated clusters pays no extra sync, and one that allocates pays a few per flush.
//!
//! The driver writes a few things at once rather than through its caches: the L1 entry of a
//! new L2 table (whose refcount is still in the cache: a crash, even a VMM kill, would leave
//! a table in use with refcount 0), the refcount table and the header. Writes to those
//! ranges are held here (reads see them) and written by [`Durability::commit`], after the
//! caches, when the image is flushed.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::storage::drivers::CommonStorageHelper;
use imago::Storage;

/// What one view writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Data,
    Metadata,
}

/// Writes held back until the image is flushed (see the module documentation).
#[derive(Debug, Default)]
struct Held {
    /// Byte ranges of the file whose writes are held: the header's cluster, the L1 table,
    /// the refcount table.
    ranges: Vec<std::ops::Range<u64>>,
    /// The held writes, in order.
    writes: Vec<(u64, Vec<u8>)>,
}

impl Held {
    fn holds(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        self.ranges.iter().any(|r| offset < r.end && r.start < end)
    }

    /// Lays the held writes over `buf`, read from `offset`.
    fn overlay(&self, buf: &mut [u8], offset: u64) {
        let end = offset + buf.len() as u64;
        for (at, data) in &self.writes {
            let (start, stop) = ((*at).max(offset), (at + data.len() as u64).min(end));
            if start < stop {
                buf[(start - offset) as usize..(stop - offset) as usize]
                    .copy_from_slice(&data[(start - at) as usize..(stop - at) as usize]);
            }
        }
    }
}

#[derive(Debug)]
struct Shared {
    file: File,
    name: String,
    held: std::sync::Mutex<Held>,
    /// Something was written since the last `fdatasync`.
    unsynced: AtomicBool,
    /// The file's size, kept as writes extend it (the driver asks often).
    size: AtomicU64,
    /// `fdatasync` calls made, for the benchmark's account of where time goes.
    syncs: AtomicU64,
}

/// One view of an image file.
#[derive(Debug)]
pub struct ImageFile {
    shared: Arc<Shared>,
    role: Role,
    helper: CommonStorageHelper,
}

impl ImageFile {
    /// The data and metadata views of `file` (named `name` in messages); metadata writes to
    /// `held` ranges wait for [`Durability::commit`].
    pub fn views(
        file: File,
        name: &str,
        held: Vec<std::ops::Range<u64>>,
    ) -> io::Result<(ImageFile, ImageFile)> {
        let size = file.metadata()?.len();
        let shared = Arc::new(Shared {
            file,
            name: name.to_string(),
            held: std::sync::Mutex::new(Held {
                ranges: held,
                writes: Vec::new(),
            }),
            unsynced: AtomicBool::new(false),
            size: AtomicU64::new(size),
            syncs: AtomicU64::new(0),
        });
        let view = |role| ImageFile {
            shared: shared.clone(),
            role,
            helper: CommonStorageHelper::default(),
        };
        Ok((view(Role::Data), view(Role::Metadata)))
    }

    /// Reads or writes `buffers` in full at `offset` of the file: the driver's own I/O, and
    /// the direct path of guest I/O on clusters mapped here, straight between guest memory
    /// and the file. Past the file's end a read gets zeroes (clusters not written yet). The
    /// iovecs must point at live memory of their lengths for the call.
    pub fn transfer(&self, buffers: &[libc::iovec], offset: u64, write: bool) -> io::Result<()> {
        let end = offset + buffers.iter().map(|b| b.iov_len as u64).sum::<u64>();
        crate::vectored::transfer_all(
            self.fd(),
            buffers,
            offset,
            write,
            crate::vectored::PastEnd::Zeroes,
        )?;
        if write {
            self.wrote(end);
        }
        Ok(())
    }

    /// What flushes the file: held writes and syncs.
    pub fn durability(&self) -> Durability {
        Durability(self.shared.clone())
    }

    /// Which file this is a view of (the same for both views of one file).
    pub fn file_id(&self) -> usize {
        Arc::as_ptr(&self.shared) as usize
    }

    /// `fdatasync` calls made on the file so far (both views).
    pub fn syncs(&self) -> u64 {
        self.shared.syncs.load(Ordering::Relaxed)
    }

    fn fd(&self) -> RawFd {
        self.shared.file.as_raw_fd()
    }

    fn sync_now(&self) -> io::Result<()> {
        // Cleared first: a write racing the sync marks the file unsynced again.
        self.shared.unsynced.store(false, Ordering::Release);
        self.shared.syncs.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.shared.file.sync_data() {
            self.shared.unsynced.store(true, Ordering::Release);
            return Err(e);
        }
        Ok(())
    }

    /// Writes `data` at `offset` to the file now.
    fn write_through(&self, data: &[u8], offset: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.shared.file.write_all_at(data, offset)?;
        self.wrote(offset + data.len() as u64);
        Ok(())
    }

    fn wrote(&self, end: u64) {
        self.shared.unsynced.store(true, Ordering::Release);
        self.shared.size.fetch_max(end, Ordering::Relaxed);
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        fallocate(&self.shared.file, mode, offset, len)
    }
}

fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(at), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::other("range past what a file can hold"));
    };
    // SAFETY: fallocate on an open descriptor with plain integer arguments.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, at, n) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Gives the host file system back the space of `len` bytes at `offset` of `file` (clusters
/// an image freed; they read as zeroes until reused).
pub fn punch(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

impl Shared {
    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The end of a flush of one image file: held writes go to the file after everything they
/// depend on is durable, and are made durable themselves.
#[derive(Debug, Clone)]
pub struct Durability(Arc<Shared>);

impl Durability {
    /// Writes the held writes (after a sync, when anything is unsynced) and syncs.
    pub fn commit(&self) -> io::Result<()> {
        let writes = std::mem::take(&mut self.0.held().writes);
        if writes.is_empty() {
            return Ok(());
        }
        let view = ImageFile {
            shared: self.0.clone(),
            role: Role::Data,
            helper: CommonStorageHelper::default(),
        };
        if self.0.unsynced.load(Ordering::Acquire) {
            view.sync_now()?;
        }
        for (at, data) in &writes {
            if let Err(e) = view.write_through(data, *at) {
                // Put them back: a later flush tries again.
                let mut held = self.0.held();
                let later = std::mem::take(&mut held.writes);
                held.writes = writes;
                held.writes.extend(later);
                return Err(e);
            }
        }
        view.sync_now()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The image is closed: what the driver wrote last (at its own close) is written now.
        let writes = std::mem::take(&mut self.held().writes);
        if writes.is_empty() {
            return;
        }
        let _ = self.file.sync_data();
        for (at, data) in &writes {
            use std::os::unix::fs::FileExt;
            if let Err(e) = self.file.write_all_at(data, *at) {
                eprintln!(
                    "keel: disk {}: writing its tables at close failed: {e}",
                    self.name
                );
                return;
            }
        }
        let _ = self.file.sync_data();
    }
}

impl fmt::Display for ImageFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.shared.name)
    }
}

impl Storage for ImageFile {
    fn size(&self) -> io::Result<u64> {
        Ok(self.shared.size.load(Ordering::Relaxed))
    }

    unsafe fn pure_readv(&self, mut bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
        if self.role == Role::Metadata {
            let held = self.shared.held();
            if !held.writes.is_empty() && held.holds(offset, bufv.len()) {
                // Read into a buffer, lay the held writes over it, copy out.
                let mut buf = vec![0u8; bufv.len() as usize];
                drop(held);
                use std::os::unix::fs::FileExt;
                let mut done = 0;
                while done < buf.len() {
                    match self
                        .shared
                        .file
                        .read_at(&mut buf[done..], offset + done as u64)
                    {
                        Ok(0) => break,
                        Ok(n) => done += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                self.shared.held().overlay(&mut buf, offset);
                bufv.copy_from_slice(&buf);
                return Ok(());
            }
        }
        // SAFETY: the iovecs describe `bufv`'s buffers, which live across the call.
        self.transfer(unsafe { bufv.as_iovec() }, offset, false)
    }

    unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<()> {
        if self.role == Role::Metadata {
            let mut held = self.shared.held();
            if held.holds(offset, bufv.len()) {
                let mut data = vec![0u8; bufv.len() as usize];
                bufv.copy_into_slice(&mut data);
                held.writes.push((offset, data));
                return Ok(());
            }
        }
        if self.role == Role::Metadata && self.shared.unsynced.load(Ordering::Acquire) {
            self.sync_now()?;
        }
        // SAFETY: as for reads.
        self.transfer(unsafe { bufv.as_iovec() }, offset, true)
    }

    unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        // Zeroes are what a new table or cluster starts as: nothing refers to them yet.
        let end = offset.saturating_add(length);
        if self
            .fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, length)
            .is_ok()
        {
            self.wrote(end);
            return Ok(());
        }
        let zeroes = vec![0u8; length.min(1 << 20) as usize];
        let mut at = offset;
        while at < end {
            let n = (end - at).min(zeroes.len() as u64) as usize;
            // SAFETY: `zeroes` lives across the call.
            unsafe { self.pure_writev(IoVector::from(&zeroes[..n]), at) }?;
            at += n as u64;
        }
        Ok(())
    }

    unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        // SAFETY: the same contract.
        unsafe { self.pure_write_zeroes(offset, length) }
    }

    unsafe fn pure_discard(&self, offset: u64, length: u64) -> io::Result<()> {
        punch(&self.shared.file, offset, length)?;
        self.wrote(0);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        // Nothing is buffered here.
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        if self.shared.unsynced.load(Ordering::Acquire) {
            self.sync_now()?;
        }
        Ok(())
    }

    unsafe fn invalidate_cache(&self) -> io::Result<()> {
        Ok(())
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        &self.helper
    }
}
