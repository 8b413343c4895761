//! A hostile guest: chains that are not packets, packets that break the protocol, receive
//! buffers that cannot take a packet, floods. The device drops or resets, never panics, and
//! keeps serving.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::time::Duration;

use super::*;
use crate::virtio::vsock::muxer::MAX_PENDING_RSTS;
use crate::virtio::vsock::packet::*;
use crate::virtio::vsock::unix::port_path;

const AREA: u64 = DATA_START + 0x60_0000;

/// Still serving: a REQUEST nobody listens for gets its RST.
fn still_serving(g: &mut Guest) {
    g.send(&guest_header(OP_REQUEST, 7, 65_000), &[]);
    let (h, _) = g.expect(OP_RST);
    assert_eq!((h.src_port, h.dst_port), (65_000, 7));
}

/// Header bytes that would draw a RST if the device took them for a packet.
fn header_at(g: &Guest, at: u64, len: u32) {
    let mut h = guest_header(OP_RW, 1, 2);
    h.len = len;
    g.d.mem
        .write_slice(&h.to_bytes(), GuestAddress(at))
        .unwrap();
}

#[test]
fn malformed_transmit_chains_are_dropped() {
    let mut g = Guest::new("x-chains");
    let hdr = PKT_HEADER_SIZE as u32;
    let end = MEM_SIZE as u64;
    let cases: Vec<(&str, u32, Vec<Buffer>)> = vec![
        ("header descriptor too short", 0, vec![ro(AREA, 20)]),
        ("writable header", 0, vec![rw(AREA, hdr)]),
        ("writable data", 5, vec![ro(AREA, hdr), rw(AREA + 0x100, 5)]),
        (
            "len beyond the data buffer",
            100,
            vec![ro(AREA, hdr), ro(AREA + 0x100, 10)],
        ),
        (
            "len beyond the header-and-data buffer",
            100,
            vec![ro(AREA, hdr + 10)],
        ),
        (
            "len over 64 KiB",
            70_000,
            vec![ro(AREA, hdr), ro(AREA + 0x100, 70_000)],
        ),
        (
            "len u32::MAX",
            u32::MAX,
            vec![ro(AREA, hdr), ro(AREA + 0x100, 64)],
        ),
        ("data missing", 10, vec![ro(AREA, hdr)]),
        ("header outside memory", 0, vec![ro(0xffff_0000_0000, hdr)]),
        (
            "header across the end of memory",
            0,
            vec![ro(end - 20, hdr)],
        ),
        (
            "data outside memory",
            8,
            vec![ro(AREA, hdr), ro(end + 0x1000, 8)],
        ),
        (
            "data across the end of memory",
            64,
            vec![ro(AREA, hdr), ro(end - 32, 64)],
        ),
    ];
    for (what, len, chain) in cases {
        header_at(&g, AREA, len);
        assert_eq!(g.send_chain(&chain), 0, "{what}");
        g.expect_nothing(Duration::from_millis(20));
    }
    still_serving(&mut g);
}

#[test]
fn packets_that_break_the_protocol_get_rst() {
    let mut g = Guest::new("x-proto");
    // Not a stream.
    let mut seq = guest_header(OP_REQUEST, 10, 20);
    seq.type_ = 2;
    g.send(&seq, &[]);
    let (h, _) = g.expect(OP_RST);
    assert_eq!((h.src_port, h.dst_port, h.type_), (20, 10, TYPE_STREAM));
    // To a CID other than the host's: the RST comes from where it was sent.
    let mut other = guest_header(OP_REQUEST, 10, 20);
    other.dst_cid = 77;
    g.send(&other, &[]);
    let (h, _) = g.expect(OP_RST);
    assert_eq!((h.src_cid, h.dst_cid), (77, CID));
    // Data, shutdown, credit for streams that do not exist.
    for op in [
        OP_RW,
        OP_SHUTDOWN,
        OP_CREDIT_UPDATE,
        OP_CREDIT_REQUEST,
        OP_RESPONSE,
        0,
        99,
    ] {
        g.send(&guest_header(op, 10, 20), b"x");
        g.expect(OP_RST);
    }
    // A RST for nothing, and a packet claiming another guest's CID, get no answer.
    g.send(&guest_header(OP_RST, 10, 20), &[]);
    let mut spoofed = guest_header(OP_REQUEST, 10, 20);
    spoofed.src_cid = CID + 1;
    g.send(&spoofed, &[]);
    g.expect_nothing(Duration::from_millis(50));

    // On a live stream, an unknown op, a second RESPONSE or a second REQUEST resets it.
    let listener = UnixListener::bind(port_path(&g.sock, 30)).unwrap();
    for bad in [99, OP_RESPONSE, OP_REQUEST] {
        g.send(&guest_header(OP_REQUEST, 11, 30), &[]);
        g.expect(OP_RESPONSE);
        let (mut s, _) = listener.accept().unwrap();
        g.send(&guest_header(bad, 11, 30), &[]);
        let (h, _) = g.expect(OP_RST);
        assert_eq!((h.src_port, h.dst_port), (30, 11), "op {bad}");
        assert!(closed(&mut s), "op {bad}");
    }
    // Data on a stream still waiting for the guest's RESPONSE.
    let mut s = UnixStream::connect(&g.sock).unwrap();
    s.write_all(b"CONNECT 12\n").unwrap();
    let (req, _) = g.expect(OP_REQUEST);
    g.send(&reply(&req, OP_RW), b"too early");
    g.expect(OP_RST);
    assert!(closed(&mut s));
    still_serving(&mut g);
}

