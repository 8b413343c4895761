//! The probe's benchmark lines (guest/probe/README.md, "Benchmarks (ring 3)"):
//!
//! ```text
//! PROBE bench_<name> start
//! PROBE bench_<name> done <ops> <bytes>
//! PROBE bench_<name> kicks <n>
//! PROBE bench_<name> error <what...>
//! PROBE bench error memory
//! PROBE fault <vector> error <code> rip <rip>
//! ```

/// What one serial line says about a benchmark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The ring-3 loop of benchmark `name` begins.
    Start(String),
    /// ... and ended after `ops` operations moving `bytes` bytes.
    Done { name: String, ops: u64, bytes: u64 },
    /// QueueNotify writes during the loop.
    Kicks { name: String, kicks: u64 },
    /// The benchmark (or the probe) failed; the whole line.
    Error(String),
    /// The probe idles (`cli; hlt`) after its report: the run is over.
    Idle,
}

/// The event of a line, if it is one of the lines above.
pub fn parse(line: &str) -> Option<Event> {
    let rest = line.trim_end().strip_prefix("PROBE ")?;
    if rest == "idle" {
        return Some(Event::Idle);
    }
    if rest.starts_with("fault ") || rest.starts_with("bench error") {
        return Some(Event::Error(line.trim_end().to_string()));
    }
    let rest = rest.strip_prefix("bench_")?;
    let mut words = rest.split_whitespace();
    let name = words.next()?.to_string();
    match (words.next()?, words.next(), words.next(), words.next()) {
        ("start", None, ..) => Some(Event::Start(name)),
        ("done", Some(ops), Some(bytes), None) => Some(Event::Done {
            name,
            ops: ops.parse().ok()?,
            bytes: bytes.parse().ok()?,
        }),
        ("kicks", Some(kicks), None, _) => Some(Event::Kicks {
            name,
            kicks: kicks.parse().ok()?,
        }),
        ("error", ..) => Some(Event::Error(line.trim_end().to_string())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_done_and_kicks_are_read() {
        assert_eq!(
            parse("PROBE bench_blk_read start"),
            Some(Event::Start("blk_read".into()))
        );
        assert_eq!(
            parse("PROBE bench_blk_read_qd done 50000 204800000\r"),
            Some(Event::Done {
                name: "blk_read_qd".into(),
                ops: 50_000,
                bytes: 204_800_000
            })
        );
        assert_eq!(
            parse("PROBE bench_net_tx kicks 7"),
            Some(Event::Kicks {
                name: "net_tx".into(),
                kicks: 7
            })
        );
        assert_eq!(parse("PROBE idle"), Some(Event::Idle));
    }

    #[test]
    fn errors_keep_the_whole_line() {
        for line in [
            "PROBE bench_vsock error refused 0 after 0",
            "PROBE bench_blk_read error fault 14 error 0x5 rip 0x1049d4 addr 0x40000000",
            "PROBE bench error memory",
            "PROBE fault 13 error 0x0 rip 0x104000",
        ] {
            assert_eq!(parse(line), Some(Event::Error(line.into())), "{line}");
        }
    }

    #[test]
    fn other_and_malformed_lines_are_none() {
        for line in [
            "PROBE ready",
            "PROBE poweroff",
            "PROBE blk0 capacity 1048576 features 0x100006200",
            "PROBE bench_blk_read",
            "PROBE bench_blk_read done 12",
            "PROBE bench_blk_read done twelve 4096",
            "PROBE bench_blk_read done 1 2 3",
            "PROBE bench_blk_read start now",
            "bench_blk_read start",
        ] {
            assert_eq!(parse(line), None, "{line}");
        }
    }
}
