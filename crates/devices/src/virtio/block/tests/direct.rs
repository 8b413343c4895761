//! Direct I/O (`O_DIRECT`) through the transport and the host-side driver, with both
//! engines, on real files: aligned guest buffers go straight between guest memory and the
//! file (on the ring with the hybrid engine, the page cache untouched); buffers at odd
//! addresses and of odd lengths go through the bounce buffer; a flush sent with both kinds
//! of writes completes after all of them. The data is checked through a normal read of the
//! file.

use super::*;

/// Guest memory for bounced requests, away from the aligned buffers.
const ODD: u64 = BUFFERS + (16 << 20);

fn direct_rig(name: &str, bytes: u64, choice: EngineChoice) -> Rig {
    let t = rig_on(name, bytes, choice, true, |b| {
        if choice == EngineChoice::Synchronous {
            assert_eq!(b.engine(), ENGINE_SYNCHRONOUS);
        }
    });
    let file = std::fs::File::open(&t.path).unwrap();
    let align = disk::direct::statx_dioalign(file.as_raw_fd());
    assert!(
        align.is_some_and(|(mem, offset)| mem <= 4096 && offset <= 512),
        "TMPDIR's file system reports direct-I/O alignment {align:?}: run the tests with TMPDIR \
         on a disk-backed file system (ext4, xfs)"
    );
    t
}

/// The segments of a misaligned chain: odd addresses, lengths that are not sectors, 4608
/// bytes (9 sectors) in all.
fn odd_segments(base: u64) -> [(u64, u32); 3] {
    [(base + 1, 100), (base + 0x1003, 3996), (base + 0x2005, 512)]
}

impl Rig {
    /// A read or write at `offset` through the guest buffers `segs`, in slot `slot`.
    fn transfer(&mut self, slot: usize, write: bool, offset: u64, segs: &[(u64, u32)]) -> u16 {
        let kind = if write {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        };
        self.header(slot, kind, offset / 512);
        let mut chain = vec![readable(header_addr(slot), 16)];
        chain.extend(segs.iter().map(|&(addr, len)| Buffer {
            addr,
            len,
            writable: !write,
        }));
        chain.push(writable(status_addr(slot), 1));
        self.d.submit(0, &chain)
    }

    /// The bytes of `segs` in order.
    fn gather(&self, segs: &[(u64, u32)]) -> Vec<u8> {
        segs.iter()
            .flat_map(|&(addr, len)| self.guest_bytes(addr, len as usize))
            .collect()
    }

    /// Fills `segs` with `data` in order.
    fn scatter(&self, segs: &[(u64, u32)], data: &[u8]) {
        let mut at = 0;
        for &(addr, len) in segs {
            let len = len as usize;
            self.d
                .mem
                .write_slice(&data[at..at + len], GuestAddress(addr))
                .unwrap();
            at += len;
        }
    }

    /// Runs the device until `n` requests completed (synchronous: they already have).
    fn run(&mut self, n: usize) -> Vec<(u32, u32)> {
        self.d.process(0);
        let used = wait_used(&mut self.d, n);
        assert_eq!(used.len(), n, "completions");
        used
    }
}

fn file_bytes(t: &Rig, offset: u64, len: usize) -> Vec<u8> {
    let file = std::fs::read(&t.path).unwrap();
    file[offset as usize..offset as usize + len].to_vec()
}

fn aligned_requests_go_straight_to_the_file(choice: EngineChoice, name: &str) -> Rig {
    let mut t = direct_rig(name, 4 << 20, choice);
    t.drop_cache();
    // Two 64 KiB writes from page-aligned guest buffers, and a flush.
    t.fill(BUFFERS, 0x1_0000, 0x3c);
    t.fill(BUFFERS + 0x1_0000, 0x1_0000, 0xc3);
    let w1 = t.write(0, 0x10_0000, BUFFERS, 0x1_0000);
    let w2 = t.write(1, 0x12_0000, BUFFERS + 0x1_0000, 0x1_0000);
    let f = t.flush(2);
    let used = t.run(3);
    assert_eq!(used[2], (u32::from(f), 1), "the flush completed last");
    let mut heads: Vec<u32> = used[..2].iter().map(|u| u.0).collect();
    heads.sort();
    assert_eq!(heads, vec![u32::from(w1), u32::from(w2)]);
    assert!((0..3).all(|i| t.status(i) == 0));
    // Reads of what was written and of what was there, into other aligned buffers.
    t.fill(BUFFERS + 0x10_0000, 0x3_0000, 0);
    let r = t.read(3, 0x10_0000, BUFFERS + 0x10_0000, 0x3_0000);
    let used = t.run(1);
    assert_eq!(used, vec![(u32::from(r), 0x3_0001)]);
    assert_eq!(t.status(3), 0);
    assert_eq!(
        resident_pages(&t.path),
        0,
        "direct I/O left the page cache alone"
    );
    let back = t.guest_bytes(BUFFERS + 0x10_0000, 0x3_0000);
    assert!(back[..0x1_0000].iter().all(|&b| b == 0x3c));
    let want: Vec<u8> = (0x11_0000..0x12_0000).map(pattern).collect();
    assert_eq!(back[0x1_0000..0x2_0000], want[..], "untouched bytes");
    assert!(back[0x2_0000..].iter().all(|&b| b == 0xc3));
    assert!(file_bytes(&t, 0x10_0000, 0x1_0000)
        .iter()
        .all(|&b| b == 0x3c));
    assert!(file_bytes(&t, 0x12_0000, 0x1_0000)
        .iter()
        .all(|&b| b == 0xc3));
    assert_eq!(count(&t.stats.bounced), 0);
    assert_eq!(count(&t.stats.reads_inline), 0);
    t
}

