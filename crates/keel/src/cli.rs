//! The CLI as a thin client of `keel serve`: what every client command shares (where the API
//! is, output), and `keel events`, `keel host`, `keel ledger verify`, `keel sla report`,
//! `keel token ...` (`keel vm ...` is in `vm_cli`). Tables for people, `--json` for scripts;
//! an error is one line on stderr and a non-zero exit.

/// Prints for the operator or a script, like `print!`; see [`write_out`].
macro_rules! out {
    ($($arg:tt)*) => { write_out(format_args!($($arg)*)) };
}

/// Prints a line for the operator or a script, like `println!`; see [`write_out`].
macro_rules! outln {
    ($($arg:tt)*) => { write_out(format_args!("{}\n", format_args!($($arg)*))) };
}

/// Writes to stdout. A reader that went away (`keel events | head`) ends the command quietly
/// with status 141, what a shell reports for a tool killed by SIGPIPE (so `pipefail` scripts
/// do not take a cut-off `keel ledger verify` or a lost `keel token create` secret for
/// success), where `println!` would panic; SIGPIPE itself stays ignored so that a socket the
/// daemon closes is an error message, not a silent death.
pub(crate) fn write_out(args: std::fmt::Arguments) {
    use std::io::Write;
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            // 128 + SIGPIPE (13).
            std::process::exit(141);
        }
        eprintln!("keel: error: writing to stdout failed: {e}");
        std::process::exit(1);
    }
}

use anyhow::{bail, Context, Result};
use api::{Event, HostStatus, NewToken, SlaReport, TokenInfo};
use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::json;

use crate::client::{query_value, Client, Endpoint, DEFAULT_SOCKET};
use crate::client_tls::Trust;
pub use crate::create_args::CreateArgs;

