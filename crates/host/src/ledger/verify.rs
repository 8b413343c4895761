//! Checking a chain of rows, from the store or from an export, and naming exactly what was
//! done to it: each edited, rewritten, inserted or deleted row by its number, rows renumbered
//! to hide an insertion or a deletion by the numbers they had, and rows cut from the end by
//! the head written down earlier (the signed anchor knows its row number).

use api::events::{LedgerProblem, LedgerVerification};

use super::{parse, row_hash, RawRow, GENESIS};

/// How far a renumbered row is looked for from its place (rows inserted or deleted before it).
const MAX_SHIFT: i64 = 64;

/// A head written down earlier: by the daemon's anchor (with its row number) or by a person
/// (a hash alone, or `SEQ:HASH`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedHead {
    pub seq: Option<i64>,
    pub hash: String,
    /// Where it comes from, for the messages ("the head signed at ...").
    pub source: String,
}

impl ExpectedHead {
    /// `HASH` or `SEQ:HASH`, as given to `--expect-head`.
    pub fn parse(text: &str) -> ExpectedHead {
        let (seq, hash) = match text.split_once(':') {
            Some((seq, hash)) => match seq.parse::<i64>() {
                Ok(seq) => (Some(seq), hash),
                Err(_) => (None, text),
            },
            None => (None, text),
        };
        ExpectedHead {
            seq,
            hash: hash.to_string(),
            source: "the head written down earlier".into(),
        }
    }
}

/// A row as the checker remembers it.
struct Seen {
    seq: i64,
    hash: Option<String>,
    /// Its content matches its hash at its own number.
    intact: bool,
}

/// Walks rows in `seq` order; [`Checker::finish`] gives the verdict.
pub(crate) struct Checker<'a> {
    expected: Option<&'a ExpectedHead>,
    problems: Vec<LedgerProblem>,
    count: i64,
    last_seq: i64,
    prev: Option<Seen>,
    prev2: Option<Seen>,
    /// Consecutive rows that hold the rows numbered `shift` lower: (first, last, shift).
    renumbered: Option<(i64, i64, i64)>,
    /// The stored hash of the expected head's row, once reached.
    at_expected: Option<Option<String>>,
    expected_found: bool,
}

fn rows_text(first: i64, last: i64) -> String {
    if first == last {
        format!("row {first}")
    } else {
        format!("rows {first} to {last}")
    }
}

/// The number a renumbered row was hashed with, if it is within reach.
fn original_seq(raw: &RawRow) -> Option<i64> {
    let mut probe = raw.clone();
    for d in 1..=MAX_SHIFT {
        for seq in [raw.seq - d, raw.seq + d] {
            if seq < 1 {
                continue;
            }
            probe.seq = seq;
            if row_hash(&probe) == raw.hash {
                return Some(seq);
            }
        }
    }
    None
}

