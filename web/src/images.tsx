// The image library: the images with their size, space on disk and the VMs using them; an
// import form (a file in the host's image directories) whose progress is followed as the
// daemon reports it; removal of an unused image; the latest long operations.
import { useCallback, useEffect, useState } from "preact/hooks";
import { api, ImageInfo, may, Operation, SessionInfo } from "./api";
import { message } from "./format";
import { useLive, useTickets } from "./live";
import { Alert } from "./alert";

function size(bytes: number): string {
  return bytes >= 1 << 30 ? `${(bytes / (1 << 30)).toFixed(1)} GiB` : `${(bytes / (1 << 20)).toFixed(1)} MiB`;
}

/// An operation's progress: bytes, rate, time left, or how it ended.
function Progress({ op }: { op: Operation }) {
  const percent = op.total_bytes > 0 ? Math.floor((100 * op.done_bytes) / op.total_bytes) : 0;
  return (
    <div class="operation">
      <span>
        {op.kind} {op.target}
        {op.step ? `: ${op.step}` : ""}
      </span>{" "}
      {op.state === "running" ? (
        <>
          <progress max={100} value={percent} aria-label={`${op.kind} ${op.target}`} /> {percent}% ·{" "}
          {size(op.done_bytes)} of {size(op.total_bytes)} · {size(op.rate)}/s
          {op.eta_secs !== undefined && op.eta_secs !== null ? ` · ${Math.ceil(op.eta_secs)} s left` : ""}
        </>
      ) : op.state === "done" ? (
        <span class="ok">done{op.result ? `: ${op.result}` : ""}</span>
      ) : (
        <span class="fail">failed: {op.error}</span>
      )}
      {op.notes && op.notes.length > 0 && (
        <ul class="notes">
          {op.notes.map((n) => (
            <li key={n}>{n}</li>
          ))}
        </ul>
      )}
    </div>
  );
}

function ImportForm({ onStarted }: { onStarted: (op: Operation) => void }) {
  const [error, setError] = useState<string | null>(null);
  const submit = async (event: Event) => {
    event.preventDefault();
    const form = event.currentTarget as HTMLFormElement;
    const data = new FormData(form);
    const source = String(data.get("source") ?? "").trim();
    const name = String(data.get("name") ?? "").trim();
    const format = String(data.get("format") ?? "");
    try {
      const op = await api.importImage({
        name: name || (source.split("/").pop() ?? "").replace(/\.[^.]*$/, "").toLowerCase(),
        source,
        format: format === "" ? undefined : (format as "raw" | "qcow2" | "vmdk"),
      });
      setError(null);
      form.reset();
      onStarted(op);
    } catch (e) {
      setError(message(e));
    }
  };
  return (
    <form class="import" onSubmit={submit}>
      <h2>Import an image</h2>
      <label>
        File (in the host's image directories) <input name="source" required placeholder="/var/lib/keel/images/incoming/disk.vmdk" />
      </label>
      <label>
        Name <input name="name" placeholder="from the file's name" />
      </label>
      <label>
        Format{" "}
        <select name="format">
          <option value="">from the file's extension</option>
          <option value="raw">raw</option>
          <option value="qcow2">qcow2</option>
          <option value="vmdk">vmdk (converted to raw)</option>
        </select>
      </label>
      <button type="submit">Import</button>
      <Alert text={error} />
    </form>
  );
}

export function ImagesPage({ session }: { session: SessionInfo }) {
  const [images, setImages] = useState<ImageInfo[]>([]);
  const [operations, setOperations] = useState<Operation[]>([]);
  const [error, setError] = useState<string | null>(null);
  const tickets = useTickets();
  const load = useCallback(async () => {
    const ticket = tickets.take();
    try {
      const [i, o] = await Promise.all([api.images(), api.operations()]);
      if (tickets.isNewest(ticket)) {
        setImages(i);
        setOperations(o.slice(0, 10));
        setError(null);
      }
    } catch (e) {
      if (tickets.isNewest(ticket)) {
        setError(message(e));
      }
    }
  }, [tickets]);
  useEffect(() => {
    load();
  }, [load]);
  // An image appears with a ledger row (pushed); running operations are polled while any is.
  useLive(useCallback(() => load(), [load]));
  const running = operations.some((o) => o.state === "running");
  useEffect(() => {
    if (!running) {
      return;
    }
    const timer = setInterval(load, 500);
    return () => clearInterval(timer);
  }, [running, load]);
  const remove = async (name: string) => {
    if (!confirm(`Remove image ${name} and its file?`)) {
      return;
    }
    try {
      await api.removeImage(name);
      load();
    } catch (e) {
      setError(message(e));
    }
  };
  const operator = may(session.role, "operator");
  return (
    <>
      <h1>Images</h1>
      <Alert text={error} />
      {operations.length > 0 && (
        <section aria-labelledby="operations">
          <h2 id="operations">Operations</h2>
          {operations.map((o) => (
            <Progress key={o.id} op={o} />
          ))}
        </section>
      )}
      {images.length === 0 ? (
        <p>No images yet: import a raw, qcow2 or VMware disk from the host's image directories.</p>
      ) : (
        <table>
          <caption>The image library</caption>
          <thead>
            <tr>
              <th scope="col">Name</th>
              <th scope="col">Format</th>
              <th scope="col">Size</th>
              <th scope="col">On disk</th>
              <th scope="col">Imported from</th>
              <th scope="col">Used by</th>
              {operator && <th scope="col">Actions</th>}
            </tr>
          </thead>
          <tbody>
            {images.map((i) => (
              <tr key={i.name} data-image={i.name}>
                <th scope="row">{i.name}</th>
                <td>{i.format}</td>
                <td>{size(i.virtual_size)}</td>
                <td>{size(i.allocated_bytes)}</td>
                <td>{i.source}</td>
                <td>{i.used_by.length === 0 ? "no VM" : i.used_by.join(", ")}</td>
                {operator && (
                  <td>
                    <button
                      type="button"
                      aria-label={`Remove ${i.name}`}
                      disabled={i.used_by.length > 0}
                      onClick={() => remove(i.name)}
                    >
                      Remove {i.name}
                    </button>
                  </td>
                )}
              </tr>
            ))}
          </tbody>
        </table>
      )}
      {operator && <ImportForm onStarted={() => load()} />}
    </>
  );
}
