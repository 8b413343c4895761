//! The control socket of one `keel vmm`: newline-delimited JSON, one request and one response
//! per line, several per connection. The daemon uses it to ask how the VM is, to press the
//! power button and to stop the VM; it finds everything in the VM's run directory.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Files in a VM's run directory (`<state dir>/vms/<name>/`).
pub mod files {
    /// The VM's definition as `keel vmm` reads it (JSON of `VmSpec`).
    pub const SPEC: &str = "vm.json";
    /// Control socket (this protocol).
    pub const CONTROL_SOCKET: &str = "control.sock";
    /// Serial console: bytes both ways; several clients may attach.
    pub const CONSOLE_SOCKET: &str = "console.sock";
    /// Everything the guest wrote to its serial console (appended across boots).
    pub const CONSOLE_LOG: &str = "console.log";
    /// Why the VMM ended (JSON of `ExitRecord`), written atomically just before it exits.
    pub const EXIT_RECORD: &str = "exit.json";
    /// The host side of the VM's virtio-vsock device, when it has one.
    pub const VSOCK_SOCKET: &str = "vsock.sock";
    /// The VMM's own stderr.
    pub const VMM_LOG: &str = "vmm.log";
    /// Where a new VMM (`keel vmm --takeover`) waits for the running one to hand it the
    /// guest; it is gone once the new VMM has it.
    pub const TAKEOVER_SOCKET: &str = "takeover.sock";
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case")]
pub enum Request {
    /// Who are you and how is the VM.
    Status,
    /// Press the ACPI power button (graceful shutdown; the guest decides).
    PowerButton,
    /// Power the VM off now (the VMM exits).
    Stop,
    /// The devices' counters.
    Metrics,
    /// Stop the vCPUs at an instruction boundary and quiesce the devices.
    Pause,
    /// Let a paused VM run on.
    Resume,
    /// Save the VM's state into `NAME/state` and `NAME/memory` of the run directory (both
    /// made, empty, by the caller: a jailed VMM makes no file). A running VM is paused for
    /// it and runs on after, unless `stay_paused`; a paused one stays paused.
    ///
    /// With `switch_disks`, the named disks go on in new qcow2 images once the state is saved
    /// and before the guest runs again (overlays a snapshot starts on the disks' present
    /// files, which it keeps): the files come with the request line as SCM_RIGHTS
    /// descriptors, for each disk in order its `files`: the new image (read and write), then
    /// its backing chain as its headers name it. The present files are synced first; all the
    /// disks switch or none does, and if none does the snapshot fails.
    Snapshot {
        name: String,
        #[serde(default)]
        stay_paused: bool,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        switch_disks: Vec<DiskSwitch>,
    },
    /// Turn KVM's log of the pages the guest writes on or off.
    DirtyLog { on: bool },
    /// The pages written since the last such request (the log must be on): by the guest
    /// (KVM's log) and, once a migration started, by the VMM's devices.
    DirtyPages,
    /// Start a live migration's tracking: KVM's log goes on and what the devices wrote so far
    /// is forgotten. The answer names the memfd holding guest memory (a descriptor of this
    /// process, which the daemon opens through /proc).
    MigrationStart,
    /// A live migration's switch, in one request (the guest stands still from here): pause,
    /// read what was written since the last `dirty-pages`, write the disks back and release
    /// their locks for the VMM that takes the guest over, and save the VM's state. On an
    /// error the VMM has undone what it did: the locks are taken back and the guest runs.
    MigrationSwitch,
    /// Take (`held`) or release the locks on the VM's disks, paused only: a VM migrating away
    /// releases them for the VMM that takes it over, and takes them again if it stays.
    DiskLocks { held: bool },
    /// Tell the network the guest is here (it arrived from another host): each NIC sends a
    /// broadcast RARP from its MAC. Answered with how many did.
    Announce,
    /// Hand the guest to the new VMM listening on the run directory's `takeover.sock`
    /// (`keel vmm --takeover`): on success this VMM ends and the new one runs the guest.
    HandOver,
}

/// Most descriptors a snapshot's request may carry: 18 disks (the most a VM has), each an
/// overlay over a chain of 16.
pub const MAX_SNAPSHOT_FDS: usize = 18 * 17;

/// One disk a snapshot switches (see [`Request::Snapshot`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSwitch {
    /// The disk's place in the VM's definition.
    pub index: usize,
    /// The new image's path, which its backing names are resolved against (the VMM opens
    /// nothing by it).
    pub path: String,
    /// How many of the request's descriptors are this disk's: the image and its chain.
    pub files: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "kebab-case")]
