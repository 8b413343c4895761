//! Fuzz target: the virtio-blk hybrid I/O engine (preadv2 RWF_NOWAIT inline, io_uring for the
//! rest, completions through an eventfd, a bounded set of in-flight slots), driven through the
//! transport by a small program of driver operations on a real file: add request chains
//! (any type, sector, data buffers, duplicated or overlapping ones, chains that fail to parse),
//! notify or not, serve the event loop, serve the completion event on its own (spurious or
//! after waiting for it), make a chain that is still in flight available again, reset the
//! device with requests in flight and bring it up again, and wait for everything.
//!
//! What must hold, checked as the program runs and after a final drain:
//!
//! - nothing panics, and the device never sets DEVICE_NEEDS_RESET (the harness keeps its
//!   rings intact: no buffer is over them);
//! - every used entry names a head the driver has outstanding, as often as it made it
//!   available (no used entry twice, none for a chain already answered or never added);
//!   after the final drain, which kicks as the notification-suppression protocol says (used
//!   ring flags, or avail_event with EVENT_IDX) and then only serves events that fire, no chain
//!   is left outstanding: no lost completion, no lost notification, no lost wakeup of chains
//!   held back for want of a slot;
//! - a call that adds used entries raises the interrupt (the driver asks for every one);
//! - used length never above the writable bytes offered; for a chain the parser accepts, the
//!   status byte is written before its used entry and is 0, 1 or 2, and where the outcome is
//!   certain (range checks, read-only disk, buffers outside memory, unsupported type, flush)
//!   the status and used length are exactly what the device must give;
//! - data end to end: the harness keeps a shadow of the disk; a write that completed OK
//!   defines the bytes of its sectors, and a later read of them must return exactly those
//!   bytes. Where concurrency leaves the content open (overlapping writes in flight together,
//!   a read racing a write of its sectors, guest buffers shared by requests in flight, a
//!   reset abandoning writes), the bytes are unknown and not checked.
//!
//! A reset (status 0) with requests in flight: the device waits for them (or, with the
//! `orphan` flag, waits not at all and orphans them) and drops their completions. So at the
//! reset and forever after, the requests outstanding then get no used entry and no status
//! byte (checked on the status bytes, which stay what the driver put there, also after the
//! device is dropped), and the used ring starts over at 0 with the next bring-up: only chains
//! added after it may appear there. An orphaned read may still fill its guest buffers and an
//! orphaned write may still reach the file later, so those buffers and sectors are unknown
//! for the rest of the input.
//!
//! If io_uring is not available the target says so and exits (`keel_fuzz::hybrid_block`): the
//! synchronous fallback must not pass for hybrid coverage.
//!
//! Input: `flags: u8` (bit 0 read-only disk, bit 1 EVENT_IDX, bit 2 image on the disk-backed
//! temporary directory instead of tmpfs, bit 3 resets orphan requests instead of waiting),
//! `size: u8` (queue size `4 << (size % 7)`), then operations by `op % 16`: 0-5 add a chain
//! (`kind: u8, sector: u8, shape: u8`, for discard and write-zeroes `segment: u8`, then per data
//! buffer `place: u8, offset: u16, len: u8`; see [`Run::add`]); 6 notify the queue; 7 cut the
//! image file to `sectors: u8 % 129` sectors behind the device's back (it keeps the size it
//! opened; reads past the file's end complete short and fail, writes extend it again; the
//! file gets its size back at the end of the input); 8-9 one
//! round of the event loop; 10 the completion event served though it may not have fired;
//! 11 wait up to 2 ms for the completion event and serve it; 12 make the outstanding chain
//! `index: u8` available again; 13 reset and bring up; 14 wait for every chain; 15 serve the
//! queue without a notification.

