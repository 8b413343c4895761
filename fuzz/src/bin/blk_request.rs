//! Fuzz target: the virtio-blk request parser and executor. The input is a descriptor chain
//! (addresses in the data area, over the harness's rings, at the end of memory or anywhere at
//! all; any length; either direction) and the bytes placed in guest memory where headers and
//! discard segments are read from. `request::parse` runs on it directly, then the same chain
//! goes through a virtqueue to the block device, which parses and executes it on a real file.
//!
//! Nothing may panic, and when the chain stays out of the harness's rings: exactly one used
//! entry for it, no DEVICE_NEEDS_RESET, a used length no larger than the writable bytes
//! offered, and for a parsed request (of a chain under 4 GiB, which the queue passes whole) a
//! status byte the spec knows.
//!
//! Input: `flags: u8` (bit 0 read-only disk, bit 1 negotiate EVENT_IDX), up to 64 descriptors
//! as `keel_fuzz::descriptors` reads them; the rest of the input is written at `DATA_START`.
//! The host iovecs for a parsed request's data must lie exactly on its guest buffers.

#![no_main]

use devices::virtio::block::request::{
    parse, ParseError, RequestKind, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use devices::virtio::chain;
use devices::virtio::mmio::{STATUS_DRIVER_OK, STATUS_NEEDS_RESET};
use keel_fuzz::{
    Buffer, Encoder, Input, Seed, ADDR_DATA, DATA_START, MEM_SIZE, VIRTIO_RING_F_EVENT_IDX,
    WRITABLE,
};
use vm_memory::{Bytes, GuestAddress};

libfuzzer_sys::fuzz_target!(
    init: keel_fuzz::write_seeds("blk_request", seeds, run),
    |data: &[u8]| {
        run(data);
    }
);

const MAX_DESCRIPTORS: u8 = 64;
const QUEUE_SIZE: u16 = 256;

/// What the parser said, the status byte the device wrote for a parsed request, and the
/// length of the used entry.
#[derive(Debug, PartialEq)]
struct Outcome {
    parsed: Result<RequestKind, ParseError>,
    status: Option<u8>,
    used_len: Option<u32>,
}

fn run(data: &[u8]) -> Outcome {
    let mut input = Input::new(data);
    let flags = input.u8();
    let descs = keel_fuzz::descriptors(&mut input, MAX_DESCRIPTORS);
    let mut d = keel_fuzz::block_driver(flags & 1 != 0, false);
    let bytes = input.rest();
    let bytes = &bytes[..bytes.len().min((MEM_SIZE - DATA_START) as usize)];
    d.mem
        .write_slice(bytes, GuestAddress(DATA_START))
        .expect("data area");

    let parsed = parse(&descs, &d.mem);
    if let Ok(req) = &parsed {
        let total: u64 = req.data.iter().map(|s| u64::from(s.len)).sum();
        assert_eq!(req.data_len, total, "data length is the segments' sum");
        if let Some(iov) = chain::iovecs(&d.mem, &req.data) {
            keel_fuzz::check_iovecs(&d.mem, &req.data, &iov);
        }
    }
    let mut outcome = Outcome {
        parsed: parsed
            .as_ref()
            .map(|r| r.kind.clone())
            .map_err(Clone::clone),
        status: None,
        used_len: None,
    };
    if descs.is_empty() {
        return outcome;
    }

    let mut features = d.device_features();
    if flags & 2 == 0 {
        features &= !VIRTIO_RING_F_EVENT_IDX;
    }
    let status = d.init(features, QUEUE_SIZE);
    assert_ne!(status & STATUS_DRIVER_OK, 0, "status {status:#x}");
    let buffers: Vec<Buffer> = keel_fuzz::buffers(&descs);
    let head = d.submit(0, &buffers);
    d.process(0);
    let used = d.used(0);
    outcome.used_len = used.first().map(|u| u.1);

    // A chain that writes over the rings may corrupt what the checks read back.
    let over_rings = descs
        .iter()
        .any(|d| d.device_writable && d.len > 0 && d.addr < DATA_START);
    if !over_rings {
        assert_eq!(used.len(), 1, "one chain, one used entry: {used:?}");
        assert_eq!(used[0].0, u32::from(head), "used id is the head");
        assert_eq!(d.status() & STATUS_NEEDS_RESET, 0, "device still serving");
        let writable: u64 = descs
            .iter()
            .filter(|d| d.device_writable)
            .map(|d| u64::from(d.len))
            .sum();
        assert!(
            u64::from(used[0].1) <= writable,
            "used length {} beyond the {writable} writable bytes",
            used[0].1
        );
        // virtio-queue ends a chain at 4 GiB (the spec's limit); what the device parsed then
        // is a prefix of `descs`.
        let whole = descs.iter().map(|d| u64::from(d.len)).sum::<u64>() <= u64::from(u32::MAX);
        if let (Ok(req), true) = (&parsed, whole) {
            if let Ok(status) = d.mem.read_obj::<u8>(req.status) {
                assert!(status <= 2, "status byte {status}");
                outcome.status = Some(status);
            }
        }
    }
    outcome
}

// Seeds: one valid request of each type, and a few oddly framed ones.

const HEADER: u64 = 0;
const SEGMENT: u64 = 16;
const STATUS: u64 = 0x800;
const DATA: u64 = 0x1000;

fn r(offset: u64, len: u32) -> (u8, u64, u32) {
    (ADDR_DATA, offset, len)
}

fn w(offset: u64, len: u32) -> (u8, u64, u32) {
    (ADDR_DATA | WRITABLE, offset, len)
}

/// An input: flags, chain, then the header (and a discard segment) at the data area's start.
fn input(flags: u8, kind: u32, sector: u64, chain: &[(u8, u64, u32)]) -> Vec<u8> {
    let mut e = Encoder::new();
    e.u8(flags);
    keel_fuzz::encode_descriptors(&mut e, chain);
    // Header: type, reserved, sector. Segment: sector 2, 4 sectors, flags (unmap for
    // write-zeroes).
    e.u32(kind).u32(0).u64(sector);
    let unmap = u32::from(kind == VIRTIO_BLK_T_WRITE_ZEROES);
    e.u64(2).u32(4).u32(unmap);
    e.finish()
}

fn seed(
    name: &'static str,
    input: Vec<u8>,
    kind: RequestKind,
    status: u8,
    used: u32,
) -> Seed<Outcome> {
    Seed {
        name,
        input,
        expect: Outcome {
            parsed: Ok(kind),
            status: Some(status),
            used_len: Some(used),
        },
    }
}

fn seeds() -> Vec<Seed<Outcome>> {
    use RequestKind::*;
    let hs = [r(HEADER, 16), w(STATUS, 1)];
    let seg = [r(HEADER, 16), r(SEGMENT, 16), w(STATUS, 1)];
    vec![
        seed(
            "read",
            input(
                0,
                VIRTIO_BLK_T_IN,
                4,
                &[r(HEADER, 16), w(DATA, 1024), w(STATUS, 1)],
            ),
            Read,
            0,
            1025,
        ),
        seed(
            "read_split_header_status_in_data",
            input(
                2,
                VIRTIO_BLK_T_IN,
                1,
                &[r(HEADER, 10), r(HEADER + 10, 6), w(DATA, 513)],
            ),
            Read,
            0,
            513,
        ),
        seed(
            "write",
            input(
                0,
                VIRTIO_BLK_T_OUT,
                2,
                &[r(HEADER, 16), r(DATA, 512), w(STATUS, 1)],
            ),
            Write,
            0,
            1,
        ),
        seed(
            "write_read_only",
            input(
                1,
                VIRTIO_BLK_T_OUT,
                2,
                &[r(HEADER, 16), r(DATA, 512), w(STATUS, 1)],
            ),
            Write,
            1,
            1,
        ),
        seed("flush", input(0, VIRTIO_BLK_T_FLUSH, 0, &hs), Flush, 0, 1),
        seed(
            "get_id",
            input(
                0,
                VIRTIO_BLK_T_GET_ID,
                0,
                &[r(HEADER, 16), w(DATA, 20), w(STATUS, 1)],
            ),
            GetId,
            0,
            21,
        ),
        seed(
            "discard",
            input(0, VIRTIO_BLK_T_DISCARD, 0, &seg),
            Discard,
            0,
            1,
        ),
        seed(
            "write_zeroes",
            input(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, &seg),
            WriteZeroes,
            0,
            1,
        ),
        seed("unsupported", input(0, 99, 0, &hs), Unsupported(99), 2, 1),
    ]
}
