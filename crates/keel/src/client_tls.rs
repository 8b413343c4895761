//! Whom the CLI trusts on `https://`: a CA file (`--ca`), or the server certificate's SHA-256
//! fingerprint (`--fingerprint`), as `keel serve` printed it and `GET /` shows it. What worked
//! is remembered per server in the client config file, so later commands need neither; a
//! certificate that no longer matches is refused with what was expected and what was seen.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use host::tls::{Pinned, Seen};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

/// How one server is trusted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trust {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
}

/// The client config file: trust per server URL ("https://host:port").
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ClientConfig {
    #[serde(default)]
    pub servers: std::collections::BTreeMap<String, Trust>,
}

/// `KEEL_CLIENT_CONFIG`, else `$XDG_CONFIG_HOME/keel/client.json`, else
/// `~/.config/keel/client.json`.
pub fn config_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KEEL_CLIENT_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("keel").join("client.json"))
}

impl ClientConfig {
    pub fn load(path: &Path) -> Result<ClientConfig> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "the client config {} is not valid JSON; fix or remove it",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ClientConfig::default()),
            Err(e) => Err(anyhow!("reading the client config {}: {e}", path.display())),
        }
    }

    /// Writes the file atomically, readable by its owner only.
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let json = serde_json::to_vec_pretty(self).context("encoding the client config")?;
        api::control::write_atomically(path, &json, 0o600)
            .with_context(|| format!("writing the client config {}", path.display()))
    }
}

/// A TLS connector for `trust`, and what its handshake saw.
pub fn connector(trust: &Trust) -> Result<(tokio_rustls::TlsConnector, Arc<Seen>)> {
    let provider = host::tls::provider();
    let seen = Arc::new(Seen::default());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("setting up TLS")?;
    let mut config = match (&trust.ca, &trust.fingerprint) {
        (Some(ca), _) => {
            let pem = std::fs::read(ca)
                .with_context(|| format!("reading the CA file {}", ca.display()))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert =
                    cert.with_context(|| format!("the CA file {} is not PEM", ca.display()))?;
                roots
                    .add(cert)
                    .with_context(|| format!("a certificate in {} is not usable", ca.display()))?;
            }
            if roots.is_empty() {
                bail!("the CA file {} holds no certificate", ca.display());
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        (None, expected) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned::new(expected.clone(), seen.clone())))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((tokio_rustls::TlsConnector::from(Arc::new(config)), seen))
}

/// The message for a handshake the trust settings refused.
pub fn refusal(server: &str, trust: &Trust, remembered: bool, seen: Option<String>) -> String {
    let Some(seen) = seen else {
        return format!("the TLS handshake with {server} failed");
    };
    match &trust.fingerprint {
        Some(expected) => format!(
            "the certificate of {server} is not the expected one: expected fingerprint {expected}{}, saw {seen}; if the server's certificate was changed on purpose, check the new fingerprint on the host (keel serve prints it; keel host shows it) and pass --fingerprint {seen}",
            if remembered { " (remembered in the client config)" } else { "" }
        ),
        None => format!(
            "the certificate of {server} is not trusted yet: its SHA-256 fingerprint is {seen}; check it against the one keel serve printed on the host (keel host there shows it), then pass --fingerprint {seen} (or --ca FILE for a CA-signed certificate); it is remembered for later commands"
        ),
    }
}
