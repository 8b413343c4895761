//! virtio-vsock driven through the host-side driver harness playing the guest, against real
//! Unix sockets in a temporary directory: host programs are plain `UnixStream`s (in threads
//! where they would block), guest packets are written into harness memory by hand.

mod guest;
mod host;
mod hostile;

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::packet::{Header, HOST_CID, OP_REQUEST, OP_RESPONSE, PKT_HEADER_SIZE, TYPE_STREAM};
use super::{Vsock, EVENT_TOKEN, RX_QUEUE, TX_QUEUE};
use crate::virtio::driver::{Buffer, Driver, DATA_START};
use crate::virtio::mmio::{STATUS_DRIVER_OK, STATUS_NEEDS_RESET};

pub const CID: u64 = 42;
/// What the test guest advertises unless a test says otherwise.
pub const GUEST_BUF_ALLOC: u32 = 256 * 1024;
/// Receive buffers: header plus this much data, in one descriptor.
pub const RX_DATA: u32 = 4096;
const RX_SLOT: u64 = 0x2000;
const RX_SLOTS: usize = 32;
const RX_BASE: u64 = DATA_START;
const TX_BASE: u64 = DATA_START + 0x10_0000;
const TX_SLOT: u64 = 0x1_1000;
const TX_SLOTS: u64 = 16;
const MEM_SIZE: usize = 8 << 20;
/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(5);

