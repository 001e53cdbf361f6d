// Transports: how command bytes reach a TPM. One narrow interface, three adapters, addressed by
// strings in the shape of tpm2-tools' TCTI option:
//   device[:/dev/tpmrm0]                          the kernel's resource-managed character device
//   swtpm:host=127.0.0.1,port=2321[,ctrlport=N]   swtpm's TCP data port (raw TPM bytes) + control port
//   mssim:host=127.0.0.1,port=2321                the Microsoft/IBM simulator protocol (port + 1 = platform)
// Every adapter runs one command at a time, bounds its wait, and refuses responses larger than a
// TPM can send. A TPM that is not there is `tpm_unavailable`, never a raw socket error.
import { open, type FileHandle } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { ShieldError } from '../errors.ts';
import { malformed } from './marshal.ts';

export interface TpmTransport {
  /** Sends one TPM command and resolves with its whole response. */
  send(cmd: Buffer): Promise<Buffer>;
  close(): Promise<void>;
}

/** TPM MAX_RESPONSE_SIZE is 4096 on libtpms and on the TPMs we know; the rest is slack. */
export const MAX_RESPONSE_BYTES = 4096 + 1024;
export const DEFAULT_TIMEOUT_MS = 30_000;

export interface TransportOptions {
  /** Per-command bound (connecting included); default 30 s. */
  timeoutMs?: number;
}

const NO_TPM_HINT = 'On a host without a TPM, attest it in host-key or ad-group mode instead.';

function unavailable(address: string, why: string, cause?: unknown): ShieldError {
  return new ShieldError('tpm_unavailable', `No TPM at ${address} (${why}). ${NO_TPM_HINT}`, { details: { address }, cause });
}

// ---- addresses ----------------------------------------------------------------------------------

export type TpmAddress =
  | { kind: 'device'; path: string }
  | { kind: 'swtpm'; host: string; port: number; ctrlPort: number }
  | { kind: 'mssim'; host: string; port: number; platformPort: number };

function options(conf: string, address: string, allowed: readonly string[]): Record<string, string> {
  const out: Record<string, string> = {};
  for (const part of conf.split(',').filter((p) => p !== '')) {
    const eq = part.indexOf('=');
    const key = eq < 0 ? part : part.slice(0, eq);
    if (eq < 0 || !allowed.includes(key)) throw new ShieldError('invalid_argument', `TPM address ${address}: unknown option "${part}" (allowed: ${allowed.join(', ')}).`);
    out[key] = part.slice(eq + 1);
  }
  return out;
}

function port(value: string | undefined, fallback: number, address: string): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1 || n > 65535) throw new ShieldError('invalid_argument', `TPM address ${address}: "${value}" is not a port.`);
  return n;
}

export function parseAddress(address: string): TpmAddress {
  const colon = address.indexOf(':');
  const kind = colon < 0 ? address : address.slice(0, colon);
  const conf = colon < 0 ? '' : address.slice(colon + 1);
  if (kind === 'device') {
    // tpm2-tss takes the bare path; path= is accepted for symmetry with the others.
    const path = conf === '' ? '/dev/tpmrm0' : conf.startsWith('path=') ? conf.slice(5) : conf;
    return { kind, path };
  }
  if (kind === 'swtpm') {
    const o = options(conf, address, ['host', 'port', 'ctrlport']);
    const p = port(o.port, 2321, address);
    return { kind, host: o.host || '127.0.0.1', port: p, ctrlPort: port(o.ctrlport, p + 1, address) };
  }
  if (kind === 'mssim') {
    const o = options(conf, address, ['host', 'port']);
    const p = port(o.port, 2321, address);
    if (p === 65535) throw new ShieldError('invalid_argument', `TPM address ${address}: the platform port would be ${p + 1}.`);
    return { kind, host: o.host || '127.0.0.1', port: p, platformPort: p + 1 };
  }
  throw new ShieldError('invalid_argument', `Unknown TPM address "${address}": use device[:/dev/tpmrm0], swtpm:host=…,port=… or mssim:host=…,port=….`);
}

// ---- shared plumbing ----------------------------------------------------------------------------

/** Runs one task at a time: a TPM handles one command at a time, and so do its framings. */
class Serial {
  private tail: Promise<unknown> = Promise.resolve();
  run<T>(task: () => Promise<T>): Promise<T> {
    const next = this.tail.then(task, task);
    this.tail = next.catch(() => {});
    return next;
  }
}

function withTimeout<T>(work: Promise<T>, ms: number, onTimeout: () => ShieldError): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const expired = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(onTimeout()), ms);
  });
  return Promise.race([work, expired]).finally(() => clearTimeout(timer));
}

