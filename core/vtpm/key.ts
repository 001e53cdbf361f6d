// The vTPM state key: HKDF-SHA-256 of the KP's transport key under its own label, so the disk's
// key and the vTPM's are independent (knowing one says nothing about the other).
import { createHmac } from 'node:crypto';
import { KEY_BYTES, hkdf } from '../crypto/mod.ts';
import { ShieldError } from '../errors.ts';
import { KEY_LABELS } from '../shield/format.ts';

/** 32 bytes for swtpm's AES-256-CBC state encryption; the caller wipes it after startVtpm. */
export function deriveVtpmKey(transportKey: Buffer): Buffer {
  if (transportKey.length < KEY_BYTES) throw new ShieldError('invalid_argument', `A transport key has at least ${KEY_BYTES} bytes.`);
  return hkdf(transportKey, KEY_LABELS.vtpmState, KEY_BYTES);
}

/**
 * A key check value for a vTPM state key: HMAC-SHA-256 under the key of a fixed label (so it says
 * nothing about the key), kept next to the state so a start knows which key a state folder is under
 * without trying to open it (rekey.ts's recovery after a crash).
 */
export function vtpmKeyCheck(key: Buffer): string {
  return createHmac('sha256', key).update('ShieldLab vTPM state key check v1').digest('hex').slice(0, 32);
}
