// The shield item: what a shielded VHDX carries in a user metadata item marked IsUser + IsRequired,
// so that QEMU and every spec-following reader refuse to open the file as a plain disk.
//
//   "SLSHIELD" | version u16 | flags u16 (bit 0: integrity) | unit size u32 | cipher u16 |
//   reserved u16 | disk id (16) | generation u64 | KP length u32 | dirty length u32 | KP bytes |
//   dirty-region bitmap (integrity mode) | wrapped data key: nonce (12) | ciphertext (96) |
//   tag (16) | HMAC-SHA-256 of all before (32)
//
// The data key (64 bytes of XTS key + 32 bytes of MAC key) is random per disk and never changes:
// it is wrapped with AES-256-GCM under a key derived by HKDF from the KP's transport key, so a
// grant or revoke (new KP, same transport key) or a roll (new transport key) rewrites only this
// item, never the payload. The MAC binds the parameters and the KP to the data key.
import { createCipheriv, createDecipheriv, createHmac, hkdfSync, randomBytes, timingSafeEqual } from 'node:crypto';
import { ShieldError } from '../errors.ts';
import { XTS_KEY_BYTES, checkUnitSize } from './cipher.ts';

/** The shield item's ItemID (user item). */
export const SHIELD_ITEM = '9b1f6f2c-53a4-4b8e-a1d3-5c0e1d5e1d01';
export const SHIELD_MAGIC = 'SLSHIELD';
const VERSION = 1;
const CIPHER_AES_256_XTS = 1;
const FIXED = 8 + 2 + 2 + 4 + 2 + 2 + 16 + 8 + 4 + 4;
const WRAPPED = 12 + 96 + 16;
const MAC = 32;
export const DATA_KEY_BYTES = XTS_KEY_BYTES + 32;

/** HKDF labels: one key per purpose from the same transport key. */
export const KEY_LABELS = { diskKeyWrap: 'ShieldLab v1 disk data-key wrap', vtpmState: 'ShieldLab v1 vTPM state key' } as const;

export interface ShieldParams {
  integrity: boolean;
  unitSize: number;
  /** The VHDX's Virtual Disk ID (binds the item to its disk). */
  diskId: string;
  generation: bigint;
  /** Integrity mode: one bit per tag region of units that may have been written since the last flush. */
  dirty?: Buffer;
}

export interface ShieldItem extends ShieldParams {
  dirty: Buffer;
  kp: Buffer;
  wrapped: Buffer;
  /** Everything the MAC covers, and the MAC. */
  signed: Buffer;
  mac: Buffer;
}

/** The data key split into its parts; `wipe()` zeroes them. */
export interface DataKey {
  xts: Buffer;
  mac: Buffer;
  wipe(): void;
}

function bad(message: string): ShieldError {
  return new ShieldError('shield_invalid', `Not a valid shielded disk: ${message}.`);
}

function guidBytes(guid: string): Buffer {
  return Buffer.from(guid.replace(/-/g, ''), 'hex');
}

