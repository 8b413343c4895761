//! The virtio-mmio transport (virtio 1.2 section 4.2, modern layout only). It owns the
//! device status state machine and the queues; every register access is checked against
//! the state the spec allows it in, and anything else is ignored or answered with
//! DEVICE_NEEDS_RESET, never a panic.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use arch::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::device::{DeviceError, VirtioDevice, VIRTIO_F_VERSION_1};

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4b45_454c; // "KEEL"

pub const REG_MAGIC: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_VENDOR_ID: u64 = 0x00c;
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
pub const CONFIG_SPACE: u64 = 0x100;

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

pub const INTERRUPT_USED_BUFFER: u32 = 1;
pub const INTERRUPT_CONFIG_CHANGE: u32 = 2;

/// The device's interrupt line: the status register the driver reads, and the irqfd.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    pub fn raise(&self, reason: u32) {
        self.status.fetch_or(reason, Ordering::AcqRel);
        // A full eventfd counter already means "interrupt pending": nothing is lost.
        let _ = self.irqfd.write(1);
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    pub(super) fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// A restored VM's pending bits: the guest's driver may not have seen them yet.
    pub(super) fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::Release);
        if bits != 0 {
            let _ = self.irqfd.write(1);
        }
    }

    fn clear(&self) {
        self.status.store(0, Ordering::Release);
    }
}

/// `VRING_AVAIL_F_NO_INTERRUPT` in the avail ring's flags.
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Whether the driver wants an interrupt for new used entries on `queue`: with EVENT_IDX, as
/// its used_event says; without, unless it set NO_INTERRUPT in the avail ring (virtio-queue
/// 0.18 does not look at that flag). When the check itself fails (rings outside memory),
/// interrupting is the safe answer.
fn wants_interrupt(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    if queue.event_idx_enabled() {
        return queue.needs_notification(mem).unwrap_or(true);
    }
    mem.read_obj::<u16>(GuestAddress(queue.avail_ring()))
        .map_or(true, |flags| flags & AVAIL_F_NO_INTERRUPT == 0)
}

pub struct MmioTransport {
    pub(super) device: Box<dyn VirtioDevice>,
    pub(super) mem: GuestMemoryMmap,
    pub(super) queues: Vec<Queue>,
    /// One notification eventfd per queue (KVM ioeventfds); QueueNotify writes that reach
    /// the VMM are forwarded to them so device work stays off the vCPU threads.
    queue_events: Vec<EventFd>,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) queue_select: u32,
    pub(super) device_features_select: u32,
    pub(super) driver_features_select: u32,
    pub(super) driver_features: u64,
    pub(super) status: u32,
    /// The VM is paused: the device takes no requests (see [`MmioTransport::pause`]).
    pub(super) paused: bool,
}

