// New ledger rows pushed by the daemon (GET /events/stream, server-sent events): pages that
// show state refresh when a row arrives instead of polling. The browser reconnects by itself.
import { useEffect, useRef } from "preact/hooks";
import type { Event } from "./api";

type Listener = (row: Event | null) => void;
const listeners = new Set<Listener>();
let source: EventSource | null = null;

function connect() {
  if (source) {
    return;
  }
  source = new EventSource("/events/stream", { withCredentials: true });
  const deliver = (message: MessageEvent) => {
    let row: Event | null = null;
    try {
      row = JSON.parse(message.data) as Event;
    } catch {
      row = null;
    }
    listeners.forEach((l) => l(row));
  };
  for (const kind of ["state", "audit", "host"]) {
    source.addEventListener(kind, deliver);
  }
  // Rows were missed: a full reload of what is shown.
  source.addEventListener("lagged", () => listeners.forEach((l) => l(null)));
  // After a reconnect, what changed meanwhile is read again.
  source.addEventListener("open", () => listeners.forEach((l) => l(null)));
}

/// Calls `onRow` for each new row (null: reload everything), while the component is shown.
export function useLive(onRow: Listener) {
  useEffect(() => {
    connect();
    listeners.add(onRow);
    return () => {
      listeners.delete(onRow);
    };
  }, [onRow]);
}

export function disconnect() {
  source?.close();
  source = null;
}

/// Loads overlap when rows arrive in quick succession, and an older load's answer may come
/// back last: each load takes a ticket, and only the newest ticket's answer is shown.
export function useTickets() {
  // One object for the component's life: loads that depend on it are not remade each render.
  const tickets = useRef<{ take: () => number; isNewest: (ticket: number) => boolean } | null>(null);
  if (tickets.current === null) {
    let newest = 0;
    tickets.current = { take: () => ++newest, isNewest: (ticket) => ticket === newest };
  }
  return tickets.current;
}
