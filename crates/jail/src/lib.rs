//! Sandboxing of a VMM process, set up by the process itself while it still has one thread
//! and root's rights, before it runs guest code (as Firecracker's jailer does before exec):
//!
//! 1. [`cgroup`]: the VM's own cgroup with memory, pids and CPU limits, joined first;
//! 2. new mount, PID, IPC, UTS and network namespaces; a fork makes the VMM PID 1 of its own
//!    PID namespace ([`enter`] returns [`Entered::Parent`] to the process that stays outside);
//! 3. [`mounts`]: `pivot_root` into an empty tmpfs that holds only the bound directories, then
//!    remounted read-only;
//! 4. rlimits (no core files, a file-size cap, a descriptor cap);
//! 5. [`identity`]: the VM's own uid and gid, no supplementary groups, no capabilities in any
//!    set, `no_new_privs`.
//!
//! Files the VMM needs (kernel, disks, taps, /dev/kvm) are opened before [`enter`]; inside
//! the jail it can name no host file. Seccomp filters come last, per thread, from
//! [`seccomp`].

pub mod cgroup;
mod identity;
mod mounts;
pub mod seccomp;

use std::io;
use std::path::PathBuf;

pub use cgroup::{CgroupLimits, Cgroups};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the jail must be set up while the process has one thread; it has {0}")]
    Threads(usize),
    #[error("setting up the jail: {what} failed: {source}")]
    Step {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Cgroup(#[from] cgroup::Error),
    #[error("setting up the jail needs root (CAP_SYS_ADMIN and CAP_SETUID); run as root, or without the jail (--no-jail)")]
    NotRoot,
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn step(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Step { what, source }
}

/// Turns a libc return value into an io::Result.
pub(crate) fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Memory a VMM uses beyond its guest's RAM: its binary and heap, vCPU stacks and KVM's
/// per-vCPU pages, disk boot's reader, io_uring rings, the page cache of its disks' recent
/// I/O. Measured (docs/benchmarks.md): an idle probe VM peaks at about 8 MiB over its
/// touched guest memory; the rest is room for the page cache and the reader.
pub const MEMORY_OVERHEAD_BYTES: u64 = 64 << 20;

/// Threads beyond the vCPUs: the event loop, disk boot's reader, and io_uring's workers
/// (which count as the process's tasks).
pub const PIDS_OVERHEAD: u64 = 64;

/// The limits of a VM of `cpus` vCPUs and `memory_bytes` of RAM.
pub fn limits_for(cpus: u32, memory_bytes: u64) -> CgroupLimits {
    CgroupLimits {
        memory_bytes: memory_bytes.saturating_add(MEMORY_OVERHEAD_BYTES),
        pids: u64::from(cpus) + PIDS_OVERHEAD,
        cpu_percent: None,
    }
}

/// The name of the cgroup of a VMM jailed with id `id` (ids are unique among running VMs).
pub fn cgroup_name(id: u32) -> String {
    format!("vm-{id}")
}

/// Resource limits inside the jail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimits {
    /// Largest file offset the VMM may write at (RLIMIT_FSIZE): its disks and logs.
    pub file_size: u64,
    /// Most open descriptors (RLIMIT_NOFILE).
    pub open_files: u64,
}

/// Everything one VMM's jail is made of.
#[derive(Debug, Clone)]
pub struct JailSpec {
    /// The VM's own uid and gid; never 0, never shared with another VM.
    pub uid: u32,
    pub gid: u32,
    /// Host directories the VMM sees, at the same paths (its run directory, read-write; the
    /// directory of `keel run`'s vsock socket, read-only: connecting needs no write access).
    pub binds: Vec<Bind>,
    /// The VM's cgroup: created under `parent`, limited, and joined before anything else.
    pub cgroup: Option<(Cgroups, CgroupLimits)>,
    pub rlimits: Rlimits,
    pub hostname: String,
    /// Descriptors above 2 the jailed process keeps (the VM's files, opened before); every
    /// other one is closed, whatever the process inherited.
    pub keep_fds: Vec<std::os::fd::RawFd>,
    /// End the jailed process when the parent outside ends (`keel run`, a foreground
    /// program: killing it kills the VM). A daemon's launcher ends on purpose: not there.
    pub die_with_parent: bool,
}

/// A host directory bound into the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub path: PathBuf,
    pub writable: bool,
}

/// Which side of the jail's fork this process is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entered {
    /// Outside: still root, in the host's namespaces; `child` (a pid of this namespace) is
    /// the jailed process.
    Parent { child: u32 },
    /// Inside the jail: PID 1 of its own namespace, unprivileged.
    Jailed,
}

