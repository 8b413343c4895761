//! `devices`: Keel's virtio-blk device measured in-process, driven from the host through guest
//! memory by the virtio driver harness, against fio on the same file with the same pattern.
//! No guest runs, so the figures show the device's cost, not the emulated guest's.
//!
//! cargo run --release -p keel-benches --bin devices -- [--seconds 4] [--size-mib 1024]
//!     [--file PATH] [--keep] [--quick] [--json]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Parser;
use devices::virtio::block::EngineChoice;
use keel_benches::blk::fio::{self, Job};
use keel_benches::blk::image;
use keel_benches::blk::report::{self, Cost, Results, Row, Unit};
use keel_benches::blk::rig::{syscall_alone, Engine, Rig};
use keel_benches::blk::Run;
use keel_benches::tools::{self, target_dir, workspace_root};

#[derive(Parser)]
#[command(
    name = "devices",
    about = "Keel's virtio-blk device in-process against fio on the same file"
)]
struct Args {
    /// Seconds per measured run (runs on an emptied page cache take half).
    #[arg(long, default_value_t = 1.2)]
    seconds: f64,
    /// Rounds: every workload is measured this many times per engine, the engines in turn
    /// (in a different order each round), and the medians reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    rounds: u32,
    /// Size of the disk image, MiB.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=65536))]
    size_mib: u64,
    /// The disk image to write and use. Default: keel-devices-bench.img in the target
    /// directory. It is replaced.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Only these workloads (comma-separated keys: randread_4k_qd1, randread_4k_qd32,
    /// write_1m_fdatasync, randread_4k_qd1_cold, randread_4k_qd32_cold).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Leave the image in place at the end.
    #[arg(long)]
    keep: bool,
    /// A few seconds in all: one round of 0.2 s runs on a 64 MiB image (overrides
    /// --seconds, --rounds, --size-mib).
    #[arg(long)]
    quick: bool,
    /// Print the results as JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// The I/O engine Keel's device asks for: hybrid (its default; the synchronous one where
    /// io_uring cannot be set up) or synchronous.
    #[arg(long, value_enum, default_value_t = KeelEngine::Hybrid)]
    keel_engine: KeelEngine,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum KeelEngine {
    Hybrid,
    Synchronous,
}

/// The workloads, in the order measured.
#[derive(Clone, Copy)]
struct Workload {
    key: &'static str,
    label: &'static str,
    /// Read depth; 0 for the sequential writes.
    depth: usize,
    /// Each run starts on an emptied page cache.
    cold: bool,
}

const WORKLOADS: [Workload; 5] = [
    Workload {
        key: "randread_4k_qd1",
        label: "4 KiB random read, QD1",
        depth: 1,
        cold: false,
    },
    Workload {
        key: "randread_4k_qd32",
        label: "4 KiB random read, QD32",
        depth: 32,
        cold: false,
    },
    Workload {
        key: "write_1m_fdatasync",
        label: "1 MiB sequential write + flush",
        depth: 0,
        cold: false,
    },
    Workload {
        key: "randread_4k_qd1_cold",
        label: "4 KiB random read, QD1, from disk",
        depth: 1,
        cold: true,
    },
    Workload {
        key: "randread_4k_qd32_cold",
        label: "4 KiB random read, QD32, from disk",
        depth: 32,
        cold: true,
    },
];

impl Workload {
    fn unit(&self) -> Unit {
        if self.depth == 0 {
            Unit::MegabytesPerSecond
        } else {
            Unit::Iops
        }
    }

    fn fio_job(&self, engine: &'static str) -> Job {
        if self.depth == 0 {
            Job {
                rw: "write",
                block_size: "1M",
                engine,
                depth: 1,
                fdatasync: true,
            }
        } else {
            Job {
                rw: "randread",
                block_size: "4k",
                engine,
                depth: self.depth as u32,
                fdatasync: false,
            }
        }
    }
}

fn filesystem(path: &Path) -> String {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return "unknown filesystem".to_string();
    };
    // SAFETY: an all-zero statfs is a valid value for statfs to overwrite.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a live statfs for the call to fill in.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut fs) } != 0 {
        return "unknown filesystem".to_string();
    }
    match fs.f_type as u64 {
        0xef53 => "ext4".to_string(),
        0x5846_5342 => "xfs".to_string(),
        0x9123_683e => "btrfs".to_string(),
        0x0102_1994 => "tmpfs (memory: nothing reaches a disk)".to_string(),
        0x794c_7630 => "overlayfs".to_string(),
        other => format!("filesystem type {other:#x}"),
    }
}

fn host(file: &Path) -> String {
    let cpu_model = tools::cpu_model();
    let kernel = tools::kernel_release();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "{cpu_model} ({cpus} CPUs), Linux {kernel}, image on {}",
        filesystem(file)
    )
}

/// The 1-minute load average: how busy the host is with other work.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Everything the runs share.
struct Bench {
    file: PathBuf,
    size: u64,
    run_time: Duration,
    rounds: usize,
    fio: Option<PathBuf>,
    keel: Rig,
    uring: Option<Rig>,
    hybrid: Option<Rig>,
}

