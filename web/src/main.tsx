// Keel's web console: sign in with an API token, then the front page, problems first.
import { ImagesPage } from "./images";
import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { api, ApiError, SessionInfo } from "./api";
import { EventsPage } from "./events";
import { FrontPage } from "./front";
import { SlaPage } from "./sla";
import { disconnect } from "./live";
import { VmPage } from "./vm";
import "./app.css";
import { Alert } from "./alert";

/// The console page, loaded when first shown (the terminal is most of the console's bytes).
function Console({ name }: { name: string }) {
  const [page, setPage] = useState<typeof import("./console").ConsolePage | null>(null);
  useEffect(() => {
    import("./console").then((m) => setPage(() => m.ConsolePage));
  }, []);
  const Page = page;
  return Page ? <Page name={name} /> : <p>Loading the terminal…</p>;
}

/// The page a location hash names: #/, #/vms/NAME, #/vms/NAME/console.
function useRoute(): string[] {
  const parse = () =>
    location.hash
      .replace(/^#\/?/, "")
      .split("/")
      .filter((p) => p !== "")
      .map(decodeURIComponent);
  const [route, setRoute] = useState(parse());
  useEffect(() => {
    const changed = () => setRoute(parse());
    window.addEventListener("hashchange", changed);
    return () => window.removeEventListener("hashchange", changed);
  }, []);
  return route;
}

function Shell({ session, onSignOut }: { session: SessionInfo; onSignOut: () => void }) {
  const route = useRoute();
  let page;
  if (route[0] === "vms" && route[1] && route[2] === "console") {
    page = <Console name={route[1]} />;
  } else if (route[0] === "events") {
    page = <EventsPage />;
  } else if (route[0] === "sla") {
    page = <SlaPage />;
  } else if (route[0] === "images") {
    page = <ImagesPage session={session} />;
  } else if (route[0] === "vms" && route[1]) {
    page = <VmPage name={route[1]} session={session} />;
  } else {
    page = <FrontPage session={session} />;
  }
  return (
    <>
      <header>
        <a class="brand" href="#/">
          Keel
        </a>
        <nav aria-label="Pages">
          <a href="#/">Front page</a> <a href="#/images">Images</a> <a href="#/events">Events</a>{" "}
          <a href="#/sla">SLA evidence</a>
        </nav>
        <span class="who">
          {session.actor} ({session.role})
        </span>
        <button type="button" onClick={onSignOut}>
          Sign out
        </button>
      </header>
      <main>{page}</main>
    </>
  );
}

function SignIn({ onSignedIn }: { onSignedIn: (s: SessionInfo) => void }) {
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const submit = async (event: Event) => {
    event.preventDefault();
    const form = event.currentTarget as HTMLFormElement;
    const field = form.elements.namedItem("token") as HTMLInputElement;
    setBusy(true);
    setError(null);
    try {
      const session = await api.signIn(field.value.trim());
      field.value = "";
      onSignedIn(session);
    } catch (e) {
      setError(e instanceof Error ? e.message : String(e));
    } finally {
      setBusy(false);
    }
  };
  return (
    <main class="signin">
      <h1>Keel</h1>
      <form onSubmit={submit}>
        <label for="token">API token</label>
        <input id="token" name="token" type="password" autocomplete="off" required />
        <p class="hint">
          An admin makes one with <code>keel token create NAME --role viewer</code>. It is sent once to
          make a session and not kept by this browser.
        </p>
        <button type="submit" disabled={busy}>
          Sign in
        </button>
        <Alert text={error} />
      </form>
    </main>
  );
}

function App() {
  const [session, setSession] = useState<SessionInfo | null | undefined>(undefined);
  useEffect(() => {
    api
      .session()
      .then(setSession)
      .catch((e) => {
        // Not signed in (401), or the daemon is away: the sign-in page says which on submit.
        if (!(e instanceof ApiError)) {
          console.warn(e);
        }
        setSession(null);
      });
  }, []);
  if (session === undefined) {
    return <p class="loading">Loading…</p>;
  }
  if (session === null) {
    return <SignIn onSignedIn={setSession} />;
  }
  const signOut = async () => {
    await api.signOut().catch(() => undefined);
    disconnect();
    setSession(null);
  };
  return <Shell session={session} onSignOut={signOut} />;
}

const root = document.getElementById("app");
if (root) {
  render(<App />, root);
}
