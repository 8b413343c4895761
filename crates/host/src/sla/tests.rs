//! The SLA rules, checked against hand-computed ledgers.

use super::*;
use Cause::*;
use VmState::*;

/// Milliseconds of an RFC 3339 time.
fn t(text: &str) -> i64 {
    let d = humantime::parse_rfc3339(text)
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    i64::try_from(d.as_millis()).unwrap()
}

struct Ledger(Vec<Event>);

impl Ledger {
    fn row(&mut self, time: &str, vm: &str, to: VmState, cause: Cause) -> &mut Self {
        let seq = self.0.len() as i64 + 1;
        self.0.push(Event {
            seq,
            time_ms: t(time),
            time: time.into(),
            kind: EventKind::State,
            vm: Some(vm.into()),
            from: None,
            to: Some(to),
            cause,
            actor: "keel".into(),
            detail: String::new(),
            prev_hash: String::new(),
            hash: String::new(),
        });
        self
    }
}

fn tiers() -> Vec<CreditTier> {
    parse_tiers("99.95:10,99:25,95:100").unwrap()
}

fn by_cause(vmm: f64, host: f64, daemon: f64) -> BTreeMap<String, f64> {
    [
        ("vmm-crash".to_string(), vmm),
        ("oom-kill".to_string(), 0.0),
        ("host-boot".to_string(), host),
        ("daemon-restart".to_string(), daemon),
        ("maintenance".to_string(), 0.0),
    ]
    .into_iter()
    .collect()
}

/// The day 2030-01-01 (UTC): "web" runs from before it, "db" is defined at 06:00, "old"
/// is in an outage that began the evening before.
fn day() -> Ledger {
    let mut l = Ledger(Vec::new());
    l.row("2029-12-01T00:00:00Z", "web", Stopped, Operator)
        .row("2029-12-01T00:00:10Z", "web", Starting, Operator)
        .row("2029-12-01T00:00:12Z", "web", Running, Operator)
        .row("2029-12-01T00:00:00Z", "old", Stopped, Operator)
        .row("2029-12-01T00:01:00Z", "old", Running, Operator)
        // old: the VMM dies at 23:00 the day before; back at 00:20.
        .row("2029-12-31T23:00:00Z", "old", Crashed, VmmCrash)
        .row("2030-01-01T00:20:00Z", "old", Running, Operator)
        // web: 01:00:00 VMM crash, operator starts it at 01:10:00, up at 01:10:07.
        .row("2030-01-01T01:00:00Z", "web", Crashed, VmmCrash)
        .row("2030-01-01T01:10:00Z", "web", Starting, Operator)
        .row("2030-01-01T01:10:07Z", "web", Running, Operator)
        // db: defined at 06:00:00, running at 06:00:03.
        .row("2030-01-01T06:00:00Z", "db", Stopped, Operator)
        .row("2030-01-01T06:00:01Z", "db", Starting, Operator)
        .row("2030-01-01T06:00:03Z", "db", Running, Operator)
        // db: the guest reboots itself at 09:00:00, up at 09:00:04 (excluded).
        .row("2030-01-01T09:00:00Z", "db", Stopped, Guest)
        .row("2030-01-01T09:00:02Z", "db", Starting, Guest)
        .row("2030-01-01T09:00:04Z", "db", Running, Guest)
        // web: operator stop 12:00:00 (via the power button), running 13:00:00.
        .row("2030-01-01T12:00:00Z", "web", ShuttingDown, Operator)
        .row("2030-01-01T12:00:00Z", "web", Stopped, Guest)
        .row("2030-01-01T12:59:58Z", "web", Starting, Operator)
        .row("2030-01-01T13:00:00Z", "web", Running, Operator)
        // db: the daemon finds its VMM gone at 15:00:00, restarts it, the VMM crashes
        // while starting, the operator gives up at 15:01:00 (60 s daemon-restart), and
        // starts it at 15:30:00; running at 15:30:05.
        .row("2030-01-01T15:00:00Z", "db", Crashed, DaemonRestart)
        .row("2030-01-01T15:00:10Z", "db", Starting, DaemonRestart)
        .row("2030-01-01T15:00:12Z", "db", Crashed, VmmCrash)
        .row("2030-01-01T15:00:30Z", "db", Starting, Operator)
        .row("2030-01-01T15:00:40Z", "db", Crashed, VmmCrash)
        .row("2030-01-01T15:01:00Z", "db", Stopped, Operator)
        .row("2030-01-01T15:30:00Z", "db", Starting, Operator)
        .row("2030-01-01T15:30:05Z", "db", Running, Operator)
        // web: the host reboots at 20:00:00; the daemon autostarts it, running 20:05:00.
        .row("2030-01-01T20:00:00Z", "web", Stopped, HostBoot)
        .row("2030-01-01T20:04:55Z", "web", Starting, DaemonRestart)
        .row("2030-01-01T20:05:00Z", "web", Running, DaemonRestart)
        // db: VMM crash at 23:59:00, still down at the end of the window (60 s) and
        // after it.
        .row("2030-01-01T23:59:00Z", "db", Crashed, VmmCrash)
        // After the window: none of this counts.
        .row("2030-01-02T00:00:00Z", "web", Crashed, VmmCrash)
        .row("2030-01-02T00:00:00Z", "new", Stopped, Operator);
    l
}

