//! Fuzz target: virtio-net's checks of transmit and receive chains (`net::frame`), and the
//! host iovecs the device then hands the tap. The input is a descriptor list in either
//! direction; what is accepted must be what the spec allows (direction, header room, frame
//! size), the segments must be the chain's non-empty buffers in order, and the iovecs must lie
//! exactly on those buffers inside guest memory. (The device's queue handling around these
//! checks needs a tap, and is exercised by the whole-system tests.)
//!
//! Input: `flags: u8` (bit 0: receive chain, else transmit), then up to 64 descriptors as
//! `keel_fuzz::descriptors` reads them.

#![no_main]

use arch::GuestMemoryMmap;
use devices::virtio::chain::{self, Descriptor, Segment};
use devices::virtio::net::frame::{self, FrameError, MAX_FRAME_LEN, VNET_HDR_LEN};
use keel_fuzz::{Encoder, Input, Seed, ADDR_DATA, ADDR_RAW, WRITABLE};

libfuzzer_sys::fuzz_target!(
    init: keel_fuzz::write_seeds("net_frame", seeds, run),
    |data: &[u8]| {
        run(data);
    }
);

/// What the parser said, and whether the buffers all lie in guest memory.
#[derive(Debug, PartialEq)]
struct Outcome {
    parsed: Result<usize, FrameError>,
    in_memory: bool,
}

fn memory() -> &'static GuestMemoryMmap {
    static MEM: std::sync::OnceLock<GuestMemoryMmap> = std::sync::OnceLock::new();
    MEM.get_or_init(keel_fuzz::memory)
}

fn run(data: &[u8]) -> Outcome {
    let mut input = Input::new(data);
    let receive = input.u8() & 1 != 0;
    let descs = keel_fuzz::descriptors(&mut input, 64);
    let parsed = if receive {
        frame::receive(&descs)
    } else {
        frame::transmit(&descs)
    };

    let total: u64 = descs.iter().map(|d| u64::from(d.len)).sum();
    let wrong_direction = descs.iter().any(|d| d.device_writable != receive);
    match &parsed {
        Ok(segs) => {
            assert!(!wrong_direction, "a buffer in the wrong direction passed");
            assert!(total >= VNET_HDR_LEN as u64, "no room for the header");
            assert!(receive || total <= MAX_FRAME_LEN as u64, "oversize frame");
            let expected: Vec<Segment> = descs
                .iter()
                .filter(|d| d.len > 0)
                .map(|d: &Descriptor| Segment {
                    addr: vm_memory::GuestAddress(d.addr),
                    len: d.len,
                })
                .collect();
            assert_eq!(*segs, expected, "segments are the non-empty buffers");
        }
        Err(FrameError::WritableInTransmit | FrameError::ReadableInReceive) => {
            assert!(wrong_direction)
        }
        Err(FrameError::TooShort(n)) => assert!(*n == total && total < VNET_HDR_LEN as u64),
        Err(FrameError::TooLong(n)) => assert!(*n == total && total > MAX_FRAME_LEN as u64),
    }

    let mut in_memory = false;
    if let Ok(segs) = &parsed {
        if let Some(iov) = chain::iovecs(memory(), segs) {
            keel_fuzz::check_iovecs(memory(), segs, &iov);
            in_memory = true;
        }
    }
    Outcome {
        parsed: parsed.map(|s| s.len()),
        in_memory,
    }
}

fn input(receive: bool, descs: &[(u8, u64, u32)]) -> Vec<u8> {
    let mut e = Encoder::new();
    e.u8(u8::from(receive));
    keel_fuzz::encode_descriptors(&mut e, descs);
    e.finish()
}

fn seeds() -> Vec<Seed<Outcome>> {
    let ok = |n| Outcome {
        parsed: Ok(n),
        in_memory: true,
    };
    let w = ADDR_DATA | WRITABLE;
    vec![
        Seed {
            name: "transmit_header_and_frame",
            input: input(false, &[(ADDR_DATA, 0, 12), (ADDR_DATA, 0x100, 1514)]),
            expect: ok(2),
        },
        Seed {
            name: "transmit_one_buffer",
            input: input(false, &[(ADDR_DATA, 0x40, 12 + 60)]),
            expect: ok(1),
        },
        Seed {
            name: "receive_mergeable_sized",
            input: input(true, &[(w, 0, 1526)]),
            expect: ok(1),
        },
        Seed {
            name: "receive_scattered",
            input: input(true, &[(w, 0, 0), (w, 0x1000, 12), (w, 0x2000, 4096)]),
            expect: ok(2),
        },
        Seed {
            name: "transmit_outside_memory",
            input: input(false, &[(ADDR_RAW, 1 << 40, 64)]),
            expect: Outcome {
                parsed: Ok(1),
                in_memory: false,
            },
        },
    ]
}
