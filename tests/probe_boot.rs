//! Boots the probe guest under `keel run` in both boot formats, with several vCPU counts
//! and memory sizes, and checks each line of its report against what was asked.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// Conventional memory ends at 0x9fc00 and RAM resumes at 1 MiB: this much of the asked
/// memory is not usable RAM.
const LEGACY_HOLE: u64 = 0x10_0000 - 0x9_fc00;
const GIB: u64 = 1 << 30;

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap_or_else(|_| panic!("not hex: {s}"))
}

/// Checks the whole report of a probe that was asked for `cpus` vCPUs and `mib` MiB.
fn check_report(run: &Run, boot: &str, cpus: u32, mib: u64, cmdline: &str) {
    let ctx = run.context();
    let p = run.probe();
    let one = |key: &str| -> String {
        let v = p
            .get(key)
            .unwrap_or_else(|| panic!("no PROBE {key}\n{ctx}"));
        assert_eq!(v.len(), 1, "PROBE {key} repeated\n{ctx}");
        v[0].clone()
    };
    assert_eq!(p.get("start").map(Vec::len), Some(1), "{ctx}");
    assert_eq!(one("boot"), boot, "{ctx}");
    assert_eq!(one("cmdline"), cmdline, "{ctx}");

    // Memory: the usable RAM is what was asked, less the legacy hole; RAM starts at 0 and at
    // 1 MiB; past 3 GiB the rest sits above 4 GiB.
    let mem = mib << 20;
    assert_eq!(
        one("ram_bytes").parse::<u64>().unwrap(),
        mem - LEGACY_HOLE,
        "{ctx}"
    );
    let entries: Vec<(u64, u64, u32)> = p["e820"]
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (hex(f[0]), hex(f[1]), f[2].parse().unwrap())
        })
        .collect();
    assert_eq!(
        one("e820_entries").parse::<usize>().unwrap(),
        entries.len(),
        "{ctx}"
    );
    let ram: Vec<(u64, u64)> = entries
        .iter()
        .filter(|e| e.2 == 1)
        .map(|e| (e.0, e.0 + e.1))
        .collect();
    assert_eq!(ram[0], (0, 0x9_fc00), "{ctx}");
    let below_4g = mem.min(3 * GIB);
    assert_eq!(ram[1], (0x10_0000, below_4g), "{ctx}");
    if mem > 3 * GIB {
        assert_eq!(ram[2], (4 * GIB, 4 * GIB + mem - 3 * GIB), "{ctx}");
    } else {
        assert_eq!(ram.len(), 2, "{ctx}");
    }
    for (start, end) in &ram {
        assert!(
            *end <= 3 * GIB || *start >= 4 * GIB,
            "RAM over the 32-bit gap\n{ctx}"
        );
    }

    // ACPI: the RSDP where the boot protocol says, every table's checksum valid.
    let rsdp = one("acpi_rsdp");
    let source = if boot == "pvh" {
        "start_info"
    } else {
        "boot_params"
    };
    assert_eq!(rsdp, format!("0xe0000 {source} checksum ok"), "{ctx}");
    let tables: Vec<&str> = p["acpi_table"]
        .iter()
        .map(|t| t.split(' ').next().unwrap())
        .collect();
    for sig in ["XSDT", "FACP", "APIC", "DSDT"] {
        assert!(tables.contains(&sig), "no {sig} table\n{ctx}");
    }
    assert!(
        p["acpi_table"].iter().all(|t| t.ends_with("checksum ok")),
        "{ctx}"
    );
    assert_eq!(one("acpi_ok"), "yes", "{ctx}");

    // CPUs: the MADT lists each, and each came up.
    assert_eq!(one("cpus"), cpus.to_string(), "{ctx}");
    let lapics: Vec<String> = (0..cpus).map(|i| i.to_string()).collect();
    assert_eq!(p["madt_lapic"], lapics, "{ctx}");
    let mut aps: Vec<String> = p.get("ap").cloned().unwrap_or_default();
    aps.sort_by_key(|a| a.split(' ').next().and_then(|n| n.parse::<u32>().ok()));
    let expected: Vec<String> = (1..cpus).map(|i| format!("{i} up")).collect();
    assert_eq!(aps, expected, "{ctx}");
    assert_eq!(one("cpus_up"), cpus.to_string(), "{ctx}");
    assert_eq!(one("ready"), "", "{ctx}");
}

fn poweroff_case(kernel: &Path, boot: &str, cpus: u32, mib: u64) {
    let cmdline = format!("probe.poweroff keel.test={cpus}x{mib}");
    let run = run_probe(kernel, cpus, mib, &cmdline);
    check_report(&run, boot, cpus, mib, &cmdline);
    assert_eq!(run.probe()["poweroff"], vec![""], "{}", run.context());
    assert!(
        !run.killed,
        "the VM did not end by itself\n{}",
        run.context()
    );
    assert_eq!(run.code(), Some(0), "{}", run.context());
    assert!(
        run.stderr.contains("keel: guest powered off"),
        "{}",
        run.context()
    );
}

#[test]
fn pvh_elf_reports_what_was_asked() {
    if !kvm_available("pvh_elf_reports_what_was_asked") {
        return;
    }
    for (cpus, mib) in [(1, 16), (2, 256), (4, 3072), (4, 4608)] {
        poweroff_case(&probe_elf(), "pvh", cpus, mib);
    }
}

#[test]
fn bzimage_reports_what_was_asked() {
    if !kvm_available("bzimage_reports_what_was_asked") {
        return;
    }
    for (cpus, mib) in [(1, 4608), (2, 16), (4, 512)] {
        poweroff_case(&probe_bzimage(), "linux64", cpus, mib);
    }
}

