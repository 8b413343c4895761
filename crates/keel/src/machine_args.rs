//! The options that describe a machine, shared by `keel run` and `keel vm create`.

use std::path::PathBuf;

/// The machine a VM is: kernel, vCPUs, memory and devices. `keel run` and `keel vm create`
/// take the same options.
#[derive(clap::Args)]
pub struct MachineArgs {
    /// Kernel: an ELF vmlinux (PVH entry if it has the note) or a bzImage. Without it the VM
    /// boots from its first --disk: the kernel, initrd and options on that disk (Boot Loader
    /// Specification entries, or Debian's /vmlinuz, on an ext2/3/4 filesystem).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (with --kernel).
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (with disk boot: added after the disk's options).
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Number of vCPUs (1 to 32).
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u64,
    /// A virtio-blk disk on a raw file: path=PATH[,readonly=on][,direct=on][,serial=ID] with
    /// optional limits bw=BYTES/s, bw_burst=, iops=OPS/s, iops_burst= (K/M/G decimal, Ki/Mi/Gi
    /// binary). direct=on opens it with O_DIRECT (the host page cache bypassed). Repeatable.
    #[arg(
        long = "disk",
        value_name = "path=PATH[,readonly=on][,direct=on][,serial=ID][,bw=..][,iops=..]"
    )]
    pub disks: Vec<vmm::config::DiskConfig>,
    /// A virtio-net NIC on a tap device: tap=NAME[,mac=MAC] with optional limits bw=, iops=
    /// (as for --disk). Repeatable.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC][,bw=..][,iops=..]")]
    pub nets: Vec<vmm::config::NetConfig>,
    /// A virtio-rng device fed by the host's getrandom.
    #[arg(long)]
    pub rng: bool,
}
