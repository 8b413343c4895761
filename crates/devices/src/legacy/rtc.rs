//! The CMOS real-time clock and its NVRAM (ports 0x70 index, 0x71 data). The clock shows the
//! host's UTC time, in BCD, 24-hour mode. The time only informs the guest: Keel makes no
//! decision from it. The NVRAM also reports memory sizes the way PC firmware does.

use std::time::{SystemTime, UNIX_EPOCH};

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const REG_STATUS_C: u8 = 0x0c;
const REG_STATUS_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;
/// Memory above 16 MiB (up to the 32-bit gap) in 64 KiB blocks.
const REG_MEM_ABOVE_16M_LOW: u8 = 0x34;
const REG_MEM_ABOVE_16M_HIGH: u8 = 0x35;
/// Memory above 4 GiB in 64 KiB blocks (three bytes).
const REG_MEM_ABOVE_4G: u8 = 0x5b;

/// Status A: 32.768 kHz time base, 1024 Hz rate; update-in-progress never set.
const STATUS_A_DEFAULT: u8 = 0x26;
/// Status B: 24-hour mode, BCD.
const STATUS_B_24H: u8 = 0x02;
/// Status D: the clock's battery is good.
const STATUS_D_VALID: u8 = 0x80;

const INDEX_MASK: u8 = 0x7f;

/// Calendar date and time of day, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    pub year: i64,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    /// 1 = Sunday .. 7 = Saturday, as the RTC counts.
    pub weekday: u8,
}

impl DateTime {
    /// The UTC calendar time `secs` seconds after 1970-01-01 (days-to-civil conversion).
    pub fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
        let year = yoe + era * 400 + i64::from(month <= 2);
        DateTime {
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
            // 1970-01-01 was a Thursday (5 in RTC numbering).
            weekday: ((days + 4).rem_euclid(7) + 1) as u8,
        }
    }
}

fn bcd(value: u8) -> u8 {
    ((value / 10) << 4) | (value % 10)
}

pub struct CmosRtc {
    pub(super) index: u8,
    pub(super) nvram: [u8; 128],
    now: fn() -> i64,
}

