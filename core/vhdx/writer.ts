// Writing fixed and dynamic VHDX files in place. Payload data is written directly; every change
// to the BAT, the metadata region or the region tables goes through the log (MS-VHDX §2.3):
// entry written → flush → applied in place → flushed before the next entry. A crash at any point
// leaves a file that replays to a consistent state (we, QEMU and Hyper-V replay on open).
//
// Like a disk's write cache, block allocations are committed to the BAT at flush() (and close());
// data written before a flush survives a crash, later data may not — the NBD and virtio contract.
import { randomUUID } from 'node:crypto';
import { open, type FileHandle } from 'node:fs/promises';
import { ShieldError } from '../errors.ts';
import { crc32c } from './crc32c.ts';
import { asShieldError, writeAll, writeBatEntry } from './create.ts';
import { NULL_GUID, readGuid, writeGuid } from './guid.ts';
import { buildLogEntry, findLogReplay, logEntryLength, type LogReplay, type LogSector } from './log.ts';
import { VhdxImage, type OpenOptions, type Source } from './reader.ts';
import {
  HEADER_OFFSETS,
  HEADER_SECTION,
  HEADER_SIZE,
  METADATA_ITEM,
  METADATA_TABLE_SIZE,
  MiB,
  PAYLOAD_STATE,
  REGION,
  REGION_TABLE_OFFSETS,
  REGION_TABLE_SIZE,
  batGeometry,
  batIndexOfBlock,
  corrupt,
  currentHeader,
  parseHeader,
  parseMetadataTable,
  parseRegionTable,
  unsupported,
  type BatEntry,
  type Header,
} from './structures.ts';

const SECTOR = 4096;
/** Never written through the log: the file identifier and the two headers (§2.2, §2.3). */
const LOG_FLOOR = 192 * 1024;
const ZEROS = Buffer.alloc(MiB);

/** What a read-write open found and did before serving the disk. */
export interface ReplayReport {
  entries: number;
  writes: number;
}

/** Writes `length` zero bytes at `position`, a MiB at a time. */
async function writeZeroBytes(fh: FileHandle, position: number, length: number): Promise<void> {
  for (let done = 0; done < length; done += ZEROS.length) await writeAll(fh, ZEROS.subarray(0, Math.min(ZEROS.length, length - done)), position + done);
}

const roundUp = (n: number, to: number) => Math.ceil(n / to) * to;

/**
 * Writes a new current header (§2.2.2.1): the other slot gets sequence+1 and is flushed, then the
 * first slot gets sequence+2 and is flushed, so both copies stay valid and agree. Fields not
 * named in `change` (including reserved bytes) are kept as they were.
 */
export async function updateHeaders(fh: FileHandle, section: Buffer, current: Header, change: { fileWriteGuid?: string; dataWriteGuid?: string; logGuid?: string }): Promise<Header> {
  const slotAt = (slot: 1 | 2) => (slot === 1 ? HEADER_OFFSETS[0] : HEADER_OFFSETS[1]);
  const base = Buffer.from(section.subarray(slotAt(current.slot), slotAt(current.slot) + HEADER_SIZE));
  if (current.sequenceNumber >= 0xffffffffffffffffn - 1n) throw unsupported('the header sequence number is exhausted (2^64 − 1); the file cannot be updated');
  let h: Header = { ...current, ...change };
  for (const slot of [current.slot === 1 ? 2 : 1, current.slot] as const) {
    const buf = Buffer.from(base);
    h = { ...h, slot, sequenceNumber: h.sequenceNumber + 1n };
    buf.writeBigUInt64LE(h.sequenceNumber, 8);
    writeGuid(h.fileWriteGuid, buf, 16);
    writeGuid(h.dataWriteGuid, buf, 32);
    writeGuid(h.logGuid, buf, 48);
    buf.writeUInt32LE(0, 4);
    buf.writeUInt32LE(crc32c(buf), 4);
    await writeAll(fh, buf, slotAt(slot));
    buf.copy(section, slotAt(slot));
    await fh.datasync();
  }
  return h;
}

/**
 * Replays the log on disk (§2.3.3): every write of the active sequence, the file extended to the
 * head's LastFileOffset, flushed; then the log is marked empty in a new header.
 */
