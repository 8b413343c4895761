//! What a VM may touch on the host: its kernel, initrd and disks lie under the host's image
//! directories (`keel serve --images DIR`, default `STATE/images`), and are opened beneath
//! them (`openat2` with `RESOLVE_BENEATH`: no `..`, no symbolic link, no magic link leads
//! out). A path outside them is refused with the rule, without saying whether it exists, so
//! an API caller learns nothing of the host's files. Only regular files are opened.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};

use api::VmSpec;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} {path}: Keel opens VM files only under its image directories ({dirs}), named by absolute paths without '.' or '..'; put the file there or start keel serve with --images")]
    Outside {
        what: &'static str,
        path: String,
        dirs: String,
    },
    #[error("{what} {path} leads out of its image directory (through a symbolic link); Keel opens VM files only beneath the image directories")]
    Escapes { what: &'static str, path: String },
    #[error("{what} {path} is not a regular file")]
    NotAFile { what: &'static str, path: String },
    #[error("{what} {path}: opening it failed: {source}")]
    Open {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("image directory {path}: {why}")]
    BadDir { path: PathBuf, why: String },
    #[error("tap {tap} belongs to VM '{owner}'; a tap serves one VM")]
    TapTaken { tap: String, owner: String },
}

/// The host's image directories, each open (O_PATH) for lookups beneath it.
#[derive(Debug)]
pub struct ImageDirs {
    dirs: Vec<(PathBuf, OwnedFd)>,
}

/// Absolute, and only plain components: the lexical check that needs no file system.
fn plain_absolute(path: &str) -> Option<&Path> {
    let p = Path::new(path);
    let plain = p.is_absolute()
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    plain.then_some(p)
}

impl ImageDirs {
    /// Opens `dirs` (creating them, owner only, when missing). None may hold the state
    /// directory, nor lie inside it except under `STATE/images`: the store is never an image.
    pub fn new(dirs: &[PathBuf], state_dir: &Path) -> Result<ImageDirs, Error> {
        let state = state_dir
            .canonicalize()
            .unwrap_or_else(|_| state_dir.to_path_buf());
        let own = state.join("images");
        let mut opened = Vec::new();
        for dir in dirs {
            let bad = |why: &str| Error::BadDir {
                path: dir.clone(),
                why: why.to_string(),
            };
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| bad(&format!("creating it failed: {e}")))?;
            let canonical = dir
                .canonicalize()
                .map_err(|e| bad(&format!("resolving it failed: {e}")))?;
            if state.starts_with(&canonical) {
                return Err(bad(
                    "it holds the state directory (the store and ledger): use another directory",
                ));
            }
            if canonical.starts_with(&state) && !canonical.starts_with(&own) {
                return Err(bad(
                    "it lies inside the state directory: only STATE/images may be an image directory",
                ));
            }
            let file = File::options()
                .read(true)
                .custom_flags_dir()
                .open(&canonical)
                .map_err(|e| bad(&format!("opening it failed: {e}")))?;
            opened.push((canonical, OwnedFd::from(file)));
        }
        Ok(ImageDirs { dirs: opened })
    }

    /// The first image directory: the library and the VMs' own disks live there.
    pub fn first(&self) -> &Path {
        &self.dirs[0].0
    }

    /// The directories, as the refusals name them.
    pub fn describe(&self) -> String {
        self.dirs
            .iter()
            .map(|(d, _)| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The image directory `path` lies under, and the rest of the path below it (`.` for
    /// the image directory itself, when `dir_itself` allows it).
    fn locate<'a>(
        &self,
        what: &'static str,
        path: &'a str,
        dir_itself: bool,
    ) -> Result<(&OwnedFd, &'a Path), Error> {
        let p = plain_absolute(path).ok_or_else(|| self.outside(what, path))?;
        self.dirs
            .iter()
            .find_map(|(dir, fd)| match p.strip_prefix(dir).ok()? {
                rest if !rest.as_os_str().is_empty() => Some((fd, rest)),
                _ if dir_itself => Some((fd, Path::new("."))),
                _ => None,
            })
            .ok_or_else(|| self.outside(what, path))
    }

    /// Checks every file of `spec` lexically (at definition time; the start opens them).
    pub fn check_spec(&self, spec: &VmSpec) -> Result<(), Error> {
        for (what, path) in files_of(spec) {
            self.locate(what, path, false)?;
        }
        Ok(())
    }

    /// Opens `path` beneath its image directory with `flags` (O_RDONLY or O_RDWR and
    /// extras); only a regular file is returned.
    pub fn open(&self, what: &'static str, path: &str, flags: i32) -> Result<File, Error> {
        let (dir, rest) = self.locate(what, path, false)?;
        // O_NONBLOCK: a FIFO planted in an image directory must not hang the daemon.
        let file = self.open_beneath(what, path, dir, rest, flags | libc::O_NONBLOCK)?;
        let regular = file.metadata().is_ok_and(|m| m.is_file());
        if !regular {
            return Err(Error::NotAFile {
                what,
                path: path.to_string(),
            });
        }
        // Back to blocking I/O, as every other file.
        // SAFETY: F_SETFL on a descriptor this function owns.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) };
        Ok(file)
    }

    /// Opens directory `path`, an image directory or one beneath it, for making files in.
    pub fn open_dir(&self, what: &'static str, path: &str) -> Result<File, Error> {
        let (dir, rest) = self.locate(what, path, true)?;
        self.open_beneath(what, path, dir, rest, libc::O_RDONLY | libc::O_DIRECTORY)
    }

    fn outside(&self, what: &'static str, path: &str) -> Error {
        Error::Outside {
            what,
            path: path.to_string(),
            dirs: self.describe(),
        }
    }

    /// `openat2` of `rest` beneath `dir` with `flags`: no `..`, symbolic or magic link out.
    fn open_beneath(
        &self,
        what: &'static str,
        path: &str,
        dir: &OwnedFd,
        rest: &Path,
        flags: i32,
    ) -> Result<File, Error> {
        let name =
            CString::new(rest.as_os_str().as_bytes()).map_err(|_| self.outside(what, path))?;
        // SAFETY: open_how is plain data; all zero is "no flags".
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (flags | libc::O_CLOEXEC | libc::O_NOCTTY) as u64;
        how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
        // SAFETY: openat2 reads a NUL-terminated path and an open_how of the given size.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                name.as_ptr(),
                &how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd < 0 {
            let source = std::io::Error::last_os_error();
            return Err(match source.raw_os_error() {
                Some(libc::EXDEV) | Some(libc::ELOOP) => Error::Escapes {
                    what,
                    path: path.to_string(),
                },
                _ => Error::Open {
                    what,
                    path: path.to_string(),
                    source,
                },
            });
        }
        // SAFETY: openat2 returned a new descriptor that nothing else owns.
        Ok(unsafe { File::from_raw_fd(fd as i32) })
    }
}

/// `File::options()` for a directory: read-only, O_DIRECTORY (a small helper trait).
trait DirFlags {
    fn custom_flags_dir(&mut self) -> &mut Self;
}

impl DirFlags for std::fs::OpenOptions {
    fn custom_flags_dir(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
    }
}

/// The host files a definition names: (what, path).
fn files_of(spec: &VmSpec) -> Vec<(&'static str, &str)> {
    let mut files = Vec::new();
    if let Some(k) = &spec.kernel {
        files.push(("kernel", k.as_str()));
    }
    if let Some(i) = &spec.initrd {
        files.push(("initrd", i.as_str()));
    }
    for d in &spec.disks {
        files.push(("disk", d.path.as_str()));
    }
    files
}

/// A tap serves one VM: refuses `spec` when another VM of `others` names one of its taps.
pub fn check_taps<'a>(
    spec: &VmSpec,
    others: impl IntoIterator<Item = &'a VmSpec>,
) -> Result<(), Error> {
    for other in others {
        if other.name == spec.name {
            continue;
        }
        for nic in &spec.nets {
            if other.nets.iter().any(|n| n.tap == nic.tap) {
                return Err(Error::TapTaken {
                    tap: nic.tap.clone(),
                    owner: other.name.clone(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("keel-images-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn only_regular_files_beneath_an_image_directory_open() {
        let state = temp("state");
        let images = state.join("images");
        let dirs = ImageDirs::new(std::slice::from_ref(&images), &state).unwrap();
        std::fs::write(images.join("disk.img"), [0u8; 512]).unwrap();
        std::fs::write(state.join("keel.db"), b"secret").unwrap();
        let inside = format!("{}/disk.img", images.display());
        dirs.open("disk", &inside, libc::O_RDWR).unwrap();
        // Outside, or spelled with '..': refused by the rule alone, existing or not.
        for path in [
            "/etc/shadow".to_string(),
            "/no/such/file".to_string(),
            format!("{}/keel.db", state.display()),
            format!("{}/../keel.db", images.display()),
            "relative.img".to_string(),
        ] {
            let e = dirs.open("disk", &path, libc::O_RDONLY).unwrap_err();
            assert!(matches!(e, Error::Outside { .. }), "{path}: {e}");
            assert!(
                e.to_string().contains("only under its image directories"),
                "{e}"
            );
        }
        // A link inside that points out is refused when opened.
        std::os::unix::fs::symlink(state.join("keel.db"), images.join("db.img")).unwrap();
        std::os::unix::fs::symlink("/etc/shadow", images.join("shadow.img")).unwrap();
        for name in ["db.img", "shadow.img"] {
            let path = format!("{}/{name}", images.display());
            let e = dirs.open("disk", &path, libc::O_RDONLY).unwrap_err();
            assert!(matches!(e, Error::Escapes { .. }), "{path}: {e}");
        }
        // A directory or a FIFO is not a disk (and the FIFO does not hang the open).
        std::fs::create_dir(images.join("sub")).unwrap();
        let fifo = CString::new(format!("{}/fifo.img", images.display())).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        for name in ["sub", "fifo.img"] {
            let path = format!("{}/{name}", images.display());
            let e = dirs.open("disk", &path, libc::O_RDONLY).unwrap_err();
            assert!(matches!(e, Error::NotAFile { .. }), "{path}: {e}");
        }
        let _ = std::fs::remove_dir_all(state);
    }

    #[test]
    fn the_state_directory_is_never_an_image_directory() {
        let state = temp("state-dir");
        for bad in [
            state.clone(),
            state.join("vms"),
            state.parent().unwrap().to_path_buf(),
        ] {
            let e = ImageDirs::new(std::slice::from_ref(&bad), &state).unwrap_err();
            assert!(matches!(e, Error::BadDir { .. }), "{}: {e}", bad.display());
        }
        let _ = std::fs::remove_dir_all(state);
    }
}
