//! Streams host programs open: the CONNECT handshake, data both ways, flow control over
//! more than one credit window, programs or guests that stop reading, timeouts.

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use super::*;
use crate::virtio::device::VIRTIO_RING_F_EVENT_IDX;
use crate::virtio::mmio::{CONFIG_SPACE, REG_DEVICE_ID, REG_STATUS};
use crate::virtio::vsock::connection::BUF_ALLOC;
use crate::virtio::vsock::packet::*;
use crate::virtio::vsock::Error;

#[test]
fn device_identity_config_and_features() {
    let mut g = Guest::new("ident");
    assert_eq!(g.d.read_reg(REG_DEVICE_ID), 19);
    assert_eq!(
        g.d.device_features(),
        crate::virtio::device::VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    );
    let mut cfg = [0u8; 8];
    g.d.transport.read(CONFIG_SPACE, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), CID);
    let mut past = [0xffu8; 4];
    g.d.transport.read(CONFIG_SPACE + 8, &mut past);
    assert_eq!(past, [0; 4]);
    assert!(g.sock.exists(), "listening socket created");

    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        let err = Vsock::new(cid, &g.dir.0.join("other.sock")).err();
        assert!(matches!(err, Some(Error::InvalidCid(_))), "cid {cid}");
    }
    // A second device on the same live socket is refused.
    assert!(matches!(
        Vsock::new(CID + 1, &g.sock).err(),
        Some(Error::InUse(_))
    ));
}

#[test]
fn host_connects_and_bytes_flow_both_ways() {
    let mut g = Guest::with("flow", Duration::from_secs(2), VIRTIO_RING_F_EVENT_IDX);
    let (mut s, req) = g.host_connect(1234, GUEST_BUF_ALLOC);
    assert_eq!(req.buf_alloc, BUF_ALLOC);

    s.write_all(b"hello guest").unwrap();
    let (h, data) = g.expect(OP_RW);
    assert_eq!(data, b"hello guest");
    assert_eq!((h.src_port, h.dst_port), (req.src_port, 1234));
    assert_eq!((h.buf_alloc, h.fwd_cnt), (BUF_ALLOC, 0));

    let mut rwh = reply(&req, OP_RW);
    rwh.fwd_cnt = data.len() as u32;
    g.send(&rwh, b"hello host");
    let mut buf = [0u8; 10];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host");

    // The host program ends the stream: the guest learns it will get no more, and that the
    // program is gone; its RST frees the stream.
    drop(s);
    let (h, _) = g.expect(OP_SHUTDOWN);
    assert_eq!(h.flags, SHUTDOWN_BOTH);
    g.send(&reply(&req, OP_RST), &[]);
    g.expect_nothing(Duration::from_millis(100));
}

#[test]
fn data_a_host_program_sends_with_its_connect_line_is_kept() {
    let mut g = Guest::new("pipelined");
    let mut s = UnixStream::connect(&g.sock).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"CONNECT 77\nearly bytes").unwrap();
    let (req, _) = g.expect(OP_REQUEST);
    g.send(&reply(&req, OP_RESPONSE), &[]);
    assert_eq!(read_line(&mut s), format!("OK {}\n", req.src_port));
    let (_, data) = g.expect(OP_RW);
    assert_eq!(data, b"early bytes");
}

#[test]
fn host_to_guest_stays_within_the_guests_credit() {
    const WINDOW: u32 = 8 * 1024;
    const TOTAL: usize = 100 * 1024;
    let mut g = Guest::new("credit-in");
    let (s, req) = g.host_connect(1234, WINDOW);
    let sent = pattern(TOTAL, 7);
    let writer = {
        let mut s = s.try_clone().unwrap();
        let sent = sent.clone();
        std::thread::spawn(move || s.write_all(&sent))
    };
    let mut got = Vec::new();
    let mut windows = 0;
    let (mut fullest, mut asked_at_all) = (0, false);
    let deadline = Instant::now() + WAIT * 2;
    while got.len() < TOTAL {
        assert!(Instant::now() < deadline, "stalled at {} bytes", got.len());
        // Take everything the device sends with the credit it has.
        let mut in_window = 0u32;
        let mut asked = false;
        while let Some((h, data)) = g.next(Duration::from_millis(20)) {
            match h.op {
                OP_RW => {
                    in_window += data.len() as u32;
                    got.extend_from_slice(&data);
                }
                OP_CREDIT_REQUEST => asked = true,
                op => panic!("unexpected op {op}"),
            }
        }
        assert!(
            in_window <= WINDOW,
            "{in_window} bytes sent on {WINDOW} of credit"
        );
        fullest = fullest.max(in_window);
        asked_at_all |= asked;
        windows += 1;
        // The guest consumed it all: tell the device.
        let mut up = reply(&req, OP_CREDIT_UPDATE);
        up.buf_alloc = WINDOW;
        up.fwd_cnt = got.len() as u32;
        g.send(&up, &[]);
    }
    assert!(windows > TOTAL / WINDOW as usize, "{windows} windows");
    assert_eq!(fullest, WINDOW, "the device uses the credit it has");
    assert!(asked_at_all, "a device out of credit asks for more");
    writer.join().unwrap().unwrap();
    assert!(got == sent, "bytes arrive in order and intact");
}

