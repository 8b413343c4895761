// A failure the page reports: one sentence (the API's own, mostly), announced to screen
// readers, shown as text.
export function Alert({ text }: { text: string | null }) {
  return text ? (
    <p role="alert" class="error">
      {text}
    </p>
  ) : null;
}
