//! On a real terminal (a pty made by `script`), `keel run` puts the terminal in raw mode while
//! the VM runs and restores it on every way out: the guest powering off and SIGTERM.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn terminal_is_raw_while_running_and_restored_after() {
    if !kvm_available("terminal_is_raw_while_running_and_restored_after") {
        return;
    }
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!(
            "SKIPPED terminal_is_raw_while_running_and_restored_after: needs script(1) for a pty"
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("keel-console-tty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let probe = probe_elf();
    let d = dir.display();
    let p = probe.display();
    // Inside the pty: settings before, after a power-off, during an idle run, after SIGTERM.
    let inner = format!(
        "stty -g > {d}/before; \
         {KEEL} run --kernel {p} --cmdline probe.poweroff > /dev/null 2>&1; \
         stty -g > {d}/after_poweroff; \
         {KEEL} run --kernel {p} < /dev/tty > /dev/null 2>&1 & \
         sleep 1; stty -a > {d}/during; kill -TERM $!; wait $!; echo $? > {d}/term_status; \
         stty -g > {d}/after_sigterm"
    );
    let mut cmd = Command::new("script");
    cmd.args(["-qec", &inner, "/dev/null"]);
    let run = run_with(cmd, None, Duration::from_secs(60), None);
    assert!(!run.killed, "{}", run.context());
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", run.context()))
    };
    let before = read("before");
    assert_eq!(
        read("after_poweroff"),
        before,
        "terminal not restored after power-off"
    );
    let during = read("during");
    for flag in ["-icanon", "-echo", "-isig"] {
        assert!(
            during.split_whitespace().any(|w| w == flag),
            "terminal not raw while running ({flag} missing): {during}"
        );
    }
    assert_eq!(
        read("term_status").trim(),
        "143",
        "keel ends with 128+SIGTERM"
    );
    assert_eq!(
        read("after_sigterm"),
        before,
        "terminal not restored after SIGTERM"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
