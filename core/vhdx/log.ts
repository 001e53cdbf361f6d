// The VHDX log (MS-VHDX §2.3): finding the active sequence and turning it into the writes that
// replay it. Used to replay on a read-write open, and in memory on a read-only open (the file is
// never touched, §2.3.3 footnote 5) — where QEMU refuses.
import { crc32c } from './crc32c.ts';
import { readGuid, writeGuid } from './guid.ts';
import { corrupt, MiB } from './structures.ts';

const SECTOR = 4096;
const ENTRY_HEADER = 64;

/** One replayed write: 4 KiB of data, or zeros over a range. */
export interface LogWrite {
  fileOffset: number;
  length: number;
  data: Buffer | null;
}

export interface LogReplay {
  writes: LogWrite[];
  /** The file must be at least this long before replaying (else it was truncated). */
  flushedFileOffset: number;
  /** After replaying, the file is at least this long. */
  lastFileOffset: number;
  entries: number;
  headSequence: bigint;
}

interface Entry {
  position: number;
  length: number;
  tail: number;
  sequence: bigint;
  flushedFileOffset: number;
  lastFileOffset: number;
  writes: LogWrite[];
}

/** Bytes of the circular log starting at `position`, wrapping at the end. */
function circular(log: Buffer, position: number, length: number): Buffer {
  if (position + length <= log.length) return log.subarray(position, position + length);
  const first = log.subarray(position);
  return Buffer.concat([first, log.subarray(0, length - first.length)]);
}

/** Parses one entry at `position`; null when it is not a valid entry of this log. */
function parseEntry(log: Buffer, position: number, logGuid: string, budget: { bytes: number }): Entry | null {
  const head = circular(log, position, ENTRY_HEADER);
  if (head.toString('latin1', 0, 4) !== 'loge') return null;
  const length = head.readUInt32LE(8);
  const tail = head.readUInt32LE(12);
  const sequence = head.readBigUInt64LE(16);
  const descriptorCount = head.readUInt32LE(24);
  if (length === 0 || length % SECTOR !== 0 || length > log.length || tail % SECTOR !== 0 || tail >= log.length || sequence === 0n) return null;
  if (readGuid(head, 32) !== logGuid) return null;
  const flushedFileOffset = Number(head.readBigUInt64LE(48));
  const lastFileOffset = Number(head.readBigUInt64LE(56));
  if (flushedFileOffset % MiB !== 0 || lastFileOffset % MiB !== 0) return null;
  const descriptorSectors = Math.ceil((descriptorCount + 2) / 128);
  if (descriptorSectors * SECTOR > length) return null;
  const entry = circular(log, position, length);
  // Structure first (cheap), checksum last: a log full of plausible headers must not cost a CRC each.
  const writes = parseDescriptors(entry, descriptorCount, descriptorSectors, sequence);
  if (writes === null) return null;
  budget.bytes -= length;
  if (budget.bytes < 0) throw corrupt('the log is full of near-valid entries (gave up scanning it)');
  const zeroField = Buffer.alloc(4);
  if (crc32c(entry.subarray(8), crc32c(zeroField, crc32c(entry.subarray(0, 4)))) !== head.readUInt32LE(4)) return null;
  return { position, length, tail, sequence, flushedFileOffset, lastFileOffset, writes };
}

function parseDescriptors(entry: Buffer, descriptorCount: number, descriptorSectors: number, sequence: bigint): LogWrite[] | null {
  const length = entry.length;
  let dataSectors = 0;

  const writes: LogWrite[] = [];
  for (let i = 0; i < descriptorCount; i++) {
    const at = ENTRY_HEADER + i * 32;
    const d = entry.subarray(at, at + 32);
    const kind = d.toString('latin1', 0, 4);
    if (d.readBigUInt64LE(24) !== sequence) return null;
    if (kind === 'zero') {
      const zeroLength = Number(d.readBigUInt64LE(8));
      const fileOffset = Number(d.readBigUInt64LE(16));
      if (zeroLength % SECTOR !== 0 || fileOffset % SECTOR !== 0) return null;
      writes.push({ fileOffset, length: zeroLength, data: null });
    } else if (kind === 'desc') {
      const trailing = d.subarray(4, 8);
      const leading = d.subarray(8, 16);
      const fileOffset = Number(d.readBigUInt64LE(16));
      if (fileOffset % SECTOR !== 0) return null;
      const sectorAt = (descriptorSectors + dataSectors) * SECTOR;
      dataSectors++;
      if (sectorAt + SECTOR > length) return null;
      const sector = entry.subarray(sectorAt, sectorAt + SECTOR);
      if (sector.toString('latin1', 0, 4) !== 'data') return null;
      const seq = (BigInt(sector.readUInt32LE(4)) << 32n) | BigInt(sector.readUInt32LE(4092));
      if (seq !== sequence) return null;
      // Target bytes 0–7 and 4092–4095 travel in the descriptor; 8–4091 in the data sector.
      writes.push({ fileOffset, length: SECTOR, data: Buffer.concat([leading, sector.subarray(8, 4092), trailing]) });
    } else {
      return null;
    }
  }
  if ((descriptorSectors + dataSectors) * SECTOR > length) return null;
  return writes;
}

