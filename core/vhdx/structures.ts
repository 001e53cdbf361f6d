// MS-VHDX structures, one parser each, named as in the specification (v8.0 §2). Every size and
// offset is checked against the file before it is used; failures are typed `vhdx_corrupt`.
import { ShieldError } from '../errors.ts';
import { structureChecksum } from './crc32c.ts';
import { NULL_GUID, readGuid, writeGuid } from './guid.ts';

export const KiB = 1024;
export const MiB = 1024 * 1024;
export const MAX_VIRTUAL_SIZE = 64 * 1024 * 1024 * MiB; // 64 TiB
export const HEADER_SECTION = MiB;
export const HEADER_OFFSETS = [64 * KiB, 128 * KiB] as const;
export const REGION_TABLE_OFFSETS = [192 * KiB, 256 * KiB] as const;
export const HEADER_SIZE = 4 * KiB;
export const REGION_TABLE_SIZE = 64 * KiB;
export const METADATA_TABLE_SIZE = 64 * KiB;

export const REGION = {
  BAT: '2dc27766-f623-4200-9d64-115e9bfd4a08',
  METADATA: '8b7ca206-4790-4b9a-b8fe-575f050f886e',
} as const;

export const METADATA_ITEM = {
  FILE_PARAMETERS: 'caa16737-fa36-4d43-b3b6-33f0aa44e76b',
  VIRTUAL_DISK_SIZE: '2fa54224-cd1b-4876-b211-5dbed83bf4b8',
  VIRTUAL_DISK_ID: 'beca12ab-b2e6-4523-93ef-c309e000c746',
  LOGICAL_SECTOR_SIZE: '8141bf1d-a96f-4709-ba47-f233a8faab5f',
  PHYSICAL_SECTOR_SIZE: 'cda348c7-445d-4471-9cc9-e9885251c556',
  PARENT_LOCATOR: 'a8d35f2d-b30b-454d-abf7-d3d84834ab0c',
} as const;

const REGION_NAMES: Record<string, string> = { [REGION.BAT]: 'BAT', [REGION.METADATA]: 'Metadata' };
const ITEM_NAMES: Record<string, string> = {
  [METADATA_ITEM.FILE_PARAMETERS]: 'File Parameters',
  [METADATA_ITEM.VIRTUAL_DISK_SIZE]: 'Virtual Disk Size',
  [METADATA_ITEM.VIRTUAL_DISK_ID]: 'Virtual Disk ID',
  [METADATA_ITEM.LOGICAL_SECTOR_SIZE]: 'Logical Sector Size',
  [METADATA_ITEM.PHYSICAL_SECTOR_SIZE]: 'Physical Sector Size',
  [METADATA_ITEM.PARENT_LOCATOR]: 'Parent Locator',
};

/** Payload block states (§2.5.1.1); 5 is the pre-1.0 draft's UNMAPPED, which QEMU still reads as zeros. */
export const PAYLOAD_STATE = {
  NOT_PRESENT: 0,
  UNDEFINED: 1,
  ZERO: 2,
  UNMAPPED: 3,
  UNMAPPED_V095: 5,
  FULLY_PRESENT: 6,
  PARTIALLY_PRESENT: 7,
} as const;

export const PAYLOAD_STATE_NAMES: Record<number, string> = Object.fromEntries(Object.entries(PAYLOAD_STATE).map(([k, v]) => [v, k]));

/** Sector-bitmap block states (§2.5.1.2): only NOT_PRESENT is legal outside differencing disks. */
export const SB_STATE = { NOT_PRESENT: 0, PRESENT: 6 } as const;

/** The one parent locator type MS-VHDX defines (§2.6.2.6.1): a VHDX parent. */
export const VHDX_PARENT_LOCATOR_TYPE = 'b04aefb7-d19e-4a81-b789-25b8e9445913';

export function corrupt(message: string): ShieldError {
  return new ShieldError('vhdx_corrupt', `Damaged VHDX: ${message}.`);
}

export function unsupported(message: string): ShieldError {
  return new ShieldError('vhdx_unsupported', `Unsupported VHDX: ${message}.`);
}

