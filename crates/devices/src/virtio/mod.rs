//! Virtio devices on the virtio-mmio transport.

pub mod block;
pub mod device;
pub mod mmio;

pub use device::{DeviceError, VirtioDevice};
pub use mmio::{Interrupt, MmioTransport};
