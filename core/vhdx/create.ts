// Creating brand-new VHDX files (MS-VHDX v8.0 §2), laid out as Hyper-V lays them out: header
// section, log at 1 MiB, metadata region, BAT region, then payload blocks. A new file is written to
// `${path}.partial` and published only when complete (hard link, so an existing file is never
// replaced; rename where links are not supported). Nothing can see it half-made, so no log is needed.
import { randomUUID } from 'node:crypto';
import { link, open, realpath, rename, rm, type FileHandle } from 'node:fs/promises';
import { dirname, relative, resolve, sep } from 'node:path';
import { ShieldError, toShieldError } from '../errors.ts';
import { crc32c } from './crc32c.ts';
import { writeGuid } from './guid.ts';
import { VhdxImage } from './reader.ts';
import {
  HEADER_OFFSETS,
  HEADER_SECTION,
  HEADER_SIZE,
  MAX_VIRTUAL_SIZE,
  METADATA_ITEM,
  METADATA_TABLE_SIZE,
  MiB,
  PAYLOAD_STATE,
  REGION,
  REGION_TABLE_OFFSETS,
  REGION_TABLE_SIZE,
  buildParentLocator,
} from './structures.ts';

/** Written into the file type identifier's Creator field (diagnostic only). */
export const CREATOR = 'ShieldLab 0.1.0';

export type VhdxType = 'fixed' | 'dynamic';

export interface CreateOptions {
  /** Virtual disk size in bytes: a multiple of the logical sector size, at most 64 TiB. */
  size: number;
  type?: VhdxType;
  /** Bytes, a power of two from 1 to 256 MiB (default 32 MiB). */
  blockSize?: number;
  logicalSectorSize?: number;
  physicalSectorSize?: number;
  /** Bytes, a multiple of 1 MiB (default 1 MiB). */
  logSize?: number;
}

export interface Layout {
  type: VhdxType;
  virtualSize: number;
  blockSize: number;
  logicalSectorSize: number;
  physicalSectorSize: number;
  logOffset: number;
  logSize: number;
  metadataOffset: number;
  metadataLength: number;
  batOffset: number;
  batLength: number;
  /** Where payload blocks start. */
  dataOffset: number;
  chunkRatio: number;
  payloadBlocks: number;
  /** BAT entries up to and including the last payload block's. */
  batEntries: number;
}

export interface CreatedVhdx {
  file: string;
  type: VhdxType | 'differencing';
  /** A differencing disk's parent (absolute path). */
  parent?: string;
  virtualSize: number;
  blockSize: number;
  logicalSectorSize: number;
  physicalSectorSize: number;
  fileSize: number;
}

function invalid(message: string): ShieldError {
  return new ShieldError('invalid_argument', message);
}

const SIZE_UNITS: Record<string, number> = { '': 1, B: 1, K: 1024, M: MiB, G: 1024 * MiB, T: 1024 * 1024 * MiB };

/** "10M", "1G", "512K", "1.5G", "4096", "2MiB" → bytes (binary units). */
export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$/i.exec(text);
  if (!m) throw invalid(`The ${what} "${text}" is not a size (e.g. 4096, 512K, 10M, 1G, 2T).`);
  const bytes = Number(m[1]) * SIZE_UNITS[m[2]!.toUpperCase()]!;
  if (!Number.isSafeInteger(bytes)) throw invalid(`The ${what} "${text}" is not a whole number of bytes.`);
  return bytes;
}

const isPow2 = (n: number) => Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;

