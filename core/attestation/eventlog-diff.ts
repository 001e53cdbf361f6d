// Explains event logs in domain words: what changed between a baseline log and the current one
// ("PCR 7: Secure Boot db changed"), and which PCRs a TPM reports that the log does not replay to.
import { DEFAULT_PCRS, EVENT_TYPES, measuredEvents, replayEventLog, type EventLog, type LogEvent, type PcrValues } from './eventlog.ts';

export interface EventLogFinding {
  pcr: number;
  change: 'changed' | 'added' | 'removed';
  /** What the event measures: "Secure Boot db", "kernel command line", "boot application". */
  subject: string;
  message: string;
  /** Event indices (tpm2_eventlog's EventNum) in each log. */
  baselineEvent?: number;
  currentEvent?: number;
}

const T = EVENT_TYPES;
const SECURE_BOOT_DBS = new Set(['PK', 'KEK', 'db', 'dbx', 'dbt', 'dbr']);

function text(e: LogEvent): string | undefined {
  return e.detail?.kind === 'text' ? e.detail.text : undefined;
}

/** GRUB's EV_IPL strings begin with what they are: "grub_cmd: …", "kernel_cmdline: …". */
function iplPrefix(e: LogEvent): string | undefined {
  return /^([A-Za-z_]+):? /.exec(text(e) ?? '')?.[1];
}

function iplBody(e: LogEvent): string {
  const t = text(e) ?? '';
  const p = iplPrefix(e);
  return p === undefined ? t : t.slice(t.indexOf(' ') + 1);
}

/** What an event measures, as a noun phrase. */
export function eventSubject(e: LogEvent): string {
  const d = e.detail;
  if (d?.kind === 'uefi-variable') {
    if (e.type === T.EV_EFI_VARIABLE_DRIVER_CONFIG) {
      if (d.name === 'SecureBoot') return 'SecureBoot variable';
      if (SECURE_BOOT_DBS.has(d.name)) return `Secure Boot ${d.name}`;
      return `UEFI variable ${d.name}`;
    }
    if (e.type === T.EV_EFI_VARIABLE_AUTHORITY) return `certificate from ${d.name} that verified a boot image`;
    if (d.name === 'BootOrder') return 'boot order';
    if (/^Boot[0-9A-Fa-f]{4}$/.test(d.name)) return `boot entry ${d.name}`;
    return `UEFI boot variable ${d.name}`;
  }
  switch (e.type) {
    case T.EV_S_CRTM_VERSION:
      return 'firmware version';
    case T.EV_S_CRTM_CONTENTS:
    case T.EV_EFI_PLATFORM_FIRMWARE_BLOB:
    case T.EV_EFI_PLATFORM_FIRMWARE_BLOB2:
      return 'firmware code';
    case T.EV_POST_CODE:
      return d?.kind === 'text' ? `firmware POST code '${d.text}'` : 'firmware code';
    case T.EV_CPU_MICROCODE:
      return 'CPU microcode';
    case T.EV_PLATFORM_CONFIG_FLAGS:
      return 'platform configuration flags';
    case T.EV_EFI_HANDOFF_TABLES:
    case T.EV_EFI_HANDOFF_TABLES2:
      return 'firmware handoff tables (SMBIOS/ACPI)';
    case T.EV_EFI_HCRTM_EVENT:
      return 'H-CRTM measurement';
    case T.EV_EFI_BOOT_SERVICES_APPLICATION:
      return 'boot application';
    case T.EV_EFI_BOOT_SERVICES_DRIVER:
      return 'UEFI boot services driver';
    case T.EV_EFI_RUNTIME_SERVICES_DRIVER:
      return 'UEFI runtime driver';
    case T.EV_EFI_GPT_EVENT:
    case T.EV_EFI_GPT_EVENT2:
      return 'GPT partition table';
    case T.EV_EFI_ACTION:
    case T.EV_ACTION:
      return 'firmware action';
    case T.EV_SEPARATOR:
      return 'separator';
    case T.EV_IPL: {
      const p = iplPrefix(e);
      if (p === 'kernel_cmdline' || p === 'grub_kernel_cmdline') return 'kernel command line';
      if (p === 'module_cmdline') return 'initrd/module command line';
      if (p === 'grub_cmd') return 'GRUB command';
      if (e.pcr === 9) return 'file loaded by the boot loader';
      return 'boot loader measurement';
    }
    default:
      return `${e.typeName} event`;
  }
}

