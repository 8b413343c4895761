//! Holding a VM still over the API: pause and resume.

use api::{ErrorBody, VmInfo};
use axum::extract::State;
use axum::{Extension, Json};

use super::{load_vm, ApiError, App, PathArg};
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
