// Shielded disks: a dynamic VHDX whose payload is AES-256-XTS ciphertext and whose shield item
// (key protector + wrapped data key) is a user metadata item marked IsUser + IsRequired, so QEMU
// and every spec-following reader refuse to open it as a plain disk. Shielding streams the input
// into `${output}.partial` and links it into place only when complete; serving decrypts in
// memory, unit by unit, for the NBD server.
import { link, open, rm, type FileHandle } from 'node:fs/promises';
import { resolve } from 'node:path';
import { ShieldError, toShieldError } from '../errors.ts';
import { createVhdx, openVhdx, PAYLOAD_STATE, type VhdxImage, type VhdxWritable } from '../vhdx/mod.ts';
import { checkUnitSize, xtsUnits } from './cipher.ts';
import { SHIELD_ITEM, buildShieldItem, newDataKey, openShieldItem, parseShieldItem, reseal, type DataKey, type ShieldItem } from './format.ts';

const MiB = 1024 * 1024;
export const DEFAULT_UNIT = 4096;
/** Shielded disks use small blocks: a guest's scattered writes allocate less. */
export const DEFAULT_BLOCK = 2 * MiB;

export type DiskFormat = 'raw' | 'vhdx';

export interface ShieldCreateOptions {
  kp: Buffer;
  transportKey: Buffer;
  unitSize?: number;
  blockSize?: number;
  onProgress?: (done: number, total: number) => void;
  signal?: AbortSignal;
}

export interface ShieldCreateResult {
  input: string;
  output: string;
  from: DiskFormat;
  virtualSize: number;
  blocks: number;
  dataBlocks: number;
  unitSize: number;
  diskId: string;
  fileSize: number;
}

/** Plaintext to shield: a raw file or a VHDX (read through our reader). */
interface Plain {
  size: number;
  logicalSectorSize: number;
  read(offset: number, into: Buffer): Promise<void>;
  /** True when the block certainly reads as zeros (skipped without reading). */
  zeroBlock(offset: number, length: number): Promise<boolean>;
  close(): Promise<void>;
}

async function openPlain(path: string, format: DiskFormat): Promise<Plain> {
  if (format === 'vhdx') {
    const img = await openVhdx(path);
    const bs = img.info.metadata.blockSize;
    return {
      size: img.info.metadata.virtualSize,
      logicalSectorSize: img.info.metadata.logicalSectorSize,
      read: async (offset, into) => {
        await img.read(offset, into.length, into);
      },
      zeroBlock: async (offset, length) => length <= bs && offset % bs === 0 && (await img.blockReadsAsZeros(offset / bs)),
      close: () => img.close(),
    };
  }
  let fh: FileHandle;
  try {
    fh = await open(path, 'r');
  } catch (err) {
    throw toShieldError(err);
  }
  const size = (await fh.stat()).size;
  return {
    size,
    logicalSectorSize: 512,
    read: async (offset, into) => {
      into.fill(0); // a raw size off the sector boundary reads zeros past its end
      let done = 0;
      const want = Math.max(0, Math.min(into.length, size - offset));
      while (done < want) {
        const { bytesRead } = await fh.read(into, done, want - done, offset + done);
        if (bytesRead === 0) throw new ShieldError('io_error', `${path} ended early: it changed while being read.`);
        done += bytesRead;
      }
    },
    zeroBlock: async () => false,
    close: () => fh.close(),
  };
}

const ZERO = Buffer.alloc(MiB);
function allZero(buf: Buffer): boolean {
  for (let at = 0; at < buf.length; at += ZERO.length) {
    const n = Math.min(ZERO.length, buf.length - at);
    if (ZERO.compare(buf, at, at + n, 0, n) !== 0) return false;
  }
  return true;
}

async function exists(path: string): Promise<boolean> {
  return open(path, 'r').then(
    async (fh) => {
      await fh.close();
      return true;
    },
    () => false,
  );
}

/**
 * Shields a raw or VHDX disk into a new VHDX. Blocks that read as zeros stay unallocated (the BAT
 * already shows which blocks hold data); every other block is encrypted whole. The input is only
 * read; an interrupted run removes its partial output.
 */