#[test]
fn a_day_to_the_second() {
    let l = day();
    let (from, to) = (t("2030-01-01T00:00:00Z"), t("2030-01-02T00:00:00Z"));
    // Hand-computed anchor: 60 years, 15 of them leap (1972..=2028).
    assert_eq!(from, (60 * 365 + 15) * 86_400_000);
    let r = report(&l.0, &[], from, to, &tiers());
    assert_eq!(r.from, "2030-01-01T00:00:00.000Z");
    assert_eq!(r.to, "2030-01-02T00:00:00.000Z");
    assert_eq!(
        r.vms.iter().map(|v| v.vm.as_str()).collect::<Vec<_>>(),
        ["db", "old", "web"]
    );

    // web: 607 s vmm-crash (01:00:00-01:10:07) + 300 s host-boot (20:00-20:05);
    // 3600 s excluded (12:00-13:00).
    let web = &r.vms[2];
    assert_eq!(
        *web,
        VmAvailability {
            vm: "web".into(),
            window_seconds: 86_400.0,
            excluded_seconds: 3600.0,
            downtime_seconds: 907.0,
            downtime_by_cause: by_cause(607.0, 300.0, 0.0),
            outages: 2,
            availability_percent: 100.0 * (1.0 - 907.0 / 82_800.0),
            credit_percent: 25.0,
        }
    );
    assert!((web.availability_percent - 98.904_589_371).abs() < 1e-9);

    // db: excluded 00:00-06:00:03 (21603 s) + 09:00:00-09:00:04 (4 s) + 15:01:00-15:30:05
    // (1745 s) = 23352 s; down 15:00:00-15:01:00 daemon-restart (60 s), 23:59-24:00
    // vmm-crash (60 s).
    let db = &r.vms[0];
    assert_eq!(
        *db,
        VmAvailability {
            vm: "db".into(),
            window_seconds: 86_400.0,
            excluded_seconds: 23_352.0,
            downtime_seconds: 120.0,
            downtime_by_cause: by_cause(60.0, 0.0, 60.0),
            outages: 2,
            availability_percent: 100.0 * (1.0 - 120.0 / 63_048.0),
            credit_percent: 10.0,
        }
    );
    assert!((db.availability_percent - 99.809_668_824).abs() < 1e-9);

    // old: 00:00-00:20 of an outage that began the day before: down, not an outage here.
    let old = &r.vms[1];
    assert_eq!(
        (old.downtime_seconds, old.excluded_seconds, old.outages),
        (1200.0, 0.0, 0)
    );
    assert_eq!(old.downtime_by_cause, by_cause(1200.0, 0.0, 0.0));
    assert_eq!(old.availability_percent, 100.0 * (1.0 - 1200.0 / 86_400.0));
    assert_eq!(old.credit_percent, 25.0);

    // Only the VMs asked for; a VM with no rows is excluded throughout.
    let r = report(
        &l.0,
        &["web".into(), "ghost".into(), "new".into()],
        from,
        to,
        &tiers(),
    );
    assert_eq!(r.vms.len(), 3);
    assert_eq!(r.vms[0].downtime_seconds, 907.0);
    for v in &r.vms[1..] {
        assert_eq!(
            (v.excluded_seconds, v.availability_percent, v.credit_percent),
            (86_400.0, 100.0, 0.0)
        );
    }
}

