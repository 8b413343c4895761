//! One cgroup per VM under a `keel` parent, on cgroup v2 or v1, whichever gives the memory
//! and pids controllers (this development host is hybrid: memory, pids and cpu on v1, an
//! empty v2). The VM's cgroup sits below the cgroup of the process that makes it (the daemon,
//! or `keel run`'s shell), so a host that limits Keel's service limits its VMs too.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("this host has no cgroup {0} controller (neither on cgroup v2 nor mounted on v1); Keel needs memory and pids to limit VMs. Mount them, or run without the jail (--no-jail). Inside `ip netns exec`, which remounts /sys without them, use `nsenter --net=/var/run/netns/NAME` instead")]
    NoController(&'static str),
    #[error("cgroup {path}: {what} failed: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Which cgroup version holds the controllers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Version::V1 => "cgroup v1",
            Version::V2 => "cgroup v2",
        })
    }
}

/// What one VM's cgroup allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    pub memory_bytes: u64,
    pub pids: u64,
    /// Percent of one CPU (200 = two CPUs); None: no CPU limit.
    pub cpu_percent: Option<u32>,
}

/// The controllers a VM's cgroup uses, each with the directory that is the parent of every
/// VM's cgroup on its hierarchy (`<mount>/<this process's cgroup>/keel`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub version: Version,
    memory: PathBuf,
    pids: PathBuf,
    cpu: Option<PathBuf>,
}

/// The mounts of cgroup hierarchies: (mount point, file system type, super options).
fn cgroup_mounts() -> Vec<(PathBuf, String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            let fstype = fields.get(sep + 1)?;
            let options = fields.get(sep + 3).unwrap_or(&"");
            if *fstype != "cgroup" && *fstype != "cgroup2" {
                return None;
            }
            Some((
                PathBuf::from(fields.get(4)?),
                fstype.to_string(),
                options.to_string(),
            ))
        })
        .collect()
}

/// This process's cgroup path on the v2 hierarchy ("0::/x") or on the v1 hierarchy that
/// holds `controller` ("4:memory:/x").
fn own_path(controller: Option<&str>) -> PathBuf {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, names, path) = (parts.next(), parts.next(), parts.next());
        let (Some(names), Some(path)) = (names, path) else {
            continue;
        };
        let hit = match controller {
            None => names.is_empty(),
            Some(c) => names.split(',').any(|n| n == c),
        };
        if hit {
            return PathBuf::from(path.trim_start_matches('/'));
        }
    }
    PathBuf::new()
}

impl Layout {
    /// What this host offers: v2 when its hierarchy has the memory and pids controllers,
    /// else the v1 hierarchies that have them.
    pub fn detect() -> Result<Layout> {
        let mounts = cgroup_mounts();
        if let Some((mount, _, _)) = mounts.iter().find(|(_, t, _)| t == "cgroup2") {
            // On v2 a cgroup that holds processes cannot hand controllers to its children
            // (the daemon's own cannot), so VMs' cgroups sit under the hierarchy's root,
            // which may: <mount>/keel/vm-ID. (Not exercised on this development host, whose
            // v2 hierarchy has no controllers.)
            let controllers =
                std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
            let has = |c: &str| controllers.split_whitespace().any(|n| n == c);
            if has("memory") && has("pids") {
                let parent = mount.join("keel");
                return Ok(Layout {
                    version: Version::V2,
                    memory: parent.clone(),
                    pids: parent.clone(),
                    cpu: has("cpu").then_some(parent),
                });
            }
        }
        let v1 = |controller: &'static str| {
            mounts
                .iter()
                .find(|(_, t, o)| t == "cgroup" && o.split(',').any(|n| n == controller))
                .map(|(mount, _, _)| mount.join(own_path(Some(controller))).join("keel"))
        };
        Ok(Layout {
            version: Version::V1,
            memory: v1("memory").ok_or(Error::NoController("memory"))?,
            pids: v1("pids").ok_or(Error::NoController("pids"))?,
            cpu: v1("cpu"),
        })
    }

    /// Removes the empty cgroups whose names start with `prefix` (those of VMMs that were
    /// killed before they could remove their own). A cgroup that holds a process stays; a
    /// fresh one another start made and has not joined yet is empty too, so a caller that can
    /// race with such a start uses [`Layout::sweep_empty_where`] to spare it.
    pub fn sweep_empty(&self, prefix: &str) {
        self.sweep_empty_where(|name| name.starts_with(prefix));
    }

    /// Removes the empty cgroups whose name `stale` picks (a cgroup with a process in it is
    /// never removed: the kernel refuses).
    pub fn sweep_empty_where(&self, stale: impl Fn(&str) -> bool) {
        let mut parents = vec![&self.memory, &self.pids];
        parents.extend(self.cpu.as_ref());
        for parent in parents {
            for entry in std::fs::read_dir(parent).into_iter().flatten().flatten() {
                let stale = entry.file_name().to_str().is_some_and(&stale);
                if stale && entry.path().is_dir() {
                    let _ = std::fs::remove_dir(entry.path());
                }
            }
        }
    }

    /// The cgroup of the VM called `name` (not created yet).
    pub fn vm(&self, name: &str) -> Cgroups {
        Cgroups {
            version: self.version,
            memory: self.memory.join(name),
            pids: self.pids.join(name),
            cpu: self.cpu.as_ref().map(|c| c.join(name)),
        }
    }

    /// What the host has, for the daemon's log and the front page.
    pub fn describe(&self) -> String {
        let cpu = if self.cpu.is_some() {
            ", cpu"
        } else {
            " (no cpu controller: CPU limits cannot be set)"
        };
        format!(
            "{}: memory at {}, pids at {}{cpu}",
            self.version,
            self.memory.display(),
            self.pids.display()
        )
    }
}

