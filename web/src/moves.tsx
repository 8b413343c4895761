// A VM that moves: its snapshots (take, restore, remove), a VMM upgrade, and a live
// migration to another host's daemon with its progress, for the VM page.
import { useCallback, useEffect, useState } from "preact/hooks";
import { api, ApiError, MigrationProgress, SnapshotInfo, VmInfo } from "./api";
import { message } from "./format";
import { Alert } from "./alert";

const mib = (bytes: number) => `${(bytes / 1048576).toFixed(1)} MiB`;

export function Snapshots({ vm, onChange }: { vm: VmInfo; onChange: () => void }) {
  const name = vm.spec.name;
  const [snapshots, setSnapshots] = useState<SnapshotInfo[]>([]);
  const [busy, setBusy] = useState<string | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [notice, setNotice] = useState<string | null>(null);
  const load = useCallback(async () => {
    try {
      setSnapshots(await api.snapshots(name));
    } catch (e) {
      setError(message(e));
    }
  }, [name]);
  useEffect(() => {
    load();
  }, [load, vm.state]);
  const running = vm.state === "running" || vm.state === "paused";
  const act = async (what: string, work: () => Promise<string | null>) => {
    setBusy(what);
    setError(null);
    setNotice(null);
    try {
      setNotice(await work());
    } catch (e) {
      setError(`${what}: ${message(e)}`);
    }
    setBusy(null);
    load();
    onChange();
  };
  return (
    <section aria-labelledby="snapshots">
      <h2 id="snapshots">Snapshots</h2>
      <p>
        {running && (
          <button
            type="button"
            aria-label={`Snapshot ${name}`}
            disabled={busy !== null}
            onClick={() =>
              act(`Snapshot ${name}`, async () => {
                const s = await api.snapshot(name);
                return `Snapshot ${s.name} taken: the guest stood still ${(s.paused_seconds * 1000).toFixed(1)} ms.`;
              })
            }
          >
            Snapshot {name}
          </button>
        )}{" "}
        {vm.state === "running" && (
          <button
            type="button"
            aria-label={`Upgrade the VMM of ${name}`}
            disabled={busy !== null}
            onClick={() =>
              act(`Upgrade ${name}`, async () => {
                const r = await api.upgrade(name);
                return `Its VMM was upgraded (pid ${r.old_pid} to ${r.new_pid}): the guest stood still ${r.paused_ms.toFixed(2)} ms.`;
              })
            }
          >
            Upgrade the VMM of {name}
          </button>
        )}
      </p>
      {busy && <p role="status">{busy}…</p>}
      {notice && <p role="status">{notice}</p>}
      <Alert text={error} />
      {snapshots.length === 0 ? (
        <p>No snapshots.</p>
      ) : (
        <table>
          <caption>Snapshots of {name}</caption>
          <thead>
            <tr>
              <th scope="col">Name</th>
              <th scope="col">Taken</th>
              <th scope="col">Memory stored</th>
              <th scope="col">Disks</th>
              <th scope="col">Stood still</th>
              <th scope="col">Actions</th>
            </tr>
          </thead>
          <tbody>
            {snapshots.map((s) => (
              <tr key={s.name} data-snapshot={s.name}>
                <th scope="row">{s.name}</th>
                <td>{s.taken}</td>
                <td>{mib(s.memory_stored_bytes)}</td>
                <td>{s.disks.length}</td>
                <td>{(s.paused_seconds * 1000).toFixed(1)} ms</td>
                <td>
                  <button
                    type="button"
                    aria-label={`Restore ${s.name}`}
                    disabled={busy !== null || vm.state !== "stopped"}
                    title={vm.state === "stopped" ? undefined : "Stop the VM first"}
                    onClick={() => {
                      if (window.confirm(`Restore ${name} to snapshot ${s.name}? Its disks go back to that instant.`)) {
                        act(`Restore ${s.name}`, async () => {
                          await api.restore(name, s.name);
                          return `${name} runs on from snapshot ${s.name}.`;
                        });
                      }
                    }}
                  >
                    Restore
                  </button>{" "}
                  <button
                    type="button"
                    aria-label={`Remove snapshot ${s.name}`}
                    disabled={busy !== null}
                    onClick={() => {
                      if (window.confirm(`Remove snapshot ${s.name} of ${name}? Its files are deleted.`)) {
                        act(`Remove ${s.name}`, async () => {
                          await api.removeSnapshot(name, s.name);
                          return null;
                        });
                      }
                    }}
                  >
                    Remove
                  </button>
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
    </section>
  );
}

export function Migration({ vm, onChange }: { vm: VmInfo; onChange: () => void }) {
  const name = vm.spec.name;
  const [progress, setProgress] = useState<MigrationProgress | null>(null);
  const [error, setError] = useState<string | null>(null);
  const load = useCallback(async () => {
    try {
      setProgress(await api.migration(name));
    } catch (e) {
      // None since the daemon started.
      if (!(e instanceof ApiError && e.status === 404)) {
        setError(message(e));
      }
    }
  }, [name]);
  const underWay = progress !== null && !["done", "failed", "cancelled"].includes(progress.phase);
  useEffect(() => {
    load();
    if (!underWay) {
      return;
    }
    const timer = setInterval(load, 250);
    return () => clearInterval(timer);
  }, [load, underWay]);
  const submit = async (event: Event) => {
    event.preventDefault();
    const form = event.currentTarget as HTMLFormElement;
    const field = (n: string) => (form.elements.namedItem(n) as HTMLInputElement).value.trim();
    const downtime = field("max_downtime_ms");
    try {
      setError(null);
      setProgress(
        await api.migrate(name, {
          to: field("to"),
          token: field("token"),
          fingerprint: field("fingerprint"),
          max_downtime_ms: downtime === "" ? undefined : Number(downtime),
        }),
      );
      form.reset();
    } catch (e) {
      setError(message(e));
    }
    onChange();
  };
  return (
    <section aria-labelledby="migration">
      <h2 id="migration">Migration</h2>
      {progress && (
        <div class="migration" data-phase={progress.phase}>
          <p>
            To {progress.to}: <strong>{progress.phase}</strong>, {progress.rounds} round(s),{" "}
            {mib(progress.bytes_sent)} of {mib(progress.memory_bytes)} sent, the guest writing{" "}
            {progress.dirty_rate_mib_s.toFixed(1)} MiB/s, the link carrying {progress.bandwidth_mib_s.toFixed(1)} MiB/s
            {progress.downtime_ms != null
              ? `; the guest stood still ${progress.downtime_ms.toFixed(2)} ms`
              : `; the switch would stand it still ${progress.expected_downtime_ms.toFixed(1)} ms (${progress.max_downtime_ms} allowed)`}
          </p>
          {progress.error && <p class="error">{progress.error}</p>}
          {underWay && progress.phase !== "switching" && (
            <button
              type="button"
              aria-label={`Cancel the migration of ${name}`}
              onClick={async () => {
                try {
                  setProgress(await api.cancelMigration(name));
                } catch (e) {
                  setError(message(e));
                }
              }}
            >
              Cancel
            </button>
          )}
        </div>
      )}
      <Alert text={error} />
      {vm.state === "running" && !underWay && (
        <form class="migrate" onSubmit={submit}>
          <label>
            Target daemon <input name="to" required placeholder="https://host2:8443" />
          </label>
          <label>
            Its certificate's SHA-256 fingerprint <input name="fingerprint" required />
          </label>
          <label>
            An operator token of it <input name="token" type="password" required autocomplete="off" />
          </label>
          <label>
            Most downtime, ms <input name="max_downtime_ms" inputMode="numeric" placeholder="50" />
          </label>
          <button type="submit" aria-label={`Migrate ${name}`}>
            Migrate
          </button>
        </form>
      )}
    </section>
  );
}
