// The TPM 2.0 commands this client sends, one declaration each, named and laid out as in
// TPM 2.0 Part 3 (handles, then parameters; response handle, then response parameters).
import { type TpmsAttest, type TpmtSignature, parseAttest, readSignature } from './attest.ts';
import { TPM_ALG, TPM_CAP, TPM_CC } from './constants.ts';
import { command } from './codec.ts';
import { type Reader, type Writer, malformed } from './marshal.ts';
import {
  MAX,
  type NvPublic,
  type PcrSelection,
  type PublicArea,
  type Scheme,
  type SymDef,
  type TaggedHash,
  type Ticket,
  type TpmsContext,
  type TpmtPublic,
  readContext,
  readDigestList,
  readNvPublic,
  readPcrSelections,
  readPublic2b,
  readTicket,
  writeContext,
  writeHa,
  writePcrSelections,
  writePublic,
  writeScheme,
  writeNvPublic,
  writeSymDef,
} from './structures.ts';

const empty = Buffer.alloc(0);

export const Startup = command<{ startupType: number }, void>({
  name: 'Startup',
  cc: TPM_CC.Startup,
  params: (w, i) => void w.u16(i.startupType),
  response: () => {},
});

export const Shutdown = command<{ shutdownType: number }, void>({
  name: 'Shutdown',
  cc: TPM_CC.Shutdown,
  params: (w, i) => void w.u16(i.shutdownType),
  response: () => {},
});

// ---- GetCapability ------------------------------------------------------------------------------

export type CapabilityData =
  | { capability: typeof TPM_CAP.ALGS; algs: { alg: number; attributes: number }[] }
  | { capability: typeof TPM_CAP.HANDLES; handles: number[] }
  | { capability: typeof TPM_CAP.COMMANDS; commands: number[] }
  | { capability: typeof TPM_CAP.PCRS; pcrs: PcrSelection[] }
  | { capability: typeof TPM_CAP.TPM_PROPERTIES; properties: { property: number; value: number }[] }
  | { capability: typeof TPM_CAP.ECC_CURVES; curves: number[] };

/** A generous bound on capability lists: one response buffer's worth. */
const MAX_CAP_ENTRIES = 1024;

function readCapabilityData(r: Reader): CapabilityData {
  const capability = r.u32('TPMS_CAPABILITY_DATA.capability');
  const list = <T>(what: string, size: number, one: () => T): T[] => {
    const n = r.count(what, MAX_CAP_ENTRIES, size);
    return Array.from({ length: n }, one);
  };
  switch (capability) {
    case TPM_CAP.ALGS:
      return { capability, algs: list('TPML_ALG_PROPERTY', 6, () => ({ alg: r.u16(), attributes: r.u32() })) };
    case TPM_CAP.HANDLES:
      return { capability, handles: list('TPML_HANDLE', 4, () => r.u32()) };
    case TPM_CAP.COMMANDS:
      return { capability, commands: list('TPML_CCA', 4, () => r.u32()) };
    case TPM_CAP.PCRS:
      return { capability, pcrs: readPcrSelections(r) };
    case TPM_CAP.TPM_PROPERTIES:
      return { capability, properties: list('TPML_TAGGED_TPM_PROPERTY', 8, () => ({ property: r.u32(), value: r.u32() })) };
    case TPM_CAP.ECC_CURVES:
      return { capability, curves: list('TPML_ECC_CURVE', 2, () => r.u16()) };
    default:
      throw malformed(`TPMS_CAPABILITY_DATA.capability 0x${capability.toString(16)} is not one we asked for`);
  }
}

export const GetCapability = command<{ capability: number; property: number; propertyCount: number }, { moreData: boolean; capabilityData: CapabilityData }>({
  name: 'GetCapability',
  cc: TPM_CC.GetCapability,
  params: (w, i) => void w.u32(i.capability).u32(i.property).u32(i.propertyCount),
  response: (r) => {
    const more = r.u8('moreData');
    if (more > 1) throw malformed(`moreData is ${more}`);
    return { moreData: more === 1, capabilityData: readCapabilityData(r) };
  },
});

export const GetRandom = command<{ bytesRequested: number }, Buffer>({
  name: 'GetRandom',
  cc: TPM_CC.GetRandom,
  params: (w, i) => void w.u16(i.bytesRequested),
  response: (r) => r.tpm2b('randomBytes', MAX.DIGEST),
});

// ---- PCRs ---------------------------------------------------------------------------------------

export const PCR_Read = command<{ pcrSelectionIn: PcrSelection[] }, { pcrUpdateCounter: number; pcrSelectionOut: PcrSelection[]; pcrValues: Buffer[] }>({
  name: 'PCR_Read',
  cc: TPM_CC.PCR_Read,
  params: (w, i) => writePcrSelections(w, i.pcrSelectionIn),
  response: (r) => ({ pcrUpdateCounter: r.u32('pcrUpdateCounter'), pcrSelectionOut: readPcrSelections(r), pcrValues: readDigestList(r) }),
});

