// Opening a VHDX and reading its virtual disk: fixed, dynamic and differencing disks (a chain of
// parents found through each child's parent locator), every payload-block state. The BAT and the
// sector bitmaps are read on demand with small bounded caches, so memory stays flat whatever the
// disk size.
import { open, realpath, stat, type FileHandle } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { ShieldError, toShieldError } from '../errors.ts';
import { NULL_GUID } from './guid.ts';
import { InlineIo } from './inline-io.ts';
import { findLogReplay, overlay, type LogWrite } from './log.ts';
import {
  HEADER_OFFSETS,
  HEADER_SECTION,
  HEADER_SIZE,
  METADATA_ITEM,
  METADATA_TABLE_SIZE,
  MiB,
  PARENT_PATH_KEYS,
  PAYLOAD_STATE,
  PAYLOAD_STATE_NAMES,
  REGION,
  REGION_TABLE_OFFSETS,
  REGION_TABLE_SIZE,
  SB_STATE,
  batGeometry,
  batIndexOfBlock,
  checkLayout,
  corrupt,
  currentHeader,
  decodeBatEntry,
  parseDiskParameters,
  parseFileIdentifier,
  parseHeader,
  parseLinkageGuid,
  parseMetadataTable,
  parseParentLocator,
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
  /** A differencing disk's parent (null for fixed and dynamic disks). */
  parent: VhdxParentInfo | null;
}

export interface VhdxParentInfo {
  /** The parent locator's key/value pairs as stored (parent_linkage, relative_path, …). */
  locator: Record<string, string>;
  /** The parent file opened (absolute), or null while it is not open. */
  path: string | null;
  /** What found it: the locator key, or 'option' (OpenOptions.parent, `--parent`). */
  foundBy: string | null;
  /** The locator key whose GUID equals the parent's DataWriteGuid: parent_linkage or parent_linkage2. */
  linkage: string | null;
  /** The parent's current DataWriteGuid. */
  dataWriteGuid: string | null;
  /** Candidates passed over before the one opened, each with why. */
  skipped: string[];
  /** Every ancestor, the parent first, the root (a fixed or dynamic disk) last. */
  chain: { path: string; type: 'fixed' | 'dynamic' | 'differencing'; virtualSize: number; dataWriteGuid: string }[];
}

export interface OpenOptions {
  readOnly?: boolean;
  /** User metadata items a caller understands (e.g. the shielded disk's key protector item). */
  knownUserItems?: readonly string[];
  /** Regions a caller understands (e.g. the shielded disk's tag region), so a required one is accepted. */
  knownRegions?: readonly string[];
  /**
   * A differencing disk's parent file, instead of the paths in its parent locator (relative ones
   * from the current directory). Its DataWriteGuid must still match the locator's parent_linkage.
   */
  parent?: string;
  /**
   * Small payload and region reads (and, opened for writing, writes) are done synchronously while
   * the page cache answers them fast (see inline-io.ts): for servers whose I/O is many small
   * requests. Default false.
   */
  inlineIo?: boolean;
}

const BAT_PAGE = MiB;
const BAT_CACHE_PAGES = 8;
const MAX_READ = 256 * MiB;
/** Sector-bitmap blocks (1 MiB each) kept per image. */
const SB_CACHE_BLOCKS = 4;
/** Ancestors a differencing disk may have (parents of parents); more is refused. */
export const MAX_PARENT_CHAIN = 16;

/**
 * The file as readers see it: its bytes, with a dirty log's writes applied in memory on a
 * read-only open, and zeros up to the log's LastFileOffset past the real end of the file.
 */
