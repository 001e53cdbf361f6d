// The VHDX fuzz engine, shared by test/fuzz/vhdx.test.ts (short run in `npm test`) and
// bench/vhdx-fuzz.ts (long run). Real qemu-made images (and a differencing child crafted over one
// of them) are mutated where the structures live (headers, region tables, metadata, BAT, log,
// parent locator, sector bitmap) and at random; every case must end in a correct read or a typed
// ShieldError (vhdx_corrupt / vhdx_unsupported / vhdx_parent_invalid / invalid_argument) — never
// another exception, a hang or unbounded memory.
//
// Cases run in a worker thread (vhdx-fuzz-worker.ts) so that a synchronous endless loop in the
// reader is caught too: the main thread watches progress and terminates the worker.
import { Worker } from 'node:worker_threads';
import { closeSync, copyFileSync, openSync, readFileSync, readSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ShieldError } from '../../core/errors.ts';
import { openVhdx, type VhdxWritable } from '../../core/vhdx/mod.ts';
import { mutate, rng } from './random.ts';
import { makeImage, type ImageSpec } from './qemu.ts';
import {
  GUIDS,
  HEADER_OFFSETS,
  HEADER_SIZE,
  LOG_SECTOR,
  MiB,
  bufferView,
  buildVhdx,
  identityOf,
  linuxLocator,
  locatorItem,
  REGION_TABLE_OFFSETS,
  REGION_TABLE_SIZE,
  craftDirtyLog,
  fixAllChecksums,
  fixChecksum,
  fixLogEntryChecksum,
  rawBat,
  rawLayout,
  writeGuid,
  type RawLayout,
} from './vhdx-raw.ts';

export const ALLOWED_CODES = ['vhdx_corrupt', 'vhdx_unsupported', 'vhdx_parent_invalid', 'invalid_argument'] as const;

/** A base image: its bytes and what a correct reader returns for them. */
export interface Seed {
  name: string;
  file: string;
  /** The virtual disk as QEMU reads it (after QEMU's own log replay for the dirty seed). */
  raw: string;
}

export interface SeedData {
  name: string;
  file: string;
  bytes: Buffer;
  raw: Buffer;
  layout: RawLayout;
}

/** qemu-made seeds (small: 8 MiB virtual, 1 MiB blocks) plus one with a dirty log, written to `dir`. */
export function makeSeeds(dir: string): Seed[] {
  const writes = [
    { offset: MiB - 4096, length: 8192, byte: 0xab },
    { offset: 5 * MiB + 512, length: 1536, byte: 0x5a },
    { offset: 8 * MiB - 512, length: 512, byte: 0xee },
  ];
  const specs: [string, ImageSpec][] = [
    ['dynamic', { type: 'dynamic', size: 8 * MiB, blockSize: MiB, writes }],
    ['fixed', { type: 'fixed', size: 8 * MiB, blockSize: MiB, blockStateZero: false, writes }],
    ['fixed-zero', { type: 'fixed', size: 8 * MiB, blockSize: MiB, writes: writes.slice(0, 1) }],
  ];
  const seeds: Seed[] = specs.map(([name, spec]) => {
    const img = makeImage(dir, spec, `seed-${name}`);
    return { name, file: img.path, raw: img.raw };
  });
  // Dirty log: the block-5 mapping and a 4 KiB zeroing exist only in the log. Expected bytes:
  // the dynamic seed's, with those two updates (QEMU replays the same, see vhdx-read.test.ts).
  const dyn = seeds[0]!;
  const dirty = craftDirtyLog(readFileSync(dyn.file), { block: 6, byte: 0xa5 });
  const raw = Buffer.from(readFileSync(dyn.raw));
  raw.fill(0xa5, 6 * MiB, 7 * MiB);
  if (dirty.zeroed) raw.fill(0, dirty.zeroed.offset, dirty.zeroed.offset + dirty.zeroed.length);
  const file = join(dir, 'seed-dirty.vhdx');
  writeFileSync(file, dirty.bytes);
  writeFileSync(join(dir, 'seed-dirty.raw'), raw);
  seeds.push({ name: 'dirty', file, raw: join(dir, 'seed-dirty.raw') });
  // Differencing: a child crafted from the spec (vhdx-raw.ts) over the dynamic seed, which stays
  // untouched in `dir` and is found through the relative path (cases are written into `dir` too).
  const id = identityOf(dyn.file);
  const child = buildVhdx({
    virtualSize: 8 * MiB,
    blockSize: MiB,
    logicalSectorSize: 512,
    virtualDiskId: id.virtualDiskId,
    locator: linuxLocator(dyn.file, id.dataWriteGuid, '.\\seed-dynamic.vhdx'),
    blocks: DIFF_BLOCKS,
  });
  writeFileSync(join(dir, 'seed-diff.vhdx'), child.bytes);
  writeFileSync(join(dir, 'seed-diff.raw'), child.view(bufferView(readFileSync(dyn.raw)))(0, 8 * MiB));
  seeds.push({ name: 'diff', file: join(dir, 'seed-diff.vhdx'), raw: join(dir, 'seed-diff.raw') });
  return seeds;
}

/** The differencing seed's blocks (1 MiB, 2048 sectors each): every state, bitmap runs across bytes. */
const DIFF_BLOCKS: Parameters<typeof buildVhdx>[0]['blocks'] = {
  0: { state: 'full', tag: 1 },
  1: { state: 'partial', tag: 2, present: [[0, 3], [7, 10], [2047, 1]] },
  2: { state: 'zero' },
  4: { state: 'partial', tag: 4, present: [[100, 900]] },
  5: { state: 'full', tag: 5 },
  7: { state: 'partial', tag: 7, present: [[2040, 8]] },
};
/** Chunk ratio of the differencing seed (512-byte sectors, 1 MiB blocks): its SB entry's BAT index. */
const DIFF_CHUNK_RATIO = 4096;

export function loadSeeds(seeds: Seed[]): SeedData[] {
  return seeds.map((s) => {
    const bytes = readFileSync(s.file);
    return { name: s.name, file: s.file, bytes, raw: readFileSync(s.raw), layout: rawLayout(bytes) };
  });
}

// ---- Mutations ---------------------------------------------------------------------------------

interface Field {
  name: string;
  offset: number;
  size: 2 | 4 | 8 | 16;
}

