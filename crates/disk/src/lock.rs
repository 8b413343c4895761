//! Open-file-description locks on whole images: which VM, or program, may use a disk file.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::Error;

/// A lock request of `kind` (F_RDLCK, F_WRLCK or F_UNLCK) over the whole file, however it
/// grows (start 0, length 0).
fn whole_file(kind: libc::c_int) -> libc::flock {
    // SAFETY: flock is plain data; zeroed is a valid value to fill in.
    let mut region: libc::flock = unsafe { std::mem::zeroed() };
    region.l_type = kind as libc::c_short;
    region.l_whence = libc::SEEK_SET as libc::c_short;
    region
}

/// Locks the whole image with an open-file-description lock (F_OFD_SETLK): exclusive when
/// the VM writes it, shared when it only reads it. The lock lives as long as any descriptor
/// of this open file, in whichever process (the daemon's launcher, then the VMM), and ends
/// with the last one, so a VMM killed outright releases it. Programs that honour POSIX or OFD
/// locks (QEMU, qemu-img) are kept out while it is held.
pub fn lock(file: &File, path: &Path, read_only: bool) -> Result<(), Error> {
    let region = whole_file(if read_only {
        libc::F_RDLCK
    } else {
        libc::F_WRLCK
    });
    // SAFETY: F_OFD_SETLK reads one flock, which lives across the call.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &region) };
    if r == 0 {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    match source.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Err(Error::Locked {
            path: path.to_path_buf(),
            holder: if read_only {
                "a VM or program that writes it"
            } else {
                "another VM or program"
            },
        }),
        _ => Err(Error::Lock {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Releases the lock [`lock`] took on `file`'s open file description.
pub fn unlock(file: &File, path: &Path) -> Result<(), Error> {
    let region = whole_file(libc::F_UNLCK);
    // SAFETY: F_OFD_SETLK reads one flock, which lives across the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &region) } == 0 {
        return Ok(());
    }
    Err(Error::Lock {
        path: path.to_path_buf(),
        source: io::Error::last_os_error(),
    })
}

/// Whether a writer holds `file` (an exclusive lock like [`lock`]'s, on another open file):
/// a VM serving it as its disk, on this host or, where the file system carries OFD locks,
/// another.
pub fn write_locked(file: &File) -> io::Result<bool> {
    let mut region = whole_file(libc::F_RDLCK);
    // SAFETY: F_OFD_GETLK reads and fills one flock, which lives across the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut region) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // A shared lock would not stop a shared one: only a writer's comes back.
    Ok(region.l_type != libc::F_UNLCK as libc::c_short)
}

/// The order in which a VM's `count` disks (`read_only` each) are locked: the first
/// writable one, then the others in order. That first exclusive lock admits one VMM: the
/// arbiter of which runs a migrating guest, taken first by the VMMs on both hosts.
pub fn arbiter_first(read_only: &[bool], count: usize) -> Vec<usize> {
    let writable = |i: &usize| !read_only.get(*i).copied().unwrap_or(false);
    let first = (0..count).find(writable);
    first
        .into_iter()
        .chain((0..count).filter(move |&i| Some(i) != first))
        .collect()
}

#[cfg(test)]
mod write_lock_tests {
    use super::*;

    #[test]
    fn only_a_writers_lock_counts_as_written() {
        let path = std::env::temp_dir().join(format!("keel-wlock-{}", std::process::id()));
        std::fs::write(&path, b"x").unwrap();
        let open = || File::options().read(true).write(true).open(&path).unwrap();
        let (holder, probe) = (open(), open());
        assert!(!write_locked(&probe).unwrap());
        lock(&holder, &path, true).unwrap();
        assert!(!write_locked(&probe).unwrap(), "a reader's lock");
        unlock(&holder, &path).unwrap();
        lock(&holder, &path, false).unwrap();
        assert!(write_locked(&probe).unwrap(), "a writer's lock");
        drop(holder);
        assert!(!write_locked(&probe).unwrap(), "gone with its file");
        let _ = std::fs::remove_file(&path);
    }
}

#[cfg(test)]
mod lock_order_tests {
    use super::arbiter_first;

    #[test]
    fn the_first_writable_disk_is_locked_first() {
        assert_eq!(arbiter_first(&[true, false, false], 3), vec![1, 0, 2]);
        assert_eq!(arbiter_first(&[false, true], 2), vec![0, 1]);
        assert_eq!(arbiter_first(&[true, true], 2), vec![0, 1]);
        assert!(arbiter_first(&[], 0).is_empty());
    }
}
