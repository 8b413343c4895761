//! `GET /vms/{name}/console`: a VM's serial console through the API, as a WebSocket that the
//! daemon bridges to the VMM's `console.sock`. Binary messages both ways: guest output to the
//! client, the client's bytes to the guest's serial input (a text message is taken as its
//! UTF-8 bytes, for browsers). The WebSocket closes when the VMM closes the console (the VM
//! ended) and the console connection closes when the client goes away.
//!
//! Authorisation and audit are the guard's (rest.rs): the upgrade is a GET, but attaching is
//! control of the guest, so it needs `operator` on TCP and is recorded as an audit row.
//!
//! A slow client never blocks the daemon or the guest. Buffering is bounded: the bridge holds
//! one chunk of output (at most [`CHUNK`] bytes) while it is being sent; until the client
//! takes it, the daemon stops reading the console socket, whose buffer fills, and the VMM
//! then drops output for this client (as it does for any slow console client: the guest never
//! waits, and `console.log` keeps everything). A client that takes nothing for
//! [`SEND_STALL`] while output waits is closed, so that it cannot hold one of the VMM's
//! console connections forever.

use std::time::Duration;

use api::ErrorBody;
use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::auth::Caller;
use crate::rest::{ApiError, App, PathArg};
use crate::supervisor;

/// The most guest output the bridge reads (and so holds) at once.
pub const CHUNK: usize = 4096;
/// A client that takes no output for this long while some waits is closed.
pub const SEND_STALL: Duration = Duration::from_secs(30);
/// The largest message a client may send (a paste, not a file transfer).
pub const MAX_INPUT_MESSAGE: usize = 64 * 1024;

/// The WebSocket close code and reason when the VM's console ends.
const CLOSE_NORMAL: u16 = 1000;
/// The close code when the client took no output for too long ("policy violation").
const CLOSE_STALLED: u16 = 1008;

/// The serial console as a WebSocket upgrade (see the module's documentation).
#[utoipa::path(get, path = "/vms/{name}/console", params(("name" = String, Path)),
    description = "A WebSocket upgrade (send `Connection: Upgrade`, `Upgrade: websocket`, \
        `Sec-WebSocket-Version: 13` and a `Sec-WebSocket-Key`). Once upgraded, binary messages \
        go both ways: guest serial output to the client, the client's bytes to the guest's \
        serial input (text messages are taken as their UTF-8 bytes). The server closes the \
        WebSocket when the VM ends; output a slow client cannot take is dropped, and a client \
        that takes none for 30 s is closed. Needs the operator role on TCP; every attach is an \
        audit event.",
    responses(
        (status = 101, description = "Switching Protocols: the console is attached"),
        (status = 400, body = ErrorBody, description = "not a WebSocket upgrade request"),
        (status = 403, body = ErrorBody, description = "the token's role is below operator"),
        (status = 404, body = ErrorBody, description = "no such VM"),
        (status = 409, body = ErrorBody, description = "the VM has no running VMM")))]
pub async fn attach(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    PathArg(name): PathArg<String>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let row = app
        .with_store(|s| s.vm(&name))?
        .ok_or_else(|| ApiError::from(supervisor::Error::NotFound(name.clone())))?;
    if !row.state.has_vmm() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "VM '{name}' is {} and has no running VMM, so no console; start it first (its past output is in {})",
                row.state,
                app.run_dir(&name).console_log().display()
            ),
        ));
    }
    let upgrade = upgrade.map_err(|e| {
        ApiError(
            e.status(),
            format!("GET /vms/{name}/console is a WebSocket: {}", e.body_text()),
        )
    })?;
    // Connect before answering 101, so that an attached client is really attached.
    let socket = app.run_dir(&name).console_socket();
    let console = UnixStream::connect(&socket).await.map_err(|e| {
        ApiError(
            StatusCode::CONFLICT,
            format!(
                "VM '{name}' is {} but its console socket {} does not answer ({e}); its VMM may be starting or ending, try again",
                row.state,
                socket.display()
            ),
        )
    })?;
    tracing::info!("{} attached to VM {name}'s console", caller.actor);
    Ok(upgrade
        .max_message_size(MAX_INPUT_MESSAGE)
        .max_frame_size(MAX_INPUT_MESSAGE)
        .write_buffer_size(0)
        .max_write_buffer_size(2 * CHUNK + 1024)
        .on_upgrade(move |ws| async move {
            let why = bridge(ws, console, SEND_STALL).await;
            tracing::info!("{} detached from VM {name}'s console: {why}", caller.actor);
        }))
}

