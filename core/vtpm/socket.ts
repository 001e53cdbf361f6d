// swtpm's two Unix sockets, client side: the control channel (swtpm_ioctls(3): u32 command, a fixed
// big-endian request, a response led by a u32 TPM result) and the data channel (raw TPM 2.0
// command in, response out). One connection per exchange, as tpm2-tss' swtpm TCTI does: swtpm
// serves one client per channel, and QEMU (or tpm2-tools) may need it next.
import { connect } from 'node:net';
import { ShieldError } from '../errors.ts';
import { MAX_RESPONSE_BYTES, type TpmTransport } from '../tpm/mod.ts';

/** Control command codes (tpm_ioctl.h). */
export const CTRL = { GET_CAPABILITY: 0x01, INIT: 0x02, SHUTDOWN: 0x03, GET_STATEBLOB: 0x0c, SET_STATEBLOB: 0x0d, STOP: 0x0e, GET_CONFIG: 0x0f } as const;

/** State blob types (PTM_BLOB_TYPE_*). */
export const BLOB = { PERMANENT: 1, VOLATILE: 2, SAVESTATE: 3 } as const;
export type BlobType = (typeof BLOB)[keyof typeof BLOB];

/** A vTPM's whole state is far larger than a TPM response; bounded all the same. */
const MAX_STATE_BLOB_BYTES = 16 * 1024 * 1024;

function unavailable(path: string, why: string, cause?: unknown): ShieldError {
  return new ShieldError('tpm_unavailable', `The vTPM at ${path} does not answer (${why}).`, { details: { socket: path }, cause });
}

/**
 * Writes `request` to the Unix socket and resolves with the bytes read once `complete(bytes)`
 * says how many make a whole reply (undefined: not known yet). Bounded by `timeoutMs`.
 */
function exchange(path: string, request: Buffer, complete: (got: Buffer) => number | undefined, timeoutMs: number, maxBytes = MAX_RESPONSE_BYTES): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const s = connect({ path });
    let got = Buffer.alloc(0);
    let settled = false;
    const finish = (err: Error | null, value?: Buffer) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      s.destroy();
      if (err) reject(err);
      else resolve(value!);
    };
    const timer = setTimeout(() => finish(unavailable(path, `no reply within ${timeoutMs} ms`)), timeoutMs);
    s.once('connect', () => s.write(request));
    s.on('data', (d: Buffer) => {
      got = Buffer.concat([got, d]);
      if (got.length > maxBytes) return finish(unavailable(path, `an oversized reply of ${got.length} bytes`));
      let want: number | undefined;
      try {
        want = complete(got);
      } catch (err) {
        return finish(err as Error);
      }
      if (want !== undefined && got.length >= want) finish(null, got.subarray(0, want));
    });
    s.once('error', (err) => finish(unavailable(path, (err as NodeJS.ErrnoException).code ?? err.message, err)));
    s.once('close', () => finish(unavailable(path, `the connection closed after ${got.length} bytes`)));
  });
}

/** One control command; a non-zero TPM result is tpm_error. */
export async function ctrlCommand(path: string, code: number, opts: { payload?: Buffer; responseBytes?: number; timeoutMs?: number } = {}): Promise<Buffer> {
  const head = Buffer.alloc(4);
  head.writeUInt32BE(code);
  const size = opts.responseBytes ?? 4;
  const res = await exchange(path, Buffer.concat([head, opts.payload ?? Buffer.alloc(0)]), () => size, opts.timeoutMs ?? 10_000);
  const result = res.readUInt32BE(0);
  if (result !== 0) {
    throw new ShieldError('tpm_error', `swtpm control command 0x${code.toString(16)} failed with TPM result 0x${result.toString(16)}.`, { details: { rc: result, rcName: `swtpm ctrl 0x${code.toString(16)}` } });
  }
  return res;
}

/** CMD_INIT: (re)starts libtpms, like a power cycle; TPM2_Startup must follow. */
export async function ctrlInit(path: string, deleteVolatile = false): Promise<void> {
  const flags = Buffer.alloc(4);
  flags.writeUInt32BE(deleteVolatile ? 1 : 0);
  await ctrlCommand(path, CTRL.INIT, { payload: flags });
}

