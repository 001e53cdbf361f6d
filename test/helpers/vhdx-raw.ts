// A minimal, independent view of VHDX bytes for tests (MS-VHDX §2.2–2.6): where the structures of
// a *well-formed* image live, their raw fields, and CRC-32C repair after a deliberate mutation.
// Deliberately separate from core/vhdx so a shared misreading cannot hide in both.
import { closeSync, fstatSync, openSync, readSync } from 'node:fs';

export const KiB = 1024;
export const MiB = 1024 * KiB;

export const HEADER_OFFSETS = [0x10000, 0x20000] as const;
export const REGION_TABLE_OFFSETS = [0x30000, 0x40000] as const;
export const REGION_TABLE_SIZE = 64 * KiB;
export const HEADER_SIZE = 4 * KiB;

export const GUIDS = {
  bat: '2dc27766-f623-4200-9d64-115e9bfd4a08',
  metadata: '8b7ca206-4790-4b9a-b8fe-575f050f886e',
  fileParameters: 'caa16737-fa36-4d43-b3b6-33f0aa44e76b',
  virtualDiskSize: '2fa54224-cd1b-4876-b211-5dbed83bf4b8',
  virtualDiskId: 'beca12ab-b2e6-4523-93ef-c309e000c746',
  logicalSectorSize: '8141bf1d-a96f-4709-ba47-f233a8faab5f',
  physicalSectorSize: 'cda348c7-445d-4471-9cc9-e9885251c556',
  parentLocator: 'a8d35f2d-b30b-454d-abf7-d3d84834ab0c',
} as const;

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    t[i] = c >>> 0;
  }
  return t;
})();