#![no_main]

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use devices::virtio::block::request::{
    parse, Descriptor, ParseError, RequestKind, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use devices::virtio::block::{BlockStats, COMPLETIONS};
use devices::virtio::driver::ring_addresses;
use devices::virtio::mmio::{REG_QUEUE_NOTIFY, REG_STATUS, STATUS_DRIVER_OK, STATUS_NEEDS_RESET};
use keel_fuzz::{Driver, Encoder, ImageDir, Input, Seed, DATA_START, DISK_BYTES, MEM_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

libfuzzer_sys::fuzz_target!(
    init: {
        // Fails loudly, once, where there is no io_uring.
        drop(keel_fuzz::hybrid_block(false, ImageDir::Shm));
        keel_fuzz::write_seeds("blk_hybrid", seeds, run);
    },
    |data: &[u8]| {
        run(data);
    }
);

const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

/// Operations per input, and chains (each has its own header and status byte).
const MAX_OPS: usize = 512;
const MAX_CHAINS: usize = 1024;
/// Per chain: a 16-byte header and a 16-byte discard / write-zeroes segment.
const HEADERS: u64 = DATA_START;
const STATUSES: u64 = HEADERS + 32 * MAX_CHAINS as u64;
/// Where data buffers go: the rest of guest memory.
const DATA: u64 = STATUSES + MAX_CHAINS as u64;
const DATA_LEN: u64 = MEM_SIZE - DATA;
/// What the driver leaves in a status byte the device must overwrite.
const SENTINEL: u8 = 0xee;
/// Longest the final drain waits for the last completion before calling it lost.
const DRAIN_LIMIT: Duration = Duration::from_secs(3);

/// In a seed's expectations: no status byte the harness knows.
const NONE: u8 = u8::MAX;
const OK: u8 = 0;
const IOERR: u8 = 1;
const UNSUPP: u8 = 2;

/// What a run gives: per chain added after the last reset, in order, the status byte and
/// used length of its (first) used entry; and how many resets there were.
#[derive(Debug, PartialEq)]
struct Outcome {
    completed: Vec<(Option<u8>, u32)>,
    resets: u32,
}

/// How a chain changes the disk, if it does.
#[derive(Clone)]
enum DiskWrite {
    /// These bytes (a write: its source buffers as filled).
    Data(Vec<u8>),
    /// Zeroes (write-zeroes).
    Zeroes,
    /// Something (discard).
    Unknown,
}

/// A read of these disk bytes, into these guest segments (address, length), expecting the
/// bytes the shadow held when it was added (None: unknown).
type DiskRead = (Range<u64>, Vec<(u64, u32)>, Vec<Option<u8>>);

struct Chain {
    head: u16,
    /// Descriptor table entries it occupies.
    entries: Vec<u16>,
    /// Sum of the writable descriptors' lengths.
    writable: u64,
    /// The status byte the device must write before the used entry (in the harness's own
    /// status area), if there is one.
    status: Option<u64>,
    expect_status: Option<u8>,
    expect_len: Option<u32>,
    /// Times made available and not yet used.
    instances: u32,
    /// First used entry: status byte (if known) and length.
    result: Option<(Option<u8>, u32)>,
    /// Guest ranges of its data buffers: [start, end).
    ranges: Vec<(u64, u64, bool)>,
    /// Another chain in flight shares its guest buffers: its data is not checked.
    tainted: bool,
    /// Another chain in flight writes its sectors: its data is not checked.
    contended: bool,
    /// A read of these disk bytes, into these guest segments, expecting the bytes the shadow
    /// held when it was added.
    read: Option<DiskRead>,
    /// A change of these disk bytes.
    write: Option<(Range<u64>, DiskWrite)>,
}

struct Run {
    d: Driver,
    stats: std::sync::Arc<BlockStats>,
    event_idx: bool,
    size: u16,
    features: u64,
    read_only: bool,
    chains: Vec<Chain>,
    /// Outstanding chains by head.
    live: HashMap<u16, usize>,
    free: Vec<u16>,
    avail_idx: u16,
    /// The avail index at the driver's last decision to notify or not.
    decided: u16,
    used_idx: u16,
    /// Chains added since the last reset.
    epoch_chains: usize,
    resets: u32,
    /// Status bytes of chains a reset abandoned: they must keep the sentinel.
    abandoned: Vec<u64>,
    /// Guest ranges orphaned reads may still fill.
    poisoned_mem: Vec<(u64, u64)>,
    /// What the disk holds, where the harness knows; poisoned bytes stay unknown.
    shadow: Vec<Option<u8>>,
    poisoned_disk: Vec<bool>,
    /// Addresses of data buffers so far, for buffers that reuse one.
    history: Vec<u64>,
    dir: ImageDir,
    /// The image file's length since it was last cut (writes may have made it longer).
    file_len: u64,
}

/// With KEEL_FUZZ_TRACE set, the run says what it does (for reading a crash).
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("KEEL_FUZZ_TRACE").is_some())
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

fn in_memory(addr: u64, len: u32) -> bool {
    addr.checked_add(u64::from(len))
        .is_some_and(|end| end <= MEM_SIZE)
}

fn range_of(addr: u64, len: u32) -> (u64, u64) {
    (addr, addr.saturating_add(u64::from(len)))
}

/// The disk bytes `sector` and `len` name, if all lie on the disk.
fn disk_range(sector: u64, len: u64) -> Option<Range<u64>> {
    let start = sector.checked_mul(512)?;
    let end = start.checked_add(len.div_ceil(512) * 512)?;
    (end <= DISK_BYTES).then_some(start..start + len)
}

impl Run {
    fn new(flags: u8, size: u16) -> Self {
        let read_only = flags & 1 != 0;
        let dir = if flags & 4 != 0 {
            ImageDir::Disk
        } else {
            ImageDir::Shm
        };
        keel_fuzz::set_image_len(dir, DISK_BYTES);
        let mut block = keel_fuzz::hybrid_block(read_only, dir);
        if flags & 8 != 0 {
            block.set_reset_wait(Duration::ZERO);
        }
        let stats = block.stats();
        let mut d = Driver::new(Box::new(block), MEM_SIZE as usize);
        let event_idx = flags & 2 != 0;
        let mut features = d.device_features();
        if !event_idx {
            features &= !VIRTIO_RING_F_EVENT_IDX;
        }
        let mut run = Self {
            d,
            stats,
            event_idx,
            size,
            features,
            read_only,
            chains: Vec::new(),
            live: HashMap::new(),
            free: Vec::new(),
            avail_idx: 0,
            decided: 0,
            used_idx: 0,
            epoch_chains: 0,
            resets: 0,
            abandoned: Vec::new(),
            poisoned_mem: Vec::new(),
            shadow: vec![None; DISK_BYTES as usize],
            poisoned_disk: vec![false; DISK_BYTES as usize],
            history: Vec::new(),
            dir,
            file_len: DISK_BYTES,
        };
        run.bring_up();
        run
    }

    fn bring_up(&mut self) {
        // Rings as a driver allocates them, zeroed whole: avail_event and used_event of an
        // earlier bring-up would otherwise hold back the first notification or interrupt.
        let (_, avail, used) = ring_addresses(0);
        for (at, len) in [(avail, 6 + 2 * 256), (used, 6 + 8 * 256)] {
            self.d
                .mem
                .write_slice(&vec![0u8; len], GuestAddress(at))
                .expect("rings");
        }
        let status = self.d.init(self.features, self.size);
        assert_eq!(
            status & (STATUS_DRIVER_OK | STATUS_NEEDS_RESET),
            STATUS_DRIVER_OK,
            "bring-up: status {status:#x}"
        );
        self.free = (0..self.size).rev().collect();
        self.avail_idx = 0;
        self.decided = 0;
        self.used_idx = 0;
        self.epoch_chains = 0;
        self.set_used_event();
        let _ = self.d.irq.read();
    }

    /// With EVENT_IDX: the driver wants an interrupt for the next used entry.
    fn set_used_event(&mut self) {
        if self.event_idx {
            let at = ring_addresses(0).1 + 4 + 2 * u64::from(self.size);
            self.d
                .mem
                .write_obj(self.used_idx, GuestAddress(at))
                .expect("used_event");
        }
    }

    fn used_idx_in_memory(&self) -> u16 {
        self.d
            .mem
            .read_obj(GuestAddress(ring_addresses(0).2 + 2))
            .expect("used idx")
    }

    fn outstanding(&self) -> u32 {
        self.live.values().map(|&c| self.chains[c].instances).sum()
    }

    /// The driver decides, as the notification-suppression protocol says, whether the device
    /// needs a notification for what it made available since its last decision.
    fn notify_if_needed(&mut self) {
        let need = if self.event_idx {
            let event = self.d.avail_event(0);
            let (new, old) = (self.avail_idx, self.decided);
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            self.d.used_flags(0) & VIRTQ_USED_F_NO_NOTIFY == 0
        };
        self.decided = self.avail_idx;
        if need {
            self.d.write_reg(REG_QUEUE_NOTIFY, 0);
        }
    }

    fn notify(&mut self) {
        self.decided = self.avail_idx;
        self.d.write_reg(REG_QUEUE_NOTIFY, 0);
    }

    fn make_available(&mut self, head: u16, notify: u8) {
        self.d.make_available(0, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        match notify {
            1 => {}
            2 => self.notify(),
            _ => self.notify_if_needed(),
        }
    }

    /// Reads what the device did in the last call: new used entries, the interrupt, the
    /// device status.
    fn observe(&mut self) {
        let used = self.d.used(0);
        let irq = self.d.irq.read().is_ok();
        assert_eq!(
            self.d.transport.status() & STATUS_NEEDS_RESET,
            0,
            "the device gave up (DEVICE_NEEDS_RESET) on rings the driver kept intact"
        );
        if !used.is_empty() {
            assert!(
                irq,
                "{} used entries and no interrupt, though the driver asked for one",
                used.len()
            );
        }
        for (id, len) in used {
            self.used_idx = self.used_idx.wrapping_add(1);
            self.account(id, len);
        }
        self.set_used_event();
    }

    fn account(&mut self, id: u32, len: u32) {
        let head = u16::try_from(id).ok().filter(|&h| h < self.size);
        let Some(&c) = head.and_then(|h| self.live.get(&h)) else {
            panic!(
                "used entry for head {id}, which the driver does not have outstanding \
                 (outstanding: {:?})",
                self.live.keys().collect::<Vec<_>>()
            );
        };
        let chain = &mut self.chains[c];
        if trace() {
            eprintln!(
                "used: head {id} (chain {c}) len {len}, status byte {:?}",
                chain
                    .status
                    .map(|at| self.d.mem.read_obj::<u8>(GuestAddress(at)))
            );
        }
        assert!(chain.instances > 0);
        chain.instances -= 1;
        assert!(
            u64::from(len) <= chain.writable,
            "used length {len} of head {id} beyond the {} writable bytes offered",
            chain.writable
        );
        let status = chain.status.map(|at| {
            let s: u8 = self.d.mem.read_obj(GuestAddress(at)).expect("status byte");
            assert_ne!(
                s, SENTINEL,
                "used entry for head {id} without its status byte written"
            );
            assert!(s <= UNSUPP, "status byte {s} of head {id}");
            s
        });
        if let (Some(want), Some(got)) = (chain.expect_status, status) {
            assert_eq!(got, want, "status of head {id}");
        }
        if let Some(want) = chain.expect_len {
            assert_eq!(len, want, "used length of head {id}");
        }
        let first = chain.result.is_none();
        if first {
            chain.result = Some((status, len));
        }
        let clean = !chain.tainted && !chain.contended && status == Some(OK);
        if first && clean {
            if let Some((disk, segments, expect)) = &chain.read {
                let mut got = Vec::with_capacity(expect.len());
                for &(addr, len) in segments {
                    let mut buf = vec![0u8; len as usize];
                    self.d
                        .mem
                        .read_slice(&mut buf, GuestAddress(addr))
                        .expect("read buffer");
                    got.extend_from_slice(&buf);
                }
                for (i, (want, got)) in expect.iter().zip(&got).enumerate() {
                    if let Some(want) = want {
                        assert_eq!(
                            got,
                            want,
                            "head {id}: the read of disk bytes {disk:?} gave {got:#04x} at disk \
                             byte {}, the write that completed before it wrote {want:#04x}",
                            disk.start + i as u64
                        );
                    }
                }
            }
        }
        if chain.instances > 0 {
            return;
        }
        // Answered: the chain leaves, its descriptors are free, its write is in the file.
        let chain = &self.chains[c];
        self.live.remove(&chain.head);
        self.free.extend_from_slice(&chain.entries);
        if let Some((disk, what)) = &chain.write {
            let (start, disk, what) = (disk.start, disk.clone(), what.clone());
            if status == Some(OK) && !chain.contended && matches!(what, DiskWrite::Data(_)) {
                // A write that completed made the file at least this long (unless the file
                // was cut while it was in flight, which marks it contended).
                self.file_len = self.file_len.max(disk.end);
            }
            for b in disk {
                let i = b as usize;
                if self.poisoned_disk[i] {
                    continue;
                }
                self.shadow[i] = match (&what, clean) {
                    (DiskWrite::Data(data), true) => Some(data[(b - start) as usize]),
                    (DiskWrite::Zeroes, true) => Some(0),
                    _ => None,
                };
            }
        }
    }

    /// Adds a chain (op 0-5). `kind % 8`: read, write, flush, get-id, discard, write-zeroes,
    /// type 99, read; `kind / 8 % 4`: notify as the protocol says (0, 3), not at all (1),
    /// always (2). `sector`: `sector % 136`, 255 for u64::MAX. `shape`: `& 15 % 5` data buffers,
    /// bit 4 header in two descriptors, bit 5 no status descriptor, bit 6 an 8-byte header,
    /// bit 7 a device-readable status descriptor. Discard and write-zeroes: `segment` gives
    /// the segment's sectors (`% 24`) and flags (`/ 32`). A data buffer: `place % 4`: in the
    /// data area at `offset * 64`, at the address of an earlier buffer, over the end of
    /// memory, outside memory; `place` bit 2 turns its direction around; `len`: `len % 17`
    /// sectors, or with bit 7 `(len & 0x7f) * 4 + 1` bytes.
    fn add(&mut self, input: &mut Input) {
        let kind_byte = input.u8();
        let sector_byte = input.u8();
        let shape = input.u8();
        let kind = match kind_byte % 8 {
            0 | 7 => VIRTIO_BLK_T_IN,
            1 => VIRTIO_BLK_T_OUT,
            2 => VIRTIO_BLK_T_FLUSH,
            3 => VIRTIO_BLK_T_GET_ID,
            4 => VIRTIO_BLK_T_DISCARD,
            5 => VIRTIO_BLK_T_WRITE_ZEROES,
            _ => 99,
        };
        let notify = (kind_byte / 8) % 4;
        let sector = match sector_byte {
            255 => u64::MAX,
            s => u64::from(s) % 136,
        };
        let segment = if matches!(kind, VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES) {
            Some(input.u8())
        } else {
            None
        };
        let n = self.chains.len();
        let writes_data = kind != VIRTIO_BLK_T_IN && kind != VIRTIO_BLK_T_GET_ID;
        let header = HEADERS + 32 * n as u64;
        let status = STATUSES + n as u64;

        let mut descs = Vec::new();
        let header_len = if shape & 0x40 != 0 { 8 } else { 16 };
        if shape & 0x10 != 0 {
            descs.push((header, 5, false));
            descs.push((header + 5, header_len - 5, false));
        } else {
            descs.push((header, header_len, false));
        }
        if let Some(seg) = segment {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&sector.to_le_bytes());
            raw[8..12].copy_from_slice(&u32::from(seg % 24).to_le_bytes());
            raw[12..].copy_from_slice(&u32::from(seg / 32).to_le_bytes());
            self.d
                .mem
                .write_slice(&raw, GuestAddress(header + 16))
                .expect("segment");
            descs.push((header + 16, 16, false));
        }
        for _ in 0..(shape & 0x0f) % 5 {
            let place = input.u8();
            let offset = input.u16();
            let len = input.u8();
            let addr = match place % 4 {
                0 => DATA + (u64::from(offset) * 64) % DATA_LEN,
                1 => match self.history.len() {
                    0 => DATA,
                    h => self.history[usize::from(offset) % h],
                },
                2 => MEM_SIZE - 1 - u64::from(offset) % 4096,
                _ if offset & 1 == 0 => MEM_SIZE + u64::from(offset) * 4096,
                _ => u64::MAX - u64::from(offset),
            };
            self.history.push(addr);
            let len = if len & 0x80 == 0 {
                u32::from(len % 17) * 512
            } else {
                u32::from(len & 0x7f) * 4 + 1
            };
            // With the 8-byte header every data buffer is writable: the header stays short,
            // whatever the guest buffers hold (parsing must not depend on them).
            let writable = shape & 0x40 != 0 || (!writes_data ^ (place & 4 != 0));
            descs.push((addr, len, writable));
        }
        if shape & 0x20 == 0 {
            descs.push((status, 1, shape & 0x80 == 0));
        }
        if descs.len() > self.free.len()
            || self.outstanding() >= u32::from(self.size)
            || n >= MAX_CHAINS
        {
            return; // No room: a driver would wait.
        }

        // The request in guest memory: header, status sentinel.
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&kind.to_le_bytes());
        raw[8..].copy_from_slice(&sector.to_le_bytes());
        self.d
            .mem
            .write_slice(&raw, GuestAddress(header))
            .expect("header");
        self.d
            .mem
            .write_obj(SENTINEL, GuestAddress(status))
            .expect("status");
        let descriptors: Vec<Descriptor> = descs
            .iter()
            .map(|&(addr, len, device_writable)| Descriptor {
                addr,
                len,
                device_writable,
            })
            .collect();
        let parsed = parse(&descriptors, &self.d.mem);

        // A write's data: a pattern of this chain, put in its source buffers now.
        if let Ok(req) = &parsed {
            if req.kind == RequestKind::Write {
                for (k, s) in req.data.iter().enumerate() {
                    if in_memory(s.addr.0, s.len) {
                        let fill: Vec<u8> = (0..s.len)
                            .map(|i| (n as u32 * 37 + k as u32 * 11 + i * 7 + i / 512) as u8)
                            .collect();
                        self.d.mem.write_slice(&fill, s.addr).expect("fill");
                    }
                }
            }
        }

        let mut chain = Chain {
            head: 0,
            entries: Vec::new(),
            writable: descs.iter().filter(|d| d.2).map(|d| u64::from(d.1)).sum(),
            status: None,
            expect_status: None,
            expect_len: None,
            instances: 1,
            result: None,
            ranges: descs
                .iter()
                .filter(|d| d.0 >= DATA)
                .map(|&(a, l, w)| {
                    let r = range_of(a, l);
                    (r.0, r.1, w)
                })
                .collect(),
            tainted: false,
            contended: false,
            read: None,
            write: None,
        };
        self.predict(&mut chain, &parsed, &descriptors, status);

        // Guest buffers shared with a chain in flight, or that an orphan may still fill.
        let mine: Vec<(u64, u64)> = chain.ranges.iter().map(|r| (r.0, r.1)).collect();
        for (i, a) in mine.iter().enumerate() {
            if mine[..i].iter().any(|&b| overlaps(*a, b))
                || self.poisoned_mem.iter().any(|&b| overlaps(*a, b))
            {
                chain.tainted = true;
            }
        }
        let disk_of =
            |c: &Chain| -> Option<(u64, u64)> { c.write.as_ref().map(|(r, _)| (r.start, r.end)) };
        let my_write = disk_of(&chain);
        let my_read = chain.read.as_ref().map(|(r, _, _)| (r.start, r.end));
        for &c in self.live.values() {
            let other = &mut self.chains[c];
            if other
                .ranges
                .iter()
                .any(|r| mine.iter().any(|&m| overlaps(m, (r.0, r.1))))
            {
                other.tainted = true;
                chain.tainted = true;
            }
            let other_write = other.write.as_ref().map(|(r, _)| (r.start, r.end));
            let other_read = other.read.as_ref().map(|(r, _, _)| (r.start, r.end));
            if let Some(w) = my_write {
                if other_write.is_some_and(|o| overlaps(w, o)) {
                    other.contended = true;
                    chain.contended = true;
                }
                if other_read.is_some_and(|o| overlaps(w, o)) {
                    other.contended = true;
                }
            }
            if let Some(r) = my_read {
                if other_write.is_some_and(|o| overlaps(r, o)) {
                    chain.contended = true;
                }
            }
        }

        // Into the descriptor table, on free entries, in any order.
        let entries: Vec<u16> = (0..descs.len())
            .map(|_| self.free.pop().expect("free entry"))
            .collect();
        for (i, &(addr, len, writable)) in descs.iter().enumerate() {
            let more = i + 1 < descs.len();
            let flags = u16::from(more) | if writable { 2 } else { 0 };
            let next = if more { entries[i + 1] } else { 0 };
            self.d.write_desc(0, entries[i], addr, len, flags, next);
        }
        chain.head = entries[0];
        chain.entries = entries;
        let head = chain.head;
        if trace() {
            eprintln!(
                "add chain {n}: head {head} type {kind} sector {sector} notify {notify} \
                 {descs:x?}: {:?}; expect status {:?} len {:?}; tainted {} contended {}",
                parsed.as_ref().map(|r| (&r.kind, r.data_len)),
                chain.expect_status,
                chain.expect_len,
                chain.tainted,
                chain.contended
            );
        }
        self.live.insert(head, self.chains.len());
        self.chains.push(chain);
        self.epoch_chains += 1;
        self.make_available(head, notify);
    }

    /// What the device must answer, where that is certain, and what the chain does to the
    /// disk and to guest memory.
    fn predict(
        &self,
        chain: &mut Chain,
        parsed: &Result<devices::virtio::block::request::Request, ParseError>,
        descs: &[Descriptor],
        status_area: u64,
    ) {
        let req = match parsed {
            Err(e) => {
                // IOERR in the last writable byte, when there is one.
                let at = e
                    .has_status()
                    .then(|| {
                        descs
                            .iter()
                            .rev()
                            .find(|d| d.device_writable && d.len > 0)
                            .and_then(|d| d.addr.checked_add(u64::from(d.len) - 1))
                    })
                    .flatten();
                if at == Some(status_area) {
                    chain.status = at;
                    chain.expect_status = Some(IOERR);
                    chain.expect_len = Some(1);
                } else if at.is_none() {
                    chain.expect_len = Some(0);
                }
                return;
            }
            Ok(req) => req,
        };
        if req.status.0 == status_area {
            chain.status = Some(status_area);
        }
        let data_in_memory = req.data.iter().all(|s| in_memory(s.addr.0, s.len));
        let range = disk_range(req.sector, req.data_len);
        let (status, written) = match req.kind {
            RequestKind::Read | RequestKind::Write => {
                let write = req.kind == RequestKind::Write;
                match range {
                    _ if write && self.read_only => (Some(IOERR), 0),
                    None => (Some(IOERR), 0),
                    Some(_) if req.data_len == 0 => (Some(OK), 0),
                    Some(_) if !data_in_memory => (Some(IOERR), 0),
                    // The file was cut short: the read may fail, or find it written again.
                    Some(range) if range.end > self.file_len && !write => (None, 0),
                    Some(range) => {
                        let segments: Vec<(u64, u32)> =
                            req.data.iter().map(|s| (s.addr.0, s.len)).collect();
                        if write {
                            let mut data = Vec::with_capacity(req.data_len as usize);
                            for &(addr, len) in &segments {
                                let mut buf = vec![0u8; len as usize];
                                self.d
                                    .mem
                                    .read_slice(&mut buf, GuestAddress(addr))
                                    .expect("source");
                                data.extend_from_slice(&buf);
                            }
                            chain.write = Some((range, DiskWrite::Data(data)));
                            (Some(OK), 0)
                        } else {
                            let expect =
                                self.shadow[range.start as usize..range.end as usize].to_vec();
                            chain.read = Some((range, segments, expect));
                            (Some(OK), req.data_len as u32)
                        }
                    }
                }
            }
            RequestKind::Flush => (Some(OK), 0),
            RequestKind::Unsupported(_) => (Some(UNSUPP), 0),
            RequestKind::GetId => (None, 0),
            RequestKind::Discard | RequestKind::WriteZeroes => {
                if self.read_only {
                    (Some(IOERR), 0)
                } else if req.data_len != 16 {
                    (Some(UNSUPP), 0)
                } else {
                    // The segment is the harness's own (a data buffer cannot be 16 bytes).
                    let mut seg = [0u8; 16];
                    if self.d.mem.read_slice(&mut seg, req.data[0].addr).is_ok() {
                        let sector = u64::from_le_bytes(seg[..8].try_into().expect("8"));
                        let sectors = u32::from_le_bytes(seg[8..12].try_into().expect("4"));
                        if let Some(r) = disk_range(sector, u64::from(sectors) * 512) {
                            let what = if req.kind == RequestKind::WriteZeroes {
                                DiskWrite::Zeroes
                            } else {
                                DiskWrite::Unknown
                            };
                            chain.write = Some((r, what));
                        }
                    }
                    (None, 0)
                }
            }
        };
        if chain.status.is_some() {
            chain.expect_status = status;
            if status.is_some() {
                chain.expect_len = Some(written + 1);
            }
        }
    }

    /// Cuts the image file to `sectors % 129` sectors (op 7). Requests in flight may meet
    /// either length: their outcome and data are no longer certain.
    fn cut(&mut self, sectors: u8) {
        let len = u64::from(sectors % 129) * 512;
        if trace() {
            eprintln!("cut the file to {len} bytes");
        }
        keel_fuzz::set_image_len(self.dir, len);
        self.file_len = len;
        for &c in self.live.values() {
            let chain = &mut self.chains[c];
            chain.expect_status = None;
            chain.expect_len = None;
            chain.contended = true;
        }
        // Bytes past the end read as zeroes once writes make the file longer again.
        for b in len..DISK_BYTES {
            if !self.poisoned_disk[b as usize] {
                self.shadow[b as usize] = Some(0);
            }
        }
    }

    /// Makes an outstanding chain available again while it is in flight (op 12).
    fn republish(&mut self, input: &mut Input) {
        let pick = input.u8();
        if self.live.is_empty() || self.outstanding() >= u32::from(self.size) {
            return;
        }
        let mut heads: Vec<u16> = self.live.keys().copied().collect();
        heads.sort_unstable();
        let head = heads[usize::from(pick) % heads.len()];
        let c = self.live[&head];
        let chain = &mut self.chains[c];
        chain.instances += 1;
        // Two requests on the same buffers and sectors: the data is anyone's.
        chain.tainted = true;
        chain.contended = true;
        self.make_available(head, pick / 128);
    }

    /// Status 0 with whatever is in flight, then the bring-up again (op 13).
    fn reset(&mut self) {
        let before = self.used_idx_in_memory();
        self.d.write_reg(REG_STATUS, 0);
        assert_eq!(self.d.transport.status(), 0);
        // Nothing completes into the reset queue, whatever the event loop serves.
        keel_fuzz::serve_events(&mut self.d, Duration::ZERO);
        assert_eq!(
            self.used_idx_in_memory(),
            before,
            "used entries after the reset began"
        );
        let mut live: Vec<usize> = self.live.drain().map(|(_, c)| c).collect();
        live.sort_unstable();
        for c in live {
            let chain = &self.chains[c];
            if let Some(at) = chain.status {
                if chain.result.is_none() {
                    assert_eq!(
                        self.d.mem.read_obj::<u8>(GuestAddress(at)).expect("status"),
                        SENTINEL,
                        "a status byte written for a chain the reset abandoned"
                    );
                    self.abandoned.push(at);
                }
            }
            self.poisoned_mem
                .extend(chain.ranges.iter().filter(|r| r.2).map(|r| (r.0, r.1)));
            if let Some((disk, _)) = &chain.write {
                for b in disk.clone() {
                    self.poisoned_disk[b as usize] = true;
                    self.shadow[b as usize] = None;
                }
            }
        }
        self.resets += 1;
        self.bring_up();
    }

    /// Serves events until every chain is answered, as a driver waiting for them would: it
    /// notifies if the protocol says so, then only events that fire move anything (op 14 and
    /// the end of every input).
    fn drain(&mut self) {
        self.notify_if_needed();
        let deadline = Instant::now() + DRAIN_LIMIT;
        while self.outstanding() > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let mut heads: Vec<u16> = self.live.keys().copied().collect();
                heads.sort_unstable();
                panic!(
                    "lost completion: heads {heads:?} still outstanding {DRAIN_LIMIT:?} after \
                     the driver notified as the protocol says (used flags {:#x}, avail_event \
                     {}, avail idx {}, event_idx {}); engine stats {:?}",
                    self.d.used_flags(0),
                    self.d.avail_event(0),
                    self.avail_idx,
                    self.event_idx,
                    self.stats
                );
            }
            keel_fuzz::serve_events(&mut self.d, left.min(Duration::from_millis(50)));
            self.observe();
        }
    }

    fn finish(mut self) -> Outcome {
        self.drain();
        let mem: GuestMemoryMmap = self.d.mem.clone();
        let used = self.used_idx_in_memory();
        let check = |mem: &GuestMemoryMmap, when: &str| {
            for &at in &self.abandoned {
                assert_eq!(
                    mem.read_obj::<u8>(GuestAddress(at)).expect("status"),
                    SENTINEL,
                    "a status byte written for a chain a reset abandoned ({when})"
                );
            }
        };
        check(&mem, "after the drain");
        let completed = self.chains[self.chains.len() - self.epoch_chains..]
            .iter()
            .map(|c| c.result.expect("answered"))
            .collect();
        let outcome = Outcome {
            completed,
            resets: self.resets,
        };
        totals(&self.stats);
        let abandoned = std::mem::take(&mut self.abandoned);
        // Dropping the device waits for orphans; they touch neither ring nor status byte.
        drop(self.d);
        keel_fuzz::set_image_len(self.dir, DISK_BYTES);
        let after: u16 = mem
            .read_obj(GuestAddress(ring_addresses(0).2 + 2))
            .expect("used idx");
        assert_eq!(after, used, "used entries after the device was dropped");
        for at in abandoned {
            assert_eq!(
                mem.read_obj::<u8>(GuestAddress(at)).expect("status"),
                SENTINEL,
                "a status byte written for a chain a reset abandoned (after the drop)"
            );
        }
        outcome
    }
}