/** A TCP connection read as a byte stream: `read(n)` resolves with exactly n bytes. */
class Stream {
  private buffered: Buffer[] = [];
  private length = 0;
  private failure: Error | undefined;
  private wake: (() => void) | undefined;

  readonly socket: Socket;
  private readonly label: string;

  private constructor(socket: Socket, label: string) {
    this.socket = socket;
    this.label = label;
    socket.on('data', (d: Buffer) => {
      this.buffered.push(d);
      this.length += d.length;
      // Far more than any response: the peer is not a TPM, or is out of step with us.
      if (this.length > MAX_RESPONSE_BYTES + 64) this.fail(malformed(`${label} sent ${this.length} unrequested or oversized bytes`));
      this.wake?.();
    });
    socket.on('error', (err) => this.fail(new ShieldError('tpm_unavailable', `The TPM connection ${label} failed: ${err.message}.`, { cause: err })));
    socket.on('close', () => this.fail(new ShieldError('tpm_unavailable', `The TPM at ${label} closed the connection.`)));
  }

  static connect(host: string, port: number, address: string, timeoutMs: number): Promise<Stream> {
    return new Promise((resolve, reject) => {
      const socket = connect({ host, port });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(unavailable(address, `no connection to ${host}:${port} within ${timeoutMs} ms`));
      }, timeoutMs);
      socket.once('error', (err: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        reject(unavailable(address, `${err.code === 'ECONNREFUSED' ? 'connection refused' : err.code ?? err.message} at ${host}:${port}`, err));
      });
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.removeAllListeners('error');
        socket.setNoDelay(true);
        resolve(new Stream(socket, `${host}:${port}`));
      });
    });
  }

  private fail(err: Error): void {
    this.failure ??= err;
    this.socket.destroy();
    this.wake?.();
  }

  get pending(): number {
    return this.length;
  }

  write(b: Buffer): void {
    if (this.failure) throw this.failure;
    this.socket.write(b);
  }

  async read(n: number): Promise<Buffer> {
    while (this.length < n) {
      if (this.failure) throw this.failure;
      await new Promise<void>((resolve) => (this.wake = resolve));
      this.wake = undefined;
    }
    const all = Buffer.concat(this.buffered, this.length);
    this.buffered = all.length > n ? [all.subarray(n)] : [];
    this.length = all.length - n;
    return all.subarray(0, n);
  }

  destroy(): void {
    this.failure ??= new ShieldError('tpm_unavailable', `The TPM connection ${this.label} is closed.`);
    this.socket.destroy();
  }
}

/** Reads one TPM response (10-byte header, then responseSize − 10 bytes), bounded in size. */
async function readTpmResponse(s: Stream): Promise<Buffer> {
  const head = await s.read(10);
  const size = head.readUInt32BE(2);
  if (size < 10 || size > MAX_RESPONSE_BYTES) throw malformed(`a response header announcing ${size} bytes`);
  return Buffer.concat([head, await s.read(size - 10)]);
}

/** A TCP transport that opens lazily and is dropped on any framing failure or timeout. */
abstract class TcpTransport implements TpmTransport {
  protected stream: Stream | undefined;
  private readonly serial = new Serial();
  protected readonly timeoutMs: number;
  readonly address: string;

  constructor(address: string, opts: TransportOptions) {
    this.address = address;
    this.timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  }

  /** Connects now, so that a missing TPM shows at open rather than at the first command. */
  async connect(): Promise<void> {
    await this.serial.run(async () => {
      if (this.stream) return;
      const { host, port } = this.host();
      this.stream = await Stream.connect(host, port, this.address, this.timeoutMs);
      if (this.perCommand) this.drop();
    });
  }

  private drop(): void {
    this.stream?.destroy();
    this.stream = undefined;
  }

  /**
   * Whether each command gets its own connection. swtpm serves one data connection at a time, so
   * holding one would lock tpm2-tools (and any other client) out; tpm2-tss' swtpm TCTI does the same.
   */
  protected abstract readonly perCommand: boolean;
  protected abstract host(): { host: string; port: number };
  protected abstract exchange(s: Stream, cmd: Buffer): Promise<Buffer>;

  send(cmd: Buffer): Promise<Buffer> {
    return this.serial.run(async () => {
      try {
        const response = await withTimeout(this.once(cmd), this.timeoutMs, () => new ShieldError('tpm_unavailable', `The TPM at ${this.address} did not answer within ${this.timeoutMs} ms.`));
        if (this.perCommand) this.drop();
        return response;
      } catch (err) {
        // Whatever went wrong, the byte stream may be out of step: start afresh next time.
        this.drop();
        throw err;
      }
    });
  }