function ascii(buf: Buffer, at: number, len: number): string {
  return buf.subarray(at, at + len).toString('latin1');
}

// ---- File type identifier (§2.2.1) -------------------------------------------------------------

export function parseFileIdentifier(buf: Buffer): { creator: string } {
  if (buf.length < 8 + 512 || ascii(buf, 0, 8) !== 'vhdxfile') throw corrupt('not a VHDX file (no "vhdxfile" signature)');
  const raw = buf.subarray(8, 8 + 512).toString('utf16le');
  const end = raw.indexOf('\u0000');
  return { creator: end >= 0 ? raw.slice(0, end) : raw };
}

// ---- Header (§2.2.2) ------------------------------------------------------------------------

export interface Header {
  slot: 1 | 2;
  sequenceNumber: bigint;
  fileWriteGuid: string;
  dataWriteGuid: string;
  logGuid: string;
  logVersion: number;
  version: number;
  logLength: number;
  logOffset: number;
}

/** A header slot: the parsed header, or why it is not valid. */
export function parseHeader(buf: Buffer, slot: 1 | 2): Header | { slot: 1 | 2; invalid: string } {
  if (buf.length < HEADER_SIZE) return { slot, invalid: 'truncated' };
  if (ascii(buf, 0, 4) !== 'head') return { slot, invalid: 'no "head" signature' };
  if (structureChecksum(buf.subarray(0, HEADER_SIZE), 4) !== buf.readUInt32LE(4)) return { slot, invalid: 'checksum mismatch' };
  const h: Header = {
    slot,
    sequenceNumber: buf.readBigUInt64LE(8),
    fileWriteGuid: readGuid(buf, 16),
    dataWriteGuid: readGuid(buf, 32),
    logGuid: readGuid(buf, 48),
    logVersion: buf.readUInt16LE(64),
    version: buf.readUInt16LE(66),
    logLength: buf.readUInt32LE(68),
    logOffset: Number(buf.readBigUInt64LE(72)),
  };
  if (h.version !== 1) return { slot, invalid: `version ${h.version} (only 1 is defined)` };
  return h;
}

/** The current header: the valid one, or the valid one with the greater sequence number. */
export function currentHeader(slots: (Header | { slot: 1 | 2; invalid: string })[], fileSize: number): Header {
  const valid = slots.filter((s): s is Header => !('invalid' in s));
  if (valid.length === 0) {
    throw corrupt(`no valid header (${slots.map((s) => `header ${s.slot}: ${'invalid' in s ? s.invalid : 'ok'}`).join('; ')})`);
  }
  const h = valid.reduce((a, b) => (b.sequenceNumber > a.sequenceNumber ? b : a));
  if (h.logGuid !== NULL_GUID && h.logVersion !== 0) throw unsupported(`log version ${h.logVersion}`);
  if (h.logLength % MiB !== 0 || h.logOffset % MiB !== 0) throw corrupt('the log is not aligned to 1 MiB');
  if (h.logLength > 0 && (h.logOffset < HEADER_SECTION || h.logOffset + h.logLength > fileSize)) {
    throw corrupt(`the log (${h.logLength} bytes at ${h.logOffset}) lies outside the file`);
  }
  return h;
}

// ---- Region table (§2.2.3) -----------------------------------------------------------------

export interface RegionEntry {
  guid: string;
  name: string;
  fileOffset: number;
  length: number;
  required: boolean;
}

export function parseRegionTable(buf: Buffer, fileSize: number): RegionEntry[] | { invalid: string } {
  if (buf.length < REGION_TABLE_SIZE) return { invalid: 'truncated' };
  if (ascii(buf, 0, 4) !== 'regi') return { invalid: 'no "regi" signature' };
  if (structureChecksum(buf.subarray(0, REGION_TABLE_SIZE), 4) !== buf.readUInt32LE(4)) return { invalid: 'checksum mismatch' };
  const count = buf.readUInt32LE(8);
  if (count > 2047) return { invalid: `${count} entries (at most 2047)` };
  const entries: RegionEntry[] = [];
  for (let i = 0; i < count; i++) {
    const at = 16 + i * 32;
    const guid = readGuid(buf, at);
    const fileOffset = buf.readBigUInt64LE(at + 16);
    const length = buf.readUInt32LE(at + 24);
    const required = (buf.readUInt32LE(at + 28) & 1) === 1;
    const name = REGION_NAMES[guid] ?? 'unknown';
    if (fileOffset % BigInt(MiB) !== 0n || fileOffset < BigInt(MiB) || length % MiB !== 0 || length === 0) {
      return { invalid: `region ${name} (${guid}) is not 1 MiB-aligned` };
    }
    if (fileOffset + BigInt(length) > BigInt(fileSize)) return { invalid: `region ${name} lies beyond the end of the file` };
    if (entries.some((e) => e.guid === guid)) return { invalid: `region ${guid} appears twice` };
    entries.push({ guid, name, fileOffset: Number(fileOffset), length, required });
  }
  return entries;
}

