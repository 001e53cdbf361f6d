// Shielded QEMU VMs: their records (in the vault, so nobody edits a VM's level or disk behind its
// back), their folders under the ShieldLab home, and one start: NBD server → swtpm (provisioned on
// first start) → QEMU, watched until it ends. Whatever piece ends first (QEMU exiting, swtpm
// crashing, the NBD server failing) takes the others down, in reverse order, and is reported.
//
//   <home>/vms/<name>/tpm/          swtpm state (ciphertext under the vTPM key)
//   <home>/vms/<name>/OVMF_VARS.fd  the VM's UEFI variable store (public: Secure Boot keys, boot order)
//   <home>/vms/<name>/state.json    what runs now / how the last run ended (no secrets)
//   <home>/vms/<name>/start.lock    the pid of the process starting or running the VM (one at a time)
//   <home>/vms/<name>/console.log   encryption-supported, serial-log console: the last run's console (0600)
//   <home>/vms/<name>/run/          0700: qmp.sock, nbd.sock, tpm/swtpm.sock.ctrl
//
// The keys: the caller releases the transport key, opens the shielded disk (which keeps only its
// data key) and derives the vTPM key; startVm hands the vTPM key to swtpm and wipes it.
import { type ChildProcess, spawn } from 'node:child_process';
import { chmodSync, closeSync, copyFileSync, existsSync, mkdirSync, openSync, readFileSync, readSync, renameSync, rmSync, statSync, unlinkSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { ShieldError, toShieldError } from '../errors.ts';
import { wipe } from '../crypto/mod.ts';
import { startNbdServer, type NbdDisk, type NbdServer } from '../nbd/mod.ts';
import { provisionVtpm, readMarker, startVtpm, type EkCaOwner, type Vtpm } from '../vtpm/mod.ts';
import { QEMU_BINARY, chooseAccel, firmwareFor, probeSmm, qemuArgs, varsTemplate, type Accel, type ConsoleKind, type SecurityLevel } from './qemu.ts';
import { Qmp } from './qmp.ts';

export const VM_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

/** A VM as the vault keeps it. */
export interface VmRecord {
  name: string;
  /** The shielded VHDX (absolute path). */
  disk: string;
  diskId: string;
  memoryMiB: number;
  cpus: number;
  level: SecurityLevel;
  /** encryption-supported only: how the admin sees the console. */
  console: ConsoleKind | null;
  /** Direct kernel boot (lab and test guests). */
  kernel: string | null;
  initrd: string | null;
  append: string | null;
  createdAt: string;
}

export type VmRunStatus = 'starting' | 'running' | 'stopping' | 'stopped' | 'crashed';

/** state.json: what a `vm status` in another process reads. */
export interface VmState {
  status: VmRunStatus;
  /** The `vm start` process that owns the VM. */
  pid: number | null;
  qemuPid: number | null;
  swtpmPid: number | null;
  accel: Accel | null;
  accelReason: string | null;
  secureBoot: boolean | null;
  startedAt: string | null;
  stoppedAt: string | null;
  /** How the last run ended, in words. */
  reason: string | null;
  qmpSocket: string | null;
  console: string | null;
}

export interface VmPaths {
  dir: string;
  tpm: string;
  vars: string;
  state: string;
  lock: string;
  run: string;
  qmp: string;
  nbd: string;
  tpmRun: string;
  consoleLog: string;
}

export function vmPaths(home: string, name: string): VmPaths {
  checkName(name);
  const dir = join(home, 'vms', name);
  const run = join(dir, 'run');
  return { dir, tpm: join(dir, 'tpm'), vars: join(dir, 'OVMF_VARS.fd'), state: join(dir, 'state.json'), lock: join(dir, 'start.lock'), run, qmp: join(run, 'qmp.sock'), nbd: join(run, 'nbd.sock'), tpmRun: join(run, 'tpm'), consoleLog: join(dir, 'console.log') };
}

export function checkName(name: string): void {
  if (!VM_NAME.test(name)) throw new ShieldError('invalid_argument', `A VM name is 1–63 letters, digits, '.', '_' or '-', starting with a letter or digit: ${JSON.stringify(name)}.`);
}

const EMPTY_STATE: VmState = { status: 'stopped', pid: null, qemuPid: null, swtpmPid: null, accel: null, accelReason: null, secureBoot: null, startedAt: null, stoppedAt: null, reason: null, qmpSocket: null, console: null };

function alive(pid: number | null): boolean {
  if (pid === null) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** The VM's state; a run whose owning process is gone reads as crashed. */
export function readState(paths: VmPaths): VmState {
  let s: VmState;
  try {
    s = { ...EMPTY_STATE, ...(JSON.parse(readFileSync(paths.state, 'utf8')) as Partial<VmState>) };
  } catch {
    return { ...EMPTY_STATE };
  }
  if ((s.status === 'starting' || s.status === 'running' || s.status === 'stopping') && !alive(s.pid)) {
    return { ...s, status: 'crashed', reason: s.reason ?? `the vm start process (pid ${s.pid}) is gone` };
  }
  return s;
}

export function writeState(paths: VmPaths, s: VmState): void {
  mkdirSync(paths.dir, { recursive: true, mode: 0o700 });
  const tmp = `${paths.state}.${process.pid}.tmp`;
  writeFileSync(tmp, `${JSON.stringify(s, null, 2)}\n`, { mode: 0o600 });
  renameSync(tmp, paths.state);
}

/**
 * One start at a time per VM, across processes: start.lock (O_EXCL) holds the owner's pid from
 * before the key release until the run has ended, so two starts can neither both roll the key
 * protector nor both write state.json. A lock whose pid is gone is taken over.
 */
export function acquireStartLock(paths: VmPaths): () => void {
  mkdirSync(paths.dir, { recursive: true, mode: 0o700 });
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      const fd = openSync(paths.lock, 'wx', 0o600);
      try {
        writeSync(fd, `${process.pid}\n`);
      } finally {
        closeSync(fd);
      }
      let held = true;
      return () => {
        if (!held) return;
        held = false;
        try {
          if (readFileSync(paths.lock, 'utf8').trim() === String(process.pid)) unlinkSync(paths.lock);
        } catch {
          // gone already
        }
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw toShieldError(err);
    }
    let owner: number | null = null;
    try {
      owner = Number.parseInt(readFileSync(paths.lock, 'utf8').trim(), 10);
    } catch {
      continue; // released between our open and our read
    }
    if (Number.isInteger(owner) && owner > 0 && owner !== process.pid && alive(owner)) {
      throw new ShieldError('vm_running', `VM ${paths.dir.split('/').at(-1)} is being started or runs already (pid ${owner}).`, { details: { pid: owner } });
    }
    rmSync(paths.lock, { force: true }); // its owner is gone (or it is ours from a run that did not unwind)
  }
  throw new ShieldError('vm_running', 'Another start of this VM holds its lock.');
}

/** A process's command line (NUL-separated, as /proc has it), or null when it is gone or not ours to read. */
function cmdline(pid: number): string | null {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8');
  } catch {
    return null;
  }
}

