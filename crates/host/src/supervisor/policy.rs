//! What the host decides for its VMs, beside their jail: the image directories, the totals
//! of running VMs, the console log's cap.

use api::VmSpec;

use super::{Error, Result, Supervisor};
use crate::images::ImageDirs;
use crate::store::VmRow;

/// How many VMs may run and how much of the host's RAM they may have.
#[derive(Debug, Clone, Copy)]
pub struct HostLimits {
    pub max_vms: usize,
    pub memory_share_percent: u32,
    /// That share of the host's RAM, in MiB.
    pub memory_mib: u64,
}

/// A value of /proc/meminfo's text, in KiB.
pub fn meminfo_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

impl HostLimits {
    pub fn new(max_vms: usize, memory_share_percent: u32) -> HostLimits {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let host_mib = meminfo_kib(&meminfo, "MemTotal").map_or(u64::MAX, |kib| kib / 1024);
        HostLimits {
            max_vms,
            memory_share_percent,
            memory_mib: host_mib.saturating_mul(u64::from(memory_share_percent)) / 100,
        }
    }
}

/// What the host decides for its VMs: jailing, image directories, totals.
pub struct HostPolicy {
    pub cgroups: Option<jail::cgroup::Layout>,
    pub images: ImageDirs,
    /// The image library, in the first image directory.
    pub library: crate::library::Library,
    pub limits: HostLimits,
    /// Most bytes each VM's console.log keeps.
    pub console_log_max: u64,
}

impl HostPolicy {
    /// Unjailed VMMs, files from `state_dir/images`, default totals (the unit tests').
    pub fn unjailed(state_dir: &std::path::Path) -> Result<HostPolicy> {
        let images = ImageDirs::new(&[state_dir.join("images")], state_dir)?;
        let library = crate::library::Library::open(images.first())
            .map_err(|e| Error::Capacity(format!("the image library: {e}")))?;
        Ok(HostPolicy {
            cgroups: None,
            library,
            images,
            limits: HostLimits::new(DEFAULT_MAX_VMS, DEFAULT_MEMORY_SHARE),
            console_log_max: DEFAULT_CONSOLE_LOG_MAX,
        })
    }
}

/// Most bytes of each VM's console.log unless the operator says otherwise (the VMM's own
/// default too).
pub const DEFAULT_CONSOLE_LOG_MAX: u64 = 8 << 20;

/// Most VMs that run at once unless the operator says otherwise.
pub const DEFAULT_MAX_VMS: usize = 512;
/// Share of host RAM VMs may have unless the operator says otherwise, percent.
pub const DEFAULT_MEMORY_SHARE: u32 = 90;
/// Share of a host total past which the front page warns (new starts are refused at 100%).
const NEAR_LIMIT_PERCENT: u64 = 90;

impl Supervisor {
    /// The most guest RAM Keel may give running VMs, MiB.
    pub fn memory_allowed_mib(&self) -> u64 {
        self.limits.memory_mib
    }

    /// Warnings for the front page: running VMs or their memory near the host's totals.
    pub fn capacity_warnings(&self, vms: &[VmRow]) -> Vec<String> {
        let running: Vec<&VmRow> = vms.iter().filter(|r| r.state.has_vmm()).collect();
        let mut warnings = Vec::new();
        let max = self.limits.max_vms as u64;
        if max > 0 && running.len() as u64 * 100 >= max * NEAR_LIMIT_PERCENT {
            warnings.push(format!(
                "{} of at most {max} VMs run (keel serve --max-vms): new starts are refused at {max}",
                running.len()
            ));
        }
        let used: u64 = running.iter().map(|r| r.spec.memory_mib).sum();
        let allowed = self.limits.memory_mib;
        if allowed > 0 && allowed != u64::MAX && used * 100 >= allowed * NEAR_LIMIT_PERCENT {
            warnings.push(format!(
                "running VMs have {used} of the {allowed} MiB Keel may give VMs ({}% of host RAM, keel serve --memory-share): starts that need more are refused",
                self.limits.memory_share_percent
            ));
        }
        warnings
    }

    /// Host totals before a new start: running VMs within the count and the share of host
    /// RAM the operator allows. Never consulted for a VM that runs (promise 1).
    pub(super) fn check_capacity(&self, spec: &VmSpec) -> Result<()> {
        let vms = self.with_store(|s| s.vms())?;
        let running: Vec<&VmRow> = vms
            .iter()
            .filter(|r| r.state.has_vmm() && r.spec.name != spec.name)
            .collect();
        if running.len() >= self.limits.max_vms {
            return Err(Error::Capacity(format!(
                "{} VMs run, the most this host allows (keel serve --max-vms {}); stop one first",
                running.len(),
                self.limits.max_vms
            )));
        }
        let used: u64 = running.iter().map(|r| r.spec.memory_mib).sum();
        let allowed = self.limits.memory_mib;
        if used + spec.memory_mib > allowed {
            return Err(Error::Capacity(format!(
                "VM '{}' needs {} MiB; running VMs use {used} of the {allowed} MiB Keel may give VMs ({}% of host RAM, keel serve --memory-share), {} MiB free",
                spec.name,
                spec.memory_mib,
                self.limits.memory_share_percent,
                allowed.saturating_sub(used)
            )));
        }
        Ok(())
    }
}
