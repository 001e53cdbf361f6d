// Opening a VHDX and reading its virtual disk: fixed and dynamic disks, every payload-block state.
// The BAT is read on demand in 1 MiB pages with a small bounded cache, so memory stays flat
// whatever the disk size.
import { open, type FileHandle } from 'node:fs/promises';
import { ShieldError, toShieldError } from '../errors.ts';
import { NULL_GUID } from './guid.ts';
import { findLogReplay, overlay, type LogWrite } from './log.ts';
import {
  HEADER_OFFSETS,
  HEADER_SECTION,
  HEADER_SIZE,
  METADATA_TABLE_SIZE,
  MiB,
  PAYLOAD_STATE,
  PAYLOAD_STATE_NAMES,
  REGION,
  REGION_TABLE_OFFSETS,
  REGION_TABLE_SIZE,
  batGeometry,
  batIndexOfBlock,
  checkLayout,
  corrupt,
  currentHeader,
  decodeBatEntry,
  parseDiskParameters,
  parseFileIdentifier,
  parseHeader,
  parseMetadataTable,
  parseRegionTable,
  unsupported,
  type BatEntry,
  type BatGeometry,
  type DiskParameters,
  type Header,
  type MetadataItem,
  type RegionEntry,
} from './structures.ts';

export interface VhdxInfo {
  fileSize: number;
  creator: string;
  type: 'fixed' | 'dynamic' | 'differencing';
  header: Omit<Header, 'sequenceNumber'> & { sequenceNumber: string };
  headers: { slot: 1 | 2; valid: boolean; sequenceNumber: string | null; problem: string | null }[];
  regions: RegionEntry[];
  metadata: DiskParameters & { items: MetadataItem[] };
  bat: { entries: number; payloadBlocks: number; chunkRatio: number; states: Record<string, number> };
  logDirty: boolean;
}

export interface OpenOptions {
  readOnly?: boolean;
  /** User metadata items a caller understands (e.g. the shielded disk's key protector item). */
  knownUserItems?: readonly string[];
}

const BAT_PAGE = MiB;
const BAT_CACHE_PAGES = 8;
const MAX_READ = 256 * MiB;

/**
 * The file as readers see it: its bytes, with a dirty log's writes applied in memory on a
 * read-only open, and zeros up to the log's LastFileOffset past the real end of the file.
 */
class Source {
  readonly fh: FileHandle;
  readonly fileSize: number;
  size: number;
  writes: LogWrite[] = [];

  constructor(fh: FileHandle, fileSize: number) {
    this.fh = fh;
    this.fileSize = fileSize;
    this.size = fileSize;
  }

  async read(offset: number, length: number, what: string): Promise<Buffer> {
    return this.readInto(Buffer.alloc(length), offset, what);
  }

  /** Fills `buf` (all of it) from `offset`; past the real end of the file it reads zeros. */
  async readInto(buf: Buffer, offset: number, what: string): Promise<Buffer> {
    const length = buf.length;
    if (offset < 0 || offset + length > this.size) throw corrupt(`${what} lies beyond the end of the file`);
    const real = Math.max(0, Math.min(length, this.fileSize - offset));
    let done = 0;
    while (done < real) {
      const { bytesRead } = await this.fh.read(buf, done, real - done, offset + done);
      if (bytesRead === 0) throw corrupt(`${what} is cut short (the file shrank while reading)`);
      done += bytesRead;
    }
    if (real < length) buf.fill(0, real);
    if (this.writes.length > 0) overlay(buf, offset, this.writes);
    return buf;
  }
}

const MAX_LOG_IN_MEMORY = 64 * MiB;
/** How far a log may say the file grew past its real end: the largest disk plus its largest BAT. */
const MAX_GROWTH = 64 * 1024 * 1024 * MiB + 1024 * MiB;

export class VhdxImage {
  readonly info: VhdxInfo;
  private readonly source: Source;
  private readonly geometry: BatGeometry;
  private readonly bat: RegionEntry;
  private readonly structures: { name: string; offset: number; length: number }[];
  private readonly batPages = new Map<number, Buffer>();
  private closed = false;

