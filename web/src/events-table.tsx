// Ledger rows as a table: the events page's and each VM page's.
import type { Event } from "./api";

export function EventsTable({ rows, showVm }: { rows: Event[]; showVm: boolean }) {
  return (
    <table class="events">
      <thead>
        <tr>
          <th scope="col">#</th>
          <th scope="col">Time</th>
          <th scope="col">Kind</th>
          {showVm && <th scope="col">VM</th>}
          <th scope="col">Change</th>
          <th scope="col">Cause</th>
          <th scope="col">Who</th>
          <th scope="col">Detail</th>
        </tr>
      </thead>
      <tbody>
        {rows.map((e) => (
          <tr key={e.seq}>
            <td>{e.seq}</td>
            <td>{e.time}</td>
            <td>{e.kind}</td>
            {showVm && <td>{e.vm ?? ""}</td>}
            <td>{e.to ? `${e.from ?? ""} → ${e.to}` : ""}</td>
            <td>{e.cause}</td>
            <td>{e.actor}</td>
            <td>{e.detail}</td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}
