// Streaming raw ⇄ VHDX conversion in 1 MiB chunks. All-zero chunks are never written: they stay
// holes in the output, and a block with no data at all is not allocated. Memory is a few chunk
// buffers and one BAT page whatever the disk size. Output goes to `${output}.partial` and is
// published only when complete; a failure or an abort removes the partial file. The input is only
// ever opened read-only.
//
// The copying itself is synchronous, in short slices between which the event loop runs (signals,
// progress, other requests): a read, a zero test and a write of one chunk in one thread keep the
// chunk in the CPU cache, and cost no hand-offs to the thread pool, which on a busy or virtualised
// machine cost more than the copying (measured in-process against a read-ahead pipeline of 1 MiB
// reads and writes on the thread pool: faster on sparse, dense and random input alike). VHDX input
// is copied the same way, straight from the file, wherever a block's bytes are there to take (a
// fully present block, no parent, no dirty log replayed in memory); otherwise (a differencing disk,
// a dirty log) it is read through the reader, whose reads are asynchronous: a few chunks are read
// ahead while earlier ones are written.
//
// A durable conversion starts writeback of its output as it goes (fdatasync on a second handle
// every WRITEBACK_EVERY bytes, in the thread pool, not waited for), so the disk writes while the
// copy runs and the final flush before publishing has little left to do.
import { readSync, writeSync } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { resolve } from 'node:path';
import { ShieldError, toShieldError } from '../errors.ts';
import { BatWriter, PartialFile, asShieldError, planLayout, writeStructures, type VhdxType } from './create.ts';
import { VhdxImage, type OpenOptions } from './reader.ts';
import { MiB, PAYLOAD_STATE, batIndexOfBlock } from './structures.ts';

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

/**
 * The transfer unit: small enough to stay in the CPU cache between its read, its zero test and its
 * write (a 32 MiB block would cross memory three times), large enough that calls stay few. Block
 * sizes are powers of two from 1 MiB, so chunks tile blocks.
 */
const CHUNK = MiB;
/** Longest stretch of synchronous copying before the event loop gets a turn. */
const SLICE_MS = 4;
/** VHDX → raw: chunks the reader reads ahead (on the thread pool) while earlier ones are written. */
const READ_AHEAD = 4;
/** VHDX → raw: blocks that are not present are skipped this many at a time (one step, nothing read). */
const HOLE_RUN = 1024;
/**
 * Writes go out in pieces of at most this size. A 1 MiB write lands in the page cache as one large
 * folio, and allocating those is what a conversion paid most for on a VM whose free memory goes back
 * to the host (Linux 6.18, ext4): 1 GiB of sparse input to VHDX took 0.94–1.18 s in-process written
 * in 1 MiB pieces and 0.36–0.64 s in 256 KiB ones (interleaved runs, each after a sync and 3 s;
 * 512 KiB was no better, 64 KiB a little worse). qemu-img, which writes 2 MiB at a time, spends most
 * of its conversion there too (strace: about 3 ms per 2 MiB pwrite). Smaller folios are also what
 * later 4 KiB writes into the output want (see core/shield/disk.ts).
 */
const WRITE_PIECE = 256 * 1024;
/** A durable conversion starts writeback of its output every this many bytes written. */
const WRITEBACK_EVERY = 64 * MiB;

const ZERO = Buffer.alloc(CHUNK);

const isPresent = (state: number) => state === PAYLOAD_STATE.FULLY_PRESENT || state === PAYLOAD_STATE.PARTIALLY_PRESENT;

/** Whether a buffer is all zeros (memcmp against a zero buffer, stopping at the first data). */
export function isZero(buf: Buffer): boolean {
  for (let at = 0; at < buf.length; at += ZERO.length) {
    const n = Math.min(ZERO.length, buf.length - at);
    if (ZERO.compare(buf, at, at + n, 0, n) !== 0) return false;
  }
  return true;
}

function readFullySync(fd: number, buf: Buffer, position: number): Buffer {
  let done = 0;
  while (done < buf.length) {
    const n = readSync(fd, buf, done, buf.length - done, position + done);
    if (n === 0) throw new ShieldError('io_error', `The input ended early (at ${position + done} bytes): it changed while being converted.`);
    done += n;
  }
  return buf;
}

function writeAllSync(fd: number, buf: Buffer, position: number): void {
  let done = 0;
  while (done < buf.length) done += writeSync(fd, buf, done, Math.min(WRITE_PIECE, buf.length - done), position + done);
}

/** Lets the event loop run (after I/O callbacks and signals) once a slice of synchronous work is done. */
class Slicer {
  private since = performance.now();

