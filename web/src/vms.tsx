// The VMs: a list with filters and sorting, the actions each role may take (with a
// confirmation where work or data could be lost), and the form that defines a VM.
import { useState } from "preact/hooks";
import { api, may, Role, VmInfo, VmSpec } from "./api";
import { message, since } from "./format";
import { Alert } from "./alert";

export type Availability = Record<string, number>;

/// States with a VMM: a stop ends it.
const UP = new Set(["running", "starting", "shutting-down", "paused"]);

/// What each action does, and whether it asks first.
const ACTIONS: { name: string; label: string; when: (state: string) => boolean; confirm?: string }[] = [
  { name: "start", label: "Start", when: (s) => s === "stopped" || s === "crashed" },
  {
    name: "shutdown",
    label: "Shut down",
    when: (s) => s === "running",
    confirm: "Press the power button of {vm}? The guest decides how to shut down.",
  },
  { name: "reboot", label: "Reboot", when: (s) => s === "running", confirm: "Power-cycle {vm}? Unsaved work in the guest is lost." },
  { name: "pause", label: "Pause", when: (s) => s === "running" },
  { name: "resume", label: "Resume", when: (s) => s === "paused" },
  { name: "stop", label: "Stop", when: (s) => UP.has(s), confirm: "Power {vm} off now? Unsaved work in the guest is lost." },
  {
    name: "delete",
    label: "Delete",
    when: (s) => s === "stopped" || s === "crashed",
    confirm: "Delete the definition of {vm}? Its disk files are kept.",
  },
];

export async function act(action: string, vm: string): Promise<void> {
  switch (action) {
    case "start":
      await api.start(vm);
      return;
    case "shutdown":
      await api.shutdown(vm);
      return;
    case "reboot":
      await api.reboot(vm);
      return;
    case "pause":
      await api.pause(vm);
      return;
    case "resume":
      await api.resume(vm);
      return;
    case "stop":
      await api.stop(vm);
      return;
    case "delete":
      await api.remove(vm);
      return;
  }
}

export function Actions({ vm, role, onDone }: { vm: VmInfo; role: Role; onDone: (error: string | null) => void }) {
  if (!may(role, "operator")) {
    return null;
  }
  const name = vm.spec.name;
  const run = async (action: (typeof ACTIONS)[number]) => {
    if (action.confirm && !window.confirm(action.confirm.replace("{vm}", name))) {
      return;
    }
    try {
      await act(action.name, name);
      onDone(null);
    } catch (e) {
      onDone(`${action.label} ${name}: ${message(e)}`);
    }
  };
  return (
    <span class="actions">
      {ACTIONS.filter((a) => a.when(vm.state)).map((a) => (
        <button type="button" key={a.name} onClick={() => run(a)} aria-label={`${a.label} ${name}`}>
          {a.label}
        </button>
      ))}
    </span>
  );
}

type Sort = "name" | "state" | "memory";