  private constructor(source: Source, info: VhdxInfo, geometry: BatGeometry, bat: RegionEntry, structures: { name: string; offset: number; length: number }[]) {
    this.source = source;
    this.info = info;
    this.geometry = geometry;
    this.bat = bat;
    this.structures = structures;
  }

  /** Parses and checks every structure; a dirty log is replayed in memory on a read-only open. */
  static async open(path: string, opts: OpenOptions = {}): Promise<VhdxImage> {
    if (opts.readOnly === false) throw unsupported('writing is not implemented yet; open read-only');
    let fh: FileHandle;
    try {
      fh = await open(path, 'r');
    } catch (err) {
      throw toShieldError(err);
    }
    try {
      const fileSize = (await fh.stat()).size;
      if (fileSize < HEADER_SECTION) throw corrupt(`the file is ${fileSize} bytes, smaller than the 1 MiB header section`);
      const source = new Source(fh, fileSize);
      const section = await source.read(0, HEADER_SECTION, 'the header section');
      const { creator } = parseFileIdentifier(section);
      const slots = HEADER_OFFSETS.map((off, i) => parseHeader(section.subarray(off, off + HEADER_SIZE), (i + 1) as 1 | 2));
      const header = currentHeader(slots, fileSize);
      const logDirty = header.logGuid !== NULL_GUID && header.logLength > 0;
      if (logDirty) {
        if (header.logLength > MAX_LOG_IN_MEMORY) throw unsupported(`a ${header.logLength}-byte log is too large to replay in memory`);
        const replay = findLogReplay(await source.read(header.logOffset, header.logLength, 'the log'), header.logGuid);
        if (fileSize < replay.flushedFileOffset) throw corrupt(`the file is shorter (${fileSize}) than its log says it was (${replay.flushedFileOffset}): truncated`);
        // Replay in memory only: the file on disk is never touched by a read-only open.
        if (!Number.isSafeInteger(replay.lastFileOffset) || replay.lastFileOffset > fileSize + MAX_GROWTH) {
          throw corrupt(`the log claims the file ends at ${replay.lastFileOffset}, far beyond its ${fileSize} bytes`);
        }
        source.writes = replay.writes;
        source.size = Math.max(fileSize, replay.lastFileOffset);
        overlay(section, 0, replay.writes);
      }

      // Region table 1, or table 2 when 1 is damaged (QEMU only ever reads table 1).
      const tables = REGION_TABLE_OFFSETS.map((off) => parseRegionTable(section.subarray(off, off + REGION_TABLE_SIZE), source.size));
      const regions = tables.find((t): t is RegionEntry[] => Array.isArray(t));
      if (!regions) throw corrupt(`no valid region table (${tables.map((t, i) => `table ${i + 1}: ${(t as { invalid: string }).invalid}`).join('; ')})`);
      for (const r of regions) if (r.required && r.name === 'unknown') throw unsupported(`required region ${r.guid} is unknown`);
      const bat = regions.find((r) => r.guid === REGION.BAT);
      const meta = regions.find((r) => r.guid === REGION.METADATA);
      if (!bat || !meta) throw corrupt(`the ${bat ? 'metadata' : 'BAT'} region is missing`);
      const structures = [
        { name: 'the header section', offset: 0, length: HEADER_SECTION },
        { name: 'the log', offset: header.logOffset, length: header.logLength },
        ...regions.map((r) => ({ name: `the ${r.name} region`, offset: r.fileOffset, length: r.length })),
      ];
      checkLayout(structures);

      const metaTable = await source.read(meta.fileOffset, METADATA_TABLE_SIZE, 'the metadata table');
      const items = parseMetadataTable(metaTable, meta.length);
      const itemBytes = new Map<MetadataItem, Buffer>();
      for (const item of items) {
        // Only the items we interpret are read: an unknown optional item stays on disk, untouched.
        const wanted = item.isUser ? opts.knownUserItems?.includes(item.itemId) : item.name !== 'unknown';
        if (wanted) {
          itemBytes.set(item, await source.read(meta.fileOffset + item.offset, item.length, `metadata item ${item.name}`));
        }
      }
      const params = parseDiskParameters(items, (item) => itemBytes.get(item) ?? Buffer.alloc(0), opts.knownUserItems);
      const geometry = batGeometry(params);
      if (geometry.entries * 8 > bat.length) throw corrupt(`the BAT region holds ${bat.length / 8} entries; the disk needs ${geometry.entries}`);

      const info: VhdxInfo = {
        fileSize,
        creator,
        type: params.hasParent ? 'differencing' : params.leaveBlockAllocated ? 'fixed' : 'dynamic',
        header: { ...header, sequenceNumber: header.sequenceNumber.toString() },
        headers: slots.map((s) =>
          'invalid' in s ? { slot: s.slot, valid: false, sequenceNumber: null, problem: s.invalid } : { slot: s.slot, valid: true, sequenceNumber: s.sequenceNumber.toString(), problem: null },
        ),
        regions,
        metadata: { ...params, items },
        bat: { entries: geometry.entries, payloadBlocks: geometry.payloadBlocks, chunkRatio: geometry.chunkRatio, states: {} },
        logDirty,
      };
      const image = new VhdxImage(source, info, geometry, bat, structures);
      info.bat.states = await image.countStates();
      return image;
    } catch (err) {
      await fh.close();
      throw toShieldError(err);
    }
  }

