//! `GET /metrics` from outside, with a probe VM running: every line is in the exposition
//! format, and the VM's state, CPU time, memory and starts, the host's counts and the API's
//! answers are there with values that match what happened.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use common::daemon::Daemon;
use common::kvm_available;

fn get(daemon: &Daemon, path: &str) -> String {
    let mut stream = UnixStream::connect(daemon.socket()).unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: keel\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

/// The value of the sample `name{labels}`, if the text has it.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_describe_the_vms_the_host_and_the_api() {
    if !kvm_available("metrics_describe_the_vms_the_host_and_the_api") {
        return;
    }
    let daemon = Daemon::start("metrics");
    daemon.create_probe_vm("m", &["--start"]);
    daemon.ok(&["vm", "list"]);
    let answer = get(&daemon, "/metrics");
    let (head, text) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    // The exposition format: comments, samples `name{labels} value`, and the end marker.
    assert_eq!(text.trim_end().lines().last(), Some("# EOF"), "{text}");
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        assert!(value.parse::<f64>().is_ok(), "not a value: {line}");
        let name_end = series.find('{').unwrap_or(series.len());
        assert!(
            series[..name_end]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "not a metric name: {line}"
        );
        assert!(series.starts_with("keel_"), "{line}");
    }
    eprintln!("{text}");
    assert_eq!(
        sample(text, r#"keel_vm_state{vm="m",state="running"}"#),
        Some(1.0)
    );
    assert_eq!(sample(text, r#"keel_vm_starts_total{vm="m"}"#), Some(1.0));
    assert_eq!(sample(text, r#"keel_host_vms{state="running"}"#), Some(1.0));
    assert_eq!(sample(text, "keel_host_open_incidents"), Some(0.0));
    assert!(
        sample(text, r#"keel_vm_vcpu_seconds_total{vm="m"}"#).is_some(),
        "{text}"
    );
    assert!(
        sample(text, r#"keel_vm_vmm_cpu_seconds_total{vm="m"}"#).is_some_and(|s| s > 0.0),
        "{text}"
    );
    let mib = daemon.json(&["vm", "show", "m"])["spec"]["memory_mib"]
        .as_f64()
        .unwrap();
    assert_eq!(
        sample(text, r#"keel_vm_configured_memory_bytes{vm="m"}"#),
        Some(mib * 1024.0 * 1024.0)
    );
    if daemon.json(&["host"])["checks"]
        .to_string()
        .contains("cgroup")
    {
        let used = sample(text, r#"keel_vm_memory_bytes{vm="m"}"#).unwrap();
        let limit = sample(text, r#"keel_vm_memory_limit_bytes{vm="m"}"#).unwrap();
        assert!(used > 0.0 && used < limit, "{used} of {limit}");
    }
    assert!(sample(text, "keel_ledger_rows").is_some_and(|n| n >= 4.0));
    assert!(sample(text, r#"keel_api_requests_total{status="200"}"#).is_some_and(|n| n >= 1.0));
    // A refused request is counted too.
    let before = sample(text, r#"keel_api_requests_total{status="404"}"#).unwrap_or(0.0);
    get(&daemon, "/no/such/path");
    let again = get(&daemon, "/metrics");
    assert_eq!(
        sample(&again, r#"keel_api_requests_total{status="404"}"#),
        Some(before + 1.0)
    );
    daemon.ok(&["vm", "stop", "m"]);
}
