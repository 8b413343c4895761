//! The host's Ed25519 key: it signs the ledger's anchored heads and its exports, so that a
//! customer holding the public key can check evidence without the host. Made on the first
//! start in `STATE/host.key` (the 32-byte seed in hex, owner-only); never replaced by the
//! daemon: a key that cannot be read is an incident, not a reason to make a new one (that
//! would let anyone who deletes it start a new history).

use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

pub const FILE: &str = "host.key";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the host key {path} cannot be read ({why}); the ledger's heads are not signed until it is restored from a backup")]
    Unreadable { path: PathBuf, why: String },
    #[error("making the host key {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("'{0}' is not an Ed25519 public key (64 hex digits)")]
    BadPublicKey(String),
}

pub struct HostKey {
    signing: SigningKey,
}

impl HostKey {
    /// The key in `state_dir`, made now if there is none (then `true`).
    pub fn load_or_create(state_dir: &Path) -> Result<(HostKey, bool), Error> {
        let path = state_dir.join(FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let seed: [u8; 32] = hex::decode(text.trim())
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| Error::Unreadable {
                        path: path.clone(),
                        why: "it does not hold 32 bytes in hex".into(),
                    })?;
                Ok((
                    HostKey {
                        signing: SigningKey::from_bytes(&seed),
                    },
                    false,
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut seed = [0u8; 32];
                crate::auth::random_bytes(&mut seed).map_err(|source| Error::Create {
                    path: path.clone(),
                    source,
                })?;
                let text = format!("{}\n", hex::encode(seed));
                api::control::write_atomically(&path, text.as_bytes(), 0o600)
                    .map_err(|source| Error::Create { path, source })?;
                Ok((
                    HostKey {
                        signing: SigningKey::from_bytes(&seed),
                    },
                    true,
                ))
            }
            Err(e) => Err(Error::Unreadable {
                path,
                why: e.to_string(),
            }),
        }
    }

    /// The public key, 64 hex digits.
    pub fn public_hex(&self) -> String {
        hex::encode(self.signing.verifying_key().as_bytes())
    }

    /// The signature of `message`, 128 hex digits.
    pub fn sign(&self, message: &[u8]) -> String {
        hex::encode(self.signing.sign(message).to_bytes())
    }
}

/// A public key as printed by [`HostKey::public_hex`] (an "ed25519:" prefix is allowed).
pub fn parse_public(text: &str) -> Result<VerifyingKey, Error> {
    let hex_text = text.trim().trim_start_matches("ed25519:");
    let bytes: [u8; 32] = hex::decode(hex_text)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Error::BadPublicKey(text.to_string()))?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| Error::BadPublicKey(text.to_string()))
}

/// Whether `signature` (hex) is `key`'s signature of `message`.
pub fn verify(key: &VerifyingKey, message: &[u8], signature: &str) -> bool {
    let Some(bytes) = hex::decode(signature)
        .ok()
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
    else {
        return false;
    };
    key.verify(message, &Signature::from_bytes(&bytes)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_made_once_and_signs() {
        let dir = std::env::temp_dir().join(format!("keel-hostkey-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (key, made) = HostKey::load_or_create(&dir).unwrap();
        assert!(made);
        let (again, made) = HostKey::load_or_create(&dir).unwrap();
        assert!(!made);
        assert_eq!(key.public_hex(), again.public_hex());
        let public = parse_public(&format!("ed25519:{}", key.public_hex())).unwrap();
        let signature = key.sign(b"head 7");
        assert!(verify(&public, b"head 7", &signature));
        assert!(!verify(&public, b"head 8", &signature));
        assert!(!verify(&public, b"head 7", "00"));
        // A damaged key is an error, and is not replaced.
        std::fs::write(dir.join(FILE), "garbage").unwrap();
        assert!(matches!(
            HostKey::load_or_create(&dir),
            Err(Error::Unreadable { .. })
        ));
        assert_eq!(std::fs::read_to_string(dir.join(FILE)).unwrap(), "garbage");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
