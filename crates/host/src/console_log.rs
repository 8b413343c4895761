//! `GET /vms/{name}/console/log`: the end of a VM's `console.log`, the scrollback a console
//! shows before it attaches. The file lives in the VM's run directory, which its jailed VMM
//! may write: it is opened without following a link, must be a regular file, and only its
//! last bytes (at most 1 MiB) are read.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;

use api::ErrorBody;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::rest::{ApiError, App, Params, PathArg};
use crate::supervisor;

/// The most a caller may ask for.
pub const MAX_TAIL: u64 = 1 << 20;
const DEFAULT_TAIL: u64 = 64 << 10;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TailParams {
    /// How many bytes from the end (default 65536, at most 1048576).
    bytes: Option<u64>,
}

/// The last `want` bytes of `path`; nothing when there is no file yet.
fn tail(path: &std::path::Path, want: u64) -> std::io::Result<Vec<u8>> {
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("it is not a regular file"));
    }
    let start = meta.len().saturating_sub(want);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.take(want).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The end of a VM's console output, as the guest wrote it (bytes, not text).
#[utoipa::path(get, path = "/vms/{name}/console/log", params(("name" = String, Path), TailParams),
    responses((status = 200, description = "The last bytes of the VM's console.log (empty before its first boot)", content_type = "application/octet-stream"),
        (status = 404, body = ErrorBody)))]
pub async fn log_tail(
    State(app): State<App>,
    PathArg(name): PathArg<String>,
    Params(params): Params<TailParams>,
) -> Result<Response, ApiError> {
    if app.with_store(|s| s.vm(&name))?.is_none() {
        return Err(supervisor::Error::NotFound(name).into());
    }
    let path = app.run_dir(&name).console_log();
    let want = params.bytes.unwrap_or(DEFAULT_TAIL).min(MAX_TAIL);
    let read = tokio::task::spawn_blocking(move || tail(&path, want))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let bytes = read.map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the console log of VM {name}: {e}"),
        )
    })?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_is_the_end_and_links_are_not_followed() {
        let dir = std::env::temp_dir().join(format!("keel-tail-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("console.log");
        assert!(tail(&log, 10).unwrap().is_empty());
        std::fs::write(&log, b"0123456789abcdef").unwrap();
        assert_eq!(tail(&log, 4).unwrap(), b"cdef");
        assert_eq!(tail(&log, 100).unwrap(), b"0123456789abcdef");
        let link = dir.join("link.log");
        std::os::unix::fs::symlink("/etc/shadow", &link).unwrap();
        assert!(tail(&link, 10).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
