// Writes TCG PC Client event logs in the exact binary format firmware produces, with the event-data
// structures firmware, shim and GRUB measure. For tests, demos, and a host stand-in whose TPM
// (swtpm) has been extended with the same digests.
import { createHash } from 'node:crypto';
import { ShieldError } from '../errors.ts';
import { EFI_GLOBAL_VARIABLE, EVENT_TYPES, HASH_ALGS, PCR_COUNT, type EventTypeName, type HashAlgName } from './eventlog.ts';

export interface EventSpec {
  pcr: number;
  type: EventTypeName | number;
  /** The event data (default empty). */
  data?: Uint8Array;
  /** The bytes whose hash is the digest when it is not the data itself: a PE image, GRUB's command text. */
  measured?: Uint8Array;
  /** Digests given outright (e.g. a deliberately wrong one); the rest are computed. */
  digests?: Partial<Record<HashAlgName, Uint8Array>>;
}

export interface BuildOptions {
  /** Banks, in the order of the Spec ID table (default sha1 + sha256). */
  algs?: readonly HashAlgName[];
  /** 'sha1': the old TPM 1.2 style log, no Spec ID Event03, SHA-1 digests only. */
  format?: 'crypto-agile' | 'sha1';
  platformClass?: number;
  vendorInfo?: Uint8Array;
}

function digestsFor(spec: EventSpec, algs: readonly HashAlgName[]): Buffer[] {
  const type = typeof spec.type === 'number' ? spec.type : EVENT_TYPES[spec.type];
  return algs.map((alg) => {
    const given = spec.digests?.[alg];
    if (given !== undefined) return Buffer.from(given);
    if (type === EVENT_TYPES.EV_NO_ACTION) return Buffer.alloc(HASH_ALGS[alg].size);
    return createHash(HASH_ALGS[alg].node).update(spec.measured ?? spec.data ?? new Uint8Array()).digest();
  });
}

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(n >>> 0);
  return b;
}

function specIdEvent(algs: readonly HashAlgName[], options: BuildOptions): Buffer {
  const vendor = Buffer.from(options.vendorInfo ?? new Uint8Array());
  const head = Buffer.alloc(28);
  head.write('Spec ID Event03\0', 0, 'latin1');
  head.writeUInt32LE(options.platformClass ?? 0, 16);
  head.set([0, 2, 0, 2], 20); // spec version 2.0, errata 0, uintnSize 2 (UINT64)
  head.writeUInt32LE(algs.length, 24);
  const table = Buffer.alloc(4 * algs.length);
  algs.forEach((a, i) => {
    table.writeUInt16LE(HASH_ALGS[a].id, 4 * i);
    table.writeUInt16LE(HASH_ALGS[a].size, 4 * i + 2);
  });
  return Buffer.concat([head, table, Buffer.from([vendor.length]), vendor]);
}

/** TCG_PCR_EVENT, the SHA-1 format. */
function sha1Event(pcr: number, type: number, digest: Buffer, data: Uint8Array): Buffer {
  return Buffer.concat([u32(pcr), u32(type), digest, u32(data.length), data]);
}

export function buildEventLog(events: readonly EventSpec[], options: BuildOptions = {}): Buffer {
  const format = options.format ?? 'crypto-agile';
  const algs = format === 'sha1' ? (['sha1'] as const) : (options.algs ?? ['sha1', 'sha256']);
  if (algs.length === 0 || new Set(algs).size !== algs.length) throw new ShieldError('invalid_argument', 'Event log banks must be distinct and at least one.');
  const parts: Buffer[] = [];
  if (format === 'crypto-agile') parts.push(sha1Event(0, EVENT_TYPES.EV_NO_ACTION, Buffer.alloc(20), specIdEvent(algs, options)));
  for (const spec of events) {
    if (!Number.isInteger(spec.pcr) || spec.pcr < 0 || spec.pcr >= PCR_COUNT) throw new ShieldError('invalid_argument', `PCR ${spec.pcr} is not 0–${PCR_COUNT - 1}.`);
    const type = typeof spec.type === 'number' ? spec.type : EVENT_TYPES[spec.type];
    const data = spec.data ?? new Uint8Array();
    const digests = digestsFor(spec, algs);
    if (format === 'sha1') {
      parts.push(sha1Event(spec.pcr, type, digests[0]!, data));
      continue;
    }
    parts.push(u32(spec.pcr), u32(type), u32(algs.length));
    algs.forEach((alg, i) => {
      const id = Buffer.alloc(2);
      id.writeUInt16LE(HASH_ALGS[alg].id);
      parts.push(id, digests[i]!);
    });
    parts.push(u32(data.length), Buffer.from(data));
  }
  return Buffer.concat(parts);
}

