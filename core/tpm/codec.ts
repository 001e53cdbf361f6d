// The one generic codec every command goes through (TPM 2.0 Part 1 §18): a command is typed data
// — its handles, which of them need authorisation, its parameters and its response — and this
// file turns it into bytes and a response back into typed data, with the authorisation area.
import { randomBytes } from 'node:crypto';
import { ShieldError } from '../errors.ts';
import { TPMA_SESSION, TPM_RH, TPM_ST } from './constants.ts';
import { Reader, Writer, malformed } from './marshal.ts';
import { tpmError } from './rc.ts';
import { MAX } from './structures.ts';

/** One command, declared once, named as in TPM 2.0 Part 3. */
export interface TpmCommand<In, Out> {
  /** Part 3 name without the TPM2_ prefix. */
  readonly name: string;
  readonly cc: number;
  /** How many handles lead the handle area and need an authorisation session each. */
  readonly authHandles: number;
  /** Whether the response starts with a handle (CreatePrimary, Load, StartAuthSession, ContextLoad). */
  readonly responseHandle: boolean;
  handles(input: In): number[];
  params(w: Writer, input: In): void;
  response(r: Reader, handle: number): Out;
}

/** Declares a command; defaults: no handles, no authorisation, no response handle. */
export function command<In, Out>(spec: Pick<TpmCommand<In, Out>, 'name' | 'cc'> & Partial<TpmCommand<In, Out>> & { response: TpmCommand<In, Out>['response'] }): TpmCommand<In, Out> {
  return {
    authHandles: 0,
    responseHandle: false,
    handles: () => [],
    params: () => {},
    ...spec,
  };
}

/** An entry of the authorisation area (TPMS_AUTH_COMMAND). */
export interface AuthSession {
  handle: number;
  nonceCaller: Buffer;
  attributes: number;
  hmac: Buffer;
}

/** TPM_RS_PW: the authValue in clear, for local use where the bus is not an attack surface. */
export function passwordSession(auth: Buffer | string = ''): AuthSession {
  const hmac = typeof auth === 'string' ? Buffer.from(auth, 'utf8') : Buffer.from(auth);
  if (hmac.length > MAX.DIGEST) throw malformed(`an authValue of ${hmac.length} bytes`);
  return { handle: TPM_RH.PW, nonceCaller: Buffer.alloc(0), attributes: TPMA_SESSION.continueSession, hmac };
}

/**
 * A policy session as an authorisation: its policy has been satisfied by earlier Policy*
 * commands. Without PolicyAuthValue/PolicyPassword the TPM checks no HMAC, so it is empty.
 * continueSession stays set: the caller flushes the session in a finally.
 */
export function policySession(handle: number): AuthSession {
  return { handle, nonceCaller: randomBytes(16), attributes: TPMA_SESSION.continueSession, hmac: Buffer.alloc(0) };
}

export function encodeCommand<In, Out>(cmd: TpmCommand<In, Out>, input: In, sessions: readonly AuthSession[]): Buffer {
  const handles = cmd.handles(input);
  if (sessions.length !== cmd.authHandles) throw new ShieldError('invalid_argument', `TPM2_${cmd.name} takes ${cmd.authHandles} authorisation session(s), not ${sessions.length}.`);
  const body = new Writer();
  for (const h of handles) body.u32(h);
  if (sessions.length > 0) {
    const auth = new Writer();
    for (const s of sessions) auth.u32(s.handle).tpm2b(s.nonceCaller).u8(s.attributes).tpm2b(s.hmac);
    body.u32(auth.size).bytes(auth.finish());
  }
  cmd.params(body, input);
  const payload = body.finish();
  const head = Buffer.alloc(10);
  head.writeUInt16BE(sessions.length > 0 ? TPM_ST.SESSIONS : TPM_ST.NO_SESSIONS, 0);
  head.writeUInt32BE(10 + payload.length, 2);
  head.writeUInt32BE(cmd.cc, 6);
  return Buffer.concat([head, payload]);
}

/** The response code of a response, or a malformed error when it has no header. */
export function responseCode(bytes: Buffer): number {
  if (bytes.length < 10) throw malformed(`a ${bytes.length}-byte response, shorter than its 10-byte header`);
  return bytes.readUInt32BE(6);
}

/**
 * Parses a response to `cmd`: header, size, response code (non-zero → `tpm_error` with the
 * TPM_RC name), the response handle, the parameters (which must fill parameterSize exactly) and
 * one TPMS_AUTH_RESPONSE per session sent.
 */
export function decodeResponse<In, Out>(cmd: TpmCommand<In, Out>, bytes: Buffer, sessionCount: number): Out {
  const r = new Reader(bytes);
  if (bytes.length < 10) throw malformed(`TPM2_${cmd.name}: a ${bytes.length}-byte response, shorter than its 10-byte header`);
  const tag = r.u16('tag');
  const size = r.u32('responseSize');
  const rc = r.u32('responseCode');
  if (size !== bytes.length) throw malformed(`TPM2_${cmd.name}: responseSize says ${size} bytes, ${bytes.length} arrived`);
  if (tag !== TPM_ST.NO_SESSIONS && tag !== TPM_ST.SESSIONS) throw malformed(`TPM2_${cmd.name}: response tag 0x${tag.toString(16)}`);
  if (rc !== 0) {
    if (size !== 10) throw malformed(`TPM2_${cmd.name}: an error response (rc 0x${rc.toString(16)}) with ${size - 10} bytes of body`);
    throw tpmError(rc, `TPM2_${cmd.name}`);
  }
  const expected = sessionCount > 0 ? TPM_ST.SESSIONS : TPM_ST.NO_SESSIONS;
  if (tag !== expected) throw malformed(`TPM2_${cmd.name}: response tag 0x${tag.toString(16)} where 0x${expected.toString(16)} was due`);
  const handle = cmd.responseHandle ? r.u32('response handle') : 0;
  let params: Reader;
  if (sessionCount > 0) {
    const paramSize = r.u32('parameterSize');
    if (paramSize > r.remaining) throw malformed(`TPM2_${cmd.name}: parameterSize ${paramSize} with ${r.remaining} bytes left`);
    params = new Reader(bytes, r.offset, r.offset + paramSize);
    const auth = new Reader(bytes, r.offset + paramSize);
    for (let i = 0; i < sessionCount; i++) {
      auth.tpm2b('TPMS_AUTH_RESPONSE.nonce', MAX.DIGEST);
      auth.u8('TPMS_AUTH_RESPONSE.sessionAttributes');
      auth.tpm2b('TPMS_AUTH_RESPONSE.hmac', MAX.DIGEST);
    }
    auth.done(`TPM2_${cmd.name} authorisation area`);
  } else {
    params = new Reader(bytes, r.offset);
  }
  const out = cmd.response(params, handle);
  params.done(`TPM2_${cmd.name} response`);
  return out;
}
