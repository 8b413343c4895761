// The console's only way to the daemon: the public REST API, with the browser's session
// cookie (never a token in a URL or in storage). Types come from the OpenAPI document.
import type { components } from "./api-types";

type Schemas = components["schemas"];
export type HostStatus = Schemas["HostStatus"];
export type VmInfo = Schemas["VmInfo"];
export type Incident = Schemas["Incident"];
export type SessionInfo = Schemas["SessionInfo"];
export type Role = Schemas["Role"];

/// An answer that is not 2xx: the daemon's one sentence, and the status.
export class ApiError extends Error {
  constructor(
    message: string,
    readonly status: number,
  ) {
    super(message);
  }
}

async function answer<T>(response: Response): Promise<T> {
  if (!response.ok) {
    let message = response.statusText || `HTTP ${response.status}`;
    try {
      const body = (await response.json()) as Schemas["ErrorBody"];
      message = body.error;
    } catch {
      // not JSON: keep the status text
    }
    throw new ApiError(message, response.status);
  }
  if (response.status === 204) {
    return undefined as T;
  }
  return (await response.json()) as T;
}

async function call<T>(method: string, path: string, body?: unknown): Promise<T> {
  const response = await fetch(path, {
    method,
    credentials: "same-origin",
    headers: body === undefined ? {} : { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return answer<T>(response);
}

export type VmSpec = Schemas["VmSpec"];
export type ImageInfo = Schemas["ImageInfo"];
export type Operation = Schemas["Operation"];
export type ImportRequest = Schemas["ImportRequest"];
export type Event = Schemas["Event"];
export type SlaReport = Schemas["SlaReport"];
export type LedgerVerification = Schemas["LedgerVerification"];
export type SnapshotInfo = Schemas["SnapshotInfo"];
export type UpgradeReport = Schemas["UpgradeReport"];
export type MigrationProgress = Schemas["MigrationProgress"];
export type MigrateRequest = Schemas["MigrateRequest"];

const vm = (name: string, action = "") => `/vms/${encodeURIComponent(name)}${action}`;

export const api = {
  session: () => call<SessionInfo>("GET", "/session"),
  /// Trades the token for a session cookie; the token is not kept anywhere.
  signIn: async (token: string) =>
    answer<SessionInfo>(
      await fetch("/session", {
        method: "POST",
        credentials: "same-origin",
        headers: { authorization: `Bearer ${token}` },
      }),
    ),
  signOut: () => call<void>("DELETE", "/session"),
  host: () => call<HostStatus>("GET", "/"),
  vms: () => call<VmInfo[]>("GET", "/vms"),
  ack: (id: number) => call<void>("POST", `/incidents/${id}/ack`),
  vm: (name: string) => call<VmInfo>("GET", vm(name)),
  create: (spec: VmSpec) => call<VmInfo>("POST", "/vms", spec),
  start: (name: string) => call<VmInfo>("POST", vm(name, "/start")),
  stop: (name: string) => call<VmInfo>("POST", vm(name, "/stop")),
  reboot: (name: string) => call<VmInfo>("POST", vm(name, "/reboot")),
  pause: (name: string) => call<VmInfo>("POST", vm(name, "/pause")),
  resume: (name: string) => call<VmInfo>("POST", vm(name, "/resume")),
  shutdown: (name: string) => call<VmInfo>("POST", vm(name, "/shutdown?wait=false")),
  remove: (name: string) => call<void>("DELETE", vm(name)),
  snapshots: (name: string) => call<SnapshotInfo[]>("GET", vm(name, "/snapshots")),
  snapshot: (name: string) => call<SnapshotInfo>("POST", vm(name, "/snapshots"), {}),
  restore: (name: string, snapshot: string) => call<VmInfo>("POST", vm(name, "/restore"), { snapshot }),
  removeSnapshot: (name: string, snapshot: string) =>
    call<void>("DELETE", vm(name, `/snapshots/${encodeURIComponent(snapshot)}`)),
  upgrade: (name: string) => call<UpgradeReport>("POST", vm(name, "/upgrade")),
  migration: (name: string) => call<MigrationProgress>("GET", vm(name, "/migration")),
  migrate: (name: string, request: MigrateRequest) => call<MigrationProgress>("POST", vm(name, "/migrate"), request),
  cancelMigration: (name: string) => call<MigrationProgress>("DELETE", vm(name, "/migration")),
  events: (query: string) => call<Event[]>("GET", `/events?${query}`),
  images: () => call<ImageInfo[]>("GET", "/images"),
  importImage: (request: ImportRequest) => call<Operation>("POST", "/images", request),
  removeImage: (name: string) => call<void>("DELETE", `/images/${encodeURIComponent(name)}`),
  operations: () => call<Operation[]>("GET", "/operations"),
  operation: (id: number) => call<Operation>("GET", `/operations/${id}`),
  sla: (query: string) => call<SlaReport>("GET", `/sla?${query}`),
  verify: () => call<LedgerVerification>("GET", "/ledger/verify"),
};

/// The path of a VM's console WebSocket, as a URL on this host.
export function consoleUrl(name: string): string {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${vm(name, "/console")}`;
}

const rank: Record<Role, number> = { viewer: 0, operator: 1, admin: 2 };

/// Whether `role` includes `needed`: the console shows only what the caller may use.
export function may(role: Role, needed: Role): boolean {
  return rank[role] >= rank[needed];
}
