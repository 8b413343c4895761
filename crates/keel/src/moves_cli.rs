//! `keel vm snapshot|snapshots|restore|snapshot-rm|upgrade` and `keel host upgrade`: VMs that stand
//! still, go back or change VMM, through the daemon.

use anyhow::Result;
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

/// Takes a snapshot of `vm`, named `name` (the daemon picks `snap-N` when None).
pub async fn take(client: &Client, api: &ApiArgs, vm: &str, name: Option<String>) -> Result<()> {
    let body = serde_json::json!({ "name": name });
    let info: SnapshotInfo = client
        .send(Method::POST, &snapshots_path(vm), Some(body))
        .await?;
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
    vm: &str,
    snapshot: &str,
    as_vm: Option<String>,
) -> Result<api::VmInfo> {
    let body = serde_json::json!({ "snapshot": snapshot, "as": as_vm });
    client
        .send(
            Method::POST,
            &format!("/vms/{}/restore", query_value(vm)),
            Some(body),
        )
        .await
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
