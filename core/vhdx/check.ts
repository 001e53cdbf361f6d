// `vhdx check` (like `qemu-img check`, and `-r all` with repair): every structure of a VHDX file
// is examined with plain reads, as far as the damage allows, and each problem found is reported
// with a stable code. Nothing is written unless repair is asked for; then the repairs go through
// VhdxWritable (the log for the BAT and the region tables, both header slots rewritten), and the
// file is checked again.
//
// What counts as what:
// - error: a reader may refuse the file or read wrong bytes (a damaged header or region table
//   copy, a dirty log, BAT entries outside the file, overlapping, in reserved or invalid states,
//   or with an offset where the specification reserves the field — Hyper-V refuses those).
// - leak: file space nothing references — after the last block, or between blocks (a dynamic or
//   differencing disk only: a fixed file is preallocated, and QEMU makes fixed disks whose blocks
//   are ZERO over reserved space). Space below the first block is the creator's reserve for
//   growing metadata (QEMU leaves 4 MiB after its metadata region), never a leak.
// - warning: against the specification but harmless to every reader we know (UNMAPPED or
//   UNDEFINED with an offset, the pre-1.0 UNMAPPED state 5, reserved bits, sector-bitmap entries
//   in a disk without a parent).
//
// Repairs drop what cannot be read correctly (`qemu-img check -r all` only replays the log: it
// reports BAT entries outside the file or inside a region but cannot fix them). A BAT entry outside
// the file, overlapping a structure or an earlier block (in BAT order: which of two blocks owned
// the bytes cannot be told, and keeping both would alias them), in a reserved state, or
// PARTIALLY_PRESENT without a parent becomes ZERO with offset 0 — it reads as zeros, never as
// garbage or another block's data. ZERO is valid in fixed disks too (QEMU makes them so). A
// dropped block's own space then counts as leaked. An offset in NOT_PRESENT/ZERO/UNMAPPED/UNDEFINED
// is cleared; a block cut short by a truncated file keeps what is left and the file is
// zero-extended; leaked space at the end of a dynamic disk is cut off. Interior leaks stay
// (blocks would have to move). Differencing disks are checked, not
// repaired (the writer does not write them yet). Memory stays flat in disk size: the BAT is read
// a page at a time, and one bit per MiB of the file tracks what is in use.
import { open, type FileHandle } from 'node:fs/promises';
import { toShieldError } from '../errors.ts';
import { NULL_GUID } from './guid.ts';
import { findLogReplay, overlay } from './log.ts';
import { Source } from './reader.ts';
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
  SB_STATE,
  batGeometry,
  batIndexOfBlock,
  checkLayout,
  corrupt,
  currentHeader,
  parseDiskParameters,
  parseFileIdentifier,
  parseHeader,
  parseMetadataTable,
  parseRegionTable,
  type BatEntry,
  type MetadataItem,
  type RegionEntry,
} from './structures.ts';
import { VhdxWritable } from './writer.ts';

export type CheckSeverity = 'error' | 'leak' | 'warning';

export interface CheckFinding {
  /** Stable: header_invalid, headers_disagree, region_table_invalid, region_tables_differ, log_dirty, log_invalid, region_overlap, bat_entry_beyond_eof, bat_entry_overlap, bat_offset_nonzero, bat_reserved_state, bat_reserved_bits, partially_present_in_non_differencing, sector_bitmap_in_non_differencing, sector_bitmap_missing, file_truncated, leaked_space. */
  code: string;
  severity: CheckSeverity;
  message: string;
  repairable: boolean;
  repaired: boolean;
  /** Problems this finding stands for (more than 1 when similar ones are summed up in one line). */
  count: number;
  /** leaked_space: bytes nothing references. */
  bytes?: number;
}

export interface CheckReport {
  type: 'fixed' | 'dynamic' | 'differencing';
  virtualSize: number;
  blockSize: number;
  fileSize: number;
  checkedBlocks: number;
  findings: CheckFinding[];
  summary: { errors: number; leaks: number; leakedBytes: number; warnings: number; repairable: number; repaired: number };
  /** Why nothing can be repaired in this file (differencing disk, unreplayable log, …), else null. */
  cannotRepair: string | null;
}

