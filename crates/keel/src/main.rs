//! `keel`: the one binary. `keel run` boots a VM in the foreground with its serial console on
//! the terminal; `keel vmm` runs one VM detached, for the host daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmm::{VmConfig, VmExit};

/// Exit status when the VM could not be started.
const EXIT_START_FAILED: u8 = 1;
/// Exit status when the guest crashed or the VM failed while running.
const EXIT_GUEST_CRASHED: u8 = 3;

#[derive(Parser)]
#[command(
    name = "keel",
    version,
    about = "Keel: a server-virtualization host on Linux KVM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM in the foreground, its serial console on this terminal (Ctrl-A x quits).
    ///
    /// Exits 0 when the guest powers off or reboots (or on Ctrl-A x), 1 when the VM could not
    /// be started, 3 when the guest crashed.
    Run(RunArgs),
    /// Run the VM defined in RUN_DIR/vm.json detached, as the host daemon does (one per VM).
    ///
    /// Serves RUN_DIR/control.sock (newline-delimited JSON requests: status, power-button,
    /// stop) and RUN_DIR/console.sock (the serial console, raw bytes both ways), appends guest
    /// output to RUN_DIR/console.log, and writes RUN_DIR/exit.json when the VM ends. SIGTERM
    /// stops the VM like a stop request. Exits 0 when the guest powers off or reboots or the
    /// VM is stopped, 1 when the VM could not be started, 3 when the guest crashed.
    Vmm(VmmArgs),
}

#[derive(clap::Args)]
struct VmmArgs {
    /// The VM's run directory, holding vm.json.
    #[arg(long, value_name = "RUN_DIR")]
    dir: PathBuf,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kernel: an ELF vmlinux (PVH entry if it has the note) or a bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Number of vCPUs (1 to 32).
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// A virtio-blk disk on a raw file: path=PATH[,readonly=on][,serial=ID] with optional
    /// limits bw=BYTES/s, bw_burst=, iops=OPS/s, iops_burst= (K/M/G decimal, Ki/Mi/Gi binary).
    /// Repeatable.
    #[arg(
        long = "disk",
        value_name = "path=PATH[,readonly=on][,serial=ID][,bw=..][,iops=..]"
    )]
    disks: Vec<vmm::config::DiskConfig>,
    /// A virtio-net NIC on a tap device: tap=NAME[,mac=MAC] with optional limits bw=, iops=
    /// (as for --disk). Repeatable.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC][,bw=..][,iops=..]")]
    nets: Vec<vmm::config::NetConfig>,
    /// A virtio-rng device fed by the host's getrandom.
    #[arg(long)]
    rng: bool,
    /// A virtio-vsock device with guest CID N. Host programs reach guest port P by connecting
    /// to the Unix socket PATH and writing "CONNECT P\n"; the guest reaches host port P at
    /// the Unix socket PATH_P.
    #[arg(long, value_name = "cid=N,socket=PATH")]
    vsock: Option<vmm::config::VsockConfig>,
}

fn run(args: RunArgs) -> ExitCode {
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        cpus: args.cpus,
        memory_mib: args.memory,
        disks: args.disks,
        nets: args.nets,
        rng: args.rng,
        vsock: args.vsock,
        trace_startup: std::env::var_os("KEEL_TRACE_STARTUP").is_some(),
    };
    if vmm::host::is_pvm_host() {
        eprintln!("keel: {}", vmm::host::PVM_HOST_NOTE);
    }
    exit_status(vmm::run(&config).map_err(|e| e.to_string()))
}

fn exit_status(result: Result<VmExit, String>) -> ExitCode {
    match result {
        Ok(exit) => {
            eprintln!("keel: {exit}");
            match exit {
                VmExit::PowerOff | VmExit::Reboot | VmExit::ConsoleQuit | VmExit::Stopped(_) => {
                    ExitCode::SUCCESS
                }
                VmExit::Crash(_) | VmExit::Failed(_) => ExitCode::from(EXIT_GUEST_CRASHED),
            }
        }
        Err(e) => {
            eprintln!("keel: error: {e}");
            ExitCode::from(EXIT_START_FAILED)
        }
    }
}

fn vmm(args: VmmArgs) -> ExitCode {
    if vmm::host::is_pvm_host() {
        eprintln!("keel: {}", vmm::host::PVM_HOST_NOTE);
    }
    exit_status(vmm::service::run(&args.dir).map_err(|e| e.to_string()))
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run(args) => run(args),
        Command::Vmm(args) => vmm(args),
    }
}
