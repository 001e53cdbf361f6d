// Event logs for tests: a realistic UEFI + shim + GRUB boot with knobs to change one thing at a
// time, and tpm2_eventlog (tpm2-tools) as the independent parser and replayer to check ours against.
// Integration tests skip only when tpm2_eventlog is absent and CI is not 'true'.
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  bootOrder,
  grubEvent,
  guidBytes,
  imageLoad,
  loadOption,
  separator,
  signatureData,
  startupLocality,
  uefiVariable,
  utf16,
  x509SignatureList,
  type EventSpec,
} from '../../core/attestation/eventlog-build.ts';
import { EFI_IMAGE_SECURITY_DATABASE, EVENT_TYPES, HASH_ALGS, type HashAlgName } from '../../core/attestation/eventlog.ts';

/** null → run; otherwise the reason to skip. Under CI=true a missing tpm2_eventlog is an error. */
export function tpm2ToolsMissing(): string | null {
  if (spawnSync('sh', ['-c', 'command -v tpm2_eventlog']).status === 0) return null;
  if (process.env.CI === 'true') throw new Error('CI=true but tpm2_eventlog missing: .ci/run must install tpm2-tools');
  return 'needs tpm2_eventlog (Debian: tpm2-tools)';
}

/** tpm2-tools' version as [major, minor, patch]. */
export function tpm2ToolsVersion(): [number, number, number] {
  const out = execFileSync('tpm2_eventlog', ['--version'], { encoding: 'utf8' });
  const m = /version="?(\d+)\.(\d+)(?:\.(\d+))?/.exec(out);
  if (m === null) throw new Error(`cannot read the tpm2-tools version from ${out}`);
  return [Number(m[1]), Number(m[2]), Number(m[3] ?? 0)];
}

/**
 * tpm2-tools before 5.6 extends EV_NO_ACTION events into their PCR (a zero digest) and ignores
 * StartupLocality (tpm2-tools issues #3224 and #3146, fixed by PRs #3230 and #3242 in 2023).
 */
export function tpm2EventlogHasNoActionBug(): boolean {
  const [major, minor] = tpm2ToolsVersion();
  return major < 5 || (major === 5 && minor < 6);
}

export interface Tpm2Event {
  num: number;
  pcr: number;
  type: string;
  /** alg → hex; the header event's SHA-1 format digest is under 'sha1'. */
  digests: Record<string, string>;
  size: number;
}

export interface Tpm2EventlogOutput {
  events: Tpm2Event[];
  /** bank → PCR → hex (lowercase, no 0x): its replay. */
  pcrs: Record<string, Record<number, string>>;
}