/** Every field a reader trusts, at its place in this seed. */
function fields(s: SeedData): Field[] {
  const l = s.layout;
  const f: Field[] = [];
  HEADER_OFFSETS.forEach((h, i) => {
    const p = `header${i + 1}`;
    f.push(
      { name: `${p}.signature`, offset: h, size: 4 },
      { name: `${p}.sequenceNumber`, offset: h + 8, size: 8 },
      { name: `${p}.logGuid`, offset: h + 48, size: 16 },
      { name: `${p}.logVersion`, offset: h + 64, size: 2 },
      { name: `${p}.version`, offset: h + 66, size: 2 },
      { name: `${p}.logLength`, offset: h + 68, size: 4 },
      { name: `${p}.logOffset`, offset: h + 72, size: 8 },
    );
  });
  REGION_TABLE_OFFSETS.forEach((t, i) => {
    const p = `regionTable${i + 1}`;
    f.push({ name: `${p}.signature`, offset: t, size: 4 }, { name: `${p}.entryCount`, offset: t + 8, size: 4 });
    for (let e = 0; e < 3; e++) {
      const at = t + 16 + 32 * e;
      f.push(
        { name: `${p}[${e}].guid`, offset: at, size: 16 },
        { name: `${p}[${e}].fileOffset`, offset: at + 16, size: 8 },
        { name: `${p}[${e}].length`, offset: at + 24, size: 4 },
        { name: `${p}[${e}].required`, offset: at + 28, size: 4 },
      );
    }
  });
  const m = l.metadataOffset;
  f.push({ name: 'metadata.signature', offset: m, size: 8 }, { name: 'metadata.entryCount', offset: m + 10, size: 2 });
  for (let e = 0; e < l.items.length + 1; e++) {
    const at = m + 32 + 32 * e;
    f.push(
      { name: `item[${e}].id`, offset: at, size: 16 },
      { name: `item[${e}].offset`, offset: at + 16, size: 4 },
      { name: `item[${e}].length`, offset: at + 20, size: 4 },
      { name: `item[${e}].flags`, offset: at + 24, size: 4 },
    );
  }
  const it = l.itemAt;
  if (it.fileParameters !== undefined) f.push({ name: 'blockSize', offset: it.fileParameters, size: 4 }, { name: 'fileFlags', offset: it.fileParameters + 4, size: 4 });
  if (it.virtualDiskSize !== undefined) f.push({ name: 'virtualSize', offset: it.virtualDiskSize, size: 8 });
  if (it.logicalSectorSize !== undefined) f.push({ name: 'logicalSectorSize', offset: it.logicalSectorSize, size: 4 });
  if (it.physicalSectorSize !== undefined) f.push({ name: 'physicalSectorSize', offset: it.physicalSectorSize, size: 4 });
  if (it.virtualDiskId !== undefined) f.push({ name: 'virtualDiskId', offset: it.virtualDiskId, size: 16 });
  for (let e = 0; e < 10; e++) f.push({ name: `bat[${e}]`, offset: l.batOffset + 8 * e, size: 8 });
  if (s.name === 'diff') {
    const pl = it.parentLocator!;
    f.push({ name: 'locator.count', offset: pl + 18, size: 2 }, { name: 'locator.type', offset: pl, size: 16 });
    for (let e = 0; e < 3; e++) {
      const at = pl + 20 + 12 * e;
      f.push(
        { name: `locator[${e}].keyOffset`, offset: at, size: 4 },
        { name: `locator[${e}].valueOffset`, offset: at + 4, size: 4 },
        { name: `locator[${e}].keyLength`, offset: at + 8, size: 2 },
        { name: `locator[${e}].valueLength`, offset: at + 10, size: 2 },
      );
    }
    const sb = l.batOffset + 8 * DIFF_CHUNK_RATIO;
    f.push({ name: 'bat.sectorBitmap', offset: sb, size: 8 });
    const bitmap = diffBitmapOffset(s);
    for (const at of [0, 32, 256, 504, 1024]) f.push({ name: `bitmap+${at}`, offset: bitmap + at, size: 8 });
  }
  if (s.name === 'dirty') {
    const lo = l.current.logOffset;
    f.push(
      { name: 'log.entryLength', offset: lo + 8, size: 4 },
      { name: 'log.tail', offset: lo + 12, size: 4 },
      { name: 'log.sequence', offset: lo + 16, size: 8 },
      { name: 'log.descriptorCount', offset: lo + 24, size: 4 },
      { name: 'log.flushedFileOffset', offset: lo + 48, size: 8 },
      { name: 'log.lastFileOffset', offset: lo + 56, size: 8 },
      { name: 'log.desc.signature', offset: lo + 64, size: 4 },
      { name: 'log.desc.fileOffset', offset: lo + 64 + 16, size: 8 },
      { name: 'log.desc.zeroLength', offset: lo + 64 + 8, size: 8 },
      { name: 'log.desc.sequence', offset: lo + 64 + 24, size: 8 },
      { name: 'log.data.sequenceHigh', offset: lo + LOG_SECTOR + 4, size: 4 },
      { name: 'log2.descriptorCount', offset: lo + 2 * LOG_SECTOR + 24, size: 4 },
      { name: 'log2.zero.length', offset: lo + 2 * LOG_SECTOR + 64 + 8, size: 8 },
      { name: 'log2.zero.fileOffset', offset: lo + 2 * LOG_SECTOR + 64 + 16, size: 8 },
      { name: 'log2.tail', offset: lo + 2 * LOG_SECTOR + 12, size: 4 },
    );
  }
  return f;
}

/** Values that break size arithmetic: limits, powers of two and their neighbours, the file size. */
function interesting(r: () => number, size: number, fileSize: number, current: bigint): bigint {
  const bits = size * 8;
  const max = (1n << BigInt(bits)) - 1n;
  const k = BigInt(Math.floor(r() * bits));
  const pick = Math.floor(r() * 12);
  const v = [
    0n,
    1n,
    max,
    max >> 1n,
    (max >> 1n) + 1n,
    1n << k,
    (1n << k) - 1n,
    (1n << k) + 1n,
    BigInt(fileSize),
    BigInt(Math.floor(r() * fileSize)),
    current + BigInt(Math.floor(r() * 9) - 4),
    current ^ (1n << k),
  ][pick]!;
  return v & max;
}

function readField(b: Buffer, f: Field): bigint {
  if (f.offset + f.size > b.length) return 0n;
  if (f.size === 2) return BigInt(b.readUInt16LE(f.offset));
  if (f.size === 4) return BigInt(b.readUInt32LE(f.offset));
  if (f.size === 8) return b.readBigUInt64LE(f.offset);
  return 0n;
}

function writeField(b: Buffer, f: Field, v: bigint): void {
  if (f.offset + f.size > b.length) return;
  if (f.size === 2) b.writeUInt16LE(Number(v & 0xffffn), f.offset);
  else if (f.size === 4) b.writeUInt32LE(Number(v & 0xffffffffn), f.offset);
  else if (f.size === 8) b.writeBigUInt64LE(v, f.offset);
}

const KNOWN_GUIDS = Object.values(GUIDS);

