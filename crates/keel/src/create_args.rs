//! `keel vm create`'s arguments, and the VM definition made of them.

use anyhow::{Context, Result};
use api::{DiskSpec, NetSpec, RateLimits, VmSpec, VsockSpec};
use clap::Args;

use crate::machine_args::MachineArgs;

#[derive(Args)]
pub struct CreateArgs {
    pub name: String,
    #[command(flatten)]
    machine: MachineArgs,
    /// A virtio-vsock device with this guest CID; its host side is vsock.sock in the VM's run
    /// directory (`keel vm show` names it).
    #[arg(long, value_name = "CID")]
    vsock_cid: Option<u64>,
    /// Start the VM whenever the host boots (when keel serve first starts on a boot).
    #[arg(long)]
    autostart: bool,
    /// At most this much CPU time, in percent of one CPU (150: one and a half CPUs).
    #[arg(long, value_name = "PERCENT")]
    cpu_limit: Option<u32>,
    /// cloud-init NoCloud data, read from these files now: the VM gets a seed disk (FAT,
    /// label cidata) after its other disks.
    #[arg(
        long = "cloud-init",
        value_name = "user-data=FILE[,meta-data=FILE][,network-config=FILE]"
    )]
    cloud_init: Option<String>,
    /// Start it now.
    #[arg(long)]
    pub start: bool,
}

/// `bw=`, `iops=`... as parsed for `keel run`, in the API's form.
fn limits_of(config: &devices::rate_limiter::RateLimitConfig) -> RateLimits {
    RateLimits {
        bw: config.bytes_per_sec.map(|v| v.get()),
        bw_burst: config.bytes_burst.map(|v| v.get()),
        iops: config.ops_per_sec.map(|v| v.get()),
        iops_burst: config.ops_burst.map(|v| v.get()),
    }
}

fn absolute(path: &std::path::Path) -> Result<String> {
    let abs =
        std::path::absolute(path).with_context(|| format!("making {} absolute", path.display()))?;
    Ok(abs.display().to_string())
}

/// `user-data=FILE[,meta-data=FILE][,network-config=FILE]`, the files read.
fn cloud_init(option: &str) -> Result<api::vm::CloudInit> {
    let (mut user, mut meta, mut network) = (None, None, None);
    for part in option.split(',') {
        let (key, file) = part.split_once('=').with_context(|| {
            format!("--cloud-init '{part}': expected user-data=FILE, meta-data=FILE or network-config=FILE")
        })?;
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("--cloud-init {key}: reading {file}"))?;
        match key {
            "user-data" => user = Some(text),
            "meta-data" => meta = Some(text),
            "network-config" => network = Some(text),
            other => anyhow::bail!(
                "--cloud-init: unknown key '{other}' (user-data, meta-data, network-config)"
            ),
        }
    }
    Ok(api::vm::CloudInit {
        user_data: user.context("--cloud-init needs user-data=FILE")?,
        meta_data: meta,
        network_config: network,
    })
}

impl CreateArgs {
    pub fn spec(&self) -> Result<VmSpec> {
        let disks = self
            .machine
            .disks
            .iter()
            .map(|d| {
                Ok(DiskSpec {
                    path: if d.image.is_some() {
                        String::new()
                    } else {
                        absolute(&d.path)?
                    },
                    format: d.spec_format(),
                    image: d.image.clone(),
                    size: d.size,
                    readonly: d.read_only,
                    direct: d.direct,
                    serial: d.serial.clone(),
                    limits: limits_of(&d.rate_limit),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let nets = self
            .machine
            .nets
            .iter()
            .map(|n| NetSpec {
                tap: n.tap.clone(),
                mac: n.mac.map(|m| {
                    m.iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":")
                }),
                limits: limits_of(&n.rate_limit),
            })
            .collect();
        let spec = VmSpec {
            name: self.name.clone(),
            kernel: self.machine.kernel.as_deref().map(absolute).transpose()?,
            initrd: self.machine.initrd.as_deref().map(absolute).transpose()?,
            cmdline: self.machine.cmdline.clone(),
            cpus: self.machine.cpus,
            memory_mib: self.machine.memory,
            disks,
            nets,
            rng: self.machine.rng,
            vsock: self.vsock_cid.map(|cid| VsockSpec { cid }),
            autostart: self.autostart,
            cpu_limit_percent: self.cpu_limit,
            cloud_init: self.cloud_init.as_deref().map(cloud_init).transpose()?,
        };
        spec.validate()?;
        Ok(spec)
    }
}