fn host_unix_time() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl CmosRtc {
    /// `low_mem` is RAM below the 32-bit gap, `high_mem` RAM above 4 GiB, in bytes.
    pub fn new(low_mem: u64, high_mem: u64) -> Self {
        Self::with_clock(low_mem, high_mem, host_unix_time)
    }

    pub fn with_clock(low_mem: u64, high_mem: u64, now: fn() -> i64) -> Self {
        let mut nvram = [0u8; 128];
        nvram[REG_STATUS_A as usize] = STATUS_A_DEFAULT;
        nvram[REG_STATUS_B as usize] = STATUS_B_24H;
        nvram[REG_STATUS_D as usize] = STATUS_D_VALID;
        let above_16m = (low_mem.saturating_sub(16 << 20) >> 16).min(0xffff) as u16;
        nvram[REG_MEM_ABOVE_16M_LOW as usize] = above_16m as u8;
        nvram[REG_MEM_ABOVE_16M_HIGH as usize] = (above_16m >> 8) as u8;
        let above_4g = (high_mem >> 16).min(0xff_ffff) as u32;
        for i in 0..3 {
            nvram[REG_MEM_ABOVE_4G as usize + i] = (above_4g >> (8 * i)) as u8;
        }
        Self {
            index: 0,
            nvram,
            now,
        }
    }

    /// `offset` 0 is the index port, 1 the data port.
    pub fn read(&mut self, offset: u16) -> u8 {
        if offset == 0 {
            return self.index;
        }
        let t = DateTime::from_unix((self.now)());
        match self.index {
            REG_SECONDS => bcd(t.second),
            REG_MINUTES => bcd(t.minute),
            REG_HOURS => bcd(t.hour),
            REG_WEEKDAY => bcd(t.weekday),
            REG_DAY => bcd(t.day),
            REG_MONTH => bcd(t.month),
            REG_YEAR => bcd(t.year.rem_euclid(100) as u8),
            REG_CENTURY => bcd(t.year.div_euclid(100).clamp(0, 99) as u8),
            // Reading status C clears pending interrupt flags; there are none.
            REG_STATUS_C => 0,
            i => self.nvram[i as usize],
        }
    }

    pub fn write(&mut self, offset: u16, value: u8) {
        if offset == 0 {
            // Bit 7 is the NMI mask, not part of the index.
            self.index = value & INDEX_MASK;
            return;
        }
        match self.index {
            // The clock follows the host; status C and D are read-only.
            REG_SECONDS..=REG_YEAR | REG_CENTURY | REG_STATUS_C | REG_STATUS_D => {}
            i => self.nvram[i as usize] = value,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_time_converts_to_the_calendar() {
        assert_eq!(
            DateTime::from_unix(0),
            DateTime {
                year: 1970,
                month: 1,
                day: 1,
                hour: 0,
                minute: 0,
                second: 0,
                weekday: 5
            }
        );
        // 2038-01-19 03:14:08 UTC, a Tuesday: one past the 32-bit signed limit.
        let t = DateTime::from_unix(1 << 31);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second),
            (2038, 1, 19, 3, 14, 8)
        );
        assert_eq!(t.weekday, 3);
        // 2100-03-01 00:00:00 UTC: 2100 is not a leap year.
        let t = DateTime::from_unix(4_107_542_400);
        assert_eq!((t.year, t.month, t.day), (2100, 3, 1));
        // 2024-02-29 12:00:00 UTC, a Thursday.
        let t = DateTime::from_unix(1_709_208_000);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.weekday),
            (2024, 2, 29, 12, 5)
        );
    }

    fn at_2038() -> i64 {
        1 << 31
    }

    fn reg(rtc: &mut CmosRtc, index: u8) -> u8 {
        rtc.write(0, index | 0x80);
        rtc.read(1)
    }

    #[test]
    fn clock_registers_are_bcd() {
        let mut rtc = CmosRtc::with_clock(256 << 20, 0, at_2038);
        assert_eq!(reg(&mut rtc, REG_YEAR), 0x38);
        assert_eq!(reg(&mut rtc, REG_CENTURY), 0x20);
        assert_eq!(reg(&mut rtc, REG_MONTH), 0x01);
        assert_eq!(reg(&mut rtc, REG_DAY), 0x19);
        assert_eq!(reg(&mut rtc, REG_HOURS), 0x03);
        assert_eq!(reg(&mut rtc, REG_MINUTES), 0x14);
        assert_eq!(reg(&mut rtc, REG_SECONDS), 0x08);
        assert_eq!(reg(&mut rtc, REG_STATUS_D), STATUS_D_VALID);
        assert_eq!(
            reg(&mut rtc, REG_STATUS_A) & 0x80,
            0,
            "never update-in-progress"
        );
    }

    #[test]
    fn nvram_reports_memory_and_keeps_writes() {
        let mut rtc = CmosRtc::with_clock(3 << 30, 1 << 30, at_2038);
        let above_16m = u16::from_le_bytes([
            reg(&mut rtc, REG_MEM_ABOVE_16M_LOW),
            reg(&mut rtc, REG_MEM_ABOVE_16M_HIGH),
        ]);
        assert_eq!(above_16m as u64, ((3u64 << 30) - (16 << 20)) >> 16);
        assert_eq!(
            reg(&mut rtc, REG_MEM_ABOVE_4G + 2),
            ((1u64 << 30) >> 32) as u8
        );
        assert_eq!(
            reg(&mut rtc, REG_MEM_ABOVE_4G + 1),
            (((1u64 << 30) >> 16) >> 8) as u8
        );
        rtc.write(0, 0x40);
        rtc.write(1, 0xab);
        assert_eq!(reg(&mut rtc, 0x40), 0xab);
        rtc.write(0, REG_SECONDS);
        rtc.write(1, 0x59);
        assert_eq!(
            reg(&mut rtc, REG_SECONDS),
            0x08,
            "the clock follows the host"
        );
    }
}
