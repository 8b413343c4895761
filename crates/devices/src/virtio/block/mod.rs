//! virtio-blk on a raw file: read, write, flush, get-id, discard, write-zeroes. A write is
//! completed to the guest only after all of it is in the file; a flush only after
//! `fdatasync` has returned.
//!
//! Two I/O engines, chosen when the device is made:
//!
//! - **hybrid** (the default): a read first tries `preadv2(RWF_NOWAIT)` on the event-loop
//!   thread, which the kernel serves from the page cache only and never blocks; when every
//!   byte was cached the request completes at once. Otherwise the rest of it (the bytes not
//!   yet read) goes on an io_uring, as do every write (`IORING_OP_WRITEV`) and flush
//!   (`IORING_OP_FSYNC` with `IORING_FSYNC_DATASYNC`). The ring's eventfd is an event source
//!   of the device; [`VirtioDevice::process_event`] reaps the completions and finishes the
//!   requests. A short transfer is submitted again for the rest; no progress (the end of the
//!   file) or an error is IOERR. Nothing is acknowledged short. See [`inflight`] for the
//!   per-request state and how a flush is ordered behind the writes before it.
//! - **synchronous**: `preadv`/`pwritev`/`fdatasync` on the event-loop thread, each request
//!   completed before the next is looked at. The fallback where no io_uring can be made (an
//!   old kernel, `kernel.io_uring_disabled`, a seccomp filter, RLIMIT_MEMLOCK).
//!
//! **Direct I/O** (the disk opened with `O_DIRECT`, `direct=on`): the hybrid engine skips
//! the `RWF_NOWAIT` read, which has no page cache to read from, and puts every read and
//! write whose guest buffers meet the file's direct-I/O alignment on the ring, straight
//! between guest memory and the file as without it. A request whose buffers do not (any
//! address and length a guest may give, as long as the whole is sectors) is served at once
//! on the event-loop thread through an aligned bounce buffer (`RawDisk::bounced`): read into
//! it then copied out, or copied in then written. It completes to the guest only when it is
//! in the file, before any later request is looked at, so a flush that arrives after it
//! (held or not) starts its `fdatasync` after it and covers it; requests in flight beside it
//! are unordered against it, as they are against each other on the ring. A ring transfer
//! the file system refuses with EINVAL despite meeting the alignment goes the same way. The
//! synchronous engine bounces inside `RawDisk::read_at`/`write_at`.
//!
//! Discard and write-zeroes are `fallocate` calls made synchronously with either engine: they
//! are rare, change only metadata, and write-zeroes falls back to writing zeroes where the
//! file system cannot zero a range. A flush that arrives later covers them.
//!
//! A reset with requests in flight waits for them, at most [`RESET_WAIT`], dropping their
//! completions (no status byte, no used entry: the driver has given the rings up). Requests
//! still in the kernel after that are orphaned: their slots stay taken until their
//! completions arrive, which are then dropped. Until then a read among them may still put
//! data in its guest buffers, as a real disk's DMA might; nothing touches the rings.

mod engine;
pub mod errors;
pub mod inflight;
mod persist;
pub mod request;
#[cfg(test)]
mod tests;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arch::GuestMemoryMmap;
use disk::uring::Uring;
use disk::Image;
use virtio_queue::Queue;

use self::errors::ErrorLog;
use self::inflight::{Inflight, IoVecs};
use self::request::{Descriptor, Segment, ID_BYTES, SECTOR_SHIFT};
use super::device::{
    read_config_bytes, DeviceError, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::rate_limiter::RateLimiter;

const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;

pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request (the queue size less header and status).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Discard / write-zeroes: segments per request and sectors per segment.
const MAX_DISCARD_SEGMENTS: u32 = 1;
const MAX_DISCARD_SECTORS: u32 = u32::MAX >> SECTOR_SHIFT;
/// Write-zeroes: sectors per segment (16 MiB). Where the file system cannot zero a range,
/// the zeroes are written by hand on the event loop: this bounds one request's share.
const MAX_WRITE_ZEROES_SECTORS: u32 = 32768;
const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
/// Bytes of synchronous work (reads and writes of the synchronous engine, bounced direct
/// I/O, write-zeroes written by hand) one turn of the event loop does for this disk; past
/// it the device yields and resumes on its next turn, so other devices, the console and
/// the control socket are served meanwhile.
pub const SYNC_BUDGET_PER_TURN: u64 = 64 << 20;

/// Event token of the rate limiter's timer.
pub const RATE_LIMIT_TIMER: u32 = 0;
/// Event token of the io_uring's completion eventfd.
pub const COMPLETIONS: u32 = 1;
/// Event token of the device's own wake-up after it yielded its turn.
pub const RESUME: u32 = 2;

/// Longest a reset waits for requests in flight before orphaning them.
pub const RESET_WAIT: Duration = Duration::from_secs(5);
/// How long a pause waits for the disk requests in flight to complete.
pub const SETTLE_WAIT: Duration = Duration::from_secs(10);

/// Which engine to try; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineChoice {
    /// The hybrid engine, or the synchronous one where no io_uring can be made.
    Hybrid,
    /// The synchronous engine, always.
    Synchronous,
}