/// Why a transport could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("queue {index} of the virtio device has an invalid maximum size {size}")]
    QueueSize { index: usize, size: u16 },
    #[error("creating a queue notification eventfd failed: {0}")]
    EventFd(std::io::Error),
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Result<Self, Error> {
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for (index, &size) in device.queue_max_sizes().iter().enumerate() {
            queues.push(Queue::new(size).map_err(|_| Error::QueueSize { index, size })?);
            queue_events.push(EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?);
        }
        Ok(Self {
            device,
            mem,
            queues,
            queue_events,
            interrupt,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            paused: false,
        })
    }

    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    fn activated(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_NEEDS_RESET == 0
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn negotiating(&self) -> bool {
        self.status & STATUS_DRIVER != 0 && self.status & STATUS_FEATURES_OK == 0
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.status & STATUS_FEATURES_OK != 0 && self.status & STATUS_DRIVER_OK == 0
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        // Registers below the config space are 32 bits wide and aligned.
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        let value = match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_select {
                0 => self.device.device_features() as u32,
                1 => (self.device.device_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if self.status & STATUS_DRIVER != 0 {
                self.device.write_config(offset - CONFIG_SPACE, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        let value = u32::from_le_bytes(bytes);
        let queue_ok = self.queue_config_allowed();
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_select = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            // Only while negotiating: after DRIVER, before FEATURES_OK.
            REG_DRIVER_FEATURES if self.negotiating() => match self.driver_features_select {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            REG_QUEUE_SEL => self.queue_select = value,
            REG_QUEUE_NUM if queue_ok => {
                if let Some(q) = self.selected_queue() {
                    // virtio-queue ignores sizes that are not a power of two up to max.
                    q.set_size(value.min(u32::from(u16::MAX)) as u16);
                }
            }
            REG_QUEUE_READY if queue_ok => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            REG_QUEUE_DESC_LOW if queue_ok => {
                self.with_queue(|q| q.set_desc_table_address(Some(value), None))
            }
            REG_QUEUE_DESC_HIGH if queue_ok => {
                self.with_queue(|q| q.set_desc_table_address(None, Some(value)))
            }
            REG_QUEUE_DRIVER_LOW if queue_ok => {
                self.with_queue(|q| q.set_avail_ring_address(Some(value), None))
            }
            REG_QUEUE_DRIVER_HIGH if queue_ok => {
                self.with_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            REG_QUEUE_DEVICE_LOW if queue_ok => {
                self.with_queue(|q| q.set_used_ring_address(Some(value), None))
            }
            REG_QUEUE_DEVICE_HIGH if queue_ok => {
                self.with_queue(|q| q.set_used_ring_address(None, Some(value)))
            }
            REG_QUEUE_NOTIFY => {
                if let Some(evt) = self.queue_events.get(value as usize) {
                    let _ = evt.write(1);
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.write_status(value),
            _ => {}
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver only adds bits (spec 3.1.1); anything else is a driver bug we ignore.
        if value & self.status != self.status {
            return;
        }
        let added = value & !self.status;
        if added & STATUS_FEATURES_OK != 0 {
            let offered = self.device.device_features();
            let acceptable = self.status & STATUS_DRIVER != 0
                && self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !acceptable {
                // Not setting FEATURES_OK tells the driver its subset was refused; a
                // DRIVER_OK in the same write cannot stand without it.
                self.status = value & !(STATUS_FEATURES_OK | STATUS_DRIVER_OK);
                return;
            }
        }
        if added & STATUS_DRIVER_OK != 0 {
            if self.status & STATUS_FEATURES_OK == 0 {
                return;
            }
            self.status = value;
            self.activate();
            return;
        }
        self.status = value;
    }

    fn activate(&mut self) {
        let mem = &self.mem;
        let event_idx = self.driver_features
            & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
            != 0;
        let mut valid = true;
        for q in self.queues.iter_mut() {
            if q.ready() {
                valid &= q.is_valid(mem);
                q.set_event_idx(event_idx);
            }
        }
        if !valid || self.device.activate(self.driver_features).is_err() {
            self.needs_reset();
        }
    }

    fn needs_reset(&mut self) {
        self.status |= STATUS_NEEDS_RESET;
        self.interrupt.raise(INTERRUPT_CONFIG_CHANGE);
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in self.queues.iter_mut() {
            q.reset();
        }
        for evt in &self.queue_events {
            let _ = evt.read();
        }
        self.interrupt.clear();
        self.status = 0;
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
    }

    /// The VMM is exiting (see [`VirtioDevice::shutdown`]).
    pub fn shutdown(&mut self) {
        self.device.shutdown();
    }

    /// See [`VirtioDevice::announce`].
    pub fn announce(&self) -> std::io::Result<bool> {
        self.device.announce()
    }

    /// See [`VirtioDevice::switch_disk`]; refused unless the transport is paused.
    pub fn switch_disk(
        &mut self,
        image: std::sync::Arc<disk::Image>,
    ) -> Result<std::sync::Arc<disk::Image>, DeviceError> {
        if !self.paused {
            return Err(DeviceError::Switch(
                "the device is not paused: the VM must be".into(),
            ));
        }
        self.device.switch_disk(image)
    }

    /// See [`VirtioDevice::handover_fds`].
    pub fn handover_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.device.handover_fds()
    }

    /// The device's own event sources (see [`VirtioDevice::event_sources`]).
    pub fn event_sources(&self) -> Vec<(std::os::fd::RawFd, u32)> {
        self.device.event_sources()
    }

    /// The VM is pausing (its vCPUs are stopped): requests already taken complete, with their
    /// interrupts; no new one is taken until [`Self::resume`].
    pub fn pause(&mut self) -> Result<(), DeviceError> {
        self.paused = true;
        if !self.activated() {
            return Ok(());
        }
        let used = self.device.quiesce(&mut self.queues, &self.mem)?;
        self.interrupt_for(used);
        Ok(())
    }

    /// The pause is over: every queue and event source is served once, since their
    /// notifications were not acted on meanwhile.
    pub fn resume(&mut self) {
        self.paused = false;
        // An interrupt raised as the VM was saved may have missed the vCPUs' state: its
        // pending bits are signalled again (a guest's driver reads the status and acks).
        let pending = self.interrupt.status();
        if pending != 0 {
            self.interrupt.raise(pending);
        }
        for index in 0..self.queues.len() {
            self.process_queue(index);
        }
        for (_, token) in self.device.event_sources() {
            self.process_event(token);
        }
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    fn interrupt_for(&mut self, used: u64) {
        for (i, queue) in self.queues.iter_mut().enumerate() {
            if used & (1 << i) != 0 && wants_interrupt(queue, &self.mem) {
                self.interrupt.raise(INTERRUPT_USED_BUFFER);
            }
        }
    }

    /// Serves event source `token` of the device (on the device event loop).
    pub fn process_event(&mut self, token: u32) {
        if !self.activated() || self.paused {
            return;
        }
        match self
            .device
            .process_event(token, &mut self.queues, &self.mem)
        {
            Ok(used) => self.interrupt_for(used),
            Err(_) => self.needs_reset(),
        }
    }

    /// Serves queue `index` after its notification fired (on the device event loop).
    ///
    /// The driver's notifications for the queue are turned off first (VIRTQ_USED_F_NO_NOTIFY,
    /// or with EVENT_IDX the avail_event the device leaves behind), so that chains it adds
    /// while the device works cost no VM exit. They come back on when the device's drain
    /// finds the ring empty ([`super::chain::next_chain`], which then looks once more), or
    /// stay off while the device waits for something else (see
    /// [`VirtioDevice::process_queue`]).
    pub fn process_queue(&mut self, index: usize) {
        if !self.activated() || self.paused {
            return;
        }
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        if !queue.ready() {
            return;
        }
        let served = queue
            .disable_notification(&self.mem)
            .map_err(|e| DeviceError::queue(index, e))
            .and_then(|()| self.device.process_queue(index, queue, &self.mem));
        match served {
            Ok(false) => {}
            Ok(true) => {
                // With EVENT_IDX the driver may not want this interrupt; if the check itself
                // fails (rings out of memory), interrupting is the safe answer.
                if wants_interrupt(queue, &self.mem) {
                    self.interrupt.raise(INTERRUPT_USED_BUFFER);
                }
            }
            Err(_) => self.needs_reset(),
        }
    }
}
