//! `e2e`: device throughput end to end, Keel against QEMU microvm, with the probe guest's
//! benchmark loops (`probe.bench_*`), which run in ring 3: on a PVM host, guest ring 0 is
//! emulated and would dominate, ring 3 runs natively. The host times the probe's `start` and
//! `done` lines as they arrive on the serial console.
//!
//! cargo run --release -p keel-benches --bin e2e -- [--runs 3] [--secs 3]
//!     [--workloads blk-read,blk-read-qd,blk-write,net-tx,net-rx,vsock] [--qd 32]
//!     [--image-mib 512] [--work-dir DIR] [--no-writeback] [--no-direct] [--event-idx]
//!     [--probe-dir DIR]
//!     [--keel PATH] [--qemu PATH]
//!
//! The net workloads need root (a network namespace of their own); without one they are
//! skipped. vsock runs under Keel only (QEMU here has no vhost-vsock).

#[path = "../e2e/mod.rs"]
mod e2e;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use keel_benches::runner::Setup;
use keel_benches::stats::median;
use keel_benches::tools::{Prepared, VmmPaths};

use e2e::netns::{self, NetNs};
use e2e::run::{self, Measured, Watch};
use e2e::setup::{self, Host};
use e2e::table::{self, Row, Stats};
use e2e::vsock::{self, Sink};

/// Guest shape of every run.
const VCPUS: &str = "1";
const MEMORY_MIB: &str = "256";
/// Guest CID and host port of the vsock workload.
const VSOCK_CID: u32 = 3;
const VSOCK_PORT: u32 = 1234;
/// A calibration run may take this long.
const CALIBRATION_DEADLINE: Duration = Duration::from_secs(120);