/**
 * A run whose owner died without unwinding (kill -9, a power cut of the app) leaves QEMU and swtpm
 * behind: a guest whose disk server is gone and a vTPM nobody guards. This stops them — only
 * processes whose command line names this VM's run folder, so a recycled pid is never hit — clears
 * the run folder, records the run as crashed, and says what it did (null: nothing to do).
 */
export function reapOrphans(paths: VmPaths): string | null {
  let s: VmState;
  try {
    s = { ...EMPTY_STATE, ...(JSON.parse(readFileSync(paths.state, 'utf8')) as Partial<VmState>) };
  } catch {
    return null;
  }
  if (!isActive(s) || alive(s.pid)) return null;
  const stopped: string[] = [];
  for (const [what, pid] of [['QEMU', s.qemuPid], ['swtpm', s.swtpmPid]] as const) {
    if (pid === null || !alive(pid)) continue;
    if (!(cmdline(pid) ?? '').includes(paths.run)) continue;
    try {
      process.kill(pid, 'SIGKILL');
      stopped.push(`${what} (pid ${pid})`);
    } catch {
      // gone in between
    }
  }
  rmSync(paths.run, { recursive: true, force: true });
  const reason = `the process that ran the VM (pid ${s.pid}) ended without stopping it${stopped.length ? `; ${stopped.join(' and ')} stopped` : ''}`;
  writeState(paths, { ...s, status: 'crashed', pid: null, qemuPid: null, swtpmPid: null, qmpSocket: null, stoppedAt: new Date().toISOString(), reason });
  return reason;
}

