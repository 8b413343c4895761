//! Fuzz target: the VMDK sparse extent reader (`disk::vmdk::convert`), which reads a VMware
//! disk an operator imports: its header (or a streamOptimized footer), grain directory,
//! grain tables, grain markers and deflate-compressed grains.
//!
//! Nothing may panic, read past the input or allocate beyond what the input's size allows;
//! what is converted must fit the capacity the header claims.
//!
//! Input: the extent file itself. Seeds: a one-table extent with one plain grain, the same
//! with a compressed grain, and ones whose grain or directory lies past the end.

#![no_main]

use std::io::Write;

use disk::vmdk::{self, Sink};
use keel_fuzz::Seed;

libfuzzer_sys::fuzz_target!(
    init: keel_fuzz::write_seeds("vmdk_extent", seeds, run),
    |data: &[u8]| {
        run(data);
    }
);

/// The largest disk the target converts in memory; larger ones end at `set_len`.
const MAX_CAPACITY: u64 = 16 << 20;

/// The raw disk, in memory.
struct Memory(Vec<u8>);

impl Sink for Memory {
    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        if len > MAX_CAPACITY {
            return Err(std::io::Error::other(
                "larger than the fuzz target converts",
            ));
        }
        self.0.resize(len as usize, 0);
        Ok(())
    }

    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let end = offset as usize + buf.len();
        assert!(end <= self.0.len(), "a grain written past the capacity");
        self.0[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Converted { written: u64, nonzero: usize },
    Refused,
}

fn run(data: &[u8]) -> Outcome {
    let mut out = Memory(Vec::new());
    match vmdk::convert(data, &mut out, |done, all| assert!(done <= all)) {
        Ok(c) => {
            assert_eq!(c.capacity_bytes, out.0.len() as u64);
            assert!(c.grains_written <= c.grains_allocated);
            Outcome::Converted {
                written: c.grains_written,
                nonzero: out.0.iter().filter(|b| **b != 0).count(),
            }
        }
        Err(_) => Outcome::Refused,
    }
}

const SECTOR: usize = 512;

/// A 32 KiB disk of 4 KiB grains: header, directory at sector 1, table (512 entries) at
/// sectors 2 to 5, grain 1 at sector 6 (plain, 4 KiB of 0x5a) or, compressed, a marker and its
/// zlib stream there.
fn extent(compressed: bool) -> Vec<u8> {
    let mut f = vec![0u8; SECTOR];
    f[0..4].copy_from_slice(b"KDMV");
    f[4..8].copy_from_slice(&1u32.to_le_bytes());
    let flags: u32 = if compressed { 1 | 1 << 16 | 1 << 17 } else { 1 };
    f[8..12].copy_from_slice(&flags.to_le_bytes());
    f[12..20].copy_from_slice(&64u64.to_le_bytes()); // capacity: 64 sectors
    f[20..28].copy_from_slice(&8u64.to_le_bytes()); // grain: 8 sectors
    f[44..48].copy_from_slice(&512u32.to_le_bytes());
    f[56..64].copy_from_slice(&1u64.to_le_bytes()); // directory at sector 1
    f[73..77].copy_from_slice(b"\n \r\n");
    f[77..79].copy_from_slice(&u16::from(compressed).to_le_bytes());
    f.resize(6 * SECTOR, 0);
    f[SECTOR..SECTOR + 4].copy_from_slice(&2u32.to_le_bytes()); // table at sector 2
    f[2 * SECTOR + 4..2 * SECTOR + 8].copy_from_slice(&6u32.to_le_bytes()); // grain 1
    let data = vec![0x5au8; 8 * SECTOR];
    if compressed {
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&data).unwrap();
        let stream = z.finish().unwrap();
        f.extend_from_slice(&8u64.to_le_bytes()); // the grain's first sector
        f.extend_from_slice(&(stream.len() as u32).to_le_bytes());
        f.extend_from_slice(&stream);
    } else {
        f.extend_from_slice(&data);
    }
    f
}

fn seeds() -> Vec<Seed<Outcome>> {
    let one_grain = Outcome::Converted {
        written: 1,
        nonzero: 8 * SECTOR,
    };
    let mut past_end = extent(false);
    past_end[2 * SECTOR + 4..2 * SECTOR + 8].copy_from_slice(&1000u32.to_le_bytes());
    let mut wrong_marker = extent(true);
    wrong_marker[6 * SECTOR] = 9;
    vec![
        Seed {
            name: "plain_grain",
            input: extent(false),
            expect: one_grain,
        },
        Seed {
            name: "compressed_grain",
            input: extent(true),
            expect: Outcome::Converted {
                written: 1,
                nonzero: 8 * SECTOR,
            },
        },
        Seed {
            name: "grain_past_the_end",
            input: past_end,
            expect: Outcome::Refused,
        },
        Seed {
            name: "wrong_marker",
            input: wrong_marker,
            expect: Outcome::Refused,
        },
    ]
}
