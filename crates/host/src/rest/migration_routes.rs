//! Live migration over the API: the source's `POST /vms/{name}/migrate`, its progress and
//! cancel, and the target's WebSocket that the source daemon connects to.

use api::migration::{MigrateRequest, MigrationProgress};
use api::ErrorBody;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use super::{ApiError, App, Body, PathArg};
use crate::auth::Caller;

#[utoipa::path(post, path = "/vms/{name}/migrate", params(("name" = String, Path)),
    request_body = MigrateRequest,
    description = "Starts moving the running VM to another host's daemon (`to`, with a token of that daemon and its certificate's fingerprint). Memory is copied in rounds while the guest runs, until what is left fits `max_downtime_ms`; then the guest is paused, the rest and its state cross, and the target runs it. Its disks must be on storage both hosts see at the same paths (checked before anything is sent). Answers at once (202); `GET /vms/{name}/migration` follows it. On any failure before the switch the VM runs on here. Operator role; refused to expired tokens.",
    responses((status = 202, body = MigrationProgress), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn migrate_vm(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    PathArg(name): PathArg<String>,
    Body(request): Body<MigrateRequest>,
) -> Result<(StatusCode, Json<MigrationProgress>), ApiError> {
    let progress = app.migrate(&name, request, &caller.actor).await?;
    Ok((StatusCode::ACCEPTED, Json(progress)))
}

#[utoipa::path(get, path = "/vms/{name}/migration", params(("name" = String, Path)),
    description = "The VM's migration under way (rounds, bytes sent, the guest's dirty rate, the link's rate, the downtime the switch would cause now), or the last one's outcome since the daemon started. A VM that has migrated away is no longer here: its last progress stays readable until the daemon restarts.",
    responses((status = 200, body = MigrationProgress), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn show_migration(
    State(app): State<App>,
    PathArg(name): PathArg<String>,
) -> Result<Json<MigrationProgress>, ApiError> {
    match app.migrations.get(&name) {
        // A VM that left keeps its last progress: it is no longer defined here.
        Some(m) => Ok(Json(m.progress())),
        None => Ok(Json(app.migration(&name)?)),
    }
}

#[utoipa::path(delete, path = "/vms/{name}/migration", params(("name" = String, Path)),
    description = "Cancels the VM's migration: it ends before the switch and the VM runs on here (a cancel that comes after the switch began has no effect).",
    responses((status = 200, body = MigrationProgress), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn cancel_migration(
    State(app): State<App>,
    PathArg(name): PathArg<String>,
) -> Result<Json<MigrationProgress>, ApiError> {
    Ok(Json(app.cancel_migration(&name)?))
}

#[utoipa::path(get, path = "/migrations/incoming",
    description = "The target's end of a live migration: a WebSocket the source daemon opens (`keel vm migrate` on the source host does it). The VM is defined here once its disks are shown to be the files this host sees; it runs here when the source lets go. Operator role; refused to expired tokens.",
    responses(
        (status = 101, description = "Switching Protocols: the migration's link is open"),
        (status = 400, body = ErrorBody, description = "not a WebSocket upgrade request"),
        (status = 403, body = ErrorBody, description = "the token's role is below operator")))]
pub(super) async fn incoming(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let upgrade = upgrade.map_err(|e| {
        ApiError(
            e.status(),
            format!("GET /migrations/incoming is a WebSocket: {}", e.body_text()),
        )
    })?;
    Ok(upgrade
        .max_message_size(crate::migration::MAX_MESSAGE)
        .max_frame_size(crate::migration::MAX_MESSAGE)
        .on_upgrade(move |ws| async move {
            app.migrate_in(ws, caller.actor).await;
        })
        .into_response())
}