/** Text from a console log safe to show: no escape sequences or control characters but newlines and tabs. */
export function consoleText(raw: Buffer): string {
  return raw
    .toString('utf8')
    .replace(/\x1b\[[0-?]*[ -/]*[@-~]/g, '') // CSI sequences (colours, cursor moves)
    .replace(/\x1b[@-_]/g, '')
    .replace(/\r\n?/g, '\n')
    .replace(/[\u0000-\u0008\u000b-\u001f\u007f]/g, '');
}

/** The last `bytes` bytes of a VM's console log (null when it has none yet). */
export function readConsoleTail(paths: VmPaths, bytes: number): { text: string; size: number; truncated: boolean } | null {
  let fd: number;
  try {
    fd = openSync(paths.consoleLog, 'r');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw toShieldError(err);
  }
  try {
    const size = statSync(paths.consoleLog).size;
    const n = Math.min(size, bytes);
    const buf = Buffer.alloc(n);
    let got = 0;
    while (got < n) {
      const r = readSync(fd, buf, got, n - got, size - n + got);
      if (r === 0) break;
      got += r;
    }
    let text = consoleText(buf.subarray(0, got));
    // A cut at the front starts mid-line (and maybe mid-character): drop that partial line.
    if (size > n) text = text.slice(text.indexOf('\n') + 1);
    return { text, size, truncated: size > n };
  } finally {
    closeSync(fd);
  }
}

export function isActive(s: VmState): boolean {
  return s.status === 'starting' || s.status === 'running' || s.status === 'stopping';
}

function privateDir(dir: string): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  chmodSync(dir, 0o700);
  const st = statSync(dir);
  const uid = process.getuid?.();
  if (!st.isDirectory() || (uid !== undefined && st.uid !== uid)) throw new ShieldError('invalid_argument', `${dir} must be a folder of ours.`);
}

// ---- one run ----------------------------------------------------------------------------------

export interface AuditLine {
  action: string;
  outcome: 'ok' | 'refused' | 'failed';
  subject?: string;
  reason?: string;
}

export interface StartVmOptions {
  home: string;
  vm: VmRecord;
  /** The opened shielded disk; the run closes it. */
  disk: NbdDisk & { close(): Promise<void> };
  /** The 32-byte vTPM state key; wiped once swtpm has it (also on failure). */
  vtpmKey: Buffer;
  /** Issues the EK certificate on the first start (a guardian held here). */
  ekCa: EkCaOwner;
  audit: (e: AuditLine) => void;
  /** TEST ONLY: see LaunchOptions.testChannel. */
  testChannel?: string;
  /** How long an ACPI power-down may take before QEMU is stopped hard. Default 60 s. */
  powerDownTimeoutMs?: number;
  qemu?: string;
  /** Where QEMU's own stderr goes (its last lines are kept for the report either way). */
  log?: (line: string) => void;
}

export interface VmExit {
  status: 'stopped' | 'crashed';
  /** What ended the run. */
  cause: 'guest' | 'stop' | 'qemu' | 'swtpm' | 'nbd';
  reason: string;
  qemuExit: { code: number | null; signal: NodeJS.Signals | null } | null;
  /** A stop on request: how QEMU went down (ACPI power-down, told to quit, killed). */
  stopHow: 'powerdown' | 'quit' | 'kill' | null;
  startedAt: string;
  stoppedAt: string;
}

export interface RunningVm {
  readonly accel: Accel;
  readonly accelReason: string;
  readonly secureBoot: boolean;
  readonly provisioned: boolean;
  readonly qemuPid: number;
  readonly swtpmPid: number;
  readonly qmpSocket: string;
  readonly nbdSocket: string;
  readonly console: string | null;
  readonly startedAt: string;
  /** Resolves once everything is down (never rejects). */
  readonly done: Promise<VmExit>;
  /** ACPI power-down, then a hard stop after the timeout (default: the start's); `force`: hard stop now. */
  stop(opts?: { force?: boolean; timeoutMs?: number }): Promise<VmExit>;
}

const STDERR_KEEP = 8192;

function killGroup(child: ChildProcess, signal: NodeJS.Signals): void {
  try {
    process.kill(-child.pid!, signal);
  } catch {
    try {
      child.kill(signal);
    } catch {
      // gone
    }
  }
}

function timeout<T>(p: Promise<T>, ms: number): Promise<T | 'timeout'> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([p, new Promise<'timeout'>((r) => (timer = setTimeout(() => r('timeout'), ms)))]).finally(() => clearTimeout(timer));
}