  private async once(cmd: Buffer): Promise<Buffer> {
    if (!this.stream) {
      const { host, port } = this.host();
      this.stream = await Stream.connect(host, port, this.address, this.timeoutMs);
    }
    if (this.stream.pending > 0) throw malformed(`${this.stream.pending} bytes arrived from ${this.address} that no command asked for`);
    return this.exchange(this.stream, cmd);
  }

  async close(): Promise<void> {
    await this.serial.run(async () => this.drop());
  }
}

/** One request/response on a fresh connection (swtpm's control port, mssim's platform port). */
async function oneShot(host: string, port: number, address: string, timeoutMs: number, request: Buffer, responseBytes: number): Promise<Buffer> {
  const s = await Stream.connect(host, port, address, timeoutMs);
  try {
    s.write(request);
    return await withTimeout(s.read(responseBytes), timeoutMs, () => new ShieldError('tpm_unavailable', `The control channel of ${address} did not answer within ${timeoutMs} ms.`));
  } finally {
    s.destroy();
  }
}

// ---- device -------------------------------------------------------------------------------------

export class DeviceTransport implements TpmTransport {
  private handle: FileHandle | undefined;
  private readonly serial = new Serial();
  private readonly timeoutMs: number;
  readonly address: string;

  private constructor(address: string, handle: FileHandle, opts: TransportOptions) {
    this.address = address;
    this.handle = handle;
    this.timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  }

  static async open(path: string, address: string, opts: TransportOptions = {}): Promise<DeviceTransport> {
    try {
      return new DeviceTransport(address, await open(path, 'r+'), opts);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      const why = code === 'ENOENT' ? `${path} does not exist` : code === 'EACCES' ? `no permission to open ${path}; the tss group has it` : `${path}: ${code ?? String(err)}`;
      throw unavailable(address, why, err);
    }
  }

  send(cmd: Buffer): Promise<Buffer> {
    return this.serial.run(async () => {
      const h = this.handle;
      if (!h) throw new ShieldError('tpm_unavailable', `The TPM at ${this.address} is closed.`);
      const work = (async () => {
        await h.write(cmd);
        // The kernel hands over the whole response in one read.
        const buf = Buffer.alloc(MAX_RESPONSE_BYTES + 1);
        const { bytesRead } = await h.read(buf, 0, buf.length, null);
        if (bytesRead > MAX_RESPONSE_BYTES) throw malformed(`a response of more than ${MAX_RESPONSE_BYTES} bytes`);
        return buf.subarray(0, bytesRead);
      })();
      try {
        return await withTimeout(work, this.timeoutMs, () => new ShieldError('tpm_unavailable', `The TPM at ${this.address} did not answer within ${this.timeoutMs} ms.`));
      } catch (err) {
        if (err instanceof ShieldError) throw err;
        throw new ShieldError('tpm_unavailable', `The TPM at ${this.address} failed: ${(err as Error).message}.`, { cause: err });
      }
    });
  }

  async close(): Promise<void> {
    const h = this.handle;
    this.handle = undefined;
    await h?.close();
  }
}

// ---- swtpm --------------------------------------------------------------------------------------

/** swtpm control commands (swtpm's tpm_ioctl.h; big-endian u32 code, then the request). */
export const SWTPM_CMD = { GET_CAPABILITY: 0x01, INIT: 0x02, SHUTDOWN: 0x03, SET_LOCALITY: 0x05, STOP: 0x0e } as const;

export class SwtpmTransport extends TcpTransport {
  readonly target: Extract<TpmAddress, { kind: 'swtpm' }>;

  constructor(target: Extract<TpmAddress, { kind: 'swtpm' }>, address: string, opts: TransportOptions = {}) {
    super(address, opts);
    this.target = target;
  }

  protected readonly perCommand = true;

  protected host(): { host: string; port: number } {
    return { host: this.target.host, port: this.target.port };
  }

  protected async exchange(s: Stream, cmd: Buffer): Promise<Buffer> {
    s.write(cmd);
    return readTpmResponse(s);
  }