/** Events measuring "the same thing": paired as changed rather than removed + added. */
function identity(e: LogEvent): string {
  const d = e.detail;
  if (d?.kind === 'uefi-variable') return `${e.type}:${d.guid}:${d.name}`;
  if (e.type === T.EV_IPL) return `${e.type}:${iplPrefix(e) ?? (e.pcr === 9 ? (text(e) ?? '') : '')}`;
  return `${e.type}`;
}

function sameMeasurement(a: LogEvent, b: LogEvent): boolean {
  if (a.type !== b.type) return false;
  const common = Object.keys(a.digests).filter((alg) => alg in b.digests);
  if (common.length === 0) return a.data.equals(b.data);
  return common.every((alg) => a.digests[alg] === b.digests[alg]);
}

const quote = (s: string): string => `'${s.length > 200 ? `${s.slice(0, 200)}…` : s}'`;

function changeText(a: LogEvent, b: LogEvent): string {
  const da = a.detail;
  const db = b.detail;
  if (da?.kind === 'uefi-variable' && db?.kind === 'uefi-variable') {
    if (da.name === 'SecureBoot' && da.data.length === 1 && db.data.length === 1 && da.data[0] !== db.data[0]) {
      if (db.data[0] === 0) return ' (Secure Boot disabled)';
      if (da.data[0] === 0) return ' (Secure Boot enabled)';
    }
    if (da.description !== undefined && db.description !== undefined && da.description !== db.description) return ` (${quote(da.description)} → ${quote(db.description)})`;
    return '';
  }
  if (da?.kind === 'separator' && db?.kind === 'separator' && da.value !== db.value) {
    return ` (0x${da.value.toString(16)} → 0x${db.value.toString(16)}${db.value === 0xffffffff ? ': firmware reported an error' : ''})`;
  }
  if (da?.kind === 'image-load' || db?.kind === 'image-load') {
    const path = db?.kind === 'image-load' ? db.path : undefined;
    return ` (event ${b.index}${path === undefined ? '' : `, ${path}`})`;
  }
  const ta = text(a);
  const tb = text(b);
  if (ta !== undefined && tb !== undefined && ta !== tb) {
    if (a.type === T.EV_S_CRTM_VERSION) return ` (S-CRTM version ${quote(ta)} → ${quote(tb)})`;
    if (a.type === T.EV_IPL) return `: ${quote(iplBody(a))} → ${quote(iplBody(b))}`;
    return `: ${quote(ta)} → ${quote(tb)}`;
  }
  return ` (event ${b.index})`;
}

function presenceText(e: LogEvent): string {
  const t = text(e);
  if (t !== undefined && e.type !== T.EV_POST_CODE) return `: ${quote(e.type === T.EV_IPL ? iplBody(e) : t)}`;
  if (e.detail?.kind === 'image-load' && e.detail.path !== undefined) return `: ${e.detail.path}`;
  return '';
}

/** Longest common subsequence of a and b under `eq`, as index pairs. */
function lcs<X>(a: readonly X[], b: readonly X[], eq: (x: X, y: X) => boolean): [number, number][] {
  const n = a.length;
  const m = b.length;
  if (n * m > 4_000_000) {
    // Pathologically long PCR histories: pair in order instead.
    const pairs: [number, number][] = [];
    for (let i = 0; i < Math.min(n, m); i++) if (eq(a[i]!, b[i]!)) pairs.push([i, i]);
    return pairs;
  }
  const w = m + 1;
  const t = new Uint32Array((n + 1) * w);
  for (let i = n - 1; i >= 0; i--) {
    for (let j = m - 1; j >= 0; j--) {
      t[i * w + j] = eq(a[i]!, b[j]!) ? t[(i + 1) * w + j + 1]! + 1 : Math.max(t[(i + 1) * w + j]!, t[i * w + j + 1]!);
    }
  }
  const pairs: [number, number][] = [];
  for (let i = 0, j = 0; i < n && j < m; ) {
    if (eq(a[i]!, b[j]!)) pairs.push([i++, j++]);
    else if (t[(i + 1) * w + j]! >= t[i * w + j + 1]!) i++;
    else j++;
  }
  return pairs;
}

