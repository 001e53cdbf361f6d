// TPM2_MakeCredential in software (TPM 2.0 Part 1 §24, Part 3 §12.6): the verifier wraps a
// secret so that only the TPM holding the EK, with the named AK loaded, can recover it by
// TPM2_ActivateCredential. No TPM and no tpm2-tools needed on the verifier's side.
import { constants as cryptoConstants, createCipheriv, createECDH, createHmac, publicEncrypt, randomBytes } from 'node:crypto';
import { ShieldError } from '../errors.ts';
import { TPM_ALG, algName } from './constants.ts';
import { hashName, publicKeyObject, tpmHash } from './keys.ts';
import { Reader, marshal, malformed } from './marshal.ts';
import { CURVES, MAX, type TpmtPublic } from './structures.ts';

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0);
  return b;
}

/** A label as the KDFs use it: its bytes and one terminating NUL. */
function label(text: string): Buffer {
  return Buffer.from(`${text}\0`, 'latin1');
}

/** KDFa (SP 800-108 counter mode with HMAC, Part 1 §11.4.10.2). */
export function kdfa(hashAlg: number, key: Buffer, use: string, contextU: Buffer, contextV: Buffer, bits: number): Buffer {
  const hash = hashName(hashAlg);
  const bytes = Math.ceil(bits / 8);
  const out: Buffer[] = [];
  for (let i = 1, have = 0; have < bytes; i++) {
    const block = createHmac(hash, key).update(u32(i)).update(label(use)).update(contextU).update(contextV).update(u32(bits)).digest();
    out.push(block);
    have += block.length;
  }
  const result = Buffer.concat(out).subarray(0, bytes);
  if (bits % 8) result[0] = result[0]! & ((1 << bits % 8) - 1);
  return result;
}

/** KDFe (SP 800-56A concatenation KDF, Part 1 §11.4.10.3) over the ECDH x-coordinate Z. */
export function kdfe(hashAlg: number, z: Buffer, use: string, partyU: Buffer, partyV: Buffer, bits: number): Buffer {
  const bytes = Math.ceil(bits / 8);
  const out: Buffer[] = [];
  for (let i = 1, have = 0; have < bytes; i++) {
    const block = tpmHash(hashAlg, u32(i), z, label(use), partyU, partyV);
    out.push(block);
    have += block.length;
  }
  const result = Buffer.concat(out).subarray(0, bytes);
  if (bits % 8) result[0] = result[0]! & ((1 << bits % 8) - 1);
  return result;
}

export interface Credential {
  /** TPM2B_ID_OBJECT contents: integrityHMAC (TPM2B) ‖ encIdentity. */
  credentialBlob: Buffer;
  /** TPM2B_ENCRYPTED_SECRET contents: the seed, encrypted to the EK. */
  secret: Buffer;
}

function seedFor(ek: TpmtPublic, seedBytes: number): { seed: Buffer; secret: Buffer } {
  if (ek.type === TPM_ALG.RSA) {
    const seed = randomBytes(seedBytes);
    // OAEP with the EK's nameAlg and the label "IDENTITY\0" (Part 1 §24.4, Annex B.10.3).
    const secret = publicEncrypt({ key: publicKeyObject(ek), padding: cryptoConstants.RSA_PKCS1_OAEP_PADDING, oaepHash: hashName(ek.nameAlg), oaepLabel: label('IDENTITY') }, seed);
    return { seed, secret };
  }
  if (ek.type === TPM_ALG.ECC) {
    const curve = CURVES[ek.parameters.curveId];
    if (!curve) throw new ShieldError('invalid_argument', `ECC curve 0x${ek.parameters.curveId.toString(16)} is not supported.`);
    const pad = (b: Buffer) => Buffer.concat([Buffer.alloc(Math.max(0, curve.bytes - b.length)), b]);
    publicKeyObject(ek); // refuses a point off the curve before we use it
    const ecdh = createECDH(curve.node);
    ecdh.generateKeys();
    const ephemeral = ecdh.getPublicKey();
    const ex = ephemeral.subarray(1, 1 + curve.bytes);
    const ey = ephemeral.subarray(1 + curve.bytes);
    const z = ecdh.computeSecret(Buffer.concat([Buffer.from([4]), pad(ek.unique.x), pad(ek.unique.y)])).subarray(0, curve.bytes);
    // Annex C.6.4: seed = KDFe(nameAlg, Z, "IDENTITY", ephemeral.x, EK.x, digest bits).
    const seed = kdfe(ek.nameAlg, z, 'IDENTITY', ex, pad(ek.unique.x), seedBytes * 8);
    const secret = marshal((w) => w.tpm2b(ex).tpm2b(ey));
    return { seed, secret };
  }
  throw new ShieldError('invalid_argument', `An ${algName(ek.type)} key cannot receive a credential.`);
}

