//! What every virtio device implements; the transport owns the queues and the status
//! state machine, the device owns what it does with requests.

use std::os::fd::RawFd;
use std::sync::Arc;

use arch::GuestMemoryMmap;
use virtio_queue::Queue;

/// `VIRTIO_F_VERSION_1`: Keel's devices are modern (virtio 1.x) only.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_EVENT_IDX` as a feature mask: used/avail event indexes.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Device types (virtio 1.2, section 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;

/// A device-level failure: the transport answers it with DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("queue {queue}: {reason}")]
    Queue { queue: usize, reason: String },
    #[error("activating the device failed: {0}")]
    Activate(String),
    #[error("quiescing the device failed: {0}")]
    Settle(String),
    #[error("restoring the device failed: {0}")]
    Restore(String),
    #[error("switching the disk failed: {0}")]
    Switch(String),
}

impl DeviceError {
    /// A virtio-queue failure on queue `queue`.
    pub fn queue(queue: usize, e: virtio_queue::Error) -> Self {
        DeviceError::Queue {
            queue,
            reason: e.to_string(),
        }
    }
}

pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Largest size of each queue; their count is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver (including [`VIRTIO_F_VERSION_1`]).
    fn device_features(&self) -> u64;
    /// Reads device configuration space; bytes beyond it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space; most devices ignore this.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK with these features.
    fn activate(&mut self, acked_features: u64) -> Result<(), DeviceError>;
    /// Serves what the driver made available on queue `index`; returns true when it put
    /// something in the used ring (the driver may need an interrupt).
    ///
    /// The transport has turned the driver's notifications for the queue off. The device
    /// either drains the ring with [`super::chain::pop`] or [`super::chain::next_chain`] until
    /// it returns None (which turns them back on), or stops early only while something else
    /// will call it back to go on (its rate limiter's timer, a completion, a readable tap,
    /// its own event source): no kick comes meanwhile. A queue the device never serves may be
    /// left alone; its driver just stops kicking it.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError>;
    /// Back to the state before activation (the driver wrote 0 to status).
    fn reset(&mut self);

    /// The VM is pausing: finish every request already taken, with its answer in the used
    /// ring, and take none. Returns a bit mask of the queues that got used entries. The
    /// transport calls no other method until the pause ends, then serves every queue and
    /// event source once (their notifications may have come and gone meanwhile).
    fn quiesce(
        &mut self,
        _queues: &mut [Queue],
        _mem: &GuestMemoryMmap,
    ) -> Result<u64, DeviceError> {
        Ok(0)
    }

    /// What the device keeps beyond its transport and queues, for a snapshot (plain data:
    /// no descriptor, path or instant). Most devices keep nothing.
    fn save_state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// Takes back what [`Self::save_state`] gave, before the transport re-activates the
    /// device. It came from a file: anything it does not expect is refused.
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), DeviceError> {
        if state.is_null() {
            Ok(())
        } else {
            Err(DeviceError::Restore(format!(
                "this device keeps no state, but the snapshot has {state}"
            )))
        }
    }

    /// Descriptors another VMM needs to take this device over and cannot open itself (a
    /// tap admits one holder), in a fixed order.
    fn handover_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }

    /// Tells the network the guest is here now (it moved to another host): a network
    /// device sends a broadcast frame from the guest's MAC, so that switches learn its new
    /// port. Whether it sent one.
    fn announce(&self) -> std::io::Result<bool> {
        Ok(false)
    }

    /// Serves `image` from now on in place of the disk's present one (a snapshot started an
    /// overlay on it), the VM paused and the device quiet; returns the image it served. Only
    /// a block device has one; the new image must be as large and as writable.
    fn switch_disk(&mut self, image: Arc<disk::Image>) -> Result<Arc<disk::Image>, DeviceError> {
        drop(image);
        Err(DeviceError::Switch("this device has no disk".into()))
    }

    /// The VMM is exiting: release what outlives the process (socket files). The process
    /// exits without dropping devices that vCPU threads still reference.
    fn shutdown(&mut self) {}

    /// File descriptors to watch besides the queue notifications (a tap, a socket), each
    /// with a token; the event loop watches them edge-triggered.
    fn event_sources(&self) -> Vec<(RawFd, u32)> {
        Vec::new()
    }

    /// Event source `token` fired. Returns a bit mask of the queues that got used entries.
    fn process_event(
        &mut self,
        _token: u32,
        _queues: &mut [Queue],
        _mem: &GuestMemoryMmap,
    ) -> Result<u64, DeviceError> {
        Ok(0)
    }
}

/// Copies `len` bytes of a little-endian config structure at `offset` into `data`; what lies
/// outside reads as zero, so a driver's out-of-range read is harmless.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let end = config.len().min(start.saturating_add(data.len()));
    data[..end - start].copy_from_slice(&config[start..end]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_clamped() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, 100, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
