//! Streams the guest opens to host listeners at `PATH_<port>`, and shutdown and reset in
//! both directions.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixListener;
use std::time::Duration;

use super::*;
use crate::virtio::vsock::connection::BUF_ALLOC;
use crate::virtio::vsock::packet::*;
use crate::virtio::vsock::unix::port_path;

const GUEST_PORT: u32 = 5000;

/// The guest connects to host port `port`, where the test listens; returns the accepted
/// host stream.
fn guest_connect(g: &mut Guest, listener: &UnixListener, port: u32) -> UnixStream {
    g.send(&guest_header(OP_REQUEST, GUEST_PORT, port), &[]);
    let (h, _) = g.expect(OP_RESPONSE);
    assert_eq!(
        (h.src_cid, h.dst_cid, h.src_port, h.dst_port, h.type_),
        (HOST_CID, CID, port, GUEST_PORT, TYPE_STREAM)
    );
    assert_eq!((h.buf_alloc, h.fwd_cnt), (BUF_ALLOC, 0));
    let (s, _) = listener
        .accept()
        .expect("the device connected to the listener");
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

#[test]
fn guest_connects_to_a_host_listener() {
    let mut g = Guest::new("g-connect");
    let listener = UnixListener::bind(port_path(&g.sock, 1234)).unwrap();
    let mut s = guest_connect(&mut g, &listener, 1234);

    g.send(&guest_header(OP_RW, GUEST_PORT, 1234), b"from the guest");
    let mut buf = [0u8; 14];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"from the guest");

    s.write_all(b"from the host").unwrap();
    let (h, data) = g.expect(OP_RW);
    assert_eq!(data, b"from the host");
    assert_eq!((h.src_port, h.dst_port), (1234, GUEST_PORT));
    assert_eq!(h.fwd_cnt, 14, "the device forwarded the guest's 14 bytes");

    // The guest closes: the host program reads the end, the device answers with RST.
    let mut bye = guest_header(OP_SHUTDOWN, GUEST_PORT, 1234);
    bye.flags = SHUTDOWN_BOTH;
    g.send(&bye, &[]);
    g.expect(OP_RST);
    assert!(closed(&mut s));
}

#[test]
fn a_guest_connect_nobody_listens_for_gets_rst() {
    let mut g = Guest::new("g-refused");
    g.send(&guest_header(OP_REQUEST, GUEST_PORT, 4321), &[]);
    let (h, _) = g.expect(OP_RST);
    assert_eq!(
        (h.src_cid, h.dst_cid, h.src_port, h.dst_port),
        (HOST_CID, CID, 4321, GUEST_PORT)
    );
    // Not a socket at all.
    std::fs::write(port_path(&g.sock, 4322), b"plain file").unwrap();
    g.send(&guest_header(OP_REQUEST, GUEST_PORT, 4322), &[]);
    g.expect(OP_RST);
    // A listener that went away.
    drop(UnixListener::bind(port_path(&g.sock, 4323)).unwrap());
    g.send(&guest_header(OP_REQUEST, GUEST_PORT, 4323), &[]);
    g.expect(OP_RST);
}

#[test]
fn the_guest_stops_sending_and_still_receives() {
    let mut g = Guest::new("g-halfclose");
    let listener = UnixListener::bind(port_path(&g.sock, 1)).unwrap();
    let mut s = guest_connect(&mut g, &listener, 1);
    g.send(&guest_header(OP_RW, GUEST_PORT, 1), b"last words");
    let mut half = guest_header(OP_SHUTDOWN, GUEST_PORT, 1);
    half.flags = SHUTDOWN_SEND;
    g.send(&half, &[]);
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"last words", "data, then the end");

    s.write_all(b"reply").unwrap();
    let (_, data) = g.expect(OP_RW);
    assert_eq!(data, b"reply");

    // The host program finishes too: the guest hears it, and its close ends the stream.
    s.shutdown(Shutdown::Write).unwrap();
    let (h, _) = g.expect(OP_SHUTDOWN);
    assert_eq!(h.flags & SHUTDOWN_SEND, SHUTDOWN_SEND);
    let mut bye = guest_header(OP_SHUTDOWN, GUEST_PORT, 1);
    bye.flags = SHUTDOWN_BOTH;
    g.send(&bye, &[]);
    g.expect(OP_RST);
    // Data after its own shutdown is a protocol error; on a freed stream it gets RST too.
    g.send(&guest_header(OP_RW, GUEST_PORT, 1), b"late");
    g.expect(OP_RST);
}

