//! The I/O engines through the transport and the host-side driver, on real files: which
//! engine serves, reads from the page cache and from the disk, writes and the flushes behind
//! them, many requests in flight, resets with requests in flight, and the synchronous
//! fallback. Helpers wait for completions as the event loop does, at most 10 s. Direct I/O
//! is in [`direct`].

mod direct;
mod hostile;
mod sticky;

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::request::*;
use super::{
    Block, BlockStats, EngineChoice, COMPLETIONS, ENGINE_HYBRID, ENGINE_SYNCHRONOUS, RESUME,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use crate::rate_limiter::{RateLimitConfig, RateLimiter};
use crate::virtio::driver::{Buffer, Driver, DATA_START};
use crate::virtio::mmio::{REG_STATUS, STATUS_DRIVER_OK, STATUS_NEEDS_RESET};
use crate::virtio::tests::{serve_events, wait_used};
use crate::virtio::VirtioDevice;

const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const MEM_SIZE: usize = 64 << 20;
/// Request headers, 64 bytes apart; status bytes; data buffers from 2 MiB on.
const HEADERS: u64 = DATA_START;
const STATUSES: u64 = DATA_START + 0x8000;
const BUFFERS: u64 = 2 << 20;

fn header_addr(slot: usize) -> u64 {
    HEADERS + slot as u64 * 64
}

fn status_addr(slot: usize) -> u64 {
    STATUSES + slot as u64
}

/// What the test files hold at byte `offset`.
fn pattern(offset: u64) -> u8 {
    ((offset.wrapping_mul(31) >> 3) as u8) ^ ((offset >> 12) as u8)
}

fn image(name: &str, bytes: u64) -> PathBuf {
    let path = std::env::temp_dir().join(format!("keel-blk-{}-{name}", std::process::id()));
    let data: Vec<u8> = (0..bytes).map(pattern).collect();
    std::fs::write(&path, data).unwrap();
    path
}

struct Rig {
    d: Driver,
    path: PathBuf,
    stats: Arc<BlockStats>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn rig(name: &str, bytes: u64, choice: EngineChoice, setup: impl FnOnce(&mut Block)) -> Rig {
    rig_on(name, bytes, choice, false, setup)
}

/// [`rig`], on a disk opened with `O_DIRECT` when `direct` is set.
fn rig_on(
    name: &str,
    bytes: u64,
    choice: EngineChoice,
    direct: bool,
    setup: impl FnOnce(&mut Block),
) -> Rig {
    rig_limited(name, bytes, choice, direct, "", setup)
}

/// [`rig_on`], with the rate limits `limits` (as `--disk` takes them; empty: none).
fn rig_limited(
    name: &str,
    bytes: u64,
    choice: EngineChoice,
    direct: bool,
    limits: &str,
    setup: impl FnOnce(&mut Block),
) -> Rig {
    let path = image(name, bytes);
    let disk = disk::RawDisk::open_with(&path, false, direct).unwrap();
    let config: RateLimitConfig = if limits.is_empty() {
        RateLimitConfig::default()
    } else {
        limits.parse().unwrap()
    };
    let limiter = RateLimiter::new(&config).unwrap();
    let mut block = Block::with_engine(disk, "engine", limiter, choice);
    if choice == EngineChoice::Hybrid {
        assert_eq!(
            block.engine(),
            ENGINE_HYBRID,
            "this test needs io_uring, which this host refuses: {:?}",
            block.fallback_reason()
        );
    }
    setup(&mut block);
    let stats = block.stats();
    let mut d = Driver::new(Box::new(block), MEM_SIZE);
    let status = d.init(VIRTIO_BLK_F_FLUSH, 256);
    assert_eq!(status & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
    Rig { d, path, stats }
}

fn count(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

fn readable(addr: u64, len: u32) -> Buffer {
    Buffer {
        addr,
        len,
        writable: false,
    }
}

fn writable(addr: u64, len: u32) -> Buffer {
    Buffer {
        addr,
        len,
        writable: true,
    }
}

impl Rig {
    fn header(&mut self, slot: usize, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.d
            .mem
            .write_slice(&h, GuestAddress(header_addr(slot)))
            .unwrap();
        self.d
            .mem
            .write_obj(0xffu8, GuestAddress(status_addr(slot)))
            .unwrap();
    }

    /// Makes a read of `len` bytes at `offset` into `buf` available, in slot `slot`.
    fn read(&mut self, slot: usize, offset: u64, buf: u64, len: u32) -> u16 {
        self.header(slot, VIRTIO_BLK_T_IN, offset / 512);
        self.d.submit(
            0,
            &[
                readable(header_addr(slot), 16),
                writable(buf, len),
                writable(status_addr(slot), 1),
            ],
        )
    }

    /// Makes a write of `len` bytes from `buf` at `offset` available, in slot `slot`.
    fn write(&mut self, slot: usize, offset: u64, buf: u64, len: u32) -> u16 {
        self.header(slot, VIRTIO_BLK_T_OUT, offset / 512);
        self.d.submit(
            0,
            &[
                readable(header_addr(slot), 16),
                readable(buf, len),
                writable(status_addr(slot), 1),
            ],
        )
    }

    fn flush(&mut self, slot: usize) -> u16 {
        self.header(slot, VIRTIO_BLK_T_FLUSH, 0);
        self.d.submit(
            0,
            &[
                readable(header_addr(slot), 16),
                writable(status_addr(slot), 1),
            ],
        )
    }

    fn status(&self, slot: usize) -> u8 {
        self.d
            .mem
            .read_obj(GuestAddress(status_addr(slot)))
            .unwrap()
    }

    fn guest_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.d.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn fill(&self, addr: u64, len: usize, value: u8) {
        self.d
            .mem
            .write_slice(&vec![value; len], GuestAddress(addr))
            .unwrap();
    }

    /// Syncs the file and drops it from the page cache; fails if the pages stay (a file
    /// system without a page cache of its own, such as tmpfs, cannot miss).
    fn drop_cache(&self) {
        let file = std::fs::File::open(&self.path).unwrap();
        file.sync_all().unwrap();
        // SAFETY: fadvise on an open fd with plain integer arguments.
        let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(r, 0, "posix_fadvise(DONTNEED)");
        assert_eq!(
            resident_pages(&self.path),
            0,
            "the page cache of {} could not be dropped: run the tests with TMPDIR on a \
             disk-backed file system",
            self.path.display()
        );
    }
}

/// Pages of the file in the page cache (mincore on a shared mapping).
fn resident_pages(path: &std::path::Path) -> usize {
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    // SAFETY: maps the file read-only and shared; the mapping is only passed to mincore and
    // unmapped below.
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
    assert_ne!(map, libc::MAP_FAILED);
    let mut vec = vec![0u8; len.div_ceil(4096)];
    // SAFETY: `vec` has a byte for every page of the mapping.
    let r = unsafe { libc::mincore(map, len, vec.as_mut_ptr()) };
    // SAFETY: unmaps the mapping made above.
    unsafe { libc::munmap(map, len) };
    assert_eq!(r, 0, "mincore");
    vec.iter().filter(|&&b| b & 1 != 0).count()
}

#[test]
fn hybrid_is_the_default_engine_and_watches_its_completions() {
    let path = image("default", 64 * 1024);
    let disk = disk::RawDisk::open(&path, false).unwrap();
    let limiter = RateLimiter::new(&RateLimitConfig::default()).unwrap();
    let block = Block::new(disk, "x", limiter);
    assert_eq!(
        block.engine(),
        ENGINE_HYBRID,
        "io_uring refused: {:?}",
        block.fallback_reason()
    );
    let tokens: Vec<u32> = block.event_sources().iter().map(|s| s.1).collect();
    assert_eq!(tokens, vec![COMPLETIONS, RESUME]);
    let _ = std::fs::remove_file(path);
}

#[test]
fn synchronous_engine_completes_every_request_in_process() {
    let mut t = rig("sync", 1 << 20, EngineChoice::Synchronous, |b| {
        assert_eq!(b.engine(), ENGINE_SYNCHRONOUS);
        assert_eq!(b.fallback_reason(), None, "asked for, not fallen back to");
    });
    let tokens: Vec<u32> = t.d.transport.event_sources().iter().map(|s| s.1).collect();
    assert_eq!(tokens, vec![RESUME], "nothing to wait for but its own turn");
    t.fill(BUFFERS, 8192, 0x5a);
    let w = t.write(0, 4096, BUFFERS, 8192);
    let f = t.flush(1);
    t.d.process(0);
    assert_eq!(t.d.used(0), vec![(u32::from(w), 1), (u32::from(f), 1)]);
    assert_eq!((t.status(0), t.status(1)), (0, 0));
    t.drop_cache();
    let r = t.read(2, 4096, BUFFERS + 0x10_0000, 8192);
    t.d.process(0);
    assert_eq!(t.d.used(0), vec![(u32::from(r), 8193)]);
    assert_eq!(t.guest_bytes(BUFFERS + 0x10_0000, 8192), vec![0x5a; 8192]);
    let file = std::fs::read(&t.path).unwrap();
    assert!(file[4096..4096 + 8192].iter().all(|&b| b == 0x5a));
    assert_eq!(count(&t.stats.reads_ring) + count(&t.stats.writes_ring), 0);
}

#[test]
fn cached_reads_complete_at_once() {
    let mut t = rig("cached", 1 << 20, EngineChoice::Hybrid, |_| {});
    let _ = std::fs::read(&t.path).unwrap();
    let heads: Vec<u16> = (0..8)
        .map(|i| t.read(i, i as u64 * 4096, BUFFERS + i as u64 * 4096, 4096))
        .collect();
    t.d.process(0);
    let used = t.d.used(0);
    assert_eq!(used.len(), 8, "every cached read completed in process()");
    for (i, &(head, len)) in used.iter().enumerate() {
        assert_eq!((head, len), (u32::from(heads[i]), 4097));
        let want: Vec<u8> = (i as u64 * 4096..(i as u64 + 1) * 4096)
            .map(pattern)
            .collect();
        assert_eq!(t.guest_bytes(BUFFERS + i as u64 * 4096, 4096), want);
    }
    assert_eq!(count(&t.stats.reads_inline), 8);
    assert_eq!(count(&t.stats.reads_ring), 0);
}

/// Counts the calling thread's heap allocations, for the test below.
struct CountingAllocator;

std::thread_local! {
    static ALLOCATIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

// SAFETY: every call is passed on to the system allocator unchanged; the count is a
// const-initialized thread-local without a destructor, which allocates nothing.
unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.with(|a| a.set(a.get() + 1));
        // SAFETY: the caller's contract for `alloc` is passed on.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from the system allocator with this layout.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        ALLOCATIONS.with(|a| a.set(a.get() + 1));
        // SAFETY: the caller's contract for `realloc` is passed on.
        unsafe { std::alloc::System.realloc(ptr, layout, size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn allocations() -> u64 {
    ALLOCATIONS.with(|a| a.get())
}

#[test]
fn serving_cached_reads_allocates_nothing() {
    let mut t = rig("alloc", 1 << 20, EngineChoice::Hybrid, |_| {});
    let _ = std::fs::read(&t.path).unwrap();
    let round = |t: &mut Rig| {
        for i in 0..8 {
            t.read(i, i as u64 * 8192, BUFFERS + i as u64 * 8192, 8192);
        }
        let before = allocations();
        t.d.process(0);
        let after = allocations();
        assert_eq!(t.d.used(0).len(), 8);
        after - before
    };
    let before = allocations();
    let v = std::hint::black_box(vec![1u8; 10]);
    assert_eq!(allocations(), before + 1, "the counter counts");
    drop(v);
    // The first round sizes the reused buffers.
    round(&mut t);
    for _ in 0..10 {
        assert_eq!(round(&mut t), 0, "heap allocations serving 8 cached reads");
    }
}

#[test]
fn reads_that_miss_the_page_cache_complete_through_io_uring() {
    let mut t = rig("cold", 32 << 20, EngineChoice::Hybrid, |_| {});
    t.drop_cache();
    // 16 reads of 4 KiB in one notification, 2 MiB apart: beyond the readahead a miss starts.
    let offsets: Vec<u64> = (0..16u64)
        .map(|i| ((i * 7) % 16) * (2 << 20) + 4096)
        .collect();
    for (i, &o) in offsets.iter().enumerate() {
        t.read(i, o, BUFFERS + i as u64 * 4096, 4096);
    }
    t.d.process(0);
    let used = wait_used(&mut t.d, 16);
    assert_eq!(used.len(), 16);
    for (i, &o) in offsets.iter().enumerate() {
        assert_eq!(t.status(i), 0);
        let want: Vec<u8> = (o..o + 4096).map(pattern).collect();
        assert_eq!(
            t.guest_bytes(BUFFERS + i as u64 * 4096, 4096),
            want,
            "read {i}"
        );
    }
    assert!(used.iter().all(|&(_, len)| len == 4097));
    assert_eq!(count(&t.stats.reads_ring), 16, "none was cached");
    assert_eq!(count(&t.stats.reads_inline), 0);
}

#[test]
fn a_partly_cached_read_gets_the_rest_from_io_uring() {
    let mut t = rig("partly", 1 << 20, EngineChoice::Hybrid, |_| {});
    t.drop_cache();
    // Only the first page in the cache: read it through a descriptor without readahead.
    let file = std::fs::File::open(&t.path).unwrap();
    // SAFETY: fadvise on an open fd with plain integer arguments.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    let mut page = [0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut page, 0).unwrap();
    assert_eq!(resident_pages(&t.path), 1, "the first page alone is cached");
    t.fill(BUFFERS, 16384, 0);
    let head = t.read(0, 0, BUFFERS, 16384);
    t.d.process(0);
    let used = wait_used(&mut t.d, 1);
    assert_eq!(used, vec![(u32::from(head), 16385)]);
    let want: Vec<u8> = (0..16384).map(pattern).collect();
    assert_eq!(t.guest_bytes(BUFFERS, 16384), want);
    assert_eq!(count(&t.stats.reads_ring), 1);
    assert_eq!(
        count(&t.stats.reads_partly_inline),
        1,
        "the first page came inline"
    );
}

#[test]
fn a_flush_sent_with_writes_completes_after_them() {
    let mut t = rig("order", 8 << 20, EngineChoice::Hybrid, |_| {});
    // Eight 256 KiB writes and a flush made available at once: the flush must not complete
    // before any of them.
    for i in 0..8u64 {
        t.fill(BUFFERS + i * 0x4_0000, 0x4_0000, i as u8 + 1);
        t.write(i as usize, i * 0x4_0000, BUFFERS + i * 0x4_0000, 0x4_0000);
    }
    let flush = t.flush(8);
    t.d.process(0);
    let used = wait_used(&mut t.d, 9);
    assert_eq!(used.len(), 9);
    assert_eq!(used[8], (u32::from(flush), 1), "the flush completed last");
    assert!((0..9).all(|i| t.status(i) == 0));
    let file = std::fs::read(&t.path).unwrap();
    for i in 0..8usize {
        let part = &file[i * 0x4_0000..(i + 1) * 0x4_0000];
        assert!(
            part.iter().all(|&b| b == i as u8 + 1),
            "write {i} in the file"
        );
    }
    assert_eq!(count(&t.stats.flushes_ring), 1);
    assert_eq!(
        count(&t.stats.flushes_waited),
        1,
        "the flush was held for the writes"
    );
}

#[test]
fn a_flush_after_a_completed_write_covers_it() {
    let mut t = rig("after", 1 << 20, EngineChoice::Hybrid, |_| {});
    t.fill(BUFFERS, 4096, 0xc3);
    let w = t.write(0, 8192, BUFFERS, 4096);
    t.d.process(0);
    assert_eq!(wait_used(&mut t.d, 1), vec![(u32::from(w), 1)]);
    // Acknowledged means in the file, before any flush.
    let file = std::fs::read(&t.path).unwrap();
    assert!(file[8192..12288].iter().all(|&b| b == 0xc3));
    let f = t.flush(1);
    t.d.process(0);
    assert_eq!(wait_used(&mut t.d, 1), vec![(u32::from(f), 1)]);
    assert_eq!(t.status(1), 0);
    // The flushed data is what the disk returns once the page cache is gone.
    t.drop_cache();
    let file = std::fs::read(&t.path).unwrap();
    assert!(file[8192..12288].iter().all(|&b| b == 0xc3));
    assert_eq!(count(&t.stats.writes_ring), 1);
    assert_eq!(count(&t.stats.flushes_ring), 1);
    assert_eq!(count(&t.stats.flushes_waited), 0, "no write was in flight");
}

#[test]
fn a_full_queue_of_requests_in_flight() {
    // 85 chains of 3 descriptors fill the 256-entry queue.
    const N: usize = 85;
    let mut t = rig("full", 16 << 20, EngineChoice::Hybrid, |_| {});
    for i in 0..N {
        t.fill(BUFFERS + i as u64 * 0x2_0000, 0x2_0000, i as u8);
        t.write(
            i,
            i as u64 * 0x2_0000,
            BUFFERS + i as u64 * 0x2_0000,
            0x2_0000,
        );
    }
    t.d.process(0);
    let used = wait_used(&mut t.d, N);
    assert_eq!(used.len(), N);
    assert!((0..N).all(|i| t.status(i) == 0));
    t.drop_cache();
    for i in 0..N {
        t.fill(BUFFERS + i as u64 * 0x2_0000, 0x2_0000, 0xee);
        t.read(
            i,
            i as u64 * 0x2_0000,
            BUFFERS + i as u64 * 0x2_0000,
            0x2_0000,
        );
    }
    t.d.process(0);
    let used = wait_used(&mut t.d, N);
    assert_eq!(used.len(), N);
    let mut heads: Vec<u32> = used.iter().map(|u| u.0).collect();
    heads.sort();
    heads.dedup();
    assert_eq!(heads.len(), N, "every chain completed once");
    for i in 0..N {
        assert_eq!(t.status(i), 0);
        let back = t.guest_bytes(BUFFERS + i as u64 * 0x2_0000, 0x2_0000);
        assert!(back.iter().all(|&b| b == i as u8), "read {i}");
    }
    // A read that misses starts the kernel's readahead, which may bring the next ones in
    // before the device gets to them.
    assert!(count(&t.stats.reads_ring) > 0);
    assert_eq!(
        count(&t.stats.reads_ring) + count(&t.stats.reads_inline),
        N as u64
    );
}

#[test]
fn requests_beyond_the_free_slots_wait_in_the_ring() {
    let mut t = rig("slots", 1 << 20, EngineChoice::Hybrid, |b| {
        b.limit_in_flight(2)
    });
    for i in 0..6u64 {
        t.fill(BUFFERS + i * 4096, 4096, 0x10 + i as u8);
        t.write(i as usize, i * 4096, BUFFERS + i * 4096, 4096);
    }
    t.flush(6);
    t.d.process(0);
    let used = wait_used(&mut t.d, 7);
    assert_eq!(used.len(), 7, "all served as slots freed up");
    assert!(count(&t.stats.held_back) > 0, "chains waited for a slot");
    assert!((0..7).all(|i| t.status(i) == 0));
    let file = std::fs::read(&t.path).unwrap();
    for i in 0..6usize {
        assert!(file[i * 4096..(i + 1) * 4096]
            .iter()
            .all(|&b| b == 0x10 + i as u8));
    }
}

/// Zeroes the used ring's index and first entries, so that a late write shows.
fn clear_used_ring(d: &Driver) {
    // The harness puts queue 0's used ring at 0x1_8000.
    d.mem
        .write_slice(&[0u8; 4 + 16 * 8], GuestAddress(0x1_8000))
        .unwrap();
}

fn used_idx(d: &Driver) -> u16 {
    d.mem.read_obj(GuestAddress(0x1_8002)).unwrap()
}

#[test]
fn reset_waits_for_requests_in_flight() {
    let mut t = rig("reset", 32 << 20, EngineChoice::Hybrid, |_| {});
    t.drop_cache();
    for i in 0..40u64 {
        t.read(
            i as usize,
            i * 0x8_0000,
            BUFFERS + i * 0x8_0000 % (48 << 20),
            0x8_0000,
        );
    }
    t.write(40, 0, BUFFERS, 4096);
    t.flush(41);
    t.d.process(0);
    t.d.write_reg(REG_STATUS, 0);
    assert_eq!(
        count(&t.stats.orphaned),
        0,
        "the reset waited for every request"
    );
    clear_used_ring(&t.d);
    // Nothing completes into the reset queue, however long the event loop runs.
    for _ in 0..5 {
        serve_events(&mut t.d, Duration::from_millis(20));
    }
    assert_eq!(used_idx(&t.d), 0);
    // The device serves again after the driver brings it up.
    let status = t.d.init(VIRTIO_BLK_F_FLUSH, 256);
    assert_eq!(
        status & (STATUS_DRIVER_OK | STATUS_NEEDS_RESET),
        STATUS_DRIVER_OK
    );
    let f = t.flush(0);
    t.d.process(0);
    assert_eq!(wait_used(&mut t.d, 1), vec![(u32::from(f), 1)]);
}

#[test]
fn a_reset_that_stops_waiting_orphans_requests_and_drops_their_completions() {
    let mut t = rig("orphans", 48 << 20, EngineChoice::Hybrid, |b| {
        b.set_reset_wait(Duration::ZERO)
    });
    t.drop_cache();
    for i in 0..40u64 {
        t.read(
            i as usize,
            i * 0x10_0000,
            BUFFERS + (i % 8) * 0x10_0000,
            0x10_0000,
        );
    }
    t.d.process(0);
    t.d.write_reg(REG_STATUS, 0);
    let orphaned = count(&t.stats.orphaned);
    assert!(orphaned > 0, "40 MiB from the disk were still in flight");
    clear_used_ring(&t.d);
    let status = t.d.init(VIRTIO_BLK_F_FLUSH, 256);
    assert_eq!(status & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
    // New requests complete, alone: the orphans' completions go nowhere.
    let start = Instant::now();
    let mut heads = Vec::new();
    while start.elapsed() < Duration::from_millis(300) {
        heads.push(u32::from(t.flush(heads.len() % 64)));
        t.d.process(0);
        let used = wait_used(&mut t.d, 1);
        assert_eq!(used, vec![(*heads.last().unwrap(), 1)]);
    }
    assert!(heads.len() > 1);
    assert_eq!(used_idx(&t.d), heads.len() as u16);
}

#[test]
fn a_read_the_file_no_longer_holds_fails_instead_of_completing_short() {
    let mut t = rig("truncated", 1 << 20, EngineChoice::Hybrid, |_| {});
    // The device still believes the disk is 1 MiB.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&t.path)
        .unwrap();
    file.set_len(512 * 1024 + 4096).unwrap();
    t.drop_cache();
    let head = t.read(0, 512 * 1024, BUFFERS, 16384);
    t.d.process(0);
    assert_eq!(wait_used(&mut t.d, 1), vec![(u32::from(head), 1)]);
    assert_eq!(t.status(0), 1, "IOERR");
}
