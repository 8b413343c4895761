//! A virtio-mmio transport's state for snapshots: the status and features the driver
//! negotiated, its register selections, the pending interrupt bits, every queue, and what
//! the device itself keeps. Restoring is parsing hostile input: the queues are rebuilt only
//! through virtio-queue's checked conversion, then checked against guest memory, and the
//! status and features must be ones the transport could have reached.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::device::{DeviceError, VIRTIO_F_VERSION_1};
use super::mmio::{
    MmioTransport, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED,
    STATUS_FEATURES_OK, STATUS_NEEDS_RESET,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the snapshot's device is of type {saved}, this VM's is of type {here}")]
    DeviceType { saved: u32, here: u32 },
    #[error("the snapshot's device has {saved} queues, this VM's has {here}")]
    QueueCount { saved: usize, here: usize },
    #[error("queue {index}: {why}")]
    Queue { index: usize, why: String },
    #[error("status {status:#x} is not one the transport can be in")]
    Status { status: u32 },
    #[error("the driver's features {features:#x} are not a subset of the device's {offered:#x}")]
    Features { features: u64, offered: u64 },
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// virtio-queue's `QueueState`, as data that can be saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub status: u32,
    pub driver_features: u64,
    pub queue_select: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueueSnapshot>,
    /// What the device keeps beyond them ([`super::VirtioDevice::save_state`]).
    pub device: serde_json::Value,
}

const KNOWN_STATUS: u32 = STATUS_ACKNOWLEDGE
    | STATUS_DRIVER
    | STATUS_DRIVER_OK
    | STATUS_FEATURES_OK
    | STATUS_NEEDS_RESET
    | STATUS_FAILED;

