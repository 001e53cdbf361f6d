// The vTPM state key: HKDF-SHA-256 of the KP's transport key under its own label, so the disk's
// key and the vTPM's are independent (knowing one says nothing about the other).
import { KEY_BYTES, hkdf } from '../crypto/mod.ts';
import { ShieldError } from '../errors.ts';
import { KEY_LABELS } from '../shield/format.ts';

/** 32 bytes for swtpm's AES-256-CBC state encryption; the caller wipes it after startVtpm. */
export function deriveVtpmKey(transportKey: Buffer): Buffer {
  if (transportKey.length < KEY_BYTES) throw new ShieldError('invalid_argument', `A transport key has at least ${KEY_BYTES} bytes.`);
  return hkdf(transportKey, KEY_LABELS.vtpmState, KEY_BYTES);
}