fn misaligned_requests_go_through_the_bounce_buffer(choice: EngineChoice, name: &str) -> Rig {
    let mut t = direct_rig(name, 1 << 20, choice);
    let segs = odd_segments(ODD);
    let data: Vec<u8> = (0..4608u32).map(|i| (i % 253) as u8).collect();
    t.scatter(&segs, &data);
    let w = t.transfer(0, true, 8192, &segs);
    let f = t.flush(1);
    assert_eq!(t.run(2), vec![(u32::from(w), 1), (u32::from(f), 1)]);
    assert_eq!((t.status(0), t.status(1)), (0, 0));
    assert_eq!(file_bytes(&t, 8192, 4608), data, "the write is in the file");
    assert_eq!(
        file_bytes(&t, 8192 - 512, 512),
        (8192 - 512..8192).map(pattern).collect::<Vec<u8>>()
    );
    assert_eq!(
        file_bytes(&t, 8192 + 4608, 512),
        (8192 + 4608..8192 + 5120).map(pattern).collect::<Vec<u8>>()
    );
    // A read at another offset into the same odd buffers.
    t.scatter(&segs, &[0u8; 4608]);
    let r = t.transfer(2, false, 0x8_0000, &segs);
    assert_eq!(t.run(1), vec![(u32::from(r), 4609)]);
    assert_eq!(t.status(2), 0);
    assert_eq!(t.gather(&segs), file_bytes(&t, 0x8_0000, 4608));
    assert_eq!(count(&t.stats.bounced), 2);
    t
}

#[test]
fn direct_hybrid_aligned_requests_go_on_the_ring() {
    let t = aligned_requests_go_straight_to_the_file(EngineChoice::Hybrid, "direct-aligned");
    assert_eq!(count(&t.stats.writes_ring), 2);
    assert_eq!(count(&t.stats.reads_ring), 1, "no RWF_NOWAIT read first");
    assert_eq!(count(&t.stats.flushes_ring), 1);
}

#[test]
fn direct_synchronous_aligned_requests() {
    let t = aligned_requests_go_straight_to_the_file(EngineChoice::Synchronous, "direct-sync");
    assert_eq!(count(&t.stats.writes_ring) + count(&t.stats.reads_ring), 0);
}

#[test]
fn direct_hybrid_misaligned_requests_are_bounced() {
    let t = misaligned_requests_go_through_the_bounce_buffer(EngineChoice::Hybrid, "direct-odd");
    assert_eq!(count(&t.stats.writes_ring) + count(&t.stats.reads_ring), 0);
    assert_eq!(count(&t.stats.flushes_ring), 1);
}

#[test]
fn direct_synchronous_misaligned_requests_are_bounced() {
    misaligned_requests_go_through_the_bounce_buffer(EngineChoice::Synchronous, "direct-sodd");
}

#[test]
fn direct_a_flush_sent_with_aligned_and_bounced_writes_completes_after_all() {
    let mut t = direct_rig("direct-order", 8 << 20, EngineChoice::Hybrid);
    // Six 256 KiB aligned writes on the ring, a misaligned one served at once among them,
    // and a flush, made available together.
    for i in 0..6u64 {
        t.fill(BUFFERS + i * 0x4_0000, 0x4_0000, i as u8 + 1);
        t.write(i as usize, i * 0x4_0000, BUFFERS + i * 0x4_0000, 0x4_0000);
    }
    let segs = odd_segments(ODD);
    let odd: Vec<u8> = (0..4608u32).map(|i| (i % 241) as u8).collect();
    t.scatter(&segs, &odd);
    let w = t.transfer(6, true, 0x40_0000, &segs);
    let f = t.flush(7);
    let used = t.run(8);
    assert_eq!(used[7], (u32::from(f), 1), "the flush completed last");
    assert!(used.contains(&(u32::from(w), 1)));
    assert!((0..8).all(|i| t.status(i) == 0));
    let file = std::fs::read(&t.path).unwrap();
    for i in 0..6usize {
        let part = &file[i * 0x4_0000..(i + 1) * 0x4_0000];
        assert!(
            part.iter().all(|&b| b == i as u8 + 1),
            "write {i} in the file"
        );
    }
    assert_eq!(&file[0x40_0000..0x40_0000 + 4608], &odd[..]);
    assert_eq!(count(&t.stats.writes_ring), 6);
    assert_eq!(count(&t.stats.bounced), 1);
    assert_eq!(count(&t.stats.flushes_ring), 1);
}