export function VmList({
  vms,
  availability,
  role,
  onChange,
}: {
  vms: VmInfo[];
  availability: Availability;
  role: Role;
  onChange: () => void;
}) {
  const [filter, setFilter] = useState("");
  const [state, setState] = useState("all");
  const [sort, setSort] = useState<Sort>("name");
  const [error, setError] = useState<string | null>(null);
  const shown = vms
    .filter((v) => v.spec.name.includes(filter.trim()))
    .filter((v) => state === "all" || v.state === state)
    .sort((a, b) => {
      if (sort === "state") return a.state.localeCompare(b.state) || a.spec.name.localeCompare(b.spec.name);
      if (sort === "memory") return (b.spec.memory_mib ?? 0) - (a.spec.memory_mib ?? 0);
      return a.spec.name.localeCompare(b.spec.name);
    });
  const states = Array.from(new Set(vms.map((v) => v.state))).sort();
  return (
    <section aria-labelledby="vms">
      <h2 id="vms">VMs</h2>
      <div class="filters">
        <label>
          Name contains <input value={filter} onInput={(e) => setFilter((e.target as HTMLInputElement).value)} />
        </label>
        <label>
          State{" "}
          <select value={state} onChange={(e) => setState((e.target as HTMLSelectElement).value)}>
            <option value="all">all</option>
            {states.map((s) => (
              <option key={s} value={s}>
                {s}
              </option>
            ))}
          </select>
        </label>
        <label>
          Sort by{" "}
          <select value={sort} onChange={(e) => setSort((e.target as HTMLSelectElement).value as Sort)}>
            <option value="name">name</option>
            <option value="state">state</option>
            <option value="memory">memory</option>
          </select>
        </label>
      </div>
      <Alert text={error} />
      {vms.length === 0 ? (
        <p>No VM is defined yet.</p>
      ) : (
        <table>
          <thead>
            <tr>
              <th scope="col">Name</th>
              <th scope="col">State</th>
              <th scope="col">vCPUs</th>
              <th scope="col">Memory</th>
              <th scope="col">In this state for</th>
              <th scope="col">Availability this month</th>
              {may(role, "operator") && <th scope="col">Actions</th>}
            </tr>
          </thead>
          <tbody>
            {shown.map((vm) => (
              <tr key={vm.spec.name} data-vm={vm.spec.name}>
                <td>
                  <a href={`#/vms/${encodeURIComponent(vm.spec.name)}`}>{vm.spec.name}</a>
                </td>
                <td class={`state-${vm.state}`}>{vm.state}</td>
                <td>{vm.spec.cpus}</td>
                <td>{vm.spec.memory_mib} MiB</td>
                <td>{since(vm.since)}</td>
                <td>{vm.spec.name in availability ? `${availability[vm.spec.name].toFixed(3)} %` : "-"}</td>
                {may(role, "operator") && (
                  <td>
                    <Actions
                      vm={vm}
                      role={role}
                      onDone={(e) => {
                        setError(e);
                        onChange();
                      }}
                    />
                  </td>
                )}
              </tr>
            ))}
          </tbody>
        </table>
      )}
    </section>
  );
}

/// The same rule as the API's (api::vm::check_name): the form says so before the API does.
const NAME = /^[a-z0-9][a-z0-9._-]{0,62}$/;

export function CreateVm({ onCreated }: { onCreated: (name: string) => void }) {
  const [error, setError] = useState<string | null>(null);
  const submit = async (event: Event) => {
    event.preventDefault();
    const form = event.currentTarget as HTMLFormElement;
    const value = (field: string) => (form.elements.namedItem(field) as HTMLInputElement).value.trim();
    const name = value("name");
    if (!NAME.test(name)) {
      setError(`name '${name}' is not allowed: lowercase letters, digits, '.', '-', '_', at most 63, not starting with a sign`);
      return;
    }
    const spec: VmSpec = {
      name,
      kernel: value("kernel") || null,
      cmdline: value("cmdline"),
      cpus: Number(value("cpus")),
      memory_mib: Number(value("memory")),
      disks: value("disk") ? [{ path: value("disk") }] : [],
      autostart: (form.elements.namedItem("autostart") as HTMLInputElement).checked,
    };
    try {
      await api.create(spec);
      if ((form.elements.namedItem("start") as HTMLInputElement).checked) {
        await api.start(name);
      }
      form.reset();
      setError(null);
      onCreated(name);
    } catch (e) {
      // The API's own sentence: its checks are the rule.
      setError(message(e));
    }
  };
  return (
    <section aria-labelledby="create">
      <h2 id="create">Define a VM</h2>
      <form class="create" onSubmit={submit}>
        <label>
          Name <input name="name" required pattern="[a-z0-9][a-z0-9._\-]{0,62}" />
        </label>
        <label>
          Kernel (a path in an image directory; empty: boot from the first disk) <input name="kernel" />
        </label>
        <label>
          Kernel command line <input name="cmdline" />
        </label>
        <label>
          vCPUs <input name="cpus" type="number" min="1" max="32" value="1" required />
        </label>
        <label>
          Memory (MiB) <input name="memory" type="number" min="16" value="256" required />
        </label>
        <label>
          Disk (a path in an image directory) <input name="disk" />
        </label>
        <label class="check">
          <input name="autostart" type="checkbox" /> Start when the host boots
        </label>
        <label class="check">
          <input name="start" type="checkbox" /> Start it now
        </label>
        <button type="submit">Define</button>
        <Alert text={error} />
      </form>
    </section>
  );
}
