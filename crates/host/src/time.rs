//! Wall-clock time, for records only. No decision about a VM is ever made from it (promise 1):
//! timeouts use tokio's clock, which is monotonic.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Now, in milliseconds since the Unix epoch (negative before 1970).
pub fn now_ms() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// `time_ms` as RFC 3339 UTC with milliseconds ("2100-01-01T00:00:00.000Z"); `@<ms>ms` for a
/// time before 1970 or after 9999, which RFC 3339 (or humantime) cannot write.
pub fn rfc3339(time_ms: i64) -> String {
    /// 10000-01-01T00:00:00Z.
    const END_MS: i64 = 253_402_300_800_000;
    if let Ok(ms) = u64::try_from(time_ms) {
        if time_ms < END_MS {
            let mut out = String::new();
            let t = UNIX_EPOCH + Duration::from_millis(ms);
            if write!(out, "{}", humantime::format_rfc3339_millis(t)).is_ok() {
                return out;
            }
        }
    }
    format!("@{time_ms}ms")
}

/// Parses RFC 3339 ("2030-01-01T00:00:00Z") into milliseconds since the epoch.
pub fn parse_rfc3339(text: &str) -> Result<i64, String> {
    let t = humantime::parse_rfc3339_weak(text)
        .map_err(|e| format!("'{text}' is not a time like 2030-01-31T12:00:00Z ({e})"))?;
    let d = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| format!("'{text}' is before 1970"))?;
    i64::try_from(d.as_millis()).map_err(|_| format!("'{text}' is too far in the future"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_far_dates() {
        for text in [
            "2038-01-19T03:14:08.000Z",
            "2100-01-01T00:00:00.000Z",
            "1970-01-01T00:00:00.000Z",
        ] {
            let ms = parse_rfc3339(text).unwrap();
            assert_eq!(rfc3339(ms), text);
        }
        assert_eq!(
            parse_rfc3339("2038-01-19T03:14:08Z").unwrap(),
            2_147_483_648_000
        );
        assert!(parse_rfc3339("yesterday").is_err());
    }
}