/** Checks the options and places every structure. Throws `invalid_argument`. */
export function planLayout(opts: CreateOptions): Layout {
  const type = opts.type ?? 'dynamic';
  if (type !== 'fixed' && type !== 'dynamic') throw invalid(`Unknown VHDX type "${String(type)}" (fixed or dynamic).`);
  const blockSize = opts.blockSize ?? 32 * MiB;
  const logicalSectorSize = opts.logicalSectorSize ?? 512;
  const physicalSectorSize = opts.physicalSectorSize ?? 4096;
  const logSize = opts.logSize ?? MiB;
  const size = opts.size;
  if (logicalSectorSize !== 512 && logicalSectorSize !== 4096) throw invalid(`The logical sector size must be 512 or 4096, not ${logicalSectorSize}.`);
  if (physicalSectorSize !== 512 && physicalSectorSize !== 4096) throw invalid(`The physical sector size must be 512 or 4096, not ${physicalSectorSize}.`);
  if (!isPow2(blockSize) || blockSize < MiB || blockSize > 256 * MiB) throw invalid(`The block size must be a power of two from 1 MiB to 256 MiB, not ${blockSize}.`);
  if (!Number.isSafeInteger(logSize) || logSize < MiB || logSize % MiB !== 0 || logSize > 1024 * MiB) throw invalid(`The log size must be a multiple of 1 MiB (1 MiB–1 GiB), not ${logSize}.`);
  if (!Number.isSafeInteger(size) || size <= 0) throw invalid(`The disk size must be a positive number of bytes, not ${size}.`);
  if (size % logicalSectorSize !== 0) throw invalid(`The disk size ${size} is not a multiple of the ${logicalSectorSize}-byte logical sector.`);
  if (size > MAX_VIRTUAL_SIZE) throw invalid(`The disk size ${size} exceeds the 64 TiB VHDX limit.`);

  const chunkRatio = (2 ** 23 * logicalSectorSize) / blockSize;
  const payloadBlocks = Math.ceil(size / blockSize);
  const sectorBitmapBlocks = Math.ceil(payloadBlocks / chunkRatio);
  const batEntries = payloadBlocks + Math.floor((payloadBlocks - 1) / chunkRatio);
  // Room for every entry either reading of the spec asks for (payload + all sector-bitmap entries).
  const batLength = Math.ceil((sectorBitmapBlocks * (chunkRatio + 1) * 8) / MiB) * MiB;
  const logOffset = HEADER_SECTION;
  const metadataOffset = logOffset + logSize;
  const metadataLength = MiB;
  const batOffset = metadataOffset + metadataLength;
  const dataOffset = batOffset + batLength;
  return {
    type,
    virtualSize: size,
    blockSize,
    logicalSectorSize,
    physicalSectorSize,
    logOffset,
    logSize,
    metadataOffset,
    metadataLength,
    batOffset,
    batLength,
    dataOffset,
    chunkRatio,
    payloadBlocks,
    batEntries,
  };
}

/** The first 320 KiB of the file: identifier, two headers (seq 1 and 2), two identical region tables. */
export function headerSection(l: Layout, guids: { fileWrite: string; dataWrite: string }): Buffer {
  const buf = Buffer.alloc(REGION_TABLE_OFFSETS[1] + REGION_TABLE_SIZE);
  buf.write('vhdxfile', 0, 'latin1');
  buf.write(CREATOR, 8, 'utf16le');
  HEADER_OFFSETS.forEach((at, i) => {
    const h = buf.subarray(at, at + HEADER_SIZE);
    h.write('head', 0, 'latin1');
    h.writeBigUInt64LE(BigInt(i + 1), 8);
    writeGuid(guids.fileWrite, h, 16);
    writeGuid(guids.dataWrite, h, 32);
    // LogGuid (48) stays zero: the log is empty. LogVersion 0, Version 1.
    h.writeUInt16LE(0, 64);
    h.writeUInt16LE(1, 66);
    h.writeUInt32LE(l.logSize, 68);
    h.writeBigUInt64LE(BigInt(l.logOffset), 72);
    h.writeUInt32LE(crc32c(h), 4);
  });
  for (const at of REGION_TABLE_OFFSETS) {
    const t = buf.subarray(at, at + REGION_TABLE_SIZE);
    t.write('regi', 0, 'latin1');
    t.writeUInt32LE(2, 8);
    const entry = (i: number, guid: string, offset: number, length: number) => {
      const e = 16 + i * 32;
      writeGuid(guid, t, e);
      t.writeBigUInt64LE(BigInt(offset), e + 16);
      t.writeUInt32LE(length, e + 24);
      t.writeUInt32LE(1, e + 28); // Required, as Hyper-V writes it
    };
    entry(0, REGION.BAT, l.batOffset, l.batLength);
    entry(1, REGION.METADATA, l.metadataOffset, l.metadataLength);
    t.writeUInt32LE(crc32c(t), 4);
  }
  return buf;
}

