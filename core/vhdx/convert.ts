// Streaming raw ⇄ VHDX conversion. Memory stays at two blocks and one BAT page whatever the disk
// size: the next block is read while the current one is written. Output goes to
// `${output}.partial` and is published only when complete; a failure or an abort removes the
// partial file. The input is only ever opened read-only.
import { open, type FileHandle } from 'node:fs/promises';
import { resolve } from 'node:path';
import { ShieldError } from '../errors.ts';
import { BatWriter, PartialFile, asShieldError, planLayout, writeAll, writeStructures, type VhdxType } from './create.ts';
import { openVhdx } from './reader.ts';
import { MiB, PAYLOAD_STATE } from './structures.ts';

export interface ConvertOptions {
  /** VHDX output only. */
  type?: VhdxType;
  blockSize?: number;
  logicalSectorSize?: number;
  onProgress?: (done: number, total: number) => void;
  signal?: AbortSignal;
  /** Flush the output before publishing it (default true); false leaves that to the kernel, as `qemu-img convert` does. */
  durable?: boolean;
}

export interface ConvertResult {
  input: string;
  output: string;
  virtualSize: number;
  /** Blocks written with data (the rest are holes or zero blocks). */
  dataBlocks: number;
  blocks: number;
  fileSize: number;
}

const ZERO_CHUNK = Buffer.alloc(256 * 1024);

/** Whether a buffer is all zeros (memcmp in 256 KiB steps, stopping at the first data). */
export function isZero(buf: Buffer): boolean {
  for (let at = 0; at < buf.length; at += ZERO_CHUNK.length) {
    const n = Math.min(ZERO_CHUNK.length, buf.length - at);
    if (ZERO_CHUNK.compare(buf, at, at + n, 0, n) !== 0) return false;
  }
  return true;
}

async function readFully(fh: FileHandle, buf: Buffer, length: number, position: number): Promise<Buffer> {
  let done = 0;
  while (done < length) {
    const { bytesRead } = await fh.read(buf, done, length - done, position + done);
    if (bytesRead === 0) throw new ShieldError('io_error', `The input ended early (at ${position + done} bytes): it changed while being converted.`);
    done += bytesRead;
  }
  return buf.subarray(0, length);
}

/** Large transfers go as a few concurrent pieces, so the thread pool (and every core) shares the copying. */
const PIECE = 8 * MiB;

function pieces(length: number): [number, number][] {
  const out: [number, number][] = [];
  for (let at = 0; at < length; at += PIECE) out.push([at, Math.min(PIECE, length - at)]);
  return out;
}

async function readParallel(fh: FileHandle, buf: Buffer, length: number, position: number): Promise<Buffer> {
  await Promise.all(pieces(length).map(([at, n]) => readFully(fh, buf.subarray(at, at + n), n, position + at)));
  return buf.subarray(0, length);
}

async function writeParallel(fh: FileHandle, buf: Buffer, position: number): Promise<void> {
  await Promise.all(pieces(buf.length).map(([at, n]) => writeAll(fh, buf.subarray(at, at + n), position + at)));
}

function sameFile(a: string, b: string): boolean {
  return resolve(a) === resolve(b);
}