#[test]
fn guest_to_host_over_many_credit_windows() {
    const TOTAL: usize = 300 * 1024;
    const CHUNK: usize = 16 * 1024;
    let mut g = Guest::new("credit-out");
    let (s, req) = g.host_connect(1234, GUEST_BUF_ALLOC);
    let reader = {
        let mut s = s.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut got = vec![0u8; TOTAL];
            s.read_exact(&mut got).map(|_| got)
        })
    };
    let sent = pattern(TOTAL, 3);
    // The device's credit as the guest knows it: its buf_alloc and fwd_cnt from its packets.
    let (mut peer_alloc, mut peer_fwd) = (req.buf_alloc, req.fwd_cnt);
    let mut tx_cnt = 0u32;
    let mut updates = 0;
    let mut off = 0;
    let deadline = Instant::now() + WAIT * 2;
    while off < TOTAL {
        assert!(Instant::now() < deadline, "stalled at {off} bytes");
        let credit = peer_alloc - tx_cnt.wrapping_sub(peer_fwd);
        let n = CHUNK.min(TOTAL - off).min(credit as usize);
        if n > 0 {
            g.send(&reply(&req, OP_RW), &sent[off..off + n]);
            off += n;
            tx_cnt += n as u32;
            continue;
        }
        // Out of credit: the device updates it as the host program reads.
        let Some((h, _)) = g.next(Duration::from_millis(100)) else {
            continue;
        };
        assert_eq!(h.op, OP_CREDIT_UPDATE, "{h:?}");
        assert!(h.fwd_cnt.wrapping_sub(peer_fwd) <= BUF_ALLOC);
        (peer_alloc, peer_fwd) = (h.buf_alloc, h.fwd_cnt);
        updates += 1;
    }
    assert!(updates >= 2, "{updates} credit updates");
    // The device may still hold the last window: it writes it as the program reads.
    while !reader.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the host program is still waiting"
        );
        g.pump(Duration::from_millis(10));
        while let Some((h, _)) = g.next(Duration::ZERO) {
            assert_eq!(h.op, OP_CREDIT_UPDATE, "{h:?}");
        }
    }
    let got = reader.join().unwrap().unwrap();
    assert!(got == sent, "bytes arrive in order and intact");
}

#[test]
fn a_host_program_that_never_reads_costs_one_window_then_a_reset() {
    let mut g = Guest::new("noread-host");
    let (mut s, req) = g.host_connect(1234, GUEST_BUF_ALLOC);
    // Fill the host's socket buffer first, so the device has to hold what comes next.
    let chunk = vec![0x5au8; 60 * 1024];
    let mut credit = BUF_ALLOC;
    let mut total = 0usize;
    while credit > 0 {
        let n = (chunk.len() as u32).min(credit);
        g.send(&reply(&req, OP_RW), &chunk[..n as usize]);
        credit -= n;
        total += n as usize;
        g.serve();
        while let Some((h, _)) = g.next(Duration::ZERO) {
            assert_eq!(h.op, OP_CREDIT_UPDATE);
            credit = BUF_ALLOC - (total as u32 - h.fwd_cnt);
        }
        assert!(total < 16 << 20, "the host's socket never filled");
    }
    // Exactly at the limit nothing happens; one byte more breaks the guest's credit.
    g.expect_nothing(Duration::from_millis(100));
    g.send(&reply(&req, OP_RW), b"!");
    let (rst, _) = g.expect(OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (req.src_port, 1234));
    // The stream is gone: the host program sees the end after the data it was sent.
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut read = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) => panic!("reading the closed stream: {e}"),
        }
    }
    assert!(read <= total, "{read} of {total} bytes");
    // Packets on the freed stream get RST.
    g.send(&reply(&req, OP_RW), b"more");
    g.expect(OP_RST);
}

