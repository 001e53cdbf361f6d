// TPM_RC decoding (TPM 2.0 Part 2 §6.6): format-0 codes name the error alone; format-1 codes
// also say which handle, parameter or session it was about. The same name tpm2-tools prints.
import { ShieldError } from '../errors.ts';

const RC_VER1 = 0x100;
const RC_FMT1 = 0x080;
const RC_WARN = 0x900;

const FMT0: Readonly<Record<number, string>> = {
  0x000: 'INITIALIZE',
  0x001: 'FAILURE',
  0x003: 'SEQUENCE',
  0x00b: 'PRIVATE',
  0x019: 'HMAC',
  0x020: 'DISABLED',
  0x021: 'EXCLUSIVE',
  0x024: 'AUTH_TYPE',
  0x025: 'AUTH_MISSING',
  0x026: 'POLICY',
  0x027: 'PCR',
  0x028: 'PCR_CHANGED',
  0x02d: 'UPGRADE',
  0x02e: 'TOO_MANY_CONTEXTS',
  0x02f: 'AUTH_UNAVAILABLE',
  0x030: 'REBOOT',
  0x031: 'UNBALANCED',
  0x042: 'COMMAND_SIZE',
  0x043: 'COMMAND_CODE',
  0x044: 'AUTHSIZE',
  0x045: 'AUTH_CONTEXT',
  0x046: 'NV_RANGE',
  0x047: 'NV_SIZE',
  0x048: 'NV_LOCKED',
  0x049: 'NV_AUTHORIZATION',
  0x04a: 'NV_UNINITIALIZED',
  0x04b: 'NV_SPACE',
  0x04c: 'NV_DEFINED',
  0x050: 'BAD_CONTEXT',
  0x051: 'CPHASH',
  0x052: 'PARENT',
  0x053: 'NEEDS_TEST',
  0x054: 'NO_RESULT',
  0x055: 'SENSITIVE',
};

const FMT1: Readonly<Record<number, string>> = {
  0x01: 'ASYMMETRIC',
  0x02: 'ATTRIBUTES',
  0x03: 'HASH',
  0x04: 'VALUE',
  0x05: 'HIERARCHY',
  0x07: 'KEY_SIZE',
  0x08: 'MGF',
  0x09: 'MODE',
  0x0a: 'TYPE',
  0x0b: 'HANDLE',
  0x0c: 'KDF',
  0x0d: 'RANGE',
  0x0e: 'AUTH_FAIL',
  0x0f: 'NONCE',
  0x10: 'PP',
  0x12: 'SCHEME',
  0x15: 'SIZE',
  0x16: 'SYMMETRIC',
  0x17: 'TAG',
  0x18: 'SELECTOR',
  0x1a: 'INSUFFICIENT',
  0x1b: 'SIGNATURE',
  0x1c: 'KEY',
  0x1d: 'POLICY_FAIL',
  0x1f: 'INTEGRITY',
  0x20: 'TICKET',
  0x21: 'RESERVED_BITS',
  0x22: 'BAD_AUTH',
  0x23: 'EXPIRED',
  0x24: 'POLICY_CC',
  0x25: 'BINDING',
  0x26: 'CURVE',
  0x27: 'ECC_POINT',
  0x28: 'FW_LIMITED',
  0x29: 'SVN_LIMITED',
  0x30: 'CHANNEL',
  0x31: 'CHANNEL_KEY',
};

const WARN: Readonly<Record<number, string>> = {
  0x001: 'CONTEXT_GAP',
  0x002: 'OBJECT_MEMORY',
  0x003: 'SESSION_MEMORY',
  0x004: 'MEMORY',
  0x005: 'SESSION_HANDLES',
  0x006: 'OBJECT_HANDLES',
  0x007: 'LOCALITY',
  0x008: 'YIELDED',
  0x009: 'CANCELED',
  0x00a: 'TESTING',
  0x010: 'REFERENCE_H0',
  0x011: 'REFERENCE_H1',
  0x012: 'REFERENCE_H2',
  0x013: 'REFERENCE_H3',
  0x014: 'REFERENCE_H4',
  0x015: 'REFERENCE_H5',
  0x016: 'REFERENCE_H6',
  0x018: 'REFERENCE_S0',
  0x019: 'REFERENCE_S1',
  0x01a: 'REFERENCE_S2',
  0x01b: 'REFERENCE_S3',
  0x01c: 'REFERENCE_S4',
  0x01d: 'REFERENCE_S5',
  0x01e: 'REFERENCE_S6',
  0x020: 'NV_RATE',
  0x021: 'LOCKOUT',
  0x022: 'RETRY',
  0x023: 'NV_UNAVAILABLE',
};

