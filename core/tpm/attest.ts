// What a verifier reads from a quote: TPMS_ATTEST (the signed message) and TPMT_SIGNATURE.
// Both are parsed from untrusted bytes; anything out of shape is `tpm_malformed`.
import { TPM_ALG, TPM_GENERATED_VALUE, TPM_ST } from './constants.ts';
import { Reader, Writer, malformed, unmarshal } from './marshal.ts';
import { MAX, type PcrSelection, type TaggedHash, readHa, readPcrSelections, writeHa } from './structures.ts';

export interface ClockInfo {
  clock: bigint;
  resetCount: number;
  restartCount: number;
  safe: boolean;
}

export interface QuoteInfo {
  pcrSelect: PcrSelection[];
  pcrDigest: Buffer;
}

export interface TpmsAttest {
  magic: number;
  /** TPM_ST_ATTEST_*. */
  type: number;
  qualifiedSigner: Buffer;
  extraData: Buffer;
  clockInfo: ClockInfo;
  firmwareVersion: bigint;
  /** Set when type is TPM_ST_ATTEST_QUOTE. */
  quote?: QuoteInfo;
  /** Set when type is TPM_ST_ATTEST_CERTIFY. */
  certify?: { name: Buffer; qualifiedName: Buffer };
  /** The TPMU_ATTEST bytes of the other types, unparsed. */
  attested?: Buffer;
}

/**
 * Parses a TPMS_ATTEST (the bytes the TPM signed). The magic is checked: a TPM only signs
 * restricted-key messages that start with TPM_GENERATED_VALUE, which is what makes a quote a quote.
 */
export function parseAttest(bytes: Buffer): TpmsAttest {
  return unmarshal(bytes, 'TPMS_ATTEST', (r) => {
    const magic = r.u32('TPMS_ATTEST.magic');
    if (magic !== TPM_GENERATED_VALUE) throw malformed(`TPMS_ATTEST.magic 0x${magic.toString(16)} is not TPM_GENERATED_VALUE`);
    const type = r.u16('TPMS_ATTEST.type');
    const qualifiedSigner = r.tpm2b('TPMS_ATTEST.qualifiedSigner', MAX.NAME);
    const extraData = r.tpm2b('TPMS_ATTEST.extraData', MAX.DATA);
    const clock = r.u64('TPMS_CLOCK_INFO.clock');
    const resetCount = r.u32('TPMS_CLOCK_INFO.resetCount');
    const restartCount = r.u32('TPMS_CLOCK_INFO.restartCount');
    const safeByte = r.u8('TPMS_CLOCK_INFO.safe');
    if (safeByte > 1) throw malformed(`TPMS_CLOCK_INFO.safe is ${safeByte}, not YES or NO`);
    const firmwareVersion = r.u64('TPMS_ATTEST.firmwareVersion');
    const head = { magic, type, qualifiedSigner, extraData, clockInfo: { clock, resetCount, restartCount, safe: safeByte === 1 }, firmwareVersion };
    if (type === TPM_ST.ATTEST_QUOTE) {
      const pcrSelect = readPcrSelections(r);
      const pcrDigest = r.tpm2b('TPMS_QUOTE_INFO.pcrDigest', MAX.DIGEST);
      return { ...head, quote: { pcrSelect, pcrDigest } };
    }
    if (type === TPM_ST.ATTEST_CERTIFY) {
      return { ...head, certify: { name: r.tpm2b('TPMS_CERTIFY_INFO.name', MAX.NAME), qualifiedName: r.tpm2b('TPMS_CERTIFY_INFO.qualifiedName', MAX.NAME) } };
    }
    if (type < TPM_ST.ATTEST_NV || type > TPM_ST.ATTEST_NV_DIGEST) throw malformed(`TPMS_ATTEST.type 0x${type.toString(16)} is not an attestation type`);
    return { ...head, attested: r.rest() };
  });
}

// ---- TPMT_SIGNATURE -----------------------------------------------------------------------------

export type TpmtSignature =
  | { sigAlg: typeof TPM_ALG.RSASSA | typeof TPM_ALG.RSAPSS; hash: number; sig: Buffer }
  | { sigAlg: typeof TPM_ALG.ECDSA | typeof TPM_ALG.ECDAA | typeof TPM_ALG.SM2 | typeof TPM_ALG.ECSCHNORR; hash: number; r: Buffer; s: Buffer }
  | { sigAlg: typeof TPM_ALG.HMAC; hmac: TaggedHash }
  | { sigAlg: typeof TPM_ALG.NULL };

export function readSignature(r: Reader): TpmtSignature {
  const sigAlg = r.u16('TPMT_SIGNATURE.sigAlg');
  switch (sigAlg) {
    case TPM_ALG.RSASSA:
    case TPM_ALG.RSAPSS:
      return { sigAlg, hash: r.u16('TPMS_SIGNATURE_RSA.hash'), sig: r.tpm2b('TPMS_SIGNATURE_RSA.sig', MAX.RSA_KEY_BYTES) };
    case TPM_ALG.ECDSA:
    case TPM_ALG.ECDAA:
    case TPM_ALG.SM2:
    case TPM_ALG.ECSCHNORR: {
      const hash = r.u16('TPMS_SIGNATURE_ECC.hash');
      const sr = r.tpm2b('TPMS_SIGNATURE_ECC.signatureR', MAX.ECC_KEY_BYTES);
      const ss = r.tpm2b('TPMS_SIGNATURE_ECC.signatureS', MAX.ECC_KEY_BYTES);
      return { sigAlg, hash, r: sr, s: ss };
    }
    case TPM_ALG.HMAC:
      return { sigAlg, hmac: readHa(r) };
    case TPM_ALG.NULL:
      return { sigAlg };
    default:
      throw malformed(`TPMT_SIGNATURE.sigAlg 0x${sigAlg.toString(16)} is not a signature scheme`);
  }
}

export function writeSignature(w: Writer, s: TpmtSignature): void {
  w.u16(s.sigAlg);
  if (s.sigAlg === TPM_ALG.NULL) return;
  if (s.sigAlg === TPM_ALG.HMAC) return void writeHa(w, s.hmac);
  if ('sig' in s) w.u16(s.hash).tpm2b(s.sig);
  else w.u16(s.hash).tpm2b(s.r).tpm2b(s.s);
}

/** Parses a marshalled TPMT_SIGNATURE (tpm2-tools' "tss" signature format). */
export function parseSignature(bytes: Buffer): TpmtSignature {
  return unmarshal(bytes, 'TPMT_SIGNATURE', readSignature);
}