/** Runs `tpm2_eventlog FILE` and reads the YAML it prints (line by line: its shape is fixed). */
export function tpm2Eventlog(file: string): Tpm2EventlogOutput {
  const yaml = execFileSync('tpm2_eventlog', [file], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  const events: Tpm2Event[] = [];
  const pcrs: Tpm2EventlogOutput['pcrs'] = {};
  let event: Tpm2Event | undefined;
  let alg: string | undefined;
  let bank: string | undefined;
  let inPcrs = false;
  for (const line of yaml.split('\n')) {
    if (line === 'pcrs:') {
      inPcrs = true;
      continue;
    }
    if (inPcrs) {
      const b = /^ {2}(\w+):\s*$/.exec(line);
      if (b !== null) {
        bank = b[1]!;
        pcrs[bank] = {};
        continue;
      }
      const v = /^ {4}(\d+)\s*:\s*0x([0-9a-fA-F]+)\s*$/.exec(line);
      if (v !== null && bank !== undefined) pcrs[bank]![Number(v[1])] = v[2]!.toLowerCase();
      continue;
    }
    let m: RegExpExecArray | null;
    if ((m = /^- EventNum: (\d+)$/.exec(line)) !== null) {
      event = { num: Number(m[1]), pcr: -1, type: '', digests: {}, size: -1 };
      events.push(event);
      alg = undefined;
    } else if ((m = /^ {2}PCRIndex: (\d+)$/.exec(line)) !== null) {
      // tpm2-tools 5.4 prints SHA-1 format logs without the "- EventNum:" lines.
      if (event === undefined || event.pcr !== -1) {
        event = { num: events.length, pcr: -1, type: '', digests: {}, size: -1 };
        events.push(event);
        alg = undefined;
      }
      event.pcr = Number(m[1]);
    } else if (event === undefined) {
      continue;
    } else if ((m = /^ {2}EventType: (\S+)$/.exec(line)) !== null) event.type = m[1]!;
    else if ((m = /^ {2}Digest: "([0-9a-f]+)"$/.exec(line)) !== null) event.digests.sha1 = m[1]!;
    else if ((m = /^ {2}- AlgorithmId: (\S+)$/.exec(line)) !== null) alg = m[1]!;
    else if ((m = /^ {4}Digest: "([0-9a-f]+)"$/.exec(line)) !== null && alg !== undefined) event.digests[alg] = m[1]!;
    else if ((m = /^ {2}EventSize: (\d+)$/.exec(line)) !== null) event.size = Number(m[1]);
  }
  return { events, pcrs };
}

/**
 * PCR values computed straight from the event specs, without our parser: the digest of each event
 * is that of `measured ?? data` unless given; EV_NO_ACTION is skipped; StartupLocality sets PCR 0's
 * start value. With `extendNoAction` it models tpm2-tools < 5.6 instead.
 */
export function expectedPcrs(events: readonly EventSpec[], alg: HashAlgName, options: { extendNoAction?: boolean } = {}): Map<number, string> {
  const { size, node } = HASH_ALGS[alg];
  const pcrs = new Map<number, Buffer>();
  for (const e of events) {
    const type = typeof e.type === 'number' ? e.type : EVENT_TYPES[e.type];
    if (type === EVENT_TYPES.EV_NO_ACTION && !options.extendNoAction) {
      const d = Buffer.from(e.data ?? []);
      if (e.pcr === 0 && d.length === 17 && d.subarray(0, 16).toString('latin1') === 'StartupLocality\0') {
        const start = Buffer.alloc(size);
        start[size - 1] = d[16]!;
        pcrs.set(0, start);
      }
      continue;
    }
    const digest = e.digests?.[alg] ?? (type === EVENT_TYPES.EV_NO_ACTION ? Buffer.alloc(size) : createHash(node).update(e.measured ?? e.data ?? new Uint8Array()).digest());
    const old = pcrs.get(e.pcr) ?? Buffer.alloc(size);
    pcrs.set(e.pcr, createHash(node).update(old).update(digest).digest());
  }
  return new Map([...pcrs].map(([k, v]) => [k, v.toString('hex')]));
}

export const MICROSOFT_OWNER = '77fa9abd-0359-4d32-bd60-28f4e78f784b';
const SHIM_LOCK = '605dab50-e046-4300-abb6-3dd810dd8b23';

/** A stand-in X.509 certificate of fixed size: DER-ish bytes, seeded so two seeds differ. */
export function fakeCert(seed: string, size = 64): Buffer {
  const out = Buffer.alloc(size);
  out.set([0x30, 0x82, (size - 4) >> 8, (size - 4) & 0xff]);
  for (let at = 4, i = 0; at < size; i++) {
    const block = createHash('sha256').update(`${seed}:${i}`).digest();
    block.copy(out, at);
    at += block.length;
  }
  return out;
}

export interface BootOptions {
  startupLocality?: number;
  firmwareVersion?: string;
  secureBoot?: 0 | 1;
  /** Names of the certificates in db (default two). */
  db?: readonly string[];
  dbx?: readonly string[];
  bootEntry?: string;
  /** The shim image's content (its digest is the boot application's measurement). */
  shimImage?: string;
  kernelCmdline?: string;
  /** Extra events appended, e.g. one more PCR 7 event. */
  extra?: readonly EventSpec[];
}

/** A UEFI boot as OVMF + shim + GRUB measure it, PCRs 0–9, 14. */
export function bootEvents(o: BootOptions = {}): EventSpec[] {
  const db = (o.db ?? ['Microsoft UEFI CA 2011', 'Debian Secure Boot CA']).map((n) => fakeCert(n));
  const dbx = (o.dbx ?? ['revoked-1', 'revoked-2', 'revoked-3']).map((n) => createHash('sha256').update(n).digest());
  const shim = Buffer.from(o.shimImage ?? 'shimx64.efi 15.8');
  const grub = Buffer.from('grubx64.efi 2.06');
  const events: EventSpec[] = [];
  if (o.startupLocality !== undefined) events.push({ pcr: 0, type: 'EV_NO_ACTION', data: startupLocality(o.startupLocality) });
  events.push(
    { pcr: 0, type: 'EV_S_CRTM_VERSION', data: utf16(o.firmwareVersion ?? 'edk2-stable202211') },
    { pcr: 0, type: 'EV_EFI_PLATFORM_FIRMWARE_BLOB', data: Buffer.from('00008200000000000000140000000000', 'hex'), measured: Buffer.from('PEI firmware volume') },
    { pcr: 0, type: 'EV_EFI_PLATFORM_FIRMWARE_BLOB', data: Buffer.from('00009000000000000000d00000000000', 'hex'), measured: Buffer.from('DXE firmware volume') },
    { pcr: 7, type: 'EV_EFI_VARIABLE_DRIVER_CONFIG', data: uefiVariable('SecureBoot', Buffer.from([o.secureBoot ?? 1])) },
    { pcr: 7, type: 'EV_EFI_VARIABLE_DRIVER_CONFIG', data: uefiVariable('PK', x509SignatureList([fakeCert('Platform Key')], MICROSOFT_OWNER)) },
    { pcr: 7, type: 'EV_EFI_VARIABLE_DRIVER_CONFIG', data: uefiVariable('KEK', x509SignatureList([fakeCert('Microsoft KEK CA 2011')], MICROSOFT_OWNER)) },
    { pcr: 7, type: 'EV_EFI_VARIABLE_DRIVER_CONFIG', data: uefiVariable('db', x509SignatureList(db, MICROSOFT_OWNER), EFI_IMAGE_SECURITY_DATABASE) },
    { pcr: 7, type: 'EV_EFI_VARIABLE_DRIVER_CONFIG', data: uefiVariable('dbx', sha256List(dbx), EFI_IMAGE_SECURITY_DATABASE) },
    { pcr: 1, type: 'EV_EFI_HANDOFF_TABLES', data: handoffTables(), measured: Buffer.from('SMBIOS tables') },
    { pcr: 1, type: 'EV_EFI_VARIABLE_BOOT', data: uefiVariable('BootOrder', bootOrder([1, 0])) },
    { pcr: 1, type: 'EV_EFI_VARIABLE_BOOT', data: uefiVariable('Boot0001', loadOption(o.bootEntry ?? 'debian', '\\EFI\\debian\\shimx64.efi')) },
    { pcr: 1, type: 'EV_EFI_VARIABLE_BOOT', data: uefiVariable('Boot0000', loadOption('UiApp', '\\UiApp.efi')) },
    { pcr: 4, type: 'EV_EFI_ACTION', data: Buffer.from('Calling EFI Application from Boot Option') },
    ...[0, 1, 2, 3, 4, 5, 6, 7].map((pcr): EventSpec => ({ pcr, type: 'EV_SEPARATOR', data: separator() })),
    { pcr: 5, type: 'EV_EFI_GPT_EVENT', data: gpt() },
    { pcr: 7, type: 'EV_EFI_VARIABLE_AUTHORITY', data: uefiVariable('db', signatureData(db[0]!, MICROSOFT_OWNER), EFI_IMAGE_SECURITY_DATABASE) },
    { pcr: 4, type: 'EV_EFI_BOOT_SERVICES_APPLICATION', data: imageLoad('\\EFI\\debian\\shimx64.efi'), measured: shim },
    { pcr: 14, type: 'EV_IPL', data: Buffer.from('MokList\0'), measured: Buffer.from('mok list') },
    { pcr: 7, type: 'EV_EFI_VARIABLE_AUTHORITY', data: uefiVariable('Shim', fakeCert('Debian Secure Boot Signer'), SHIM_LOCK) },
    { pcr: 4, type: 'EV_EFI_BOOT_SERVICES_APPLICATION', data: imageLoad('\\EFI\\debian\\grubx64.efi', 0x7d000000, 0x2a0000), measured: grub },
    { pcr: 8, type: 'EV_IPL', ...grubEvent('grub_cmd', 'set root=hd0,gpt2') },
    { pcr: 9, type: 'EV_IPL', data: Buffer.from('(hd0,gpt2)/vmlinuz-6.1.0-18-amd64\0'), measured: Buffer.from('linux kernel image') },
    { pcr: 8, type: 'EV_IPL', ...grubEvent('grub_cmd', 'linux /vmlinuz-6.1.0-18-amd64 root=UUID=1234 ro quiet') },
    { pcr: 8, type: 'EV_IPL', ...grubEvent('kernel_cmdline', o.kernelCmdline ?? '/vmlinuz-6.1.0-18-amd64 root=UUID=1234 ro quiet') },
    { pcr: 9, type: 'EV_IPL', data: Buffer.from('(hd0,gpt2)/initrd.img-6.1.0-18-amd64\0'), measured: Buffer.from('initrd image') },
    { pcr: 4, type: 'EV_EFI_ACTION', data: Buffer.from('Exit Boot Services Invocation') },
    { pcr: 5, type: 'EV_EFI_ACTION', data: Buffer.from('Exit Boot Services Returned with Success') },
    ...(o.extra ?? []),
  );
  return events;
}

/** UEFI_HANDOFF_TABLE_POINTERS: one table, SMBIOS 3. */
function handoffTables(): Buffer {
  const b = Buffer.alloc(32);
  b.writeBigUInt64LE(1n, 0);
  guidBytes('f2fd1544-9794-4a2c-992e-e5bbcf20e394').copy(b, 8);
  b.writeBigUInt64LE(0x7fbb6000n, 24);
  return b;
}

/** An EFI_SIGNATURE_LIST of SHA-256 hashes (dbx). */
function sha256List(hashes: readonly Buffer[]): Buffer {
  const head = Buffer.alloc(28);
  head.set(Buffer.from('2616c4c14c509240aca941f936934328', 'hex'), 0); // EFI_CERT_SHA256_GUID c1c41626-504c-4092-aca9-41f936934328
  head.writeUInt32LE(28 + 48 * hashes.length, 16);
  head.writeUInt32LE(0, 20);
  head.writeUInt32LE(48, 24);
  const owner = Buffer.from('bd9afa775903324dbd6028f4e78f784b', 'hex');
  return Buffer.concat([head, ...hashes.flatMap((h) => [owner, h])]);
}

/** UEFI_GPT_DATA: a GPT header and two partitions (ESP + Linux). */
function gpt(): Buffer {
  const header = Buffer.alloc(92);
  header.write('EFI PART', 0, 'latin1');
  header.writeUInt32LE(0x00010000, 8);
  header.writeUInt32LE(92, 12);
  header.writeBigUInt64LE(1n, 24);
  header.writeBigUInt64LE(41943039n, 32);
  header.writeBigUInt64LE(34n, 40);
  header.writeBigUInt64LE(41943006n, 48);
  createHash('md5').update('disk').digest().copy(header, 56);
  header.writeBigUInt64LE(2n, 72);
  header.writeUInt32LE(128, 80);
  header.writeUInt32LE(128, 84);
  const entry = (type: string, first: bigint, last: bigint, name: string): Buffer => {
    const e = Buffer.alloc(128);
    Buffer.from(type, 'hex').copy(e, 0);
    createHash('md5').update(name).digest().copy(e, 16);
    e.writeBigUInt64LE(first, 32);
    e.writeBigUInt64LE(last, 40);
    e.write(name, 56, 'utf16le');
    return e;
  };
  const count = Buffer.alloc(8);
  count.writeBigUInt64LE(2n);
  return Buffer.concat([
    header,
    count,
    entry('28732ac11ff8d211ba4b00a0c93ec93b', 2048n, 1050623n, 'EFI System'),
    entry('af3dc60f838472478e793d69d8477de4', 1050624n, 41940991n, 'Linux filesystem'),
  ]);
}