export const PCR_Extend = command<{ pcrHandle: number; digests: TaggedHash[] }, void>({
  name: 'PCR_Extend',
  cc: TPM_CC.PCR_Extend,
  authHandles: 1,
  handles: (i) => [i.pcrHandle],
  params: (w, i) => {
    w.u32(i.digests.length);
    for (const d of i.digests) writeHa(w, d);
  },
  response: () => {},
});

// ---- objects ------------------------------------------------------------------------------------

export interface SensitiveCreate {
  userAuth?: Buffer;
  data?: Buffer;
}

interface CreateIn {
  inSensitive?: SensitiveCreate;
  inPublic: TpmtPublic;
  outsideInfo?: Buffer;
  creationPCR?: PcrSelection[];
}

function writeCreateParams(w: Writer, i: CreateIn): void {
  w.sized((s) => s.tpm2b(i.inSensitive?.userAuth ?? empty).tpm2b(i.inSensitive?.data ?? empty));
  w.sized((p) => writePublic(p, i.inPublic));
  w.tpm2b(i.outsideInfo ?? empty);
  writePcrSelections(w, i.creationPCR ?? []);
}

export interface CreationOut {
  outPublic: PublicArea;
  /** TPM2B_CREATION_DATA contents, unparsed: kept for TPM2_CertifyCreation. */
  creationData: Buffer;
  creationHash: Buffer;
  creationTicket: Ticket;
}

function readCreation(r: Reader): CreationOut {
  return {
    outPublic: readPublic2b(r),
    creationData: r.tpm2b('TPM2B_CREATION_DATA', MAX.PUBLIC),
    creationHash: r.tpm2b('creationHash', MAX.DIGEST),
    creationTicket: readTicket(r, 'TPMT_TK_CREATION'),
  };
}

export const CreatePrimary = command<CreateIn & { primaryHandle: number }, CreationOut & { objectHandle: number; name: Buffer }>({
  name: 'CreatePrimary',
  cc: TPM_CC.CreatePrimary,
  authHandles: 1,
  responseHandle: true,
  handles: (i) => [i.primaryHandle],
  params: writeCreateParams,
  response: (r, objectHandle) => ({ objectHandle, ...readCreation(r), name: r.tpm2b('name', MAX.NAME) }),
});

export const Create = command<CreateIn & { parentHandle: number }, CreationOut & { outPrivate: Buffer }>({
  name: 'Create',
  cc: TPM_CC.Create,
  authHandles: 1,
  handles: (i) => [i.parentHandle],
  params: writeCreateParams,
  response: (r) => {
    const outPrivate = r.tpm2b('TPM2B_PRIVATE', MAX.PRIVATE);
    return { outPrivate, ...readCreation(r) };
  },
});

export const Load = command<{ parentHandle: number; inPrivate: Buffer; inPublic: Buffer }, { objectHandle: number; name: Buffer }>({
  name: 'Load',
  cc: TPM_CC.Load,
  authHandles: 1,
  responseHandle: true,
  handles: (i) => [i.parentHandle],
  // inPublic goes back exactly as Create returned it: the Name depends on those bytes.
  params: (w, i) => void w.tpm2b(i.inPrivate).tpm2b(i.inPublic),
  response: (r, objectHandle) => ({ objectHandle, name: r.tpm2b('name', MAX.NAME) }),
});

export const ReadPublic = command<{ objectHandle: number }, { outPublic: PublicArea; name: Buffer; qualifiedName: Buffer }>({
  name: 'ReadPublic',
  cc: TPM_CC.ReadPublic,
  handles: (i) => [i.objectHandle],
  response: (r) => ({ outPublic: readPublic2b(r), name: r.tpm2b('name', MAX.NAME), qualifiedName: r.tpm2b('qualifiedName', MAX.NAME) }),
});

// ---- attestation --------------------------------------------------------------------------------

export const Quote = command<{ signHandle: number; qualifyingData: Buffer; inScheme?: Scheme; pcrSelect: PcrSelection[] }, { quoted: Buffer; attest: TpmsAttest; signature: TpmtSignature }>({
  name: 'Quote',
  cc: TPM_CC.Quote,
  authHandles: 1,
  handles: (i) => [i.signHandle],
  params: (w, i) => {
    w.tpm2b(i.qualifyingData);
    writeScheme(w, i.inScheme ?? { scheme: TPM_ALG.NULL });
    writePcrSelections(w, i.pcrSelect);
  },
  response: (r) => {
    const quoted = r.tpm2b('TPM2B_ATTEST', MAX.ATTEST);
    return { quoted, attest: parseAttest(quoted), signature: readSignature(r) };
  },
});

export const ActivateCredential = command<{ activateHandle: number; keyHandle: number; credentialBlob: Buffer; secret: Buffer }, Buffer>({
  name: 'ActivateCredential',
  cc: TPM_CC.ActivateCredential,
  authHandles: 2,
  handles: (i) => [i.activateHandle, i.keyHandle],
  params: (w, i) => void w.tpm2b(i.credentialBlob).tpm2b(i.secret),
  response: (r) => r.tpm2b('certInfo', MAX.DIGEST),
});

