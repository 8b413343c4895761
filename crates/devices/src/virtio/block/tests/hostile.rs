//! What a hostile or careless driver may ask of the device, and what it must not get: a
//! buffer beyond guest memory charged to the rate limiter, a limiter held for ever, an
//! indirect table it never negotiated, the event loop held by zeroes written by hand.

use super::*;

#[test]
fn a_buffer_beyond_guest_memory_is_refused_and_charges_the_limiter_nothing() {
    let mut t = rig_limited(
        "huge",
        1 << 20,
        EngineChoice::Hybrid,
        false,
        "bw=10M",
        |_| {},
    );
    // A write whose one data descriptor claims 2 GiB; guest memory is 64 MiB.
    t.header(0, VIRTIO_BLK_T_OUT, 0);
    let huge = t.d.submit(
        0,
        &[
            readable(header_addr(0), 16),
            readable(BUFFERS, 0x8000_0000),
            writable(status_addr(0), 1),
        ],
    );
    t.d.process(0);
    assert_eq!(wait_used(&mut t.d, 1), vec![(u32::from(huge), 1)]);
    assert_eq!(t.status(0), VIRTIO_BLK_S_IOERR);
    // The limiter is untouched: at 10 MB/s a 2 GiB charge would hold the next request for
    // over 200 s; a 4 KiB write completes now.
    let w = t.write(1, 0, BUFFERS, 4096);
    t.d.process(0);
    assert_eq!(wait_used(&mut t.d, 1), vec![(u32::from(w), 1)]);
    assert_eq!(t.status(1), VIRTIO_BLK_S_OK);
}

#[test]
fn a_device_held_by_its_limiter_serves_again_after_a_reset() {
    let mut t = rig_limited(
        "debt",
        48 << 20,
        EngineChoice::Hybrid,
        false,
        "bw=1M",
        |_| {},
    );
    // A legal 32 MiB write passes a full 1 MB bucket and leaves it 31 s in debt.
    let big = t.write(0, 0, BUFFERS, 32 << 20);
    t.d.process(0);
    assert_eq!(wait_used(&mut t.d, 1), vec![(u32::from(big), 1)]);
    let held = t.write(1, 0, BUFFERS, 4096);
    t.d.process(0);
    serve_events(&mut t.d, Duration::from_millis(50));
    assert!(t.d.used(0).is_empty(), "write {held} waits for the debt");
    // The guest resets the device and brings it up again: it serves at once.
    t.d.write_reg(REG_STATUS, 0);
    let status = t.d.init(VIRTIO_BLK_F_FLUSH, 256);
    assert_eq!(status & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
    let w = t.write(2, 0, BUFFERS, 4096);
    t.d.process(0);
    let started = Instant::now();
    assert_eq!(wait_used(&mut t.d, 1), vec![(u32::from(w), 1)]);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(t.status(2), VIRTIO_BLK_S_OK);
}

#[test]
fn a_chain_with_an_indirect_table_is_refused_as_never_negotiated() {
    let mut t = rig("indirect", 1 << 20, EngineChoice::Synchronous, |_| {});
    // A well-formed read in an indirect table: header, 4 KiB buffer, status.
    t.header(0, VIRTIO_BLK_T_IN, 0);
    t.fill(BUFFERS, 4096, 0xee);
    let table = BUFFERS + 0x10_0000;
    for (i, (addr, len, flags)) in [
        (header_addr(0), 16u32, 1u16),
        (BUFFERS, 4096, 1 | 2),
        (status_addr(0), 1, 2),
    ]
    .into_iter()
    .enumerate()
    {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&(i as u16 + 1).to_le_bytes());
        t.d.mem
            .write_slice(&raw, GuestAddress(table + i as u64 * 16))
            .unwrap();
    }
    // The chain's one descriptor points at the table (VIRTQ_DESC_F_INDIRECT).
    t.d.write_desc(0, 0, table, 3 * 16, 4, 0);
    t.d.make_available(0, 0);
    t.d.process(0);
    // Answered as a malformed chain: used, nothing written, the buffer untouched.
    assert_eq!(wait_used(&mut t.d, 1), vec![(0, 0)]);
    assert_eq!(t.status(0), 0xff, "no status byte written");
    assert_eq!(t.guest_bytes(BUFFERS, 4096), vec![0xee; 4096]);
    // The device goes on serving ordinary chains.
    let r = t.read(1, 0, BUFFERS, 4096);
    t.d.process(0);
    assert_eq!(wait_used(&mut t.d, 1), vec![(u32::from(r), 4097)]);
}

/// A write-zeroes request of `sectors` at `sector`, in slot `slot`.
fn write_zeroes(t: &mut Rig, slot: usize, sector: u64, sectors: u32) -> u16 {
    t.header(slot, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let seg = BUFFERS + 0x10_0000 + slot as u64 * 16;
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&sector.to_le_bytes());
    raw[8..12].copy_from_slice(&sectors.to_le_bytes());
    t.d.mem.write_slice(&raw, GuestAddress(seg)).unwrap();
    t.d.submit(
        0,
        &[
            readable(header_addr(slot), 16),
            readable(seg, 16),
            writable(status_addr(slot), 1),
        ],
    )
}

#[test]
fn zeroes_written_by_hand_take_a_bounded_share_of_each_turn() {
    // tmpfs cannot zero a range (FALLOC_FL_ZERO_RANGE is not supported there): the device
    // writes the zeroes itself, on the event loop.
    let path =
        std::path::Path::new("/dev/shm").join(format!("keel-blk-zeroes-{}", std::process::id()));
    std::fs::File::create(&path)
        .unwrap()
        .set_len(160 << 20)
        .unwrap();
    let disk = disk::RawDisk::open(&path, false).unwrap();
    let limiter = RateLimiter::new(&RateLimitConfig::default()).unwrap();
    let block = Block::with_engine(disk, "zeroes", limiter, EngineChoice::Synchronous);
    let stats = block.stats();
    let mut d = Driver::new(Box::new(block), MEM_SIZE);
    // Write-zeroes needs its feature bit (14).
    let status = d.init(VIRTIO_BLK_F_FLUSH | 1 << 14, 256);
    assert_eq!(status & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
    let mut t = Rig { d, path, stats };
    // The device says how much one request may zero: 16 MiB; more is refused.
    let too_big = write_zeroes(&mut t, 0, 0, 32769);
    t.d.process(0);
    assert_eq!(wait_used(&mut t.d, 1), vec![(u32::from(too_big), 1)]);
    assert_eq!(t.status(0), VIRTIO_BLK_S_IOERR);
    // Eight requests of 16 MiB, 128 MiB written by hand: one turn does 64 MiB of it, then
    // the device yields and the rest is done on its next turn.
    let heads: Vec<u16> = (1..=8)
        .map(|i| write_zeroes(&mut t, i, (i as u64 - 1) * 32768, 32768))
        .collect();
    t.d.process(0);
    let first_turn = t.d.used(0);
    assert_eq!(first_turn.len(), 4, "{first_turn:?}");
    assert_eq!(count(&t.stats.yielded), 1);
    let rest = wait_used(&mut t.d, 4);
    assert_eq!(rest.len(), 4, "the rest after the resume event");
    let mut all: Vec<u16> = first_turn
        .iter()
        .chain(&rest)
        .map(|(h, _)| *h as u16)
        .collect();
    all.sort();
    let mut expected = heads.clone();
    expected.sort();
    assert_eq!(all, expected);
    for slot in 1..=8 {
        assert_eq!(t.status(slot), VIRTIO_BLK_S_OK);
    }
}
