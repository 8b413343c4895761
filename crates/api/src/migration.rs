//! Live migration over the API: how to ask for one, and how one is going.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /vms/{name}/migrate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The target daemon's API, `https://HOST:PORT`.
    pub to: String,
    /// An API token of the target daemon with the operator role or above.
    pub token: String,
    /// The SHA-256 fingerprint of the target's TLS certificate (its `keel serve` prints it;
    /// `keel host` there shows it).
    pub fingerprint: String,
    /// The longest the guest may stand still at the switch, in ms (default 50): memory is
    /// copied in rounds while the guest runs until what is left fits this budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_downtime_ms: Option<u64>,
    /// At most this many MiB/s on the link (default: as fast as it goes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth_mib_s: Option<u64>,
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationPhase {
    /// Reaching the target and checking that it can take the VM.
    Connecting,
    /// Copying memory while the guest runs.
    Copying,
    /// The guest stands still: the rest of its memory and its state cross, the target
    /// takes it over.
    Switching,
    /// The VM runs on the target; it is gone from this host.
    Done,
    /// It ended without moving: the VM runs on here (see `error`).
    Failed,
    /// An operator cancelled it: the VM runs on here.
    Cancelled,
}

impl MigrationPhase {
    pub fn is_over(self) -> bool {
        matches!(
            self,
            MigrationPhase::Done | MigrationPhase::Failed | MigrationPhase::Cancelled
        )
    }
}

/// `GET /vms/{name}/migration`: a migration under way, or the last one's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationProgress {
    pub vm: String,
    pub to: String,
    pub phase: MigrationPhase,
    /// Copy rounds so far (the first copies every page the guest touched).
    pub rounds: u32,
    /// Guest memory the VM has.
    pub memory_bytes: u64,
    /// Memory bytes sent so far (pages; all-zero pages of the first round are not sent).
    pub bytes_sent: u64,
    /// Pages the guest wrote during the last round.
    pub dirty_pages: u64,
    /// The guest's writing rate during the last round, MiB/s.
    pub dirty_rate_mib_s: f64,
    /// The link's rate as measured, MiB/s.
    pub bandwidth_mib_s: f64,
    /// How long the switch would stand the guest still if it began now, ms.
    pub expected_downtime_ms: f64,
    pub max_downtime_ms: u64,
    /// Since the migration began, ms (a monotonic clock).
    pub elapsed_ms: f64,
    /// Done: how long the guest stood still, from its pause here to its run there, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<f64>,
    /// The switch's steps so far, in order, with how long each took (where the guest's
    /// pause went).
    #[serde(default)]
    pub switch_steps: Vec<MigrationStep>,
    /// Failed: why, and that the VM runs on here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One step of a migration's switch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationStep {
    pub step: String,
    pub ms: f64,
}

pub mod wire;
