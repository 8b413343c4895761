//! The REST API: JSON over HTTP on a Unix socket (and TCP when asked). Every answer that is
//! not 2xx has an `ErrorBody`; bad input is a 4xx, never a 5xx or a panic. The middleware
//! authorises each request (auth.rs) and records every mutating one in the ledger.

use std::sync::Arc;
use std::time::Duration;

use api::events::EventKind;
use api::{
    Cause, ErrorBody, Event, HostStatus, Incident, NewToken, SlaReport, TokenInfo, TokenRequest,
    VmInfo, VmSpec, VmUsage,
};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use utoipa::{IntoParams, OpenApi};

use crate::auth::{self, Caller, Need, Peer};
use crate::health;
use crate::ledger::NewEvent;
use crate::store::VmRow;
use crate::supervisor::{self, Supervisor};
use crate::time::{now_ms, rfc3339};

mod extract;
use extract::bad_request;
pub use extract::{ApiError, Body, Params, PathArg};

pub type App = Arc<Supervisor>;

/// The API's routes and their OpenAPI document, from the same `#[utoipa::path]` attributes:
/// a route cannot exist without its documentation, nor the reverse.
fn documented_routes() -> utoipa_axum::router::OpenApiRouter<App> {
    use utoipa_axum::routes;
    utoipa_axum::router::OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(host_status))
        .routes(routes!(openapi))
        .routes(routes!(metrics))
        .routes(routes!(list_vms, create_vm))
        .routes(routes!(show_vm, delete_vm))
        .routes(routes!(start_vm))
        .routes(routes!(shutdown_vm))
        .routes(routes!(stop_vm))
        .routes(routes!(reboot_vm))
        .routes(routes!(moves::pause_vm))
        .routes(routes!(moves::resume_vm))
        .routes(routes!(moves::take_snapshot, moves::list_snapshots))
        .routes(routes!(moves::remove_snapshot))
        .routes(routes!(moves::restore_vm))
        .routes(routes!(moves::upgrade_vm))
        .routes(routes!(moves::upgrade_host))
        .routes(routes!(migration_routes::migrate_vm))
        .routes(routes!(
            migration_routes::show_migration,
            migration_routes::cancel_migration
        ))
        .routes(routes!(migration_routes::incoming))
        .routes(routes!(crate::console::attach))
        .routes(routes!(crate::console_log::log_tail))
        .routes(routes!(ledger_routes::list_events))
        .routes(routes!(ledger_routes::follow_events))
        .routes(routes!(ledger_routes::verify_ledger))
        .routes(routes!(ledger_routes::export_ledger))
        .routes(routes!(ledger_routes::sla_report))
        .routes(routes!(ack_incident))
        .routes(routes!(tokens::list_tokens, tokens::create_token))
        .routes(routes!(tokens::delete_token))
        .routes(routes!(sessions::create, sessions::show, sessions::end))
        .routes(routes!(images::list_images, images::import_image))
        .routes(routes!(images::show_image, images::remove_image))
        .routes(routes!(images::import_vm))
        .routes(routes!(images::clone_vm))
        .routes(routes!(images::list_operations))
        .routes(routes!(images::show_operation))
}

/// The OpenAPI document of [`router`]'s routes.
pub fn openapi_document() -> &'static utoipa::openapi::OpenApi {
    static DOCUMENT: std::sync::OnceLock<utoipa::openapi::OpenApi> = std::sync::OnceLock::new();
    DOCUMENT.get_or_init(|| {
        let mut doc = documented_routes().into_openapi();
        doc::complete(&mut doc);
        doc
    })
}

/// The API's routes, with authorisation and auditing around them.
pub fn router(app: App, access: Arc<auth::Access>) -> Router {
    let (routes, _) = documented_routes().split_for_parts();
    routes
        .fallback(|| async {
            ApiError(
                StatusCode::NOT_FOUND,
                "no such API path; GET /openapi.json lists them".into(),
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            (app.clone(), access.clone()),
            guard,
        ))
        .layer(axum::middleware::from_fn_with_state(access, count_answer))
        .with_state(app)
}

/// Counts every API answer by status (refusals included), for `/metrics`.
async fn count_answer(
    State(access): State<Arc<auth::Access>>,
    req: Request,
    next: Next,
) -> Response {
    let response = next.run(req).await;
    access.answers.answered(response.status().as_u16());
    response
}

/// Prometheus metrics (OpenMetrics text): VMs, host, ledger and API answers.
#[utoipa::path(get, path = "/metrics",
    responses((status = 200, description = "OpenMetrics text format (Prometheus scrapes it); viewer role", content_type = "application/openmetrics-text")))]
