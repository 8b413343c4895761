// The console's API types are generated from the daemon's OpenAPI document; this fails when
// either has drifted: `keel openapi` (the binary given) must print web/openapi.json, and
// openapi-typescript must turn that into src/api-types.ts. Then the document is validated.
// Regenerate both with: keel openapi > openapi.json && npm run api-types
import { execFileSync } from "node:child_process";
import { readFileSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const keel = process.argv[2];
if (!keel) {
  console.error("usage: check-api.mjs PATH_TO_KEEL");
  process.exit(2);
}
const here = new URL("..", import.meta.url).pathname;
const fail = (what) => {
  console.error(`keel console: ${what}`);
  console.error("regenerate: target/debug/keel openapi > web/openapi.json && (cd web && npm run api-types)");
  process.exit(1);
};
const printed = execFileSync(keel, ["openapi"], { encoding: "utf8" });
const committed = readFileSync(join(here, "openapi.json"), "utf8");
if (JSON.stringify(JSON.parse(printed)) !== JSON.stringify(JSON.parse(committed))) {
  fail("web/openapi.json differs from what `keel openapi` prints");
}
const scratch = mkdtempSync(join(tmpdir(), "keel-api-"));
try {
  const generated = join(scratch, "api-types.ts");
  execFileSync(join(here, "node_modules/.bin/openapi-typescript"), [join(here, "openapi.json"), "-o", generated], { stdio: "ignore" });
  if (readFileSync(generated, "utf8") !== readFileSync(join(here, "src/api-types.ts"), "utf8")) {
    fail("web/src/api-types.ts differs from what openapi-typescript makes of web/openapi.json");
  }
} finally {
  rmSync(scratch, { recursive: true, force: true });
}
execFileSync("node", [join(here, "scripts/validate-openapi.mjs"), join(here, "openapi.json")], { stdio: "inherit" });
console.log("keel console: API document and types agree with the daemon");
