//! The host end of `bench_vsock`: Keel forwards a guest connection to host port P to the
//! Unix socket `<socket>_P`; this listens there, takes one connection and reads it to the end.

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

/// The Unix socket a guest connection to host `port` reaches, for `--vsock socket=PATH`.
pub fn port_path(socket: &Path, port: u32) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(format!("_{port}"));
    PathBuf::from(name)
}

/// A listener reading one connection to its end in a thread.
pub struct Sink {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
    path: PathBuf,
}

impl Sink {
    /// Listens on `path` (replacing a stale socket file).
    pub fn listen(path: PathBuf) -> Result<Sink> {
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .with_context(|| format!("listening on {}", path.display()))?;
        listener
            .set_nonblocking(true)
            .context("making the listener non-blocking")?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut stream = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(_) if !flag.load(Ordering::Acquire) => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(_) => return 0,
                }
            };
            let _ = stream.set_nonblocking(false);
            // Bounded even if the VMM hangs: a read waits at most this long.
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            while let Ok(n @ 1..) = stream.read(&mut buf) {
                total += n as u64;
            }
            total
        });
        Ok(Sink {
            stop,
            thread: Some(thread),
            path,
        })
    }

    /// Bytes read from the connection (0 if none came); waits for its end.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Release);
        self.thread
            .take()
            .map_or(0, |t| t.join().unwrap_or_default())
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_path_appends_the_port() {
        assert_eq!(
            port_path(Path::new("/var/tmp/e2e/vsock.sock"), 1234),
            PathBuf::from("/var/tmp/e2e/vsock.sock_1234")
        );
    }
}