async fn metrics(
    State(app): State<App>,
    Extension(access): Extension<Arc<auth::Access>>,
) -> Result<Response, ApiError> {
    let text = crate::metrics::render(&app, &access.answers)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("metrics: {e}")))?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// A console attach: a GET (the WebSocket upgrade), but control of the guest.
fn is_console(path: &str) -> bool {
    path.strip_prefix("/vms/")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(_, tail)| tail.trim_end_matches('/') == "console")
}

/// What a request needs, from its method and path.
fn need_of(method: &Method, path: &str) -> Need {
    // Tokens, and upgrading every VM of the host at once.
    if path.starts_with("/tokens") || path == "/host/upgrade" {
        return Need::Admin;
    }
    // The console, live or its scrollback, is the guest's operator's.
    if is_console(path) || path.ends_with("/console/log") {
        return Need::Operate;
    }
    // A VM arriving from another host is a new VM here; one leaving goes from this host.
    if path == "/migrations/incoming" || (path.starts_with("/vms/") && path.ends_with("/migrate")) {
        return Need::Create;
    }
    // Signing in and out is for every role.
    if path == "/session" {
        return Need::Read;
    }
    match *method {
        Method::GET | Method::HEAD => Need::Read,
        // These name host files (a VM's, an image's or an import's source) or make a VM.
        Method::POST
            if path == "/vms"
                || path == "/images"
                || path == "/imports"
                || (path.starts_with("/vms/") && path.ends_with("/clone")) =>
        {
            Need::Create
        }
        Method::DELETE => Need::Create,
        _ => Need::Operate,
    }
}

/// Authorises every request; records every mutating one and every console attach (allowed or
/// not) in the ledger, except those refused before the caller was known: they are counted
/// and summarised per peer and minute (refusals.rs).
async fn guard(
    State((app, access)): State<(App, Arc<auth::Access>)>,
    mut req: Request,
    next: Next,
) -> Response {
    // The listener names every connection's peer; a request without one is refused, never
    // taken for a local admin.
    let Some(peer) = req
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .map(|c| c.0.clone())
    else {
        return ApiError(
            StatusCode::FORBIDDEN,
            "the connection's peer is not known; refused".into(),
        )
        .into_response();
    };
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let bearer = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let mutating = !matches!(method, Method::GET | Method::HEAD) || is_console(&path);
    // A browser opening the daemon's address gets the web console.
    if path == "/" && method == Method::GET && wants_html(req.headers()) {
        return axum::response::Redirect::to(crate::ui::PREFIX).into_response();
    }
    // Only TCP callers present tokens: the Unix socket's requests do not read the table.
    let (tokens, session) = match peer {
        Peer::Tcp(_) => match app.with_store(|s| s.tokens()) {
            Ok(t) => (
                t,
                crate::session::from_cookies(req.headers())
                    .and_then(|id| access.sessions.token_hash(&id)),
            ),
            Err(e) => return ApiError::from(e).into_response(),
        },
        Peer::Unix { .. } => (Vec::new(), None),
    };
    let credential = match (&bearer, &session) {
        (Some(secret), _) => Some(auth::Credential::Secret(secret)),
        (None, Some(hash)) => Some(auth::Credential::Hashed(hash)),
        (None, None) => None,
    };
    // A browser's session cookie goes with any request to this host, whoever's page made it:
    // what changes something must come from this host's own pages.
    if bearer.is_none() && session.is_some() && mutating {
        let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
        if !crate::session::same_origin(
            header(axum::http::header::ORIGIN),
            header(axum::http::header::HOST),
            access.tls,
        ) {
            return refuse_anonymous(&access, &peer, &method, &path, auth::Error::CrossSite);
        }
    }
    let need = need_of(&method, &path);
    let decision = match access.refusals.blocked(&peer) {
        Some(wait) => Err(auth::Error::TooManyFailures(wait.as_secs().max(1))),
        None => auth::authorize(&peer, credential, &tokens, &access.local, need, now_ms()),
    };
    req.extensions_mut().insert(access.clone());
    let (actor, mut response) = match decision {
        Ok(caller) => {
            let actor = caller.actor.clone();
            let warning = caller.warning.clone();
            req.extensions_mut().insert(caller);
            let mut response = next.run(req).await;
            if let Some(w) = warning.and_then(|w| {
                HeaderValue::from_str(&format!("299 keel \"{}\"", w.replace('"', "'"))).ok()
            }) {
                response.headers_mut().insert("warning", w);
            }
            (actor, response)
        }
        Err(e) if e.is_anonymous() => return refuse_anonymous(&access, &peer, &method, &path, e),
        Err(e) => {
            let actor = match &e {
                auth::Error::Forbidden { who, .. } => who.clone(),
                auth::Error::Expired { name, .. } => format!("token:{name}"),
                _ => "anonymous".to_string(),
            };
            (
                actor,
                ApiError(StatusCode::FORBIDDEN, e.to_string()).into_response(),
            )
        }
    };
    if mutating {
        let status = response.status();
        let mut detail = format!("{method} {path} from {peer}: {status}");
        if status.as_u16() >= 400 {
            // The reason goes into the audit row and onto the front page.
            let (parts, body) = response.into_parts();
            let bytes = axum::body::to_bytes(body, 64 << 10)
                .await
                .unwrap_or_default();
            let error = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            detail = format!("{detail}: {error}");
            app.note_failure(api::host::FailedOperation {
                time: rfc3339(now_ms()),
                actor: actor.clone(),
                request: format!("{method} {path}"),
                status: status.as_u16(),
                error,
            });
            response = Response::from_parts(parts, axum::body::Body::from(bytes));
        }
        let audit = NewEvent {
            kind: EventKind::Audit,
            vm: vm_of_path(&path),
            from: None,
            to: None,
            cause: Cause::Operator,
            actor,
            detail,
        };
        if let Err(e) = app.with_store(|s| s.record(&audit)) {
            tracing::error!("recording the audit row for {method} {path} failed: {e}");
        }
    }
    response
}