export interface CheckResult {
  file: string;
  repair: boolean;
  /** The file as found. */
  before: CheckReport;
  /** With repair: the file checked again afterwards; otherwise null. */
  after: CheckReport | null;
}

export interface CheckOptions {
  repair?: boolean;
  /** Bytes of the BAT scanned, per pass ('checking', 'repairing', 'checking again'). */
  onProgress?: (phase: string, done: number, total: number) => void;
}

/** How a finding gets repaired: by opening read-write, by a log entry, or by cutting the file (dynamic only). */
type FixClass = 'open' | 'commit' | 'cut' | null;

interface Draft {
  code: string;
  severity: CheckSeverity;
  message: string;
  fix: FixClass;
  bytes?: number;
}

/** Findings listed one by one per (code, severity, kind of repair); the rest are summed up in one line. */
const LISTED = 20;
/** Space after the last structure that a file without blocks may keep unused (QEMU's data area starts 4 MiB further). */
const SLACK = 4 * MiB;
const BAT_PAGE = MiB;
const MAX_LOG_IN_MEMORY = 64 * MiB;
const MAX_GROWTH = 64 * 1024 * 1024 * MiB + 1024 * MiB;
/** BAT fixes committed per log pass during a repair (each touches at most one 4 KiB sector). */
const FIX_BATCH = 2048;

const mib = (n: number) => (n % MiB === 0 ? `${n / MiB} MiB` : `${n} bytes`);

/** Checks (and with `repair`, repairs) the VHDX at `path`. Throws `vhdx_corrupt` only when it cannot be parsed at all. */
export async function checkVhdx(path: string, opts: CheckOptions = {}): Promise<CheckResult> {
  const progress = (phase: string) => (opts.onProgress ? (done: number, total: number) => opts.onProgress!(phase, done, total) : undefined);
  const first = await inspect(path, { onProgress: progress('checking') });
  if (!opts.repair) return { file: path, repair: false, before: first.report, after: null };
  if (first.report.summary.repairable > 0) {
    await repair(path, first, progress('repairing'));
    for (const f of first.report.findings) f.repaired = f.repairable;
    first.report.summary.repaired = first.report.summary.repairable;
  }
  const again = await inspect(path, { onProgress: progress('checking again') });
  return { file: path, repair: true, before: first.report, after: again.report };
}

async function repair(path: string, found: Inspection, onProgress: ((done: number, total: number) => void) | undefined): Promise<void> {
  const codes = new Set(found.report.findings.filter((f) => f.repairable).map((f) => f.code));
  // A dirty log is replayed on disk here; required user items (a shielded disk's) are kept, not interpreted.
  const w = await VhdxWritable.openForRepair(path, { knownUserItems: found.userItems });
  try {
    // The BAT as it now is on disk (after the replay), fixed a batch at a time through the log.
    const fixes = new Map<number, BatEntry>();
    const pass = await inspect(path, {
      onProgress,
      ...(found.canCommit
        ? {
            fix: async (index: number, entry: BatEntry) => {
              fixes.set(index, entry);
              if (fixes.size >= FIX_BATCH) {
                await w.setBatEntries(fixes);
                fixes.clear();
              }
            },
          }
        : {}),
    });
    if (fixes.size > 0) await w.setBatEntries(fixes);
    if (codes.has('region_table_invalid') || codes.has('region_tables_differ')) await w.rewriteRegionTables();
    if (codes.has('header_invalid') || codes.has('headers_disagree')) await w.rewriteHeaders();
    if (pass.newEnd !== null) await w.setFileEnd(pass.newEnd);
  } finally {
    await w.close();
  }
}

interface Inspection {
  report: CheckReport;
  /** Where a repair ends the file (zero-extended when cut short, leaked tail cut off), or null. */
  newEnd: number | null;
  userItems: string[];
  /** Repairs through the log are possible (the file is repairable and has a log). */
  canCommit: boolean;
}

interface InspectOptions {
  onProgress?: ((done: number, total: number) => void) | undefined;
  /** Repair pass: called with the new entry for each BAT entry that must change. */
  fix?: (batIndex: number, entry: BatEntry) => Promise<void>;
}

async function inspect(path: string, opts: InspectOptions): Promise<Inspection> {
  let fh: FileHandle;
  try {
    fh = await open(path, 'r');
  } catch (err) {
    throw toShieldError(err);
  }
  try {
    return await inspectOpen(fh, opts);
  } catch (err) {
    throw toShieldError(err);
  } finally {
    await fh.close();
  }
}