// ---- NV -----------------------------------------------------------------------------------------

export const NV_ReadPublic = command<{ nvIndex: number }, { nvPublic: NvPublic; nvName: Buffer }>({
  name: 'NV_ReadPublic',
  cc: TPM_CC.NV_ReadPublic,
  handles: (i) => [i.nvIndex],
  response: (r) => ({ nvPublic: r.sized('TPM2B_NV_PUBLIC', readNvPublic)!, nvName: r.tpm2b('nvName', MAX.NAME) }),
});

export const NV_DefineSpace = command<{ authHandle: number; auth?: Buffer; publicInfo: NvPublic }, void>({
  name: 'NV_DefineSpace',
  cc: TPM_CC.NV_DefineSpace,
  authHandles: 1,
  handles: (i) => [i.authHandle],
  params: (w, i) => void w.tpm2b(i.auth ?? empty).sized((p) => writeNvPublic(p, i.publicInfo)),
  response: () => {},
});

export const NV_UndefineSpace = command<{ authHandle: number; nvIndex: number }, void>({
  name: 'NV_UndefineSpace',
  cc: TPM_CC.NV_UndefineSpace,
  authHandles: 1,
  handles: (i) => [i.authHandle, i.nvIndex],
  response: () => {},
});

export const NV_Write = command<{ authHandle: number; nvIndex: number; data: Buffer; offset: number }, void>({
  name: 'NV_Write',
  cc: TPM_CC.NV_Write,
  authHandles: 1,
  handles: (i) => [i.authHandle, i.nvIndex],
  params: (w, i) => void w.tpm2b(i.data).u16(i.offset),
  response: () => {},
});

export const NV_Read = command<{ authHandle: number; nvIndex: number; size: number; offset: number }, Buffer>({
  name: 'NV_Read',
  cc: TPM_CC.NV_Read,
  authHandles: 1,
  handles: (i) => [i.authHandle, i.nvIndex],
  params: (w, i) => void w.u16(i.size).u16(i.offset),
  response: (r) => r.tpm2b('TPM2B_MAX_NV_BUFFER', MAX.NV_BUFFER),
});

// ---- sessions -----------------------------------------------------------------------------------

export const StartAuthSession = command<
  { tpmKey: number; bind: number; nonceCaller: Buffer; encryptedSalt?: Buffer; sessionType: number; symmetric: SymDef; authHash: number },
  { sessionHandle: number; nonceTPM: Buffer }
>({
  name: 'StartAuthSession',
  cc: TPM_CC.StartAuthSession,
  responseHandle: true,
  handles: (i) => [i.tpmKey, i.bind],
  params: (w, i) => {
    w.tpm2b(i.nonceCaller).tpm2b(i.encryptedSalt ?? empty).u8(i.sessionType);
    writeSymDef(w, i.symmetric);
    w.u16(i.authHash);
  },
  response: (r, sessionHandle) => ({ sessionHandle, nonceTPM: r.tpm2b('nonceTPM', MAX.DIGEST) }),
});

export const PolicySecret = command<
  { authHandle: number; policySession: number; nonceTPM?: Buffer; cpHashA?: Buffer; policyRef?: Buffer; expiration?: number },
  { timeout: Buffer; policyTicket: Ticket }
>({
  name: 'PolicySecret',
  cc: TPM_CC.PolicySecret,
  authHandles: 1,
  handles: (i) => [i.authHandle, i.policySession],
  params: (w, i) => void w.tpm2b(i.nonceTPM ?? empty).tpm2b(i.cpHashA ?? empty).tpm2b(i.policyRef ?? empty).i32(i.expiration ?? 0),
  response: (r) => ({ timeout: r.tpm2b('timeout', MAX.DIGEST), policyTicket: readTicket(r, 'TPMT_TK_AUTH') }),
});

export const PolicyGetDigest = command<{ policySession: number }, Buffer>({
  name: 'PolicyGetDigest',
  cc: TPM_CC.PolicyGetDigest,
  handles: (i) => [i.policySession],
  response: (r) => r.tpm2b('policyDigest', MAX.DIGEST),
});

// ---- contexts -----------------------------------------------------------------------------------

export const FlushContext = command<{ flushHandle: number }, void>({
  name: 'FlushContext',
  cc: TPM_CC.FlushContext,
  // The handle to flush is a parameter, not in the handle area (Part 3 §28.4).
  params: (w, i) => void w.u32(i.flushHandle),
  response: () => {},
});

export const ContextSave = command<{ saveHandle: number }, TpmsContext>({
  name: 'ContextSave',
  cc: TPM_CC.ContextSave,
  handles: (i) => [i.saveHandle],
  response: readContext,
});

export const ContextLoad = command<{ context: TpmsContext }, number>({
  name: 'ContextLoad',
  cc: TPM_CC.ContextLoad,
  responseHandle: true,
  params: (w, i) => writeContext(w, i.context),
  response: (_r, loadedHandle) => loadedHandle,
});
