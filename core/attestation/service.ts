// The local attestation service: registers host keys, attests this host, issues and checks
// health certificates. Its Ed25519 signing key and state live in the vault; every attestation,
// success or refusal, is audited with its reason (HGS-style: UnauthorizedHost, Expired, …).
import { createHash, createPrivateKey, createPublicKey, generateKeyPairSync, randomBytes, sign, verify, type KeyObject } from 'node:crypto';
import { hostname } from 'node:os';
import type { Vault } from '../vault/mod.ts';
import { ShieldError } from '../errors.ts';
import { issueHealthCertificate, verifyHealthCertificate, type HealthCertificate, type HealthClaims } from './health-certificate.ts';
import type { AttestationMode } from './modes.ts';
import { adHostId, adInfo, attestAdHost, configureAd, testAd, type AdConfigInput, type AdInfo, type AdStep, type AdTestReport } from './ad-mode.ts';
import { DEFAULT_TPM_ADDRESS, attestTpmHost, loadTpmHost, registerTpmHost, tpmHostId, tpmHostInfo, type SessionOptions, type TpmHostInfo, type TpmHostState } from './tpm-mode.ts';

export const DEFAULT_VALIDITY_HOURS = 8;

export interface RegisteredHost {
  name: string;
  hostId: string;
  publicKey: string; // SPKI DER, base64
  registeredAt: string;
}

interface ServiceState {
  signingKey: string; // PKCS#8 DER, base64 — secret, only ever inside the vault
  revokedBefore?: string;
  validityHours: number;
  hosts: RegisteredHost[];
  current?: string; // the newest health certificate issued to this host
}

interface HostKeyRecord {
  privateKey: string; // PKCS#8 DER, base64
  publicKey: string; // SPKI DER, base64
  createdAt: string;
}

export interface HostStatus {
  hostName: string;
  hostId: string | null;
  hostKeyRegistered: boolean;
  registeredHosts: RegisteredHost[];
  validityHours: number;
  revokedBefore: string | null;
  certificate: (HealthClaims & { valid: boolean; problem: string | null }) | null;
  /** The registered TPM host (tpm mode), or null. */
  tpm: TpmHostInfo | null;
  /** The AD-group configuration (ad-group mode, no password), or null. */
  ad: AdInfo | null;
}

/** A host's identity: SHA-256 of its public key (SPKI DER), hex. */
export function hostIdOf(publicKeySpkiDer: Buffer): string {
  return createHash('sha256').update(publicKeySpkiDer).digest('hex');
}

export class AttestationService {
  private readonly vault: Vault;
  private readonly now: () => Date;

  constructor(vault: Vault, opts: { now?: () => Date } = {}) {
    this.vault = vault;
    this.now = opts.now ?? (() => new Date());
  }

  private state(): ServiceState {
    if (this.vault.hasRecord('attestation', 'service')) {
      return JSON.parse(Buffer.from(this.vault.getRecord('attestation', 'service', { audit: false }).data, 'base64').toString('utf8')) as ServiceState;
    }
    const { privateKey } = generateKeyPairSync('ed25519');
    const state: ServiceState = { signingKey: privateKey.export({ type: 'pkcs8', format: 'der' }).toString('base64'), validityHours: DEFAULT_VALIDITY_HOURS, hosts: [] };
    this.save(state);
    return state;
  }

  private save(state: ServiceState): void {
    const data = Buffer.from(JSON.stringify(state), 'utf8');
    this.vault.putRecord('attestation', { name: 'service', data, notes: 'attestation service state' });
    data.fill(0);
  }

  private signingKey(state: ServiceState): KeyObject {
    return createPrivateKey({ key: Buffer.from(state.signingKey, 'base64'), format: 'der', type: 'pkcs8' });
  }

