//! Browser sessions for the web console. A browser signs in once with an API token in the
//! `Authorization` header of `POST /session`; the daemon answers with a random session id in
//! a cookie that scripts cannot read (`HttpOnly`), that no other site sends
//! (`SameSite=Strict`) and that goes only over TLS (`Secure`, on a TLS listener). The token
//! itself is never stored by the browser. A session stands for its token: removing the token
//! ends it, and its role and expiry are the token's. Requests that change something and come
//! with the cookie must also carry an `Origin` of this very host (checked by the guard).
//! Sessions live in the daemon's memory: a daemon restart signs every browser out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The cookie's name.
pub const COOKIE: &str = "keel_session";
/// A session unused this long ends.
pub const IDLE: Duration = Duration::from_secs(12 * 3600);
/// Most sessions at once (the oldest unused go first).
const MAX_SESSIONS: usize = 1024;

struct Session {
    /// SHA-256 of the token's secret.
    token_hash: String,
    last_used: Instant,
}

#[derive(Default)]
pub struct Sessions(Mutex<HashMap<String, Session>>);

fn id_hash(id: &str) -> String {
    Sha256::digest(id.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new session for the token whose secret hashes to `token_hash`: its id (kept only
    /// hashed here).
    pub fn create(&self, token_hash: &str) -> std::io::Result<String> {
        let mut bytes = [0u8; 32];
        crate::auth::random_bytes(&mut bytes)?;
        let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut sessions = self.lock();
        let now = Instant::now();
        sessions.retain(|_, s| now.duration_since(s.last_used) < IDLE);
        if sessions.len() >= MAX_SESSIONS {
            if let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| k.clone())
            {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(
            id_hash(&id),
            Session {
                token_hash: token_hash.to_string(),
                last_used: now,
            },
        );
        Ok(id)
    }

    /// The token hash a live session id stands for; using it keeps it alive.
    pub fn token_hash(&self, id: &str) -> Option<String> {
        let mut sessions = self.lock();
        let key = id_hash(id);
        let now = Instant::now();
        let session = sessions.get_mut(&key)?;
        if now.duration_since(session.last_used) >= IDLE {
            sessions.remove(&key);
            return None;
        }
        session.last_used = now;
        Some(session.token_hash.clone())
    }

    pub fn remove(&self, id: &str) {
        self.lock().remove(&id_hash(id));
    }
}

/// The session id in a request's `Cookie` headers, if any.
pub fn from_cookies(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_string())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The `Set-Cookie` value that gives a browser `id` (or, with None, takes it away).
pub fn set_cookie(id: Option<&str>, tls: bool) -> String {
    let secure = if tls { "; Secure" } else { "" };
    match id {
        Some(id) => format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict{secure}"),
        None => format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    }
}

/// Whether `origin` (the request's `Origin` header) is this host as the browser reached it
/// (`host`, the request's `Host` header).
pub fn same_origin(origin: Option<&str>, host: Option<&str>, tls: bool) -> bool {
    let (Some(origin), Some(host)) = (origin, host) else {
        return false;
    };
    let scheme = if tls { "https" } else { "http" };
    origin == format!("{scheme}://{host}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_stands_for_its_token_until_removed() {
        let sessions = Sessions::default();
        let id = sessions.create("abc").unwrap();
        assert_eq!(id.len(), 64);
        assert_eq!(sessions.token_hash(&id).as_deref(), Some("abc"));
        assert_eq!(sessions.token_hash(&"0".repeat(64)), None);
        sessions.remove(&id);
        assert_eq!(sessions.token_hash(&id), None);
    }

    #[test]
    fn cookies_and_origins() {
        let mut headers = axum::http::HeaderMap::new();
        let id = "a".repeat(64);
        headers.insert(
            axum::http::header::COOKIE,
            format!("x=1; {COOKIE}={id}").parse().unwrap(),
        );
        assert_eq!(from_cookies(&headers), Some(id.clone()));
        headers.insert(
            axum::http::header::COOKIE,
            format!("{COOKIE}=zz").parse().unwrap(),
        );
        assert_eq!(from_cookies(&headers), None);
        let cookie = set_cookie(Some(&id), true);
        assert!(
            cookie.contains("HttpOnly")
                && cookie.contains("SameSite=Strict")
                && cookie.contains("Secure")
        );
        assert!(same_origin(Some("https://h:8443"), Some("h:8443"), true));
        assert!(!same_origin(
            Some("https://evil:8443"),
            Some("h:8443"),
            true
        ));
        assert!(!same_origin(None, Some("h:8443"), true));
        assert!(!same_origin(Some("http://h:8443"), Some("h:8443"), true));
    }
}
