//! VM definitions and the states a VM is in.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Longest VM name: it names a directory and, inside it, Unix sockets (108-byte paths).
pub const MAX_NAME_LEN: usize = 63;

/// A VM as an operator defines it. Paths are on the host running `keel serve`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Unique on the host: lowercase letters, digits, '-', '_' and '.', starting with a letter
    /// or digit, at most 63 characters.
    pub name: String,
    /// Kernel: an ELF vmlinux (PVH entry if it has the note) or a bzImage. Absent: disk boot,
    /// the kernel, initrd and options the first disk holds (Boot Loader Specification entries
    /// or Debian's /vmlinuz on an ext2/3/4 filesystem; docs/host.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Initial ramdisk; only with a kernel file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Kernel command line; with disk boot, added after the disk's own options.
    #[serde(default)]
    pub cmdline: String,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub nets: Vec<NetSpec>,
    /// A virtio-rng device.
    #[serde(default)]
    pub rng: bool,
    /// A virtio-vsock device; its host side is the Unix socket `vsock.sock` in the VM's run
    /// directory (connect and write `CONNECT <port>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockSpec>,
    /// Start this VM when the daemon starts.
    #[serde(default)]
    pub autostart: bool,
    /// At most this much CPU time, in percent of one CPU (150: one and a half CPUs), through
    /// the VM's cgroup; absent: no CPU limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit_percent: Option<u32>,
    /// cloud-init NoCloud data: the daemon gives the VM a read-only seed disk (a FAT
    /// filesystem labelled `cidata`) holding it, after its other disks, made anew from the
    /// definition at every start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInit>,
}

/// The files of a cloud-init NoCloud seed, their contents inline (at most 1 MiB together).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloudInit {
    /// `user-data`: a `#cloud-config` document or a script.
    pub user_data: String,
    /// `meta-data`; when absent, `instance-id` and `local-hostname` are the VM's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_data: Option<String>,
    /// `network-config` (version 1 or 2), when the guest's network is not DHCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_config: Option<String>,
}

/// Most bytes of cloud-init data a definition carries.
pub const MAX_CLOUD_INIT_BYTES: usize = 1 << 20;

fn default_cpus() -> u32 {
    1
}

fn default_memory_mib() -> u64 {
    256
}

/// A disk image's format. Always named, never guessed from the file: a raw image whose guest
/// wrote a qcow2 header stays raw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    #[default]
    Raw,
    /// qcow2 (versions 2 and 3); its backing files must name their format and lie in the
    /// host's image directories.
    Qcow2,
}

impl DiskFormat {
    pub fn is_raw(&self) -> bool {
        *self == DiskFormat::Raw
    }
}

/// A virtio-blk disk on an image file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// The image file (absolute). Left empty when `image` names a library image: the
    /// daemon then makes the disk and fills this in.
    #[serde(default)]
    pub path: String,
    /// The image's format; raw when absent.
    #[serde(default, skip_serializing_if = "DiskFormat::is_raw")]
    pub format: DiskFormat,
    /// A thin clone of this library image: when the VM is defined, the daemon makes a qcow2
    /// overlay on the image for it (in `vms/NAME/` of the first image directory), in
    /// milliseconds whatever the image's size. Kept in the definition to say where the disk
    /// came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The clone's size in bytes (at least the image's; the image's when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default)]
    pub readonly: bool,
    /// Direct I/O: the image is opened with `O_DIRECT`, bypassing the host's page cache (as
    /// QEMU's `cache=none`). A write still completes only once it is in the file and a flush
    /// is still an `fdatasync`. The VM fails to start if the image's file system refuses
    /// `O_DIRECT` or needs direct I/O aligned to more than 512 bytes. Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub direct: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Rate limits; unlimited when absent.
    #[serde(default, skip_serializing_if = "RateLimits::is_unlimited")]
    pub limits: RateLimits,
}

/// Token-bucket limits of a disk or NIC; absent means unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    /// Bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bw: Option<u64>,
    /// Bytes that may pass at once above the rate (default: one second's worth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bw_burst: Option<u64>,
    /// Operations (requests, frames) per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_burst: Option<u64>,
}

impl RateLimits {
    pub fn is_unlimited(&self) -> bool {
        self == &RateLimits::default()
    }
}

/// A virtio-vsock device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VsockSpec {
    /// The guest's context id, 3 to 4294967294.
    pub cid: u64,
}

/// A virtio-net NIC on a tap device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetSpec {
    pub tap: String,
    /// Like 52:54:00:12:34:56; chosen by the VMM when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Rate limits; unlimited when absent.
    #[serde(default, skip_serializing_if = "RateLimits::is_unlimited")]
    pub limits: RateLimits,
}

