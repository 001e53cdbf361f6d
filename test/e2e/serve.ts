// Helpers for the e2e specs: the real `shieldlab serve` on a fresh home (it serves the built
// renderer from dist/renderer), its API for setup, and a watch on the page's console.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import type { Page } from '@playwright/test';
import type { Args, CallOutcome, MethodName, Result } from '../../core/app/contract.ts';

export const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const NODE = join(ROOT, 'node_modules/.bin/node');

export interface Serving {
  url: string;
  origin: string;
  child: ChildProcess;
  home: string;
  stderr: string[];
}

export async function serve(): Promise<Serving> {
  const home = await mkdtemp(join(tmpdir(), 'shieldlab-e2e-'));
  const child = spawn(NODE, ['bin/shieldlab.js', 'serve', '--home', home, '--port', '0', '--json'], {
    cwd: ROOT,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const stderr: string[] = [];
  child.stderr!.setEncoding('utf8').on('data', (t: string) => stderr.push(t));
  const line = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`shieldlab serve printed no URL in 20 s:\n${stderr.join('')}`)), 20_000);
    child.once('exit', (code) => reject(new Error(`shieldlab serve exited (${code}):\n${stderr.join('')}`)));
    createInterface({ input: child.stdout! }).once('line', (l) => {
      clearTimeout(timer);
      resolve(l);
    });
  });
  const { url } = JSON.parse(line) as { url: string; port: number };
  return { url, origin: new URL(url).origin, child, home, stderr };
}

export async function stop(s: Serving): Promise<void> {
  if (s.child.exitCode === null) {
    const exited = new Promise((resolve) => s.child.once('exit', resolve));
    s.child.kill('SIGTERM');
    const timer = setTimeout(() => s.child.kill('SIGKILL'), 5_000);
    await exited;
    clearTimeout(timer);
  }
  await rm(s.home, { recursive: true, force: true });
}

/** The API without the page, for a spec's setup: the bearer token from the printed URL, JSON in and out. */
export async function call<M extends MethodName>(s: Serving, method: M, args: Args<M>): Promise<Result<M>> {
  const token = new URL(s.url).searchParams.get('token') ?? '';
  const res = await fetch(`${s.origin}/api/call/${method}`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
    body: JSON.stringify(args),
  });
  const outcome = (await res.json()) as CallOutcome<M>;
  if (!outcome.ok) throw new Error(`${method} failed: ${outcome.error.code}: ${outcome.error.message}`);
  return outcome.result;
}

/** Console errors (CSP violations included) and uncaught exceptions. Refusals the API answers with
 * an HTTP error status (401 for a wrong passphrase) are expected and logged by Chromium: skipped. */
export function watchForErrors(page: Page): string[] {
  const errors: string[] = [];
  const expected = /^Failed to load resource: the server responded with a status of 4\d\d/;
  page.on('console', (m) => m.type() === 'error' && !expected.test(m.text()) && errors.push(m.text()));
  page.on('pageerror', (e) => errors.push(e.message));
  return errors;
}
