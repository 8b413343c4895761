//! The front page: host checks, open incidents and warnings, then counts.

use api::host::HealthCheck;
use api::{HostHealth, HostStatus, VmState};

use crate::auth;
use crate::store;
use crate::supervisor::Supervisor;
use crate::time::now_ms;

fn check(name: &str, result: Result<String, String>) -> HealthCheck {
    match result {
        Ok(detail) => HealthCheck {
            name: name.into(),
            ok: true,
            detail,
        },
        Err(detail) => HealthCheck {
            name: name.into(),
            ok: false,
            detail,
        },
    }
}

fn kvm_check() -> Result<String, String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(|_| "/dev/kvm opens read-write".to_string())
        .map_err(|e| format!("/dev/kvm cannot be opened ({e}): no VM can start on this host"))
}

/// A value of /proc/meminfo, in bytes.
fn meminfo(text: &str, key: &str) -> u64 {
    crate::supervisor::meminfo_kib(text, key).map_or(0, |kib| kib * 1024)
}

fn resources(sup: &Supervisor, vms: &[store::VmRow]) -> api::host::HostResources {
    let meminfo_text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let load_1m = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let running: Vec<&store::VmRow> = vms.iter().filter(|v| v.state.has_vmm()).collect();
    api::host::HostResources {
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get() as u32),
        load_1m,
        memory_total_bytes: meminfo(&meminfo_text, "MemTotal"),
        memory_available_bytes: meminfo(&meminfo_text, "MemAvailable"),
        vmm_processes: running
            .iter()
            .filter(|v| sup.is_watched(&v.spec.name))
            .count() as u64,
        vm_memory_mib: running.iter().map(|v| v.spec.memory_mib).sum(),
        vm_memory_allowed_mib: sup.memory_allowed_mib(),
    }
}

/// Below this share of its file system free, the state directory is warned about: ext4
/// keeps 5% for root besides, so what is left is the last of it. A large share (10%) made
/// a host with tens of GiB free report itself degraded.
const LOW_SPACE_PERCENT: u64 = 5;
/// ... or below this many bytes, whatever the share: a snapshot's memory and disk copies
/// land in the state directory.
const LOW_SPACE_BYTES: u64 = 2 << 30;

/// A warning when the state directory's file system runs low: the store, the ledger and
/// the VMs' console logs live there.
fn free_space_warning(state_dir: &std::path::Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(state_dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the zeroed struct it is given; the path is NUL-terminated.
    let mut fs: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(path.as_ptr(), &mut fs) } != 0 {
        return None;
    }
    let block = fs.f_frsize;
    let (free, total) = (fs.f_bavail * block, fs.f_blocks * block);
    if total == 0 || (free * 100 >= total * LOW_SPACE_PERCENT && free >= LOW_SPACE_BYTES) {
        return None;
    }
    Some(format!(
        "the state directory {} has {} MiB free of {} MiB: the store, the ledger and console logs need room",
        state_dir.display(),
        free >> 20,
        total >> 20
    ))
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

pub fn status(sup: &Supervisor) -> Result<HostStatus, store::Error> {
    let (vms, incidents, tokens, schema, quiet) =
        sup.with_store(|s| -> Result<_, store::Error> {
            Ok((
                s.vms()?,
                s.open_incidents()?,
                s.tokens()?,
                s.schema_version()?,
                s.quiet_since_ms()?,
            ))
        })?;
    let unwatched: Vec<&str> = vms
        .iter()
        .filter(|v| {
            v.state.has_vmm() && v.state != VmState::Starting && !sup.is_watched(&v.spec.name)
        })
        .map(|v| v.spec.name.as_str())
        .collect();
    let checks = vec![
        check("kvm", kvm_check()),
        check(
            "store",
            Ok(format!("SQLite store at schema version {schema}")),
        ),
        check(
            "supervision",
            if unwatched.is_empty() {
                Ok("every VMM with a running VM is watched".into())
            } else {
                Err(format!(
                    "VMs without a watched VMM: {}",
                    unwatched.join(", ")
                ))
            },
        ),
        check(
            "jail",
            match sup.jail_description() {
                Some(layout) => Ok(format!(
                    "VMMs run jailed (own uid, namespaces, empty root, seccomp); {layout}; VM files from {}",
                    sup.image_dirs()
                )),
                None => Err("the daemon is not root: VMMs run unjailed, with its rights (only their seccomp filters hold)".into()),
            },
        ),
    ];
    let mut checks = checks;
    checks.extend(sup.ledger_check());
    let mut warnings = auth::expiry_warnings(&tokens, now_ms());
    warnings.extend(sup.capacity_warnings(&vms));
    warnings.extend(free_space_warning(&sup.state_dir));
    if let Some(identity) = sup.identity.get() {
        if let (Some(cert), Some(not_after)) =
            (&identity.tls_certificate, identity.tls_not_after_ms)
        {
            warnings.extend(crate::tls::expiry_warning(
                std::path::Path::new(cert),
                not_after,
                now_ms(),
            ));
        }
    }
    let health = if !checks[0].ok {
        HostHealth::Failing
    } else if !incidents.is_empty() || !warnings.is_empty() || checks.iter().any(|c| !c.ok) {
        HostHealth::Degraded
    } else {
        HostHealth::Ok
    };
    Ok(HostStatus {
        health,
        incidents,
        failed_operations: sup.recent_failures(),
        warnings,
        checks,
        hostname: hostname(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        vms_total: vms.len() as u64,
        vms_running: vms.iter().filter(|v| v.state == VmState::Running).count() as u64,
        identity: sup.identity.get().cloned().unwrap_or_default(),
        quiet_since: quiet.map(crate::time::rfc3339),
        resources: resources(sup, &vms),
    })
}