/** Asks QEMU over QMP (one short connection: QEMU serves one QMP client at a time). */
export async function qmpOnce<T = unknown>(socket: string, command: string, args?: Record<string, unknown>): Promise<T> {
  const q = await Qmp.connect(socket);
  try {
    return await q.execute<T>(command, args);
  } finally {
    q.close();
  }
}

/**
 * Starts the VM: NBD server on the disk → swtpm (provisioned on first start) → QEMU. Any failure
 * unwinds what was started, in reverse, with the vTPM key wiped; the disk is closed either way.
 */
export async function startVm(o: StartVmOptions): Promise<RunningVm> {
  const { vm } = o;
  const paths = vmPaths(o.home, vm.name);
  // The audit trail must never bring a run down (a vault closed under a detached run, a full disk).
  const audit = (e: AuditLine) => {
    try {
      o.audit(e);
    } catch (err) {
      o.log?.(`audit of ${e.action} failed: ${toShieldError(err).message}\n`);
    }
  };
  const undo: (() => Promise<void>)[] = [];
  const unwind = async () => {
    for (const u of undo.reverse()) await u().catch(() => undefined);
  };
  undo.push(() => o.disk.close());
  const base: VmState = { ...EMPTY_STATE, status: 'starting', pid: process.pid, startedAt: new Date().toISOString() };
  let key: Buffer | null = o.vtpmKey;
  try {
    privateDir(paths.dir);
    rmSync(paths.run, { recursive: true, force: true }); // sockets of a run that did not end cleanly
    privateDir(paths.run);
    writeState(paths, base);

    // The accelerator, and Secure Boot (never dropped silently: firmwareFor refuses a shielded VM without SMM).
    const accel = chooseAccel();
    const smm = vm.level === 'shielded' ? await probeSmm(accel.accel, o.qemu) : { smm: false, detail: 'not needed' };
    if (!existsSync(paths.vars)) copyFileSync(varsTemplate(vm.level), paths.vars);
    chmodSync(paths.vars, 0o600);
    const firmware = firmwareFor(vm.level, smm, paths.vars);

    // The disk, decrypted for QEMU alone: one client, on a socket in our private folder.
    let nbdFailure: ((why: string) => void) | null = null;
    const nbdFailed = new Promise<string>((r) => (nbdFailure = r));
    const server: NbdServer = await startNbdServer({
      disk: o.disk,
      socketPath: paths.nbd,
      description: `ShieldLab VM ${vm.name}`,
      maxConnections: 1,
      log: (e) => {
        if (e.event === 'server_error') nbdFailure?.(e.message);
      },
    });
    undo.push(() => server.close());
    const nbdUri = `nbd+unix:///?socket=${server.socketPath}`;

    // The vTPM: provisioned (SHA-256 bank, EK, EK certificate) on the first start, then for QEMU.
    let provisioned = false;
    if (readMarker(paths.tpm) === null) {
      const setup = await startVtpm({ stateDir: paths.tpm, key, runDir: join(paths.run, 'tpm-setup'), dataSocket: true });
      try {
        await provisionVtpm(setup, { owner: o.ekCa, vmName: vm.name });
        provisioned = true;
      } finally {
        await setup.stop();
      }
      audit({ action: 'vm.vtpm-provision', outcome: 'ok', subject: vm.name });
    }
    const vtpm: Vtpm = await startVtpm({ stateDir: paths.tpm, key, runDir: paths.tpmRun });
    wipe(key);
    key = null;
    undo.push(() => vtpm.stop());

    // QEMU.
    const consoleOpt = vm.level === 'encryption-supported' ? (vm.console === 'vnc' ? { kind: 'vnc' as const } : { kind: 'serial-log' as const, file: paths.consoleLog }) : undefined;
    // Made here, 0600, so QEMU (which opens it with O_TRUNC) never creates it with its umask; kept after the run.
    if (consoleOpt?.kind === 'serial-log') {
      writeFileSync(paths.consoleLog, '', { mode: 0o600 });
      chmodSync(paths.consoleLog, 0o600);
    }
    const args = qemuArgs(vm, {
      level: vm.level,
      accel: accel.accel,
      nbdUri,
      tpmCtrlSocket: vtpm.ctrlSocket,
      qmpSocket: paths.qmp,
      firmware,
      ...(consoleOpt ? { console: consoleOpt } : {}),
      ...(o.testChannel !== undefined ? { testChannel: o.testChannel } : {}),
    });
    const child = spawn(o.qemu ?? QEMU_BINARY, args, {
      stdio: ['ignore', 'ignore', 'pipe'],
      detached: true, // its own process group: a Ctrl-C at the terminal reaches us, and we stop it in order
      env: { PATH: process.env.PATH ?? '/usr/bin:/bin', LANG: 'C' },
    });
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => {
      const s = d.toString('utf8');
      stderr = (stderr + s).slice(-STDERR_KEEP);
      o.log?.(s);
    });
    const qemuExited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
      child.once('error', (err) => {
        stderr += `\n${err.message}`;
        resolve({ code: null, signal: null });
      });
      child.once('close', (code, signal) => resolve({ code, signal }));
    });
    let qemuGone = false;
    void qemuExited.then(() => (qemuGone = true));
    undo.push(async () => {
      if (qemuGone) return;
      killGroup(child, 'SIGKILL');
      await qemuExited;
    });

    // Ready = QMP answers (QEMU has opened the disk and the TPM by then).
    const deadline = Date.now() + 30_000;
    for (;;) {
      if (qemuGone) {
        const e = await qemuExited;
        throw new ShieldError('io_error', `QEMU did not start (exit ${e.code ?? e.signal}): ${stderr.trim().split('\n').slice(-3).join(' ')}`, { details: { reason: 'qemu_failed', stderr: stderr.slice(-2000) } });
      }
      if (Date.now() > deadline) throw new ShieldError('io_error', `QEMU did not answer on ${paths.qmp} within 30 s.`, { details: { reason: 'qemu_timeout' } });
      try {
        const st = await qmpOnce<{ status: string }>(paths.qmp, 'query-status');
        if (st.status === 'running') break;
      } catch {
        // not listening yet
      }
      await timeout(qemuExited, 50);
    }

    let consoleWhere: string | null = null;
    if (consoleOpt?.kind === 'serial-log') consoleWhere = `serial console log ${paths.consoleLog}`;
    else if (consoleOpt?.kind === 'vnc') {
      const v = await qmpOnce<{ host?: string; service?: string }>(paths.qmp, 'query-vnc').catch(() => ({}) as { host?: string; service?: string });
      consoleWhere = `VNC on ${v.host ?? '127.0.0.1'}:${v.service ?? '?'}`;
    }
    const startedAt = base.startedAt!;
    const running: VmState = { ...base, status: 'running', qemuPid: child.pid!, swtpmPid: vtpm.pid, accel: accel.accel, accelReason: accel.reason, secureBoot: firmware.secureBoot, qmpSocket: paths.qmp, console: consoleWhere };
    writeState(paths, running);
    audit({ action: 'vm.start', outcome: 'ok', subject: vm.name, reason: `${vm.level}, ${accel.accel}${firmware.secureBoot ? ', secure boot' : ''}` });

    // ---- watching -------------------------------------------------------------------------
    let stopRequested: 'graceful' | 'force' | null = null;
    let stopHow: VmExit['stopHow'] = null;
    const done: Promise<VmExit> = (async () => {
      type Ending = { cause: VmExit['cause']; reason: string };
      // A `vm stop` from another process marks the state 'stopping' before it asks QEMU.
      const requested = () => stopRequested !== null || readState(paths).status === 'stopping';
      const qemuEnding = (e: { code: number | null; signal: NodeJS.Signals | null }): Ending =>
        e.code === 0
          ? requested()
            ? { cause: 'stop', reason: 'stopped on request' }
            : { cause: 'guest', reason: 'the guest powered off (or QEMU was told to quit)' }
          : { cause: 'qemu', reason: `QEMU exited (${e.code ?? e.signal}): ${stderr.trim().split('\n').slice(-2).join(' ')}` };
      const first: Ending = await Promise.race([
        qemuExited.then(qemuEnding),
        vtpm.crashed.then(async (e): Promise<Ending> => {
          // QEMU shuts swtpm down as it exits (CMD_SHUTDOWN): a clean swtpm exit right before QEMU's is QEMU's ending.
          if (e.code === 0 && e.signal === null && (await timeout(qemuExited, 2000)) !== 'timeout') return qemuEnding(await qemuExited);
          return { cause: 'swtpm', reason: `swtpm exited (${e.code ?? e.signal})${e.stderr.trim() ? `: ${e.stderr.trim().split('\n').at(-1)}` : ''}` };
        }),
        nbdFailed.then((m): Ending => ({ cause: 'nbd', reason: `the NBD server failed: ${m}` })),
      ]);
      const crashed = first.cause === 'qemu' || first.cause === 'swtpm' || first.cause === 'nbd';
      if (!qemuGone) {
        // A piece under QEMU died: the guest cannot go on safely; stop it hard.
        if (crashed) await qmpOnce(paths.qmp, 'quit').catch(() => undefined);
        if ((await timeout(qemuExited, 3000)) === 'timeout') {
          killGroup(child, 'SIGKILL');
          await qemuExited;
        }
      }
      await unwind();
      rmSync(paths.run, { recursive: true, force: true });
      const stoppedAt = new Date().toISOString();
      const exit: VmExit = { status: crashed ? 'crashed' : 'stopped', cause: first.cause, reason: first.reason, qemuExit: qemuGone ? await qemuExited : null, stopHow: first.cause === 'stop' ? stopHow : null, startedAt, stoppedAt };
      writeState(paths, { ...running, status: exit.status, stoppedAt, reason: first.reason, qemuPid: null, swtpmPid: null, qmpSocket: null, pid: null });
      audit(crashed ? { action: 'vm.crash', outcome: 'failed', subject: vm.name, reason: first.reason } : { action: 'vm.stop', outcome: 'ok', subject: vm.name, reason: first.reason });
      return exit;
    })();

    const stop = async (opts: { force?: boolean; timeoutMs?: number } = {}): Promise<VmExit> => {
      if (!qemuGone) {
        stopRequested = opts.force ? 'force' : 'graceful';
        writeState(paths, { ...running, status: 'stopping' });
        if (!opts.force) {
          stopHow = 'powerdown';
          await qmpOnce(paths.qmp, 'system_powerdown').catch(() => undefined);
          if ((await timeout(qemuExited, opts.timeoutMs ?? o.powerDownTimeoutMs ?? 60_000)) !== 'timeout') return done;
        }
        stopHow = 'quit';
        await qmpOnce(paths.qmp, 'quit').catch(() => undefined);
        if ((await timeout(qemuExited, 5000)) === 'timeout') {
          stopHow = 'kill';
          killGroup(child, 'SIGKILL');
        }
      }
      return done;
    };

    return {
      accel: accel.accel,
      accelReason: accel.reason,
      secureBoot: firmware.secureBoot,
      provisioned,
      qemuPid: child.pid!,
      swtpmPid: vtpm.pid,
      qmpSocket: paths.qmp,
      nbdSocket: server.socketPath,
      console: consoleWhere,
      startedAt,
      done,
      stop,
    };
  } catch (err) {
    if (key) wipe(key);
    await unwind();
    rmSync(paths.run, { recursive: true, force: true });
    const e = toShieldError(err);
    writeState(paths, { ...base, status: 'stopped', pid: null, stoppedAt: new Date().toISOString(), reason: `start failed: ${e.message}` });
    audit({ action: 'vm.start', outcome: 'failed', subject: vm.name, reason: String(e.details?.reason ?? e.code) });
    throw e;
  }
}

