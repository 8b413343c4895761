//! What `keel run` asks for, and the checks that can be made before touching KVM.

use std::path::PathBuf;

use devices::rate_limiter::RateLimitConfig;

mod device_options;
pub use device_options::*;

/// Most vCPUs a Keel VM has (the MADT lists xAPIC ids, which stay below 255 anyway).
pub const MAX_VCPUS: u32 = 32;
/// Least guest memory: room for boot data below 1 MiB and a small kernel above it.
pub const MIN_MEMORY_MIB: u64 = 8;

#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The kernel file; `None` boots from the first disk (`disk::boot` finds the kernel there).
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    /// A virtio-rng device.
    pub rng: bool,
    pub vsock: Option<VsockConfig>,
    /// Print the VMM's own CPU time at the boot vCPU's first entry (for the benchmark).
    pub trace_startup: bool,
    /// Seccomp filters on every VMM thread (off only with `--no-jail`).
    pub seccomp: bool,
}

/// A request that cannot be met, said so that the user knows what to change.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--cpus {0}: a VM needs at least 1 vCPU")]
    NoCpus(u32),
    #[error("--cpus {asked}: at most {max} vCPUs are supported{why}")]
    TooManyCpus {
        asked: u32,
        max: u32,
        why: &'static str,
    },
    #[error("--memory {asked} MiB is too small: a VM needs at least {min} MiB")]
    MemoryTooSmall { asked: u64, min: u64 },
    #[error("--memory {asked} MiB is more than this host's RAM ({host} MiB); ask for less")]
    MemoryBeyondHost { asked: u64, host: u64 },
    #[error("kernel {path}: {reason}")]
    Kernel { path: PathBuf, reason: String },
    #[error("no kernel and no disk: give --kernel FILE, or a --disk that holds a kernel to boot from it")]
    NothingToBoot,
    #[error(
        "--initrd needs --kernel: a VM that boots from its disk takes the initrd from the disk"
    )]
    InitrdWithoutKernel,
    #[error("--disk {path}: {reason}")]
    Disk { path: PathBuf, reason: String },
    #[error("{asked} virtio devices asked for; at most {max} fit")]
    TooManyDevices { asked: usize, max: usize },
    #[error("initrd {path}: {reason}")]
    Initrd { path: PathBuf, reason: String },
    #[error("vm.json: {0}")]
    Spec(#[from] api::vm::SpecError),
    #[error("vm.json: disk {path}: {reason}")]
    SpecDisk { path: PathBuf, reason: String },
    #[error("vm.json: net on tap '{tap}': {reason}")]
    SpecNet { tap: String, reason: String },
    #[error("vm.json: vsock: {0}")]
    SpecVsock(String),
}

fn check_file(path: &PathBuf) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Err("is a directory, not a file".into()),
        Ok(m) if m.len() == 0 => Err("is empty".into()),
        Ok(_) => std::fs::File::open(path)
            .map(|_| ())
            .map_err(|e| describe_io(&e)),
        Err(e) => Err(describe_io(&e)),
    }
}

fn describe_io(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied (cannot read it)".into(),
        _ => e.to_string(),
    }
}