/// One VM's cgroup: a directory per hierarchy (one on v2, up to three on v1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroups {
    pub version: Version,
    memory: PathBuf,
    pids: PathBuf,
    cpu: Option<PathBuf>,
}

fn write(path: &Path, value: &str, what: &'static str) -> Result<()> {
    std::fs::write(path, value).map_err(|source| Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A `key value` line's value from a flat-keyed file (memory.events, memory.oom_control).
fn keyed(path: &Path, key: &str) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

impl Cgroups {
    /// The same cgroup without the cpu controller: for a VM without a CPU limit. Moving a
    /// process into a v1 cpu cgroup costs about 19 ms here (the kernel waits for an RCU
    /// grace period), more than all the rest of the jail together; without a limit there is
    /// nothing to gain from it.
    pub fn without_cpu(mut self) -> Cgroups {
        self.cpu = None;
        self
    }

    /// Distinct directories, v2's one directory once.
    fn dirs(&self) -> Vec<&Path> {
        let mut dirs: Vec<&Path> = vec![&self.memory, &self.pids];
        dirs.extend(self.cpu.as_deref());
        dirs.sort();
        dirs.dedup();
        dirs
    }

    /// Creates the directories and writes the limits. An existing cgroup of the same name (a
    /// VM's earlier run) is reused with the new limits.
    pub fn create(&self, limits: &CgroupLimits) -> Result<()> {
        for dir in self.dirs() {
            if let (Version::V2, Some(parent)) = (self.version, dir.parent()) {
                self.delegate_v2(parent)?;
            }
            std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                what: "creating it",
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let memory = limits.memory_bytes.to_string();
        let pids = limits.pids.to_string();
        match self.version {
            Version::V2 => {
                write(&self.memory.join("memory.max"), &memory, "the memory limit")?;
                // No swap: a VM's memory limit is a limit on RAM.
                let _ = std::fs::write(self.memory.join("memory.swap.max"), "0");
                write(&self.pids.join("pids.max"), &pids, "the pids limit")?;
            }
            Version::V1 => {
                write(
                    &self.memory.join("memory.limit_in_bytes"),
                    &memory,
                    "the memory limit",
                )?;
                write(&self.pids.join("pids.max"), &pids, "the pids limit")?;
            }
        }
        if let Some(cpu) = &self.cpu {
            const PERIOD_US: u64 = 100_000;
            let quota = limits
                .cpu_percent
                .map(|p| (u64::from(p) * PERIOD_US / 100).max(1_000));
            match (self.version, quota) {
                (Version::V2, Some(q)) => write(
                    &cpu.join("cpu.max"),
                    &format!("{q} {PERIOD_US}"),
                    "the CPU limit",
                )?,
                (Version::V2, None) => write(
                    &cpu.join("cpu.max"),
                    &format!("max {PERIOD_US}"),
                    "the CPU limit",
                )?,
                (Version::V1, q) => {
                    write(
                        &cpu.join("cpu.cfs_period_us"),
                        &PERIOD_US.to_string(),
                        "the CPU period",
                    )?;
                    let q = q.map_or("-1".to_string(), |q| q.to_string());
                    write(&cpu.join("cpu.cfs_quota_us"), &q, "the CPU limit")?;
                }
            }
        } else if limits.cpu_percent.is_some() {
            return Err(Error::NoController("cpu"));
        }
        Ok(())
    }

    /// On v2: the hierarchy's root hands memory, pids (and cpu, for a CPU limit) to the keel
    /// parent, which hands them to the VMs' cgroups; one controller a write, so that one the
    /// host lacks does not take the others with it. Checked by reading back.
    fn delegate_v2(&self, parent: &Path) -> Result<()> {
        std::fs::create_dir_all(parent).map_err(|source| Error::Io {
            what: "creating it",
            path: parent.to_path_buf(),
            source,
        })?;
        let mut wanted = vec!["memory", "pids"];
        if self.cpu.is_some() {
            wanted.push("cpu");
        }
        for level in [parent.parent(), Some(parent)].into_iter().flatten() {
            let control = level.join("cgroup.subtree_control");
            for c in &wanted {
                let _ = std::fs::write(&control, format!("+{c}"));
            }
            let enabled = std::fs::read_to_string(&control).unwrap_or_default();
            if let Some(missing) = wanted
                .iter()
                .find(|c| !enabled.split_whitespace().any(|n| n == **c))
            {
                return Err(Error::Io {
                    what: "handing its controllers down",
                    path: control,
                    source: io::Error::other(format!(
                        "the {missing} controller could not be enabled"
                    )),
                });
            }
        }
        Ok(())
    }

    /// Moves the calling process (with its threads) into the cgroup.
    pub fn join_self(&self) -> Result<()> {
        for dir in self.dirs() {
            write(&dir.join("cgroup.procs"), "0", "joining it")?;
        }
        Ok(())
    }

    /// The processes in the VM's cgroup (the pids controller's list: every VM process is in
    /// it on either version).
    pub fn processes(&self) -> Vec<u32> {
        std::fs::read_to_string(self.pids.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Memory in use, in bytes (page cache of the VM's disks included).
    pub fn memory_usage(&self) -> Option<u64> {
        match self.version {
            Version::V2 => read_u64(&self.memory.join("memory.current")),
            Version::V1 => read_u64(&self.memory.join("memory.usage_in_bytes")),
        }
    }

    /// The memory limit in force, in bytes.
    pub fn memory_limit(&self) -> Option<u64> {
        match self.version {
            Version::V2 => read_u64(&self.memory.join("memory.max")),
            Version::V1 => read_u64(&self.memory.join("memory.limit_in_bytes")),
        }
    }

    /// Highest memory use so far (v1 only keeps it; v2 from Linux 5.19 as memory.peak).
    pub fn memory_peak(&self) -> Option<u64> {
        match self.version {
            Version::V2 => read_u64(&self.memory.join("memory.peak")),
            Version::V1 => read_u64(&self.memory.join("memory.max_usage_in_bytes")),
        }
    }

    pub fn pids_current(&self) -> Option<u64> {
        read_u64(&self.pids.join("pids.current"))
    }

    pub fn pids_limit(&self) -> Option<u64> {
        read_u64(&self.pids.join("pids.max"))
    }

    /// How many processes of the cgroup the OOM killer has killed.
    pub fn oom_kills(&self) -> u64 {
        match self.version {
            Version::V2 => keyed(&self.memory.join("memory.events"), "oom_kill"),
            Version::V1 => keyed(&self.memory.join("memory.oom_control"), "oom_kill"),
        }
        .unwrap_or(0)
    }

    /// Removes the directories once no process is left in them.
    pub fn remove(&self) -> Result<()> {
        for dir in self.dirs() {
            match std::fs::remove_dir(dir) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(Error::Io {
                        what: "removing it",
                        path: dir.to_path_buf(),
                        source: e,
                    })
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_values_are_read_by_their_whole_key() {
        let dir = std::env::temp_dir().join(format!("keel-cg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("memory.oom_control");
        std::fs::write(&file, "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n").unwrap();
        assert_eq!(keyed(&file, "oom_kill"), Some(3));
        assert_eq!(keyed(&file, "under_oom"), Some(0));
        assert_eq!(keyed(&file, "oom"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn this_host_has_a_layout_with_memory_and_pids() {
        // Every host Keel runs on has them (this one on v1); a host without them fails with
        // what is missing, which the error's text is checked for elsewhere.
        let layout = Layout::detect().unwrap();
        let vm = layout.vm("x");
        assert!(vm.memory.ends_with("keel/x"), "{layout:?}");
        assert!(vm.pids.ends_with("keel/x"), "{layout:?}");
    }
}
