//! The source's pages for a live migration: read from the VMM's memfd (through /proc) and
//! sent to the target in batches, at most at the operator's rate.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use super::migrate_out::{cancelled, Failed};
use super::migration_link::Link;
use crate::migration::{self as wire, Outgoing, BATCH_PAGES, PAGE};

/// The VMM's memfd, opened through /proc: checked to be a memfd of the guest's size (the
/// VMM is not trusted to name the right descriptor).
pub(super) fn open_memfd(
    pid: u32,
    fd: i32,
    memory_bytes: u64,
) -> std::result::Result<File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = format!("/proc/{pid}/fd/{fd}");
    let target = std::fs::read_link(&path).map_err(|e| format!("reading {path}: {e}"))?;
    if !target.to_string_lossy().starts_with("/memfd:") {
        return Err(format!("{path} is {}, not guest memory", target.display()));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
        .map_err(|e| format!("opening {path}: {e}"))?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    if len != memory_bytes {
        return Err(format!(
            "{path} holds {len} bytes, the guest {memory_bytes}"
        ));
    }
    Ok(file)
}

/// Sends guest pages from the memfd in batches, at most at the operator's rate.
pub(super) struct Sender<'a> {
    pub link: &'a mut Link,
    memfd: &'a File,
    outgoing: &'a Outgoing,
    limit: Option<u64>,
    batch: Vec<(u64, Vec<u8>)>,
    sent: u64,
    since: Instant,
}

impl<'a> Sender<'a> {
    pub fn new(
        link: &'a mut Link,
        memfd: &'a File,
        outgoing: &'a Outgoing,
        limit: Option<u64>,
    ) -> Self {
        Sender {
            link,
            memfd,
            outgoing,
            limit,
            batch: Vec::new(),
            sent: 0,
            since: Instant::now(),
        }
    }

    /// Bytes per second sent since the migration's first page.
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.since.elapsed().as_secs_f64().max(1e-6)
    }

    /// Every page of the memfd's data extents that is not all zero (a new memfd on the
    /// target reads as zeros).
    pub fn send_extents(&mut self, pages: u64) -> std::result::Result<(), Failed> {
        use std::os::fd::AsRawFd;
        let len = (pages * PAGE as u64) as i64;
        let fd = self.memfd.as_raw_fd();
        let mut at = 0i64;
        let mut chunk = vec![0u8; BATCH_PAGES * PAGE];
        while at < len {
            // SAFETY: lseek on a descriptor this process holds; the result is checked.
            let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
            if data < 0 {
                break; // ENXIO: no data after `at`.
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) }.max(data);
            let mut offset = data;
            while offset < hole.min(len) {
                let n = ((hole.min(len) - offset) as usize).min(chunk.len());
                self.memfd
                    .read_exact_at(&mut chunk[..n], offset as u64)
                    .map_err(|e| format!("reading guest memory: {e}"))?;
                for (i, page) in chunk[..n].chunks_exact(PAGE).enumerate() {
                    if page.iter().any(|&b| b != 0) {
                        let number = offset as u64 / PAGE as u64 + i as u64;
                        self.push(number, page.to_vec())?;
                    }
                }
                offset += n as i64;
            }
            at = hole.max(offset);
        }
        self.flush()
    }

    /// The pages named, read from the memfd now.
    pub fn send_pages(
        &mut self,
        pages: impl Iterator<Item = u64>,
    ) -> std::result::Result<(), Failed> {
        for number in pages {
            let mut page = vec![0u8; PAGE];
            self.memfd
                .read_exact_at(&mut page, number * PAGE as u64)
                .map_err(|e| format!("reading guest memory: {e}"))?;
            self.push(number, page)?;
        }
        self.flush()
    }

    fn push(&mut self, number: u64, page: Vec<u8>) -> std::result::Result<(), Failed> {
        self.batch.push((number, page));
        if self.batch.len() == BATCH_PAGES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> std::result::Result<(), Failed> {
        if self.batch.is_empty() {
            return Ok(());
        }
        if self.outgoing.is_cancelled() {
            return Err(cancelled());
        }
        let pages: Vec<(u64, &[u8])> = self.batch.iter().map(|(n, p)| (*n, &p[..])).collect();
        let body = wire::encode_pages(&pages);
        let bytes = (self.batch.len() * PAGE) as u64;
        self.batch.clear();
        self.link.send_pages(body)?;
        self.sent += bytes;
        self.outgoing.update(|p| p.bytes_sent += bytes);
        if let Some(limit) = self.limit {
            // Hold the average at the limit.
            let due = Duration::from_secs_f64(self.sent as f64 / limit.max(1) as f64);
            if let Some(wait) = due.checked_sub(self.since.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(())
    }
}
