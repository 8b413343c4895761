//! What a VM uses of the host, opened before the VMM enters its jail (where it can name no
//! host file): /dev/kvm, the kernel and initrd, the disks, a plain read-only view of the boot
//! disk for disk boot's reader, and the taps. `keel run` opens them by path; `keel vmm`
//! started by the daemon is handed the files as descriptors (the daemon decides which files
//! a VM may use) and opens /dev/kvm and its taps itself before jailing.

use std::fs::File;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;

use devices::virtio::net::tap::Tap;
use devices::virtio::net::TAP_VNET_HDR_LEN;
use kvm_ioctls::Kvm;

use crate::config::VmConfig;
use crate::{host, virtio_devices};

/// A file and the name it is known by in messages.
pub struct NamedFile {
    pub file: File,
    pub name: String,
}

/// Everything of the host a VM needs, open.
pub struct HostFiles {
    pub kvm: Kvm,
    pub kernel: Option<NamedFile>,
    pub initrd: Option<NamedFile>,
    /// Disk boot's reader reads this: the first disk, read-only, never `O_DIRECT` (the
    /// reader's reads are not aligned).
    pub boot_image: Option<NamedFile>,
    /// Each disk's files: the image and, for qcow2, its backing chain.
    pub disks: Vec<disk::ImageFiles>,
    pub taps: Vec<Tap>,
    /// vsock's host-side listener, bound where the definition says (before the jail: the
    /// jailed user may not create files there).
    pub vsock_listener: Option<UnixListener>,
    /// The host-wide lock of the VMM's jail id, handed over by the daemon after the disks:
    /// held, never used, until the VMM ends.
    pub jail_id_lock: Option<File>,
    /// Transparent huge pages can back a memfd here (see [`host::shmem_huge_pages`]).
    pub shmem_huge_pages: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} {path}: opening it failed: {source}; check the path and its permissions")]
    Open {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("handed descriptor {fd} for {what} is not open: the VMM must be started by keel serve, or without --handed-files")]
    NotHanded { fd: RawFd, what: String },
}

/// The first descriptor a launcher hands over; the files follow in the order kernel,
/// initrd, boot image, disks (each present only when the definition has it; a qcow2 disk
/// is followed by its backing chain, nearest first).
pub const FIRST_HANDED_FD: RawFd = 3;

/// Whether disk boot's reader needs its own view of the first disk: a raw one (another
/// format is read through its format, on the disk's own files).
fn needs_boot_image(config: &VmConfig) -> bool {
    config.kernel.is_none()
        && config
            .disks
            .first()
            .is_some_and(|d| d.format == disk::Format::Raw)
}