/// The answer to a caller who is not known (no or an unknown token, a local user without a
/// role, too many failures): counted for the peer's summary row, not audited one by one.
fn refuse_anonymous(
    access: &auth::Access,
    peer: &Peer,
    method: &Method,
    path: &str,
    e: auth::Error,
) -> Response {
    let status = match e {
        auth::Error::TooManyFailures(_) => StatusCode::TOO_MANY_REQUESTS,
        auth::Error::NoLocalRole(_) | auth::Error::CrossSite => StatusCode::FORBIDDEN,
        _ => StatusCode::UNAUTHORIZED,
    };
    access
        .refusals
        .request_refused(peer, status.as_u16(), &format!("{method} {path}"));
    let mut response = ApiError(status, e.to_string()).into_response();
    if let auth::Error::TooManyFailures(secs) = e {
        response
            .headers_mut()
            .insert(axum::http::header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// Whether a request is a browser's navigation (it prefers HTML to JSON).
fn wants_html(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"))
}

fn vm_of_path(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/vms/")?;
    Some(rest.split('/').next()?.to_string()).filter(|n| !n.is_empty())
}

fn vm_info(app: &Supervisor, row: VmRow) -> VmInfo {
    let run_dir = app.run_dir(&row.spec.name);
    VmInfo {
        state: row.state,
        pid: row.pid,
        since: rfc3339(row.since_ms),
        reason: row.reason,
        console_log: run_dir.console_log().display().to_string(),
        console_socket: run_dir.console_socket().display().to_string(),
        vsock_socket: row.spec.vsock.as_ref().map(|_| {
            run_dir
                .file(api::control::files::VSOCK_SOCKET)
                .display()
                .to_string()
        }),
        usage: row
            .state
            .has_vmm()
            .then(|| app.usage(&row.spec.name))
            .flatten(),
        spec: row.spec,
    }
}

fn load_vm(app: &Supervisor, name: &str) -> Result<VmInfo, ApiError> {
    let row = app
        .with_store(|s| s.vm(name))?
        .ok_or_else(|| ApiError::from(supervisor::Error::NotFound(name.to_string())))?;
    Ok(vm_info(app, row))
}

/// Host health, open incidents and warnings first; then the rest.
#[utoipa::path(get, path = "/", responses((status = 200, body = HostStatus)))]
async fn host_status(State(app): State<App>) -> Result<Json<HostStatus>, ApiError> {
    Ok(Json(health::status(&app)?))
}

#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "This API's OpenAPI 3.1 document", content_type = "application/json")))]
async fn openapi() -> Json<&'static utoipa::openapi::OpenApi> {
    Json(openapi_document())
}

#[utoipa::path(get, path = "/vms", responses((status = 200, body = Vec<VmInfo>)))]
async fn list_vms(State(app): State<App>) -> Result<Json<Vec<VmInfo>>, ApiError> {
    let rows = app.with_store(|s| s.vms())?;
    Ok(Json(rows.into_iter().map(|r| vm_info(&app, r)).collect()))
}

#[utoipa::path(post, path = "/vms", request_body = VmSpec,
    responses((status = 201, body = VmInfo), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_vm(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Body(spec): Body<VmSpec>,
) -> Result<(StatusCode, Json<VmInfo>), ApiError> {
    let row = app.create(&spec, &caller.actor)?;
    Ok((StatusCode::CREATED, Json(vm_info(&app, row))))
}

#[utoipa::path(get, path = "/vms/{name}", params(("name" = String, Path)),
    responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody)))]