/// Where the API is and who the caller is; shared by every client command.
#[derive(Args, Clone)]
pub struct ApiArgs {
    /// The daemon's API: a Unix socket path, or https://HOST:PORT (then a token is needed;
    /// http://HOST:PORT where the daemon serves plain HTTP on loopback).
    #[arg(long, visible_alias = "server", global = true, env = "KEEL_API", default_value = DEFAULT_SOCKET)]
    pub api: String,
    /// For https: the SHA-256 fingerprint of the server's certificate (keel serve prints it;
    /// keel host shows it). Remembered in the client config file once it worked.
    #[arg(long, global = true, env = "KEEL_FINGERPRINT")]
    pub fingerprint: Option<String>,
    /// For https: a PEM file of the CA that signed the server's certificate. Remembered in the
    /// client config file once it worked.
    #[arg(long, global = true, env = "KEEL_CA", value_name = "FILE")]
    pub ca: Option<std::path::PathBuf>,
    /// API token for TCP (keel token create makes one).
    #[arg(long, global = true, env = "KEEL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

impl ApiArgs {
    pub(crate) fn client(&self) -> Result<Client> {
        let endpoint = Endpoint::parse(&self.api);
        let fingerprint = match &self.fingerprint {
            Some(text) => Some(host::tls::parse_fingerprint(text).with_context(|| {
                format!("--fingerprint '{text}' is not a SHA-256 fingerprint (64 hex digits, colons allowed)")
            })?),
            None => None,
        };
        let given = Trust {
            fingerprint,
            ca: self.ca.clone(),
        };
        let config_path = crate::client_tls::config_path();
        let (trust, remembered) = match (&endpoint, &config_path) {
            (crate::client::Endpoint::Https(_), Some(path)) if given == Trust::default() => {
                let config = crate::client_tls::ClientConfig::load(path)?;
                match config.servers.get(&endpoint.to_string()) {
                    Some(t) => (t.clone(), true),
                    None => (given, false),
                }
            }
            _ => (given, false),
        };
        Ok(Client {
            endpoint,
            token: self.token.clone(),
            remember_in: if remembered { None } else { config_path },
            trust,
            trust_remembered: remembered,
        })
    }
}

pub(crate) fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints rows as columns padded to the widest cell; the last column is not padded.
pub(crate) fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        let text: Vec<String> = cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                if i == last {
                    c
                } else {
                    format!("{c:<width$}", width = widths[i])
                }
            })
            .collect();
        outln!("{}", text.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

#[derive(Subcommand)]
pub enum HostCommand {
    /// Acknowledge (close) an open incident.
    Ack { id: i64 },
    /// Hand every running VM to a new VMM process of the installed keel binary, one after
    /// the other (each guest stands still for its handover only).
    Upgrade,
}

pub async fn host(command: Option<HostCommand>, api: ApiArgs) -> Result<()> {
    let client = api.client()?;
    match command {
        Some(HostCommand::Ack { id }) => {
            client
                .call(Method::POST, &format!("/incidents/{id}/ack"), None)
                .await?;
            outln!("incident {id} acknowledged");
            return Ok(());
        }
        Some(HostCommand::Upgrade) => return crate::moves_cli::upgrade_host(&client, &api).await,
        None => {}
    }
    let status: HostStatus = client.get("/").await?;
    if api.json {
        return print_json(&status);
    }
    let health = serde_json::to_value(status.health)?;
    outln!(
        "host {}: {}  ({} VMs, {} running; keel {})",
        status.hostname,
        health.as_str().unwrap_or("?"),
        status.vms_total,
        status.vms_running,
        status.version
    );
    if status.incidents.is_empty() {
        outln!("no open incidents");
    } else {
        outln!("open incidents (keel host ack ID closes one):");
        let rows: Vec<Vec<String>> = status
            .incidents
            .iter()
            .map(|i| {
                vec![
                    i.id.to_string(),
                    i.opened.clone(),
                    i.vm.clone().unwrap_or_else(|| "-".into()),
                    i.cause.to_string(),
                    i.summary.clone(),
                ]
            })
            .collect();
        print_table(&["ID", "OPENED", "VM", "CAUSE", "SUMMARY"], &rows);
    }
    if !status.failed_operations.is_empty() {
        outln!("failed operations since the daemon started (newest first):");
        let rows: Vec<Vec<String>> = status
            .failed_operations
            .iter()
            .map(|f| {
                vec![
                    f.time.clone(),
                    f.actor.clone(),
                    f.request.clone(),
                    f.status.to_string(),
                    f.error.clone(),
                ]
            })
            .collect();
        print_table(&["TIME", "ACTOR", "REQUEST", "STATUS", "ERROR"], &rows);
    }
    for w in &status.warnings {
        outln!("warning: {w}");
    }
    for c in &status.checks {
        outln!(
            "check {:<12} {}  {}",
            c.name,
            if c.ok { "ok  " } else { "FAIL" },
            c.detail
        );
    }
    if let Some(fp) = &status.identity.tls_fingerprint {
        outln!("tls certificate fingerprint (SHA-256): {fp}");
    }
    if let Some(key) = &status.identity.ledger_public_key {
        outln!("ledger signing key (Ed25519): {key}");
    }
    Ok(())
}

#[derive(Args)]
pub struct EventsArgs {
    /// Only this VM's events.
    #[arg(long)]
    vm: Option<String>,
    /// state, audit or host.
    #[arg(long)]
    kind: Option<String>,
    /// How many of the newest events.
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Keep printing new events as they are recorded (Ctrl-C ends).
    #[arg(long, short)]
    follow: bool,
}

fn event_row(e: &Event) -> Vec<String> {
    let change = match (e.from, e.to) {
        (Some(f), Some(t)) => format!("{f} -> {t}"),
        (None, Some(t)) => format!("-> {t}"),
        _ => e.kind.as_str().to_string(),
    };
    vec![
        e.seq.to_string(),
        e.time.clone(),
        e.vm.clone().unwrap_or_else(|| "-".into()),
        change,
        e.cause.to_string(),
        e.actor.clone(),
        e.detail.clone(),
    ]
}

pub async fn events(args: EventsArgs, api: ApiArgs) -> Result<()> {
    let mut path = format!("/events?limit={}", args.limit);
    if let Some(vm) = &args.vm {
        path.push_str(&format!("&vm={}", query_value(vm)));
    }
    if let Some(kind) = &args.kind {
        path.push_str(&format!("&kind={}", query_value(kind)));
    }
    let client = api.client()?;
    let events: Vec<Event> = client.get(&path).await?;
    if api.json && !args.follow {
        return print_json(&events);
    }
    let rows: Vec<Vec<String>> = events.iter().map(event_row).collect();
    if api.json {
        for e in &events {
            outln!("{}", serde_json::to_string(e)?);
        }
    } else {
        print_table(
            &["SEQ", "TIME", "VM", "WHAT", "CAUSE", "ACTOR", "DETAIL"],
            &rows,
        );
    }
    if !args.follow {
        return Ok(());
    }
    // Follow: ask for what came after the last row seen, twice a second; one line per event
    // (JSON lines with --json).
    let mut last = events.last().map(|e| e.seq).unwrap_or(0);
    let base = path.replace(&format!("limit={}", args.limit), "limit=1000");
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let newer: Vec<Event> = client.get(&format!("{base}&since={last}")).await?;
        for e in &newer {
            if api.json {
                outln!("{}", serde_json::to_string(e)?);
            } else {
                outln!("{}", event_row(e).join("  "));
            }
            last = e.seq;
        }
    }
}