function diffPcr(pcr: number, base: LogEvent[], cur: LogEvent[]): EventLogFinding[] {
  const findings: EventLogFinding[] = [];
  const same = lcs(base, cur, sameMeasurement);
  const anchors: [number, number][] = [...same, [base.length, cur.length]];
  let i = 0;
  let j = 0;
  for (const [ai, bj] of anchors) {
    // In each gap between identical events, pair events that measure the same thing.
    const gapA = base.slice(i, ai);
    const gapB = cur.slice(j, bj);
    const pairs = lcs(gapA, gapB, (x, y) => identity(x) === identity(y));
    const pairedA = new Set(pairs.map((p) => p[0]));
    const pairedB = new Set(pairs.map((p) => p[1]));
    gapA.forEach((e, k) => {
      if (!pairedA.has(k)) {
        const subject = eventSubject(e);
        findings.push({ pcr, change: 'removed', subject, message: `PCR ${pcr}: ${subject} removed${presenceText(e)} (baseline event ${e.index})`, baselineEvent: e.index });
      }
    });
    for (const [x, y] of pairs) {
      const a = gapA[x]!;
      const b = gapB[y]!;
      const subject = eventSubject(b);
      findings.push({ pcr, change: 'changed', subject, message: `PCR ${pcr}: ${subject} changed${changeText(a, b)}`, baselineEvent: a.index, currentEvent: b.index });
    }
    gapB.forEach((e, k) => {
      if (!pairedB.has(k)) {
        const subject = eventSubject(e);
        findings.push({ pcr, change: 'added', subject, message: `PCR ${pcr}: ${subject} added${presenceText(e)} (event ${e.index})`, currentEvent: e.index });
      }
    });
    i = ai + 1;
    j = bj + 1;
  }
  return findings;
}

/**
 * What differs between a baseline log and the current one, PCR by PCR (default PCRs 0–7): events
 * of one PCR are matched in order; each event that changed, appeared or disappeared is one finding.
 * No findings: the logs measure the same things (their PCRs replay alike).
 */
export function diffEventLogs(baseline: EventLog, current: EventLog, options: { pcrs?: readonly number[] } = {}): EventLogFinding[] {
  const pcrs = [...new Set(options.pcrs ?? DEFAULT_PCRS)].sort((a, b) => a - b);
  return pcrs.flatMap((pcr) => diffPcr(pcr, measuredEvents(baseline, pcr), measuredEvents(current, pcr)));
}

export interface PcrMismatch {
  bank: string;
  pcr: number;
  quoted: string;
  /** What the log replays to; null when it cannot (no digests of this bank). */
  replayed: string | null;
  message: string;
}

const short = (hex: string): string => `${hex.slice(0, 16)}…`;

/**
 * The PCRs a TPM reports (bank → PCR → hex, e.g. from a verified quote) that the event log does not
 * replay to: the log was tampered with, is incomplete, or belongs to another boot.
 */
export function explainPcrMismatch(log: EventLog, quoted: PcrValues): PcrMismatch[] {
  const replayed = replayEventLog(log);
  const out: PcrMismatch[] = [];
  for (const [bank, values] of Object.entries(quoted)) {
    for (const [key, raw] of Object.entries(values)) {
      const pcr = Number(key);
      const q = raw.toLowerCase().replace(/^0x/, '');
      const r = replayed[bank]?.[pcr];
      if (r === q) continue;
      const events = measuredEvents(log, pcr);
      let why: string;
      if (replayed[bank] === undefined) why = `the event log records no ${bank} digests, so it cannot vouch for this PCR`;
      else if (r === undefined) why = `some of the log's events for this PCR lack a ${bank} digest, so it cannot be replayed`;
      else if (events.length === 0) why = `the TPM reports ${short(q)} but the event log records no event for this PCR: the log is incomplete`;
      else why = `the event log (${events.length} event${events.length === 1 ? '' : 's'}) replays to ${short(r)} but the TPM reports ${short(q)}: the log was tampered with, is incomplete, or is from another boot`;
      out.push({ bank, pcr, quoted: q, replayed: r ?? null, message: `PCR ${pcr} (${bank}): ${why}` });
    }
  }
  return out.sort((a, b) => a.pcr - b.pcr || a.bank.localeCompare(b.bank));
}
