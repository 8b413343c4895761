//! What Keel's fuzz targets share: a reader that turns the fuzzer's bytes into values (and a
//! writer for hand-made seeds), the guest addresses a target may pick, a virtio-blk device on
//! a small real file, and the seed corpus writer. Each target is one file in `src/bin/`;
//! docs/fuzzing.md says how to add one and how to run them.

use std::fmt::Debug;
use std::fs::File;
use std::num::NonZeroU64;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

pub mod hybrid;

use arch::GuestMemoryMmap;
use devices::rate_limiter::{RateLimitConfig, RateLimiter};
use devices::virtio::block::{Block, EngineChoice, ENGINE_HYBRID};
use devices::virtio::chain::{Descriptor, Segment};
pub use devices::virtio::driver::{Buffer, Driver, DATA_START};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Guest memory of every target (the harness needs at least 2 MiB).
pub const MEM_SIZE: u64 = 2 << 20;
/// Size of the disk image behind the block device: 128 sectors.
pub const DISK_BYTES: u64 = 64 * 1024;
/// Where the harness keeps its descriptor tables and rings (queue 0 at the start); the
/// driver module lays them out so, below [`DATA_START`].
pub const RINGS_START: u64 = 0x1_0000;
/// The EVENT_IDX feature bit: targets clear it from the device's features to drive the rings
/// without it.
pub use devices::virtio::device::VIRTIO_RING_F_EVENT_IDX;

/// The fuzzer's bytes, read front to back; past the end every value reads as zero, so any
/// input decodes to something.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    /// Whatever is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// Builds an input in the layout [`Input`] reads: used for the hand-made seeds.
#[derive(Default)]
pub struct Encoder(Vec<u8>);

impl Encoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }

    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

/// Address modes for [`address`]: where in (or out of) guest memory a fuzzed address lands.
pub const ADDR_DATA: u8 = 0;
pub const ADDR_RINGS: u8 = 1;
pub const ADDR_END: u8 = 2;
pub const ADDR_RAW: u8 = 3;

/// A guest address from a mode and a raw value. Most modes keep the address in places where
/// something happens (the data area, the harness's own rings, the last page of memory, so a
/// buffer can straddle its end); [`ADDR_RAW`] takes the value as it is (far outside memory,
/// up to `u64::MAX`).
pub fn address(mode: u8, value: u64) -> u64 {
    match mode & 3 {
        ADDR_DATA => DATA_START + value % (MEM_SIZE - DATA_START),
        ADDR_RINGS => RINGS_START + value % (DATA_START - RINGS_START),
        ADDR_END => MEM_SIZE - 1 - value % 0x1000,
        _ => value,
    }
}

/// Bit of a descriptor's mode byte that makes it device-writable.
pub const WRITABLE: u8 = 0x80;

/// A descriptor list as the parsers get it from a chain: `count % (max + 1)` records of
/// `mode: u8` (bits 0-1 an address mode of [`address`], bit 7 device-writable), `addr: u64`,
/// `len: u32`, after a `count: u8`.
pub fn descriptors(input: &mut Input, max: u8) -> Vec<Descriptor> {
    let count = input.u8() % (max + 1);
    (0..count)
        .map(|_| {
            let mode = input.u8();
            let addr = address(mode, input.u64());
            let len = input.u32();
            Descriptor {
                addr,
                len,
                device_writable: mode & WRITABLE != 0,
            }
        })
        .collect()
}

/// The harness driver's buffers for a descriptor list.
pub fn buffers(descs: &[Descriptor]) -> Vec<Buffer> {
    descs
        .iter()
        .map(|d| Buffer {
            addr: d.addr,
            len: d.len,
            writable: d.device_writable,
        })
        .collect()
}

/// Writes a descriptor list the way [`descriptors`] reads it (for seeds).
pub fn encode_descriptors(e: &mut Encoder, descs: &[(u8, u64, u32)]) {
    e.u8(descs.len() as u8);
    for &(mode, addr, len) in descs {
        e.u8(mode).u64(addr).u32(len);
    }
}

