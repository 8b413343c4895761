//! `keel ledger verify` (through the daemon, or of an export file with only the host's
//! public key, no daemon needed) and `keel ledger export`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use api::events::{LedgerProblem, LedgerVerification};
use hyper::Method;

use crate::cli::{print_json, write_out, ApiArgs};
use crate::client::query_value;

fn say(text: impl std::fmt::Display) {
    write_out(format_args!("{text}\n"));
}

fn problems(list: &[LedgerProblem]) {
    // Each problem names its rows.
    for p in list {
        say(&p.problem);
    }
}

/// Verifies the daemon's ledger; an error (exit 1) when it does not verify.
pub async fn verify(expect_head: Option<String>, api: ApiArgs) -> Result<()> {
    let path = match &expect_head {
        Some(h) => format!("/ledger/verify?expect_head={}", query_value(h)),
        None => "/ledger/verify".to_string(),
    };
    let v: LedgerVerification = api.client()?.get(&path).await?;
    if api.json {
        print_json(&v)?;
    } else if v.ok {
        say(format!(
            "ledger verified: {} rows, head {}:{}",
            v.rows, v.head_seq, v.head_hash
        ));
    } else {
        if let Some(anchor) = &v.anchor_problem {
            say(format!("anchor: {anchor}"));
        }
        problems(&v.problems);
    }
    if !v.ok {
        bail!(
            "the ledger does NOT verify: {} problem(s) in {} rows{}",
            v.problems.len(),
            v.rows,
            if v.anchor_problem.is_some() {
                ", and its anchor cannot be used"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// Checks an export file with the host's public key alone.
pub fn verify_export(file: &Path, public_key: &str, json: bool) -> Result<()> {
    let key = host::host_key::parse_public(public_key)?;
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let checked = host::ledger::export::verify_export(&bytes, &key);
    if json {
        print_json(&checked)?;
    } else if checked.ok {
        say(format!(
            "export verified: {} rows of host {}, exported {}, head {}:{} signed by {}",
            checked.chain.rows,
            checked.host.as_deref().unwrap_or("?"),
            checked.exported.as_deref().unwrap_or("?"),
            checked.chain.head_seq,
            checked.chain.head_hash,
            public_key.trim()
        ));
    } else {
        for p in &checked.file_problems {
            say(format!("file: {p}"));
        }
        problems(&checked.chain.problems);
    }
    if !checked.ok {
        bail!(
            "the export {} does NOT verify: {} problem(s) with the file, {} in its {} rows",
            file.display(),
            checked.file_problems.len(),
            checked.chain.problems.len(),
            checked.chain.rows
        );
    }
    Ok(())
}

/// Writes the daemon's signed export to `out` (atomically) or to stdout.
pub async fn export(out: Option<&Path>, api: ApiArgs) -> Result<()> {
    let answer = api
        .client()?
        .call(Method::GET, "/ledger/export", None)
        .await?;
    match out {
        Some(path) => {
            api::control::write_atomically(path, &answer.body, 0o644)
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "keel: ledger exported to {} ({} bytes); check it anywhere with keel ledger verify --export {} --pubkey KEY (keel host shows the key)",
                path.display(),
                answer.body.len(),
                path.display()
            );
        }
        None => {
            use std::io::Write;
            std::io::stdout()
                .lock()
                .write_all(&answer.body)
                .context("writing the export to stdout")?;
        }
    }
    Ok(())
}
