//! Fuzz target: the qcow2 header reader (`disk::qcow2::header::Header::parse`), which decides
//! what other host files a qcow2 image reaches (its backing file's name and format) before
//! the format driver sees the image.
//!
//! Nothing may panic or read past the input; an accepted header has a version of 2 or 3, a
//! cluster size qcow2 allows, a size within Keel's bound, and a backing name that is short,
//! non-empty UTF-8 without NUL bytes, lying inside the first cluster.
//!
//! Input: the image's first bytes. Seeds: headers as `qemu-img create` writes them (version 2,
//! version 3 with a backing file and its format), and ones with a backing name past the
//! first cluster or at the end of the address space, or an extension that runs past it.

#![no_main]

use disk::qcow2::header::{Header, MAX_BACKING_NAME, MAX_SIZE};
use keel_fuzz::Seed;

libfuzzer_sys::fuzz_target!(
    init: keel_fuzz::write_seeds("qcow2_header", seeds, run),
    |data: &[u8]| {
        run(data);
    }
);

#[derive(Debug, PartialEq)]
enum Outcome {
    Accepted {
        version: u32,
        backing: Option<(String, Option<String>)>,
    },
    Refused,
}

fn run(data: &[u8]) -> Outcome {
    match Header::parse(data) {
        Ok(h) => {
            assert!(h.version == 2 || h.version == 3);
            assert!((9..=21).contains(&h.cluster_bits));
            assert!(h.size <= MAX_SIZE && h.size % 512 == 0);
            if let Some(b) = &h.backing {
                assert!(!b.name.is_empty() && b.name.len() <= MAX_BACKING_NAME);
                assert!(!b.name.contains('\0'));
            }
            Outcome::Accepted {
                version: h.version,
                backing: h.backing.map(|b| (b.name, b.format)),
            }
        }
        Err(_) => Outcome::Refused,
    }
}

/// A header with 64 KiB clusters: version 2 (72 bytes) or 3 (104 bytes, then extensions),
/// optionally naming a backing file (and, version 3, its format).
fn header(version: u32, backing: Option<(&str, Option<&str>)>) -> Vec<u8> {
    let mut h = vec![0u8; 1024];
    h[..4].copy_from_slice(b"QFI\xfb");
    h[4..8].copy_from_slice(&version.to_be_bytes());
    h[20..24].copy_from_slice(&16u32.to_be_bytes());
    h[24..32].copy_from_slice(&(64u64 << 20).to_be_bytes());
    let mut at = if version == 3 {
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        104
    } else {
        72
    };
    if let Some((name, format)) = backing {
        if let Some(f) = format {
            h[at..at + 4].copy_from_slice(&0xe279_2acau32.to_be_bytes());
            h[at + 4..at + 8].copy_from_slice(&(f.len() as u32).to_be_bytes());
            h[at + 8..at + 8 + f.len()].copy_from_slice(f.as_bytes());
            at = (at + 8 + f.len()).next_multiple_of(8);
        }
        at += 8;
        h[8..16].copy_from_slice(&(at as u64).to_be_bytes());
        h[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        h[at..at + name.len()].copy_from_slice(name.as_bytes());
    }
    h
}

fn seeds() -> Vec<Seed<Outcome>> {
    let mut past_cluster = header(3, Some(("base.qcow2", Some("qcow2"))));
    past_cluster[8..16].copy_from_slice(&65_530u64.to_be_bytes());
    let mut offset_at_the_end = header(3, Some(("base.qcow2", Some("qcow2"))));
    offset_at_the_end[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    let mut long_extension = header(3, Some(("base.raw", Some("raw"))));
    long_extension[108..112].copy_from_slice(&0x00ff_ffffu32.to_be_bytes());
    vec![
        Seed {
            name: "version2",
            input: header(2, None),
            expect: Outcome::Accepted {
                version: 2,
                backing: None,
            },
        },
        Seed {
            name: "version3_backing",
            input: header(3, Some(("base.qcow2", Some("qcow2")))),
            expect: Outcome::Accepted {
                version: 3,
                backing: Some(("base.qcow2".into(), Some("qcow2".into()))),
            },
        },
        Seed {
            name: "backing_past_cluster",
            input: past_cluster,
            expect: Outcome::Refused,
        },
        // Once an arithmetic overflow (found by this target).
        Seed {
            name: "backing_offset_at_the_end",
            input: offset_at_the_end,
            expect: Outcome::Refused,
        },
        Seed {
            name: "extension_past_cluster",
            input: long_extension,
            expect: Outcome::Refused,
        },
    ]
}