/// With KEEL_FUZZ_STATS set, prints what the engine did over all runs so far, now and then:
/// which of its paths the fuzzer reaches.
fn totals(stats: &BlockStats) {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    static SUMS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*ENABLED.get_or_init(|| std::env::var_os("KEEL_FUZZ_STATS").is_some()) {
        return;
    }
    let now = [
        &stats.reads_inline,
        &stats.reads_ring,
        &stats.reads_partly_inline,
        &stats.writes_ring,
        &stats.flushes_ring,
        &stats.flushes_waited,
        &stats.resubmits,
        &stats.orphaned,
    ];
    for (sum, n) in SUMS.iter().zip(now) {
        sum.fetch_add(n.load(Ordering::Relaxed), Ordering::Relaxed);
    }
    let runs = RUNS.fetch_add(1, Ordering::Relaxed) + 1;
    if runs.is_power_of_two() || runs.is_multiple_of(100_000) {
        let s: Vec<u64> = SUMS.iter().map(|s| s.load(Ordering::Relaxed)).collect();
        eprintln!(
            "blk_hybrid: {runs} runs: reads inline {} ring {} partly inline {}, writes {}, \
             flushes {} (waited {}), resubmits {}, orphaned {}",
            s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]
        );
    }
}

fn run(data: &[u8]) -> Outcome {
    let mut input = Input::new(data);
    let flags = input.u8();
    let size = 4u16 << (input.u8() % 7);
    let mut r = Run::new(flags, size);
    let mut ops = 0;
    while !input.is_empty() && ops < MAX_OPS {
        ops += 1;
        let op = input.u8() % 16;
        if trace() && !(0..=5).contains(&op) {
            eprintln!("op {op}");
        }
        match op {
            0..=5 => r.add(&mut input),
            6 => r.notify(),
            7 => r.cut(input.u8()),
            8 | 9 => {
                keel_fuzz::serve_events(&mut r.d, Duration::ZERO);
                r.observe();
            }
            10 => {
                r.d.transport.process_event(COMPLETIONS);
                r.observe();
            }
            11 => {
                if r.outstanding() > 0 {
                    keel_fuzz::serve_events(&mut r.d, Duration::from_millis(2));
                    r.observe();
                }
            }
            12 => r.republish(&mut input),
            13 => r.reset(),
            14 => r.drain(),
            _ => {
                r.d.process(0);
                r.observe();
            }
        }
    }
    r.finish()
}