#[derive(Parser)]
#[command(
    name = "e2e",
    about = "Device throughput end to end: the probe guest's ring-3 loops under Keel and QEMU"
)]
struct Args {
    /// Measured runs per workload and VMM configuration, interleaved; medians are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=25))]
    runs: u32,
    /// Target length of a measured run, seconds: a run asks for this long at the median rate
    /// of its configuration's runs so far (the first from a calibration run).
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// The workloads, in this order.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Workload::ALL)]
    workloads: Vec<Workload>,
    /// Requests in flight for blk-read-qd (1-64).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=64))]
    qd: u64,
    /// Size of the disk image, MiB.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(16..=65536))]
    image_mib: u64,
    /// Directory for the disk image and the vsock socket (not tmpfs). Default: target/e2e.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Leave out QEMU with cache=writeback (measured besides cache=none by default).
    #[arg(long)]
    no_writeback: bool,
    /// Leave out Keel with direct=on (O_DIRECT, measured besides Keel through the page cache
    /// by default, to compare with QEMU's cache=none).
    #[arg(long)]
    no_direct: bool,
    /// The probe negotiates VIRTIO_F_EVENT_IDX (as Linux's drivers do) instead of using the
    /// ring flags to suppress notifications and interrupts.
    #[arg(long)]
    event_idx: bool,
    /// The disk image's format. qcow2: the raw image converted by `qemu-img convert -O
    /// qcow2` (every cluster allocated), served by Keel and by QEMU, with Keel on the raw
    /// image beside them as the reference; no direct=on (Keel offers none for qcow2).
    #[arg(long, value_enum, default_value_t = ImageFormat::Raw)]
    format: ImageFormat,
    #[command(flatten)]
    vmm: VmmPaths,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum Workload {
    BlkRead,
    BlkReadQd,
    BlkWrite,
    NetTx,
    NetRx,
    Vsock,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Device {
    Disk,
    Net,
    Vsock,
}

impl Workload {
    const ALL: [Workload; 6] = [
        Workload::BlkRead,
        Workload::BlkReadQd,
        Workload::BlkWrite,
        Workload::NetTx,
        Workload::NetRx,
        Workload::Vsock,
    ];

    /// The probe's name of the benchmark.
    fn bench(self) -> &'static str {
        match self {
            Workload::BlkRead => "blk_read",
            Workload::BlkReadQd => "blk_read_qd",
            Workload::BlkWrite => "blk_write",
            Workload::NetTx => "net_tx",
            Workload::NetRx => "net_rx",
            Workload::Vsock => "vsock",
        }
    }

    fn label(self, qd: u64) -> String {
        match self {
            Workload::BlkRead => "blk 4 KiB random read, QD 1".into(),
            Workload::BlkReadQd => format!("blk 4 KiB random read, QD {qd}"),
            Workload::BlkWrite => "blk 1 MiB sequential write + FLUSH".into(),
            Workload::NetTx => "net TX 1514-byte frames".into(),
            Workload::NetRx => "net RX 1514-byte frames".into(),
            Workload::Vsock => "vsock stream guest to host, 16 KiB packets".into(),
        }
    }

    fn device(self) -> Device {
        match self {
            Workload::BlkRead | Workload::BlkReadQd | Workload::BlkWrite => Device::Disk,
            Workload::NetTx | Workload::NetRx => Device::Net,
            Workload::Vsock => Device::Vsock,
        }
    }

    /// The count of the calibration run, and the least and most a measured run asks for.
    /// The count is operations, except for vsock: bytes.
    fn counts(self) -> (u64, u64, u64) {
        match self {
            Workload::BlkRead => (20_000, 2_000, 20_000_000),
            Workload::BlkReadQd => (50_000, 5_000, 50_000_000),
            Workload::BlkWrite => (100, 10, 100_000),
            Workload::NetTx => (200_000, 20_000, 200_000_000),
            Workload::NetRx => (50_000, 5_000, 50_000_000),
            Workload::Vsock => (100 << 20, 10 << 20, 100 << 30),
        }
    }

    /// What the count of a run is per second, from a run.
    fn rate(self, m: &Measured) -> f64 {
        match self {
            Workload::Vsock => m.bytes as f64 / m.secs,
            _ => m.ops_per_sec(),
        }
    }

    /// The probe's command line: one benchmark, and no power-off (the probe idles after it,
    /// and the run samples the VMM's CPU time before ending it).
    fn cmdline(self, count: u64, qd: u64) -> String {
        match self {
            Workload::BlkReadQd => {
                format!("probe.bench_blk_read_qd={count} probe.bench_blk_qd={qd}")
            }
            Workload::Vsock => {
                format!("probe.bench_vsock={count} probe.bench_vsock_port={VSOCK_PORT}")
            }
            _ => format!("probe.bench_{}={count}", self.bench()),
        }
    }
}

/// A VMM and, for QEMU, how its device is attached.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Config {
    Keel,
    /// Keel with the disk opened `direct=on` (`O_DIRECT`), as QEMU's `cache=none`.
    KeelDirect,
    /// Keel on the raw image, beside runs on the qcow2 one (`--format qcow2`).
    KeelRaw,
    /// `-drive` cache and aio options for disks; none for other devices.
    Qemu(Option<&'static str>),
}

impl Config {
    fn label(self) -> String {
        match self {
            Config::Keel => "Keel".into(),
            Config::KeelDirect => "Keel direct=on".into(),
            Config::KeelRaw => "Keel on the raw image".into(),
            Config::Qemu(Some(drive)) => drive.into(),
            Config::Qemu(None) => "tap, virtio-net in QEMU".into(),
        }
    }
}

/// Everything a run is made of.
struct Rig {
    keel: PathBuf,
    qemu: PathBuf,
    probe: PathBuf,
    image: Option<PathBuf>,
    /// The raw image, when `image` is its qcow2 conversion.
    raw_image: Option<PathBuf>,
    format: ImageFormat,
    ns: Option<Arc<NetNs>>,
    vsock_socket: PathBuf,
    qd: u64,
    event_idx: bool,
}

impl Rig {
    fn command(&self, config: Config, workload: Workload, count: u64) -> Result<Command> {
        let mut cmdline = workload.cmdline(count, self.qd);
        if self.event_idx {
            cmdline.push_str(" probe.bench_event_idx");
        }
        let device = workload.device();
        let program = match config {
            Config::Keel | Config::KeelDirect | Config::KeelRaw => &self.keel,
            Config::Qemu(_) => &self.qemu,
        };
        let mut cmd = match (device, &self.ns) {
            (Device::Net, Some(ns)) => ns.command(program),
            (Device::Net, None) => bail!("no network namespace"),
            _ => Command::new(program),
        };
        let image = || self.image.as_deref().context("no disk image");
        match config {
            Config::Keel | Config::KeelDirect | Config::KeelRaw => {
                cmd.arg("run").arg("--kernel").arg(&self.probe).args([
                    "--cpus",
                    VCPUS,
                    "--memory",
                    MEMORY_MIB,
                    "--cmdline",
                    &cmdline,
                ]);
                match device {
                    Device::Disk => {
                        let mut disk = std::ffi::OsString::from("path=");
                        if config == Config::KeelRaw {
                            disk.push(self.raw_image.as_deref().context("no raw image")?);
                        } else {
                            disk.push(image()?);
                            if self.format != ImageFormat::Raw {
                                disk.push(format!(",format={}", self.format.name()));
                            }
                        }
                        if config == Config::KeelDirect {
                            disk.push(",direct=on");
                        }
                        cmd.arg("--disk").arg(disk);
                    }
                    Device::Net => {
                        cmd.args(["--net", &format!("tap={}", netns::TAP)]);
                    }
                    Device::Vsock => {
                        let mut v = std::ffi::OsString::from(format!("cid={VSOCK_CID},socket="));
                        v.push(&self.vsock_socket);
                        cmd.arg("--vsock").arg(v);
                    }
                }
            }
            Config::Qemu(drive) => {
                cmd.args(["-M", "microvm", "-accel", "kvm"])
                    .args(["-cpu", "host,-arch-capabilities"])
                    .args(["-m", MEMORY_MIB, "-smp", VCPUS])
                    .args(["-nodefaults", "-no-user-config", "-nographic"])
                    .args(["-name", "e2e,debug-threads=on"])
                    .args(["-serial", "stdio", "-kernel"])
                    .arg(&self.probe)
                    .args(["-append", &cmdline])
                    .args(["-global", "virtio-mmio.force-legacy=false"]);
                match device {
                    Device::Disk => {
                        let mut d = std::ffi::OsString::from("id=d0,file=");
                        d.push(image()?);
                        d.push(format!(
                            ",format={},if=none,{}",
                            self.format.name(),
                            drive.unwrap_or("cache=none,aio=native")
                        ));
                        cmd.arg("-drive").arg(d);
                        cmd.args(["-device", "virtio-blk-device,drive=d0"]);
                    }
                    Device::Net => {
                        cmd.args([
                            "-netdev",
                            &format!("tap,id=n0,ifname={},script=no,downscript=no", netns::TAP),
                        ]);
                        cmd.args(["-device", "virtio-net-device,netdev=n0"]);
                    }
                    Device::Vsock => bail!("QEMU has no vsock device here"),
                }
            }
        }
        Ok(cmd)
    }