export async function shieldImage(input: string, from: DiskFormat, output: string, opts: ShieldCreateOptions): Promise<ShieldCreateResult> {
  if (resolve(input) === resolve(output)) throw new ShieldError('invalid_argument', 'The input and the output are the same file.');
  if (await exists(output)) throw new ShieldError('already_exists', `${output} already exists; nothing was written.`);
  const unitSize = opts.unitSize ?? DEFAULT_UNIT;
  checkUnitSize(unitSize);
  opts.signal?.throwIfAborted();
  const plain = await openPlain(input, from);
  const partial = `${output}.partial`;
  let created = false;
  try {
    if (plain.size === 0) throw new ShieldError('invalid_argument', `${input} is empty.`);
    const sector = plain.logicalSectorSize;
    const size = Math.ceil(plain.size / sector) * sector;
    const blockSize = opts.blockSize ?? DEFAULT_BLOCK;
    if (blockSize % unitSize !== 0) throw new ShieldError('invalid_argument', `The block size must be a multiple of the ${unitSize}-byte data unit.`);
    await createVhdx(partial, { size, type: 'dynamic', blockSize, logicalSectorSize: sector });
    created = true;
    const disk = await openVhdx(partial, { readOnly: false, knownUserItems: [SHIELD_ITEM] });
    const key = newDataKey();
    let dataBlocks = 0;
    const blocks = Math.ceil(size / blockSize);
    try {
      const diskId = disk.info.metadata.virtualDiskId;
      const item = buildShieldItem({ integrity: false, unitSize, diskId, generation: 1n }, opts.kp, opts.transportKey, key);
      await disk.setUserItem(SHIELD_ITEM, item, { required: true });
      const buf = Buffer.allocUnsafe(blockSize);
      for (let b = 0; b < blocks; b++) {
        opts.signal?.throwIfAborted();
        const offset = b * blockSize;
        const n = Math.min(blockSize, size - offset);
        if (!(await plain.zeroBlock(offset, n))) {
          const data = buf.subarray(0, n);
          await plain.read(offset, data);
          if (!allZero(data)) {
            xtsUnits('encrypt', key.xts, unitSize, offset / unitSize, data, data);
            await disk.write(offset, data);
            dataBlocks++;
          }
        }
        if (b % 256 === 255) await disk.flush(); // BAT commits in batches: memory stays flat
        opts.onProgress?.(Math.min(size, offset + blockSize), size);
      }
      buf.fill(0);
      await disk.close();
      opts.signal?.throwIfAborted();
      const fileSize = disk.info.fileSize;
      await publish(partial, output);
      created = false;
      return { input, output, from, virtualSize: size, blocks, dataBlocks, unitSize, diskId, fileSize };
    } finally {
      key.wipe();
      await disk.close();
    }
  } catch (err) {
    if (opts.signal?.aborted && err === opts.signal.reason) throw err;
    throw toShieldError(err);
  } finally {
    if (created) await rm(partial, { force: true });
    await plain.close();
  }
}

/** Links the finished file into place, never over an existing one. */
async function publish(partial: string, output: string): Promise<void> {
  const fh = await open(partial, 'r+');
  await fh.datasync().finally(() => fh.close());
  try {
    await link(partial, output);
  } catch (err) {
    if ((err as { code?: string }).code === 'EEXIST') throw new ShieldError('already_exists', `${output} appeared while it was being written; it was left alone.`);
    throw err;
  }
  await rm(partial, { force: true });
}

/** The shield item of a file, read without any key (for `disk info` and for release). */
export async function readShieldItem(path: string): Promise<{ item: ShieldItem; image: VhdxImage['info'] }> {
  const img = await openVhdx(path, { knownUserItems: [SHIELD_ITEM] });
  try {
    const bytes = await img.userItem(SHIELD_ITEM);
    if (!bytes) throw new ShieldError('shield_invalid', `${path} is a VHDX, but not a shielded one (no shield item).`);
    const item = parseShieldItem(bytes);
    if (item.diskId !== img.info.metadata.virtualDiskId) throw new ShieldError('shield_tampered', 'The shield item belongs to another disk (its disk ID differs from the VHDX\'s).');
    return { item, image: img.info };
  } finally {
    await img.close();
  }
}

/** Units [first, last] being rewritten; writes that share a unit wait for each other. */
class UnitLocks {
  private readonly active = new Set<{ first: number; last: number; done: Promise<void> }>();

  async hold<T>(first: number, last: number, work: () => Promise<T>): Promise<T> {
    for (;;) {
      const clash = [...this.active].find((a) => a.first <= last && first <= a.last);
      if (!clash) break;
      await clash.done;
    }
    let release!: () => void;
    const entry = { first, last, done: new Promise<void>((r) => (release = r)) };
    this.active.add(entry);
    try {
      return await work();
    } finally {
      this.active.delete(entry);
      release();
    }
  }
}

/**
 * A shielded disk opened with its released transport key: plaintext reads and writes over the
 * ciphertext file, for the NBD server. The data key lives only here and is wiped on close.
 */
