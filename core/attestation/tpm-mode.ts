// TPM-mode attestation, the host's side and the flow: register the host's TPM (EK, EK
// certificate, an AK proven by credential activation to live in the same TPM), capture and
// re-learn the baseline, and gather evidence for a fresh-nonce quote that tpm-verify.ts checks.
// State lives in the vault (record 'attestation'/'tpm-host'); the AK's private blob is wrapped by
// the TPM to its SRK (no secret to us) but stays in the vault all the same. The SRK is recreated
// from its template when the AK must be loaded from its blobs, and every object is flushed after
// use (libtpms keeps ~3 transient objects); within one process the loaded AK's saved context is
// reused instead (see akContexts), which spares the two CreatePrimary commands per attestation.
import { X509Certificate, createHash, randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import { ShieldError } from '../errors.ts';
import type { Vault } from '../vault/mod.ts';
import {
  EK_CERT_NV_INDEX,
  TPMA_OBJECT,
  TPM_ALG,
  TPM_RH,
  Tpm,
  makeCredential,
  marshal,
  objectName,
  parsePublic,
  publicKeyObject,
  srkTemplate,
  writeSignature,
  type PublicArea,
  type TpmsContext,
} from '../tpm/mod.ts';
import {
  DEFAULT_EVENT_LOG,
  DEFAULT_PCRS,
  explainBaselineDiff,
  differingPcrs,
  loadPolicy,
  measureBinaries,
  normalisePcrs,
  qualifyingData,
  readEventLogFile,
  type Baseline,
} from './baseline.ts';
import { refusal, verifyTpmEvidence, type ClockState, type TpmEvidence, type TpmVerdict } from './tpm-verify.ts';

/** Where the host's TPM is when neither --tpm nor a registration says. */
export const DEFAULT_TPM_ADDRESS = 'device:/dev/tpmrm0';

export interface TpmHostState {
  name: string;
  /** SHA-256 of the EK public key (SPKI DER), hex: the host's identity in tpm mode. */
  hostId: string;
  address: string;
  registeredAt: string;
  ek: { algorithm: 'rsa'; public: string; certificate: string | null };
  ak: { algorithm: 'ecc'; public: string; private: string; name: string };
  baseline: Baseline | null;
  lastClock: ClockState | null;
  lastAttestedAt: string | null;
}

/** What status shows about the TPM host (no key material). */
export interface TpmHostInfo {
  name: string;
  hostId: string;
  address: string;
  registeredAt: string;
  ekCertificate: string;
  akName: string;
  baseline: { pcrs: number[]; capturedAt: string; eventLog: string; events: number } | null;
  binaries: number;
  lastAttestation: { at: string; resetCount: number; restartCount: number } | null;
}

const RECORD = 'tpm-host';

export function loadTpmHost(vault: Vault): TpmHostState | null {
  if (!vault.hasRecord('attestation', RECORD)) return null;
  return JSON.parse(Buffer.from(vault.getRecord('attestation', RECORD, { audit: false }).data, 'base64').toString('utf8')) as TpmHostState;
}

function saveTpmHost(vault: Vault, state: TpmHostState): void {
  const data = Buffer.from(JSON.stringify(state), 'utf8');
  vault.putRecord('attestation', { name: RECORD, data, notes: 'registered TPM host: EK, AK blobs, baseline, clock' });
  data.fill(0);
}

export function tpmHostId(vault: Vault): string | null {
  return loadTpmHost(vault)?.hostId ?? null;
}

export function tpmHostInfo(vault: Vault): TpmHostInfo | null {
  const s = loadTpmHost(vault);
  if (!s) return null;
  return {
    name: s.name,
    hostId: s.hostId,
    address: s.address,
    registeredAt: s.registeredAt,
    ekCertificate: s.ek.certificate ? describeCertificate(Buffer.from(s.ek.certificate, 'base64')) : 'none',
    akName: s.ak.name,
    baseline: s.baseline ? { pcrs: s.baseline.pcrs, capturedAt: s.baseline.capturedAt, eventLog: s.baseline.eventLogPath, events: s.baseline.events } : null,
    binaries: loadPolicy(vault).binaries.length,
    lastAttestation: s.lastAttestedAt && s.lastClock ? { at: s.lastAttestedAt, resetCount: s.lastClock.resetCount, restartCount: s.lastClock.restartCount } : null,
  };
}

function describeCertificate(der: Buffer): string {
  try {
    const c = new X509Certificate(der);
    return `${c.subject.replace(/\n/g, ', ') || '(empty subject)'}; issued by ${c.issuer.replace(/\n/g, ', ')}; valid to ${c.validTo}`;
  } catch {
    return `${der.length}-byte certificate that does not parse`;
  }
}

function spkiOf(pub: PublicArea['publicArea']): Buffer {
  return publicKeyObject(pub).export({ type: 'spki', format: 'der' });
}

function hostIdOfEk(ekPublic: Buffer): string {
  return createHash('sha256').update(spkiOf(parsePublic(ekPublic))).digest('hex');
}

function publicArea(bytes: Buffer): PublicArea {
  return { bytes, publicArea: parsePublic(bytes) };
}

/** Opens the TPM; a TPM that is not there is tpm_unavailable, whose message points to host-key / ad-group. */
async function withTpm<T>(address: string, fn: (tpm: Tpm) => Promise<T>): Promise<T> {
  const tpm = await Tpm.open(address);
  try {
    return await fn(tpm);
  } finally {
    await tpm.close();
  }
}

/** The EK certificate from NV (RSA 2048 index), or null when the TPM has none (a plain swtpm). */
async function readEkCertificate(tpm: Tpm): Promise<Buffer | null> {
  try {
    await tpm.nvReadPublic(EK_CERT_NV_INDEX.RSA2048);
  } catch {
    return null;
  }
  try {
    return await tpm.nvRead(EK_CERT_NV_INDEX.RSA2048, { authHandle: TPM_RH.OWNER });
  } catch {
    return await tpm.nvRead(EK_CERT_NV_INDEX.RSA2048);
  }
}

async function ekPublicOf(tpm: Tpm): Promise<Buffer> {
  return tpm.withTransient(tpm.createEk('rsa'), async (ek) => ek.outPublic.bytes);
}

const AK_MUST = TPMA_OBJECT.fixedTPM | TPMA_OBJECT.fixedParent | TPMA_OBJECT.sensitiveDataOrigin | TPMA_OBJECT.restricted | TPMA_OBJECT.sign;

// ---- registration -------------------------------------------------------------------------------

export interface RegisterOptions {
  address: string;
  now: Date;
  name?: string;
  /** Replace a registration of another TPM. */
  replace?: boolean;
  /**
   * Test seam: the TPM the AK is made in (default: `address`). An AK from another TPM claimed
   * with this TPM's EK must fail activation — the binding CVE-2022-1053 was about.
   */
  akAddress?: string;
}

/**
 * Registers this host's TPM: the EK (and its certificate where NV holds one), and an AK under the
 * SRK. The AK counts only after credential activation: a secret made for the EK and the AK's name
 * (MakeCredential, verifier side) must come back from ActivateCredential in the TPM that holds the AK.
 */
export async function registerTpmHost(vault: Vault, opts: RegisterOptions): Promise<TpmHostState> {
  try {
    const state = await register(vault, opts);
    vault.record({ action: 'host.register', outcome: 'ok', subject: `tpm ${state.name} ${state.hostId.slice(0, 16)}`, reason: state.ek.certificate ? 'EK certificate' : 'no EK certificate' });
    return state;
  } catch (err) {
    const e = err instanceof ShieldError ? err : null;
    vault.record({ action: 'host.register', outcome: e?.code === 'attestation_failed' ? 'refused' : 'failed', subject: `tpm ${opts.address}`, reason: String(e?.details?.reason ?? e?.code ?? 'internal') });
    throw err;
  }
}

async function register(vault: Vault, opts: RegisterOptions): Promise<TpmHostState> {
  const previous = loadTpmHost(vault);
  const { ekPublic, ekCert } = await withTpm(opts.address, async (tpm) => ({ ekPublic: await ekPublicOf(tpm), ekCert: await readEkCertificate(tpm) }));
  const hostId = hostIdOfEk(ekPublic);
  if (previous && previous.hostId !== hostId && !opts.replace) {
    throw new ShieldError('already_exists', `Another TPM is registered for this host (${previous.hostId.slice(0, 16)}… at ${previous.address}); register with --yes to replace it (its baseline goes with it).`);
  }
  if (ekCert) {
    // A certificate that names another key is not this TPM's.
    let matches = false;
    try {
      matches = new X509Certificate(ekCert).publicKey.export({ type: 'spki', format: 'der' }).equals(spkiOf(parsePublic(ekPublic)));
    } catch {
      matches = false;
    }
    if (!matches) throw refusal([{ reason: 'UnauthorizedHost', message: 'The EK certificate in NV 0x01C00002 does not certify this TPM’s EK.' }], [], 'TPM registration refused');
  }

  const ak = await withTpm(opts.akAddress ?? opts.address, async (tpm) => {
    const key = await tpm.withTransient(tpm.createPrimary(TPM_RH.OWNER, srkTemplate('ecc')), (srk) => tpm.createAk(srk.handle, 'ecc'));
    const attrs = key.outPublic.publicArea.objectAttributes;
    if ((attrs & AK_MUST) !== AK_MUST || attrs & TPMA_OBJECT.decrypt) {
      throw refusal([{ reason: 'AkNotBound', message: 'The AK is not a restricted, fixedTPM signing key.' }], [], 'TPM registration refused');
    }
    // Verifier: a secret only the TPM holding the registered EK, with this AK loaded, can recover.
    const name = objectName(key.outPublic.bytes);
    const secret = randomBytes(32);
    const credential = makeCredential(parsePublic(ekPublic), secret, name);
    // Host: activation in the TPM that holds the AK, with that TPM's own EK.
    let recovered: Buffer | null = null;
    try {
      recovered = await tpm.withTransient(tpm.createEk('rsa'), (ek) =>
        tpm.withTransient(tpm.createPrimary(TPM_RH.OWNER, srkTemplate('ecc')), (srk) =>
          tpm.withTransient(tpm.load(srk.handle, key), (loaded) => tpm.activateCredential(loaded.handle, ek.handle, credential)),
        ),
      );
    } catch (err) {
      if (!(err instanceof ShieldError) || err.code !== 'tpm_error') throw err;
      recovered = null;
    }
    if (recovered === null || !recovered.equals(secret)) {
      throw refusal([{ reason: 'AkNotBound', message: 'The AK failed credential activation: it does not live in the TPM whose EK was presented.' }], [], 'TPM registration refused');
    }
    return { algorithm: 'ecc' as const, public: key.outPublic.bytes.toString('base64'), private: key.outPrivate.toString('base64'), name: name.toString('hex') };
  });

  const sameTpm = previous?.hostId === hostId;
  const state: TpmHostState = {
    name: opts.name ?? previous?.name ?? hostname(),
    hostId,
    address: opts.address,
    registeredAt: opts.now.toISOString(),
    ek: { algorithm: 'rsa', public: ekPublic.toString('base64'), certificate: ekCert ? ekCert.toString('base64') : null },
    ak,
    baseline: sameTpm ? previous.baseline : null,
    // Quoted counters are offset per AK (see checkClock): a new AK starts a new clock history.
    lastClock: null,
    lastAttestedAt: sameTpm ? previous.lastAttestedAt : null,
  };
  saveTpmHost(vault, state);
  return state;
}

// ---- evidence (host side) -----------------------------------------------------------------------

/** Runs `fn` with a loaded AK's handle; whoever provides it flushes it. */
type WithAk = <T>(fn: (handle: number) => Promise<T>) => Promise<T>;

/** Loads the AK under a fresh SRK (CreatePrimary from the template, Load) for `fn`; flushes both. */
function withAkUnderSrk<T>(tpm: Tpm, ak: { public: Buffer; private: Buffer }, fn: (handle: number) => Promise<T>): Promise<T> {
  return tpm.withTransient(tpm.createPrimary(TPM_RH.OWNER, srkTemplate('ecc')), (srk) =>
    tpm.withTransient(tpm.load(srk.handle, { outPrivate: ak.private, outPublic: publicArea(ak.public) }), (loaded) => fn(loaded.handle)),
  );
}

/**
 * The host's answer to a nonce: loads the AK under a fresh SRK, quotes the SHA-256 PCRs with
 * qualifying data = SHA-256(nonce ‖ binaries digest), reads the PCR values (again if they moved
 * between quote and read), and the event log. Flushes everything it loads.
 */
export async function collectEvidence(
  tpm: Tpm,
  ak: { public: Buffer; private: Buffer },
  opts: { nonce: Buffer; pcrs: readonly number[]; eventLogPath: string; binaries: readonly string[] },
): Promise<TpmEvidence> {
  return gatherEvidence(tpm, (fn) => withAkUnderSrk(tpm, ak, fn), opts);
}

async function gatherEvidence(tpm: Tpm, withAk: WithAk, opts: { nonce: Buffer; pcrs: readonly number[]; eventLogPath: string; binaries: readonly string[] }): Promise<TpmEvidence> {
  const binaries = measureBinaries(opts.binaries);
  const sel = [{ hash: TPM_ALG.SHA256, pcrs: [...opts.pcrs] }];
  const quoted = await withAk(async (handle) => {
    for (let attempt = 0; ; attempt++) {
      const q = await tpm.quote(handle, { nonce: qualifyingData(opts.nonce, binaries), pcrs: sel });
      const { values } = await tpm.pcrRead(sel);
      const digest = createHash('sha256');
      for (const v of values) digest.update(v.digest);
      // A PCR extended between the quote and the read (Keylime #585): quote again.
      if (digest.digest().equals(q.attest.quote?.pcrDigest ?? Buffer.alloc(0)) || attempt >= 2) return { q, values };
    }
  });
  let eventLog: Buffer | null = null;
  let eventLogError: string | undefined;
  try {
    eventLog = readEventLogFile(opts.eventLogPath);
  } catch (err) {
    eventLogError = err instanceof Error ? err.message : String(err);
  }
  return {
    quoted: quoted.q.quoted,
    signature: marshal((w) => writeSignature(w, quoted.q.signature)),
    pcrValues: Object.fromEntries(quoted.values.map((v) => [v.pcr, v.digest.toString('hex')])),
    eventLog,
    ...(eventLogError !== undefined ? { eventLogError } : {}),
    binaries,
  };
}

/**
 * The loaded AK's saved context (TPM2_ContextSave), per TPM address and registered AK, for the life
 * of the process (the app, `disk serve`). Loading the AK from its blobs needs the SRK re-created,
 * and checking the EK needs the EK re-created: two CreatePrimary commands per attestation, and the
 * RSA EK's is a prime search that costs libtpms ~60–250 ms, most of an attestation. A saved context
 * loads in one command, and only into the TPM that saved it: it is sealed with that TPM's
 * hierarchy proof, and a TPM reset or TPM2_Clear invalidates it. One that loads is therefore the
 * TPM whose EK was compared with the registered one when the context was saved, and the EK is not
 * re-created; the quote's signature by the registered AK is what the verifier relies on either
 * way (an EK public is public: the comparison names another TPM, it proves nothing). Nothing stays
 * loaded between attestations: the object is flushed after its quote, as before. A context that
 * does not load is dropped and the full path (EK comparison, SRK, Load) runs and saves a new one.
 */
const akContexts = new Map<string, TpmsContext>();

function akContextKey(address: string, state: TpmHostState): string {
  return createHash('sha256').update(`${address}\0${state.hostId}\0${state.ak.public}\0${state.ak.private}`).digest('hex');
}

/** Saves the loaded AK's context for the next session; a TPM that refuses only costs the speed-up. */
async function saveAkContext(tpm: Tpm, key: string, handle: number): Promise<void> {
  try {
    akContexts.set(key, await tpm.contextSave(handle));
  } catch (err) {
    if (!(err instanceof ShieldError) || err.code !== 'tpm_error') throw err;
    akContexts.delete(key);
  }
}

/** The AK from its saved context, or null when there is none or it no longer loads (then forgotten). */
async function loadSavedAk(tpm: Tpm, key: string): Promise<number | null> {
  const saved = akContexts.get(key);
  if (!saved) return null;
  try {
    return await tpm.contextLoad(saved);
  } catch (err) {
    if (!(err instanceof ShieldError) || err.code !== 'tpm_error') throw err;
    akContexts.delete(key);
    return null;
  }
}

// ---- flows --------------------------------------------------------------------------------------

function registered(vault: Vault): TpmHostState {
  const s = loadTpmHost(vault);
  if (!s) throw new ShieldError('host_not_registered', 'No TPM is registered for this host: run `shieldlab host register --mode tpm [--tpm ADDR]` first.', { details: { reason: 'NotConfigured', mode: 'tpm' } });
  return s;
}

export interface SessionOptions {
  /** TPM address (default: the registered one, else device:/dev/tpmrm0). */
  address?: string | undefined;
  /** Event log file (default: the baseline's, else the kernel's). */
  eventLog?: string | undefined;
}

/**
 * One verifier–host round: same TPM (EK), fresh nonce, quote, verification. The EK check comes
 * first so another TPM is named UnauthorizedHost rather than failing somewhere inside.
 */
async function session(state: TpmHostState, opts: SessionOptions & { pcrs: readonly number[]; binaries: readonly string[]; verify: (e: TpmEvidence, nonce: Buffer) => TpmVerdict }): Promise<TpmVerdict> {
  const address = opts.address ?? state.address;
  const eventLogPath = opts.eventLog ?? state.baseline?.eventLogPath ?? DEFAULT_EVENT_LOG;
  return withTpm(address, async (tpm) => {
    const key = akContextKey(address, state);
    const saved = await loadSavedAk(tpm, key);
    const nonce = randomBytes(32);
    const evidenceOpts = { nonce, pcrs: opts.pcrs, eventLogPath, binaries: opts.binaries };
    let evidence: TpmEvidence;
    if (saved !== null) {
      evidence = await tpm.withTransient(saved, () => gatherEvidence(tpm, (fn) => fn(saved), evidenceOpts));
      return opts.verify(evidence, nonce);
    }
    const ek = await ekPublicOf(tpm);
    if (hostIdOfEk(ek) !== state.hostId) {
      throw refusal([{ reason: 'UnauthorizedHost', message: `The TPM at ${address} is not the registered one (its EK differs from ${state.hostId.slice(0, 16)}…).` }]);
    }
    const ak = { public: Buffer.from(state.ak.public, 'base64'), private: Buffer.from(state.ak.private, 'base64') };
    try {
      evidence = await gatherEvidence(
        tpm,
        (fn) =>
          withAkUnderSrk(tpm, ak, async (handle) => {
            await saveAkContext(tpm, key, handle);
            return fn(handle);
          }),
        evidenceOpts,
      );
    } catch (err) {
      if (err instanceof ShieldError && err.code === 'tpm_error' && /TPM2_Load/.test(err.message)) {
        throw refusal([{ reason: 'UnauthorizedHost', message: `The registered AK cannot be loaded in the TPM at ${address}: it is not the TPM it was made in.` }]);
      }
      throw err;
    }
    return opts.verify(evidence, nonce);
  });
}

/**
 * Attests the registered TPM host: quote, signature, nonce, PCR digest, event-log replay, baseline,
 * code integrity, clock. Returns the host on success (the caller issues the health certificate);
 * throws attestation_failed naming every reason.
 */
export async function attestTpmHost(vault: Vault, opts: SessionOptions & { now: Date; alongWith?: (host: TpmHostState) => void }): Promise<TpmHostState> {
  const state = loadTpmHost(vault);
  if (!state) throw refusal([{ reason: 'NotConfigured', message: 'No TPM is registered for this host: run `shieldlab host register --mode tpm [--tpm ADDR]` first.' }]);
  if (!state.baseline) throw refusal([{ reason: 'NotConfigured', message: 'No baseline yet: run `shieldlab host baseline capture` on a known-good boot first.' }]);
  const baseline = state.baseline;
  const policy = loadPolicy(vault);
  const v = await session(state, {
    ...opts,
    pcrs: baseline.pcrs,
    binaries: policy.binaries.map((b) => b.path),
    verify: (e, nonce) => verifyTpmEvidence(e, { akPublic: Buffer.from(state.ak.public, 'base64'), nonce, pcrs: baseline.pcrs, baseline, policy, lastClock: state.lastClock }),
  });
  if (!v.ok) throw refusal(v.problems, v.findings);
  const next: TpmHostState = { ...state, lastClock: v.clock, lastAttestedAt: opts.now.toISOString() };
  // The new clock and what the caller records of this success (its certificate, audit) in one commit.
  vault.atomically(() => {
    saveTpmHost(vault, next);
    opts.alongWith?.(next);
  });
  return next;
}

export interface BaselineReport {
  hostId: string;
  bank: 'sha256';
  pcrs: number[];
  values: Record<string, string>;
  eventLog: string;
  events: number;
  capturedAt: string;
  changed: boolean;
  relearned: boolean;
  findings: string[];
}

function report(hostId: string, b: Baseline, extra: { changed: boolean; relearned: boolean; findings: string[] }): BaselineReport {
  return { hostId, bank: b.bank, pcrs: b.pcrs, values: b.values, eventLog: b.eventLogPath, events: b.events, capturedAt: b.capturedAt, ...extra };
}

/** A verified reading of the PCRs and the log now (signature, nonce, digest, replay must hold). */
async function currentReading(state: TpmHostState, opts: SessionOptions & { pcrs: readonly number[]; baseline?: Baseline }): Promise<TpmVerdict & { eventLogPath: string; eventLogBytes: Buffer | null }> {
  let bytes: Buffer | null = null;
  const eventLogPath = opts.eventLog ?? state.baseline?.eventLogPath ?? DEFAULT_EVENT_LOG;
  const v = await session(state, {
    ...opts,
    eventLog: eventLogPath,
    binaries: [],
    verify: (e, nonce) => {
      bytes = e.eventLog;
      return verifyTpmEvidence(e, { akPublic: Buffer.from(state.ak.public, 'base64'), nonce, pcrs: opts.pcrs, baseline: opts.baseline ?? null });
    },
  });
  return { ...v, eventLogPath, eventLogBytes: bytes };
}

/**
 * Captures the baseline from a verified quote and a log that replays to it. A baseline that would
 * change is re-learnt only with `yes` (and audited as host.baseline-relearn); without it the
 * refusal shows what changed. Never silently.
 */
export async function captureBaseline(vault: Vault, opts: SessionOptions & { pcrs?: readonly number[] | undefined; yes?: boolean; now: Date }): Promise<BaselineReport> {
  const state = registered(vault);
  const pcrs = normalisePcrs(opts.pcrs ?? state.baseline?.pcrs ?? DEFAULT_PCRS);
  const v = await currentReading(state, { ...opts, pcrs });
  if (!v.ok || !v.quoted || !v.log || !v.eventLogBytes) {
    vault.record({ action: 'host.baseline-capture', outcome: 'refused', subject: state.hostId.slice(0, 16), reason: v.problems.map((p) => p.reason).join(',') });
    throw refusal(v.problems, v.findings, 'Baseline capture refused');
  }
  const next: Baseline = {
    bank: 'sha256',
    pcrs,
    values: Object.fromEntries(pcrs.map((p) => [String(p), v.quoted![p]!])),
    eventLog: v.eventLogBytes.toString('base64'),
    eventLogPath: v.eventLogPath,
    events: v.log.events.length,
    capturedAt: opts.now.toISOString(),
  };
  const old = state.baseline;
  if (old) {
    const samePcrs = old.pcrs.join(',') === pcrs.join(',');
    const findings = samePcrs ? explainBaselineDiff(old, v.quoted, v.log) : [`PCR selection ${old.pcrs.join(',')} → ${pcrs.join(',')}`];
    if (findings.length === 0) return report(state.hostId, old, { changed: false, relearned: false, findings: [] });
    if (!opts.yes) {
      vault.record({ action: 'host.baseline-relearn', outcome: 'refused', subject: state.hostId.slice(0, 16), reason: 'NotConfirmed' });
      throw new ShieldError('usage', ['The baseline would change:', ...findings.map((f) => `  ${f}`), 'Re-learn it on purpose with --yes (audited) if this change is expected.'].join('\n'), { details: { findings } });
    }
    saveTpmHost(vault, { ...state, baseline: next });
    vault.record({ action: 'host.baseline-relearn', outcome: 'ok', subject: state.hostId.slice(0, 16), reason: findings.join('; ').slice(0, 500) });
    return report(state.hostId, next, { changed: true, relearned: true, findings });
  }
  saveTpmHost(vault, { ...state, baseline: next });
  vault.record({ action: 'host.baseline-capture', outcome: 'ok', subject: `${state.hostId.slice(0, 16)} PCRs ${pcrs.join(',')}` });
  return report(state.hostId, next, { changed: true, relearned: false, findings: [] });
}

export function showBaseline(vault: Vault): BaselineReport {
  const state = registered(vault);
  if (!state.baseline) throw new ShieldError('not_found', 'No baseline yet: run `shieldlab host baseline capture`.');
  return report(state.hostId, state.baseline, { changed: false, relearned: false, findings: [] });
}

export interface BaselineDiff {
  matches: boolean;
  pcrs: { pcr: number; baseline: string; current: string; matches: boolean }[];
  findings: string[];
  reasons: string[];
}

/** The baseline against a verified reading now: which PCRs differ, why, and the log's own problems. */
export async function diffBaseline(vault: Vault, opts: SessionOptions): Promise<BaselineDiff> {
  const state = registered(vault);
  const b = state.baseline;
  if (!b) throw new ShieldError('not_found', 'No baseline yet: run `shieldlab host baseline capture`.');
  const v = await currentReading(state, { ...opts, pcrs: b.pcrs, baseline: b });
  if (!v.quoted) throw refusal(v.problems, v.findings, 'Cannot read the PCRs');
  const quoted = v.quoted;
  const differing = new Set(differingPcrs(b, quoted).map((d) => d.pcr));
  return {
    matches: v.ok,
    pcrs: b.pcrs.map((pcr) => ({ pcr, baseline: b.values[pcr] ?? '', current: quoted[pcr] ?? '', matches: !differing.has(pcr) })),
    findings: v.findings,
    reasons: [...new Set(v.problems.map((p) => p.reason))],
  };
}
