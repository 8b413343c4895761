//! TLS for the TCP API (rustls). The certificate and key come from the operator
//! (`--tls-cert`/`--tls-key`) or are a self-signed pair made on the first start in
//! `STATE/tls/`. Clients trust a self-signed certificate by its SHA-256 fingerprint, printed
//! at start and shown on `GET /`. The generated certificate never expires (promise 1: a date
//! must not cut operators off their host); an operator's certificate is used as given.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::sync::Mutex;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

/// Where a generated pair is kept, under the state directory.
pub const DIR: &str = "tls";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the TLS {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the TLS {what} {path} holds no usable PEM {what}: {problem}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[error("making a self-signed TLS certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the TLS certificate and key do not go together or are not supported: {0}")]
    Config(#[from] rustls::Error),
}

/// Where the certificate comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// PEM files given by the operator.
    Files { cert: PathBuf, key: PathBuf },
    /// `STATE/tls/{cert,key}.pem`, made on the first start.
    SelfSigned,
}

/// What the TCP listener serves with.
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    /// SHA-256 of the leaf certificate, "AB:CD:..." as `openssl x509 -fingerprint -sha256`
    /// prints it.
    pub fingerprint: String,
    pub cert_path: PathBuf,
    /// Made on this start.
    pub generated: bool,
    /// When the leaf certificate stops being valid, ms since the epoch (a record for the
    /// front page's warning; nothing in Keel refuses it then).
    pub not_after_ms: Option<i64>,
}

/// The end of a DER certificate's validity, ms since the epoch.
pub fn not_after_ms(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    cert.validity().not_after.timestamp().checked_mul(1000)
}

/// How long ahead an expiring certificate is warned about.
pub const EXPIRY_WARNING_MS: i64 = 30 * 24 * 3600 * 1000;

/// The front page's warning about the TLS certificate, if it expires within 30 days or has.
pub fn expiry_warning(cert: &Path, not_after_ms: i64, now_ms: i64) -> Option<String> {
    let when = crate::time::rfc3339(not_after_ms);
    if now_ms >= not_after_ms {
        Some(format!(
            "the TLS certificate {} expired at {when}: browsers and clients that check dates refuse it (the CLI pinning its fingerprint does not); give keel serve a new one with --tls-cert and --tls-key",
            cert.display()
        ))
    } else if not_after_ms - now_ms <= EXPIRY_WARNING_MS {
        Some(format!(
            "the TLS certificate {} expires at {when}; give keel serve a new one with --tls-cert and --tls-key before then",
            cert.display()
        ))
    } else {
        None
    }
}

/// The SHA-256 fingerprint of a DER certificate, upper-case hex pairs joined by colons.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A fingerprint as typed by a person: hex pairs with or without colons, any case, with or
/// without a "sha256:" prefix. None unless it is 32 bytes of hex.
pub fn parse_fingerprint(text: &str) -> Option<String> {
    let text = text.trim();
    let text = text
        .strip_prefix("sha256:")
        .or_else(|| text.strip_prefix("SHA256:"))
        .unwrap_or(text);
    let hex: String = text.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let bytes: Vec<String> = hex
        .to_ascii_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|pair| String::from_utf8_lossy(pair).into_owned())
        .collect();
    Some(bytes.join(":"))
}

fn read_pem_file(what: &'static str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = read_pem_file("certificate", path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Pem {
            what: "certificate",
            path: path.to_path_buf(),
            problem: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(Error::Pem {
            what: "certificate",
            path: path.to_path_buf(),
            problem: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let pem = read_pem_file("key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| Error::Pem {
        what: "key",
        path: path.to_path_buf(),
        problem: e.to_string(),
    })
}

/// The names a generated certificate carries: the listen address, localhost and the host's
/// name. (Clients that pin the fingerprint do not check them; clients with a CA file do.)
fn subject_names(listen: SocketAddr) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if !host.is_empty() {
            names.push(host.to_string());
        }
    }
    names.dedup();
    names
}

/// Makes `STATE/tls/` with a new self-signed pair unless one is there.
fn self_signed(state_dir: &Path, listen: SocketAddr) -> Result<(PathBuf, PathBuf, bool), Error> {
    let dir = state_dir.join(DIR);
    let (cert, key) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
    if cert.exists() && key.exists() {
        return Ok((cert, key, false));
    }
    std::fs::create_dir_all(&dir).map_err(|source| Error::Write {
        path: dir.clone(),
        source,
    })?;
    let pair = rcgen::generate_simple_self_signed(subject_names(listen))?;
    // The key first: a certificate without its key would be kept and never work.
    let write = |path: &Path, text: String, mode| {
        api::control::write_atomically(path, text.as_bytes(), mode).map_err(|source| Error::Write {
            path: path.to_path_buf(),
            source,
        })
    };
    write(&key, pair.signing_key.serialize_pem(), 0o600)?;
    write(&cert, pair.cert.pem(), 0o644)?;
    Ok((cert, key, true))
}