impl HostFiles {
    /// Opens everything by the paths in `config` (`keel run`, or `keel vmm` by hand).
    pub fn open(config: &VmConfig, open_taps: bool) -> Result<Self, crate::Error> {
        config.validate()?;
        let open = |what: &'static str, path: &Path| {
            File::open(path)
                .map(|file| NamedFile {
                    file,
                    name: path.display().to_string(),
                })
                .map_err(|source| Error::Open {
                    what,
                    path: path.display().to_string(),
                    source,
                })
        };
        let kernel = config
            .kernel
            .as_deref()
            .map(|p| open("kernel", p))
            .transpose()?;
        let initrd = config
            .initrd
            .as_deref()
            .map(|p| open("initrd", p))
            .transpose()?;
        let boot_image = match config.disks.first() {
            Some(d) if needs_boot_image(config) => Some(open("boot disk", &d.path)?),
            _ => None,
        };
        let disks = config
            .disks
            .iter()
            .map(|d| disk::ImageFiles::open(&d.path, d.format, d.read_only, d.direct))
            .collect::<Result<Vec<_>, _>>()
            .map_err(virtio_devices::Error::from)?;
        Self::with_devices(config, [kernel, initrd, boot_image], disks, None, open_taps)
    }

    /// The files opened so far and what every VMM opens itself: /dev/kvm, the taps, vsock's
    /// listener.
    fn with_devices(
        config: &VmConfig,
        [kernel, initrd, boot_image]: [Option<NamedFile>; 3],
        disks: Vec<disk::ImageFiles>,
        jail_id_lock: Option<File>,
        open_taps: bool,
    ) -> Result<Self, crate::Error> {
        Ok(Self {
            kvm: host::open_kvm()?,
            kernel,
            initrd,
            boot_image,
            disks,
            taps: if open_taps {
                self::open_taps(config)?
            } else {
                Vec::new()
            },
            vsock_listener: listen_vsock(config)?,
            jail_id_lock,
            shmem_huge_pages: host::shmem_huge_pages(),
        })
    }

    /// What a VMM taking a guest over opens itself: /dev/kvm and vsock's listener, and its
    /// taps when `open_taps` (a guest from another host). The disks (and otherwise the
    /// taps) come from the old VMM; no kernel is loaded. A daemon's launch hands only the
    /// jail id's lock.
    pub fn for_takeover(
        config: &VmConfig,
        handed: bool,
        open_taps: bool,
    ) -> Result<Self, crate::Error> {
        let jail_id_lock = if handed {
            // SAFETY: F_GETFD only asks whether the descriptor is open.
            let open = unsafe { libc::fcntl(FIRST_HANDED_FD, libc::F_GETFD) } >= 0;
            // SAFETY: the launcher handed this descriptor to this process alone.
            open.then(|| unsafe { File::from_raw_fd(FIRST_HANDED_FD) })
        } else {
            None
        };
        Ok(Self {
            kvm: host::open_kvm()?,
            kernel: None,
            initrd: None,
            boot_image: None,
            disks: Vec::new(),
            taps: if open_taps {
                self::open_taps(config)?
            } else {
                Vec::new()
            },
            // The running VMM still listens at the socket's name: this one takes it over
            // on the old VMM's go (see `takeover_name`).
            vsock_listener: config
                .vsock
                .as_ref()
                .map(|v| {
                    devices::virtio::vsock::unix::listen(&takeover_name(&v.socket))
                        .map_err(|e| crate::Error::from(virtio_devices::Error::from(e)))
                })
                .transpose()?,
            jail_id_lock,
            shmem_huge_pages: host::shmem_huge_pages(),
        })
    }

    /// Every descriptor these files hold: what the jailed VMM keeps.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        use std::os::fd::AsRawFd;
        let mut fds = vec![self.kvm.as_raw_fd()];
        for named in [&self.kernel, &self.initrd, &self.boot_image]
            .into_iter()
            .flatten()
        {
            fds.push(named.file.as_raw_fd());
        }
        fds.extend(
            self.disks
                .iter()
                .flat_map(|d| d.files())
                .map(|f| f.as_raw_fd()),
        );
        fds.extend(self.taps.iter().map(|t| t.as_raw_fd()));
        fds.extend(self.vsock_listener.iter().map(|l| l.as_raw_fd()));
        fds.extend(self.jail_id_lock.iter().map(|l| l.as_raw_fd()));
        fds
    }

    /// Takes the files a launcher handed over from [`FIRST_HANDED_FD`] on, in the order the
    /// definition names them; opens /dev/kvm and the taps.
    pub fn handed(config: &VmConfig, open_taps: bool) -> Result<Self, crate::Error> {
        config.validate_machine()?;
        let mut next = FIRST_HANDED_FD;
        let mut take = |what: String| -> Result<File, Error> {
            let fd = next;
            next += 1;
            // SAFETY: F_GETFD only asks whether `fd` is open.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(Error::NotHanded { fd, what });
            }
            // SAFETY: the launcher opened `fd` for this process and nothing else owns it;
            // it is taken once (next moves on).
            let file = unsafe { File::from_raw_fd(fd) };
            // Not to be inherited by the disk-boot reader or anything else.
            // SAFETY: sets FD_CLOEXEC on a descriptor this process owns.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            Ok(file)
        };
        let named = |file: File, name: &Path| NamedFile {
            file,
            name: name.display().to_string(),
        };
        let kernel = match &config.kernel {
            Some(p) => Some(named(take(format!("kernel {}", p.display()))?, p)),
            None => None,
        };
        let initrd = match &config.initrd {
            Some(p) => Some(named(take(format!("initrd {}", p.display()))?, p)),
            None => None,
        };
        let boot_image = match config.disks.first() {
            Some(d) if needs_boot_image(config) => Some(named(
                take(format!("boot disk {}", d.path.display()))?,
                &d.path,
            )),
            _ => None,
        };
        // Each disk, then its backing chain: the daemon walked the same headers to open
        // them in this order.
        let mut disks = Vec::new();
        for d in &config.disks {
            let top = take(format!("disk {}", d.path.display()))?;
            let files = disk::ImageFiles::with_backing(top, &d.path, d.format, &mut |p| {
                take(format!("backing file {}", p.display())).map_err(|e| e.to_string())
            })
            .map_err(virtio_devices::Error::from)?;
            disks.push(files);
        }
        // The daemon's lock of the jail id, when it handed one.
        let jail_id_lock = take("the jail id's lock".into()).ok();
        Self::with_devices(
            config,
            [kernel, initrd, boot_image],
            disks,
            jail_id_lock,
            open_taps,
        )
    }
}

/// Where a VMM taking a guest over binds a socket whose name the running VMM holds, until
/// it renames it into place.
pub fn takeover_name(path: &Path) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".new");
    name.into()
}

fn listen_vsock(config: &VmConfig) -> Result<Option<UnixListener>, crate::Error> {
    config
        .vsock
        .as_ref()
        .map(|v| {
            devices::virtio::vsock::unix::listen(&v.socket)
                .map_err(|e| virtio_devices::Error::from(e).into())
        })
        .transpose()
}

fn open_taps(config: &VmConfig) -> Result<Vec<Tap>, crate::Error> {
    config
        .nets
        .iter()
        .map(|n| {
            Tap::open(&n.tap, TAP_VNET_HDR_LEN).map_err(|e| virtio_devices::Error::from(e).into())
        })
        .collect()
}
