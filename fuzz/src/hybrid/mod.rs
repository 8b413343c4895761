//! The `blk_hybrid` target's driver and its model of what the device must do: the virtio-blk
//! hybrid I/O engine (preadv2 RWF_NOWAIT inline, io_uring for the rest, completions through an
//! eventfd, a bounded set of in-flight slots), driven through the transport by a small program
//! of driver operations on a real file. The target (`src/bin/blk_hybrid.rs`) decodes the
//! program and runs it; this module has the driver's side of the rings and the final drain
//! (`driver.rs`), the operations that add chains or change the file behind the device
//! (`ops.rs`), the expectations and the shadow of the disk they are checked against
//! (`model.rs`), and the hand-made seeds (`seeds.rs`).
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
//! With few in-flight slots (an input flag), chains beyond them wait in the ring: the device
//! takes them when completions free slots, on the completion event alone (the driver does not
//! notify again), and the final drain, which serves only events that fire, must see every one
//! answered.
//!
//! If io_uring is not available the target says so and exits (`crate::hybrid_block`): the
//! synchronous fallback must not pass for hybrid coverage.

mod driver;
mod model;
mod ops;
mod seeds;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use devices::virtio::block::BlockStats;

use self::model::Chain;
pub use self::seeds::seeds;
use crate::{Driver, ImageDir, DATA_START, MEM_SIZE, VIRTIO_RING_F_EVENT_IDX};

const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

/// Operations per input, and chains (each has its own header and status byte).
pub const MAX_OPS: usize = 512;
const MAX_CHAINS: usize = 1024;
/// Per chain: a 16-byte header and a 16-byte discard / write-zeroes segment.
const HEADERS: u64 = DATA_START;
const STATUSES: u64 = HEADERS + 32 * MAX_CHAINS as u64;
/// Where data buffers go: the rest of guest memory.
const DATA: u64 = STATUSES + MAX_CHAINS as u64;
const DATA_LEN: u64 = MEM_SIZE - DATA;
/// What the driver leaves in a status byte the device must overwrite.
const SENTINEL: u8 = 0xee;
/// Longest the final drain waits for the next used entry before calling the rest lost.
const DRAIN_LIMIT: Duration = Duration::from_secs(3);

/// In a seed's expectations: no status byte the harness knows.
const NONE: u8 = u8::MAX;
const OK: u8 = 0;
const IOERR: u8 = 1;
const UNSUPP: u8 = 2;

/// What a run gives: per chain added after the last reset, in order, the status byte and
/// used length of its (first) used entry; and how many resets there were.
#[derive(Debug, PartialEq)]
pub struct Outcome {
    completed: Vec<(Option<u8>, u32)>,
    resets: u32,
}

/// The driver of one run and what it knows: its chains, its side of the rings, the model.
pub struct Run {
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
    /// In-flight slots, when the input limits them (else as many as the queue's entries).
    slots: Option<u16>,
}

/// With KEEL_FUZZ_TRACE set, the run says what it does (for reading a crash).
pub fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("KEEL_FUZZ_TRACE").is_some())
}

/// With KEEL_FUZZ_STATS set, prints what the engine did over all runs so far, now and then:
/// which of its paths the fuzzer reaches.
fn totals(stats: &BlockStats) {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    static SUMS: [AtomicU64; 9] = [const { AtomicU64::new(0) }; 9];
    static RUNS_HELD_BACK: AtomicU64 = AtomicU64::new(0);
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
        &stats.held_back,
    ];
    if stats.held_back.load(Ordering::Relaxed) > 0 {
        RUNS_HELD_BACK.fetch_add(1, Ordering::Relaxed);
    }
    for (sum, n) in SUMS.iter().zip(now) {
        sum.fetch_add(n.load(Ordering::Relaxed), Ordering::Relaxed);
    }
    let runs = RUNS.fetch_add(1, Ordering::Relaxed) + 1;
    if runs.is_power_of_two() || runs.is_multiple_of(100_000) {
        let s: Vec<u64> = SUMS.iter().map(|s| s.load(Ordering::Relaxed)).collect();
        eprintln!(
            "blk_hybrid: {runs} runs: reads inline {} ring {} partly inline {}, writes {}, \
             flushes {} (waited {}), resubmits {}, orphaned {}, chains left in the ring for want \
             of a slot {} times (in {} runs)",
            s[0],
            s[1],
            s[2],
            s[3],
            s[4],
            s[5],
            s[6],
            s[7],
            s[8],
            RUNS_HELD_BACK.load(Ordering::Relaxed)
        );
    }
}
