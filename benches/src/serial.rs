//! Reading a VMM's serial console as it arrives: whole lines out of partial reads, and Keel's
//! start-up trace line.

/// Longest partial line kept; a guest printing without newlines cannot grow it further.
const MAX_LINE_BYTES: usize = 4096;

/// Splits a byte stream into lines, whatever the size of the pieces it comes in.
#[derive(Debug, Default)]
pub struct LineScanner {
    partial: Vec<u8>,
}

impl LineScanner {
    /// Feeds the next piece of output; returns the lines it completed, without the line end
    /// (`\n` or `\r\n`). Invalid UTF-8 is replaced, not an error.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for &byte in chunk {
            if byte == b'\n' {
                if self.partial.last() == Some(&b'\r') {
                    self.partial.pop();
                }
                lines.push(String::from_utf8_lossy(&self.partial).into_owned());
                self.partial.clear();
            } else if self.partial.len() < MAX_LINE_BYTES {
                self.partial.push(byte);
            }
        }
        lines
    }
}

/// The prefix of the line `keel run` prints to stderr with `KEEL_TRACE_STARTUP=1`:
/// `keel: startup: <N> us of CPU time before the first vCPU entry`.
const STARTUP_TRACE_PREFIX: &str = "keel: startup: ";

/// Keel's CPU time before the first vCPU entry, in microseconds, from its stderr.
pub fn parse_startup_trace(stderr: &str) -> Option<u64> {
    stderr.lines().find_map(|line| {
        let rest = line.trim_end().strip_prefix(STARTUP_TRACE_PREFIX)?;
        let (number, unit) = rest.split_once(' ')?;
        if !unit.starts_with("us ") {
            return None;
        }
        number.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_split_across_reads_is_found_once_complete() {
        let mut s = LineScanner::default();
        assert!(s.feed(b"PRO").is_empty());
        assert!(s.feed(b"BE st").is_empty());
        assert_eq!(s.feed(b"art\nPROBE bo"), vec!["PROBE start"]);
        assert_eq!(s.feed(b"ot pvh\n"), vec!["PROBE boot pvh"]);
    }

    #[test]
    fn byte_at_a_time_and_many_lines_in_one_read_give_the_same_lines() {
        let text = b"PROBE start\r\nPROBE boot pvh\n\nPROBE ready\n";
        let mut whole = LineScanner::default();
        let all_at_once = whole.feed(text);
        let mut bytes = LineScanner::default();
        let one_by_one: Vec<String> = text.iter().flat_map(|b| bytes.feed(&[*b])).collect();
        assert_eq!(
            all_at_once,
            vec!["PROBE start", "PROBE boot pvh", "", "PROBE ready"]
        );
        assert_eq!(one_by_one, all_at_once);
    }

    #[test]
    fn a_crlf_split_between_reads_is_still_one_line_end() {
        let mut s = LineScanner::default();
        assert!(s.feed(b"PROBE ready\r").is_empty());
        assert_eq!(s.feed(b"\n"), vec!["PROBE ready"]);
    }

    #[test]
    fn an_endless_line_is_capped() {
        let mut s = LineScanner::default();
        assert!(s.feed(&vec![b'x'; 3 * MAX_LINE_BYTES]).is_empty());
        assert_eq!(s.feed(b"\n")[0].len(), MAX_LINE_BYTES);
    }

    #[test]
    fn startup_trace_is_read_among_other_messages() {
        let stderr = "keel: note: this host's KVM is the software PVM module\n\
                      keel: startup: 2483 us of CPU time before the first vCPU entry\n\
                      keel: guest powered off\n";
        assert_eq!(parse_startup_trace(stderr), Some(2483));
    }

    #[test]
    fn startup_trace_absent_or_malformed_is_none() {
        assert_eq!(parse_startup_trace("keel: guest powered off\n"), None);
        assert_eq!(parse_startup_trace("keel: startup: many us of CPU\n"), None);
        assert_eq!(parse_startup_trace("keel: startup: 12 ms of CPU\n"), None);
    }
}
