//! `GET /metrics` from outside, with a probe VM running: every line is in the exposition
//! format, and the VM's state, CPU time, memory and starts, the host's counts and the API's
//! answers are there with values that match what happened.

mod common;

use common::daemon::Daemon;
use common::kvm_available;

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
    // A VM that writes 8 records, each flushed, to its disk, then waits.
    std::fs::create_dir_all(daemon.images()).unwrap();
    let disk = daemon.images().join("m.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let kernel = common::probe_elf();
    daemon.ok(&[
        "vm",
        "create",
        "m",
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        "probe.blk_records=8 probe.blk_nodiscard probe.power_button",
        "--memory",
        "64",
        "--disk",
        &format!("path={}", disk.display()),
        "--start",
    ]);
    let log = daemon.json(&["vm", "show", "m"])["console_log"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("PROBE acked 7")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the probe did not write its records"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    daemon.ok(&["vm", "list"]);
    let answer = daemon.http_get("/metrics");
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
    // The disk's counters come from inside the VMM: 8 records of 512 bytes, each flushed.
    let disk_series = |name: &str| {
        format!(
            r#"keel_vm_disk_{name}_total{{vm="m",disk="0",path="{}"}}"#,
            disk.display()
        )
    };
    assert!(
        sample(text, &disk_series("write_requests")).is_some_and(|n| n >= 8.0),
        "{text}"
    );
    assert!(sample(text, &disk_series("write_bytes")).is_some_and(|n| n >= 8.0 * 512.0));
    assert!(sample(text, &disk_series("flush_requests")).is_some_and(|n| n >= 8.0));
    assert_eq!(sample(text, &disk_series("failed_requests")), Some(0.0));
    assert!(sample(text, r#"keel_api_requests_total{status="200"}"#).is_some_and(|n| n >= 1.0));
    // A refused request is counted too.
    let before = sample(text, r#"keel_api_requests_total{status="404"}"#).unwrap_or(0.0);
    daemon.http_get("/no/such/path");
    let again = daemon.http_get("/metrics");
    assert_eq!(
        sample(&again, r#"keel_api_requests_total{status="404"}"#),
        Some(before + 1.0)
    );
    daemon.ok(&["vm", "stop", "m"]);
}
