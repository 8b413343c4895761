//! `keel vm migrate`: moving a running VM to another host's daemon, with its progress.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use api::migration::{MigrationPhase, MigrationProgress};
use hyper::Method;

use crate::cli::{print_json, write_out, ApiArgs};
use crate::client::{query_value, Client};

macro_rules! outln {
    ($($arg:tt)*) => { write_out(format_args!("{}\n", format_args!($($arg)*))) };
}

/// Where the VM goes and how (the arguments of `keel vm migrate`).
#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    pub name: String,
    /// The target host's daemon: https://HOST:PORT.
    #[arg(long, value_name = "URL", required_unless_present = "cancel")]
    pub to: Option<String>,
    /// A file holding an API token of the target daemon (operator role or above).
    #[arg(long, value_name = "FILE", required_unless_present = "cancel")]
    pub to_token_file: Option<PathBuf>,
    /// The SHA-256 fingerprint of the target's TLS certificate (its keel serve prints it).
    #[arg(long, value_name = "SHA256", required_unless_present = "cancel")]
    pub to_fingerprint: Option<String>,
    /// The longest the guest may stand still at the switch, in ms.
    #[arg(long, value_name = "MS", default_value_t = 50)]
    pub max_downtime: u64,
    /// At most this many MiB/s on the link.
    #[arg(long, value_name = "MIB_PER_S")]
    pub bandwidth: Option<u64>,
    /// Cancel the VM's migration under way: the VM runs on here.
    #[arg(long)]
    pub cancel: bool,
    /// Start it and return at once (keel vm migration NAME follows it).
    #[arg(long)]
    pub no_wait: bool,
}

fn migration_path(vm: &str) -> String {
    format!("/vms/{}/migration", query_value(vm))
}

fn say(p: &MigrationProgress) {
    match p.phase {
        MigrationPhase::Done => outln!(
            "{}: migrated to {} in {:.0} ms ({} rounds, {:.1} MiB sent); the guest stood still {:.3} ms",
            p.vm,
            p.to,
            p.elapsed_ms,
            p.rounds,
            p.bytes_sent as f64 / f64::from(1 << 20),
            p.downtime_ms.unwrap_or(0.0)
        ),
        MigrationPhase::Failed | MigrationPhase::Cancelled => outln!(
            "{}: not migrated ({}): {}; it runs on here",
            p.vm,
            if p.phase == MigrationPhase::Cancelled { "cancelled" } else { "failed" },
            p.error.as_deref().unwrap_or("no reason given")
        ),
        _ => outln!(
            "{}: {:?}, round {}, {:.1} MiB sent, guest writing {:.1} MiB/s, link {:.1} MiB/s, switch now: {:.1} ms (budget {} ms)",
            p.vm,
            p.phase,
            p.rounds,
            p.bytes_sent as f64 / f64::from(1 << 20),
            p.dirty_rate_mib_s,
            p.bandwidth_mib_s,
            p.expected_downtime_ms,
            p.max_downtime_ms
        ),
    }
}

pub async fn migrate(client: &Client, api: &ApiArgs, args: MigrateArgs) -> Result<()> {
    if args.cancel {
        let p: MigrationProgress = client
            .send(Method::DELETE, &migration_path(&args.name), None)
            .await?;
        if api.json {
            return print_json(&p);
        }
        outln!("{}: cancelling its migration to {}", p.vm, p.to);
        return Ok(());
    }
    let (Some(to), Some(token_file), Some(fingerprint)) =
        (args.to, args.to_token_file, args.to_fingerprint)
    else {
        bail!("--to, --to-token-file and --to-fingerprint say where the VM goes");
    };
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("reading the target's token from {}", token_file.display()))?;
    let body = serde_json::json!({
        "to": to,
        "token": token.trim(),
        "fingerprint": fingerprint,
        "max_downtime_ms": args.max_downtime,
        "max_bandwidth_mib_s": args.bandwidth,
    });
    let mut p: MigrationProgress = client
        .send(
            Method::POST,
            &format!("/vms/{}/migrate", query_value(&args.name)),
            Some(body),
        )
        .await?;
    if args.no_wait {
        if api.json {
            return print_json(&p);
        }
        say(&p);
        return Ok(());
    }
    let mut last_round = u32::MAX;
    while !p.phase.is_over() {
        if !api.json && p.rounds != last_round {
            say(&p);
            last_round = p.rounds;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        p = client.get(&migration_path(&args.name)).await?;
    }
    if api.json {
        print_json(&p)?;
    } else {
        say(&p);
    }
    if p.phase != MigrationPhase::Done {
        bail!(
            "VM {} was not migrated: {}",
            p.vm,
            p.error.unwrap_or_default()
        );
    }
    Ok(())
}

/// `keel vm migration NAME`: the migration under way or the last one's outcome.
pub async fn show(client: &Client, api: &ApiArgs, vm: &str) -> Result<()> {
    let p: MigrationProgress = client.get(&migration_path(vm)).await?;
    if api.json {
        return print_json(&p);
    }
    say(&p);
    Ok(())
}