    /// One run of `workload` under `config` asking for `count`.
    fn run(
        &self,
        config: Config,
        workload: Workload,
        count: u64,
        deadline: Duration,
    ) -> Result<Measured> {
        let cmd = self.command(config, workload, count)?;
        match workload {
            Workload::NetRx => self.run_with_sender(cmd, workload, count, deadline),
            Workload::Vsock => {
                let sink = Sink::listen(vsock::port_path(&self.vsock_socket, VSOCK_PORT))?;
                let m = run::run(cmd, watch(workload, deadline))?;
                let got = sink.finish();
                if got != count {
                    bail!("the host side read {got} bytes of the {count} the guest sent");
                }
                Ok(m)
            }
            _ => run::run(cmd, watch(workload, deadline)),
        }
    }

    /// net_rx: a thread in the namespace sends frames from the `start` line to the `done` line
    /// (at most 100 times as many as the guest waits for, within the deadline).
    fn run_with_sender(
        &self,
        cmd: Command,
        workload: Workload,
        count: u64,
        deadline: Duration,
    ) -> Result<Measured> {
        let ns = self.ns.clone().context("no network namespace")?;
        let go = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let sender = {
            let (go, stop) = (go.clone(), stop.clone());
            std::thread::spawn(move || -> Result<u64> {
                ns.enter()?;
                netns::send_frames(&go, &stop, count.saturating_mul(100), deadline)
            })
        };
        let mut w = watch(workload, deadline);
        w.on_start = Some(Box::new(|| go.store(true, Ordering::Release)));
        w.on_done = Some(Box::new(|| stop.store(true, Ordering::Release)));
        let result = run::run(cmd, w);
        stop.store(true, Ordering::Release);
        let sent = sender
            .join()
            .map_err(|_| anyhow::anyhow!("the frame sender panicked"))??;
        let m = result?;
        eprintln!(
            "e2e:   the host sent {sent} frames for {} received ({:.0}% delivered)",
            m.ops,
            100.0 * m.ops as f64 / sent.max(1) as f64
        );
        Ok(m)
    }
}

fn watch(workload: Workload, deadline: Duration) -> Watch<'static> {
    Watch {
        bench: workload.bench(),
        deadline,
        on_start: None,
        on_done: None,
    }
}

