//! `keel`: the host daemon (`keel serve`) and the thin clients of its API. The VMM is a
//! binary of its own, `keel-vmm` (src/bin/keel-vmm.rs), installed beside this one, which
//! links none of the daemon's code; `keel run` and `keel vmm` run it.

mod cli;
mod client;
mod client_tls;
mod console_attach;
mod create_args;
mod image_cli;
mod ledger_cli;
mod machine_args;
mod migrate_cli;
mod moves_cli;
mod vm_cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit status when a command failed (the VMM's own statuses are keel-vmm's).
const EXIT_START_FAILED: u8 = 1;

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
    /// Boot a VM in the foreground, its serial console on this terminal (Ctrl-A x quits): runs
    /// `keel-vmm run` (installed beside keel) with these arguments; see `keel run --help`.
    #[command(disable_help_flag = true)]
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Run one VM detached, as the host daemon does: runs `keel-vmm vmm` with these
    /// arguments.
    #[command(disable_help_flag = true)]
    Vmm {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// The host daemon: VM definitions, supervision of one VMM process per VM, REST API,
    /// events, ledger. Stopping or killing it leaves the VMs running; it re-adopts them.
    Serve(ServeArgs),
    /// Define, start, stop and inspect VMs (through keel serve).
    Vm {
        #[command(subcommand)]
        command: vm_cli::VmCommand,
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
    /// Print the API's OpenAPI 3.1 document (what GET /openapi.json answers), for client
    /// generators; no daemon needed.
    Openapi,
    /// The image library: disk images VMs' disks are cloned from.
    Image {
        #[command(subcommand)]
        command: image_cli::ImageCommand,
        #[command(flatten)]
        api: cli::ApiArgs,
    },
    /// Bring a VMware VM over: its .vmx, .ovf or .ova becomes a Keel VM (disks converted into
    /// the image library, the VM on thin clones of them), with the list of what could not be
    /// carried over.
    Import {
        #[command(flatten)]
        args: image_cli::ImportArgs,
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

#[derive(Subcommand)]
enum LedgerCommand {
    /// Recompute the hash chain against the daemon's signed anchor; name every edited,
    /// inserted, deleted or cut row. With --export, check an export file instead, with only
    /// the host's public key (no daemon needed).
    Verify {
        /// A head written down earlier, SEQ:HASH (or a hash alone), instead of the anchor.
        #[arg(long, conflicts_with = "export")]
        expect_head: Option<String>,
        /// An export file (keel ledger export) to check.
        #[arg(long, value_name = "FILE", requires = "pubkey")]
        export: Option<PathBuf>,
        /// The host's Ed25519 public key (keel host shows it) for --export.
        #[arg(long, value_name = "KEY")]
        pubkey: Option<String>,
    },
    /// Write the whole ledger as signed evidence (JSON Lines) that anyone with the host's
    /// public key can check without the host.
    Export {
        /// Write here instead of to stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
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
    /// Also serve the API on TCP at ADDR:PORT, over TLS (every request then needs an API
    /// token). Without --tls-cert a self-signed certificate is made in STATE_DIR/tls on the
    /// first start; its fingerprint is printed and shown by `keel host`.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<std::net::SocketAddr>,
    /// The TLS certificate (PEM, leaf first) for --listen.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The TLS certificate's private key (PEM) for --listen.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve plain HTTP instead of TLS on --listen; refused unless its address is loopback.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key"])]
    insecure_http: bool,
    /// Give local user UID this role on the Unix socket (repeatable): UID=viewer, operator or
    /// admin. Root and the daemon's own user are admins; other users are refused. With any,
    /// the socket is opened to all local users and their uid (from the kernel) decides.
    #[arg(long = "local-role", value_name = "UID=ROLE", value_parser = host::auth::parse_local_role)]
    local_roles: Vec<(u32, host::auth::Role)>,
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

fn main() -> ExitCode {
    // The VMM is its own small binary: `keel run` and `keel vmm` become it, arguments as
    // given (its own --help included).
    let mut args = std::env::args_os().skip(1);
    if let Some(command) = args.next().filter(|c| c == "run" || c == "vmm") {
        return exec_vmm(command, args.collect());
    }
    match Cli::parse().command {
        Command::Run { args } => exec_vmm("run".into(), args),
        Command::Vmm { args } => exec_vmm("vmm".into(), args),
        Command::Serve(args) => client_command(serve(args)),
        Command::Vm { command, api } => client_command(vm_cli::vm(command, api)),
        Command::Events { args, api } => client_command(cli::events(args, api)),
        Command::Host { command, api } => client_command(cli::host(command, api)),
        Command::Ledger {
            command:
                LedgerCommand::Verify {
                    export: Some(file),
                    pubkey,
                    ..
                },
            api,
        } => client_command(async move {
            ledger_cli::verify_export(&file, pubkey.as_deref().unwrap_or_default(), api.json)
        }),
        Command::Ledger {
            command: LedgerCommand::Verify { expect_head, .. },
            api,
        } => client_command(ledger_cli::verify(expect_head, api)),
        Command::Ledger {
            command: LedgerCommand::Export { out },
            api,
        } => client_command(async move { ledger_cli::export(out.as_deref(), api).await }),
        Command::Sla {
            command: SlaCommand::Report(args),
            api,
        } => client_command(cli::sla_report(args, api)),
        Command::Token { command, api } => client_command(cli::token(command, api)),
        Command::Image { command, api } => client_command(image_cli::run(command, api)),
        Command::Import { args, api } => client_command(image_cli::import_vm(args, api)),
        Command::Openapi => match serde_json::to_string_pretty(host::rest::openapi_document()) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("keel: error: writing the OpenAPI document: {e}");
                ExitCode::from(EXIT_START_FAILED)
            }
        },
    }
}

/// Replaces this process with `keel-vmm COMMAND ARGS`, from beside this binary.
fn exec_vmm(command: std::ffi::OsString, args: Vec<std::ffi::OsString>) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let vmm = match std::env::current_exe() {
        Ok(exe) => exe.with_file_name("keel-vmm"),
        Err(e) => {
            eprintln!("keel: error: finding the keel binary failed: {e}");
            return ExitCode::from(EXIT_START_FAILED);
        }
    };
    let e = std::process::Command::new(&vmm)
        .arg(command)
        .args(args)
        .exec();
    eprintln!(
        "keel: error: running {} failed: {e}; keel-vmm is installed beside keel (cargo build builds both)",
        vmm.display()
    );
    ExitCode::from(EXIT_START_FAILED)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let socket = args
        .socket
        .unwrap_or_else(|| args.state_dir.join("api.sock"));
    let vmm_exe = std::env::current_exe()
        .map_err(|e| anyhow::anyhow!("finding the keel binary failed: {e}"))?
        .with_file_name("keel-vmm");
    if !vmm_exe.is_file() {
        anyhow::bail!(
            "the VMM binary {} is missing; keel-vmm is installed beside keel (cargo build builds both)",
            vmm_exe.display()
        );
    }
    host::serve(host::ServeConfig {
        state_dir: args.state_dir,
        socket,
        listen: args.listen,
        tls: match (args.insecure_http, args.tls_cert, args.tls_key) {
            (true, _, _) => None,
            (false, Some(cert), Some(key)) => Some(host::tls::Source::Files { cert, key }),
            _ => Some(host::tls::Source::SelfSigned),
        },
        local_roles: args.local_roles,
        limits: host::listen::Limits::default(),
        vmm_exe,
        images: args.images,
        max_vms: args.max_vms,
        memory_share_percent: args.memory_share,
        console_log_max: args.console_log_max,
    })
    .await
    // The daemon's messages already name their causes: one line, not the chain again.
    .map_err(|e| anyhow::anyhow!("{e}"))?;
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
