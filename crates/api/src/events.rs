//! Events: every VM state change and every mutating API call, each one a row of the
//! hash-chained availability ledger; and the SLA report computed from it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::vm::VmState;

/// Why something happened.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Cause {
    /// An operator asked for it through the API or CLI.
    Operator,
    /// The guest did it (powered off, rebooted, crashed its kernel).
    Guest,
    /// The VMM process died without being asked to.
    VmmCrash,
    /// The host rebooted under the VM.
    HostBoot,
    /// The daemon restarted (re-adoption, autostart, or finding a VMM gone).
    DaemonRestart,
    /// The kernel's OOM killer ended the VMM: its cgroup's memory limit (guest RAM plus the
    /// VMM's overhead) was reached.
    OomKill,
    /// The ledger or its anchor was changed outside keel (an incident, never a state change).
    Tamper,
    /// Keel held the VM still for work an operator asked of it (a snapshot, an upgrade of
    /// its VMM, a migration): counted as down time in SLA reports, however short.
    Maintenance,
}

impl Cause {
    pub const ALL: [Cause; 8] = [
        Cause::Operator,
        Cause::Guest,
        Cause::VmmCrash,
        Cause::HostBoot,
        Cause::DaemonRestart,
        Cause::OomKill,
        Cause::Tamper,
        Cause::Maintenance,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Operator => "operator",
            Cause::Guest => "guest",
            Cause::VmmCrash => "vmm-crash",
            Cause::HostBoot => "host-boot",
            Cause::DaemonRestart => "daemon-restart",
            Cause::OomKill => "oom-kill",
            Cause::Tamper => "tamper",
            Cause::Maintenance => "maintenance",
        }
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Cause {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Cause::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("unknown cause '{s}'"))
    }
}

/// What kind of record a ledger row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// A VM changed state (`from` and `to` are set).
    State,
    /// A mutating API call (the audit trail), successful or not.
    Audit,
    /// Something about the host or daemon (start, restart, re-adoption).
    Host,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::State => "state",
            EventKind::Audit => "audit",
            EventKind::Host => "host",
        }
    }
}

impl std::str::FromStr for EventKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [EventKind::State, EventKind::Audit, EventKind::Host]
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown event kind '{s}'"))
    }
}

/// One row of the ledger. `hash` is SHA-256 over `prev_hash` and this row's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Position in the ledger, from 1, without gaps.
    pub seq: i64,
    /// Wall-clock time of the record in milliseconds since the Unix epoch (a record, never
    /// a decision).
    pub time_ms: i64,
    /// The same time as RFC 3339, UTC.
    pub time: String,
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<VmState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<VmState>,
    pub cause: Cause,
    /// Who: "uid:1000" on the Unix socket, "token:NAME" on TCP, "keel" for the daemon.
    pub actor: String,
    /// What, in words; for audit rows the request, where it came from and its outcome.
    pub detail: String,
    pub prev_hash: String,
    pub hash: String,
}

/// The outcome of checking the ledger's hash chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LedgerVerification {
    pub ok: bool,
    pub rows: i64,
    /// Every row that does not match the chain, with what is wrong with it.
    pub problems: Vec<LedgerProblem>,
    /// The last row's number (0 for an empty ledger).
    #[serde(default)]
    pub head_seq: i64,
    /// The last row's hash: write it down (with `head_seq`, as `SEQ:HASH`) to detect a later
    /// rewrite of the whole chain or rows cut from its end.
    pub head_hash: String,
    /// The daemon's anchor could not be used (missing, unreadable, not signed by this host):
    /// rows cut from the end cannot be named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor_problem: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LedgerProblem {
    pub seq: i64,
    pub problem: String,
}

/// A credit tier: below `below_percent` availability, `credit_percent` of the fee is owed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreditTier {
    pub below_percent: f64,
    pub credit_percent: f64,
}

/// Availability of one VM over a window, from the ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmAvailability {
    pub vm: String,
    /// The window's length in seconds.
    pub window_seconds: f64,
    /// Time the VM was down by an operator's or the guest's own choice (or not yet
    /// defined): not counted against availability.
    pub excluded_seconds: f64,
    /// Time the VM was down that it should have been up, by cause.
    pub downtime_seconds: f64,
    pub downtime_by_cause: BTreeMap<String, f64>,
    /// Number of unplanned outages that began in the window.
    pub outages: u64,
    /// 100 * (1 - downtime / (window - excluded)); 100 when nothing was expected of it.
    pub availability_percent: f64,
    /// Credit owed under the tiers given, in percent of the fee.
    pub credit_percent: f64,
}

/// `keel sla report`: availability per VM between two instants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SlaReport {
    /// RFC 3339, UTC.
    pub from: String,
    pub to: String,
    pub tiers: Vec<CreditTier>,
    pub vms: Vec<VmAvailability>,
    /// The ledger head the report was computed from, and whether the chain verified.
    pub ledger_head_hash: String,
    pub ledger_verified: bool,
}
