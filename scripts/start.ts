// `npm start`: the desktop app. Builds what is missing, then runs Electron when its binary is here
// (or can be fetched); otherwise says why in one line and starts web mode (`shieldlab serve`).
// Extra arguments (--home DIR, --port N) pass through. SHIELDLAB_WEB=1 forces web mode.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';

const ROOT = resolve(import.meta.dirname, '..');
const NODE = process.execPath;
const ELECTRON_PKG = join(ROOT, 'node_modules/electron');
const INSTALL_TIMEOUT_MS = 60_000;

const say = (line: string) => process.stderr.write(`shieldlab start: ${line}\n`);

function fail(message: string): never {
  say(message);
  process.exit(1);
}

function runStep(label: string, args: string[]): void {
  say(label);
  const r = spawnSync(NODE, args, { cwd: ROOT, stdio: 'inherit' });
  if (r.status !== 0) fail(`${label} failed (${r.error?.message ?? `exit ${r.status ?? r.signal}`})`);
}

/** Newest modification time of the sources under these folders. */
function newestSource(dirs: string[]): number {
  let newest = 0;
  const walk = (dir: string) => {
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      const p = join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else if (/\.[mc]?ts$/.test(e.name)) newest = Math.max(newest, statSync(p).mtimeMs);
    }
  };
  for (const d of dirs) if (existsSync(join(ROOT, d))) walk(join(ROOT, d));
  return newest;
}

function ensureRenderer(): void {
  if (existsSync(join(ROOT, 'dist/renderer/index.html'))) return;
  runStep('building the renderer (vite)', ['node_modules/vite/bin/vite.js', 'build']);
}

function ensureMain(): void {
  const outputs = ['dist/electron/main.js', 'dist/electron/preload.cjs'].map((p) => join(ROOT, p));
  const built = outputs.every(existsSync) ? Math.min(...outputs.map((p) => statSync(p).mtimeMs)) : 0;
  if (built > newestSource(['core', 'electron'])) return;
  runStep('compiling core and electron (tsc)', ['node_modules/typescript/bin/tsc', '-p', 'tsconfig.build.json']);
}

/** The Electron executable if it is on disk, found as node_modules/electron/index.js finds it. */
function electronOnDisk(): string | null {
  const pathFile = join(ELECTRON_PKG, 'path.txt');
  const rel = existsSync(pathFile) ? readFileSync(pathFile, 'utf8').trim() : '';
  const override = process.env.ELECTRON_OVERRIDE_DIST_PATH;
  if (!override && !rel) return null;
  const bin = override ? join(override, rel || 'electron') : join(ELECTRON_PKG, 'dist', rel);
  return existsSync(bin) ? bin : null;
}

/** The binary, fetching it once if needed; or why there is none. */
function findElectron(): { bin: string } | { reason: string; forced?: boolean } {
  if (process.env.SHIELDLAB_WEB === '1') return { reason: 'SHIELDLAB_WEB=1', forced: true };
  if (!existsSync(join(ELECTRON_PKG, 'package.json'))) return { reason: 'the electron package is not installed (run npm install)' };
  const present = electronOnDisk();
  if (present) return { bin: present };
  const r = spawnSync(NODE, [join(ELECTRON_PKG, 'install.js')], { cwd: ROOT, encoding: 'utf8', timeout: INSTALL_TIMEOUT_MS, stdio: ['ignore', 'pipe', 'pipe'] });
  const fetched = electronOnDisk();
  if (r.status === 0 && fetched) return { bin: fetched };
  if (r.error && (r.error as NodeJS.ErrnoException).code === 'ETIMEDOUT') return { reason: `fetching it timed out after ${INSTALL_TIMEOUT_MS / 1000} s` };
  const firstError = `${r.stderr ?? ''}\n${r.stdout ?? ''}`.split('\n').map((l) => l.trim()).find((l) => l.length > 0);
  return { reason: `it is not downloaded and fetching it failed (${firstError ?? `exit ${r.status ?? r.signal}`})` };
}

/** Runs a child with our stdio, forwards termination signals, and exits with its status. */
function handOver(command: string, args: string[], env: NodeJS.ProcessEnv): void {
  const child = spawn(command, args, { cwd: ROOT, stdio: 'inherit', env });
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(sig, () => child.kill(sig));
  child.on('error', (err) => fail(`could not start ${command}: ${err.message}`));
  child.on('exit', (code, signal) => process.exit(code ?? (signal ? 1 : 0)));
}

const extra = process.argv.slice(2);
ensureRenderer();
const electron = findElectron();
if ('bin' in electron) {
  ensureMain();
  const env = { ...process.env };
  delete env.ELECTRON_RUN_AS_NODE; // would turn the binary into plain Node
  say(`launching Electron (${electron.bin})`);
  handOver(electron.bin, [ROOT, ...extra], env); // the app folder: package.json "main" → dist/electron/main.js
} else {
  const why = electron.forced ? 'Electron skipped: SHIELDLAB_WEB=1' : `Electron binary unavailable: ${electron.reason}`;
  process.stderr.write(`${why} — starting web mode\n`);
  const cli = join(ROOT, 'bin/shieldlab.js');
  if (!existsSync(cli)) fail('bin/shieldlab.js is missing: cannot start web mode');
  handOver(NODE, [cli, 'serve', ...extra], process.env);
}
