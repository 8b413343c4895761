//! The image library over the API: list, import (an operation to follow), show, remove; and
//! the long operations themselves.

use api::image::{ImageInfo, ImportRequest, Operation};
use api::ErrorBody;
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};

use super::{ApiError, App, Body, PathArg};
use crate::auth::Caller;

#[utoipa::path(get, path = "/images", responses((status = 200, body = Vec<ImageInfo>)))]
pub(super) async fn list_images(State(app): State<App>) -> Result<Json<Vec<ImageInfo>>, ApiError> {
    Ok(Json(app.list_images()?))
}

#[utoipa::path(post, path = "/images", request_body = ImportRequest,
    responses(
        (status = 202, body = Operation, description = "The import started: follow it at /operations/{id}; the image is listed once the operation is done"),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn import_image(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Body(request): Body<ImportRequest>,
) -> Result<(StatusCode, Json<Operation>), ApiError> {
    let op = app.import_image(request, &caller.actor)?;
    Ok((StatusCode::ACCEPTED, Json(op)))
}

#[utoipa::path(get, path = "/images/{name}", params(("name" = String, Path)),
    responses((status = 200, body = ImageInfo), (status = 404, body = ErrorBody)))]
pub(super) async fn show_image(
    State(app): State<App>,
    PathArg(name): PathArg<String>,
) -> Result<Json<ImageInfo>, ApiError> {
    Ok(Json(app.show_image(&name)?))
}

#[utoipa::path(delete, path = "/images/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "A VM uses the image")))]
pub(super) async fn remove_image(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    PathArg(name): PathArg<String>,
) -> Result<StatusCode, ApiError> {
    app.remove_image(&name, &caller.actor)?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/operations", responses((status = 200, body = Vec<Operation>, description = "This daemon's long operations, newest first (the finished ones: the latest 64)")))]
pub(super) async fn list_operations(State(app): State<App>) -> Json<Vec<Operation>> {
    Json(app.operations.list())
}

#[utoipa::path(get, path = "/operations/{id}", params(("id" = u64, Path)),
    responses((status = 200, body = Operation), (status = 404, body = ErrorBody)))]
pub(super) async fn show_operation(
    State(app): State<App>,
    PathArg(id): PathArg<u64>,
) -> Result<Json<Operation>, ApiError> {
    app.operations.get(id).map(Json).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no operation {id}: operations are kept until the daemon restarts (the finished ones: the latest 64)"),
        )
    })
}

#[utoipa::path(post, path = "/imports", request_body = api::image::VmImportRequest,
    responses(
        (status = 202, body = Operation, description = "The import started: follow it at /operations/{id}; once done, its result names the VM and its notes list what was not carried over"),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn import_vm(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Body(request): Body<api::image::VmImportRequest>,
) -> Result<(StatusCode, Json<Operation>), ApiError> {
    let op = app.import_vm(request, &caller.actor)?;
    Ok((StatusCode::ACCEPTED, Json(op)))
}

#[utoipa::path(post, path = "/vms/{name}/clone", params(("name" = String, Path)),
    request_body = api::image::VmCloneRequest,
    responses(
        (status = 202, body = Operation, description = "The copy started: follow it at /operations/{id}; once done, its result names the new VM"),
        (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn clone_vm(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    PathArg(name): PathArg<String>,
    Body(request): Body<api::image::VmCloneRequest>,
) -> Result<(StatusCode, Json<Operation>), ApiError> {
    let op = app.clone_vm(&name, request, &caller.actor)?;
    Ok((StatusCode::ACCEPTED, Json(op)))
}
