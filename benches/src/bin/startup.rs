//! `startup`: Keel's start-up time and idle memory against QEMU, on the probe guest, in the
//! same run and interleaved, so that a noisy host affects both alike.
//!
//! cargo run --release -p keel-benches --bin startup -- [--runs 20] [--probe-dir DIR]
//!     [--keel PATH] [--qemu PATH] [--json]

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use keel_benches::procfs::MemoryStatus;
use keel_benches::report::{self, mib, ms, Host, Metric, Results};
use keel_benches::runner::{self, BootTiming, Vmm};
use keel_benches::stats::summarize;
use keel_benches::tools::{Prepared, VmmPaths};

#[derive(Parser)]
#[command(
    name = "startup",
    about = "Keel's start-up time and idle memory against QEMU, on the probe guest"
)]
struct Args {
    /// Timed boots per VMM (interleaved keel, qemu, keel, qemu, ...).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    runs: u32,
    /// Idle-memory boots per VMM.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    rss_samples: u32,
    #[command(flatten)]
    vmm: VmmPaths,
    /// Run Keel with `--no-jail` (to measure what the jail costs, against a run without).
    #[arg(long)]
    no_jail: bool,
    /// Print the results as JSON instead of tables.
    #[arg(long)]
    json: bool,
}

/// Samples of every metric, per VMM.
#[derive(Default)]
struct Samples {
    boots: Vec<BootTiming>,
    memory: Vec<MemoryStatus>,
}

impl Samples {
    fn boot(&self, value: impl Fn(&BootTiming) -> Option<f64>) -> Vec<f64> {
        self.boots.iter().filter_map(value).collect()
    }

    fn memory(&self, kib: impl Fn(&MemoryStatus) -> u64) -> Vec<f64> {
        self.memory.iter().map(|m| mib(kib(m))).collect()
    }
}

/// Every metric, summarised for both VMMs.
fn metrics(keel: &Samples, qemu: &Samples) -> Vec<Metric> {
    let metric = |key, label, unit, samples: &dyn Fn(&Samples) -> Vec<f64>| Metric {
        key,
        label,
        unit,
        keel: summarize(&samples(keel)),
        qemu: summarize(&samples(qemu)),
    };
    vec![
        metric("first_line_ms", "Time to `PROBE start`", "ms", &|s| {
            s.boot(|b| Some(ms(b.first_line)))
        }),
        metric("ready_ms", "Time to `PROBE ready`", "ms", &|s| {
            s.boot(|b| Some(ms(b.ready)))
        }),
        metric("exit_ms", "Time to exit after poweroff", "ms", &|s| {
            s.boot(|b| Some(ms(b.exit)))
        }),
        metric(
            "startup_cpu_ms",
            "Keel CPU time before first vCPU entry",
            "ms",
            &|s| s.boot(|b| b.startup_cpu_us.map(|us| us as f64 / 1000.0)),
        ),
        metric("idle_vm_rss_mib", "Idle VmRSS", "MiB", &|s| {
            s.memory(|m| m.vm_rss_kib)
        }),
        metric("idle_rss_anon_mib", "Idle RssAnon", "MiB", &|s| {
            s.memory(|m| m.rss_anon_kib)
        }),
        metric("idle_rss_file_mib", "Idle RssFile", "MiB", &|s| {
            s.memory(|m| m.rss_file_kib)
        }),
        metric("idle_vm_hwm_mib", "Peak RSS (VmHWM) at idle", "MiB", &|s| {
            s.memory(|m| m.vm_hwm_kib)
        }),
    ]
}

fn run(args: Args) -> Result<bool> {
    let Prepared {
        mut setup,
        qemu_version,
        ..
    } = args.vmm.prepare()?;
    if args.no_jail {
        setup.keel_options.push("--no-jail".into());
    }
    let host = Host::current(qemu_version);
    let order = [Vmm::Keel, Vmm::Qemu];

    // One discarded boot each: loads the binaries and libraries into the page cache, and
    // shows at once when a VMM cannot boot the probe at all.
    for vmm in order {
        runner::timed_boot(&setup, vmm)
            .with_context(|| format!("warm-up boot of the probe under {}", vmm.name()))?;
    }

    let (mut keel_samples, mut qemu_samples) = (Samples::default(), Samples::default());
    let mut failures = Vec::new();
    for i in 1..=args.runs {
        let mut line = format!("startup: boot {i}/{}:", args.runs);
        for vmm in order {
            let samples = match vmm {
                Vmm::Keel => &mut keel_samples,
                Vmm::Qemu => &mut qemu_samples,
            };
            match runner::timed_boot(&setup, vmm) {
                Ok(t) => {
                    line += &format!(
                        " {} first line {:.2} ms, ready {:.2} ms;",
                        vmm.name(),
                        ms(t.first_line),
                        ms(t.ready)
                    );
                    samples.boots.push(t);
                }
                Err(e) => {
                    line += &format!(" {} failed;", vmm.name());
                    failures.push(format!("boot {i}: {e:#}"));
                }
            }
        }
        eprintln!("{line}");
    }
    for i in 1..=args.rss_samples {
        let mut line = format!("startup: idle memory {i}/{}:", args.rss_samples);
        for vmm in order {
            let samples = match vmm {
                Vmm::Keel => &mut keel_samples,
                Vmm::Qemu => &mut qemu_samples,
            };
            match runner::idle_memory(&setup, vmm) {
                Ok(m) => {
                    line += &format!(" {} VmRSS {:.2} MiB;", vmm.name(), mib(m.vm_rss_kib));
                    samples.memory.push(m);
                }
                Err(e) => {
                    line += &format!(" {} failed;", vmm.name());
                    failures.push(format!("idle memory {i}: {e:#}"));
                }
            }
        }
        eprintln!("{line}");
    }

    let results = Results {
        host,
        runs: args.runs as usize,
        rss_samples: args.rss_samples as usize,
        metrics: metrics(&keel_samples, &qemu_samples),
        failures,
    };
    if args.json {
        print!("{}", report::render_json(&results));
    } else {
        print!("{}", report::render_table(&results));
    }
    Ok(results.failures.is_empty())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("startup: some runs failed (listed with the results); see why above");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("startup: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
