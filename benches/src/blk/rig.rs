//! Keel's virtio-blk device on a file, driven by the host-side virtio driver
//! (`devices::virtio::driver::Driver`) exactly as a guest would drive it: headers, data and
//! status bytes in guest memory, descriptor chains in the ring, then one `process()` per
//! batch, which is what the event loop does on a guest notification.
//!
//! The clock runs around the whole loop (the harness's guest-side work included), and
//! separately around each `process()` call: the device's own time. Besides the total, the
//! median of the batches' device time is kept: a batch during which the thread was
//! preempted by other work on the host takes milliseconds, and the median leaves it out.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use devices::rate_limiter::{RateLimitConfig, RateLimiter};
use devices::virtio::block::request::{
    SECTOR_SHIFT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use devices::virtio::block::{Block, EngineChoice, QUEUE_SIZE};
use devices::virtio::driver::{Buffer, Driver, DATA_START};
use devices::virtio::mmio::STATUS_DRIVER_OK;
use devices::virtio::VirtioDevice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::pattern::{RandomBlocks, Rng, Sequential};
use super::uring::{UringBlock, VIRTIO_BLK_F_FLUSH};
use super::Run;

/// Which I/O engine serves the requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// Keel's `Block`, with the engine it picks (the hybrid, where io_uring works) or the
    /// synchronous one (`--keel-engine synchronous`).
    Preadv,
    /// The io_uring prototype of [`super::uring`].
    Uring,
    /// The same, reads first trying the page cache with `preadv2(RWF_NOWAIT)`.
    Hybrid,
}

/// Guest memory of the harness, and where the requests' parts live in it.
const MEM_SIZE: usize = 8 << 20;
/// 16-byte request headers, 64 bytes apart, one per slot.
const HEADERS: u64 = DATA_START;
/// Status bytes, one per slot.
const STATUSES: u64 = DATA_START + 0x4000;
/// 4 KiB data buffers, one per slot.
const BUFFERS: u64 = 2 << 20;
/// The 1 MiB buffer of sequential writes.
const WRITE_BUFFER: u64 = 4 << 20;
pub const WRITE_SIZE: u32 = 1 << 20;
pub const READ_SIZE: u32 = 4096;
/// Most requests in one batch.
pub const MAX_DEPTH: usize = 64;

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

fn header(slot: usize) -> u64 {
    HEADERS + slot as u64 * 64
}

fn status(slot: usize) -> u64 {
    STATUSES + slot as u64
}

fn buffer(slot: usize) -> u64 {
    BUFFERS + slot as u64 * u64::from(READ_SIZE)
}

