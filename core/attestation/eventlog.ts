// The TCG PC Client event log (TCG PC Client Platform Firmware Profile, "crypto agile" format):
// parse it, replay it into PCR values per bank, and decode the event data that explains a change.
//
// Layout: a TCG_PCR_EVENT in the old SHA-1 format carrying the `Spec ID Event03` TCG_EfiSpecIDEvent
// (the table of hash algorithms and digest sizes), then TCG_PCR_EVENT2 entries:
//   pcrIndex u32 | eventType u32 | TPML_DIGEST_VALUES (count u32, {algId u16, digest}) | eventSize u32 | event
// All integers little-endian. A log with no Spec ID Event03 is the old SHA-1 format throughout.
// Every size and count is checked against the buffer; a malformed log is ShieldError('eventlog_invalid')
// naming the event and byte offset. Event *data* that does not decode is kept (detail kind 'malformed'):
// it is still what was measured, and the digests are what replay trusts.
import { createHash } from 'node:crypto';
import { ShieldError } from '../errors.ts';

export const MAX_LOG_BYTES = 64 * 1024 * 1024;
export const MAX_EVENT_BYTES = 16 * 1024 * 1024;
/** PC Client TPMs have 24 PCRs. */
export const PCR_COUNT = 24;
/** PCRs a baseline covers unless configured otherwise. */
export const DEFAULT_PCRS: readonly number[] = [0, 1, 2, 3, 4, 5, 6, 7];

/** TPM_ALG_ID → our name, digest size and node:crypto name (TPM 2.0 Part 2, TCG Algorithm Registry). */
export const HASH_ALGS = {
  sha1: { id: 0x0004, size: 20, node: 'sha1' },
  sha256: { id: 0x000b, size: 32, node: 'sha256' },
  sha384: { id: 0x000c, size: 48, node: 'sha384' },
  sha512: { id: 0x000d, size: 64, node: 'sha512' },
  sm3_256: { id: 0x0012, size: 32, node: 'sm3' },
  sha3_256: { id: 0x0027, size: 32, node: 'sha3-256' },
  sha3_384: { id: 0x0028, size: 48, node: 'sha3-384' },
  sha3_512: { id: 0x0029, size: 64, node: 'sha3-512' },
} as const;
export type HashAlgName = keyof typeof HASH_ALGS;

/** Event types (PC Client PFP, section 10.4.1). */
export const EVENT_TYPES = {
  EV_PREBOOT_CERT: 0x0,
  EV_POST_CODE: 0x1,
  EV_UNUSED: 0x2,
  EV_NO_ACTION: 0x3,
  EV_SEPARATOR: 0x4,
  EV_ACTION: 0x5,
  EV_EVENT_TAG: 0x6,
  EV_S_CRTM_CONTENTS: 0x7,
  EV_S_CRTM_VERSION: 0x8,
  EV_CPU_MICROCODE: 0x9,
  EV_PLATFORM_CONFIG_FLAGS: 0xa,
  EV_TABLE_OF_DEVICES: 0xb,
  EV_COMPACT_HASH: 0xc,
  EV_IPL: 0xd,
  EV_IPL_PARTITION_DATA: 0xe,
  EV_NONHOST_CODE: 0xf,
  EV_NONHOST_CONFIG: 0x10,
  EV_NONHOST_INFO: 0x11,
  EV_OMIT_BOOT_DEVICE_EVENTS: 0x12,
  EV_EFI_EVENT_BASE: 0x80000000,
  EV_EFI_VARIABLE_DRIVER_CONFIG: 0x80000001,
  EV_EFI_VARIABLE_BOOT: 0x80000002,
  EV_EFI_BOOT_SERVICES_APPLICATION: 0x80000003,
  EV_EFI_BOOT_SERVICES_DRIVER: 0x80000004,
  EV_EFI_RUNTIME_SERVICES_DRIVER: 0x80000005,
  EV_EFI_GPT_EVENT: 0x80000006,
  EV_EFI_ACTION: 0x80000007,
  EV_EFI_PLATFORM_FIRMWARE_BLOB: 0x80000008,
  EV_EFI_HANDOFF_TABLES: 0x80000009,
  EV_EFI_PLATFORM_FIRMWARE_BLOB2: 0x8000000a,
  EV_EFI_HANDOFF_TABLES2: 0x8000000b,
  EV_EFI_VARIABLE_BOOT2: 0x8000000c,
  EV_EFI_GPT_EVENT2: 0x8000000d,
  EV_EFI_HCRTM_EVENT: 0x80000010,
  EV_EFI_VARIABLE_AUTHORITY: 0x800000e0,
  EV_EFI_SPDM_FIRMWARE_BLOB: 0x800000e1,
  EV_EFI_SPDM_FIRMWARE_CONFIG: 0x800000e2,
} as const;
export type EventTypeName = keyof typeof EVENT_TYPES;

