// TPM 2.0 structures (Part 2), one reader/writer pair each, named as in the specification.
// Readers bound every size by the structure's own maximum; see marshal.ts for the failure mode.
import { TPM_ALG, TPM_ECC, digestSize } from './constants.ts';
import { Reader, Writer, malformed, marshal } from './marshal.ts';

/** Structure maxima (Part 2 with the usual implementation values: 64-byte digests, RSA ≤ 4096). */
export const MAX = {
  DIGEST: 64,
  NAME: 2 + 64,
  DATA: 2 + 64,
  RSA_KEY_BYTES: 512,
  ECC_KEY_BYTES: 80,
  NV_BUFFER: 2048,
  CONTEXT: 4096,
  PRIVATE: 4096,
  PUBLIC: 2048,
  ATTEST: 2048,
  ID_OBJECT: 2 * (2 + 64),
  ENCRYPTED_SECRET: 512,
  PCR_SELECT: 8,
  HASH_COUNT: 16,
  DIGEST_LIST: 8,
  SENSITIVE_DATA: 256,
} as const;

// ---- TPMT_SYM_DEF_OBJECT, schemes ---------------------------------------------------------------

export interface SymDef {
  algorithm: number;
  keyBits?: number;
  mode?: number;
}

export function readSymDef(r: Reader): SymDef {
  const algorithm = r.u16('TPMT_SYM_DEF.algorithm');
  if (algorithm === TPM_ALG.NULL) return { algorithm };
  const keyBits = r.u16('TPMT_SYM_DEF.keyBits');
  // XOR has a hash where the others have a key size, and no mode.
  if (algorithm === TPM_ALG.XOR) return { algorithm, keyBits };
  return { algorithm, keyBits, mode: r.u16('TPMT_SYM_DEF.mode') };
}

export function writeSymDef(w: Writer, s: SymDef): void {
  w.u16(s.algorithm);
  if (s.algorithm === TPM_ALG.NULL) return;
  w.u16(s.keyBits ?? 0);
  if (s.algorithm !== TPM_ALG.XOR) w.u16(s.mode ?? TPM_ALG.NULL);
}

/** TPMT_RSA_SCHEME / TPMT_ECC_SCHEME / TPMT_SIG_SCHEME / TPMT_KDF_SCHEME / TPMT_KEYEDHASH_SCHEME. */
export interface Scheme {
  scheme: number;
  hashAlg?: number;
  /** ECDAA only. */
  count?: number;
  /** XOR (keyed-hash) only. */
  kdf?: number;
}

const NO_DETAILS = new Set<number>([TPM_ALG.NULL, TPM_ALG.RSAES]);

export function readScheme(r: Reader, what: string): Scheme {
  const scheme = r.u16(`${what}.scheme`);
  if (NO_DETAILS.has(scheme)) return { scheme };
  const hashAlg = r.u16(`${what}.hashAlg`);
  if (scheme === TPM_ALG.ECDAA) return { scheme, hashAlg, count: r.u16(`${what}.count`) };
  if (scheme === TPM_ALG.XOR) return { scheme, hashAlg, kdf: r.u16(`${what}.kdf`) };
  return { scheme, hashAlg };
}

export function writeScheme(w: Writer, s: Scheme): void {
  w.u16(s.scheme);
  if (NO_DETAILS.has(s.scheme)) return;
  w.u16(s.hashAlg ?? TPM_ALG.SHA256);
  if (s.scheme === TPM_ALG.ECDAA) w.u16(s.count ?? 0);
  if (s.scheme === TPM_ALG.XOR) w.u16(s.kdf ?? TPM_ALG.KDF1_SP800_108);
}

// ---- TPMT_PUBLIC --------------------------------------------------------------------------------

interface PublicBase {
  nameAlg: number;
  objectAttributes: number;
  authPolicy: Buffer;
}

export interface RsaPublic extends PublicBase {
  type: typeof TPM_ALG.RSA;
  parameters: { symmetric: SymDef; scheme: Scheme; keyBits: number; exponent: number };
  /** The modulus (empty in a template). */
  unique: Buffer;
}

export interface EccPublic extends PublicBase {
  type: typeof TPM_ALG.ECC;
  parameters: { symmetric: SymDef; scheme: Scheme; curveId: number; kdf: Scheme };
  unique: { x: Buffer; y: Buffer };
}

export interface KeyedHashPublic extends PublicBase {
  type: typeof TPM_ALG.KEYEDHASH;
  parameters: { scheme: Scheme };
  unique: Buffer;
}

export interface SymCipherPublic extends PublicBase {
  type: typeof TPM_ALG.SYMCIPHER;
  parameters: { symmetric: SymDef };
  unique: Buffer;
}

export type TpmtPublic = RsaPublic | EccPublic | KeyedHashPublic | SymCipherPublic;

