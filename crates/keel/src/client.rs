//! The CLI's side of the REST API: one HTTP/1.1 request per call, over the daemon's Unix
//! socket (default) or HTTPS with an API token (plain HTTP where the daemon was asked to
//! serve it on loopback); or a WebSocket (the console) over the same.

use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::WebSocketStream;

use crate::client_tls::{self, Trust};

/// Where the daemon's API is when nothing says otherwise.
pub const DEFAULT_SOCKET: &str = "/var/lib/keel/api.sock";

#[derive(Debug, Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    /// host:port, plain HTTP.
    Tcp(String),
    /// host:port, TLS.
    Https(String),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "http://{a}"),
            Endpoint::Https(a) => write!(f, "https://{a}"),
        }
    }
}

impl Endpoint {
    /// "https://host:port" or "http://host:port" for TCP, anything else is a Unix socket path.
    pub fn parse(text: &str) -> Endpoint {
        if let Some(addr) = text.strip_prefix("https://") {
            return Endpoint::Https(addr.trim_end_matches('/').to_string());
        }
        match text.strip_prefix("http://") {
            Some(addr) => Endpoint::Tcp(addr.trim_end_matches('/').to_string()),
            None => Endpoint::Unix(PathBuf::from(text)),
        }
    }
}

/// The host part of "host:port" ("[::1]:8443" -> "::1").
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// A connection to the daemon, Unix or TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An error answer's message: the daemon's `ErrorBody`, or the body as text.
fn error_message(status: StatusCode, body: &[u8]) -> anyhow::Error {
    let message = serde_json::from_slice::<api::ErrorBody>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
    let message = if message.trim().is_empty() {
        status
            .canonical_reason()
            .unwrap_or("no message")
            .to_string()
    } else {
        message
    };
    anyhow!("{message} (HTTP {})", status.as_u16())
}

pub struct Client {
    pub endpoint: Endpoint,
    pub token: Option<String>,
    /// For https: how the server's certificate is trusted.
    pub trust: Trust,
    /// The trust came from the client config file (not from this command's flags).
    pub trust_remembered: bool,
    /// Where to remember trust that worked, when it came from this command's flags.
    pub remember_in: Option<PathBuf>,
}

/// A successful answer.
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Client {
    fn unreachable(&self, e: std::io::Error) -> anyhow::Error {
        anyhow!(
            "cannot reach keel serve at {} ({e}); is the daemon running? (start it with `keel serve`, or point KEEL_API at it)",
            self.endpoint
        )
    }

    /// A new connection to the daemon.
    async fn connect(&self) -> Result<Box<dyn Io>> {
        Ok(match &self.endpoint {
            Endpoint::Unix(path) => Box::new(
                tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| self.unreachable(e))?,
            ),
            Endpoint::Tcp(addr) => Box::new(
                tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| self.unreachable(e))?,
            ),
            Endpoint::Https(addr) => Box::new(self.connect_tls(addr).await?),
        })
    }

    async fn connect_tls(
        &self,
        addr: &str,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let (connector, seen) = client_tls::connector(&self.trust)?;
        let name = rustls::pki_types::ServerName::try_from(host_of(addr).to_string())
            .with_context(|| format!("'{addr}' does not name a host"))?;
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| self.unreachable(e))?;
        let stream = connector.connect(name, tcp).await.map_err(|e| {
            let server = self.endpoint.to_string();
            match seen.fingerprint() {
                Some(fp) if self.trust.ca.is_none() => anyhow!(
                    "{}",
                    client_tls::refusal(&server, &self.trust, self.trust_remembered, Some(fp))
                ),
                _ => anyhow!("the TLS handshake with {server} failed: {e}"),
            }
        })?;
        if let Some(path) = &self.remember_in {
            self.remember(path);
        }
        Ok(stream)
    }

    /// Keeps the trust that just worked for this server in the client config file.
    fn remember(&self, path: &std::path::Path) {
        let result = (|| {
            let mut config = client_tls::ClientConfig::load(path)?;
            let key = self.endpoint.to_string();
            if config.servers.get(&key) == Some(&self.trust) {
                return Ok(());
            }
            config.servers.insert(key, self.trust.clone());
            config.save(path)
        })();
        if let Err(e) = result {
            eprintln!("keel: warning: the server's trust was not remembered: {e:#}");
        }
    }

    /// Opens a WebSocket on `path` (with the token on TCP); a refusal is an error carrying the
    /// daemon's message.
    pub async fn websocket(&self, path: &str) -> Result<WebSocketStream<Box<dyn Io>>> {
        use tungstenite::client::IntoClientRequest;
        let host = match &self.endpoint {
            Endpoint::Unix(_) => "keel",
            Endpoint::Tcp(addr) | Endpoint::Https(addr) => addr.as_str(),
        };
        let mut request = format!("ws://{host}{path}")
            .into_client_request()
            .context("building the WebSocket request")?;
        if let Some(token) = &self.token {
            request.headers_mut().insert(
                "authorization",
                format!("Bearer {token}")
                    .parse()
                    .context("the API token is not a valid header value")?,
            );
        }
        let io = self.connect().await?;
        match tokio_tungstenite::client_async(request, io).await {
            Ok((ws, response)) => {
                if let Some(warning) = response.headers().get("warning") {
                    eprintln!(
                        "keel: warning: {}",
                        warning.to_str().unwrap_or("(unreadable)")
                    );
                }
                Ok(ws)
            }
            Err(tungstenite::Error::Http(response)) => Err(error_message(
                response.status(),
                response.body().as_deref().unwrap_or_default(),
            )),
            Err(e) => Err(anyhow!(
                "opening the WebSocket {path} at {}: {e}",
                self.endpoint
            )),
        }
    }

    async fn exchange<S>(&self, io: S, request: Request<Full<Bytes>>) -> Result<Answer>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .context("HTTP handshake with the daemon")?;
        tokio::spawn(connection);
        let response = sender
            .send_request(request)
            .await
            .with_context(|| format!("request to the daemon at {}", self.endpoint))?;
        let status = response.status();
        if let Some(warning) = response.headers().get("warning") {
            eprintln!(
                "keel: warning: {}",
                warning.to_str().unwrap_or("(unreadable)")
            );
        }
        let body = response
            .into_body()
            .collect()
            .await
            .context("reading the daemon's answer")?
            .to_bytes();
        Ok(Answer { status, body })
    }

    /// Sends one request; a non-2xx answer is an error carrying the daemon's message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Answer> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "keel")
            .header("content-type", "application/json");
        if let Some(token) = &self.token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let request = builder
            .body(Full::new(Bytes::from(payload)))
            .context("building the request")?;
        let io = self.connect().await?;
        let answer = self.exchange(io, request).await?;
        if !answer.status.is_success() {
            return Err(error_message(answer.status, &answer.body));
        }
        Ok(answer)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(Method::GET, path, None).await
    }

    pub async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T> {
        let answer = self.call(method, path, body).await?;
        serde_json::from_slice(&answer.body).with_context(|| {
            format!(
                "the daemon's answer to {path} is not what this keel expects (a different version?)"
            )
        })
    }
}

/// Percent-encodes a query value.
pub fn query_value(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
