//! The network side of the net workloads: a private network namespace with one persistent
//! tap that the VMMs attach to in turn, and a frame sender for `net_rx`. Nothing leaves the
//! namespace: the tap is its only interface besides `lo`, and no address is configured.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The tap's name inside the namespace.
pub const TAP: &str = "ke2e0";
/// Frames the sender puts on the tap: 14-byte Ethernet header and 1500 bytes of payload.
pub const FRAME_BYTES: usize = 1514;
/// EtherType the probe counts (IEEE local experimental 1).
pub const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
/// Frames per `sendmmsg`.
const BATCH: usize = 32;

/// A network namespace made with `ip netns add`, deleted (with its tap) on drop.
pub struct NetNs {
    pub name: String,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl NetNs {
    /// A fresh namespace holding the tap [`TAP`] (persistent, with a virtio-net header, up),
    /// IPv6 off so that the kernel sends nothing on it by itself.
    pub fn with_tap() -> Result<NetNs> {
        let name = format!("keel-e2e-{}", std::process::id());
        ip(&["netns", "add", &name]).context("making a network namespace (needs root)")?;
        let ns = NetNs { name };
        let exec = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns.name];
            all.extend_from_slice(args);
            ip(&all)
        };
        for key in ["all", "default"] {
            // Absent when the kernel has no IPv6: nothing to switch off then.
            let _ = exec(&[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{key}.disable_ipv6=1"),
            ]);
        }
        exec(&["ip", "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"])?;
        exec(&["ip", "link", "set", TAP, "up"])?;
        Ok(ns)
    }

    /// `program` run inside the namespace (nsenter execs it: same PID; not `ip netns
    /// exec`, which remounts /sys without the cgroup hierarchies a jailed VMM needs).
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", self.name))
            .arg(program);
        cmd
    }

    /// Moves the calling thread into the namespace.
    pub fn enter(&self) -> Result<()> {
        let path = format!("/var/run/netns/{}", self.name);
        let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        // SAFETY: setns with an open namespace file descriptor; it affects only this thread.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if r != 0 {
            bail!("setns into {path}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn check(r: libc::c_int, what: &str) -> Result<libc::c_int> {
    if r < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(r)
}

/// A packet socket bound to interface `name` (in this thread's namespace), for sending.
fn packet_socket(name: &str) -> Result<OwnedFd> {
    let cname = std::ffi::CString::new(name).context("interface name")?;
    // SAFETY: if_nametoindex reads a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        bail!("no interface {name}: {}", std::io::Error::last_os_error());
    }
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket creation; the descriptor is owned right away.
    let fd = unsafe {
        OwnedFd::from_raw_fd(check(
            libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)),
            "packet socket",
        )?)
    };
    // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
    let addr_ptr = (&addr as *const libc::sockaddr_ll).cast();
    // SAFETY: bind with a live sockaddr_ll of the given length.
    let r = unsafe { libc::bind(fd.as_raw_fd(), addr_ptr, len) };
    check(r, "binding the packet socket")?;
    Ok(fd)
}

/// The frame the sender repeats: broadcast, from a locally administered address, EtherType
/// [`ETHERTYPE`], a payload of a counting pattern.
pub fn frame() -> Vec<u8> {
    let mut f = Vec::with_capacity(FRAME_BYTES);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0xe2, 0xe0]);
    f.extend_from_slice(&ETHERTYPE);
    f.extend((0..FRAME_BYTES - 14).map(|i| i as u8));
    f
}

/// Once `go` is set, sends [`frame`]s on the tap as fast as it takes them, in batches, until
/// `stop` is set, `limit` frames are sent or `max_time` passed (from the call). Returns the
/// frames the kernel accepted (the tap drops what its queue cannot hold; the guest counts
/// what arrives). Runs in the calling thread, which must be in the namespace.
pub fn send_frames(
    go: &AtomicBool,
    stop: &AtomicBool,
    limit: u64,
    max_time: Duration,
) -> Result<u64> {
    let sock = packet_socket(TAP)?;
    let started = Instant::now();
    while !go.load(Ordering::Acquire) {
        if stop.load(Ordering::Acquire) || started.elapsed() >= max_time {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    let frame = frame();
    let mut iov = [libc::iovec {
        iov_base: frame.as_ptr() as *mut libc::c_void,
        iov_len: frame.len(),
    }];
    // SAFETY: an all-zero mmsghdr is valid (no name, no control data); the iovec is set below.
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for m in msgs.iter_mut() {
        m.msg_hdr.msg_iov = iov.as_mut_ptr();
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut sent = 0u64;
    while !stop.load(Ordering::Acquire) && sent < limit && started.elapsed() < max_time {
        let n = (limit - sent).min(BATCH as u64) as u32;
        // SAFETY: n <= BATCH headers, each pointing at the one live iovec over `frame`,
        // which outlives the call; the kernel only reads them.
        let r = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), n, 0) };
        if r > 0 {
            sent += r as u64;
        } else {
            // ENOBUFS and the like: the queue is full; let the VMM catch up.
            std::thread::yield_now();
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frame_is_what_the_probe_counts() {
        let f = frame();
        assert_eq!(f.len(), FRAME_BYTES);
        assert_eq!(&f[..6], &[0xff; 6]);
        assert_eq!(f[6] & 0x03, 0x02, "unicast, locally administered source");
        assert_eq!(f[12..14], ETHERTYPE);
    }
}
