//! The `migrate` benchmark's lab: two network namespaces joined by a veth pair (10.231.0.1
//! in the source's, 10.231.0.2 in the target's; nothing else is routed), a `keel serve` in
//! each, processes killed when dropped, and a flag that SIGINT, SIGTERM and SIGHUP set so
//! that every wait ends and the guards clean up. Nothing here touches the host's own
//! networks.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub const SOURCE_IP: &str = "10.231.0.1";
pub const TARGET_IP: &str = "10.231.0.2";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT, SIGTERM and SIGHUP set the flag [`check`] reads, instead of ending the
/// process before the guards have cleaned up.
pub fn catch_signals() -> Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction with a handler that only stores to an atomic (which is
        // async-signal-safe), installed for a signal that has no other handler here.
        let r = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if r != 0 {
            bail!("sigaction: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// An error once a signal came: every wait calls this, so the run unwinds to its guards.
pub fn check() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted by a signal");
    }
    Ok(())
}

/// Sleeps `d`, or fails at once when a signal came.
pub fn nap(d: Duration) -> Result<()> {
    check()?;
    std::thread::sleep(d);
    Ok(())
}

/// A process this benchmark started, killed (and reaped) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` to its end, at most `limit` (then it is killed): its output. The output must
/// fit a pipe's buffer (64 KiB), as every CLI answer here does. `interruptible`: a signal
/// ends the wait (cleanup, which runs after one, waits on).
pub fn output_within(cmd: &mut Command, limit: Duration, interruptible: bool) -> Result<Output> {
    let mut child = Proc(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?,
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.0.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            bail!("{cmd:?} did not end within {limit:?}");
        }
        if interruptible {
            check()?;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    if let Some(mut out) = child.0.stdout.take() {
        out.read_to_end(&mut stdout)?;
    }
    if let Some(mut err) = child.0.stderr.take() {
        err.read_to_end(&mut stderr)?;
    }
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

fn ip(args: &[&str]) -> Result<()> {
    let out = output_within(Command::new("ip").args(args), Duration::from_secs(10), true)
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Two namespaces and the veth pair between them, deleted when dropped (the pair goes with
/// its namespaces).
pub struct Link {
    pub source: String,
    pub target: String,
    made: Vec<String>,
}

impl Link {
    pub fn new() -> Result<Link> {
        let pid = std::process::id();
        let mut link = Link {
            source: format!("keel-migbench-a-{pid}"),
            target: format!("keel-migbench-b-{pid}"),
            made: Vec::new(),
        };
        for ns in [link.source.clone(), link.target.clone()] {
            ip(&["netns", "add", &ns]).context("making a network namespace (run as root)")?;
            link.made.push(ns);
        }
        let (va, vb) = (
            format!("kmba{}", pid % 100_000),
            format!("kmbb{}", pid % 100_000),
        );
        // Made in the source's namespace: no interface ever appears in the host's.
        ip(&[
            "-n",
            &link.source,
            "link",
            "add",
            &va,
            "type",
            "veth",
            "peer",
            "name",
            &vb,
            "netns",
            &link.target,
        ])?;
        for (ns, dev, addr) in [
            (&link.source, &va, SOURCE_IP),
            (&link.target, &vb, TARGET_IP),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(link)
    }

    /// `program` run inside namespace `ns` (nsenter, not `ip netns exec`, which remounts
    /// /sys and hides the cgroups a jailed VMM needs).
    pub fn command(ns: &str, program: &Path) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{ns}")).arg(program);
        cmd
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for ns in &self.made {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A `keel serve` in a namespace, its state directory of its own. Dropped: its VMs are
/// stopped and deleted, it is stopped, any VMM left with its state directory in its command line is
/// killed, and the directory removed.
pub struct Daemon {
    pub state: PathBuf,
    keel: PathBuf,
    child: Option<Child>,
}

/// How long one CLI call may take; one in the cleanup after a failure or a signal.
const CLI_LIMIT: Duration = Duration::from_secs(60);
const CLEANUP_LIMIT: Duration = Duration::from_secs(10);

impl Daemon {
    pub fn start(keel: &Path, ns: &str, state: PathBuf, args: &[String]) -> Result<Daemon> {
        std::fs::create_dir_all(&state).with_context(|| format!("making {}", state.display()))?;
        let log = std::fs::File::create(state.with_extension("log"))?;
        let child = Link::command(ns, keel)
            .arg("serve")
            .arg("--state-dir")
            .arg(&state)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting keel serve under nsenter")?;
        let mut daemon = Daemon {
            state,
            keel: keel.to_path_buf(),
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !daemon.state.join("api.sock").exists() {
            if let Some(Ok(Some(status))) = daemon.child.as_mut().map(Child::try_wait) {
                daemon.child = None;
                bail!(
                    "keel serve exited with {status}: {}",
                    daemon.log().trim_end()
                );
            }
            if Instant::now() > deadline {
                bail!("keel serve did not listen within 30 s: {}", daemon.log());
            }
            nap(Duration::from_millis(10))?;
        }
        Ok(daemon)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state.with_extension("log")).unwrap_or_default()
    }

    /// `keel ARGS` against this daemon (KEEL_API on its socket), which must succeed: stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        self.call(args, CLI_LIMIT, true)
    }

    /// [`Daemon::cli`] with a time limit and whether a signal ends it.
    pub fn call(&self, args: &[&str], limit: Duration, interruptible: bool) -> Result<String> {
        let out = output_within(
            Command::new(&self.keel)
                .args(args)
                .env("KEEL_API", self.state.join("api.sock"))
                .env("KEEL_CLIENT_CONFIG", self.state.join("client.json"))
                .env_remove("KEEL_TOKEN")
                .env_remove("KEEL_FINGERPRINT")
                .env_remove("KEEL_CA"),
            limit,
            interruptible,
        )?;
        if !out.status.success() {
            bail!(
                "keel {} ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr).trim_end()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `keel ARGS --json`, parsed.
    pub fn json(&self, args: &[&str]) -> Result<Value> {
        self.json_with(args, true)
    }

    fn json_with(&self, args: &[&str], interruptible: bool) -> Result<Value> {
        let mut all = args.to_vec();
        all.push("--json");
        let limit = if interruptible {
            CLI_LIMIT
        } else {
            CLEANUP_LIMIT
        };
        let text = self.call(&all, limit, interruptible)?;
        serde_json::from_str(&text).with_context(|| format!("keel {args:?} --json said {text:?}"))
    }

    /// Stops the VM and deletes its definition (which waits for the stop to complete: the
    /// daemon has removed its cgroup by then).
    pub fn remove_vm(&self, name: &str) -> Result<()> {
        self.remove(name, true)
    }

    fn remove(&self, name: &str, interruptible: bool) -> Result<()> {
        let limit = if interruptible {
            CLI_LIMIT
        } else {
            CLEANUP_LIMIT
        };
        // A VM already stopped refuses this; `vm rm` below says whether it is stopped.
        let _ = self.call(&["vm", "stop", name], limit, interruptible);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.call(&["vm", "rm", name], limit, interruptible) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) if interruptible => nap(Duration::from_millis(20))?,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// The daemon's VMs, for the cleanup (whatever signal came).
    fn vm_names(&self) -> Vec<String> {
        let Ok(list) = self.json_with(&["vm", "list"], false) else {
            return Vec::new();
        };
        let vms = list
            .as_array()
            .or_else(|| list["vms"].as_array())
            .cloned()
            .unwrap_or_default();
        vms.iter()
            .filter_map(|v| v["spec"]["name"].as_str().map(str::to_string))
            .collect()
    }

    /// Pids of the `keel vmm` processes running this daemon's VMs (found through /proc).
    fn vmm_pids(&self) -> Vec<i32> {
        let prefix = self.state.join("vms").display().to_string();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let words: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|w| String::from_utf8_lossy(w).into_owned())
                .collect();
            if words.iter().any(|w| w == "vmm") && words.iter().any(|w| w.starts_with(&prefix)) {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if child.try_wait().ok().flatten().is_none() {
                // Stopped and deleted through the daemon, which removes their cgroups.
                for name in self.vm_names() {
                    let _ = self.call(&["vm", "migrate", &name, "--cancel"], CLEANUP_LIMIT, false);
                    let _ = self.remove(&name, false);
                }
                // A VM migrating in is not listed yet: its daemon ends its VMM once the
                // source's side is gone (the source's daemon is dropped first).
                let deadline = Instant::now() + Duration::from_secs(5);
                while !self.vmm_pids().is_empty() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                // SAFETY: kill(2) on the daemon's pid, a child of this process not yet reaped.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                let deadline = Instant::now() + Duration::from_secs(5);
                while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for pid in self.vmm_pids() {
            // SAFETY: kill(2) on a VMM this daemon started (its command line names this
            // daemon's state directory), read from /proc just now; at worst it has exited.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = std::fs::remove_dir_all(&self.state);
        let _ = std::fs::remove_file(self.state.with_extension("log"));
    }
}

/// The two daemons on the link, the target serving TLS on the veth: what `keel vm migrate`
/// needs to reach it. Fields drop in order: daemons first, then the namespaces.
pub struct Hosts {
    pub source: Daemon,
    pub target: Daemon,
    /// `--to URL --to-token-file F --to-fingerprint FP`.
    pub to: Vec<String>,
    pub link: Link,
}

impl Hosts {
    /// `images` holds the probe (both daemons may open it); the target also sees the source's
    /// image directory, as shared storage.
    pub fn start(keel: &Path, root: &Path, images: &Path, port: u16) -> Result<Hosts> {
        let link = Link::new()?;
        let images = images.display().to_string();
        let source_state = root.join("a");
        let source = Daemon::start(
            keel,
            &link.source,
            source_state.clone(),
            &["--images".into(), images.clone()],
        )?;
        let source_images = source_state.join("images");
        std::fs::create_dir_all(&source_images)?;
        let listen = format!("{TARGET_IP}:{port}");
        let target = Daemon::start(
            keel,
            &link.target,
            root.join("b"),
            &[
                "--listen".into(),
                listen.clone(),
                "--images".into(),
                images,
                "--images".into(),
                source_images.display().to_string(),
            ],
        )?;
        let host = target.json(&["host"])?;
        let fingerprint = host["identity"]["tls_fingerprint"]
            .as_str()
            .with_context(|| format!("no identity.tls_fingerprint in keel host: {host}"))?
            .to_string();
        let token = target.cli(&["token", "create", "migbench", "--role", "operator"])?;
        let token_file = root.join("token");
        std::fs::write(&token_file, token.trim())?;
        Ok(Hosts {
            source,
            target,
            to: vec![
                "--to".into(),
                format!("https://{listen}"),
                "--to-token-file".into(),
                token_file.display().to_string(),
                "--to-fingerprint".into(),
                fingerprint,
            ],
            link,
        })
    }
}
