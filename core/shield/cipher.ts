// Payload encryption of a shielded disk: AES-256-XTS per data unit, the tweak being the unit's
// number in the virtual disk (128-bit little-endian, as dm-crypt's plain64 and QEMU's LUKS do), so
// a unit decrypts wherever its block lives in the file. Units never written are stored as zeros
// and read as zeros: an all-zero ciphertext unit is not an encryption of anything we wrote
// (probability 2^-4096·8), which keeps unallocated space free without encrypting it.
import { createCipheriv, createDecipheriv } from 'node:crypto';
import { ShieldError } from '../errors.ts';

export const XTS_KEY_BYTES = 64;

export function checkUnitSize(unitSize: number): void {
  if (!Number.isSafeInteger(unitSize) || unitSize < 512 || unitSize > 1024 * 1024 || (unitSize & (unitSize - 1)) !== 0) {
    throw new ShieldError('invalid_argument', `The data unit must be a power of two from 512 bytes to 1 MiB, not ${unitSize}.`);
  }
}

const ZERO_UNIT = Buffer.alloc(1024 * 1024);

/** The tweak buffer, reused: createCipheriv copies it (one allocation less per 4 KiB unit). */
const TWEAK = Buffer.alloc(16);
function tweak(unit: number): Buffer {
  TWEAK.writeUInt32LE(unit % 0x100000000, 0);
  TWEAK.writeUInt32LE(Math.floor(unit / 0x100000000), 4);
  return TWEAK;
}

/**
 * Encrypts or decrypts whole units in place-free fashion: `input` holds units starting at
 * `firstUnit`; the result goes to `output` (same length, may be the same buffer).
 */
export function xtsUnits(mode: 'encrypt' | 'decrypt', key: Buffer, unitSize: number, firstUnit: number, input: Buffer, output: Buffer): void {
  if (key.length !== XTS_KEY_BYTES) throw new Error('internal: an XTS key is 64 bytes');
  if (output.length < input.length) throw new Error('internal: the XTS output is too short');
  // The disk's last unit may be short (a size off the unit boundary): XTS takes any length ≥ 16.
  for (let at = 0, unit = firstUnit; at < input.length; at += unitSize, unit++) {
    const n = Math.min(unitSize, input.length - at);
    if (n < 16 || n % 16 !== 0) throw new Error('internal: an XTS unit is a multiple of 16 bytes');
    const src = input.subarray(at, at + n);
    const dst = output.subarray(at, at + n);
    if (mode === 'decrypt' && ZERO_UNIT.compare(src, 0, n, 0, n) === 0) {
      dst.fill(0); // never written
      continue;
    }
    // XTS takes a unit in one update (OpenSSL refuses a second one), so final() would add nothing
    // but its cost — a quarter of the whole per-unit time; no padding is involved either way.
    const c = mode === 'encrypt' ? createCipheriv('aes-256-xts', key, tweak(unit)) : createDecipheriv('aes-256-xts', key, tweak(unit));
    if (c.update(src).copy(dst) !== n) throw new Error('internal: XTS output length');
  }
}
