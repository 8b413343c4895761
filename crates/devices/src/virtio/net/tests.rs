//! virtio-net against a real tap, inside a network namespace the test makes on its own thread
//! (so nothing touches the host's networks): frames from the guest reach a packet socket on
//! the tap, frames sent on the tap reach the guest.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::tap::Tap;
use super::{mac_for, Net, RX_QUEUE, TX_QUEUE};
use crate::rate_limiter::RateLimiter;
use crate::virtio::driver::{Buffer, Driver, DATA_START};
use crate::virtio::mmio::STATUS_DRIVER_OK;

/// A local experimental EtherType: only the test's own frames carry it.
const ETHERTYPE: u16 = 0x88b5;
const TAP: &str = "keeltest0";

fn check(r: libc::c_int, what: &str) {
    assert!(r >= 0, "{what}: {}", std::io::Error::last_os_error());
}

/// Brings the tap up and opens a packet socket on it (in the current thread's netns).
fn packet_socket(name: &str) -> OwnedFd {
    // SAFETY: plain socket and ioctl calls on fds this function owns, with a zeroed ifreq.
    unsafe {
        let ctl = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        check(ctl, "control socket");
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        check(libc::ioctl(ctl, libc::SIOCGIFFLAGS, &mut req), "get flags");
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        check(libc::ioctl(ctl, libc::SIOCSIFFLAGS, &mut req), "set up");
        check(libc::ioctl(ctl, libc::SIOCGIFINDEX, &mut req), "ifindex");
        let index = req.ifr_ifru.ifru_ifindex;
        libc::close(ctl);
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from((libc::ETH_P_ALL as u16).to_be()),
        );
        check(fd, "packet socket");
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = index;
        check(
            libc::bind(
                fd,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            ),
            "bind",
        );
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
        OwnedFd::from_raw_fd(fd)
    }
}

fn frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Next frame with the test's EtherType on the socket, within the socket's timeout.
fn receive_test_frame(sock: &OwnedFd) -> Option<Vec<u8>> {
    for _ in 0..64 {
        let mut buf = vec![0u8; 2048];
        // SAFETY: recv into a buffer of the given length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return None;
        }
        buf.truncate(n as usize);
        if buf.len() >= 14 && buf[12..14] == ETHERTYPE.to_be_bytes() {
            return Some(buf);
        }
    }
    None
}

#[test]
fn frames_flow_both_ways_through_a_real_tap() {
    let outcome = std::thread::spawn(|| {
        // SAFETY: moves only this thread into a new network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "unshare(CLONE_NEWNET): {}",
                std::io::Error::last_os_error()
            ));
        }
        let tap = Tap::open(TAP, super::TAP_VNET_HDR_LEN).map_err(|e| e.to_string())?;
        let sock = packet_socket(TAP);
        let mac = mac_for(TAP);
        let mut d = Driver::new(
            Box::new(Net::new(
                tap,
                mac,
                RateLimiter::new(&Default::default()).unwrap(),
            )),
            4 << 20,
        );
        assert_ne!(d.init(0, 64) & STATUS_DRIVER_OK, 0);
        let mut cfg = [0u8; 6];
        d.transport.read(0x100, &mut cfg);
        assert_eq!(cfg, mac);

        // Guest -> tap: a 12-byte zero header (no offloads) and the frame, in two buffers.
        let out = frame([0xff; 6], mac, b"keel guest to host");
        d.mem
            .write_slice(&[0u8; 12], GuestAddress(DATA_START))
            .unwrap();
        d.mem
            .write_slice(&out, GuestAddress(DATA_START + 0x100))
            .unwrap();
        d.submit(
            TX_QUEUE,
            &[
                Buffer {
                    addr: DATA_START,
                    len: 12,
                    writable: false,
                },
                Buffer {
                    addr: DATA_START + 0x100,
                    len: out.len() as u32,
                    writable: false,
                },
            ],
        );
        d.process(TX_QUEUE);
        assert_eq!(d.used(TX_QUEUE).len(), 1);
        assert_eq!(
            receive_test_frame(&sock).as_deref(),
            Some(out.as_slice()),
            "frame reached the tap"
        );

        // Tap -> guest: give the guest a receive buffer, send on the tap, fire the tap event.
        d.submit(
            RX_QUEUE,
            &[Buffer {
                addr: DATA_START + 0x1000,
                len: 2048,
                writable: true,
            }],
        );
        d.process(RX_QUEUE);
        let inbound = frame(mac, [0x02, 0, 0, 0, 0, 1], b"keel host to guest");
        // SAFETY: send from a live buffer of the given length.
        let sent =
            unsafe { libc::send(sock.as_raw_fd(), inbound.as_ptr().cast(), inbound.len(), 0) };
        assert_eq!(sent, inbound.len() as isize);
        let mut got = None;
        for _ in 0..200 {
            d.transport.process_event(0);
            for (_, len) in d.used(RX_QUEUE) {
                let mut buf = vec![0u8; len as usize];
                d.mem
                    .read_slice(&mut buf, GuestAddress(DATA_START + 0x1000))
                    .unwrap();
                if buf.len() >= 26 && buf[24..26] == ETHERTYPE.to_be_bytes() {
                    got = Some(buf[12..].to_vec());
                } else {
                    // Something else the kernel sent (IPv6 neighbour discovery): re-offer.
                    d.submit(
                        RX_QUEUE,
                        &[Buffer {
                            addr: DATA_START + 0x1000,
                            len: 2048,
                            writable: true,
                        }],
                    );
                }
            }
            if got.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            got.as_deref(),
            Some(inbound.as_slice()),
            "frame reached the guest"
        );

        // A malformed transmit chain (writable buffer, short header) is dropped, not fatal.
        d.submit(
            TX_QUEUE,
            &[Buffer {
                addr: DATA_START,
                len: 4,
                writable: true,
            }],
        );
        d.process(TX_QUEUE);
        assert_eq!(d.used(TX_QUEUE).len(), 1);
        Ok(())
    })
    .join()
    .expect("net test thread");
    if let Err(why) = outcome {
        // CI (KEEL_REQUIRE_KVM=1) runs as root: there this is a failure, not a skip.
        assert_ne!(
            std::env::var("KEEL_REQUIRE_KVM").as_deref(),
            Ok("1"),
            "{why}"
        );
        eprintln!("SKIPPED frames_flow_both_ways_through_a_real_tap: needs root for a network namespace and a tap ({why})");
    }
}
