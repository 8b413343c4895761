//! VMs that stand still or go back over the API: pause and resume, snapshots and restores.

use api::snapshot::{RestoreRequest, SnapshotInfo, SnapshotRequest, UpgradeOutcome, UpgradeReport};
use api::{ErrorBody, VmInfo};
use axum::extract::State;
use axum::{Extension, Json};

use super::{load_vm, ApiError, App, Body, PathArg};
use crate::auth::Caller;

#[utoipa::path(post, path = "/vms/{name}/pause", params(("name" = String, Path)),
    description = "Stops the VM's vCPUs at an instruction boundary and quiets its devices (requests already taken complete; none is taken until it resumes). The ledger records the pause; an operator's pause is planned down time in SLA reports.",
    responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn pause_vm(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    PathArg(name): PathArg<String>,
) -> Result<Json<VmInfo>, ApiError> {
    app.pause(&name, &caller.actor).await?;
    Ok(Json(load_vm(&app, &name)?))
}

#[utoipa::path(post, path = "/vms/{name}/resume", params(("name" = String, Path)),
    description = "Lets a paused VM run on from where it stopped; the ledger records how long it stood still.",
    responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn resume_vm(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    PathArg(name): PathArg<String>,
) -> Result<Json<VmInfo>, ApiError> {
    app.resume(&name, &caller.actor).await?;
    Ok(Json(load_vm(&app, &name)?))
}

#[utoipa::path(post, path = "/vms/{name}/snapshots", params(("name" = String, Path)),
    request_body = SnapshotRequest,
    description = "Snapshots a running or paused VM: its state, the memory its guest touched, and each writable disk at that instant: the disk's file is kept as it is and the VM goes on in a new qcow2 overlay on it, switched while the guest stands still (a `direct=on` disk, or one whose backing chain is 16 images deep, is copied instead: a reflink where the file system shares blocks, else a sparse copy, while the guest stands still). The pause is recorded with cause `maintenance` and counts as down time in SLA reports.",
    responses((status = 200, body = SnapshotInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn take_snapshot(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    PathArg(name): PathArg<String>,
    Body(request): Body<SnapshotRequest>,
) -> Result<Json<SnapshotInfo>, ApiError> {
    Ok(Json(app.snapshot(&name, request, &caller.actor).await?))
}

#[utoipa::path(get, path = "/vms/{name}/snapshots", params(("name" = String, Path)),
    responses((status = 200, body = Vec<SnapshotInfo>), (status = 404, body = ErrorBody)))]
pub(super) async fn list_snapshots(
    State(app): State<App>,
    PathArg(name): PathArg<String>,
) -> Result<Json<Vec<SnapshotInfo>>, ApiError> {
    Ok(Json(app.list_snapshots(&name)?))
}

#[utoipa::path(delete, path = "/vms/{name}/snapshots/{snapshot}",
    params(("name" = String, Path), ("snapshot" = String, Path)),
    description = "Removes a snapshot and its files. The qcow2 overlay it kept as its disk is merged into the one image over it where nothing else names it and no running VM writes in that image (it is rewritten to read as before, without the overlay below it), then removed when nothing reaches it.",
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn remove_snapshot(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    PathArg((name, snapshot)): PathArg<(String, String)>,
) -> Result<axum::http::StatusCode, ApiError> {
    app.remove_snapshot(&name, &snapshot, &caller.actor).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/vms/{name}/restore", params(("name" = String, Path)),
    request_body = RestoreRequest,
    description = "Restores a stopped VM from one of its snapshots: its writable disks go back to that instant (a new qcow2 overlay over each disk the snapshot kept; a copied one is copied back), then its VMM starts on the snapshot's state and the guest runs on from where it was. With `as`, the snapshot is restored as a new VM of that name instead (its own overlays, or copies, in the new VM's directory; not for a snapshot with NICs), and the answer is the new VM.",
    responses((status = 200, body = VmInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn restore_vm(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    PathArg(name): PathArg<String>,
    Body(request): Body<RestoreRequest>,
) -> Result<Json<VmInfo>, ApiError> {
    let restored = match &request.as_vm {
        Some(new) => {
            app.restore_as(&name, &request.snapshot, new, &caller.actor)
                .await?;
            new.clone()
        }
        None => {
            app.restore(&name, &request.snapshot, &caller.actor).await?;
            name
        }
    };
    Ok(Json(load_vm(&app, &restored)?))
}

fn report(vm: &str, u: &crate::supervisor::Upgraded) -> UpgradeReport {
    UpgradeReport {
        vm: vm.to_string(),
        old_pid: u.old_pid,
        new_pid: u.new_pid,
        paused_ms: u.paused.as_secs_f64() * 1000.0,
    }
}

#[utoipa::path(post, path = "/vms/{name}/upgrade", params(("name" = String, Path)),
    description = "Hands the running guest to a new VMM process of the installed keel binary, in the same jail: guest memory is shared, the devices' descriptors are handed over, and only the vCPUs' and devices' state crosses as data. The guest stands still for the handover only (recorded with cause `maintenance`). On any failure the guest runs on in its old VMM.",
    responses((status = 200, body = UpgradeReport), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn upgrade_vm(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    PathArg(name): PathArg<String>,
) -> Result<Json<UpgradeReport>, ApiError> {
    let upgraded = app.upgrade(&name, &caller.actor).await?;
    Ok(Json(report(&name, &upgraded)))
}

#[utoipa::path(post, path = "/host/upgrade",
    description = "Upgrades every running VM's VMM, one after the other (see `POST /vms/{name}/upgrade`). Admin role.",
    responses((status = 200, body = Vec<UpgradeOutcome>)))]
pub(super) async fn upgrade_host(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<UpgradeOutcome>>, ApiError> {
    let outcomes = app.upgrade_all(&caller.actor).await?;
    Ok(Json(
        outcomes
            .into_iter()
            .map(|(vm, outcome)| match outcome {
                Ok(u) => UpgradeOutcome {
                    upgraded: Some(report(&vm, &u)),
                    error: None,
                    vm,
                },
                Err(error) => UpgradeOutcome {
                    vm,
                    upgraded: None,
                    error: Some(error),
                },
            })
            .collect(),
    ))
}