export class Source {
  readonly fh: FileHandle;
  readonly fileSize: number;
  size: number;
  writes: LogWrite[] = [];
  /** Set by OpenOptions.inlineIo. */
  inline: InlineIo | null = null;

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
    if (real > 0 && this.inline?.use(real)) {
      done = this.inline.read(this.fh.fd, buf, 0, real, offset);
      if (done < real) throw corrupt(`${what} is cut short (the file shrank while reading)`);
    }
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

/** What an image is built from once every structure has been checked. */
type ImageParts = [source: Source, info: VhdxInfo, geometry: BatGeometry, bat: RegionEntry, structures: { name: string; offset: number; length: number }[]];

const MAX_LOG_IN_MEMORY = 64 * MiB;
/** How far a log may say the file grew past its real end: the largest disk plus its largest BAT. */
const MAX_GROWTH = 64 * 1024 * 1024 * MiB + 1024 * MiB;

export class VhdxImage {
  readonly info: VhdxInfo;
  protected readonly source: Source;
  protected readonly geometry: BatGeometry;
  protected readonly bat: RegionEntry;
  protected readonly structures: { name: string; offset: number; length: number }[];
  protected readonly batPages = new Map<number, Buffer>();
  /** Bumped by a writer whenever BAT sectors change on disk. */
  protected batEpoch = 0;
  /** The file's MiB units claimed by payload blocks (one bit each), filled by countStates(). */
  protected claimed = new Uint8Array(0);
  protected closed = false;
  /** A differencing disk's parent, open read-only; closed with this image. */
  protected parent: VhdxImage | null = null;
  private readonly bitmaps = new Map<number, Buffer>();

  protected constructor(source: Source, info: VhdxInfo, geometry: BatGeometry, bat: RegionEntry, structures: { name: string; offset: number; length: number }[]) {
    this.source = source;
    this.info = info;
    this.geometry = geometry;
    this.bat = bat;
    this.structures = structures;
  }

  /** Parses and checks every structure; a dirty log is replayed in memory on a read-only open. */
  static async open(path: string, opts: OpenOptions = {}): Promise<VhdxImage> {
    if (opts.readOnly === false) throw unsupported('this reader opens read-only; use openVhdx from core/vhdx/mod.ts to write');
    let fh: FileHandle;
    try {
      fh = await open(path, 'r');
    } catch (err) {
      throw toShieldError(err);
    }
    const image = await VhdxImage.load(fh, opts, (...parts) => new VhdxImage(...parts));
    await image.attachParent(path, opts);
    return image;
  }

  /**
   * Parses an open file (closing it on failure) and builds the image with `make`, so a subclass
   * that writes can share every check. A writer replays a dirty log on disk before calling this.
   */
  protected static async load<T extends VhdxImage>(fh: FileHandle, opts: OpenOptions, make: (...parts: ImageParts) => T): Promise<T> {
    try {
      const fileSize = (await fh.stat()).size;
      if (fileSize < HEADER_SECTION) throw corrupt(`the file is ${fileSize} bytes, smaller than the 1 MiB header section`);
      const source = new Source(fh, fileSize);
      if (opts.inlineIo) source.inline = new InlineIo();
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
      for (const r of regions) if (r.required && r.name === 'unknown' && !opts.knownRegions?.includes(r.guid)) throw unsupported(`required region ${r.guid} is unknown`);
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
      const locatorItem = params.hasParent ? items.find((x) => x.itemId === METADATA_ITEM.PARENT_LOCATOR && !x.isUser) : undefined;
      const locator = locatorItem ? parseParentLocator(itemBytes.get(locatorItem) ?? Buffer.alloc(0)) : null;
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
        parent: locator ? { locator: locator.entries, path: null, foundBy: null, linkage: null, dataWriteGuid: null, skipped: [], chain: [] } : null,
      };
      const image = make(source, info, geometry, bat, structures);
      info.bat.states = await image.countStates();
      return image;
    } catch (err) {
      await fh.close();
      throw toShieldError(err);
    }
  }

