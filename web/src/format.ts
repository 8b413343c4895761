// Small formatting helpers shared by the pages.

/// The first instant of this month, UTC, as RFC 3339.
export function monthStart(now = new Date()): string {
  return new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), 1)).toISOString();
}

/// How long since an RFC 3339 time, roughly ("3 h 12 min").
export function since(time: string, now = Date.now()): string {
  const then = Date.parse(time);
  if (Number.isNaN(then)) {
    return "-";
  }
  let seconds = Math.max(0, Math.floor((now - then) / 1000));
  const days = Math.floor(seconds / 86400);
  seconds -= days * 86400;
  const hours = Math.floor(seconds / 3600);
  seconds -= hours * 3600;
  const minutes = Math.floor(seconds / 60);
  if (days > 0) return `${days} d ${hours} h`;
  if (hours > 0) return `${hours} h ${minutes} min`;
  if (minutes > 0) return `${minutes} min`;
  return `${seconds} s`;
}

export function message(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