#[test]
fn a_guest_that_never_reads_leaves_host_data_in_the_socket() {
    let mut g = Guest::new("noread-guest");
    // Credit is not what this test is about: the guest offers plenty.
    let (mut s, _req) = g.host_connect(1234, 1 << 30);
    // The guest stops posting receive buffers and uses up those it has.
    g.repost = false;
    s.set_nonblocking(true).unwrap();
    let block = pattern(4096, 9);
    let mut written = Vec::new();
    let mut received = Vec::new();
    let mut stuck = 0;
    let deadline = Instant::now() + WAIT * 2;
    // Write until the socket refuses several rounds in a row while the device is served.
    while stuck < 5 {
        assert!(Instant::now() < deadline, "the host could write forever");
        match s.write(&block) {
            Ok(n) => {
                written.extend_from_slice(&block[..n]);
                stuck = 0;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => stuck += 1,
            Err(e) => panic!("write: {e}"),
        }
        g.serve();
        while let Some((h, data)) = g.next(Duration::ZERO) {
            assert_eq!(h.op, OP_RW);
            received.extend_from_slice(&data);
        }
    }
    assert_eq!(g.posted_rx(), 0, "every buffer used");
    assert!(received.len() <= RX_SLOTS * RX_DATA as usize);
    assert!(
        written.len() - received.len() < 4 << 20,
        "the rest waits in the kernel's socket buffer"
    );
    // Buffers again: everything arrives, in order.
    g.repost = true;
    g.post_rx(RX_SLOTS);
    let deadline = Instant::now() + WAIT;
    while received.len() < written.len() {
        assert!(
            Instant::now() < deadline,
            "{} of {}",
            received.len(),
            written.len()
        );
        if let Some((h, data)) = g.next(Duration::from_millis(100)) {
            assert_eq!(h.op, OP_RW);
            received.extend_from_slice(&data);
        }
    }
    assert!(received == written);
}

#[test]
fn an_unanswered_request_times_out() {
    let mut g = Guest::with("timeout", Duration::from_millis(200), 0);
    let mut s = UnixStream::connect(&g.sock).unwrap();
    s.write_all(b"CONNECT 5\n").unwrap();
    let (req, _) = g.expect(OP_REQUEST);
    let started = Instant::now();
    // The guest says nothing; the device gives up, tells the guest, closes the stream.
    let (rst, _) = g.expect(OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (req.src_port, 5));
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert!(closed(&mut s));
    // A late RESPONSE finds no stream.
    g.send(&reply(&req, OP_RESPONSE), &[]);
    g.expect(OP_RST);
}

#[test]
fn a_refused_request_closes_the_host_stream() {
    let mut g = Guest::new("refused");
    let mut s = UnixStream::connect(&g.sock).unwrap();
    s.write_all(b"CONNECT 6\n").unwrap();
    let (req, _) = g.expect(OP_REQUEST);
    g.send(&reply(&req, OP_RST), &[]);
    assert!(closed(&mut s));
    g.expect_nothing(Duration::from_millis(100));
}

#[test]
fn malformed_connect_lines_close_the_stream() {
    let mut g = Guest::with("badline", Duration::from_millis(300), 0);
    let too_long = vec![b'7'; 40];
    for line in [
        &b"HELLO\n"[..],
        b"CONNECT abc\n",
        b"CONNECT 99999999999\n",
        b"CONNECT -1\n",
        b"CONNECT\n",
        &too_long,
    ] {
        let mut s = UnixStream::connect(&g.sock).unwrap();
        s.write_all(line).unwrap();
        g.serve();
        assert!(closed(&mut s), "{:?}", String::from_utf8_lossy(line));
    }
    // A program that connects and says nothing is closed at the deadline.
    let mut silent = UnixStream::connect(&g.sock).unwrap();
    let mut partial = UnixStream::connect(&g.sock).unwrap();
    partial.write_all(b"CONN").unwrap();
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        g.pump(Duration::from_millis(50));
        silent.set_nonblocking(true).unwrap();
        if matches!(silent.read(&mut [0u8; 1]), Ok(0)) {
            break;
        }
    }
    silent.set_nonblocking(false).unwrap();
    assert!(closed(&mut silent));
    assert!(closed(&mut partial));
    // None of them reached the guest, and the device still serves.
    g.expect_nothing(Duration::from_millis(50));
    let (_s, _) = g.host_connect(8, GUEST_BUF_ALLOC);
}

#[test]
fn a_driver_reset_closes_every_stream() {
    let mut g = Guest::new("reset");
    let (mut s, _) = g.host_connect(1234, GUEST_BUF_ALLOC);
    g.d.write_reg(REG_STATUS, 0);
    assert!(closed(&mut s));
    // The device comes back up and serves new streams.
    g.reinit();
    let (_s, _) = g.host_connect(1235, GUEST_BUF_ALLOC);
}