const TYPE_NAMES = new Map<number, EventTypeName>(Object.entries(EVENT_TYPES).map(([k, v]) => [v, k as EventTypeName]));

/** The name of an event type as tpm2_eventlog prints it; unknown types as hex. */
export function eventTypeName(type: number): string {
  return TYPE_NAMES.get(type) ?? `0x${type.toString(16).padStart(8, '0')}`;
}

/** EFI_GLOBAL_VARIABLE: SecureBoot, PK, KEK, BootOrder, Boot####. */
export const EFI_GLOBAL_VARIABLE = '8be4df61-93ca-11d2-aa0d-00e098032b8c';
/** EFI_IMAGE_SECURITY_DATABASE_GUID: db, dbx, dbt, dbr. */
export const EFI_IMAGE_SECURITY_DATABASE = 'd719b2cb-3d3a-4596-a3bc-dad00e67656f';

export interface SpecIdEvent {
  platformClass: number;
  specVersion: { major: number; minor: number; errata: number };
  uintnSize: number;
  algorithms: { id: number; name: string; digestSize: number }[];
  vendorInfo: Buffer;
}

/** What an event's data says, where we know how to read it. */
export type EventDetail =
  | { kind: 'spec-id'; specId: SpecIdEvent }
  | { kind: 'startup-locality'; locality: number }
  | { kind: 'no-action'; signature: string }
  | { kind: 'uefi-variable'; guid: string; name: string; data: Buffer; description?: string }
  | { kind: 'text'; text: string }
  | { kind: 'separator'; value: number }
  | { kind: 'image-load'; location: string; length: string; path?: string }
  | { kind: 'firmware-blob'; base: string; length: string }
  | { kind: 'gpt'; diskGuid: string; partitions: number }
  | { kind: 'malformed'; reason: string };

export interface LogEvent {
  /** Position in the log; 0 is the Spec ID header event (tpm2_eventlog's EventNum). */
  index: number;
  /** Byte offset of the event's first byte. */
  offset: number;
  pcr: number;
  type: number;
  typeName: string;
  /** Digest per algorithm name ('sha256', or 'alg_0x…' for one we do not know), lowercase hex. */
  digests: Record<string, string>;
  data: Buffer;
  detail?: EventDetail;
}

export interface EventLog {
  format: 'crypto-agile' | 'sha1';
  specId?: SpecIdEvent;
  /** Every event, header included. */
  events: LogEvent[];
  /** Zero or 0xff padding after the last event (firmware reserves the log area). */
  trailingBytes: number;
}

/** Bank (algorithm name) → PCR index → value, lowercase hex. */
export type PcrValues = Record<string, Record<number, string>>;

function invalid(what: string, index: number, offset: number): ShieldError {
  return new ShieldError('eventlog_invalid', `Event log invalid: event ${index} at byte ${offset}: ${what}.`, {
    details: { event: index, offset },
  });
}

function algName(id: number): string {
  for (const [name, a] of Object.entries(HASH_ALGS)) if (a.id === id) return name;
  return `alg_0x${id.toString(16).padStart(4, '0')}`;
}

const SPEC_ID_03 = Buffer.from('Spec ID Event03\0', 'latin1');
const STARTUP_LOCALITY = Buffer.from('StartupLocality\0', 'latin1');