  async turn(): Promise<void> {
    if (performance.now() - this.since < SLICE_MS) return;
    await new Promise<void>((resolve) => setImmediate(resolve));
    this.since = performance.now();
  }
}

const noop = () => undefined;

/**
 * Early writeback for a durable conversion: every WRITEBACK_EVERY bytes, an fdatasync of the output
 * through a second handle (it flushes the file whichever handle wrote it) is started in the thread
 * pool and not waited for; one at a time. Its errors are left to the final flush, which reports
 * them. Does nothing for a conversion that is not durable.
 */
class Writeback {
  private readonly fh: FileHandle | null;
  private unsynced = 0;
  private running: Promise<void> | null = null;

  private constructor(fh: FileHandle | null) {
    this.fh = fh;
  }

  static async open(path: string, durable: boolean): Promise<Writeback> {
    return new Writeback(durable ? await open(path, 'r').catch(() => null) : null);
  }

  wrote(n: number): void {
    if (!this.fh) return;
    this.unsynced += n;
    if (this.unsynced < WRITEBACK_EVERY || this.running) return;
    this.unsynced = 0;
    const run = this.fh.datasync().finally(() => void (this.running = null));
    run.catch(noop); // an I/O error is reported by the final flush
    this.running = run;
  }

  /** Waits for the flush still running (never left running on a closed file) and closes the handle. */
  async close(): Promise<void> {
    await this.running?.catch(noop);
    await this.fh?.close().catch(noop);
  }
}

/**
 * The reader, with one addition for copying: where a block's bytes can be read straight from the
 * file with synchronous reads (no thread pool, no promise per chunk). That is a fully present
 * block of a disk with no parent, when no dirty log was replayed in memory.
 */
class DirectImage extends VhdxImage {
  static async openDirect(path: string, opts: OpenOptions = {}): Promise<DirectImage> {
    let fh: FileHandle;
    try {
      fh = await open(path, 'r');
    } catch (err) {
      throw toShieldError(err);
    }
    const image = await VhdxImage.load(fh, { ...opts, readOnly: true }, (...parts) => new DirectImage(...parts));
    await image.attachParent(path, opts);
    return image;
  }

  /** Whether every present block can be read straight from the file. */
  get direct(): boolean {
    return !this.info.metadata.hasParent && this.source.writes.length === 0 && this.source.size === this.source.fileSize;
  }

  get fd(): number {
    return this.source.fh.fd;
  }

  /**
   * Where block `block`'s bytes start in the file when it is fully present (checked against the
   * file and the metadata structures, as a read would), null when it is not: it reads as zeros
   * or needs the reader (which also reports a state that is not allowed).
   */
  async directOffset(block: number): Promise<number | null> {
    const entry = await this.batEntry(batIndexOfBlock(block, this.geometry.chunkRatio));
    if (entry.state !== PAYLOAD_STATE.FULLY_PRESENT) return null;
    this.checkPayload(block, entry);
    return entry.fileOffset;
  }
}

/** One step, produced in disk order: `read` fills a pool buffer; null when the range reads as zeros. */
interface Job<T> {
  meta: T;
  read: ((buf: Buffer) => Promise<Buffer>) | null;
}

/** A step done: `data` (in `buf`, a pool buffer) null when it was known to be zeros without reading. */
interface Done<T> {
  meta: T;
  buf: Buffer | null;
  data: Buffer | null;
}

/**
 * Reads running ahead, over a small pool of buffers. Jobs come from `produce` one after another
 * (it may look things up, e.g. a block's state) and are handed back in that order; the caller
 * gives each buffer back when done with it. After a failure, `settle()` waits for every read
 * still running, so no handle is closed under one.
 */
class ReadAhead<T> {
  private readonly free: Buffer[] = [];
  private made = 0; // buffers are made on first need: a small disk never allocates them all
  private readonly waiting: { give: (b: Buffer) => void; fail: (e: unknown) => void }[] = [];
  private readonly ahead: Promise<Done<T> | null>[] = [];
  private produced: Promise<unknown> = Promise.resolve();
  private closed = false;
  private readonly produce: () => Promise<Job<T> | null>;

  constructor(produce: () => Promise<Job<T> | null>) {
    this.produce = produce;
    for (let i = 0; i < READ_AHEAD; i++) this.start();
  }

  private acquire(): Promise<Buffer> {
    if (this.closed) return Promise.reject(new Error('conversion stopped'));
    const buf = this.free.pop();
    if (buf) return Promise.resolve(buf);
    if (this.made <= READ_AHEAD) {
      this.made++;
      return Promise.resolve(Buffer.allocUnsafe(CHUNK));
    }
    return new Promise((give, fail) => this.waiting.push({ give, fail }));
  }

