//! Keel's devices. The legacy part: the 8250 serial port and i8042 (both from `vm-superio`),
//! the CMOS real-time clock, and the ACPI fixed-hardware registers for power-off and reset.
//! Devices know nothing of KVM: they see port reads and writes and signal what the guest asks
//! for through triggers.

pub mod legacy;
pub mod rate_limiter;
pub mod virtio;

use std::sync::Arc;

/// What the guest asked the platform for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestRequest {
    PowerOff,
    Reboot,
}

/// Where devices send power-off and reboot requests.
pub type RequestSink = Arc<dyn Fn(GuestRequest) + Send + Sync>;
