//! SLA reports computed from the availability ledger (promise 5).
//!
//! # How availability is counted
//!
//! - Only `state` rows count. A VM's state at instant `t` is the `to` of its last state row
//!   at or before `t` (rows ordered by time, then by `seq`). Its state before its first state
//!   row is *not yet defined*.
//! - **Up** is `running` or `shutting-down`. Every other state is down, `paused` included:
//!   a paused guest runs no instruction.
//! - An **outage** begins when a VM goes from up to a down state (`stopped`, `starting`,
//!   `crashed`, `paused`) with cause `vmm-crash`, `oom-kill`, `host-boot` or
//!   `daemon-restart` (unplanned), or `maintenance` (Keel held the VM still for work an
//!   operator asked of it: a snapshot, an upgrade, a migration; the guest stood still, so it
//!   counts however short); the outage carries that cause. It lasts until the VM is up
//!   again, or until an operator puts it in `stopped` (cause `operator`): from then on the
//!   down time is planned. Nothing else ends it: an operator's or the daemon's `starting`
//!   during the outage, or another crash, leaves the VM down with the outage's first cause
//!   until it is running.
//! - **Excluded** time (not counted against availability): before the VM's first state row;
//!   down time that began with cause `operator` or `guest` (the operator's or the guest's
//!   own choice: a stop, a pause, a power-off, a reboot, a guest kernel crash); and down time
//!   that did not begin by leaving an up state (a VM that was defined but never started, or
//!   that fails while it is being started from stopped).
//! - Rows before the window set the VM's state at its start; everything is clipped to
//!   `[from, to)`. A row at exactly `to` is outside. An outage that began before `from` counts
//!   its down time inside the window but not in `outages`.
//! - `downtime_by_cause` always has the five keys `vmm-crash`, `oom-kill`, `host-boot`,
//!   `daemon-restart` and `maintenance`. Times are computed in milliseconds and reported in seconds.
//! - `availability_percent` = 100 × (1 − downtime ÷ (window − excluded)); 100 when
//!   window − excluded is 0 (nothing was expected of the VM). A window with `to` ≤ `from`
//!   is empty.
//! - Credit: tiers are (`below_percent`, `credit_percent`); the credit owed is the largest
//!   `credit_percent` among the tiers whose `below_percent` is greater than the
//!   availability, 0 when there is none. Tiers are written `99.95:10,99:25,95:100`.
//! - The VMs reported are the ones asked for, or, when none are named, every VM with a state
//!   row before `to`, in name order.
//! - The ledger's rows are records: a wall clock that jumped changes the figures, never a VM.

use std::collections::{BTreeMap, BTreeSet};

use api::events::{CreditTier, SlaReport, VmAvailability};
use api::{Cause, Event, EventKind, VmState};
use rusqlite::Connection;

use crate::ledger;
use crate::time::rfc3339;

/// The causes of unplanned down time, in report and CSV column order.
pub const UNPLANNED: [Cause; 5] = [
    Cause::VmmCrash,
    Cause::OomKill,
    Cause::HostBoot,
    Cause::DaemonRestart,
    Cause::Maintenance,
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("credit tier {position} '{tier}': {why}; write tiers as BELOW:CREDIT percentages separated by commas, like 99.95:10,99:25,95:100")]
    BadTier {
        position: usize,
        tier: String,
        why: String,
    },
    #[error("SLA report: {0}")]
    Ledger(#[from] ledger::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Parses `99.95:10,99:25,95:100`: availability below 99.95 % owes 10 % of the fee, and so
/// on. An empty string is no tiers (no credit is ever owed).
pub fn parse_tiers(s: &str) -> Result<Vec<CreditTier>> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut tiers = Vec::new();
    for (i, tier) in s.split(',').enumerate() {
        let bad = |why: String| Error::BadTier {
            position: i + 1,
            tier: tier.trim().to_string(),
            why,
        };
        let (below, credit) = tier
            .split_once(':')
            .ok_or_else(|| bad("there is no ':' between the availability and the credit".into()))?;
        let percent = |what: &str, text: &str| -> Result<f64> {
            let text = text.trim();
            let value: f64 = text
                .parse()
                .map_err(|_| bad(format!("{what} '{text}' is not a number")))?;
            if !(0.0..=100.0).contains(&value) {
                return Err(bad(format!(
                    "{what} {text} is not a percentage from 0 to 100"
                )));
            }
            Ok(value)
        };
        let tier = CreditTier {
            below_percent: percent("availability", below)?,
            credit_percent: percent("credit", credit)?,
        };
        if tiers
            .iter()
            .any(|t: &CreditTier| t.below_percent == tier.below_percent)
        {
            return Err(bad(format!(
                "availability {} is given twice",
                tier.below_percent
            )));
        }
        tiers.push(tier);
    }
    Ok(tiers)
}

