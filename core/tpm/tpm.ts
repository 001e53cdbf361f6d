// The client: a Tpm over one transport, one method per command, plus the few compound steps
// attestation needs (EK policy session, credential activation, flushing what we load).
// libtpms keeps only ~3 transient objects, so every handle this class returns is the caller's to
// flush: use withTransient() or a finally.
import { randomBytes } from 'node:crypto';
import { ShieldError } from '../errors.ts';
import { type AuthSession, type TpmCommand, decodeResponse, encodeCommand, passwordSession, policySession } from './codec.ts';
import * as cmd from './commands.ts';
import type { CapabilityData } from './commands.ts';
import { TPM_ALG, TPM_CAP, TPM_PT, TPM_RH, TPM_SE, TPM_SU } from './constants.ts';
import { TPM_RC } from './rc.ts';
import type { TpmsAttest, TpmtSignature } from './attest.ts';
import type { NvPublic, PcrSelection, PublicArea, Scheme, TaggedHash, Ticket, TpmsContext, TpmtPublic } from './structures.ts';
import { akTemplate, ekTemplate } from './templates.ts';
import { MssimTransport, SwtpmTransport, type TpmTransport, type TransportOptions, openTransport } from './transport.ts';

export interface OpenOptions extends TransportOptions {
  /**
   * Simulators only: power the TPM on first (swtpm CMD_INIT; mssim POWER_ON + NV_ON), then
   * TPM2_Startup(CLEAR). For an swtpm started without `--flags startup-clear`.
   */
  powerUp?: boolean;
  /** Send TPM2_Startup(CLEAR); a TPM that is already started is fine. */
  startup?: boolean;
}

export type Auth = Buffer | string;

export interface LoadedObject {
  handle: number;
  name: Buffer;
}

export interface PcrValue {
  hash: number;
  pcr: number;
  digest: Buffer;
}

const RETRYABLE = new Set<number>([TPM_RC.RETRY, TPM_RC.YIELDED, TPM_RC.TESTING]);

function rcOf(err: unknown): number | undefined {
  return err instanceof ShieldError && err.code === 'tpm_error' ? (err.details?.rc as number | undefined) : undefined;
}

export class Tpm {
  readonly transport: TpmTransport;
  private nvBufferMax: number | undefined;

  constructor(transport: TpmTransport) {
    this.transport = transport;
  }

  static async open(address: string, opts: OpenOptions = {}): Promise<Tpm> {
    const tpm = new Tpm(await openTransport(address, opts));
    try {
      if (opts.powerUp) {
        if (tpm.transport instanceof SwtpmTransport) await tpm.transport.init();
        else if (tpm.transport instanceof MssimTransport) await tpm.transport.powerOn();
        else throw new ShieldError('invalid_argument', 'powerUp applies to simulators (swtpm:, mssim:), not to a TPM device.');
      }
      if (opts.powerUp || opts.startup) await tpm.startup();
      return tpm;
    } catch (err) {
      await tpm.close();
      throw err;
    }
  }

  close(): Promise<void> {
    return this.transport.close();
  }

  /** Sends one command; TPM_RC_RETRY / YIELDED / TESTING are retried a few times, as ESAPI does. */
  async execute<In, Out>(command: TpmCommand<In, Out>, input: In, sessions: readonly AuthSession[] = []): Promise<Out> {
    const bytes = encodeCommand(command, input, sessions);
    for (let attempt = 0; ; attempt++) {
      const response = await this.transport.send(bytes);
      try {
        return decodeResponse(command, response, sessions.length);
      } catch (err) {
        const rc = rcOf(err);
        if (attempt < 5 && rc !== undefined && RETRYABLE.has(rc)) {
          await new Promise((r) => setTimeout(r, 10 * (attempt + 1)));
          continue;
        }
        throw err;
      }
    }
  }

  // ---- start-up and capabilities ----------------------------------------------------------------

  /** TPM2_Startup; TPM_RC_INITIALIZE (already started) counts as success. */
  async startup(startupType: number = TPM_SU.CLEAR): Promise<void> {
    try {
      await this.execute(cmd.Startup, { startupType });
    } catch (err) {
      if (rcOf(err) !== TPM_RC.INITIALIZE) throw err;
    }
  }

