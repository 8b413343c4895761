//! The API's connections: accepted here rather than by `axum::serve`, so that each listener
//! has a connection cap, a per-address cap on TCP, a TLS handshake deadline and a deadline
//! for a request's headers (which also closes idle keep-alive connections), and so that a
//! stop closes every connection within a grace period. A connection over a cap is closed at
//! once and counted (see `refusals.rs`); it never waits in the accept queue.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::auth::Peer;
use crate::refusals::Refusals;

/// How much a listener takes.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once on this listener.
    pub max_connections: usize,
    /// Connections open at once from one TCP address.
    pub max_per_address: usize,
    /// Time for a TLS handshake.
    pub handshake_timeout: Duration,
    /// Time for a request's headers to arrive, from the connection's start or the end of the
    /// previous answer: a connection silent this long is closed.
    pub header_timeout: Duration,
    /// How long a stop waits for requests in progress.
    pub grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 512,
            max_per_address: 64,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(15),
            grace: Duration::from_secs(5),
        }
    }
}

pub enum Listener {
    Unix(UnixListener),
    /// TLS unless `tls` is None (plain HTTP, loopback only: the server checks that).
    Tcp {
        listener: TcpListener,
        tls: Option<TlsAcceptor>,
    },
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A connection accepted but not yet handed to HTTP.
enum Accepted {
    Unix(tokio::net::UnixStream, Peer),
    Tcp(tokio::net::TcpStream, Peer),
    /// Closed at once (a Unix peer without credentials).
    Refused,
}

impl Listener {
    async fn accept(&self) -> std::io::Result<Accepted> {
        match self {
            Listener::Unix(l) => {
                let (stream, _) = l.accept().await?;
                // A peer the kernel cannot name has no role: refused, never taken for root.
                Ok(match stream.peer_cred() {
                    Ok(cred) => Accepted::Unix(
                        stream,
                        Peer::Unix {
                            uid: cred.uid(),
                            pid: cred.pid().unwrap_or(0),
                        },
                    ),
                    Err(e) => {
                        tracing::warn!("closed an API connection without peer credentials: {e}");
                        Accepted::Refused
                    }
                })
            }
            Listener::Tcp { listener, .. } => {
                let (stream, addr) = listener.accept().await?;
                // Answers are small writes (a JSON body, a WebSocket frame's header then its
                // payload): with Nagle's algorithm the second waited for the client's delayed
                // ACK, 40 ms, which a migration's link paid at every exchange.
                let _ = stream.set_nodelay(true);
                Ok(Accepted::Tcp(stream, Peer::Tcp(addr)))
            }
        }
    }
}

/// Connections per TCP address; a slot is given back when its connection ends.
#[derive(Default)]
struct PerAddress(Mutex<HashMap<IpAddr, usize>>);

struct AddressSlot(Arc<PerAddress>, IpAddr);

impl PerAddress {
    fn take(table: &Arc<PerAddress>, ip: IpAddr, max: usize) -> Option<AddressSlot> {
        let mut open = table.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(AddressSlot(table.clone(), ip))
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.1);
            }
        }
    }
}

/// Serves `app` on `listener` until `stop` turns true, then closes idle connections, gives
/// requests in progress `limits.grace`, and returns.
pub async fn serve(
    listener: Listener,
    app: Router,
    limits: Limits,
    refusals: Arc<Refusals>,
    mut stop: watch::Receiver<bool>,
) {
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let per_address = Arc::new(PerAddress::default());
    let tls = match &listener {
        Listener::Tcp { tls, .. } => tls.clone(),
        Listener::Unix(_) => None,
    };
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = stopped(&mut stop) => break,
            accepted = listener.accept() => accepted,
        };
        let (io, peer): (Box<dyn Io>, Peer) = match accepted {
            Ok(Accepted::Unix(s, peer)) => (Box::new(s), peer),
            Ok(Accepted::Tcp(s, peer)) => (Box::new(s), peer),
            Ok(Accepted::Refused) => continue,
            Err(e) => {
                // Out of descriptors, most likely: let connections end before trying again.
                tracing::warn!("accepting an API connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            refusals.connection_refused(&peer, "the listener's connection cap");
            continue;
        };
        let slot = match &peer {
            Peer::Tcp(addr) => {
                match PerAddress::take(&per_address, addr.ip(), limits.max_per_address) {
                    Some(slot) => Some(slot),
                    None => {
                        refusals.connection_refused(&peer, "the per-address connection cap");
                        continue;
                    }
                }
            }
            Peer::Unix { .. } => None,
        };
        connections.spawn(connection(
            io,
            peer,
            tls.clone(),
            app.clone(),
            limits,
            stop.clone(),
            (permit, slot),
        ));
    }
    // Stopping: every connection task has seen `stop` too and is closing.
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(limits.grace, drain).await.is_err() {
        connections.abort_all();
    }
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

async fn connection(
    io: Box<dyn Io>,
    peer: Peer,
    tls: Option<TlsAcceptor>,
    app: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
    held: (OwnedSemaphorePermit, Option<AddressSlot>),
) {
    let _held = held;
    let io: Box<dyn Io> = match tls {
        None => io,
        Some(acceptor) => {
            let handshake = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(io));
            tokio::select! {
                _ = stopped(&mut stop) => return,
                done = handshake => match done {
                    Ok(Ok(stream)) => Box::new(stream),
                    Ok(Err(e)) => {
                        tracing::debug!("TLS handshake with {peer} failed: {e}");
                        return;
                    }
                    Err(_) => return,
                },
            }
        }
    };
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer.clone()));
        app.clone().oneshot(request.map(axum::body::Body::new))
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