// Seeds: the request mixes the hybrid engine's bookkeeping is about.

const ADD: u8 = 0;
const KICK: u8 = 6;
const CUT: u8 = 7;
const SERVE: u8 = 8;
const SPURIOUS: u8 = 10;
const WAIT: u8 = 11;
const REPUBLISH: u8 = 12;
const RESET: u8 = 13;
const DRAIN: u8 = 14;
const PROCESS: u8 = 15;

/// Notify mode of an added chain (`kind / 8 % 4`; 0 is as the protocol says).
const NEVER: u8 = 8;

/// Kinds (`kind % 8`).
const READ: u8 = 0;
const WRITE: u8 = 1;
const FLUSH: u8 = 2;
const GET_ID: u8 = 3;
const DISCARD: u8 = 4;
const WRITE_ZEROES: u8 = 5;
const UNSUPPORTED: u8 = 6;

/// A data buffer: in the data area at `offset * 64`, `sectors` long.
fn buffer(e: &mut Encoder, offset: u16, sectors: u8) {
    e.u8(0).u16(offset).u8(sectors);
}

/// Op "add" for a request with `buffers` data buffers of `sectors` each, `stride` apart.
fn add(e: &mut Encoder, kind: u8, sector: u8, shape: u8, buffers: &[(u16, u8)]) {
    e.u8(ADD)
        .u8(kind)
        .u8(sector)
        .u8(shape | buffers.len() as u8);
    if matches!(kind % 8, DISCARD | WRITE_ZEROES) {
        // 4 sectors; write-zeroes may unmap (a discard takes no flags).
        e.u8(if kind % 8 == WRITE_ZEROES { 4 | 32 } else { 4 });
    }
    for &(offset, sectors) in buffers {
        buffer(e, offset, sectors);
    }
}