async function inspectOpen(fh: FileHandle, opts: InspectOptions): Promise<Inspection> {
  // Listed one by one up to LISTED per kind, counted beyond: memory stays bounded whatever the BAT holds.
  const groups = new Map<string, { listed: Draft[]; more: number }>();
  const add = (d: Draft) => {
    const key = `${d.code}/${d.severity}/${d.fix}`;
    let g = groups.get(key);
    if (!g) groups.set(key, (g = { listed: [], more: 0 }));
    if (g.listed.length < LISTED) g.listed.push(d);
    else g.more++;
  };
  const blockers: string[] = [];
  const fileSize = (await fh.stat()).size;
  if (fileSize < HEADER_SECTION) throw corrupt(`the file is ${fileSize} bytes, smaller than the 1 MiB header section`);
  const source = new Source(fh, fileSize);
  const section = await source.read(0, HEADER_SECTION, 'the header section');
  parseFileIdentifier(section);

  // ---- Headers (§2.2.2) -------------------------------------------------------------------
  const slots = HEADER_OFFSETS.map((off, i) => parseHeader(section.subarray(off, off + HEADER_SIZE), (i + 1) as 1 | 2));
  const header = currentHeader(slots, fileSize); // no valid header at all: vhdx_corrupt
  for (const s of slots) {
    if ('invalid' in s) add({ code: 'header_invalid', severity: 'error', fix: 'open', message: `header ${s.slot} is damaged (${s.invalid}); header ${header.slot} is in use` });
  }
  const [h1, h2] = slots;
  if (h1 && h2 && !('invalid' in h1) && !('invalid' in h2) && h1.sequenceNumber === h2.sequenceNumber) {
    const a = section.subarray(HEADER_OFFSETS[0], HEADER_OFFSETS[0] + HEADER_SIZE);
    const b = section.subarray(HEADER_OFFSETS[1], HEADER_OFFSETS[1] + HEADER_SIZE);
    if (!a.equals(b)) {
      add({ code: 'headers_disagree', severity: 'error', fix: 'open', message: `both headers have the sequence number ${h1.sequenceNumber} but differ (QEMU refuses such a file; header 1 is in use)` });
    }
  }

  // ---- Log (§2.3): a dirty log is replayed in memory, so the rest is checked as any opener sees it.
  if (header.logGuid !== NULL_GUID && header.logLength > 0) {
    try {
      if (header.logLength > MAX_LOG_IN_MEMORY) throw new Error(`a ${header.logLength}-byte log is too large to replay here`);
      const replay = findLogReplay(await source.read(header.logOffset, header.logLength, 'the log'), header.logGuid);
      if (fileSize < replay.flushedFileOffset) {
        add({ code: 'file_truncated', severity: 'error', fix: null, message: `the file is shorter (${fileSize} bytes) than its log says it was (${replay.flushedFileOffset}): it was cut short, and the log cannot be replayed` });
        blockers.push('the log cannot be replayed on a file that was cut short');
      } else if (!Number.isSafeInteger(replay.lastFileOffset) || replay.lastFileOffset > fileSize + MAX_GROWTH) {
        add({ code: 'log_invalid', severity: 'error', fix: null, message: `the log claims the file ends at ${replay.lastFileOffset}, far beyond its ${fileSize} bytes` });
        blockers.push('the log cannot be replayed');
      } else {
        source.writes = replay.writes;
        source.size = Math.max(fileSize, replay.lastFileOffset);
        overlay(section, 0, replay.writes);
        add({
          code: 'log_dirty',
          severity: 'error',
          fix: 'open',
          message: `the log holds ${replay.entries} entr${replay.entries === 1 ? 'y' : 'ies'} (${replay.writes.length} writes) not yet applied; tools that cannot replay it (QEMU read-only) refuse the file — checked as it reads after replay`,
        });
      }
    } catch (err) {
      const why = err instanceof Error ? err.message.replace(/^Damaged VHDX: /, '').replace(/\.$/, '') : String(err);
      add({ code: 'log_invalid', severity: 'error', fix: null, message: `the log is marked as holding updates but cannot be replayed (${why}); checked without it` });
      blockers.push('the log cannot be replayed');
    }
  }
  const size = source.size;

  // ---- Region tables (§2.2.3) -----------------------------------------------------------------
  const tableBytes = REGION_TABLE_OFFSETS.map((off) => section.subarray(off, off + REGION_TABLE_SIZE));
  const tables = tableBytes.map((t) => parseRegionTable(t, size));
  const validAt = tables.findIndex((t) => Array.isArray(t));
  if (validAt < 0) throw corrupt(`no valid region table (${tables.map((t, i) => `table ${i + 1}: ${(t as { invalid: string }).invalid}`).join('; ')})`);
  const regions = tables[validAt] as RegionEntry[];
  tables.forEach((t, i) => {
    if (Array.isArray(t)) return;
    add({
      code: 'region_table_invalid',
      severity: 'error',
      fix: 'commit',
      message: `region table ${i + 1} is damaged (${t.invalid})${i === 0 ? '; QEMU reads only table 1, so it refuses the file' : ''}; table ${validAt + 1} is in use`,
    });
  });
  if (tables.every((t) => Array.isArray(t)) && !tableBytes[0]!.equals(tableBytes[1]!)) {
    add({ code: 'region_tables_differ', severity: 'error', fix: 'commit', message: 'the two region tables are valid but differ; table 1 is in use (as QEMU uses it)' });
  }
  if (regions.some((r) => r.required && r.name === 'unknown')) blockers.push('the file has a required region ShieldLab does not know');
  const bat = regions.find((r) => r.guid === REGION.BAT);
  const meta = regions.find((r) => r.guid === REGION.METADATA);
  if (!bat || !meta) throw corrupt(`the ${bat ? 'metadata' : 'BAT'} region is missing`);
  const structures = [
    { name: 'the header section', offset: 0, length: HEADER_SECTION },
    { name: 'the log', offset: header.logOffset, length: header.logLength },
    ...regions.map((r) => ({ name: `the ${r.name === 'unknown' ? `region ${r.guid}` : `${r.name} region`}`, offset: r.fileOffset, length: r.length })),
  ];
  try {
    checkLayout(structures);
  } catch (err) {
    add({ code: 'region_overlap', severity: 'error', fix: null, message: toShieldError(err).message.replace(/^Damaged VHDX: /, '').replace(/\.$/, '') });
    blockers.push('its structures overlap one another');
  }

  // ---- Metadata (§2.6): a file whose metadata cannot be parsed cannot be checked further.
  const items = parseMetadataTable(await source.read(meta.fileOffset, METADATA_TABLE_SIZE, 'the metadata table'), meta.length);
  const itemBytes = new Map<MetadataItem, Buffer>();
  for (const item of items) {
    if (!item.isUser && item.name !== 'unknown') itemBytes.set(item, await source.read(meta.fileOffset + item.offset, item.length, `metadata item ${item.name}`));
  }
  // User items (a shielded disk's key protector) are not ours to interpret here: all count as known.
  const userItems = items.filter((i) => i.isUser).map((i) => i.itemId);
  const params = parseDiskParameters(items, (item) => itemBytes.get(item) ?? Buffer.alloc(0), userItems);
  const geometry = batGeometry(params);
  if (geometry.entries * 8 > bat.length) throw corrupt(`the BAT region holds ${bat.length / 8} entries; the disk needs ${geometry.entries}`);
  const type = params.hasParent ? 'differencing' : params.leaveBlockAllocated ? 'fixed' : 'dynamic';
  if (type === 'differencing') blockers.push('differencing disks are checked, not repaired (ShieldLab does not write them yet)');
  const hasLog = header.logLength > 0;

  // ---- BAT (§2.5), a page at a time ---------------------------------------------------------
  const { chunkRatio, payloadBlocks } = geometry;
  const differencing = params.hasParent;
  const bs = params.blockSize;
  const entries = differencing ? geometry.entries : batIndexOfBlock(payloadBlocks - 1, chunkRatio) + 1;
  // One bit per MiB of the file (and as far past its end as a block cut short may reach).
  const units = Math.ceil(size / MiB) + bs / MiB;
  const used = new Uint8Array(Math.ceil(units / 8) + 1);
  const isUsed = (u: number) => (used[u >> 3]! & (1 << (u & 7))) !== 0;
  const mark = (from: number, to: number) => {
    for (let u = from; u < Math.min(to, units); u++) used[u >> 3]! |= 1 << (u & 7);
  };
  for (const s of structures) mark(Math.floor(s.offset / MiB), Math.ceil((s.offset + s.length) / MiB));
  const structuresEnd = Math.max(...structures.map((s) => s.offset + s.length));
  let firstBlock = Infinity;
  let refEnd = structuresEnd;
  let extendTo = 0;
  let lastTail: [number, number] | null = null;
  const fixes: [number, BatEntry][] = [];
  const fix = (index: number, state: number, fileOffset: number) => fixes.push([index, { state, fileOffset }]);

  /** Where a block (`span` bytes used of `alloc` allocated) may live; true when it is claimed. */
  const place = (what: string, index: number, offset: number, span: number, alloc: number, dropState: number): boolean => {
    const drop = (code: string, message: string) => {
      add({ code, severity: 'error', fix: 'commit', message: `${what} ${message}` });
      fix(index, dropState, 0);
      return false;
    };
    if (offset < HEADER_SECTION) return drop('bat_entry_overlap', `points into the header section (offset ${offset})`);
    if (offset >= size) return drop('bat_entry_beyond_eof', `points beyond the end of the file (offset ${offset}, file ${size} bytes)`);
    const end = offset + Math.ceil(span / MiB) * MiB;
    const s = structures.find((x) => x.length > 0 && offset < x.offset + x.length && x.offset < end);
    if (s) return drop('bat_entry_overlap', `overlaps ${s.name} (offset ${offset})`);
    for (let u = offset / MiB; u < end / MiB; u++) if (isUsed(u)) return drop('bat_entry_overlap', `overlaps an earlier block at offset ${u * MiB} (its offset ${offset}); the earlier one keeps the bytes`);
    mark(offset / MiB, end / MiB);
    if (offset + span > size) {
      add({ code: 'file_truncated', severity: 'error', fix: 'open', message: `${what} ends ${offset + span - size} bytes beyond the end of the file: the file was cut short (a repair zero-fills the rest)` });
      extendTo = Math.max(extendTo, end);
    }
    firstBlock = Math.min(firstBlock, offset);
    refEnd = Math.max(refEnd, offset + alloc);
    return true;
  };

  let partialChunk = -1;
  const zeroPage = Buffer.alloc(BAT_PAGE);
  const total = entries * 8;
  opts.onProgress?.(0, total);
  for (let firstIndex = 0; firstIndex < entries; firstIndex += BAT_PAGE / 8) {
    const n = Math.min(BAT_PAGE / 8, entries - firstIndex);
    const page = await source.read(bat.fileOffset + firstIndex * 8, n * 8, 'the BAT');
    if (page.equals(zeroPage.subarray(0, n * 8))) {
      // NOT_PRESENT everywhere: only a pending partially present chunk's missing bitmap can be wrong here.
      if (partialChunk >= 0 && partialChunk * (chunkRatio + 1) + chunkRatio < firstIndex + n) {
        add({ code: 'sector_bitmap_missing', severity: 'error', fix: null, message: `chunk ${partialChunk} has partially present blocks but no sector bitmap block (state 0)` });
        partialChunk = -1;
      }
    } else {
      for (let i = 0; i < n; i++) {
        const index = firstIndex + i;
        const raw = page.readBigUInt64LE(i * 8);
        const state = Number(raw & 7n);
        const reserved = Number((raw >> 3n) & 0x1ffffn);
        const offset = Number(raw >> 20n) * MiB;
        if ((index + 1) % (chunkRatio + 1) === 0) {
          const chunk = (index + 1) / (chunkRatio + 1) - 1;
          const what = `the sector bitmap entry of chunk ${chunk}`;
          if (!differencing) {
            if (raw !== 0n) {
              add({ code: 'sector_bitmap_in_non_differencing', severity: 'warning', fix: 'commit', message: `${what} is set (state ${state}, offset ${offset}) in a disk without a parent, where it must be NOT_PRESENT; readers ignore it` });
              fix(index, SB_STATE.NOT_PRESENT, 0);
            }
            continue;
          }
          if (reserved !== 0) add({ code: 'bat_reserved_bits', severity: 'warning', fix: 'commit', message: `${what} has reserved bits set (0x${reserved.toString(16)})` });
          if (state === SB_STATE.PRESENT) place(`the sector bitmap block of chunk ${chunk}`, index, offset, MiB, MiB, SB_STATE.NOT_PRESENT);
          else if (state !== SB_STATE.NOT_PRESENT) add({ code: 'bat_reserved_state', severity: 'error', fix: 'commit', message: `${what} has the reserved state ${state}` });
          else if (offset !== 0) add({ code: 'bat_offset_nonzero', severity: 'error', fix: 'commit', message: `${what} is NOT_PRESENT with a non-zero offset (${offset}); the field is reserved` });
          if (partialChunk === chunk && state !== SB_STATE.PRESENT) add({ code: 'sector_bitmap_missing', severity: 'error', fix: null, message: `chunk ${chunk} has partially present blocks but no sector bitmap block (state ${state})` });
          partialChunk = -1;
          continue;
        }
        const block = index - Math.floor(index / (chunkRatio + 1));
        if (block >= payloadBlocks) continue; // the last chunk's entries past the end of the disk
        const what = `payload block ${block}`;
        const name = PAYLOAD_STATE_NAMES[state] ?? `state ${state}`;
        const before = fixes.length;
        if (reserved !== 0) {
          add({ code: 'bat_reserved_bits', severity: 'warning', fix: 'commit', message: `${what} has reserved bits set (0x${reserved.toString(16)}); readers ignore them` });
          fix(index, state, offset);
        }
        switch (state) {
          case PAYLOAD_STATE.NOT_PRESENT:
          case PAYLOAD_STATE.ZERO:
            if (offset !== 0) {
              add({ code: 'bat_offset_nonzero', severity: 'error', fix: 'commit', message: `${what} is ${name} with a non-zero offset (${offset}): the field is reserved, and Hyper-V refuses such a file` });
              fix(index, state, 0);
            }
            break;
          case PAYLOAD_STATE.UNDEFINED:
          case PAYLOAD_STATE.UNMAPPED:
            if (offset !== 0) {
              add({ code: 'bat_offset_nonzero', severity: 'warning', fix: 'commit', message: `${what} is ${name} with an offset (${offset}); allowed for earlier contents, but no reader uses it, QEMU and ShieldLab write 0` });
              fix(index, state, 0);
            }
            break;
          case PAYLOAD_STATE.UNMAPPED_V095:
            add({ code: 'bat_reserved_state', severity: 'warning', fix: 'commit', message: `${what} has state 5 (UNMAPPED in the pre-1.0 draft; QEMU and ShieldLab read zeros), reserved in MS-VHDX 1.0` });
            fix(index, PAYLOAD_STATE.UNMAPPED, 0);
            break;
          case PAYLOAD_STATE.FULLY_PRESENT:
          case PAYLOAD_STATE.PARTIALLY_PRESENT: {
            if (state === PAYLOAD_STATE.PARTIALLY_PRESENT && !differencing) {
              add({ code: 'partially_present_in_non_differencing', severity: 'error', fix: 'commit', message: `${what} is PARTIALLY_PRESENT in a disk without a parent (QEMU and ShieldLab refuse to read it)` });
              fix(index, PAYLOAD_STATE.ZERO, 0);
              break;
            }
            const needed = Math.min(bs, params.virtualSize - block * bs);
            // Differencing: a dropped block reads from the parent again (NOT_PRESENT); otherwise zeros.
            if (place(what, index, offset, needed, bs, differencing ? PAYLOAD_STATE.NOT_PRESENT : PAYLOAD_STATE.ZERO)) {
              if (needed < bs) lastTail = [Math.ceil((offset + needed) / MiB), (offset + bs) / MiB];
              if (state === PAYLOAD_STATE.PARTIALLY_PRESENT) partialChunk = Math.floor(block / chunkRatio);
            }
            break;
          }
          default:
            add({ code: 'bat_reserved_state', severity: 'error', fix: 'commit', message: `${what} has the reserved state ${state} (readers refuse it)` });
            fix(index, PAYLOAD_STATE.ZERO, 0);
        }
        // One entry, one fix: the last one decided wins (it already carries the state to keep).
        if (fixes.length - before > 1) fixes.splice(before, fixes.length - before - 1);
      }
    }
    if (opts.fix) {
      for (const [index, entry] of fixes) await opts.fix(index, entry);
    }
    fixes.length = 0;
    opts.onProgress?.(Math.min(total, (firstIndex + n) * 8), total);
  }
  if (partialChunk >= 0) add({ code: 'sector_bitmap_missing', severity: 'error', fix: null, message: `chunk ${partialChunk} has partially present blocks but no sector bitmap entry` });

  // ---- Leaks: space nothing references, above the first block (or the creator's reserve). ------
  let newEnd: number | null = null;
  if (type !== 'fixed') {
    if (lastTail) mark(lastTail[0], lastTail[1]); // the unused end of a short last block is still its own
    const reserveEnd = Number.isFinite(firstBlock) ? firstBlock : structuresEnd + SLACK;
    const tailStart = Math.max(refEnd, reserveEnd);
    let interior = 0;
    const ranges: [number, number][] = []; // the first few, for the message
    let rangeCount = 0;
    let lastEnd = -1;
    for (let u = Math.ceil(reserveEnd / MiB); u * MiB < Math.min(refEnd, size); u++) {
      if ((u & 7) === 0 && used[u >> 3] === 0xff) {
        u += 7;
        continue;
      }
      if (isUsed(u)) continue;
      const bytes = Math.min(MiB, size - u * MiB);
      interior += bytes;
      if (lastEnd !== u * MiB) {
        rangeCount++;
        if (ranges.length < 5) ranges.push([u * MiB, u * MiB]);
      }
      lastEnd = u * MiB + bytes;
      if (rangeCount <= 5) ranges[ranges.length - 1]![1] = lastEnd;
    }
    if (interior > 0) {
      const shown = ranges.slice(0, 5).map(([a, b]) => `${a}–${b}`).join(', ');
      add({
        code: 'leaked_space',
        severity: 'leak',
        fix: null,
        bytes: interior,
        message: `${mib(interior)} between blocks is referenced by nothing (${rangeCount} range${rangeCount === 1 ? '' : 's'}: ${shown}${rangeCount > 5 ? ', …' : ''}); harmless, it stays until the disk is converted`,
      });
    }
    if (size > tailStart) {
      add({ code: 'leaked_space', severity: 'leak', fix: 'cut', bytes: size - tailStart, message: `${mib(size - tailStart)} at the end of the file (from ${tailStart}) is referenced by nothing` });
      newEnd = tailStart;
    }
  }
  if (extendTo > size) newEnd = extendTo;

  // ---- The report ------------------------------------------------------------------------
  const cannotRepair = blockers.length > 0 ? blockers.join('; ') : null;
  const repairable = (f: FixClass) => f !== null && cannotRepair === null && (f !== 'commit' || hasLog) && (f !== 'cut' || type === 'dynamic');
  const findings: CheckFinding[] = [];
  for (const { listed, more } of groups.values()) {
    for (const d of listed) {
      findings.push({ code: d.code, severity: d.severity, message: d.message, repairable: repairable(d.fix), repaired: false, count: 1, ...(d.bytes !== undefined ? { bytes: d.bytes } : {}) });
    }
    const d = listed[0]!;
    if (more > 0) findings.push({ code: d.code, severity: d.severity, message: `… and ${more} more like these`, repairable: repairable(d.fix), repaired: false, count: more });
  }
  const sum = (pred: (f: CheckFinding) => boolean) => findings.filter(pred).reduce((n, f) => n + f.count, 0);
  const report: CheckReport = {
    type,
    virtualSize: params.virtualSize,
    blockSize: bs,
    fileSize,
    checkedBlocks: payloadBlocks,
    findings,
    summary: {
      errors: sum((f) => f.severity === 'error'),
      leaks: sum((f) => f.severity === 'leak'),
      leakedBytes: findings.reduce((n, f) => n + (f.bytes ?? 0), 0),
      warnings: sum((f) => f.severity === 'warning'),
      repairable: sum((f) => f.repairable),
      repaired: 0,
    },
    cannotRepair,
  };
  return {
    report,
    newEnd: report.findings.some((f) => f.repairable && (f.code === 'leaked_space' || f.code === 'file_truncated')) ? newEnd : null,
    userItems,
    canCommit: repairable('commit'),
  };
}