/// The cryptography rustls uses: ring, which keeps the build free of aws-lc's C toolchain.
/// (rustls marks it deprecated because it has no post-quantum key exchange.)
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's TLS configuration, from `source`.
pub fn server(state_dir: &Path, source: &Source, listen: SocketAddr) -> Result<ServerTls, Error> {
    let (cert_path, key_path, generated) = match source {
        Source::Files { cert, key } => (cert.clone(), key.clone(), false),
        Source::SelfSigned => self_signed(state_dir, listen)?,
    };
    let chain = certificates(&cert_path)?;
    let key = private_key(&key_path)?;
    let fingerprint = fingerprint(&chain[0]);
    let not_after_ms = not_after_ms(&chain[0]);
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(ServerTls {
        config: Arc::new(config),
        fingerprint,
        cert_path,
        generated,
        not_after_ms,
    })
}

// Clients that pin a certificate by its fingerprint (the CLI, tests) rather than trust a CA.

/// What the handshake saw, for the error message when it is refused.
#[derive(Debug, Default)]
pub struct Seen(Mutex<Option<String>>);

impl Seen {
    pub fn fingerprint(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Accepts exactly one certificate, by fingerprint (None: accepts none, but records what it
/// saw so the refusal can tell the operator what to check).
#[derive(Debug)]
pub struct Pinned {
    expected: Option<String>,
    seen: Arc<Seen>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl Pinned {
    /// Trusts the certificate whose fingerprint is `expected`; what it sees goes to `seen`.
    pub fn new(expected: Option<String>, seen: Arc<Seen>) -> Pinned {
        Pinned {
            expected,
            seen,
            provider: provider(),
        }
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let seen = fingerprint(end_entity);
        *self.seen.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(seen.clone());
        if self.expected.as_deref() == Some(seen.as_str()) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "certificate fingerprint not trusted".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_read_as_people_write_them() {
        let canonical = fingerprint(b"x");
        assert_eq!(canonical.len(), 32 * 3 - 1);
        let plain = canonical.replace(':', "").to_lowercase();
        assert_eq!(
            parse_fingerprint(&plain).as_deref(),
            Some(canonical.as_str())
        );
        assert_eq!(
            parse_fingerprint(&format!("sha256:{canonical}")).as_deref(),
            Some(canonical.as_str())
        );
        assert_eq!(parse_fingerprint("AB:CD"), None);
        assert_eq!(parse_fingerprint(&"zz".repeat(32)), None);
    }

    #[test]
    fn a_self_signed_pair_is_made_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("keel-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let listen: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let first = server(&dir, &Source::SelfSigned, listen).unwrap();
        assert!(first.generated);
        let again = server(&dir, &Source::SelfSigned, listen).unwrap();
        assert!(!again.generated);
        assert_eq!(first.fingerprint, again.fingerprint);
        // The generated certificate outlives any date a host will see.
        let year_4000_ms = 64_060_588_800_000;
        assert!(first.not_after_ms.unwrap() > year_4000_ms);
        assert!(expiry_warning(&first.cert_path, first.not_after_ms.unwrap(), 0).is_none());
        assert!(expiry_warning(Path::new("c.pem"), 1_000, 2_000)
            .unwrap()
            .contains("expired"));
        assert!(expiry_warning(Path::new("c.pem"), 2_000, 1_000)
            .unwrap()
            .contains("expires at"));
        use std::os::unix::fs::PermissionsExt;
        let key = std::fs::metadata(dir.join(DIR).join(KEY_FILE)).unwrap();
        assert_eq!(key.permissions().mode() & 0o777, 0o600);
        // The operator's files are used as given; a key that is not PEM is an error naming it.
        std::fs::write(dir.join("bad.pem"), "not pem").unwrap();
        let bad = Source::Files {
            cert: dir.join(DIR).join(CERT_FILE),
            key: dir.join("bad.pem"),
        };
        let e = server(&dir, &bad, listen).err().unwrap().to_string();
        assert!(e.contains("bad.pem"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