fn input(flags: u8, size: u8, body: impl FnOnce(&mut Encoder)) -> Vec<u8> {
    let mut e = Encoder::new();
    e.u8(flags).u8(size);
    body(&mut e);
    e.finish()
}

fn seed(name: &'static str, input: Vec<u8>, completed: &[(u8, u32)], resets: u32) -> Seed<Outcome> {
    Seed {
        name,
        input,
        expect: Outcome {
            completed: completed
                .iter()
                .map(|&(s, l)| ((s != NONE).then_some(s), l))
                .collect(),
            resets,
        },
    }
}

fn seeds() -> Vec<Seed<Outcome>> {
    // Queue size 256 (size byte 6), tmpfs image unless flag 4.
    vec![
        seed(
            "write_flush_read",
            input(0, 6, |e| {
                add(e, WRITE, 8, 0, &[(0, 8)]);
                add(e, FLUSH, 0, 0, &[]);
                e.u8(SERVE).u8(DRAIN);
                add(e, READ, 8, 0, &[(0x100, 4), (0x200, 4)]);
                e.u8(DRAIN);
            }),
            &[(OK, 1), (OK, 1), (OK, 4097)],
            0,
        ),
        seed(
            "write_read_on_disk_inline",
            input(4 | 2, 6, |e| {
                add(e, WRITE, 16, 0, &[(0, 2), (0x80, 2)]);
                e.u8(DRAIN);
                add(e, READ, 16, 0x10, &[(0x400, 4)]);
                add(e, READ, 17, 0, &[(0x500, 1)]);
                e.u8(DRAIN);
            }),
            &[(OK, 1), (OK, 2049), (OK, 513)],
            0,
        ),
        seed(
            "many_in_flight_with_bad_chains_between",
            input(0, 6, |e| {
                for i in 0..24u8 {
                    match i % 4 {
                        0 => add(e, WRITE | NEVER, i, 0, &[(u16::from(i) * 0x40, 1)]),
                        1 => add(
                            e,
                            READ | NEVER,
                            i - 1,
                            0,
                            &[(0x1000 + u16::from(i) * 0x40, 1)],
                        ),
                        2 => add(e, READ | NEVER, i, 0x20, &[(0x2000, 1)]), // no status
                        _ => add(e, FLUSH | NEVER, 0, 0, &[]),
                    }
                }
                e.u8(KICK).u8(SERVE).u8(WAIT).u8(SPURIOUS).u8(DRAIN);
            }),
            &(0..24)
                .map(|i| match i % 4 {
                    0 | 3 => (OK, 1),
                    1 => (OK, 513),
                    _ => (NONE, 1),
                })
                .collect::<Vec<_>>(),
            0,
        ),
        seed(
            "reset_with_writes_in_flight_then_again",
            input(8, 6, |e| {
                for i in 0..8u8 {
                    add(e, WRITE, i * 8, 0, &[(u16::from(i) * 0x100, 8)]);
                }
                add(e, FLUSH, 0, 0, &[]);
                e.u8(SERVE).u8(RESET);
                add(e, WRITE, 0, 0, &[(0x800, 1)]);
                add(e, READ, 0, 0, &[(0x900, 1)]);
                e.u8(PROCESS).u8(DRAIN);
            }),
            &[(OK, 1), (OK, 513)],
            1,
        ),
        seed(
            "republish_in_flight_and_tiny_queue",
            input(2, 1, |e| {
                add(e, WRITE, 4, 0, &[(0, 4)]);
                e.u8(REPUBLISH).u8(0);
                add(e, READ, 4, 0, &[(0x100, 4)]);
                e.u8(KICK).u8(SERVE).u8(DRAIN);
            }),
            &[(OK, 1), (OK, 2049)],
            0,
        ),
        seed(
            "get_id_discard_write_zeroes_unsupported_out_of_range",
            input(0, 6, |e| {
                add(e, GET_ID, 0, 0, &[(0, 1)]);
                add(e, WRITE_ZEROES, 40, 0, &[]);
                add(e, READ, 40, 0, &[(0x100, 4)]);
                add(e, DISCARD, 50, 0, &[]);
                add(e, UNSUPPORTED, 0, 0, &[]);
                add(e, READ, 130, 0, &[(0x200, 8)]);
                add(e, WRITE, 255, 0, &[(0x300, 1)]);
                e.u8(DRAIN);
            }),
            &[
                (OK, 21),
                (OK, 1),
                (OK, 2049),
                (OK, 1),
                (UNSUPP, 1),
                (IOERR, 1),
                (IOERR, 1),
            ],
            0,
        ),
        seed(
            "cut_the_file_read_past_its_end_write_it_longer",
            input(0, 6, |e| {
                add(e, WRITE, 100, 0, &[(0, 2)]);
                e.u8(DRAIN).u8(CUT).u8(64);
                add(e, READ, 100, 0, &[(0x100, 2)]);
                add(e, READ, 60, 0, &[(0x200, 8)]);
                e.u8(DRAIN);
                add(e, WRITE, 120, 0, &[(0x300, 1)]);
                e.u8(DRAIN);
                add(e, READ, 100, 0, &[(0x400, 2)]);
                add(e, READ, 120, 0, &[(0x500, 1)]);
                e.u8(DRAIN);
            }),
            &[
                (OK, 1),
                (IOERR, 1),
                (IOERR, 1),
                (OK, 1),
                (OK, 1025),
                (OK, 513),
            ],
            0,
        ),
        seed(
            "read_only_disk",
            input(1, 6, |e| {
                add(e, WRITE, 0, 0, &[(0, 1)]);
                add(e, READ, 0, 0, &[(0x100, 1)]);
                add(e, FLUSH, 0, 0, &[]);
                e.u8(DRAIN);
            }),
            &[(IOERR, 1), (OK, 513), (OK, 1)],
            0,
        ),
    ]
}