export class ShieldedDisk {
  readonly size: number;
  readonly unitSize: number;
  readonly minBlock: number;
  readonly readOnly: boolean;
  readonly diskId: string;
  private readonly img: VhdxImage;
  private readonly key: DataKey;
  private readonly item: ShieldItem;
  private readonly locks = new UnitLocks();
  private closed = false;

  private constructor(img: VhdxImage, key: DataKey, item: ShieldItem, readOnly: boolean) {
    this.img = img;
    this.key = key;
    this.item = item;
    this.readOnly = readOnly;
    this.size = img.info.metadata.virtualSize;
    this.unitSize = item.unitSize;
    this.minBlock = img.info.metadata.logicalSectorSize;
    this.diskId = item.diskId;
  }

  static async open(path: string, transportKey: Buffer, opts: { readOnly?: boolean } = {}): Promise<ShieldedDisk> {
    const readOnly = opts.readOnly ?? false;
    const img = readOnly ? await openVhdx(path, { knownUserItems: [SHIELD_ITEM] }) : await openVhdx(path, { readOnly: false, knownUserItems: [SHIELD_ITEM] });
    try {
      const bytes = await img.userItem(SHIELD_ITEM);
      if (!bytes) throw new ShieldError('shield_invalid', `${path} is a VHDX, but not a shielded one (no shield item).`);
      const item = parseShieldItem(bytes);
      if (item.diskId !== img.info.metadata.virtualDiskId) throw new ShieldError('shield_tampered', 'The shield item belongs to another disk (its disk ID differs from the VHDX\'s).');
      if (item.integrity) throw new ShieldError('vhdx_unsupported', 'This disk uses integrity mode, which this build cannot serve yet.');
      const key = openShieldItem(item, transportKey);
      return new ShieldedDisk(img, key, item, readOnly);
    } catch (err) {
      await img.close();
      throw err;
    }
  }

  private check(offset: number, length: number): void {
    if (this.closed) throw new ShieldError('invalid_argument', 'The shielded disk is closed.');
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new ShieldError('invalid_argument', `${length} bytes at ${offset} lie outside the ${this.size}-byte disk.`);
    }
  }

  private writable(): VhdxWritable {
    if (this.readOnly) throw new ShieldError('forbidden', 'The shielded disk is open read-only.');
    return this.img as VhdxWritable;
  }

  /** Whole units covering [offset, offset+length), clipped to the disk. */
  private span(offset: number, length: number): { first: number; start: number; end: number } {
    const u = this.unitSize;
    const start = Math.floor(offset / u) * u;
    const end = Math.min(this.size, Math.ceil((offset + length) / u) * u);
    return { first: start / u, start, end };
  }

  /** Decrypted bytes; units read whole (the disk's last unit may be short only if the size is). */
  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    this.check(offset, length);
    const out = into ? into.subarray(0, length) : Buffer.alloc(length);
    if (length === 0) return out;
    const { first, start, end } = this.span(offset, length);
    const aligned = start === offset && end === offset + length;
    const ct = aligned ? out : Buffer.allocUnsafe(end - start);
    await this.img.read(start, end - start, ct);
    xtsUnits('decrypt', this.key.xts, this.unitSize, first, ct, ct);
    if (!aligned) ct.copy(out, 0, offset - start, offset - start + length);
    return out;
  }

  async write(offset: number, data: Buffer, fua = false): Promise<void> {
    this.check(offset, data.length);
    const w = this.writable();
    if (data.length === 0) return;
    const { first, start, end } = this.span(offset, data.length);
    const units = Math.ceil((end - start) / this.unitSize);
    await this.locks.hold(first, first + units - 1, async () => {
      const buf = Buffer.allocUnsafe(end - start);
      if (start !== offset || end !== offset + data.length) {
        await this.img.read(start, end - start, buf); // read-modify-write of the edge units
        xtsUnits('decrypt', this.key.xts, this.unitSize, first, buf, buf);
      }
      data.copy(buf, offset - start);
      xtsUnits('encrypt', this.key.xts, this.unitSize, first, buf, buf);
      await w.write(start, buf);
    });
    if (fua) await w.flush();
  }

  async flush(): Promise<void> {
    if (this.readOnly) return;
    await this.writable().flush();
  }

  /** A discard: whole blocks are given back and read as zeros; anything else is only a hint. */
  async trim(offset: number, length: number): Promise<void> {
    this.check(offset, length);
    await this.writable().discard(offset, length);
  }

  /** Zeros: whole blocks become ZERO blocks, whole units all-zero ciphertext, edges are rewritten. */
  async writeZeroes(offset: number, length: number, fua = false): Promise<void> {
    this.check(offset, length);
    const w = this.writable();
    const u = this.unitSize;
    const innerStart = Math.ceil(offset / u) * u;
    const innerEnd = Math.floor((offset + length) / u) * u;
    if (innerStart >= innerEnd) {
      await this.write(offset, Buffer.alloc(length));
    } else {
      if (innerStart > offset) await this.write(offset, Buffer.alloc(innerStart - offset));
      await this.locks.hold(innerStart / u, innerEnd / u - 1, () => w.writeZeroes(innerStart, innerEnd - innerStart));
      if (offset + length > innerEnd) await this.write(innerEnd, Buffer.alloc(offset + length - innerEnd));
    }
    if (fua) await w.flush();
  }

  /** Allocation by block: unallocated and zero blocks are holes that read as zeros. */
  async blockStatus(offset: number, length: number): Promise<{ length: number; hole: boolean; zero: boolean }[]> {
    this.check(offset, length);
    const bs = this.img.info.metadata.blockSize;
    const out: { length: number; hole: boolean; zero: boolean }[] = [];
    for (let pos = offset; pos < offset + length; ) {
      const block = Math.floor(pos / bs);
      const n = Math.min(offset + length, (block + 1) * bs) - pos;
      const state = await this.img.blockState(block);
      const hole = state !== PAYLOAD_STATE.FULLY_PRESENT && state !== PAYLOAD_STATE.PARTIALLY_PRESENT;
      const last = out[out.length - 1];
      if (last && last.hole === hole) last.length += n;
      else out.push({ length: n, hole, zero: hole });
      pos += n;
    }
    return out;
  }

  /** Rewrites the shield item (grant/revoke: another KP; roll: another transport key); the payload is untouched. */
  async reseal(change: { kp?: Buffer; transportKey?: Buffer; currentTransportKey: Buffer }): Promise<void> {
    const w = this.writable();
    await w.setUserItem(SHIELD_ITEM, reseal(this.item, this.key, change), { required: true });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.key.wipe();
    await this.img.close();
  }
}

