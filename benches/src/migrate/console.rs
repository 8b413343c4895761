//! Reading the probe's console log: waiting for a line, and proving after a migration that
//! the guest runs on the target with every page intact (see guest/probe/churn.c).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::lab::nap;

/// The log from byte `from` on (lossy UTF-8; empty when it does not exist yet).
pub fn read_from(path: &Path, from: usize) -> String {
    let all = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(all.get(from..).unwrap_or_default()).into_owned()
}

/// The longest `PROBE churn gap` (us) the guest printed in `path` after byte `from`, within
/// 300 ms, in ms; 0 when it saw no stall of 1 ms or more.
pub fn longest_stall(path: &Path, from: usize) -> f64 {
    std::thread::sleep(Duration::from_millis(300));
    read_from(path, from)
        .lines()
        .filter_map(|l| l.strip_prefix("PROBE churn gap "))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .fold(0.0, f64::max)
        / 1000.0
}

/// The highest `PROBE churn tick N` in `text` (the last one: they count up), 0 when none.
pub fn last_tick(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix("PROBE churn tick "))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// Fails if the probe said a page was wrong.
fn no_bad_check(text: &str, what: &str) -> Result<()> {
    if let Some(line) = text.lines().find(|l| l.contains("PROBE churn check bad")) {
        bail!("{what}: the guest found a wrong page: {line:?}");
    }
    Ok(())
}

/// Waits until the log holds `text` after byte `from`; the log from there.
pub fn wait_for(
    path: &Path,
    text: &str,
    from: usize,
    limit: Duration,
    what: &str,
) -> Result<String> {
    let deadline = Instant::now() + limit;
    loop {
        let tail = read_from(path, from);
        no_bad_check(&tail, what)?;
        if tail.contains(text) {
            return Ok(tail);
        }
        if Instant::now() > deadline {
            let last: Vec<&str> = tail.lines().rev().take(5).collect();
            bail!(
                "{what}: no {text:?} in {} within {limit:?}; its last lines: {last:?}",
                path.display()
            );
        }
        nap(Duration::from_millis(5))?;
    }
}

/// The longest stall the guest reported in `text` up to and including its first churn tick,
/// in ms, by its own clock: `PROBE churn gap US` lines and that tick's `max_gap_us`.
pub fn first_stall_ms(text: &str) -> f64 {
    let mut longest = 0u64;
    for line in text.lines() {
        if let Some(us) = line.strip_prefix("PROBE churn gap ") {
            longest = longest.max(us.trim().parse().unwrap_or(0));
        } else if line.starts_with("PROBE churn tick ") {
            let gap = line
                .rsplit_once("max_gap_us ")
                .and_then(|(_, us)| us.trim().parse().ok())
                .unwrap_or(0);
            longest = longest.max(gap);
            break;
        }
    }
    longest as f64 / 1000.0
}

/// After a migration: the target's log (which begins at the switch) shows a churn tick
/// numbered past `before` (the source's last one before the migration began), no page found
/// wrong, and no new boot. Returns the log.
pub fn runs_on(path: &Path, before: u64, limit: Duration, what: &str) -> Result<String> {
    let deadline = Instant::now() + limit;
    loop {
        let text = read_from(path, 0);
        no_bad_check(&text, what)?;
        if text.contains("PROBE start") {
            bail!("{what}: the guest booted again on the target");
        }
        if last_tick(&text) > before {
            return Ok(text);
        }
        if Instant::now() > deadline {
            bail!(
                "{what}: no churn tick after {before} in {} within {limit:?}: {:?}",
                path.display(),
                text.lines().rev().take(5).collect::<Vec<_>>()
            );
        }
        nap(Duration::from_millis(5))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_stall_counts_gaps_and_the_first_tick_only() {
        let text = "PROBE churn gap 2500\nPROBE churn check ok 1024\nPROBE churn tick 7 written 9 max_gap_us 3100\nPROBE churn tick 8 written 9 max_gap_us 9000\n";
        assert_eq!(first_stall_ms(text), 3.1);
        assert_eq!(first_stall_ms("PROBE churn gap 4000\n"), 4.0);
        assert_eq!(first_stall_ms(""), 0.0);
    }
}
