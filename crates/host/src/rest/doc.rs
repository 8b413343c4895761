//! What every operation of the OpenAPI document has in common, added in one place: the bearer
//! token scheme (TCP; the Unix socket needs none) and the error answers any request can get,
//! so that clients generated from the document know them.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, OpenApi, Ref, RefOr, Response, ResponseBuilder};

/// The name of the bearer scheme in the document.
pub const BEARER: &str = "bearer";

fn error(description: &str) -> RefOr<Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                Content::new(Some(Ref::from_schema_name("ErrorBody"))),
            )
            .build(),
    )
}

/// Adds the security scheme and the common error answers to `doc`.
pub fn complete(doc: &mut OpenApi) {
    let components = doc.components.get_or_insert_with(Default::default);
    components.security_schemes.insert(
        BEARER.into(),
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "An API token (keel token create), required on TCP; the Unix socket names its caller by uid instead",
                ))
                .build(),
        ),
    );
    // Either no scheme (the Unix socket) or a bearer token (TCP).
    doc.security = Some(vec![
        SecurityRequirement::default(),
        SecurityRequirement::new(BEARER, Vec::<String>::new()),
    ]);
    for item in doc.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            let has_input = operation.request_body.is_some()
                || operation.parameters.as_ref().is_some_and(|p| !p.is_empty());
            let mut common = vec![
                ("401", "no API token, or one not known here (TCP)"),
                (
                    "403",
                    "the caller's role does not allow this, or its token expired (new work only)",
                ),
                (
                    "429",
                    "too many failed authentications from this address; see Retry-After",
                ),
                (
                    "500",
                    "a fault of the host itself (the store cannot be written)",
                ),
            ];
            if has_input {
                common.push((
                    "400",
                    "a value in the path, query or body is not acceptable",
                ));
            }
            if operation.request_body.is_some() {
                common.extend([
                    ("408", "the body did not arrive within 30 s"),
                    ("413", "the body is over 2 MiB"),
                    (
                        "415",
                        "the body is not JSON (Content-Type: application/json)",
                    ),
                    ("422", "the body is JSON of the wrong shape"),
                ]);
            }
            for (status, description) in common {
                operation
                    .responses
                    .responses
                    .entry(status.to_string())
                    .or_insert_with(|| error(description));
            }
        }
    }
}
