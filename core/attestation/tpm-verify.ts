// The verifier's side of TPM-mode attestation: it takes what the host sends (a quote, its
// signature, PCR values, the event log, the measured binaries) and trusts none of it until it is
// checked. The quote must be signed by the registered AK, carry this session's qualifying data and
// a PCR digest that the reported values hash to; only then are those values compared with the
// event log's replay and with the baseline. Pure: no TPM, no vault — tests feed it old or forged
// evidence directly.
import { createHash } from 'node:crypto';
import { ShieldError } from '../errors.ts';
import { TPM_ALG, TPM_ST, parseAttest, parsePublic, parseSignature, publicKeyObject, verifySignature, type TpmsAttest } from '../tpm/mod.ts';
import { parseEventLog, type EventLog } from './eventlog.ts';
import { explainPcrMismatch } from './eventlog-diff.ts';
import { SECURE_BOOT_PCR, checkCodeIntegrity, differingPcrs, explainBaselineDiff, qualifyingData, type Baseline, type CodeIntegrityPolicy, type MeasuredBinary } from './baseline.ts';

/**
 * Why a TPM host is refused, in the spirit of HGS's AttestationStatus / AttestationSubStatus.
 * NotConfigured: no TPM registered or no baseline; UnauthorizedHost: another TPM than the
 * registered one; AkNotBound: the AK failed credential activation against the EK; QuoteSignature:
 * not a quote signed by the registered AK; NonceMismatch: not this session's quote (a replay);
 * PcrDigestMismatch: the PCR values sent do not hash to the quoted digest; TcgLogVerification: the
 * event log does not replay to the quoted PCRs; SecureBootSettings: PCR 7 differs from the
 * baseline; PcrMismatch: another PCR does; CodeIntegrityPolicy: an allowed binary changed or is
 * missing; ClockRollback: the TPM's reset/restart counters or clock went backwards, or it is not safe.
 */
export const TPM_REASONS = [
  'NotConfigured',
  'UnauthorizedHost',
  'AkNotBound',
  'QuoteSignature',
  'NonceMismatch',
  'PcrDigestMismatch',
  'TcgLogVerification',
  'SecureBootSettings',
  'PcrMismatch',
  'CodeIntegrityPolicy',
  'ClockRollback',
] as const;
export type TpmReason = (typeof TPM_REASONS)[number];

export interface Problem {
  reason: TpmReason;
  message: string;
}

/** The TPM's clock as the last accepted quote reported it (clock as a decimal string). */
export interface ClockState {
  clock: string;
  resetCount: number;
  restartCount: number;
}

/** What the host sends. Every field is untrusted. */
export interface TpmEvidence {
  /** TPMS_ATTEST, the bytes the AK signed. */
  quoted: Buffer;
  /** TPMT_SIGNATURE, marshalled. */
  signature: Buffer;
  /** PCR → value (hex), SHA-256 bank, as TPM2_PCR_Read returned them. */
  pcrValues: Record<number, string>;
  /** The TCG event log, or null with the reason it could not be read. */
  eventLog: Buffer | null;
  eventLogError?: string;
  binaries: MeasuredBinary[];
}

export interface TpmExpectations {
  /** The registered AK's TPMT_PUBLIC. */
  akPublic: Buffer;
  /** This session's fresh nonce. */
  nonce: Buffer;
  pcrs: readonly number[];
  /** Compare with this baseline (none while capturing one). */
  baseline?: Baseline | null;
  /** Check the binaries against this allow-list (none while capturing a baseline). */
  policy?: CodeIntegrityPolicy | null;
  /** The clock of the last successful attestation; counters must not go back. */
  lastClock?: ClockState | null;
}

export interface TpmVerdict {
  ok: boolean;
  problems: Problem[];
  /** Explanations, event by event: "PCR 7: Secure Boot db added …". */
  findings: string[];
  /** The PCR values, once they are known to be what the TPM quoted; null otherwise. */
  quoted: Record<number, string> | null;
  /** The event log, once it is known to replay to the quoted PCRs. */
  log: EventLog | null;
  clock: ClockState | null;
}

const SHA256 = TPM_ALG.SHA256;

function sha256(...parts: Buffer[]): Buffer {
  const h = createHash('sha256');
  for (const p of parts) h.update(p);
  return h.digest();
}