/// Checks that host iovecs made for guest segments point exactly at those segments inside
/// the guest memory mapping: the memory-safety promise behind vectored I/O on guest buffers.
pub fn check_iovecs(mem: &GuestMemoryMmap, segments: &[Segment], iov: &[libc::iovec]) {
    assert_eq!(iov.len(), segments.len(), "one iovec per segment");
    for (seg, v) in segments.iter().zip(iov) {
        assert_eq!(v.iov_len, seg.len as usize, "iovec length");
        let region = mem
            .find_region(seg.addr)
            .expect("an iovec for a segment outside guest memory");
        let base = mem
            .get_host_address(region.start_addr())
            .expect("region host address") as usize;
        let offset = (seg.addr.0 - region.start_addr().0) as usize;
        assert_eq!(v.iov_base as usize, base + offset, "iovec address");
        let end = offset.checked_add(v.iov_len).expect("iovec end");
        assert!(end <= region.len() as usize, "iovec past its region");
    }
}

/// Guest memory alone, for targets that need no device.
pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("guest memory")
}

/// Where a block device's image lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageDir {
    /// tmpfs (`/dev/shm`) when there is one: flushes and fallocate stay cheap. tmpfs refuses
    /// `RWF_NOWAIT`, so the hybrid engine sends every read to its io_uring there.
    Shm,
    /// The temporary directory (`TMPDIR`, a disk-backed file system here): the hybrid
    /// engine serves reads the page cache holds inline, the rest on its io_uring.
    Disk,
}

/// The disk image in `dir`: made once per process, unlinked at once (so no run leaves files
/// behind), and opened again through /proc for every new device.
fn image(dir: ImageDir) -> &'static File {
    static SHM: OnceLock<File> = OnceLock::new();
    static DISK: OnceLock<File> = OnceLock::new();
    let cell = match dir {
        ImageDir::Shm => &SHM,
        ImageDir::Disk => &DISK,
    };
    cell.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let dir = if dir == ImageDir::Shm && shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let path: PathBuf = dir.join(format!("keel-fuzz-{}.img", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("creating the fuzz disk image");
        file.set_len(DISK_BYTES)
            .expect("sizing the fuzz disk image");
        let _ = std::fs::remove_file(&path);
        file
    })
}

/// Sets the length of the process's image in `dir` behind the devices' backs (they keep the
/// size they opened it with): a shorter file makes reads past its end complete short.
pub fn set_image_len(dir: ImageDir, len: u64) {
    image(dir)
        .set_len(len)
        .expect("resizing the fuzz disk image");
}

/// A virtio-blk device with `engine` on the process's image in `dir`, unlimited or with a
/// rate limit that holds requests back after the first few (2 operations, 8 KiB). Writes of
/// earlier inputs stay in the file; they change only the data a read returns.
pub fn block_on(read_only: bool, rate_limited: bool, engine: EngineChoice, dir: ImageDir) -> Block {
    let path = format!("/proc/self/fd/{}", image(dir).as_raw_fd());
    let disk = disk::RawDisk::open(Path::new(&path), read_only).expect("opening the fuzz disk");
    let mut limits = RateLimitConfig::default();
    if rate_limited {
        limits.ops_per_sec = NonZeroU64::new(1);
        limits.ops_burst = NonZeroU64::new(2);
        limits.bytes_per_sec = NonZeroU64::new(8192);
    }
    let limiter = RateLimiter::new(&limits).expect("the fuzz rate limiter");
    Block::with_engine(disk, "keel-fuzz", limiter, engine)
}

/// A virtio-blk device with the hybrid engine (io_uring). Where no io_uring can be made the
/// device would fall back to the synchronous engine, and fuzzing it would pass for hybrid
/// coverage it is not: this prints why, once, and exits the process with a failure.
pub fn hybrid_block(read_only: bool, dir: ImageDir) -> Block {
    let block = block_on(read_only, false, EngineChoice::Hybrid, dir);
    if block.engine() != ENGINE_HYBRID {
        eprintln!(
            "keel-fuzz: NO IO_URING: the hybrid virtio-blk engine fell back to {} ({}); \
             this target fuzzes the hybrid engine only, so it stops here instead of passing \
             for coverage it does not have. Allow io_uring (sysctl kernel.io_uring_disabled=0, \
             no seccomp filter against it, RLIMIT_MEMLOCK) and run it again.",
            block.engine(),
            block.fallback_reason().unwrap_or("no reason given"),
        );
        std::process::exit(3);
    }
    block
}

/// A virtio-blk device on the process's disk image, unlimited or with a rate limit that
/// holds requests back after the first few (2 operations, 8 KiB). Writes of earlier inputs
/// stay in the file; they change only the data a read returns.
pub fn block(read_only: bool, rate_limited: bool) -> Block {
    // The synchronous engine: every request completes inside process(), so each input has
    // one outcome (the hybrid engine's parsing and checks are the same code; `blk_hybrid`
    // fuzzes its io_uring side).
    block_on(
        read_only,
        rate_limited,
        EngineChoice::Synchronous,
        ImageDir::Shm,
    )
}

