// Key release: the one gate through which a transport key leaves the vault. It takes the KP and a
// health certificate and checks, in order: the KP's signatures and that its owner is a guardian
// this host trusts; that a guardian held here is authorised; the certificate (signer, expiry,
// revocation, host binding); that the KP's policy allows the certificate's mode and host.
// Every release and every refusal is audited with its reason.
import type { KeyObject } from 'node:crypto';
import type { Vault } from '../vault/mod.ts';
import { ShieldError, toShieldError } from '../errors.ts';
import { wipe } from '../crypto/mod.ts';
import type { AttestationService } from '../attestation/service.ts';
import type { HealthCertificate } from '../attestation/health-certificate.ts';
import { parseKeyProtector, unwrapTransportKey, type KeyProtector } from './key-protector.ts';

/** What release needs to know about guardians (the guardian store provides it). */
export interface GuardianDirectory {
  /** Name of a known guardian with this signing thumbprint, or null. */
  knownBySigningThumbprint(thumbprint: string): string | null;
  /** Guardians whose private keys this host holds. */
  held(): { name: string; encryptionThumbprint: string }[];
  encryptionKey(name: string): KeyObject;
}

export interface ReleaseCheck {
  allowed: boolean;
  kpId: string | null;
  guardian: string | null;
  mode: string | null;
  hostId: string | null;
  reasons: { code: string; message: string }[];
}

interface Gate {
  kp: KeyProtector;
  guardian: { name: string; encryptionThumbprint: string };
  certificate: HealthCertificate;
}

function denied(reason: string, message: string): ShieldError {
  return new ShieldError('release_denied', message, { details: { reason } });
}

/** Runs every check; throws the first refusal as a typed error. */
function gate(kpBytes: Buffer, opts: { guardians: GuardianDirectory; attestation: AttestationService; healthCertificate: string | null }): Gate {
  const kp = parseKeyProtector(kpBytes);
  if (opts.guardians.knownBySigningThumbprint(kp.authorization.owner) === null) {
    throw new ShieldError('kp_untrusted_owner', `The key protector’s owner (${kp.owner.name}) is not a guardian known here: import its public guardian first.`);
  }
  const authorised = new Set(kp.authorization.guardians.map((g) => g.encryptionThumbprint));
  const guardian = opts.guardians.held().find((g) => authorised.has(g.encryptionThumbprint));
  if (!guardian) {
    throw new ShieldError('kp_unwrap_denied', `None of this host’s guardians is authorised by this key protector (it allows: ${kp.authorization.guardians.map((g) => g.name).join(', ')}).`);
  }
  if (opts.healthCertificate === null) throw denied('NoHealthCertificate', 'This host has no valid health certificate: attest first (`shieldlab host attest`).');
  const certificate = opts.attestation.verify(opts.healthCertificate);
  const { mode, hostId } = certificate.claims;
  if (!kp.authorization.policy.modes.includes(mode)) {
    throw denied('ModeNotAllowed', `The key protector allows ${kp.authorization.policy.modes.join(', ')} attestation; this host attested with ${mode}.`);
  }
  if (kp.authorization.policy.hosts.length > 0 && !kp.authorization.policy.hosts.includes(hostId)) {
    throw denied('HostNotAllowed', 'This host is not on the key protector’s host allow-list.');
  }
  return { kp, guardian, certificate };
}

function kpIdOf(kpBytes: Buffer): string | null {
  try {
    return parseKeyProtector(kpBytes).authorization.kpId;
  } catch {
    return null;
  }
}

export interface ReleaseOptions {
  vault: Vault;
  guardians: GuardianDirectory;
  attestation: AttestationService;
  /** The encoded health certificate presented; null when the host has none. */
  healthCertificate: string | null;
  /** Why the key is wanted (audited), e.g. "vm.start lab-dc". */
  purpose: string;
}

/** Releases the transport key. The caller wipes it after use. */
export function releaseTransportKey(kpBytes: Buffer, opts: ReleaseOptions): { transportKey: Buffer; kp: KeyProtector; guardian: string; certificate: HealthCertificate } {
  let g: Gate;
  let transportKey: Buffer;
  try {
    g = gate(kpBytes, opts);
    transportKey = unwrapTransportKey(g.kp, { encryptionThumbprint: g.guardian.encryptionThumbprint, encryptionKey: opts.guardians.encryptionKey(g.guardian.name) });
  } catch (err) {
    const e = toShieldError(err);
    const reason = String(e.details?.reason ?? e.code);
    opts.vault.record({ action: 'kp.release', outcome: 'refused', subject: `${kpIdOf(kpBytes) ?? 'unreadable KP'} (${opts.purpose})`, reason });
    throw e;
  }
  opts.vault.record({ action: 'kp.release', outcome: 'ok', subject: `${g.kp.authorization.kpId} (${opts.purpose})`, reason: `guardian ${g.guardian.name}, ${g.certificate.claims.mode}` });
  return { transportKey, kp: g.kp, guardian: g.guardian.name, certificate: g.certificate };
}

/** Would this host be allowed to release? A real trial unwrap, wiped at once; never returns a key. */
export function checkRelease(kpBytes: Buffer, opts: Omit<ReleaseOptions, 'purpose'>): ReleaseCheck {
  try {
    const r = releaseTransportKey(kpBytes, { ...opts, purpose: 'release check' });
    wipe(r.transportKey);
    return { allowed: true, kpId: r.kp.authorization.kpId, guardian: r.guardian, mode: r.certificate.claims.mode, hostId: r.certificate.claims.hostId, reasons: [] };
  } catch (err) {
    const e = toShieldError(err);
    return { allowed: false, kpId: kpIdOf(kpBytes), guardian: null, mode: null, hostId: opts.attestation.hostId(), reasons: [{ code: String(e.details?.reason ?? e.code), message: e.message }] };
  }
}
