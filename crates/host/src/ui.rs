//! The web console's files, embedded at build time (build.rs), served under [`PREFIX`]
//! without authentication (they hold no data; everything they show comes from the API with
//! the caller's own credentials). Every answer of the daemon carries headers that keep it
//! from being framed or sniffed; the console's pages also a strict Content-Security-Policy
//! (no inline script, nothing from elsewhere).

use axum::extract::{Path, Request};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

mod assets {
    include!(concat!(env!("OUT_DIR"), "/ui_assets.rs"));
}

/// Where the console lives; a browser opening `/` is sent here.
pub const PREFIX: &str = "/ui/";

/// Scripts and everything else only from this host; styles also inline (xterm.js sets its
/// own); no frames, no plugins, forms only here.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// What this binary serves when it was built without the console.
const NOT_BUILT: &str = "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Keel: console not built</title></head><body><main><h1>The web console was not built into this keel binary</h1><p>The API works (<code>GET /openapi.json</code> lists it). To have the console, build it and then keel:</p><pre>(cd web &amp;&amp; npm ci &amp;&amp; npm run build)\ncargo build --release</pre><p><code>scripts/quickstart.sh</code> does both.</p></main></body></html>";

pub fn built() -> bool {
    !assets::ASSETS.is_empty()
}

fn content_type(file: &str) -> &'static str {
    match file.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("json") => "application/json",
        Some("woff2") => "font/woff2",
        _ => "application/octet-stream",
    }
}

fn asset(name: &str) -> Option<&'static [u8]> {
    assets::ASSETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, bytes)| *bytes)
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|e| e.trim().starts_with("gzip")))
}

fn serve(file: &str, headers: &HeaderMap) -> Response {
    if !built() {
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            NOT_BUILT,
        )
            .into_response();
    }
    let Some(plain) = asset(file) else {
        return (StatusCode::NOT_FOUND, "no such file of the web console").into_response();
    };
    let cache = if file == "index.html" {
        "no-cache"
    } else {
        // Built file names carry their content's hash.
        "public, max-age=31536000, immutable"
    };
    let mut response = match asset(&format!("{file}.gz")).filter(|_| accepts_gzip(headers)) {
        Some(gzipped) => {
            let mut r = gzipped.into_response();
            r.headers_mut()
                .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            r
        }
        None => plain.into_response(),
    };
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(file)),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    response
}

/// The console's routes.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/ui",
            get(|| async { axum::response::Redirect::permanent(PREFIX) }),
        )
        .route(
            "/ui/",
            get(|headers: HeaderMap| async move { serve("index.html", &headers) }),
        )
        .route(
            "/ui/{*file}",
            get(|Path(file): Path<String>, headers: HeaderMap| async move {
                serve(&file, &headers)
            }),
        )
}

/// Adds the headers every answer carries (and the CSP to HTML ones).
pub async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    let html = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/html"));
    let csp = if html {
        CSP
    } else {
        "default-src 'none'; frame-ancestors 'none'"
    };
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(csp),
    );
    response
}