pub enum Response {
    Status(VmmStatus),
    Metrics(VmmMetrics),
    Paused(PauseReport),
    Resumed(ResumeReport),
    Snapshot(SnapshotReport),
    HandedOver(HandOverReport),
    /// Pages written, and which: bit `i` of the bitmap (64 pages a word, lowest bit first)
    /// is the page at offset `i * 4096` of guest RAM, its regions one after the other.
    DirtyPages {
        pages: u64,
        #[serde(default)]
        bitmap: Vec<u64>,
    },
    MigrationStarted(MigrationStart),
    /// `disk-locks {held: true}` found the first writable disk locked by another VMM (a
    /// migration's target that took the guest): nothing was taken.
    LockedElsewhere {
        message: String,
    },
    MigrationSwitched(Box<SwitchReport>),
    Announced {
        nics: u32,
    },
    Done,
    Error {
        message: String,
    },
}

/// Where a migrating VM's memory is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStart {
    /// The VMM's descriptor of the memfd holding guest RAM.
    pub memfd: i32,
    pub memory_bytes: u64,
}

/// What a migration's switch left: a paused guest, its disks unlocked, its last written
/// pages and its state (times from the VMM's monotonic clock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchReport {
    pub pause: PauseReport,
    /// Reading the dirty logs, microseconds.
    pub dirty_us: u64,
    /// Writing the disks back, syncing them and releasing their locks, microseconds.
    pub release_us: u64,
    /// Then until the state was saved (the vCPUs save theirs meanwhile), microseconds.
    pub state_us: u64,
    /// The pages written since the last `dirty-pages` (its bitmap's layout).
    pub bitmap: Vec<u64>,
    pub state: GuestState,
}

/// A VM's state as its VMM saves it: JSON text, carried as a string that the daemons
/// forward untouched (neither parses it; the VMM that takes the guest checks it as the
/// hostile input it may be).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GuestState(pub String);

impl GuestState {
    pub fn json(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for GuestState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GuestState({} bytes)", self.0.len())
    }
}

/// What a VMM says about itself. The daemon checks `name` and `pid` before it adopts one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmStatus {
    pub name: String,
    pub pid: u32,
    /// Whether the guest runs (false only before the vCPUs start).
    pub running: bool,
    /// Power button presses so far.
    pub power_button_presses: u64,
    /// Whether the VM is paused (its vCPUs stopped, its devices quiet).
    #[serde(default)]
    pub paused: bool,
}

/// How a pause went, as the VMM measured it (monotonic clock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseReport {
    /// From the request to the last vCPU stopped, in microseconds.
    pub vcpus_stopped_us: u64,
    /// Then until every device had finished the requests it had taken.
    pub devices_settled_us: u64,
}

/// What a snapshot wrote and how long the guest stood still for it (monotonic clock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotReport {
    /// From the request to the VM running again (0 when it stays paused), microseconds.
    pub paused_us: u64,
    /// Saving the state and writing both files (not counting their sync), microseconds.
    pub write_us: u64,
    /// Bytes of guest memory written (pages the guest touched, not all zero).
    pub memory_bytes_written: u64,
    pub state_bytes: u64,
    /// Switching the disks to their new images (syncing their present files first),
    /// microseconds; 0 when none was asked.
    #[serde(default)]
    pub disks_switched_us: u64,
    /// Syncing the snapshot's files failed (the snapshot is not whole), and why; the disks
    /// switched all the same. An error answer instead means no disk switched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsynced: Option<String>,
}

/// A handover, as the old VMM measured it (monotonic clock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandOverReport {
    /// From the vCPUs stopped to `go` sent to the new VMM, microseconds; the new VMM starts
    /// the vCPUs right after it reads `go`.
    pub paused_us: u64,
}

/// How long the guest stood still, as the VMM measured it (monotonic clock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeReport {
    /// From the last vCPU stopped to the vCPUs let go, in microseconds.
    pub paused_us: u64,
}

/// What the VMM's devices have done since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmMetrics {
    /// In the order of the VM's definition.
    pub disks: Vec<DiskMetrics>,
    pub nets: Vec<NetMetrics>,
}

/// One disk: requests taken from its ring and their data bytes, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskMetrics {
    pub read_requests: u64,
    pub read_bytes: u64,
    pub write_requests: u64,
    pub write_bytes: u64,
    pub flush_requests: u64,
    pub other_requests: u64,
    /// Answered with an error status.
    pub failed_requests: u64,
    /// Times the rate limiter made a request wait.
    pub throttled: u64,
}

