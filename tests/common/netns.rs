//! Network namespaces for tests: made with `ip netns`, entered by one thread at a time with
//! setns, deleted on drop. The host's own networks are never touched.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// A fresh namespace, or None (with the reason) when this host cannot make one.
    pub fn new(tag: &str) -> Result<Self, String> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("keel-{tag}-{}-{n}", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .map_err(|e| format!("ip: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "ip netns add: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self { name })
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        // nsenter, not `ip netns exec`: that remounts /sys, which hides the cgroup
        // hierarchies a jailed VMM needs.
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", self.name))
            .arg(program);
        cmd
    }

    /// Moves the calling thread into the namespace.
    pub fn enter(&self) {
        let path = format!("/var/run/netns/{}", self.name);
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns with an open namespace fd; affects only this thread.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn check(r: libc::c_int, what: &str) -> Result<(), String> {
    if r < 0 {
        Err(format!("{what}: {}", std::io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

/// Brings interface `name` up and opens a packet socket on it (in this thread's namespace).
/// Fails if the interface does not exist (yet).
pub fn packet_socket(name: &str) -> Result<OwnedFd, String> {
    // SAFETY: plain socket and ioctl calls on fds this function owns, with a zeroed ifreq.
    unsafe {
        let ctl = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        check(ctl, "control socket")?;
        let ctl = OwnedFd::from_raw_fd(ctl);
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        check(
            libc::ioctl(ctl.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req),
            "get flags",
        )?;
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        check(
            libc::ioctl(ctl.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req),
            "set up",
        )?;
        check(
            libc::ioctl(ctl.as_raw_fd(), libc::SIOCGIFINDEX, &mut req),
            "ifindex",
        )?;
        let index = req.ifr_ifru.ifru_ifindex;
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from((libc::ETH_P_ALL as u16).to_be()),
        );
        check(fd, "packet socket")?;
        let fd = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = index;
        let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        check(
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                len,
            ),
            "bind",
        )?;
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        let tv_len = std::mem::size_of::<libc::timeval>() as u32;
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            tv_len,
        );
        Ok(fd)
    }
}

/// The probe's `probe.net_echo` frames carry this EtherType.
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];

/// Echoes the probe's frames (payload "KEEL-PROBE i") back as "KEEL-ECHO i" until `stop`.
pub fn echo_frames(ns: &NetNs, tap: &str, stop: &AtomicBool) -> usize {
    ns.enter();
    let start = Instant::now();
    let sock = loop {
        match packet_socket(tap) {
            Ok(s) => break s,
            Err(_)
                if start.elapsed() < Duration::from_secs(30) && !stop.load(Ordering::Acquire) =>
            {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("tap {tap} never appeared: {e}"),
        }
    };
    let mut echoed = 0;
    while !stop.load(Ordering::Acquire) {
        let mut buf = [0u8; 2048];
        // SAFETY: recv into a live buffer of the given length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 14 || buf[12..14] != ETHERTYPE || !buf[14..n as usize].starts_with(b"KEEL-PROBE ") {
            continue;
        }
        let frame = &buf[..n as usize];
        let mut reply = Vec::with_capacity(frame.len());
        reply.extend_from_slice(&frame[6..12]);
        reply.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
        reply.extend_from_slice(&ETHERTYPE);
        reply.extend_from_slice(b"KEEL-ECHO ");
        reply.extend_from_slice(&frame[14 + b"KEEL-PROBE ".len()..]);
        // SAFETY: send from a live buffer of the given length.
        let sent = unsafe { libc::send(sock.as_raw_fd(), reply.as_ptr().cast(), reply.len(), 0) };
        if sent == reply.len() as isize {
            echoed += 1;
        }
    }
    echoed
}