/** Decrypts a shielded disk into a new raw or VHDX file (the owner's way out), streaming. */
export async function unshieldImage(
  input: string,
  transportKey: Buffer,
  output: string,
  to: DiskFormat,
  opts: { onProgress?: (done: number, total: number) => void; signal?: AbortSignal } = {},
): Promise<{ input: string; output: string; to: DiskFormat; virtualSize: number; dataBlocks: number }> {
  if (resolve(input) === resolve(output)) throw new ShieldError('invalid_argument', 'The input and the output are the same file.');
  if (await exists(output)) throw new ShieldError('already_exists', `${output} already exists; nothing was written.`);
  const disk = await ShieldedDisk.open(input, transportKey, { readOnly: true });
  const partial = `${output}.partial`;
  let created = false;
  try {
    const size = disk.size;
    const bs = DEFAULT_BLOCK;
    let dataBlocks = 0;
    const status = (offset: number, n: number) => disk.blockStatus(offset, n);
    if (to === 'vhdx') {
      await createVhdx(partial, { size, type: 'dynamic', logicalSectorSize: disk.minBlock });
      created = true;
      const out = await openVhdx(partial, { readOnly: false });
      try {
        const step = out.info.metadata.blockSize;
        for (let offset = 0; offset < size; offset += step) {
          opts.signal?.throwIfAborted();
          const n = Math.min(step, size - offset);
          if ((await status(offset, n)).some((s) => !s.hole)) {
            const data = await disk.read(offset, n);
            if (!allZero(data)) {
              await out.write(offset, data);
              dataBlocks++;
            }
            data.fill(0);
          }
          if ((offset / step) % 256 === 255) await out.flush();
          opts.onProgress?.(offset + n, size);
        }
      } finally {
        await out.close();
      }
    } else {
      const fh = await open(partial, 'wx', 0o600);
      created = true;
      try {
        await fh.truncate(size);
        for (let offset = 0; offset < size; offset += bs) {
          opts.signal?.throwIfAborted();
          const n = Math.min(bs, size - offset);
          if ((await status(offset, n)).some((s) => !s.hole)) {
            const data = await disk.read(offset, n);
            if (!allZero(data)) {
              let done = 0;
              while (done < n) done += (await fh.write(data, done, n - done, offset + done)).bytesWritten;
              dataBlocks++;
            }
            data.fill(0);
          }
          opts.onProgress?.(offset + n, size);
        }
      } finally {
        await fh.close();
      }
    }
    opts.signal?.throwIfAborted();
    await publish(partial, output);
    created = false;
    return { input, output, to, virtualSize: size, dataBlocks };
  } catch (err) {
    if (opts.signal?.aborted && err === opts.signal.reason) throw err;
    throw toShieldError(err);
  } finally {
    if (created) await rm(partial, { force: true });
    await disk.close();
  }
}