export function parseEventLog(bytes: Uint8Array): EventLog {
  const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (buf.length > MAX_LOG_BYTES) throw invalid(`the log is ${buf.length} bytes, more than the ${MAX_LOG_BYTES} allowed`, 0, 0);
  if (buf.length < 32) throw invalid(`${buf.length} bytes is too short for the first event`, 0, 0);
  const first = readSha1Event(buf, 0, 0);
  const isAgile = first.pcr === 0 && first.type === EVENT_TYPES.EV_NO_ACTION && first.data.subarray(0, 16).equals(SPEC_ID_03);
  if (!isAgile) return parseSha1Log(buf);

  if (!/^0+$/.test(first.digests.sha1!)) throw invalid('the Spec ID event has a non-zero digest', 0, 0);
  const specId = parseSpecId(first.data, 0);
  first.detail = { kind: 'spec-id', specId };
  const events: LogEvent[] = [first];
  const sizes = new Map(specId.algorithms.map((a) => [a.id, a] as const));
  let pos = 32 + first.data.length;
  let trailingBytes = 0;
  while (pos < buf.length) {
    if (isPadding(buf, pos)) {
      trailingBytes = buf.length - pos;
      break;
    }
    const index = events.length;
    const start = pos;
    const need = (n: number, what: string): void => {
      if (pos + n > buf.length) throw invalid(`the log ends inside the ${what} (needs ${n} bytes at ${pos}, ${buf.length - pos} left)`, index, start);
    };
    need(12, 'event header');
    const pcr = buf.readUInt32LE(pos);
    const type = buf.readUInt32LE(pos + 4);
    const count = buf.readUInt32LE(pos + 8);
    pos += 12;
    if (pcr >= PCR_COUNT) throw invalid(`PCR index ${pcr} is out of range 0–${PCR_COUNT - 1}`, index, start);
    if (count > sizes.size) throw invalid(`${count} digests but the Spec ID event lists ${sizes.size} algorithms`, index, start);
    const digests: Record<string, string> = {};
    for (let i = 0; i < count; i++) {
      need(2, 'digest algorithm');
      const id = buf.readUInt16LE(pos);
      const alg = sizes.get(id);
      if (alg === undefined) throw invalid(`digest algorithm 0x${id.toString(16)} is not in the Spec ID event`, index, start);
      if (alg.name in digests) throw invalid(`two ${alg.name} digests`, index, start);
      need(2 + alg.digestSize, `${alg.name} digest`);
      digests[alg.name] = buf.toString('hex', pos + 2, pos + 2 + alg.digestSize);
      pos += 2 + alg.digestSize;
    }
    need(4, 'event size');
    const size = buf.readUInt32LE(pos);
    pos += 4;
    if (size > MAX_EVENT_BYTES) throw invalid(`event data of ${size} bytes is more than the ${MAX_EVENT_BYTES} allowed`, index, start);
    need(size, 'event data');
    const data = buf.subarray(pos, pos + size);
    pos += size;
    const event: LogEvent = { index, offset: start, pcr, type, typeName: eventTypeName(type), digests, data };
    const detail = decodeEventData(type, data);
    if (detail !== undefined) event.detail = detail;
    events.push(event);
  }
  return { format: 'crypto-agile', specId, events, trailingBytes };
}

function parseSha1Log(buf: Buffer): EventLog {
  const events: LogEvent[] = [];
  let pos = 0;
  let trailingBytes = 0;
  while (pos < buf.length) {
    if (events.length > 0 && isPadding(buf, pos)) {
      trailingBytes = buf.length - pos;
      break;
    }
    const event = readSha1Event(buf, pos, events.length);
    const detail = decodeEventData(event.type, event.data);
    if (detail !== undefined) event.detail = detail;
    events.push(event);
    pos += 32 + event.data.length;
  }
  return { format: 'sha1', events, trailingBytes };
}

/** TCG_PCR_EVENT: pcrIndex u32, eventType u32, digest[20], eventDataSize u32, event. */
function readSha1Event(buf: Buffer, pos: number, index: number): LogEvent {
  if (pos + 32 > buf.length) throw invalid(`the log ends inside the event header (${buf.length - pos} bytes left, 32 needed)`, index, pos);
  const pcr = buf.readUInt32LE(pos);
  const type = buf.readUInt32LE(pos + 4);
  const size = buf.readUInt32LE(pos + 28);
  if (pcr >= PCR_COUNT) throw invalid(`PCR index ${pcr} is out of range 0–${PCR_COUNT - 1}`, index, pos);
  if (size > MAX_EVENT_BYTES) throw invalid(`event data of ${size} bytes is more than the ${MAX_EVENT_BYTES} allowed`, index, pos);
  if (pos + 32 + size > buf.length) throw invalid(`the log ends inside the event data (${size} bytes announced, ${buf.length - pos - 32} left)`, index, pos);
  const digests = { sha1: buf.toString('hex', pos + 8, pos + 28) };
  return { index, offset: pos, pcr, type, typeName: eventTypeName(type), digests, data: buf.subarray(pos + 32, pos + 32 + size) };
}

