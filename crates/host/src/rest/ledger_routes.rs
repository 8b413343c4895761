//! The ledger's routes: events (listed and followed), verification, the signed export and
//! SLA reports. Whole-ledger work runs on a reader of its own (Supervisor::with_reader).

use std::time::Duration;

use api::events::{EventKind, LedgerVerification};
use api::{ErrorBody, Event, SlaReport};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use utoipa::IntoParams;

use super::{bad_request, ApiError, App, Params};
use crate::ledger::{self, EventFilter};
use crate::time::parse_rfc3339;
use crate::{health, sla};

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct EventParams {
    /// Only this VM's events.
    vm: Option<String>,
    /// Only events of this kind.
    kind: Option<EventKind>,
    /// Only events after this sequence number.
    since: Option<i64>,
    /// At most this many (default 100, at most 10000).
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/events", params(EventParams),
    responses((status = 200, body = Vec<Event>), (status = 400, body = ErrorBody)))]
pub(super) async fn list_events(
    State(app): State<App>,
    Params(params): Params<EventParams>,
) -> Result<Json<Vec<Event>>, ApiError> {
    let filter = EventFilter {
        vm: params.vm,
        kind: params.kind,
        since: params.since,
        limit: Some(params.limit.unwrap_or(100).min(10_000)),
    };
    Ok(Json(
        app.with_reader(move |conn| ledger::list(conn, &filter))
            .await??,
    ))
}

/// How often a quiet event stream says it is still there.
const STREAM_KEEPALIVE: Duration = Duration::from_secs(15);

/// New ledger rows as they are committed, as server-sent events: the event's name is its
/// kind (`state`, `audit`, `host`), its id the row's number and its data the row as JSON. A
/// follower too slow to take them gets a `lagged` event with the number it missed (read them
/// with `GET /events?since=`).
#[utoipa::path(get, path = "/events/stream",
    responses((status = 200, description = "Server-sent events: one per new ledger row (event: state|audit|host, id: seq, data: Event as JSON); `lagged` when rows were missed", content_type = "text/event-stream")))]
pub(super) async fn follow_events(
    State(app): State<App>,
) -> axum::response::sse::Sse<
    impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
> {
    use axum::response::sse::{Event as Sent, KeepAlive, Sse};
    use tokio::sync::broadcast::error::RecvError;
    let rows = app.with_store(|s| s.chain.follow());
    let stream = futures_util::stream::unfold(rows, |mut rows| async move {
        let sent = match rows.recv().await {
            Ok(event) => Sent::default()
                .event(event.kind.as_str())
                .id(event.seq.to_string())
                .json_data(&event)
                .unwrap_or_else(|_| Sent::default().event("error")),
            Err(RecvError::Lagged(missed)) => {
                Sent::default().event("lagged").data(missed.to_string())
            }
            Err(RecvError::Closed) => return None,
        };
        Some((Ok(sent), rows))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(STREAM_KEEPALIVE))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct VerifyParams {
    /// A head written down earlier, `SEQ:HASH` (or a hash alone): checked instead of the
    /// daemon's signed anchor; rows cut after it are named.
    expect_head: Option<String>,
}

#[utoipa::path(get, path = "/ledger/verify", params(VerifyParams),
    responses((status = 200, body = LedgerVerification)))]
pub(super) async fn verify_ledger(
    State(app): State<App>,
    Params(params): Params<VerifyParams>,
) -> Result<Json<LedgerVerification>, ApiError> {
    // Without a head from the caller, the one the daemon signed (anchor.rs) is checked; an
    // anchor that is missing or not this host's is itself a problem.
    let (head, anchor_problem) = match params.expect_head {
        Some(text) => (Some(ledger::ExpectedHead::parse(&text)), None),
        None => {
            let public = app
                .identity
                .get()
                .and_then(|i| i.ledger_public_key.as_deref())
                .and_then(|k| crate::host_key::parse_public(k).ok());
            match crate::anchor::read(&app.state_dir, public.as_ref()) {
                Ok(anchor) => (Some(anchor.expected()), None),
                Err(e) => (None, Some(e.to_string())),
            }
        }
    };
    let mut checked = app
        .with_reader(move |conn| match &head {
            Some(head) => ledger::verify_against(conn, head),
            None => ledger::verify(conn),
        })
        .await??;
    if anchor_problem.is_some() {
        checked.ok = false;
        checked.anchor_problem = anchor_problem;
    }
    Ok(Json(checked))
}

