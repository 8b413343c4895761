//! The source's end of a migration's link: a blocking WebSocket over TLS to the target's
//! `GET /migrations/incoming`, pinned to its certificate. A watchdog thread shuts the socket
//! down when a send or a wait outlives its deadline (a cut link, a target that stopped
//! reading or answering): the blocking call then fails at once, whatever rustls and
//! tungstenite were doing with the socket's own timeouts.

use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_tungstenite::tungstenite;
use tungstenite::protocol::WebSocketConfig;

use crate::migration::{self as wire, Message};

/// How long a send to the target may block.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the source waits for the target's answer (its VMM's start or build included).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

type Socket = tungstenite::WebSocket<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>;

/// When the watchdog cuts the link, in ms since `start` (`u64::MAX`: not armed).
struct Deadline {
    start: Instant,
    at_ms: AtomicU64,
    done: AtomicBool,
}

impl Deadline {
    fn arm(&self, within: Duration) {
        let at = (self.start.elapsed() + within).as_millis() as u64;
        self.at_ms.store(at, Ordering::Release);
    }

    fn disarm(&self) {
        self.at_ms.store(u64::MAX, Ordering::Release);
    }
}

pub struct Link {
    socket: Socket,
    deadline: Arc<Deadline>,
    /// The target heard how it ended (or has the guest): nothing to say on the way out.
    finished: bool,
}

impl Drop for Link {
    /// A migration that ends without moving the VM tells the target, which then lets its
    /// VMM go at once instead of waiting for a silent link to time out.
    fn drop(&mut self) {
        if !self.finished {
            let abort = Message::Abort {
                why: "the source ended the migration (its progress says why)".into(),
            };
            // At most a second for it: the link may be what failed.
            if let Ok(text) = serde_json::to_string(&abort) {
                let _ = self.send_within(tungstenite::Message::text(text), Duration::from_secs(1));
            }
            self.deadline.arm(Duration::from_secs(1));
            let _ = self.socket.close(None);
            let _ = self.socket.flush();
        }
        self.deadline.done.store(true, Ordering::Release);
    }
}

fn broke(e: impl std::fmt::Display) -> String {
    format!("the link to the target broke ({e})")
}