function verdict(problems: Problem[], rest: Partial<TpmVerdict> = {}): TpmVerdict {
  return { ok: problems.length === 0, problems, findings: [], quoted: null, log: null, clock: null, ...rest };
}

/** The signature, the structure, and that it is a quote: everything else rests on this. */
function checkSignature(e: TpmEvidence, akPublic: Buffer): { attest: TpmsAttest } | Problem {
  let attest: TpmsAttest;
  let ok: boolean;
  try {
    attest = parseAttest(e.quoted);
    ok = verifySignature(publicKeyObject(parsePublic(akPublic)), e.quoted, parseSignature(e.signature));
  } catch (err) {
    const why = err instanceof ShieldError ? err.message : String(err);
    return { reason: 'QuoteSignature', message: `The quote cannot be checked: ${why}` };
  }
  if (!ok) return { reason: 'QuoteSignature', message: 'The quote is not signed by the registered attestation key (AK): forged, altered, or from another TPM.' };
  if (attest.type !== TPM_ST.ATTEST_QUOTE || !attest.quote) return { reason: 'QuoteSignature', message: 'The signed message is not a TPM quote.' };
  return { attest };
}

/**
 * now − last as a signed 32-bit difference. A quote signed by a key outside the endorsement and
 * platform hierarchies (our AK lives under the SRK) carries resetCount and restartCount offset by a
 * constant per key (TPM 2.0 Part 1, "obfuscation"; libtpms FillInAttestInfo adds it mod 2^32), so
 * the raw numbers mean nothing but their differences for one AK are the true ones.
 */
function counterStep(now: number, last: number): number {
  return ((now - last) << 0) | 0;
}

/**
 * The clock rules Keylime applies (check_quote_timing): reset and restart counters never go back,
 * the clock is monotonic within one reset, and `safe` is set. `last` must come from the same AK.
 */
export function checkClock(now: ClockState, safe: boolean, last: ClockState | null | undefined): Problem | null {
  const rollback = (why: string): Problem => ({ reason: 'ClockRollback', message: `The TPM's ${why}: its state may have been rolled back to an older copy.` });
  if (!safe) return rollback('clock is not marked safe (it may have gone back after a power loss)');
  if (!last) return null;
  const resets = counterStep(now.resetCount, last.resetCount);
  if (resets < 0) return rollback(`reset counter went backwards (${-resets} fewer resets than at the last attestation)`);
  if (resets === 0) {
    const restarts = counterStep(now.restartCount, last.restartCount);
    if (restarts < 0) return rollback(`restart counter went backwards (${-restarts} fewer restarts than at the last attestation)`);
    if (BigInt(now.clock) < BigInt(last.clock)) return rollback(`clock went backwards within one reset (${now.clock} < ${last.clock} ms at the last attestation)`);
  }
  return null;
}

/**
 * Checks evidence against expectations. Stops after a signature failure (nothing in an unsigned
 * message can be believed); otherwise collects every problem, so one refusal names all reasons.
 */