#[test]
fn up_to_32_vcpus_come_up() {
    if !kvm_available("up_to_32_vcpus_come_up") {
        return;
    }
    poweroff_case(&probe_elf(), "pvh", 32, 128);
}

#[test]
fn reboot_ends_the_vm_with_success() {
    if !kvm_available("reboot_ends_the_vm_with_success") {
        return;
    }
    for kernel in [probe_elf(), probe_bzimage()] {
        let run = run_probe(&kernel, 2, 64, "probe.reboot");
        assert_eq!(run.probe()["reboot"], vec![""], "{}", run.context());
        assert_eq!(run.code(), Some(0), "{}", run.context());
        assert!(
            run.stderr.contains("keel: guest rebooted"),
            "{}",
            run.context()
        );
    }
}

#[test]
fn idle_guest_keeps_running_without_burning_cpu() {
    if !kvm_available("idle_guest_keeps_running_without_burning_cpu") {
        return;
    }
    let mut child = std::process::Command::new(KEEL)
        .args([
            "run",
            "--kernel",
            probe_elf().to_str().unwrap(),
            "--cpus",
            "2",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let cpu_ticks = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_ticks();
    std::thread::sleep(Duration::from_secs(2));
    let after = cpu_ticks();
    let still_running = child.try_wait().unwrap().is_none();
    child.kill().unwrap();
    let _ = child.wait();
    assert!(still_running, "an idle guest's VM ended on its own");
    // A vCPU spinning instead of halting would burn ~200 ticks (100 Hz) in 2 s; an idle one
    // burns close to none. The bound is loose on purpose: this checks HLT, not speed.
    assert!(
        after - before < 100,
        "idle VM used {} CPU ticks in 2 s: a vCPU is spinning",
        after - before
    );
}

#[test]
fn ctrl_a_x_on_the_console_quits() {
    if !kvm_available("ctrl_a_x_on_the_console_quits") {
        return;
    }
    let cmd = keel_run(&["--kernel", probe_elf().to_str().unwrap()]);
    // Input goes through a pipe: the escape works on any stdin, not only a terminal.
    let run = common::run_with(
        cmd,
        Some(b"hello\x01x".to_vec()),
        Duration::from_secs(30),
        None,
    );
    assert!(
        !run.killed,
        "Ctrl-A x did not end the VM\n{}",
        run.context()
    );
    assert_eq!(run.code(), Some(0), "{}", run.context());
    assert!(
        run.stderr.contains("quit from the console"),
        "{}",
        run.context()
    );
}

#[test]
fn triple_fault_is_reported_with_vcpu_rip_and_bytes() {
    if !kvm_available("triple_fault_is_reported_with_vcpu_rip_and_bytes") {
        return;
    }
    let run = run_probe(&probe_elf(), 1, 64, "probe.triplefault");
    assert_eq!(run.code(), Some(3), "{}", run.context());
    assert!(
        !run.killed,
        "a crashed guest must end the VM\n{}",
        run.context()
    );
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains("guest crashed"))
        .unwrap_or_else(|| panic!("{}", run.context()));
    assert!(line.contains("triple fault on vCPU 0 at RIP 0x"), "{line}");
    // The probe faults with ud2 (0f 0b) after loading an empty IDT.
    assert!(line.contains("(instruction bytes: 0f 0b"), "{line}");
}

#[test]
fn emulation_failure_is_reported_on_a_pvm_host() {
    if !kvm_available("emulation_failure_is_reported_on_a_pvm_host") {
        return;
    }
    if !pvm_host() {
        eprintln!("SKIPPED emulation_failure_is_reported_on_a_pvm_host: only a PVM host fails to emulate the probe's pxor");
        return;
    }
    let run = run_probe(&probe_elf(), 1, 64, "probe.badinsn");
    assert_eq!(run.code(), Some(3), "{}", run.context());
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains("guest crashed"))
        .unwrap_or_else(|| panic!("{}", run.context()));
    assert!(line.contains("KVM emulation failure"), "{line}");
    assert!(line.contains("on vCPU 0 at RIP 0x"), "{line}");
    // pxor %xmm0,%xmm0
    assert!(line.contains("(instruction bytes: 66 0f ef c0"), "{line}");
    assert!(
        run.stderr.contains("PVM module"),
        "the PVM note is printed\n{}",
        run.context()
    );
}

#[test]
fn power_button_powers_off_a_guest_that_honours_it() {
    if !kvm_available("power_button_powers_off_a_guest_that_honours_it") {
        return;
    }
    for kernel in [probe_elf(), probe_bzimage()] {
        let cmd = keel_run(&[
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "probe.power_button",
        ]);
        // Typed bytes reach the guest's serial port (the waiting probe reports each one);
        // Ctrl-A p on the console presses the ACPI power button (the GED's event).
        let run = common::run_with(
            cmd,
            Some(b"hi\x01p".to_vec()),
            Duration::from_secs(30),
            None,
        );
        let ctx = run.context();
        assert!(!run.killed, "the guest did not power off\n{ctx}");
        let lines = &run.probe()["power_button"];
        assert!(lines[0].starts_with("waiting irq 23"), "{ctx}");
        assert_eq!(lines.last().map(String::as_str), Some("pressed"), "{ctx}");
        assert_eq!(run.probe()["serial_in"], ["0x68", "0x69"], "{ctx}");
        assert!(
            run.stderr.contains("keel: power button pressed (Ctrl-A p)"),
            "{ctx}"
        );
        assert!(run.stderr.contains("keel: guest powered off"), "{ctx}");
        assert_eq!(run.code(), Some(0), "{ctx}");
    }
}
