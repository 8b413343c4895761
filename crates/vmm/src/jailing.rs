//! The jail a VMM enters (see the `jail` crate): for `keel vmm` with the identity and limits
//! the daemon chose, for `keel run` as root with an identity of its own.

use std::path::Path;

use jail::{limits_for, JailSpec, LaunchOptions, Rlimits};

use crate::config::VmConfig;
use crate::host_files::HostFiles;

/// Descriptors: vsock's 1024 streams, the devices' eventfds and files, the sockets.
const OPEN_FILES: u64 = 4096;

/// uids and gids of `keel run`'s jails: this base plus the pid of the `keel run` that made
/// it, so no two running VMs share one (the daemon's VMs use its own range, below this).
pub const RUN_ID_BASE: u32 = 3_000_000_000;

/// The VM's cgroup, with the cpu controller only when there is a CPU limit to set.
fn cgroup_of(
    layout: &jail::cgroup::Layout,
    name: &str,
    limits: &jail::CgroupLimits,
) -> jail::Cgroups {
    let cgroups = layout.vm(name);
    if limits.cpu_percent.is_some() {
        cgroups
    } else {
        cgroups.without_cpu()
    }
}

/// The largest file offset the VMM may write at: its largest disk, its logs, or a snapshot's
/// memory file (a header page and the guest's memory).
fn file_size_limit(files: &HostFiles, memory_bytes: u64) -> u64 {
    const LOGS: u64 = 1 << 30;
    let snapshot = memory_bytes + crate::snapshot::file::MEMORY_HEADER_BYTES;
    files
        .disks
        .iter()
        .map(|f| f.write_limit())
        .max()
        .unwrap_or(0)
        .max(LOGS)
        .max(snapshot)
}

/// The jail of a daemon-started VMM: its run directory is all it sees.
pub fn spec_for_service(
    dir: &Path,
    options: &LaunchOptions,
    files: &HostFiles,
    memory_bytes: u64,
    also_keep: &[std::os::fd::RawFd],
) -> Result<JailSpec, jail::Error> {
    let layout = jail::cgroup::Layout::detect()?;
    Ok(JailSpec {
        uid: options.uid,
        gid: options.gid,
        binds: vec![jail::Bind {
            path: dir.to_path_buf(),
            writable: true,
        }],
        cgroup: Some((
            cgroup_of(&layout, &jail::cgroup_name(options.uid), &options.limits),
            options.limits,
        )),
        rlimits: Rlimits {
            file_size: file_size_limit(files, memory_bytes),
            open_files: OPEN_FILES,
        },
        hostname: "keel-vm".into(),
        keep_fds: [files.raw_fds().as_slice(), also_keep].concat(),
        die_with_parent: false,
    })
}

/// The jail of `keel run` as root: the vsock socket's directory, if any, is all it sees.
/// Returns the spec and the cgroup to remove when the VM ends.
pub fn spec_for_run(
    config: &VmConfig,
    files: &HostFiles,
) -> Result<(JailSpec, jail::Cgroups), jail::Error> {
    let pid = std::process::id();
    let id = RUN_ID_BASE + pid;
    // The vsock socket's directory, read-only: the guest's connections to host programs need
    // it, nothing needs to write there (the listener was bound before the jail, and the
    // waiting `keel run` removes it).
    let binds: Vec<jail::Bind> = config
        .vsock
        .iter()
        .filter_map(|v| v.socket.parent())
        .map(|dir| jail::Bind {
            path: dir.to_path_buf(),
            writable: false,
        })
        .collect();
    let limits = limits_for(config.cpus, config.memory_bytes());
    let layout = jail::cgroup::Layout::detect()?;
    // Only the cgroups of `keel run`s that are gone: another one may have made its own and not
    // joined it yet (it is empty until then).
    layout.sweep_empty_where(|name| {
        name.strip_prefix("run-")
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
    });
    let cgroups = cgroup_of(&layout, &format!("run-{pid}"), &limits);
    Ok((
        JailSpec {
            uid: id,
            gid: id,
            binds,
            cgroup: Some((cgroups.clone(), limits)),
            rlimits: Rlimits {
                file_size: file_size_limit(files, config.memory_bytes()),
                open_files: OPEN_FILES,
            },
            hostname: "keel-vm".into(),
            keep_fds: files.raw_fds(),
            die_with_parent: true,
        },
        cgroups,
    ))
}