/**
 * Finds the active sequence (§2.3.3): of all runs of valid entries with consecutive sequence
 * numbers whose head's Tail lies inside the run, the one with the greatest head sequence number.
 */
export function findLogReplay(log: Buffer, logGuid: string): LogReplay {
  if (log.length === 0 || log.length % SECTOR !== 0) throw corrupt('the log length is not a multiple of 4 KiB');
  const parsed = new Map<number, Entry | null>();
  // Checksumming is bounded: a few passes over the log, whatever its content.
  const budget = { bytes: 8 * log.length };
  const entryAt = (p: number) => {
    if (!parsed.has(p)) parsed.set(p, parseEntry(log, p, logGuid, budget));
    return parsed.get(p)!;
  };
  const walked = new Set<number>();
  let best: Entry[] | null = null;
  for (let start = 0; start < log.length; start += SECTOR) {
    if (walked.has(start)) continue; // already inside a run found from an earlier start
    const first = entryAt(start);
    if (!first) continue;
    const run: Entry[] = [first];
    walked.add(start);
    for (;;) {
      const last = run[run.length - 1]!;
      const nextPos = (last.position + last.length) % log.length;
      if (walked.has(nextPos) && nextPos === start) break; // wrapped around onto itself
      const next = entryAt(nextPos);
      if (!next || next.sequence !== last.sequence + 1n) break;
      run.push(next);
      walked.add(nextPos);
      if (run.length > log.length / SECTOR) break;
    }
    const head = run[run.length - 1]!;
    const tailIndex = run.findIndex((e) => e.position === head.tail);
    if (tailIndex < 0) continue;
    if (!best || head.sequence > best[best.length - 1]!.sequence) best = run.slice(tailIndex);
  }
  if (!best) throw corrupt('the log is marked as holding updates, but no valid log sequence was found');
  const head = best[best.length - 1]!;
  return {
    writes: best.flatMap((e) => e.writes),
    flushedFileOffset: head.flushedFileOffset,
    lastFileOffset: head.lastFileOffset,
    entries: best.length,
    headSequence: head.sequence,
  };
}

/** Applies replayed writes to a buffer that holds the file's bytes at `offset`. */
export function overlay(buf: Buffer, offset: number, writes: readonly LogWrite[]): void {
  const end = offset + buf.length;
  for (const w of writes) {
    const from = Math.max(offset, w.fileOffset);
    const to = Math.min(end, w.fileOffset + w.length);
    if (from >= to) continue;
    if (w.data) w.data.copy(buf, from - offset, from - w.fileOffset, to - w.fileOffset);
    else buf.fill(0, from - offset, to - offset);
  }
}

/** One 4 KiB sector of new file content, as a log entry carries it. */
export interface LogSector {
  fileOffset: number;
  data: Buffer;
}

export interface LogEntryInput {
  sequence: bigint;
  /** Log offset of the first entry of the sequence this entry ends (itself, for a lone entry). */
  tail: number;
  logGuid: string;
  flushedFileOffset: number;
  lastFileOffset: number;
  sectors: readonly LogSector[];
}

/** Bytes of a log entry holding `n` data sectors: descriptor sectors (64-byte header + 32 per descriptor) then data. */
export function logEntryLength(n: number): number {
  return (Math.ceil((n + 2) / 128) + n) * SECTOR;
}

/** Builds one log entry (§2.3.1): header, one data descriptor and one data sector per 4 KiB written. */
export function buildLogEntry(e: LogEntryInput): Buffer {
  const n = e.sectors.length;
  const descriptorSectors = Math.ceil((n + 2) / 128);
  const entry = Buffer.alloc(logEntryLength(n));
  entry.write('loge', 0, 'latin1');
  entry.writeUInt32LE(entry.length, 8);
  entry.writeUInt32LE(e.tail, 12);
  entry.writeBigUInt64LE(e.sequence, 16);
  entry.writeUInt32LE(n, 24);
  writeGuid(e.logGuid, entry, 32);
  entry.writeBigUInt64LE(BigInt(e.flushedFileOffset), 48);
  entry.writeBigUInt64LE(BigInt(e.lastFileOffset), 56);
  const seqHigh = Number(e.sequence >> 32n);
  const seqLow = Number(e.sequence & 0xffffffffn);
  e.sectors.forEach((s, i) => {
    if (s.data.length !== SECTOR || s.fileOffset % SECTOR !== 0) throw new Error('log sectors are whole, aligned 4 KiB sectors');
    const d = ENTRY_HEADER + i * 32;
    entry.write('desc', d, 'latin1');
    s.data.copy(entry, d + 4, 4092, 4096); // TrailingBytes
    s.data.copy(entry, d + 8, 0, 8); // LeadingBytes
    entry.writeBigUInt64LE(BigInt(s.fileOffset), d + 16);
    entry.writeBigUInt64LE(e.sequence, d + 24);
    const at = (descriptorSectors + i) * SECTOR;
    entry.write('data', at, 'latin1');
    entry.writeUInt32LE(seqHigh, at + 4);
    s.data.copy(entry, at + 8, 8, 4092);
    entry.writeUInt32LE(seqLow, at + 4092);
  });
  entry.writeUInt32LE(crc32c(entry), 4);
  return entry;
}