function randomGuid(r: () => number): string {
  const hex = Array.from({ length: 32 }, () => Math.floor(r() * 16).toString(16)).join('');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** Fix the checksums a writer would have computed: headers, region tables, log entries. */
/** File offset of the differencing seed's sector bitmap block (from its BAT). */
function diffBitmapOffset(s: SeedData): number {
  return Number(s.bytes.readBigUInt64LE(s.layout.batOffset + 8 * DIFF_CHUNK_RATIO) >> 20n) * MiB;
}

function fixChecksums(b: Buffer, s: SeedData): void {
  fixAllChecksums(b);
  if (s.name === 'dirty') {
    const lo = s.layout.current.logOffset;
    for (let p = lo; p < lo + s.layout.current.logLength && p + LOG_SECTOR <= b.length; p += LOG_SECTOR) {
      if (b.toString('latin1', p, p + 4) === 'loge') fixLogEntryChecksum(b, p);
    }
  }
}

export interface FuzzCase {
  name: string;
  bytes: Buffer;
  seed: SeedData;
  /** 'same': must open and read exactly seed.raw; 'fail': must end in a typed error; 'any': either. */
  expect: 'same' | 'fail' | 'any';
  /** When expect is 'fail', the one code that is right (else any allowed code). */
  code?: (typeof ALLOWED_CODES)[number];
  /** A sparse file: `bytes` at 0, these parts at their offsets, the rest holes up to `size`. */
  sparse?: { size: number; parts: [number, Buffer][] };
}

/**
 * Areas of a well-formed clean image that no reader may interpret: the rest of the file
 * identifier, the reserved part of the header section, region-table and metadata-table slack after
 * the last entry, the metadata region after the last item, BAT entries past the last needed one,
 * and the log when LogGuid is zero. Noise there must change nothing.
 */
function ignorable(s: SeedData): [number, number][] {
  const l = s.layout;
  const lastItem = Math.max(...l.items.map((i) => i.offset + i.length));
  const chunkRatio = (2 ** 23 * l.logicalSectorSize) / l.blockSize;
  const blocks = Math.ceil(l.virtualSize / l.blockSize);
  // A differencing disk uses its sector-bitmap entries, the last chunk's included.
  const batUsed = 8 * (s.name === 'diff' ? Math.ceil(blocks / chunkRatio) * (chunkRatio + 1) : blocks + Math.ceil(blocks / chunkRatio));
  // The sectors of a partially present block that its bitmap marks absent: never read.
  const junk: [number, number][] = [];
  if (s.name === 'diff') {
    const block4 = rawBat(s.bytes, l)[4]!.fileOffset;
    junk.push([block4, block4 + 100 * 512], [block4 + 1000 * 512, block4 + MiB]);
  }
  return [
    ...junk,
    [8 + 512, 64 * 1024],
    [320 * 1024, MiB],
    ...REGION_TABLE_OFFSETS.map((t): [number, number] => [t + 16 + 32 * l.regions.length, t + REGION_TABLE_SIZE]),
    [l.metadataOffset + 32 + 32 * l.items.length, l.metadataOffset + 64 * 1024],
    [l.metadataOffset + lastItem, l.metadataOffset + MiB],
    [l.batOffset + batUsed, l.batOffset + l.batLength],
    [l.current.logOffset, l.current.logOffset + l.current.logLength],
  ];
}

/** One random case: 1–3 mutations of a seed, checksums fixed (usually) so deeper code is reached. */
export function randomCase(seeds: SeedData[], seed: number, index: number): FuzzCase {
  const r = rng((seed ^ Math.imul(index + 1, 0x9e3779b1)) >>> 0);
  const s = seeds[Math.floor(r() * seeds.length)]!;
  let b = Buffer.from(s.bytes);
  if (s.name !== 'dirty' && r() < 0.1) {
    // Noise where nothing may look: the disk must read exactly as before.
    const what: string[] = [];
    for (let n = 1 + Math.floor(r() * 3), i = 0; i < n; i++) {
      const areas = ignorable(s);
      const [from, to] = areas[Math.floor(r() * areas.length)]!;
      const at = from + Math.floor(r() * (to - from));
      const len = Math.min(to - at, 1 + Math.floor(r() * 4096));
      for (let k = 0; k < len; k++) b[at + k] = Math.floor(r() * 256);
      what.push(`noise@${at}+${len}`);
    }
    fixChecksums(b, s);
    return { name: `random #${index} (${s.name}): ${what.join(', ')}`, bytes: b, seed: s, expect: 'same' };
  }
  const fs = fields(s);
  const what: string[] = [];
  for (let n = 1 + Math.floor(r() * 3), i = 0; i < n; i++) {
    const kind = Math.floor(r() * 10);
    if (kind <= 4) {
      const f = fs[Math.floor(r() * fs.length)]!;
      if (f.size === 16) {
        const g = r() < 0.5 ? KNOWN_GUIDS[Math.floor(r() * KNOWN_GUIDS.length)]! : r() < 0.5 ? '00000000-0000-0000-0000-000000000000' : randomGuid(r);
        if (f.offset + 16 <= b.length) writeGuid(b, f.offset, g);
        what.push(`${f.name}=${g}`);
      } else {
        const v = interesting(r, f.size, b.length, readField(b, f));
        writeField(b, f, v);
        what.push(`${f.name}=0x${v.toString(16)}`);
      }
    } else if (kind <= 7) {
      // Bytes mutated inside a window of the structure area (first 4 MiB), length kept or not.
      const hot = [HEADER_OFFSETS[0], HEADER_OFFSETS[1], REGION_TABLE_OFFSETS[0], REGION_TABLE_OFFSETS[1], s.layout.metadataOffset, s.layout.metadataOffset + 0x10000, s.layout.batOffset, s.layout.current.logOffset];
      if (s.name === 'diff') hot.push(s.layout.itemAt.parentLocator!, s.layout.itemAt.parentLocator! + 20, s.layout.batOffset + 8 * DIFF_CHUNK_RATIO - 64, diffBitmapOffset(s));
      const start = r() < 0.75 ? hot[Math.floor(r() * hot.length)]! + Math.floor(r() * 256) : Math.floor(r() * Math.min(b.length, 4 * MiB));
      const len = 1 + Math.floor(r() * 512);
      const win = b.subarray(start, Math.min(b.length, start + len));
      let m = mutate(win, r);
      if (r() < 0.7 && m.length !== win.length) m = Buffer.concat([m, Buffer.alloc(Math.max(0, win.length - m.length))]).subarray(0, win.length);
      b = Buffer.concat([b.subarray(0, start), m, b.subarray(start + win.length)]);
      what.push(`bytes@${start}+${win.length}→${m.length}`);
    } else if (kind === 8) {
      const cut = r() < 0.5 ? Math.floor(r() * b.length) : Math.max(0, Math.floor(r() * (b.length / MiB)) * MiB + Math.floor(r() * 3 - 1) * 512);
      b = b.subarray(0, cut);
      what.push(`truncate@${cut}`);
    } else {
      // Copy a structure over its twin, or an entry over another: duplicates and overlaps.
      const pick = Math.floor(r() * 3);
      const two = (): [number, number] => [Math.floor(r() * 2), Math.floor(r() * 2)];
      if (pick === 0) {
        const [from, to] = two().map((i) => HEADER_OFFSETS[i]!) as [number, number];
        if (b.length >= HEADER_OFFSETS[1] + HEADER_SIZE) b.copy(b, to, from, from + HEADER_SIZE);
      } else if (pick === 1) {
        const [from, to] = two();
        const e = (i: number) => REGION_TABLE_OFFSETS[0] + 16 + 32 * i;
        if (b.length >= e(2)) b.copy(b, e(to) + 16, e(from) + 16, e(from) + 32); // offset and length of one region onto the other
      } else {
        const e = (i: number) => s.layout.metadataOffset + 32 + 32 * i;
        const from = Math.floor(r() * 5);
        const to = Math.floor(r() * 5);
        if (b.length >= e(5)) b.copy(b, e(to) + 16, e(from) + 16, e(from) + 24); // item offset and length
      }
      what.push(`copy${pick}`);
    }
  }
  if (r() < 0.85) fixChecksums(b, s);
  return { name: `${s.name}: ${what.join(', ')}`, bytes: b, seed: s, expect: 'any' };
}

/** Hand-written cases: limits and overlaps a random mutation rarely reaches. Built lazily (memory). */
export function targetedCases(seeds: SeedData[]): (() => FuzzCase)[] {
  const out: (() => FuzzCase)[] = [];
  const zeroGuid = '00000000-0000-0000-0000-000000000000';
  for (const s of seeds) {
    const l = s.layout;
    /** `flip`: structures (by offset) whose stored checksum is broken after the others were fixed. */
    const add = (name: string, expect: FuzzCase['expect'], edit: (b: Buffer) => unknown, code?: FuzzCase['code'], flip: number[] = []) => {
      out.push(() => {
        const b = Buffer.from(s.bytes);
        const ret = edit(b);
        const res = Buffer.isBuffer(ret) ? ret : b;
        fixChecksums(res, s);
        for (const o of flip) res.writeUInt32LE((res.readUInt32LE(o + 4) ^ 1) >>> 0, o + 4);
        return { name: `${s.name}: ${name}`, bytes: res, seed: s, expect, ...(code ? { code } : {}) };
      });
    };
    const at = (k: keyof typeof l.itemAt) => l.itemAt[k]!;
    const rt1 = REGION_TABLE_OFFSETS[0];
    const batEntry = (rt: number) => rt + 16 + 32 * l.regions.findIndex((x) => x.guid === GUIDS.bat);
    const mdEntry = (rt: number) => rt + 16 + 32 * l.regions.findIndex((x) => x.guid === GUIDS.metadata);
    const bothTables = (fn: (rt: number) => void) => REGION_TABLE_OFFSETS.forEach(fn);
    const firstPresent = rawBat(s.bytes, l).findIndex((e) => e.state === 6);

    add('unchanged', 'same', () => {});
    // Virtual size
    add('virtual size 2^62', 'fail', (b) => b.writeBigUInt64LE(1n << 62n, at('virtualDiskSize')));
    add('virtual size 2^64-1', 'fail', (b) => b.writeBigUInt64LE((1n << 64n) - 1n, at('virtualDiskSize')));
    add('virtual size 2^53+512', 'fail', (b) => b.writeBigUInt64LE((1n << 53n) + 512n, at('virtualDiskSize')));
    add('virtual size 64 TiB + 512', 'fail', (b) => b.writeBigUInt64LE((64n << 40n) + 512n, at('virtualDiskSize')));
    add('virtual size 64 TiB (BAT region too small)', 'fail', (b) => b.writeBigUInt64LE(64n << 40n, at('virtualDiskSize')));
    add('virtual size 0', 'any', (b) => b.writeBigUInt64LE(0n, at('virtualDiskSize')));
    add('virtual size 511', 'fail', (b) => b.writeBigUInt64LE(511n, at('virtualDiskSize')));
    add('virtual size 8 MiB + 1', 'fail', (b) => b.writeBigUInt64LE(BigInt(8 * MiB + 1), at('virtualDiskSize')));
    add('virtual size 512', 'any', (b) => b.writeBigUInt64LE(512n, at('virtualDiskSize')));
    add('virtual size 200 GiB (needs more BAT entries than the 1 MiB region holds)', 'fail', (b) => b.writeBigUInt64LE(200n << 30n, at('virtualDiskSize')));
    // Block size
    for (const bs of [0, 3, 512, MiB - 1, MiB + 1, 3 * MiB, 512 * MiB, 2 ** 31, 0xffffffff]) {
      add(`block size ${bs}`, 'fail', (b) => b.writeUInt32LE(bs, at('fileParameters')), 'vhdx_corrupt');
    }
    add('block size 256 MiB', 'any', (b) => b.writeUInt32LE(256 * MiB, at('fileParameters')));
    add('block size 2 MiB (blocks move under the BAT)', 'any', (b) => b.writeUInt32LE(2 * MiB, at('fileParameters')));
    // Sector sizes
    for (const ss of [0, 1, 511, 1024, 8192, 0xffffffff]) {
      add(`logical sector size ${ss}`, 'fail', (b) => b.writeUInt32LE(ss, at('logicalSectorSize')), 'vhdx_corrupt');
      add(`physical sector size ${ss}`, 'fail', (b) => b.writeUInt32LE(ss, at('physicalSectorSize')), 'vhdx_corrupt');
    }
    add('logical sector size 4096 (chunk ratio ×8)', 'any', (b) => b.writeUInt32LE(4096, at('logicalSectorSize')));
    add('physical sector size 4096', 'same', (b) => b.writeUInt32LE(4096, at('physicalSectorSize')));
    // File parameter flags
    if (s.name !== 'diff') add('HasParent without a parent locator', 'fail', (b) => b.writeUInt32LE(b.readUInt32LE(at('fileParameters') + 4) | 2, at('fileParameters') + 4), 'vhdx_corrupt');
    add('reserved file-parameter flags set', 'any', (b) => b.writeUInt32LE((0xfffffffc | b.readUInt32LE(at('fileParameters') + 4)) >>> 0, at('fileParameters') + 4));
    // BAT entries (not in the dirty seed: replaying its log rewrites the first BAT sector)
    if (firstPresent >= 0 && s.name !== 'dirty') {
      const e = l.batOffset + 8 * firstPresent;
      const set = (b: Buffer, mb: bigint, state = 6n) => b.writeBigUInt64LE((mb << 20n) | state, e);
      add('BAT offset beyond EOF', 'fail', (b) => set(b, BigInt(Math.ceil(b.length / MiB) + 1)), 'vhdx_corrupt');
      add('BAT offset 1 TiB', 'fail', (b) => set(b, 1n << 20n), 'vhdx_corrupt');
      add('BAT offset 2^44-1 MiB (max)', 'fail', (b) => set(b, (1n << 44n) - 1n), 'vhdx_corrupt');
      add('BAT offset 2^33 MiB (past 2^53 bytes)', 'fail', (b) => set(b, 1n << 33n), 'vhdx_corrupt');
      add('BAT offset 0 (the header section)', 'fail', (b) => set(b, 0n), 'vhdx_corrupt');
      add('BAT offset = the BAT region', 'fail', (b) => set(b, BigInt(l.batOffset / MiB)), 'vhdx_corrupt');
      add('BAT offset = the metadata region', 'fail', (b) => set(b, BigInt(l.metadataOffset / MiB)), 'vhdx_corrupt');
      add('BAT offset = the log', 'fail', (b) => set(b, BigInt(l.current.logOffset / MiB)), 'vhdx_corrupt');
      add('BAT offset: the last MiB of the file (block cut short)', 'fail', (b) => set(b, BigInt(b.length / MiB - 1) - (s.name === 'fixed' ? 0n : 0n)), 'vhdx_corrupt');
      add('BAT: two blocks share one offset', 'fail', (b) => b.writeBigUInt64LE(b.readBigUInt64LE(e), l.batOffset + 8 * ((firstPresent + 1) % 8)), 'vhdx_corrupt');
      add('BAT reserved bits set', 'any', (b) => b.writeBigUInt64LE(b.readBigUInt64LE(e) | 0xfff8n, e));
      for (const st of [1n, 3n, 5n]) add(`BAT state ${st} (reads as zeros)`, 'any', (b) => set(b, 0n, st));
      add('BAT state 4 (reserved)', 'fail', (b) => set(b, BigInt(b.readBigUInt64LE(e) >> 20n), 4n), 'vhdx_corrupt');
      if (s.name !== 'diff') add('BAT state 7 (partially present, not a differencing disk)', 'fail', (b) => set(b, BigInt(b.readBigUInt64LE(e) >> 20n), 7n));
    }
    if (s.name !== 'dirty') add('BAT all FF', 'fail', (b) => b.fill(0xff, l.batOffset, l.batOffset + 4096));
    // Region tables
    for (const n of [0, 1, 3, 2047, 2048, 65535, 0xffffffff]) {
      add(`region entry count ${n}`, n === 1 || n === 0 ? 'fail' : 'any', (b) => bothTables((rt) => b.writeUInt32LE(n, rt + 8)));
    }
    add('region entry count 2047, entries filled as unknown optional regions', 'any', (b) =>
      bothTables((rt) => {
        b.writeUInt32LE(2047, rt + 8);
        for (let i = 2; i < 2047; i++) {
          writeGuid(b, rt + 16 + 32 * i, `${(0x10000000 + i).toString(16)}-0000-4000-8000-000000000000`);
          b.writeBigUInt64LE(BigInt((64 + i) * MiB), rt + 16 + 32 * i + 16);
          b.writeUInt32LE(MiB, rt + 16 + 32 * i + 24);
        }
      }),
    );
    add('BAT region = metadata region (overlap)', 'fail', (b) => bothTables((rt) => b.writeBigUInt64LE(BigInt(l.metadataOffset), batEntry(rt) + 16)), 'vhdx_corrupt');
    add('BAT region over the log', 'fail', (b) => bothTables((rt) => b.writeBigUInt64LE(BigInt(l.current.logOffset), batEntry(rt) + 16)), 'vhdx_corrupt');
    add('metadata region at 0 (the header section)', 'fail', (b) => bothTables((rt) => b.writeBigUInt64LE(0n, mdEntry(rt) + 16)), 'vhdx_corrupt');
    add('metadata region half-overlapping the BAT', 'fail', (b) =>
      bothTables((rt) => {
        b.writeUInt32LE(2 * MiB, batEntry(rt) + 24);
      }),
    );
    add('BAT region length 0', 'fail', (b) => bothTables((rt) => b.writeUInt32LE(0, batEntry(rt) + 24)), 'vhdx_corrupt');
    add('BAT region length 0xFFF00000 (beyond EOF)', 'fail', (b) => bothTables((rt) => b.writeUInt32LE(0xfff00000, batEntry(rt) + 24)), 'vhdx_corrupt');
    add('BAT region offset 2^63', 'fail', (b) => bothTables((rt) => b.writeBigUInt64LE(1n << 63n, batEntry(rt) + 16)), 'vhdx_corrupt');
    add('metadata region offset 2^64-1M', 'fail', (b) => bothTables((rt) => b.writeBigUInt64LE((1n << 64n) - BigInt(MiB), mdEntry(rt) + 16)), 'vhdx_corrupt');
    add('unknown required region', 'fail', (b) =>
      bothTables((rt) => {
        const n = b.readUInt32LE(rt + 8);
        b.writeUInt32LE(n + 1, rt + 8);
        writeGuid(b, rt + 16 + 32 * n, '0badc0de-1111-4222-8333-444455556666');
        b.writeBigUInt64LE(BigInt(Math.ceil(b.length / MiB) * MiB - MiB), rt + 16 + 32 * n + 16);
        b.writeUInt32LE(MiB, rt + 16 + 32 * n + 24);
        b.writeUInt32LE(1, rt + 16 + 32 * n + 28);
      }),
    'vhdx_unsupported');
    add('unknown optional region', 'same', (b) => {
      const grown = Buffer.concat([b, Buffer.alloc(MiB)]);
      bothTables((rt) => {
        const n = grown.readUInt32LE(rt + 8);
        grown.writeUInt32LE(n + 1, rt + 8);
        writeGuid(grown, rt + 16 + 32 * n, '0badc0de-1111-4222-8333-444455556666');
        grown.writeBigUInt64LE(BigInt(b.length), rt + 16 + 32 * n + 16);
        grown.writeUInt32LE(MiB, rt + 16 + 32 * n + 24);
        grown.writeUInt32LE(0, rt + 16 + 32 * n + 28);
      });
      return grown;
    });
    add('region table 1 damaged (checksum), table 2 intact', 'any', () => {}, undefined, [rt1]);
    add('both region tables damaged (checksum)', 'fail', () => {}, 'vhdx_corrupt', [...REGION_TABLE_OFFSETS]);
    add('both region tables without a signature', 'fail', (b) => bothTables((rt) => b.write('xxxx', rt, 'latin1')), 'vhdx_corrupt');
    add('duplicate BAT region entry', 'fail', (b) =>
      bothTables((rt) => {
        const n = b.readUInt32LE(rt + 8);
        b.writeUInt32LE(n + 1, rt + 8);
        b.copy(b, rt + 16 + 32 * n, batEntry(rt), batEntry(rt) + 32);
      }),
    );
    // Metadata
    const item = (id: string) => l.metadataOffset + 32 + 32 * l.items.findIndex((x) => x.itemId === id);
    add('metadata item length 0xFFFFFFFF', 'fail', (b) => b.writeUInt32LE(0xffffffff, item(GUIDS.virtualDiskSize) + 20), 'vhdx_corrupt');
    add('metadata item offset 0xFFFFFFFF', 'fail', (b) => b.writeUInt32LE(0xffffffff, item(GUIDS.virtualDiskSize) + 16), 'vhdx_corrupt');
    add('metadata item offset 0 (inside the table)', 'fail', (b) => b.writeUInt32LE(0, item(GUIDS.fileParameters) + 16), 'vhdx_corrupt');
    add('metadata item length 0 (present but empty)', 'fail', (b) => b.writeUInt32LE(0, item(GUIDS.virtualDiskSize) + 20), 'vhdx_corrupt');
    add('metadata item length 1 MiB at the region end', 'fail', (b) => {
      b.writeUInt32LE(MiB, item(GUIDS.logicalSectorSize) + 20);
    }, 'vhdx_corrupt');
    add('metadata items overlap', 'fail', (b) => b.writeUInt32LE(l.items.find((x) => x.itemId === GUIDS.fileParameters)!.offset, item(GUIDS.virtualDiskSize) + 16), 'vhdx_corrupt');
    add('metadata entry count 65535', 'fail', (b) => b.writeUInt16LE(65535, l.metadataOffset + 10), 'vhdx_corrupt');
    add('metadata entry count 2047 (zero entries after the real ones)', 'any', (b) => b.writeUInt16LE(2047, l.metadataOffset + 10));
    add('metadata entry count 0', 'fail', (b) => b.writeUInt16LE(0, l.metadataOffset + 10), 'vhdx_corrupt');
    add('metadata signature gone', 'fail', (b) => b.write('metadatX', l.metadataOffset, 'latin1'), 'vhdx_corrupt');
    add('virtual disk size item missing (id changed)', 'fail', (b) => writeGuid(b, item(GUIDS.virtualDiskSize), '12345678-1234-4234-8234-123456789abc'));
    /** One more metadata table entry, 16 bytes at +128 KiB, with the given flag bits (1 user, 4 required). */
    const extraItem = (b: Buffer, flags: number) => {
      const n = b.readUInt16LE(l.metadataOffset + 10);
      b.writeUInt16LE(n + 1, l.metadataOffset + 10);
      const e = l.metadataOffset + 32 + 32 * n;
      writeGuid(b, e, '0badc0de-aaaa-4bbb-8ccc-dddddddddddd');
      b.writeUInt32LE(0x20000, e + 16);
      b.writeUInt32LE(16, e + 20);
      b.writeUInt32LE(flags, e + 24);
    };
    add('unknown required metadata item', 'fail', (b) => extraItem(b, 4), 'vhdx_unsupported');
    add('unknown required user metadata item', 'fail', (b) => extraItem(b, 5), 'vhdx_unsupported');
    add('unknown optional user metadata item', 'same', (b) => extraItem(b, 1));
    // Headers and the log
    const hdrs = (fn: (h: number) => void) => HEADER_OFFSETS.forEach(fn);
    add('both headers version 2', 'fail', (b) => hdrs((h) => b.writeUInt16LE(2, h + 66)), 'vhdx_corrupt');
    add('both headers without a signature', 'fail', (b) => hdrs((h) => b.write('xxxx', h, 'latin1')), 'vhdx_corrupt');
    add('header 1 damaged (checksum only)', 'same', () => {}, undefined, [HEADER_OFFSETS[0]]);
    add('header 2 damaged (checksum only)', 'same', () => {}, undefined, [HEADER_OFFSETS[1]]);
    add('both headers damaged (checksum only)', 'fail', () => {}, 'vhdx_corrupt', [...HEADER_OFFSETS]);
    add('equal sequence numbers', 'any', (b) => hdrs((h) => b.writeBigUInt64LE(7n, h + 8)));
    add('sequence numbers 2^64-1 and 0', 'any', (b) => {
      b.writeBigUInt64LE((1n << 64n) - 1n, HEADER_OFFSETS[0] + 8);
      b.writeBigUInt64LE(0n, HEADER_OFFSETS[1] + 8);
    });
    add('log version 1 with a log GUID', 'fail', (b) => hdrs((h) => (writeGuid(b, h + 48, '11111111-2222-4333-8444-555555555555'), b.writeUInt16LE(1, h + 64))));
    add('log GUID set, log empty', 'fail', (b) => hdrs((h) => writeGuid(b, h + 48, '11111111-2222-4333-8444-555555555555')), 'vhdx_corrupt');
    add('log length 0 with a log GUID', 'any', (b) => hdrs((h) => (writeGuid(b, h + 48, '11111111-2222-4333-8444-555555555555'), b.writeUInt32LE(0, h + 68))));
    add('log offset beyond EOF', 'fail', (b) => hdrs((h) => b.writeBigUInt64LE(BigInt(Math.ceil(b.length / MiB) * MiB), h + 72)), 'vhdx_corrupt');
    add('log offset 2^63', 'fail', (b) => hdrs((h) => b.writeBigUInt64LE(1n << 63n, h + 72)), 'vhdx_corrupt');
    add('log offset 0 (the header section)', 'fail', (b) => hdrs((h) => b.writeBigUInt64LE(0n, h + 72)), 'vhdx_corrupt');
    add('log length 0xFFF00000', 'fail', (b) => hdrs((h) => b.writeUInt32LE(0xfff00000, h + 68)));
    add('log over the BAT region', 'fail', (b) => hdrs((h) => b.writeBigUInt64LE(BigInt(l.batOffset), h + 72)), 'vhdx_corrupt');
    add('log offset not 1 MiB-aligned', 'fail', (b) => hdrs((h) => b.writeBigUInt64LE(BigInt(MiB + 4096), h + 72)), 'vhdx_corrupt');
    // Truncation
    add('file cut to 1 MiB - 1', 'fail', (b) => b.subarray(0, MiB - 1), 'vhdx_corrupt');
    add('file cut to 64 KiB', 'fail', (b) => b.subarray(0, 64 * 1024), 'vhdx_corrupt');
    add('file cut to 0', 'fail', (b) => b.subarray(0, 0), 'vhdx_corrupt');
    add('file cut after the metadata region', 'fail', (b) => b.subarray(0, l.metadataOffset + MiB));
    add('file cut inside the last payload block', 'fail', (b) => b.subarray(0, b.length - 4096));
    add('not a VHDX (signature)', 'fail', (b) => b.write('vhdxfilf', 0, 'latin1'), 'vhdx_corrupt');

    if (s.name === 'diff') diffCases(s, add);
    if (s.name === 'dirty') {
      const lo = l.current.logOffset;
      const e2 = lo + 2 * LOG_SECTOR;
      const log = (name: string, expect: FuzzCase['expect'], edit: (b: Buffer) => unknown, code?: FuzzCase['code'], flip: number[] = []) => add(`log: ${name}`, expect, edit, code, flip);
      log('FlushedFileOffset beyond the file (truncated)', 'fail', (b) => (b.writeBigUInt64LE(BigInt(Math.ceil(b.length / MiB) * MiB + MiB), lo + 48), b.writeBigUInt64LE(BigInt(Math.ceil(b.length / MiB) * MiB + MiB), e2 + 48)), 'vhdx_corrupt');
      log('LastFileOffset 2^63', 'any', (b) => b.writeBigUInt64LE(1n << 63n, e2 + 56));
      log('LastFileOffset 2^64-1M', 'any', (b) => b.writeBigUInt64LE((1n << 64n) - BigInt(MiB), e2 + 56));
      log('zero descriptor length 2^62', 'any', (b) => b.writeBigUInt64LE(1n << 62n, e2 + 64 + 8));
      log('zero descriptor length 2^64-4096 at 0', 'any', (b) => (b.writeBigUInt64LE((1n << 64n) - 4096n, e2 + 64 + 8), b.writeBigUInt64LE(0n, e2 + 64 + 16)));
      log('zero descriptor over the headers', 'any', (b) => (b.writeBigUInt64LE(BigInt(MiB), e2 + 64 + 8), b.writeBigUInt64LE(0n, e2 + 64 + 16)));
      log('zero descriptor at 2^63', 'any', (b) => b.writeBigUInt64LE(1n << 63n, e2 + 64 + 16));
      log('data descriptor target 2^63', 'any', (b) => b.writeBigUInt64LE(1n << 63n, lo + 64 + 16));
      log('data descriptor target the region table', 'any', (b) => b.writeBigUInt64LE(BigInt(REGION_TABLE_OFFSETS[0]), lo + 64 + 16));
      log('descriptor count 0xFFFFFFFF', 'any', (b) => b.writeUInt32LE(0xffffffff, lo + 24));
      log('descriptor count 126 (one sector)', 'any', (b) => b.writeUInt32LE(126, lo + 24));
      log('entry length 0xFFFFF000', 'any', (b) => b.writeUInt32LE(0xfffff000, lo + 8));
      log('entry length 0', 'any', (b) => b.writeUInt32LE(0, lo + 8));
      log('tail beyond the log', 'any', (b) => (b.writeUInt32LE(0xfffff000, lo + 12), b.writeUInt32LE(0xfffff000, e2 + 12)));
      log('sequence 0', 'any', (b) => b.writeBigUInt64LE(0n, lo + 16));
      log('sequence 2^64-1 then 0', 'any', (b) => (b.writeBigUInt64LE((1n << 64n) - 1n, lo + 16), b.writeBigUInt64LE(0n, e2 + 16)));
      log('log GUID mismatch in every entry', 'fail', (b) => (writeGuid(b, lo + 32, zeroGuid), writeGuid(b, e2 + 32, zeroGuid)), 'vhdx_corrupt');
      log('both entry checksums broken', 'fail', () => {}, 'vhdx_corrupt', [lo, e2]);
      // Entry 2 alone broken: entry 1 still forms a valid sequence (its Tail is itself).
      log('entry 2 checksum broken', 'any', () => {}, undefined, [e2]);
      log('every sector a "loge" header claiming the whole log (scan cost)', 'any', (b) => {
        const len = l.current.logLength;
        const hdr = Buffer.from(b.subarray(lo, lo + 64));
        hdr.writeUInt32LE(len, 8);
        for (let p = 0; p < len; p += LOG_SECTOR) hdr.copy(b, lo + p);
      });
    }
  }
  return out;
}

type AddCase = (name: string, expect: FuzzCase['expect'], edit: (b: Buffer) => unknown, code?: FuzzCase['code'], flip?: number[]) => void;

/** The differencing seed's own limits: its parent locator, its sector bitmap, its parent. */
function diffCases(s: SeedData, add: AddCase): void {
  const l = s.layout;
  const pl = l.itemAt.parentLocator!;
  const plEntry = l.metadataOffset + 32 + 32 * l.items.findIndex((x) => x.itemId === GUIDS.parentLocator);
  const fp = l.itemAt.fileParameters!;
  const sbEntry = l.batOffset + 8 * DIFF_CHUNK_RATIO;
  const bitmap = diffBitmapOffset(s);
  const dwg = identityOf(join(dirnameOf(s), 'seed-dynamic.vhdx')).dataWriteGuid;
  /** Replaces the locator item (it is the last item: room to grow). */
  const locator = (pairs: [string, string][], type?: string) => (b: Buffer) => {
    const item = locatorItem(pairs, type);
    b.fill(0, pl, pl + 4096);
    item.copy(b, pl);
    b.writeUInt32LE(item.length, plEntry + 20);
  };
  const linkage: [string, string] = ['parent_linkage', `{${dwg}}`];
  add('HasParent cleared (partially present blocks in a disk without a parent)', 'fail', (b) => b.writeUInt32LE(0, fp + 4), 'vhdx_corrupt');
  add('locator: parent_linkage of another disk', 'fail', locator([['parent_linkage', '{0badc0de-0000-4000-8000-000000000000}'], ['relative_path', '.\\seed-dynamic.vhdx']]), 'vhdx_parent_invalid');
  add('locator: parent_linkage2 matches instead', 'same', locator([['parent_linkage', '{0badc0de-0000-4000-8000-000000000000}'], ['relative_path', '.\\seed-dynamic.vhdx'], ['parent_linkage2', `{${dwg.toUpperCase()}}`]]));
  add('locator: relative path names the case file itself (a cycle)', 'fail', locator([linkage, ['relative_path', '.\\case.vhdx']]), 'vhdx_parent_invalid');
  add('locator: the parent\'s folder as the path', 'fail', locator([linkage, ['relative_path', '.\\'], ['absolute_win32_path', dirnameOf(s)]]), 'vhdx_parent_invalid');
  add('locator: /dev/zero as the parent', 'fail', locator([linkage, ['absolute_win32_path', '/dev/zero']]), 'vhdx_parent_invalid');
  add('locator: only Windows paths', 'fail', locator([linkage, ['absolute_win32_path', 'C:\\seeds\\seed-dynamic.vhdx'], ['volume_path', '\\\\?\\Volume{00000000-0000-0000-0000-000000000000}\\x.vhdx']]), 'vhdx_parent_invalid');
  add('locator: a NUL in the relative path, the absolute one right', 'same', locator([linkage, ['relative_path', '.\\seed\0.vhdx'], ['absolute_win32_path', join(dirnameOf(s), 'seed-dynamic.vhdx')]]));
  add('locator: 8 values of 60 KB and no path', 'fail', locator([linkage, ...Array.from({ length: 8 }, (_, i): [string, string] => [`k${i}`, 'x'.repeat(30000)])]));
  add('locator: type unknown', 'fail', locator([linkage, ['relative_path', '.\\seed-dynamic.vhdx']], '0badc0de-1111-4222-8333-444455556666'), 'vhdx_unsupported');
  add('locator: no parent_linkage', 'fail', locator([['relative_path', '.\\seed-dynamic.vhdx']]), 'vhdx_corrupt');
  add('locator: a key twice', 'fail', locator([linkage, linkage, ['relative_path', '.\\seed-dynamic.vhdx']]), 'vhdx_corrupt');
  add('locator: count 65535', 'fail', (b) => b.writeUInt16LE(0xffff, pl + 18), 'vhdx_corrupt');
  add('locator: count 0', 'fail', (b) => b.writeUInt16LE(0, pl + 18), 'vhdx_corrupt');
  add('locator: value offset 2^32-1', 'fail', (b) => b.writeUInt32LE(0xffffffff, pl + 24), 'vhdx_corrupt');
  add('locator: key length 65535', 'fail', (b) => b.writeUInt16LE(0xffff, pl + 28), 'vhdx_corrupt');
  add('locator: item length 0', 'fail', (b) => b.writeUInt32LE(0, plEntry + 20), 'vhdx_corrupt');
  add('locator: item length 19', 'fail', (b) => b.writeUInt32LE(19, plEntry + 20), 'vhdx_corrupt');
  add('locator item id changed (required, unknown)', 'fail', (b) => writeGuid(b, plEntry, '0badc0de-2222-4333-8444-555555555555'), 'vhdx_unsupported');
  add('sector bitmap entry NOT_PRESENT (partial blocks remain)', 'fail', (b) => b.writeBigUInt64LE(b.readBigUInt64LE(sbEntry) & ~7n, sbEntry), 'vhdx_corrupt');
  add('sector bitmap entry state 7', 'fail', (b) => b.writeBigUInt64LE(b.readBigUInt64LE(sbEntry) | 7n, sbEntry), 'vhdx_corrupt');
  add('sector bitmap beyond EOF', 'fail', (b) => b.writeBigUInt64LE((BigInt(Math.ceil(b.length / MiB) + 1) << 20n) | 6n, sbEntry), 'vhdx_corrupt');
  add('sector bitmap offset 2^44-1 MiB', 'fail', (b) => b.writeBigUInt64LE(((1n << 44n) - 1n) << 20n | 6n, sbEntry), 'vhdx_corrupt');
  add('sector bitmap on payload block 0', 'fail', (b) => b.writeBigUInt64LE((b.readBigUInt64LE(l.batOffset) & ~7n) | 6n, sbEntry), 'vhdx_corrupt');
  add('sector bitmap on the metadata region', 'fail', (b) => b.writeBigUInt64LE((BigInt(l.metadataOffset / MiB) << 20n) | 6n, sbEntry), 'vhdx_corrupt');
  add('sector bitmap all ones (junk sectors become data)', 'any', (b) => b.fill(0xff, bitmap, bitmap + MiB));
  add('sector bitmap all zeros (partial blocks read the parent)', 'any', (b) => b.fill(0, bitmap, bitmap + MiB));
  add('sector bitmap bits of full, zero and absent blocks set (never consulted)', 'same', (b) => {
    for (const block of [0, 2, 3, 5, 6]) b.fill(0xff, bitmap + block * 256, bitmap + (block + 1) * 256);
  });
  add('sector bitmap of a second chunk present though the disk has one', 'any', (b) => b.writeBigUInt64LE((BigInt(Math.ceil(b.length / MiB)) << 20n) | 6n, l.batOffset + 8 * (2 * DIFF_CHUNK_RATIO + 1)));
  add('virtual size 16 MiB (twice the parent\'s: zeros past its end)', 'any', (b) => b.writeBigUInt64LE(BigInt(16 * MiB), l.itemAt.virtualDiskSize!));
  add('virtual disk id changed (not an identity check)', 'same', (b) => writeGuid(b, l.itemAt.virtualDiskId!, '0badc0de-3333-4444-8555-666666666666'));
  add('a second differencing level: the seed names itself as its parent via its DataWriteGuid', 'fail', (b) => {
    for (const h of HEADER_OFFSETS) writeGuid(b, h + 32, dwg);
    locator([linkage, ['relative_path', '.\\case.vhdx'], ['absolute_win32_path', join(dirnameOf(s), 'case.vhdx')]])(b);
  }, 'vhdx_parent_invalid');
}

/** The folder of the seeds (and of the case files). */
function dirnameOf(s: SeedData): string {
  return s.file.slice(0, s.file.lastIndexOf('/'));
}

/**
 * A log that makes a naive active-sequence scan quadratic: a 64 MiB log (the largest a read-only
 * open replays in memory) after the file's end, whose every 4 KiB sector starts a plausible
 * entry header claiming the whole log, with a wrong checksum. A scan that checksums each
 * candidate does 16384 × 64 MiB of CRC work.
 */
export function logScanBomb(s: SeedData, logLength = 64 * MiB): FuzzCase {
  const l = s.layout;
  const lo = Math.ceil(s.bytes.length / MiB) * MiB;
  const b = Buffer.alloc(lo + logLength);
  s.bytes.copy(b);
  const logGuid = '0b0b0b0b-1111-4222-8333-444455556666';
  const hdr = Buffer.alloc(64);
  hdr.write('loge', 0, 'latin1');
  hdr.writeUInt32LE(logLength, 8);
  hdr.writeUInt32LE(0, 12);
  hdr.writeBigUInt64LE(1n, 16);
  hdr.writeUInt32LE(0, 24);
  writeGuid(hdr, 32, logGuid);
  hdr.writeBigUInt64LE(BigInt(lo), 48);
  hdr.writeBigUInt64LE(BigInt(lo), 56);
  for (let p = 0; p < logLength; p += LOG_SECTOR) hdr.copy(b, lo + p);
  for (const h of HEADER_OFFSETS) {
    writeGuid(b, h + 48, logGuid);
    b.writeUInt32LE(logLength, h + 68);
    b.writeBigUInt64LE(BigInt(lo), h + 72);
    fixChecksum(b, h, HEADER_SIZE);
  }
  void l;
  return { name: `${s.name}: log scan bomb (${logLength / MiB} MiB log, a plausible bad entry in every sector)`, bytes: b, seed: s, expect: 'fail', code: 'vhdx_corrupt' };
}

/**
 * Huge but cheap (sparse) files: a valid 64 TiB disk with 1 MiB blocks (a 513 MiB BAT of holes),
 * and a 2 GiB metadata region holding 2047 optional 1 MiB items nobody needs to read. Open must
 * stay fast and memory flat whatever the sizes say.
 */
export function sparseCases(seeds: SeedData[]): (() => FuzzCase)[] {
  const s = seeds.find((x) => x.name === 'dynamic')!;
  const l = s.layout;
  const entry = (guid: string) => 16 + 32 * l.regions.findIndex((x) => x.guid === guid);
  return [
    () => {
      const b = Buffer.from(s.bytes);
      b.writeBigUInt64LE(64n << 40n, l.itemAt.virtualDiskSize!);
      const batAt = Math.ceil(b.length / MiB) * MiB;
      for (const rt of REGION_TABLE_OFFSETS) {
        b.writeBigUInt64LE(BigInt(batAt), rt + entry(GUIDS.bat) + 16);
        b.writeUInt32LE(513 * MiB, rt + entry(GUIDS.bat) + 24);
      }
      fixAllChecksums(b);
      return { name: 'dynamic: 64 TiB, 1 MiB blocks, 513 MiB BAT (sparse file): open must not scan 64M entries', bytes: b, seed: s, expect: 'any', sparse: { size: batAt + 513 * MiB, parts: [] } };
    },
    () => {
      const b = Buffer.from(s.bytes);
      const mdAt = Math.ceil(b.length / MiB) * MiB;
      const first = Buffer.from(s.bytes.subarray(l.metadataOffset, l.metadataOffset + MiB));
      const count = 2047;
      for (let i = first.readUInt16LE(10); i < count; i++) {
        const e = 32 + 32 * i;
        writeGuid(first, e, `${(0x20000000 + i).toString(16)}-0000-4000-8000-000000000000`);
        first.writeUInt32LE((i + 1) * MiB, e + 16);
        first.writeUInt32LE(MiB, e + 20);
        first.writeUInt32LE(0, e + 24); // optional, not user: unknown, so nothing to read
      }
      first.writeUInt16LE(count, 10);
      const regionLength = (count + 2) * MiB;
      for (const rt of REGION_TABLE_OFFSETS) {
        b.writeBigUInt64LE(BigInt(mdAt), rt + entry(GUIDS.metadata) + 16);
        b.writeUInt32LE(regionLength, rt + entry(GUIDS.metadata) + 24);
      }
      fixAllChecksums(b);
      return { name: 'dynamic: 2047 optional 1 MiB metadata items (2 GiB sparse region): must not all be read into memory', bytes: b, seed: s, expect: 'same', sparse: { size: mdAt + regionLength, parts: [[mdAt, first]] } };
    },
  ];
}

// ---- Running one case -------------------------------------------------------------------------

export type Outcome = { ok: true; same: boolean | null } | { ok: false; code: string; message: string };

export class UntypedFailure extends Error {}

function typed(err: unknown, where: string): { ok: false; code: string; message: string } {
  if (err instanceof ShieldError && (ALLOWED_CODES as readonly string[]).includes(err.code)) return { ok: false, code: err.code, message: err.message };
  const detail = err instanceof Error ? `${err.name}: ${err.message}${err instanceof ShieldError ? ` [${err.code}]` : ''}\n${err.stack?.split('\n').slice(1, 6).join('\n') ?? ''}` : String(err);
  throw new UntypedFailure(`${where}: ${detail}`);
}

/**
 * open + info + a few reads (+ reads outside the disk, which must be invalid_argument). With
 * `expectRaw`, a successful open reads the whole disk and says whether it matches.
 */
export async function runCase(path: string, expectRaw: Buffer | null): Promise<Outcome> {
  let disk: Awaited<ReturnType<typeof openVhdx>>;
  try {
    disk = await openVhdx(path);
  } catch (err) {
    return typed(err, 'openVhdx');
  }
  let step = 'info';
  try {
    const info = disk.info;
    JSON.stringify(info);
    const size = info.metadata.virtualSize;
    if (!Number.isSafeInteger(size) || size < 0) throw new UntypedFailure(`info.metadata.virtualSize is ${size}`);
    if (!Number.isSafeInteger(info.fileSize)) throw new UntypedFailure(`info.fileSize is ${info.fileSize}`);
    const reads: [number, number][] = [];
    if (size > 0) {
      reads.push([0, Math.min(size, 4096)], [Math.max(0, size - 4096), Math.min(size, 4096)], [Math.floor(size / 2), Math.min(size - Math.floor(size / 2), MiB + 512)]);
    }
    let same: boolean | null = null;
    if (expectRaw && size === expectRaw.length && size <= 64 * MiB) {
      const got: Buffer[] = [];
      for (let off = 0; off < size; off += 4 * MiB) got.push(await disk.read(off, Math.min(4 * MiB, size - off)));
      same = Buffer.concat(got).equals(expectRaw);
    } else {
      for (const [off, len] of reads) {
        step = `read(${off}, ${len})`;
        const buf = await disk.read(off, len);
        if (!Buffer.isBuffer(buf) || buf.length !== len) throw new UntypedFailure(`${step} returned ${buf?.length} bytes`);
      }
    }
    for (const [off, len] of [
      [size, 1],
      [-1, 1],
      [0, size + 1],
    ] as const) {
      step = `read(${off}, ${len}) outside the disk`;
      try {
        await disk.read(off, len);
        throw new UntypedFailure(`${step} succeeded`);
      } catch (err) {
        if (err instanceof UntypedFailure) throw err;
        if (!(err instanceof ShieldError) || err.code !== 'invalid_argument') throw new UntypedFailure(`${step}: ${String(err)} (want invalid_argument)`);
      }
    }
    step = 'read-write';
    await writePhase(path, size);
    return { ok: true, same };
  } catch (err) {
    if (err instanceof UntypedFailure) throw err;
    return typed(err, step);
  } finally {
    try {
      await disk.close();
    } catch (err) {
      // eslint-disable-next-line no-unsafe-finally
      throw new UntypedFailure(`close: ${String(err)}`);
    }
  }
}

/**
 * On a copy of a file the reader accepted: a read-write open (replaying any log on disk), writes
 * at both ends and the middle, a zeroed block, flush and close. Typed refusals are fine; after a
 * success the file must open again, read back exactly what was written, and keep its identifier.
 */
async function writePhase(path: string, size: number): Promise<void> {
  // Copying sparse giants would only time the copy.
  if (size < 64 * 1024 || size > 1024 * 1024 * MiB || statSync(path).size > 64 * MiB) return;
  const copy = `${path}.rw`;
  copyFileSync(path, copy);
  try {
    const ident = Buffer.alloc(64 * 1024);
    readFd(copy, ident);
    const spots = [0, Math.floor(size / 2 / 4096) * 4096, size - 4096];
    const data = spots.map((at, i) => Buffer.alloc(4096, 0x41 + i));
    let w: VhdxWritable;
    try {
      w = await openVhdx(copy, { readOnly: false });
    } catch (err) {
      typed(err, 'openVhdx read-write');
      return;
    }
    try {
      for (const [i, at] of spots.entries()) await w.write(at, data[i]!);
      await w.writeZeroes(0, Math.min(size, w.info.metadata.blockSize));
      for (const [i, at] of spots.entries()) if (at >= Math.min(size, w.info.metadata.blockSize)) await w.write(at, data[i]!);
      await w.flush();
    } catch (err) {
      typed(err, 'write');
      return;
    } finally {
      try {
        await w.close();
      } catch (err) {
        typed(err, 'close after writing');
      }
    }
    const again = Buffer.alloc(64 * 1024);
    readFd(copy, again);
    if (!again.equals(ident)) throw new UntypedFailure('writing changed the file type identifier (first 64 KiB)');
    let r: Awaited<ReturnType<typeof openVhdx>>;
    try {
      r = await openVhdx(copy);
    } catch (err) {
      throw new UntypedFailure(`the file we wrote no longer opens: ${String(err)}`);
    }
    try {
      const zeroEnd = Math.min(size, r.info.metadata.blockSize);
      for (const [i, at] of spots.entries()) {
        const got = await r.read(at, 4096);
        const want = at < zeroEnd ? Buffer.alloc(4096) : data[i]!;
        if (!got.equals(want)) throw new UntypedFailure(`after writing, read(${at}) differs from what was written`);
      }
    } finally {
      await r.close();
    }
  } finally {
    rmSync(copy, { force: true });
  }
}

function readFd(path: string, into: Buffer): void {
  const fd = openSync(path, 'r');
  try {
    readSync(fd, into, 0, into.length, 0);
  } finally {
    closeSync(fd);
  }
}

/** Judges an outcome against the case's expectation; null when fine, else what is wrong. */
export function judge(c: FuzzCase, o: Outcome): string | null {
  if (c.expect === 'same') {
    if (!o.ok) return `should open and read like the original, got ${o.code}: ${o.message}`;
    if (o.same === false) return 'opened, but the bytes differ from the original';
  }
  if (c.expect === 'fail' && o.ok) return 'should be refused, but opened and read';
  if (c.expect === 'fail' && !o.ok && c.code && o.code !== c.code) return `should be ${c.code}, got ${o.code}: ${o.message}`;
  return null;
}

// ---- The worker-thread runner -----------------------------------------------------------------

export interface FuzzRun {
  seeds: Seed[];
  dir: string;
  seed: number;
  /** Random cases; targeted ones run too unless `targeted` is false. */
  rounds: number;
  /** Stop random cases after this many ms (the bench's time budget). */
  seconds?: number;
  targeted?: boolean;
  /** Extra expensive cases (the log scan bomb). */
  heavy?: boolean;
  /** Per-case limit; a case that takes longer is a hang. */
  caseTimeoutMs?: number;
}

export interface FuzzFailure {
  name: string;
  problem: string;
  /** The mutated image, kept for a repro (inside `dir`). */
  file: string;
}

export interface FuzzReport {
  cases: number;
  targeted: number;
  elapsedMs: number;
  outcomes: Record<string, number>;
  failures: FuzzFailure[];
  rssStartMb: number;
  rssPeakMb: number;
  /** The slowest cases and the ones after which RSS was highest. */
  slowest: { name: string; ms: number }[];
  hungriest: { name: string; rssMb: number }[];
}

/**
 * Runs the cases in a worker thread. A case that blocks the worker past the limit (a synchronous
 * loop, which no timer inside the worker can interrupt) or kills it (out of memory) is recorded,
 * the worker is replaced and the run goes on with the next case.
 */
export async function runFuzz(run: FuzzRun, onProgress?: (done: number) => void): Promise<FuzzReport> {
  const timeout = run.caseTimeoutMs ?? 2000;
  // Baseline: after the first case, when the worker has loaded its seeds (harness memory).
  let rssStart = 0;
  let rssPeak = 0;
  const started = Date.now();
  const deadline = run.seconds === undefined ? null : started + run.seconds * 1000;
  const failures: FuzzFailure[] = [];
  const outcomes: Record<string, number> = {};
  const slowest: { name: string; ms: number }[] = [];
  const hungriest: { name: string; rssMb: number }[] = [];
  const top = <T,>(list: T[], item: T, key: (x: T) => number) => {
    list.push(item);
    list.sort((a, b) => key(b) - key(a));
    list.length = Math.min(list.length, 5);
  };
  let cases = 0;
  let targeted = 0;
  let next = 0;
  for (;;) {
    const ended = await new Promise<boolean>((resolve) => {
      const worker = new Worker(new URL('./vhdx-fuzz-worker.ts', import.meta.url), {
        workerData: { ...run, startAt: next, deadline } satisfies WorkerInput,
        resourceLimits: { maxOldGenerationSizeMb: 512 },
      });
      let current: { index: number; name: string; file: string; since: number } | null = null;
      let done = false;
      const lost = (problem: string) => {
        if (!current) return;
        failures.push({ name: current.name, problem, file: current.file });
        outcomes.hang = (outcomes.hang ?? 0) + 1;
        cases++;
        next = current.index + 1;
        current = null;
      };
      const sample = setInterval(() => {
        rssPeak = Math.max(rssPeak, process.memoryUsage().rss);
        if (current && Date.now() - current.since > timeout + 3000) {
          // Keep the image: the next worker overwrites the case file.
          const kept = join(run.dir, `failure-${current.index}.vhdx`);
          copyFileSync(current.file, kept);
          current.file = kept;
          lost(`hang: no result after ${Date.now() - current.since} ms (the worker was blocked)`);
          void worker.terminate();
        }
      }, 50);
      worker.on('message', (m: WorkerMessage) => {
        if (m.type === 'start') current = { index: m.index, name: m.name, file: m.file, since: Date.now() };
        else if (m.type === 'done') {
          current = null;
          next = m.index + 1;
          cases++;
          outcomes[m.outcome] = (outcomes[m.outcome] ?? 0) + 1;
          if (rssStart === 0) rssStart = Math.max(m.rss, process.memoryUsage().rss);
          rssPeak = Math.max(rssPeak, m.rss, process.memoryUsage().rss);
          top(slowest, { name: m.name, ms: Math.round(m.ms) }, (x) => x.ms);
          top(hungriest, { name: m.name, rssMb: Math.round(Math.max(m.rss, process.memoryUsage().rss) / MiB) }, (x) => x.rssMb);
          if (m.failure) failures.push(m.failure);
          onProgress?.(cases);
        } else {
          targeted = m.targeted;
          done = true;
        }
      });
      worker.on('error', (err) => {
        if (current) lost(`the worker died: ${err.message}`);
        else failures.push({ name: `(harness, next case ${next})`, problem: String(err.stack ?? err), file: '' });
      });
      worker.on('exit', () => {
        clearInterval(sample);
        resolve(done);
      });
    });
    if (ended || failures.some((f) => f.name.startsWith('(harness'))) break;
  }
  const mb = (x: number) => Math.round(x / MiB);
  return { cases, targeted, elapsedMs: Date.now() - started, outcomes, failures, rssStartMb: mb(rssStart), rssPeakMb: mb(rssPeak), slowest, hungriest };
}

export interface WorkerInput extends FuzzRun {
  /** Index of the first case to run: targeted cases first, then random ones. */
  startAt: number;
  deadline: number | null;
}

export type WorkerMessage =
  | { type: 'start'; index: number; name: string; file: string }
  | { type: 'done'; index: number; name: string; ms: number; rss: number; outcome: string; failure?: FuzzFailure }
  | { type: 'end'; targeted: number };
