// swtpm's two Unix sockets, client side: the control channel (swtpm_ioctls(3): u32 command, a fixed
// big-endian request, a response led by a u32 TPM result) and the data channel (raw TPM 2.0
// command in, response out). One connection per exchange, as tpm2-tss' swtpm TCTI does: swtpm
// serves one client per channel, and QEMU (or tpm2-tools) may need it next.
import { connect } from 'node:net';
import { ShieldError } from '../errors.ts';
import { MAX_RESPONSE_BYTES, type TpmTransport } from '../tpm/mod.ts';

/** Control command codes (tpm_ioctl.h). */
export const CTRL = { GET_CAPABILITY: 0x01, INIT: 0x02, SHUTDOWN: 0x03, STOP: 0x0e, GET_CONFIG: 0x0f } as const;

function unavailable(path: string, why: string, cause?: unknown): ShieldError {
  return new ShieldError('tpm_unavailable', `The vTPM at ${path} does not answer (${why}).`, { details: { socket: path }, cause });
}

/**
 * Writes `request` to the Unix socket and resolves with the bytes read once `complete(bytes)`
 * says how many make a whole reply (undefined: not known yet). Bounded by `timeoutMs`.
 */
function exchange(path: string, request: Buffer, complete: (got: Buffer) => number | undefined, timeoutMs: number): Promise<Buffer> {
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
      if (got.length > MAX_RESPONSE_BYTES) return finish(unavailable(path, `an oversized reply of ${got.length} bytes`));
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