/// The host-side driver harness with a block device behind it.
pub fn block_driver(read_only: bool, rate_limited: bool) -> Driver {
    Driver::new(Box::new(block(read_only, rate_limited)), MEM_SIZE as usize)
}

/// What the device event loop does: serves every queue whose notification fired.
pub fn serve_notifications(d: &mut Driver) {
    let fired: Vec<usize> = d
        .transport
        .queue_events()
        .iter()
        .enumerate()
        .filter(|(_, evt)| evt.read().is_ok())
        .map(|(i, _)| i)
        .collect();
    for q in fired {
        d.transport.process_queue(q);
    }
}

/// One round of the device event loop: waits at most `wait` for a queue notification or one
/// of the device's own event sources (an io_uring's completion eventfd, a rate limiter's
/// timer), then serves each that fired, as `keel vmm`'s loop does. Returns how many fired.
pub fn serve_events(d: &mut Driver, wait: Duration) -> usize {
    let queues = d.transport.queue_events().len();
    let sources = d.transport.event_sources();
    let mut fds: Vec<libc::pollfd> = d
        .transport
        .queue_events()
        .iter()
        .map(|evt| evt.as_raw_fd())
        .chain(sources.iter().map(|&(fd, _)| fd))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = wait.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: polls live pollfds, as many as the vector holds, for at most `ms` ms.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n <= 0 {
        return 0;
    }
    let mut fired = 0;
    for (i, pfd) in fds.iter().enumerate() {
        if pfd.revents == 0 {
            continue;
        }
        fired += 1;
        if i < queues {
            if d.transport.queue_events()[i].read().is_ok() {
                d.transport.process_queue(i);
            }
        } else {
            d.transport.process_event(sources[i - queues].1);
        }
    }
    fired
}

/// A hand-made input and what running it must give.
pub struct Seed<T> {
    pub name: &'static str,
    pub input: Vec<u8>,
    pub expect: T,
}

impl<T> Seed<T> {
    /// A seed whose input is text (a descriptor, a configuration file).
    pub fn text(name: &'static str, text: &str, expect: T) -> Self {
        Seed {
            name,
            input: text.as_bytes().to_vec(),
            expect,
        }
    }
}

/// With `KEEL_FUZZ_WRITE_SEEDS=DIR` in the environment: runs every seed of `target`, checks it
/// gives what it claims, writes it to `DIR/<target>/<name>` and exits. Otherwise does nothing.
/// Called from each target's libFuzzer initialization.
pub fn write_seeds<T: PartialEq + Debug>(
    target: &str,
    seeds: fn() -> Vec<Seed<T>>,
    run: fn(&[u8]) -> T,
) {
    let Some(dir) = std::env::var_os("KEEL_FUZZ_WRITE_SEEDS") else {
        return;
    };
    let dir = Path::new(&dir).join(target);
    std::fs::create_dir_all(&dir).expect("creating the corpus directory");
    for seed in seeds() {
        let got = run(&seed.input);
        assert_eq!(got, seed.expect, "{target} seed {}", seed.name);
        std::fs::write(dir.join(seed.name), &seed.input).expect("writing a seed");
        eprintln!(
            "{target}: seed {} ({} bytes): {got:?}",
            seed.name,
            seed.input.len()
        );
    }
    std::process::exit(0);
}

/// What the VM-import targets (`vmx_plan`, `ovf_plan`) make of an input.
#[derive(Debug, PartialEq)]
pub enum PlanOutcome {
    Planned {
        disks: usize,
        nics: usize,
        left: usize,
    },
    Refused,
}

impl PlanOutcome {
    /// Checks what every plan must be (a Keel name, vCPUs and memory within Keel's limits)
    /// and sums it up; each target checks its disks itself.
    pub fn of(p: &import::Plan) -> PlanOutcome {
        assert!(api::vm::check_name(&p.name).is_ok(), "name {:?}", p.name);
        assert!((1..=api::vm::MAX_CPUS).contains(&p.cpus));
        assert!(p.memory_mib >= api::vm::MIN_MEMORY_MIB);
        PlanOutcome::Planned {
            disks: p.disks.len(),
            nics: p.nics.len(),
            left: p.not_carried.len(),
        }
    }
}