/**
 * TCG_EfiSpecIDEvent: signature[16], platformClass u32, specVersionMinor u8, specVersionMajor u8,
 * specErrata u8, uintnSize u8, numberOfAlgorithms u32, {algorithmId u16, digestSize u16}[],
 * vendorInfoSize u8, vendorInfo[]. It must fill the event data exactly.
 */
function parseSpecId(data: Buffer, offset: number): SpecIdEvent {
  const fail = (what: string): ShieldError => invalid(`Spec ID event: ${what}`, 0, offset);
  if (data.length < 29) throw fail(`${data.length} bytes is too short`);
  const n = data.readUInt32LE(24);
  if (n === 0 || n > Object.keys(HASH_ALGS).length) throw fail(`${n} algorithms (1–${Object.keys(HASH_ALGS).length} allowed)`);
  if (data.length < 28 + 4 * n + 1) throw fail(`too short for ${n} algorithms`);
  const algorithms: SpecIdEvent['algorithms'] = [];
  for (let i = 0; i < n; i++) {
    const id = data.readUInt16LE(28 + 4 * i);
    const digestSize = data.readUInt16LE(30 + 4 * i);
    const name = algName(id);
    const known = (HASH_ALGS as Record<string, { size: number }>)[name];
    if (digestSize === 0 || digestSize > 64) throw fail(`digest size ${digestSize} for ${name}`);
    if (known !== undefined && known.size !== digestSize) throw fail(`${name} digests are ${known.size} bytes, not ${digestSize}`);
    if (algorithms.some((a) => a.id === id)) throw fail(`${name} listed twice`);
    algorithms.push({ id, name, digestSize });
  }
  const vendorSize = data[28 + 4 * n]!;
  const end = 29 + 4 * n + vendorSize;
  if (end !== data.length) throw fail(`its fields take ${end} bytes but the event has ${data.length}`);
  return {
    platformClass: data.readUInt32LE(16),
    specVersion: { minor: data[20]!, major: data[21]!, errata: data[22]! },
    uintnSize: data[23]!,
    algorithms,
    vendorInfo: Buffer.from(data.subarray(29 + 4 * n, end)),
  };
}

function isPadding(buf: Buffer, pos: number): boolean {
  const b = buf[pos];
  if (b !== 0 && b !== 0xff) return false;
  for (let i = pos + 1; i < buf.length; i++) if (buf[i] !== b) return false;
  return true;
}

// ---- event data -------------------------------------------------------------------------------

/** A GUID in its EFI byte order (first three fields little-endian) as the usual string. */
export function guidString(b: Buffer): string {
  const h = (from: number, to: number, le: boolean): string => {
    const s = Buffer.from(b.subarray(from, to));
    return (le ? s.reverse() : s).toString('hex');
  };
  return `${h(0, 4, true)}-${h(4, 6, true)}-${h(6, 8, true)}-${h(8, 10, false)}-${h(10, 16, false)}`;
}

function utf16z(b: Buffer): string {
  const s = b.subarray(0, b.length - (b.length % 2)).toString('utf16le');
  const nul = s.indexOf('\0');
  return nul < 0 ? s : s.slice(0, nul);
}

/** A string event: UTF-16LE when every other byte is zero, else ASCII/UTF-8; NUL-terminated or not. */
function decodeString(b: Buffer): string {
  let utf16 = b.length >= 2 && b.length % 2 === 0;
  for (let i = 1; utf16 && i < b.length; i += 2) if (b[i] !== 0) utf16 = false;
  if (utf16) return utf16z(b);
  const s = b.toString('utf8');
  const nul = s.indexOf('\0');
  return nul < 0 ? s : s.slice(0, nul);
}

function printable(b: Buffer): boolean {
  if (b.length === 0) return false;
  for (const c of b) if (c !== 0 && (c < 0x20 || c > 0x7e)) return false;
  return true;
}

const hex64 = (b: Buffer, at: number): string => `0x${b.readBigUInt64LE(at).toString(16)}`;

