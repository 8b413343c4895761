//! What the runs need: the probe (built with make), Keel (built with cargo), QEMU, /dev/kvm,
//! a disk image on a real file system, and a description of the machine.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

const QEMU_BINARY: &str = "qemu-system-x86_64";
/// statfs f_type of tmpfs.
const TMPFS_MAGIC: i64 = 0x0102_1994;

pub fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.join("..").canonicalize().with_context(|| {
        format!(
            "finding the workspace root above {} (the benchmark runs from its source tree)",
            manifest_dir.display()
        )
    })
}

pub fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
}

pub fn check_kvm() -> Result<()> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .context(
            "opening /dev/kvm (both VMMs need it): load the KVM module, and run as root or \
             as a member of the group that owns /dev/kvm",
        )
}

/// probe.elf: the given directory's if it has one, else built with make into it (default
/// target/probe, under the lock the whole-system tests take).
pub fn probe_elf(root: &Path, probe_dir: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(dir) = &probe_dir {
        let elf = dir.join("probe.elf");
        if elf.is_file() {
            return Ok(elf);
        }
    }
    let out = probe_dir.unwrap_or_else(|| target_dir(root).join("probe"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let lock_path = out.join(".build-lock");
    let lock = File::create(&lock_path)
        .with_context(|| format!("creating the probe build lock {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;
    let status = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(root.join("guest/probe"))
        .arg(format!("OUT={}", out.display()))
        .stdout(Stdio::null())
        .status()
        .context("running make to build the probe guest; is make installed?")?;
    if !status.success() {
        bail!(
            "building the probe guest failed ({status}): see make's messages above, or pass \
             --probe-dir with a directory holding a built probe.elf"
        );
    }
    Ok(out.join("probe.elf"))
}

/// The keel binary: the given one, or target/release/keel built now so that it is current.
pub fn keel_binary(root: &Path, keel: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(path) = keel {
        if !path.is_file() {
            bail!(
                "--keel {}: no such file; build it with: cargo build --release -p keel",
                path.display()
            );
        }
        return Ok(path);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("e2e: cargo build --release -p keel");
    let status = Command::new(cargo)
        .args(["build", "--release", "-p", "keel"])
        .current_dir(root)
        .stdout(Stdio::null())
        .status()
        .context("running cargo to build keel")?;
    let path = target_dir(root).join("release/keel");
    if !status.success() || !path.is_file() {
        bail!(
            "building keel failed ({status}): fix the build (cargo build --release -p keel), \
             or pass --keel PATH to measure an existing binary"
        );
    }
    Ok(path)
}

/// The QEMU binary and its version line.
pub fn qemu_binary(qemu: Option<PathBuf>) -> Result<(PathBuf, String)> {
    let path = match qemu {
        Some(path) => path,
        None => std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|dir| dir.join(QEMU_BINARY))
            .find(|p| p.is_file())
            .with_context(|| {
                format!(
                    "{QEMU_BINARY} is not in PATH: install it (apt-get install -y \
                     qemu-system-x86) or pass --qemu PATH"
                )
            })?,
    };
    let output = Command::new(&path)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} --version", path.display()))?;
    let version = String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .unwrap_or("QEMU, version unknown")
        .to_string();
    Ok((path, version))
}

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
pub fn warm_page_cache(path: &Path) -> Result<()> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    while file.read(&mut buf)? > 0 {}
    Ok(())
}

/// The machine, for the report's heading.
pub struct Host {
    pub date_utc: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub kernel: String,
    pub pvm: bool,
    pub load: String,
    pub qemu_version: String,
    /// HEAD of the source tree, and whether Keel's sources differ from it.
    pub commit: Option<String>,
}

pub fn host(root: &Path, qemu_version: String) -> Host {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".to_string())
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
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
        date_utc: keel_benches::report::utc_date(now.as_secs()),
        cpu_model,
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel: read("/proc/sys/kernel/osrelease"),
        pvm: Path::new("/sys/module/kvm_pvm").exists(),
        load: read("/proc/loadavg")
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        qemu_version,
        commit,
    }
}
