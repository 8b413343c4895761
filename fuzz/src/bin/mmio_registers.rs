//! Fuzz target: the virtio-mmio register file of a virtio-blk device, as a guest's MMIO exits
//! reach it. The input is a sequence of accesses (any offset, width 1/2/4/8, read or write,
//! status writes in any order), guest memory writes (so notified queues find rings and
//! requests), and explicit queue services; every notification is served as the device event
//! loop would. Nothing may panic, and the status register must stay one the spec allows.
//!
//! Input: one byte of flags (bit 0: read-only disk, bit 1: rate-limited disk), then 11-byte
//! records `op: u8, offset: u16, value: u64`. `op` bits 0-1: 0 read register, 1 write
//! register, 2 write guest memory at `offset * 2`, 3 serve queue `value` (with bit 5: serve
//! the device's event source `value`, as when the rate limiter's timer fires); bits 2-3:
//! width 1/2/4/8; bit 4: far (register offset `0xffff_ffff_ffff_0000 | offset`, memory
//! address in the last page and past it, any queue index).

#![no_main]

use devices::virtio::mmio::*;
use keel_fuzz::{Encoder, Input, Seed};
use vm_memory::{Bytes, GuestAddress};

libfuzzer_sys::fuzz_target!(
    init: keel_fuzz::write_seeds("mmio_registers", seeds, run),
    |data: &[u8]| {
        run(data);
    }
);

const READ: u8 = 0;
const WRITE: u8 = 1;
const MEMORY: u8 = 2;
const SERVE: u8 = 3;
const WIDTH_1: u8 = 0;
const WIDTH_2: u8 = 1 << 2;
const WIDTH_4: u8 = 2 << 2;
const WIDTH_8: u8 = 3 << 2;
const FAR: u8 = 1 << 4;
const EVENT: u8 = 1 << 5;

/// What a run ends with: the status and interrupt status registers, and (for the seeds,
/// whose rings and requests sit at fixed places) the used index and a request's status byte.
#[derive(Debug, PartialEq)]
struct Outcome {
    status: u32,
    interrupt: u32,
    used_idx: u16,
    blk_status: u8,
}

fn run(data: &[u8]) -> Outcome {
    let mut input = Input::new(data);
    let flags = input.u8();
    let mut d = keel_fuzz::block_driver(flags & 1 != 0, flags & 2 != 0);
    while !input.is_empty() {
        let op = input.u8();
        let offset = u64::from(input.u16());
        let value = input.u64();
        let width = 1usize << ((op >> 2) & 3);
        let far = op & FAR != 0;
        let reg = if far {
            0xffff_ffff_ffff_0000 | offset
        } else {
            offset
        };
        match op & 3 {
            READ => {
                let mut buf = [0xa5u8; 8];
                d.transport.read(reg, &mut buf[..width]);
                if reg == REG_MAGIC && width == 4 {
                    assert_eq!(buf[..4], *b"virt", "magic value");
                }
            }
            WRITE => {
                d.transport.write(reg, &value.to_le_bytes()[..width]);
                keel_fuzz::serve_notifications(&mut d);
            }
            MEMORY => {
                let addr = if far {
                    keel_fuzz::address(keel_fuzz::ADDR_END, offset)
                } else {
                    offset * 2
                };
                let _ = d
                    .mem
                    .write_slice(&value.to_le_bytes()[..width], GuestAddress(addr));
            }
            _ => {
                let queue = if far {
                    value as usize
                } else {
                    value as usize & 3
                };
                d.transport.process_queue(queue);
            }
        }
        let status = d.transport.status();
        assert!(
            status & STATUS_DRIVER_OK == 0 || status & STATUS_FEATURES_OK != 0,
            "DRIVER_OK without FEATURES_OK: {status:#x}"
        );
    }
    Outcome {
        status: d.status(),
        interrupt: d.read_reg(REG_INTERRUPT_STATUS),
        used_idx: d.mem.read_obj(GuestAddress(USED + 2)).unwrap_or(0),
        blk_status: d.mem.read_obj(GuestAddress(STATUS)).unwrap_or(0),
    }
}

// Seeds: a guest driver's usual register sequences and requests served through them.

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HEADER: u64 = 0x4000;
const DATA: u64 = 0x5000;
const STATUS: u64 = 0x6000;
const VIRTIO_BLK_F_FLUSH: u32 = 1 << 9;
const ALL_OK: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

fn write(e: &mut Encoder, reg: u64, value: u32) {
    e.u8(WRITE | WIDTH_4).u16(reg as u16).u64(u64::from(value));
}

fn read(e: &mut Encoder, reg: u64) {
    e.u8(READ | WIDTH_4).u16(reg as u16).u64(0);
}

fn memory(e: &mut Encoder, width: u8, addr: u64, value: u64) {
    e.u8(MEMORY | width).u16((addr / 2) as u16).u64(value);
}