#[test]
fn the_host_stops_sending_and_still_receives() {
    let mut g = Guest::new("h-halfclose");
    let (mut s, req) = g.host_connect(99, GUEST_BUF_ALLOC);
    s.write_all(b"request").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let (_, data) = g.expect(OP_RW);
    assert_eq!(data, b"request");
    let (h, _) = g.expect(OP_SHUTDOWN);
    assert_eq!(h.flags, SHUTDOWN_SEND, "the host still receives");

    g.send(&reply(&req, OP_RW), b"response");
    let mut got = [0u8; 8];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"response");
    let mut bye = reply(&req, OP_SHUTDOWN);
    bye.flags = SHUTDOWN_BOTH;
    g.send(&bye, &[]);
    g.expect(OP_RST);
    assert!(closed(&mut s));
}

#[test]
fn a_guest_rst_closes_the_host_stream() {
    let mut g = Guest::new("g-rst");
    let listener = UnixListener::bind(port_path(&g.sock, 3)).unwrap();
    let mut s = guest_connect(&mut g, &listener, 3);
    g.send(&guest_header(OP_RST, GUEST_PORT, 3), &[]);
    assert!(closed(&mut s));
    g.expect_nothing(Duration::from_millis(50));
}

#[test]
fn without_the_guests_rst_a_closing_stream_is_reset() {
    let mut g = Guest::with("g-linger", Duration::from_millis(200), 0);
    let listener = UnixListener::bind(port_path(&g.sock, 4)).unwrap();
    let s = guest_connect(&mut g, &listener, 4);
    drop(s);
    let (h, _) = g.expect(OP_SHUTDOWN);
    assert_eq!(h.flags, SHUTDOWN_BOTH);
    // The guest never answers; the device resets the stream after the timeout.
    let (h, _) = g.expect(OP_RST);
    assert_eq!((h.src_port, h.dst_port), (4, GUEST_PORT));
}

/// The guest sends as much as the device's credit allows to a host program that is not
/// reading; returns the bytes sent.
fn fill_while_host_sleeps(g: &mut Guest, port: u32) -> Vec<u8> {
    let mut sent = Vec::new();
    let mut credit = BUF_ALLOC;
    let block = pattern(32 * 1024, 1);
    while credit > 0 {
        let n = (block.len() as u32).min(credit) as usize;
        g.send(&guest_header(OP_RW, GUEST_PORT, port), &block[..n]);
        sent.extend_from_slice(&block[..n]);
        credit -= n as u32;
        while let Some((h, _)) = g.next(Duration::ZERO) {
            assert_eq!(h.op, OP_CREDIT_UPDATE);
            credit = BUF_ALLOC - (sent.len() as u32 - h.fwd_cnt);
        }
        assert!(sent.len() < 16 << 20, "the host's socket never filled");
    }
    sent
}

#[test]
fn data_sent_before_the_guest_closes_reaches_a_slow_host_program() {
    let mut g = Guest::new("g-flush");
    let listener = UnixListener::bind(port_path(&g.sock, 5)).unwrap();
    let mut s = guest_connect(&mut g, &listener, 5);
    let sent = fill_while_host_sleeps(&mut g, 5);
    let mut bye = guest_header(OP_SHUTDOWN, GUEST_PORT, 5);
    bye.flags = SHUTDOWN_BOTH;
    g.send(&bye, &[]);
    // The device holds the rest until the program reads; then it ends the stream.
    g.expect_nothing(Duration::from_millis(100));
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        s.read_to_end(&mut got).map(|_| got)
    });
    let (h, _) = g.expect(OP_RST);
    assert_eq!(
        h.fwd_cnt,
        sent.len() as u32,
        "everything forwarded before the RST"
    );
    let got = reader.join().unwrap().unwrap();
    assert!(got == sent, "{} of {} bytes", got.len(), sent.len());
}

#[test]
fn a_host_program_that_never_reads_does_not_hold_a_closed_stream() {
    let mut g = Guest::with("g-stuck", Duration::from_millis(200), 0);
    let listener = UnixListener::bind(port_path(&g.sock, 6)).unwrap();
    let mut s = guest_connect(&mut g, &listener, 6);
    fill_while_host_sleeps(&mut g, 6);
    let mut bye = guest_header(OP_SHUTDOWN, GUEST_PORT, 6);
    bye.flags = SHUTDOWN_BOTH;
    g.send(&bye, &[]);
    g.expect(OP_RST);
    // The stream is closed; what the socket held can still be read, then the end.
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("{e}"),
        }
    }
}