  /** One control command on a fresh control connection, as tpm2-tss' swtpm TCTI does. */
  async control(code: number, payload: Buffer = Buffer.alloc(0), responseBytes = 4): Promise<Buffer> {
    const req = Buffer.alloc(4);
    req.writeUInt32BE(code);
    const res = await oneShot(this.target.host, this.target.ctrlPort, this.address, this.timeoutMs, Buffer.concat([req, payload]), responseBytes);
    const result = res.readUInt32BE(0);
    if (result !== 0) {
      const name = Object.entries(SWTPM_CMD).find(([, v]) => v === code)?.[0] ?? `0x${code.toString(16)}`;
      throw new ShieldError('tpm_error', `swtpm control command CMD_${name} failed with TPM result 0x${result.toString(16)}.`, { details: { rc: result, rcName: `swtpm CMD_${name} result 0x${result.toString(16)}` } });
    }
    return res;
  }

  /** CMD_INIT: (re)starts the TPM, like a power cycle; TPM2_Startup must follow. */
  async init(deleteVolatile = false): Promise<void> {
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(deleteVolatile ? 1 : 0);
    await this.control(SWTPM_CMD.INIT, flags);
  }

  /** CMD_SHUTDOWN: swtpm saves its state and exits. */
  async shutdown(): Promise<void> {
    await this.close();
    await this.control(SWTPM_CMD.SHUTDOWN);
  }

  /** CMD_GET_CAPABILITY: the control commands this swtpm implements, as a bit mask. */
  async capabilities(): Promise<number> {
    return (await this.control(SWTPM_CMD.GET_CAPABILITY, Buffer.alloc(0), 8)).readUInt32BE(4);
  }
}

// ---- mssim --------------------------------------------------------------------------------------

/** The simulator's TCP protocol (ms-tpm-20-ref TpmTcpProtocol.h). */
export const MSSIM = { SIGNAL_POWER_ON: 1, SIGNAL_POWER_OFF: 2, SIGNAL_NV_ON: 11, SEND_COMMAND: 8, SESSION_END: 20 } as const;

export class MssimTransport extends TcpTransport {
  /** The locality byte of TPM_SEND_COMMAND. */
  locality = 0;
  readonly target: Extract<TpmAddress, { kind: 'mssim' }>;

  constructor(target: Extract<TpmAddress, { kind: 'mssim' }>, address: string, opts: TransportOptions = {}) {
    super(address, opts);
    this.target = target;
  }

  // The simulator protocol has a session (TPM_SESSION_END); tpm2-tss keeps it open too.
  protected readonly perCommand = false;

  protected host(): { host: string; port: number } {
    return { host: this.target.host, port: this.target.port };
  }

  protected async exchange(s: Stream, cmd: Buffer): Promise<Buffer> {
    const head = Buffer.alloc(9);
    head.writeUInt32BE(MSSIM.SEND_COMMAND, 0);
    head.writeUInt8(this.locality, 4);
    head.writeUInt32BE(cmd.length, 5);
    s.write(Buffer.concat([head, cmd]));
    const size = (await s.read(4)).readUInt32BE(0);
    if (size < 10 || size > MAX_RESPONSE_BYTES) throw malformed(`an mssim response announcing ${size} bytes`);
    const response = await s.read(size);
    const ack = (await s.read(4)).readUInt32BE(0);
    if (ack !== 0) throw malformed(`mssim acknowledged a command with ${ack}, not 0`);
    return response;
  }

  /** One platform signal: u32 code out, u32 0 back. */
  async signal(code: number): Promise<void> {
    const req = Buffer.alloc(4);
    req.writeUInt32BE(code);
    const res = await oneShot(this.target.host, this.target.platformPort, this.address, this.timeoutMs, req, 4);
    if (res.readUInt32BE(0) !== 0) throw new ShieldError('tpm_error', `The simulator refused platform signal ${code}.`, { details: { rc: res.readUInt32BE(0), rcName: `mssim signal ${code}` } });
  }

  /** Power on and NV on, as tpm2-tss' mssim TCTI does at init; TPM2_Startup must follow. */
  async powerOn(): Promise<void> {
    await this.signal(MSSIM.SIGNAL_POWER_ON);
    await this.signal(MSSIM.SIGNAL_NV_ON);
  }

  override async close(): Promise<void> {
    const s = this.stream;
    if (s) {
      const end = Buffer.alloc(4);
      end.writeUInt32BE(MSSIM.SESSION_END);
      try {
        s.write(end);
      } catch {
        // already gone
      }
    }
    await super.close();
  }
}

/** Opens the transport an address names; a TPM that is not there fails here, as tpm_unavailable. */
export async function openTransport(address: string, opts: TransportOptions = {}): Promise<TpmTransport> {
  const a = parseAddress(address);
  if (a.kind === 'device') return DeviceTransport.open(a.path, address, opts);
  const t = a.kind === 'swtpm' ? new SwtpmTransport(a, address, opts) : new MssimTransport(a, address, opts);
  await t.connect();
  return t;
}