impl MmioTransport {
    /// The transport's state; call it while the device is paused (nothing in flight).
    pub fn save(&self) -> TransportState {
        TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            interrupt_status: self.interrupt.status(),
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            device: self.device.save_state(),
        }
    }

    /// Puts a saved state into this fresh transport (of the same device). The device is
    /// left paused; resuming serves every queue once.
    pub fn restore(&mut self, saved: &TransportState) -> Result<(), Error> {
        let here = self.device.device_type();
        if saved.device_type != here {
            return Err(Error::DeviceType {
                saved: saved.device_type,
                here,
            });
        }
        if saved.queues.len() != self.queues.len() {
            return Err(Error::QueueCount {
                saved: saved.queues.len(),
                here: self.queues.len(),
            });
        }
        let activated = saved.status & STATUS_DRIVER_OK != 0;
        if saved.status & !KNOWN_STATUS != 0 || activated && saved.status & STATUS_FEATURES_OK == 0
        {
            return Err(Error::Status {
                status: saved.status,
            });
        }
        let offered = self.device.device_features();
        if saved.driver_features & !offered != 0
            || saved.status & STATUS_FEATURES_OK != 0
                && saved.driver_features & VIRTIO_F_VERSION_1 == 0
        {
            return Err(Error::Features {
                features: saved.driver_features,
                offered,
            });
        }
        let mut queues = Vec::with_capacity(saved.queues.len());
        for (index, (q, max)) in saved
            .queues
            .iter()
            .zip(self.device.queue_max_sizes())
            .enumerate()
        {
            let bad = |why: String| Error::Queue { index, why };
            if q.max_size != *max {
                return Err(bad(format!(
                    "its largest size is {} in the snapshot, {max} here",
                    q.max_size
                )));
            }
            let queue = Queue::try_from(QueueState::from(*q)).map_err(|e| bad(e.to_string()))?;
            if queue.ready() && activated && !queue.is_valid(&self.mem) {
                return Err(bad("its rings are not inside guest memory".into()));
            }
            queues.push(queue);
        }
        self.device.restore_state(&saved.device)?;
        self.queues = queues;
        self.status = saved.status;
        self.driver_features = saved.driver_features;
        self.queue_select = saved.queue_select;
        self.device_features_select = saved.device_features_select;
        self.driver_features_select = saved.driver_features_select;
        self.paused = true;
        if activated && saved.status & STATUS_NEEDS_RESET == 0 {
            if let Err(e) = self.device.activate(saved.driver_features) {
                return Err(Error::Device(e));
            }
        }
        self.interrupt.set_status(saved.interrupt_status);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limiter::{RateLimitConfig, RateLimiter};
    use crate::virtio::block::Block;
    use crate::virtio::driver::{Buffer, Driver, DATA_START};
    use crate::virtio::rng::Rng;
    use crate::virtio::VirtioDevice;

    fn block(tag: &str) -> Box<dyn VirtioDevice> {
        let path = std::env::temp_dir().join(format!("keel-persist-{}-{tag}", std::process::id()));
        std::fs::write(&path, vec![0u8; 64 * 1024]).unwrap();
        let disk = disk::RawDisk::open(&path, false).unwrap();
        let limiter = RateLimiter::new(&RateLimitConfig::default()).unwrap();
        let _ = std::fs::remove_file(&path);
        Box::new(Block::new(disk, "s", limiter))
    }

    /// A driven device: negotiated, a queue set up and a request served, so that indices and
    /// addresses are not their defaults.
    fn driven(device: Box<dyn VirtioDevice>) -> Driver {
        let mut d = Driver::new(device, 4 << 20);
        let features = d.device_features() & (VIRTIO_F_VERSION_1 | 1 << 29);
        d.init(features, 16);
        d.submit(
            0,
            &[Buffer {
                addr: DATA_START,
                len: 64,
                writable: true,
            }],
        );
        d.process(0);
        d
    }

    #[test]
    fn save_restore_save_is_equal_for_every_device_kind() {
        for (tag, make) in [
            ("block", (|| block("rt")) as fn() -> Box<dyn VirtioDevice>),
            ("rng", || Box::new(Rng)),
        ] {
            let d = driven(make());
            let saved = d.transport.save();
            let mut fresh = Driver::new(make(), 4 << 20);
            fresh.transport.restore(&saved).unwrap();
            assert_eq!(fresh.transport.save(), saved, "{tag}");
            assert!(
                fresh.transport.is_paused(),
                "{tag}: restored devices wait for resume"
            );
        }
    }

    #[test]
    fn hostile_states_are_refused_with_what_is_wrong() {
        let good = driven(Box::new(Rng)).transport.save();
        let refused = |change: &dyn Fn(&mut TransportState)| {
            let mut state = good.clone();
            change(&mut state);
            let mut fresh = Driver::new(Box::new(Rng), 4 << 20);
            fresh.transport.restore(&state).unwrap_err().to_string()
        };
        assert!(refused(&|s| s.device_type = 2).contains("type 2"));
        assert!(refused(&|s| s.queues.push(s.queues[0])).contains("queues"));
        assert!(refused(&|s| s.status |= 0x100).contains("status"));
        assert!(refused(&|s| s.status &= !STATUS_FEATURES_OK).contains("status"));
        assert!(refused(&|s| s.driver_features |= 1 << 40).contains("features"));
        assert!(refused(&|s| s.queues[0].size = 3).contains("queue 0"));
        assert!(refused(&|s| s.queues[0].max_size = 1024).contains("largest size"));
        assert!(refused(&|s| s.queues[0].desc_table = 1 << 40).contains("guest memory"));
        assert!(refused(&|s| s.queues[0].used_ring = 3).contains("queue 0"));
        assert!(refused(&|s| s.device = serde_json::json!({"x": 1})).contains("keeps no state"));
        let block_state = driven(block("hostile")).transport.save();
        let mut bad = block_state.clone();
        bad.device = serde_json::json!({"flush_failed": "yes"});
        let mut fresh = Driver::new(block("hostile2"), 4 << 20);
        assert!(fresh.transport.restore(&bad).is_err());
    }
}
