// SLA evidence: the report for a period and a VM, availability per day as a chart, the
// evidence to download (the report as JSON and CSV, the signed ledger export), and the
// ledger's verification with a button to run it again.
import { useEffect, useState } from "preact/hooks";
import { api, LedgerVerification, SlaReport } from "./api";
import { message } from "./format";
import { Alert } from "./alert";

const DAY_MS = 86_400_000;

function day(iso: string): string {
  return iso.slice(0, 10);
}

/// The days of [from, to), at most 92.
function days(from: string, to: string): [string, string][] {
  const out: [string, string][] = [];
  for (let t = Date.parse(from); t < Date.parse(to) && out.length < 92; t += DAY_MS) {
    out.push([new Date(t).toISOString(), new Date(Math.min(t + DAY_MS, Date.parse(to))).toISOString()]);
  }
  return out;
}

function Chart({ points }: { points: { day: string; percent: number | null }[] }) {
  const width = 24;
  const height = 120;
  return (
    <svg
      class="chart"
      role="img"
      aria-label={`Availability per day: ${points.map((p) => `${p.day} ${p.percent === null ? "no data" : `${p.percent.toFixed(2)}%`}`).join(", ")}`}
      viewBox={`0 0 ${points.length * width} ${height + 20}`}
      width={Math.min(points.length * width, 1000)}
      height={height + 20}
    >
      {points.map((p, i) => {
        const h = p.percent === null ? 0 : (p.percent / 100) * height;
        return (
          <g key={p.day}>
            <rect
              x={i * width + 2}
              y={height - h}
              width={width - 4}
              height={h}
              class={p.percent !== null && p.percent < 100 ? "bar-down" : "bar-up"}
            >
              <title>{`${p.day}: ${p.percent === null ? "no data" : `${p.percent.toFixed(3)} %`}`}</title>
            </rect>
            <text x={i * width + width / 2} y={height + 14} text-anchor="middle" class="axis">
              {p.day.slice(8)}
            </text>
          </g>
        );
      })}
    </svg>
  );
}

export function SlaPage() {
  const now = new Date();
  const [from, setFrom] = useState(day(new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), 1)).toISOString()));
  const [to, setTo] = useState(day(new Date(Date.parse(day(now.toISOString())) + DAY_MS).toISOString()));
  const [vm, setVm] = useState("");
  const [credits, setCredits] = useState("99.95:10,99:25");
  const [report, setReport] = useState<SlaReport | null>(null);
  const [chart, setChart] = useState<{ day: string; percent: number | null }[]>([]);
  const [verification, setVerification] = useState<LedgerVerification | null>(null);
  const [error, setError] = useState<string | null>(null);
  const query = (f: string, t: string, format?: string) => {
    const q = new URLSearchParams({ from: f, to: t });
    if (vm.trim() !== "") q.set("vm", vm.trim());
    if (credits.trim() !== "") q.set("credits", credits.trim());
    if (format) q.set("format", format);
    return q.toString();
  };
  // The window ends now at the latest: what has not happened yet is neither up nor down.
  const window = () =>
    [
      `${from}T00:00:00Z`,
      new Date(Math.min(Date.parse(`${to}T00:00:00Z`), Date.now())).toISOString(),
    ] as const;
  const run = async () => {
    const [f, t] = window();
    try {
      const r = await api.sla(query(f, t));
      setReport(r);
      const perDay = await Promise.all(
        days(f, t).map(async ([a, b]) => {
          const d = await api.sla(query(a, b));
          const rows = d.vms;
          const percent = rows.length === 0 ? null : rows.reduce((n, v) => n + v.availability_percent, 0) / rows.length;
          return { day: day(a), percent };
        }),
      );
      setChart(perDay);
      setError(null);
    } catch (e) {
      setError(message(e));
    }
  };
  const verify = async () => {
    try {
      setVerification(await api.verify());
    } catch (e) {
      setError(message(e));
    }
  };
  useEffect(() => {
    run();
    verify();
  }, []);
  const [f, t] = window();
  return (
    <>
      <h1>SLA evidence</h1>
      <form
        class="filters"
        onSubmit={(e) => {
          e.preventDefault();
          run();
        }}
      >
        <label>
          From <input type="date" value={from} onChange={(e) => setFrom((e.target as HTMLInputElement).value)} />
        </label>
        <label>
          To (exclusive) <input type="date" value={to} onChange={(e) => setTo((e.target as HTMLInputElement).value)} />
        </label>
        <label>
          VM (empty: all) <input value={vm} onChange={(e) => setVm((e.target as HTMLInputElement).value)} />
        </label>
        <label>
          Credit tiers <input value={credits} onChange={(e) => setCredits((e.target as HTMLInputElement).value)} />
        </label>
        <button type="submit">Report</button>
      </form>
      <Alert text={error} />
      {report && (
        <>
          <p>
            {report.from} to {report.to}; ledger {report.ledger_verified ? "verified" : "does NOT verify"}, head{" "}
            <code>{report.ledger_head_hash}</code>
          </p>
          <h2>Availability per day (mean over the VMs)</h2>
          <Chart points={chart} />
          <table>
            <thead>
              <tr>
                <th scope="col">VM</th>
                <th scope="col">Availability</th>
                <th scope="col">Down (s)</th>
                <th scope="col">Outages</th>
                <th scope="col">Excluded (s)</th>
                <th scope="col">Credit</th>
              </tr>
            </thead>
            <tbody>
              {report.vms.map((v) => (
                <tr key={v.vm}>
                  <td>{v.vm}</td>
                  <td>{v.availability_percent.toFixed(3)} %</td>
                  <td>{v.downtime_seconds.toFixed(0)}</td>
                  <td>{v.outages}</td>
                  <td>{v.excluded_seconds.toFixed(0)}</td>
                  <td>{v.credit_percent} %</td>
                </tr>
              ))}
            </tbody>
          </table>
          <p class="downloads">
            Download the evidence:{" "}
            <a href={`/sla?${query(f, t)}`} download="sla-report.json">
              report (JSON)
            </a>{" "}
            <a href={`/sla?${query(f, t, "csv")}`} download="sla-report.csv">
              report (CSV)
            </a>{" "}
            <a href="/ledger/export" download="ledger-export.jsonl">
              signed ledger export
            </a>{" "}
            (check it anywhere with <code>keel ledger verify --export FILE --pubkey KEY</code>)
          </p>
        </>
      )}
      <section aria-labelledby="verify">
        <h2 id="verify">Ledger verification</h2>
        {verification && (
          <p class={verification.ok ? "ok" : "fail"}>
            {verification.ok
              ? `Verified: ${verification.rows} rows, head ${verification.head_seq}:${verification.head_hash}`
              : `Does NOT verify: ${verification.problems.length} problem(s)${verification.anchor_problem ? `; ${verification.anchor_problem}` : ""}`}
          </p>
        )}
        {verification && !verification.ok && (
          <ul>
            {verification.problems.map((p) => (
              <li key={`${p.seq}-${p.problem}`}>{p.problem}</li>
            ))}
          </ul>
        )}
        <button type="button" onClick={verify}>
          Verify the ledger now
        </button>
      </section>
    </>
  );
}
