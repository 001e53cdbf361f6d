// Key templates. The EK templates are the TCG EK Credential Profile 2.0 low-range ones (B.3.3
// template L-1 RSA 2048 and L-2 ECC P-256): the same bytes give the same EK on every call, which
// is how a verifier recognises the EK that the certificate in NV 0x01C00002 / 0x01C0000A names.
import { TPMA_OBJECT as A, TPM_ALG, TPM_ECC } from './constants.ts';
import type { EccPublic, RsaPublic, TpmtPublic } from './structures.ts';

/** PolicySecret(TPM_RH_ENDORSEMENT): the EK's authPolicy; only the endorsement hierarchy's owner may use it. */
export const EK_AUTH_POLICY = Buffer.from('837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa', 'hex');

const EK_ATTRIBUTES = A.fixedTPM | A.fixedParent | A.sensitiveDataOrigin | A.adminWithPolicy | A.restricted | A.decrypt;
const AES128CFB = { algorithm: TPM_ALG.AES, keyBits: 128, mode: TPM_ALG.CFB };

export function ekTemplate(alg: 'rsa' | 'ecc' = 'rsa'): TpmtPublic {
  if (alg === 'rsa') {
    const t: RsaPublic = {
      type: TPM_ALG.RSA,
      nameAlg: TPM_ALG.SHA256,
      objectAttributes: EK_ATTRIBUTES,
      authPolicy: Buffer.from(EK_AUTH_POLICY),
      parameters: { symmetric: AES128CFB, scheme: { scheme: TPM_ALG.NULL }, keyBits: 2048, exponent: 0 },
      unique: Buffer.alloc(256),
    };
    return t;
  }
  const t: EccPublic = {
    type: TPM_ALG.ECC,
    nameAlg: TPM_ALG.SHA256,
    objectAttributes: EK_ATTRIBUTES,
    authPolicy: Buffer.from(EK_AUTH_POLICY),
    parameters: { symmetric: AES128CFB, scheme: { scheme: TPM_ALG.NULL }, curveId: TPM_ECC.NIST_P256, kdf: { scheme: TPM_ALG.NULL } },
    unique: { x: Buffer.alloc(32), y: Buffer.alloc(32) },
  };
  return t;
}

/**
 * A storage root key (TCG TPM v2.0 Provisioning Guidance §7.5): restricted decryption, usable with
 * a password session, AES-128-CFB. ECC by default because libtpms makes it in well under 1 ms.
 */
export function srkTemplate(alg: 'rsa' | 'ecc' = 'ecc'): TpmtPublic {
  const objectAttributes = A.fixedTPM | A.fixedParent | A.sensitiveDataOrigin | A.userWithAuth | A.noDA | A.restricted | A.decrypt;
  if (alg === 'rsa') {
    return { type: TPM_ALG.RSA, nameAlg: TPM_ALG.SHA256, objectAttributes, authPolicy: Buffer.alloc(0), parameters: { symmetric: AES128CFB, scheme: { scheme: TPM_ALG.NULL }, keyBits: 2048, exponent: 0 }, unique: Buffer.alloc(0) };
  }
  return {
    type: TPM_ALG.ECC,
    nameAlg: TPM_ALG.SHA256,
    objectAttributes,
    authPolicy: Buffer.alloc(0),
    parameters: { symmetric: AES128CFB, scheme: { scheme: TPM_ALG.NULL }, curveId: TPM_ECC.NIST_P256, kdf: { scheme: TPM_ALG.NULL } },
    unique: { x: Buffer.alloc(0), y: Buffer.alloc(0) },
  };
}

/**
 * An attestation key: a restricted signing key, so the TPM signs only messages it produced
 * itself (quotes, certifications), never outside data that could mimic a quote.
 */
export function akTemplate(alg: 'rsa' | 'ecc' = 'rsa'): TpmtPublic {
  const objectAttributes = A.fixedTPM | A.fixedParent | A.sensitiveDataOrigin | A.userWithAuth | A.restricted | A.sign;
  if (alg === 'rsa') {
    return { type: TPM_ALG.RSA, nameAlg: TPM_ALG.SHA256, objectAttributes, authPolicy: Buffer.alloc(0), parameters: { symmetric: { algorithm: TPM_ALG.NULL }, scheme: { scheme: TPM_ALG.RSASSA, hashAlg: TPM_ALG.SHA256 }, keyBits: 2048, exponent: 0 }, unique: Buffer.alloc(0) };
  }
  return {
    type: TPM_ALG.ECC,
    nameAlg: TPM_ALG.SHA256,
    objectAttributes,
    authPolicy: Buffer.alloc(0),
    parameters: { symmetric: { algorithm: TPM_ALG.NULL }, scheme: { scheme: TPM_ALG.ECDSA, hashAlg: TPM_ALG.SHA256 }, curveId: TPM_ECC.NIST_P256, kdf: { scheme: TPM_ALG.NULL } },
    unique: { x: Buffer.alloc(0), y: Buffer.alloc(0) },
  };
}
