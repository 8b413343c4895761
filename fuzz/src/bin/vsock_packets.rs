//! Fuzz target: virtio-vsock, driven as a guest and as host programs at once. The guest sends
//! packets (any header, with fix-ups that keep most of them addressed to the host so the
//! connection state machine is reached; payload in its own descriptor, after the header or
//! missing) and raw transmit chains, and posts receive buffers of any size; host programs
//! connect with `CONNECT <port>` lines, accept the guest's connections on port 1024, write,
//! read and close; the device's event source is served in between. Nothing may panic: every
//! transmit chain comes back as one used entry with the device still serving, and no receive
//! buffer is reported fuller than it is.
//!
//! Input: `flags: u8` (bit 0: negotiate EVENT_IDX), then records by `op % 8`:
//! 0 packet `fix: u8, op: u8, header: [u8; 44], n: u16, payload: [u8; n % 4097]` (`fix` bits
//! 0-4 keep the header's own src_cid, dst_cid, type, dst_port, len instead of the guest CID,
//! the host CID, STREAM, 1024 and the payload length; bits 5-6: payload in a second
//! descriptor, in the header's, none, or a second one; a non-zero `op % 8` replaces the
//! header's op); 1 raw transmit chain (up to 4 descriptors as `keel_fuzz::descriptors` reads
//! them); 2 post `n % 9` receive buffers of `size: u16` bytes; 3 serve the event source;
//! 4 accept the guest's connections on the host and write `len: u8` bytes to stream `i: u8`;
//! 5 close host stream `i: u8`; 6 connect a host program with `CONNECT <1024 + port % 4>`;
//! 7 read what the host streams have.

#![no_main]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::OnceLock;

use devices::virtio::driver::{Buffer, Driver, DATA_START};
use devices::virtio::mmio::{STATUS_DRIVER_OK, STATUS_NEEDS_RESET};
use devices::virtio::vsock::packet::{
    Header, HOST_CID, OP_REQUEST, OP_RW, OP_SHUTDOWN, PKT_HEADER_SIZE, SHUTDOWN_BOTH, TYPE_STREAM,
};
use devices::virtio::vsock::unix::{connect, port_path};
use devices::virtio::vsock::{Vsock, EVENT_TOKEN, RX_QUEUE, TX_QUEUE};
use keel_fuzz::{Encoder, Input, Seed, VIRTIO_RING_F_EVENT_IDX};
use vm_memory::{Bytes, GuestAddress};

libfuzzer_sys::fuzz_target!(
    init: keel_fuzz::write_seeds("vsock_packets", seeds, run),
    |data: &[u8]| {
        run(data);
    }
);

const CID: u64 = 3;
/// A host program listens for the guest's connections on this port.
const PORT: u32 = 1024;
/// Receive buffers in 32 slots from the data area's start, transmit packets in 16 after them.
const SLOT: u64 = 0x2000;
const RX_SLOTS: u64 = 32;
const TX_BASE: u64 = DATA_START + RX_SLOTS * SLOT;
const TX_SLOTS: u64 = 16;
const HDR: u32 = PKT_HEADER_SIZE as u32;
const QUEUE_SIZE: u16 = 256;

const PACKET: u8 = 0;
const CHAIN: u8 = 1;
const POST_RX: u8 = 2;
const SERVE: u8 = 3;
const HOST_WRITE: u8 = 4;
const HOST_CLOSE: u8 = 5;
const HOST_CONNECT: u8 = 6;
const HOST_READ: u8 = 7;

/// The process's socket directory: the device's socket and the host program listening on
/// port 1024 beside it. Removed when the process exits.
struct Host {
    dir: PathBuf,
    sock: PathBuf,
    listener: UnixListener,
}

extern "C" fn remove_dir() {
    if let Some(h) = HOST.get() {
        let _ = std::fs::remove_dir_all(&h.dir);
    }
}

static HOST: OnceLock<Host> = OnceLock::new();

