// Temp homes and a CLI runner that starts the real `shieldlab` binary.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { spawn } from 'node:child_process';

export const ROOT = resolve(import.meta.dirname, '../..');
export const CLI = join(ROOT, 'bin/shieldlab.js');

export function tempDir(prefix = 'shieldlab-test-'): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** Writes a secret to a 0600 file, as a user would for --passphrase-file. */
export function secretFile(dir: string, name: string, text: string): string {
  const p = join(dir, name);
  writeFileSync(p, text, { mode: 0o600 });
  return p;
}

export interface CliResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export function runCli(args: string[], opts: { stdin?: string; env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): Promise<CliResult> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], {
      env: { ...process.env, ...opts.env },
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 60_000);
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolvePromise({ code, signal, stdout, stderr });
    });
    child.stdin.end(opts.stdin ?? '');
  });
}

/** Runs the CLI with --json and parses stdout. */
export async function cliJson<T = Record<string, unknown>>(args: string[], opts: Parameters<typeof runCli>[1] = {}): Promise<{ code: number | null; body: T; stderr: string }> {
  const r = await runCli([...args, '--json'], opts);
  let body: T;
  try {
    body = JSON.parse(r.stdout) as T;
  } catch {
    throw new Error(`not JSON (exit ${r.code}): ${r.stdout}\n${r.stderr}`);
  }
  return { code: r.code, body, stderr: r.stderr };
}

/**
 * A CLI step that must succeed (its JSON body) and one that must fail with exit 1 and a typed
 * error code, each failing the test with the command and what it printed.
 */
export async function cliOk<T = Record<string, any>>(args: string[]): Promise<T> { // eslint-disable-line @typescript-eslint/no-explicit-any
  const r = await cliJson<T>(args);
  if (r.code !== 0) throw new Error(`${args.join(' ')} exited ${r.code}: ${JSON.stringify(r.body)} ${r.stderr}`);
  return r.body;
}

export async function cliFails(args: string[], code: string): Promise<{ error: { code: string; message: string } }> {
  const r = await cliJson<{ error: { code: string; message: string } }>(args);
  if (r.code !== 1 || r.body.error?.code !== code) throw new Error(`${args.join(' ')} should fail with ${code} (exit 1), got exit ${r.code}: ${JSON.stringify(r.body)}`);
  return r.body;
}
