//! `keel vm console NAME`: the terminal joined to a VM's serial console through the API's
//! WebSocket (`GET /vms/NAME/console`), on the Unix socket or TCP alike, so it works from
//! anywhere the API is reachable and is authorised and audited as the API is. Raw mode while
//! attached; Ctrl-A x detaches (the VM keeps running), Ctrl-A Ctrl-A sends a Ctrl-A. When
//! stdin ends (a pipe or /dev/null) the output keeps coming until the VM ends.

use std::io::{Read, Write};

use anyhow::{Context, Result};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use vmm::console::{EscapeParser, RawTerminal};

use crate::client::{query_value, Client};

/// What the terminal gave.
enum Input {
    ForGuest(Vec<u8>),
    /// Ctrl-A x.
    Detach,
}

/// Reads the terminal on its own thread (a blocking read cannot be cancelled; the thread ends
/// with the process) and passes what it read on, escapes already taken out. The channel
/// closes at the end of input.
fn read_terminal() -> mpsc::Receiver<Input> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        let mut escape = EscapeParser::default();
        let mut buf = [0u8; 1024];
        let mut stdin = std::io::stdin();
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            let input = escape.feed(&buf[..n]);
            if !input.for_guest.is_empty()
                && tx.blocking_send(Input::ForGuest(input.for_guest)).is_err()
            {
                return;
            }
            if input.quit {
                let _ = tx.blocking_send(Input::Detach);
                return;
            }
        }
    });
    rx
}

pub async fn attach(client: &Client, name: &str) -> Result<()> {
    let ws = client
        .websocket(&format!("/vms/{}/console", query_value(name)))
        .await
        .with_context(|| format!("attaching to VM '{name}''s console"))?;
    let (mut to_vm, mut from_vm) = ws.split();
    eprintln!("keel: attached to {name}'s console; Ctrl-A x detaches\r");
    let terminal = RawTerminal::enter()?;
    let mut input = read_terminal();
    let mut input_open = true;
    let mut stdout = std::io::stdout();
    loop {
        tokio::select! {
            message = from_vm.next() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    if stdout.write_all(&bytes).and_then(|_| stdout.flush()).is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Text(text))) => {
                    if stdout.write_all(text.as_bytes()).and_then(|_| stdout.flush()).is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                // The daemon closed it: the VM ended (or the daemon went away).
                Some(Ok(Message::Close(_)) | Err(_)) | None => break,
            },
            typed = input.recv(), if input_open => match typed {
                Some(Input::ForGuest(bytes)) => {
                    if to_vm.send(Message::binary(bytes)).await.is_err() {
                        break;
                    }
                }
                Some(Input::Detach) => {
                    drop(terminal);
                    let _ = to_vm.send(Message::Close(None)).await;
                    eprintln!("keel: detached from {name}'s console; the VM keeps running");
                    return Ok(());
                }
                // No more input: keep showing output until the VM ends.
                None => input_open = false,
            },
        }
    }
    drop(terminal);
    eprintln!("keel: {name}'s console closed");
    Ok(())
}