fn host() -> &'static Host {
    HOST.get_or_init(|| {
        // Short: socket paths must stay under 108 bytes.
        let dir = std::env::temp_dir().join(format!("kf-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("socket directory");
        let sock = dir.join("v.sock");
        let listener = UnixListener::bind(port_path(&sock, PORT)).expect("host listener");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        // SAFETY: registers a plain function without arguments; it only removes files.
        unsafe { libc::atexit(remove_dir) };
        Host {
            dir,
            sock,
            listener,
        }
    })
}

/// How many packets reached the guest's receive buffers, and how many bytes host programs
/// read.
#[derive(Debug, PartialEq)]
struct Outcome {
    rx_packets: usize,
    host_read: usize,
}

struct Run {
    d: Driver,
    /// Receive buffers posted and not yet used: head, length.
    rx_posted: HashMap<u32, u32>,
    rx_next: u64,
    tx_next: u64,
    streams: Vec<UnixStream>,
    outcome: Outcome,
}

impl Run {
    fn transmit(&mut self, chain: &[Buffer], checked: bool) {
        // A raw chain may have broken a ring before (DEVICE_NEEDS_RESET): then nothing is
        // served, rightly.
        let serving = self.d.status() & STATUS_NEEDS_RESET == 0;
        self.d.submit(TX_QUEUE, chain);
        self.d.process(TX_QUEUE);
        let used = self.d.used(TX_QUEUE);
        if checked && serving {
            assert_eq!(used.len(), 1, "one used entry per transmit chain");
            assert_eq!(self.d.status() & STATUS_NEEDS_RESET, 0, "still serving");
        }
    }

    fn collect(&mut self) {
        for (head, len) in self.d.used(RX_QUEUE) {
            if let Some(size) = self.rx_posted.remove(&head) {
                assert!(len <= size, "used length {len} of a {size}-byte buffer");
            }
            if len > 0 {
                self.outcome.rx_packets += 1;
            }
        }
    }

    fn post_rx(&mut self, n: u8, size: u16) {
        for _ in 0..n {
            // A driver keeps no more buffers out than the ring holds.
            if self.rx_posted.len() >= usize::from(QUEUE_SIZE) {
                break;
            }
            let addr = DATA_START + (self.rx_next % RX_SLOTS) * SLOT;
            self.rx_next += 1;
            let len = u32::from(size).min(SLOT as u32);
            let head = self.d.submit(
                RX_QUEUE,
                &[Buffer {
                    addr,
                    len,
                    writable: true,
                }],
            );
            self.rx_posted.insert(u32::from(head), len);
        }
        self.d.process(RX_QUEUE);
        self.collect();
    }

    fn serve(&mut self) {
        self.d.transport.process_event(EVENT_TOKEN);
        self.collect();
    }

    fn packet(&mut self, input: &mut Input) {
        let fix = input.u8();
        let op = input.u8() % 8;
        let mut raw = [0u8; PKT_HEADER_SIZE];
        let b = input.bytes(PKT_HEADER_SIZE);
        raw[..b.len()].copy_from_slice(b);
        let mut h = Header::from_bytes(&raw);
        let n = usize::from(input.u16()) % 4097;
        let payload = input.bytes(n);
        if fix & 1 == 0 {
            h.src_cid = CID;
        }
        if fix & 2 == 0 {
            h.dst_cid = HOST_CID;
        }
        if fix & 4 == 0 {
            h.type_ = TYPE_STREAM;
        }
        if fix & 8 == 0 {
            h.dst_port = PORT;
        }
        if fix & 16 == 0 {
            h.len = payload.len() as u32;
        }
        if op != 0 {
            h.op = u16::from(op);
        }
        let slot = TX_BASE + (self.tx_next % TX_SLOTS) * SLOT;
        self.tx_next += 1;
        let mem = &self.d.mem;
        mem.write_slice(&h.to_bytes(), GuestAddress(slot))
            .expect("transmit slot");
        let ro = |addr, len| Buffer {
            addr,
            len,
            writable: false,
        };
        let (data_at, chain) = match (fix >> 5) & 3 {
            1 => {
                let len = HDR + payload.len() as u32;
                (slot + u64::from(HDR), vec![ro(slot, len)])
            }
            2 => (slot + 0x100, vec![ro(slot, HDR)]),
            _ => {
                let chain = vec![ro(slot, HDR), ro(slot + 0x100, payload.len() as u32)];
                (slot + 0x100, chain)
            }
        };
        mem.write_slice(payload, GuestAddress(data_at))
            .expect("transmit slot");
        self.transmit(&chain, true);
    }

    fn chain(&mut self, input: &mut Input) {
        let descs = keel_fuzz::descriptors(input, 4);
        // Writable buffers over the rings may rewrite what the checks read back.
        let checked = !descs
            .iter()
            .any(|d| d.device_writable && d.len > 0 && d.addr < DATA_START);
        let chain: Vec<Buffer> = keel_fuzz::buffers(&descs);
        if !chain.is_empty() {
            self.transmit(&chain, checked);
        }
    }

    fn accept(&mut self) {
        while let Ok((s, _)) = host().listener.accept() {
            s.set_nonblocking(true).expect("non-blocking stream");
            self.streams.push(s);
        }
    }

    fn stream(&mut self, i: u8) -> Option<&mut UnixStream> {
        let n = self.streams.len();
        if n == 0 {
            return None;
        }
        self.streams.get_mut(usize::from(i) % n)
    }
}

fn run(data: &[u8]) -> Outcome {
    let h = host();
    // The guest's connections of earlier inputs are gone with their device.
    while h.listener.accept().is_ok() {}
    let mut input = Input::new(data);
    let flags = input.u8();
    let dev = Vsock::new(CID, &h.sock).expect("vsock device");
    let mut d = Driver::new(Box::new(dev), keel_fuzz::MEM_SIZE as usize);
    let features = if flags & 1 != 0 {
        VIRTIO_RING_F_EVENT_IDX
    } else {
        0
    };
    let status = d.init(features, QUEUE_SIZE);
    assert_ne!(status & STATUS_DRIVER_OK, 0, "status {status:#x}");
    let mut r = Run {
        d,
        rx_posted: HashMap::new(),
        rx_next: 0,
        tx_next: 0,
        streams: Vec::new(),
        outcome: Outcome {
            rx_packets: 0,
            host_read: 0,
        },
    };
    while !input.is_empty() {
        match input.u8() % 8 {
            PACKET => r.packet(&mut input),
            CHAIN => r.chain(&mut input),
            POST_RX => {
                let (n, size) = (input.u8() % 9, input.u16());
                r.post_rx(n, size);
            }
            SERVE => r.serve(),
            HOST_WRITE => {
                r.accept();
                let i = input.u8();
                let n = usize::from(input.u8());
                let bytes = input.bytes(n);
                if let Some(s) = r.stream(i) {
                    let _ = s.write(bytes);
                }
            }
            HOST_CLOSE => {
                let i = input.u8();
                if !r.streams.is_empty() {
                    let n = r.streams.len();
                    r.streams.remove(usize::from(i) % n);
                }
            }
            HOST_CONNECT => {
                let port = PORT + input.u32() % 4;
                if let Ok(mut s) = connect(&h.sock) {
                    let _ = s.write(format!("CONNECT {port}\n").as_bytes());
                    r.streams.push(s);
                }
            }
            _ => {
                let mut buf = [0u8; 4096];
                for s in &mut r.streams {
                    while let Ok(n @ 1..) = s.read(&mut buf) {
                        r.outcome.host_read += n;
                    }
                }
            }
        }
    }
    r.serve();
    r.outcome
}

// Seeds: a request nobody listens for, a connection to the host program with data both ways
// and a shutdown, and a host program connecting to the guest.

fn packet(e: &mut Encoder, op: u16, src_port: u32, flags: u32, payload: &[u8]) {
    let h = Header {
        src_port,
        flags,
        buf_alloc: 64 * 1024,
        ..Header::default()
    };
    e.u8(PACKET).u8(0).u8(op as u8).bytes(&h.to_bytes());
    e.u16(payload.len() as u16).bytes(payload);
}

fn post_rx(e: &mut Encoder, n: u8) {
    e.u8(POST_RX).u8(n).u16((HDR + 4096) as u16);
}

fn seeds() -> Vec<Seed<Outcome>> {
    let mut e = Encoder::new();

    // REQUEST to port 7: nobody listens there, the guest gets RST.
    e.u8(0);
    post_rx(&mut e, 4);
    e.u8(PACKET).u8(8).u8(OP_REQUEST as u8);
    let h = Header {
        src_port: 5000,
        dst_port: 7,
        ..Header::default()
    };
    e.bytes(&h.to_bytes()).u16(0);
    e.u8(SERVE);
    let refused = e.finish();

    // REQUEST to 1024, where the host program accepts: RESPONSE; then data both ways
    // (the host reads 5 bytes, the guest gets the host's 3 in a packet), and a full shutdown,
    // which the device completes with RST: three packets for the guest.
    e.u8(1);
    post_rx(&mut e, 8);
    packet(&mut e, OP_REQUEST, 5001, 0, &[]);
    e.u8(SERVE);
    e.u8(HOST_WRITE).u8(0).u8(3).bytes(b"hi\n");
    packet(&mut e, OP_RW, 5001, 0, b"hello");
    e.u8(SERVE).u8(HOST_READ);
    packet(&mut e, OP_SHUTDOWN, 5001, SHUTDOWN_BOTH, &[]);
    e.u8(SERVE);
    let stream = e.finish();

    // A host program connects to guest port 1024: the guest gets a REQUEST.
    e.u8(0);
    post_rx(&mut e, 2);
    e.u8(HOST_CONNECT).u32(0).u8(SERVE);
    let host_connect = e.finish();

    vec![
        Seed {
            name: "request_refused",
            input: refused,
            expect: Outcome {
                rx_packets: 1,
                host_read: 0,
            },
        },
        Seed {
            name: "stream_both_ways",
            input: stream,
            expect: Outcome {
                rx_packets: 3,
                host_read: 5,
            },
        },
        Seed {
            name: "host_connects",
            input: host_connect,
            expect: Outcome {
                rx_packets: 1,
                host_read: 0,
            },
        },
    ]
}