/**
 * The metadata table and the five system items, packed at +64 KiB as qemu and Hyper-V do; with a
 * parent locator (a differencing disk), HasParent is set and the locator follows at +0x10028
 * (IsRequired), where Hyper-V puts it.
 */
export function metadataRegion(l: Layout, virtualDiskId: string, parentLocator?: Buffer): Buffer {
  const buf = Buffer.alloc(METADATA_TABLE_SIZE + 0x28 + (parentLocator?.length ?? 0));
  buf.write('metadata', 0, 'latin1');
  const items: [string, number, number][] = [
    [METADATA_ITEM.FILE_PARAMETERS, 8, 0x4],
    [METADATA_ITEM.VIRTUAL_DISK_SIZE, 8, 0x6],
    [METADATA_ITEM.VIRTUAL_DISK_ID, 16, 0x6],
    [METADATA_ITEM.LOGICAL_SECTOR_SIZE, 4, 0x6],
    [METADATA_ITEM.PHYSICAL_SECTOR_SIZE, 4, 0x6],
  ];
  if (parentLocator) items.push([METADATA_ITEM.PARENT_LOCATOR, parentLocator.length, 0x4]);
  buf.writeUInt16LE(items.length, 10);
  let offset = METADATA_TABLE_SIZE;
  items.forEach(([id, length, flags], i) => {
    const e = 32 + i * 32;
    writeGuid(id, buf, e);
    buf.writeUInt32LE(offset, e + 16);
    buf.writeUInt32LE(length, e + 20);
    buf.writeUInt32LE(flags, e + 24);
    offset += length;
  });
  const d = METADATA_TABLE_SIZE;
  buf.writeUInt32LE(l.blockSize, d);
  buf.writeUInt32LE((l.type === 'fixed' ? 1 : 0) | (parentLocator ? 2 : 0), d + 4); // LeaveBlockAllocated, HasParent
  buf.writeBigUInt64LE(BigInt(l.virtualSize), d + 8);
  writeGuid(virtualDiskId, buf, d + 16);
  buf.writeUInt32LE(l.logicalSectorSize, d + 32);
  buf.writeUInt32LE(l.physicalSectorSize, d + 36);
  parentLocator?.copy(buf, d + 0x28);
  return buf;
}

/** One BAT entry: state in bits 0–2, FileOffsetMB in bits 20–63 (no BigInt on the hot path). */
export function writeBatEntry(buf: Buffer, at: number, state: number, fileOffset: number): void {
  const mb = fileOffset / MiB;
  buf.writeUInt32LE(((mb % 4096) * MiB + state) >>> 0, at);
  buf.writeUInt32LE(Math.floor(mb / 4096), at + 4);
}

/** Whether a BAT index holds a sector-bitmap entry, and otherwise which payload block. */
export function blockOfBatIndex(index: number, chunkRatio: number): number | null {
  return (index + 1) % (chunkRatio + 1) === 0 ? null : index - Math.floor(index / (chunkRatio + 1));
}

/**
 * Builds the BAT a page (1 MiB) at a time, in index order, writing each full page to the file:
 * memory stays at one page whatever the disk size. Unset entries are NOT_PRESENT (zero).
 */
export class BatWriter {
  private readonly page = Buffer.alloc(MiB);
  private pageNo = 0;
  private dirty = false;
  private readonly fh: FileHandle;
  private readonly l: Layout;

  constructor(fh: FileHandle, l: Layout) {
    this.fh = fh;
    this.l = l;
  }

  async set(block: number, state: number, fileOffset = 0): Promise<void> {
    const index = block + Math.floor(block / this.l.chunkRatio);
    const pageNo = Math.floor((index * 8) / MiB);
    if (pageNo !== this.pageNo) {
      await this.flush();
      this.pageNo = pageNo;
    }
    writeBatEntry(this.page, (index * 8) % MiB, state, fileOffset);
    this.dirty = true;
  }

