//! Host-wide ownership of a jail id while a VM runs with it. Each daemon hands out ids from
//! its store; two daemons on one host (two state directories) could hand out the same one,
//! so a VMM runs only while it holds its id's lock: `/run/keel/jail-ids/ID`, locked by the
//! daemon before the start and handed to the VMM, which keeps it until it ends (a VMM
//! killed outright releases it with its last descriptor).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Where the lock files live: on the host's tmpfs, gone with a reboot as the VMs are.
pub const LOCK_DIR: &str = "/run/keel/jail-ids";

#[derive(Debug, thiserror::Error)]
#[error("locking jail id {id} ({path}) failed: {source}")]
pub struct Error {
    id: u32,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Takes id `id` for a VMM about to start: Some(lock) to hand over, None when a running
/// VMM (of another daemon) has it.
pub fn lock(id: u32) -> Result<Option<OwnedFd>, Error> {
    let path = Path::new(LOCK_DIR).join(id.to_string());
    let fail = |source| Error {
        id,
        path: path.clone(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(LOCK_DIR)
        .map_err(fail)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(fail)?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(None);
        }
        return Err(fail(e));
    }
    Ok(Some(OwnedFd::from(file)))
}

/// The descriptor through which process `pid` holds id `id`'s lock, as its number there:
/// a daemon restarted under a running VMM holds no lock of its own and takes a copy of the
/// VMM's (see `ProcessHandle::copy_fd`), which shares the lock.
pub fn fd_in(pid: u32, id: u32) -> Option<i32> {
    let lock = Path::new(LOCK_DIR).join(id.to_string());
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .find(|e| std::fs::read_link(e.path()).is_ok_and(|target| target == lock))
        .and_then(|e| e.file_name().to_str()?.parse().ok())
}