  private hostKey(create: boolean): HostKeyRecord | null {
    if (this.vault.hasRecord('host-key', 'this-host')) {
      return JSON.parse(Buffer.from(this.vault.getRecord('host-key', 'this-host', { audit: false }).data, 'base64').toString('utf8')) as HostKeyRecord;
    }
    if (!create) return null;
    const { publicKey, privateKey } = generateKeyPairSync('ed25519');
    const rec: HostKeyRecord = {
      privateKey: privateKey.export({ type: 'pkcs8', format: 'der' }).toString('base64'),
      publicKey: publicKey.export({ type: 'spki', format: 'der' }).toString('base64'),
      createdAt: this.now().toISOString(),
    };
    const data = Buffer.from(JSON.stringify(rec), 'utf8');
    this.vault.putRecord('host-key', { name: 'this-host', data, notes: 'this host’s attestation key (host-key mode)' });
    data.fill(0);
    return rec;
  }

  /** This host's id, or null before it has a host key. */
  hostId(): string | null {
    const key = this.hostKey(false);
    return key ? hostIdOf(Buffer.from(key.publicKey, 'base64')) : null;
  }

  /**
   * Registers a host key with the guardian: this host's own (made on first use) or another host's
   * public key (SPKI PEM/DER), as HGS's Add-HgsAttestationHostKey does.
   */
  registerHostKey(opts: { publicKey?: Buffer; name?: string } = {}): RegisteredHost {
    let spki: Buffer;
    if (opts.publicKey) {
      try {
        const text = opts.publicKey.toString('utf8');
        const key = text.includes('-----BEGIN') ? createPublicKey(text) : createPublicKey({ key: opts.publicKey, format: 'der', type: 'spki' });
        if (key.asymmetricKeyType !== 'ed25519' && key.asymmetricKeyType !== 'rsa' && key.asymmetricKeyType !== 'ec') throw new Error('type');
        spki = key.export({ type: 'spki', format: 'der' });
      } catch {
        throw new ShieldError('invalid_argument', 'The host key file is not a public key (PEM or DER SubjectPublicKeyInfo).');
      }
    } else {
      spki = Buffer.from(this.hostKey(true)!.publicKey, 'base64');
    }
    const state = this.state();
    const hostId = hostIdOf(spki);
    const existing = state.hosts.find((h) => h.hostId === hostId);
    if (existing) return existing;
    const host: RegisteredHost = { name: opts.name ?? (opts.publicKey ? `host-${hostId.slice(0, 8)}` : hostname()), hostId, publicKey: spki.toString('base64'), registeredAt: this.now().toISOString() };
    state.hosts.push(host);
    this.save(state);
    this.vault.record({ action: 'host.register-key', outcome: 'ok', subject: `${host.name} ${hostId.slice(0, 16)}` });
    return host;
  }

  /** This host's public key, to register it with another guardian. */
  exportHostKey(): string {
    const key = this.hostKey(true)!;
    return createPublicKey({ key: Buffer.from(key.publicKey, 'base64'), format: 'der', type: 'spki' }).export({ type: 'spki', format: 'pem' }).toString();
  }

  /** Host-key mode: prove possession of a registered host key by signing a fresh nonce. */
  attestHostKey(): HealthCertificate {
    const mode: AttestationMode = 'host-key';
    const fail = (reason: string, message: string): never => {
      this.vault.record({ action: 'host.attest', outcome: 'refused', subject: mode, reason });
      throw new ShieldError('attestation_failed', message, { details: { reason, mode } });
    };
    const key = this.hostKey(false);
    if (!key) return fail('HostKeyMissing', 'This host has no host key yet: run `shieldlab host register-key` first.');
    const state = this.state();
    const hostId = hostIdOf(Buffer.from(key.publicKey, 'base64'));
    const registered = state.hosts.find((h) => h.hostId === hostId);
    if (!registered) return fail('UnauthorizedHost', 'This host’s key is not registered with the guardian (`shieldlab host register-key`).');
    // The challenge–response keeps the host and the verifier separable (the host key may live in a TPM later).
    const nonce = randomBytes(32);
    const signature = sign(null, nonce, createPrivateKey({ key: Buffer.from(key.privateKey, 'base64'), format: 'der', type: 'pkcs8' }));
    const registeredKey = createPublicKey({ key: Buffer.from(registered.publicKey, 'base64'), format: 'der', type: 'spki' });
    if (!verify(null, nonce, registeredKey, signature)) return fail('HostKeySignature', 'The host could not prove possession of its registered key.');
    const { encoded } = issueHealthCertificate(this.signingKey(state), {
      hostId,
      hostName: hostname(),
      mode,
      now: this.now(),
      validityHours: state.validityHours,
    });
    state.current = encoded;
    this.save(state);
    this.vault.record({ action: 'host.attest', outcome: 'ok', subject: mode });
    return this.verify(encoded);
  }

