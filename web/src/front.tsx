// The front page: open incidents, failed operations and warnings first; then host health and
// the VMs. Everything a guest or a caller wrote is rendered as text (Preact escapes it).
import { useCallback, useEffect, useState } from "preact/hooks";
import { api, HostStatus, may, SessionInfo, VmInfo } from "./api";
import { message, monthStart } from "./format";
import { useLive, useTickets } from "./live";
import { Availability, CreateVm, VmList } from "./vms";
import { Alert } from "./alert";

function Problems({ status, session, reload }: { status: HostStatus; session: SessionInfo; reload: () => void }) {
  const [error, setError] = useState<string | null>(null);
  const ack = async (id: number) => {
    try {
      await api.ack(id);
      reload();
    } catch (e) {
      setError(e instanceof Error ? e.message : String(e));
    }
  };
  const none = status.incidents.length === 0 && (status.failed_operations ?? []).length === 0 && status.warnings.length === 0;
  if (none) {
    return (
      <section class="allwell" aria-labelledby="problems">
        <h2 id="problems">Problems</h2>
        <p>
          All is well{status.quiet_since ? ` since ${status.quiet_since}` : ""}: no open incidents, no failed operations, no
          warnings.
        </p>
      </section>
    );
  }
  return (
    <section class="problems" aria-labelledby="problems">
      <h2 id="problems">Problems</h2>
      <Alert text={error} />
      {status.incidents.length > 0 && (
        <table>
          <caption>Open incidents</caption>
          <thead>
            <tr>
              <th scope="col">Opened</th>
              <th scope="col">VM</th>
              <th scope="col">Cause</th>
              <th scope="col">Summary</th>
              {may(session.role, "operator") && <th scope="col">Action</th>}
            </tr>
          </thead>
          <tbody>
            {status.incidents.map((i) => (
              <tr key={i.id} class="incident">
                <td>{i.opened}</td>
                <td>{i.vm ?? "-"}</td>
                <td>{i.cause}</td>
                <td>{i.summary}</td>
                {may(session.role, "operator") && (
                  <td>
                    <button type="button" onClick={() => ack(i.id)}>
                      Acknowledge
                    </button>
                  </td>
                )}
              </tr>
            ))}
          </tbody>
        </table>
      )}
      {(status.failed_operations ?? []).length > 0 && (
        <table>
          <caption>Failed operations</caption>
          <thead>
            <tr>
              <th scope="col">Time</th>
              <th scope="col">Who</th>
              <th scope="col">Request</th>
              <th scope="col">Status</th>
              <th scope="col">Why</th>
            </tr>
          </thead>
          <tbody>
            {(status.failed_operations ?? []).map((f, n) => (
              <tr key={n}>
                <td>{f.time}</td>
                <td>{f.actor}</td>
                <td>{f.request}</td>
                <td>{f.status}</td>
                <td>{f.error}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
      {status.warnings.length > 0 && (
        <ul class="warnings" aria-label="Warnings">
          {status.warnings.map((w, n) => (
            <li key={n}>{w}</li>
          ))}
        </ul>
      )}
    </section>
  );
}

function gib(bytes: number): string {
  return (bytes / 1073741824).toFixed(1);
}

function Health({ status }: { status: HostStatus }) {
  return (
    <section aria-labelledby="health">
      <h2 id="health">Host {status.hostname}</h2>
      <p>
        Health: <strong class={`health-${status.health}`}>{status.health}</strong>; {status.vms_running} of{" "}
        {status.vms_total} VMs running; keel {status.version}
      </p>
      {status.resources && (
        <p>
          {status.resources.cpus} CPUs, load {status.resources.load_1m.toFixed(2)};{" "}
          {gib(status.resources.memory_available_bytes)} of {gib(status.resources.memory_total_bytes)} GiB memory
          available; running VMs have {status.resources.vm_memory_mib} of {status.resources.vm_memory_allowed_mib} MiB
          Keel may give them; {status.resources.vmm_processes} VMM process(es) watched
        </p>
      )}
      <table>
        <caption>Checks</caption>
        <tbody>
          {status.checks.map((c) => (
            <tr key={c.name}>
              <th scope="row">{c.name}</th>
              <td class={c.ok ? "ok" : "fail"}>{c.ok ? "ok" : "FAIL"}</td>
              <td>{c.detail}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </section>
  );
}

export function FrontPage({ session }: { session: SessionInfo }) {
  const [status, setStatus] = useState<HostStatus | null>(null);
  const [vms, setVms] = useState<VmInfo[]>([]);
  const [availability, setAvailability] = useState<Availability>({});
  const [error, setError] = useState<string | null>(null);
  const tickets = useTickets();
  const load = useCallback(async () => {
    const ticket = tickets.take();
    try {
      const window = new URLSearchParams({ from: monthStart(), to: new Date().toISOString() }).toString();
      const [s, v, sla] = await Promise.all([api.host(), api.vms(), api.sla(window)]);
      if (!tickets.isNewest(ticket)) {
        return;
      }
      setStatus(s);
      setVms(v);
      setAvailability(Object.fromEntries(sla.vms.map((a) => [a.vm, a.availability_percent])));
      setError(null);
    } catch (e) {
      if (tickets.isNewest(ticket)) {
        setError(message(e));
      }
    }
  }, [tickets]);
  useEffect(() => {
    load();
  }, [load]);
  // Every new ledger row (a state change, an incident, an API call) may change the page.
  useLive(useCallback(() => load(), [load]));
  return (
    <>
      {session.warning && <p class="warning">{session.warning}</p>}
      <Alert text={error} />
      {status && (
        <>
          <Problems status={status} session={session} reload={load} />
          <Health status={status} />
          <VmList vms={vms} availability={availability} role={session.role} onChange={load} />
          {may(session.role, "operator") && <CreateVm onCreated={() => load()} />}
        </>
      )}
    </>
  );
}
