// Keel's web console: sign in with an API token, then the front page, problems first.
import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { api, ApiError, SessionInfo } from "./api";
import { FrontPage } from "./front";
import "./app.css";

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
        {error && (
          <p role="alert" class="error">
            {error}
          </p>
        )}
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
        if (e instanceof ApiError && (e.status === 401 || e.status === 403)) {
          setSession(null);
        } else {
          setSession(null);
        }
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
    setSession(null);
  };
  return <FrontPage session={session} onSignOut={signOut} />;
}

const root = document.getElementById("app");
if (root) {
  render(<App />, root);
}