  /** The TPM address to use: the one asked for, else the registered one, else the kernel's device. */
  tpmAddress(asked?: string): string {
    return asked ?? loadTpmHost(this.vault)?.address ?? DEFAULT_TPM_ADDRESS;
  }

  /** Registers this host's TPM (tpm mode): EK, EK certificate, an AK bound by credential activation. Audited. */
  async registerTpm(opts: { address?: string; name?: string; replace?: boolean } = {}): Promise<TpmHostInfo> {
    await registerTpmHost(this.vault, { address: this.tpmAddress(opts.address), now: this.now(), ...(opts.name ? { name: opts.name } : {}), ...(opts.replace ? { replace: true } : {}) });
    return tpmHostInfo(this.vault)!;
  }

  /**
   * TPM mode: a fresh-nonce quote of the registered TPM, checked against the baseline, the event
   * log and the code-integrity policy (tpm-verify.ts). Every success and refusal is audited.
   */
  async attestTpm(opts: SessionOptions = {}): Promise<HealthCertificate> {
    const mode: AttestationMode = 'tpm';
    let encoded = '';
    const issue = (host: TpmHostState) => {
      const state = this.state();
      encoded = issueHealthCertificate(this.signingKey(state), { hostId: host.hostId, hostName: host.name, mode, now: this.now(), validityHours: state.validityHours }).encoded;
      state.current = encoded;
      this.save(state);
      this.vault.record({ action: 'host.attest', outcome: 'ok', subject: mode });
    };
    try {
      await attestTpmHost(this.vault, { ...opts, now: this.now(), alongWith: issue });
    } catch (err) {
      const e = err instanceof ShieldError ? err : null;
      const reasons = (e?.details?.reasons as string[] | undefined) ?? [String(e?.details?.reason ?? (e?.code === 'tpm_unavailable' ? 'TpmUnavailable' : e?.code === 'tpm_error' ? 'TpmError' : (e?.code ?? 'internal')))];
      this.vault.record({ action: 'host.attest', outcome: 'refused', subject: mode, reason: reasons.join(',') });
      // The TPM's own evidence now says the host is not as it was: a tpm certificate issued earlier
      // must not go on releasing keys until it expires. (An unreachable TPM proves nothing either
      // way: then the certificate stands, as HGS lets a valid one run to its expiry.)
      if (e?.code === 'attestation_failed' && !reasons.includes('NotConfigured')) this.withdrawCurrent(mode, reasons);
      throw err;
    }
    return this.verify(encoded);
  }

  /** Stores the AD-group configuration (the password only in the vault); audited. */
  async configureAd(input: AdConfigInput): Promise<{ info: AdInfo; warning: string | null }> {
    const r = await configureAd(this.vault, input, this.now());
    this.vault.record({ action: 'host.ad-configure', outcome: 'ok', subject: `${r.info.computer} ${r.info.groups.map((g) => g.sid).join(',')} via ${r.info.urls.join(',')}` });
    return r;
  }

  /** Every step against the DCs (TLS, bind, computer, enabled, membership), without attesting. */
  testAd(input: AdConfigInput | null = null, opts: { onStep?: (s: AdStep) => void } = {}): Promise<AdTestReport> {
    return testAd(this.vault, input, { ...opts, now: this.now() });
  }