#[derive(Args)]
pub struct SlaArgs {
    /// One VM; every VM in the ledger when absent.
    #[arg(long)]
    vm: Option<String>,
    /// Start of the window, RFC 3339 (2030-01-01T00:00:00Z).
    #[arg(long)]
    from: String,
    /// End of the window, RFC 3339.
    #[arg(long)]
    to: String,
    /// Credit tiers: BELOW_PERCENT:CREDIT_PERCENT,... e.g. 99.95:10,99:25,95:100.
    #[arg(long)]
    credits: Option<String>,
    /// table, json or csv.
    #[arg(long, default_value = "table")]
    format: String,
}

pub async fn sla_report(args: SlaArgs, api: ApiArgs) -> Result<()> {
    let format = if api.json {
        "json"
    } else {
        args.format.as_str()
    };
    if !["table", "json", "csv"].contains(&format) {
        bail!("--format {format}: use table, json or csv");
    }
    let mut path = format!(
        "/sla?from={}&to={}",
        query_value(&args.from),
        query_value(&args.to)
    );
    if let Some(vm) = &args.vm {
        path.push_str(&format!("&vm={}", query_value(vm)));
    }
    if let Some(c) = &args.credits {
        path.push_str(&format!("&credits={}", query_value(c)));
    }
    let report: SlaReport = api.client()?.get(&path).await?;
    match format {
        "json" => print_json(&report)?,
        "csv" => out!("{}", host::sla::to_csv(&report)),
        _ => {
            outln!(
                "SLA report {} to {} (ledger {}, head {})",
                report.from,
                report.to,
                if report.ledger_verified {
                    "verified"
                } else {
                    "DOES NOT VERIFY"
                },
                report.ledger_head_hash
            );
            let rows: Vec<Vec<String>> = report
                .vms
                .iter()
                .map(|v| {
                    let causes: Vec<String> = v
                        .downtime_by_cause
                        .iter()
                        .filter(|(_, s)| **s > 0.0)
                        .map(|(c, s)| format!("{c} {s:.3}s"))
                        .collect();
                    vec![
                        v.vm.clone(),
                        format!("{:.4}%", v.availability_percent),
                        format!("{:.3}s", v.downtime_seconds),
                        v.outages.to_string(),
                        format!("{:.3}s", v.excluded_seconds),
                        format!("{}%", v.credit_percent),
                        causes.join(", "),
                    ]
                })
                .collect();
            print_table(
                &[
                    "VM",
                    "AVAILABILITY",
                    "DOWNTIME",
                    "OUTAGES",
                    "EXCLUDED",
                    "CREDIT",
                    "BY CAUSE",
                ],
                &rows,
            );
        }
    }
    if !report.ledger_verified {
        bail!("the ledger does not verify (keel ledger verify says where); this report is not evidence");
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Make an API token for TCP clients; its secret is printed once.
    Create {
        name: String,
        /// viewer, operator or admin.
        #[arg(long, default_value = "viewer")]
        role: String,
        /// RFC 3339 expiry; after it the token can still operate existing VMs but not
        /// create anything.
        #[arg(long)]
        expires: Option<String>,
    },
    /// List tokens (never their secrets).
    List,
    /// Remove a token.
    Rm { name: String },
}

pub async fn token(command: TokenCommand, api: ApiArgs) -> Result<()> {
    let client = api.client()?;
    match command {
        TokenCommand::Create {
            name,
            role,
            expires,
        } => {
            let mut body = json!({ "name": name, "role": role });
            if let Some(e) = expires {
                body["expires"] = json!(e);
            }
            let created: NewToken = client.send(Method::POST, "/tokens", Some(body)).await?;
            if api.json {
                return print_json(&created);
            }
            outln!("{}", created.secret);
            eprintln!(
                "keel: token '{}' ({}) created; the secret above is shown only once",
                created.token.name, created.token.role
            );
        }
        TokenCommand::List => {
            let tokens: Vec<TokenInfo> = client.get("/tokens").await?;
            if api.json {
                return print_json(&tokens);
            }
            let rows: Vec<Vec<String>> = tokens
                .iter()
                .map(|t| {
                    vec![
                        t.name.clone(),
                        t.role.to_string(),
                        t.created.clone(),
                        match (&t.expires, t.expired) {
                            (Some(e), true) => format!("{e} (expired)"),
                            (Some(e), false) => e.clone(),
                            (None, _) => "never".into(),
                        },
                    ]
                })
                .collect();
            print_table(&["NAME", "ROLE", "CREATED", "EXPIRES"], &rows);
        }
        TokenCommand::Rm { name } => {
            client
                .call(
                    Method::DELETE,
                    &format!("/tokens/{}", query_value(&name)),
                    None,
                )
                .await?;
            outln!("token '{name}' removed");
        }
    }
    Ok(())
}
