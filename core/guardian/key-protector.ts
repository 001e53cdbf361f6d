// Key protectors (KP): a VM's transport key wrapped for every guardian allowed to run it.
//
//   "SLKP" ‖ u8 format ‖ u32 n ‖ authorization (n bytes, canonical JSON) ‖ u16 n ‖ owner signature
//          ‖ u32 n ‖ key block (canonical JSON) ‖ u16 n ‖ signer signature
//
// The *authorization* says who may run the VM and under which policy; only the owner signs it, so
// only the owner changes it (grant, revoke, policy). The *key block* carries the transport key
// wrapped to each guardian (RSA-OAEP-SHA-256) and a roll counter; the owner or any authorised
// guardian signs it, which lets the host that starts a VM roll the transport key without the
// owner — but never change who is authorised. Signatures are RSA-PSS-SHA-256 over the exact
// bytes, and both parts must be in canonical form, so any changed bit is rejected.
import { constants, createHash, privateDecrypt, publicEncrypt, randomUUID, sign, verify, X509Certificate, type KeyObject } from 'node:crypto';
import { ShieldError } from '../errors.ts';
import { randomKey, wipe } from '../crypto/mod.ts';
import { ATTESTATION_MODES, type AttestationMode } from '../attestation/modes.ts';

export { ATTESTATION_MODES, type AttestationMode };

const MAGIC = Buffer.from('SLKP');
const FORMAT = 1;
const MAX_PART = 1024 * 1024;

/** A guardian as a KP names it: its two certificates. */
export interface GuardianCertificates {
  name: string;
  signingCertPem: string;
  encryptionCertPem: string;
}

/** Private halves, for the owner or a guardian held on this host. */
export interface GuardianPrivateKeys {
  signingKey: KeyObject;
  encryptionKey: KeyObject;
}

export type HeldGuardian = GuardianCertificates & { keys: GuardianPrivateKeys };

export interface KpGuardianEntry {
  name: string;
  signingThumbprint: string;
  encryptionThumbprint: string;
  signingCert: string; // DER, base64
  encryptionCert: string; // DER, base64
}

export interface KpPolicy {
  modes: AttestationMode[];
  /** Host ids allowed to release; empty means any attested host. */
  hosts: string[];
}

export interface KpAuthorization {
  format: 1;
  kpId: string;
  authVersion: number;
  issuedAt: string;
  owner: string; // signing thumbprint of the owner, who is also among the guardians
  guardians: KpGuardianEntry[];
  policy: KpPolicy;
}

export interface KpKeyBlock {
  authDigest: string; // sha256 of the authorization bytes
  version: number; // roll counter
  rolledAt: string;
  signer: string; // signing thumbprint of the owner or an authorised guardian
  keys: { encryptionThumbprint: string; wrappedKey: string }[];
}

/** A parsed, signature-checked key protector. Only `parseKeyProtector` makes one. */
export interface KeyProtector {
  readonly authorization: KpAuthorization;
  readonly keyBlock: KpKeyBlock;
  readonly owner: KpGuardianEntry;
  readonly bytes: Buffer;
  readonly authBytes: Buffer;
  readonly authSignature: Buffer;
}

function invalid(message: string): ShieldError {
  return new ShieldError('kp_invalid', `Not a valid key protector: ${message}.`);
}

/** Windows-style thumbprint: SHA-1 of the DER certificate, upper-case hex. */
export function thumbprintOf(cert: X509Certificate): string {
  return cert.fingerprint.replace(/:/g, '').toUpperCase();
}

export function guardianEntry(g: GuardianCertificates): KpGuardianEntry {
  const s = new X509Certificate(g.signingCertPem);
  const e = new X509Certificate(g.encryptionCertPem);
  return { name: g.name, signingThumbprint: thumbprintOf(s), encryptionThumbprint: thumbprintOf(e), signingCert: s.raw.toString('base64'), encryptionCert: e.raw.toString('base64') };
}

