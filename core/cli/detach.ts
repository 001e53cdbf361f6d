// `vm start NAME --detach` from the CLI. The process that starts a VM also serves its disk (the data
// key lives in its memory alone), so it cannot simply return: it starts a supervisor — the same CLI,
// `vm start NAME` in the foreground, in its own session, with no terminal — and returns once that
// supervisor reports the VM running in state.json, or with the supervisor's own error if the start
// failed. The passphrase, if this call was given one, goes to the supervisor through its standard
// input (never argv, the environment or a file); otherwise the supervisor unlocks with the OS keychain.
// The supervisor's output (its notices and final JSON, no secrets) goes to <vm>/supervisor.log.
import { spawn } from 'node:child_process';
import { closeSync, mkdirSync, openSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { ShieldError, type ErrorCode, ERROR_CODES } from '../errors.ts';
import type { ParsedArgs, Result, VmInfo } from '../app/contract.ts';

export interface DetachOptions {
  home: string;
  /** The VM as `vm status` shows it now (read again while waiting). */
  status: () => Promise<VmInfo>;
  args: ParsedArgs<'vm.start'>;
  vm: VmInfo;
  /** The vault passphrase this call was given (wiped by the caller), or undefined: the keychain. */
  passphrase: string | undefined;
  /** How long the supervisor may take to report the VM running. */
  timeoutMs?: number;
}

/** The supervisor's last `{"error": …}` line, as a ShieldError. */
function supervisorError(log: string, exit: string): ShieldError {
  const text = (() => {
    try {
      return readFileSync(log, 'utf8');
    } catch {
      return '';
    }
  })();
  for (const line of text.split('\n').reverse()) {
    if (!line.startsWith('{"error":')) continue;
    try {
      const e = (JSON.parse(line) as { error: { code: string; message: string; details?: Record<string, unknown> } }).error;
      const code = (ERROR_CODES as readonly string[]).includes(e.code) ? (e.code as ErrorCode) : 'internal';
      return new ShieldError(code, e.message, e.details ? { details: e.details } : undefined);
    } catch {
      break;
    }
  }
  return new ShieldError('io_error', `The VM's supervisor ended (${exit}) before the VM ran; see ${log}.`, { details: { reason: 'supervisor_failed', log } });
}

export async function startDetached(o: DetachOptions): Promise<Result<'vm.start'>> {
  const dir = dirname(o.vm.tpmState); // the VM's own folder
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const log = join(dir, 'supervisor.log');
  const logFd = openSync(log, 'w', 0o600);
  const argv = [...process.execArgv, process.argv[1]!, '--home', o.home, 'vm', 'start', o.vm.name, '--json', '--power-down-timeout', String(o.args.powerDownTimeout)];
  if (o.args.testChannel !== undefined) argv.push('--test-channel', o.args.testChannel);
  if (o.passphrase !== undefined) argv.push('--passphrase-stdin');
  const child = spawn(process.execPath, argv, {
    detached: true, // its own session: the terminal's Ctrl-C and hang-up do not reach it
    stdio: [o.passphrase !== undefined ? 'pipe' : 'ignore', logFd, logFd],
    env: process.env,
  });
  closeSync(logFd);
  if (o.passphrase !== undefined) {
    const pipe = child.stdin!;
    pipe.on('error', () => undefined); // the supervisor died first: its exit says why
    pipe.end(o.passphrase);
  }
  let exited: string | null = null;
  child.once('exit', (code, signal) => (exited = code !== null ? `exit ${code}` : `signal ${signal}`));
  child.once('error', (err) => (exited = err.message));
  // Our own Ctrl-C while waiting stops the start (the supervisor unwinds what it began).
  const onSignal = () => child.kill('SIGTERM');
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    const deadline = Date.now() + (o.timeoutMs ?? 300_000);
    for (;;) {
      if (exited !== null) throw supervisorError(log, exited);
      const s = await o.status();
      if (s.status === 'running' && s.pid === child.pid) {
        child.unref();
        return {
          name: o.vm.name,
          level: o.vm.level,
          status: 'running',
          cause: null,
          reason: 'running',
          accel: s.accel,
          secureBoot: s.secureBoot,
          vtpmProvisioned: s.vtpmProvisioned,
          startedAt: s.startedAt ?? new Date().toISOString(),
          stoppedAt: null,
          qemuExit: null,
          pid: child.pid,
          qemuPid: s.qemuPid,
          consoleAt: s.consoleAt,
          supervisorLog: log,
        };
      }
      if (Date.now() > deadline) {
        child.kill('SIGTERM');
        throw new ShieldError('io_error', `VM ${o.vm.name} did not report running within ${Math.round((o.timeoutMs ?? 300_000) / 1000)} s; its start was stopped (see ${log}).`, { details: { reason: 'supervisor_timeout', log } });
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}