  /**
   * AD-group mode: the computer account is enabled and (transitively) in an approved group, by
   * the word of the first DC that answers. Identity only, weaker than tpm mode. Audited.
   */
  async attestAdGroup(): Promise<HealthCertificate> {
    const mode: AttestationMode = 'ad-group';
    let host;
    try {
      host = await attestAdHost(this.vault, { now: this.now() });
    } catch (err) {
      const e = err instanceof ShieldError ? err : null;
      const reason = String(e?.details?.reason ?? e?.code ?? 'internal');
      this.vault.record({ action: 'host.attest', outcome: 'refused', subject: mode, reason });
      // The directory's own answer says no: an earlier ad-group certificate stops releasing keys.
      // A DC that cannot be reached (or trusted, or bound to) proves nothing: that one stands until it expires.
      if (reason === 'NotAMember' || reason === 'ComputerDisabled' || reason === 'ComputerNotFound') this.withdrawCurrent(mode, [reason]);
      throw err;
    }
    const state = this.state();
    const { encoded } = issueHealthCertificate(this.signingKey(state), { hostId: host.hostId, hostName: host.name, mode, now: this.now(), validityHours: host.validityHours });
    state.current = encoded;
    this.save(state);
    this.vault.record({ action: 'host.attest', outcome: 'ok', subject: mode });
    return this.verify(encoded);
  }

  /**
   * Checks a certificate against this service's key, the revocation date and this host's ids: its
   * host key's, its registered TPM's (tpm mode), or its computer account's (ad-group mode).
   */
  verify(encoded: string): HealthCertificate {
    const state = this.state();
    const ids = [this.hostId(), tpmHostId(this.vault), adHostId(this.vault)].filter((id): id is string => id !== null);
    return verifyHealthCertificate(encoded, {
      issuerKey: createPublicKey(this.signingKey(state)),
      now: this.now(),
      revokedBefore: state.revokedBefore,
      hostId: ids.length > 0 ? ids : '',
    });
  }

  /** Drops the current certificate if it was issued in `mode`; audited. */
  private withdrawCurrent(mode: AttestationMode, reasons: readonly string[]): void {
    const state = this.state();
    if (!state.current) return;
    const claims = JSON.parse(Buffer.from(state.current.split('.')[1] ?? '', 'base64url').toString('utf8')) as Partial<HealthClaims>;
    if (claims.mode !== mode) return;
    delete state.current;
    this.save(state);
    this.vault.record({ action: 'host.certificate-withdrawn', outcome: 'ok', subject: mode, reason: reasons.join(',') });
  }

  /** The newest certificate issued to this host, as stored (it may have expired or been revoked). */
  currentEncoded(): string | null {
    return this.state().current ?? null;
  }

  /** Deny every health certificate issued before `when` (HGS: DenyHealthCertificatesIssuedBefore). */
  revokeBefore(when: Date): void {
    const state = this.state();
    state.revokedBefore = when.toISOString();
    this.save(state);
    this.vault.record({ action: 'host.revoke-certificates', outcome: 'ok', subject: `issued before ${state.revokedBefore}` });
  }

  status(): HostStatus {
    const state = this.state();
    const hostId = this.hostId();
    let certificate: HostStatus['certificate'] = null;
    if (state.current) {
      const claims = JSON.parse(Buffer.from(state.current.split('.')[1] ?? '', 'base64url').toString('utf8')) as HealthClaims;
      let problem: string | null = null;
      try {
        this.verify(state.current);
      } catch (err) {
        problem = err instanceof ShieldError ? String(err.details?.reason ?? err.code) : 'Invalid';
      }
      certificate = { ...claims, valid: problem === null, problem };
    }
    return {
      hostName: hostname(),
      hostId,
      hostKeyRegistered: hostId !== null && state.hosts.some((h) => h.hostId === hostId),
      registeredHosts: state.hosts,
      validityHours: state.validityHours,
      revokedBefore: state.revokedBefore ?? null,
      certificate,
      tpm: tpmHostInfo(this.vault),
      ad: adInfo(this.vault),
    };
  }
}
