//! The image library: disk images kept by the daemon, from which VMs' disks are made as thin
//! clones; and the long operations (imports, copies) whose progress a client follows.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::vm::DiskFormat;

/// The format of a file to import. VMDK files (every subformat Keel reads: monolithicSparse,
/// streamOptimized, monolithicFlat, twoGbMaxExtentSparse and twoGbMaxExtentFlat) are
/// converted to a sparse raw image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    Raw,
    Qcow2,
    Vmdk,
}

impl SourceFormat {
    /// The format a file name's extension says (`.raw`/`.img`, `.qcow2`, `.vmdk`); a name is
    /// an operator's word, never the file's contents.
    pub fn from_extension(path: &str) -> Option<SourceFormat> {
        let ext = path.rsplit_once('.')?.1.to_ascii_lowercase();
        match ext.as_str() {
            "raw" | "img" => Some(SourceFormat::Raw),
            "qcow2" => Some(SourceFormat::Qcow2),
            "vmdk" => Some(SourceFormat::Vmdk),
            _ => None,
        }
    }
}

/// An image to import into the library.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportRequest {
    /// The image's name in the library (the rule of VM names).
    pub name: String,
    /// The file to import: an absolute path in the host's image directories (for a VMDK,
    /// its descriptor or its one file).
    pub source: String,
    /// The source's format; when absent, the file name's extension decides (.raw, .img,
    /// .qcow2, .vmdk), and a name without one is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<SourceFormat>,
}

/// An image of the library.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageInfo {
    pub name: String,
    /// How it is stored.
    pub format: DiskFormat,
    /// Its file, in the library directory.
    pub path: String,
    /// The disk size a VM sees, bytes.
    pub virtual_size: u64,
    /// The space its file takes on the host, bytes.
    pub allocated_bytes: u64,
    /// When it was imported (RFC 3339).
    pub created: String,
    /// What it was imported from, and in which format.
    pub source: String,
    /// VMs whose disks are this image or a clone of it: it cannot be removed while any is.
    pub used_by: Vec<String>,
}

/// Where a long operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OperationState {
    Running,
    Done,
    Failed,
}

/// A long operation (an import, a copy): poll `GET /operations/{id}` to follow it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Operation {
    pub id: u64,
    /// What it does: `image-import`, `vm-clone`, `vm-import`, `vm-snapshot`, `vm-restore`.
    pub kind: String,
    /// What it works on (an image's or a VM's name).
    pub target: String,
    pub state: OperationState,
    /// Bytes done and to do (of the source's data; sparse regions are skipped and count as
    /// done).
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Bytes per second so far.
    pub rate: f64,
    /// Seconds left at that rate, while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_secs: Option<f64>,
    pub started: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What it is doing now, for operations of several steps ("converting disk 1 of 2").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// What it made, once done (the imported VM's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// What the operator should know: for a VM import, each thing not carried over and what
    /// to do about it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// A VMware VM to import: a `.vmx` (with its VMDKs beside it), an `.ovf` (with its disks
/// beside it) or an `.ova`, in the host's image directories. Its disks go into the image
/// library (`VM-disk0`, ...) and the VM is defined on thin clones of them, booting from its
/// first disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmImportRequest {
    pub source: String,
    /// The VM's name (default: VMware's display name, made a Keel name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Taps for the VM's NICs, in order; each NIC keeps its MAC address. NICs without a tap
    /// are listed as not carried over.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taps: Vec<String>,
    /// Start the VM once it is defined.
    #[serde(default)]
    pub start: bool,
}

/// A copy of a stopped VM under a new name: its definition, and its disks copied into the
/// clone's own directory (holes kept; a disk cloned from a library image stays a clone of it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmCloneRequest {
    /// The new VM's name.
    pub name: String,
    /// Taps for the clone's NICs, in order (a tap belongs to one VM); the clone's MACs are
    /// derived from them. NICs without a tap are left out, and listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taps: Vec<String>,
}