  shutdown(shutdownType: number = TPM_SU.CLEAR): Promise<void> {
    return this.execute(cmd.Shutdown, { shutdownType });
  }

  async getCapability(capability: number, property: number, propertyCount: number): Promise<{ moreData: boolean; capabilityData: CapabilityData }> {
    const out = await this.execute(cmd.GetCapability, { capability, property, propertyCount });
    if (out.capabilityData.capability !== capability) throw new ShieldError('tpm_malformed', `Malformed TPM data: asked for capability ${capability}, got ${out.capabilityData.capability}.`);
    return out;
  }

  /** TPM properties from `first` on (TPM_PT_*), following moreData. */
  async properties(first: number = TPM_PT.FAMILY_INDICATOR, count = 64): Promise<Map<number, number>> {
    const out = new Map<number, number>();
    let next = first;
    for (let round = 0; round < 64; round++) {
      const { moreData, capabilityData } = await this.getCapability(TPM_CAP.TPM_PROPERTIES, next, count);
      if (capabilityData.capability !== TPM_CAP.TPM_PROPERTIES) break;
      for (const p of capabilityData.properties) out.set(p.property, p.value);
      const last = capabilityData.properties.at(-1);
      if (!moreData || !last || out.size >= count) break;
      next = last.property + 1;
    }
    return out;
  }

  async property(pt: number): Promise<number | undefined> {
    const { capabilityData } = await this.getCapability(TPM_CAP.TPM_PROPERTIES, pt, 1);
    if (capabilityData.capability !== TPM_CAP.TPM_PROPERTIES) return undefined;
    return capabilityData.properties.find((p) => p.property === pt)?.value;
  }

  /** TPM_PT_MANUFACTURER as its ASCII letters, padding dropped (e.g. "IBM" for libtpms, "MSFT", "INTC"). */
  async manufacturer(): Promise<string> {
    const v = await this.property(TPM_PT.MANUFACTURER);
    if (v === undefined) throw new ShieldError('tpm_malformed', 'Malformed TPM data: no TPM_PT_MANUFACTURER.');
    const b = Buffer.alloc(4);
    b.writeUInt32BE(v);
    return b.toString('latin1').replace(/[\0 ]+$/, '');
  }

  /** The PCR banks and which PCRs each has allocated (TPM_CAP_PCRS). */
  async pcrBanks(): Promise<PcrSelection[]> {
    const { capabilityData } = await this.getCapability(TPM_CAP.PCRS, 0, 1);
    return capabilityData.capability === TPM_CAP.PCRS ? capabilityData.pcrs : [];
  }

  /** Handles of one type (e.g. 0x80000000 transient objects) currently in the TPM. */
  async handles(first: number, max = 256): Promise<number[]> {
    const { capabilityData } = await this.getCapability(TPM_CAP.HANDLES, first, max);
    if (capabilityData.capability !== TPM_CAP.HANDLES) return [];
    // The TPM lists from `first` on, across types: keep those of the type asked for.
    return capabilityData.handles.filter((h) => h >>> 24 === first >>> 24);
  }

  /** `bytes` random bytes, asked for in pieces the TPM can answer (one digest each). */
  async getRandom(bytes: number): Promise<Buffer> {
    const parts: Buffer[] = [];
    let have = 0;
    while (have < bytes) {
      const part = await this.execute(cmd.GetRandom, { bytesRequested: Math.min(64, bytes - have) });
      if (part.length === 0) throw new ShieldError('tpm_malformed', 'Malformed TPM data: GetRandom returned no bytes.');
      parts.push(part);
      have += part.length;
    }
    return Buffer.concat(parts).subarray(0, bytes);
  }

  // ---- PCRs -------------------------------------------------------------------------------------