// ---- event data ---------------------------------------------------------------------------------

/** A GUID string in EFI byte order (first three fields little-endian). */
export function guidBytes(guid: string): Buffer {
  const h = guid.replace(/-/g, '');
  if (!/^[0-9a-fA-F]{32}$/.test(h)) throw new ShieldError('invalid_argument', `Not a GUID: ${guid}`);
  const b = Buffer.from(h, 'hex');
  b.subarray(0, 4).reverse();
  b.subarray(4, 6).reverse();
  b.subarray(6, 8).reverse();
  return b;
}

export function utf16(text: string, nul = true): Buffer {
  return Buffer.from(nul ? `${text}\0` : text, 'utf16le');
}

function u64(n: number | bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(n));
  return b;
}

/** UEFI_VARIABLE_DATA (the name without a terminating NUL, as edk2 measures it). */
export function uefiVariable(name: string, value: Uint8Array, guid = EFI_GLOBAL_VARIABLE): Buffer {
  return Buffer.concat([guidBytes(guid), u64(name.length), u64(value.length), utf16(name, false), value]);
}

/** EFI_CERT_X509_GUID */
const EFI_CERT_X509 = 'a5c059a1-94e4-4aa7-87b5-ab155c2bf072';

/** An EFI_SIGNATURE_LIST of X.509 certificates (all the same size, as one list requires). */
export function x509SignatureList(certs: readonly Uint8Array[], owner: string): Buffer {
  const size = certs[0]?.length ?? 0;
  if (certs.some((c) => c.length !== size)) throw new ShieldError('invalid_argument', 'One signature list holds certificates of one size.');
  const sigSize = 16 + size;
  return Buffer.concat([guidBytes(EFI_CERT_X509), u32(28 + sigSize * certs.length), u32(0), u32(sigSize), ...certs.flatMap((c) => [guidBytes(owner), Buffer.from(c)])]);
}

/** An EFI_SIGNATURE_DATA as measured by EV_EFI_VARIABLE_AUTHORITY: owner GUID + certificate. */
export function signatureData(cert: Uint8Array, owner: string): Buffer {
  return Buffer.concat([guidBytes(owner), Buffer.from(cert)]);
}

/** The EV_NO_ACTION data that says which locality TPM2_Startup came from (0 or 3). */
export function startupLocality(locality: number): Buffer {
  return Buffer.concat([Buffer.from('StartupLocality\0', 'latin1'), Buffer.from([locality])]);
}

/** EV_SEPARATOR data: 0 normally, 0xffffffff when firmware hit an error. */
export function separator(value = 0): Buffer {
  return u32(value);
}

/** A device path of media file-path nodes ending in End of Hardware. */
function filePathDevicePath(path: string): Buffer {
  const name = utf16(path);
  const node = Buffer.concat([Buffer.from([4, 4]), Buffer.alloc(2), name]);
  node.writeUInt16LE(node.length, 2);
  return Buffer.concat([node, Buffer.from([0x7f, 0xff, 4, 0])]);
}

/** UEFI_IMAGE_LOAD_EVENT for EV_EFI_BOOT_SERVICES_APPLICATION and drivers. */
export function imageLoad(path: string, location = 0x7e000000, length = 0x100000): Buffer {
  const dp = filePathDevicePath(path);
  return Buffer.concat([u64(location), u64(length), u64(0), u64(dp.length), dp]);
}

/** EFI_LOAD_OPTION, the value of a Boot#### variable. */
export function loadOption(description: string, path: string): Buffer {
  const dp = filePathDevicePath(path);
  const head = Buffer.alloc(6);
  head.writeUInt32LE(1, 0); // LOAD_OPTION_ACTIVE
  head.writeUInt16LE(dp.length, 4);
  return Buffer.concat([head, utf16(description), dp]);
}

/** BootOrder: a list of u16 option numbers. */
export function bootOrder(options: readonly number[]): Buffer {
  const b = Buffer.alloc(2 * options.length);
  options.forEach((o, i) => b.writeUInt16LE(o, 2 * i));
  return b;
}

/**
 * An EV_IPL event as GRUB writes it to PCR 8: data "prefix: text\0", digest over the text alone
 * (prefix 'grub_cmd' for commands, 'kernel_cmdline' for the kernel's command line).
 */
export function grubEvent(prefix: 'grub_cmd' | 'kernel_cmdline' | 'module_cmdline', text: string): { data: Buffer; measured: Buffer } {
  return { data: Buffer.from(`${prefix}: ${text}\0`, 'utf8'), measured: Buffer.from(text, 'utf8') };
}