impl<'a> Checker<'a> {
    pub(crate) fn new(expected: Option<&'a ExpectedHead>) -> Checker<'a> {
        Checker {
            expected,
            problems: Vec::new(),
            count: 0,
            last_seq: 0,
            prev: None,
            prev2: None,
            renumbered: None,
            at_expected: None,
            expected_found: expected.is_some_and(|e| e.hash == GENESIS && e.seq.unwrap_or(0) == 0),
        }
    }

    fn problem(&mut self, seq: i64, text: String) {
        self.problems.push(LedgerProblem { seq, problem: text });
    }

    fn flush_renumbered(&mut self) {
        let Some((first, last, shift)) = self.renumbered.take() else {
            return;
        };
        let (orig_first, orig_last) = (first - shift, last - shift);
        let why = if shift > 0 {
            format!("{shift} row(s) were inserted before them")
        } else {
            format!(
                "the original {} before them were deleted",
                rows_text(orig_first + shift, orig_first - 1)
            )
        };
        let (these, were) = if first == last {
            (format!("row {first} is"), format!("row {orig_first}"))
        } else {
            (
                format!("rows {first} to {last} are"),
                format!("rows {orig_first} to {orig_last}"),
            )
        };
        self.problem(
            first,
            format!("{these} the original {were}, renumbered because {why}"),
        );
    }

    /// One row: its number, the row (or why its columns cannot be read) and its stored hash.
    pub(crate) fn row(
        &mut self,
        seq: i64,
        raw: Result<RawRow, String>,
        stored_hash: Option<String>,
    ) {
        self.count += 1;
        let expected_next = self.last_seq.saturating_add(1);
        let gap = seq > expected_next;
        if gap {
            let missing = rows_text(expected_next, seq - 1);
            let verb = if seq - 1 == expected_next {
                "is"
            } else {
                "are"
            };
            self.problem(expected_next, format!("{missing} {verb} missing: deleted"));
        }
        let (intact, original, hash, prev_hash) = match raw {
            Err(what) => {
                self.problem(
                    seq,
                    format!("row {seq} cannot be read, so its hash cannot be checked: {what}"),
                );
                (false, None, stored_hash, None)
            }
            Ok(raw) => {
                let intact = row_hash(&raw) == raw.hash;
                let original = if intact { None } else { original_seq(&raw) };
                if !intact && original.is_none() {
                    self.problem(
                        seq,
                        format!("row {seq} was edited: its content does not match its hash"),
                    );
                }
                if let Err(what) = parse(&raw) {
                    self.problem(seq, format!("row {seq} does not parse: {what}"));
                }
                (intact, original, Some(raw.hash), Some(raw.prev_hash))
            }
        };
        // Rows renumbered by the same amount are one problem.
        match original.map(|o| seq - o) {
            Some(shift) => match self.renumbered {
                Some((first, last, s)) if s == shift && last + 1 == seq => {
                    self.renumbered = Some((first, seq, s));
                }
                _ => {
                    self.flush_renumbered();
                    self.renumbered = Some((seq, seq, shift));
                }
            },
            None => self.flush_renumbered(),
        }
        if let (Some(prev_hash), false) = (prev_hash, gap) {
            self.link(seq, &prev_hash, original.is_some());
        }
        if let Some(expected) = self.expected {
            match expected.seq {
                Some(s) if s == seq => self.at_expected = Some(hash.clone()),
                _ => {
                    if hash.as_deref() == Some(expected.hash.as_str()) {
                        self.expected_found = true;
                    }
                }
            }
        }
        self.prev2 = self.prev.take();
        self.prev = Some(Seen { seq, hash, intact });
        self.last_seq = seq;
    }

    /// Checks that row `seq` chains to the row before it, and names the row at fault if not.
    fn link(&mut self, seq: i64, prev_hash: &str, renumbered: bool) {
        let Some(prev) = &self.prev else {
            if prev_hash != GENESIS && !renumbered && seq == 1 {
                self.problem(
                    seq,
                    "row 1 does not chain to the genesis hash: the chain was rewritten".into(),
                );
            }
            return;
        };
        if prev.hash.as_deref() == Some(prev_hash) {
            return;
        }
        let before_prev = match &self.prev2 {
            Some(p) => p.hash.as_deref() == Some(prev_hash),
            None => prev_hash == GENESIS,
        };
        let prev_seq = prev.seq;
        if before_prev {
            self.problem(
                prev_seq,
                format!("row {prev_seq} was inserted: row {seq} chains to the row before it"),
            );
        } else if renumbered {
            // The renumbering's own problem explains the broken link.
        } else if prev.intact {
            self.problem(
                prev_seq,
                format!(
                    "row {prev_seq} was rewritten (its content and its hash): row {seq} chained to another hash"
                ),
            );
        }
        // A previous row that is not intact was already named as edited.
    }

    pub(crate) fn finish(mut self) -> LedgerVerification {
        self.flush_renumbered();
        if let Some(expected) = self.expected {
            match (expected.seq, self.at_expected.take()) {
                (Some(s), None) if s > self.last_seq => {
                    let cut = rows_text(self.last_seq + 1, s);
                    let verb = if s == self.last_seq + 1 {
                        "was"
                    } else {
                        "were"
                    };
                    self.problem(
                        self.last_seq + 1,
                        format!(
                            "{cut} {verb} cut from the end: {} was row {s}",
                            expected.source
                        ),
                    );
                }
                (Some(s), Some(hash)) if hash.as_deref() != Some(expected.hash.as_str()) => {
                    self.problem(
                        s,
                        format!(
                            "row {s} is not the row {} names ({}): the chain up to it was rewritten",
                            expected.source, expected.hash
                        ),
                    );
                }
                (None, _) if !self.expected_found => {
                    self.problem(
                        self.last_seq + 1,
                        format!(
                            "{} ({}) is not in the ledger: rows were cut from its end or the chain was rewritten (a head with its row number, SEQ:HASH, tells which)",
                            expected.source, expected.hash
                        ),
                    );
                }
                _ => {}
            }
        }
        self.problems.sort_by_key(|p| p.seq);
        let head_hash = match (&self.prev, self.count) {
            (_, 0) => GENESIS.to_string(),
            (Some(p), _) => p.hash.clone().unwrap_or_default(),
            (None, _) => String::new(),
        };
        LedgerVerification {
            ok: self.problems.is_empty(),
            rows: self.count,
            problems: self.problems,
            head_seq: self.last_seq,
            head_hash,
            anchor_problem: None,
        }
    }
}
