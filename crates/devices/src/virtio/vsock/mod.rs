//! virtio-vsock with the host side on Unix sockets ("hybrid vsock"): guest stream sockets
//! reach host programs without a host vsock driver.
//!
//! - Host to guest: the VMM listens on the configured path. A host program connects, writes
//!   `CONNECT <port>\n`, and gets `OK <local port>\n` once the guest accepted on that port;
//!   then bytes flow both ways. A refused or unanswered connection closes the Unix stream.
//! - Guest to host: a guest connecting to CID 2 port P reaches the Unix socket `PATH_P`, or
//!   gets RST if nothing listens there.
//!
//! Three queues (receive, transmit, event), config space the guest CID. Streams only. The
//! parser is in `packet`, flow control and shutdown per stream in `connection`, the
//! streams' sockets and events in `muxer`, the host's sockets in `unix`.

pub mod connection;
pub mod muxer;
pub mod packet;
#[cfg(test)]
mod tests;
pub mod unix;

use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use arch::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};

use self::muxer::Muxer;
use super::device::{
    read_config_bytes, DeviceError, VirtioDevice, TYPE_VSOCK, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};

pub use self::muxer::Counters;

pub const QUEUE_SIZE: u16 = 256;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
/// The device's one event source: its epoll set.
pub const EVENT_TOKEN: u32 = 0;

/// Setting up a vsock device failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vsock guest CID {0} is reserved or out of range: use a CID from 3 to 4294967294")]
    InvalidCid(u64),
    #[error(
        "vsock socket {0}: the path exists and is not a socket; remove it or choose another path"
    )]
    NotASocket(PathBuf),
    #[error(
        "vsock socket {0}: another process is listening on it; stop that VM or choose another path"
    )]
    InUse(PathBuf),
    #[error("vsock socket {path}: removing the stale socket file failed: {source}")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("vsock socket {path}: checking the path failed: {source}")]
    Inspect { path: PathBuf, source: io::Error },
    #[error("vsock socket {path}: listening failed (does the directory exist, is the path under 108 bytes?): {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("vsock: creating the {what} failed: {source}")]
    Setup {
        what: &'static str,
        source: io::Error,
    },
}

pub struct Vsock {
    cid: u64,
    config: [u8; 8],
    acked: u64,
    muxer: Muxer,
}

impl Vsock {
    /// A device for guest CID `cid`, listening for host programs on the Unix socket `socket`
    /// (a stale socket file there is replaced).
    pub fn new(cid: u64, socket: &Path) -> Result<Self, Error> {
        Self::with_listener(cid, socket, unix::listen(socket)?)
    }

    /// [`Vsock::new`] on a listener bound at `socket` already.
    pub fn with_listener(
        cid: u64,
        socket: &Path,
        listener: std::os::unix::net::UnixListener,
    ) -> Result<Self, Error> {
        // 0, 1 and 2 are the hypervisor, local and host addresses, -1 means any; the CID
        // travels in 32 bits in Linux's sockaddr_vm.
        if !(3..=u64::from(u32::MAX - 1)).contains(&cid) {
            return Err(Error::InvalidCid(cid));
        }
        Ok(Self {
            cid,
            config: cid.to_le_bytes(),
            acked: 0,
            muxer: Muxer::with_listener(cid, socket, listener)?,
        })
    }

    pub fn cid(&self) -> u64 {
        self.cid
    }

    pub fn socket_path(&self) -> &Path {
        self.muxer.path()
    }

    /// How long a host program has for its `CONNECT` line, the guest for its RESPONSE, and a
    /// closing stream for the other side (2 s by default).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.muxer.timeout = timeout;
    }

    pub fn counters(&self) -> Counters {
        self.muxer.counters
    }
}

fn queue_error(queue: usize) -> impl Fn(virtio_queue::Error) -> DeviceError {
    move |e| DeviceError::Queue {
        queue,
        reason: e.to_string(),
    }
}

impl VirtioDevice for Vsock {
    fn shutdown(&mut self) {
        self.muxer.remove_socket_file();
    }

    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, acked_features: u64) -> Result<(), DeviceError> {
        self.acked = acked_features;
        // Host programs may have connected before the driver was ready: look again.
        self.muxer.kick();
        Ok(())
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        match index {
            RX_QUEUE => self
                .muxer
                .deliver(queue, mem)
                .map_err(queue_error(RX_QUEUE)),
            TX_QUEUE => {
                let used = self
                    .muxer
                    .transmit(queue, mem)
                    .map_err(queue_error(TX_QUEUE))?;
                // Replies need the receive queue, which only an event gives us.
                if self.muxer.has_rx_work() {
                    self.muxer.kick();
                }
                Ok(used)
            }
            // Events (transport resets) are for migration, which this device does not do.
            _ => Ok(false),
        }
    }

    fn reset(&mut self) {
        self.acked = 0;
        self.muxer.reset();
    }

    fn event_sources(&self) -> Vec<(RawFd, u32)> {
        vec![(self.muxer.epoll_fd(), EVENT_TOKEN)]
    }

    fn process_event(
        &mut self,
        token: u32,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, DeviceError> {
        if token != EVENT_TOKEN {
            return Ok(0);
        }
        self.muxer.handle_events();
        let mut used = 0;
        if let Some(rx) = queues.get_mut(RX_QUEUE).filter(|q| q.ready()) {
            if self.muxer.deliver(rx, mem).map_err(queue_error(RX_QUEUE))? {
                used |= 1 << RX_QUEUE;
            }
        }
        self.muxer.rearm_timer();
        Ok(used)
    }
}
