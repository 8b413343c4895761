//! The ledger's head written down outside SQLite, signed with the host key:
//! `<state dir>/ledger.head`. A hash chain shows an edited, inserted or deleted row, but not
//! rows cut from its end; the anchor names its row number and hash, so a verification names
//! exactly which rows were cut. The daemon rewrites it after every row it appends (without a
//! sync, so a row costs no extra fsync; the page cache outlives a killed daemon), and durably
//! every minute and when it stops. A missing, unreadable or wrongly signed anchor is an
//! incident, never a reason to start a new one silently. Someone who holds the host key can
//! still forge a head: keep exports (with their signed heads) off the host as evidence.

use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use crate::host_key::{self, HostKey};
use crate::ledger::ExpectedHead;
use crate::time::{now_ms, rfc3339};

pub const FILE: &str = "ledger.head";

/// What is wrong with the anchor file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("the ledger anchor {0} is missing")]
    Missing(PathBuf),
    #[error("the ledger anchor {0} cannot be read: {1}")]
    Unreadable(PathBuf, String),
    #[error("the ledger anchor {0} is not an anchor: {1}")]
    Corrupt(PathBuf, String),
    #[error("the ledger anchor {0} is not signed")]
    Unsigned(PathBuf),
    #[error("the ledger anchor {0} is signed by another key ({1}) than this host's")]
    OtherKey(PathBuf, String),
    #[error(
        "the ledger anchor {0} has a signature that does not match its content: it was edited"
    )]
    BadSignature(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anchor {
    /// The last row's number. (Anchors of the first release have `rows` instead, which was
    /// the same number: their ledgers had no gaps.)
    #[serde(default)]
    pub seq: i64,
    #[serde(default, skip_serializing)]
    pub rows: Option<i64>,
    pub head_hash: String,
    /// RFC 3339, when it was written (a record only).
    pub written: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// Ed25519 over [`Anchor::message`], hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// The bytes a head's signature covers (also used by exports).
pub fn head_message(seq: i64, head_hash: &str, written: &str) -> Vec<u8> {
    format!("keel-ledger-head-v1\n{seq}\n{head_hash}\n{written}\n").into_bytes()
}

impl Anchor {
    /// A head signed now with `key` (unsigned without one).
    pub fn new(seq: i64, head_hash: &str, key: Option<&HostKey>) -> Anchor {
        let written = rfc3339(now_ms());
        let message = head_message(seq, head_hash, &written);
        Anchor {
            seq,
            rows: None,
            head_hash: head_hash.to_string(),
            public_key: key.map(HostKey::public_hex),
            signature: key.map(|k| k.sign(&message)),
            written,
        }
    }

    pub fn message(&self) -> Vec<u8> {
        head_message(self.seq, &self.head_hash, &self.written)
    }

    /// What a verification checks the ledger against.
    pub fn expected(&self) -> ExpectedHead {
        ExpectedHead {
            seq: Some(self.seq),
            hash: self.head_hash.clone(),
            source: format!("the head anchored at {}", self.written),
        }
    }

    /// Whether `key` signed this head.
    pub fn signed_by(&self, key: &VerifyingKey) -> bool {
        self.signature
            .as_deref()
            .is_some_and(|s| host_key::verify(key, &self.message(), s))
    }
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// The anchor, checked against `key` (this host's public key) when there is one.
pub fn read(state_dir: &Path, key: Option<&VerifyingKey>) -> Result<Anchor, Problem> {
    let file = path(state_dir);
    let text = match std::fs::read(&file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Problem::Missing(file)),
        Err(e) => return Err(Problem::Unreadable(file, e.to_string())),
    };
    let mut anchor: Anchor =
        serde_json::from_slice(&text).map_err(|e| Problem::Corrupt(file.clone(), e.to_string()))?;
    if anchor.seq == 0 {
        anchor.seq = anchor.rows.unwrap_or(0);
    }
    let Some(key) = key else {
        return Ok(anchor);
    };
    if anchor.signature.is_none() {
        return Err(Problem::Unsigned(file));
    }
    let mine = hex::encode(key.as_bytes());
    if let Some(theirs) = anchor.public_key.as_ref().filter(|k| **k != mine) {
        return Err(Problem::OtherKey(file, theirs.clone()));
    }
    if !anchor.signed_by(key) {
        return Err(Problem::BadSignature(file));
    }
    Ok(anchor)
}

/// Writes `anchor`; `durable` also syncs it (and its directory) to disk.
pub fn write(state_dir: &Path, anchor: &Anchor, durable: bool) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(anchor).unwrap_or_default();
    let file = path(state_dir);
    if durable {
        return api::control::write_atomically(&file, &json, 0o600);
    }
    let temporary = state_dir.join(format!(".{FILE}.{}", std::process::id()));
    std::fs::write(&temporary, &json)?;
    std::fs::rename(&temporary, &file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_anchor_reads_back_and_edits_are_named() {
        let dir = std::env::temp_dir().join(format!("keel-anchor-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (key, _) = HostKey::load_or_create(&dir).unwrap();
        let public = host_key::parse_public(&key.public_hex()).unwrap();
        assert!(matches!(
            read(&dir, Some(&public)),
            Err(Problem::Missing(_))
        ));
        let anchor = Anchor::new(40, &"ab".repeat(32), Some(&key));
        write(&dir, &anchor, false).unwrap();
        assert_eq!(read(&dir, Some(&public)), Ok(anchor.clone()));
        write(&dir, &anchor, true).unwrap();
        assert_eq!(read(&dir, Some(&public)), Ok(anchor.clone()));
        assert_eq!(anchor.expected().seq, Some(40));

        // The row number changed by hand: the signature no longer matches.
        let text = std::fs::read_to_string(path(&dir)).unwrap();
        std::fs::write(path(&dir), text.replace("\"seq\": 40", "\"seq\": 38")).unwrap();
        assert!(matches!(
            read(&dir, Some(&public)),
            Err(Problem::BadSignature(_))
        ));
        // Unsigned (as the first release wrote them, with `rows`): readable, but not signed.
        std::fs::write(
            path(&dir),
            format!(
                r#"{{"rows": 7, "head_hash": "{}", "written": "x"}}"#,
                "cd".repeat(32)
            ),
        )
        .unwrap();
        assert_eq!(read(&dir, None).unwrap().seq, 7);
        assert!(matches!(
            read(&dir, Some(&public)),
            Err(Problem::Unsigned(_))
        ));
        std::fs::write(path(&dir), "{").unwrap();
        assert!(matches!(read(&dir, None), Err(Problem::Corrupt(..))));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