/** CRC-32C (Castagnoli, reflected), init and final XOR 0xFFFFFFFF. */
export function crc32c(buf: Uint8Array): number {
  let c = 0xffffffff;
  for (let i = 0; i < buf.length; i++) c = CRC_TABLE[(c ^ buf[i]!) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** Microsoft mixed-endian GUID bytes → lowercase 8-4-4-4-12. */
export function guidAt(b: Buffer, o: number): string {
  const h = (x: Uint8Array) => Buffer.from(x).toString('hex');
  const rev = (s: number, e: number) => h(Uint8Array.from(b.subarray(o + s, o + e)).reverse());
  return `${rev(0, 4)}-${rev(4, 6)}-${rev(6, 8)}-${h(b.subarray(o + 8, o + 10))}-${h(b.subarray(o + 10, o + 16))}`;
}

export function writeGuid(b: Buffer, o: number, guid: string): void {
  const hex = guid.replace(/-/g, '');
  const bytes = Buffer.from(hex, 'hex');
  Buffer.from(bytes.subarray(0, 4)).reverse().copy(b, o);
  Buffer.from(bytes.subarray(4, 6)).reverse().copy(b, o + 4);
  Buffer.from(bytes.subarray(6, 8)).reverse().copy(b, o + 6);
  bytes.subarray(8, 16).copy(b, o + 8);
}

export interface RawHeader {
  offset: number;
  valid: boolean;
  sequenceNumber: bigint;
  fileWriteGuid: string;
  dataWriteGuid: string;
  logGuid: string;
  logVersion: number;
  version: number;
  logLength: number;
  logOffset: number;
}

export function rawHeader(b: Buffer, slot: 0 | 1): RawHeader {
  const o = HEADER_OFFSETS[slot];
  return {
    offset: o,
    valid: b.toString('latin1', o, o + 4) === 'head' && checksumOk(b, o, HEADER_SIZE),
    sequenceNumber: b.readBigUInt64LE(o + 8),
    fileWriteGuid: guidAt(b, o + 16),
    dataWriteGuid: guidAt(b, o + 32),
    logGuid: guidAt(b, o + 48),
    logVersion: b.readUInt16LE(o + 64),
    version: b.readUInt16LE(o + 66),
    logLength: b.readUInt32LE(o + 68),
    logOffset: Number(b.readBigUInt64LE(o + 72)),
  };
}

function checksumOk(b: Buffer, o: number, len: number): boolean {
  if (o + len > b.length) return false;
  const copy = Buffer.from(b.subarray(o, o + len));
  const stored = copy.readUInt32LE(4);
  copy.writeUInt32LE(0, 4);
  return crc32c(copy) === stored;
}

/** Recomputes the checksum of a header (4 KiB) or region table (64 KiB) at `o`, in place. */
export function fixChecksum(b: Buffer, o: number, len: number): void {
  if (o + len > b.length) return;
  b.writeUInt32LE(0, o + 4);
  b.writeUInt32LE(crc32c(b.subarray(o, o + len)), o + 4);
}

/** Both headers and both region tables get valid checksums again. */
export function fixAllChecksums(b: Buffer): void {
  for (const o of HEADER_OFFSETS) fixChecksum(b, o, HEADER_SIZE);
  for (const o of REGION_TABLE_OFFSETS) fixChecksum(b, o, REGION_TABLE_SIZE);
}

export interface RawRegion {
  entryOffset: number;
  guid: string;
  fileOffset: number;
  length: number;
  required: number;
}

export interface RawItem {
  entryOffset: number;
  itemId: string;
  offset: number;
  length: number;
  flags: number;
}

export interface RawLayout {
  headers: [RawHeader, RawHeader];
  current: RawHeader;
  creator: string;
  regions: RawRegion[];
  batOffset: number;
  batLength: number;
  metadataOffset: number;
  items: RawItem[];
  /** Absolute file offset of each known item's payload. */
  itemAt: Record<keyof typeof GUIDS, number | undefined>;
  blockSize: number;
  virtualSize: number;
  logicalSectorSize: number;
  physicalSectorSize: number;
  flags: number;
  virtualDiskId: string;
}

/** Parses a well-formed image (qemu-made); throws plainly on anything unexpected. */
export function rawLayout(b: Buffer): RawLayout {
  if (b.toString('latin1', 0, 8) !== 'vhdxfile') throw new Error('not a vhdx file');
  const headers: [RawHeader, RawHeader] = [rawHeader(b, 0), rawHeader(b, 1)];
  const valid = headers.filter((h) => h.valid);
  if (valid.length === 0) throw new Error('no valid header');
  const current = valid.reduce((a, h) => (h.sequenceNumber > a.sequenceNumber ? h : a));
  const rt = REGION_TABLE_OFFSETS[0];
  if (b.toString('latin1', rt, rt + 4) !== 'regi') throw new Error('no region table');
  const regions: RawRegion[] = [];
  for (let i = 0; i < b.readUInt32LE(rt + 8); i++) {
    const e = rt + 16 + 32 * i;
    regions.push({ entryOffset: e, guid: guidAt(b, e), fileOffset: Number(b.readBigUInt64LE(e + 16)), length: b.readUInt32LE(e + 24), required: b.readUInt32LE(e + 28) });
  }
  const bat = regions.find((r) => r.guid === GUIDS.bat);
  const md = regions.find((r) => r.guid === GUIDS.metadata);
  if (!bat || !md) throw new Error('BAT or metadata region missing');
  const m = md.fileOffset;
  if (b.toString('latin1', m, m + 8) !== 'metadata') throw new Error('no metadata table');
  const items: RawItem[] = [];
  for (let i = 0; i < b.readUInt16LE(m + 10); i++) {
    const e = m + 32 + 32 * i;
    items.push({ entryOffset: e, itemId: guidAt(b, e), offset: b.readUInt32LE(e + 16), length: b.readUInt32LE(e + 20), flags: b.readUInt32LE(e + 24) });
  }
  const itemAt = Object.fromEntries(
    Object.entries(GUIDS).map(([k, g]) => {
      const it = items.find((x) => x.itemId === g);
      return [k, it ? m + it.offset : undefined];
    }),
  ) as Record<keyof typeof GUIDS, number | undefined>;
  const at = (k: keyof typeof GUIDS): number => {
    const o = itemAt[k];
    if (o === undefined) throw new Error(`metadata item ${k} missing`);
    return o;
  };
  return {
    headers,
    current,
    creator: b.toString('utf16le', 8, 8 + 512).replace(/\0[\s\S]*$/, ''),
    regions,
    batOffset: bat.fileOffset,
    batLength: bat.length,
    metadataOffset: m,
    items,
    itemAt,
    blockSize: b.readUInt32LE(at('fileParameters')),
    flags: b.readUInt32LE(at('fileParameters') + 4),
    virtualSize: Number(b.readBigUInt64LE(at('virtualDiskSize'))),
    virtualDiskId: guidAt(b, at('virtualDiskId')),
    logicalSectorSize: b.readUInt32LE(at('logicalSectorSize')),
    physicalSectorSize: b.readUInt32LE(at('physicalSectorSize')),
  };
}

export const PAYLOAD_STATES: Record<number, string> = {
  0: 'NOT_PRESENT',
  1: 'UNDEFINED',
  2: 'ZERO',
  3: 'UNMAPPED',
  6: 'FULLY_PRESENT',
  7: 'PARTIALLY_PRESENT',
};

/** Payload BAT entries (sector-bitmap entries skipped): state and file offset. */
export function rawBat(b: Buffer, l: RawLayout): { state: number; fileOffset: number }[] {
  const chunkRatio = (2 ** 23 * l.logicalSectorSize) / l.blockSize;
  const blocks = Math.ceil(l.virtualSize / l.blockSize);
  const out: { state: number; fileOffset: number }[] = [];
  for (let i = 0; i < blocks; i++) {
    const v = b.readBigUInt64LE(l.batOffset + 8 * (i + Math.floor(i / chunkRatio)));
    out.push({ state: Number(v & 7n), fileOffset: Number(v >> 20n) * MiB });
  }
  return out;
}

// ---- The log (MS-VHDX §2.3): crafting entries as a writer would ---------------------------------

export const LOG_SECTOR = 4096;

export type LogDescriptor =
  | { kind: 'data'; fileOffset: number; data: Buffer /* 4096 bytes: the target sector after replay */ }
  | { kind: 'zero'; fileOffset: number; length: number };

export interface LogEntrySpec {
  sequence: bigint;
  /** Log offset of the first entry of the sequence this entry ends. */
  tail: number;
  logGuid: string;
  flushedFileOffset: number;
  lastFileOffset: number;
  descriptors: LogDescriptor[];
}

/** One log entry: descriptor sectors, then one data sector per data descriptor; checksummed. */
export function logEntry(spec: LogEntrySpec): Buffer {
  const descSectors = Math.ceil((spec.descriptors.length + 2) / 128);
  const dataDescs = spec.descriptors.filter((d) => d.kind === 'data');
  const e = Buffer.alloc((descSectors + dataDescs.length) * LOG_SECTOR);
  e.write('loge', 0, 'latin1');
  e.writeUInt32LE(e.length, 8);
  e.writeUInt32LE(spec.tail, 12);
  e.writeBigUInt64LE(spec.sequence, 16);
  e.writeUInt32LE(spec.descriptors.length, 24);
  writeGuid(e, 32, spec.logGuid);
  e.writeBigUInt64LE(BigInt(spec.flushedFileOffset), 48);
  e.writeBigUInt64LE(BigInt(spec.lastFileOffset), 56);
  let dataSector = descSectors;
  spec.descriptors.forEach((d, i) => {
    const at = 64 + 32 * i;
    if (d.kind === 'zero') {
      e.write('zero', at, 'latin1');
      e.writeBigUInt64LE(BigInt(d.length), at + 8);
      e.writeBigUInt64LE(BigInt(d.fileOffset), at + 16);
    } else {
      e.write('desc', at, 'latin1');
      d.data.copy(e, at + 4, 4092, 4096); // TrailingBytes
      d.data.copy(e, at + 8, 0, 8); // LeadingBytes
      e.writeBigUInt64LE(BigInt(d.fileOffset), at + 16);
      const s = dataSector++ * LOG_SECTOR;
      e.write('data', s, 'latin1');
      e.writeUInt32LE(Number(spec.sequence >> 32n), s + 4);
      d.data.copy(e, s + 8, 8, 4092);
      e.writeUInt32LE(Number(spec.sequence & 0xffffffffn), s + 4092);
    }
    e.writeBigUInt64LE(spec.sequence, at + 24);
  });
  fixLogEntryChecksum(e, 0);
  return e;
}

/** Recomputes the checksum of the log entry at `o` (its EntryLength bytes), in place. */
export function fixLogEntryChecksum(b: Buffer, o: number): void {
  const len = b.readUInt32LE(o + 8);
  if (len < 64 || o + len > b.length) return;
  b.writeUInt32LE(0, o + 4);
  b.writeUInt32LE(crc32c(b.subarray(o, o + len)), o + 4);
}

export interface DirtyLog {
  bytes: Buffer;
  logGuid: string;
  /** The block whose BAT entry only the log sets (its data is already in the file). */
  block: number;
  /** The byte the block holds once the log is replayed (zeros before). */
  byte: number;
  /** The 4 KiB range of an already-present block that only the log zeroes. */
  zeroed: { offset: number; length: number } | null;
}

/**
 * A dirty log per MS-VHDX §2.3 on a well-formed dynamic image (the recipe QEMU 7.2 replays,
 * docs/reference §1.5): a new payload block is appended at EOF and filled with `byte`; entry 1
 * (data descriptor) rewrites the BAT sector that maps `block` to it; entry 2 (zero descriptor)
 * zeroes 4 KiB of the first present block, if there is one. Both headers get the LogGuid.
 */
export function craftDirtyLog(input: Buffer, opts: { block: number; byte: number; logGuid?: string; /** log offset of entry 1 (4 KiB multiple); near the end → the sequence wraps */ at?: number }): DirtyLog {
  const l = rawLayout(input);
  const logGuid = opts.logGuid ?? '6c6f6721-0000-4000-8000-00000000d1e7';
  const newBlockAt = Math.ceil(input.length / MiB) * MiB;
  const fileEnd = newBlockAt + Math.max(MiB, l.blockSize);
  const b = Buffer.alloc(fileEnd);
  input.copy(b);
  b.fill(opts.byte, newBlockAt, newBlockAt + l.blockSize);
  const chunkRatio = (2 ** 23 * l.logicalSectorSize) / l.blockSize;
  const index = opts.block + Math.floor(opts.block / chunkRatio);
  const entryAt = l.batOffset + 8 * index;
  const sectorAt = entryAt - (entryAt % LOG_SECTOR);
  const sector = Buffer.from(b.subarray(sectorAt, sectorAt + LOG_SECTOR));
  sector.writeBigUInt64LE(BigInt(newBlockAt / MiB) * BigInt(MiB) + 6n, entryAt - sectorAt);
  const descriptors1: LogDescriptor[] = [{ kind: 'data', fileOffset: sectorAt, data: sector }];
  const present = rawBat(b, l).find((e) => e.state === 6);
  const zeroed = present ? { offset: present.fileOffset + 8192, length: 4096 } : null;
  const at = opts.at ?? 0;
  const logLen = l.current.logLength;
  const e1 = logEntry({ sequence: 1n, tail: at, logGuid, flushedFileOffset: fileEnd, lastFileOffset: fileEnd, descriptors: descriptors1 });
  const e2 = zeroed
    ? logEntry({ sequence: 2n, tail: at, logGuid, flushedFileOffset: fileEnd, lastFileOffset: fileEnd, descriptors: [{ kind: 'zero', fileOffset: zeroed.offset, length: zeroed.length }] })
    : Buffer.alloc(0);
  if (e1.length + e2.length > logLen || at % LOG_SECTOR !== 0 || at >= logLen) throw new Error('log too small');
  b.fill(0, l.current.logOffset, l.current.logOffset + logLen);
  // The log is circular: entries continue at its start when they reach its end.
  const both = Buffer.concat([e1, e2]);
  for (let i = 0; i < both.length; i += LOG_SECTOR) both.copy(b, l.current.logOffset + ((at + i) % logLen), i, i + LOG_SECTOR);
  for (const h of HEADER_OFFSETS) {
    writeGuid(b, h + 48, logGuid);
    fixChecksum(b, h, HEADER_SIZE);
  }
  // The zeroed range lies in a payload block: translate it to a virtual-disk range for callers.
  let zeroedVirtual: DirtyLog['zeroed'] = null;
  if (zeroed) {
    const blockNo = rawBat(b, l).findIndex((e) => e.state === 6 && e.fileOffset === present!.fileOffset);
    zeroedVirtual = { offset: blockNo * l.blockSize + 8192, length: 4096 };
  }
  return { bytes: b, logGuid, block: opts.block, byte: opts.byte, zeroed: zeroedVirtual };
}

/** The first `n` bytes of a file (all of it when shorter). */
export function fileHead(path: string, n: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const buf = Buffer.alloc(Math.min(n, fstatSync(fd).size));
    readSync(fd, buf, 0, buf.length, 0);
    return buf;
  } finally {
    closeSync(fd);
  }
}

// ---- Building images from the spec alone: dynamic bases and differencing children -------------
// MS-VHDX §2.2 (headers, region table), §2.5 (BAT, sector bitmaps), §2.6.2.6 (parent locator).
// Independent of core/vhdx, so the reader's tests do not read back what its own writer wrote.

export const VHDX_LOCATOR_TYPE = 'b04aefb7-d19e-4a81-b789-25b8e9445913';
export const NULL_GUID = '00000000-0000-0000-0000-000000000000';

/** What a payload block of a built image holds. `data` bytes come from `sectorPattern(tag, …)`. */
export type BuiltBlock =
  | { state: 'full'; tag: number }
  | { state: 'partial'; tag: number; /** logical sectors of the block (relative to it) present in this file: [first, count] runs */ present: [number, number][] }
  | { state: 'zero' }
  | { state: 'not_present' }
  | { state: 'undefined' }
  | { state: 'unmapped' };

/** A recognisable sector: its absolute LBA and a tag in the first bytes, then a byte ramp. */
export function sectorPattern(tag: number, lba: number, sectorSize: number): Buffer {
  const b = Buffer.alloc(sectorSize);
  for (let i = 0; i < sectorSize; i++) b[i] = (lba * 31 + tag * 7 + i) & 0xff;
  b.writeUInt32LE(tag >>> 0, 0);
  b.writeUInt32LE(lba >>> 0, 4);
  b.writeUInt32LE(Math.floor(lba / 2 ** 32), 8);
  return b;
}

export interface BuildSpec {
  virtualSize: number;
  blockSize: number;
  logicalSectorSize: 512 | 4096;
  physicalSectorSize?: 512 | 4096;
  virtualDiskId?: string;
  dataWriteGuid?: string;
  blocks: Record<number, BuiltBlock>;
  /** Makes a differencing disk: these key/value pairs, in this order, as the parent locator. */
  locator?: [string, string][];
  /** Overrides of raw locator fields for damaged-locator cases. */
  locatorType?: string;
  /** Sector-bitmap entries forced to a state (default: 6 for chunks with a partial block, else 0). */
  sbState?: Record<number, number>;
  /**
   * Chunks that get an all-zero sector bitmap block though no block of theirs is partial (legal;
   * libvhdi 20210425 needs it: it reads a chunk's NOT_PRESENT blocks through the bitmap at the
   * SB entry's offset whatever its state, i.e. through the file's first MiB when there is none).
   */
  bitmapChunks?: number[];
}

/** Bytes of a virtual disk: `length` bytes at `offset` (zeros past its end). */
export type DiskView = (offset: number, length: number) => Buffer;

/** A view of a whole raw image in memory (e.g. qemu's conversion of a base disk). */
export function bufferView(raw: Buffer): DiskView {
  return (offset, length) => {
    const out = Buffer.alloc(length);
    if (offset < raw.length) raw.copy(out, 0, offset, Math.min(raw.length, offset + length));
    return out;
  };
}

export interface Built {
  bytes: Buffer;
  dataWriteGuid: string;
  virtualDiskId: string;
  virtualSize: number;
  /** The disk a correct reader returns, given its parent's (null: no parent, or a base disk). */
  view(parent: DiskView | null): DiskView;
}

function hexGuid(r: () => number = Math.random): string {
  const h = Array.from({ length: 32 }, () => Math.floor(r() * 16).toString(16)).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-4${h.slice(13, 16)}-8${h.slice(17, 20)}-${h.slice(20)}`;
}

/** The parent locator item bytes (§2.6.2.6): 20-byte header, 12-byte entries, UTF-16LE strings. */
export function locatorItem(pairs: [string, string][], type = VHDX_LOCATOR_TYPE): Buffer {
  const head = 20 + 12 * pairs.length;
  const strings = pairs.flatMap(([k, v]) => [Buffer.from(k, 'utf16le'), Buffer.from(v, 'utf16le')]);
  const b = Buffer.alloc(head + strings.reduce((n, s) => n + s.length, 0));
  writeGuid(b, 0, type);
  b.writeUInt16LE(pairs.length, 18);
  let at = head;
  pairs.forEach((_, i) => {
    const [k, v] = [strings[2 * i]!, strings[2 * i + 1]!];
    const e = 20 + 12 * i;
    b.writeUInt32LE(at, e);
    k.copy(b, at);
    at += k.length;
    b.writeUInt32LE(at, e + 4);
    v.copy(b, at);
    at += v.length;
    b.writeUInt16LE(k.length, e + 8);
    b.writeUInt16LE(v.length, e + 10);
  });
  return b;
}

/** A well-formed parent locator item → its type and key/value pairs in file order (throws plainly otherwise). */
export function rawLocator(b: Buffer): { type: string; pairs: [string, string][] } {
  const n = b.readUInt16LE(18);
  const pairs: [string, string][] = [];
  for (let i = 0; i < n; i++) {
    const e = 20 + 12 * i;
    const str = (off: number, len: number) => {
      if (off + len > b.length) throw new Error('locator string out of bounds');
      return b.toString('utf16le', off, off + len);
    };
    pairs.push([str(b.readUInt32LE(e), b.readUInt16LE(e + 8)), str(b.readUInt32LE(e + 4), b.readUInt16LE(e + 10))]);
  }
  return { type: guidAt(b, 0), pairs };
}

/** The current header's DataWriteGuid and the Virtual Disk ID of an image file (for a child's locator). */
export function identityOf(path: string): { dataWriteGuid: string; virtualDiskId: string; virtualSize: number; logicalSectorSize: number } {
  const l = rawLayout(fileHead(path, 16 * MiB));
  return { dataWriteGuid: l.current.dataWriteGuid, virtualDiskId: l.virtualDiskId, virtualSize: l.virtualSize, logicalSectorSize: l.logicalSectorSize };
}

/**
 * A whole image, laid out as Hyper-V does: log at 1 MiB, metadata at 2 MiB, BAT at 3 MiB, then
 * for each chunk with a partial block its sector-bitmap block, then payload blocks in block order.
 */
export function buildVhdx(spec: BuildSpec): Built {
  const { virtualSize, blockSize, logicalSectorSize: lss } = spec;
  const diff = spec.locator !== undefined;
  const chunkRatio = (2 ** 23 * lss) / blockSize;
  const blocks = Math.ceil(virtualSize / blockSize);
  const sbBlocks = Math.ceil(blocks / chunkRatio);
  const batEntries = sbBlocks * (chunkRatio + 1);
  const batLength = Math.ceil((batEntries * 8) / MiB) * MiB;
  const batOffset = 3 * MiB;
  const dataWriteGuid = spec.dataWriteGuid ?? hexGuid();
  const virtualDiskId = spec.virtualDiskId ?? hexGuid();
  const parts: [number, Buffer][] = [];
  let next = batOffset + batLength;
  const bat = Buffer.alloc(batLength);
  const setEntry = (index: number, state: number, offset: number) => bat.writeBigUInt64LE((BigInt(offset / MiB) << 20n) | BigInt(state), index * 8);
  const sectorsPerBlock = blockSize / lss;
  const bitmaps = new Map<number, Buffer>((spec.bitmapChunks ?? []).map((c) => [c, Buffer.alloc(MiB)]));
  for (const [key, blk] of Object.entries(spec.blocks).sort(([a], [b]) => Number(a) - Number(b))) {
    const block = Number(key);
    const index = block + Math.floor(block / chunkRatio);
    const len = Math.min(blockSize, virtualSize - block * blockSize);
    const fill = (tag: number, keep: (sector: number) => boolean) => {
      // Sectors the bitmap marks absent hold junk: a reader that uses them is caught.
      const data = Buffer.alloc(Math.ceil(len / MiB) * MiB, 0xdd);
      for (let s = 0; s * lss < len; s++) if (keep(s)) sectorPattern(tag, block * sectorsPerBlock + s, lss).copy(data, s * lss);
      return data;
    };
    if (blk.state === 'full' || blk.state === 'partial') {
      const has = blk.state === 'full' ? () => true : (s: number) => blk.present.some(([f, n]) => s >= f && s < f + n);
      const data = fill(blk.tag, has);
      if (blk.state === 'partial') {
        const chunk = Math.floor(block / chunkRatio);
        let bm = bitmaps.get(chunk);
        if (!bm) bitmaps.set(chunk, (bm = Buffer.alloc(MiB)));
        const first = (block % chunkRatio) * sectorsPerBlock;
        for (const [f, n] of blk.present) for (let s = f; s < f + n; s++) bm[(first + s) >> 3]! |= 1 << ((first + s) & 7);
      }
      setEntry(index, blk.state === 'full' ? 6 : 7, next);
      parts.push([next, data]);
      next += data.length;
    } else {
      setEntry(index, { zero: 2, not_present: 0, undefined: 1, unmapped: 3 }[blk.state], 0);
    }
  }
  for (const [chunk, bm] of bitmaps) {
    setEntry(chunk * (chunkRatio + 1) + chunkRatio, 6, next);
    parts.push([next, bm]);
    next += MiB;
  }
  for (const [chunk, state] of Object.entries(spec.sbState ?? {})) {
    const i = Number(chunk) * (chunkRatio + 1) + chunkRatio;
    const old = bat.readBigUInt64LE(i * 8);
    bat.writeBigUInt64LE((old & ~7n) | BigInt(state), i * 8);
  }

  const b = Buffer.alloc(next);
  b.write('vhdxfile', 0, 'latin1');
  b.write('vhdx-raw test builder', 8, 'utf16le');
  HEADER_OFFSETS.forEach((h, i) => {
    b.write('head', h, 'latin1');
    b.writeBigUInt64LE(BigInt(10 + i), h + 8);
    writeGuid(b, h + 16, hexGuid());
    writeGuid(b, h + 32, dataWriteGuid);
    b.writeUInt16LE(1, h + 66);
    b.writeUInt32LE(MiB, h + 68);
    b.writeBigUInt64LE(BigInt(MiB), h + 72);
  });
  for (const rt of REGION_TABLE_OFFSETS) {
    b.write('regi', rt, 'latin1');
    b.writeUInt32LE(2, rt + 8);
    writeGuid(b, rt + 16, GUIDS.bat);
    b.writeBigUInt64LE(BigInt(batOffset), rt + 32);
    b.writeUInt32LE(batLength, rt + 40);
    b.writeUInt32LE(1, rt + 44);
    writeGuid(b, rt + 48, GUIDS.metadata);
    b.writeBigUInt64LE(BigInt(2 * MiB), rt + 64);
    b.writeUInt32LE(MiB, rt + 72);
    b.writeUInt32LE(1, rt + 76);
  }
  fixAllChecksums(b);
  const m = 2 * MiB;
  b.write('metadata', m, 'latin1');
  const payload: [string, Buffer, number][] = [];
  const u32 = (v: number) => {
    const x = Buffer.alloc(4);
    x.writeUInt32LE(v);
    return x;
  };
  const fp = Buffer.alloc(8);
  fp.writeUInt32LE(blockSize, 0);
  fp.writeUInt32LE(diff ? 2 : 0, 4);
  const vds = Buffer.alloc(8);
  vds.writeBigUInt64LE(BigInt(virtualSize));
  const vdid = Buffer.alloc(16);
  writeGuid(vdid, 0, virtualDiskId);
  payload.push([GUIDS.fileParameters, fp, 4], [GUIDS.virtualDiskSize, vds, 6], [GUIDS.virtualDiskId, vdid, 6], [GUIDS.logicalSectorSize, u32(lss), 6], [GUIDS.physicalSectorSize, u32(spec.physicalSectorSize ?? 4096), 6]);
  if (diff) payload.push([GUIDS.parentLocator, locatorItem(spec.locator!, spec.locatorType), 4]);
  b.writeUInt16LE(payload.length, m + 10);
  let off = 0x10000;
  payload.forEach(([id, data, flags], i) => {
    const e = m + 32 + 32 * i;
    writeGuid(b, e, id);
    b.writeUInt32LE(off, e + 16);
    b.writeUInt32LE(data.length, e + 20);
    b.writeUInt32LE(flags, e + 24);
    data.copy(b, m + off);
    off += data.length;
  });
  bat.copy(b, batOffset);
  for (const [at, data] of parts) data.copy(b, at);

  // What a reader must return, sector by sector, from the spec: data here, zeros, or the parent's bytes.
  const view = (parent: DiskView | null): DiskView => (offset, length) => {
    const out = Buffer.alloc(length);
    const first = Math.floor(offset / lss);
    const last = Math.ceil((offset + length) / lss);
    for (let lba = first; lba < last && lba * lss < virtualSize; lba++) {
      const block = Math.floor((lba * lss) / blockSize);
      const s = lba - block * sectorsPerBlock;
      const blk = spec.blocks[block] ?? { state: 'not_present' as const };
      let sector: Buffer | null = null; // null: zeros
      if (blk.state === 'full' || (blk.state === 'partial' && blk.present.some(([f, n]) => s >= f && s < f + n))) sector = sectorPattern(blk.tag, lba, lss);
      else if ((blk.state === 'not_present' || blk.state === 'partial') && diff && parent) sector = parent(lba * lss, lss);
      if (!sector) continue;
      const from = Math.max(offset, lba * lss);
      const to = Math.min(offset + length, (lba + 1) * lss);
      sector.copy(out, from - offset, from - lba * lss, to - lba * lss);
    }
    return out;
  };
  return { bytes: b, dataWriteGuid, virtualDiskId, virtualSize, view };
}

/** The locator keys a child made on Linux would carry: linkage, relative and absolute path. */
export function linuxLocator(parentPath: string, dataWriteGuid: string, relative: string): [string, string][] {
  return [
    ['parent_linkage', `{${dataWriteGuid}}`],
    ['relative_path', relative],
    ['absolute_win32_path', parentPath],
  ];
}

/**
 * A copy of an image with an all-zero sector bitmap block appended for `chunk` and its SB entry
 * present: legal for a differencing disk, and what libvhdi needs to read its NOT_PRESENT blocks.
 */
export function withSectorBitmap(input: Buffer, chunk: number): Buffer {
  const l = rawLayout(input);
  const chunkRatio = (2 ** 23 * l.logicalSectorSize) / l.blockSize;
  const at = Math.ceil(input.length / MiB) * MiB;
  const b = Buffer.alloc(at + MiB);
  input.copy(b);
  b.writeBigUInt64LE((BigInt(at / MiB) << 20n) | 6n, l.batOffset + 8 * (chunk * (chunkRatio + 1) + chunkRatio));
  return b;
}