  /**
   * Reads the selected PCRs. A TPM returns at most 8 digests per TPM2_PCR_Read, so this asks
   * again for what is left; if a PCR changes in between (pcrUpdateCounter moves) it starts over.
   */
  async pcrRead(selection: PcrSelection[]): Promise<{ pcrUpdateCounter: number; values: PcrValue[] }> {
    for (let attempt = 0; attempt < 5; attempt++) {
      const values: PcrValue[] = [];
      let left = selection.map((s) => ({ hash: s.hash, pcrs: [...new Set(s.pcrs)].sort((a, b) => a - b) })).filter((s) => s.pcrs.length > 0);
      let counter: number | undefined;
      let changed = false;
      while (left.length > 0) {
        const out = await this.execute(cmd.PCR_Read, { pcrSelectionIn: left });
        if (counter !== undefined && out.pcrUpdateCounter !== counter) {
          changed = true;
          break;
        }
        counter = out.pcrUpdateCounter;
        const got = out.pcrSelectionOut.flatMap((s) => s.pcrs.map((pcr) => ({ hash: s.hash, pcr })));
        if (got.length !== out.pcrValues.length) throw new ShieldError('tpm_malformed', `Malformed TPM data: PCR_Read selected ${got.length} PCRs but returned ${out.pcrValues.length} values.`);
        if (got.length === 0) break; // what is left is not allocated
        got.forEach((g, i) => values.push({ ...g, digest: out.pcrValues[i]! }));
        const next = left.map((s) => ({ hash: s.hash, pcrs: s.pcrs.filter((p) => !got.some((g) => g.hash === s.hash && g.pcr === p)) })).filter((s) => s.pcrs.length > 0);
        if (next.reduce((n, s) => n + s.pcrs.length, 0) >= left.reduce((n, s) => n + s.pcrs.length, 0)) {
          throw new ShieldError('tpm_malformed', 'Malformed TPM data: PCR_Read returned PCRs that were not asked for.');
        }
        left = next;
      }
      if (!changed) return { pcrUpdateCounter: counter ?? 0, values };
    }
    throw new ShieldError('tpm_error', 'The PCRs kept changing while they were read.', { details: { rc: 0, rcName: 'PCR_CHANGED' } });
  }

  pcrExtend(pcr: number, digests: TaggedHash[], auth: Auth = ''): Promise<void> {
    return this.execute(cmd.PCR_Extend, { pcrHandle: pcr, digests }, [passwordSession(auth)]);
  }

  // ---- objects ----------------------------------------------------------------------------------

  /** TPM2_CreatePrimary; the handle is the caller's to flush. */
  async createPrimary(
    hierarchy: number,
    template: TpmtPublic,
    opts: { hierarchyAuth?: Auth; userAuth?: Buffer; outsideInfo?: Buffer; creationPCR?: PcrSelection[] } = {},
  ): Promise<LoadedObject & { outPublic: PublicArea }> {
    const out = await this.execute(
      cmd.CreatePrimary,
      { primaryHandle: hierarchy, inPublic: template, inSensitive: { userAuth: opts.userAuth }, outsideInfo: opts.outsideInfo, creationPCR: opts.creationPCR },
      [passwordSession(opts.hierarchyAuth)],
    );
    return { handle: out.objectHandle, name: out.name, outPublic: out.outPublic };
  }

  /** The TCG EK (RSA 2048 by default) in the endorsement hierarchy; flush it when done. */
  createEk(alg: 'rsa' | 'ecc' = 'rsa', endorsementAuth: Auth = ''): Promise<LoadedObject & { outPublic: PublicArea }> {
    return this.createPrimary(TPM_RH.ENDORSEMENT, ekTemplate(alg), { hierarchyAuth: endorsementAuth });
  }

  /** TPM2_Create under a loaded parent that takes a password (e.g. an SRK). */
  async create(parent: number, template: TpmtPublic, opts: { parentAuth?: Auth; userAuth?: Buffer; data?: Buffer } = {}): Promise<{ outPrivate: Buffer; outPublic: PublicArea }> {
    const out = await this.execute(cmd.Create, { parentHandle: parent, inPublic: template, inSensitive: { userAuth: opts.userAuth, data: opts.data } }, [passwordSession(opts.parentAuth)]);
    return { outPrivate: out.outPrivate, outPublic: out.outPublic };
  }