/// What Linux's virtio_mmio does: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK,
/// queue 0 with 16 entries, DRIVER_OK.
fn init(e: &mut Encoder) {
    for reg in [REG_MAGIC, REG_VERSION, REG_DEVICE_ID, REG_VENDOR_ID] {
        read(e, reg);
    }
    write(e, REG_STATUS, 0);
    write(e, REG_STATUS, STATUS_ACKNOWLEDGE);
    write(e, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    for sel in [0, 1] {
        write(e, REG_DEVICE_FEATURES_SEL, sel);
        read(e, REG_DEVICE_FEATURES);
    }
    write(e, REG_DRIVER_FEATURES_SEL, 0);
    write(e, REG_DRIVER_FEATURES, VIRTIO_BLK_F_FLUSH);
    write(e, REG_DRIVER_FEATURES_SEL, 1);
    write(e, REG_DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
    let negotiated = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
    write(e, REG_STATUS, negotiated);
    read(e, REG_STATUS);
    write(e, REG_QUEUE_SEL, 0);
    read(e, REG_QUEUE_NUM_MAX);
    write(e, REG_QUEUE_NUM, 16);
    for (low, addr) in [
        (REG_QUEUE_DESC_LOW, DESC),
        (REG_QUEUE_DRIVER_LOW, AVAIL),
        (REG_QUEUE_DEVICE_LOW, USED),
    ] {
        write(e, low, addr as u32);
        write(e, low + 4, 0);
    }
    write(e, REG_QUEUE_READY, 1);
    // Capacity from config space, 8 bytes at once.
    e.u8(READ | WIDTH_8).u16(CONFIG_SPACE as u16).u64(0);
    write(e, REG_STATUS, negotiated | STATUS_DRIVER_OK);
}

/// One request (header type and sector, then the chain as address, length, flags) in
/// descriptors from `slot * 4` on, made available as avail entry `slot`, and the
/// notification that tells the device; then the driver acknowledges the interrupt.
fn request(e: &mut Encoder, slot: u16, kind: u32, sector: u64, chain: &[(u64, u32, u16)]) {
    memory(e, WIDTH_8, HEADER, u64::from(kind));
    memory(e, WIDTH_8, HEADER + 8, sector);
    memory(e, WIDTH_1, STATUS, 0xff);
    let head = slot * 4;
    for (i, &(addr, len, flags)) in chain.iter().enumerate() {
        let more = if i + 1 < chain.len() { 1 } else { 0 };
        let index = head + i as u16;
        let at = DESC + u64::from(index) * 16;
        memory(e, WIDTH_8, at, addr);
        let word = u64::from(len) | u64::from(flags | more) << 32 | u64::from(index + 1) << 48;
        memory(e, WIDTH_8, at + 8, word);
    }
    memory(e, WIDTH_2, AVAIL + 4 + u64::from(slot) * 2, u64::from(head));
    memory(e, WIDTH_2, AVAIL + 2, u64::from(slot + 1));
    write(e, REG_QUEUE_NOTIFY, 0);
    read(e, REG_INTERRUPT_STATUS);
    write(e, REG_INTERRUPT_ACK, INTERRUPT_USED_BUFFER);
}

fn seeds() -> Vec<Seed<Outcome>> {
    let mut e = Encoder::new();

    e.u8(0);
    init(&mut e);
    let init_only = e.finish();

    e.u8(0);
    init(&mut e);
    request(&mut e, 0, 4, 0, &[(HEADER, 16, 0), (STATUS, 1, 2)]);
    let flush = e.finish();

    // A write then a read of the same sectors, each in three descriptors.
    e.u8(0);
    init(&mut e);
    memory(&mut e, WIDTH_8, DATA, 0x1122_3344_5566_7788);
    let write_chain = [(HEADER, 16, 0), (DATA, 1024, 0), (STATUS, 1, 2)];
    request(&mut e, 0, 1, 3, &write_chain);
    let read_chain = [(HEADER, 16, 0), (DATA + 0x1000, 1024, 2), (STATUS, 1, 2)];
    request(&mut e, 1, 0, 3, &read_chain);
    let write_read = e.finish();

    // Out-of-order status writes on a read-only disk, a reset in the middle, then a proper
    // start and a status write that takes bits away (ignored).
    e.u8(1);
    write(&mut e, REG_STATUS, STATUS_DRIVER_OK);
    let negotiated = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
    write(&mut e, REG_STATUS, negotiated);
    write(&mut e, REG_QUEUE_NUM, 8);
    write(&mut e, REG_STATUS, 0);
    init(&mut e);
    write(&mut e, REG_STATUS, STATUS_ACKNOWLEDGE);
    read(&mut e, REG_STATUS);
    let out_of_order = e.finish();

    // A rate-limited disk: two flushes pass, the third waits in the ring; the limiter's timer
    // event (token 0) retries it before the bucket has refilled.
    e.u8(2);
    init(&mut e);
    for slot in 0..3 {
        request(&mut e, slot, 4, 0, &[(HEADER, 16, 0), (STATUS, 1, 2)]);
    }
    e.u8(SERVE | EVENT).u16(0).u64(0);
    let limited = e.finish();

    let served = |used_idx| Outcome {
        status: ALL_OK,
        interrupt: 0,
        used_idx,
        blk_status: 0,
    };
    vec![
        Seed {
            name: "init",
            input: init_only,
            expect: Outcome {
                status: ALL_OK,
                interrupt: 0,
                used_idx: 0,
                blk_status: 0,
            },
        },
        Seed {
            name: "init_flush",
            input: flush,
            expect: served(1),
        },
        Seed {
            name: "init_write_read",
            input: write_read,
            expect: served(2),
        },
        Seed {
            name: "rate_limited",
            input: limited,
            expect: Outcome {
                blk_status: 0xff,
                ..served(2)
            },
        },
        Seed {
            name: "out_of_order_status",
            input: out_of_order,
            expect: Outcome {
                status: ALL_OK,
                interrupt: 0,
                used_idx: 0,
                blk_status: 0,
            },
        },
    ]
}
