//! KVM's log of the pages a guest writes, the groundwork of a live migration's pre-copy,
//! checked against the probe writing a known number of pages a millisecond: the count
//! follows the rate, a still guest writes next to nothing, and a reading with the log off is
//! refused.

mod common;

use std::time::{Duration, Instant};

use api::control::{files, Response};
use common::vmm::*;
use common::*;

fn dirty(control: &mut Control) -> u64 {
    match control.ask(br#"{"request":"dirty-pages"}"#) {
        Response::DirtyPages { pages, .. } => pages,
        other => panic!("dirty-pages answered {other:?}"),
    }
}

/// Pages written over about 400 ms by a probe rewriting `rate` pages a millisecond.
fn written(rate: u64) -> (u64, f64) {
    let mut spec = spec(
        &format!("dirty-{rate}"),
        &format!("probe.churn=8M probe.churn_rate={rate} probe.churn_report_ms=1000 probe.churn_gap_us=20000"),
    );
    spec["memory_mib"] = 128.into();
    let dir = RunDir::new(&format!("dirty-{rate}"), &spec);
    let mut child = KillOnDrop(start(&dir));
    let mut control = Control::connect(&dir);
    wait_until("the churn", &dir, || {
        dir.read(files::CONSOLE_LOG).contains("PROBE churn start")
    });
    assert!(matches!(
        control.ask(br#"{"request":"dirty-pages"}"#),
        Response::Error { .. }
    ));
    assert_eq!(
        control.ask(br#"{"request":"dirty-log","on":true}"#),
        Response::Done
    );
    dirty(&mut control);
    let from = Instant::now();
    std::thread::sleep(Duration::from_millis(400));
    let pages = dirty(&mut control);
    let ms = from.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(
        control.ask(br#"{"request":"dirty-log","on":false}"#),
        Response::Done
    );
    assert_eq!(control.ask(br#"{"request":"stop"}"#), Response::Done);
    wait_exit(&mut child, &dir);
    (pages, ms)
}

#[test]
fn the_dirty_page_log_counts_what_the_guest_writes() {
    if !kvm_available("the_dirty_page_log_counts_what_the_guest_writes") {
        return;
    }
    let (pages, ms) = written(2);
    let expected = 2.0 * ms;
    eprintln!("rate 2/ms over {ms:.0} ms: {pages} dirty pages (expected about {expected:.0})");
    // Its generation table, stack and printing add a few pages; a loaded host slows it.
    assert!(
        (0.5 * expected..=1.2 * expected + 64.0).contains(&(pages as f64)),
        "{pages} dirty pages for about {expected:.0} written"
    );
    let (still, _) = written(0);
    assert!(still <= 64, "a guest that writes no page dirtied {still}");
}