export interface DecodedRc {
  rc: number;
  /** The base code with its TPM_RC_ name, e.g. TPM_RC_BAD_AUTH. */
  name: string;
  /** The base code without the handle/parameter/session number (rc itself for format 0). */
  base: number;
  /** e.g. 'TPM_RC_BAD_AUTH (session 1)'. */
  text: string;
  warning: boolean;
  parameter?: number;
  handle?: number;
  session?: number;
}

export function decodeRc(rc: number): DecodedRc {
  const hex = (n: number) => `0x${n.toString(16).padStart(3, '0')}`;
  if (rc === 0) return { rc, name: 'TPM_RC_SUCCESS', base: 0, text: 'TPM_RC_SUCCESS', warning: false };
  if (rc & RC_FMT1) {
    const e = rc & 0x3f;
    const base = RC_FMT1 + e;
    const name = FMT1[e] ? `TPM_RC_${FMT1[e]}` : `TPM_RC ${hex(base)}`;
    const n = (rc >>> 8) & 0xf;
    if (rc & 0x40) return { rc, name, base, text: `${name} (parameter ${n})`, warning: false, parameter: n };
    if (n & 0x8) return { rc, name, base, text: `${name} (session ${n & 0x7})`, warning: false, session: n & 0x7 };
    if (n === 0) return { rc, name, base, text: name, warning: false };
    return { rc, name, base, text: `${name} (handle ${n})`, warning: false, handle: n };
  }
  if (!(rc & RC_VER1)) return { rc, name: `TPM 1.2 response code ${hex(rc)}`, base: rc, text: `TPM 1.2 response code ${hex(rc)}`, warning: false };
  if (rc & 0x400) return { rc, name: `vendor response code ${hex(rc)}`, base: rc, text: `vendor response code ${hex(rc)}`, warning: false };
  const e = rc & 0x7f;
  const warning = (rc & 0x800) !== 0;
  const table = warning ? WARN : FMT0;
  const name = table[e] ? `TPM_RC_${table[e]}` : `TPM_RC ${hex(rc)}`;
  return { rc, name, base: rc & (warning ? RC_WARN | 0x7f : RC_VER1 | 0x7f), text: name, warning };
}

/** Base codes callers test for. */
export const TPM_RC = {
  SUCCESS: 0x000,
  INITIALIZE: RC_VER1 + 0x000,
  FAILURE: RC_VER1 + 0x001,
  AUTH_MISSING: RC_VER1 + 0x025,
  NV_UNINITIALIZED: RC_VER1 + 0x04a,
  BAD_CONTEXT: RC_VER1 + 0x050,
  HANDLE: RC_FMT1 + 0x0b,
  AUTH_FAIL: RC_FMT1 + 0x0e,
  BAD_AUTH: RC_FMT1 + 0x22,
  POLICY_FAIL: RC_FMT1 + 0x1d,
  INTEGRITY: RC_FMT1 + 0x1f,
  VALUE: RC_FMT1 + 0x04,
  OBJECT_MEMORY: RC_WARN + 0x002,
  SESSION_MEMORY: RC_WARN + 0x003,
  YIELDED: RC_WARN + 0x008,
  TESTING: RC_WARN + 0x00a,
  LOCKOUT: RC_WARN + 0x021,
  RETRY: RC_WARN + 0x022,
} as const;

/** The error a failed command throws: code tpm_error, details { rc, rcName, command }. */
export function tpmError(rc: number, command: string): ShieldError {
  const d = decodeRc(rc);
  const hint = d.base === TPM_RC.OBJECT_MEMORY || d.base === TPM_RC.SESSION_MEMORY ? ' (the TPM is out of slots: flush transient objects and sessions)' : '';
  return new ShieldError('tpm_error', `${command} failed: ${d.text}, rc 0x${rc.toString(16)}${hint}.`, {
    details: { rc, rcName: d.name, rcText: d.text, command, ...(d.parameter !== undefined ? { parameter: d.parameter } : {}), ...(d.handle !== undefined ? { handle: d.handle } : {}), ...(d.session !== undefined ? { session: d.session } : {}) },
  });
}