impl Link {
    /// Connects to the target daemon at `addr` (host:port), trusting only the certificate
    /// of `fingerprint`, with an API `token` of it.
    pub fn connect(addr: &str, fingerprint: &str, token: &str) -> Result<Link, String> {
        let seen = Arc::new(crate::tls::Seen::default());
        let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("setting up TLS: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(crate::tls::Pinned::new(
                Some(fingerprint.to_string()),
                seen.clone(),
            )))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let unreachable =
            |e: &dyn std::fmt::Display| format!("cannot reach the target at https://{addr} ({e})");
        let socket = addr
            .to_socket_addrs()
            .map_err(|e| unreachable(&e))?
            .next()
            .ok_or_else(|| unreachable(&"no address"))?;
        let tcp = TcpStream::connect_timeout(&socket, SEND_TIMEOUT).map_err(|e| unreachable(&e))?;
        tcp.set_nodelay(true).map_err(|e| unreachable(&e))?;
        let deadline = Arc::new(Deadline {
            start: Instant::now(),
            at_ms: AtomicU64::new(u64::MAX),
            done: AtomicBool::new(false),
        });
        watch(
            tcp.try_clone().map_err(|e| unreachable(&e))?,
            deadline.clone(),
        );
        let linked = Self::handshake(addr, fingerprint, token, tcp, config, seen, &deadline);
        if linked.is_err() {
            // The watchdog ends, and with it its copy of the socket.
            deadline.done.store(true, Ordering::Release);
        }
        linked
    }

    fn handshake(
        addr: &str,
        fingerprint: &str,
        token: &str,
        tcp: TcpStream,
        config: rustls::ClientConfig,
        seen: Arc<crate::tls::Seen>,
        deadline: &Arc<Deadline>,
    ) -> Result<Link, String> {
        let unreachable =
            |e: &dyn std::fmt::Display| format!("cannot reach the target at https://{addr} ({e})");
        deadline.arm(ANSWER_TIMEOUT);
        let host = addr
            .rsplit_once(':')
            .map_or(addr, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let server = rustls::pki_types::ServerName::try_from(host)
            .map_err(|e| format!("'{addr}' does not name a host: {e}"))?;
        let tls = rustls::ClientConnection::new(Arc::new(config), server)
            .map_err(|e| format!("setting up TLS: {e}"))?;
        let stream = rustls::StreamOwned::new(tls, tcp);
        let mut request = tungstenite::client::IntoClientRequest::into_client_request(format!(
            "wss://{addr}/migrations/incoming"
        ))
        .map_err(|e| e.to_string())?;
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {token}")
                .parse()
                .map_err(|_| "the token is not a header value".to_string())?,
        );
        let ws_config = WebSocketConfig::default()
            .max_message_size(Some(wire::MAX_MESSAGE))
            .max_frame_size(Some(wire::MAX_MESSAGE));
        let connected = tungstenite::client::client_with_config(request, stream, Some(ws_config));
        deadline.disarm();
        match connected {
            Ok((socket, _)) => Ok(Link {
                socket,
                deadline: deadline.clone(),
                finished: false,
            }),
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
                let body = response
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                let message = serde_json::from_str::<api::ErrorBody>(&body)
                    .map(|e| e.error)
                    .unwrap_or(body);
                Err(format!(
                    "the target refused the migration (HTTP {}): {message}",
                    response.status().as_u16()
                ))
            }
            Err(e) => match seen.fingerprint() {
                Some(fp) if fp != fingerprint => Err(format!(
                    "the target's certificate is not the expected one: expected fingerprint {fingerprint}, saw {fp}"
                )),
                _ => Err(unreachable(&e)),
            },
        }
    }

    pub fn send(&mut self, message: &Message) -> Result<(), String> {
        let text = serde_json::to_string(message).map_err(|e| e.to_string())?;
        self.send_within(tungstenite::Message::text(text), SEND_TIMEOUT)
    }

    /// A batch of pages (see [`wire::encode_pages`]).
    pub fn send_pages(&mut self, batch: Vec<u8>) -> Result<(), String> {
        self.send_within(tungstenite::Message::binary(batch), SEND_TIMEOUT)
    }

    /// Sends `message`, the link cut by the watchdog if that takes longer than `within`.
    fn send_within(
        &mut self,
        message: tungstenite::Message,
        within: Duration,
    ) -> Result<(), String> {
        self.deadline.arm(within);
        let sent = self.socket.send(message);
        self.deadline.disarm();
        sent.map_err(broke)
    }

    /// The target has the guest (or heard the end): nothing more to tell it.
    pub fn finish(&mut self) {
        self.finished = true;
    }

    /// The target's next message.
    pub fn receive(&mut self) -> Result<Message, String> {
        self.deadline.arm(ANSWER_TIMEOUT);
        let got = loop {
            match self.socket.read() {
                Ok(tungstenite::Message::Text(text)) => {
                    break serde_json::from_str(text.as_str())
                        .map_err(|e| format!("the target sent {text:?} ({e})"))
                }
                Ok(tungstenite::Message::Close(_)) => {
                    break Err("the target closed the link".into())
                }
                Ok(_) => continue,
                Err(e) => break Err(broke(e)),
            }
        };
        self.deadline.disarm();
        got
    }
}

/// Shuts `tcp` down once the deadline passes, until the link is dropped.
fn watch(tcp: TcpStream, deadline: Arc<Deadline>) {
    std::thread::spawn(move || {
        while !deadline.done.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(100));
            let at = deadline.at_ms.load(Ordering::Acquire);
            if at != u64::MAX && deadline.start.elapsed().as_millis() as u64 > at {
                let _ = tcp.shutdown(Shutdown::Both);
                return;
            }
        }
    });
}