/// Threads of this process, from /proc.
fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Sets up the jail described by `spec`. Returns twice, as fork does: in the parent (outside,
/// unchanged but for its cgroup and new namespaces it will not use) and in the jailed child.
/// An error after the fork is returned in the child (nothing of the VMM has run yet).
pub fn enter(spec: &JailSpec) -> Result<Entered> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::NotRoot);
    }
    let threads = thread_count();
    if threads != 1 {
        return Err(Error::Threads(threads));
    }
    let last_cap = identity::last_capability()?;
    if let Some((cgroups, limits)) = &spec.cgroup {
        cgroups.create(limits)?;
    }
    // Only the PID namespace before the fork (it is the children's); the others are the
    // child's alone, so that the parent keeps the host's mounts (pivot_root in a shared
    // mount namespace would move the parent's root too), network, IPC and host name.
    // SAFETY: unshare takes flags only; this process has one thread.
    check(unsafe { libc::unshare(libc::CLONE_NEWPID) })
        .map_err(step("unshare of the PID namespace"))?;
    // SAFETY: the process has one thread, so the child is a complete copy that may run any
    // code; the parent goes on unchanged.
    let pid = check(unsafe { libc::fork() }).map_err(step("fork into the PID namespace"))?;
    if pid > 0 {
        return Ok(Entered::Parent { child: pid as u32 });
    }
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNET;
    // SAFETY: unshare takes flags only; this child has one thread.
    check(unsafe { libc::unshare(flags) }).map_err(step("unshare of the namespaces"))?;
    // A failure from here on is the child's: the caller reports it as a failed start.
    // The child alone joins the VM's cgroup ("0": the writing process, whatever its pid in
    // the new namespace); the parent stays where it was, so the cgroup empties with the VM.
    if let Some((cgroups, limits)) = &spec.cgroup {
        cgroups.join_self().or_else(|e| {
            // Removed meanwhile (a previous run's cleanup racing this start): once more.
            cgroups.create(limits)?;
            cgroups.join_self().map_err(|_| e)
        })?;
    }
    end_on_stop_signals();
    close_other_fds(&spec.keep_fds)?;
    confine(spec, last_cap)?;
    Ok(Entered::Jailed)
}

/// The signals that end a process by default. PID 1 of a namespace ignores a signal whose
/// action is the default (only SIGKILL gets through), so that `kill PID` of a jailed VMM
/// still ends it, each gets a handler that ends the process as the default would have,
/// unless the process already chose what to do with it.
fn end_on_stop_signals() {
    extern "C" fn end(signal: libc::c_int) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + signal) };
    }
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: sigaction is plain data; a null new action only reads the current one.
        let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: reads the current action into `current`.
        unsafe { libc::sigaction(signal, std::ptr::null(), &mut current) };
        if current.sa_sigaction == libc::SIG_DFL {
            // SAFETY: the handler only calls _exit.
            unsafe { libc::signal(signal, end as *const () as libc::sighandler_t) };
        }
    }
}