function guidText(b: Buffer): string {
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

export function deriveKey(transportKey: Buffer, diskId: string, label: string): Buffer {
  return Buffer.from(hkdfSync('sha256', transportKey, guidBytes(diskId), label, 32));
}

export function newDataKey(): DataKey {
  const raw = randomBytes(DATA_KEY_BYTES);
  // OpenSSL refuses XTS keys whose halves are equal; astronomically unlikely, but never silently.
  while (raw.subarray(0, 32).equals(raw.subarray(32, 64))) randomBytes(32).copy(raw, 32);
  return splitKey(raw);
}

function splitKey(raw: Buffer): DataKey {
  const xts = Buffer.from(raw.subarray(0, XTS_KEY_BYTES));
  const mac = Buffer.from(raw.subarray(XTS_KEY_BYTES));
  raw.fill(0);
  return {
    xts,
    mac,
    wipe() {
      xts.fill(0);
      mac.fill(0);
    },
  };
}

function header(p: ShieldParams, kpLength: number, dirtyLength: number): Buffer {
  checkUnitSize(p.unitSize);
  const h = Buffer.alloc(FIXED);
  h.write(SHIELD_MAGIC, 0, 'latin1');
  h.writeUInt16LE(VERSION, 8);
  h.writeUInt16LE(p.integrity ? 1 : 0, 10);
  h.writeUInt32LE(p.unitSize, 12);
  h.writeUInt16LE(CIPHER_AES_256_XTS, 16);
  guidBytes(p.diskId).copy(h, 20);
  h.writeBigUInt64LE(p.generation, 36);
  h.writeUInt32LE(kpLength, 44);
  h.writeUInt32LE(dirtyLength, 48);
  return h;
}

/** Wraps the data key under the transport key and builds the item. */
export function buildShieldItem(p: ShieldParams, kp: Buffer, transportKey: Buffer, key: DataKey): Buffer {
  const kek = deriveKey(transportKey, p.diskId, KEY_LABELS.diskKeyWrap);
  try {
    const head = header(p, kp.length, p.dirty?.length ?? 0);
    const nonce = randomBytes(12);
    const c = createCipheriv('aes-256-gcm', kek, nonce);
    // The AAD is the fixed header without the generation and KP length, which change without a re-wrap.
    c.setAAD(head.subarray(0, 36));
    const plain = Buffer.concat([key.xts, key.mac]);
    const ct = Buffer.concat([c.update(plain), c.final()]);
    plain.fill(0);
    return seal(p, kp, Buffer.concat([nonce, ct, c.getAuthTag()]), key);
  } finally {
    kek.fill(0);
  }
}

function seal(p: ShieldParams, kp: Buffer, wrapped: Buffer, key: DataKey): Buffer {
  const dirty = p.dirty ?? Buffer.alloc(0);
  const signed = Buffer.concat([header(p, kp.length, dirty.length), kp, dirty, wrapped]);
  const mac = createHmac('sha256', key.mac).update(signed).digest();
  return Buffer.concat([signed, mac]);
}

/** Parses the item's structure (no key needed); every length is checked. */
export function parseShieldItem(bytes: Buffer): ShieldItem {
  if (bytes.length < FIXED + WRAPPED + MAC) throw bad(`the shield item is ${bytes.length} bytes, too short`);
  if (bytes.toString('latin1', 0, 8) !== SHIELD_MAGIC) throw bad('the shield item has no SLSHIELD signature');
  const version = bytes.readUInt16LE(8);
  if (version !== VERSION) throw new ShieldError('shield_invalid', `Shield format version ${version} is not supported (this build reads ${VERSION}).`);
  const flags = bytes.readUInt16LE(10);
  if (flags & ~1) throw bad(`unknown flags 0x${flags.toString(16)}`);
  const unitSize = bytes.readUInt32LE(12);
  try {
    checkUnitSize(unitSize);
  } catch {
    throw bad(`data unit ${unitSize}`);
  }
  if (bytes.readUInt16LE(16) !== CIPHER_AES_256_XTS) throw bad(`unknown cipher ${bytes.readUInt16LE(16)}`);
  const kpLength = bytes.readUInt32LE(44);
  const dirtyLength = bytes.readUInt32LE(48);
  if (FIXED + kpLength + dirtyLength + WRAPPED + MAC !== bytes.length) throw bad('the shield item lengths do not add up');
  const kp = bytes.subarray(FIXED, FIXED + kpLength);
  const dirty = bytes.subarray(FIXED + kpLength, FIXED + kpLength + dirtyLength);
  const wrapped = bytes.subarray(FIXED + kpLength + dirtyLength, FIXED + kpLength + dirtyLength + WRAPPED);
  return {
    integrity: (flags & 1) === 1,
    unitSize,
    diskId: guidText(bytes.subarray(20, 36)),
    generation: bytes.readBigUInt64LE(36),
    kp: Buffer.from(kp),
    dirty: Buffer.from(dirty),
    wrapped: Buffer.from(wrapped),
    signed: bytes.subarray(0, bytes.length - MAC),
    mac: bytes.subarray(bytes.length - MAC),
  };
}

/**
 * Unwraps the data key with the transport key released for this disk's KP, and checks the
 * item's MAC with it. A wrong key and a tampered item are both refused, distinguishably.
 */
export function openShieldItem(item: ShieldItem, transportKey: Buffer): DataKey {
  const kek = deriveKey(transportKey, item.diskId, KEY_LABELS.diskKeyWrap);
  let plain: Buffer;
  try {
    const d = createDecipheriv('aes-256-gcm', kek, item.wrapped.subarray(0, 12));
    d.setAAD(item.signed.subarray(0, 36));
    d.setAuthTag(item.wrapped.subarray(108, 124));
    plain = Buffer.concat([d.update(item.wrapped.subarray(12, 108)), d.final()]);
  } catch {
    throw new ShieldError('shield_key_mismatch', 'The released key does not open this disk (the shield item was made for another key, or its parameters were altered).');
  } finally {
    kek.fill(0);
  }
  const key = splitKey(plain);
  const mac = createHmac('sha256', key.mac).update(item.signed).digest();
  if (!timingSafeEqual(mac, item.mac)) {
    key.wipe();
    throw new ShieldError('shield_tampered', 'The shield item was altered after it was written (its MAC does not verify).');
  }
  return key;
}

/** A new item with another KP and/or transport key and/or generation; the data key stays. */
export function reseal(item: ShieldItem, key: DataKey, change: { kp?: Buffer; transportKey?: Buffer; generation?: bigint; dirty?: Buffer }): Buffer {
  const p: ShieldParams = { integrity: item.integrity, unitSize: item.unitSize, diskId: item.diskId, generation: change.generation ?? item.generation, dirty: change.dirty ?? item.dirty };
  const kp = change.kp ?? item.kp;
  if (change.transportKey) return buildShieldItem(p, kp, change.transportKey, key);
  return seal(p, kp, item.wrapped, key);
}
