//! Fuzz target: the virtio-net device as a whole, on a real tap in a network namespace of
//! its own (made once per process; needs root): feature negotiation, transmit chains the
//! guest makes (any descriptors), receive buffers it offers, frames the host sends into
//! the tap, rate limits, resets and the event loop's serving of tap and timer. Besides "no
//! panic, no hang": every used entry names a chain the driver has outstanding, once; a
//! receive entry's length is at most the chain's writable bytes.
//!
//! Input: `features: u8` (bit 0: the device's checksum and TSO offers accepted, bit 1: a
//! rate limit of 1 MB/s), then operations, each `op: u8` then its arguments: `op % 5` 0: a
//! transmit chain (`keel_fuzz::descriptors`, at most 8) and a notification, 1: a receive
//! chain and a notification, 2: a frame from the host (`len: u16` at most 1600, its
//! bytes), 3: serve the event loop once, 4: reset and bring the device up again.

#![no_main]

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;
use std::time::Duration;

use devices::rate_limiter::{RateLimitConfig, RateLimiter};
use devices::virtio::mmio::REG_STATUS;
use devices::virtio::net::tap::Tap;
use devices::virtio::net::{Net, TAP_VNET_HDR_LEN};
use keel_fuzz::{Buffer, Driver, Encoder, Input, Seed, ADDR_DATA, MEM_SIZE, WRITABLE};

libfuzzer_sys::fuzz_target!(
    init: keel_fuzz::write_seeds("net_device", seeds, run),
    |data: &[u8]| {
        run(data);
    }
);

const TAP: &str = "kfz0";
const RX: usize = 0;
const TX: usize = 1;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const OFFLOADS: u64 = (1 << 0) | (1 << 7) | (1 << 8) | (1 << 11) | (1 << 12);

/// Moves this process into a network namespace of its own, once: the tap made there is
/// seen by nothing else on the host.
fn private_network() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        // SAFETY: unshare takes flags only.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "net_device: cannot make a network namespace ({}); this target needs root",
                std::io::Error::last_os_error()
            );
            std::process::exit(1);
        }
        // No IPv6 in it: the kernel would send its own frames (router solicitations, MLD)
        // into the tap as it comes up, and a seed's outcome would depend on their timing.
        for conf in ["all", "default"] {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1");
        }
    });
}

