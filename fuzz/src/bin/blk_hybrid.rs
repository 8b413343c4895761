//! Fuzz target: the virtio-blk hybrid I/O engine (preadv2 RWF_NOWAIT inline, io_uring for the
//! rest, completions through an eventfd, a bounded set of in-flight slots), driven through the
//! transport by a small program of driver operations on a real file: add request chains
//! (any type, sector, data buffers, duplicated or overlapping ones, chains that fail to parse),
//! notify or not, serve the event loop, serve the completion event on its own (spurious or
//! after waiting for it), make a chain that is still in flight available again, reset the
//! device with requests in flight and bring it up again, and wait for everything.
//!
//! The driver, the model of what the device must do and the checks (what must hold) live in
//! [`keel_fuzz::hybrid`] (`fuzz/src/hybrid/`); this file decodes the program and runs it.
//!
//! Input: `flags: u8` (bit 0 read-only disk, bit 1 EVENT_IDX, bit 2 image on the disk-backed
//! temporary directory instead of tmpfs, bit 3 resets orphan requests instead of waiting,
//! bit 4 only `(flags >> 5) + 1` in-flight slots (1 to 8) instead of one per queue entry, so
//! that chains beyond them wait in the ring until a completion frees one),
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

use std::time::Duration;

use keel_fuzz::hybrid::{seeds, trace, Outcome, Run, MAX_OPS};
use keel_fuzz::{ImageDir, Input};

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
            8 | 9 => r.serve_events(Duration::ZERO),
            10 => r.serve_completions(),
            11 => {
                if r.outstanding() > 0 {
                    r.serve_events(Duration::from_millis(2));
                }
            }
            12 => r.republish(&mut input),
            13 => r.reset(),
            14 => r.drain(),
            _ => r.process(),
        }
    }
    r.finish()
}