/// A temporary directory for one test's sockets, removed at the end.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        // Short: socket paths must stay under 108 bytes.
        let dir = std::env::temp_dir().join(format!("kv-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test directory");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The test guest: a driver over the device, receive buffers kept posted, packets received
/// but not yet looked at.
pub struct Guest {
    pub d: Driver,
    pub sock: PathBuf,
    pub dir: TempDir,
    epfd: RawFd,
    rx_free: Vec<u64>,
    rx_posted: HashMap<u32, u64>,
    /// Whether consumed receive buffers are posted again.
    pub repost: bool,
    inbox: VecDeque<(Header, Vec<u8>)>,
    tx_seq: u64,
}

impl Guest {
    pub fn new(name: &str) -> Self {
        Self::with(name, Duration::from_secs(2), 0)
    }

    pub fn with(name: &str, timeout: Duration, features: u64) -> Self {
        let dir = TempDir::new(name);
        let sock = dir.0.join("v.sock");
        let mut dev = Vsock::new(CID, &sock).expect("vsock device");
        dev.set_timeout(timeout);
        let mut d = Driver::new(Box::new(dev), MEM_SIZE);
        let status = d.init(features, 256);
        assert_eq!(
            status & STATUS_DRIVER_OK,
            STATUS_DRIVER_OK,
            "status {status:#x}"
        );
        let sources = d.transport.event_sources();
        assert_eq!(sources.len(), 1, "one epoll set");
        assert_eq!(sources[0].1, EVENT_TOKEN);
        let mut g = Self {
            d,
            sock,
            dir,
            epfd: sources[0].0,
            rx_free: (0..RX_SLOTS as u64)
                .map(|i| RX_BASE + i * RX_SLOT)
                .collect(),
            rx_posted: HashMap::new(),
            repost: true,
            inbox: VecDeque::new(),
            tx_seq: 0,
        };
        g.post_rx(RX_SLOTS);
        g
    }

    /// The driver brings the device up again after a reset: fresh rings and buffers.
    pub fn reinit(&mut self) {
        let status = self.d.init(0, 256);
        assert_eq!(
            status & STATUS_DRIVER_OK,
            STATUS_DRIVER_OK,
            "status {status:#x}"
        );
        self.rx_free = (0..RX_SLOTS as u64)
            .map(|i| RX_BASE + i * RX_SLOT)
            .collect();
        self.rx_posted.clear();
        self.inbox.clear();
        self.post_rx(RX_SLOTS);
    }

    /// Posts up to `n` receive buffers and notifies.
    pub fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let Some(addr) = self.rx_free.pop() else {
                break;
            };
            let head = self.d.submit(
                RX_QUEUE,
                &[Buffer {
                    addr,
                    len: PKT_HEADER_SIZE as u32 + RX_DATA,
                    writable: true,
                }],
            );
            self.rx_posted.insert(u32::from(head), addr);
        }
        self.d.process(RX_QUEUE);
    }

    pub fn posted_rx(&self) -> usize {
        self.rx_posted.len()
    }

    /// Writes a packet into memory and hands it to the device as one transmit chain.
    pub fn send(&mut self, h: &Header, data: &[u8]) {
        let slot = TX_BASE + (self.tx_seq % TX_SLOTS) * TX_SLOT;
        self.tx_seq += 1;
        let mut h = *h;
        h.len = data.len() as u32;
        self.d
            .mem
            .write_slice(&h.to_bytes(), GuestAddress(slot))
            .unwrap();
        let mut chain = vec![ro(slot, PKT_HEADER_SIZE as u32)];
        if !data.is_empty() {
            self.d
                .mem
                .write_slice(data, GuestAddress(slot + 0x1000))
                .unwrap();
            chain.push(ro(slot + 0x1000, data.len() as u32));
        }
        self.send_chain(&chain);
    }

    /// Hands the device a transmit chain as given; returns its used length.
    pub fn send_chain(&mut self, chain: &[Buffer]) -> u32 {
        self.d.submit(TX_QUEUE, chain);
        self.d.process(TX_QUEUE);
        let used = self.d.used(TX_QUEUE);
        assert_eq!(used.len(), 1, "one used entry per transmit chain");
        assert_eq!(
            self.d.status() & STATUS_NEEDS_RESET,
            0,
            "device still serving"
        );
        used[0].1
    }

    /// Serves the device's event source once and collects what reached the receive queue.
    pub fn serve(&mut self) {
        self.d.transport.process_event(EVENT_TOKEN);
        self.collect();
    }

    fn collect(&mut self) {
        let mut consumed = 0;
        for (head, len) in self.d.used(RX_QUEUE) {
            let addr = self.rx_posted.remove(&head).expect("used head was posted");
            self.rx_free.push(addr);
            consumed += 1;
            if len == 0 {
                continue;
            }
            assert!(len as usize >= PKT_HEADER_SIZE, "used length {len}");
            let mut raw = [0u8; PKT_HEADER_SIZE];
            self.d.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let h = Header::from_bytes(&raw);
            assert_eq!(
                len,
                PKT_HEADER_SIZE as u32 + h.len,
                "used length matches header"
            );
            assert!(h.len <= RX_DATA);
            let mut data = vec![0u8; h.len as usize];
            self.d
                .mem
                .read_slice(&mut data, GuestAddress(addr + PKT_HEADER_SIZE as u64))
                .unwrap();
            self.inbox.push_back((h, data));
        }
        if self.repost && consumed > 0 {
            self.post_rx(consumed);
        }
    }

    /// Waits (up to `timeout`) until the device's epoll set is readable, then serves it.
    pub fn pump(&mut self, timeout: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.epfd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: poll on one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, ms) };
        self.serve();
    }

    /// The next packet for the guest, waiting up to `timeout`.
    pub fn next(&mut self, timeout: Duration) -> Option<(Header, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        self.serve();
        loop {
            if let Some(p) = self.inbox.pop_front() {
                return Some(p);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            self.pump((deadline - now).min(Duration::from_millis(50)));
        }
    }

    /// The next packet, which must be `op`.
    pub fn expect(&mut self, op: u16) -> (Header, Vec<u8>) {
        let p = self
            .next(WAIT)
            .unwrap_or_else(|| panic!("no packet (waiting for op {op})"));
        assert_eq!(p.0.op, op, "unexpected packet {:?}", p.0);
        p
    }

    /// Asserts nothing arrives for `quiet`.
    pub fn expect_nothing(&mut self, quiet: Duration) {
        if let Some(p) = self.next(quiet) {
            panic!("unexpected packet {:?}", p.0);
        }
    }

    /// A host program connects to guest port `port` and the guest accepts it (advertising
    /// `buf_alloc`). Returns the host's stream and the device's REQUEST.
    pub fn host_connect(&mut self, port: u32, buf_alloc: u32) -> (UnixStream, Header) {
        let mut s = UnixStream::connect(&self.sock).expect("connect to the vsock socket");
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let (req, _) = self.expect(OP_REQUEST);
        assert_eq!(
            (req.src_cid, req.dst_cid, req.dst_port, req.type_),
            (HOST_CID, CID, port, TYPE_STREAM)
        );
        assert!(req.src_port >= 1 << 30, "local port {}", req.src_port);
        let mut resp = reply(&req, OP_RESPONSE);
        resp.buf_alloc = buf_alloc;
        self.send(&resp, &[]);
        assert_eq!(read_line(&mut s), format!("OK {}\n", req.src_port));
        (s, req)
    }
}

pub fn ro(addr: u64, len: u32) -> Buffer {
    Buffer {
        addr,
        len,
        writable: false,
    }
}

pub fn rw(addr: u64, len: u32) -> Buffer {
    Buffer {
        addr,
        len,
        writable: true,
    }
}

/// A guest packet from `src_port` to host port `dst_port`.
pub fn guest_header(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: GUEST_BUF_ALLOC,
        fwd_cnt: 0,
    }
}

/// The guest's answer on the stream a device packet belongs to.
pub fn reply(to: &Header, op: u16) -> Header {
    guest_header(op, to.dst_port, to.src_port)
}

/// Reads up to a newline (one byte at a time, so nothing after it is taken).
pub fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 {
        match s.read(&mut b) {
            Ok(1) => {
                line.push(b[0]);
                if b[0] == b'\n' {
                    break;
                }
            }
            _ => break,
        }
    }
    String::from_utf8_lossy(&line).into_owned()
}

/// Whether the peer closed the stream (read gives end of file or a reset) within `WAIT`.
pub fn closed(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// `n` bytes of a pattern that shows misordering.
pub fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect()
}
