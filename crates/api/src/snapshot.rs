//! Snapshots over the API: what one is and how to ask for one.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::vm::VmSpec;

/// `POST /vms/{name}/snapshots`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// The snapshot's name (letters, digits, `-`, `_`, `.`); `snap-N` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An existing directory beneath one of the host's image directories to write the
    /// snapshot's files in (as `DIR/NAME/`): another disk, say. By default they go in the
    /// state directory (`STATE/snapshots/VM/NAME/`), which keeps every snapshot's manifest
    /// either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

/// `POST /vms/{name}/restore`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// The snapshot of this VM to restore.
    pub snapshot: String,
    /// Restore it as a new VM of this name (its disks copied), beside this one, instead of
    /// into this VM (which must then be stopped).
    #[serde(default, rename = "as", skip_serializing_if = "Option::is_none")]
    pub as_vm: Option<String>,
}

/// One disk of a snapshot: the VM's disk as it was, or (read-only) where it still is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotDisk {
    /// The VM's disk, as its definition named it then. With `how` `overlay` this file is the
    /// snapshot's disk itself, kept as it was: the VM went on writing in `overlay`.
    pub path: String,
    /// The copy in the snapshot's directory (`how` `reflink` or `copy`); none for a
    /// read-only disk, which is not copied, and for an overlay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<String>,
    /// How the disk was kept: `overlay` (the VM writes on in a new qcow2 image over `path`,
    /// which no longer changes: instant), `reflink` (a copy sharing blocks, instant) or
    /// `copy` (sparse, while the guest stood still).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub how: Option<String>,
    /// With `overlay`: the new image the VM wrote in from that instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<String>,
    /// Why a writable disk was copied rather than kept under an overlay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copied_because: Option<String>,
}

/// A snapshot, as `snapshot.json` in its directory records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotInfo {
    pub vm: String,
    pub name: String,
    /// Where its files are on the host.
    pub dir: String,
    /// When it was taken (RFC 3339, UTC): a record; nothing expires.
    pub taken: String,
    /// The VM's definition when it was taken.
    pub spec: VmSpec,
    pub memory_bytes: u64,
    /// Bytes of guest memory stored (the pages the guest had touched).
    pub memory_stored_bytes: u64,
    pub state_bytes: u64,
    pub disks: Vec<SnapshotDisk>,
    /// How long the guest stood still for it, seconds (0 when it was paused already).
    pub paused_seconds: f64,
}

/// A VM handed to a new VMM process (`POST /vms/{name}/upgrade`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UpgradeReport {
    pub vm: String,
    pub old_pid: u32,
    pub new_pid: u32,
    /// How long the guest stood still, as the old VMM measured it (ms).
    pub paused_ms: f64,
}

/// One VM of `POST /host/upgrade`: upgraded, or why not (it runs on in its old VMM).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UpgradeOutcome {
    pub vm: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgraded: Option<UpgradeReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