/// Process CPU time so far, user + system.
pub fn cpu_time() -> Duration {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a live rusage the call fills in.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// The clocks of one run.
///
/// The clock is read twice per sample, around the device's work ([`Meter::time_from`]); the
/// later reading also says whether the run's time is up ([`Meter::running`]), so the loop
/// reads no clock of its own: bookkeeping that no guest or VMM does stays out of the CPU
/// figures as far as it can.
struct Meter {
    start: Instant,
    /// The last clock reading.
    now: Instant,
    cpu: Duration,
    device: Duration,
    /// Device time of the current sample (one batch, or one write and its flush).
    batch: Duration,
    /// Device time per request of each sample, ns.
    samples: Vec<u32>,
    requests: u64,
    bytes: u64,
}

impl Meter {
    fn start() -> Self {
        let start = Instant::now();
        Self {
            start,
            now: start,
            cpu: cpu_time(),
            device: Duration::ZERO,
            batch: Duration::ZERO,
            samples: Vec::with_capacity(1 << 20),
            requests: 0,
            bytes: 0,
        }
    }

    fn time(&mut self, elapsed: Duration) {
        self.device += elapsed;
        self.batch += elapsed;
    }

    /// Counts the device time from `start` to now.
    fn time_from(&mut self, start: Instant) {
        let now = Instant::now();
        self.time(now.saturating_duration_since(start));
        self.now = now;
    }

    /// Whether the run, `duration` long, was still going at the last clock reading.
    fn running(&self, duration: Duration) -> bool {
        self.now.saturating_duration_since(self.start) < duration
    }

    /// Ends a sample of `requests` requests.
    fn sample(&mut self, requests: u64) {
        let ns = self.batch.as_nanos() / u128::from(requests.max(1));
        self.samples.push(u32::try_from(ns).unwrap_or(u32::MAX));
        self.batch = Duration::ZERO;
    }

    fn finish(mut self) -> Run {
        let median = if self.samples.is_empty() {
            None
        } else {
            let middle = self.samples.len() / 2;
            Some(f64::from(*self.samples.select_nth_unstable(middle).1))
        };
        Run {
            requests: self.requests,
            bytes: self.bytes,
            wall: self.start.elapsed(),
            cpu: cpu_time().saturating_sub(self.cpu),
            device: Some(self.device),
            device_median_ns: median,
        }
    }
}

pub struct Rig {
    driver: Driver,
    size: u64,
    /// Keel's `Block::engine()`, for the Keel rig.
    engine: Option<&'static str>,
}

impl Rig {
    /// The device on `path`, brought up by the driver with FLUSH and a 256-entry queue.
    pub fn new(path: &Path, engine: Engine) -> Result<Self> {
        Self::with_keel_engine(path, engine, EngineChoice::Hybrid)
    }

    /// As [`Rig::new`]; Keel's rig asks for `choice`.
    pub fn with_keel_engine(path: &Path, engine: Engine, choice: EngineChoice) -> Result<Self> {
        let mut keel_engine = None;
        let device: Box<dyn VirtioDevice> = match engine {
            Engine::Preadv => {
                let disk = disk::RawDisk::open(path, false)
                    .with_context(|| format!("opening {} as a disk", path.display()))?;
                let limiter = RateLimiter::new(&RateLimitConfig::default())?;
                let block = Block::with_engine(disk, "keel-bench", limiter, choice);
                if let Some(why) = block.fallback_reason() {
                    eprintln!(
                        "devices: Keel's device fell back to {}: {why}",
                        block.engine()
                    );
                }
                keel_engine = Some(block.engine());
                Box::new(block)
            }
            Engine::Uring => Box::new(UringBlock::open(path, false)?),
            Engine::Hybrid => Box::new(UringBlock::open(path, true)?),
        };
        let size = std::fs::metadata(path)?.len();
        let mut driver = Driver::new(device, MEM_SIZE);
        let status = driver.init(VIRTIO_BLK_F_FLUSH, QUEUE_SIZE);
        if status & STATUS_DRIVER_OK == 0 {
            bail!("the device did not accept the driver (status {status:#x})");
        }
        let mut data = vec![0u8; WRITE_SIZE as usize];
        Rng::new(0x5eed).fill(&mut data);
        driver.mem.write_slice(&data, GuestAddress(WRITE_BUFFER))?;
        Ok(Self {
            driver,
            size,
            engine: keel_engine,
        })
    }

    /// The I/O engine of Keel's device (None for the prototypes).
    pub fn keel_engine(&self) -> Option<&'static str> {
        self.engine
    }

    /// The used entries of queue 0 until there are `count`: requests the device put on its
    /// io_uring complete when it serves the ring's eventfd, as the event loop would on the
    /// eventfd's wake-up. Gives up after 10 s without progress.
    fn wait_used(&mut self, count: usize) -> Vec<(u32, u32)> {
        let mut used = self.driver.used(0);
        // Read the clock only when there is something to wait for.
        let mut last_progress = None;
        while used.len() < count {
            let since = *last_progress.get_or_insert_with(Instant::now);
            let sources = self.driver.transport.event_sources();
            let mut fds: Vec<libc::pollfd> = sources
                .iter()
                .map(|&(fd, _)| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            if fds.is_empty() || since.elapsed() > Duration::from_secs(10) {
                break;
            }
            // SAFETY: polls live pollfds, as many as the vector holds, for at most 100 ms.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
            for (pfd, &(_, token)) in fds.iter().zip(&sources) {
                if pfd.revents != 0 {
                    self.driver.transport.process_event(token);
                }
            }
            let more = self.driver.used(0);
            if !more.is_empty() {
                last_progress = Some(Instant::now());
            }
            used.extend(more);
        }
        used
    }

    fn write_header(&mut self, slot: usize, kind: u32, offset: u64) -> Result<()> {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&(offset >> SECTOR_SHIFT).to_le_bytes());
        self.driver
            .mem
            .write_slice(&h, GuestAddress(header(slot)))?;
        // A status the device never wrote shows as 0xff.
        self.driver
            .mem
            .write_obj(0xffu8, GuestAddress(status(slot)))?;
        Ok(())
    }

    /// One notification: the device serves everything submitted, and completes what it put
    /// on its io_uring as the events come; its time goes to `meter`. Then checks that slots
    /// `0..count` completed with status OK.
    fn process(&mut self, meter: &mut Meter, count: usize) -> Result<()> {
        let start = Instant::now();
        self.driver.process(0);
        let used = self.wait_used(count);
        meter.time_from(start);
        if used.len() != count {
            bail!("{} requests submitted, {} completed", count, used.len());
        }
        let mut statuses = [0u8; MAX_DEPTH];
        self.driver
            .mem
            .read_slice(&mut statuses[..count], GuestAddress(status(0)))?;
        if let Some(slot) = statuses[..count].iter().position(|&s| s != 0) {
            bail!(
                "request in slot {slot} failed with virtio-blk status {}",
                statuses[slot]
            );
        }
        meter.requests += count as u64;
        Ok(())
    }

    /// 4 KiB reads at random offsets, `depth` per notification, for `duration`.
    pub fn random_reads(&mut self, depth: usize, duration: Duration, seed: u64) -> Result<Run> {
        if !(1..=MAX_DEPTH).contains(&depth) {
            bail!("queue depth {depth} is outside 1..={MAX_DEPTH}");
        }
        let mut offsets = RandomBlocks::new(seed, u64::from(READ_SIZE), self.size)
            .context("the image is smaller than one block")?;
        let mut meter = Meter::start();
        while meter.running(duration) {
            for slot in 0..depth {
                self.write_header(slot, VIRTIO_BLK_T_IN, offsets.next_offset())?;
                self.driver.submit(
                    0,
                    &[
                        readable(header(slot), 16),
                        writable(buffer(slot), READ_SIZE),
                        writable(status(slot), 1),
                    ],
                );
            }
            self.process(&mut meter, depth)?;
            meter.sample(depth as u64);
            meter.bytes += depth as u64 * u64::from(READ_SIZE);
        }
        Ok(meter.finish())
    }

    /// 1 MiB writes from the start of the file on, each followed by a FLUSH once it has
    /// completed (two notifications per write), for `duration`. Counts the writes.
    pub fn sequential_writes_with_flush(&mut self, duration: Duration) -> Result<Run> {
        let mut offsets = Sequential::new(u64::from(WRITE_SIZE), self.size)
            .context("the image is smaller than one write")?;
        let mut meter = Meter::start();
        while meter.running(duration) {
            self.write_header(0, VIRTIO_BLK_T_OUT, offsets.next_offset())?;
            self.driver.submit(
                0,
                &[
                    readable(header(0), 16),
                    readable(WRITE_BUFFER, WRITE_SIZE),
                    writable(status(0), 1),
                ],
            );
            self.process(&mut meter, 1)?;
            self.write_header(0, VIRTIO_BLK_T_FLUSH, 0)?;
            self.driver
                .submit(0, &[readable(header(0), 16), writable(status(0), 1)]);
            self.process(&mut meter, 1)?;
            // The flush is not a request of its own in the figures.
            meter.requests -= 1;
            meter.sample(1);
            meter.bytes += u64::from(WRITE_SIZE);
        }
        Ok(meter.finish())
    }

    /// GET_ID requests (the device copies its 20-byte serial; no file I/O), `depth` per
    /// notification: the cost of the device path without the I/O.
    pub fn get_id(&mut self, depth: usize, duration: Duration) -> Result<Run> {
        if !(1..=MAX_DEPTH).contains(&depth) {
            bail!("queue depth {depth} is outside 1..={MAX_DEPTH}");
        }
        let mut meter = Meter::start();
        while meter.running(duration) {
            for slot in 0..depth {
                self.write_header(slot, VIRTIO_BLK_T_GET_ID, 0)?;
                self.driver.submit(
                    0,
                    &[
                        readable(header(slot), 16),
                        writable(buffer(slot), 20),
                        writable(status(slot), 1),
                    ],
                );
            }
            self.process(&mut meter, depth)?;
            meter.sample(depth as u64);
        }
        Ok(meter.finish())
    }

    /// The system call alone: `preadv` of 4 KiB at the same random offsets into the same
    /// guest buffer, no virtio around it.
    pub fn preadv_alone(&self, path: &Path, duration: Duration, seed: u64) -> Result<Run> {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut offsets = RandomBlocks::new(seed, u64::from(READ_SIZE), self.size)
            .context("the image is smaller than one block")?;
        let slice = self
            .driver
            .mem
            .get_slice(GuestAddress(buffer(0)), READ_SIZE as usize)?;
        let iov = libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: READ_SIZE as usize,
        };
        let mut meter = Meter::start();
        while meter.running(duration) {
            let offset = offsets.next_offset() as i64;
            let start = Instant::now();
            // SAFETY: the iovec covers 4 KiB of guest memory, mapped for the life of `self`.
            let n = unsafe { libc::preadv(file.as_raw_fd(), &iov, 1, offset) };
            meter.time_from(start);
            meter.sample(1);
            if n != READ_SIZE as isize {
                bail!(
                    "preadv at {offset} returned {n}: {}",
                    std::io::Error::last_os_error()
                );
            }
            meter.requests += 1;
            meter.bytes += u64::from(READ_SIZE);
        }
        Ok(meter.finish())
    }
}

