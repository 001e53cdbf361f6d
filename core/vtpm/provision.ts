// First start of a vTPM: what swtpm_setup --pcr-banks sha256 --createek --create-ek-cert
// --lock-nvram does, but with the EK certificate issued by the owner guardian's CA:
//   1. PCR banks: SHA-256 only (TPM2_PCR_Allocate, then a TPM reset for it to take effect);
//   2. the EK from the TCG RSA 2048 template, made persistent at 0x81010001;
//   3. its certificate in NV 0x01C00002, defined in the platform hierarchy with swtpm_setup's
//      attributes (PLATFORMCREATE | PPWRITE | WRITEDEFINE | AUTHREAD | OWNERREAD | PPREAD | NO_DA)
//      and write-locked, so neither the guest's OS nor its owner can replace it;
//   4. a marker in the state folder (public facts only) that says it is done.
// The platform hierarchy is reachable here because its auth is empty until firmware sets one;
// provisioning runs before any guest does.
import { createHash, createPublicKey } from 'node:crypto';
import { existsSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ShieldError } from '../errors.ts';
import { EK_CERT_NV_INDEX, TPMA_NV, TPM_ALG, TPM_RH, type PcrSelection, type Tpm, command, passwordSession, publicKeyPem } from '../tpm/mod.ts';
import { type EkCaOwner, issueEkCertificate } from './ek-cert.ts';
import type { Vtpm } from './process.ts';
import { ctrlInit } from './socket.ts';

export const MARKER_FILE = 'shieldlab-vtpm.json';
export const EK_PERSISTENT_HANDLE = 0x81010001;
export const EK_CERT_NV_ATTRIBUTES = TPMA_NV.PLATFORMCREATE | TPMA_NV.PPWRITE | TPMA_NV.WRITEDEFINE | TPMA_NV.AUTHREAD | TPMA_NV.OWNERREAD | TPMA_NV.PPREAD | TPMA_NV.NO_DA;
const PCR_COUNT = 24;

// The three commands this needs that the client does not (yet) declare (TPM 2.0 Part 3 §22.5, §28.5, §31.12).
const PCR_Allocate = command<{ pcrAllocation: PcrSelection[] }, { allocationSuccess: boolean; maxPCR: number; sizeNeeded: number; sizeAvailable: number }>({
  name: 'PCR_Allocate',
  cc: 0x12b,
  authHandles: 1,
  handles: () => [TPM_RH.PLATFORM],
  params: (w, i) => {
    w.u32(i.pcrAllocation.length);
    for (const s of i.pcrAllocation) {
      const bits = Buffer.alloc(PCR_COUNT / 8);
      for (const p of s.pcrs) bits[p >> 3]! |= 1 << (p & 7);
      w.u16(s.hash).u8(bits.length).bytes(bits);
    }
  },
  response: (r) => ({ allocationSuccess: r.u8('allocationSuccess') !== 0, maxPCR: r.u32('maxPCR'), sizeNeeded: r.u32('sizeNeeded'), sizeAvailable: r.u32('sizeAvailable') }),
});

const EvictControl = command<{ auth: number; objectHandle: number; persistentHandle: number }, void>({
  name: 'EvictControl',
  cc: 0x120,
  authHandles: 1,
  handles: (i) => [i.auth, i.objectHandle],
  params: (w, i) => void w.u32(i.persistentHandle),
  response: () => {},
});

const NV_WriteLock = command<{ authHandle: number; nvIndex: number }, void>({
  name: 'NV_WriteLock',
  cc: 0x138,
  authHandles: 1,
  handles: (i) => [i.authHandle, i.nvIndex],
  response: () => {},
});

/** What the marker records: nothing secret. */
export interface VtpmMarker {
  format: 'shieldlab-vtpm/1';
  vmName: string;
  provisionedAt: string;
  ekHandle: number;
  ekCertIndex: number;
  /** SHA-256 of the EK's SubjectPublicKeyInfo (DER), hex. */
  ekPublicSha256: string;
  /** SHA-256 of the EK certificate (DER), hex. */
  ekCertSha256: string;
  caSubject: string;
  pcrBanks: string[];
}

export interface ProvisionOptions {
  /** The owner guardian: its signing key issues the EK certificate (see ek-cert.ts). */
  owner: EkCaOwner;
  vmName: string;
  now?: Date;
}

export interface ProvisionResult {
  /** false: the marker was there and the TPM was left alone. */
  provisioned: boolean;
  marker: VtpmMarker;
  /** Set when provisioned now. */
  ekPublicPem?: string;
  ekCertDer?: Buffer;
}

export function readMarker(stateDir: string): VtpmMarker | null {
  const file = join(stateDir, MARKER_FILE);
  if (!existsSync(file)) return null;
  try {
    const m = JSON.parse(readFileSync(file, 'utf8')) as VtpmMarker;
    if (m.format !== 'shieldlab-vtpm/1') throw new Error('format');
    return m;
  } catch {
    throw new ShieldError('tpm_malformed', `The vTPM marker ${file} is not readable.`, { details: { path: file } });
  }
}

