// Verifier-side helpers over TPM key structures, all in node:crypto: object and NV names,
// TPMT_PUBLIC → KeyObject, and checking a TPMT_SIGNATURE over a message.
import { type KeyObject, createHash, createPublicKey, constants as cryptoConstants, verify } from 'node:crypto';
import { ShieldError } from '../errors.ts';
import { HASHES, TPM_ALG, algName } from './constants.ts';
import { marshal } from './marshal.ts';
import type { TpmtSignature } from './attest.ts';
import { CURVES, type NvPublic, type TpmtPublic, marshalPublic, writeNvPublic } from './structures.ts';

export function hashName(alg: number): string {
  const h = HASHES[alg];
  if (!h) throw new ShieldError('invalid_argument', `${algName(alg)} is not a hash algorithm this client computes.`);
  return h.name;
}

export function tpmHash(alg: number, ...parts: Buffer[]): Buffer {
  const h = createHash(hashName(alg));
  for (const p of parts) h.update(p);
  return h.digest();
}

function nameOf(nameAlg: number, marshalled: Buffer): Buffer {
  const alg = Buffer.alloc(2);
  alg.writeUInt16BE(nameAlg);
  return Buffer.concat([alg, tpmHash(nameAlg, marshalled)]);
}

/**
 * The Name of an object: nameAlg ‖ H_nameAlg(TPMT_PUBLIC). Pass the bytes the TPM returned when
 * you have them: re-marshalling a parsed structure gives the same bytes only for canonical input.
 */
export function objectName(pub: TpmtPublic | Buffer): Buffer {
  if (Buffer.isBuffer(pub)) {
    if (pub.length < 4) throw new ShieldError('tpm_malformed', 'Malformed TPM data: a TPMT_PUBLIC of under 4 bytes.');
    return nameOf(pub.readUInt16BE(2), pub);
  }
  return nameOf(pub.nameAlg, marshalPublic(pub));
}

/** The Name of an NV index: nameAlg ‖ H_nameAlg(TPMS_NV_PUBLIC). */
export function nvName(pub: NvPublic): Buffer {
  return nameOf(pub.nameAlg, marshal((w) => writeNvPublic(w, pub)));
}

/** The public key of an RSA or ECC TPMT_PUBLIC as a node:crypto KeyObject. */
export function publicKeyObject(pub: TpmtPublic): KeyObject {
  if (pub.type === TPM_ALG.RSA) {
    if (pub.unique.length === 0) throw new ShieldError('invalid_argument', 'This RSA public area has no modulus (a template, not a key).');
    const e = Buffer.alloc(4);
    // exponent 0 means the default, 2^16 + 1.
    e.writeUInt32BE(pub.parameters.exponent === 0 ? 65537 : pub.parameters.exponent);
    const exp = e.subarray(e.findIndex((b) => b !== 0));
    try {
      return createPublicKey({ key: { kty: 'RSA', n: pub.unique.toString('base64url'), e: exp.toString('base64url') }, format: 'jwk' });
    } catch (err) {
      throw new ShieldError('tpm_malformed', 'Malformed TPM data: the RSA public key is not a valid key.', { cause: err });
    }
  }
  if (pub.type === TPM_ALG.ECC) {
    const curve = CURVES[pub.parameters.curveId];
    if (!curve) throw new ShieldError('invalid_argument', `ECC curve 0x${pub.parameters.curveId.toString(16)} is not supported.`);
    const pad = (b: Buffer) => {
      if (b.length > curve.bytes) throw new ShieldError('tpm_malformed', `Malformed TPM data: an ECC coordinate of ${b.length} bytes on ${curve.jwk}.`);
      return Buffer.concat([Buffer.alloc(curve.bytes - b.length), b]);
    };
    try {
      return createPublicKey({ key: { kty: 'EC', crv: curve.jwk, x: pad(pub.unique.x).toString('base64url'), y: pad(pub.unique.y).toString('base64url') }, format: 'jwk' });
    } catch (err) {
      throw new ShieldError('tpm_malformed', 'Malformed TPM data: the ECC public point is not on its curve.', { cause: err });
    }
  }
  throw new ShieldError('invalid_argument', `${algName(pub.type)} keys have no public key to export.`);
}

/** PEM (SubjectPublicKeyInfo) of an RSA or ECC TPMT_PUBLIC — what `tpm2_readpublic -f pem` writes. */
export function publicKeyPem(pub: TpmtPublic): string {
  return publicKeyObject(pub).export({ type: 'spki', format: 'pem' }).toString();
}

/**
 * Checks a TPMT_SIGNATURE over `message` with `key`. RSASSA, RSAPSS and ECDSA; false for a wrong
 * signature, ShieldError for a scheme that cannot be checked here.
 */
export function verifySignature(key: KeyObject, message: Buffer, sig: TpmtSignature): boolean {
  if (sig.sigAlg === TPM_ALG.RSASSA || sig.sigAlg === TPM_ALG.RSAPSS) {
    const hash = hashName(sig.hash);
    const padding = sig.sigAlg === TPM_ALG.RSASSA ? cryptoConstants.RSA_PKCS1_PADDING : cryptoConstants.RSA_PKCS1_PSS_PADDING;
    // The TPM uses the largest salt the modulus allows; RSA_PSS_SALTLEN_AUTO accepts it.
    return verifies(() => verify(hash, message, { key, padding, saltLength: cryptoConstants.RSA_PSS_SALTLEN_AUTO }, sig.sig));
  }
  if (sig.sigAlg === TPM_ALG.ECDSA) {
    const hash = hashName(sig.hash);
    const curve = Object.values(CURVES).find((c) => c.node === key.asymmetricKeyDetails?.namedCurve);
    if (!curve || sig.r.length > curve.bytes || sig.s.length > curve.bytes) return false;
    const pad = (b: Buffer) => Buffer.concat([Buffer.alloc(curve.bytes - b.length), b]);
    return verifies(() => verify(hash, message, { key, dsaEncoding: 'ieee-p1363' }, Buffer.concat([pad(sig.r), pad(sig.s)])));
  }
  throw new ShieldError('invalid_argument', `${algName(sig.sigAlg)} signatures cannot be verified here.`);
}

/** A signature that OpenSSL cannot even process (wrong key type, wrong length) does not verify. */
function verifies(check: () => boolean): boolean {
  try {
    return check();
  } catch {
    return false;
  }
}