  private async batEntry(index: number): Promise<BatEntry> {
    const perPage = BAT_PAGE / 8;
    const pageNo = Math.floor(index / perPage);
    let page = this.batPages.get(pageNo);
    if (!page) {
      const offset = this.bat.fileOffset + pageNo * BAT_PAGE;
      const length = Math.min(BAT_PAGE, this.bat.length - pageNo * BAT_PAGE);
      page = await this.source.read(offset, length, 'the BAT');
      if (this.batPages.size >= BAT_CACHE_PAGES) this.batPages.delete(this.batPages.keys().next().value!);
      this.batPages.set(pageNo, page);
    }
    return decodeBatEntry(page.readBigUInt64LE((index % perPage) * 8));
  }

  /** Where a block's data lives, checked against the file and the metadata structures. */
  private checkPayload(block: number, entry: BatEntry): void {
    const bs = this.info.metadata.blockSize;
    const needed = Math.min(bs, this.info.metadata.virtualSize - block * bs);
    if (entry.fileOffset < HEADER_SECTION || entry.fileOffset + needed > this.source.size) {
      throw corrupt(`payload block ${block} points outside the file (offset ${entry.fileOffset})`);
    }
    for (const s of this.structures) {
      if (entry.fileOffset < s.offset + s.length && s.offset < entry.fileOffset + needed) throw corrupt(`payload block ${block} overlaps ${s.name}`);
    }
  }

  /**
   * Counts the payload-block states, streaming the BAT a page at a time (all-zero pages in one
   * step) and checking every allocated block once; a bitmap over the file's MiB offsets catches
   * two blocks claiming the same place, in memory proportional to the file, not the disk.
   */
  private async countStates(): Promise<Record<string, number>> {
    const counts = new Array<number>(8).fill(0);
    const claimed = new Uint8Array(Math.ceil(this.source.size / MiB / 8) + 1);
    const { chunkRatio, payloadBlocks } = this.geometry;
    const perPage = BAT_PAGE / 8;
    const zeroPage = Buffer.alloc(BAT_PAGE);
    const entries = batIndexOfBlock(payloadBlocks - 1, chunkRatio) + 1;
    for (let first = 0; first < entries; first += perPage) {
      const n = Math.min(perPage, entries - first);
      const page = await this.source.read(this.bat.fileOffset + first * 8, n * 8, 'the BAT');
      if (page.equals(zeroPage.subarray(0, n * 8))) {
        // NOT_PRESENT everywhere: count the payload entries among them (sector-bitmap entries excluded).
        const sb = Math.floor((first + n) / (chunkRatio + 1)) - Math.floor(first / (chunkRatio + 1));
        counts[PAYLOAD_STATE.NOT_PRESENT]! += n - sb;
        continue;
      }
      for (let i = 0; i < n; i++) {
        const index = first + i;
        if ((index + 1) % (chunkRatio + 1) === 0) continue; // a sector-bitmap entry
        const block = index - Math.floor(index / (chunkRatio + 1));
        const low = page.readUInt32LE(i * 8);
        const state = low & 7;
        if (PAYLOAD_STATE_NAMES[state] === undefined) throw corrupt(`payload block ${block} has the reserved state ${state}`);
        counts[state]!++;
        if (state === PAYLOAD_STATE.FULLY_PRESENT || state === PAYLOAD_STATE.PARTIALLY_PRESENT) {
          const entry = decodeBatEntry(page.readBigUInt64LE(i * 8));
          if (state === PAYLOAD_STATE.FULLY_PRESENT) this.checkPayload(block, entry);
          const mb = entry.fileOffset / MiB;
          if (!Number.isSafeInteger(mb) || mb / 8 >= claimed.length) throw corrupt(`payload block ${block} points outside the file`);
          if (claimed[mb >> 3]! & (1 << (mb & 7))) throw corrupt(`two payload blocks share the file offset ${entry.fileOffset}`);
          claimed[mb >> 3]! |= 1 << (mb & 7);
        }
      }
    }
    const states: Record<string, number> = {};
    counts.forEach((c, state) => {
      if (c > 0) states[PAYLOAD_STATE_NAMES[state]!] = c;
    });
    return states;
  }

