//! Virtio devices on the virtio-mmio transport.

pub mod block;
pub mod chain;
pub mod device;
pub mod driver;
pub mod mmio;
pub mod net;
pub mod persist;
pub mod rng;
#[cfg(test)]
mod tests;
pub mod vsock;

pub use device::{DeviceError, VirtioDevice};
pub use mmio::{Interrupt, MmioTransport};