/// Name of the hybrid engine, as [`Block::engine`] gives it.
pub const ENGINE_HYBRID: &str = "hybrid (preadv2 RWF_NOWAIT, io_uring)";
/// Name of the synchronous engine.
pub const ENGINE_SYNCHRONOUS: &str = "synchronous (preadv/pwritev/fdatasync)";

/// Counts of what the engine did, readable while the device runs.
#[derive(Debug, Default)]
pub struct BlockStats {
    /// Reads served in full from the page cache by `preadv2(RWF_NOWAIT)`.
    pub reads_inline: AtomicU64,
    /// Reads that went on the io_uring (in part or whole).
    pub reads_ring: AtomicU64,
    /// Of those, reads whose first part the page cache held: only the rest went on the ring.
    pub reads_partly_inline: AtomicU64,
    pub writes_ring: AtomicU64,
    pub flushes_ring: AtomicU64,
    /// Flushes that waited for writes before them to complete.
    pub flushes_waited: AtomicU64,
    /// Operations submitted again: the rest of a short transfer, or a retry after EAGAIN.
    pub resubmits: AtomicU64,
    /// Reads and writes carried through a direct-I/O bounce buffer, synchronously: their
    /// guest buffers did not meet `O_DIRECT`'s alignment.
    pub bounced: AtomicU64,
    /// Requests a reset stopped waiting for.
    pub orphaned: AtomicU64,
    /// Times the device stopped taking chains from a ring that had more because every
    /// in-flight slot was taken: those chains wait there until a completion frees one.
    pub held_back: AtomicU64,
    /// Requests answered with an error status (each with its cause in [`errors`]).
    pub failed: AtomicU64,
    /// Turns the device yielded with requests left, its synchronous budget spent.
    pub yielded: AtomicU64,
    /// Requests taken from the ring, and their data bytes, by kind (for the operator's
    /// metrics; failed ones included, counted again in `failed`).
    pub read_requests: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_requests: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flush_requests: AtomicU64,
    /// Discard, write-zeroes, get-id and unsupported requests.
    pub other_requests: AtomicU64,
    /// Times the rate limiter made a request wait in the ring.
    pub throttled: AtomicU64,
}

impl BlockStats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a request taken from the ring.
    fn taken(&self, kind: &request::RequestKind, bytes: u64) {
        use request::RequestKind as K;
        match kind {
            K::Read => {
                Self::add(&self.read_requests, 1);
                Self::add(&self.read_bytes, bytes);
            }
            K::Write => {
                Self::add(&self.write_requests, 1);
                Self::add(&self.write_bytes, bytes);
            }
            K::Flush => Self::add(&self.flush_requests, 1),
            _ => Self::add(&self.other_requests, 1),
        }
    }
}

/// Buffers reused from request to request, so that serving one allocates nothing.
#[derive(Default)]
struct Scratch {
    descs: Vec<Descriptor>,
    segments: Vec<Segment>,
    /// Iovecs of requests served synchronously.
    iov: IoVecs,
    reaped: Vec<(u64, i32)>,
    /// Flushes the ring refused: (head, status address), answered IOERR.
    failed: Vec<(u16, vm_memory::GuestAddress)>,
}

