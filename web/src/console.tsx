// A VM's serial console in the browser: xterm.js over the console WebSocket (the session
// cookie and this page's Origin authorise it), input and output, resize to the window, copy
// and paste as the terminal does them. Several viewers may attach at once.
import { useEffect, useRef, useState } from "preact/hooks";
import { Terminal } from "@xterm/xterm";
import { FitAddon } from "@xterm/addon-fit";
import { consoleUrl } from "./api";

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
    const socket = new WebSocket(consoleUrl(name));
    socket.binaryType = "arraybuffer";
    socket.onopen = () => setStatus("attached");
    socket.onmessage = (message) => {
      if (message.data instanceof ArrayBuffer) {
        term.write(new Uint8Array(message.data));
      } else {
        term.write(String(message.data));
      }
    };
    socket.onclose = (event) => setStatus(`closed${event.reason ? `: ${event.reason}` : ""} (code ${event.code})`);
    socket.onerror = () => setStatus("the console could not be opened (is the VM running, and may you attach?)");
    const encoder = new TextEncoder();
    const input = term.onData((data) => {
      if (socket.readyState === WebSocket.OPEN) {
        socket.send(encoder.encode(data));
      }
    });
    const resize = () => fit.fit();
    window.addEventListener("resize", resize);
    return () => {
      window.removeEventListener("resize", resize);
      input.dispose();
      socket.close();
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
