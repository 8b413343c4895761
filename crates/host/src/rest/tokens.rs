//! API tokens: listed (never their secrets), made (the secret shown once) and removed.

use api::{ErrorBody, NewToken, TokenInfo, TokenRequest};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use super::{bad_request, ApiError, App, Body, PathArg};
use crate::auth;
use crate::store::TokenRow;
use crate::time::{now_ms, parse_rfc3339, rfc3339};

/// A token as listed; None for a row whose role is not one this keel knows (such a token
/// authenticates nothing either).
fn token_info(t: &TokenRow, now: i64) -> Option<TokenInfo> {
    let role = match t.role.parse() {
        Ok(role) => role,
        Err(e) => {
            tracing::warn!("token '{}' is not listed: {e}", t.name);
            return None;
        }
    };
    Some(TokenInfo {
        name: t.name.clone(),
        role,
        created: rfc3339(t.created_ms),
        expires: t.expires_ms.map(rfc3339),
        expired: t.expires_ms.is_some_and(|e| now >= e),
    })
}

#[utoipa::path(get, path = "/tokens", responses((status = 200, body = Vec<TokenInfo>)))]
pub(super) async fn list_tokens(State(app): State<App>) -> Result<Json<Vec<TokenInfo>>, ApiError> {
    let now = now_ms();
    let tokens = app.with_store(|s| s.tokens())?;
    Ok(Json(
        tokens.iter().filter_map(|t| token_info(t, now)).collect(),
    ))
}

#[utoipa::path(post, path = "/tokens", request_body = TokenRequest,
    responses((status = 201, body = NewToken), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn create_token(
    State(app): State<App>,
    Body(request): Body<TokenRequest>,
) -> Result<(StatusCode, Json<NewToken>), ApiError> {
    api::vm::check_name(&request.name).map_err(|_| {
        bad_request(format!(
            "token name '{}' is not allowed: use lowercase letters, digits, '-', '_' or '.'",
            request.name
        ))
    })?;
    let expires_ms = request
        .expires
        .as_deref()
        .map(parse_rfc3339)
        .transpose()
        .map_err(|e| bad_request(format!("expires: {e}")))?;
    let secret = auth::new_secret().map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("no randomness for the token: {e}"),
        )
    })?;
    let row = TokenRow {
        name: request.name.clone(),
        role: request.role.to_string(),
        secret_sha256: auth::hash_secret(&secret),
        created_ms: now_ms(),
        expires_ms,
    };
    app.with_store(|s| -> Result<(), ApiError> {
        if s.tokens()?.iter().any(|t| t.name == row.name) {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("a token named '{}' exists; remove it first", row.name),
            ));
        }
        Ok(s.add_token(&row)?)
    })?;
    let now = now_ms();
    Ok((
        StatusCode::CREATED,
        Json(NewToken {
            token: TokenInfo {
                name: row.name,
                role: request.role,
                created: rfc3339(row.created_ms),
                expires: row.expires_ms.map(rfc3339),
                expired: row.expires_ms.is_some_and(|e| now >= e),
            },
            secret,
        }),
    ))
}

#[utoipa::path(delete, path = "/tokens/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub(super) async fn delete_token(
    State(app): State<App>,
    PathArg(name): PathArg<String>,
) -> Result<StatusCode, ApiError> {
    if app.with_store(|s| s.remove_token(&name))? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no token named '{name}'"),
        ))
    }
}
