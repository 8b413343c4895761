//! Port I/O dispatch to the legacy devices. Ports nobody owns read as all ones and ignore
//! writes, as on a PC with nothing behind them.

use std::sync::Mutex;

use arch::layout::ACPI_SLEEP_CONTROL_PORT;

use super::{AcpiPmDevice, CmosRtc, SerialDevice, I8042};

const COM1_BASE: u16 = 0x3f8;
const COM1_LAST: u16 = 0x3ff;
const I8042_DATA: u16 = 0x60;
const I8042_COMMAND: u16 = 0x64;
const RTC_BASE: u16 = 0x70;
const RTC_LAST: u16 = 0x71;
const ACPI_PM_LAST: u16 = ACPI_SLEEP_CONTROL_PORT + 2;

pub struct LegacyBus {
    pub serial: Mutex<SerialDevice>,
    pub i8042: Mutex<I8042>,
    pub rtc: Mutex<CmosRtc>,
    pub acpi_pm: AcpiPmDevice,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A device whose lock was poisoned by a panicking thread is still consistent enough to
    // serve port I/O: every device method leaves the device valid between bytes.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LegacyBus {
    /// Bytes for the guest's serial input (the terminal's or a console client's).
    pub fn serial_input(
        &self,
        bytes: &[u8],
    ) -> Result<super::SerialInputReady, super::serial::Error> {
        lock(&self.serial).queue_input(bytes)
    }

    /// A guest `in`: bytes beyond the first of a wide access read as all ones.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        let Some(first) = data.first_mut() else {
            return;
        };
        *first = match port {
            COM1_BASE..=COM1_LAST => lock(&self.serial).read((port - COM1_BASE) as u8),
            I8042_DATA | I8042_COMMAND => lock(&self.i8042).read((port - I8042_DATA) as u8),
            RTC_BASE..=RTC_LAST => lock(&self.rtc).read(port - RTC_BASE),
            ACPI_SLEEP_CONTROL_PORT..=ACPI_PM_LAST => {
                self.acpi_pm.read(port - ACPI_SLEEP_CONTROL_PORT)
            }
            _ => 0xff,
        };
    }

    /// A guest `out`: devices here are byte-wide; only the first byte counts.
    pub fn write(&self, port: u16, data: &[u8]) -> Result<(), super::serial::Error> {
        let Some(&value) = data.first() else {
            return Ok(());
        };
        match port {
            COM1_BASE..=COM1_LAST => lock(&self.serial).write((port - COM1_BASE) as u8, value)?,
            I8042_DATA | I8042_COMMAND => {
                // The reset trigger cannot fail.
                let _ = lock(&self.i8042).write((port - I8042_DATA) as u8, value);
            }
            RTC_BASE..=RTC_LAST => lock(&self.rtc).write(port - RTC_BASE, value),
            ACPI_SLEEP_CONTROL_PORT..=ACPI_PM_LAST => {
                self.acpi_pm.write(port - ACPI_SLEEP_CONTROL_PORT, value)
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::ResetTrigger;
    use crate::GuestRequest;
    use std::sync::Arc;
    use vmm_sys_util::eventfd::EventFd;

    fn bus() -> (LegacyBus, Arc<Mutex<Vec<GuestRequest>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s1 = seen.clone();
        let s2 = seen.clone();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let bus = LegacyBus {
            serial: Mutex::new(SerialDevice::new(irq, Box::new(std::io::sink()))),
            i8042: Mutex::new(I8042::new(ResetTrigger(Arc::new(move |r| {
                s1.lock().unwrap().push(r)
            })))),
            rtc: Mutex::new(CmosRtc::new(64 << 20, 0)),
            acpi_pm: AcpiPmDevice::new(5, 1, Arc::new(move |r| s2.lock().unwrap().push(r))),
        };
        (bus, seen)
    }

    #[test]
    fn unowned_ports_read_all_ones() {
        let (bus, _) = bus();
        let mut data = [0u8; 4];
        bus.read(0xcfc, &mut data);
        assert_eq!(data, [0xff; 4]);
        bus.write(0xcf8, &[1, 2, 3, 4]).unwrap();
    }

    #[test]
    fn i8042_and_acpi_reach_their_devices() {
        let (bus, seen) = bus();
        bus.write(I8042_COMMAND, &[0xfe]).unwrap();
        bus.write(ACPI_SLEEP_CONTROL_PORT, &[(5 << 2) | (1 << 5)])
            .unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            vec![GuestRequest::Reboot, GuestRequest::PowerOff]
        );
    }

    #[test]
    fn rtc_status_d_reads_valid() {
        let (bus, _) = bus();
        bus.write(RTC_BASE, &[0x0d]).unwrap();
        let mut d = [0u8];
        bus.read(RTC_BASE + 1, &mut d);
        assert_eq!(d[0], 0x80);
    }

    #[test]
    fn empty_accesses_are_harmless() {
        let (bus, _) = bus();
        bus.read(COM1_BASE, &mut []);
        bus.write(COM1_BASE, &[]).unwrap();
    }
}