/** Stable JSON: keys sorted at every level, no whitespace. */
export function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(',')}]`;
  if (value !== null && typeof value === 'object') {
    return `{${Object.keys(value as object)
      .sort()
      .map((k) => `${JSON.stringify(k)}:${canonicalJson((value as Record<string, unknown>)[k])}`)
      .join(',')}}`;
  }
  return JSON.stringify(value);
}

function pssSign(key: KeyObject, data: Buffer): Buffer {
  return sign('sha256', data, { key, padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: 32 });
}

function pssVerify(certDerB64: string, data: Buffer, signature: Buffer): boolean {
  try {
    const key = new X509Certificate(Buffer.from(certDerB64, 'base64')).publicKey;
    return verify('sha256', data, { key, padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: 32 }, signature);
  } catch {
    return false;
  }
}

function wrapFor(entry: KpGuardianEntry, transportKey: Buffer): string {
  const key = new X509Certificate(Buffer.from(entry.encryptionCert, 'base64')).publicKey;
  return publicEncrypt({ key, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256' }, transportKey).toString('base64');
}

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}

function u16(n: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n);
  return b;
}

function sealedAuthorization(authorization: KpAuthorization, ownerSigningKey: KeyObject): { authBytes: Buffer; authSignature: Buffer } {
  const authBytes = Buffer.from(canonicalJson(authorization), 'utf8');
  return { authBytes, authSignature: pssSign(ownerSigningKey, authBytes) };
}

/** Wraps the transport key for every authorised guardian, signs the key block, encodes the file. */
function assemble(
  authorization: KpAuthorization,
  auth: { authBytes: Buffer; authSignature: Buffer },
  transportKey: Buffer,
  opts: { version: number; signer: string; signerKey: KeyObject },
): Buffer {
  const block: KpKeyBlock = {
    authDigest: createHash('sha256').update(auth.authBytes).digest('hex'),
    version: opts.version,
    rolledAt: new Date().toISOString(),
    signer: opts.signer,
    keys: authorization.guardians.map((g) => ({ encryptionThumbprint: g.encryptionThumbprint, wrappedKey: wrapFor(g, transportKey) })),
  };
  const blockBytes = Buffer.from(canonicalJson(block), 'utf8');
  const blockSig = pssSign(opts.signerKey, blockBytes);
  return Buffer.concat([MAGIC, Buffer.from([FORMAT]), u32(auth.authBytes.length), auth.authBytes, u16(auth.authSignature.length), auth.authSignature, u32(blockBytes.length), blockBytes, u16(blockSig.length), blockSig]);
}

function normalisePolicy(policy: KpPolicy): KpPolicy {
  if (policy.modes.length === 0) throw new ShieldError('invalid_argument', 'A key protector needs at least one allowed attestation mode.');
  for (const m of policy.modes) {
    if (!(ATTESTATION_MODES as readonly string[]).includes(m)) throw new ShieldError('invalid_argument', `Unknown attestation mode: ${m}`);
  }
  return { modes: [...new Set(policy.modes)].sort(), hosts: [...new Set(policy.hosts)].sort() };
}

export interface CreateOptions {
  owner: HeldGuardian;
  guardians: GuardianCertificates[];
  policy: KpPolicy;
}

/** A new KP with a fresh transport key. Only the bytes come back; the transport key is wiped. */
export function createKeyProtector(opts: CreateOptions): Buffer {
  const owner = guardianEntry(opts.owner);
  const guardians = [owner];
  for (const g of opts.guardians) {
    const e = guardianEntry(g);
    if (!guardians.some((x) => x.encryptionThumbprint === e.encryptionThumbprint)) guardians.push(e);
  }
  const authorization: KpAuthorization = {
    format: 1,
    kpId: randomUUID(),
    authVersion: 1,
    issuedAt: new Date().toISOString(),
    owner: owner.signingThumbprint,
    guardians,
    policy: normalisePolicy(opts.policy),
  };
  const transportKey = randomKey();
  try {
    const auth = sealedAuthorization(authorization, opts.owner.keys.signingKey);
    return assemble(authorization, auth, transportKey, { version: 1, signer: owner.signingThumbprint, signerKey: opts.owner.keys.signingKey });
  } finally {
    wipe(transportKey);
  }
}

/** Parses and checks structure and both signatures. Whether to trust the owner is the caller's decision. */
export function parseKeyProtector(bytes: Buffer): KeyProtector {
  let off = 0;
  const take = (n: number, what: string) => {
    if (off + n > bytes.length) throw invalid(`truncated ${what}`);
    const part = bytes.subarray(off, off + n);
    off += n;
    return part;
  };
  const part32 = (what: string) => {
    const n = take(4, what).readUInt32BE(0);
    if (n > MAX_PART) throw invalid(`${what} too large`);
    return take(n, what);
  };
  const part16 = (what: string) => take(take(2, what).readUInt16BE(0), what);

  if (bytes.length < 5 || !bytes.subarray(0, 4).equals(MAGIC)) throw invalid('wrong file type');
  off = 4;
  const format = take(1, 'header')[0];
  if (format !== FORMAT) throw invalid(`unknown format ${String(format)}`);
  const authBytes = part32('authorization');
  const authSignature = part16('owner signature');
  const blockBytes = part32('key block');
  const blockSig = part16('signature');
  if (off !== bytes.length) throw invalid('trailing bytes');

  let authorization: KpAuthorization;
  let keyBlock: KpKeyBlock;
  try {
    authorization = JSON.parse(authBytes.toString('utf8')) as KpAuthorization;
    keyBlock = JSON.parse(blockBytes.toString('utf8')) as KpKeyBlock;
  } catch {
    throw invalid('damaged content');
  }
  if (canonicalJson(authorization) !== authBytes.toString('utf8') || canonicalJson(keyBlock) !== blockBytes.toString('utf8')) throw invalid('not in canonical form');
  if (
    authorization?.format !== 1 ||
    !Array.isArray(authorization.guardians) ||
    !Array.isArray(keyBlock?.keys) ||
    !Array.isArray(authorization.policy?.modes) ||
    !Array.isArray(authorization.policy?.hosts)
  ) {
    throw invalid('missing fields');
  }
  const owner = authorization.guardians.find((g) => g?.signingThumbprint === authorization.owner);
  if (!owner) throw invalid('the owner is not among its guardians');
  if (!pssVerify(owner.signingCert, authBytes, authSignature)) {
    throw new ShieldError('kp_signature_invalid', 'The key protector’s authorization is not signed by its owner (altered or forged).');
  }
  const signer = authorization.guardians.find((g) => g.signingThumbprint === keyBlock.signer);
  if (!signer || !pssVerify(signer.signingCert, blockBytes, blockSig)) {
    throw new ShieldError('kp_signature_invalid', 'The key protector’s wrapped keys are not signed by its owner or an authorised guardian (altered or forged).');
  }
  if (keyBlock.authDigest !== createHash('sha256').update(authBytes).digest('hex')) throw invalid('its wrapped keys belong to another authorization');
  const wanted = authorization.guardians.map((g) => g.encryptionThumbprint).sort();
  const have = keyBlock.keys.map((k) => k.encryptionThumbprint).sort();
  if (canonicalJson(wanted) !== canonicalJson(have)) throw invalid('its wrapped keys do not match the authorised guardians');
  return { authorization, keyBlock, owner, bytes: Buffer.from(bytes), authBytes: Buffer.from(authBytes), authSignature: Buffer.from(authSignature) };
}

/** Unwraps the transport key with a guardian's encryption key. The caller wipes the result. */
export function unwrapTransportKey(kp: KeyProtector, guardian: { encryptionThumbprint: string; encryptionKey: KeyObject }): Buffer {
  const row = kp.keyBlock.keys.find((k) => k.encryptionThumbprint === guardian.encryptionThumbprint);
  if (!row) throw new ShieldError('kp_unwrap_denied', 'This guardian is not authorised by the key protector.');
  try {
    return privateDecrypt({ key: guardian.encryptionKey, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256' }, Buffer.from(row.wrappedKey, 'base64'));
  } catch {
    throw new ShieldError('kp_unwrap_denied', 'The wrapped key does not open with this guardian’s encryption key.');
  }
}

function requireOwner(kp: KeyProtector, owner: GuardianCertificates): void {
  if (guardianEntry(owner).signingThumbprint !== kp.authorization.owner) {
    throw new ShieldError('kp_not_owner', `Only the key protector’s owner (${kp.owner.name}) can change who may run it.`);
  }
}

function reauthorise(kp: KeyProtector, owner: HeldGuardian, guardians: KpGuardianEntry[], policy: KpPolicy): Buffer {
  requireOwner(kp, owner);
  const authorization: KpAuthorization = {
    ...kp.authorization,
    authVersion: kp.authorization.authVersion + 1,
    issuedAt: new Date().toISOString(),
    guardians,
    policy: normalisePolicy(policy),
  };
  // Grant and revoke re-wrap the same transport key: the data it protects is never re-encrypted.
  const transportKey = unwrapTransportKey(kp, { encryptionThumbprint: kp.owner.encryptionThumbprint, encryptionKey: owner.keys.encryptionKey });
  try {
    const auth = sealedAuthorization(authorization, owner.keys.signingKey);
    return assemble(authorization, auth, transportKey, { version: kp.keyBlock.version + 1, signer: kp.authorization.owner, signerKey: owner.keys.signingKey });
  } finally {
    wipe(transportKey);
  }
}

/** Owner only: one more guardian may run the VM. */
export function grantGuardian(kp: KeyProtector, owner: HeldGuardian, guardian: GuardianCertificates): Buffer {
  const entry = guardianEntry(guardian);
  if (kp.authorization.guardians.some((g) => g.encryptionThumbprint === entry.encryptionThumbprint)) {
    throw new ShieldError('already_exists', `Guardian ${guardian.name} is already authorised by this key protector.`);
  }
  return reauthorise(kp, owner, [...kp.authorization.guardians, entry], kp.authorization.policy);
}

/** Owner only: drops a guardian's row; the next roll gives the others a key it never saw. */
export function revokeGuardian(kp: KeyProtector, owner: HeldGuardian, guardian: string): Buffer {
  const target = kp.authorization.guardians.find((g) => g.name === guardian || g.signingThumbprint === guardian.toUpperCase());
  if (!target) throw new ShieldError('not_found', `Guardian ${guardian} is not authorised by this key protector.`);
  if (target.signingThumbprint === kp.authorization.owner) throw new ShieldError('invalid_argument', 'The owner cannot be revoked from its own key protector.');
  return reauthorise(kp, owner, kp.authorization.guardians.filter((g) => g !== target), kp.authorization.policy);
}

/** Owner only: new allowed modes and host allow-list. */
export function setPolicy(kp: KeyProtector, owner: HeldGuardian, policy: KpPolicy): Buffer {
  return reauthorise(kp, owner, kp.authorization.guardians, policy);
}

/**
 * A fresh transport key under the same authorization, signed by the owner or by an authorised
 * guardian held on this host. Returns the new KP and its transport key (the caller wipes it).
 */
export function rollKeyProtector(kp: KeyProtector, signer: HeldGuardian): { bytes: Buffer; transportKey: Buffer } {
  const entry = guardianEntry(signer);
  if (!kp.authorization.guardians.some((g) => g.signingThumbprint === entry.signingThumbprint)) {
    throw new ShieldError('kp_unwrap_denied', `Guardian ${signer.name} is not authorised by this key protector, so it cannot roll it.`);
  }
  const transportKey = randomKey();
  const bytes = assemble(kp.authorization, { authBytes: kp.authBytes, authSignature: kp.authSignature }, transportKey, {
    version: kp.keyBlock.version + 1,
    signer: entry.signingThumbprint,
    signerKey: signer.keys.signingKey,
  });
  return { bytes, transportKey };
}