pub struct Block {
    disk: Arc<Image>,
    /// None: the synchronous engine.
    ring: Option<Uring>,
    /// The ring of an image the device no longer serves (see [`VirtioDevice::switch_disk`]).
    retired_ring: Option<Uring>,
    /// Why the hybrid engine was asked for and not given.
    fallback: Option<String>,
    /// Reads try the page cache first; off with direct I/O, cleared if the file system
    /// refuses `RWF_NOWAIT`.
    nowait: bool,
    inflight: Inflight,
    /// Chains were left in the ring for want of a free slot.
    held_back: bool,
    reset_wait: Duration,
    scratch: Scratch,
    stats: Arc<BlockStats>,
    limiter: RateLimiter,
    /// Failed requests: counted, logged at a limited rate.
    errors: ErrorLog,
    /// A flush failed: every later one fails too (see [`errors`]).
    flush_failed: bool,
    /// Synchronous bytes done in this turn (see [`SYNC_BUDGET_PER_TURN`]).
    sync_bytes: u64,
    /// Written when the device yields its turn; wakes it on the next.
    resume: Option<vmm_sys_util::eventfd::EventFd>,
    serial: [u8; ID_BYTES],
    features: u64,
    config: Vec<u8>,
}

fn build_config(capacity_sectors: u64) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    c[0..8].copy_from_slice(&capacity_sectors.to_le_bytes());
    c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    c[40..44].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
    c[44..48].copy_from_slice(&1u32.to_le_bytes());
    c[48..52].copy_from_slice(&MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
    c[52..56].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
    c[56] = 1;
    c
}

/// Whether reads of `disk` try the page cache first (`RWF_NOWAIT`): with direct I/O there
/// is no page cache to read from; other formats than raw map guest offsets to file offsets
/// first.
fn reads_page_cache_first(disk: &Image) -> bool {
    disk.raw().is_some() && disk.direct().is_none()
}

impl Block {
    /// The image the device serves, for its VMM to write back or flush when it hands the
    /// disk to another process (quiesced first: see `VirtioDevice::quiesce`).
    pub fn image(&self) -> Arc<Image> {
        self.disk.clone()
    }

    /// A device on `disk` with the hybrid engine, or the synchronous one where no io_uring
    /// can be made ([`Block::engine`] says which).
    pub fn new(disk: impl Into<Image>, serial: &str, limiter: RateLimiter) -> Self {
        Self::with_engine(disk, serial, limiter, EngineChoice::Hybrid)
    }

