//! `keel-vmm`: one VM in this process, jailed. `keel-vmm run` boots a VM in the foreground
//! with its serial console on the terminal; `keel-vmm vmm --dir RUN_DIR` runs one detached,
//! as the host daemon starts it. A binary of its own (less code and fewer pages in every
//! jailed process): it links the VMM and the jail, none of the daemon's code (no HTTP
//! server, no SQLite, no TLS); `keel run` and `keel vmm` exec it.

#[path = "../machine_args.rs"]
mod machine_args;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use machine_args::MachineArgs;
use vmm::{VmConfig, VmExit};

/// Exit status when the VM could not be started.
const EXIT_START_FAILED: u8 = 1;
/// Exit status when the guest crashed or the VM failed while running.
const EXIT_GUEST_CRASHED: u8 = 3;

fn main() -> ExitCode {
    match MachineCli::parse().command {
        MachineCommand::Run(args) => run(args),
        MachineCommand::Vmm(args) => vmm(args),
    }
}

/// The commands that run a VM in this process.
#[derive(Subcommand)]
enum MachineCommand {
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

/// The command line of `keel-vmm` (and so of `keel run` and `keel vmm`). Only its own: clap
/// builds the whole tree of a parser before it reads the arguments; keel's full command tree
/// took about 110 KiB of heap, which glibc kept resident in every idle VMM after it was
/// freed (docs/benchmarks.md).
#[derive(Parser)]
#[command(name = "keel-vmm", version, about = "Keel's VMM: one VM, jailed")]
struct MachineCli {
    #[command(subcommand)]
    command: MachineCommand,
}

#[derive(clap::Args)]
struct VmmArgs {
    /// The VM's run directory, holding vm.json.
    #[arg(long, value_name = "RUN_DIR")]
    dir: PathBuf,
    /// The kernel, initrd and disks are open descriptors from 3 on, in that order, handed
    /// over by keel serve (which decides what a VM may open), not paths to open.
    #[arg(long)]
    handed_files: bool,
    /// Enter a jail (needs root): the VM's own uid and gid, namespaces, an empty root, a
    /// cgroup with these limits. The jailed VMM's pid is printed on stdout.
    #[arg(long, value_name = "uid=U,gid=G,memory=BYTES,pids=N[,cpu=PERCENT]")]
    jail: Option<jail::LaunchOptions>,
    /// Most bytes RUN_DIR/console.log keeps; past it the oldest output is dropped.
    #[arg(long, value_name = "BYTES", default_value_t = vmm::DEFAULT_CONSOLE_LOG_MAX)]
    console_log_max: u64,
    /// Restore the VM from the snapshot in RUN_DIR/NAME (its `state` and `memory` files)
    /// instead of booting it.
    #[arg(long, value_name = "NAME", conflicts_with = "takeover")]
    restore: Option<String>,
    /// Take the running guest over from the VMM serving RUN_DIR (an upgrade): listen on
    /// RUN_DIR/takeover.sock until it hands the guest over (keel vmm's hand-over request).
    #[arg(long)]
    takeover: bool,
    /// With --takeover: the guest comes from another host (a live migration), offered by
    /// keel serve once its memory is arriving; wait up to an hour for it and open the taps
    /// here.
    #[arg(long, requires = "takeover")]
    incoming: bool,
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    machine: MachineArgs,
    /// A virtio-vsock device with guest CID N. Host programs reach guest port P by connecting
    /// to the Unix socket PATH and writing "CONNECT P\n"; the guest reaches host port P at
    /// the Unix socket PATH_P.
    #[arg(long, value_name = "cid=N,socket=PATH")]
    vsock: Option<vmm::config::VsockConfig>,
    /// Run the VMM without its jail and seccomp filters, as the calling user: for
    /// debugging only.
    #[arg(long)]
    no_jail: bool,
}

fn run(args: RunArgs) -> ExitCode {
    let mut vsock = args.vsock;
    // Inside the jail the working directory is its root: the socket's path must be whole.
    // Its directory is resolved now (links included, as the operator named it): the guest's
    // connections to PATH_PORT then follow no link at all.
    if let Some(v) = &mut vsock {
        if let Ok(whole) = std::path::absolute(&v.socket) {
            v.socket = match (whole.parent().map(|d| d.canonicalize()), whole.file_name()) {
                (Some(Ok(dir)), Some(name)) => dir.join(name),
                _ => whole,
            };
        }
    }
    let config = VmConfig {
        kernel: args.machine.kernel,
        initrd: args.machine.initrd,
        cmdline: args.machine.cmdline,
        cpus: args.machine.cpus,
        memory_mib: args.machine.memory,
        disks: args.machine.disks,
        nets: args.machine.nets,
        rng: args.machine.rng,
        vsock,
        trace_startup: std::env::var_os("KEEL_TRACE_STARTUP").is_some(),
        seccomp: !args.no_jail,
    };
    if vmm::host::is_pvm_host() {
        eprintln!("keel: {}", vmm::host::PVM_HOST_NOTE);
    }
    let files = match vmm::HostFiles::open(&config, true) {
        Ok(files) => files,
        Err(e) => return exit_status(Err(e.to_string())),
    };
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if args.no_jail {
        eprintln!("keel: --no-jail: the VMM runs with this user's rights, without namespaces, cgroup or seccomp filters (for debugging only)");
    } else if !root {
        eprintln!("keel: not root: the VMM runs unjailed with this user's rights (no own uid, namespaces or cgroup), under its seccomp filters");
    } else {
        let (jail, cgroups) = match vmm::jailing::spec_for_run(&config, &files) {
            Ok(spec) => spec,
            Err(e) => return exit_status(Err(e.to_string())),
        };
        match jail::enter(&jail) {
            Ok(jail::Entered::Parent { child }) => {
                // The jailed child holds what the VM needs; this process only waits.
                drop(files);
                let code = jail::wait_forwarding_signals(child);
                // The kernel lets go of the VM's last task (KVM's own thread) a moment
                // after the VMM has been reaped.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
                while let Err(e) = cgroups.remove() {
                    if std::time::Instant::now() >= deadline {
                        eprintln!("keel: {e}");
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                // The jailed VMM may not remove what it could not create in a directory of
                // the caller's.
                if let Some(v) = &config.vsock {
                    let is_socket = std::fs::symlink_metadata(&v.socket)
                        .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
                    if is_socket {
                        let _ = std::fs::remove_file(&v.socket);
                    }
                }
                return ExitCode::from(u8::try_from(code).unwrap_or(EXIT_GUEST_CRASHED));
            }
            Ok(jail::Entered::Jailed) => {}
            Err(e) => return exit_status(Err(e.to_string())),
        }
    }
    exit_status(vmm::run(&config, files).map_err(|e| e.to_string()))
}

fn exit_status(result: Result<VmExit, String>) -> ExitCode {
    match result {
        Ok(exit) => {
            eprintln!("keel: {exit}");
            match exit {
                VmExit::PowerOff
                | VmExit::Reboot
                | VmExit::ConsoleQuit
                | VmExit::Stopped(_)
                | VmExit::HandedOver => ExitCode::SUCCESS,
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
    let launch = vmm::service::Launch {
        handed_files: args.handed_files,
        jail: args.jail,
        console_log_max: args.console_log_max,
        restore: args.restore,
        takeover: args.takeover,
        incoming: args.incoming,
    };
    match vmm::service::run(&args.dir, &launch) {
        // Outside the jail: the jailed VMM runs on.
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(exit)) => exit_status(Ok(exit)),
        Err(e) => exit_status(Err(e.to_string())),
    }
}