  /** An AK (restricted signing key) under `parent`; load it with load(). */
  createAk(parent: number, alg: 'rsa' | 'ecc' = 'rsa', opts: { parentAuth?: Auth; userAuth?: Buffer } = {}): Promise<{ outPrivate: Buffer; outPublic: PublicArea }> {
    return this.create(parent, akTemplate(alg), opts);
  }

  /** TPM2_Load; the handle is the caller's to flush. */
  async load(parent: number, key: { outPrivate: Buffer; outPublic: PublicArea }, parentAuth: Auth = ''): Promise<LoadedObject> {
    const out = await this.execute(cmd.Load, { parentHandle: parent, inPrivate: key.outPrivate, inPublic: key.outPublic.bytes }, [passwordSession(parentAuth)]);
    return { handle: out.objectHandle, name: out.name };
  }

  async readPublic(handle: number): Promise<{ outPublic: PublicArea; name: Buffer; qualifiedName: Buffer }> {
    return this.execute(cmd.ReadPublic, { objectHandle: handle });
  }

  /** TPM2_Quote over `pcrs` with `nonce` as qualifyingData, signed with the key's own scheme by default. */
  quote(key: number, opts: { nonce: Buffer; pcrs: PcrSelection[]; keyAuth?: Auth; scheme?: Scheme }): Promise<{ quoted: Buffer; attest: TpmsAttest; signature: TpmtSignature }> {
    return this.execute(cmd.Quote, { signHandle: key, qualifyingData: opts.nonce, inScheme: opts.scheme, pcrSelect: opts.pcrs }, [passwordSession(opts.keyAuth)]);
  }

  // ---- NV ---------------------------------------------------------------------------------------

  nvReadPublic(index: number): Promise<{ nvPublic: NvPublic; nvName: Buffer }> {
    return this.execute(cmd.NV_ReadPublic, { nvIndex: index });
  }

  /**
   * Reads an NV index (all of it by default), in pieces of TPM_PT_NV_BUFFER_MAX. authHandle is
   * the index itself (AUTHREAD) unless given, e.g. TPM_RH_OWNER for an OWNERREAD index.
   */
  async nvRead(index: number, opts: { authHandle?: number; auth?: Auth; offset?: number; size?: number } = {}): Promise<Buffer> {
    const offset = opts.offset ?? 0;
    const size = opts.size ?? (await this.nvReadPublic(index)).nvPublic.dataSize - offset;
    this.nvBufferMax ??= (await this.property(TPM_PT.NV_BUFFER_MAX)) || 512;
    const parts: Buffer[] = [];
    for (let done = 0; done < size; ) {
      const want = Math.min(this.nvBufferMax, size - done);
      const part = await this.execute(cmd.NV_Read, { authHandle: opts.authHandle ?? index, nvIndex: index, size: want, offset: offset + done }, [passwordSession(opts.auth)]);
      if (part.length !== want) throw new ShieldError('tpm_malformed', `Malformed TPM data: NV_Read returned ${part.length} bytes for ${want}.`);
      parts.push(part);
      done += want;
    }
    return Buffer.concat(parts);
  }

  /** TPM2_NV_DefineSpace in the owner hierarchy by default; name, size and attributes in `publicInfo`. */
  nvDefineSpace(publicInfo: NvPublic, opts: { authHandle?: number; hierarchyAuth?: Auth; indexAuth?: Buffer } = {}): Promise<void> {
    return this.execute(cmd.NV_DefineSpace, { authHandle: opts.authHandle ?? TPM_RH.OWNER, auth: opts.indexAuth, publicInfo }, [passwordSession(opts.hierarchyAuth)]);
  }

  nvUndefineSpace(index: number, opts: { authHandle?: number; hierarchyAuth?: Auth } = {}): Promise<void> {
    return this.execute(cmd.NV_UndefineSpace, { authHandle: opts.authHandle ?? TPM_RH.OWNER, nvIndex: index }, [passwordSession(opts.hierarchyAuth)]);
  }

