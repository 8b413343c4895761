//! Fuzz target: walking the descriptor chains a guest puts in a virtqueue, with a virtio-blk
//! or a virtio-rng device behind it. Through the driver harness the input writes raw descriptor table entries
//! (any address, length, flags including NEXT, WRITE and INDIRECT, any next index), guest
//! memory (request headers, indirect tables, the rings themselves), avail ring entries and
//! the avail index, and has the device serve the queue: loops, indirect tables, out-of-range
//! indices, an avail index running ahead or back, and buffers over the rings. Nothing may
//! panic or hang; a device that gives up sets DEVICE_NEEDS_RESET, and the input can reset it.
//!
//! Input: `flags: u8` (bit 0 negotiate EVENT_IDX, bit 1 read-only disk, bit 2 virtio-rng
//! instead of virtio-blk), `size: u8` (queue
//! size `1 << (size % 10)`, so 512 is one the device refuses), then records, by `op % 8`:
//! 0 descriptor `index: u16, mode: u8, addr: u64, len: u32, flags: u16, next: u16`;
//! 1 make `head: u16` available; 2 set the avail index `idx: u16`;
//! 3 write guest memory `mode: u8, addr: u64, value: u64` (8 bytes);
//! 4 reset the device and bring it up again; 5-7 serve the queue and read the used ring.
//! `mode` is an address mode of `keel_fuzz::address`.

#![no_main]

use devices::virtio::block::request::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN};
use devices::virtio::mmio::{REG_STATUS, STATUS_DRIVER_OK, STATUS_NEEDS_RESET};
use devices::virtio::rng::Rng;
use keel_fuzz::{Driver, Encoder, Input, Seed, ADDR_DATA, ADDR_RINGS, VIRTIO_RING_F_EVENT_IDX};
use vm_memory::{Bytes, GuestAddress};

libfuzzer_sys::fuzz_target!(
    init: keel_fuzz::write_seeds("virtqueue_chains", seeds, run),
    |data: &[u8]| {
        run(data);
    }
);

const DESC: u8 = 0;
const AVAIL: u8 = 1;
const AVAIL_IDX: u8 = 2;
const MEMORY: u8 = 3;
const REINIT: u8 = 4;
const SERVE: u8 = 5;

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

/// The status register at the end, and how many used entries the driver read back.
#[derive(Debug, PartialEq)]
struct Outcome {
    status: u32,
    used: usize,
}

fn bring_up(d: &mut Driver, event_idx: bool, size: u16) {
    let mut features = d.device_features();
    if !event_idx {
        features &= !VIRTIO_RING_F_EVENT_IDX;
    }
    d.write_reg(REG_STATUS, 0);
    d.init(features, size);
}

fn run(data: &[u8]) -> Outcome {
    let mut input = Input::new(data);
    let flags = input.u8();
    let size = 1u16 << (input.u8() % 10);
    let event_idx = flags & 1 != 0;
    let mut d = if flags & 4 != 0 {
        Driver::new(Box::new(Rng), keel_fuzz::MEM_SIZE as usize)
    } else {
        keel_fuzz::block_driver(flags & 2 != 0, false)
    };
    bring_up(&mut d, event_idx, size);
    let mut used = 0;
    while !input.is_empty() {
        match input.u8() % 8 {
            DESC => {
                let index = input.u16();
                let addr = keel_fuzz::address(input.u8(), input.u64());
                let (len, flags, next) = (input.u32(), input.u16(), input.u16());
                // The harness has room for 1024 entries before its avail ring.
                d.write_desc(0, index % 1024, addr, len, flags, next);
            }
            AVAIL => {
                let head = input.u16();
                d.make_available(0, head);
            }
            AVAIL_IDX => {
                let idx = input.u16();
                d.set_avail_idx(0, idx);
            }
            MEMORY => {
                let addr = keel_fuzz::address(input.u8(), input.u64());
                let value = input.u64();
                let _ = d.mem.write_obj(value, GuestAddress(addr));
            }
            REINIT => bring_up(&mut d, event_idx, size),
            _ => {
                d.process(0);
                used += d.used(0).len();
            }
        }
    }
    d.process(0);
    used += d.used(0).len();
    Outcome {
        status: d.status(),
        used,
    }
}

// Seeds: a plain chain, an indirect table, a loop, an avail index running ahead, and a read
// whose data lands on the descriptor table.

const HEADER: u64 = 0;
const STATUS: u64 = 0x800;
const DATA: u64 = 0x1000;
const TABLE: u64 = 0x2000;
const ALL_OK: u32 = 0xf;