  release(buf: Buffer | null): void {
    if (!buf || this.closed) return;
    const w = this.waiting.shift();
    if (w) w.give(buf);
    else this.free.push(buf);
  }

  private start(): void {
    const job = this.produced.then(() => this.produce()); // one after another, in disk order
    this.produced = job.catch(noop);
    const done = job.then(async (j): Promise<Done<T> | null> => {
      if (!j) return null;
      if (!j.read) return { meta: j.meta, buf: null, data: null };
      const buf = await this.acquire();
      return { meta: j.meta, buf, data: await j.read(buf) };
    });
    done.catch(noop); // handled when taken; never an unhandled rejection meanwhile
    this.ahead.push(done);
  }

  /** The next step in order, or null at the end (and one more started). */
  async take(): Promise<Done<T> | null> {
    const done = await this.ahead.shift()!;
    if (done) this.start();
    return done;
  }

  /** After a failure: stops handing out buffers and waits for every read still running. */
  async settle(): Promise<void> {
    this.closed = true;
    for (const w of this.waiting.splice(0)) w.fail(new Error('conversion stopped'));
    await Promise.allSettled([...this.ahead, this.produced]);
  }
}

function sameFile(a: string, b: string): boolean {
  return resolve(a) === resolve(b);
}

/** Raw image → new VHDX. Dynamic: all-zero blocks stay unallocated (ZERO); fixed: every block present. */
export async function convertRawToVhdx(input: string, output: string, opts: ConvertOptions = {}): Promise<ConvertResult> {
  if (sameFile(input, output)) throw new ShieldError('invalid_argument', 'The input and the output are the same file.');
  opts.signal?.throwIfAborted();
  const durable = opts.durable ?? true;
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
    let wb: Writeback | null = null;
    try {
      wb = await Writeback.open(out.partial, durable);
      await writeStructures(out.fh, l);
      const fixed = l.type === 'fixed';
      // A sparse file of the final size: blocks (and chunks) that are never written read as zeros.
      const fileSizeFixed = l.dataOffset + l.payloadBlocks * l.blockSize;
      if (fixed) await out.fh.truncate(fileSizeFixed);
      const bat = new BatWriter(out.fh, l);
      const perBlock = l.blockSize / CHUNK;
      const chunks = Math.ceil(rawSize / CHUNK);
      const buf = Buffer.allocUnsafe(Math.min(CHUNK, rawSize));
      const inFd = inFh.fd;
      const outFd = out.fh.fd;
      const slicer = new Slicer();
      let nextData = l.dataOffset;
      let dataBlocks = 0;
      let blockAt = -1; // where the current block's data goes; -1 until it has any
      for (let i = 0; i < chunks; i++) {
        await slicer.turn();
        opts.signal?.throwIfAborted();
        const data = readFullySync(inFd, buf.subarray(0, Math.min(CHUNK, rawSize - i * CHUNK)), i * CHUNK);
        const b = Math.floor(i / perBlock);
        if (!isZero(data)) {
          if (blockAt < 0) {
            blockAt = fixed ? l.dataOffset + b * l.blockSize : nextData;
            if (!fixed) nextData += l.blockSize;
            dataBlocks++;
          }
          writeAllSync(outFd, data, blockAt + (i % perBlock) * CHUNK);
          wb.wrote(data.length);
        }
        if ((i + 1) % perBlock === 0 || i === chunks - 1) {
          // The block is done: its BAT entry, in block order.
          if (fixed) await bat.set(b, PAYLOAD_STATE.FULLY_PRESENT, l.dataOffset + b * l.blockSize);
          else if (blockAt < 0) await bat.set(b, PAYLOAD_STATE.ZERO);
          else await bat.set(b, PAYLOAD_STATE.FULLY_PRESENT, blockAt);
          blockAt = -1;
          opts.onProgress?.(Math.min(l.virtualSize, (b + 1) * l.blockSize), l.virtualSize);
        }
      }
      await bat.flush();
      const fileSize = fixed ? fileSizeFixed : nextData;
      await out.fh.truncate(fileSize); // also the unwritten tail of the last data block
      opts.signal?.throwIfAborted();
      await wb.close();
      await out.publish(durable);
      return { input, output, virtualSize: l.virtualSize, dataBlocks, blocks: l.payloadBlocks, fileSize };
    } catch (err) {
      await wb?.close();
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
  const durable = opts.durable ?? true;
  const image = await DirectImage.openDirect(input);
  try {
    const { virtualSize } = image.info.metadata;
    const out = await PartialFile.create(output);
    let wb: Writeback | null = null;
    try {
      await out.fh.truncate(virtualSize); // a sparse file: skipped ranges read as zeros
      wb = await Writeback.open(out.partial, durable);
      const copy = image.direct ? copyDirect : copyThroughReader;
      const { dataBlocks, blocks } = await copy(image, out.fh.fd, wb, opts);
      opts.signal?.throwIfAborted();
      await wb.close();
      await out.publish(durable);
      return { input, output, virtualSize, dataBlocks, blocks, fileSize: virtualSize };
    } catch (err) {
      await wb?.close();
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

type CopyOptions = Pick<ConvertOptions, 'onProgress' | 'signal'>;

/** VHDX → raw for a disk whose present blocks are all in its own file: synchronous reads straight from it. */
async function copyDirect(image: DirectImage, outFd: number, wb: Writeback, opts: CopyOptions): Promise<{ dataBlocks: number; blocks: number }> {
  const { virtualSize, blockSize } = image.info.metadata;
  const blocks = Math.ceil(virtualSize / blockSize);
  const buf = Buffer.allocUnsafe(Math.min(CHUNK, virtualSize));
  const inFd = image.fd;
  const slicer = new Slicer();
  let dataBlocks = 0;
  for (let b = 0; b < blocks; b++) {
    await slicer.turn();
    opts.signal?.throwIfAborted();
    const start = b * blockSize;
    const end = Math.min(virtualSize, start + blockSize);
    const at = await image.directOffset(b);
    if (at !== null || isPresent(await image.blockState(b))) {
      // Fully present: straight from the file. Otherwise the reader says what it is (and refuses
      // a state this disk may not have).
      let hadData = false;
      for (let off = start; off < end; off += CHUNK) {
        if (off > start) {
          await slicer.turn();
          opts.signal?.throwIfAborted();
        }
        const piece = buf.subarray(0, Math.min(CHUNK, end - off));
        const data = at !== null ? readFullySync(inFd, piece, at + (off - start)) : await image.read(off, piece.length, piece);
        if (isZero(data)) continue;
        writeAllSync(outFd, data, off);
        wb.wrote(data.length);
        hadData = true;
      }
      if (hadData) dataBlocks++;
    }
    opts.onProgress?.(end, virtualSize);
  }
  return { dataBlocks, blocks };
}

/** VHDX → raw through the reader (a differencing disk, a dirty log replayed in memory), a few chunks read ahead. */
async function copyThroughReader(image: VhdxImage, outFd: number, wb: Writeback, opts: CopyOptions): Promise<{ dataBlocks: number; blocks: number }> {
  const { virtualSize, blockSize } = image.info.metadata;
  const blocks = Math.ceil(virtualSize / blockSize);
  const differencing = image.info.type === 'differencing';
  // Jobs: every chunk of a present block; one step (nothing read) for a run of blocks that are not.
  let block = 0;
  let within = 0; // the next chunk of `block`
  const reads = new ReadAhead<{ offset: number; blocksEnded: number }>(async () => {
    if (block >= blocks) return null;
    if (within === 0) {
      // Blocks that read as zeros (not present here and, in a differencing disk, nowhere up
      // the chain) are never read.
      const first = block;
      const zeros = async (b: number) => (differencing ? image.blockReadsAsZeros(b) : !isPresent(await image.blockState(b)));
      while (block < blocks && block - first < HOLE_RUN && (await zeros(block))) block++;
      if (block > first) return { meta: { offset: first * blockSize, blocksEnded: block - first }, read: null };
    }
    const offset = block * blockSize + within * CHUNK;
    const n = Math.min(CHUNK, virtualSize - offset, (block + 1) * blockSize - offset);
    const last = offset + n === Math.min(virtualSize, (block + 1) * blockSize);
    if (last) {
      block++;
      within = 0;
    } else within++;
    return { meta: { offset, blocksEnded: last ? 1 : 0 }, read: (buf) => image.read(offset, n, buf) };
  });
  let dataBlocks = 0;
  let blockHadData = false;
  let blocksDone = 0;
  try {
    for (let done = await reads.take(); done; done = await reads.take()) {
      opts.signal?.throwIfAborted();
      const { meta, buf, data } = done;
      if (data && !isZero(data)) {
        writeAllSync(outFd, data, meta.offset);
        wb.wrote(data.length);
        blockHadData = true;
      }
      reads.release(buf);
      for (let k = 0; k < meta.blocksEnded; k++) {
        if (blockHadData) dataBlocks++;
        blockHadData = false;
        opts.onProgress?.(Math.min(virtualSize, ++blocksDone * blockSize), virtualSize);
      }
    }
  } catch (err) {
    await reads.settle(); // never leave a read running on a closing image
    throw err;
  }
  return { dataBlocks, blocks };
}