/// A system call alone, repeated for `duration`: `eventfd` writes (what raising the
/// interrupt costs the device) or, for the floor, `getppid`.
pub fn syscall_alone(eventfd: bool, duration: Duration) -> Result<Run> {
    // SAFETY: creates a new descriptor, closed below; no memory is passed.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        bail!("eventfd: {}", std::io::Error::last_os_error());
    }
    let one = 1u64.to_ne_bytes();
    let mut meter = Meter::start();
    while meter.running(duration) {
        let start = Instant::now();
        for _ in 0..64 {
            if eventfd {
                // SAFETY: writes 8 bytes from a live array to the eventfd made above. A full
                // counter fails with EAGAIN, which costs the same and is never reached here.
                unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
            } else {
                // SAFETY: no arguments, no effect.
                unsafe { libc::getppid() };
            }
        }
        meter.time_from(start);
        meter.sample(64);
        meter.requests += 64;
    }
    // SAFETY: closes the descriptor made above, used by nothing else.
    unsafe { libc::close(fd) };
    Ok(meter.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_time_is_summed_and_its_median_leaves_out_a_preempted_batch() {
        let mut meter = Meter::start();
        for us in [10, 12, 5_000, 11] {
            // Two process() calls in one sample, like a write and its flush.
            meter.time(Duration::from_micros(us));
            meter.time(Duration::from_micros(us));
            meter.sample(4);
            meter.requests += 4;
        }
        let run = meter.finish();
        assert_eq!(run.device, Some(Duration::from_micros(2 * 5_033)));
        // Per request: 5, 6, 2500 and 5.5 us; the upper median is 6 us.
        assert_eq!(run.device_median_ns, Some(6_000.0));
        assert_eq!(run.requests, 16);
        assert_eq!(Meter::start().finish().device_median_ns, None);
    }
}
