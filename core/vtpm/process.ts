// One swtpm per VM. The state key travels to swtpm over an inherited descriptor (fd 3, a socket
// pair Node's spawn makes: we write 32 bytes and close it), so it is never in a file, on the
// command line or in the environment; our copy is zeroed once written.
//
// The sockets live in a private 0700 folder: `swtpm.sock.ctrl` (control: QEMU's chardev) and, when
// asked for, `swtpm.sock` (data: provisioning and tests; tpm2-tools reach it as
// `swtpm:path=<folder>/swtpm.sock`, which finds the control socket at `.ctrl` by itself). For a VM
// there is no data socket: QEMU hands swtpm its data channel with CMD_SET_DATAFD.
//
// swtpm runs with `--flags not-need-init`: it loads (decrypts) its state as it starts, so a wrong
// key, or state copied without its key, fails here, typed, and not later inside the guest's boot.
// QEMU's CMD_INIT then restarts the TPM as on any reset and the firmware sends TPM2_Startup.
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Writable } from 'node:stream';
import { ShieldError } from '../errors.ts';
import { Tpm } from '../tpm/mod.ts';
import { CTRL, UnixSocketTransport, ctrlCapabilities, ctrlCommand } from './socket.ts';

export const STATE_KEY_BYTES = 32;
const KEY_FD = 3;
const STDERR_KEEP = 8192;

export interface VtpmOptions {
  /** swtpm's state folder (tpm2-00.permall …); created 0700 if missing. */
  stateDir: string;
  /** The 32-byte state key (deriveVtpmKey). startVtpm keeps no reference; the caller wipes it. */
  key: Buffer;
  /** A private folder for the sockets (created 0700; must be 0700 and ours). Default: a new temp folder, removed on stop. */
  runDir?: string;
  /** Also serve the data channel on `<runDir>/swtpm.sock` (provisioning, tests). Default false: QEMU passes it. */
  dataSocket?: boolean;
  /** swtpm's own log; level 1 by default (≥ 5 adds libtpms debug output; never 20 in production: it dumps commands). */
  log?: { file: string; level?: number };
  /** How long swtpm may take to answer on its control socket; default 10 s. */
  startTimeoutMs?: number;
  /** The swtpm binary; default `swtpm` on PATH. */
  swtpm?: string;
  /**
   * Default true: `--flags not-need-init` (the state is loaded, so decrypted, as swtpm starts).
   * false: libtpms stays down until a CMD_INIT, which state-blob transfers need (rekey.ts).
   */
  init?: boolean;
}

export interface VtpmExit {
  code: number | null;
  signal: NodeJS.Signals | null;
  /** The end of swtpm's stderr. */
  stderr: string;
}

export interface Vtpm {
  readonly stateDir: string;
  readonly runDir: string;
  /** For QEMU: `-chardev socket,id=chrtpm,path=<ctrlSocket> -tpmdev emulator,id=tpm0,chardev=chrtpm`. */
  readonly ctrlSocket: string;
  readonly dataSocket: string | null;
  /** tpm2-tools' TCTI for the data socket, or null without one. */
  readonly tcti: string | null;
  readonly pid: number;
  /** Resolves when swtpm exits without stop() having been asked: the VM must be torn down. Never rejects. */
  readonly crashed: Promise<VtpmExit>;
  /** Resolves whenever swtpm exits. */
  readonly exited: Promise<VtpmExit>;
  /** Our TPM client over the data socket (close it before another client needs the socket). */
  client(): Tpm;
  /** CMD_SHUTDOWN (swtpm saves and exits); SIGTERM, then SIGKILL, to its process group if it lingers. */
  stop(): Promise<void>;
}

/** Options for the process itself; `key: null` is for tests that show unkeyed state is refused. */
export interface SwtpmLaunch extends Omit<VtpmOptions, 'key'> {
  key: Buffer | null;
}

