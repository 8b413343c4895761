// Builds the console into dist/: one script and one stylesheet (names carry their content's
// hash, so browsers may keep them), index.html naming them, and a gzip copy of each for
// browsers that take it. keel's build embeds dist/ (crates/host/build.rs).
import * as esbuild from "esbuild";
import { gzipSync } from "node:zlib";
import { mkdirSync, readFileSync, rmSync, writeFileSync, readdirSync } from "node:fs";
import { basename, join } from "node:path";

const here = new URL("..", import.meta.url).pathname;
const dist = join(here, "dist");
rmSync(dist, { recursive: true, force: true });
mkdirSync(dist, { recursive: true });

const result = await esbuild.build({
  entryPoints: { app: join(here, "src/main.tsx") },
  bundle: true,
  minify: true,
  format: "esm",
  // The terminal (xterm.js, most of the bytes) loads only on a console page.
  splitting: true,
  chunkNames: "chunk-[hash]",
  target: "es2022",
  jsx: "automatic",
  jsxImportSource: "preact",
  entryNames: "[name]-[hash]",
  outdir: dist,
  metafile: true,
  legalComments: "none",
  logLevel: "warning",
});
const entry = Object.entries(result.metafile.outputs).find(([, o]) => o.entryPoint?.endsWith("src/main.tsx"));
const script = basename(entry[0]);
const style = entry[1].cssBundle ? basename(entry[1].cssBundle) : undefined;
const html = readFileSync(join(here, "index.html"), "utf8")
  .replace("%SCRIPT%", script)
  .replace("%STYLE%", style ?? "");
writeFileSync(join(dist, "index.html"), html);
let total = 0;
for (const file of readdirSync(dist)) {
  const bytes = readFileSync(join(dist, file));
  const gzipped = gzipSync(bytes, { level: 9 });
  writeFileSync(join(dist, `${file}.gz`), gzipped);
  total += gzipped.length;
  console.log(`keel console: ${file} ${bytes.length} B, ${gzipped.length} B gzipped`);
}
console.log(`keel console: ${total} B gzipped in all`);