async function replayOnDisk(fh: FileHandle, section: Buffer, header: Header, fileSize: number): Promise<{ header: Header; replay: LogReplay }> {
  const log = Buffer.alloc(header.logLength);
  const { bytesRead } = await fh.read(log, 0, log.length, header.logOffset);
  if (bytesRead !== log.length) throw corrupt('the log is cut short');
  const replay = findLogReplay(log, header.logGuid);
  if (fileSize < replay.flushedFileOffset) throw corrupt(`the file is shorter (${fileSize}) than its log says it was (${replay.flushedFileOffset}): truncated`);
  if (!Number.isSafeInteger(replay.lastFileOffset) || replay.lastFileOffset > fileSize + 64 * 1024 * 1024 * MiB) {
    throw corrupt(`the log claims the file ends at ${replay.lastFileOffset}, far beyond its ${fileSize} bytes`);
  }
  for (const w of replay.writes) {
    if (w.fileOffset < LOG_FLOOR) throw corrupt(`the log writes into the file identifier or headers (at ${w.fileOffset})`);
    if (w.fileOffset < header.logOffset + header.logLength && header.logOffset < w.fileOffset + w.length) throw corrupt('the log writes over itself');
    if (w.fileOffset + w.length > Math.max(fileSize, replay.lastFileOffset)) throw corrupt(`the log writes beyond the file's end (at ${w.fileOffset})`);
  }
  for (const w of replay.writes) {
    if (w.data) await writeAll(fh, w.data, w.fileOffset);
    else await writeZeroBytes(fh, w.fileOffset, w.length);
    // Region tables live in the header section we already hold: keep it current.
    if (w.fileOffset < HEADER_SECTION) {
      if (w.data) w.data.copy(section, w.fileOffset, 0, Math.min(w.length, HEADER_SECTION - w.fileOffset));
      else section.fill(0, w.fileOffset, Math.min(HEADER_SECTION, w.fileOffset + w.length));
    }
  }
  if ((await fh.stat()).size < replay.lastFileOffset) await fh.truncate(replay.lastFileOffset);
  await fh.datasync();
  const next = await updateHeaders(fh, section, header, { fileWriteGuid: randomUUID(), logGuid: NULL_GUID });
  return { header: next, replay };
}

/**
 * Data writes into present blocks share; changes to where blocks live (allocation, giving
 * blocks back, committing, shrinking the file) are exclusive — a write never lands in space
 * that was just given back.
 */
class RwLock {
  private readers = 0;
  private writer: Promise<void> | null = null;
  private drained: (() => void) | null = null;

  async shared<T>(work: () => Promise<T>): Promise<T> {
    while (this.writer) await this.writer;
    this.readers++;
    try {
      return await work();
    } finally {
      if (--this.readers === 0) this.drained?.();
    }
  }

  exclusive<T>(work: () => Promise<T>): Promise<T> {
    const run = (this.writer ?? Promise.resolve()).then(async () => {
      if (this.readers > 0) await new Promise<void>((resolve) => (this.drained = resolve));
      this.drained = null;
      return work();
    });
    const tail = run.then(
      () => undefined,
      () => undefined,
    );
    this.writer = tail;
    void tail.then(() => {
      if (this.writer === tail) this.writer = null;
    });
    return run;
  }
}

interface LogSession {
  logGuid: string;
  position: number;
  sequence: bigint;
}

/**
 * A VHDX opened for reading and writing. Reads see every write at once, including allocations
 * not yet committed to the BAT; flush() makes everything written so far durable.
 */
export class VhdxWritable extends VhdxImage {
  /** Set when the open replayed a log left by a crash. */
  replayed: ReplayReport | null = null;
  private fh!: FileHandle;
  private section!: Buffer;
  private header!: Header;
  private session: LogSession | null = null;
  /** BAT index → entry: allocations and state changes not yet committed through the log. */
  private readonly pending = new Map<number, BatEntry>();
  /** Where the next block is allocated: the MiB-aligned end of everything in the file. */
  private eof = 0;
  private dataWritten = false;
  private readonly lock = new RwLock();
  /** Opened by openForRepair(): the BAT is not checked on open, and nothing is given back implicitly. */
  private repairing = false;

  static openWritable(path: string, opts: OpenOptions = {}): Promise<VhdxWritable> {
    return VhdxWritable.openRw(path, opts, false);
  }

  /**
   * Opens a damaged file to repair it (core/vhdx/check.ts): like openWritable (a dirty log is
   * replayed on disk), but BAT entries the reader refuses (beyond the end of the file,
   * overlapping, reserved states) do not stop the open: setBatEntries() is how they get fixed.
   */
  static openForRepair(path: string, opts: OpenOptions = {}): Promise<VhdxWritable> {
    return VhdxWritable.openRw(path, opts, true);
  }

  private static async openRw(path: string, opts: OpenOptions, repairing: boolean): Promise<VhdxWritable> {
    let fh: FileHandle;
    try {
      fh = await open(path, 'r+');
    } catch (err) {
      throw asShieldError(err, `Opening ${path} for writing`);
    }
    let replayed: ReplayReport | null = null;
    let section: Buffer;
    let header: Header;
    try {
      const fileSize = (await fh.stat()).size;
      if (fileSize < HEADER_SECTION) throw corrupt(`the file is ${fileSize} bytes, smaller than the 1 MiB header section`);
      section = Buffer.alloc(HEADER_SECTION);
      await fh.read(section, 0, HEADER_SECTION, 0);
      if (section.toString('latin1', 0, 8) !== 'vhdxfile') throw corrupt('not a VHDX file (no "vhdxfile" signature)');
      const slots = HEADER_OFFSETS.map((off, i) => parseHeader(section.subarray(off, off + HEADER_SIZE), (i + 1) as 1 | 2));
      header = currentHeader(slots, fileSize);
      if (header.logGuid !== NULL_GUID && header.logLength > 0) {
        const r = await replayOnDisk(fh, section, header, fileSize);
        header = r.header;
        replayed = { entries: r.replay.entries, writes: r.replay.writes.length };
      }
    } catch (err) {
      await fh.close();
      throw asShieldError(err, `Opening ${path}`);
    }
    const image = await VhdxImage.load(fh, { ...opts, readOnly: true }, (...parts) => {
      const w = new VhdxWritable(...parts);
      w.repairing = repairing; // before load() counts the states
      return w;
    });
    image.fh = fh;
    image.section = section;
    image.header = header;
    image.replayed = replayed;
    image.info.logDirty = false;
    if (image.info.type === 'differencing') {
      await image.close();
      throw unsupported('writing to differencing disks is not supported (open it read-only)');
    }
    image.eof = roundUp(Math.max(image.info.fileSize, ...image.structures.map((s) => s.offset + s.length)), MiB);
    return image;
  }