/// Host RAM in MiB, from /proc/meminfo.
pub fn host_memory_mib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// The rate limiter settings of a disk's or NIC's `limits` in a VM definition.
fn rate_limit_of(limits: &api::RateLimits) -> Result<RateLimitConfig, String> {
    let positive = |key: &str, value: Option<u64>| match value {
        Some(0) => Err(format!("limits.{key} is 0; leave it out for no limit")),
        v => Ok(v.and_then(std::num::NonZeroU64::new)),
    };
    let config = RateLimitConfig {
        bytes_per_sec: positive("bw", limits.bw)?,
        bytes_burst: positive("bw_burst", limits.bw_burst)?,
        ops_per_sec: positive("iops", limits.iops)?,
        ops_burst: positive("iops_burst", limits.iops_burst)?,
    };
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

impl VmConfig {
    /// The VM an `api::VmSpec` (the daemon's `vm.json`) describes, with its vsock socket (if
    /// it has vsock) at `vsock_socket`. Checks the spec itself; the files are checked by
    /// [`validate`] when the VM starts.
    ///
    /// [`validate`]: VmConfig::validate
    pub fn from_spec(
        spec: &api::VmSpec,
        vsock_socket: &std::path::Path,
    ) -> Result<VmConfig, Error> {
        spec.validate()?;
        let disks = spec
            .disks
            .iter()
            .map(|d| {
                if let Some(serial) = &d.serial {
                    if serial.len() > MAX_SERIAL_BYTES || !serial.is_ascii() {
                        return Err(Error::SpecDisk {
                            path: d.path.clone().into(),
                            reason: format!(
                                "serial '{serial}': at most {MAX_SERIAL_BYTES} ASCII characters"
                            ),
                        });
                    }
                }
                Ok(DiskConfig {
                    path: d.path.clone().into(),
                    image: None,
                    size: None,
                    format: match d.format {
                        api::vm::DiskFormat::Raw => disk::Format::Raw,
                        api::vm::DiskFormat::Qcow2 => disk::Format::Qcow2,
                    },
                    read_only: d.readonly,
                    direct: d.direct,
                    serial: d.serial.clone(),
                    rate_limit: rate_limit_of(&d.limits).map_err(|reason| Error::SpecDisk {
                        path: d.path.clone().into(),
                        reason,
                    })?,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let nets = spec
            .nets
            .iter()
            .map(|n| {
                let bad = |reason: String| Error::SpecNet {
                    tap: n.tap.clone(),
                    reason,
                };
                if n.tap.is_empty() || n.tap.len() > MAX_TAP_NAME_BYTES {
                    return Err(bad(format!(
                        "a tap name is 1 to {MAX_TAP_NAME_BYTES} bytes"
                    )));
                }
                let mac = n.mac.as_deref().map(parse_mac).transpose().map_err(bad)?;
                Ok(NetConfig {
                    tap: n.tap.clone(),
                    mac,
                    rate_limit: rate_limit_of(&n.limits).map_err(bad)?,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(VmConfig {
            kernel: spec.kernel.clone().map(PathBuf::from),
            initrd: spec.initrd.clone().map(PathBuf::from),
            cmdline: spec.cmdline.clone(),
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            disks,
            nets,
            rng: spec.rng,
            vsock: match &spec.vsock {
                Some(v) => Some(VsockConfig {
                    cid: check_guest_cid(v.cid).map_err(Error::SpecVsock)?,
                    socket: vsock_socket.to_path_buf(),
                }),
                None => None,
            },
            trace_startup: false,
            seccomp: true,
        })
    }

    /// Checks what can be checked without KVM: vCPU count, memory size, files.
    pub fn validate(&self) -> Result<(), Error> {
        self.validate_machine()?;
        self.validate_files()
    }

    /// The checks of [`VmConfig::validate`] that need no file: vCPUs, memory, what boots.
    pub fn validate_machine(&self) -> Result<(), Error> {
        if self.cpus == 0 {
            return Err(Error::NoCpus(self.cpus));
        }
        if self.cpus > MAX_VCPUS {
            return Err(Error::TooManyCpus {
                asked: self.cpus,
                max: MAX_VCPUS,
                why: "",
            });
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(Error::MemoryTooSmall {
                asked: self.memory_mib,
                min: MIN_MEMORY_MIB,
            });
        }
        if let Some(host) = host_memory_mib() {
            if self.memory_mib > host {
                return Err(Error::MemoryBeyondHost {
                    asked: self.memory_mib,
                    host,
                });
            }
        }
        match &self.kernel {
            Some(_) => {}
            None if self.disks.is_empty() => return Err(Error::NothingToBoot),
            None if self.initrd.is_some() => return Err(Error::InitrdWithoutKernel),
            None => {}
        }
        if self.disks.len() > arch::layout::MAX_VIRTIO_DEVICES {
            return Err(Error::TooManyDevices {
                asked: self.disks.len(),
                max: arch::layout::MAX_VIRTIO_DEVICES,
            });
        }
        Ok(())
    }

    /// The files of the definition exist and are readable files.
    fn validate_files(&self) -> Result<(), Error> {
        if let Some(kernel) = &self.kernel {
            check_file(kernel).map_err(|reason| Error::Kernel {
                path: kernel.clone(),
                reason,
            })?;
        }
        if let Some(initrd) = &self.initrd {
            check_file(initrd).map_err(|reason| Error::Initrd {
                path: initrd.clone(),
                reason,
            })?;
        }
        for disk in &self.disks {
            if let Some(image) = &disk.image {
                return Err(Error::Disk {
                    path: disk.path.clone(),
                    reason: format!("image={image}: images are kept by keel serve (keel vm create --disk image=...); keel run takes path="),
                });
            }
            check_file(&disk.path).map_err(|reason| Error::Disk {
                path: disk.path.clone(),
                reason,
            })?;
        }
        Ok(())
    }

    pub fn virtio_device_count(&self) -> usize {
        self.disks.len()
            + self.nets.len()
            + usize::from(self.rng)
            + usize::from(self.vsock.is_some())
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convert(json: &str) -> Result<VmConfig, Error> {
        VmConfig::from_spec(&spec(json), std::path::Path::new("/run/vm/vsock.sock"))
    }

    fn config() -> VmConfig {
        VmConfig {
            kernel: Some("/proc/self/exe".into()),
            initrd: None,
            cmdline: String::new(),
            cpus: 1,
            memory_mib: 64,
            disks: Vec::new(),
            nets: Vec::new(),
            rng: false,
            vsock: None,
            trace_startup: false,
            seccomp: true,
        }
    }

    #[test]
    fn sane_config_passes() {
        config().validate().unwrap();
    }

    #[test]
    fn cpu_count_is_bounded() {
        let e = VmConfig {
            cpus: 0,
            ..config()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("at least 1 vCPU"));
        let e = VmConfig {
            cpus: 33,
            ..config()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("at most 32"));
    }

    #[test]
    fn memory_is_bounded_by_the_floor_and_the_host() {
        let e = VmConfig {
            memory_mib: 4,
            ..config()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("too small"), "{e}");
        let e = VmConfig {
            memory_mib: 1 << 30,
            ..config()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("more than this host's RAM"), "{e}");
    }

    fn spec(json: &str) -> api::VmSpec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn specs_convert_with_defaults() {
        let c = convert(
            r#"{"name":"web1","kernel":"/k","initrd":"/rd","cmdline":"console=ttyS0","cpus":2,
                "memory_mib":512,"rng":true,
                "disks":[{"path":"/d.img","readonly":true,"direct":true,"serial":"s1"}],
                "nets":[{"tap":"tap0","mac":"52:54:00:12:34:56"},{"tap":"tap1"}]}"#,
        )
        .unwrap();
        assert_eq!(c.kernel, Some(PathBuf::from("/k")));
        assert_eq!(c.initrd, Some(PathBuf::from("/rd")));
        assert_eq!(
            (c.cmdline.as_str(), c.cpus, c.memory_mib),
            ("console=ttyS0", 2, 512)
        );
        assert!(c.rng && c.vsock.is_none() && !c.trace_startup);
        assert_eq!(
            c.disks,
            vec![DiskConfig {
                path: "/d.img".into(),
                format: disk::Format::Raw,
                image: None,
                size: None,
                read_only: true,
                direct: true,
                serial: Some("s1".into()),
                rate_limit: RateLimitConfig::default(),
            }]
        );
        assert_eq!(c.nets[0].mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(c.nets[1].mac, None);
        assert!(c.nets.iter().all(|n| n.rate_limit.is_unlimited()));
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        let e = convert(r#"{"name":"a","kernel":"k"}"#).unwrap_err();
        assert!(e.to_string().contains("relative"), "{e}");
        let e =
            convert(r#"{"name":"a","kernel":"/k","nets":[{"tap":"t","mac":"01:00:5e:00:00:01"}]}"#)
                .unwrap_err();
        assert!(
            e.to_string().contains("tap 't'") && e.to_string().contains("multicast"),
            "{e}"
        );
        let e = convert(r#"{"name":"a","kernel":"/k","nets":[{"tap":"a-name-far-too-long"}]}"#)
            .unwrap_err();
        assert!(e.to_string().contains("1 to 15 bytes"), "{e}");
        let e = convert(
            r#"{"name":"a","kernel":"/k","disks":[{"path":"/d","serial":"123456789012345678901"}]}"#,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("disk /d") && e.to_string().contains("at most 20"),
            "{e}"
        );
    }

    #[test]
    fn missing_and_directory_kernels_are_named() {
        let e = VmConfig {
            kernel: Some("/nonexistent/vmlinux".into()),
            ..config()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.to_string(), "kernel /nonexistent/vmlinux: no such file");
        let e = VmConfig {
            kernel: Some("/".into()),
            ..config()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("is a directory"));
        let e = VmConfig {
            initrd: Some("/nonexistent/rd".into()),
            ..config()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.to_string(), "initrd /nonexistent/rd: no such file");
    }

    #[test]
    fn spec_limits_and_vsock_reach_the_config() {
        let c = convert(
            r#"{"name":"a","kernel":"/k","vsock":{"cid":7},
                "disks":[{"path":"/d","limits":{"bw":1000000,"iops":100,"iops_burst":10}}],
                "nets":[{"tap":"t0","limits":{"bw":500}}]}"#,
        )
        .unwrap();
        let disk = &c.disks[0].rate_limit;
        assert_eq!(disk.bytes_per_sec.map(|v| v.get()), Some(1_000_000));
        assert_eq!(disk.ops_burst.map(|v| v.get()), Some(10));
        assert_eq!(
            c.nets[0].rate_limit.bytes_per_sec.map(|v| v.get()),
            Some(500)
        );
        let vsock = c.vsock.unwrap();
        assert_eq!(
            (vsock.cid, vsock.socket.to_str()),
            (7, Some("/run/vm/vsock.sock"))
        );
        let zero =
            convert(r#"{"name":"a","kernel":"/k","disks":[{"path":"/d","limits":{"bw":0}}]}"#);
        assert!(zero.unwrap_err().to_string().contains("limits.bw is 0"));
        let burst =
            convert(r#"{"name":"a","kernel":"/k","nets":[{"tap":"t","limits":{"bw_burst":5}}]}"#);
        assert!(burst.is_err());
        let cid = convert(r#"{"name":"a","kernel":"/k","vsock":{"cid":2}}"#);
        assert!(cid.unwrap_err().to_string().contains("reserved"));
    }
}