/** Regions, the log and the header section must not overlap one another. */
export function checkLayout(ranges: { name: string; offset: number; length: number }[]): void {
  const sorted = [...ranges].filter((r) => r.length > 0).sort((a, b) => a.offset - b.offset);
  for (let i = 1; i < sorted.length; i++) {
    const prev = sorted[i - 1]!;
    if (sorted[i]!.offset < prev.offset + prev.length) throw corrupt(`${sorted[i]!.name} overlaps ${prev.name}`);
  }
}

// ---- Metadata region (§2.6) --------------------------------------------------------------------

export interface MetadataItem {
  itemId: string;
  name: string;
  offset: number;
  length: number;
  isUser: boolean;
  isVirtualDisk: boolean;
  isRequired: boolean;
}

export function parseMetadataTable(buf: Buffer, regionLength: number): MetadataItem[] {
  if (buf.length < METADATA_TABLE_SIZE || ascii(buf, 0, 8) !== 'metadata') throw corrupt('the metadata region has no "metadata" signature');
  const count = buf.readUInt16LE(10);
  if (count > 2047) throw corrupt(`the metadata table claims ${count} entries (at most 2047)`);
  const items: MetadataItem[] = [];
  for (let i = 0; i < count; i++) {
    const at = 32 + i * 32;
    const itemId = readGuid(buf, at);
    const offset = buf.readUInt32LE(at + 16);
    const length = buf.readUInt32LE(at + 20);
    const bits = buf.readUInt32LE(at + 24);
    const item: MetadataItem = {
      itemId,
      name: ITEM_NAMES[itemId] ?? 'unknown',
      offset,
      length,
      isUser: (bits & 1) === 1,
      isVirtualDisk: (bits & 2) === 2,
      isRequired: (bits & 4) === 4,
    };
    if (length > MiB) throw corrupt(`metadata item ${item.name} is ${length} bytes (at most 1 MiB)`);
    if (length > 0 && (offset < METADATA_TABLE_SIZE || offset + length > regionLength)) throw corrupt(`metadata item ${item.name} lies outside the metadata region`);
    if (items.some((x) => x.itemId === itemId && x.isUser === item.isUser)) throw corrupt(`metadata item ${itemId} appears twice`);
    items.push(item);
  }
  const sorted = items.filter((x) => x.length > 0).sort((a, b) => a.offset - b.offset);
  for (let i = 1; i < sorted.length; i++) {
    if (sorted[i]!.offset < sorted[i - 1]!.offset + sorted[i - 1]!.length) throw corrupt(`metadata items ${sorted[i - 1]!.name} and ${sorted[i]!.name} overlap`);
  }
  return items;
}

export interface DiskParameters {
  blockSize: number;
  leaveBlockAllocated: boolean;
  hasParent: boolean;
  virtualSize: number;
  virtualDiskId: string;
  logicalSectorSize: number;
  physicalSectorSize: number;
}

