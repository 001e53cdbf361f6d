// Integrity mode: a 16-byte tag per data unit, HMAC-SHA-256 (truncated) over the unit's number and
// its ciphertext under the disk's MAC key, kept in a required region of the VHDX. A changed byte,
// a changed tag or a unit moved to another place fails its check; a whole-disk rollback is caught
// by the generation counter (item + vault). Every unit of an integrity disk is written at shield
// time, so "never written" cannot be forged by zeroing a unit and its tag. Not caught: single units
// put back together with their own older tags from an earlier state of the same disk (the tags do
// not bind the generation; that would need a tree over the tags) — said so in the README.
import { createHmac, timingSafeEqual } from 'node:crypto';

/** The tag region's GUID (Required = 1: a reader that does not know it must not open the file). */
export const TAG_REGION = '3f6c2a91-7d4e-4c55-9a0b-2e6d1c7b5a11';
export const TAG_BYTES = 16;
/** Virtual-disk bytes per dirty bit: writes since the last flush are re-tagged after a crash. */
export const DIRTY_SPAN = 64 * 1024 * 1024;

export function tagUnits(macKey: Buffer, unitSize: number, firstUnit: number, ct: Buffer, tags: Buffer): void {
  const n = Math.ceil(ct.length / unitSize);
  const prefix = Buffer.alloc(8);
  for (let i = 0; i < n; i++) {
    const unit = firstUnit + i;
    prefix.writeUInt32LE(unit % 0x100000000, 0);
    prefix.writeUInt32LE(Math.floor(unit / 0x100000000), 4);
    const h = createHmac('sha256', macKey).update(prefix).update(ct.subarray(i * unitSize, Math.min(ct.length, (i + 1) * unitSize))).digest();
    h.copy(tags, i * TAG_BYTES, 0, TAG_BYTES);
  }
}

/** The first unit (relative to `firstUnit`) whose tag does not verify, or -1. */
export function firstBadUnit(macKey: Buffer, unitSize: number, firstUnit: number, ct: Buffer, tags: Buffer): number {
  const want = Buffer.alloc(tags.length);
  tagUnits(macKey, unitSize, firstUnit, ct, want);
  for (let i = 0; i * TAG_BYTES < tags.length; i++) {
    if (!timingSafeEqual(want.subarray(i * TAG_BYTES, (i + 1) * TAG_BYTES), tags.subarray(i * TAG_BYTES, (i + 1) * TAG_BYTES))) return i;
  }
  return -1;
}

export function tagRegionLength(size: number, unitSize: number): number {
  return Math.ceil((Math.ceil(size / unitSize) * TAG_BYTES) / (1024 * 1024)) * 1024 * 1024;
}
