//! `keel vm ...`: a VM's definition and life through the daemon (the snapshot and upgrade
//! commands are in `moves_cli`).

use anyhow::Result;
use api::{RateLimits, VmInfo};
use clap::Subcommand;
use hyper::Method;

use crate::cli::{print_json, print_table, write_out, ApiArgs, CreateArgs};
use crate::client::query_value;
use crate::console_attach;

macro_rules! outln {
    ($($arg:tt)*) => { write_out(format_args!("{}\n", format_args!($($arg)*))) };
}

#[derive(Subcommand)]
pub enum VmCommand {
    /// Define a VM (stopped; --start starts it too).
    Create(CreateArgs),
    /// Start a stopped or crashed VM.
    Start { name: String },
    /// Press the ACPI power button and wait for the guest to power off; stopped hard after
    /// --timeout seconds.
    Shutdown {
        name: String,
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Return once the button is pressed.
        #[arg(long)]
        no_wait: bool,
    },
    /// Power the VM off now.
    Stop { name: String },
    /// Power-cycle the VM (stop, then start).
    Reboot { name: String },
    /// Hold a running VM still: its vCPUs stop, its devices finish what they took.
    Pause { name: String },
    /// Let a paused VM run on.
    Resume { name: String },
    /// Snapshot a running or paused VM: its state, its touched memory and its disks as they
    /// are now (each disk's file is kept as it is and the VM goes on in a new qcow2 overlay
    /// on it; a direct=on disk is copied while the guest stands still).
    Snapshot {
        name: String,
        /// The snapshot's name (default: snap-N).
        #[arg(long = "name", value_name = "SNAPSHOT")]
        snapshot: Option<String>,
        /// Write its files in DIR/SNAPSHOT/ (an existing directory beneath the host's image
        /// directories) instead of the daemon's state directory.
        #[arg(long = "to", value_name = "DIR")]
        to: Option<std::path::PathBuf>,
    },
    /// The VM's snapshots.
    Snapshots { name: String },
    /// Restore a stopped VM from one of its snapshots: its disks go back to that instant and
    /// the guest runs on from where it was.
    Restore {
        name: String,
        snapshot: String,
        /// Restore it as a new VM of this name (its own overlays on the snapshot's disks, or
        /// copies of copied ones), beside this one.
        #[arg(long = "as", value_name = "NEW")]
        as_vm: Option<String>,
    },
    /// Delete one of the VM's snapshots (the overlay it kept is merged into the image over
    /// it where that can be done, and removed when nothing reaches it).
    SnapshotRm { name: String, snapshot: String },
    /// Hand the running guest to a new VMM process of the installed keel binary: it stands
    /// still for the handover only; on any failure it runs on in its old VMM.
    Upgrade { name: String },
    /// Move the running VM to another host's daemon while it runs: memory is copied in
    /// rounds until what is left fits --max-downtime, then the guest stands still while the
    /// rest crosses. Its disks must be on storage both hosts see. Shows progress until done.
    Migrate(crate::migrate_cli::MigrateArgs),
    /// The VM's migration under way, or the last one's outcome.
    Migration { name: String },
    /// Delete a stopped VM's definition and its snapshots (its disk files are kept, except
    /// the files the daemon made for it, clones, overlays and the cloud-init seed, that no
    /// other VM reaches).
    Rm { name: String },
    /// Copy a stopped VM under a new name: its definition and its disks (holes kept; a clone
    /// of a library image stays one), with progress.
    Clone {
        name: String,
        new_name: String,
        /// A tap for the copy's next NIC (a tap belongs to one VM): tap=NAME. Repeatable.
        #[arg(long = "net", value_name = "tap=NAME", value_parser = crate::image_cli::parse_tap)]
        taps: Vec<String>,
    },
    /// List the VMs.
    List,
    /// Show one VM.
    Show { name: String },
    /// Attach to the VM's serial console through the API (Ctrl-A x detaches); on TCP it needs
    /// an operator token.
    Console { name: String },
}