/// Sets the tap up and opens a packet socket on it, through which the host sends frames.
fn host_side() -> Option<OwnedFd> {
    // SAFETY: socket takes plain integers.
    let ctl = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if ctl < 0 {
        return None;
    }
    // SAFETY: the descriptor was just made and is owned here.
    let ctl = unsafe { OwnedFd::from_raw_fd(ctl) };
    // SAFETY: ifreq is plain data.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(TAP.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads an ifreq, valid for the call.
    unsafe { libc::ioctl(ctl.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    let name = std::ffi::CString::new(TAP).ok()?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket takes plain integers.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            i32::from(proto),
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: the descriptor was just made and is owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    // SAFETY: bind reads a sockaddr_ll of the given size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    (r == 0).then_some(fd)
}

/// The tap (made once: making and removing a network device takes tens of milliseconds)
/// and the host's packet socket on it.
fn tap() -> &'static (Tap, Option<OwnedFd>) {
    static TAP_AND_HOST: OnceLock<(Tap, Option<OwnedFd>)> = OnceLock::new();
    TAP_AND_HOST.get_or_init(|| {
        let tap = Tap::open(TAP, TAP_VNET_HDR_LEN).expect("a tap in the private namespace");
        (tap, host_side())
    })
}

/// What the run saw: used entries on the receive and transmit queues.
#[derive(Debug, PartialEq)]
struct Outcome {
    rx_used: usize,
    tx_used: usize,
}

fn up(d: &mut Driver, features: u64) {
    let offered = d.device_features();
    d.init(offered & (VIRTIO_F_VERSION_1 | features), 256);
}

fn run(data: &[u8]) -> Outcome {
    private_network();
    let mut input = Input::new(data);
    let flags = input.u8();
    let features = if flags & 1 != 0 { OFFLOADS } else { 0 };
    let limits: RateLimitConfig = if flags & 2 != 0 {
        "bw=1M".parse().expect("a valid limit")
    } else {
        RateLimitConfig::default()
    };
    let (tap, host) = tap();
    // Frames an earlier run left in the tap are not this run's.
    let mut scratch = [0u8; 2048];
    // SAFETY: reads into a live buffer of its length from the tap, which is non-blocking.
    while unsafe { libc::read(tap.as_raw_fd(), scratch.as_mut_ptr().cast(), scratch.len()) } > 0 {}
    let tap = tap.try_clone().expect("a second handle on the tap");
    let net = Net::new(
        tap,
        [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        RateLimiter::new(&limits).expect("limiter"),
    );
    let mut d = Driver::new(Box::new(net), MEM_SIZE as usize);
    up(&mut d, features);
    // Outstanding chains: head -> writable bytes (receive) or 0 (transmit), per queue.
    let mut outstanding: [HashMap<u16, u64>; 2] = [HashMap::new(), HashMap::new()];
    let mut outcome = Outcome {
        rx_used: 0,
        tx_used: 0,
    };
    for _ in 0..256 {
        if input.is_empty() {
            break;
        }
        match input.u8() % 5 {
            q @ (0 | 1) => {
                let queue = if q == 0 { TX } else { RX };
                let descs = keel_fuzz::descriptors(&mut input, 8);
                if descs.is_empty() {
                    continue;
                }
                let buffers: Vec<Buffer> = keel_fuzz::buffers(&descs);
                let writable: u64 = descs
                    .iter()
                    .filter(|d| d.device_writable)
                    .map(|d| u64::from(d.len))
                    .sum();
                let head = d.submit(queue, &buffers);
                outstanding[queue].insert(head, writable);
                d.process(queue);
            }
            2 => {
                let len = usize::from(input.u16() % 1601);
                let frame = input.bytes(len);
                if let Some(host) = host {
                    // SAFETY: send from a live buffer of the given length.
                    unsafe { libc::send(host.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
                }
            }
            3 => {
                keel_fuzz::serve_events(&mut d, Duration::ZERO);
            }
            _ => {
                d.write_reg(REG_STATUS, 0);
                outstanding = [HashMap::new(), HashMap::new()];
                up(&mut d, features);
            }
        }
        for queue in [RX, TX] {
            for (id, len) in d.used(queue) {
                let head = id as u16;
                let writable = outstanding[queue]
                    .remove(&head)
                    .unwrap_or_else(|| panic!("queue {queue}: used entry {head} not outstanding"));
                assert!(
                    u64::from(len) <= writable,
                    "queue {queue}: used {len} > writable {writable}"
                );
                if queue == RX {
                    outcome.rx_used += 1;
                } else {
                    outcome.tx_used += 1;
                }
            }
        }
    }
    outcome
}

fn seeds() -> Vec<Seed<Outcome>> {
    // A frame sent by the guest: 12-byte header and a 60-byte frame in one buffer.
    let mut tx = Encoder::new();
    tx.u8(1).u8(0);
    keel_fuzz::encode_descriptors(&mut tx, &[(ADDR_DATA, 0, 72)]);
    // A receive buffer, then a frame from the host into it, then the event loop.
    let mut rx = Encoder::new();
    rx.u8(0).u8(1);
    keel_fuzz::encode_descriptors(&mut rx, &[(ADDR_DATA | WRITABLE, 0x1000, 1526)]);
    rx.u8(2)
        .u16(60)
        .bytes(&[0xff; 6])
        .bytes(&[0x02, 0, 0, 0, 0, 1])
        .bytes(&[0x88, 0xb5])
        .bytes(&[0x42; 46]);
    rx.u8(3);
    // A reset with a chain outstanding.
    let mut reset = Encoder::new();
    reset.u8(2).u8(1);
    keel_fuzz::encode_descriptors(&mut reset, &[(ADDR_DATA | WRITABLE, 0x2000, 1526)]);
    reset.u8(4);
    vec![
        Seed {
            name: "transmit_one_frame",
            input: tx.finish(),
            expect: Outcome {
                rx_used: 0,
                tx_used: 1,
            },
        },
        Seed {
            name: "receive_one_frame",
            input: rx.finish(),
            expect: Outcome {
                rx_used: 1,
                tx_used: 0,
            },
        },
        Seed {
            name: "reset_with_a_buffer_out",
            input: reset.finish(),
            expect: Outcome {
                rx_used: 0,
                tx_used: 0,
            },
        },
    ]
}