/** Decodes the system items; `read(item)` returns the item's bytes from the metadata region. */
export function parseDiskParameters(items: MetadataItem[], read: (item: MetadataItem) => Buffer, knownUserItems: readonly string[] = []): DiskParameters {
  for (const item of items) {
    const known = item.isUser ? knownUserItems.includes(item.itemId) : item.itemId in ITEM_NAMES;
    if (item.isRequired && !known) throw unsupported(`required ${item.isUser ? 'user ' : ''}metadata item ${item.itemId} is unknown`);
  }
  const system = (id: string, size: number) => {
    const item = items.find((x) => x.itemId === id && !x.isUser);
    if (!item) throw corrupt(`the ${ITEM_NAMES[id]} metadata item is missing`);
    if (item.length < size) throw corrupt(`the ${ITEM_NAMES[id]} metadata item is too short`);
    return read(item);
  };
  const fp = system(METADATA_ITEM.FILE_PARAMETERS, 8);
  const blockSize = fp.readUInt32LE(0);
  const flags = fp.readUInt32LE(4);
  if (blockSize < MiB || blockSize > 256 * MiB || (blockSize & (blockSize - 1)) !== 0) throw corrupt(`block size ${blockSize} (must be a power of two from 1 to 256 MiB)`);
  const logicalSectorSize = system(METADATA_ITEM.LOGICAL_SECTOR_SIZE, 4).readUInt32LE(0);
  const physicalSectorSize = system(METADATA_ITEM.PHYSICAL_SECTOR_SIZE, 4).readUInt32LE(0);
  if (logicalSectorSize !== 512 && logicalSectorSize !== 4096) throw corrupt(`logical sector size ${logicalSectorSize}`);
  if (physicalSectorSize !== 512 && physicalSectorSize !== 4096) throw corrupt(`physical sector size ${physicalSectorSize}`);
  const size = system(METADATA_ITEM.VIRTUAL_DISK_SIZE, 8).readBigUInt64LE(0);
  if (size === 0n || size > BigInt(MAX_VIRTUAL_SIZE) || size % BigInt(logicalSectorSize) !== 0n) {
    throw corrupt(`virtual disk size ${size} (must be a multiple of the sector size, at most 64 TiB)`);
  }
  const hasParent = (flags & 2) === 2;
  if (hasParent && !items.some((x) => x.itemId === METADATA_ITEM.PARENT_LOCATOR && !x.isUser)) throw corrupt('a differencing disk without a parent locator');
  return {
    blockSize,
    leaveBlockAllocated: (flags & 1) === 1,
    hasParent,
    virtualSize: Number(size),
    virtualDiskId: readGuid(system(METADATA_ITEM.VIRTUAL_DISK_ID, 16), 0),
    logicalSectorSize,
    physicalSectorSize,
  };
}

// ---- Parent locator (§2.6.2.6) ---------------------------------------------------------------

export interface ParentLocator {
  locatorType: string;
  /** Keys as stored (case-sensitive), in file order. */
  entries: Record<string, string>;
}

/** The path keys of a VHDX parent locator, in the order the specification says to search them. */
export const PARENT_PATH_KEYS = ['relative_path', 'volume_path', 'absolute_win32_path'] as const;

/**
 * A parent locator item: a 20-byte header (LocatorType, Reserved, KeyValueCount), 12-byte entries
 * (KeyOffset, ValueOffset relative to the item's start, KeyLength, ValueLength) and UTF-16LE
 * strings without terminators. Every offset and length is checked against the item.
 */
