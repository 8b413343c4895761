// The ledger's newest rows, filtered by VM and kind; new rows appear as they are committed.
import { useCallback, useEffect, useState } from "preact/hooks";
import { api, Event } from "./api";
import { message } from "./format";
import { EventsTable } from "./events-table";
import { useLive, useTickets } from "./live";
import { Alert } from "./alert";

const KINDS = ["all", "state", "audit", "host"];

export function EventsPage() {
  const [vm, setVm] = useState("");
  const [kind, setKind] = useState("all");
  const [rows, setRows] = useState<Event[]>([]);
  const [error, setError] = useState<string | null>(null);
  const matches = useCallback(
    (e: Event) => (vm.trim() === "" || e.vm === vm.trim()) && (kind === "all" || e.kind === kind),
    [vm, kind],
  );
  const tickets = useTickets();
  const load = useCallback(async () => {
    const ticket = tickets.take();
    const query = new URLSearchParams({ limit: "200" });
    if (vm.trim() !== "") query.set("vm", vm.trim());
    if (kind !== "all") query.set("kind", kind);
    try {
      const rows = await api.events(query.toString());
      if (tickets.isNewest(ticket)) {
        setRows(rows.slice().reverse());
        setError(null);
      }
    } catch (e) {
      if (tickets.isNewest(ticket)) {
        setError(message(e));
      }
    }
  }, [vm, kind, tickets]);
  useEffect(() => {
    load();
  }, [load]);
  useLive(
    useCallback(
      (row) => {
        if (row === null) {
          load();
        } else if (matches(row)) {
          setRows((old) => (old.some((e) => e.seq === row.seq) ? old : [row, ...old].slice(0, 500)));
        }
      },
      [load, matches],
    ),
  );
  return (
    <>
      <h1>Events</h1>
      <div class="filters">
        <label>
          VM <input value={vm} onChange={(e) => setVm((e.target as HTMLInputElement).value)} />
        </label>
        <label>
          Kind{" "}
          <select value={kind} onChange={(e) => setKind((e.target as HTMLSelectElement).value)}>
            {KINDS.map((k) => (
              <option key={k} value={k}>
                {k}
              </option>
            ))}
          </select>
        </label>
      </div>
      <Alert text={error} />
      <EventsTable rows={rows} showVm={true} />
    </>
  );
}