impl Bench {
    fn duration(&self, w: &Workload) -> Duration {
        if w.cold {
            self.run_time / 2
        } else {
            self.run_time
        }
    }

    /// The page cache as the workload wants it before a run.
    fn prepare(&self, w: &Workload) -> Result<()> {
        if w.cold {
            image::evict(&self.file)
        } else if image::residency(&self.file)? < 0.999 {
            image::warm(&self.file)
        } else {
            Ok(())
        }
    }

    fn rig(&mut self, engine: Engine) -> Option<&mut Rig> {
        match engine {
            Engine::Preadv => Some(&mut self.keel),
            Engine::Uring => self.uring.as_mut(),
            Engine::Hybrid => self.hybrid.as_mut(),
        }
    }

    /// One run of the device harness with `engine`, after a short untimed warm-up.
    fn device_run(&mut self, engine: Engine, w: &Workload) -> Result<Option<Run>> {
        let time = self.duration(w);
        let warm_up = (time / 10).min(Duration::from_millis(200));
        let once = |rig: &mut Rig, time| {
            if w.depth == 0 {
                rig.sequential_writes_with_flush(time)
            } else {
                rig.random_reads(w.depth, time, 0x6b65_656c)
            }
        };
        let Some(rig) = self.rig(engine) else {
            return Ok(None);
        };
        once(rig, warm_up)?;
        self.prepare(w)?;
        let rig = self.rig(engine).context("the engine's rig")?;
        once(rig, time).map(Some)
    }

    fn fio_run(&self, w: &Workload, engine: &'static str) -> Result<Option<Run>> {
        let Some(fio) = &self.fio else {
            return Ok(None);
        };
        self.prepare(w)?;
        fio::run(
            fio,
            &w.fio_job(engine),
            &self.file,
            self.size,
            self.duration(w),
        )
        .map(Some)
    }

    fn row(&mut self, w: &Workload) -> Result<Row> {
        self.prepare(w)?;
        let before = image::residency(&self.file)?;
        let mut runs: [Vec<Run>; 5] = Default::default();
        let names = ["keel", "fio psync", "io_uring", "fio io_uring", "hybrid"];
        for round in 0..self.rounds {
            let mut line = format!("devices: {}, round {}/{}:", w.label, round + 1, self.rounds);
            // A different engine first each round, so that drift in the host's speed does
            // not always favour the same one.
            for k in 0..runs.len() {
                let which = (k + round) % runs.len();
                let run = match which {
                    0 => self.device_run(Engine::Preadv, w)?,
                    1 => self.fio_run(w, "psync")?,
                    2 => self.device_run(Engine::Uring, w)?,
                    3 => self.fio_run(w, "io_uring")?,
                    _ => self.device_run(Engine::Hybrid, w)?,
                };
                if let Some(run) = run {
                    let rate = w.unit().rate(&run).unwrap_or(0.0);
                    line += &format!(" {} {rate:.0};", names[which]);
                    runs[which].push(run);
                }
            }
            eprintln!("{line} ({})", w.unit().name());
        }
        let after = image::residency(&self.file)?;
        let [keel, fio_psync, uring, fio_uring, hybrid] = runs;
        Ok(Row {
            key: w.key,
            label: w.label,
            unit: w.unit(),
            resident: Some((before, after)),
            keel,
            fio_psync,
            uring,
            fio_uring,
            hybrid,
        })
    }