    pub fn with_engine(
        disk: impl Into<Image>,
        serial: &str,
        limiter: RateLimiter,
        choice: EngineChoice,
    ) -> Self {
        let disk: Image = disk.into();
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_FLUSH;
        if disk.read_only() {
            features |= VIRTIO_BLK_F_RO;
        } else {
            features |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
        }
        let config = build_config(disk.size() >> SECTOR_SHIFT);
        let nowait = reads_page_cache_first(&disk);
        let disk = Arc::new(disk);
        let (ring, fallback) = match choice {
            EngineChoice::Synchronous => (None, None),
            // The ring reads and writes file offsets: raw images only. Others are served
            // synchronously by choice, not as a fallback.
            EngineChoice::Hybrid if disk.raw().is_none() => (None, None),
            EngineChoice::Hybrid => match Uring::new(disk.clone(), u32::from(QUEUE_SIZE)) {
                Ok(ring) => (Some(ring), None),
                Err(e) => (None, Some(e.to_string())),
            },
        };
        Self {
            disk,
            ring,
            retired_ring: None,
            fallback,
            nowait,
            inflight: Inflight::new(QUEUE_SIZE),
            held_back: false,
            reset_wait: RESET_WAIT,
            scratch: Scratch::default(),
            stats: Arc::new(BlockStats::default()),
            limiter,
            errors: ErrorLog::default(),
            flush_failed: false,
            sync_bytes: 0,
            // Without it the device never yields (it cannot wake itself up again).
            resume: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).ok(),
            serial: id,
            features,
            config,
        }
    }

    /// The engine serving requests: [`ENGINE_HYBRID`] or [`ENGINE_SYNCHRONOUS`].
    pub fn engine(&self) -> &'static str {
        if self.ring.is_some() {
            ENGINE_HYBRID
        } else {
            ENGINE_SYNCHRONOUS
        }
    }

    /// Why the hybrid engine was asked for and the synchronous one is serving, if it is.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    /// The engine's counters, shared: they stay readable after the device is handed over.
    pub fn stats(&self) -> Arc<BlockStats> {
        self.stats.clone()
    }

    /// Sets how long a reset waits for requests in flight (tests shorten it).
    pub fn set_reset_wait(&mut self, wait: Duration) {
        self.reset_wait = wait;
    }

    /// Fewer in-flight slots than the queue has entries (1 to [`QUEUE_SIZE`]), so that a test
    /// or a fuzz target can fill them and make further chains wait in the ring. For a device
    /// not yet serving requests. Not part of the device's API: built for tests and for the
    /// fuzz targets (`--cfg fuzzing`) only.
    #[cfg(any(test, fuzzing))]
    pub fn limit_in_flight(&mut self, slots: u16) {
        self.inflight = Inflight::new(slots.clamp(1, QUEUE_SIZE));
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, _acked_features: u64) -> Result<(), DeviceError> {
        Ok(())
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        // Completions that arrived since the last event free slots first.
        let mut used = self.complete(index, queue, mem)?;
        used |= self.serve(index, queue, mem)?;
        self.submit();
        // What the kernel finished while submitting (writes into the page cache often do)
        // completes now rather than on the next event.
        used |= self.complete(index, queue, mem)?;
        Ok(used)
    }

    fn reset(&mut self) {
        self.held_back = false;
        self.quiesce(self.reset_wait);
        self.limiter.forgive_debt();
    }

    fn quiesce(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<u64, DeviceError> {
        let Some(queue) = queues.get_mut(0) else {
            return Ok(0);
        };
        Ok(u64::from(self.settle(queue, mem, SETTLE_WAIT)?))
    }

    fn save_state(&self) -> serde_json::Value {
        self.save()
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), DeviceError> {
        self.restore(state)
    }

    fn switch_disk(&mut self, image: Arc<Image>) -> Result<Arc<Image>, DeviceError> {
        if image.size() != self.disk.size() || image.read_only() != self.disk.read_only() {
            return Err(DeviceError::Switch(format!(
                "the new image is {} bytes{}, the disk {} bytes{}",
                image.size(),
                if image.read_only() { ", read-only" } else { "" },
                self.disk.size(),
                if self.disk.read_only() {
                    ", read-only"
                } else {
                    ""
                },
            )));
        }
        if !self.inflight.is_idle() {
            return Err(DeviceError::Switch(
                "requests are still in flight on the disk".into(),
            ));
        }
        // From here the image is served synchronously: the ring was made for the old file.
        // It is kept, idle, rather than dropped: its eventfd stays registered with the event
        // loop, whose table would refuse a later descriptor given the same number.
        self.nowait = reads_page_cache_first(&image);
        if let Some(ring) = self.ring.take() {
            self.retired_ring = Some(ring);
        }
        Ok(std::mem::replace(&mut self.disk, image))
    }

    fn event_sources(&self) -> Vec<(RawFd, u32)> {
        let mut sources = Vec::new();
        if !self.limiter.is_unlimited() {
            sources.push((self.limiter.as_raw_fd(), RATE_LIMIT_TIMER));
        }
        if let Some(ring) = self.ring.as_ref().or(self.retired_ring.as_ref()) {
            sources.push((ring.eventfd(), COMPLETIONS));
        }
        if let Some(resume) = &self.resume {
            sources.push((resume.as_raw_fd(), RESUME));
        }
        sources
    }

    fn process_event(
        &mut self,
        token: u32,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, DeviceError> {
        let Some(queue) = queues.get_mut(0) else {
            return Ok(0);
        };
        let used = match token {
            RATE_LIMIT_TIMER => {
                // The handler unblocks the limiter even when reading its timer fails; the
                // held requests must go on now, as the driver does not kick a queue the
                // device left with notifications off (`chain::next_chain`).
                let _ = self.limiter.event_handler();
                self.process_queue(0, queue, mem)?
            }
            RESUME => {
                if let Some(resume) = &self.resume {
                    let _ = resume.read();
                }
                self.process_queue(0, queue, mem)?
            }
            COMPLETIONS => {
                if let Some(ring) = &self.ring {
                    ring.clear_eventfd();
                }
                let mut used = self.complete(0, queue, mem)?;
                if std::mem::take(&mut self.held_back) {
                    used |= self.process_queue(0, queue, mem)?;
                }
                used
            }
            _ => false,
        };
        Ok(u64::from(used))
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // The kernel must not write into guest memory after whoever owns it unmaps it.
        self.quiesce(RESET_WAIT);
    }
}