/// Closes every descriptor above 2 but `keep` (close_range over the gaps between them; where
/// the kernel or a filter refuses close_range, each descriptor /proc lists, one by one).
fn close_other_fds(keep: &[std::os::fd::RawFd]) -> Result<()> {
    let mut kept: Vec<u32> = keep
        .iter()
        .filter(|fd| **fd > 2)
        .map(|fd| *fd as u32)
        .collect();
    kept.sort_unstable();
    kept.dedup();
    let mut from = 3u32;
    let mut refused = false;
    for &fd in kept.iter().chain([u32::MAX].iter()) {
        if fd > from {
            // SAFETY: close_range takes plain integers; it closes only descriptors of this
            // process, none of which is in use by another thread (there is one).
            refused |= unsafe { libc::syscall(libc::SYS_close_range, from, fd - 1, 0u32) } != 0;
        }
        from = fd.saturating_add(1);
    }
    if !refused {
        return Ok(());
    }
    let open: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map_err(step("listing the descriptors to close"))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    for fd in open {
        if fd > 2 && !kept.contains(&(fd as u32)) {
            // SAFETY: closes a descriptor of this single-threaded process that nothing keeps
            // (the one read_dir used is closed already and fails harmlessly).
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

/// The jailed child's part: mounts, limits and identity, in that order (mounting needs root).
fn confine(spec: &JailSpec, last_cap: u32) -> Result<()> {
    let name = spec.hostname.as_bytes();
    // SAFETY: the pointer and length describe `name`, which lives across the call.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
        .map_err(step("setting the host name"))?;
    mounts::pivot_into_empty_root(&spec.binds)?;
    set_rlimits(&spec.rlimits)?;
    identity::drop_to(spec.uid, spec.gid, last_cap)?;
    if spec.die_with_parent {
        // After the identity change, which clears it.
        // SAFETY: prctl with plain integer arguments.
        check(unsafe {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            )
        })
        .map_err(step("tying the VMM to its parent"))?;
    }
    Ok(())
}

fn set_rlimits(limits: &Rlimits) -> Result<()> {
    for (resource, value, what) in [
        (libc::RLIMIT_CORE, 0, "RLIMIT_CORE"),
        (libc::RLIMIT_FSIZE, limits.file_size, "RLIMIT_FSIZE"),
        (libc::RLIMIT_NOFILE, limits.open_files, "RLIMIT_NOFILE"),
    ] {
        let limit = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: `limit` is a valid rlimit for the duration of the call.
        check(unsafe { libc::setrlimit(resource, &limit) }).map_err(step(what))?;
    }
    Ok(())
}

/// What a launcher (the host daemon) tells `keel vmm` about its jail, as one command-line
/// value: `uid=U,gid=G,memory=BYTES,pids=N[,cpu=PERCENT]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchOptions {
    pub uid: u32,
    pub gid: u32,
    pub limits: CgroupLimits,
}

impl std::fmt::Display for LaunchOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "uid={},gid={},memory={},pids={}",
            self.uid, self.gid, self.limits.memory_bytes, self.limits.pids
        )?;
        if let Some(cpu) = self.limits.cpu_percent {
            write!(f, ",cpu={cpu}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for LaunchOptions {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let (mut uid, mut gid, mut memory, mut pids, mut cpu) = (None, None, None, None, None);
        for part in text.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("'{part}': expected key=value"))?;
            let number = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| format!("{key}={v}: expected a number"))
            };
            match key {
                "uid" => uid = Some(number(value)?),
                "gid" => gid = Some(number(value)?),
                "memory" => memory = Some(number(value)?),
                "pids" => pids = Some(number(value)?),
                "cpu" => cpu = Some(number(value)?),
                other => return Err(format!("unknown jail option '{other}'")),
            }
        }
        let id = |v: Option<u64>, key: &str| match v {
            Some(v @ 1..0xffff_fffe) => Ok(v as u32),
            Some(v) => Err(format!("{key}={v}: must be a non-root id below 4294967294")),
            None => Err(format!("{key}= is missing")),
        };
        Ok(LaunchOptions {
            uid: id(uid, "uid")?,
            gid: id(gid, "gid")?,
            limits: CgroupLimits {
                memory_bytes: memory.ok_or("memory= is missing")?,
                pids: pids.ok_or("pids= is missing")?,
                cpu_percent: cpu
                    .map(|c| u32::try_from(c).map_err(|_| format!("cpu={c}: too large")))
                    .transpose()?,
            },
        })
    }
}

/// Waits for the jailed `child` from the parent outside, passing on the signals that ask a
/// process to end (SIGTERM, SIGINT, SIGHUP, SIGQUIT); returns the exit status to end with
/// (128 + the signal when the child was killed by one, as a shell reports it).
pub fn wait_forwarding_signals(child: u32) -> i32 {
    const FORWARDED: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];
    // SAFETY: sigset_t is plain data, initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    unsafe { libc::sigemptyset(&mut set) };
    for signal in FORWARDED.into_iter().chain([libc::SIGCHLD]) {
        // SAFETY: valid set and signal number.
        unsafe { libc::sigaddset(&mut set, signal) };
    }
    // SAFETY: blocks the set in this (single-threaded) process; old mask not wanted.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let pid = child as libc::pid_t;
    loop {
        let mut status = 0;
        // SAFETY: waits without blocking for our own child.
        let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if reaped == pid {
            return if libc::WIFSIGNALED(status) {
                128 + libc::WTERMSIG(status)
            } else {
                libc::WEXITSTATUS(status)
            };
        }
        if reaped < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return 1;
        }
        // SAFETY: siginfo_t is plain data that sigwaitinfo fills.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waits for one signal of a valid set.
        let signal = unsafe { libc::sigwaitinfo(&set, &mut info) };
        if FORWARDED.contains(&signal) {
            // SAFETY: kill with our own child's pid.
            unsafe { libc::kill(pid, signal) };
        }
    }
}