  /** Opened for repair, the BAT is neither checked nor counted here: check.ts scans it and fixes what it finds. */
  protected override async countStates(): Promise<Record<string, number>> {
    return this.repairing ? {} : super.countStates();
  }

  private get src(): Source {
    return this.source;
  }

  get batLength(): number {
    return this.bat.length;
  }

  protected override async batEntry(index: number): Promise<BatEntry> {
    return this.pending.get(index) ?? super.batEntry(index);
  }

  /** Payload and region bytes: inline while the page cache takes them fast (OpenOptions.inlineIo). */
  private writeData(data: Buffer, position: number): Promise<void> {
    const inline = this.src.inline;
    if (!inline?.use(data.length)) return writeAll(this.fh, data, position);
    try {
      inline.write(this.fh.fd, data, position);
      return Promise.resolve();
    } catch (err) {
      return Promise.reject(err as Error);
    }
  }

  private checkOpen(offset: number, length: number): void {
    if (this.closed) throw new ShieldError('invalid_argument', 'The VHDX image is closed.');
    const size = this.info.metadata.virtualSize;
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > size) {
      throw new ShieldError('invalid_argument', `A write of ${length} bytes at ${offset} is outside the ${size}-byte disk.`);
    }
  }

  /** Before the first change of a session (§2.2.2): new FileWriteGuid and DataWriteGuid, and a LogGuid for our entries. */
  private async beginSession(): Promise<LogSession> {
    if (this.session) return this.session;
    if (this.info.header.logLength === 0) throw unsupported('the file has no log, so its metadata cannot be updated safely');
    // The headers may name a LogGuid only once a valid entry carries it: a crash before our first
    // commit (writes into allocated blocks need none) would otherwise leave a dirty header over a
    // log with no entry, which readers refuse. So an empty entry goes first, flushed.
    const logGuid = randomUUID();
    const size = (await this.fh.stat()).size;
    const opening = buildLogEntry({ sequence: 1n, tail: 0, logGuid, flushedFileOffset: Math.floor(size / MiB) * MiB, lastFileOffset: roundUp(size, MiB), sectors: [] });
    await writeAll(this.fh, opening, this.info.header.logOffset);
    await this.fh.datasync();
    this.header = await updateHeaders(this.fh, this.section, this.header, { fileWriteGuid: randomUUID(), dataWriteGuid: randomUUID(), logGuid });
    this.session = { logGuid, position: opening.length, sequence: 2n };
    await this.syncRegionTables();
    return this.session;
  }

  /**
   * Makes both region tables equal to the one in use: a damaged or stale copy could otherwise
   * become valid once the file grows (an offset that lay past the end now inside it), and QEMU
   * only ever reads table 1.
   */
  private async syncRegionTables(): Promise<void> {
    const tables = REGION_TABLE_OFFSETS.map((o) => this.section.subarray(o, o + REGION_TABLE_SIZE));
    if (tables[0]!.equals(tables[1]!)) return;
    await this.commit(this.tableSectors(this.regionTableInUse()));
  }

  /** A copy of the region table in use (the first valid one, as the reader chose). */
  private regionTableInUse(): Buffer {
    const used = REGION_TABLE_OFFSETS.map((o) => this.section.subarray(o, o + REGION_TABLE_SIZE)).find((t) => Array.isArray(parseRegionTable(t, this.info.fileSize)));
    if (!used) throw corrupt('no valid region table');
    return Buffer.from(used);
  }

  /** Seals an edited region table and commits it to both copies through the log. */
  private async commitRegionTable(table: Buffer): Promise<void> {
    table.writeUInt32LE(0, 4);
    table.writeUInt32LE(crc32c(table), 4);
    await this.commit(this.tableSectors(table));
  }

  /** Space for a new structure at the end of the file, zero-filled; returns where it starts. */
  private async extendFile(length: number): Promise<number> {
    const at = this.eof;
    await this.fh.truncate(at + length);
    this.eof = at + length;
    this.grow(at + length);
    return at;
  }

  /** The 4 KiB sectors of both region tables that differ from `table`. */
  private tableSectors(table: Buffer): LogSector[] {
    const sectors: LogSector[] = [];
    for (const tableAt of REGION_TABLE_OFFSETS) {
      for (let o = 0; o < REGION_TABLE_SIZE; o += SECTOR) {
        const next = table.subarray(o, o + SECTOR);
        if (!next.equals(this.section.subarray(tableAt + o, tableAt + o + SECTOR))) sectors.push({ fileOffset: tableAt + o, data: Buffer.from(next) });
      }
    }
    return sectors;
  }

  /** Calls `fn(block, within, done, n)` for each block-sized piece of a range. */
  private pieces(offset: number, length: number): { block: number; within: number; done: number; n: number }[] {
    const bs = this.info.metadata.blockSize;
    const out = [];
    for (let done = 0; done < length; ) {
      const pos = offset + done;
      const block = Math.floor(pos / bs);
      const within = pos - block * bs;
      const n = Math.min(length - done, bs - within);
      out.push({ block, within, done, n });
      done += n;
    }
    return out;
  }

  private index(block: number): number {
    return batIndexOfBlock(block, this.geometry.chunkRatio);
  }

  /** Writes virtual-disk bytes; with `fua` they are durable when this returns. */
  async write(offset: number, data: Buffer, opts: { fua?: boolean } = {}): Promise<void> {
    this.checkOpen(offset, data.length);
    if (data.length === 0) return;
    if (!this.session) await this.lock.exclusive(() => this.beginSession());
    await Promise.all(
      this.pieces(offset, data.length).map(async ({ block, within, done, n }) => {
        const piece = data.subarray(done, done + n);
        for (;;) {
          const written = await this.lock.shared(async () => {
            const entry = await this.batEntry(this.index(block));
            if (entry.state !== PAYLOAD_STATE.FULLY_PRESENT) return false;
            this.checkPayload(block, entry);
            await this.writeData(piece, entry.fileOffset + within);
            return true;
          });
          if (written) break;
          await this.lock.exclusive(async () => {
            if ((await this.batEntry(this.index(block))).state !== PAYLOAD_STATE.FULLY_PRESENT) await this.allocate(block);
          });
        }
      }),
    );
    this.dataWritten = true;
    if (opts.fua) await this.flush();
  }

  /**
   * A new block at the end of the file. It reads as zeros until written (the file is extended,
   * never reused), which is what every non-present state reads as. Committed at the next flush.
   */
  private async allocate(block: number): Promise<BatEntry> {
    const at = this.eof;
    const end = at + this.info.metadata.blockSize;
    await this.fh.truncate(end);
    this.eof = end;
    this.grow(end);
    const entry = { state: PAYLOAD_STATE.FULLY_PRESENT, fileOffset: at };
    this.pending.set(this.index(block), entry);
    this.claim(at, true);
    return entry;
  }

  private grow(size: number): void {
    const s = this.src as { fileSize: number; size: number };
    s.fileSize = size;
    s.size = Math.max(s.size, size);
    this.info.fileSize = size;
  }

  /** Marks where a block starts in the claimed-offset bitmap (one bit per MiB, as countStates keeps it). */
  private claim(fileOffset: number, on: boolean): void {
    const mb = fileOffset / MiB;
    const need = (mb >> 3) + 1;
    if (need > this.claimed.length) {
      const next = new Uint8Array(Math.max(need, this.claimed.length * 2));
      next.set(this.claimed);
      this.claimed = next;
    }
    if (on) this.claimed[mb >> 3]! |= 1 << (mb & 7);
    else this.claimed[mb >> 3]! &= ~(1 << (mb & 7));
  }

  /**
   * Zeros a range. Whole blocks of a dynamic disk become ZERO blocks (their space is given back
   * when it ends the file); partial pieces and fixed disks get zero bytes written.
   */
  async writeZeroes(offset: number, length: number, opts: { fua?: boolean } = {}): Promise<void> {
    await this.unback(offset, length, PAYLOAD_STATE.ZERO, true);
    if (opts.fua) await this.flush();
  }

  /**
   * Discards a range (TRIM/UNMAP): whole blocks of a dynamic disk become UNMAPPED and read as
   * zeros; partial blocks and fixed disks keep their data (a discard is only a hint).
   */
  async discard(offset: number, length: number): Promise<void> {
    await this.unback(offset, length, PAYLOAD_STATE.UNMAPPED, false);
  }

  private async unback(offset: number, length: number, state: number, zeroPartial: boolean): Promise<void> {
    this.checkOpen(offset, length);
    if (length === 0) return;
    if (!this.session) await this.lock.exclusive(() => this.beginSession());
    const bs = this.info.metadata.blockSize;
    const fixed = this.info.type === 'fixed';
    for (const { block, within, n } of this.pieces(offset, length)) {
      const whole = within === 0 && (n === bs || block * bs + n === this.info.metadata.virtualSize);
      if (whole && !fixed) {
        await this.lock.exclusive(async () => {
          const entry = await this.batEntry(this.index(block));
          // A discard only gives back present blocks; zeroing makes any other state read as zeros for sure.
          if (state === PAYLOAD_STATE.UNMAPPED ? entry.state !== PAYLOAD_STATE.FULLY_PRESENT : entry.state === state) return;
          if (entry.state === PAYLOAD_STATE.FULLY_PRESENT) this.claim(entry.fileOffset, false);
          // Hyper-V refuses non-zero FileOffsetMB in these states (QEMU's note): always 0.
          this.pending.set(this.index(block), { state, fileOffset: 0 });
        });
      } else if (zeroPartial) {
        await this.lock.shared(async () => {
          const entry = await this.batEntry(this.index(block));
          if (entry.state !== PAYLOAD_STATE.FULLY_PRESENT) return; // already reads as zeros
          this.checkPayload(block, entry);
          await writeZeroBytes(this.fh, entry.fileOffset + within, n);
          this.dataWritten = true;
        });
      }
    }
  }

  /** Makes every completed write durable: data flushed, then the BAT changes committed through the log. */
  async flush(): Promise<void> {
    if (this.closed) throw new ShieldError('invalid_argument', 'The VHDX image is closed.');
    await this.lock.exclusive(() => this.commitPending());
  }

  /** flush() under the exclusive lock. */
  private async commitPending(): Promise<void> {
    {
      if (this.pending.size === 0) {
        if (this.dataWritten) await this.fh.datasync();
        this.dataWritten = false;
        return;
      }
      const changes = new Map(this.pending);
      const sectors = new Map<number, Buffer>();
      for (const [index, entry] of changes) {
        const at = this.bat.fileOffset + index * 8;
        const sectorAt = at - (at % SECTOR);
        let sector = sectors.get(sectorAt);
        if (!sector) {
          sector = await this.src.read(sectorAt, SECTOR, 'the BAT');
          sectors.set(sectorAt, sector);
        }
        writeBatEntry(sector, at - sectorAt, entry.state, entry.fileOffset);
      }
      await this.commit([...sectors].map(([fileOffset, data]) => ({ fileOffset, data })));
      for (const [index, entry] of changes) if (this.pending.get(index) === entry) this.pending.delete(index);
      this.dataWritten = false;
      await this.shrink();
    }
  }

  /** Ends the file after the last claimed block when blocks at its end were given back. */
  private async shrink(): Promise<void> {
    // A fixed file keeps its preallocated size.
    // A repair ends the file explicitly (setFileEnd); its claimed bitmap is never filled.
    if (this.info.type !== 'dynamic' || this.pending.size > 0 || this.repairing) return;
    const floor = roundUp(Math.max(...this.structures.map((s) => s.offset + s.length)), MiB);
    let u = this.claimed.length * 8 - 1;
    while (u >= 0 && !(this.claimed[u >> 3]! & (1 << (u & 7)))) u--;
    const end = Math.max(floor, u >= 0 ? u * MiB + this.info.metadata.blockSize : 0);
    if (end >= this.eof) return;
    // The BAT no longer points past `end` (committed above). The log learns the new end first,
    // so a crash right after the truncation replays to a file of the right size.
    await this.commit([], { fileEnd: end });
    await this.fh.truncate(end);
    this.eof = end;
    const s = this.src as { fileSize: number; size: number };
    s.fileSize = end;
    s.size = end;
    this.info.fileSize = end;
  }

  /**
   * Writes 4 KiB sectors of metadata atomically per log entry (§2.3): flush what precedes,
   * write the entry, flush, apply in place. Each entry is its own tail: everything before it
   * was applied and flushed, so replay needs only the newest entry.
   */
  async commit(sectors: LogSector[], opts: { fileEnd?: number } = {}): Promise<void> {
    const session = await this.beginSession();
    const logLength = this.info.header.logLength;
    let perEntry = Math.floor(logLength / SECTOR) - 1;
    while (perEntry > 0 && logEntryLength(perEntry) > logLength) perEntry--;
    if (perEntry < 1) throw unsupported('the log is too small to hold an entry');
    for (const s of sectors) {
      if (s.fileOffset < LOG_FLOOR || s.fileOffset % SECTOR !== 0 || s.data.length !== SECTOR) throw new Error(`internal: bad log sector at ${s.fileOffset}`);
    }
    // An entry without descriptors still records the file's size: written before a shrink, it
    // keeps a crash after the truncation from looking like a truncated file to replay.
    for (let first = 0; first < sectors.length || (first === 0 && opts.fileEnd !== undefined); first += perEntry) {
      const batch = sectors.slice(first, first + perEntry);
      const size = (await this.fh.stat()).size;
      const entry = buildLogEntry({
        sequence: session.sequence,
        tail: 0, // set below, once the position is known
        logGuid: session.logGuid,
        flushedFileOffset: opts.fileEnd ?? Math.floor(size / MiB) * MiB,
        lastFileOffset: opts.fileEnd ?? roundUp(size, MiB),
        sectors: batch,
      });
      if (session.position + entry.length > logLength) session.position = 0;
      entry.writeUInt32LE(session.position, 12);
      entry.writeUInt32LE(0, 4);
      entry.writeUInt32LE(crc32c(entry), 4);
      await this.fh.datasync(); // data the entry points at, and the previous entry's application
      await writeAll(this.fh, entry, this.info.header.logOffset + session.position);
      await this.fh.datasync();
      for (const s of batch) {
        await writeAll(this.fh, s.data, s.fileOffset);
        if (s.fileOffset < HEADER_SECTION) s.data.copy(this.section, s.fileOffset);
      }
      this.forgetCached(batch);
      session.position += entry.length;
      session.sequence++;
    }
  }

  /** Drops cached BAT pages the sectors touched, so reads see the applied entries. */
  private forgetCached(batch: readonly LogSector[]): void {
    this.batEpoch++;
    for (const s of batch) {
      const rel = s.fileOffset - this.bat.fileOffset;
      if (rel < 0 || rel >= this.bat.length) continue;
      this.batPages.delete(Math.floor(rel / MiB));
    }
  }

  /**
   * Moves the BAT to a larger region at the end of the file: the copy is written where nothing
   * lives yet and flushed, then both region tables switch to it in one log entry. Table 2 is
   * rewritten from the table in use, so a damaged copy is repaired on the way.
   */
  /** Writes into a region of the caller's (e.g. the shielded disk's tag region): payload-like, not logged. */
  async writeRegion(guid: string, offset: number, data: Buffer): Promise<void> {
    if (this.closed) throw new ShieldError('invalid_argument', 'The VHDX image is closed.');
    if (guid === REGION.BAT || guid === REGION.METADATA) throw new ShieldError('invalid_argument', 'The BAT and metadata regions change only through the log.');
    const r = this.regionOf(guid, offset, data.length);
    if (!this.session) await this.lock.exclusive(() => this.beginSession());
    await this.lock.shared(() => this.writeData(data, r.fileOffset + offset));
    this.dataWritten = true;
  }

  /**
   * Adds a region at the end of the file (zero-filled) and lists it in both region tables in one
   * log entry. Takes effect for this image's structures at the next open.
   */
  async addRegion(guid: string, length: number, required: boolean): Promise<number> {
    if (!Number.isSafeInteger(length) || length <= 0 || length % MiB !== 0 || length > 0xffffffff - MiB + 1) throw new ShieldError('invalid_argument', `A region is a positive multiple of 1 MiB below 4 GiB, not ${length}.`);
    return this.lock.exclusive(async () => {
      await this.commitPending();
      if (this.info.regions.some((r) => r.guid === guid)) throw new ShieldError('already_exists', `The file already has region ${guid}.`);
      const at = await this.extendFile(length);
      const table = this.regionTableInUse();
      const count = table.readUInt32LE(8);
      if (count >= 2047) throw unsupported('the region table is full');
      const e = 16 + count * 32;
      writeGuid(guid, table, e);
      table.writeBigUInt64LE(BigInt(at), e + 16);
      table.writeUInt32LE(length, e + 24);
      table.writeUInt32LE(required ? 1 : 0, e + 28);
      table.writeUInt32LE(count + 1, 8);
      await this.commitRegionTable(table); // commit() flushes first: the region exists before a table points at it
      return at;
    });
  }

  async relocateBat(length: number): Promise<void> {
    await this.lock.exclusive(async () => {
      await this.commitPending();
      const at = await this.extendFile(length);
      for (let done = 0; done < this.bat.length; done += MiB) {
        const n = Math.min(MiB, this.bat.length - done);
        await writeAll(this.fh, await this.src.read(this.bat.fileOffset + done, n, 'the BAT'), at + done);
      }
      const table = this.regionTableInUse();
      const count = table.readUInt32LE(8);
      let found = false;
      for (let i = 0; i < count; i++) {
        const e = 16 + i * 32;
        if (readGuid(table, e) !== REGION.BAT) continue;
        table.writeBigUInt64LE(BigInt(at), e + 16);
        table.writeUInt32LE(length, e + 24);
        found = true;
      }
      if (!found) throw corrupt('the BAT region is missing');
      await this.commitRegionTable(table); // commit() flushes first: the copy is durable before a table points at it
      await this.fh.datasync();
    });
  }

  /**
   * Grows the virtual disk (the BAT region must already hold the new entries). A short last
   * block's bytes past the old end are zeroed first; a fixed disk gets its new blocks allocated;
   * the new size is committed last, so a crash leaves the old size or the new, never between.
   */
  async growTo(newSize: number): Promise<void> {
    await this.lock.exclusive(async () => {
      await this.commitPending();
      const { blockSize: bs, virtualSize: old } = this.info.metadata;
      if (old % bs !== 0) {
        const block = Math.floor(old / bs);
        const entry = await this.batEntry(this.index(block));
        if (entry.state === PAYLOAD_STATE.FULLY_PRESENT) {
          const from = entry.fileOffset + (old - block * bs);
          const to = entry.fileOffset + bs;
          for (const st of this.structures) {
            if (from < st.offset + st.length && st.offset < to) throw unsupported(`the last block runs into ${st.name}; it cannot grow in place`);
          }
          await writeZeroBytes(this.fh, from, to - from);
          if (to > this.info.fileSize) this.grow(to);
        }
      }
      if (this.info.type === 'fixed') {
        for (let b = Math.ceil(old / bs); b < Math.ceil(newSize / bs); b++) {
          await this.allocate(b);
          if (this.pending.size >= 65536) await this.commitPending();
        }
        await this.commitPending();
      }
      const item = this.info.metadata.items.find((i) => i.itemId === METADATA_ITEM.VIRTUAL_DISK_SIZE && !i.isUser);
      const meta = this.info.regions.find((r) => r.guid === REGION.METADATA);
      if (!item || !meta) throw corrupt('the Virtual Disk Size item is missing');
      const at = meta.fileOffset + item.offset;
      const sectorAt = at - (at % SECTOR);
      const sector = await this.src.read(sectorAt, SECTOR, 'the metadata region');
      sector.writeBigUInt64LE(BigInt(newSize), at - sectorAt);
      await this.commit([{ fileOffset: sectorAt, data: sector }]);
      await this.fh.datasync();
      this.info.metadata.virtualSize = newSize;
    });
  }

  // ---- Repairs (core/vhdx/check.ts) -----------------------------------------------------------

  /** Both region tables become the one in use (table 1, or 2 when 1 is damaged), through the log. */
  async rewriteRegionTables(): Promise<void> {
    await this.lock.exclusive(async () => {
      await this.beginSession(); // a new session syncs the tables itself
      await this.syncRegionTables();
    });
  }

  /** Rewrites both header slots from the current one (§2.2.2.1), replacing a damaged or disagreeing copy. */
  async rewriteHeaders(): Promise<void> {
    await this.lock.exclusive(async () => {
      this.header = await updateHeaders(this.fh, this.section, this.header, this.session ? {} : { fileWriteGuid: randomUUID() });
    });
  }

  /** Sets BAT entries by BAT index (payload or sector-bitmap) and commits them through the log at once. */
  async setBatEntries(entries: ReadonlyMap<number, BatEntry>): Promise<void> {
    await this.lock.exclusive(async () => {
      for (const [index, entry] of entries) {
        if (!Number.isSafeInteger(index) || index < 0 || (index + 1) * 8 > this.bat.length) throw new Error(`internal: BAT index ${index} is outside the BAT`);
        if (!Number.isSafeInteger(entry.fileOffset / MiB) || entry.fileOffset < 0) throw new Error(`internal: BAT offset ${entry.fileOffset} is not a MiB multiple`);
        this.pending.set(index, entry);
      }
      await this.commitPending();
    });
  }

  /**
   * Ends the file at `end`: cuts leaked space off a dynamic disk's end, or zero-extends a file
   * that was cut short. Never below the metadata structures; a fixed file only grows. The log
   * session ends first (every entry applied), so no entry's FlushedFileOffset can lie beyond a
   * shorter file if we crash here.
   */
  async setFileEnd(end: number): Promise<void> {
    await this.lock.exclusive(async () => {
      await this.commitPending();
      const floor = Math.max(...this.structures.map((s) => s.offset + s.length));
      if (!Number.isSafeInteger(end) || end < floor) throw new Error(`internal: file end ${end} cuts into the metadata structures (${floor})`);
      if (end < this.info.fileSize && this.info.type !== 'dynamic') throw unsupported('only a dynamic disk gives space back');
      await this.endSession();
      await this.fh.truncate(end);
      await this.fh.datasync();
      this.eof = roundUp(end, MiB);
      const s = this.src as { fileSize: number; size: number };
      s.fileSize = end;
      s.size = end;
      this.info.fileSize = end;
    });
  }

  /** Everything committed is applied and flushed: the headers say the log is empty. */
  private async endSession(): Promise<void> {
    if (!this.session) return;
    await this.fh.datasync();
    this.header = await updateHeaders(this.fh, this.section, this.header, { logGuid: NULL_GUID });
    this.session = null;
  }

  /**
   * Adds or replaces a user metadata item in one log entry: the new bytes go to free space in
   * the metadata region (never over the live copy), then the table entry points at them, so a
   * crash leaves the old item or the new one. Unknown items are left exactly as they are.
   */
  async setUserItem(itemId: string, bytes: Buffer, flags: { required: boolean; virtualDisk?: boolean }): Promise<void> {
    if (bytes.length === 0 || bytes.length > MiB) throw new ShieldError('invalid_argument', `A metadata item holds 1 byte to 1 MiB, not ${bytes.length}.`);
    await this.lock.exclusive(async () => {
      await this.commitPending();
      const meta = this.info.regions.find((r) => r.guid === REGION.METADATA);
      if (!meta) throw corrupt('the metadata region is missing');
      const table = await this.src.read(meta.fileOffset, METADATA_TABLE_SIZE, 'the metadata table');
      const items = parseMetadataTable(table, meta.length);
      const existing = items.findIndex((i) => i.isUser && i.itemId === itemId);
      // First free 4 KiB-aligned place after every other item (sector-aligned, so the log carries whole sectors).
      const others = items.filter((_, i) => i !== existing && items[i]!.length > 0);
      let at = roundUp(METADATA_TABLE_SIZE, SECTOR);
      for (const o of [...others].sort((a, b) => a.offset - b.offset)) if (at < o.offset + o.length && o.offset < at + bytes.length) at = roundUp(o.offset + o.length, SECTOR);
      if (existing >= 0) {
        const live = items[existing]!;
        if (at < live.offset + live.length && live.offset < at + bytes.length) {
          at = roundUp(Math.max(at, live.offset + live.length), SECTOR);
          for (const o of [...others].sort((a, b) => a.offset - b.offset)) if (at < o.offset + o.length && o.offset < at + bytes.length) at = roundUp(o.offset + o.length, SECTOR);
        }
      }
      if (at + bytes.length > meta.length) throw unsupported(`the metadata region has no room for a ${bytes.length}-byte item`);
      const index = existing >= 0 ? existing : items.length;
      if (index >= 2047) throw unsupported('the metadata table is full');
      const next = Buffer.from(table);
      const e = 32 + index * 32;
      writeGuid(itemId, next, e);
      next.writeUInt32LE(at, e + 16);
      next.writeUInt32LE(bytes.length, e + 20);
      next.writeUInt32LE(1 | (flags.virtualDisk ? 2 : 0) | (flags.required ? 4 : 0), e + 24);
      next.writeUInt32LE(0, e + 28);
      if (existing < 0) next.writeUInt16LE(items.length + 1, 10);
      const sectors: LogSector[] = [];
      const padded = Buffer.alloc(roundUp(bytes.length, SECTOR));
      bytes.copy(padded);
      for (let o = 0; o < padded.length; o += SECTOR) sectors.push({ fileOffset: meta.fileOffset + at + o, data: padded.subarray(o, o + SECTOR) });
      for (let o = 0; o < METADATA_TABLE_SIZE; o += SECTOR) {
        if (!next.subarray(o, o + SECTOR).equals(table.subarray(o, o + SECTOR))) sectors.push({ fileOffset: meta.fileOffset + o, data: next.subarray(o, o + SECTOR) });
      }
      // One entry, so the item and the table entry change together.
      if (logEntryLength(sectors.length) > this.info.header.logLength) throw unsupported(`a ${bytes.length}-byte item does not fit the ${this.info.header.logLength}-byte log in one entry`);
      await this.commit(sectors);
      const item = { itemId, name: 'unknown', offset: at, length: bytes.length, isUser: true, isVirtualDisk: !!flags.virtualDisk, isRequired: flags.required };
      if (existing >= 0) this.info.metadata.items[this.info.metadata.items.findIndex((i) => i.isUser && i.itemId === itemId)] = item;
      else this.info.metadata.items.push(item);
    });
  }

  /** Flushes, marks the log empty (so every tool opens the file without replay) and closes. */
  override async close(): Promise<void> {
    if (this.closed) return;
    try {
      await this.flush();
      await this.endSession();
    } finally {
      await super.close();
    }
  }
}