export function readPublic(r: Reader): TpmtPublic {
  const type = r.u16('TPMT_PUBLIC.type');
  const nameAlg = r.u16('TPMT_PUBLIC.nameAlg');
  const objectAttributes = r.u32('TPMT_PUBLIC.objectAttributes');
  const authPolicy = r.tpm2b('TPMT_PUBLIC.authPolicy', MAX.DIGEST);
  const base = { nameAlg, objectAttributes, authPolicy };
  switch (type) {
    case TPM_ALG.RSA: {
      const symmetric = readSymDef(r);
      const scheme = readScheme(r, 'TPMT_RSA_SCHEME');
      const keyBits = r.u16('TPMS_RSA_PARMS.keyBits');
      const exponent = r.u32('TPMS_RSA_PARMS.exponent');
      const unique = r.tpm2b('TPM2B_PUBLIC_KEY_RSA', MAX.RSA_KEY_BYTES);
      return { type, ...base, parameters: { symmetric, scheme, keyBits, exponent }, unique };
    }
    case TPM_ALG.ECC: {
      const symmetric = readSymDef(r);
      const scheme = readScheme(r, 'TPMT_ECC_SCHEME');
      const curveId = r.u16('TPMS_ECC_PARMS.curveID');
      const kdf = readScheme(r, 'TPMT_KDF_SCHEME');
      const x = r.tpm2b('TPMS_ECC_POINT.x', MAX.ECC_KEY_BYTES);
      const y = r.tpm2b('TPMS_ECC_POINT.y', MAX.ECC_KEY_BYTES);
      return { type, ...base, parameters: { symmetric, scheme, curveId, kdf }, unique: { x, y } };
    }
    case TPM_ALG.KEYEDHASH: {
      const scheme = readScheme(r, 'TPMT_KEYEDHASH_SCHEME');
      return { type, ...base, parameters: { scheme }, unique: r.tpm2b('TPM2B_DIGEST', MAX.DIGEST) };
    }
    case TPM_ALG.SYMCIPHER: {
      const symmetric = readSymDef(r);
      return { type, ...base, parameters: { symmetric }, unique: r.tpm2b('TPM2B_DIGEST', MAX.DIGEST) };
    }
    default:
      throw malformed(`TPMT_PUBLIC.type 0x${type.toString(16)} is not a key type`);
  }
}

export function writePublic(w: Writer, p: TpmtPublic): void {
  w.u16(p.type).u16(p.nameAlg).u32(p.objectAttributes).tpm2b(p.authPolicy);
  switch (p.type) {
    case TPM_ALG.RSA:
      writeSymDef(w, p.parameters.symmetric);
      writeScheme(w, p.parameters.scheme);
      w.u16(p.parameters.keyBits).u32(p.parameters.exponent).tpm2b(p.unique);
      return;
    case TPM_ALG.ECC:
      writeSymDef(w, p.parameters.symmetric);
      writeScheme(w, p.parameters.scheme);
      w.u16(p.parameters.curveId);
      writeScheme(w, p.parameters.kdf);
      w.tpm2b(p.unique.x).tpm2b(p.unique.y);
      return;
    case TPM_ALG.KEYEDHASH:
      writeScheme(w, p.parameters.scheme);
      w.tpm2b(p.unique);
      return;
    case TPM_ALG.SYMCIPHER:
      writeSymDef(w, p.parameters.symmetric);
      w.tpm2b(p.unique);
      return;
  }
}

/** TPM2B_PUBLIC as it travels: the parsed structure plus the exact bytes, which the name hashes. */
export interface PublicArea {
  publicArea: TpmtPublic;
  bytes: Buffer;
}

export function readPublic2b(r: Reader): PublicArea {
  const bytes = r.tpm2b('TPM2B_PUBLIC', MAX.PUBLIC);
  return { publicArea: parsePublic(bytes), bytes };
}

/** Parses a marshalled TPMT_PUBLIC (the contents of a TPM2B_PUBLIC). */
export function parsePublic(bytes: Buffer): TpmtPublic {
  const r = new Reader(bytes);
  const p = readPublic(r);
  r.done('TPMT_PUBLIC');
  return p;
}

export function marshalPublic(p: TpmtPublic): Buffer {
  return marshal((w) => writePublic(w, p));
}

/** ECC curve sizes and their node:crypto / JWK names. */
export const CURVES: Readonly<Record<number, { bytes: number; jwk: string; node: string }>> = {
  [TPM_ECC.NIST_P256]: { bytes: 32, jwk: 'P-256', node: 'prime256v1' },
  [TPM_ECC.NIST_P384]: { bytes: 48, jwk: 'P-384', node: 'secp384r1' },
  [TPM_ECC.NIST_P521]: { bytes: 66, jwk: 'P-521', node: 'secp521r1' },
};

// ---- TPML_PCR_SELECTION ------------------------------------------------------------------------

/** One bank and the PCR indices selected in it. */
export interface PcrSelection {
  hash: number;
  pcrs: number[];
}

