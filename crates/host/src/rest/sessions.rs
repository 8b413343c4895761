//! `/session`: a browser signs in with a token (in the `Authorization` header, once) and gets
//! a session cookie (session.rs); `GET` says who the caller is; `DELETE` signs out.

use std::sync::Arc;

use api::host::SessionInfo;
use api::ErrorBody;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use super::ApiError;
use crate::auth::{Access, Caller};

fn info(caller: &Caller) -> SessionInfo {
    SessionInfo {
        actor: caller.actor.clone(),
        role: caller.role,
        warning: caller.warning.clone(),
    }
}

/// Signs a browser in: the token of `Authorization: Bearer` becomes a session cookie.
#[utoipa::path(post, path = "/session",
    responses((status = 201, body = SessionInfo, description = "Signed in; the answer sets the session cookie (HttpOnly, SameSite=Strict, Secure under TLS)"),
        (status = 400, body = ErrorBody)))]
pub(super) async fn create(
    Extension(caller): Extension<Caller>,
    Extension(access): Extension<Arc<Access>>,
) -> Result<Response, ApiError> {
    let Some(token_hash) = &caller.token_hash else {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "sessions are for browsers on TCP: sign in with 'Authorization: Bearer <token>'".into(),
        ));
    };
    let id = access.sessions.create(token_hash).map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("no randomness for the session: {e}"),
        )
    })?;
    Ok((
        StatusCode::CREATED,
        [(
            header::SET_COOKIE,
            crate::session::set_cookie(Some(&id), access.tls),
        )],
        Json(info(&caller)),
    )
        .into_response())
}

/// Who the caller is, and with what role.
#[utoipa::path(get, path = "/session", responses((status = 200, body = SessionInfo)))]
pub(super) async fn show(Extension(caller): Extension<Caller>) -> Json<SessionInfo> {
    Json(info(&caller))
}

/// Signs a browser out: its session ends and its cookie is cleared.
#[utoipa::path(delete, path = "/session", responses((status = 204)))]
pub(super) async fn end(
    Extension(access): Extension<Arc<Access>>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Some(id) = crate::session::from_cookies(&headers) {
        access.sessions.remove(&id);
    }
    (
        StatusCode::NO_CONTENT,
        [(
            header::SET_COOKIE,
            crate::session::set_cookie(None, access.tls),
        )],
    )
        .into_response()
}