/** Raw image → new VHDX. Dynamic: all-zero blocks stay unallocated (ZERO); fixed: every block present. */
export async function convertRawToVhdx(input: string, output: string, opts: ConvertOptions = {}): Promise<ConvertResult> {
  if (sameFile(input, output)) throw new ShieldError('invalid_argument', 'The input and the output are the same file.');
  opts.signal?.throwIfAborted();
  let inFh: FileHandle;
  try {
    inFh = await open(input, 'r');
  } catch (err) {
    throw asShieldError(err, `Opening ${input}`);
  }
  try {
    const st = await inFh.stat();
    if (!st.isFile() && !st.isBlockDevice()) throw new ShieldError('invalid_argument', `${input} is not a file.`);
    const rawSize = st.size;
    if (rawSize === 0) throw new ShieldError('invalid_argument', `${input} is empty: a VHDX needs a size above zero.`);
    const lss = opts.logicalSectorSize ?? 512;
    const l = planLayout({
      size: Math.ceil(rawSize / lss) * lss,
      type: opts.type ?? 'dynamic',
      ...(opts.blockSize !== undefined ? { blockSize: opts.blockSize } : {}),
      logicalSectorSize: lss,
    });
    const out = await PartialFile.create(output);
    try {
      await writeStructures(out.fh, l);
      const fixed = l.type === 'fixed';
      if (fixed) await out.fh.truncate(l.dataOffset + l.payloadBlocks * l.blockSize);
      const bat = new BatWriter(out.fh, l);
      const bufs = [Buffer.allocUnsafe(l.blockSize), Buffer.allocUnsafe(l.blockSize)];
      const readBlock = (b: number) => {
        const n = Math.min(l.blockSize, rawSize - b * l.blockSize);
        return readParallel(inFh, bufs[b % 2]!, n, b * l.blockSize);
      };
      let next: Promise<Buffer> | null = readBlock(0);
      next.catch(() => undefined);
      let nextData = l.dataOffset;
      let dataBlocks = 0;
      try {
        for (let b = 0; b < l.payloadBlocks; b++) {
          opts.signal?.throwIfAborted();
          const data = await next!;
          next = b + 1 < l.payloadBlocks ? readBlock(b + 1) : null;
          next?.catch(() => undefined); // handled when awaited; never an unhandled rejection meanwhile
          const zero = isZero(data);
          if (fixed) {
            const at = l.dataOffset + b * l.blockSize;
            if (!zero) await writeParallel(out.fh, data, at); // zero blocks stay holes in the preallocated file
            await bat.set(b, PAYLOAD_STATE.FULLY_PRESENT, at);
          } else if (zero) {
            await bat.set(b, PAYLOAD_STATE.ZERO);
          } else {
            await writeParallel(out.fh, data, nextData);
            await bat.set(b, PAYLOAD_STATE.FULLY_PRESENT, nextData);
            nextData += l.blockSize;
          }
          if (!zero) dataBlocks++;
          opts.onProgress?.(Math.min(l.virtualSize, (b + 1) * l.blockSize), l.virtualSize);
        }
      } finally {
        await next?.catch(() => undefined); // never leave a read running on a closing handle
      }
      await bat.flush();
      const fileSize = fixed ? l.dataOffset + l.payloadBlocks * l.blockSize : nextData;
      await out.fh.truncate(fileSize); // also rounds a short last block up to a whole block
      opts.signal?.throwIfAborted();
      await out.publish(opts.durable ?? true);
      return { input, output, virtualSize: l.virtualSize, dataBlocks, blocks: l.payloadBlocks, fileSize };
    } catch (err) {
      await out.discard();
      throw err;
    }
  } catch (err) {
    if (opts.signal?.aborted && err === opts.signal.reason) throw err;
    throw asShieldError(err, `Converting ${input}`);
  } finally {
    await inFh.close();
  }
}

/** VHDX (read through our reader, so a dirty log is replayed in memory) → new raw image, zeros as holes. */
export async function convertVhdxToRaw(input: string, output: string, opts: Pick<ConvertOptions, 'onProgress' | 'signal' | 'durable'> = {}): Promise<ConvertResult> {
  if (sameFile(input, output)) throw new ShieldError('invalid_argument', 'The input and the output are the same file.');
  opts.signal?.throwIfAborted();
  const image = await openVhdx(input, { readOnly: true });
  try {
    const { virtualSize, blockSize } = image.info.metadata;
    const blocks = Math.ceil(virtualSize / blockSize);
    // Reads go in pieces of at most 32 MiB, so memory stays flat with 256 MiB blocks too.
    const step = Math.min(blockSize, 32 * MiB);
    const out = await PartialFile.create(output);
    try {
      await out.fh.truncate(virtualSize); // a sparse file: skipped ranges read as zeros
      const bufs = [Buffer.allocUnsafe(step), Buffer.allocUnsafe(step)];
      let turn = 0;
      const readPiece = async (offset: number): Promise<Buffer | null> => {
        const state = await image.blockState(Math.floor(offset / blockSize));
        if (state !== PAYLOAD_STATE.FULLY_PRESENT && state !== PAYLOAD_STATE.PARTIALLY_PRESENT) return null;
        const buf = bufs[turn++ % 2]!;
        const length = Math.min(step, virtualSize - offset);
        await Promise.all(pieces(length).map(([at, n]) => image.read(offset + at, n, buf.subarray(at, at + n))));
        return buf.subarray(0, length);
      };
      let dataBlocks = 0;
      let blockHadData = false;
      let next: Promise<Buffer | null> | null = readPiece(0);
      next.catch(() => undefined);
      try {
        for (let offset = 0; offset < virtualSize; offset += step) {
          opts.signal?.throwIfAborted();
          const data = await next!;
          next = offset + step < virtualSize ? readPiece(offset + step) : null;
          next?.catch(() => undefined);
          if (data && !isZero(data)) {
            await writeParallel(out.fh, data, offset);
            blockHadData = true;
          }
          const end = Math.min(virtualSize, offset + step);
          if (end % blockSize === 0 || end === virtualSize) {
            if (blockHadData) dataBlocks++;
            blockHadData = false;
            opts.onProgress?.(end, virtualSize);
          }
        }
      } finally {
        await next?.catch(() => undefined);
      }
      opts.signal?.throwIfAborted();
      await out.publish(opts.durable ?? true);
      return { input, output, virtualSize, dataBlocks, blocks, fileSize: virtualSize };
    } catch (err) {
      await out.discard();
      throw err;
    }
  } catch (err) {
    if (opts.signal?.aborted && err === opts.signal.reason) throw err;
    throw asShieldError(err, `Converting ${input}`);
  } finally {
    await image.close();
  }
}
