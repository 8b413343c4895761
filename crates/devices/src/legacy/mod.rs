//! Legacy PC devices on I/O ports.

pub mod acpi_pm;
pub mod bus;
pub mod ged;
pub mod i8042;
pub mod persist;
pub mod rtc;
pub mod serial;

pub use acpi_pm::AcpiPmDevice;
pub use bus::LegacyBus;
pub use ged::Ged;
pub use i8042::{ResetTrigger, I8042};
pub use rtc::CmosRtc;
pub use serial::{EventFdTrigger, SerialDevice, SerialInputReady};
