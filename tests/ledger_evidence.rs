//! Ledger evidence tried as an attacker with access to the state directory would, whole
//! system: rows cut from the end, a middle row edited, a row inserted, the anchor deleted or
//! edited; each is named exactly by `keel ledger verify` and by an incident, and cut rows'
//! numbers are never used again. A signed export verifies on "another machine" (a copy, no
//! daemon) with only the public key, and fails after one byte changes.

mod common;

use common::daemon::Daemon;

/// A daemon with some rows of its own (one audit row per token), stopped cleanly: the
/// anchor then names its last row.
fn stopped_daemon_with_rows(tag: &str) -> Daemon {
    let mut daemon = Daemon::start(tag);
    for i in 0..4 {
        daemon.ok(&["token", "create", &format!("t{i}"), "--role", "viewer"]);
    }
    assert!(daemon.stop(), "the daemon stops cleanly");
    daemon
}

fn db(daemon: &Daemon) -> rusqlite::Connection {
    rusqlite::Connection::open(daemon.state_dir.join("keel.db")).unwrap()
}

fn max_seq(daemon: &Daemon) -> i64 {
    db(daemon)
        .query_row("SELECT MAX(seq) FROM ledger", [], |r| r.get(0))
        .unwrap()
}

/// `keel ledger verify`, which must fail; its stdout.
fn verify_fails(daemon: &Daemon) -> String {
    let out = daemon.keel(&["ledger", "verify"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The summaries of the open incidents of cause tamper.
fn tamper_incidents(daemon: &Daemon) -> Vec<String> {
    let host = daemon.json(&["host"]);
    host["incidents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["cause"] == "tamper")
        .map(|i| i["summary"].as_str().unwrap().to_string())
        .collect()
}

/// Some open tamper incident says `what`.
fn raised(daemon: &Daemon, what: &str) {
    let incidents = tamper_incidents(daemon);
    assert!(
        incidents.iter().any(|i| i.contains(what)),
        "no incident says '{what}': {incidents:?}"
    );
}

#[test]
fn rows_cut_from_the_end_are_named_and_their_numbers_never_reused() {
    let mut daemon = stopped_daemon_with_rows("cut");
    let last = max_seq(&daemon);
    // The last two rows go (the daemon's own stop among them).
    db(&daemon)
        .execute_batch(&format!(
            "DROP TRIGGER ledger_no_delete; DELETE FROM ledger WHERE seq >= {};",
            last - 1
        ))
        .unwrap();
    daemon.restart();
    let named = format!("rows {} to {last} were cut from the end", last - 1);
    let incidents = tamper_incidents(&daemon);
    assert!(
        incidents.len() == 1 && incidents[0].contains(&named),
        "{incidents:?}"
    );
    // The next daemon went on from the cut head: no number is used twice.
    let conn = db(&daemon);
    let seqs: Vec<i64> = conn
        .prepare("SELECT seq FROM ledger ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(
        !seqs.contains(&(last - 1)) && !seqs.contains(&last) && seqs.contains(&(last + 1)),
        "numbers after the cut: {seqs:?}"
    );
    // From now on the gap is the evidence, named exactly.
    let said = verify_fails(&daemon);
    assert_eq!(
        said.trim(),
        format!("rows {} to {last} are missing: deleted", last - 1),
        "{said}"
    );

    // The single last row, as in the example: named by its own number.
    assert!(daemon.stop());
    let last = max_seq(&daemon);
    db(&daemon)
        .execute_batch(&format!("DELETE FROM ledger WHERE seq = {last};"))
        .unwrap();
    daemon.restart();
    raised(&daemon, &format!("row {last} was cut from the end"));
    assert!(
        max_seq(&daemon) > last,
        "row {last}'s number was used again"
    );
}

#[test]
fn an_edited_or_inserted_middle_row_is_named_by_verify_and_the_incident() {
    let mut daemon = stopped_daemon_with_rows("edit");
    db(&daemon)
        .execute_batch(
            "DROP TRIGGER ledger_no_update;
             UPDATE ledger SET actor = 'uid:1000' WHERE seq = 3;",
        )
        .unwrap();
    daemon.restart();
    let said = verify_fails(&daemon);
    assert_eq!(
        said.trim(),
        "row 3 was edited: its content does not match its hash"
    );
    let incidents = tamper_incidents(&daemon);
    assert!(
        incidents.len() == 1
            && incidents[0].contains("row 3 was edited")
            && !incidents[0].contains("cut"),
        "{incidents:?}"
    );

    // A row inserted after row 2 (the rows after it moved up to make room).
    let mut daemon = stopped_daemon_with_rows("insert");
    let conn = db(&daemon);
    conn.execute_batch("DROP TRIGGER ledger_no_update; DROP TRIGGER ledger_append_only;")
        .unwrap();
    let last = max_seq(&daemon);
    for seq in (3..=last).rev() {
        conn.execute("UPDATE ledger SET seq = seq + 1 WHERE seq = ?1", [seq])
            .unwrap();
    }
    let (time_ms, hash_2): (i64, String) = conn
        .query_row("SELECT time_ms, hash FROM ledger WHERE seq = 2", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    // A well-formed row, chained to row 2, hashed as keel would.
    let scratch = rusqlite::Connection::open_in_memory().unwrap();
    scratch.execute_batch(host::ledger::SCHEMA).unwrap();
    scratch.execute_batch(host::ledger::RESUME_SCHEMA).unwrap();
    host::ledger::set_resume(&scratch, 2, &hash_2).unwrap();
    let forged = host::ledger::append(
        &scratch,
        &host::ledger::NewEvent::host(None, api::Cause::Operator, "uid:0", "nothing happened"),
        time_ms + 1,
    )
    .unwrap();
    conn.execute(
        "INSERT INTO ledger (seq, time_ms, kind, vm, from_state, to_state, cause, actor, detail, prev_hash, hash)
         VALUES (3, ?1, 'host', NULL, NULL, NULL, 'operator', 'uid:0', 'nothing happened', ?2, ?3)",
        rusqlite::params![forged.time_ms, forged.prev_hash, forged.hash],
    )
    .unwrap();
    drop(conn);
    daemon.restart();
    let said = verify_fails(&daemon);
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(
        lines[0], "row 3 was inserted: row 4 chains to the row before it",
        "{said}"
    );
    let incidents = tamper_incidents(&daemon);
    assert!(
        incidents.len() == 1 && incidents[0].contains("row 3 was inserted"),
        "{incidents:?}"
    );
}

#[test]
fn a_missing_or_edited_anchor_is_an_incident() {
    let mut daemon = stopped_daemon_with_rows("anchor");
    let anchor = daemon.state_dir.join("ledger.head");
    std::fs::remove_file(&anchor).unwrap();
    daemon.restart();
    let incidents = tamper_incidents(&daemon);
    assert!(
        incidents.len() == 1 && incidents[0].contains("ledger.head is missing"),
        "{incidents:?}"
    );
    // The daemon anchors its head again (it does not silently accept a missing one twice).
    assert!(daemon.stop());
    assert!(anchor.exists());
    let text = std::fs::read_to_string(&anchor).unwrap();
    let seq = serde_json::from_str::<serde_json::Value>(&text).unwrap()["seq"]
        .as_i64()
        .unwrap();
    // An edited anchor (its row number lowered to hide a cut) does not carry its signature.
    std::fs::write(
        &anchor,
        text.replace(&format!("\"seq\": {seq}"), &format!("\"seq\": {}", seq - 1)),
    )
    .unwrap();
    daemon.restart();
    raised(&daemon, "does not match its content");
}

#[test]
fn a_signed_export_verifies_elsewhere_with_only_the_public_key() {
    let mut daemon = stopped_daemon_with_rows("export");
    daemon.restart();
    let key = daemon.json(&["host"])["identity"]["ledger_public_key"]
        .as_str()
        .unwrap()
        .to_string();
    let file = daemon.state_dir.join("evidence.jsonl");
    daemon.ok(&["ledger", "export", "--out", file.to_str().unwrap()]);
    // "Another machine": a copy elsewhere, checked with no daemon to ask.
    let elsewhere = std::env::temp_dir().join(format!("kd-elsewhere-{}", std::process::id()));
    std::fs::create_dir_all(&elsewhere).unwrap();
    let copy = elsewhere.join("evidence.jsonl");
    std::fs::copy(&file, &copy).unwrap();
    drop(daemon);
    let check = |path: &std::path::Path| {
        std::process::Command::new(common::KEEL)
            .args(["ledger", "verify", "--export"])
            .arg(path)
            .args(["--pubkey", &key])
            .env("KEEL_API", elsewhere.join("no-daemon.sock"))
            .output()
            .unwrap()
    };
    let out = check(&copy);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && said.starts_with("export verified: "),
        "{out:?}"
    );
    // One byte changed, anywhere: refused.
    let bytes = std::fs::read(&copy).unwrap();
    for at in [10, bytes.len() / 2, bytes.len() - 10] {
        let mut changed = bytes.clone();
        changed[at] = if changed[at] == b'0' { b'1' } else { b'0' };
        let edited = elsewhere.join("edited.jsonl");
        std::fs::write(&edited, &changed).unwrap();
        let out = check(&edited);
        assert_eq!(out.status.code(), Some(1), "byte {at} changed: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("does NOT verify"),
            "{out:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&elsewhere);
}