/**
 * TPM2_MakeCredential. `ek` is the EK's public area (a restricted decryption key with an AES
 * symmetric definition, as every TCG EK template has), `objectName` the AK's Name, `credential`
 * at most one nameAlg digest long.
 */
export function makeCredential(ek: TpmtPublic, credential: Buffer, objectName: Buffer): Credential {
  if (ek.type !== TPM_ALG.RSA && ek.type !== TPM_ALG.ECC) throw new ShieldError('invalid_argument', 'The EK must be an RSA or ECC key.');
  const sym = ek.parameters.symmetric;
  if (sym.algorithm !== TPM_ALG.AES || sym.mode !== TPM_ALG.CFB || !sym.keyBits) throw new ShieldError('invalid_argument', 'The EK has no AES-CFB symmetric definition, so it cannot be a credential target.');
  const digestBytes = tpmHash(ek.nameAlg).length;
  if (credential.length === 0 || credential.length > digestBytes) throw new ShieldError('invalid_argument', `A credential is 1 to ${digestBytes} bytes, not ${credential.length}.`);
  const { seed, secret } = seedFor(ek, digestBytes);
  const symKey = kdfa(ek.nameAlg, seed, 'STORAGE', objectName, Buffer.alloc(0), sym.keyBits);
  const cipher = createCipheriv(`aes-${sym.keyBits}-cfb`, symKey, Buffer.alloc(16));
  // What gets encrypted is the credential as a TPM2B_DIGEST, size included.
  const encIdentity = Buffer.concat([cipher.update(marshal((w) => w.tpm2b(credential))), cipher.final()]);
  const hmacKey = kdfa(ek.nameAlg, seed, 'INTEGRITY', Buffer.alloc(0), Buffer.alloc(0), digestBytes * 8);
  const integrity = createHmac(hashName(ek.nameAlg), hmacKey).update(encIdentity).update(objectName).digest();
  seed.fill(0);
  symKey.fill(0);
  hmacKey.fill(0);
  return { credentialBlob: marshal((w) => w.tpm2b(integrity).bytes(encIdentity)), secret };
}

// ---- tpm2-tools' credential file (tpm2_makecredential -o, tpm2_activatecredential -i) -----------

const CREDENTIAL_FILE_MAGIC = 0xbadcc0de;

/** BADCC0DE ‖ version 1 ‖ TPM2B_ID_OBJECT ‖ TPM2B_ENCRYPTED_SECRET, all big-endian. */
export function encodeCredentialFile(c: Credential): Buffer {
  return marshal((w) => w.u32(CREDENTIAL_FILE_MAGIC).u32(1).tpm2b(c.credentialBlob).tpm2b(c.secret));
}

export function decodeCredentialFile(bytes: Buffer): Credential {
  const r = new Reader(bytes);
  if (r.u32('magic') !== CREDENTIAL_FILE_MAGIC) throw malformed('not a tpm2-tools credential file (no BADCC0DE magic)');
  const version = r.u32('version');
  if (version !== 1) throw malformed(`credential file version ${version}`);
  const credentialBlob = r.tpm2b('TPM2B_ID_OBJECT', MAX.ID_OBJECT);
  const secret = r.tpm2b('TPM2B_ENCRYPTED_SECRET', MAX.ENCRYPTED_SECRET);
  r.done('credential file');
  return { credentialBlob, secret };
}
