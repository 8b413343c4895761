//! How the daemon keeps its evidence honest: at start it checks the whole ledger against the
//! signed anchor (missing, unreadable or wrongly signed anchors, and every edited, inserted,
//! deleted or cut row are incidents that name them), resumes numbering after rows cut from
//! the end, then anchors each new head (store/chain.rs); every minute it re-reads the anchor,
//! raises what changed behind its back, and writes the anchor durably; every ten minutes it
//! verifies the whole ledger again, on a reader of its own.

use std::path::Path;
use std::sync::Arc;

use api::Cause;
use ed25519_dalek::VerifyingKey;

use crate::anchor::{self, Anchor, Problem};
use crate::host_key::{self, HostKey};
use crate::ledger::{self, ExpectedHead, NewEvent};
use crate::store::{self, Store};
use crate::supervisor::Supervisor;

/// The host key, if it could be read or made, and what went wrong otherwise.
pub struct Keys {
    pub key: Option<Arc<HostKey>>,
    pub public: Option<VerifyingKey>,
    /// Made on this start.
    pub created: bool,
    pub problem: Option<String>,
    /// The head last written down durably: an idle host does not sync the anchor again every
    /// minute.
    durable_head: std::sync::Mutex<Option<(i64, String)>>,
}

pub fn load_key(state_dir: &Path) -> Keys {
    match HostKey::load_or_create(state_dir) {
        Ok((key, created)) => {
            let public = host_key::parse_public(&key.public_hex()).ok();
            Keys {
                key: Some(Arc::new(key)),
                public,
                created,
                problem: None,
                durable_head: Default::default(),
            }
        }
        Err(e) => Keys {
            key: None,
            public: None,
            created: false,
            problem: Some(e.to_string()),
            durable_head: Default::default(),
        },
    }
}

/// At most this many problems are spelled out in one incident.
const LISTED: usize = 8;

/// One sentence for the problems a verification found.
pub fn summarise(v: &api::events::LedgerVerification) -> Option<String> {
    if v.ok {
        return None;
    }
    let listed: Vec<&str> = v
        .problems
        .iter()
        .take(LISTED)
        .map(|p| p.problem.as_str())
        .collect();
    let more = v.problems.len().saturating_sub(LISTED);
    Some(format!(
        "the ledger was changed outside keel: {}{}; keel ledger verify lists every problem",
        listed.join("; "),
        if more > 0 {
            format!("; and {more} more")
        } else {
            String::new()
        }
    ))
}

/// The front page's `ledger` check: the daemon's last verification, when and how it went.
pub fn health_check(v: &api::events::LedgerVerification, anchored: bool) -> api::host::HealthCheck {
    let when = crate::time::rfc3339(crate::time::now_ms());
    api::host::HealthCheck {
        name: "ledger".into(),
        ok: v.ok && anchored,
        detail: if v.ok && v.rows == 0 {
            format!("the ledger is empty (checked at {when}): a new host")
        } else if v.ok {
            format!(
                "{} rows verified at {when}{}; head {}:{}",
                v.rows,
                if anchored {
                    " against the signed anchor"
                } else {
                    ", with no usable anchor"
                },
                v.head_seq,
                v.head_hash
            )
        } else {
            format!(
                "the ledger does NOT verify ({} problem(s) at {when}); keel ledger verify names them",
                v.problems.len()
            )
        },
    }
}

