//! The jail's file system: an empty tmpfs that holds only the bound directories (at their
//! host paths) and a /proc of the jail's own processes, made the root with `pivot_root`, the host's root detached, the new root
//! remounted read-only. Runs in the jail's own mount namespace, so the host sees none of it.

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::{check, step, Error, Result};

/// Where the new root is assembled. Any directory that exists on every host will do: the
/// tmpfs is mounted over it in the jail's mount namespace only.
const STAGING: &str = "/tmp";
/// Size of the root tmpfs: it holds directories only.
const ROOT_TMPFS_OPTIONS: &str = "size=64k,nr_inodes=256,mode=0755";

fn cstring(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::Step {
        what: format!("using the path {}", path.display()),
        source: std::io::Error::other("it contains a NUL byte"),
    })
}

fn mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> std::io::Result<()> {
    let c = |s: Option<&str>| s.map(|s| CString::new(s).unwrap_or_default());
    let (source, fstype, data) = (c(source), c(fstype), c(data));
    let target = CString::new(target.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    check(unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    })
    .map(|_| ())
}

/// A detached copy of the mount at `path` (open_tree OPEN_TREE_CLONE): taken before the
/// staging tmpfs may hide the path.
fn clone_tree(path: &Path) -> Result<OwnedFd> {
    let c = cstring(path)?;
    // SAFETY: open_tree reads a NUL-terminated path; the result is checked.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC,
        )
    };
    check(fd as libc::c_int).map_err(step(format!("binding {}", path.display())))?;
    // SAFETY: open_tree returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn attach(tree: &OwnedFd, target: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let c = cstring(target)?;
    let empty = c"";
    // SAFETY: move_mount with a valid detached-mount descriptor and NUL-terminated paths.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    check(r as libc::c_int).map_err(step(format!("mounting at {}", target.display())))?;
    Ok(())
}

/// Absolute and plain: no `..`, no `.`, so the path inside the new root cannot leave it;
/// and not `/` itself (the host's whole root in the jail).
fn plain_absolute(path: &Path) -> Result<PathBuf> {
    let ok = path.is_absolute()
        && path.components().any(|c| matches!(c, Component::Normal(_)))
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !ok {
        return Err(Error::Step {
            what: format!("binding {}", path.display()),
            source: std::io::Error::other("a bound directory must be an absolute plain path"),
        });
    }
    Ok(path.to_path_buf())
}

pub(crate) fn pivot_into_empty_root(binds: &[crate::Bind]) -> Result<()> {
    // Nothing mounted from here on propagates back to the host.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )
    .map_err(step("making the mounts private"))?;
    let trees = binds
        .iter()
        .map(|b| Ok((plain_absolute(&b.path)?, clone_tree(&b.path)?, b.writable)))
        .collect::<Result<Vec<_>>>()?;
    let staging = Path::new(STAGING);
    mount(
        Some("keel-jail"),
        staging,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some(ROOT_TMPFS_OPTIONS),
    )
    .map_err(step("mounting the jail's root tmpfs"))?;
    for (path, tree, writable) in &trees {
        let inside = staging.join(path.strip_prefix("/").unwrap_or(path));
        std::fs::create_dir_all(&inside)
            .map_err(step(format!("creating {} in the jail", path.display())))?;
        attach(tree, &inside)?;
        let read_only = if *writable { 0 } else { libc::MS_RDONLY };
        mount(
            None,
            &inside,
            None,
            libc::MS_BIND
                | libc::MS_REMOUNT
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | libc::MS_NOEXEC
                | read_only,
            None,
        )
        .map_err(step(format!("restricting the bind of {}", path.display())))?;
    }
    // The process's own /proc (its thread count and address space are read from there):
    // a proc of the jail's PID namespace with only the process directories (subset=pid:
    // no /proc/sys, no host-wide files), read-only.
    let proc_dir = staging.join("proc");
    std::fs::create_dir(&proc_dir).map_err(step("creating /proc in the jail"))?;
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY,
        Some("subset=pid"),
    )
    .map_err(step("mounting the jail's /proc"))?;
    std::env::set_current_dir(staging).map_err(step("entering the jail's root"))?;
    // pivot_root(".", "."): the old root ends up stacked on the new one, and is then
    // detached; no directory for it is needed.
    let dot = c".";
    // SAFETY: pivot_root with two NUL-terminated paths.
    check(unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } as i32)
        .map_err(step("pivot_root into the jail"))?;
    // SAFETY: umount2 with a NUL-terminated path.
    check(unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) })
        .map_err(step("detaching the host's root"))?;
    std::env::set_current_dir("/").map_err(step("entering the jail's root"))?;
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_BIND
            | libc::MS_REMOUNT
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC,
        None,
    )
    .map_err(step("making the jail's root read-only"))?;
    Ok(())
}
