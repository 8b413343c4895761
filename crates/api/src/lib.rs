//! The types Keel's processes speak: the REST API of `keel serve` (and so the CLI), and the
//! control socket of each `keel vmm` and the handover of a guest between VMMs. Serde types, and the one way their state files are
//! written (`control::write_atomically`). The OpenAPI document is generated from them (utoipa).

pub mod control;
pub mod events;
pub mod handover;
pub mod host;
pub mod image;
pub mod migration;
pub mod snapshot;
pub mod vm;

pub use events::{Cause, Event, EventKind, SlaReport};
pub use host::{HostHealth, HostStatus, Incident, NewToken, TokenInfo, TokenRequest};
pub use vm::{DiskSpec, NetSpec, RateLimits, VmInfo, VmSpec, VmState, VmUsage, VsockSpec};

/// The body of every 4xx and 5xx answer: one sentence that says what failed and what to do.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: String,
}