/** CMD_GET_CAPABILITY: the control commands this swtpm implements, as a bit mask. */
export async function ctrlCapabilities(path: string, timeoutMs?: number): Promise<number> {
  return (await ctrlCommand(path, CTRL.GET_CAPABILITY, { responseBytes: 8, timeoutMs })).readUInt32BE(4);
}

/**
 * CMD_GET_STATEBLOB, whole, in memory: the blob decrypted by swtpm (PTM_STATE_FLAG_DECRYPTED; no
 * migration key is set), so the caller holds plaintext TPM state and must wipe it. Over a socket,
 * swtpm answers {result, flags, totlength, length} and then sends the whole blob. null: swtpm has no
 * such blob (a non-fatal result or an empty one; volatile and savestate usually do not exist).
 */
export async function ctrlGetStateBlob(path: string, type: BlobType, timeoutMs = 10_000): Promise<Buffer | null> {
  const req = Buffer.alloc(16);
  req.writeUInt32BE(CTRL.GET_STATEBLOB, 0);
  req.writeUInt32BE(1, 4); // PTM_STATE_FLAG_DECRYPTED
  req.writeUInt32BE(type, 8);
  req.writeUInt32BE(0, 12); // offset
  const res = await exchange(
    path,
    req,
    (got) => {
      if (got.length < 4) return undefined;
      if (got.readUInt32BE(0) !== 0) return 4;
      if (got.length < 16) return undefined;
      return 16 + got.readUInt32BE(8);
    },
    timeoutMs,
    MAX_STATE_BLOB_BYTES,
  );
  const result = res.readUInt32BE(0);
  if (result !== 0) {
    if (type !== BLOB.PERMANENT) return null;
    throw new ShieldError('tpm_error', `swtpm could not give its permanent state (TPM result 0x${result.toString(16)}).`, { details: { rc: result, rcName: 'swtpm CMD_GET_STATEBLOB' } });
  }
  if ((res.readUInt32BE(4) & 2) !== 0) throw new ShieldError('tpm_error', 'swtpm gave its state encrypted (a migration key is set).', { details: { rc: 0, rcName: 'swtpm CMD_GET_STATEBLOB' } });
  const blob = Buffer.from(res.subarray(16));
  res.fill(0);
  return blob.length > 0 ? blob : null;
}

/**
 * CMD_SET_STATEBLOB, whole: the header announces the length, the blob follows on the same
 * connection, one result comes back. swtpm stores it under its own state key (the TPM must not be
 * running: start swtpm with `init: false`).
 */
export async function ctrlSetStateBlob(path: string, type: BlobType, blob: Buffer, timeoutMs = 10_000): Promise<void> {
  const req = Buffer.alloc(16 + blob.length);
  req.writeUInt32BE(CTRL.SET_STATEBLOB, 0);
  req.writeUInt32BE(0, 4); // not encrypted
  req.writeUInt32BE(type, 8);
  req.writeUInt32BE(blob.length, 12);
  blob.copy(req, 16);
  try {
    const res = await exchange(path, req, () => 4, timeoutMs);
    const result = res.readUInt32BE(0);
    if (result !== 0) throw new ShieldError('tpm_error', `swtpm refused a state blob (type ${type}, TPM result 0x${result.toString(16)}).`, { details: { rc: result, rcName: 'swtpm CMD_SET_STATEBLOB' } });
  } finally {
    req.fill(0);
  }
}

/** The data channel on a Unix socket, as a TpmTransport for our client. */
export class UnixSocketTransport implements TpmTransport {
  readonly path: string;
  private readonly timeoutMs: number;
  private tail: Promise<unknown> = Promise.resolve();

  constructor(path: string, opts: { timeoutMs?: number } = {}) {
    this.path = path;
    this.timeoutMs = opts.timeoutMs ?? 30_000;
  }

  send(cmd: Buffer): Promise<Buffer> {
    // One command at a time, in order.
    const run = () =>
      exchange(
        this.path,
        cmd,
        (got) => {
          if (got.length < 10) return undefined;
          const size = got.readUInt32BE(2);
          if (size < 10 || size > MAX_RESPONSE_BYTES) throw unavailable(this.path, `a response announcing ${size} bytes`);
          return size;
        },
        this.timeoutMs,
      );
    const next = this.tail.then(run, run);
    this.tail = next.catch(() => {});
    return next;
  }

  async close(): Promise<void> {
    await this.tail;
  }
}
