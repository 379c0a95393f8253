// Builds the console's front end into dist/, which the control plane embeds
// (crates/control/src/console/assets.rs). `node build.mjs --check` builds in memory and
// fails if dist/ differs from what these sources and the locked packages give, so that the
// committed bundle is always the one the sources make (dev/test runs it).

import * as esbuild from 'esbuild';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const src = path.join(here, 'src');
const dist = path.join(here, 'dist');
const check = process.argv.includes('--check');

const common = {
  bundle: true,
  minify: true,
  write: false,
  logLevel: 'warning',
  legalComments: 'eof',
  charset: 'utf8',
};

async function build() {
  const js = await esbuild.build({
    ...common,
    entryPoints: [path.join(src, 'main.js')],
    outfile: path.join(dist, 'app.js'),
    format: 'iife',
    platform: 'browser',
    target: ['es2020'],
    define: { 'process.env.NODE_ENV': '"production"' },
  });
  const css = await esbuild.build({
    ...common,
    entryPoints: [path.join(src, 'app.css')],
    outfile: path.join(dist, 'app.css'),
  });
  const files = new Map();
  for (const f of [...js.outputFiles, ...css.outputFiles]) files.set(path.basename(f.path), Buffer.from(f.contents));
  for (const name of ['index.html', 'icon.svg']) files.set(name, fs.readFileSync(path.join(src, name)));
  return files;
}

const files = await build();
if (check) {
  const differ = [];
  for (const [name, bytes] of files) {
    const file = path.join(dist, name);
    if (!fs.existsSync(file) || !fs.readFileSync(file).equals(bytes)) differ.push(name);
  }
  const extra = fs.existsSync(dist) ? fs.readdirSync(dist).filter((n) => !files.has(n)) : [];
  if (differ.length || extra.length) {
    console.error(`console/dist/ is not what the sources build: ${[...differ.map((n) => `${n} differs`), ...extra.map((n) => `${n} is extra`)].join(', ')}; run \`npm run build\` in console/ and commit dist/`);
    process.exit(1);
  }
  console.log(`console/dist/ matches the sources (${[...files.keys()].join(', ')})`);
} else {
  fs.mkdirSync(dist, { recursive: true });
  for (const [name, bytes] of files) fs.writeFileSync(path.join(dist, name), bytes);
  const sizes = [...files].map(([n, b]) => `${n} ${(b.length / 1024).toFixed(1)} KiB`).join(', ');
  console.log(`built console/dist/: ${sizes}`);
}
