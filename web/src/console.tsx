// A VM's serial console in the browser: the end of its console.log first (the scrollback),
// then xterm.js over the console WebSocket (the session cookie and this page's Origin
// authorise it): input and output, resize to the window, copy and paste as the terminal does
// them. Several viewers may attach at once; each sees the same output.
import { useEffect, useRef, useState } from "preact/hooks";
import { Terminal } from "@xterm/xterm";
import { FitAddon } from "@xterm/addon-fit";
import { consoleUrl } from "./api";

/// How much of console.log is shown before attaching.
const SCROLLBACK_BYTES = 65536;

export function ConsolePage({ name }: { name: string }) {
  const host = useRef<HTMLDivElement>(null);
  const [status, setStatus] = useState("connecting…");
  useEffect(() => {
    if (!host.current) {
      return;
    }
    const term = new Terminal({ convertEol: true, scrollback: 5000, fontSize: 14 });
    const fit = new FitAddon();
    term.loadAddon(fit);
    term.open(host.current);
    fit.fit();
    term.focus();
    let socket: WebSocket | null = null;
    let closed = false;
    const attach = () => {
      if (closed) {
        return;
      }
      const ws = new WebSocket(consoleUrl(name));
      ws.binaryType = "arraybuffer";
      ws.onopen = () => setStatus("attached");
      ws.onmessage = (message) => {
        term.write(message.data instanceof ArrayBuffer ? new Uint8Array(message.data) : String(message.data));
      };
      ws.onclose = (event) => setStatus(`closed${event.reason ? `: ${event.reason}` : ""} (code ${event.code})`);
      ws.onerror = () => setStatus("the console could not be opened (is the VM running, and may you attach?)");
      socket = ws;
    };
    fetch(`/vms/${encodeURIComponent(name)}/console/log?bytes=${SCROLLBACK_BYTES}`, { credentials: "same-origin" })
      .then(async (r) => {
        if (r.ok) {
          term.write(new Uint8Array(await r.arrayBuffer()));
        }
      })
      .catch(() => undefined)
      .finally(attach);
    const encoder = new TextEncoder();
    const input = term.onData((data) => {
      if (socket && socket.readyState === WebSocket.OPEN) {
        socket.send(encoder.encode(data));
      }
    });
    const resize = () => fit.fit();
    window.addEventListener("resize", resize);
    return () => {
      closed = true;
      window.removeEventListener("resize", resize);
      input.dispose();
      socket?.close();
      term.dispose();
    };
  }, [name]);
  return (
    <>
      <h1>Console of {name}</h1>
      <p aria-live="polite" class="console-status">
        {status}
      </p>
      <div class="terminal" ref={host} />
      <p class="hint">
        Select to copy; paste with the browser's paste. Everything the guest wrote is also in its console.log on the
        host.
      </p>
    </>
  );
}