function rcOf(err: unknown): number | undefined {
  return err instanceof ShieldError && err.code === 'tpm_error' ? (err.details?.rc as number | undefined) : undefined;
}

async function onlySha256(tpm: Tpm, vtpm: Vtpm): Promise<string[]> {
  const banks = await tpm.pcrBanks();
  const all = Array.from({ length: PCR_COUNT }, (_, i) => i);
  const wanted = (b: PcrSelection) => (b.hash === TPM_ALG.SHA256 ? all : []);
  const done = banks.every((b) => b.pcrs.length === wanted(b).length);
  if (!done) {
    const out = await tpm.execute(PCR_Allocate, { pcrAllocation: banks.map((b) => ({ hash: b.hash, pcrs: wanted(b) })) }, [passwordSession()]);
    if (!out.allocationSuccess) throw new ShieldError('tpm_error', 'The vTPM refused to allocate the SHA-256 PCR bank alone.', { details: { rc: 0, rcName: 'PCR_Allocate failed' } });
    // The allocation takes effect at the next TPM reset.
    await ctrlInit(vtpm.ctrlSocket);
    await tpm.startup();
  }
  const now = await tpm.pcrBanks();
  const active = now.filter((b) => b.pcrs.length > 0);
  if (active.length !== 1 || active[0]!.hash !== TPM_ALG.SHA256) throw new ShieldError('tpm_error', 'The vTPM kept PCR banks other than SHA-256.', { details: { rc: 0, rcName: 'PCR_Allocate ineffective' } });
  return ['sha256'];
}

/**
 * Provisions the vTPM on its first start (needs a vTPM started with `dataSocket: true`); a no-op
 * once its marker exists. On failure part-way it can simply be run again: what it finds it replaces.
 */
export async function provisionVtpm(vtpm: Vtpm, opts: ProvisionOptions): Promise<ProvisionResult> {
  const existing = readMarker(vtpm.stateDir);
  if (existing) return { provisioned: false, marker: existing };
  const tpm = vtpm.client();
  try {
    await tpm.startup();
    const pcrBanks = await onlySha256(tpm, vtpm);

    // The EK, persistent where swtpm_setup and tpm2-tools expect it.
    if ((await tpm.handles(0x81000000)).includes(EK_PERSISTENT_HANDLE)) {
      await tpm.execute(EvictControl, { auth: TPM_RH.OWNER, objectHandle: EK_PERSISTENT_HANDLE, persistentHandle: EK_PERSISTENT_HANDLE }, [passwordSession()]);
    }
    const ekPublicPem = await tpm.withTransient(tpm.createEk('rsa'), async (ek) => {
      await tpm.execute(EvictControl, { auth: TPM_RH.OWNER, objectHandle: ek.handle, persistentHandle: EK_PERSISTENT_HANDLE }, [passwordSession()]);
      return publicKeyPem(ek.outPublic.publicArea);
    });

    const ekCertDer = issueEkCertificate(opts.owner, { ekPublic: ekPublicPem, vmName: opts.vmName, now: opts.now });
    const index = EK_CERT_NV_INDEX.RSA2048;
    try {
      await tpm.nvReadPublic(index);
      await tpm.nvUndefineSpace(index, { authHandle: TPM_RH.PLATFORM });
    } catch (err) {
      if (rcOf(err) === undefined) throw err; // absent: as it should be
    }
    await tpm.nvDefineSpace({ nvIndex: index, nameAlg: TPM_ALG.SHA256, attributes: EK_CERT_NV_ATTRIBUTES, authPolicy: Buffer.alloc(0), dataSize: ekCertDer.length }, { authHandle: TPM_RH.PLATFORM });
    await tpm.nvWrite(index, ekCertDer, { authHandle: TPM_RH.PLATFORM });
    await tpm.execute(NV_WriteLock, { authHandle: TPM_RH.PLATFORM, nvIndex: index }, [passwordSession()]);

    const marker: VtpmMarker = {
      format: 'shieldlab-vtpm/1',
      vmName: opts.vmName,
      provisionedAt: (opts.now ?? new Date()).toISOString(),
      ekHandle: EK_PERSISTENT_HANDLE,
      ekCertIndex: index,
      ekPublicSha256: createHash('sha256').update(createPublicKey(ekPublicPem).export({ type: 'spki', format: 'der' })).digest('hex'),
      ekCertSha256: createHash('sha256').update(ekCertDer).digest('hex'),
      caSubject: `ShieldLab vTPM EK CA (${opts.owner.name})`,
      pcrBanks,
    };
    const file = join(vtpm.stateDir, MARKER_FILE);
    writeFileSync(`${file}.tmp`, `${JSON.stringify(marker, null, 2)}\n`, { mode: 0o600 });
    renameSync(`${file}.tmp`, file);
    return { provisioned: true, marker, ekPublicPem, ekCertDer };
  } finally {
    await tpm.close();
  }
}