#[test]
fn windows_are_clipped() {
    let l = day();
    // 01:05:00 to 12:30:00: web down 01:05:00-01:10:07 (307 s), excluded 12:00-12:30.
    let r = report(
        &l.0,
        &["web".into()],
        t("2030-01-01T01:05:00Z"),
        t("2030-01-01T12:30:00Z"),
        &[],
    );
    let web = &r.vms[0];
    assert_eq!(web.window_seconds, 41_100.0);
    assert_eq!(web.downtime_seconds, 307.0);
    assert_eq!(web.excluded_seconds, 1800.0);
    assert_eq!(web.outages, 0);
    assert_eq!(web.credit_percent, 0.0);
    // A row at exactly `from` counts as inside (its outage began in the window).
    let r = report(
        &l.0,
        &["web".into()],
        t("2030-01-01T01:00:00Z"),
        t("2030-01-01T01:00:07Z"),
        &[],
    );
    assert_eq!((r.vms[0].downtime_seconds, r.vms[0].outages), (7.0, 1));
    assert_eq!(r.vms[0].availability_percent, 0.0);
    // Empty and backwards windows.
    for (from, to) in [(5, 5), (10, 5)] {
        let r = report(&l.0, &["web".into()], from, to, &tiers());
        assert_eq!(r.vms[0].window_seconds, 0.0);
        assert_eq!(r.vms[0].availability_percent, 100.0);
    }
}

/// An operator's pause is excluded; Keel's own (a snapshot's) is down time, counted.
#[test]
fn pauses_by_the_operator_and_for_maintenance() {
    let from = t("2030-01-01T00:00:00Z");
    let at = |ms: i64| {
        humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis((from + ms) as u64),
        )
        .to_string()
    };
    let mut l = Ledger(Vec::new());
    l.row(&at(0), "a", Running, Operator)
        .row(&at(10_000), "a", Paused, Operator)
        .row(&at(20_000), "a", Running, Operator)
        .row(&at(30_000), "a", Paused, Maintenance)
        .row(&at(30_025), "a", Running, Maintenance);
    let r = report(&l.0, &[], from, from + 100_000, &[]);
    let a = &r.vms[0];
    assert_eq!(a.excluded_seconds, 10.0);
    assert_eq!(a.downtime_by_cause["maintenance"], 0.025);
    assert_eq!(a.outages, 1);
    assert_eq!(a.downtime_seconds, 0.025);
}

