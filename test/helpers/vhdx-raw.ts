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