/// Sends what a blocking writer writes as a response body, chunk by chunk.
struct BodyWriter(tokio::sync::mpsc::Sender<std::io::Result<axum::body::Bytes>>);

impl std::io::Write for BodyWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Ok(axum::body::Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[utoipa::path(get, path = "/ledger/export",
    responses((status = 200, description = "The whole ledger as signed JSON Lines: a header with the host's public key, every row, the head signed now, and a signature of the file (keel ledger verify --export checks it)", content_type = "application/x-ndjson"),
        (status = 503, body = ErrorBody)))]
pub(super) async fn export_ledger(State(app): State<App>) -> Result<Response, ApiError> {
    let key = app.host_key.get().cloned().ok_or_else(|| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the host key cannot be read, so nothing can be signed; keel host names the problem"
                .into(),
        )
    })?;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let reader = app.clone();
    tokio::spawn(async move {
        let failed = tx.clone();
        let written = reader
            .with_reader(move |conn| {
                let mut out = std::io::BufWriter::with_capacity(64 << 10, BodyWriter(tx));
                ledger::export::write(conn, &key, &health::hostname(), &mut out)?;
                std::io::Write::flush(&mut out)?;
                Ok::<_, ledger::export::ExportError>(())
            })
            .await;
        // A failure cuts the file short: it then lacks its signature and fails to verify.
        let failure = match written {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::error!("exporting the ledger: {failure}");
        let _ = failed.send(Err(std::io::Error::other(failure))).await;
    });
    let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(chunks),
    )
        .into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct SlaParams {
    /// One VM; all VMs in the ledger when absent.
    vm: Option<String>,
    /// RFC 3339 start of the window.
    from: String,
    /// RFC 3339 end of the window.
    to: String,
    /// Credit tiers like 99.95:10,99:25 (below 99.95% availability, 10% credit; ...).
    credits: Option<String>,
    /// `json` (default) or `csv` (as `keel sla report --format csv` prints it).
    #[param(inline)]
    format: Option<SlaFormat>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub(super) enum SlaFormat {
    Json,
    Csv,
}

#[utoipa::path(get, path = "/sla", params(SlaParams),
    responses((status = 200, body = SlaReport, description = "The report (JSON); with format=csv, one line per VM as text/csv"),
        (status = 400, body = ErrorBody)))]
pub(super) async fn sla_report(
    State(app): State<App>,
    Params(params): Params<SlaParams>,
) -> Result<Response, ApiError> {
    let from = parse_rfc3339(&params.from).map_err(|e| bad_request(format!("from: {e}")))?;
    let to = parse_rfc3339(&params.to).map_err(|e| bad_request(format!("to: {e}")))?;
    if to <= from {
        return Err(bad_request(format!(
            "the window is empty: to ({}) is not after from ({})",
            params.to, params.from
        )));
    }
    let tiers = match &params.credits {
        Some(text) => sla::parse_tiers(text).map_err(|e| bad_request(e.to_string()))?,
        None => Vec::new(),
    };
    let vms: Vec<String> = params.vm.into_iter().collect();
    let report = app
        .with_reader(move |conn| sla::report_from_ledger(conn, &vms, from, to, &tiers))
        .await?
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if params.format == Some(SlaFormat::Csv) {
        return Ok((
            [(axum::http::header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            sla::to_csv(&report),
        )
            .into_response());
    }
    Ok(Json(report).into_response())
}