#[test]
fn outage_rules() {
    let from = t("2030-01-01T00:00:00Z");
    let to = from + 1_000_000;
    let at = |s: i64| {
        humantime::format_rfc3339(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis((from + s * 1000) as u64),
        )
        .to_string()
    };
    let mut l = Ledger(Vec::new());
    // Up at 0. Crash at 100 (vmm-crash); the daemon restarts it and the host reboots
    // meanwhile: still one vmm-crash outage until running at 300.
    l.row(&at(0), "a", Running, Operator)
        .row(&at(100), "a", Crashed, VmmCrash)
        .row(&at(150), "a", Stopped, HostBoot)
        .row(&at(200), "a", Starting, DaemonRestart)
        .row(&at(300), "a", ShuttingDown, Guest)
        // The guest crashes its own kernel at 400: excluded until 500.
        .row(&at(400), "a", Crashed, Guest)
        // Host boot from a planned-down state is not an outage.
        .row(&at(450), "a", Stopped, HostBoot)
        .row(&at(500), "a", Running, Operator)
        // An operator's kill from up is planned.
        .row(&at(600), "a", Crashed, Operator)
        .row(&at(700), "a", Running, Operator)
        // Daemon restart finds it gone at 800; the operator stops it at 850.
        .row(&at(800), "a", Stopped, DaemonRestart)
        .row(&at(850), "a", Stopped, Operator)
        .row(&at(900), "a", Running, Operator);
    let r = report(&l.0, &[], from, to, &[]);
    let a = &r.vms[0];
    assert_eq!(a.downtime_by_cause, by_cause(200.0, 0.0, 50.0));
    assert_eq!(a.excluded_seconds, 100.0 + 100.0 + 50.0);
    assert_eq!(a.outages, 2);
    assert_eq!(a.availability_percent, 100.0 * (1.0 - 250.0 / 750.0));
}

#[test]
fn across_2038_and_in_2100() {
    // 2038-01-19T03:14:08Z is 2^31 seconds.
    assert_eq!(t("2038-01-19T03:14:08Z"), (1i64 << 31) * 1000);
    let mut l = Ledger(Vec::new());
    l.row("2038-01-19T03:00:00Z", "web", Running, Operator)
        .row("2038-01-19T03:14:07Z", "web", Crashed, VmmCrash)
        .row("2038-01-19T03:14:09.500Z", "web", Running, Operator);
    let r = report(
        &l.0,
        &[],
        t("2038-01-19T03:00:00Z"),
        t("2038-01-19T04:00:00Z"),
        &tiers(),
    );
    assert_eq!(r.from, "2038-01-19T03:00:00.000Z");
    assert_eq!(r.vms[0].downtime_seconds, 2.5);
    assert_eq!(r.vms[0].outages, 1);
    assert_eq!(r.vms[0].availability_percent, 100.0 * (1.0 - 2.5 / 3600.0));
    assert_eq!(r.vms[0].credit_percent, 10.0);

    // 2100 is not a leap year: 28 February is followed by 1 March.
    let mut l = Ledger(Vec::new());
    l.row("2100-02-28T23:00:00Z", "web", Running, Operator)
        .row("2100-02-28T23:59:30Z", "web", Stopped, HostBoot)
        .row("2100-03-01T00:00:30Z", "web", Running, DaemonRestart);
    // Hand-computed: 2100-01-01 is 130 * 365 + 32 days after 1970; +59 days is 1 March.
    let march = ((130 * 365 + 32) + 59) * 86_400_000;
    assert_eq!(t("2100-03-01T00:00:00Z"), march);
    let r = report(&l.0, &[], march - 60_000, march + 60_000, &tiers());
    assert_eq!(r.from, "2100-02-28T23:59:00.000Z");
    assert_eq!(r.to, "2100-03-01T00:01:00.000Z");
    let web = &r.vms[0];
    assert_eq!(web.window_seconds, 120.0);
    assert_eq!(web.downtime_by_cause, by_cause(0.0, 60.0, 0.0));
    assert_eq!(web.availability_percent, 50.0);
    assert_eq!(web.credit_percent, 100.0);
}

