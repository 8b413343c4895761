// One VM: its state and actions, its definition, its events and its availability this month
// from the ledger, and a way to its console.
import { useCallback, useEffect, useState } from "preact/hooks";
import { api, Event, may, SessionInfo, SlaReport, VmInfo } from "./api";
import { message, monthStart, since } from "./format";
import { EventsTable } from "./events-table";
import { useLive, useTickets } from "./live";
import { Actions } from "./vms";
import { Alert } from "./alert";
import { Migration, Snapshots } from "./moves";

export function VmPage({ name, session }: { name: string; session: SessionInfo }) {
  const [vm, setVm] = useState<VmInfo | null>(null);
  const [events, setEvents] = useState<Event[]>([]);
  const [sla, setSla] = useState<SlaReport | null>(null);
  const [error, setError] = useState<string | null>(null);
  const tickets = useTickets();
  const load = useCallback(async () => {
    const ticket = tickets.take();
    try {
      const query = new URLSearchParams({ vm: name, limit: "50" }).toString();
      const window = new URLSearchParams({ vm: name, from: monthStart(), to: new Date().toISOString() }).toString();
      const [v, e, s] = await Promise.all([api.vm(name), api.events(query), api.sla(window)]);
      if (!tickets.isNewest(ticket)) {
        return;
      }
      setVm(v);
      setEvents(e.slice().reverse());
      setSla(s);
    } catch (e) {
      if (tickets.isNewest(ticket)) {
        setError(message(e));
      }
    }
  }, [name, tickets]);
  useEffect(() => {
    load();
  }, [load]);
  useLive(
    useCallback(
      (row) => {
        if (row === null || row.vm === name) {
          load();
        }
      },
      [name, load],
    ),
  );
  if (!vm) {
    return error ? <Alert text={error} /> : <p>Loading {name}…</p>;
  }
  const availability = sla?.vms.find((v) => v.vm === name);
  return (
    <>
      <h1>
        VM {vm.spec.name}: <span class={`state-${vm.state}`}>{vm.state}</span>
      </h1>
      <p>
        {vm.state} for {since(vm.since)}
        {vm.reason ? ` (${vm.reason})` : ""}
      </p>
      <Alert text={error} />
      <p>
        <Actions
          vm={vm}
          role={session.role}
          onDone={(e) => {
            setError(e);
            load();
          }}
        />{" "}
        {may(session.role, "operator") && vm.state === "running" && (
          <a class="button" href={`#/vms/${encodeURIComponent(name)}/console`}>
            Console
          </a>
        )}
      </p>
      <section aria-labelledby="availability">
        <h2 id="availability">Availability this month</h2>
        {availability ? (
          <p>
            {availability.availability_percent.toFixed(3)} %: {availability.outages} outage(s),{" "}
            {availability.downtime_seconds.toFixed(0)} s down, from the ledger
            {sla?.ledger_verified ? " (verified)" : " (the ledger does NOT verify)"}
          </p>
        ) : (
          <p>No ledger rows for this VM this month.</p>
        )}
      </section>
      {may(session.role, "operator") && (
        <>
          <Snapshots vm={vm} onChange={load} />
          <Migration vm={vm} onChange={load} />
        </>
      )}
      <section aria-labelledby="definition">
        <h2 id="definition">Definition</h2>
        <pre class="definition">{JSON.stringify(vm.spec, null, 2)}</pre>
        {vm.usage && (
          <p>
            Jail uid {vm.usage.jail_id}; memory {Math.round((vm.usage.memory_bytes ?? 0) / 1048576)} of{" "}
            {Math.round((vm.usage.memory_limit_bytes ?? 0) / 1048576)} MiB; tasks {vm.usage.tasks} of {vm.usage.tasks_limit}
          </p>
        )}
      </section>
      <section aria-labelledby="events">
        <h2 id="events">Events</h2>
        <EventsTable rows={events} showVm={false} />
      </section>
    </>
  );
}