export function decodeEventData(type: number, data: Buffer): EventDetail | undefined {
  const T = EVENT_TYPES;
  switch (type) {
    case T.EV_NO_ACTION:
      if (data.length === 17 && data.subarray(0, 16).equals(STARTUP_LOCALITY)) return { kind: 'startup-locality', locality: data[16]! };
      return printable(data.subarray(0, 16)) ? { kind: 'no-action', signature: decodeString(data.subarray(0, 16)) } : undefined;
    case T.EV_EFI_VARIABLE_DRIVER_CONFIG:
    case T.EV_EFI_VARIABLE_BOOT:
    case T.EV_EFI_VARIABLE_BOOT2:
    case T.EV_EFI_VARIABLE_AUTHORITY:
      return decodeVariable(type, data);
    case T.EV_SEPARATOR:
      return data.length === 4 ? { kind: 'separator', value: data.readUInt32LE(0) } : { kind: 'malformed', reason: `separator of ${data.length} bytes` };
    case T.EV_S_CRTM_VERSION:
    case T.EV_EFI_ACTION:
    case T.EV_ACTION:
    case T.EV_IPL:
      return { kind: 'text', text: decodeString(data) };
    case T.EV_POST_CODE:
    case T.EV_S_CRTM_CONTENTS:
    case T.EV_EFI_PLATFORM_FIRMWARE_BLOB:
      if (type === T.EV_POST_CODE && printable(data)) return { kind: 'text', text: decodeString(data) };
      return data.length === 16 ? { kind: 'firmware-blob', base: hex64(data, 0), length: hex64(data, 8) } : undefined;
    case T.EV_EFI_BOOT_SERVICES_APPLICATION:
    case T.EV_EFI_BOOT_SERVICES_DRIVER:
    case T.EV_EFI_RUNTIME_SERVICES_DRIVER:
      return decodeImageLoad(data);
    case T.EV_EFI_GPT_EVENT:
      return decodeGpt(data);
    default:
      return undefined;
  }
}

/** UEFI_VARIABLE_DATA: VariableName GUID, UnicodeNameLength u64, VariableDataLength u64, UnicodeName, VariableData. */
function decodeVariable(type: number, data: Buffer): EventDetail {
  if (data.length < 32) return { kind: 'malformed', reason: `UEFI variable data of ${data.length} bytes` };
  const nameLen = data.readBigUInt64LE(16);
  const dataLen = data.readBigUInt64LE(24);
  if (32n + 2n * nameLen + dataLen > BigInt(data.length)) return { kind: 'malformed', reason: 'UEFI variable lengths exceed the event' };
  const nameEnd = 32 + 2 * Number(nameLen);
  const detail: EventDetail & { kind: 'uefi-variable' } = {
    kind: 'uefi-variable',
    guid: guidString(data.subarray(0, 16)),
    name: utf16z(data.subarray(32, nameEnd)),
    data: Buffer.from(data.subarray(nameEnd, nameEnd + Number(dataLen))),
  };
  if (type !== EVENT_TYPES.EV_EFI_VARIABLE_DRIVER_CONFIG && /^Boot[0-9A-Fa-f]{4}$/.test(detail.name)) {
    // EFI_LOAD_OPTION: Attributes u32, FilePathListLength u16, Description (UTF-16, NUL-terminated), …
    const d = detail.data;
    if (d.length >= 8) {
      let end = 6;
      while (end + 1 < d.length && (d[end] !== 0 || d[end + 1] !== 0)) end += 2;
      detail.description = d.subarray(6, end).toString('utf16le');
    }
  }
  return detail;
}

/**
 * UEFI_IMAGE_LOAD_EVENT: ImageLocationInMemory u64, ImageLengthInMemory u64, ImageLinkTimeAddress u64,
 * LengthOfDevicePath u64, DevicePath. The path is the media file-path nodes (type 4, subtype 4) joined.
 */