/// The count of the next run: `secs` worth at `rate` (the median rate of the runs so far),
/// within the workload's bounds, rounded to two significant digits.
fn count_for(workload: Workload, rate: f64, secs: f64) -> u64 {
    let (_, least, most) = workload.counts();
    let raw = (rate * secs).clamp(least as f64, most as f64) as u64;
    let scale = 10u64.pow((raw.max(1).ilog10()).saturating_sub(1));
    (raw / scale).max(1) * scale
}

fn describe(m: &Measured) -> String {
    let kicks = m.kicks.map_or(String::new(), |k| {
        format!(", kicks/op {:.3}", k as f64 / m.ops.max(1) as f64)
    });
    format!(
        "{} ops/s, {:.1} MB/s ({:.2} s{kicks})",
        table::thousands(m.ops_per_sec()),
        m.mb_per_sec(),
        m.secs
    )
}

fn heading(host: &Host, args: &Args, keel: &Path, notes: &[String]) -> String {
    let mut s = format!(
        "{} UTC. Keel: {} (source tree at commit {}). {}. {} CPUs ({}), Linux {}, /dev/kvm \
         {}, load average {} at the start. {} measured runs per workload and configuration \
         (interleaved), about {} s each; medians. Notification suppression: {}.\n",
        host.machine.date_utc,
        keel.display(),
        host.commit.as_deref().unwrap_or("unknown"),
        host.machine.qemu_version,
        host.machine.cpus,
        host.machine.cpu_model,
        host.machine.kernel,
        if host.machine.pvm {
            "is the PVM module"
        } else {
            "is hardware KVM"
        },
        host.load,
        args.runs,
        args.secs,
        if args.event_idx {
            "EVENT_IDX"
        } else {
            "ring flags (NO_NOTIFY, NO_INTERRUPT)"
        }
    );
    for n in notes {
        s.push_str(&format!("\n{n}\n"));
    }
    s
}

