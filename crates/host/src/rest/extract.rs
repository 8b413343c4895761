//! The API's answers to what it cannot accept: `ApiError` (a status and one sentence, sent as
//! an `ErrorBody`) and the JSON body, query and path extractors whose rejections are one.

use api::ErrorBody;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::{ledger, store, supervisor};

/// An error answer: a status and one sentence.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<supervisor::Error> for ApiError {
    fn from(e: supervisor::Error) -> Self {
        use supervisor::Error as E;
        let status = match &e {
            E::NotFound(_) => StatusCode::NOT_FOUND,
            E::Exists(_) | E::WrongState { .. } | E::VmmRefused { .. } => StatusCode::CONFLICT,
            E::Snapshot { .. } | E::Upgrade { .. } | E::Migration { .. } => StatusCode::CONFLICT,
            E::StartFailed { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            E::Spec(_) => StatusCode::BAD_REQUEST,
            E::Store(_) | E::Vmm(_) => StatusCode::INTERNAL_SERVER_ERROR,
            E::Capacity(_) => StatusCode::CONFLICT,
            E::Policy(p) => match p {
                crate::images::Error::Outside { .. } | crate::images::Error::Escapes { .. } => {
                    StatusCode::FORBIDDEN
                }
                crate::images::Error::TapTaken { .. } => StatusCode::CONFLICT,
                crate::images::Error::NotAFile { .. } | crate::images::Error::Open { .. } => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
                crate::images::Error::BadDir { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            },
            E::Library(l) => return ApiError::from_library(l),
        };
        ApiError(status, e.to_string())
    }
}

impl ApiError {
    fn from_library(e: &crate::library::Error) -> ApiError {
        use crate::library::Error as L;
        let status = match e {
            L::BadName(_) | L::NoFormat { .. } => StatusCode::BAD_REQUEST,
            L::Exists(_) | L::InUse { .. } => StatusCode::CONFLICT,
            L::NotFound(_) => StatusCode::NOT_FOUND,
            L::Policy(p) => match p {
                crate::images::Error::Outside { .. } | crate::images::Error::Escapes { .. } => {
                    StatusCode::FORBIDDEN
                }
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            },
            L::Import { .. } | L::Copy { .. } | L::Clone { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            L::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl From<crate::library::Error> for ApiError {
    fn from(e: crate::library::Error) -> Self {
        ApiError::from_library(&e)
    }
}

impl From<store::Error> for ApiError {
    fn from(e: store::Error) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl From<ledger::Error> for ApiError {
    fn from(e: ledger::Error) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

pub(super) fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.into())
}

/// How long a request's body may take to arrive.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// `Json` whose rejection is an `ErrorBody` 400 (408 when the body is too slow).
pub struct Body<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // A body trickled in a byte at a time must not hold a connection for ever.
        tokio::time::timeout(BODY_TIMEOUT, Json::<T>::from_request(req, state))
            .await
            .map_err(|_| {
                ApiError(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "request body: not received within {} s",
                        BODY_TIMEOUT.as_secs()
                    ),
                )
            })?
            .map(|Json(v)| Body(v))
            // 400 for bad JSON, 413 too large, 415 not JSON, 422 wrong shape: all 4xx.
            .map_err(|e| ApiError(e.status(), format!("request body: {}", e.body_text())))
    }
}

/// `Query` whose rejection is an `ErrorBody` 400.
pub struct Params<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Params(v))
            .map_err(|e| bad_request(format!("query: {}", e.body_text())))
    }
}

/// `Path` whose rejection is an `ErrorBody` 400.
pub struct PathArg<T>(pub T);

impl<T: serde::de::DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for PathArg<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| PathArg(v))
            .map_err(|e| bad_request(format!("path: {}", e.body_text())))
    }
}
