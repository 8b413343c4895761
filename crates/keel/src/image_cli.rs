//! `keel image`: the image library through the daemon (import with a progress bar, list,
//! show, remove).

use std::time::Duration;

use anyhow::{bail, Result};
use api::image::{ImageInfo, ImportRequest, Operation, OperationState, SourceFormat};
use clap::Subcommand;
use hyper::Method;

use crate::cli::{print_json, write_out, ApiArgs};
use crate::client::Client;

macro_rules! outln {
    ($($arg:tt)*) => { write_out(format_args!("{}\n", format_args!($($arg)*))) };
}

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Import a disk image into the library (a raw or qcow2 image is copied, a VMDK converted
    /// to raw), showing progress. FILE must lie in the host's image directories.
    Import {
        file: std::path::PathBuf,
        /// The image's name (default: the file's name without its extension).
        #[arg(long)]
        name: Option<String>,
        /// The file's format (default: from its extension: .raw or .img, .qcow2, .vmdk).
        #[arg(long, value_parser = parse_format)]
        format: Option<SourceFormat>,
        /// Return at once with the operation's id instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// The images of the library, and which VMs use them.
    List,
    /// One image.
    Show { name: String },
    /// Remove an image and its file (refused while a VM uses it).
    Rm { name: String },
}

fn parse_format(s: &str) -> Result<SourceFormat, String> {
    match s {
        "raw" => Ok(SourceFormat::Raw),
        "qcow2" => Ok(SourceFormat::Qcow2),
        "vmdk" => Ok(SourceFormat::Vmdk),
        other => Err(format!("'{other}': expected raw, qcow2 or vmdk")),
    }
}

fn gib(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

fn image_path(name: &str) -> String {
    format!("/images/{}", crate::client::query_value(name))
}

/// A bytes progress bar on stderr (hidden when `quiet`) of `len` bytes, drawn by `template`.
pub fn progress_bar(quiet: bool, len: u64, template: &str) -> indicatif::ProgressBar {
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(len)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

/// Follows operation `op` until it ends, drawing a progress bar (bytes, rate, time left) on
/// stderr; the operation as it ended.
pub async fn follow(client: &Client, mut op: Operation, quiet: bool) -> Result<Operation> {
    let bar = progress_bar(
        quiet,
        op.total_bytes.max(1),
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}, {eta} left",
    );
    bar.set_message(format!("{} {}", op.kind, op.target));
    while op.state == OperationState::Running {
        bar.set_length(op.total_bytes.max(1));
        bar.set_position(op.done_bytes);
        tokio::time::sleep(Duration::from_millis(200)).await;
        op = client.get(&format!("/operations/{}", op.id)).await?;
    }
    bar.set_length(op.total_bytes.max(1));
    bar.set_position(op.done_bytes);
    bar.finish_and_clear();
    Ok(op)
}

pub async fn run(command: ImageCommand, api: ApiArgs) -> Result<()> {
    let client = api.client()?;
    match command {
        ImageCommand::Import {
            file,
            name,
            format,
            no_wait,
        } => {
            let source = std::path::absolute(&file)?;
            let name = match name {
                Some(n) => n,
                None => source
                    .file_stem()
                    .map(|s| s.to_string_lossy().to_lowercase())
                    .unwrap_or_default(),
            };
            let request = ImportRequest {
                name: name.clone(),
                source: source.display().to_string(),
                format,
            };
            let op: Operation = client
                .send(
                    Method::POST,
                    "/images",
                    Some(serde_json::to_value(&request)?),
                )
                .await?;
            if no_wait {
                return if api.json {
                    print_json(&op)
                } else {
                    outln!(
                        "importing {name}: operation {} (GET /operations/{})",
                        op.id,
                        op.id
                    );
                    Ok(())
                };
            }
            let op = follow(&client, op, api.json).await?;
            if op.state == OperationState::Failed {
                bail!(
                    "importing {name} failed: {}",
                    op.error.unwrap_or_else(|| "no reason given".into())
                );
            }
            let image: ImageInfo = client.get(&image_path(&name)).await?;
            if api.json {
                return print_json(&image);
            }
            outln!(
                "{}: imported, {} {} ({} on disk)",
                image.name,
                gib(image.virtual_size),
                match image.format {
                    api::vm::DiskFormat::Raw => "raw",
                    api::vm::DiskFormat::Qcow2 => "qcow2",
                },
                gib(image.allocated_bytes)
            );
            Ok(())
        }
        ImageCommand::List => {
            let images: Vec<ImageInfo> = client.get("/images").await?;
            if api.json {
                return print_json(&images);
            }
            if images.is_empty() {
                outln!("no images; keel image import FILE adds one");
            }
            for i in &images {
                outln!(
                    "{:<20} {:<6} {:>10} {:>10} on disk  {}",
                    i.name,
                    match i.format {
                        api::vm::DiskFormat::Raw => "raw",
                        api::vm::DiskFormat::Qcow2 => "qcow2",
                    },
                    gib(i.virtual_size),
                    gib(i.allocated_bytes),
                    if i.used_by.is_empty() {
                        "unused".to_string()
                    } else {
                        format!("used by {}", i.used_by.join(", "))
                    }
                );
            }
            Ok(())
        }
        ImageCommand::Show { name } => {
            let image: ImageInfo = client.get(&image_path(&name)).await?;
            if api.json {
                return print_json(&image);
            }
            outln!("name       {}", image.name);
            outln!("file       {}", image.path);
            outln!(
                "size       {} ({} bytes)",
                gib(image.virtual_size),
                image.virtual_size
            );
            outln!("on disk    {}", gib(image.allocated_bytes));
            outln!("imported   {} from {}", image.created, image.source);
            outln!(
                "used by    {}",
                if image.used_by.is_empty() {
                    "no VM".to_string()
                } else {
                    image.used_by.join(", ")
                }
            );
            Ok(())
        }
        ImageCommand::Rm { name } => {
            client
                .call(Method::DELETE, &image_path(&name), None)
                .await?;
            if !api.json {
                outln!("{name}: removed");
            }
            Ok(())
        }
    }
}

/// `keel import`: a VMware VM becomes a Keel VM.
#[derive(clap::Args)]
pub struct ImportArgs {
    /// A .vmx (its VMDKs beside it), an .ovf (its disks beside it) or an .ova, in the host's
    /// image directories.
    file: std::path::PathBuf,
    /// The VM's name (default: VMware's display name, made a Keel name).
    #[arg(long)]
    name: Option<String>,
    /// A tap for the VM's next NIC (in the VM's order; each keeps its MAC address):
    /// tap=NAME. Repeatable.
    #[arg(long = "net", value_name = "tap=NAME", value_parser = parse_tap)]
    taps: Vec<String>,
    /// Start the VM once it is defined.
    #[arg(long)]
    start: bool,
}

pub fn parse_tap(s: &str) -> Result<String, String> {
    s.strip_prefix("tap=")
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .ok_or_else(|| format!("'{s}': expected tap=NAME"))
}

pub async fn import_vm(args: ImportArgs, api: ApiArgs) -> Result<()> {
    let client = api.client()?;
    let request = api::image::VmImportRequest {
        source: std::path::absolute(&args.file)?.display().to_string(),
        name: args.name,
        taps: args.taps,
        start: false,
    };
    let op: Operation = client
        .send(
            Method::POST,
            "/imports",
            Some(serde_json::to_value(&request)?),
        )
        .await?;
    let op = follow(&client, op, api.json).await?;
    if op.state == OperationState::Failed {
        bail!(
            "importing {} failed: {}",
            request.source,
            op.error.unwrap_or_else(|| "no reason given".into())
        );
    }
    let vm = op.result.clone().unwrap_or_default();
    if args.start {
        let _: serde_json::Value = client
            .send(
                Method::POST,
                &format!("/vms/{}/start", crate::client::query_value(&vm)),
                None,
            )
            .await?;
    }
    if api.json {
        return print_json(&op);
    }
    outln!(
        "{vm}: imported from {}{}",
        request.source,
        if args.start { ", started" } else { "" }
    );
    if op.notes.is_empty() {
        outln!("everything was carried over");
    } else {
        outln!("not carried over:");
        for note in &op.notes {
            outln!("  - {note}");
        }
    }
    Ok(())
}

/// `keel vm clone`: follows the copy and says what was left out.
pub async fn clone_vm(
    client: &Client,
    source: &str,
    name: String,
    taps: Vec<String>,
    json: bool,
) -> Result<()> {
    let request = api::image::VmCloneRequest { name, taps };
    let op: Operation = client
        .send(
            Method::POST,
            &format!("/vms/{}/clone", crate::client::query_value(source)),
            Some(serde_json::to_value(&request)?),
        )
        .await?;
    let op = follow(client, op, json).await?;
    if op.state == OperationState::Failed {
        bail!(
            "cloning {source} failed: {}",
            op.error.unwrap_or_else(|| "no reason given".into())
        );
    }
    if json {
        return print_json(&op);
    }
    outln!("{}: a copy of {source}", request.name);
    for note in &op.notes {
        outln!("  - {note}");
    }
    Ok(())
}
