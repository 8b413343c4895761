//! A `keel serve` for whole-system tests: its own state directory in /tmp (short paths, so
//! the Unix sockets fit), the CLI pointed at it, and cleanup of the daemon and every VMM it
//! started, whatever the test did.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::KEEL;

pub struct Daemon {
    pub state_dir: PathBuf,
    child: Option<Child>,
    /// A program (and its arguments) that runs the daemon, such as faketime.
    wrapper: Vec<String>,
    /// Extra `keel serve` arguments.
    args: Vec<String>,
    /// Extra environment for the daemon.
    env: Vec<(String, String)>,
}

impl Daemon {
    /// Starts a daemon on a fresh state directory.
    pub fn start(tag: &str) -> Daemon {
        Daemon::start_with(tag, &[], &[], &[])
    }

    pub fn start_with(tag: &str, wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let state_dir = std::env::temp_dir().join(format!("kd-{tag}-{}", std::process::id()));
        kill_vmms_of(&state_dir);
        let _ = std::fs::remove_dir_all(&state_dir);
        let mut daemon = Daemon {
            state_dir,
            child: None,
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        daemon.restart();
        daemon
    }

    /// Runs the next `restart` under another wrapper (e.g. a different faked clock).
    pub fn set_wrapper(&mut self, wrapper: &[&str]) {
        self.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
    }

    /// The image directory tests put VMs' disks in.
    pub fn images(&self) -> PathBuf {
        self.state_dir.join("images")
    }

    /// The API socket: `--socket` when the test gave one, else STATE/api.sock.
    pub fn socket(&self) -> PathBuf {
        self.args
            .windows(2)
            .find(|w| w[0] == "--socket")
            .map(|w| PathBuf::from(&w[1]))
            .unwrap_or_else(|| self.state_dir.join("api.sock"))
    }

    /// The CLI's client config (trusted servers) for this daemon's tests.
    pub fn client_config(&self) -> PathBuf {
        self.state_dir.join("client.json")
    }

    /// The TCP API's URL and its certificate's fingerprint, for a daemon started with
    /// `--listen ADDR` (TLS).
    pub fn https(&self, listen: &str) -> (String, String) {
        let host = self.json(&["host"]);
        let fingerprint = host["identity"]["tls_fingerprint"]
            .as_str()
            .unwrap_or_else(|| panic!("no TLS fingerprint on the front page: {host}"))
            .to_string();
        (format!("https://{listen}"), fingerprint)
    }

    /// Starts the daemon again (after `kill9` or `stop`) and waits for its API.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the daemon is still running");
        let _ = std::fs::remove_file(self.socket());
        let mut command = match self.wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(KEEL);
                c
            }
            None => Command::new(KEEL),
        };
        command
            .arg("serve")
            .arg("--state-dir")
            .arg(&self.state_dir)
            // VMs' files: the probe where it is built, the rest in the daemon's own.
            .arg("--images")
            .arg(self.images())
            .arg("--images")
            .arg(super::probe_dir())
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.log_path())
                    .expect("daemon log"),
            );
        std::fs::create_dir_all(&self.state_dir).expect("state dir");
        let child = command.spawn().expect("start keel serve");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.socket().exists() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("keel serve exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "keel serve did not listen within 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn log_path(&self) -> PathBuf {
        std::env::temp_dir().join(format!(
            "{}.log",
            self.state_dir.file_name().unwrap().to_string_lossy()
        ))
    }

    /// The daemon's stderr so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The daemon's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL to the daemon (not to its VMMs), and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM to the daemon and waits for it to exit; returns whether it exited 0.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        // SAFETY: kill(2) on the daemon's pid, which this process owns and has not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().map(|s| s.success()).unwrap_or(false)
    }

    /// `keel ARGS` against this daemon.
    pub fn keel(&self, args: &[&str]) -> Output {
        self.keel_env(args, &[])
    }

    pub fn keel_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        self.command(args)
            .envs(env.iter().copied())
            .output()
            .expect("run the keel CLI")
    }

    /// `keel ARGS` against this daemon, started in the background, its output dropped.
    pub fn spawn(&self, args: &[&str]) -> std::process::Child {
        self.command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run the keel CLI")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(KEEL);
        cmd.args(args)
            .env("KEEL_API", self.socket())
            .env("KEEL_CLIENT_CONFIG", self.client_config())
            .env_remove("KEEL_TOKEN")
            .env_remove("KEEL_FINGERPRINT")
            .env_remove("KEEL_CA")
            .stdin(Stdio::null());
        cmd
    }

    /// `keel ARGS`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.keel(args);
        assert!(
            out.status.success(),
            "keel {args:?} failed ({}):\nstdout: {}\nstderr: {}\ndaemon log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `keel ARGS`, which must fail with exit status 1 and one `keel: error:` line; its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.keel(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(1),
            "keel {args:?} should fail with 1:\nstdout: {}\nstderr: {stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(stderr.starts_with("keel: error: "), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        stderr
    }

    /// `keel ARGS --json`, parsed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.ok(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("keel {args:?} --json: {e}: {out}"))
    }

    /// Defines a VM running the probe until its power button is pressed.
    pub fn create_probe_vm(&self, name: &str, extra: &[&str]) {
        let kernel = super::probe_elf();
        let mut args = vec![
            "vm",
            "create",
            name,
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "probe.power_button",
            "--memory",
            "64",
        ];
        args.extend_from_slice(extra);
        self.ok(&args);
    }

    /// Defines a 128 MiB VM running the probe with `cmdline`, and `disk` if given.
    pub fn create_probe_with(&self, name: &str, cmdline: &str, disk: Option<&Path>) {
        let kernel = super::probe_elf();
        let mut args = vec![
            "vm".to_string(),
            "create".into(),
            name.into(),
            "--kernel".into(),
            kernel.display().to_string(),
            "--cmdline".into(),
            cmdline.into(),
            "--memory".into(),
            "128".into(),
        ];
        if let Some(d) = disk {
            args.extend(["--disk".into(), format!("path={}", d.display())]);
        }
        self.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    }

    /// One raw HTTP/1.1 request on the API socket (it should ask `connection: close`): the
    /// whole answer, head and body.
    pub fn http(&self, request: &str) -> String {
        use std::io::{Read, Write};
        let mut stream = std::os::unix::net::UnixStream::connect(self.socket()).unwrap();
        // The daemon may answer (413) and close before a huge body is all sent.
        let _ = stream.write_all(request.as_bytes());
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// `GET path` on the API socket, whole answer.
    pub fn http_get(&self, path: &str) -> String {
        self.http(&format!(
            "GET {path} HTTP/1.1\r\nHost: keel\r\nConnection: close\r\n\r\n"
        ))
    }

    /// `GET path` on the API socket (what no CLI command shows): the JSON body of a 200.
    pub fn api_get(&self, path: &str) -> serde_json::Value {
        let answer = self.http_get(path);
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {answer}");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    /// The VM's console log, as the API names it.
    pub fn console_log(&self, vm: &str) -> PathBuf {
        PathBuf::from(
            self.json(&["vm", "show", vm])["console_log"]
                .as_str()
                .unwrap(),
        )
    }

    /// The VM's newest ledger rows (at most `limit`), each as "TO CAUSE DETAIL" (TO is `-`
    /// for a row that is not a state change).
    pub fn ledger_rows(&self, vm: &str, limit: usize) -> Vec<String> {
        self.json(&["events", "--vm", vm, "--limit", &limit.to_string()])
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                format!(
                    "{} {} {}",
                    r["to"].as_str().unwrap_or("-"),
                    r["cause"].as_str().unwrap(),
                    r["detail"].as_str().unwrap()
                )
            })
            .collect()
    }

    /// The VM's state as the API shows it.
    pub fn state(&self, vm: &str) -> String {
        self.json(&["vm", "show", vm])["state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Waits until the VM is in `state`; panics with the events after `timeout`.
    pub fn wait_state(&self, vm: &str, state: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.state(vm) != state {
            assert!(
                Instant::now() < deadline,
                "VM {vm} did not reach {state} within {timeout:?}; it is {}:\n{}",
                self.state(vm),
                self.ok(&["events", "--limit", "30"])
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Pids of the `keel vmm` processes running VMs of this daemon.
    pub fn vmm_pids(&self) -> Vec<u32> {
        vmm_pids_of(&self.state_dir)
    }
}

/// A TCP port on 127.0.0.1 that nothing listens on now (for `keel serve --listen`).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `keel vmm` processes whose run directory is under `state_dir`, found through /proc.
pub fn vmm_pids_of(state_dir: &Path) -> Vec<u32> {
    let prefix = state_dir.join("vms").display().to_string();
    let mut pids = Vec::new();
    for (pid, dir) in super::processes() {
        let Ok(cmdline) = std::fs::read(dir.join("cmdline")) else {
            continue;
        };
        let words: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|w| String::from_utf8_lossy(w).into_owned())
            .collect();
        let is_vmm =
            words.iter().any(|w| w == "vmm") && words.iter().any(|w| w.starts_with(&prefix));
        // A zombie has an empty cmdline and is not counted.
        if is_vmm {
            pids.push(pid);
        }
    }
    pids.sort();
    pids
}

fn kill_vmms_of(state_dir: &Path) {
    for pid in vmm_pids_of(state_dir) {
        // SAFETY: kill(2) on a pid read from /proc just now; at worst it has already exited.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        kill_vmms_of(&self.state_dir);
        let _ = std::fs::remove_dir_all(&self.state_dir);
        let _ = std::fs::remove_file(self.log_path());
    }
}

/// Waits until the console log at `log` holds `text` after byte `from`; returns the log from
/// there. Panics with what it holds after `timeout`.
pub fn wait_for_output(log: &Path, text: &str, from: usize, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let all = std::fs::read_to_string(log).unwrap_or_default();
        let tail = all.get(from..).unwrap_or_default();
        if tail.contains(text) {
            return tail.to_string();
        }
        assert!(Instant::now() < deadline, "no {text:?} in: {tail}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
