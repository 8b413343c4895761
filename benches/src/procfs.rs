//! A process's memory use from `/proc/PID/status`.

use anyhow::{anyhow, Context, Result};

/// Resident memory of a process, in KiB (the kernel's "kB").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStatus {
    /// All resident pages (`VmRSS` = `RssAnon` + `RssFile` + `RssShmem`).
    pub vm_rss_kib: u64,
    /// Resident anonymous pages: heap, stacks, touched guest RAM.
    pub rss_anon_kib: u64,
    /// Resident file-backed pages: the binary and its shared libraries.
    pub rss_file_kib: u64,
    /// Resident shared-memory pages.
    pub rss_shmem_kib: u64,
    /// Peak resident set (`VmHWM`).
    pub vm_hwm_kib: u64,
}

/// The value of a `Name:   1234 kB` line, in KiB.
fn field_kib(status: &str, name: &str) -> Result<u64> {
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .ok_or_else(|| anyhow!("no {name} line in /proc/PID/status"))?;
    let value = line.trim();
    let number = value
        .strip_suffix("kB")
        .ok_or_else(|| anyhow!("{name} is {value:?}, not a size in kB"))?;
    number
        .trim()
        .parse()
        .with_context(|| format!("{name} is {value:?}, not a size in kB"))
}

/// Parses the text of `/proc/PID/status`.
pub fn parse_status(status: &str) -> Result<MemoryStatus> {
    Ok(MemoryStatus {
        vm_rss_kib: field_kib(status, "VmRSS")?,
        rss_anon_kib: field_kib(status, "RssAnon")?,
        rss_file_kib: field_kib(status, "RssFile")?,
        rss_shmem_kib: field_kib(status, "RssShmem")?,
        vm_hwm_kib: field_kib(status, "VmHWM")?,
    })
}

/// Reads and parses `/proc/<pid>/status`.
pub fn read_status(pid: u32) -> Result<MemoryStatus> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_status(&text).with_context(|| format!("parsing {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tkeel\nUmask:\t0022\nState:\tS (sleeping)\n\
        VmPeak:\t  270000 kB\nVmSize:\t  269996 kB\nVmLck:\t       0 kB\n\
        VmHWM:\t    2148 kB\nVmRSS:\t    2140 kB\nRssAnon:\t     388 kB\n\
        RssFile:\t    1752 kB\nRssShmem:\t       0 kB\nVmData:\t  263000 kB\n\
        Threads:\t3\n";

    #[test]
    fn reads_the_resident_set_fields() {
        assert_eq!(
            parse_status(STATUS).expect("valid status"),
            MemoryStatus {
                vm_rss_kib: 2140,
                rss_anon_kib: 388,
                rss_file_kib: 1752,
                rss_shmem_kib: 0,
                vm_hwm_kib: 2148,
            }
        );
    }

    #[test]
    fn a_missing_field_is_named_in_the_error() {
        let without_anon = STATUS.replace("RssAnon", "Other");
        let err = parse_status(&without_anon).expect_err("RssAnon missing");
        assert!(err.to_string().contains("RssAnon"), "{err}");
    }

    #[test]
    fn a_field_name_must_match_whole() {
        // "VmRSSx" must not be taken for "VmRSS".
        let text = "VmRSSx:\t1 kB\nVmRSS:\t2 kB\n";
        assert_eq!(field_kib(text, "VmRSS").expect("VmRSS"), 2);
    }

    #[test]
    fn a_value_that_is_not_kb_is_an_error() {
        assert!(field_kib("VmRSS:\t12 MB\n", "VmRSS").is_err());
        assert!(field_kib("VmRSS:\tlots kB\n", "VmRSS").is_err());
    }
}
