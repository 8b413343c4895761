//! What every benchmark needs before it measures: the workspace, the probe guest (built with
//! make under the lock the whole-system tests take), the keel binary (built with cargo so it
//! is current), QEMU and /dev/kvm, each with an error that says what to install or pass.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::runner::Setup;

const QEMU_BINARY: &str = "qemu-system-x86_64";

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

/// probe.elf: the given directory's if it has one, else built with make.
pub fn probe_elf(root: &Path, probe_dir: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(dir) = &probe_dir {
        let elf = dir.join("probe.elf");
        if elf.is_file() {
            return Ok(elf);
        }
    }
    let out = probe_dir.unwrap_or_else(|| target_dir(root).join("probe"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    // The whole-system tests build into the same directory: take their lock.
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
    eprintln!("keel-benches: cargo build --release -p keel");
    let status = Command::new(cargo)
        .args(["build", "--release", "-p", "keel"])
        .current_dir(root)
        .stdout(Stdio::null())
        .status()
        .context("running cargo to build keel")?;
    let path = target_dir(root).join("release/keel");
    if !status.success() {
        bail!(
            "building keel failed ({status}): fix the build (cargo build --release -p keel), \
             or pass --keel PATH to measure an existing binary"
        );
    }
    if !path.is_file() {
        bail!(
            "{} is missing after building it; run: cargo build --release -p keel",
            path.display()
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
        .with_context(|| {
            format!(
                "running {} --version; install QEMU (apt-get install -y qemu-system-x86) or \
                 pass --qemu PATH",
                path.display()
            )
        })?;
    let version = String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .unwrap_or("QEMU, version unknown")
        .to_string();
    Ok((path, version))
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

/// The host CPU's model name, for the benchmark's description of the machine.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string())
}

/// The host kernel's release.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

/// The load averages over 1, 5 and 15 minutes: how busy the host is with other work.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// The options of every benchmark that boots the probe under Keel and QEMU: where the probe,
/// keel and QEMU are (each found or built when not given).
#[derive(clap::Args, Debug, Clone)]
pub struct VmmPaths {
    /// Directory holding probe.elf. Default: target/probe, built (or rebuilt) with make.
    #[arg(long)]
    pub probe_dir: Option<PathBuf>,
    /// The keel binary. Default: target/release/keel, built first with cargo.
    #[arg(long)]
    pub keel: Option<PathBuf>,
    /// The QEMU binary. Default: qemu-system-x86_64 from PATH.
    #[arg(long)]
    pub qemu: Option<PathBuf>,
}

/// What [`VmmPaths::prepare`] found or built.
pub struct Prepared {
    pub root: PathBuf,
    pub setup: Setup,
    /// QEMU's version line.
    pub qemu_version: String,
}

impl VmmPaths {
    /// Checks /dev/kvm, finds QEMU, and builds (or takes) the probe and keel.
    pub fn prepare(self) -> Result<Prepared> {
        check_kvm()?;
        let root = workspace_root()?;
        let (qemu, qemu_version) = qemu_binary(self.qemu)?;
        let probe_elf = probe_elf(&root, self.probe_dir)?;
        let keel = keel_binary(&root, self.keel)?;
        Ok(Prepared {
            root,
            setup: Setup {
                keel,
                qemu,
                probe_elf,
                keel_options: Vec::new(),
            },
            qemu_version,
        })
    }
}
