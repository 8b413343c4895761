//! Fuzz target: what a live migration's target daemon reads from the network (promise 3:
//! the network is hostile, the source's daemon included). Chosen by the first byte:
//!
//! - 0: the rest is a binary message, a batch of pages (`decode_pages`) for a guest of 64
//!   pages: every page it yields is whole and inside the guest, or the batch is refused;
//! - anything else: the rest is a text message (`Message`, JSON): one that parses serializes
//!   and parses back, to itself (a state is forwarded as the JSON text it came as).
//!
//! Nothing may panic. Seeds: a batch of two pages, one beyond the guest, one cut short; a
//! hello, a state and a running.

#![no_main]

use api::migration::wire::{decode_pages, encode_pages, Message, PAGE};
use keel_fuzz::Seed;

const GUEST_PAGES: u64 = 64;

libfuzzer_sys::fuzz_target!(
    init: keel_fuzz::write_seeds("migration_wire", seeds, run),
    |data: &[u8]| {
        run(data);
    }
);

#[derive(Debug, PartialEq)]
enum Outcome {
    Pages(usize),
    Message,
    Refused,
    Empty,
}

fn run(data: &[u8]) -> Outcome {
    let Some((&mode, rest)) = data.split_first() else {
        return Outcome::Empty;
    };
    if mode == 0 {
        return match decode_pages(rest, GUEST_PAGES) {
            Ok(pages) => {
                for (number, page) in &pages {
                    assert!(*number < GUEST_PAGES, "page {number} outside the guest");
                    assert_eq!(page.len(), PAGE);
                }
                Outcome::Pages(pages.len())
            }
            Err(_) => Outcome::Refused,
        };
    }
    match serde_json::from_slice::<Message>(rest) {
        Ok(message) => {
            let text = serde_json::to_vec(&message).expect("a message serializes");
            let back: Message = serde_json::from_slice(&text).expect("and parses back");
            assert_eq!(back, message, "a message changed on its way round");
            Outcome::Message
        }
        Err(_) => Outcome::Refused,
    }
}

fn with_mode(mode: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![mode];
    v.extend_from_slice(bytes);
    v
}

fn seeds() -> Vec<Seed<Outcome>> {
    let page = [7u8; PAGE];
    let two = encode_pages(&[(0, &page), (63, &page)]);
    let beyond = encode_pages(&[(64, &page)]);
    let hello = br#"{"message":"hello","version":1,"from":"a","spec":{"name":"m","kernel":"probe.elf","cpus":1,"memory_mib":128},"memory_bytes":134217728,"disks":[{"path":"d.raw","size":4096,"marker":"00"}]}"#;
    vec![
        Seed {
            name: "two_pages",
            input: with_mode(0, &two),
            expect: Outcome::Pages(2),
        },
        Seed {
            name: "beyond_the_guest",
            input: with_mode(0, &beyond),
            expect: Outcome::Refused,
        },
        Seed {
            name: "cut_short",
            input: with_mode(0, &two[..two.len() - 1]),
            expect: Outcome::Refused,
        },
        Seed {
            name: "hello",
            input: with_mode(1, hello),
            expect: Outcome::Message,
        },
        Seed {
            name: "state",
            input: with_mode(
                1,
                br#"{"message":"state","state":"{\"vcpus\":[1,2,{\"x\":null}]}"}"#,
            ),
            expect: Outcome::Message,
        },
        Seed {
            name: "running",
            input: with_mode(1, br#"{"message":"running","pid":7,"build_us":500}"#),
            expect: Outcome::Message,
        },
    ]
}
