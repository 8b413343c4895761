//! `keel ledger export`: the ledger as evidence a customer checks without the host. JSON
//! Lines: a header naming the host's public key, every row as stored, the head signed at the
//! export, and last the SHA-256 of every byte before it, signed. `verify_export` needs only
//! the file and the public key: any byte changed fails the file's signature, and the rows'
//! chain is checked on its own so that what was changed is named.

use std::io::Write;

use api::events::LedgerVerification;
use ed25519_dalek::VerifyingKey;
use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::verify::{Checker, ExpectedHead};
use super::{read_raw, sql, text_column, RawRow, COLUMNS};
use crate::anchor::Anchor;
use crate::host_key::{self, HostKey};

pub const FORMAT: &str = "keel-ledger-export-v1";

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: String,
    host: String,
    public_key: String,
    exported: String,
}

/// A row as stored; `unreadable` instead of the fields when its columns cannot be read.
#[derive(Debug, Serialize, Deserialize)]
struct Row {
    seq: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unreadable: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    time_ms: Option<i64>,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    vm: Option<String>,
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    cause: String,
    #[serde(default)]
    actor: String,
    #[serde(default)]
    detail: String,
    #[serde(default)]
    prev_hash: String,
    #[serde(default)]
    hash: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct SignedHead {
    head: Anchor,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileSignature {
    file_sha256: String,
    signature: String,
}

fn file_message(sha256_hex: &str) -> Vec<u8> {
    format!("{FORMAT}\n{sha256_hex}\n").into_bytes()
}

/// Writes lines to `out` and keeps the hash of everything written.
struct Hashing<'a, W: Write> {
    out: &'a mut W,
    sha: Sha256,
}

impl<W: Write> Hashing<'_, W> {
    fn line(&mut self, value: &impl Serialize) -> std::io::Result<()> {
        let mut bytes = serde_json::to_vec(value).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        self.sha.update(&bytes);
        self.out.write_all(&bytes)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Ledger(#[from] super::Error),
    #[error("writing the export: {0}")]
    Write(#[from] std::io::Error),
}

/// Writes the whole ledger as a signed export.
pub fn write(
    conn: &Connection,
    key: &HostKey,
    host: &str,
    out: &mut impl Write,
) -> std::result::Result<(), ExportError> {
    let mut w = Hashing {
        out,
        sha: Sha256::new(),
    };
    w.line(&Header {
        format: FORMAT.into(),
        host: host.into(),
        public_key: key.public_hex(),
        exported: crate::time::rfc3339(crate::time::now_ms()),
    })?;
    let mut stmt = conn
        .prepare(&format!("SELECT {COLUMNS} FROM ledger ORDER BY seq ASC"))
        .map_err(sql("preparing to export the ledger"))?;
    let mut rows = stmt.query([]).map_err(sql("exporting the ledger"))?;
    let mut head = (0, super::GENESIS.to_string());
    while let Some(row) = rows.next().map_err(sql("exporting the ledger"))? {
        let (seq, raw) = read_raw(row).map_err(sql("reading a ledger row"))?;
        let line = match raw {
            Ok(r) => Row {
                seq,
                unreadable: None,
                time_ms: Some(r.time_ms),
                kind: r.kind,
                vm: r.vm,
                from: r.from,
                to: r.to,
                cause: r.cause,
                actor: r.actor,
                detail: r.detail,
                prev_hash: r.prev_hash,
                hash: r.hash,
            },
            Err(why) => Row {
                seq,
                unreadable: Some(why),
                time_ms: None,
                kind: String::new(),
                vm: None,
                from: None,
                to: None,
                cause: String::new(),
                actor: String::new(),
                detail: String::new(),
                prev_hash: String::new(),
                hash: text_column(row, 10, "hash")
                    .map_err(sql("reading a ledger row"))?
                    .unwrap_or_default(),
            },
        };
        head = (seq, line.hash.clone());
        w.line(&line)?;
    }
    w.line(&SignedHead {
        head: Anchor::new(head.0, &head.1, Some(key)),
    })?;
    let digest = hex::encode(w.sha.clone().finalize());
    let signature = key.sign(&file_message(&digest));
    w.line(&FileSignature {
        file_sha256: digest,
        signature,
    })?;
    Ok(())
}

/// What checking an export found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportVerification {
    pub ok: bool,
    /// Problems with the file as a whole (its signature, its form).
    pub file_problems: Vec<String>,
    /// The rows' chain, against the signed head.
    pub chain: LedgerVerification,
    pub host: Option<String>,
    pub exported: Option<String>,
}

/// Checks an export with only the host's public key.
pub fn verify_export(bytes: &[u8], key: &VerifyingKey) -> ExportVerification {
    let mut file_problems = Vec::new();
    let text = String::from_utf8_lossy(bytes);
    let mut lines: Vec<&str> = text.split_inclusive('\n').collect();
    // The file's own signature covers every byte before its last line.
    let last = lines.pop().unwrap_or_default();
    let covered = bytes.len() - last.len();
    match serde_json::from_str::<FileSignature>(last) {
        Ok(sig) => {
            let digest = hex::encode(Sha256::digest(&bytes[..covered]));
            if digest != sig.file_sha256 {
                file_problems.push("the file was changed after it was exported: its content does not match the SHA-256 it was signed with".to_string());
            }
            if !host_key::verify(key, &file_message(&sig.file_sha256), &sig.signature) {
                file_problems.push("the file's signature is not this public key's: it was changed, or it comes from another host".to_string());
            }
        }
        Err(e) => file_problems.push(format!(
            "the last line is not the file's signature ({e}): the export is cut short or was changed"
        )),
    }
    let mut host = None;
    let mut exported = None;
    let mut head: Option<Anchor> = None;
    let mut rows: Vec<Row> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if i == 0 {
            match serde_json::from_str::<Header>(line) {
                Ok(h) if h.format == FORMAT => {
                    if h.public_key != hex::encode(key.as_bytes()) {
                        file_problems.push(format!(
                            "the export names another public key ({}) than the one given",
                            h.public_key
                        ));
                    }
                    host = Some(h.host);
                    exported = Some(h.exported);
                }
                _ => file_problems.push(format!("line 1 is not a {FORMAT} header")),
            }
            continue;
        }
        if let Ok(signed) = serde_json::from_str::<SignedHead>(line) {
            head = Some(signed.head);
            continue;
        }
        match serde_json::from_str::<Row>(line) {
            Ok(row) => rows.push(row),
            Err(e) => file_problems.push(format!("line {} is not a ledger row: {e}", i + 1)),
        }
    }
    let expected = match &head {
        Some(h) if h.signed_by(key) => Some(h.expected()),
        Some(h) => {
            file_problems.push(format!(
                "the head signed at the export (row {}) does not carry this key's signature",
                h.seq
            ));
            None
        }
        None => {
            file_problems.push("the export has no signed head".into());
            None
        }
    };
    let chain = check_rows(rows, expected.as_ref());
    ExportVerification {
        ok: file_problems.is_empty() && chain.ok,
        file_problems,
        chain,
        host,
        exported,
    }
}

fn check_rows(rows: Vec<Row>, expected: Option<&ExpectedHead>) -> LedgerVerification {
    let mut checker = Checker::new(expected);
    let mut last_seq = 0;
    for row in rows {
        if row.seq <= last_seq {
            // Out of order or repeated: an export written by keel has neither.
            checker.row(
                row.seq,
                Err(format!("it comes after row {last_seq} in the file")),
                Some(row.hash),
            );
            continue;
        }
        last_seq = row.seq;
        match (row.unreadable, row.time_ms) {
            (None, Some(time_ms)) => checker.row(
                row.seq,
                Ok(RawRow {
                    seq: row.seq,
                    time_ms,
                    kind: row.kind,
                    vm: row.vm,
                    from: row.from,
                    to: row.to,
                    cause: row.cause,
                    actor: row.actor,
                    detail: row.detail,
                    prev_hash: row.prev_hash,
                    hash: row.hash,
                }),
                None,
            ),
            (why, _) => checker.row(
                row.seq,
                Err(why.unwrap_or_else(|| "it has no time".into())),
                Some(row.hash),
            ),
        }
    }
    checker.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{append, NewEvent, RESUME_SCHEMA, SCHEMA};
    use api::Cause;

    #[test]
    fn an_export_verifies_with_the_public_key_and_fails_after_one_byte() {
        let dir = std::env::temp_dir().join(format!("keel-export-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (key, _) = HostKey::load_or_create(&dir).unwrap();
        let public = host_key::parse_public(&key.public_hex()).unwrap();
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn.execute_batch(RESUME_SCHEMA).unwrap();
        for i in 0..6 {
            let e = NewEvent::host(None, Cause::Operator, "keel", format!("row {i}"));
            append(&conn, &e, 1_000 * i).unwrap();
        }
        let mut bytes = Vec::new();
        write(&conn, &key, "h1", &mut bytes).unwrap();
        let checked = verify_export(&bytes, &public);
        assert!(checked.ok, "{checked:?}");
        assert_eq!((checked.chain.rows, checked.chain.head_seq), (6, 6));

        // One byte of one row's detail: the file's hash and that row are named.
        let text = String::from_utf8(bytes.clone()).unwrap();
        let changed = text.replacen("row 3", "row 8", 1).into_bytes();
        let checked = verify_export(&changed, &public);
        assert!(!checked.ok);
        assert!(checked.file_problems[0].contains("changed after it was exported"));
        assert_eq!(checked.chain.problems[0].seq, 4, "{checked:?}");
        // Another key does not verify it.
        let (other, _) = {
            let other_dir = dir.join("other");
            std::fs::create_dir_all(&other_dir).unwrap();
            HostKey::load_or_create(&other_dir).unwrap()
        };
        let other = host_key::parse_public(&other.public_hex()).unwrap();
        assert!(!verify_export(&bytes, &other).ok);
        // Cut short: no signature line.
        let cut = &bytes[..bytes.len() / 2];
        assert!(!verify_export(cut, &public).ok);
        // Every single byte flipped fails (a sample across the file).
        for at in (0..bytes.len()).step_by(97) {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x01;
            assert!(!verify_export(&flipped, &public).ok, "byte {at}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
