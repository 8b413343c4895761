//! `keel`: the one binary. `keel run` boots a VM in the foreground with its serial console on
//! the terminal; `keel vmm` runs one VM detached, for the host daemon; `keel serve` is the
//! host daemon; the other commands are thin clients of its API.

mod cli;
mod client;
mod console_attach;
mod machine_args;

use machine_args::MachineArgs;

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
    // `run` and `vmm`: parsed alone, with MachineCli, when they are the command (see main).
    #[command(flatten)]
    Machine(MachineCommand),
    /// The host daemon: VM definitions, supervision of one VMM process per VM, REST API,
    /// events, ledger. Stopping or killing it leaves the VMs running; it re-adopts them.
    Serve(ServeArgs),
    /// Define, start, stop and inspect VMs (through keel serve).
    Vm {
        #[command(subcommand)]
        command: cli::VmCommand,
        #[command(flatten)]
        api: cli::ApiArgs,
    },
    /// The newest events: state changes, API calls, host events.
    Events {
        #[command(flatten)]
        args: cli::EventsArgs,
        #[command(flatten)]
        api: cli::ApiArgs,
    },
    /// Host health, open incidents and warnings; `keel host ack ID` closes an incident.
    Host {
        #[command(subcommand)]
        command: Option<cli::HostCommand>,
        #[command(flatten)]
        api: cli::ApiArgs,
    },
    /// The hash-chained availability ledger.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
        #[command(flatten)]
        api: cli::ApiArgs,
    },
    /// SLA evidence computed from the ledger.
    Sla {
        #[command(subcommand)]
        command: SlaCommand,
        #[command(flatten)]
        api: cli::ApiArgs,
    },
    /// API tokens for TCP clients.
    Token {
        #[command(subcommand)]
        command: cli::TokenCommand,
        #[command(flatten)]
        api: cli::ApiArgs,
    },
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

/// The command line of `keel run` and `keel vmm` alone: the same name, version and options as
/// [`Cli`] without the daemon's and the clients' commands. Clap builds the whole tree of a
/// parser before it reads the arguments; for the full [`Cli`] that tree took about 110 KiB of
/// heap, which glibc kept resident in every idle VMM after it was freed (docs/benchmarks.md).
#[derive(Parser)]
#[command(
    name = "keel",
    version,
    about = "Keel: a server-virtualization host on Linux KVM"
)]
struct MachineCli {
    #[command(subcommand)]
    command: MachineCommand,
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Recompute the hash chain; name every edited, inserted or deleted row.
    Verify {
        /// A head hash written down earlier: also detects rows removed from the end.
        #[arg(long)]
        expect_head: Option<String>,
    },
}

#[derive(Subcommand)]
enum SlaCommand {
    /// Availability, downtime by cause and credits per VM over a window.
    Report(cli::SlaArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Where the store, the VMs' run directories and the API socket live.
    #[arg(long, default_value = "/var/lib/keel")]
    state_dir: PathBuf,
    /// The API's Unix socket [default: STATE_DIR/api.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Also serve the API on TCP at ADDR:PORT (every request then needs an API token).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<std::net::SocketAddr>,
    /// A directory VMs' kernels, initrds and disks may come from (repeatable) [default:
    /// STATE_DIR/images]. No file outside them is opened for a VM.
    #[arg(long = "images", value_name = "DIR")]
    images: Vec<PathBuf>,
    /// Most VMs that may run at once; further starts are refused (running VMs never are).
    #[arg(long, default_value_t = host::supervisor::DEFAULT_MAX_VMS)]
    max_vms: usize,
    /// Percent of host RAM that running VMs' memory may add up to; further starts are
    /// refused with what is free (running VMs are never touched).
    #[arg(long, default_value_t = host::supervisor::DEFAULT_MEMORY_SHARE, value_parser = clap::value_parser!(u32).range(1..=100))]
    memory_share: u32,
    /// Most bytes each VM's console.log keeps; past it the oldest output is dropped.
    #[arg(long, value_name = "BYTES", default_value_t = host::supervisor::DEFAULT_CONSOLE_LOG_MAX)]
    console_log_max: u64,
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
    if let Some(v) = &mut vsock {
        if let Ok(whole) = std::path::absolute(&v.socket) {
            v.socket = whole;
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
    let files = match vmm::HostFiles::open(&config) {
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
                if let Err(e) = cgroups.remove() {
                    eprintln!("keel: {e}");
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
    let launch = vmm::service::Launch {
        handed_files: args.handed_files,
        jail: args.jail,
        console_log_max: args.console_log_max,
    };
    match vmm::service::run(&args.dir, &launch) {
        // Outside the jail: the jailed VMM runs on.
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(exit)) => exit_status(Ok(exit)),
        Err(e) => exit_status(Err(e.to_string())),
    }
}

fn main() -> ExitCode {
    // A VMM process (one per running VM) parses only its own command: see MachineCli.
    if matches!(std::env::args_os().nth(1), Some(c) if c == "run" || c == "vmm") {
        return machine_command(MachineCli::parse().command);
    }
    match Cli::parse().command {
        Command::Machine(command) => machine_command(command),
        Command::Serve(args) => client_command(serve(args)),
        Command::Vm { command, api } => client_command(cli::vm(command, api)),
        Command::Events { args, api } => client_command(cli::events(args, api)),
        Command::Host { command, api } => client_command(cli::host(command, api)),
        Command::Ledger {
            command: LedgerCommand::Verify { expect_head },
            api,
        } => client_command(cli::ledger_verify(expect_head, api)),
        Command::Sla {
            command: SlaCommand::Report(args),
            api,
        } => client_command(cli::sla_report(args, api)),
        Command::Token { command, api } => client_command(cli::token(command, api)),
    }
}

fn machine_command(command: MachineCommand) -> ExitCode {
    match command {
        MachineCommand::Run(args) => run(args),
        MachineCommand::Vmm(args) => vmm(args),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let socket = args
        .socket
        .unwrap_or_else(|| args.state_dir.join("api.sock"));
    let keel_exe = std::env::current_exe()
        .map_err(|e| anyhow::anyhow!("finding the keel binary to start VMMs with: {e}"))?;
    host::serve(host::ServeConfig {
        state_dir: args.state_dir,
        socket,
        listen: args.listen,
        keel_exe,
        images: args.images,
        max_vms: args.max_vms,
        memory_share_percent: args.memory_share,
        console_log_max: args.console_log_max,
    })
    .await?;
    Ok(())
}

/// Runs an async command on a fresh runtime; an error is one line and exit status 1.
fn client_command(work: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keel: error: starting the async runtime failed: {e}");
            return ExitCode::from(EXIT_START_FAILED);
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keel: error: {e:#}");
            ExitCode::from(EXIT_START_FAILED)
        }
    }
}