/// Most vCPUs a VM has.
pub const MAX_CPUS: u32 = 32;
/// Least guest memory in MiB.
pub const MIN_MEMORY_MIB: u64 = 8;

/// Why a VM definition is refused, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("VM name '{0}' is not allowed: use 1 to 63 lowercase letters, digits, '-', '_' or '.', starting with a letter or digit")]
    BadName(String),
    #[error("cpus {0}: a VM has 1 to {MAX_CPUS} vCPUs")]
    BadCpus(u32),
    #[error("memory_mib {0}: a VM needs at least {MIN_MEMORY_MIB} MiB")]
    MemoryTooSmall(u64),
    #[error("no kernel and no disk: give a kernel, or a disk that holds one to boot from it")]
    NothingToBoot,
    #[error(
        "an initrd needs a kernel: a VM that boots from its disk takes the initrd from the disk"
    )]
    InitrdWithoutKernel,
    #[error("{what} path is empty")]
    EmptyPath { what: &'static str },
    #[error("{what} path '{path}' is relative; give an absolute path (the daemon's working directory is not yours)")]
    RelativePath { what: &'static str, path: String },
    #[error("cpu_limit_percent {0}: give 1 to {max} (percent of one CPU, up to every vCPU's whole time)", max = MAX_CPUS * 100)]
    BadCpuLimit(u32),
    #[error("image name '{0}' is not allowed: image names follow the rule of VM names")]
    BadImageName(String),
    #[error("cloud-init data of {0} bytes: at most 1 MiB (user-data, meta-data and network-config together)")]
    CloudInitTooLarge(usize),
    #[error("cloud-init user-data is empty: give a #cloud-config document or a script")]
    CloudInitEmpty,
}

/// Checks a VM name against the rule in [`VmSpec::name`].
pub fn check_name(name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
        });
    if ok {
        Ok(())
    } else {
        Err(SpecError::BadName(name.to_string()))
    }
}

fn check_path(what: &'static str, path: &str) -> Result<(), SpecError> {
    if path.is_empty() {
        return Err(SpecError::EmptyPath { what });
    }
    if !path.starts_with('/') {
        return Err(SpecError::RelativePath {
            what,
            path: path.to_string(),
        });
    }
    Ok(())
}

impl VmSpec {
    /// What can be checked without the host: name, sizes, absolute paths. The VMM checks
    /// the files themselves when the VM starts.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_name(&self.name)?;
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(SpecError::BadCpus(self.cpus));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(SpecError::MemoryTooSmall(self.memory_mib));
        }
        if let Some(limit) = self.cpu_limit_percent {
            if limit == 0 || limit > MAX_CPUS * 100 {
                return Err(SpecError::BadCpuLimit(limit));
            }
        }
        match &self.kernel {
            Some(kernel) => check_path("kernel", kernel)?,
            None if self.disks.is_empty() => return Err(SpecError::NothingToBoot),
            None if self.initrd.is_some() => return Err(SpecError::InitrdWithoutKernel),
            None => {}
        }
        if let Some(initrd) = &self.initrd {
            check_path("initrd", initrd)?;
        }
        if let Some(ci) = &self.cloud_init {
            let total = ci.user_data.len()
                + ci.meta_data.as_ref().map_or(0, String::len)
                + ci.network_config.as_ref().map_or(0, String::len);
            if total > MAX_CLOUD_INIT_BYTES {
                return Err(SpecError::CloudInitTooLarge(total));
            }
            if ci.user_data.trim().is_empty() {
                return Err(SpecError::CloudInitEmpty);
            }
        }
        for disk in &self.disks {
            match &disk.image {
                // Made by the daemon at definition; the path is its own.
                Some(image) if disk.path.is_empty() => {
                    check_name(image).map_err(|_| SpecError::BadImageName(image.clone()))?
                }
                Some(_) => check_path("disk", &disk.path)?,
                None => check_path("disk", &disk.path)?,
            }
        }
        Ok(())
    }
}

/// Where a VM is in its life. `running` and `shutting-down` count as up in SLA reports;
/// `paused` is down time, excluded from availability when an operator paused the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// Defined, no VMM process.
    Stopped,
    /// The VMM process is being started.
    Starting,
    /// The VMM runs the guest.
    Running,
    /// The power button was pressed; waiting for the guest to power off.
    ShuttingDown,
    /// The VMM or the guest died without being asked to: an incident is open.
    Crashed,
    /// The VMM holds the guest stopped (its vCPUs and devices still); it runs on when
    /// resumed.
    Paused,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::ShuttingDown => "shutting-down",
            VmState::Crashed => "crashed",
            VmState::Paused => "paused",
        }
    }

    /// Whether a VMM process exists in this state.
    pub fn has_vmm(self) -> bool {
        matches!(
            self,
            VmState::Starting | VmState::Running | VmState::ShuttingDown | VmState::Paused
        )
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for VmState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [
            VmState::Stopped,
            VmState::Starting,
            VmState::Running,
            VmState::ShuttingDown,
            VmState::Crashed,
            VmState::Paused,
        ]
        .into_iter()
        .find(|state| state.as_str() == s)
        .ok_or_else(|| format!("unknown VM state '{s}'"))
    }
}

