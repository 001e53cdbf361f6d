// Health certificates: what a successful attestation yields. Signed (Ed25519) by this host's
// attestation service, bound to the host and the mode, short-lived, revocable by date.
// Only `verifyHealthCertificate` makes a HealthCertificate, so holding one means it was checked.
import { createPublicKey, randomBytes, sign, verify, type KeyObject } from 'node:crypto';
import { ShieldError } from '../errors.ts';
import { ATTESTATION_MODES, type AttestationMode } from './modes.ts';

const PREFIX = 'SLHC1';

export interface HealthClaims {
  format: 1;
  serial: string;
  issuer: string; // key id of the attestation service
  hostId: string;
  hostName: string;
  mode: AttestationMode;
  issuedAt: string;
  expiresAt: string;
}

const verified = Symbol('verified');

export class HealthCertificate {
  readonly claims: HealthClaims;
  readonly encoded: string;
  /** The token is module-private: nothing outside this file can make one. */
  constructor(token: typeof verified, claims: HealthClaims, encoded: string) {
    if (token !== verified) throw new ShieldError('internal', 'HealthCertificate is made only by verifyHealthCertificate.');
    this.claims = claims;
    this.encoded = encoded;
  }
}

export function keyIdOf(publicKey: KeyObject): string {
  return publicKey.export({ type: 'spki', format: 'der' }).subarray(-32).toString('hex').slice(0, 16);
}

/** Signs a certificate for a host that has just passed attestation. Used by the attestation service only. */
export function issueHealthCertificate(signingKey: KeyObject, opts: { hostId: string; hostName: string; mode: AttestationMode; now: Date; validityHours: number }): { encoded: string; claims: HealthClaims } {
  const claims: HealthClaims = {
    format: 1,
    serial: randomBytes(12).toString('hex'),
    issuer: keyIdOf(createPublicKey(signingKey)),
    hostId: opts.hostId,
    hostName: opts.hostName,
    mode: opts.mode,
    issuedAt: opts.now.toISOString(),
    expiresAt: new Date(opts.now.getTime() + opts.validityHours * 3_600_000).toISOString(),
  };
  const payload = `${PREFIX}.${Buffer.from(JSON.stringify(claims)).toString('base64url')}`;
  const signature = sign(null, Buffer.from(payload), signingKey).toString('base64url');
  return { encoded: `${payload}.${signature}`, claims };
}

export interface VerifyContext {
  issuerKey: KeyObject;
  now: Date;
  /** Certificates issued before this moment are revoked. */
  revokedBefore?: string | undefined;
  /** The host that presents it must be the host it was issued to (any of its ids: host key, TPM). */
  hostId: string | readonly string[];
}

function refuse(reason: string, message: string): ShieldError {
  return new ShieldError('health_certificate_invalid', message, { details: { reason } });
}

export function verifyHealthCertificate(encoded: string, ctx: VerifyContext): HealthCertificate {
  const parts = encoded.split('.');
  if (parts.length !== 3 || parts[0] !== PREFIX) throw refuse('Malformed', 'Not a ShieldLab health certificate.');
  const ok = (() => {
    try {
      return verify(null, Buffer.from(`${parts[0]}.${parts[1]}`), ctx.issuerKey, Buffer.from(parts[2]!, 'base64url'));
    } catch {
      return false;
    }
  })();
  if (!ok) throw refuse('UntrustedIssuer', 'The health certificate was not issued by this host’s attestation service.');
  let claims: HealthClaims;
  try {
    claims = JSON.parse(Buffer.from(parts[1]!, 'base64url').toString('utf8')) as HealthClaims;
  } catch {
    throw refuse('Malformed', 'The health certificate is damaged.');
  }
  if (claims.format !== 1 || !(ATTESTATION_MODES as readonly string[]).includes(claims.mode) || typeof claims.hostId !== 'string') {
    throw refuse('Malformed', 'The health certificate is damaged.');
  }
  const issued = Date.parse(claims.issuedAt);
  const expires = Date.parse(claims.expiresAt);
  if (!Number.isFinite(issued) || !Number.isFinite(expires)) throw refuse('Malformed', 'The health certificate has no valid dates.');
  if (ctx.now.getTime() >= expires) throw refuse('Expired', `The health certificate expired at ${claims.expiresAt}: attest again.`);
  if (ctx.now.getTime() + 5 * 60_000 < issued) throw refuse('NotYetValid', 'The health certificate is dated in the future.');
  if (ctx.revokedBefore && issued < Date.parse(ctx.revokedBefore)) {
    throw refuse('Revoked', `Health certificates issued before ${ctx.revokedBefore} are revoked: attest again.`);
  }
  if (typeof ctx.hostId === 'string' ? claims.hostId !== ctx.hostId : !ctx.hostId.includes(claims.hostId)) throw refuse('WrongHost', `The health certificate belongs to another host (${claims.hostName}).`);
  return new HealthCertificate(verified, claims, encoded);
}
