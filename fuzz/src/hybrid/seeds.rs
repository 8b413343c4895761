//! Hand-made seeds: the request mixes the hybrid engine's bookkeeping is about, in the input
//! layout the target decodes.

use super::{Outcome, IOERR, NONE, OK, UNSUPP};
use crate::{Encoder, Seed};

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

/// The seeds of `blk_hybrid` and what each must give.
pub fn seeds() -> Vec<Seed<Outcome>> {
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
            // One in-flight slot (flag 16): the writes, the flush behind them and the reads
            // wait in the ring and go one by one as completions free the slot.
            "one_slot_chains_wait_in_the_ring",
            input(16 | 2, 6, |e| {
                for i in 0..6u8 {
                    add(e, WRITE | NEVER, i * 4, 0, &[(u16::from(i) * 0x40, 4)]);
                }
                add(e, FLUSH | NEVER, 0, 0, &[]);
                for i in 0..6u8 {
                    add(
                        e,
                        READ | NEVER,
                        i * 4,
                        0,
                        &[(0x800 + u16::from(i) * 0x40, 4)],
                    );
                }
                e.u8(KICK).u8(PROCESS).u8(SPURIOUS).u8(WAIT).u8(DRAIN);
            }),
            &[[(OK, 1); 7].as_slice(), &[(OK, 2049); 6]].concat(),
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
