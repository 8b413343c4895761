//! Who is asking, and may they. On the Unix socket the kernel names the peer's uid: root and
//! the daemon's own user are admins, other users have the role `--local-role UID=ROLE` gives
//! them or none (refused). On TCP every request carries an API token
//! (`Authorization: Bearer ...`) with a role.
//!
//! Expiry limits only new work (promise 1): an expired token may still read, and start, shut
//! down, stop and reboot existing VMs, but not define, delete or hand out anything. Tokens
//! close to expiry are warned about on the front page and in a `Warning` header.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::store::TokenRow;
use crate::time::rfc3339;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("this request needs an API token: send 'Authorization: Bearer <token>' (keel token create makes one)")]
    Missing,
    #[error("the API token is not known here; check KEEL_TOKEN or ask an admin for one")]
    Unknown,
    #[error("{who} has role {has} but this needs {needs}")]
    Forbidden { who: String, has: Role, needs: Role },
    #[error("token '{name}' expired at {at}: it can still read and start or stop existing VMs, but not define, delete or grant anything; ask an admin for a new token (keel token create)")]
    Expired { name: String, at: String },
    #[error("{0}")]
    BadRole(String),
    #[error("local user uid {0} has no role on this API socket; an admin can give it one with keel serve --local-role {0}=viewer (or operator, admin)")]
    NoLocalRole(u32),
    #[error("too many failed authentications from this address; try again in {0} s")]
    TooManyFailures(u64),
    #[error("a request with this browser session must come from this host's own pages (its Origin header does not name this host); refused")]
    CrossSite,
}

impl Error {
    /// Refused before the caller was known: counted, not audited row by row.
    pub fn is_anonymous(&self) -> bool {
        matches!(
            self,
            Error::Missing
                | Error::Unknown
                | Error::NoLocalRole(_)
                | Error::TooManyFailures(_)
                | Error::CrossSite
        )
    }
}

/// Roles of local users on the Unix socket, beyond root and the daemon's own user (admins).
#[derive(Debug, Clone, Default)]
pub struct LocalRoles {
    pub roles: HashMap<u32, Role>,
    pub daemon_uid: u32,
}

impl LocalRoles {
    pub fn new(roles: &[(u32, Role)]) -> LocalRoles {
        LocalRoles {
            roles: roles.iter().copied().collect(),
            // SAFETY: geteuid has no preconditions.
            daemon_uid: unsafe { libc::geteuid() },
        }
    }

    pub fn role_of(&self, uid: u32) -> Option<Role> {
        if uid == 0 || uid == self.daemon_uid {
            return Some(Role::Admin);
        }
        self.roles.get(&uid).copied()
    }
}

/// `UID=ROLE`, as `--local-role` takes it.
pub fn parse_local_role(text: &str) -> Result<(u32, Role), String> {
    let (uid, role) = text
        .split_once('=')
        .ok_or_else(|| format!("'{text}' is not UID=ROLE (1000=viewer, say)"))?;
    let uid: u32 = uid
        .trim()
        .parse()
        .map_err(|_| format!("'{uid}' in '{text}' is not a numeric uid"))?;
    let role: Role = role.trim().parse()?;
    Ok((uid, role))
}

/// Who may use the API and what is refused: the router's guard holds it.
pub struct Access {
    pub local: LocalRoles,
    pub refusals: Arc<crate::refusals::Refusals>,
    /// Browser sessions of the web console.
    pub sessions: crate::session::Sessions,
    /// The TCP listener speaks TLS (session cookies are then `Secure`).
    pub tls: bool,
    /// API answers by status, for `/metrics`.
    pub answers: crate::metrics::ApiCounters,
}

pub use api::host::Role;

/// Where a request came from.
#[derive(Debug, Clone)]
pub enum Peer {
    Unix { uid: u32, pid: i32 },
    Tcp(SocketAddr),
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Peer::Unix { uid, pid } => write!(f, "unix socket (uid {uid}, pid {pid})"),
            Peer::Tcp(addr) => write!(f, "tcp {addr}"),
        }
    }
}

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Read,
    /// Act on something that exists (lifecycle of a defined VM): allowed to expired tokens.
    Operate,
    /// Create or destroy (new capacity, deletion): refused to expired tokens.
    Create,
    Admin,
}