async fn show_vm(
    State(app): State<App>,
    PathArg(name): PathArg<String>,
) -> Result<Json<VmInfo>, ApiError> {
    Ok(Json(load_vm(&app, &name)?))
}

#[utoipa::path(delete, path = "/vms/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete_vm(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    PathArg(name): PathArg<String>,
) -> Result<StatusCode, ApiError> {
    app.delete(&name, &caller.actor).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/vms/{name}/start", params(("name" = String, Path)),
    responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn start_vm(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    PathArg(name): PathArg<String>,
) -> Result<Json<VmInfo>, ApiError> {
    app.start(&name, Cause::Operator, &caller.actor).await?;
    Ok(Json(load_vm(&app, &name)?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ShutdownParams {
    /// Seconds the guest gets to power off before it is stopped hard (default 60).
    timeout_s: Option<u64>,
    /// Answer at once (202) instead of when the VM has stopped (default true).
    wait: Option<bool>,
}

#[utoipa::path(post, path = "/vms/{name}/shutdown", params(("name" = String, Path), ShutdownParams),
    responses((status = 200, body = VmInfo), (status = 202, body = VmInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn shutdown_vm(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    PathArg(name): PathArg<String>,
    Params(params): Params<ShutdownParams>,
) -> Result<(StatusCode, Json<VmInfo>), ApiError> {
    let timeout = params
        .timeout_s
        .map(Duration::from_secs)
        .unwrap_or(supervisor::DEFAULT_SHUTDOWN_TIMEOUT);
    if params.wait.unwrap_or(true) {
        app.shutdown(&name, &caller.actor, timeout).await?;
        return Ok((StatusCode::OK, Json(load_vm(&app, &name)?)));
    }
    // Check now so that a wrong name or state is still an error answer.
    let vm = load_vm(&app, &name)?;
    if vm.state != api::VmState::Running {
        return Err(supervisor::Error::WrongState {
            name,
            state: vm.state,
            hint: "only a running VM can be shut down",
        }
        .into());
    }
    let task_app = app.clone();
    let task_name = name.clone();
    tokio::spawn(async move {
        if let Err(e) = task_app.shutdown(&task_name, &caller.actor, timeout).await {
            tracing::warn!("shutdown of VM {task_name}: {e}");
        }
    });
    // Give the shutdown its state change before answering, so the answer shows it.
    tokio::time::sleep(Duration::from_millis(20)).await;
    Ok((StatusCode::ACCEPTED, Json(load_vm(&app, &name)?)))
}

#[utoipa::path(post, path = "/vms/{name}/stop", params(("name" = String, Path)),
    responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn stop_vm(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    PathArg(name): PathArg<String>,
) -> Result<Json<VmInfo>, ApiError> {
    app.stop(&name, &caller.actor).await?;
    Ok(Json(load_vm(&app, &name)?))
}

#[utoipa::path(post, path = "/vms/{name}/reboot", params(("name" = String, Path)),
    responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn reboot_vm(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    PathArg(name): PathArg<String>,
) -> Result<Json<VmInfo>, ApiError> {
    app.reboot(&name, &caller.actor).await?;
    Ok(Json(load_vm(&app, &name)?))
}

#[utoipa::path(post, path = "/incidents/{id}/ack", params(("id" = i64, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
async fn ack_incident(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    PathArg(id): PathArg<i64>,
) -> Result<StatusCode, ApiError> {
    if app.with_store(|s| s.close_incident(id, &caller.actor))? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no open incident {id}; GET / lists the open ones"),
        ))
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Keel host API",
        description = "keel serve: VMs, events, ledger and SLA evidence of one host."
    ),
    components(schemas(
        HostStatus,
        Incident,
        VmInfo,
        VmSpec,
        VmUsage,
        ErrorBody,
        Event,
        SlaReport,
        TokenInfo,
        TokenRequest,
        NewToken,
        api::image::ImageInfo,
        api::image::ImportRequest,
        api::image::Operation,
        api::image::VmImportRequest,
        api::image::VmCloneRequest
    ))
)]
pub struct ApiDoc;

mod doc;
mod images;
mod ledger_routes;
mod migration_routes;
mod moves;
mod sessions;
mod tokens;

#[cfg(test)]
mod tests;