function decodeImageLoad(data: Buffer): EventDetail {
  if (data.length < 32) return { kind: 'malformed', reason: `image load event of ${data.length} bytes` };
  const detail: EventDetail & { kind: 'image-load' } = { kind: 'image-load', location: hex64(data, 0), length: hex64(data, 8) };
  const dpLen = data.readBigUInt64LE(24);
  if (dpLen > BigInt(data.length - 32)) return { kind: 'malformed', reason: 'device path longer than the event' };
  const dp = data.subarray(32, 32 + Number(dpLen));
  const parts: string[] = [];
  for (let at = 0; at + 4 <= dp.length; ) {
    const nodeType = dp[at]!;
    const subType = dp[at + 1]!;
    const len = dp.readUInt16LE(at + 2);
    if (len < 4 || at + len > dp.length || nodeType === 0x7f) break;
    if (nodeType === 4 && subType === 4) parts.push(utf16z(dp.subarray(at + 4, at + len)));
    at += len;
  }
  if (parts.length > 0) detail.path = parts.join('');
  return detail;
}

/** UEFI_GPT_DATA: UEFI_PARTITION_TABLE_HEADER (92 bytes; DiskGUID at 56), NumberOfPartitions u64, entries. */
function decodeGpt(data: Buffer): EventDetail {
  if (data.length < 100) return { kind: 'malformed', reason: `GPT event of ${data.length} bytes` };
  const n = data.readBigUInt64LE(92);
  if (n > 1024n) return { kind: 'malformed', reason: `${n} partitions` };
  return { kind: 'gpt', diskGuid: guidString(data.subarray(56, 72)), partitions: Number(n) };
}

// ---- replay -----------------------------------------------------------------------------------

/** The banks a log records that we can hash. */
export function logBanks(log: EventLog): string[] {
  const names = log.specId === undefined ? ['sha1'] : log.specId.algorithms.map((a) => a.name);
  return names.filter((n) => n in HASH_ALGS);
}

/** PCRs 0–16 and 23 reset to zeros, the dynamic (DRTM) PCRs 17–22 to all ones. */
function initialValue(pcr: number, size: number): Buffer {
  return Buffer.alloc(size, pcr >= 17 && pcr <= 22 ? 0xff : 0);
}

/**
 * Extends every measured event into its PCR, per bank. EV_NO_ACTION events are not extended; a
 * StartupLocality event (or an H-CRTM event, locality 4) sets the last byte of PCR 0's start value.
 * A PCR for which some event lacks the bank's digest cannot be replayed and is left out of that bank.
 * `pcrs` picks the PCRs returned (default all 24).
 */
export function replayEventLog(log: EventLog, options: { pcrs?: readonly number[] } = {}): PcrValues {
  const pcrs = options.pcrs ?? Array.from({ length: PCR_COUNT }, (_, i) => i);
  const out: PcrValues = {};
  for (const bank of logBanks(log)) {
    const alg = HASH_ALGS[bank as HashAlgName];
    const values = new Map<number, Buffer>();
    const unknown = new Set<number>();
    const value = (pcr: number): Buffer => values.get(pcr) ?? initialValue(pcr, alg.size);
    for (const e of log.events) {
      if (e.index === 0 && log.format === 'crypto-agile') continue;
      const startup = e.type === EVENT_TYPES.EV_EFI_HCRTM_EVENT ? 4 : e.detail?.kind === 'startup-locality' ? e.detail.locality : undefined;
      if (startup !== undefined && e.pcr === 0) {
        if (values.has(0)) throw invalid('a startup locality event after PCR 0 was extended', e.index, e.offset);
        const start = initialValue(0, alg.size);
        start[alg.size - 1] = startup;
        values.set(0, start);
        if (e.type === EVENT_TYPES.EV_NO_ACTION) continue;
      }
      if (e.type === EVENT_TYPES.EV_NO_ACTION) continue;
      const digest = e.digests[bank];
      if (digest === undefined) {
        unknown.add(e.pcr);
        continue;
      }
      const h = createHash(alg.node);
      h.update(value(e.pcr));
      h.update(Buffer.from(digest, 'hex'));
      values.set(e.pcr, h.digest());
    }
    const bankOut: Record<number, string> = {};
    for (const pcr of pcrs) if (!unknown.has(pcr)) bankOut[pcr] = value(pcr).toString('hex');
    out[bank] = bankOut;
  }
  return out;
}

/** The events that extend one PCR, in log order (EV_NO_ACTION left out). */
export function measuredEvents(log: EventLog, pcr: number): LogEvent[] {
  return log.events.filter((e) => e.pcr === pcr && e.type !== EVENT_TYPES.EV_NO_ACTION && !(e.index === 0 && log.format === 'crypto-agile'));
}