export function verifyTpmEvidence(e: TpmEvidence, x: TpmExpectations): TpmVerdict {
  const signed = checkSignature(e, x.akPublic);
  if ('reason' in signed) return verdict([signed]);
  const { attest } = signed;
  const quote = attest.quote!;
  const problems: Problem[] = [];
  const findings: string[] = [];

  if (!attest.extraData.equals(qualifyingData(x.nonce, e.binaries))) {
    problems.push({ reason: 'NonceMismatch', message: 'The quote does not carry this attestation’s nonce (and binary measurements): it is a replayed or mismatched quote.' });
  }

  // The PCR values the host sent count only if they are exactly what the TPM quoted.
  const pcrs = [...new Set(x.pcrs)].sort((a, b) => a - b);
  const sel = quote.pcrSelect.filter((s) => s.pcrs.length > 0);
  let quoted: Record<number, string> | null = null;
  if (sel.length !== 1 || sel[0]!.hash !== SHA256 || sel[0]!.pcrs.join(',') !== pcrs.join(',')) {
    problems.push({ reason: 'PcrDigestMismatch', message: `The quote covers ${sel.map((s) => `bank 0x${s.hash.toString(16)} PCRs ${s.pcrs.join(',')}`).join('; ') || 'no PCRs'}, not SHA-256 PCRs ${pcrs.join(',')}.` });
  } else {
    const values = sel[0]!.pcrs.map((p) => e.pcrValues[p]);
    if (values.some((v) => v === undefined || !/^[0-9a-f]{64}$/.test(v))) {
      problems.push({ reason: 'PcrDigestMismatch', message: 'The host did not send a SHA-256 value for every quoted PCR.' });
    } else if (!sha256(...values.map((v) => Buffer.from(v!, 'hex'))).equals(quote.pcrDigest)) {
      problems.push({ reason: 'PcrDigestMismatch', message: 'The PCR values sent do not hash to the quoted PCR digest: they are not what the TPM signed.' });
    } else {
      quoted = Object.fromEntries(sel[0]!.pcrs.map((p, i) => [p, values[i]!]));
    }
  }

  const clock: ClockState = { clock: attest.clockInfo.clock.toString(), resetCount: attest.clockInfo.resetCount, restartCount: attest.clockInfo.restartCount };
  const clockProblem = checkClock(clock, attest.clockInfo.safe, x.lastClock);
  if (clockProblem) problems.push(clockProblem);

  // The event log: it must replay to the quoted PCRs, or it explains nothing.
  let log: EventLog | null = null;
  if (quoted) {
    if (e.eventLog === null) {
      problems.push({ reason: 'TcgLogVerification', message: `No TCG event log: ${e.eventLogError ?? 'the host sent none'}.` });
    } else {
      try {
        const parsed = parseEventLog(e.eventLog);
        const mismatches = explainPcrMismatch(parsed, { sha256: quoted });
        if (mismatches.length === 0) log = parsed;
        else {
          problems.push({ reason: 'TcgLogVerification', message: `The TCG event log does not replay to the quoted PCR${mismatches.length === 1 ? '' : 's'} ${mismatches.map((m) => m.pcr).join(', ')}.` });
          findings.push(...mismatches.map((m) => m.message));
        }
      } catch (err) {
        problems.push({ reason: 'TcgLogVerification', message: err instanceof ShieldError ? err.message : `The TCG event log cannot be read: ${String(err)}` });
      }
    }
  }

  if (quoted && x.baseline) {
    const differing = differingPcrs(x.baseline, quoted);
    const lines = explainBaselineDiff(x.baseline, quoted, log);
    findings.push(...lines);
    const secureBoot = differing.filter((d) => d.pcr === SECURE_BOOT_PCR);
    const other = differing.filter((d) => d.pcr !== SECURE_BOOT_PCR);
    const about = (ps: number[]) => lines.filter((l) => ps.some((p) => l.startsWith(`PCR ${p}:`)));
    if (secureBoot.length > 0) {
      problems.push({ reason: 'SecureBootSettings', message: `PCR 7 differs from the baseline (Secure Boot configuration changed): ${about([SECURE_BOOT_PCR]).join('; ')}` });
    }
    if (other.length > 0) {
      const ps = other.map((d) => d.pcr);
      problems.push({ reason: 'PcrMismatch', message: `PCR${ps.length === 1 ? '' : 's'} ${ps.join(', ')} differ${ps.length === 1 ? 's' : ''} from the baseline (boot configuration changed): ${about(ps).join('; ')}` });
    }
  }

  if (x.policy) {
    const ci = checkCodeIntegrity(x.policy, e.binaries);
    if (ci.length > 0) problems.push({ reason: 'CodeIntegrityPolicy', message: `Code-integrity policy: ${ci.join('; ')}.` });
  }

  return verdict(problems, { findings, quoted, log, clock });
}

/** The refusal for a failed verdict: attestation_failed naming every reason. */
export function refusal(problems: readonly Problem[], findings: readonly string[] = [], what = 'TPM attestation refused'): ShieldError {
  const reasons = [...new Set(problems.map((p) => p.reason))];
  const message = [`${what} (${reasons.join(', ')}):`, ...problems.map((p) => `  [${p.reason}] ${p.message}`)].join('\n');
  return new ShieldError('attestation_failed', message, { details: { reason: reasons[0], reasons, mode: 'tpm', findings: [...findings], problems: problems.map((p) => ({ ...p })) } });
}