#[test]
fn from_the_ledger() {
    let conn = Connection::open_in_memory().unwrap();
    conn.execute_batch(ledger::SCHEMA).unwrap();
    let tx = conn.unchecked_transaction().unwrap();
    for e in &day().0 {
        ledger::append(
            &tx,
            &ledger::NewEvent {
                kind: EventKind::State,
                vm: e.vm.clone(),
                from: e.from,
                to: e.to,
                cause: e.cause,
                actor: e.actor.clone(),
                detail: e.detail.clone(),
            },
            e.time_ms,
        )
        .unwrap();
    }
    ledger::append(
        &tx,
        &ledger::NewEvent {
            kind: EventKind::Audit,
            vm: Some("web".into()),
            from: None,
            to: None,
            cause: Operator,
            actor: "uid:0".into(),
            detail: "POST /v1/vms/web/stop".into(),
        },
        t("2030-01-01T12:00:00Z"),
    )
    .unwrap();
    tx.commit().unwrap();
    let (from, to) = (t("2030-01-01T00:00:00Z"), t("2030-01-02T00:00:00Z"));
    let r = report_from_ledger(&conn, &[], from, to, &tiers()).unwrap();
    assert!(r.ledger_verified);
    assert_eq!(r.ledger_head_hash, ledger::verify(&conn).unwrap().head_hash);
    assert_eq!(r.vms[2].downtime_seconds, 907.0);
    assert_eq!(r.vms, report(&day().0, &[], from, to, &tiers()).vms);

    // An edited cause shows as an unverified ledger.
    conn.execute_batch(
        "DROP TRIGGER ledger_no_update; UPDATE ledger SET cause = 'guest' WHERE seq = 8;",
    )
    .unwrap();
    let r = report_from_ledger(&conn, &[], from, to, &tiers()).unwrap();
    assert!(!r.ledger_verified);
    assert_eq!(r.vms[2].downtime_seconds, 300.0);
}

#[test]
fn tiers_parse_with_clear_errors() {
    assert_eq!(
        parse_tiers(" 99.95:10, 99:25 ,95:100").unwrap(),
        [
            CreditTier {
                below_percent: 99.95,
                credit_percent: 10.0
            },
            CreditTier {
                below_percent: 99.0,
                credit_percent: 25.0
            },
            CreditTier {
                below_percent: 95.0,
                credit_percent: 100.0
            },
        ]
    );
    assert!(parse_tiers("").unwrap().is_empty());
    for (bad, says) in [
        ("99.95", "tier 1 '99.95': there is no ':'"),
        (
            "99:10,abc:20",
            "tier 2 'abc:20': availability 'abc' is not a number",
        ),
        ("99:10,98:x", "credit 'x' is not a number"),
        ("101:10", "availability 101 is not a percentage"),
        ("99:-5", "credit -5 is not a percentage"),
        ("99:10,99:20", "availability 99 is given twice"),
        ("99:10,", "tier 2 '': there is no ':'"),
        ("NaN:10", "not a percentage"),
    ] {
        let err = parse_tiers(bad).unwrap_err().to_string();
        assert!(err.contains(says), "{bad}: {err}");
        assert!(err.contains("like 99.95:10,99:25,95:100"), "{err}");
    }
    // Credits: the largest among the tiers the availability is below.
    let tiers = tiers();
    assert_eq!(credit(&tiers, 100.0), 0.0);
    assert_eq!(credit(&tiers, 99.95), 0.0);
    assert_eq!(credit(&tiers, 99.949), 10.0);
    assert_eq!(credit(&tiers, 98.0), 25.0);
    assert_eq!(credit(&tiers, 0.0), 100.0);
    assert_eq!(credit(&[], 0.0), 0.0);
}

#[test]
fn csv() {
    let l = day();
    let mut r = report(
        &l.0,
        &["web".into()],
        t("2030-01-01T00:00:00Z"),
        t("2030-01-02T00:00:00Z"),
        &tiers(),
    );
    let csv = to_csv(&r);
    let lines: Vec<&str> = csv.split_terminator("\r\n").collect();
    assert_eq!(
        lines[0],
        "vm,window_seconds,excluded_seconds,downtime_seconds,availability_percent,credit_percent,outages,downtime_vmm-crash,downtime_oom-kill,downtime_host-boot,downtime_daemon-restart,downtime_maintenance"
    );
    assert_eq!(
        lines[1],
        format!(
            "web,86400,3600,907,{},25,2,607,0,300,0,0",
            100.0 * (1.0 - 907.0 / 82_800.0)
        )
    );
    assert_eq!(lines.len(), 2);
    assert!(csv.ends_with("\r\n"));
    r.vms[0].vm = "we,b \"x\"".into();
    assert!(to_csv(&r).contains("\r\n\"we,b \"\"x\"\"\",86400,"));
}
