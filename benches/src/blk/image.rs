//! The benchmark's disk image: a regular file written in full (so every block has a real
//! extent, not a hole), and its page cache: how much of it is resident, filling it, emptying it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::pattern::Rng;

const CHUNK: usize = 1 << 20;

/// Writes `size` bytes of pseudo-random data to `path` (replacing it) and syncs it.
pub fn create(path: &Path, size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(CHUNK as u64) {
        bail!("the image size must be a whole number of MiB, not {size} bytes");
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let mut rng = Rng::new(0x6b65_656c);
    let mut chunk = vec![0u8; CHUNK];
    for _ in 0..size / CHUNK as u64 {
        rng.fill(&mut chunk);
        file.write_all(&chunk)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))
}

/// Reads the whole file, which puts it in the page cache (memory permitting).
pub fn warm(path: &Path) -> Result<()> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut chunk = vec![0u8; CHUNK];
    while file
        .read(&mut chunk)
        .with_context(|| format!("reading {}", path.display()))?
        > 0
    {}
    Ok(())
}

/// Writes back and drops the file's cached pages, so that the next reads go to the disk.
pub fn evict(path: &Path) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    file.sync_data()
        .with_context(|| format!("syncing {}", path.display()))?;
    // SAFETY: plain system call on an open descriptor; no memory is passed.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        bail!(
            "posix_fadvise(DONTNEED) on {}: {}",
            path.display(),
            std::io::Error::from_raw_os_error(rc)
        );
    }
    Ok(())
}

/// The share of the file's pages in the page cache, 0 to 1 (`mincore` on a mapping of it).
pub fn residency(path: &Path) -> Result<f64> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file.metadata()?.len() as usize;
    if len == 0 {
        return Ok(0.0);
    }
    // SAFETY: sysconf has no memory arguments.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    // SAFETY: a new shared read-only mapping of an open file; nothing else refers to it, and
    // it is only handed to mincore, never read through, then unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if map == libc::MAP_FAILED {
        bail!(
            "mapping {} to check its page cache: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: `map` is a live mapping of `len` bytes, `vec` has one byte per page of it.
    let rc = unsafe { libc::mincore(map, len, vec.as_mut_ptr()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: unmaps exactly the mapping made above, which nothing uses any more.
    unsafe { libc::munmap(map, len) };
    if rc != 0 {
        bail!("mincore on {}: {err}", path.display());
    }
    let resident = vec.iter().filter(|&&b| b & 1 == 1).count();
    Ok(resident as f64 / vec.len() as f64)
}