fn run_all(args: Args) -> Result<bool> {
    let Prepared {
        root,
        setup:
            Setup {
                keel,
                qemu,
                probe_elf: probe,
                ..
            },
        qemu_version,
    } = args.vmm.clone().prepare()?;
    let host = setup::host(&root, qemu_version);
    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| setup::target_dir(&root).join("e2e"));
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("creating {}", work_dir.display()))?;
    let mut notes = Vec::new();
    let mut workloads: Vec<Workload> = Vec::new();
    for w in &args.workloads {
        if !workloads.contains(w) {
            workloads.push(*w);
        }
    }

    let raw_image = if workloads.iter().any(|w| w.device() == Device::Disk) {
        Some(setup::disk_image(&work_dir, args.image_mib)?)
    } else {
        None
    };
    if args.format == ImageFormat::Qcow2 {
        notes.push(
            "Disk image: qcow2 (the raw image converted by qemu-img convert -O qcow2: 64 KiB \
             clusters, all allocated), for Keel and QEMU; \"Keel on the raw image\" reads and \
             writes the same data as raw, for the qcow2/raw ratio."
                .into(),
        );
    }
    let image = match (&raw_image, args.format) {
        (Some(raw), ImageFormat::Qcow2) => Some(setup::qcow2_image(raw)?),
        (raw, _) => raw.clone(),
    };
    let ns = if workloads.iter().any(|w| w.device() == Device::Net) {
        match NetNs::with_tap() {
            Ok(ns) => Some(Arc::new(ns)),
            Err(e) => {
                let why = format!("{e:#}");
                eprintln!("e2e: skipping the net workloads: {why}");
                notes.push(format!("Net workloads skipped: {why}."));
                workloads.retain(|w| w.device() != Device::Net);
                None
            }
        }
    } else {
        None
    };
    let rig = Rig {
        keel: keel.clone(),
        qemu,
        probe,
        image,
        raw_image: raw_image.filter(|_| args.format == ImageFormat::Qcow2),
        format: args.format,
        ns,
        vsock_socket: work_dir.join("vsock.sock"),
        qd: args.qd,
        event_idx: args.event_idx,
    };
    let measured_deadline = Duration::from_secs_f64(60.0 + 10.0 * args.secs);

    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for &workload in &workloads {
        let configs: Vec<Config> = match workload.device() {
            Device::Disk => {
                let mut c = vec![Config::Keel];
                if !args.no_direct && args.format == ImageFormat::Raw {
                    c.push(Config::KeelDirect);
                }
                c.push(Config::Qemu(Some("cache=none,aio=native")));
                if !args.no_writeback {
                    c.push(Config::Qemu(Some("cache=writeback,aio=threads")));
                }
                if args.format == ImageFormat::Qcow2 {
                    c.push(Config::KeelRaw);
                }
                c
            }
            Device::Net => vec![Config::Keel, Config::Qemu(None)],
            Device::Vsock => vec![Config::Keel],
        };
        if workload.device() == Device::Disk {
            for image in [&rig.image, &rig.raw_image].into_iter().flatten() {
                setup::warm_page_cache(image)?;
            }
        }
        // Calibration: one run each (also a warm-up). Each later run asks for `secs` worth at
        // the median rate of the configuration's runs so far, the host's speed drifting.
        let mut rates: Vec<Option<Vec<f64>>> = Vec::new();
        for &config in &configs {
            let (cal, ..) = workload.counts();
            match rig.run(config, workload, cal, CALIBRATION_DEADLINE) {
                Ok(m) => {
                    eprintln!(
                        "e2e: {} {}: calibration {}",
                        workload.bench(),
                        config.label(),
                        describe(&m)
                    );
                    rates.push(Some(vec![workload.rate(&m)]));
                }
                Err(e) => {
                    eprintln!(
                        "e2e: {} {}: calibration failed",
                        workload.bench(),
                        config.label()
                    );
                    failures.push(format!(
                        "{} {} calibration: {e:#}",
                        workload.bench(),
                        config.label()
                    ));
                    rates.push(None);
                }
            }
        }
        let mut samples: Vec<Vec<Measured>> = vec![Vec::new(); configs.len()];
        for r in 0..args.runs as usize {
            for k in 0..configs.len() {
                let i = (k + r) % configs.len(); // each configuration goes first in turn
                let Some(rate) = rates[i].as_deref().and_then(median) else {
                    continue;
                };
                let (config, count) = (configs[i], count_for(workload, rate, args.secs));
                match rig.run(config, workload, count, measured_deadline) {
                    Ok(m) => {
                        eprintln!(
                            "e2e: {} {} run {}/{}: {}",
                            workload.bench(),
                            config.label(),
                            r + 1,
                            args.runs,
                            describe(&m)
                        );
                        if let Some(rates) = rates[i].as_mut() {
                            rates.push(workload.rate(&m));
                        }
                        samples[i].push(m);
                    }
                    Err(e) => {
                        eprintln!(
                            "e2e: {} {} run {} failed",
                            workload.bench(),
                            config.label(),
                            r + 1
                        );
                        failures.push(format!(
                            "{} {} run {}: {e:#}",
                            workload.bench(),
                            config.label(),
                            r + 1
                        ));
                    }
                }
            }
        }
        let stats = |i: usize| Stats::of(&samples[i]);
        rows.push(Row {
            workload: workload.label(args.qd),
            keel: stats(0),
            keel_direct: configs
                .iter()
                .position(|&c| c == Config::KeelDirect)
                .map(stats),
            qemu: (1..configs.len())
                .filter(|&i| matches!(configs[i], Config::Qemu(_) | Config::KeelRaw))
                .map(|i| (configs[i].label(), stats(i)))
                .collect(),
        });
    }

    if workloads.contains(&Workload::Vsock) {
        notes.push("vsock: Keel only (QEMU 7.2 here has no vhost-vsock).".into());
    }
    println!("{}", heading(&host, &args, &keel, &notes));
    println!("{}", table::render_throughput(&rows));
    if rows.iter().any(|r| r.keel_direct.is_some()) {
        println!("{}", table::render_direct(&rows));
    }
    println!("{}", table::render_costs(&rows));
    if !failures.is_empty() {
        println!("Failed runs (left out of the figures):\n");
        for f in &failures {
            println!("- {f}");
        }
    }
    Ok(failures.is_empty())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !(args.secs > 0.0 && args.secs <= 600.0) {
        eprintln!("e2e: error: --secs must be above 0 and at most 600");
        return ExitCode::from(2);
    }
    match run_all(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("e2e: some runs failed (listed with the results); see why above");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("e2e: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(secs: f64, ops: u64, bytes: u64) -> Measured {
        Measured {
            secs,
            ops,
            bytes,
            kicks: None,
            cpu: None,
        }
    }

    #[test]
    fn counts_aim_at_the_target_time_within_bounds() {
        // 12,345 ops/s for 3 s: 37,035, rounded to two digits.
        assert_eq!(count_for(Workload::BlkRead, 12_345.0, 3.0), 37_000);
        // Too slow or too fast: the workload's bounds.
        assert_eq!(count_for(Workload::BlkRead, 0.01, 3.0), 2_000);
        assert_eq!(count_for(Workload::BlkWrite, 1e9, 3.0), 100_000);
        // vsock counts bytes.
        let v = measured(0.5, 100, 200_000_000);
        assert_eq!(Workload::Vsock.rate(&v), 400_000_000.0);
        assert_eq!(count_for(Workload::Vsock, 4e8, 3.0), 1_200_000_000);
        assert_eq!(Workload::NetTx.rate(&v), 200.0);
    }

    #[test]
    fn command_lines_carry_one_benchmark() {
        assert_eq!(
            Workload::BlkRead.cmdline(5000, 32),
            "probe.bench_blk_read=5000"
        );
        assert_eq!(
            Workload::BlkReadQd.cmdline(5000, 16),
            "probe.bench_blk_read_qd=5000 probe.bench_blk_qd=16"
        );
        assert_eq!(
            Workload::Vsock.cmdline(1 << 20, 32),
            "probe.bench_vsock=1048576 probe.bench_vsock_port=1234"
        );
        for w in Workload::ALL {
            assert!(w
                .cmdline(1, 1)
                .contains(&format!("probe.bench_{}=", w.bench())));
        }
    }

    #[test]
    fn qemu_and_keel_commands_name_the_device() {
        let rig = Rig {
            keel: "/k".into(),
            qemu: "/q".into(),
            probe: "/p.elf".into(),
            image: Some("/img".into()),
            raw_image: None,
            format: ImageFormat::Raw,
            ns: None,
            vsock_socket: "/s".into(),
            qd: 32,
            event_idx: true,
        };
        let args = |c: Config, w: Workload| -> Vec<String> {
            let cmd = rig.command(c, w, 10).expect("command");
            cmd.get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        let k = args(Config::Keel, Workload::BlkWrite);
        assert!(
            k.contains(&"probe.bench_blk_write=10 probe.bench_event_idx".to_string()),
            "{k:?}"
        );
        assert!(k.windows(2).any(|w| w == ["--disk", "path=/img"]), "{k:?}");
        let d = args(Config::KeelDirect, Workload::BlkRead);
        assert!(
            d.windows(2).any(|w| w == ["--disk", "path=/img,direct=on"]),
            "{d:?}"
        );
        let q = args(
            Config::Qemu(Some("cache=none,aio=native")),
            Workload::BlkRead,
        );
        assert!(
            q.contains(&"id=d0,file=/img,format=raw,if=none,cache=none,aio=native".to_string()),
            "{q:?}"
        );
        assert!(
            q.contains(&"virtio-mmio.force-legacy=false".to_string()),
            "{q:?}"
        );
        let v = args(Config::Keel, Workload::Vsock);
        assert!(
            v.windows(2).any(|w| w == ["--vsock", "cid=3,socket=/s"]),
            "{v:?}"
        );
        assert!(rig.command(Config::Qemu(None), Workload::Vsock, 1).is_err());
        assert!(
            rig.command(Config::Keel, Workload::NetTx, 1).is_err(),
            "no namespace"
        );
    }
}