export function readPcrSelections(r: Reader): PcrSelection[] {
  const n = r.count('TPML_PCR_SELECTION', MAX.HASH_COUNT, 3);
  const out: PcrSelection[] = [];
  for (let i = 0; i < n; i++) {
    const hash = r.u16('TPMS_PCR_SELECTION.hash');
    const size = r.u8('TPMS_PCR_SELECTION.sizeofSelect');
    if (size > MAX.PCR_SELECT) throw malformed(`TPMS_PCR_SELECTION.sizeofSelect ${size} is more than ${MAX.PCR_SELECT}`);
    const bits = r.bytes(size, 'TPMS_PCR_SELECTION.pcrSelect');
    const pcrs: number[] = [];
    for (let b = 0; b < size * 8; b++) if (bits[b >> 3]! & (1 << (b & 7))) pcrs.push(b);
    out.push({ hash, pcrs });
  }
  return out;
}

export function writePcrSelections(w: Writer, sel: readonly PcrSelection[]): void {
  w.u32(sel.length);
  for (const s of sel) {
    // At least 3 bytes (PCR_SELECT_MIN for a 24-PCR TPM): a shorter bitmap is refused by most TPMs.
    const size = Math.max(3, Math.ceil((Math.max(-1, ...s.pcrs) + 1) / 8));
    const bits = Buffer.alloc(size);
    for (const p of s.pcrs) {
      if (!Number.isInteger(p) || p < 0 || p >= size * 8) throw malformed(`PCR index ${p}`);
      bits[p >> 3]! |= 1 << (p & 7);
    }
    w.u16(s.hash).u8(size).bytes(bits);
  }
}

// ---- TPML_DIGEST, TPMT_HA ----------------------------------------------------------------------

export function readDigestList(r: Reader): Buffer[] {
  const n = r.count('TPML_DIGEST', MAX.DIGEST_LIST, 2);
  const out: Buffer[] = [];
  for (let i = 0; i < n; i++) out.push(r.tpm2b('TPM2B_DIGEST', MAX.DIGEST));
  return out;
}

export interface TaggedHash {
  hashAlg: number;
  digest: Buffer;
}

export function readHa(r: Reader): TaggedHash {
  const hashAlg = r.u16('TPMT_HA.hashAlg');
  if (hashAlg === TPM_ALG.NULL) return { hashAlg, digest: Buffer.alloc(0) };
  const size = digestSize(hashAlg);
  if (size === undefined) throw malformed(`TPMT_HA.hashAlg 0x${hashAlg.toString(16)} is not a known hash`);
  return { hashAlg, digest: r.bytes(size, 'TPMT_HA.digest') };
}

export function writeHa(w: Writer, h: TaggedHash): void {
  const size = digestSize(h.hashAlg);
  if (size === undefined || size !== h.digest.length) throw malformed(`a ${h.digest.length}-byte digest for hash 0x${h.hashAlg.toString(16)}`);
  w.u16(h.hashAlg).bytes(h.digest);
}

// ---- TPMS_NV_PUBLIC -----------------------------------------------------------------------------

export interface NvPublic {
  nvIndex: number;
  nameAlg: number;
  attributes: number;
  authPolicy: Buffer;
  dataSize: number;
}

export function readNvPublic(r: Reader): NvPublic {
  return {
    nvIndex: r.u32('TPMS_NV_PUBLIC.nvIndex'),
    nameAlg: r.u16('TPMS_NV_PUBLIC.nameAlg'),
    attributes: r.u32('TPMS_NV_PUBLIC.attributes'),
    authPolicy: r.tpm2b('TPMS_NV_PUBLIC.authPolicy', MAX.DIGEST),
    dataSize: r.u16('TPMS_NV_PUBLIC.dataSize'),
  };
}

export function writeNvPublic(w: Writer, p: NvPublic): void {
  w.u32(p.nvIndex).u16(p.nameAlg).u32(p.attributes).tpm2b(p.authPolicy).u16(p.dataSize);
}

// ---- TPMS_CONTEXT -------------------------------------------------------------------------------

/** A saved context: opaque to us, integrity-protected by the TPM. */
export interface TpmsContext {
  sequence: bigint;
  savedHandle: number;
  hierarchy: number;
  contextBlob: Buffer;
}

export function readContext(r: Reader): TpmsContext {
  return {
    sequence: r.u64('TPMS_CONTEXT.sequence'),
    savedHandle: r.u32('TPMS_CONTEXT.savedHandle'),
    hierarchy: r.u32('TPMS_CONTEXT.hierarchy'),
    contextBlob: r.tpm2b('TPM2B_CONTEXT_DATA', MAX.CONTEXT),
  };
}

export function writeContext(w: Writer, c: TpmsContext): void {
  w.u64(c.sequence).u32(c.savedHandle).u32(c.hierarchy).tpm2b(c.contextBlob);
}

// ---- tickets ------------------------------------------------------------------------------------

/** TPMT_TK_CREATION / TPMT_TK_AUTH / TPMT_TK_VERIFIED: same shape. */
export interface Ticket {
  tag: number;
  hierarchy: number;
  digest: Buffer;
}

export function readTicket(r: Reader, what: string): Ticket {
  return { tag: r.u16(`${what}.tag`), hierarchy: r.u32(`${what}.hierarchy`), digest: r.tpm2b(`${what}.digest`, MAX.DIGEST) };
}
