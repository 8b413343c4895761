//! `keel vm snapshot|snapshots|restore|snapshot-rm|upgrade` and `keel host upgrade`: VMs that stand
//! still, go back or change VMM, through the daemon.

use std::time::Duration;

use anyhow::Result;
use api::image::{Operation, OperationState};
use api::snapshot::SnapshotInfo;
use hyper::Method;

use crate::cli::{print_json, write_out, ApiArgs};
use crate::client::{query_value, Client};

macro_rules! outln {
    ($($arg:tt)*) => { write_out(format_args!("{}\n", format_args!($($arg)*))) };
}

fn snapshots_path(vm: &str) -> String {
    format!("/vms/{}/snapshots", query_value(vm))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// Waits for `request` while drawing, on stderr, the progress of the daemon's operation
/// `kind` on `target` (a snapshot's or a restore's disk copies, which take long for large
/// disks without reflinks).
async fn with_progress<T>(
    client: &Client,
    kind: &str,
    target: &str,
    quiet: bool,
    request: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let bar = crate::image_cli::progress_bar(
        quiet,
        1,
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
    );
    tokio::pin!(request);
    // Short requests (the usual snapshot takes milliseconds) draw nothing.
    let mut next = tokio::time::Instant::now() + Duration::from_millis(500);
    loop {
        tokio::select! {
            answer = &mut request => {
                bar.finish_and_clear();
                return answer;
            }
            () = tokio::time::sleep_until(next) => {
                next += Duration::from_millis(250);
                let Ok(ops) = client.get::<Vec<Operation>>("/operations").await else {
                    continue;
                };
                if let Some(op) = ops.into_iter().find(|o| {
                    o.kind == kind && o.target == target && o.state == OperationState::Running
                }) {
                    bar.set_message(format!("{target}: {}", op.step.unwrap_or_default()));
                    bar.set_length(op.total_bytes.max(1));
                    bar.set_position(op.done_bytes);
                }
            }
        }
    }
}

/// Takes a snapshot of `vm`, named `name` (the daemon picks `snap-N` when None), its files
/// in `to` when given.
pub async fn take(
    client: &Client,
    api: &ApiArgs,
    vm: &str,
    name: Option<String>,
    to: Option<std::path::PathBuf>,
) -> Result<()> {
    let request = api::snapshot::SnapshotRequest {
        name,
        to: to.map(|d| d.display().to_string()),
    };
    let body = serde_json::to_value(&request)?;
    let path = snapshots_path(vm);
    let request = client.send(Method::POST, &path, Some(body));
    let info: SnapshotInfo = with_progress(client, "vm-snapshot", vm, api.json, request).await?;
    if api.json {
        return print_json(&info);
    }
    outln!("{vm}: snapshot {} in {}", info.name, info.dir);
    outln!(
        "  memory {} stored of {}, state {} bytes, guest stood still {:.3} s",
        mib(info.memory_stored_bytes),
        mib(info.memory_bytes),
        info.state_bytes,
        info.paused_seconds
    );
    for disk in &info.disks {
        match (&disk.copy, &disk.how) {
            (Some(copy), Some(how)) => outln!("  disk {} -> {copy} ({how})", disk.path),
            _ => outln!("  disk {} (read-only: not copied)", disk.path),
        }
    }
    Ok(())
}

pub async fn list(client: &Client, api: &ApiArgs, vm: &str) -> Result<()> {
    let snapshots: Vec<SnapshotInfo> = client.get(&snapshots_path(vm)).await?;
    if api.json {
        return print_json(&snapshots);
    }
    if snapshots.is_empty() {
        outln!("{vm} has no snapshots; keel vm snapshot {vm} takes one");
    }
    for s in &snapshots {
        outln!(
            "{:<20} {}  memory {:>10} stored  {} disk(s)  stood still {:.3} s",
            s.name,
            s.taken,
            mib(s.memory_stored_bytes),
            s.disks.len(),
            s.paused_seconds
        );
    }
    Ok(())
}

pub async fn restore(
    client: &Client,
    api: &ApiArgs,
    vm: &str,
    snapshot: &str,
    as_vm: Option<String>,
) -> Result<api::VmInfo> {
    let target = as_vm.clone().unwrap_or_else(|| vm.to_string());
    let body = serde_json::json!({ "snapshot": snapshot, "as": as_vm });
    let path = format!("/vms/{}/restore", query_value(vm));
    let request = client.send(Method::POST, &path, Some(body));
    with_progress(client, "vm-restore", &target, api.json, request).await
}

pub async fn remove(client: &Client, api: &ApiArgs, vm: &str, snapshot: &str) -> Result<()> {
    client
        .call(
            Method::DELETE,
            &format!("{}/{}", snapshots_path(vm), query_value(snapshot)),
            None,
        )
        .await?;
    if !api.json {
        outln!("{vm}: snapshot {snapshot} removed");
    }
    Ok(())
}

fn say_upgraded(r: &api::snapshot::UpgradeReport) {
    outln!(
        "{}: VMM upgraded, pid {} -> {}; the guest stood still {:.3} ms",
        r.vm,
        r.old_pid,
        r.new_pid,
        r.paused_ms
    );
}

pub async fn upgrade(client: &Client, api: &ApiArgs, vm: &str) -> Result<()> {
    let report: api::snapshot::UpgradeReport = client
        .send(
            Method::POST,
            &format!("/vms/{}/upgrade", query_value(vm)),
            None,
        )
        .await?;
    if api.json {
        return print_json(&report);
    }
    say_upgraded(&report);
    Ok(())
}

pub async fn upgrade_host(client: &Client, api: &ApiArgs) -> Result<()> {
    let outcomes: Vec<api::snapshot::UpgradeOutcome> =
        client.send(Method::POST, "/host/upgrade", None).await?;
    if api.json {
        return print_json(&outcomes);
    }
    if outcomes.is_empty() {
        outln!("no VM runs: nothing to upgrade");
    }
    let mut failed = 0;
    for o in &outcomes {
        match (&o.upgraded, &o.error) {
            (Some(r), _) => say_upgraded(r),
            (None, Some(e)) => {
                failed += 1;
                outln!("{}: not upgraded: {e}", o.vm);
            }
            (None, None) => outln!("{}: ?", o.vm),
        }
    }
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {} VMs were not upgraded (they run on in their old VMMs)",
            outcomes.len()
        );
    }
    Ok(())
}
