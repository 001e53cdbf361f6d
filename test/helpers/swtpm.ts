// A real swtpm (libtpms) per test, on free loopback ports in a temp dir, and tpm2-tools as the
// independent client to check ours against. Skips only when the tools are absent and CI is not
// set; under CI=true they must exist (.ci/run installs swtpm, swtpm-tools and tpm2-tools).
import { type ChildProcess, execFileSync, spawn, spawnSync } from 'node:child_process';
import { connect, createServer } from 'node:net';
import type { TestContext } from 'node:test';
import { tempDir } from './home.ts';

function has(cmd: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${cmd}`]).status === 0;
}

/** null → swtpm is there; otherwise why the caller should skip. */
export function swtpmMissing(): string | null {
  if (has('swtpm')) return null;
  if (process.env.CI) throw new Error('CI=true but swtpm missing: .ci/run must install swtpm and swtpm-tools');
  return 'needs swtpm (Debian: swtpm, swtpm-tools)';
}

/** null → tpm2-tools are there; same CI rule as swtpmMissing(). */
export function tpm2ToolsMissing(): string | null {
  const missing = ['tpm2_pcrread', 'tpm2_checkquote', 'tpm2_createek', 'tpm2_makecredential'].filter((c) => !has(c));
  if (missing.length === 0) return null;
  if (process.env.CI) throw new Error(`CI=true but ${missing.join(', ')} missing: .ci/run must install tpm2-tools`);
  return 'needs tpm2-tools (Debian: tpm2-tools)';
}

export interface Swtpm {
  /** Our client's address, also a valid tpm2-tools TCTI string. */
  address: string;
  host: string;
  port: number;
  ctrlPort: number;
  dir: string;
  process: ChildProcess;
  stop(): Promise<void>;
}

/** How swtpm starts: already started (startup-clear), needing TPM2_Startup, or needing CMD_INIT too. */
export type SwtpmStart = 'started' | 'needs-startup' | 'needs-init';

function portFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const srv = createServer();
    srv.once('error', () => resolve(false));
    srv.listen(port, '127.0.0.1', () => srv.close(() => resolve(true)));
  });
}

/** A port P with P and P + 1 both free on loopback. */
export async function freePortPair(): Promise<number> {
  for (let i = 0; i < 200; i++) {
    const p = 20_000 + 2 * Math.floor(Math.random() * 20_000);
    if ((await portFree(p)) && (await portFree(p + 1))) return p;
  }
  throw new Error('no free loopback port pair');
}

function canConnect(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect({ host: '127.0.0.1', port });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

/**
 * Starts `swtpm socket --tpm2` on free ports and stops it when the test ends. readiness = the
 * control port accepts connections (swtpm opens it after the data port; a probe there costs the
 * TPM nothing, whereas a data-port probe would occupy swtpm's single data connection).
 */
export async function startSwtpm(t: TestContext | null, start: SwtpmStart = 'started', opts: { stateDir?: string } = {}): Promise<Swtpm> {
  // A given state folder is the caller's (a TPM restarted on its state, or on an older copy of it): kept.
  const { dir, cleanup } = opts.stateDir ? { dir: opts.stateDir, cleanup: () => undefined } : tempDir('shieldlab-swtpm-');
  for (let attempt = 0; ; attempt++) {
    const port = await freePortPair();
    const flags = start === 'started' ? ['--flags', 'not-need-init,startup-clear'] : start === 'needs-startup' ? ['--flags', 'not-need-init'] : [];
    const child = spawn(
      'swtpm',
      ['socket', '--tpm2', '--tpmstate', `dir=${dir}`, '--server', `type=tcp,port=${port},bindaddr=127.0.0.1`, '--ctrl', `type=tcp,port=${port + 1},bindaddr=127.0.0.1`, ...flags],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    let exited = false;
    child.once('exit', () => (exited = true));
    const deadline = Date.now() + 10_000;
    while (!exited && Date.now() < deadline && !(await canConnect(port + 1))) await new Promise((r) => setTimeout(r, 20));
    if (!exited && Date.now() < deadline) {
      const stop = async () => {
        if (child.exitCode === null && child.signalCode === null) {
          const gone = new Promise((r) => child.once('exit', r));
          child.kill('SIGTERM');
          let timer: NodeJS.Timeout | undefined;
          await Promise.race([gone, new Promise((r) => (timer = setTimeout(r, 3000)))]);
          clearTimeout(timer); // a pending timer would keep the test process alive for 3 s
          if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
        }
        cleanup();
      };
      t?.after(stop);
      return { address: `swtpm:host=127.0.0.1,port=${port}`, host: '127.0.0.1', port, ctrlPort: port + 1, dir, process: child, stop };
    }
    child.kill('SIGKILL');
    // Lost a race for the ports: try others.
    if (attempt >= 3) {
      cleanup();
      throw new Error(`swtpm did not start: ${stderr}`);
    }
  }
}

/** Runs a tpm2-tools command against `tcti`; throws with its stderr on failure. */
export function tpm2(tool: string, args: string[], tcti: string | null, opts: { cwd?: string; input?: Buffer } = {}): string {
  try {
    return execFileSync(tool, tcti === null ? args : [...args, '-T', tcti], {
      encoding: 'utf8',
      cwd: opts.cwd,
      input: opts.input,
      stdio: ['pipe', 'pipe', 'pipe'],
      env: { ...process.env, TSS2_LOG: 'all+none' },
      timeout: 30_000,
    });
  } catch (err) {
    const e = err as { status?: number | null; stderr?: string; stdout?: string };
    throw new Error(`${tool} ${args.join(' ')} failed (exit ${e.status}):\n${e.stderr ?? ''}${e.stdout ?? ''}`.trimEnd(), { cause: err });
  }
}

/**
 * A measured boot on an swtpm: extends every measured event of a TCG event log into its PCR, in
 * each bank the log records that the TPM has (SHA-1, SHA-256), as firmware does — so the log
 * replays to the PCRs. The connection is closed afterwards (swtpm serves one client at a time).
 */
export async function measureLog(address: string, log: Uint8Array): Promise<void> {
  const { Tpm, TPM_ALG } = await import('../../core/tpm/mod.ts');
  const { parseEventLog, measuredEvents, PCR_COUNT } = await import('../../core/attestation/eventlog.ts');
  const parsed = parseEventLog(log);
  const algs: Record<string, number> = { sha1: TPM_ALG.SHA1, sha256: TPM_ALG.SHA256 };
  const events = Array.from({ length: PCR_COUNT }, (_, pcr) => measuredEvents(parsed, pcr)).flat().sort((a, b) => a.index - b.index);
  const tpm = await Tpm.open(address);
  try {
    for (const e of events) {
      const digests = Object.entries(e.digests).filter(([alg]) => alg in algs).map(([alg, hex]) => ({ hashAlg: algs[alg]!, digest: Buffer.from(hex, 'hex') }));
      await tpm.pcrExtend(e.pcr, digests);
    }
  } finally {
    await tpm.close();
  }
}
