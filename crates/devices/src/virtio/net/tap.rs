//! A tap device opened with a virtio-net header (IFF_VNET_HDR), so frames go between the
//! guest's buffers and the tap, header included, without a copy through the VMM.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;

/// Linux's `struct ifreq`, reduced to the name and the flags member of its union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tap name '{0}' is empty or longer than 15 bytes")]
    BadName(String),
    #[error("opening /dev/net/tun failed: {0}; is the tun module loaded and are you root (CAP_NET_ADMIN)?")]
    OpenTun(io::Error),
    #[error("attaching to tap '{name}' failed: {source}; create it first (ip tuntap add {name} mode tap vnet_hdr) or run as root")]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("setting the virtio-net header size on tap '{name}' failed: {source}")]
    HeaderSize {
        name: String,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn ioctl_int(fd: RawFd, request: libc::c_ulong, value: libc::c_int) -> io::Result<()> {
    // SAFETY: these tun ioctls take their argument by value (offloads) or by pointer to an
    // int that lives across the call (header size).
    let r = unsafe {
        if request == TUNSETVNETHDRSZ {
            libc::ioctl(fd, request, &value as *const libc::c_int)
        } else {
            libc::ioctl(fd, request, value as libc::c_ulong)
        }
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Tap {
    /// A tap descriptor another VMM attached and handed over (an upgrade): it keeps its
    /// attachment, header size and flags.
    pub fn from_attached(file: File, name: &str) -> Self {
        Self {
            file,
            name: name.to_string(),
        }
    }

    /// Attaches to (or creates) the tap `name`, non-blocking, with a 12-byte virtio-net
    /// header on every frame.
    pub fn open(name: &str, vnet_hdr_len: usize) -> Result<Self, Error> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(Error::BadName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(Error::OpenTun)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is, for the call only.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if r < 0 {
            return Err(Error::Attach {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        ioctl_int(
            file.as_raw_fd(),
            TUNSETVNETHDRSZ,
            vnet_hdr_len as libc::c_int,
        )
        .map_err(|source| Error::HeaderSize {
            name: name.to_string(),
            source,
        })?;
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    /// A second handle on the same tap queue (a dup of its descriptor), for a new device on
    /// a tap that stays (the net_device fuzz target makes one device per run).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the tap which offloads the guest accepts on received frames.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        ioctl_int(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_int)
    }

    /// One frame into the iovecs; Ok(None) when no frame is waiting.
    pub fn read_frame(&self, iov: &[libc::iovec]) -> io::Result<Option<usize>> {
        // SAFETY: the iovecs point at live buffers of their lengths (the caller's duty).
        let n = unsafe { libc::readv(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(n as usize))
    }

    /// One frame out of the iovecs.
    pub fn write_frame(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the iovecs point at live buffers of their lengths (the caller's duty).
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
