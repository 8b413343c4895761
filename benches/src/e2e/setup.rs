//! What the runs need: the probe (built with make), Keel (built with cargo), QEMU, /dev/kvm,
//! a disk image on a real file system, and a description of the machine.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

pub use keel_benches::tools::target_dir;

/// statfs f_type of tmpfs.
const TMPFS_MAGIC: i64 = 0x0102_1994;

fn is_tmpfs(dir: &Path) -> Result<bool> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .context("directory name with a NUL byte")?;
    // SAFETY: an all-zero statfs is a valid output buffer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs reads a NUL-terminated path and writes the struct it is given.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        bail!(
            "statfs {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(st.f_type as i64 == TMPFS_MAGIC)
}

/// A disk image of `mib` MiB of pseudo-random bytes in `dir` (made once, reused while its
/// size is right). `dir` must not be tmpfs: the disk workloads are about files on a disk.
pub fn disk_image(dir: &Path, mib: u64) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if is_tmpfs(dir)? {
        bail!(
            "{} is on tmpfs: the disk workloads need a file on a disk; pass --work-dir",
            dir.display()
        );
    }
    let path = dir.join("disk.img");
    let bytes = mib << 20;
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == bytes) {
        return Ok(path);
    }
    eprintln!("e2e: writing a {mib} MiB disk image at {}", path.display());
    let mut file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for word in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        file.write_all(&chunk)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(path)
}

/// Reads the whole file once, so that buffered readers find it in the page cache.
/// `raw` converted to qcow2 beside it (`qemu-img convert -O qcow2`: 64 KiB clusters, every
/// one allocated), made once and remade when the raw image is newer.
pub fn qcow2_image(raw: &Path) -> Result<PathBuf> {
    let qcow2 = raw.with_extension("qcow2");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if modified(&qcow2).is_some() && modified(&qcow2) >= modified(raw) {
        return Ok(qcow2);
    }
    let status = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(raw)
        .arg(&qcow2)
        .status()
        .context("running qemu-img (apt install qemu-utils)")?;
    anyhow::ensure!(
        status.success(),
        "qemu-img convert to {} failed",
        qcow2.display()
    );
    Ok(qcow2)
}

pub fn warm_page_cache(path: &Path) -> Result<()> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    while file.read(&mut buf)? > 0 {}
    Ok(())
}

/// The machine, for the report's heading.
pub struct Host {
    pub machine: keel_benches::report::Host,
    pub load: String,
    /// HEAD of the source tree, and whether Keel's sources differ from it.
    pub commit: Option<String>,
}

pub fn host(root: &Path, qemu_version: String) -> Host {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(root)
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]).map(|c| {
        match git(&["status", "--porcelain", "--", "crates"]) {
            Some(changes) if !changes.is_empty() => format!("{c}, with changes under crates/"),
            _ => c,
        }
    });
    Host {
        machine: keel_benches::report::Host::current(qemu_version),
        load: keel_benches::tools::loadavg(),
        commit,
    }
}