export interface ResizeResult {
  file: string;
  oldSize: number;
  newSize: number;
  /** The BAT had to move to a larger region. */
  batMoved: boolean;
}

/** Grows a fixed or dynamic VHDX's virtual disk (shrinking is refused: it would cut data off). */
export async function resizeVhdx(path: string, newSize: number): Promise<ResizeResult> {
  let image = await VhdxWritable.openWritable(path);
  try {
    const { virtualSize: oldSize, logicalSectorSize } = image.info.metadata;
    if (!Number.isSafeInteger(newSize) || newSize <= 0 || newSize % logicalSectorSize !== 0) {
      throw new ShieldError('invalid_argument', `The new size must be a positive multiple of the ${logicalSectorSize}-byte logical sector, not ${newSize}.`);
    }
    if (newSize > 64 * 1024 * 1024 * MiB) throw new ShieldError('invalid_argument', `The new size ${newSize} exceeds the 64 TiB VHDX limit.`);
    if (newSize < oldSize) throw new ShieldError('invalid_argument', `Shrinking (${oldSize} → ${newSize} bytes) is not supported: it would cut data off the disk.`);
    if (newSize === oldSize) return { file: path, oldSize, newSize, batMoved: false };
    const g = batGeometry({ ...image.info.metadata, virtualSize: newSize });
    // Room for payload and sector-bitmap entries alike, as create lays it out.
    const needed = roundUp(g.sectorBitmapBlocks * (g.chunkRatio + 1) * 8, MiB);
    const batMoved = needed > image.batLength;
    if (batMoved) {
      await image.relocateBat(needed);
      await image.close();
      image = await VhdxWritable.openWritable(path);
    }
    await image.growTo(newSize);
    return { file: path, oldSize, newSize, batMoved };
  } finally {
    await image.close();
  }
}

/** Opens read-only (the default) or, with `readOnly: false`, for writing (replaying a dirty log on disk). */
export function openVhdx(path: string, opts: OpenOptions & { readOnly: false }): Promise<VhdxWritable>;
export function openVhdx(path: string, opts?: OpenOptions): Promise<VhdxImage>;
export function openVhdx(path: string, opts: OpenOptions = {}): Promise<VhdxImage> {
  return opts.readOnly === false ? VhdxWritable.openWritable(path, opts) : VhdxImage.open(path, opts);
}