  async flush(): Promise<void> {
    if (!this.dirty) return;
    await writeAll(this.fh, this.page, this.l.batOffset + this.pageNo * MiB);
    this.page.fill(0);
    this.dirty = false;
  }
}

export async function writeAll(fh: FileHandle, buf: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesWritten } = await fh.write(buf, done, buf.length - done, position + done);
    done += bytesWritten;
  }
}

/** Header section and metadata region of a new file. */
export async function writeStructures(fh: FileHandle, l: Layout): Promise<void> {
  await writeAll(fh, headerSection(l, { fileWrite: randomUUID(), dataWrite: randomUUID() }), 0);
  await writeAll(fh, metadataRegion(l, randomUUID()), l.metadataOffset);
}

/** Failures as typed errors: ours pass through, file-system ones become io_error / disk_full / not_found. */
export function asShieldError(err: unknown, what: string): ShieldError {
  if (err instanceof ShieldError) return err;
  const e = toShieldError(err);
  if (e.code !== 'internal') return e;
  const code = (err as { code?: unknown } | null)?.code;
  if (typeof code === 'string' && /^E[A-Z]+$/.test(code)) return new ShieldError('io_error', `${what} failed (${code}).`, { cause: err });
  return e;
}

/**
 * A new file under construction: `${path}.partial`, opened exclusively. `publish()` makes it
 * durable and links it into place (never over an existing file); `discard()` removes it.
 */
export class PartialFile {
  readonly path: string;
  readonly partial: string;
  readonly fh: FileHandle;

  private constructor(path: string, fh: FileHandle) {
    this.path = path;
    this.partial = `${path}.partial`;
    this.fh = fh;
  }

  static async create(path: string): Promise<PartialFile> {
    const exists = await open(path, 'r').then(
      async (fh) => {
        await fh.close();
        return true;
      },
      (err: { code?: string }) => {
        if (err.code === 'ENOENT') return false;
        throw asShieldError(err, `Opening ${path}`);
      },
    );
    if (exists) throw new ShieldError('already_exists', `${path} already exists; nothing was written.`);
    try {
      return new PartialFile(path, await open(`${path}.partial`, 'wx', 0o644));
    } catch (err) {
      if ((err as { code?: string }).code === 'EEXIST') {
        throw new ShieldError('already_exists', `${path}.partial exists: another conversion is writing it, or one was interrupted (delete it to retry).`);
      }
      throw asShieldError(err, `Creating ${path}.partial`);
    }
  }

  /** `durable: false` skips the flushes (scratch outputs; what `qemu-img convert` does by default). */
  async publish(durable = true): Promise<void> {
    if (durable) await this.fh.datasync(); // data, size and allocation: all a reader needs after a crash
    await this.fh.close();
    try {
      await link(this.partial, this.path);
      await rm(this.partial, { force: true });
    } catch (err) {
      const code = (err as { code?: string }).code;
      if (code === 'EEXIST') {
        await rm(this.partial, { force: true });
        throw new ShieldError('already_exists', `${this.path} appeared while it was being written; it was left alone.`);
      }
      if (code !== 'EPERM' && code !== 'ENOTSUP' && code !== 'EOPNOTSUPP' && code !== 'EXDEV') throw err;
      await rename(this.partial, this.path);
    }
    if (!durable) return;
    try {
      const dir = await open(dirname(this.path), 'r');
      await dir.sync().finally(() => dir.close());
    } catch {
      // Directory fsync is best effort (not every file system allows it).
    }
  }

  async discard(): Promise<void> {
    await this.fh.close().catch(() => undefined);
    await rm(this.partial, { force: true });
  }
}