/// Why a bridge ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The VMM closed the console: the VM ended.
    ConsoleClosed,
    /// The client closed the WebSocket or its connection broke.
    ClientGone,
    /// The client took no output for [`SEND_STALL`] (the daemon's setting).
    ClientStalled,
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Ended::ConsoleClosed => "the VM's console closed",
            Ended::ClientGone => "the client went away",
            Ended::ClientStalled => "the client took no output for 30 s and was closed",
        })
    }
}

/// Copies guest output from `console` to the WebSocket and the client's bytes back, until
/// either side ends; a client that takes no output for `stall` is closed.
pub async fn bridge(ws: WebSocket, console: UnixStream, stall: Duration) -> Ended {
    let (mut to_client, mut from_client) = ws.split();
    let (mut from_vmm, mut to_vmm) = console.into_split();
    let output = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match from_vmm.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let close = Message::Close(Some(CloseFrame {
                        code: CLOSE_NORMAL,
                        reason: "the VM's console closed".into(),
                    }));
                    let _ = tokio::time::timeout(stall, to_client.send(close)).await;
                    return Ended::ConsoleClosed;
                }
                Ok(n) => n,
            };
            let message = Message::Binary(Bytes::copy_from_slice(&buf[..n]));
            match tokio::time::timeout(stall, to_client.send(message)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Ended::ClientGone,
                Err(_) => {
                    let close = Message::Close(Some(CloseFrame {
                        code: CLOSE_STALLED,
                        reason: "no output taken for 30 s".into(),
                    }));
                    // The client is not reading: do not wait for it again.
                    let _ = tokio::time::timeout(Duration::from_millis(100), to_client.send(close))
                        .await;
                    return Ended::ClientStalled;
                }
            }
        }
    };
    let input = async {
        while let Some(message) = from_client.next().await {
            let bytes = match message {
                Ok(Message::Binary(bytes)) => bytes,
                Ok(Message::Text(text)) => Bytes::from(text),
                Ok(Message::Close(_)) | Err(_) => break,
                // Pings are answered by the WebSocket itself.
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            };
            if to_vmm.write_all(&bytes).await.is_err() {
                // The VMM is gone; the output side sees it too.
                return std::future::pending().await;
            }
        }
        Ended::ClientGone
    };
    let ended = tokio::select! {
        ended = output => ended,
        ended = input => ended,
    };
    // Dropping both halves closes the console connection: the VMM detaches this client.
    let _ = to_vmm.shutdown().await;
    ended
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use api::{Cause, VmSpec, VmState};
    use tokio_tungstenite::tungstenite::Message as WsMessage;

    use crate::store::{Store, Transition};
    use crate::supervisor::Supervisor;

    struct Fixture {
        dir: std::path::PathBuf,
        app: Arc<Supervisor>,
        addr: std::net::SocketAddr,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// The real router on a TCP port (without peer information, so the caller is uid 0 as
    /// on the Unix socket), a stopped VM "off" and a VM "on" whose state says running.
    async fn fixture(tag: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("kc-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&dir.join("keel.db")).unwrap();
        let app = Supervisor::new(
            dir.clone(),
            "/bin/false".into(),
            store,
            crate::supervisor::HostPolicy::unjailed(&dir).unwrap(),
        );
        for name in ["on", "off"] {
            let spec: VmSpec = serde_json::from_value(serde_json::json!({
                "name": name,
                "kernel": dir.join("images/k").display().to_string(),
            }))
            .unwrap();
            app.create(&spec, "test").unwrap();
        }
        app.with_store(|s| {
            for to in [VmState::Starting, VmState::Running] {
                s.transition(
                    "on",
                    &Transition {
                        to,
                        pid: Some(1),
                        cause: Cause::Operator,
                        actor: "test",
                        detail: "fixture",
                        time_ms: None,
                    },
                )
                .unwrap();
            }
        });
        std::fs::create_dir_all(app.run_dir("on").0.clone()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // As the Unix socket's listener would name root: the console's bytes are tested here.
        let access = Arc::new(crate::auth::Access {
            local: crate::auth::LocalRoles::default(),
            refusals: Default::default(),
            sessions: Default::default(),
            tls: false,
            answers: Default::default(),
        });
        let root = axum::extract::ConnectInfo(crate::auth::Peer::Unix { uid: 0, pid: 1 });
        let router = crate::rest::router(app.clone(), access).layer(axum::Extension(root));
        tokio::spawn(async move { axum::serve(listener, router).await });
        Fixture { dir, app, addr }
    }

    #[tokio::test]
    async fn bytes_go_both_ways_and_the_socket_closes_with_the_console() {
        let f = fixture("both").await;
        let vmm = tokio::net::UnixListener::bind(f.app.run_dir("on").console_socket()).unwrap();
        let url = format!("ws://{}/vms/on/console", f.addr);
        let (mut client, response) = tokio_tungstenite::connect_async(&url).await.unwrap();
        assert_eq!(response.status(), 101);
        let (mut vmm_side, _) = vmm.accept().await.unwrap();
        // Client to guest: raw bytes, Ctrl-A x included (escapes are the CLI's business).
        client
            .send(WsMessage::binary(b"ls\r\x01x".to_vec()))
            .await
            .unwrap();
        let mut got = [0u8; 5];
        vmm_side.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ls\r\x01x");
        // Guest to client.
        vmm_side.write_all(b"PROBE hello\n").await.unwrap();
        let mut seen = Vec::new();
        while seen.len() < 12 {
            match client.next().await.unwrap().unwrap() {
                WsMessage::Binary(b) => seen.extend_from_slice(&b),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(seen, b"PROBE hello\n");
        // The VMM closes the console (the VM ended): the WebSocket closes normally.
        drop(vmm_side);
        match client.next().await {
            Some(Ok(WsMessage::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1000),
            other => panic!("expected a close frame, got {other:?}"),
        }
        // The attach is an audit row with its 101.
        let audits = f.app.with_store(|s| {
            crate::ledger::list(
                s.connection(),
                &crate::ledger::EventFilter {
                    vm: Some("on".into()),
                    kind: Some(api::events::EventKind::Audit),
                    since: None,
                    limit: None,
                },
            )
            .unwrap()
        });
        assert!(
            audits
                .iter()
                .any(|e| e.detail.starts_with("GET /vms/on/console") && e.detail.contains("101")),
            "{audits:?}"
        );
    }

    #[tokio::test]
    async fn a_client_going_away_detaches_from_the_vmm() {
        let f = fixture("gone").await;
        let vmm = tokio::net::UnixListener::bind(f.app.run_dir("on").console_socket()).unwrap();
        let url = format!("ws://{}/vms/on/console", f.addr);
        let (client, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        let (mut vmm_side, _) = vmm.accept().await.unwrap();
        drop(client);
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(10), vmm_side.read(&mut buf))
            .await
            .expect("the daemon closes the console connection")
            .unwrap();
        assert_eq!(n, 0);
    }

    /// A client that never reads: the daemon stops taking output from the console socket
    /// (so the VMM, which never blocks, drops it), keeps answering other requests, and closes
    /// the client once it has taken nothing for the stall time.
    #[tokio::test]
    async fn a_client_that_never_reads_is_bounded_and_then_closed() {
        use axum::routing::get;
        let f = fixture("stall").await;
        let socket = f.app.run_dir("on").console_socket();
        let vmm = tokio::net::UnixListener::bind(&socket).unwrap();
        let (ended_tx, ended_rx) = tokio::sync::oneshot::channel();
        let ended_tx = Arc::new(std::sync::Mutex::new(Some(ended_tx)));
        let console_path = socket.clone();
        let router = axum::Router::new().route(
            "/",
            get(move |upgrade: WebSocketUpgrade| {
                let console_path = console_path.clone();
                let tx = ended_tx.lock().unwrap().take();
                async move {
                    let console = UnixStream::connect(&console_path).await.unwrap();
                    upgrade
                        .write_buffer_size(0)
                        .max_write_buffer_size(2 * CHUNK + 1024)
                        .on_upgrade(move |ws| async move {
                            let ended = bridge(ws, console, Duration::from_secs(1)).await;
                            if let Some(tx) = tx {
                                let _ = tx.send(ended);
                            }
                        })
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        // Connected, and then never read from.
        let (_client, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/"))
            .await
            .unwrap();
        let (vmm_side, _) = vmm.accept().await.unwrap();
        // The VMM's side writes without blocking, as the real one does, until the socket
        // takes nothing more for a while.
        let chunk = vec![b'x'; 64 * 1024];
        let mut taken = 0usize;
        let mut idle_since = std::time::Instant::now();
        while idle_since.elapsed() < Duration::from_millis(300) && taken < (1 << 30) {
            match vmm_side.try_write(&chunk) {
                Ok(n) => {
                    taken += n;
                    idle_since = std::time::Instant::now();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => panic!("the console socket broke early: {e}"),
            }
        }
        assert!(
            taken < (1 << 30),
            "the daemon buffered everything: {taken} bytes"
        );
        // The daemon still answers.
        let (status, _) = plain_get(f.addr, "/vms", false).await;
        assert_eq!(status, 200);
        // And gives up on the client.
        let ended = tokio::time::timeout(Duration::from_secs(10), ended_rx)
            .await
            .expect("the bridge ends")
            .unwrap();
        assert_eq!(ended, Ended::ClientStalled);
        let mut buf = [0u8; 1];
        let mut vmm_side = vmm_side;
        let n = tokio::time::timeout(Duration::from_secs(5), vmm_side.read(&mut buf))
            .await
            .expect("the console connection closes")
            .unwrap_or(0);
        assert_eq!(n, 0);
        eprintln!("a client that never reads: the console socket took {taken} bytes");
    }

    async fn plain_get(addr: std::net::SocketAddr, path: &str, upgrade: bool) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let headers = if upgrade {
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        } else {
            ""
        };
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: k\r\n{headers}Connection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        let status = answer[9..12].parse().unwrap();
        (status, answer)
    }

    #[tokio::test]
    async fn unknown_stopped_unreachable_and_not_a_websocket_are_4xx_with_a_message() {
        let f = fixture("errors").await;
        let (status, body) = plain_get(f.addr, "/vms/nope/console", true).await;
        assert_eq!(status, 404, "{body}");
        assert!(body.contains(r#"{"error":"#), "{body}");
        let (status, body) = plain_get(f.addr, "/vms/off/console", true).await;
        assert_eq!(status, 409, "{body}");
        assert!(body.contains("no running VMM"), "{body}");
        // Running, but no VMM listens on its console socket.
        let (status, body) = plain_get(f.addr, "/vms/on/console", true).await;
        assert_eq!(status, 409, "{body}");
        assert!(body.contains("does not answer"), "{body}");
        let (status, body) = plain_get(f.addr, "/vms/on/console", false).await;
        assert!((400..500).contains(&status), "{body}");
        assert!(body.contains("is a WebSocket"), "{body}");
    }
}