/// A VM as the API shows it: its definition and what it is doing now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmInfo {
    pub spec: VmSpec,
    pub state: VmState,
    /// The VMM's process id while it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// When the VM entered this state (RFC 3339, UTC).
    pub since: String,
    /// Why it is in this state (the last ledger entry's detail).
    #[serde(default)]
    pub reason: String,
    /// The serial console's scrollback file.
    pub console_log: String,
    /// The serial console's Unix socket (while the VM runs; `keel vm console` attaches to it).
    pub console_socket: String,
    /// The host side of its vsock device, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_socket: Option<String>,
    /// What its jailed VMM uses, from the VM's cgroup (while it runs, on a host that jails).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<VmUsage>,
}

/// A running VM's use of the host, from its cgroup, against its limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmUsage {
    /// The uid and gid its VMM runs as.
    pub jail_id: u32,
    /// Memory in use now (guest pages it touched, the VMM, its disks' page cache).
    pub memory_bytes: Option<u64>,
    /// The most it may use: guest RAM plus the VMM's allowance.
    pub memory_limit_bytes: Option<u64>,
    /// The most it has used.
    pub memory_peak_bytes: Option<u64>,
    /// Its tasks now (vCPU threads, the event loop, io_uring workers) and the most allowed.
    pub tasks: Option<u64>,
    pub tasks_limit: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rule() {
        for good in ["web1", "a", "db-2.prod_x", &"x".repeat(63)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "A", "a/b", "a b", "..", &"x".repeat(64), "ü"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_and_unknown_fields() {
        let spec: VmSpec = serde_json::from_str(r#"{"name":"a","kernel":"/k"}"#).unwrap();
        assert_eq!(
            (spec.cpus, spec.memory_mib, spec.autostart),
            (1, 256, false)
        );
        assert!(spec.validate().is_ok());
        assert!(serde_json::from_str::<VmSpec>(r#"{"name":"a","kernel":"/k","cpu":2}"#).is_err());
    }

    #[test]
    fn validation_says_what_is_wrong() {
        let mut spec: VmSpec = serde_json::from_str(r#"{"name":"a","kernel":"k"}"#).unwrap();
        assert!(spec
            .validate()
            .unwrap_err()
            .to_string()
            .contains("relative"));
        spec.kernel = Some("/k".into());
        spec.cpus = 33;
        assert_eq!(spec.validate(), Err(SpecError::BadCpus(33)));
        spec.cpus = 1;
        spec.memory_mib = 4;
        assert_eq!(spec.validate(), Err(SpecError::MemoryTooSmall(4)));
    }

    #[test]
    fn a_vm_without_a_kernel_boots_from_its_first_disk() {
        let spec: VmSpec =
            serde_json::from_str(r#"{"name":"a","disks":[{"path":"/d.img"}]}"#).unwrap();
        assert_eq!(spec.kernel, None);
        assert!(spec.validate().is_ok());
        let bare: VmSpec = serde_json::from_str(r#"{"name":"a"}"#).unwrap();
        assert_eq!(bare.validate(), Err(SpecError::NothingToBoot));
        let initrd: VmSpec =
            serde_json::from_str(r#"{"name":"a","initrd":"/rd","disks":[{"path":"/d.img"}]}"#)
                .unwrap();
        assert_eq!(initrd.validate(), Err(SpecError::InitrdWithoutKernel));
    }

    #[test]
    fn direct_io_is_off_by_default_and_written_only_when_on() {
        let d: DiskSpec = serde_json::from_str(r#"{"path":"/d.img"}"#).unwrap();
        assert!(!d.direct);
        assert_eq!(
            serde_json::to_string(&d).unwrap(),
            r#"{"path":"/d.img","readonly":false}"#
        );
        let d: DiskSpec = serde_json::from_str(r#"{"path":"/d.img","direct":true}"#).unwrap();
        assert!(d.direct);
        assert!(serde_json::to_string(&d)
            .unwrap()
            .contains(r#""direct":true"#));
    }

    #[test]
    fn states_round_trip_as_text_and_json() {
        for s in ["stopped", "starting", "running", "shutting-down", "crashed"] {
            let state: VmState = s.parse().unwrap();
            assert_eq!(state.as_str(), s);
            assert_eq!(serde_json::to_string(&state).unwrap(), format!("\"{s}\""));
        }
    }
}