fn header(e: &mut Encoder, kind: u32, sector: u64) {
    e.u8(MEMORY).u8(ADDR_DATA).u64(HEADER).u64(u64::from(kind));
    e.u8(MEMORY).u8(ADDR_DATA).u64(HEADER + 8).u64(sector);
}

fn desc(e: &mut Encoder, index: u16, mode: u8, addr: u64, len: u32, flags: u16, next: u16) {
    e.u8(DESC)
        .u16(index)
        .u8(mode)
        .u64(addr)
        .u32(len)
        .u16(flags)
        .u16(next);
}

fn start(e: &mut Encoder) {
    e.u8(0).u8(4); // no EVENT_IDX, writable disk, 16 entries
}

fn seeds() -> Vec<Seed<Outcome>> {
    let mut e = Encoder::new();

    start(&mut e);
    header(&mut e, VIRTIO_BLK_T_FLUSH, 0);
    desc(&mut e, 0, ADDR_DATA, HEADER, 16, NEXT, 1);
    desc(&mut e, 1, ADDR_DATA, STATUS, 1, WRITE, 0);
    e.u8(AVAIL).u16(0).u8(SERVE);
    let flush = e.finish();

    // A read whose three descriptors are in an indirect table in the data area.
    start(&mut e);
    header(&mut e, VIRTIO_BLK_T_IN, 1);
    for (i, (addr, len, flags)) in [
        (HEADER, 16, NEXT),
        (DATA, 512, WRITE | NEXT),
        (STATUS, 1, WRITE),
    ]
    .into_iter()
    .enumerate()
    {
        let at = TABLE + i as u64 * 16;
        let addr = keel_fuzz::DATA_START + addr;
        e.u8(MEMORY).u8(ADDR_DATA).u64(at).u64(addr);
        let word = u64::from(len as u32) | u64::from(flags) << 32 | (i as u64 + 1) << 48;
        e.u8(MEMORY).u8(ADDR_DATA).u64(at + 8).u64(word);
    }
    desc(&mut e, 0, ADDR_DATA, TABLE, 48, INDIRECT, 0);
    e.u8(AVAIL).u16(0).u8(SERVE);
    let indirect = e.finish();

    // Descriptor 0 chains to itself.
    start(&mut e);
    header(&mut e, VIRTIO_BLK_T_IN, 0);
    desc(&mut e, 0, ADDR_DATA, HEADER, 16, NEXT, 0);
    e.u8(AVAIL).u16(0).u8(SERVE);
    let looped = e.finish();

    // The avail index runs ahead (DEVICE_NEEDS_RESET); a reset, then a flush is served.
    start(&mut e);
    e.u8(AVAIL_IDX).u16(1000).u8(SERVE).u8(REINIT);
    header(&mut e, VIRTIO_BLK_T_FLUSH, 0);
    desc(&mut e, 0, ADDR_DATA, HEADER, 16, NEXT, 1);
    desc(&mut e, 1, ADDR_DATA, STATUS, 1, WRITE, 0);
    e.u8(AVAIL).u16(0).u8(SERVE);
    let ahead = e.finish();

    // A read of one sector into the descriptor table itself (the harness's ring area).
    start(&mut e);
    header(&mut e, VIRTIO_BLK_T_IN, 0);
    desc(&mut e, 0, ADDR_DATA, HEADER, 16, NEXT, 1);
    desc(&mut e, 1, ADDR_RINGS, 0, 512, WRITE | NEXT, 2);
    desc(&mut e, 2, ADDR_DATA, STATUS, 1, WRITE, 0);
    e.u8(AVAIL).u16(0).u8(SERVE);
    let over_rings = e.finish();

    // virtio-rng: a readable buffer it skips, a writable one it fills.
    e.u8(4).u8(4);
    desc(&mut e, 0, ADDR_DATA, HEADER, 16, NEXT, 1);
    desc(&mut e, 1, ADDR_DATA, DATA, 1024, WRITE, 0);
    e.u8(AVAIL).u16(0).u8(SERVE);
    let rng = e.finish();

    let served = Outcome {
        status: ALL_OK,
        used: 1,
    };
    assert_eq!(ALL_OK & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
    assert_eq!(ALL_OK & STATUS_NEEDS_RESET, 0);
    let seed = |name, input| Seed {
        name,
        input,
        expect: Outcome {
            status: served.status,
            used: served.used,
        },
    };
    vec![
        seed("flush", flush),
        seed("indirect_read", indirect),
        seed("self_loop", looped),
        seed("avail_ahead_then_reset", ahead),
        seed("read_over_descriptor_table", over_rings),
        seed("rng", rng),
    ]
}
