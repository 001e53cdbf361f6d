// What a healthy TPM host looks like: its baseline (the SHA-256 PCR values a verified quote
// reported, with the TCG event log that replays to them) and its code-integrity policy (the
// SHA-256 allow-list of the binaries that touch shielded VMs: QEMU, swtpm, OVMF, ShieldLab).
// Pure functions over those, plus the policy's place in the vault (record 'attestation'/'ci-policy').
import { createHash } from 'node:crypto';
import { closeSync, fstatSync, openSync, readSync } from 'node:fs';
import { resolve } from 'node:path';
import { ShieldError, toShieldError } from '../errors.ts';
import type { Vault } from '../vault/mod.ts';
import { DEFAULT_PCRS, PCR_COUNT, parseEventLog, type EventLog } from './eventlog.ts';
import { diffEventLogs } from './eventlog-diff.ts';

/** Where Linux exposes the firmware's event log (root only). */
export const DEFAULT_EVENT_LOG = '/sys/kernel/security/tpm0/binary_bios_measurements';
/** PCR 7 holds the Secure Boot configuration: PK, KEK, db, dbx and the authorities used. */
export const SECURE_BOOT_PCR = 7;
export { DEFAULT_PCRS };

export interface Baseline {
  bank: 'sha256';
  pcrs: number[];
  /** PCR → value (hex), as a verified quote reported them. */
  values: Record<string, string>;
  /** The event log at capture (base64): what explains a later difference, event by event. */
  eventLog: string;
  eventLogPath: string;
  events: number;
  capturedAt: string;
}

export interface AllowedBinary {
  path: string;
  sha256: string;
  addedAt: string;
}

export interface CodeIntegrityPolicy {
  binaries: AllowedBinary[];
}

/** A binary as the host measured it at attest time; sha256 null when it is missing or unreadable. */
export interface MeasuredBinary {
  path: string;
  sha256: string | null;
}

// ---- PCR lists ----------------------------------------------------------------------------------

/** Sorted, distinct PCR indices 0–23, or invalid_argument. */
export function normalisePcrs(pcrs: readonly number[]): number[] {
  const out = [...new Set(pcrs)].sort((a, b) => a - b);
  const bad = out.find((p) => !Number.isInteger(p) || p < 0 || p >= PCR_COUNT);
  if (bad !== undefined) throw new ShieldError('invalid_argument', `PCR ${bad} is not 0–${PCR_COUNT - 1}.`);
  if (out.length === 0) throw new ShieldError('invalid_argument', 'A baseline needs at least one PCR.');
  return out;
}

export function baselineLog(b: Baseline): EventLog {
  return parseEventLog(Buffer.from(b.eventLog, 'base64'));
}

/** The PCRs whose quoted value is not the baseline's. */
export function differingPcrs(baseline: Baseline, quoted: Record<number, string>): { pcr: number; baseline: string; current: string }[] {
  return baseline.pcrs
    .map((pcr) => ({ pcr, baseline: baseline.values[pcr] ?? '', current: quoted[pcr] ?? '' }))
    .filter((d) => d.baseline !== d.current);
}

const short = (hex: string): string => (hex ? `${hex.slice(0, 12)}…` : 'none');

/**
 * Why the current PCRs differ from the baseline, event by event where the logs tell (the current
 * log must already be known to replay to the quoted PCRs); a PCR whose logs show no difference
 * still gets a line with both values.
 */
export function explainBaselineDiff(baseline: Baseline, quoted: Record<number, string>, current: EventLog | null): string[] {
  const differing = differingPcrs(baseline, quoted);
  if (differing.length === 0) return [];
  let explained: { pcr: number; message: string }[] = [];
  if (current) {
    try {
      explained = diffEventLogs(baselineLog(baseline), current, { pcrs: differing.map((d) => d.pcr) });
    } catch {
      explained = []; // a stored log that no longer parses explains nothing; the values still differ
    }
  }
  return differing.flatMap((d) => {
    const lines = explained.filter((f) => f.pcr === d.pcr).map((f) => f.message);
    if (lines.length > 0) return lines;
    const why = current ? 'the event log records no difference' : 'no verified event log to explain it';
    return [`PCR ${d.pcr}: ${short(d.baseline)} → ${short(d.current)} (${why})`];
  });
}

// ---- code integrity -----------------------------------------------------------------------------

/** SHA-256 of a file's contents (following symlinks), hex; null when it cannot be read. */
export function sha256File(path: string): string | null {
  let fd: number;
  try {
    fd = openSync(path, 'r');
  } catch {
    return null;
  }
  try {
    if (!fstatSync(fd).isFile()) return null;
    const h = createHash('sha256');
    const buf = Buffer.allocUnsafe(1 << 20);
    for (let n; (n = readSync(fd, buf, 0, buf.length, null)) > 0; ) h.update(buf.subarray(0, n));
    return h.digest('hex');
  } catch {
    return null;
  } finally {
    closeSync(fd);
  }
}

/** Measures each path now, sorted by path (the order the digest below uses). */
export function measureBinaries(paths: readonly string[]): MeasuredBinary[] {
  return [...new Set(paths)].sort().map((path) => ({ path, sha256: sha256File(path) }));
}