/// Checks the ledger against its anchor before the daemon writes anything, makes numbering
/// resume after rows cut from the end, and starts anchoring. Returns what to raise, and the
/// front page's ledger check.
pub fn check_at_start(
    store: &mut Store,
    state_dir: &Path,
    keys: &Keys,
) -> store::Result<(Vec<String>, api::host::HealthCheck)> {
    let mut findings: Vec<String> = keys.problem.iter().cloned().collect();
    let last = ledger::last_row(store.connection())?;
    let expected: Option<ExpectedHead> = match anchor::read(state_dir, keys.public.as_ref()) {
        Ok(anchor) => Some(anchor.expected()),
        // The first start: no ledger, no anchor, a key made now.
        Err(Problem::Missing(_)) if last.is_none() && keys.created => None,
        Err(Problem::Missing(file)) if last.is_none() => {
            findings.push(format!(
                "the ledger is empty and its anchor {} is missing, but this host's key was made before: the ledger and its anchor may have been replaced; compare with an export kept elsewhere (keel ledger verify --export)",
                file.display()
            ));
            None
        }
        Err(e @ Problem::Missing(_)) => {
            findings.push(format!(
                "{e}: rows cut from the ledger's end since it was written cannot be named; if it was not removed on purpose, someone with access to the state directory may have removed it (compare with an export kept elsewhere: keel ledger verify --export); a new anchor is written now"
            ));
            None
        }
        // Written by the first release, before heads were signed: trusted once, on upgrade.
        Err(Problem::Unsigned(_)) if keys.created => {
            anchor::read(state_dir, None).ok().map(|a| a.expected())
        }
        Err(e) => {
            findings.push(format!(
                "{e}; its head is not trusted, so rows cut from the ledger's end cannot be named; a new anchor is written now"
            ));
            None
        }
    };
    let verified = match &expected {
        Some(head) => ledger::verify_against(store.connection(), head)?,
        None => ledger::verify(store.connection())?,
    };
    findings.extend(summarise(&verified));
    // Rows cut from the end: their numbers are not used again.
    if let Some(head) = expected
        .as_ref()
        .filter(|h| h.seq.is_some_and(|s| s > verified.head_seq))
    {
        ledger::set_resume(store.connection(), head.seq.unwrap_or(0), &head.hash)?;
    }
    // A first start has no anchor to check against, and needs none.
    let check = health_check(&verified, expected.is_some() || last.is_none());
    let state_dir = state_dir.to_path_buf();
    store.chain.start(last, state_dir, keys.key.clone());
    Ok((findings, check))
}

/// Raises each finding as an incident, unless one with the same summary was raised before
/// (open or acknowledged: a gap left by deleted rows stays in the ledger for good).
pub fn raise(sup: &Supervisor, findings: Vec<String>) {
    for detail in findings {
        let raised = sup.with_store(|s| -> store::Result<bool> {
            if s.incident_raised(&detail)? {
                return Ok(false);
            }
            s.record_incident(&NewEvent::host(None, Cause::Tamper, "keel", detail.clone()))?;
            Ok(true)
        });
        match raised {
            Ok(true) => tracing::error!("{detail}"),
            Ok(false) => {}
            Err(e) => tracing::error!("raising the ledger incident ({detail}): {e}"),
        }
    }
}

/// The minute's care: what changed behind the daemon's back, an anchor that went missing or
/// was edited, then the head written down durably.
pub fn every_minute(sup: &Supervisor, keys: &Keys) {
    let mut findings = sup.with_store(|s| s.chain.take_tampered());
    let head = sup.with_store(|s| ledger::last_row(s.connection()));
    let intact = match anchor::read(&sup.state_dir, keys.public.as_ref()) {
        Ok(_) => true,
        Err(Problem::Missing(_)) if matches!(head, Ok(None)) => true,
        Err(e) => {
            findings.push(format!(
                "{e} while the daemon ran; it is written again now from the daemon's own head"
            ));
            false
        }
    };
    raise(sup, findings);
    match head {
        Ok(Some(head)) => {
            let mut durable = keys.durable_head.lock().unwrap_or_else(|e| e.into_inner());
            // No row since the last durable write, and the file is as written: nothing to do.
            if intact && durable.as_ref() == Some(&head) {
                return;
            }
            let anchor = Anchor::new(head.0, &head.1, keys.key.as_deref());
            match anchor::write(&sup.state_dir, &anchor, true) {
                Ok(()) => *durable = Some(head),
                Err(e) => tracing::error!(
                    "writing the ledger anchor {}: {e}",
                    anchor::path(&sup.state_dir).display()
                ),
            }
        }
        Ok(None) => {}
        Err(e) => tracing::error!("reading the ledger's head: {e}"),
    }
}

/// A full verification against the anchor, off the async workers; problems are raised.
pub async fn verify_all(sup: &Arc<Supervisor>, keys: &Keys) {
    let expected = anchor::read(&sup.state_dir, keys.public.as_ref())
        .ok()
        .map(|a| a.expected());
    let anchored = expected.is_some();
    let checked = sup
        .with_reader(move |conn| match &expected {
            Some(head) => ledger::verify_against(conn, head),
            None => ledger::verify(conn),
        })
        .await;
    match checked {
        Ok(Ok(v)) => {
            sup.set_ledger_check(health_check(&v, anchored));
            raise(sup, summarise(&v).into_iter().collect())
        }
        Ok(Err(e)) => tracing::error!("verifying the ledger: {e}"),
        Err(e) => tracing::error!("verifying the ledger: {e}"),
    }
}