  protected async batEntry(index: number): Promise<BatEntry> {
    const perPage = BAT_PAGE / 8;
    const pageNo = Math.floor(index / perPage);
    let page = this.batPages.get(pageNo);
    if (!page) {
      const offset = this.bat.fileOffset + pageNo * BAT_PAGE;
      const length = Math.min(BAT_PAGE, this.bat.length - pageNo * BAT_PAGE);
      const epoch = this.batEpoch;
      page = await this.source.read(offset, length, 'the BAT');
      // A writer changed the BAT while this page was read: use it for this entry, never cache it.
      if (epoch === this.batEpoch) {
        if (this.batPages.size >= BAT_CACHE_PAGES) this.batPages.delete(this.batPages.keys().next().value!);
        this.batPages.set(pageNo, page);
      }
    }
    return decodeBatEntry(page.readBigUInt64LE((index % perPage) * 8));
  }

  /** Where a block's data lives, checked against the file and the metadata structures. */
  protected checkPayload(block: number, entry: BatEntry): void {
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
  protected async countStates(): Promise<Record<string, number>> {
    const counts = new Array<number>(8).fill(0);
    const claimed = new Uint8Array(Math.ceil(this.source.size / MiB / 8) + 1);
    const { chunkRatio, payloadBlocks } = this.geometry;
    const perPage = BAT_PAGE / 8;
    const zeroPage = Buffer.alloc(BAT_PAGE);
    const differencing = this.info.metadata.hasParent;
    // A differencing disk's BAT is read to the last chunk's sector-bitmap entry; others' to the last block's.
    const entries = differencing ? this.geometry.entries : batIndexOfBlock(payloadBlocks - 1, chunkRatio) + 1;
    /** Payload entries of the disk's blocks among BAT indices below `index` (not the last chunk's padding). */
    const blocksBelow = (index: number) => Math.min(payloadBlocks, index - Math.floor(index / (chunkRatio + 1)));
    const claim = (what: string, fileOffset: number) => {
      const mb = fileOffset / MiB;
      if (!Number.isSafeInteger(mb) || mb / 8 >= claimed.length) throw corrupt(`${what} points outside the file`);
      if (claimed[mb >> 3]! & (1 << (mb & 7))) throw corrupt(`${what} shares the file offset ${fileOffset} with another block`);
      claimed[mb >> 3]! |= 1 << (mb & 7);
    };
    /** The chunk of the last partially present block whose sector-bitmap entry is still ahead. */
    let partialChunk = -1;
    const noBitmap = (chunk: number, state: number) => corrupt(`chunk ${chunk} has partially present blocks but its sector bitmap block is not present (state ${state})`);
    for (let first = 0; first < entries; first += perPage) {
      const n = Math.min(perPage, entries - first);
      const page = await this.source.read(this.bat.fileOffset + first * 8, n * 8, 'the BAT');
      if (page.equals(zeroPage.subarray(0, n * 8))) {
        // NOT_PRESENT everywhere: count the payload entries among them (sector-bitmap entries excluded).
        counts[PAYLOAD_STATE.NOT_PRESENT]! += blocksBelow(first + n) - blocksBelow(first);
        if (partialChunk >= 0 && partialChunk * (chunkRatio + 1) + chunkRatio < first + n) throw noBitmap(partialChunk, 0);
        continue;
      }
      for (let i = 0; i < n; i++) {
        const index = first + i;
        if ((index + 1) % (chunkRatio + 1) === 0) {
          // A sector-bitmap entry: unused (and not checked) outside differencing disks.
          if (!differencing) continue;
          const chunk = (index + 1) / (chunkRatio + 1) - 1;
          const entry = decodeBatEntry(page.readBigUInt64LE(i * 8));
          if (entry.state === SB_STATE.PRESENT) {
            this.checkBitmapBlock(chunk, entry);
            claim(`the sector bitmap block of chunk ${chunk}`, entry.fileOffset);
          } else if (entry.state !== SB_STATE.NOT_PRESENT) throw corrupt(`the sector bitmap block of chunk ${chunk} has the reserved state ${entry.state}`);
          else if (partialChunk === chunk) throw noBitmap(chunk, entry.state);
          partialChunk = -1;
          continue;
        }
        const block = index - Math.floor(index / (chunkRatio + 1));
        if (block >= payloadBlocks) continue; // the last chunk's entries past the end of the disk
        const low = page.readUInt32LE(i * 8);
        const state = low & 7;
        if (PAYLOAD_STATE_NAMES[state] === undefined) throw corrupt(`payload block ${block} has the reserved state ${state}`);
        if (state === PAYLOAD_STATE.PARTIALLY_PRESENT && !differencing) throw corrupt(`payload block ${block} is partially present in a disk without a parent`);
        counts[state]!++;
        if (state === PAYLOAD_STATE.FULLY_PRESENT || state === PAYLOAD_STATE.PARTIALLY_PRESENT) {
          const entry = decodeBatEntry(page.readBigUInt64LE(i * 8));
          this.checkPayload(block, entry);
          claim(`payload block ${block}`, entry.fileOffset);
          if (state === PAYLOAD_STATE.PARTIALLY_PRESENT) partialChunk = Math.floor(block / chunkRatio);
        }
      }
    }
    this.claimed = claimed;
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
          // A differencing disk reads the blocks it does not hold from its parent; the rest read as zeros.
          if (entry.state === PAYLOAD_STATE.NOT_PRESENT && this.info.metadata.hasParent) await this.readParent(out.subarray(pos - offset, pos - offset + n), pos);
          else if (into) out.fill(0, pos - offset, pos - offset + n); // a new buffer starts zeroed
          break;
        case PAYLOAD_STATE.FULLY_PRESENT: {
          this.checkPayload(block, entry);
          await this.source.readInto(out.subarray(pos - offset, pos - offset + n), entry.fileOffset + within, `payload block ${block}`);
          break;
        }
        case PAYLOAD_STATE.PARTIALLY_PRESENT:
          if (!this.info.metadata.hasParent) throw corrupt(`payload block ${block} is partially present in a disk without a parent`);
          this.checkPayload(block, entry);
          await this.readPartial(block, entry, within, out.subarray(pos - offset, pos - offset + n));
          break;
        default:
          throw corrupt(`payload block ${block} has the reserved state ${entry.state}`);
      }
      pos += n;
    }
    return out;
  }

  // ---- Differencing disks --------------------------------------------------------------------

  /**
   * Finds, opens and checks a differencing disk's parent (then its parent, and so on): the path
   * in `opts.parent`, else the locator's relative_path (from this file's directory), then its
   * absolute_win32_path when that is a path of this system (volume paths and drive-letter paths
   * cannot be opened here). A candidate is the parent when its current DataWriteGuid is the
   * locator's parent_linkage (or a non-null parent_linkage2) and its logical sector size is this
   * disk's. Cycles and chains deeper than MAX_PARENT_CHAIN are refused. On failure this image is
   * closed and the error is `vhdx_parent_invalid`, naming each path tried and why it was passed
   * over. Its virtual size may differ from this disk's (MS-VHDX wants them equal): the parent's
   * bytes are read where it has them, zeros beyond its end.
   */
  protected async attachParent(path: string, opts: OpenOptions, below: readonly string[] = []): Promise<void> {
    const p = this.info.parent;
    if (!p && opts.parent !== undefined) {
      await this.close();
      throw new ShieldError('invalid_argument', `${path} is a ${this.info.type} disk, not a differencing one: it has no parent to override.`);
    }
    if (!p || this.parent) return;
    try {
      const self = await realpath(path).catch(() => resolve(path));
      const chain = [...below, self];
      if (chain.length > MAX_PARENT_CHAIN) throw parentInvalid(path, [`the chain of differencing disks is deeper than ${MAX_PARENT_CHAIN}`]);
      const wanted = (['parent_linkage', 'parent_linkage2'] as const)
        .map((key) => ({ key, guid: Object.hasOwn(p.locator, key) ? parseLinkageGuid(p.locator[key]!) : null }))
        .filter((x): x is { key: 'parent_linkage' | 'parent_linkage2'; guid: string } => x.guid !== null && x.guid !== NULL_GUID);
      if (wanted.length === 0) throw parentInvalid(path, ['its parent_linkage is the null GUID, which no parent can match']);
      const skipped: string[] = [];
      const seen = new Set<string>();
      for (const c of parentCandidates(path, p.locator, opts.parent)) {
        const what = `${c.key} ${JSON.stringify(c.value.length > 200 ? `${c.value.slice(0, 200)}…` : c.value)}${c.file !== null && c.file !== c.value ? ` (${c.file})` : ''}`;
        if (c.file === null) {
          skipped.push(`${what}: ${c.why}`);
          continue;
        }
        let real: string;
        try {
          real = await realpath(c.file);
          if (!(await stat(real)).isFile()) throw Object.assign(new Error('not a regular file'), { code: 'not a regular file' });
        } catch (err) {
          const code = (err as { code?: unknown }).code;
          skipped.push(`${what}: ${code === 'ENOENT' ? 'not found' : typeof code === 'string' ? code : 'cannot be opened'}`);
          continue;
        }
        if (seen.has(real)) continue; // the same file as an earlier candidate
        seen.add(real);
        if (chain.includes(real)) {
          skipped.push(`${what}: ${real === self ? 'is this disk itself' : 'is a disk below it in the chain'} (a cycle)`);
          continue;
        }
        let parent: VhdxImage;
        try {
          const fh = await open(real, 'r');
          const parentOpts: OpenOptions = { readOnly: true, ...(opts.knownUserItems ? { knownUserItems: opts.knownUserItems } : {}) };
          parent = await VhdxImage.load(fh, parentOpts, (...parts) => new VhdxImage(...parts));
        } catch (err) {
          skipped.push(`${what}: ${toShieldError(err).message.slice(0, 400)}`);
          continue;
        }
        const guid = parent.info.header.dataWriteGuid;
        const match = wanted.find((w) => w.guid === guid);
        const problem = !match
          ? `its DataWriteGuid {${guid}} is not the locator's ${wanted.map((w) => `${w.key} {${w.guid}}`).join(' or ')} (changed since this child was made, or another disk)`
          : parent.info.metadata.logicalSectorSize !== this.info.metadata.logicalSectorSize
            ? `its logical sector size ${parent.info.metadata.logicalSectorSize} differs from this disk's ${this.info.metadata.logicalSectorSize}`
            : null;
        if (problem) {
          await parent.close();
          skipped.push(`${what}: ${problem}`);
          continue;
        }
        // The right file: a failure further up its own chain is this chain's failure.
        await parent.attachParent(real, opts.parent === undefined ? opts : { ...opts, parent: undefined }, chain);
        this.parent = parent;
        const pi = parent.info;
        Object.assign(p, {
          path: real,
          foundBy: c.key,
          linkage: match!.key,
          dataWriteGuid: guid,
          skipped,
          chain: [{ path: real, type: pi.type, virtualSize: pi.metadata.virtualSize, dataWriteGuid: guid }, ...(pi.parent?.chain ?? [])],
        });
        return;
      }
      throw parentInvalid(path, skipped);
    } catch (err) {
      await this.close();
      throw toShieldError(err);
    }
  }

  /**
   * Whether a payload block reads as zeros without any data behind it: a state that reads as zeros
   * here, or NOT_PRESENT in a differencing disk whose parent chain holds no data there either.
   * (blockState() alone cannot tell: a differencing disk's NOT_PRESENT blocks show its parent.)
   */
  async blockReadsAsZeros(block: number): Promise<boolean> {
    const state = await this.blockState(block);
    if (state === PAYLOAD_STATE.FULLY_PRESENT || state === PAYLOAD_STATE.PARTIALLY_PRESENT) return false;
    if (state !== PAYLOAD_STATE.NOT_PRESENT || !this.info.metadata.hasParent) return true;
    const parent = this.parent;
    if (!parent) throw new ShieldError('vhdx_parent_invalid', 'This differencing disk was opened without its parent.');
    const bs = this.info.metadata.blockSize;
    const pbs = parent.info.metadata.blockSize;
    const end = Math.min((block + 1) * bs, this.info.metadata.virtualSize, parent.info.metadata.virtualSize);
    for (let b = Math.floor((block * bs) / pbs); b * pbs < end; b++) if (!(await parent.blockReadsAsZeros(b))) return false;
    return true;
  }

  /** The parent's bytes at `offset` (the same virtual offset); zeros past the parent's end. */
  private async readParent(dest: Buffer, offset: number): Promise<void> {
    const parent = this.parent;
    if (!parent) throw new ShieldError('vhdx_parent_invalid', 'This differencing disk was opened without its parent.');
    const n = Math.max(0, Math.min(dest.length, parent.info.metadata.virtualSize - offset));
    if (n > 0) await parent.read(offset, n, dest);
    if (n < dest.length) dest.fill(0, n);
  }

  /** A sector-bitmap block's place, checked like a payload block's. */
  private checkBitmapBlock(chunk: number, entry: BatEntry): void {
    if (entry.fileOffset < HEADER_SECTION || entry.fileOffset + MiB > this.source.size) {
      throw corrupt(`the sector bitmap block of chunk ${chunk} points outside the file (offset ${entry.fileOffset})`);
    }
    for (const s of this.structures) {
      if (entry.fileOffset < s.offset + s.length && s.offset < entry.fileOffset + MiB) throw corrupt(`the sector bitmap block of chunk ${chunk} overlaps ${s.name}`);
    }
  }

  /** A chunk's sector bitmap (1 MiB, one bit per logical sector), from a small bounded cache. */
  private async sectorBitmap(chunk: number): Promise<Buffer> {
    const cached = this.bitmaps.get(chunk);
    if (cached) return cached;
    const { chunkRatio } = this.geometry;
    const entry = await this.batEntry(chunk * (chunkRatio + 1) + chunkRatio);
    if (entry.state !== SB_STATE.PRESENT) throw corrupt(`chunk ${chunk} has partially present blocks but its sector bitmap block is not present (state ${entry.state})`);
    this.checkBitmapBlock(chunk, entry);
    const bitmap = await this.source.read(entry.fileOffset, MiB, `the sector bitmap block of chunk ${chunk}`);
    if (this.bitmaps.size >= SB_CACHE_BLOCKS) this.bitmaps.delete(this.bitmaps.keys().next().value!);
    this.bitmaps.set(chunk, bitmap);
    return bitmap;
  }

  /**
   * Part of a partially present block (`within` bytes into it): each run of sectors whose bitmap
   * bits agree is one read, from this file (bit 1, LSB first) or from the parent (bit 0).
   */
  private async readPartial(block: number, entry: BatEntry, within: number, dest: Buffer): Promise<void> {
    const { chunkRatio } = this.geometry;
    const bs = this.info.metadata.blockSize;
    const lss = this.info.metadata.logicalSectorSize;
    const bitmap = await this.sectorBitmap(Math.floor(block / chunkRatio));
    const base = (block % chunkRatio) * (bs / lss); // bit of the block's first sector in the chunk's bitmap
    const bit = (sector: number) => (bitmap[(base + sector) >> 3]! >> ((base + sector) & 7)) & 1;
    const end = within + dest.length;
    const lastSector = Math.ceil(end / lss);
    let pos = within;
    while (pos < end) {
      const present = bit(Math.floor(pos / lss));
      let s = Math.floor(pos / lss) + 1;
      while (s < lastSector) {
        const b = base + s;
        if ((b & 7) === 0 && s + 8 <= lastSector && bitmap[b >> 3] === (present ? 0xff : 0)) s += 8; // a whole byte alike
        else if (bit(s) === present) s++;
        else break;
      }
      const runEnd = Math.min(end, s * lss);
      const part = dest.subarray(pos - within, runEnd - within);
      if (present) await this.source.readInto(part, entry.fileOffset + pos, `payload block ${block}`);
      else await this.readParent(part, block * bs + pos);
      pos = runEnd;
    }
  }

  /**
   * The bytes of a user metadata item the caller declared in `knownUserItems`, or null when the
   * file has no such item. Read on demand; never cached, so a writer's update is seen at once.
   */
  async regionBytes(guid: string, offset: number, into: Buffer): Promise<Buffer> {
    if (this.closed) throw new ShieldError('invalid_argument', 'The VHDX image is closed.');
    const r = this.regionOf(guid, offset, into.length);
    return this.source.readInto(into, r.fileOffset + offset, `region ${guid}`);
  }

  /** A region by GUID, with a range inside it checked. */
  protected regionOf(guid: string, offset: number, length: number): RegionEntry {
    const r = this.info.regions.find((x) => x.guid === guid);
    if (!r) throw new ShieldError('invalid_argument', `The file has no region ${guid}.`);
    if (!Number.isSafeInteger(offset) || offset < 0 || offset + length > r.length) throw new ShieldError('invalid_argument', `${length} bytes at ${offset} lie outside region ${guid} (${r.length} bytes).`);
    return r;
  }

  async userItem(itemId: string): Promise<Buffer | null> {
    if (this.closed) throw new ShieldError('invalid_argument', 'The VHDX image is closed.');
    const item = this.info.metadata.items.find((i) => i.isUser && i.itemId === itemId);
    if (!item) return null;
    const meta = this.info.regions.find((r) => r.guid === REGION.METADATA)!;
    return this.source.read(meta.fileOffset + item.offset, item.length, `user metadata item ${itemId}`);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.batPages.clear();
    this.bitmaps.clear();
    try {
      await this.source.fh.close();
    } finally {
      await this.parent?.close();
    }
  }
}