  /** A payload block's BAT state (PAYLOAD_STATE), e.g. to skip blocks that read as zeros. */
  async blockState(block: number): Promise<number> {
    if (this.closed) throw new ShieldError('invalid_argument', 'The VHDX image is closed.');
    if (!Number.isSafeInteger(block) || block < 0 || block >= this.geometry.payloadBlocks) {
      throw new ShieldError('invalid_argument', `Block ${block} is outside the disk (${this.geometry.payloadBlocks} blocks).`);
    }
    return (await this.batEntry(batIndexOfBlock(block, this.geometry.chunkRatio))).state;
  }

  /**
   * Virtual-disk bytes. Unallocated, zero and unmapped blocks read as zeros. `into` (at least
   * `length` bytes) is filled instead of a new buffer, for callers that stream.
   */
  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    if (this.closed) throw new ShieldError('invalid_argument', 'The VHDX image is closed.');
    const size = this.info.metadata.virtualSize;
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > size) {
      throw new ShieldError('invalid_argument', `A read of ${length} bytes at ${offset} is outside the ${size}-byte disk.`);
    }
    if (length > MAX_READ) throw new ShieldError('invalid_argument', `Reads are limited to ${MAX_READ} bytes at a time.`);
    if (into && into.length < length) throw new ShieldError('invalid_argument', `The buffer holds ${into.length} bytes; the read needs ${length}.`);
    const out = into ? into.subarray(0, length) : Buffer.alloc(length);
    const bs = this.info.metadata.blockSize;
    let pos = offset;
    while (pos < offset + length) {
      const block = Math.floor(pos / bs);
      const within = pos - block * bs;
      const n = Math.min(offset + length - pos, bs - within);
      const entry = await this.batEntry(batIndexOfBlock(block, this.geometry.chunkRatio));
      switch (entry.state) {
        case PAYLOAD_STATE.NOT_PRESENT:
        case PAYLOAD_STATE.UNDEFINED:
        case PAYLOAD_STATE.ZERO:
        case PAYLOAD_STATE.UNMAPPED:
        case PAYLOAD_STATE.UNMAPPED_V095:
          if (into) out.fill(0, pos - offset, pos - offset + n); // a new buffer starts zeroed
          break;
        case PAYLOAD_STATE.FULLY_PRESENT: {
          this.checkPayload(block, entry);
          await this.source.readInto(out.subarray(pos - offset, pos - offset + n), entry.fileOffset + within, `payload block ${block}`);
          break;
        }
        case PAYLOAD_STATE.PARTIALLY_PRESENT:
          throw unsupported(`payload block ${block} is partially present (differencing disks are not read yet)`);
        default:
          throw corrupt(`payload block ${block} has the reserved state ${entry.state}`);
      }
      pos += n;
    }
    return out;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.batPages.clear();
    await this.source.fh.close();
  }
}

export function openVhdx(path: string, opts: OpenOptions = {}): Promise<VhdxImage> {
  return VhdxImage.open(path, opts);
}
