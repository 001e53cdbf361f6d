#!/usr/bin/env node
// Launcher: ShieldLab runs on Node ≥ 22.18 (better-sqlite3 13, TypeScript type stripping). Started by an
// older node, it re-runs itself on the Node 22 that the project installs from the npm registry.
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { fileURLToPath, pathToFileURL } from 'node:url';

const [major, minor] = process.versions.node.split('.').map(Number);
if (major < 22 || (major === 22 && minor < 18)) {
  let node;
  try {
    node = createRequire(import.meta.url).resolve('node/bin/node');
  } catch {
    process.stderr.write(`shieldlab: error [usage]: Node ${process.versions.node} is too old and the project's Node 22 is not installed (run npm install).\n`);
    process.exit(2);
  }
  const child = spawn(node, [fileURLToPath(import.meta.url), ...process.argv.slice(2)], { stdio: 'inherit' });
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) process.on(sig, () => child.kill(sig));
  child.on('exit', (code, signal) => process.exit(code ?? (signal ? 1 : 0)));
} else {
  const source = new URL('../core/cli/main.ts', import.meta.url);
  const built = new URL('../dist/core/cli/main.js', import.meta.url);
  const entry = existsSync(fileURLToPath(source)) ? source : built;
  const { run } = await import(pathToFileURL(fileURLToPath(entry)).href);
  process.exitCode = await run(process.argv.slice(2));
}