fn describe_limits(limits: &RateLimits) -> String {
    let parts: Vec<String> = [
        ("bw", limits.bw, "B/s"),
        ("bw_burst", limits.bw_burst, "B"),
        ("iops", limits.iops, "/s"),
        ("iops_burst", limits.iops_burst, ""),
    ]
    .iter()
    .filter_map(|(k, v, unit)| v.map(|v| format!("{k} {v}{unit}")))
    .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

fn vm_path(name: &str, action: &str) -> String {
    format!("/vms/{}{action}", query_value(name))
}

fn print_vm_line(vm: &VmInfo) {
    outln!("{}: {}: {}", vm.spec.name, vm.state, vm.reason);
}

pub async fn vm(command: VmCommand, api: ApiArgs) -> Result<()> {
    let client = api.client()?;
    let show = |vm: VmInfo| -> Result<()> {
        if api.json {
            print_json(&vm)
        } else {
            print_vm_line(&vm);
            Ok(())
        }
    };
    match command {
        VmCommand::Create(args) => {
            let spec = args.spec()?;
            let vm: VmInfo = client
                .send(Method::POST, "/vms", Some(serde_json::to_value(&spec)?))
                .await?;
            if args.start {
                let vm: VmInfo = client
                    .send(Method::POST, &vm_path(&spec.name, "/start"), None)
                    .await?;
                return show(vm);
            }
            show(vm)
        }
        VmCommand::Start { name } => show(
            client
                .send(Method::POST, &vm_path(&name, "/start"), None)
                .await?,
        ),
        VmCommand::Shutdown {
            name,
            timeout,
            no_wait,
        } => {
            let path = format!(
                "{}?timeout_s={timeout}&wait={}",
                vm_path(&name, "/shutdown"),
                !no_wait
            );
            show(client.send(Method::POST, &path, None).await?)
        }
        VmCommand::Stop { name } => show(
            client
                .send(Method::POST, &vm_path(&name, "/stop"), None)
                .await?,
        ),
        VmCommand::Reboot { name } => show(
            client
                .send(Method::POST, &vm_path(&name, "/reboot"), None)
                .await?,
        ),
        VmCommand::Pause { name } => show(
            client
                .send(Method::POST, &vm_path(&name, "/pause"), None)
                .await?,
        ),
        VmCommand::Resume { name } => show(
            client
                .send(Method::POST, &vm_path(&name, "/resume"), None)
                .await?,
        ),
        VmCommand::Snapshot { name, snapshot, to } => {
            let to = to.map(std::path::absolute).transpose()?;
            crate::moves_cli::take(&client, &api, &name, snapshot, to).await
        }
        VmCommand::Snapshots { name } => crate::moves_cli::list(&client, &api, &name).await,
        VmCommand::Restore {
            name,
            snapshot,
            as_vm,
        } => show(crate::moves_cli::restore(&client, &api, &name, &snapshot, as_vm).await?),
        VmCommand::SnapshotRm { name, snapshot } => {
            crate::moves_cli::remove(&client, &api, &name, &snapshot).await
        }
        VmCommand::Upgrade { name } => crate::moves_cli::upgrade(&client, &api, &name).await,
        VmCommand::Migrate(args) => crate::migrate_cli::migrate(&client, &api, args).await,
        VmCommand::Migration { name } => crate::migrate_cli::show(&client, &api, &name).await,
        VmCommand::Clone {
            name,
            new_name,
            taps,
        } => crate::image_cli::clone_vm(&client, &name, new_name, taps, api.json).await,
        VmCommand::Rm { name } => {
            client
                .call(Method::DELETE, &vm_path(&name, ""), None)
                .await?;
            if !api.json {
                outln!("{name}: deleted");
            }
            Ok(())
        }
        VmCommand::Show { name } => {
            let vm: VmInfo = client.get(&vm_path(&name, "")).await?;
            if api.json {
                return print_json(&vm);
            }
            let s = &vm.spec;
            let mut rows = vec![
                ("name", s.name.clone()),
                ("state", vm.state.to_string()),
                ("since", vm.since.clone()),
                ("reason", vm.reason.clone()),
                (
                    "vmm pid",
                    vm.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                ),
                ("cpus", s.cpus.to_string()),
                ("memory", format!("{} MiB", s.memory_mib)),
                (
                    "kernel",
                    s.kernel
                        .clone()
                        .unwrap_or_else(|| "from the first disk (disk boot)".into()),
                ),
                ("initrd", s.initrd.clone().unwrap_or_else(|| "-".into())),
                ("cmdline", s.cmdline.clone()),
                ("autostart", s.autostart.to_string()),
                (
                    "cpu limit",
                    s.cpu_limit_percent
                        .map_or("none".to_string(), |p| format!("{p}% of one CPU")),
                ),
                ("console log", vm.console_log.clone()),
            ];
            if let Some(u) = &vm.usage {
                let mib = |b: Option<u64>| {
                    b.map_or("?".to_string(), |b| {
                        format!("{:.1} MiB", b as f64 / 1048576.0)
                    })
                };
                let n = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
                rows.push(("jail uid", u.jail_id.to_string()));
                rows.push((
                    "memory use",
                    format!(
                        "{} of {} (peak {})",
                        mib(u.memory_bytes),
                        mib(u.memory_limit_bytes),
                        mib(u.memory_peak_bytes)
                    ),
                ));
                rows.push(("tasks", format!("{} of {}", n(u.tasks), n(u.tasks_limit))));
            }
            for d in &s.disks {
                rows.push((
                    "disk",
                    format!(
                        "{}{}{}{}{}",
                        d.path,
                        match (&d.format, &d.image) {
                            (_, Some(image)) => format!(" (qcow2, a clone of image {image})"),
                            (api::vm::DiskFormat::Qcow2, None) => " (qcow2)".into(),
                            (api::vm::DiskFormat::Raw, None) => String::new(),
                        },
                        if d.readonly { " (read-only)" } else { "" },
                        if d.direct { " (direct I/O)" } else { "" },
                        describe_limits(&d.limits)
                    ),
                ));
            }
            for n in &s.nets {
                let mac = n
                    .mac
                    .as_deref()
                    .map(|m| format!(" mac {m}"))
                    .unwrap_or_default();
                rows.push((
                    "net",
                    format!("tap {}{mac}{}", n.tap, describe_limits(&n.limits)),
                ));
            }
            if let Some(ci) = &s.cloud_init {
                rows.push((
                    "cloud-init",
                    format!(
                        "NoCloud seed disk after the others: user-data ({} bytes){}{}",
                        ci.user_data.len(),
                        if ci.meta_data.is_some() {
                            ", meta-data"
                        } else {
                            ""
                        },
                        if ci.network_config.is_some() {
                            ", network-config"
                        } else {
                            ""
                        }
                    ),
                ));
            }
            if s.rng {
                rows.push(("rng", "virtio-rng".into()));
            }
            if let (Some(v), Some(socket)) = (&s.vsock, &vm.vsock_socket) {
                rows.push((
                    "vsock",
                    format!("guest CID {}, host socket {socket}", v.cid),
                ));
            }
            for (k, v) in rows {
                outln!("{k:<12} {v}");
            }
            Ok(())
        }
        VmCommand::List => {
            let vms: Vec<VmInfo> = client.get("/vms").await?;
            if api.json {
                return print_json(&vms);
            }
            let rows: Vec<Vec<String>> = vms
                .iter()
                .map(|v| {
                    vec![
                        v.spec.name.clone(),
                        v.state.to_string(),
                        v.spec.cpus.to_string(),
                        format!("{} MiB", v.spec.memory_mib),
                        v.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                        v.since.clone(),
                        v.reason.clone(),
                    ]
                })
                .collect();
            print_table(
                &["NAME", "STATE", "CPUS", "MEMORY", "PID", "SINCE", "REASON"],
                &rows,
            );
            Ok(())
        }
        VmCommand::Console { name } => console_attach::attach(&client, &name).await,
    }
}