/**
 * `vm stop` from another process: QMP system_powerdown, wait for the owning `vm start` to report
 * the VM stopped, then QMP quit, then SIGKILL to QEMU. `force`: quit at once.
 */
export async function stopFromOutside(paths: VmPaths, opts: { force: boolean; timeoutMs: number }): Promise<{ how: 'powerdown' | 'quit' | 'kill' | 'not-running'; state: VmState }> {
  let s = readState(paths);
  if (!isActive(s) || !s.qmpSocket) return { how: 'not-running', state: s };
  const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
  writeState(paths, { ...s, status: 'stopping' }); // so the owner records the end as a stop on request
  const waitDown = async (ms: number) => {
    const end = Date.now() + ms;
    while (Date.now() < end) {
      s = readState(paths);
      if (!isActive(s)) return true;
      await sleep(100);
    }
    return false;
  };
  if (!opts.force) {
    await qmpOnce(s.qmpSocket, 'system_powerdown').catch(() => undefined);
    if (await waitDown(opts.timeoutMs)) return { how: 'powerdown', state: s };
  }
  const qemuPid = s.qemuPid;
  await qmpOnce(s.qmpSocket!, 'quit').catch(() => undefined);
  if (await waitDown(10_000)) return { how: 'quit', state: s };
  if (qemuPid !== null && alive(qemuPid)) {
    try {
      process.kill(-qemuPid, 'SIGKILL');
    } catch {
      try {
        process.kill(qemuPid, 'SIGKILL');
      } catch {
        // gone
      }
    }
  }
  await waitDown(10_000);
  return { how: 'kill', state: readState(paths) };
}