    /// Costs of the device path alone, on a cached file: medians over batches.
    fn costs(&mut self) -> Result<Vec<Cost>> {
        image::warm(&self.file)?;
        let time = self.run_time / 4;
        let seed = 0x6b65_656c;
        let keel = &mut self.keel;
        let get_id_1 = cost(|| keel.get_id(1, time))?;
        let get_id_32 = cost(|| keel.get_id(32, time))?;
        let read_1 = cost(|| keel.random_reads(1, time, seed))?;
        let read_32 = cost(|| keel.random_reads(32, time, seed))?;
        let preadv = cost(|| self.keel.preadv_alone(&self.file, time, seed))?;
        let eventfd = cost(|| syscall_alone(true, time))?;
        let getppid = cost(|| syscall_alone(false, time))?;
        let mut reads = |engine| -> Result<(Option<f64>, Option<f64>)> {
            match self.rig(engine) {
                Some(rig) => Ok((
                    cost(|| rig.random_reads(1, time, seed))?,
                    cost(|| rig.random_reads(32, time, seed))?,
                )),
                None => Ok((None, None)),
            }
        };
        let (uring_1, uring_32) = reads(Engine::Uring)?;
        let (hybrid_1, hybrid_32) = reads(Engine::Hybrid)?;
        let minus = |a: Option<f64>, b: Option<f64>| Some(a? - b?);
        Ok(vec![
            Cost {
                key: "getppid",
                label: "a null system call (getppid): the floor of any system call here",
                ns: getppid,
            },
            Cost {
                key: "eventfd_write",
                label: "an eventfd write alone: what raising the interrupt costs",
                ns: eventfd,
            },
            Cost {
                key: "get_id_qd1",
                label: "GET_ID, one per notification: parse, queue, used ring, interrupt; no \
                        file I/O",
                ns: get_id_1,
            },
            Cost {
                key: "get_id_qd32",
                label: "GET_ID, 32 per notification (one interrupt per 32)",
                ns: get_id_32,
            },
            Cost {
                key: "preadv_alone",
                label: "preadv of 4 KiB from the page cache into guest memory, no virtio",
                ns: preadv,
            },
            Cost {
                key: "read_qd1_device",
                label: "4 KiB read through the device, QD1",
                ns: read_1,
            },
            Cost {
                key: "read_qd32_device",
                label: "4 KiB read through the device, QD32",
                ns: read_32,
            },
            Cost {
                key: "read_qd1_overhead",
                label: "device overhead over preadv alone, QD1",
                ns: minus(read_1, preadv),
            },
            Cost {
                key: "read_qd32_overhead",
                label: "device overhead over preadv alone, QD32",
                ns: minus(read_32, preadv),
            },
            Cost {
                key: "uring_read_qd1_device",
                label: "4 KiB read through the io_uring prototype, QD1",
                ns: uring_1,
            },
            Cost {
                key: "uring_read_qd32_device",
                label: "4 KiB read through the io_uring prototype, QD32",
                ns: uring_32,
            },
            Cost {
                key: "hybrid_read_qd1_device",
                label: "4 KiB read through the hybrid prototype, QD1",
                ns: hybrid_1,
            },
            Cost {
                key: "hybrid_read_qd32_device",
                label: "4 KiB read through the hybrid prototype, QD32",
                ns: hybrid_32,
            },
        ])
    }
}

/// The median time per request (in the device, or per system call) of one run.
fn cost(mut run: impl FnMut() -> Result<Run>) -> Result<Option<f64>> {
    Ok(run()?.device_median_ns)
}

fn run(args: Args) -> Result<()> {
    let (seconds, rounds, size_mib) = if args.quick {
        (0.2, 1, 64)
    } else {
        (args.seconds, args.rounds as usize, args.size_mib)
    };
    let load_start = load_average();
    if !(seconds > 0.0 && seconds <= 600.0) {
        anyhow::bail!("--seconds must be more than 0 and at most 600, not {seconds}");
    }
    let file = match args.file {
        Some(file) => file,
        None => {
            let dir = target_dir(&workspace_root()?);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            dir.join("keel-devices-bench.img")
        }
    };
    if let Some(unknown) = args
        .only
        .iter()
        .find(|k| !WORKLOADS.iter().any(|w| w.key == k.as_str()))
    {
        anyhow::bail!("--only {unknown}: no such workload; see --help for the keys");
    }
    let size = size_mib << 20;
    let fio = fio::find();
    if fio.is_none() {
        eprintln!(
            "devices: fio is not installed (apt-get install -y fio): only Keel's figures will \
             be measured, with no baseline"
        );
    }
    eprintln!("devices: writing {size_mib} MiB to {}", file.display());
    image::create(&file, size)?;
    let choice = match args.keel_engine {
        KeelEngine::Hybrid => EngineChoice::Hybrid,
        KeelEngine::Synchronous => EngineChoice::Synchronous,
    };
    let keel = Rig::with_keel_engine(&file, Engine::Preadv, choice)?;
    let keel_engine = keel.keel_engine().map(str::to_string);
    let (uring, hybrid, uring_error) = match Rig::new(&file, Engine::Uring)
        .and_then(|u| Ok((u, Rig::new(&file, Engine::Hybrid)?)))
    {
        Ok((uring, hybrid)) => (Some(uring), Some(hybrid), None),
        Err(e) => {
            eprintln!("devices: io_uring prototypes not measured: {e:#}");
            (None, None, Some(format!("{e:#}")))
        }
    };
    let host = host(&file);
    let mut bench = Bench {
        file: file.clone(),
        size,
        run_time: Duration::from_secs_f64(seconds),
        rounds,
        fio: fio.as_ref().map(|f| f.0.clone()),
        keel,
        uring,
        hybrid,
    };
    let mut rows = Vec::new();
    for w in WORKLOADS
        .iter()
        .filter(|w| args.only.is_empty() || args.only.iter().any(|k| k == w.key))
    {
        rows.push(bench.row(w)?);
    }
    let costs = bench.costs()?;
    drop(bench);
    if !args.keep {
        let _ = std::fs::remove_file(&file);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let results = Results {
        date_utc: keel_benches::report::utc_date(now.as_secs()),
        host,
        file: file.display().to_string(),
        file_bytes: size,
        seconds,
        rounds,
        load: (load_start, load_average()),
        fio: fio.map(|f| f.1).ok_or_else(|| {
            "fio is not installed (apt-get install -y fio); no baseline".to_string()
        }),
        uring_error,
        keel_engine,
        rows,
        costs,
    };
    if args.json {
        print!("{}", report::render_json(&results));
    } else {
        print!("{}", report::render_table(&results));
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("devices: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