export function parseParentLocator(buf: Buffer): ParentLocator {
  if (buf.length < 20) throw corrupt(`the parent locator is ${buf.length} bytes (a 20-byte header at least)`);
  const locatorType = readGuid(buf, 0);
  if (locatorType !== VHDX_PARENT_LOCATOR_TYPE) throw unsupported(`parent locator type ${locatorType} (only VHDX parents, ${VHDX_PARENT_LOCATOR_TYPE}, are defined)`);
  const count = buf.readUInt16LE(18);
  if (20 + 12 * count > buf.length) throw corrupt(`the parent locator claims ${count} entries; its ${buf.length} bytes hold ${Math.floor((buf.length - 20) / 12)}`);
  const entries: Record<string, string> = {};
  const text = (offset: number, length: number, what: string): string => {
    if (length === 0 || length % 2 !== 0) throw corrupt(`parent locator ${what} is ${length} bytes (UTF-16, not empty)`);
    if (offset + length > buf.length) throw corrupt(`parent locator ${what} (${length} bytes at ${offset}) lies outside the ${buf.length}-byte item`);
    return buf.toString('utf16le', offset, offset + length);
  };
  for (let i = 0; i < count; i++) {
    const e = 20 + 12 * i;
    const key = text(buf.readUInt32LE(e), buf.readUInt16LE(e + 8), `key ${i}`);
    const value = text(buf.readUInt32LE(e + 4), buf.readUInt16LE(e + 10), `value ${i} (${JSON.stringify(key)})`);
    if (Object.hasOwn(entries, key)) throw corrupt(`the parent locator has the key ${JSON.stringify(key)} twice`);
    // defineProperty: a key such as "__proto__" stays an ordinary entry.
    Object.defineProperty(entries, key, { value, enumerable: true, writable: true, configurable: true });
  }
  const linkage = entries.parent_linkage;
  if (linkage === undefined) throw corrupt('the parent locator has no parent_linkage');
  if (parseLinkageGuid(linkage) === null) throw corrupt(`the parent locator's parent_linkage ${JSON.stringify(linkage.slice(0, 80))} is not a GUID`);
  if (!PARENT_PATH_KEYS.some((k) => Object.hasOwn(entries, k))) throw corrupt(`the parent locator has no path (${PARENT_PATH_KEYS.join(', ')})`);
  return { locatorType, entries };
}

/** The parent locator item for `pairs` (in that order): the inverse of parseParentLocator. */
export function buildParentLocator(pairs: readonly (readonly [string, string])[]): Buffer {
  if (pairs.length > 0xffff) throw new RangeError('too many parent locator entries');
  const strings = pairs.flatMap(([k, v]) => [Buffer.from(k, 'utf16le'), Buffer.from(v, 'utf16le')]);
  for (const x of strings) if (x.length === 0 || x.length > 0xffff) throw new RangeError('a parent locator key or value is empty or longer than 65535 bytes');
  const head = 20 + 12 * pairs.length;
  const buf = Buffer.alloc(head + strings.reduce((n, x) => n + x.length, 0));
  writeGuid(VHDX_PARENT_LOCATOR_TYPE, buf, 0);
  buf.writeUInt16LE(pairs.length, 18);
  let at = head;
  strings.forEach((x, i) => {
    const e = 20 + 12 * (i >> 1);
    buf.writeUInt32LE(at, e + (i & 1) * 4); // KeyOffset, ValueOffset
    buf.writeUInt16LE(x.length, e + 8 + (i & 1) * 2); // KeyLength, ValueLength
    x.copy(buf, at);
    at += x.length;
  });
  return buf;
}

/** "{1B2C…}" (braces optional, any case) → the lowercase GUID, or null when it is not one. */
export function parseLinkageGuid(text: string): string | null {
  const g = '[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}';
  const m = new RegExp(`^(?:\\{(${g})\\}|(${g}))$`).exec(text);
  return m ? (m[1] ?? m[2]!).toLowerCase() : null;
}

// ---- Block allocation table (§2.5) -------------------------------------------------------------

export interface BatGeometry {
  chunkRatio: number;
  payloadBlocks: number;
  sectorBitmapBlocks: number;
  /** Entries a reader needs the BAT region to hold. */
  entries: number;
}

export function batGeometry(p: DiskParameters): BatGeometry {
  const chunkRatio = (2 ** 23 * p.logicalSectorSize) / p.blockSize;
  const payloadBlocks = Math.ceil(p.virtualSize / p.blockSize);
  const sectorBitmapBlocks = Math.ceil(payloadBlocks / chunkRatio);
  const entries = p.hasParent ? sectorBitmapBlocks * (chunkRatio + 1) : payloadBlocks + Math.floor((payloadBlocks - 1) / chunkRatio);
  return { chunkRatio, payloadBlocks, sectorBitmapBlocks, entries };
}

export function batIndexOfBlock(block: number, chunkRatio: number): number {
  return block + Math.floor(block / chunkRatio);
}

export interface BatEntry {
  state: number;
  /** Byte offset in the file (FileOffsetMB × 1 MiB). */
  fileOffset: number;
}

export function decodeBatEntry(raw: bigint): BatEntry {
  return { state: Number(raw & 7n), fileOffset: Number(raw >> 20n) * MiB };
}