impl Need {
    fn role(self) -> Role {
        match self {
            Need::Read => Role::Viewer,
            Need::Operate | Need::Create => Role::Operator,
            Need::Admin => Role::Admin,
        }
    }
}

/// The caller, once authenticated.
#[derive(Debug, Clone)]
pub struct Caller {
    /// "uid:0" or "token:NAME": the actor in the ledger.
    pub actor: String,
    pub role: Role,
    /// The SHA-256 of the token's secret, for a caller with a token (a session is made for
    /// it, never for the secret itself).
    pub token_hash: Option<String>,
    /// A warning to send back (the token expires soon or has expired).
    pub warning: Option<String>,
}

/// What a TCP request presents: a token's secret (`Authorization: Bearer`), or the hash of
/// one that a browser session stands for (session.rs).
#[derive(Debug, Clone, Copy)]
pub enum Credential<'a> {
    Secret(&'a str),
    Hashed(&'a str),
}

/// How long ahead an expiring token is warned about.
pub const EXPIRY_WARNING_MS: i64 = 14 * 24 * 3600 * 1000;

pub fn hash_secret(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new random token secret: "keel_" and 32 random bytes in hex.
pub fn new_secret() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    random_bytes(&mut bytes)?;
    Ok(format!(
        "keel_{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

/// Fills `bytes` from the kernel's random source.
pub fn random_bytes(bytes: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < bytes.len() {
        // SAFETY: getrandom writes at most the given length into the buffer.
        let n = unsafe {
            libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0)
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

/// Decides whether `peer` with `credential` may do what `need` says, at wall-clock `now_ms`.
pub fn authorize(
    peer: &Peer,
    credential: Option<Credential>,
    tokens: &[TokenRow],
    local: &LocalRoles,
    need: Need,
    now_ms: i64,
) -> Result<Caller, Error> {
    if let Peer::Unix { uid, .. } = *peer {
        let role = local.role_of(uid).ok_or(Error::NoLocalRole(uid))?;
        if role < need.role() {
            return Err(Error::Forbidden {
                who: format!("local user uid {uid}"),
                has: role,
                needs: need.role(),
            });
        }
        return Ok(Caller {
            actor: format!("uid:{uid}"),
            role,
            token_hash: None,
            warning: None,
        });
    }
    let hashed = match credential.ok_or(Error::Missing)? {
        Credential::Secret(secret) => hash_secret(secret),
        Credential::Hashed(hash) => hash.to_string(),
    };
    let token = tokens
        .iter()
        .find(|t| t.secret_sha256 == hashed)
        .ok_or(Error::Unknown)?;
    let role: Role = token.role.parse().map_err(Error::BadRole)?;
    if role < need.role() {
        return Err(Error::Forbidden {
            who: format!("token '{}'", token.name),
            has: role,
            needs: need.role(),
        });
    }
    let mut warning = None;
    if let Some(expires) = token.expires_ms {
        if now_ms >= expires {
            let expired = Error::Expired {
                name: token.name.clone(),
                at: rfc3339(expires),
            };
            if matches!(need, Need::Create | Need::Admin) {
                return Err(expired);
            }
            warning = Some(expired.to_string());
        } else if expires - now_ms <= EXPIRY_WARNING_MS {
            warning = Some(format!(
                "token '{}' expires at {}; ask an admin for a new one",
                token.name,
                rfc3339(expires)
            ));
        }
    }
    Ok(Caller {
        actor: format!("token:{}", token.name),
        role,
        token_hash: Some(hashed),
        warning,
    })
}

/// Warnings for the front page: tokens expired or expiring within the warning window.
pub fn expiry_warnings(tokens: &[TokenRow], now_ms: i64) -> Vec<String> {
    tokens
        .iter()
        .filter_map(|t| {
            let expires = t.expires_ms?;
            if now_ms >= expires {
                Some(format!(
                    "token '{}' expired at {} (it can still operate existing VMs)",
                    t.name,
                    rfc3339(expires)
                ))
            } else if expires - now_ms <= EXPIRY_WARNING_MS {
                Some(format!(
                    "token '{}' expires at {}",
                    t.name,
                    rfc3339(expires)
                ))
            } else {
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(name: &str, role: &str, secret: &str, expires_ms: Option<i64>) -> TokenRow {
        TokenRow {
            name: name.into(),
            role: role.into(),
            secret_sha256: hash_secret(secret),
            created_ms: 0,
            expires_ms,
        }
    }

    fn local() -> LocalRoles {
        LocalRoles::default()
    }

    fn tcp() -> Peer {
        Peer::Tcp("127.0.0.1:1".parse().unwrap())
    }

    #[test]
    fn roles_and_tokens() {
        let tokens = [
            token("view", "viewer", "s1", None),
            token("ops", "operator", "s2", None),
        ];
        assert_eq!(
            authorize(&tcp(), None, &tokens, &local(), Need::Read, 0).unwrap_err(),
            Error::Missing
        );
        assert_eq!(
            authorize(
                &tcp(),
                Some(Credential::Secret("nope")),
                &tokens,
                &local(),
                Need::Read,
                0
            )
            .unwrap_err(),
            Error::Unknown
        );
        assert!(authorize(
            &tcp(),
            Some(Credential::Secret("s1")),
            &tokens,
            &local(),
            Need::Read,
            0
        )
        .is_ok());
        assert!(matches!(
            authorize(
                &tcp(),
                Some(Credential::Secret("s1")),
                &tokens,
                &local(),
                Need::Operate,
                0
            ),
            Err(Error::Forbidden { .. })
        ));
        let caller = authorize(
            &tcp(),
            Some(Credential::Secret("s2")),
            &tokens,
            &local(),
            Need::Create,
            0,
        )
        .unwrap();
        assert_eq!(caller.actor, "token:ops");
    }

    #[test]
    fn local_users_get_their_configured_role_or_nothing() {
        let local = LocalRoles {
            roles: [(1000, Role::Viewer)].into_iter().collect(),
            daemon_uid: 0,
        };
        let unix = |uid| Peer::Unix { uid, pid: 5 };
        let root = authorize(&unix(0), None, &[], &local, Need::Admin, 0);
        assert_eq!(root.unwrap().actor, "uid:0");
        assert!(authorize(&unix(1000), None, &[], &local, Need::Read, 0).is_ok());
        let e = authorize(&unix(1000), None, &[], &local, Need::Operate, 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "local user uid 1000 has role viewer but this needs operator"
        );
        assert_eq!(
            authorize(&unix(1001), None, &[], &local, Need::Read, 0).unwrap_err(),
            Error::NoLocalRole(1001)
        );
        assert_eq!(
            parse_local_role("1000=operator"),
            Ok((1000, Role::Operator))
        );
        assert!(parse_local_role("bob=viewer").is_err());
        assert!(parse_local_role("1000=root").is_err());
    }

    #[test]
    fn an_expired_token_still_operates_existing_vms_but_creates_nothing() {
        let tokens = [token("old", "admin", "s", Some(1_000))];
        let late = 4_102_444_800_000; // 2100-01-01
        let operate = authorize(
            &tcp(),
            Some(Credential::Secret("s")),
            &tokens,
            &local(),
            Need::Operate,
            late,
        )
        .unwrap();
        assert!(operate.warning.unwrap().contains("expired"));
        assert!(authorize(
            &tcp(),
            Some(Credential::Secret("s")),
            &tokens,
            &local(),
            Need::Read,
            late
        )
        .is_ok());
        assert!(matches!(
            authorize(
                &tcp(),
                Some(Credential::Secret("s")),
                &tokens,
                &local(),
                Need::Create,
                late
            ),
            Err(Error::Expired { .. })
        ));
        assert_eq!(expiry_warnings(&tokens, late).len(), 1);
    }

    #[test]
    fn expiry_is_warned_ahead() {
        let tokens = [token("soon", "viewer", "s", Some(EXPIRY_WARNING_MS))];
        let caller = authorize(
            &tcp(),
            Some(Credential::Secret("s")),
            &tokens,
            &local(),
            Need::Read,
            1,
        )
        .unwrap();
        assert!(caller.warning.unwrap().contains("expires at"));
        assert!(expiry_warnings(&tokens, -EXPIRY_WARNING_MS - 1).is_empty());
    }

    #[test]
    fn secrets_are_random_and_hashed() {
        let (a, b) = (new_secret().unwrap(), new_secret().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 5 + 64);
        assert_eq!(hash_secret("abc").len(), 64);
    }
}