/// Where a VM's time goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before its first state row.
    Undefined,
    Up,
    /// Down by choice (or never up): excluded.
    Planned,
    /// An unplanned outage and the cause it began with.
    Outage(Cause),
}

fn is_up(state: VmState) -> bool {
    matches!(state, VmState::Running | VmState::ShuttingDown)
}

/// The phase after a state row, and whether an outage began with it.
fn next(phase: Phase, to: VmState, cause: Cause) -> (Phase, bool) {
    if is_up(to) {
        return (Phase::Up, false);
    }
    match phase {
        Phase::Up if UNPLANNED.contains(&cause) => (Phase::Outage(cause), true),
        Phase::Outage(_) if cause == Cause::Operator && to == VmState::Stopped => {
            (Phase::Planned, false)
        }
        Phase::Outage(first) => (Phase::Outage(first), false),
        Phase::Up | Phase::Undefined | Phase::Planned => (Phase::Planned, false),
    }
}

fn seconds(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

/// The credit owed at `availability` under `tiers`.
pub fn credit(tiers: &[CreditTier], availability: f64) -> f64 {
    tiers
        .iter()
        .filter(|t| t.below_percent > availability)
        .map(|t| t.credit_percent)
        .fold(0.0, f64::max)
}

/// One VM's availability from its state rows (any order; other rows are ignored).
fn availability(
    vm: &str,
    events: &[&Event],
    from_ms: i64,
    to_ms: i64,
    tiers: &[CreditTier],
) -> VmAvailability {
    let end = to_ms.max(from_ms);
    let mut rows: Vec<(i64, i64, VmState, Cause)> = events
        .iter()
        .filter(|e| e.kind == EventKind::State && e.vm.as_deref() == Some(vm))
        .filter_map(|e| e.to.map(|to| (e.time_ms, e.seq, to, e.cause)))
        .collect();
    rows.sort_unstable_by_key(|&(time, seq, _, _)| (time, seq));

    let mut phase = Phase::Undefined;
    let mut at = from_ms;
    let mut excluded_ms: i64 = 0;
    let mut down_ms = [0i64; UNPLANNED.len()];
    let mut outages: u64 = 0;
    let mut account = |phase: Phase, start: i64, stop: i64| {
        let span = stop.saturating_sub(start).max(0);
        match phase {
            Phase::Up => {}
            Phase::Undefined | Phase::Planned => excluded_ms = excluded_ms.saturating_add(span),
            Phase::Outage(cause) => {
                if let Some(i) = UNPLANNED.iter().position(|c| *c == cause) {
                    down_ms[i] = down_ms[i].saturating_add(span);
                }
            }
        }
    };
    for (time, _, to, cause) in rows {
        if time >= end {
            break;
        }
        let t = time.max(from_ms);
        account(phase, at, t);
        at = t;
        let began;
        (phase, began) = next(phase, to, cause);
        if began && time >= from_ms {
            outages += 1;
        }
    }
    account(phase, at, end);

    let window_ms = end.saturating_sub(from_ms);
    let downtime_ms = down_ms.iter().fold(0i64, |a, b| a.saturating_add(*b));
    let expected_ms = window_ms.saturating_sub(excluded_ms);
    let availability_percent = if expected_ms <= 0 {
        100.0
    } else {
        100.0 * (1.0 - downtime_ms as f64 / expected_ms as f64)
    };
    VmAvailability {
        vm: vm.to_string(),
        window_seconds: seconds(window_ms),
        excluded_seconds: seconds(excluded_ms),
        downtime_seconds: seconds(downtime_ms),
        downtime_by_cause: UNPLANNED
            .iter()
            .zip(down_ms)
            .map(|(cause, ms)| (cause.as_str().to_string(), seconds(ms)))
            .collect::<BTreeMap<_, _>>(),
        outages,
        availability_percent,
        credit_percent: credit(tiers, availability_percent),
    }
}

/// Availability of `vms` (every VM with a state row before `to_ms` when empty) over
/// `[from_ms, to_ms)`, by the rules in the module documentation. `ledger_head_hash` is left
/// empty and `ledger_verified` false: the caller fills them in from [`ledger::verify`], or
/// uses [`report_from_ledger`].
pub fn report(
    events: &[Event],
    vms: &[String],
    from_ms: i64,
    to_ms: i64,
    tiers: &[CreditTier],
) -> SlaReport {
    let state_rows: Vec<&Event> = events
        .iter()
        .filter(|e| e.kind == EventKind::State && e.to.is_some())
        .collect();
    let names: Vec<String> = if vms.is_empty() {
        state_rows
            .iter()
            .filter(|e| e.time_ms < to_ms)
            .filter_map(|e| e.vm.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    } else {
        vms.to_vec()
    };
    SlaReport {
        from: rfc3339(from_ms),
        to: rfc3339(to_ms),
        tiers: tiers.to_vec(),
        vms: names
            .iter()
            .map(|vm| availability(vm, &state_rows, from_ms, to_ms, tiers))
            .collect(),
        ledger_head_hash: String::new(),
        ledger_verified: false,
    }
}

/// [`report`] over the ledger in `conn`, with its head hash and whether its chain verified,
/// read in one snapshot. A row that does not parse is an error naming it.
pub fn report_from_ledger(
    conn: &Connection,
    vms: &[String],
    from_ms: i64,
    to_ms: i64,
    tiers: &[CreditTier],
) -> Result<SlaReport> {
    let sql = |doing| move |source| ledger::Error::Sqlite { doing, source };
    conn.execute_batch("SAVEPOINT keel_sla_report")
        .map_err(sql("starting to read the ledger"))?;
    let read =
        (|| -> ledger::Result<_> { Ok((ledger::verify(conn)?, ledger::state_events(conn)?)) })();
    conn.execute_batch("RELEASE keel_sla_report")
        .map_err(sql("finishing reading the ledger"))?;
    let (verification, events) = read?;
    let mut report = report(&events, vms, from_ms, to_ms, tiers);
    report.ledger_head_hash = verification.head_hash;
    report.ledger_verified = verification.ok;
    Ok(report)
}

fn csv_field(out: &mut String, field: &str) {
    if field.contains([',', '"', '\r', '\n']) {
        out.push('"');
        out.push_str(&field.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(field);
    }
}

/// The report as CSV (RFC 4180: CRLF line ends, fields quoted when they need it): a header
/// line, then one line per VM.
pub fn to_csv(report: &SlaReport) -> String {
    let mut header: Vec<String> = [
        "vm",
        "window_seconds",
        "excluded_seconds",
        "downtime_seconds",
        "availability_percent",
        "credit_percent",
        "outages",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    header.extend(UNPLANNED.iter().map(|c| format!("downtime_{c}")));
    let mut out = String::new();
    let mut line = |fields: &[String]| {
        for (i, field) in fields.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            csv_field(&mut out, field);
        }
        out.push_str("\r\n");
    };
    line(&header);
    for vm in &report.vms {
        let mut fields = vec![
            vm.vm.clone(),
            vm.window_seconds.to_string(),
            vm.excluded_seconds.to_string(),
            vm.downtime_seconds.to_string(),
            vm.availability_percent.to_string(),
            vm.credit_percent.to_string(),
            vm.outages.to_string(),
        ];
        fields.extend(UNPLANNED.iter().map(|c| {
            vm.downtime_by_cause
                .get(c.as_str())
                .copied()
                .unwrap_or(0.0)
                .to_string()
        }));
        line(&fields);
    }
    out
}

#[cfg(test)]
mod tests;