function parentInvalid(child: string, reasons: string[]): ShieldError {
  const list = reasons.length > 0 ? reasons.join('; ') : 'its parent locator names no path';
  return new ShieldError('vhdx_parent_invalid', `The parent of ${child} could not be opened: ${list}.`, { details: { child, tried: reasons } });
}

interface ParentCandidate {
  key: string;
  value: string;
  /** The path to try, or null when this value cannot name a file here (then `why`). */
  file: string | null;
  why?: string;
}

/** Where a child's parent may be, in the order to try (MS-VHDX §2.6.2.6.1: relative, volume, absolute). */
function parentCandidates(childPath: string, locator: Record<string, string>, override: string | undefined): ParentCandidate[] {
  if (override !== undefined) return [{ key: 'option', value: override, file: resolve(override) }];
  const out: ParentCandidate[] = [];
  for (const key of PARENT_PATH_KEYS) {
    if (!Object.hasOwn(locator, key)) continue;
    const value = locator[key]!;
    if (key === 'relative_path') {
      // Windows separators; ".\parent.vhdx" is how Hyper-V writes a parent in the same folder.
      let rel = value.replaceAll('\\', '/');
      if (rel.startsWith('./')) rel = rel.slice(2);
      out.push(rel === '' || rel.includes('\0') ? { key, value, file: null, why: 'not a path' } : { key, value, file: resolve(dirname(resolve(childPath)), rel) });
    } else if (key === 'volume_path') {
      out.push({ key, value, file: null, why: 'a Windows volume path cannot be opened here' });
    } else {
      const path = value.startsWith('\\\\?\\') ? value.slice(4) : value;
      // A POSIX absolute path is what a child made on Linux carries; C:\… only means something on Windows.
      out.push(path.startsWith('/') && !path.includes('\0') ? { key, value, file: path } : { key, value, file: null, why: 'a Windows path cannot be opened here' });
    }
  }
  return out;
}

export function openVhdx(path: string, opts: OpenOptions = {}): Promise<VhdxImage> {
  return VhdxImage.open(path, opts);
}