#[test]
fn receive_buffers_that_cannot_take_a_packet_come_back_empty() {
    let mut g = Guest::new("x-rx");
    // Use up the posted buffers, then offer only bad ones.
    g.repost = false;
    while g.posted_rx() > 0 {
        g.send(&guest_header(OP_RW, 1, 1), &[]);
        g.expect(OP_RST);
    }
    g.send(&guest_header(OP_RW, 1, 2), &[]);
    let hdr = PKT_HEADER_SIZE as u32;
    let bad: Vec<Vec<Buffer>> = vec![
        vec![ro(AREA, hdr + 100)],
        vec![rw(AREA, 20)],
        vec![rw(AREA, hdr)],
        vec![rw(AREA, hdr), ro(AREA + 0x100, 100)],
        vec![rw(AREA, hdr), rw(AREA + 0x100, 128 * 1024)],
        vec![rw(0xffff_0000_0000, hdr + 100)],
        vec![rw(MEM_SIZE as u64 - 10, hdr + 100)],
    ];
    for chain in &bad {
        g.d.submit(RX_QUEUE, chain);
    }
    g.d.process(RX_QUEUE);
    let used = g.d.used(RX_QUEUE);
    assert_eq!(used.len(), bad.len());
    assert!(used.iter().all(|&(_, len)| len == 0), "{used:?}");
    // The RST waited; a good two-descriptor buffer takes it.
    g.d.submit(RX_QUEUE, &[rw(AREA, hdr), rw(AREA + 0x100, 256)]);
    g.d.process(RX_QUEUE);
    let used = g.d.used(RX_QUEUE);
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1, hdr);
    let mut raw = [0u8; PKT_HEADER_SIZE];
    g.d.mem.read_slice(&mut raw, GuestAddress(AREA)).unwrap();
    let h = Header::from_bytes(&raw);
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, 2, 1));
    assert_eq!(g.d.status() & STATUS_NEEDS_RESET, 0);
    g.repost = true;
    g.post_rx(RX_SLOTS);
    still_serving(&mut g);
}

#[test]
fn a_flood_of_resets_for_a_guest_that_does_not_read_is_bounded() {
    let mut g = Guest::new("x-flood");
    g.repost = false;
    while g.posted_rx() > 0 {
        g.send(&guest_header(OP_RW, 1, 1), &[]);
        g.expect(OP_RST);
    }
    let flood = MAX_PENDING_RSTS as u32 + 500;
    for port in 0..flood {
        g.send(&guest_header(OP_RW, port, 1), &[]);
    }
    g.repost = true;
    g.post_rx(RX_SLOTS);
    let mut rsts = 0;
    while let Some((h, _)) = g.next(Duration::from_millis(100)) {
        assert_eq!(h.op, OP_RST);
        rsts += 1;
    }
    assert_eq!(rsts, MAX_PENDING_RSTS, "the rest were dropped");
    still_serving(&mut g);
}

/// A small deterministic generator (xorshift) for the garbage test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[(self.next() % from.len() as u64) as usize]
    }
}

#[test]
fn garbage_packets_and_chains_leave_the_device_serving() {
    let mut g = Guest::new("x-garbage");
    let listener = UnixListener::bind(port_path(&g.sock, 40)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut accepted = Vec::new();
    for _ in 0..3000 {
        let op = rng.pick(&[
            0,
            OP_REQUEST,
            OP_RESPONSE,
            OP_RST,
            OP_SHUTDOWN,
            OP_RW,
            6,
            7,
            8,
        ]);
        let mut h = guest_header(op, rng.pick(&[1, 2, 3]), rng.pick(&[40, 41]));
        h.flags = rng.next() as u32;
        h.buf_alloc = rng.pick(&[0, 1, 4096, u32::MAX]);
        h.fwd_cnt = rng.next() as u32;
        if rng.next().is_multiple_of(8) {
            h.type_ = rng.next() as u16;
        }
        let data = vec![0xa5u8; rng.pick(&[0usize, 1, 100, 4096])];
        match rng.next() % 6 {
            0 => {
                // A chain with the header's len field lying.
                let mut raw = h;
                raw.len = rng.next() as u32;
                g.d.mem
                    .write_slice(&raw.to_bytes(), GuestAddress(AREA))
                    .unwrap();
                let len = rng.pick(&[0u32, 20, 44, 100, 70_000]);
                g.send_chain(&[ro(AREA, len), ro(AREA + 0x100, rng.pick(&[0u32, 8, 4096]))]);
            }
            _ => g.send(&h, &data),
        }
        g.serve();
        while g.next(Duration::ZERO).is_some() {}
        if let Ok((s, _)) = listener.accept() {
            accepted.push(s);
        }
    }
    assert_eq!(g.d.status() & STATUS_NEEDS_RESET, 0);
    still_serving(&mut g);
    let (_s, _) = g.host_connect(9, GUEST_BUF_ALLOC);
}