/** SHA-256 over the sorted (path, hash) list: `path NUL hash-or-"-" LF` per entry (a path has no NUL). */
export function codeIntegrityDigest(measured: readonly MeasuredBinary[]): Buffer {
  const h = createHash('sha256');
  for (const m of [...measured].sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0))) h.update(`${m.path}\0${m.sha256 ?? '-'}\n`, 'utf8');
  return h.digest();
}

/**
 * The quote's qualifying data: SHA-256(nonce ‖ digest of the measured binaries). The TPM signs it
 * with the PCRs, so the code-integrity measurement is bound to this attestation: it cannot be
 * swapped for another run's list or replayed later, since the verifier recomputes the value from
 * its own fresh nonce and the list the host reports. (Without IMA the hashes are still the host
 * software's word; extending them into a PCR would make them measured — see the README.)
 */
export function qualifyingData(nonce: Buffer, measured: readonly MeasuredBinary[]): Buffer {
  return createHash('sha256').update(nonce).update(codeIntegrityDigest(measured)).digest();
}

/** Each allowed binary that is missing or whose hash changed, named, in words. */
export function checkCodeIntegrity(policy: CodeIntegrityPolicy, measured: readonly MeasuredBinary[]): string[] {
  if (policy.binaries.length === 0) return ['the code-integrity allow-list is empty: add the hypervisor binaries with `shieldlab host policy add-binary PATH`'];
  const problems: string[] = [];
  for (const b of policy.binaries) {
    const m = measured.find((x) => x.path === b.path);
    if (!m || m.sha256 === null) problems.push(`${b.path} is missing or unreadable`);
    else if (m.sha256 !== b.sha256) problems.push(`${b.path} changed: SHA-256 ${short(m.sha256)} is not the allowed ${short(b.sha256)}`);
  }
  return problems;
}

// ---- the policy in the vault --------------------------------------------------------------------

const POLICY_RECORD = 'ci-policy';

export function loadPolicy(vault: Vault): CodeIntegrityPolicy {
  if (!vault.hasRecord('attestation', POLICY_RECORD)) return { binaries: [] };
  return JSON.parse(Buffer.from(vault.getRecord('attestation', POLICY_RECORD, { audit: false }).data, 'base64').toString('utf8')) as CodeIntegrityPolicy;
}

function savePolicy(vault: Vault, policy: CodeIntegrityPolicy): void {
  vault.putRecord('attestation', { name: POLICY_RECORD, data: Buffer.from(JSON.stringify(policy), 'utf8'), notes: 'code-integrity allow-list (tpm mode)' });
}

/** Allows a binary at its current hash (adding it again after an update re-approves it); audited. */
export function addBinary(vault: Vault, path: string, now: Date): CodeIntegrityPolicy {
  const full = resolve(path);
  const sha256 = sha256File(full);
  if (sha256 === null) throw new ShieldError('not_found', `Cannot read ${full}: a binary on the allow-list must exist and be a readable file.`);
  const policy = loadPolicy(vault);
  const previous = policy.binaries.find((b) => b.path === full);
  policy.binaries = [...policy.binaries.filter((b) => b.path !== full), { path: full, sha256, addedAt: now.toISOString() }].sort((a, b) => (a.path < b.path ? -1 : 1));
  savePolicy(vault, policy);
  const change = previous ? (previous.sha256 === sha256 ? 'unchanged' : `was ${previous.sha256.slice(0, 12)}…`) : 'new';
  vault.record({ action: 'host.policy-add-binary', outcome: 'ok', subject: `${full} ${sha256.slice(0, 16)}`, reason: change });
  return policy;
}

export function removeBinary(vault: Vault, path: string): CodeIntegrityPolicy {
  const full = resolve(path);
  const policy = loadPolicy(vault);
  if (!policy.binaries.some((b) => b.path === full)) throw new ShieldError('not_found', `${full} is not on the code-integrity allow-list.`);
  policy.binaries = policy.binaries.filter((b) => b.path !== full);
  savePolicy(vault, policy);
  vault.record({ action: 'host.policy-remove-binary', outcome: 'ok', subject: full });
  return policy;
}

/** Reads an event log file, or says plainly why not. */
export function readEventLogFile(path: string): Buffer {
  let fd: number | undefined;
  try {
    fd = openSync(path, 'r');
    // sysfs reports size 0 for binary_bios_measurements: read until EOF.
    const parts: Buffer[] = [];
    const buf = Buffer.allocUnsafe(1 << 16);
    for (let n; (n = readSync(fd, buf, 0, buf.length, null)) > 0; ) parts.push(Buffer.from(buf.subarray(0, n)));
    return Buffer.concat(parts);
  } catch (err) {
    const e = toShieldError(err);
    throw new ShieldError(e.code === 'not_found' ? 'not_found' : 'io_error', `Cannot read the TCG event log ${path}: ${e.code === 'not_found' ? 'no such file' : e.message}${path === DEFAULT_EVENT_LOG ? ' (it is readable by root only; or give --event-log FILE)' : ''}`);
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
}
