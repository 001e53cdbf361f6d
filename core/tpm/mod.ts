// core/tpm: a TPM 2.0 client (commands over device, swtpm or mssim transports) and the
// verifier-side helpers over TPM structures (names, quotes, signatures, MakeCredential).
export { Tpm, type Auth, type LoadedObject, type OpenOptions, type PcrValue } from './tpm.ts';
export { type TpmTransport, type TpmAddress, type TransportOptions, parseAddress, openTransport, DeviceTransport, SwtpmTransport, MssimTransport, MAX_RESPONSE_BYTES, DEFAULT_TIMEOUT_MS } from './transport.ts';
export { type AuthSession, type TpmCommand, command, encodeCommand, decodeResponse, passwordSession, policySession } from './codec.ts';
export * as commands from './commands.ts';
export type { CapabilityData, SensitiveCreate } from './commands.ts';
export { TPM_ALG, TPM_CAP, TPM_CC, TPM_ECC, TPM_HT, TPM_PT, TPM_RH, TPM_SE, TPM_ST, TPM_SU, TPMA_NV, TPMA_OBJECT, TPMA_SESSION, TPM_GENERATED_VALUE, EK_CERT_NV_INDEX, algName, ccName, digestSize } from './constants.ts';
export { TPM_RC, decodeRc, type DecodedRc } from './rc.ts';
export { Reader, Writer, marshal, unmarshal } from './marshal.ts';
export {
  type EccPublic,
  type KeyedHashPublic,
  type NvPublic,
  type PcrSelection,
  type PublicArea,
  type RsaPublic,
  type Scheme,
  type SymCipherPublic,
  type SymDef,
  type TaggedHash,
  type Ticket,
  type TpmsContext,
  type TpmtPublic,
  marshalPublic,
  parsePublic,
  readContext,
  writeContext,
} from './structures.ts';
export { type ClockInfo, type QuoteInfo, type TpmsAttest, type TpmtSignature, parseAttest, parseSignature, writeSignature } from './attest.ts';
export { objectName, nvName, publicKeyObject, publicKeyPem, verifySignature, tpmHash } from './keys.ts';
export { type Credential, makeCredential, kdfa, kdfe, encodeCredentialFile, decodeCredentialFile } from './credential.ts';
export { EK_AUTH_POLICY, ekTemplate, srkTemplate, akTemplate } from './templates.ts';