/** Creates a new, empty VHDX. Fixed: every block FULLY_PRESENT at its place in a preallocated (sparse) file. */
export async function createVhdx(path: string, opts: CreateOptions): Promise<CreatedVhdx> {
  const l = planLayout(opts);
  const out = await PartialFile.create(path);
  try {
    await writeStructures(out.fh, l);
    let fileSize = l.dataOffset;
    if (l.type === 'fixed') {
      const bat = new BatWriter(out.fh, l);
      for (let b = 0; b < l.payloadBlocks; b++) await bat.set(b, PAYLOAD_STATE.FULLY_PRESENT, l.dataOffset + b * l.blockSize);
      await bat.flush();
      fileSize = l.dataOffset + l.payloadBlocks * l.blockSize;
    }
    await out.fh.truncate(fileSize);
    await out.publish();
    return {
      file: path,
      type: l.type,
      virtualSize: l.virtualSize,
      blockSize: l.blockSize,
      logicalSectorSize: l.logicalSectorSize,
      physicalSectorSize: l.physicalSectorSize,
      fileSize,
    };
  } catch (err) {
    await out.discard();
    throw asShieldError(err, `Creating ${path}`);
  }
}

export interface DifferencingOptions {
  /** Bytes, a power of two from 1 to 256 MiB (default 2 MiB, as Hyper-V makes differencing disks). */
  blockSize?: number;
  /** 512 or 4096 (default: the parent's). */
  physicalSectorSize?: number;
  /** Bytes, a multiple of 1 MiB (default 1 MiB). */
  logSize?: number;
}

/**
 * Creates an empty differencing disk over `parentPath` (MS-VHDX §2.6.2.6): every block
 * NOT_PRESENT, so it reads exactly as its parent until written. The parent (and its own chain) is
 * opened and checked first. The child takes the parent's virtual size, logical sector size and
 * Virtual Disk ID; its parent locator holds parent_linkage (the parent's current DataWriteGuid,
 * lowercase and braced), relative_path (from the child's folder, Windows separators, ".\" for the
 * same folder) and absolute_win32_path (the parent's absolute path on this system). The parent
 * must not change afterwards: a new DataWriteGuid in it orphans the child.
 */
export async function createDifferencingVhdx(path: string, parentPath: string, opts: DifferencingOptions = {}): Promise<CreatedVhdx> {
  const parent = await VhdxImage.open(parentPath);
  let parentFile: string;
  let dataWriteGuid: string;
  let p: (typeof parent.info)['metadata'];
  try {
    parentFile = await realpath(parentPath);
    dataWriteGuid = parent.info.header.dataWriteGuid;
    p = parent.info.metadata;
  } finally {
    await parent.close();
  }
  const l = planLayout({
    size: p.virtualSize,
    type: 'dynamic',
    blockSize: opts.blockSize ?? 2 * MiB,
    logicalSectorSize: p.logicalSectorSize,
    physicalSectorSize: opts.physicalSectorSize ?? p.physicalSectorSize,
    ...(opts.logSize !== undefined ? { logSize: opts.logSize } : {}),
  });
  const childDir = dirname(resolve(path));
  const rel = relative(childDir, parentFile).split(sep).join('\\');
  let locator: Buffer;
  try {
    locator = buildParentLocator([
      ['parent_linkage', `{${dataWriteGuid.toLowerCase()}}`],
      ['relative_path', rel.startsWith('..') ? rel : `.\\${rel}`],
      ['absolute_win32_path', parentFile],
    ]);
  } catch {
    throw invalid(`The parent's path is too long for a parent locator: ${parentFile}`);
  }
  if (METADATA_TABLE_SIZE + 0x28 + locator.length > l.metadataLength) throw invalid(`The parent's path is too long for a parent locator: ${parentFile}`);
  const out = await PartialFile.create(path);
  try {
    await writeAll(out.fh, headerSection(l, { fileWrite: randomUUID(), dataWrite: randomUUID() }), 0);
    await writeAll(out.fh, metadataRegion(l, p.virtualDiskId, locator), l.metadataOffset);
    await out.fh.truncate(l.dataOffset); // the BAT region reads as zeros: every block NOT_PRESENT
    await out.publish();
    return {
      file: path,
      type: 'differencing',
      parent: parentFile,
      virtualSize: l.virtualSize,
      blockSize: l.blockSize,
      logicalSectorSize: l.logicalSectorSize,
      physicalSectorSize: l.physicalSectorSize,
      fileSize: l.dataOffset,
    };
  } catch (err) {
    await out.discard();
    throw asShieldError(err, `Creating ${path}`);
  }
}
