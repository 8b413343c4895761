//! The API root: host health and open incidents first.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::events::Cause;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum HostHealth {
    /// Every check passes and no incident is open.
    Ok,
    /// Something needs attention (an open incident, a warning) but VMs can run.
    Degraded,
    /// VMs cannot be started here (no /dev/kvm, store unwritable).
    Failing,
}

/// One health check and its result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HealthCheck {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// Something went wrong and nobody has acknowledged it yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Incident {
    pub id: i64,
    /// RFC 3339, UTC.
    pub opened: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    pub cause: Cause,
    pub summary: String,
    /// The ledger row that recorded it.
    pub event_seq: i64,
}

/// A mutating API call that failed, as the front page lists it (newest first; the audit
/// rows of the ledger keep them all).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FailedOperation {
    /// RFC 3339, UTC.
    pub time: String,
    pub actor: String,
    /// Method and path.
    pub request: String,
    pub status: u16,
    pub error: String,
}

/// What lets a client trust this host and a customer check its evidence.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostIdentity {
    /// SHA-256 fingerprint of the TCP API's TLS certificate ("AB:CD:..."), when TCP is served
    /// with TLS: what `keel --fingerprint` pins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_fingerprint: Option<String>,
    /// The TLS certificate's file, and (RFC 3339) the end of its validity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_certificate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_not_after: Option<String>,
    /// The same, in ms since the epoch (for the daemon's own warning; not sent).
    #[serde(skip)]
    pub tls_not_after_ms: Option<i64>,
    /// The Ed25519 public key (hex) that signs the ledger's anchored heads and exports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger_public_key: Option<String>,
}

/// What `GET /` answers: problems first, then the rest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostStatus {
    pub health: HostHealth,
    pub incidents: Vec<Incident>,
    /// The latest failed operations since the daemon started (at most 20).
    #[serde(default)]
    pub failed_operations: Vec<FailedOperation>,
    /// Things that will need attention (a token about to expire, ...).
    pub warnings: Vec<String>,
    pub checks: Vec<HealthCheck>,
    pub hostname: String,
    pub version: String,
    pub vms_total: u64,
    pub vms_running: u64,
    #[serde(default)]
    pub identity: HostIdentity,
    /// When there is nothing on the front page: since when (RFC 3339): the last incident's
    /// acknowledgement, or the start of the host's ledger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiet_since: Option<String>,
    #[serde(default)]
    pub resources: HostResources,
}

/// What the host has and what its VMs take.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostResources {
    pub cpus: u32,
    /// Load average over the last minute.
    pub load_1m: f64,
    pub memory_total_bytes: u64,
    /// What the kernel says new work could have without swapping (MemAvailable).
    pub memory_available_bytes: u64,
    /// VMM processes the daemon watches.
    pub vmm_processes: u64,
    /// Guest RAM of the running VMs, and the most Keel may give them (MiB).
    pub vm_memory_mib: u64,
    pub vm_memory_allowed_mib: u64,
}

/// What a caller may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read everything.
    Viewer,
    /// Also define, start, stop and delete VMs; acknowledge incidents.
    Operator,
    /// Also manage tokens.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [Role::Viewer, Role::Operator, Role::Admin]
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("role '{s}' is not one of viewer, operator, admin"))
    }
}

/// Who the caller is: `GET /session`, and the answer to signing in (`POST /session`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SessionInfo {
    /// "token:NAME" or "uid:N", as the ledger records the caller.
    pub actor: String,
    pub role: Role,
    /// Set when the token expires soon or has expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// `POST /tokens`: a new API token for TCP clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    pub name: String,
    pub role: Role,
    /// RFC 3339; none means it never expires. Expiry limits only new work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

/// A token as listed (its secret is never shown again after creation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    pub name: String,
    pub role: Role,
    pub created: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// Set when `expires` has passed.
    #[serde(default)]
    pub expired: bool,
}

/// The answer to `POST /tokens`: the only time the secret is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NewToken {
    pub token: TokenInfo,
    pub secret: String,
}