function checkPath(p: string, what: string): void {
  // swtpm splits its option values at commas; a path with one would be read as other options.
  if (p.includes(',') || p.includes('\0')) throw new ShieldError('invalid_argument', `The vTPM ${what} may not contain a comma: ${p}`);
}

function privateDir(dir: string): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const st = statSync(dir);
  const uid = process.getuid?.();
  if (!st.isDirectory() || (st.mode & 0o077) !== 0 || (uid !== undefined && st.uid !== uid)) {
    throw new ShieldError('invalid_argument', `The vTPM folder ${dir} must be a folder of ours that only we can open (mode 0700).`, { details: { path: dir } });
  }
}

const UNDECRYPTABLE = /Could not find plain data|Verification of HMAC failed|GetDecryptedData|Could not initialize libtpms|failure mode/i;

function startFailure(opts: SwtpmLaunch, exit: VtpmExit): ShieldError {
  const details = { stateDir: opts.stateDir, exitCode: exit.code, signal: exit.signal, stderr: exit.stderr.slice(-2000) };
  if (UNDECRYPTABLE.test(exit.stderr)) {
    return new ShieldError(
      'vtpm_state_invalid',
      `The vTPM state in ${opts.stateDir} cannot be opened with this key: it was encrypted under another key, or copied without its key, or it is damaged.`,
      { details: { ...details, reason: 'state_key_mismatch' } },
    );
  }
  return new ShieldError('tpm_unavailable', `swtpm did not start (exit ${exit.code ?? exit.signal}): ${exit.stderr.trim().split('\n').at(-1) ?? ''}`, { details: { ...details, reason: 'swtpm_failed' } });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Starts swtpm on `stateDir` with its state key; resolves once it answers on its control socket. */
export function startVtpm(opts: VtpmOptions): Promise<Vtpm> {
  if (!Buffer.isBuffer(opts.key) || opts.key.length !== STATE_KEY_BYTES) {
    throw new ShieldError('invalid_argument', `The vTPM state key must be ${STATE_KEY_BYTES} bytes (AES-256).`);
  }
  return launchSwtpm(opts);
}

export async function launchSwtpm(opts: SwtpmLaunch): Promise<Vtpm> {
  checkPath(opts.stateDir, 'state folder');
  // Its files are ciphertext (mode 0600); the folder is made 0700 when we create it.
  mkdirSync(opts.stateDir, { recursive: true, mode: 0o700 });
  const ownRunDir = opts.runDir === undefined;
  const runDir = opts.runDir ?? mkdtempSync(join(tmpdir(), 'shieldlab-vtpm-'));
  checkPath(runDir, 'socket folder');
  privateDir(runDir);
  const dataSocket = opts.dataSocket ? join(runDir, 'swtpm.sock') : null;
  const ctrlSocket = join(runDir, 'swtpm.sock.ctrl');
  for (const s of [ctrlSocket, dataSocket]) if (s) rmSync(s, { force: true }); // a stale socket from a killed swtpm

  const args = ['socket', '--tpm2', '--tpmstate', `dir=${opts.stateDir},mode=0600`, '--ctrl', `type=unixio,path=${ctrlSocket},mode=0600`, ...(opts.init === false ? [] : ['--flags', 'not-need-init']), '--pid', `file=${join(runDir, 'swtpm.pid')}`];
  if (opts.key) args.push('--key', `fd=${KEY_FD},mode=aes-256-cbc,format=binary`);
  if (dataSocket) args.push('--server', `type=unixio,path=${dataSocket},mode=0600`);
  if (opts.log) {
    checkPath(opts.log.file, 'log file');
    args.push('--log', `file=${opts.log.file},level=${opts.log.level ?? 1}`);
  }
  const child: ChildProcess = spawn(opts.swtpm ?? 'swtpm', args, {
    stdio: ['ignore', 'ignore', 'pipe', opts.key ? 'pipe' : 'ignore'],
    // Its own process group, so stop() can reach anything it starts; a bare environment.
    detached: true,
    env: { PATH: process.env.PATH ?? '/usr/bin:/bin', LANG: 'C' },
  });

  if (opts.key) {
    const keyCopy = Buffer.from(opts.key);
    const pipe = child.stdio[KEY_FD] as Writable;
    pipe.on('error', () => {}); // swtpm exiting early closes it; the exit is what we report
    pipe.end(keyCopy, () => {
      keyCopy.fill(0);
      pipe.destroy();
    });
    pipe.once('close', () => keyCopy.fill(0));
  }

  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => {
    stderr = (stderr + d.toString('utf8')).slice(-STDERR_KEEP);
  });
  let stopping = false;
  let exitInfo: VtpmExit | undefined;
  const exited = new Promise<VtpmExit>((resolve) => {
    const done = (code: number | null, signal: NodeJS.Signals | null) => {
      if (exitInfo) return;
      let tail = stderr;
      if (opts.log) {
        try {
          tail += readFileSync(opts.log.file, 'utf8').slice(-STDERR_KEEP);
        } catch {
          // no log written
        }
      }
      exitInfo = { code, signal, stderr: tail };
      resolve(exitInfo);
    };
    child.once('error', (err) => {
      stderr += `\n${err.message}`;
      done(null, null);
    });
    // 'close' rather than 'exit': stderr is fully read by then.
    child.once('close', done);
  });
  const crashed = new Promise<VtpmExit>((resolve) => void exited.then((e) => !stopping && resolve(e)));

  const cleanup = () => {
    if (ownRunDir) rmSync(runDir, { recursive: true, force: true });
  };

  // Ready = the control socket answers; swtpm serves it only after libtpms has loaded the state.
  const deadline = Date.now() + (opts.startTimeoutMs ?? 10_000);
  for (;;) {
    if (exitInfo) {
      cleanup();
      throw startFailure(opts, exitInfo);
    }
    if (Date.now() > deadline) {
      stopping = true;
      killGroup(child, 'SIGKILL');
      await exited;
      cleanup();
      throw new ShieldError('tpm_unavailable', `swtpm did not answer on ${ctrlSocket} within ${opts.startTimeoutMs ?? 10_000} ms.`, { details: { stateDir: opts.stateDir, reason: 'swtpm_timeout' } });
    }
    try {
      await ctrlCapabilities(ctrlSocket, 1000);
      break;
    } catch {
      await Promise.race([sleep(20), exited]);
    }
  }

  const stop = async (): Promise<void> => {
    if (!exitInfo) {
      stopping = true;
      // A connected QEMU holds the only control connection: then this times out and signals follow.
      await ctrlCommand(ctrlSocket, CTRL.SHUTDOWN, { timeoutMs: 2000 }).catch(() => {});
      if (!(await settles(exited, 3000))) {
        killGroup(child, 'SIGTERM');
        if (!(await settles(exited, 3000))) {
          killGroup(child, 'SIGKILL');
          await exited;
        }
      }
    }
    cleanup();
  };

  return {
    stateDir: opts.stateDir,
    runDir,
    ctrlSocket,
    dataSocket,
    tcti: dataSocket ? `swtpm:path=${dataSocket}` : null,
    pid: child.pid!,
    crashed,
    exited,
    client() {
      if (!dataSocket) throw new ShieldError('invalid_argument', 'This vTPM serves its data channel to QEMU only (started without dataSocket).');
      return new Tpm(new UnixSocketTransport(dataSocket));
    },
    stop,
  };
}

function killGroup(child: ChildProcess, signal: NodeJS.Signals): void {
  try {
    process.kill(-child.pid!, signal);
  } catch {
    child.kill(signal);
  }
}

async function settles(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const ok = await Promise.race([p.then(() => true), new Promise<boolean>((r) => (timer = setTimeout(() => r(false), ms)))]);
  clearTimeout(timer);
  return ok;
}
