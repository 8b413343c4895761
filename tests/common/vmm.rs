//! Running `keel vmm --dir RUN_DIR` as the daemon does, and talking to its sockets.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::control::{files, ExitRecord, Response, VmmStatus};

use super::{probe_elf, KEEL};

pub const DEADLINE: Duration = Duration::from_secs(30);

/// A run directory in /tmp (short, so the socket paths fit), removed on drop.
pub struct RunDir(pub PathBuf);

impl RunDir {
    pub fn new(tag: &str, spec: &serde_json::Value) -> Self {
        let dir = std::env::temp_dir().join(format!("keel-vmm-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(files::SPEC), spec.to_string()).unwrap();
        Self(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    pub fn exit_record(&self) -> ExitRecord {
        let text = std::fs::read_to_string(self.path(files::EXIT_RECORD))
            .unwrap_or_else(|e| panic!("no exit.json: {e}\n{}", self.context()));
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("exit.json is not an ExitRecord ({e}): {text}"))
    }

    pub fn context(&self) -> String {
        format!(
            "--- vmm.log\n{}\n--- console.log\n{}",
            self.read(files::VMM_LOG),
            self.read(files::CONSOLE_LOG)
        )
    }

    pub fn sockets_gone(&self) -> bool {
        !self.path(files::CONTROL_SOCKET).exists() && !self.path(files::CONSOLE_SOCKET).exists()
    }
}

impl Drop for RunDir {
    /// Every `keel vmm` of the directory is killed, however it was started (through
    /// faketime or nsenter, whose own process a test's kill does not reach), then the
    /// directory goes.
    fn drop(&mut self) {
        let dir = self.0.display().to_string();
        for (pid, proc_dir) in super::processes() {
            let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) else {
                continue;
            };
            let words: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|w| String::from_utf8_lossy(w).into_owned())
                .collect();
            if words.iter().any(|w| w == "vmm") && words.contains(&dir) {
                // SAFETY: kill(2) on a pid read from /proc just now; at worst it has exited.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn spec(name: &str, cmdline: &str) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "kernel": probe_elf().to_str().expect("utf-8 path"),
        "cmdline": cmdline,
        "memory_mib": 64,
    })
}

/// Starts `keel vmm` the way the daemon does: no terminal, stderr to vmm.log.
pub fn start(dir: &RunDir) -> Child {
    let log = std::fs::File::create(dir.path(files::VMM_LOG)).unwrap();
    Command::new(KEEL)
        .args(["vmm", "--dir"])
        .arg(&dir.0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn keel vmm")
}

/// Waits for the process to end by itself; kills it and fails past the deadline.
pub fn wait_exit(child: &mut Child, dir: &RunDir) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("keel vmm did not end\n{}", dir.context());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn wait_until(what: &str, dir: &RunDir, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < DEADLINE,
            "timed out waiting for {what}\n{}",
            dir.context()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client of the control socket.
pub struct Control {
    pub stream: UnixStream,
    pub reader: BufReader<UnixStream>,
}

impl Control {
    pub fn connect(dir: &RunDir) -> Self {
        let path = dir.path(files::CONTROL_SOCKET);
        let mut stream = None;
        wait_until("the control socket", dir, || {
            stream = UnixStream::connect(&path).ok();
            stream.is_some()
        });
        Self::over(stream.unwrap())
    }

    /// A client of the control socket at `path`, which must be there.
    pub fn connect_to(path: &std::path::Path) -> Self {
        let stream = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", path.display()));
        Self::over(stream)
    }

    fn over(stream: UnixStream) -> Self {
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Self { stream, reader }
    }

    /// Sends one line (newline added) and reads one response line.
    pub fn ask(&mut self, line: &[u8]) -> Response {
        self.try_ask(line)
            .expect("the VMM closed its control socket before answering")
    }

    /// As [`Self::ask`]; None when the VMM closed the connection (it ended).
    pub fn try_ask(&mut self, line: &[u8]) -> Option<Response> {
        let mut message = line.to_vec();
        message.push(b'\n');
        self.stream.write_all(&message).ok()?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer).ok()? == 0 {
            return None;
        }
        Some(
            serde_json::from_str(&answer)
                .unwrap_or_else(|e| panic!("not a response ({e}): {answer:?}")),
        )
    }

    pub fn status(&mut self) -> VmmStatus {
        match self.ask(br#"{"request":"status"}"#) {
            Response::Status(status) => status,
            other => panic!("status answered {other:?}"),
        }
    }
}

/// A client of the console socket, collecting what it receives.
pub struct Console(Arc<Mutex<Vec<u8>>>);

impl Console {
    pub fn attach(dir: &RunDir) -> Self {
        let path = dir.path(files::CONSOLE_SOCKET);
        let mut stream = None;
        wait_until("the console socket", dir, || {
            stream = UnixStream::connect(&path).ok();
            stream.is_some()
        });
        let mut stream = stream.unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Self(seen)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A `keel vmm` process killed when the test ends, however it ends: a failed assertion must
/// not leave a guest spinning on the machine's CPUs under the next tests.
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A sparse raw disk of `bytes` in a directory of its own, removed with it.
pub struct ScratchDisk {
    pub dir: PathBuf,
    pub path: PathBuf,
}

impl ScratchDisk {
    pub fn new(tag: &str, bytes: u64) -> Self {
        let dir = std::env::temp_dir().join(format!("keel-disk-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.raw");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(bytes)
            .unwrap();
        Self { dir, path }
    }

    /// The definition's `disks` entry for it.
    pub fn spec(&self) -> serde_json::Value {
        serde_json::json!([{ "path": self.path.to_str().unwrap() }])
    }
}

impl Drop for ScratchDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The files a snapshot named `name` is written to, made empty first (a jailed VMM makes
/// none).
pub fn make_snapshot_files(dir: &RunDir, name: &str) {
    let sub = dir.path(name);
    std::fs::create_dir_all(&sub).unwrap();
    for file in ["state", "memory"] {
        std::fs::File::create(sub.join(file)).unwrap();
    }
}