  /** Writes `data` at `offset`, in pieces of TPM_PT_NV_BUFFER_MAX. */
  async nvWrite(index: number, data: Buffer, opts: { authHandle?: number; auth?: Auth; offset?: number } = {}): Promise<void> {
    this.nvBufferMax ??= (await this.property(TPM_PT.NV_BUFFER_MAX)) || 512;
    for (let done = 0; done < data.length; done += this.nvBufferMax) {
      const part = data.subarray(done, done + this.nvBufferMax);
      await this.execute(cmd.NV_Write, { authHandle: opts.authHandle ?? index, nvIndex: index, data: part, offset: (opts.offset ?? 0) + done }, [passwordSession(opts.auth)]);
    }
  }

  // ---- sessions ---------------------------------------------------------------------------------

  /** An unsalted, unbound session (policy by default); flush it when done. */
  async startAuthSession(sessionType: number = TPM_SE.POLICY, authHash: number = TPM_ALG.SHA256): Promise<{ handle: number; nonceTPM: Buffer }> {
    const out = await this.execute(cmd.StartAuthSession, {
      tpmKey: TPM_RH.NULL,
      bind: TPM_RH.NULL,
      nonceCaller: randomBytes(32),
      sessionType,
      symmetric: { algorithm: TPM_ALG.NULL },
      authHash,
    });
    return { handle: out.sessionHandle, nonceTPM: out.nonceTPM };
  }

  policySecret(authHandle: number, session: number, auth: Auth = ''): Promise<{ timeout: Buffer; policyTicket: Ticket }> {
    return this.execute(cmd.PolicySecret, { authHandle, policySession: session }, [passwordSession(auth)]);
  }

  policyGetDigest(session: number): Promise<Buffer> {
    return this.execute(cmd.PolicyGetDigest, { policySession: session });
  }

  /**
   * Runs `fn` with a policy session that has satisfied PolicySecret(authHandle) — the EK's
   * policy when authHandle is TPM_RH_ENDORSEMENT — and flushes the session afterwards.
   */
  async withPolicySecret<T>(authHandle: number, fn: (session: AuthSession) => Promise<T>, auth: Auth = ''): Promise<T> {
    const { handle } = await this.startAuthSession(TPM_SE.POLICY);
    try {
      await this.policySecret(authHandle, handle, auth);
      return await fn(policySession(handle));
    } finally {
      await this.flushContext(handle);
    }
  }

  /**
   * TPM2_ActivateCredential: `activate` is the credentialed key (the AK, password), `ek` the
   * key the credential was made for (an EK: PolicySecret(TPM_RH_ENDORSEMENT) session).
   */
  activateCredential(activate: number, ek: number, credential: { credentialBlob: Buffer; secret: Buffer }, opts: { activateAuth?: Auth; endorsementAuth?: Auth } = {}): Promise<Buffer> {
    return this.withPolicySecret(
      TPM_RH.ENDORSEMENT,
      (ekSession) =>
        this.execute(cmd.ActivateCredential, { activateHandle: activate, keyHandle: ek, credentialBlob: credential.credentialBlob, secret: credential.secret }, [passwordSession(opts.activateAuth), ekSession]),
      opts.endorsementAuth,
    );
  }

  // ---- contexts ---------------------------------------------------------------------------------

  flushContext(handle: number): Promise<void> {
    return this.execute(cmd.FlushContext, { flushHandle: handle });
  }

  contextSave(handle: number): Promise<TpmsContext> {
    return this.execute(cmd.ContextSave, { saveHandle: handle });
  }

  contextLoad(context: TpmsContext): Promise<number> {
    return this.execute(cmd.ContextLoad, { context });
  }

  /**
   * Runs `fn` with a transient object or session and flushes it afterwards, whatever happens.
   * Pass the promise that creates it: `tpm.withTransient(tpm.createEk(), (ek) => …)`.
   */
  async withTransient<H extends { handle: number } | number, T>(object: H | Promise<H>, fn: (object: H) => Promise<T>): Promise<T> {
    const o = await object;
    try {
      return await fn(o);
    } finally {
      await this.flushContext(typeof o === 'number' ? o : o.handle);
    }
  }
}