/// One NIC: frames and bytes each way, frames dropped, rate-limiter holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetMetrics {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub throttled: u64,
}

/// Why a VMM ended, as it recorded it in `exit.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ExitReason {
    /// The guest powered off.
    PowerOff,
    /// The guest rebooted (the daemon starts it again).
    Reboot,
    /// Stopped through the control socket.
    Stopped,
    /// The guest crashed (triple fault, emulation failure).
    GuestCrash,
    /// The VM could not start or KVM failed under it.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub reason: ExitReason,
    pub detail: String,
    /// Wall-clock time of the exit in ms since the epoch: a record for the ledger only.
    pub time_ms: i64,
}

/// Writes a run-directory file (or any state file) atomically: a temporary file beside it,
/// fsync, rename, fsync of the directory. A reader, or a restart after a crash at any point,
/// sees the old content or the new, never part of it. The daemon and the VMM both use it.
pub fn write_atomically(path: &std::path::Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    AtomicFile::create(path, mode)?.commit(bytes)
}

/// Largest run-directory file read (definition, exit record).
pub const MAX_RUN_FILE_BYTES: u64 = 1 << 20;

/// Reads a file of a run directory, which belongs to the VM's jailed user and may have been
/// replaced: a link is not followed, a FIFO does not block, only a regular file of at most
/// [`MAX_RUN_FILE_BYTES`] is read. The daemon and the VMM both use it.
pub fn read_run_file(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.len() > MAX_RUN_FILE_BYTES {
        return Err(std::io::Error::other(format!(
            "not a regular file of at most {MAX_RUN_FILE_BYTES} bytes"
        )));
    }
    let mut bytes = Vec::new();
    file.take(MAX_RUN_FILE_BYTES).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The temporary file of an atomic write, made ahead of its content: a jailed VMM opens the
/// one for its exit record before its seccomp filters forbid making files, and commits it
/// at its end. Made with `O_EXCL | O_NOFOLLOW` (the run directory belongs to the VM's jailed
/// user: a link left under the temporary name is never followed).
pub struct AtomicFile {
    path: std::path::PathBuf,
    tmp: std::path::PathBuf,
    file: std::fs::File,
}

impl Drop for AtomicFile {
    /// Never committed (its writer had nothing to record after all): the temporary file
    /// goes. After a commit it is renamed away already.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

impl AtomicFile {
    pub fn create(path: &std::path::Path, mode: u32) -> std::io::Result<AtomicFile> {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => std::path::Path::new("."),
        };
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        // The pid alone is not unique: jailed VMMs each have their own pid namespace, and
        // an upgrade's two VMMs share the run directory.
        let mut salt = [0u8; 8];
        // SAFETY: getrandom fills the buffer it is given, of its length.
        let got = unsafe { libc::getrandom(salt.as_mut_ptr().cast(), salt.len(), 0) };
        if got != salt.len() as isize {
            // No randomness: the clock's nanoseconds still tell two VMMs apart.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            salt = nanos.to_le_bytes();
        }
        let tmp = dir.join(format!(
            ".{name}.{}.{:x}.tmp",
            std::process::id(),
            u64::from_le_bytes(salt)
        ));
        let open = || {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)
        };
        let file = match open() {
            // Left by an earlier writer of the same pid: removed (the link itself, if one).
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                std::fs::remove_file(&tmp)?;
                open()?
            }
            other => other?,
        };
        Ok(AtomicFile {
            path: path.to_path_buf(),
            tmp,
            file,
        })
    }

    /// Writes `bytes`, fsyncs, renames over the path, fsyncs the directory.
    pub fn commit(mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let written = (|| {
            self.file.write_all(bytes)?;
            self.file.sync_all()?;
            std::fs::rename(&self.tmp, &self.path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        written?;
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => std::path::Path::new("."),
        };
        std::fs::File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_json_line_each() {
        assert_eq!(
            serde_json::to_string(&Request::PowerButton).unwrap(),
            r#"{"request":"power-button"}"#
        );
        let r: Response = serde_json::from_str(
            r#"{"response":"status","name":"a","pid":7,"running":true,"power_button_presses":0}"#,
        )
        .unwrap();
        assert!(matches!(r, Response::Status(VmmStatus { pid: 7, .. })));
    }
}
