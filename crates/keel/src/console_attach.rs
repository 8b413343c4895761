//! `keel vm console NAME`: the terminal joined to a VM's serial console socket. Raw mode while
//! attached; Ctrl-A x detaches (the VM keeps running), Ctrl-A Ctrl-A sends a Ctrl-A.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{Context, Result};
use vmm::console::{EscapeParser, RawTerminal};

pub fn attach(name: &str, socket: &Path) -> Result<()> {
    let stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "attaching to VM '{name}''s console at {} (this works only on the VM's host)",
            socket.display()
        )
    })?;
    let mut from_vm = stream.try_clone().context("cloning the console socket")?;
    eprintln!("keel: attached to {name}'s console; Ctrl-A x detaches\r");
    let terminal = RawTerminal::enter()?;
    // Guest output to the terminal until the VMM closes the socket (the VM ended).
    let output = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut stdout = std::io::stdout();
        loop {
            match from_vm.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if stdout
                        .write_all(&buf[..n])
                        .and_then(|_| stdout.flush())
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    let mut to_vm = stream;
    let mut escape = EscapeParser::default();
    let mut buf = [0u8; 1024];
    let mut stdin = std::io::stdin();
    loop {
        if output.is_finished() {
            break;
        }
        let n = match stdin.read(&mut buf) {
            // No more input (a pipe or /dev/null): keep showing output until the VM ends.
            Ok(0) => {
                let _ = output.join();
                drop(terminal);
                eprintln!("keel: {name}'s console closed");
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading the terminal"),
        };
        let input = escape.feed(&buf[..n]);
        if !input.for_guest.is_empty() && to_vm.write_all(&input.for_guest).is_err() {
            break;
        }
        if input.quit {
            drop(terminal);
            eprintln!("keel: detached from {name}'s console; the VM keeps running");
            let _ = to_vm.shutdown(std::net::Shutdown::Both);
            return Ok(());
        }
    }
    drop(terminal);
    eprintln!("keel: {name}'s console closed");
    Ok(())
}
