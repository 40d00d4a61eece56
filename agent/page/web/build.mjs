// Bundle the household page: src/main.js and src/style.css into OUT (default ../static), minified, with a
// gzip copy of each file for browsers that accept it. Run by ci/page after `npm ci`.
import { build } from "esbuild";
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { gzipSync } from "node:zlib";
import { join } from "node:path";

const out = process.argv[2] || new URL("../static", import.meta.url).pathname;
mkdirSync(out, { recursive: true });
await build({
  entryPoints: { app: "src/main.js", style: "src/style.css" },
  bundle: true,
  minify: true,
  format: "iife",
  target: ["es2020"],
  outdir: out,
  legalComments: "none",
  logLevel: "warning",
});
copyFileSync("src/index.html", join(out, "index.html"));
for (const name of ["app.js", "style.css", "index.html"]) {
  const data = readFileSync(join(out, name));
  writeFileSync(join(out, name + ".gz"), gzipSync(data, { level: 9 }));
  console.log(`${name}: ${data.length} bytes, ${gzipSync(data, { level: 9 }).length} gzipped`);
}
