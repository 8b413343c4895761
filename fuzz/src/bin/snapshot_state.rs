//! Fuzz target: restoring a snapshot, which is hostile input (a file anyone with write access
//! to it may have changed). Three ways in, chosen by the first byte:
//!
//! - 0: the rest is a whole state file (`vmm::snapshot::file::parse_state`): header, length
//!   and checksum checks;
//! - 1: the rest is a body, framed with a valid header and checksum, so the fuzzer reaches
//!   the JSON of a VM's state; each virtio transport state it holds is then restored into a
//!   fresh device of its kind;
//! - 2: the rest is one transport state's JSON, restored into an rng device.
//!
//! Nothing may panic, and a restored transport must save back to what it was given.
//!
//! Seeds: the format-1 fixture (tests/fixtures), its body, the same cut short and edited,
//! and its first transport state with a queue beyond guest memory.

#![no_main]

use devices::virtio::persist::TransportState;
use devices::virtio::rng::Rng;
use devices::virtio::VirtioDevice;
use keel_fuzz::{Driver, Seed};
use vmm::snapshot::file::{frame, parse_state};

const FIXTURE: &[u8] = include_bytes!("../../../tests/fixtures/snapshot-format-1.state");
/// The fixture's header: magic, version, reserved, length, SHA-256.
const HEADER: usize = 56;

libfuzzer_sys::fuzz_target!(
    init: keel_fuzz::write_seeds("snapshot_state", seeds, run),
    |data: &[u8]| {
        run(data);
    }
);

#[derive(Debug, PartialEq)]
enum Outcome {
    /// A state was read; how many of its transports restored.
    Read {
        restored: usize,
        refused: usize,
    },
    Refused,
    Empty,
}

fn device(kind: u32) -> Box<dyn VirtioDevice> {
    match kind {
        2 => Box::new(keel_fuzz::block(false, false)),
        _ => Box::new(Rng),
    }
}

/// Restores `state` into a fresh device of its kind; true if it was taken, and then it must
/// save back to itself.
fn restore(state: &TransportState) -> bool {
    let mut d = Driver::new(device(state.device_type), keel_fuzz::MEM_SIZE as usize);
    match d.transport.restore(state) {
        Ok(()) => {
            assert_eq!(
                &d.transport.save(),
                state,
                "save -> restore -> save changed it"
            );
            true
        }
        Err(_) => false,
    }
}

fn run(data: &[u8]) -> Outcome {
    let Some((&mode, rest)) = data.split_first() else {
        return Outcome::Empty;
    };
    let state = match mode {
        0 => parse_state(rest),
        1 => parse_state(&frame(rest)),
        _ => {
            return match serde_json::from_slice::<TransportState>(rest) {
                Ok(t) if restore(&t) => Outcome::Read {
                    restored: 1,
                    refused: 0,
                },
                Ok(_) => Outcome::Read {
                    restored: 0,
                    refused: 1,
                },
                Err(_) => Outcome::Refused,
            }
        }
    };
    match state {
        Ok(state) => {
            let restored = state.virtio.iter().filter(|t| restore(t)).count();
            Outcome::Read {
                restored,
                refused: state.virtio.len() - restored,
            }
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
    let body = &FIXTURE[HEADER..];
    let mut edited = FIXTURE.to_vec();
    let middle = edited.len() / 2;
    edited[middle] ^= 0x20;
    let state = parse_state(FIXTURE).expect("the fixture reads");
    let mut far = state.virtio[1].clone();
    far.queues[0].used_ring = 1 << 40;
    vec![
        // The probe keeps its rings below 2 MiB, inside the harness's guest memory.
        Seed {
            name: "fixture",
            input: with_mode(0, FIXTURE),
            expect: Outcome::Read {
                restored: 2,
                refused: 0,
            },
        },
        Seed {
            name: "fixture_body",
            input: with_mode(1, body),
            expect: Outcome::Read {
                restored: 2,
                refused: 0,
            },
        },
        Seed {
            name: "cut_short",
            input: with_mode(0, &FIXTURE[..FIXTURE.len() - 10]),
            expect: Outcome::Refused,
        },
        Seed {
            name: "edited",
            input: with_mode(0, &edited),
            expect: Outcome::Refused,
        },
        Seed {
            name: "rng_transport",
            input: with_mode(2, &serde_json::to_vec(&state.virtio[1]).expect("json")),
            expect: Outcome::Read {
                restored: 1,
                refused: 0,
            },
        },
        Seed {
            name: "queue_beyond_memory",
            input: with_mode(2, &serde_json::to_vec(&far).expect("json")),
            expect: Outcome::Read {
                restored: 0,
                refused: 1,
            },
        },
    ]
}
