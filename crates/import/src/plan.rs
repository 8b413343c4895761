//! What an imported VM becomes in Keel, whichever file described it (VMX or OVF), and what
//! it leaves behind.

/// A disk of the VM, as its VMX or OVF attaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedDisk {
    /// "scsi0:0", "sata0:1", ... (where the VM had it)
    pub slot: String,
    /// The VMDK's file name, beside the VMX or OVF.
    pub file: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedNic {
    /// "ethernet0", ...
    pub slot: String,
    pub mac: Option<String>,
}

/// What the VM becomes, and what it leaves behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u64,
    /// In controller order: SCSI, SATA, NVMe, IDE; by controller, then unit.
    pub disks: Vec<PlannedDisk>,
    pub nics: Vec<PlannedNic>,
    /// Each thing not carried over, with what to do about it.
    pub not_carried: Vec<String>,
}

/// Controller kinds in the order their disks are given to the VM.
pub(crate) const BUSES: [&str; 4] = ["scsi", "sata", "nvme", "ide"];

/// A name Keel accepts, from VMware's display name.
pub(crate) fn keel_name(display: &str) -> String {
    let mut name: String = display
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    name = name
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string();
    name.truncate(63);
    if name.is_empty() {
        "imported".into()
    } else {
        name
    }
}
