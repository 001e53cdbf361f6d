// Recovery key split M-of-N with Shamir's scheme (audited library), encoded as printable shares:
//   SL1-XXXX-XXXX-…  (base32 of: set id ‖ threshold ‖ share ‖ checksum)
// The set id ties shares to one recovery key; the checksum catches a mistyped share.
import { combine, split } from 'shamir-secret-sharing';
import { ShieldError } from '../errors.ts';
import { constantTimeEqual, sha256, wipe } from '../crypto/mod.ts';

const PREFIX = 'SL1';
const ALPHABET = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
const SET_ID_BYTES = 4;
const CHECKSUM_BYTES = 4;

export function recoverySetId(recoveryKey: Buffer): string {
  return sha256(Buffer.from('shieldlab/recovery-set/v1'), recoveryKey).subarray(0, SET_ID_BYTES).toString('hex');
}

function base32(bytes: Buffer): string {
  let bits = 0;
  let value = 0;
  let out = '';
  for (const byte of bytes) {
    value = (value << 8) | byte;
    bits += 8;
    while (bits >= 5) {
      out += ALPHABET[(value >>> (bits - 5)) & 31];
      bits -= 5;
    }
  }
  if (bits > 0) out += ALPHABET[(value << (5 - bits)) & 31];
  return out;
}

function unbase32(text: string): Buffer | null {
  let bits = 0;
  let value = 0;
  const out: number[] = [];
  for (const ch of text) {
    const idx = ALPHABET.indexOf(ch);
    if (idx < 0) return null;
    value = ((value << 5) | idx) & 0xffff;
    bits += 5;
    if (bits >= 8) {
      out.push((value >>> (bits - 8)) & 0xff);
      bits -= 8;
    }
  }
  return Buffer.from(out);
}

export async function splitRecoveryKey(recoveryKey: Buffer, shares: number, threshold: number): Promise<string[]> {
  if (!Number.isInteger(shares) || !Number.isInteger(threshold) || threshold < 2 || shares < threshold || shares > 255) {
    throw new ShieldError('invalid_argument', 'Shares must satisfy 2 ≤ threshold ≤ shares ≤ 255.');
  }
  const setId = Buffer.from(recoverySetId(recoveryKey), 'hex');
  const parts = await split(new Uint8Array(recoveryKey), shares, threshold);
  return parts.map((part) => {
    const body = Buffer.concat([setId, Buffer.from([threshold]), Buffer.from(part)]);
    const checksum = sha256(body).subarray(0, CHECKSUM_BYTES);
    const text = base32(Buffer.concat([body, checksum]));
    wipe(part, body);
    return [PREFIX, ...(text.match(/.{1,4}/g) ?? [])].join('-');
  });
}

interface ParsedShare {
  setId: string;
  threshold: number;
  share: Buffer;
}

function parseShare(text: string, position: number): ParsedShare {
  const cleaned = text.toUpperCase().replace(/[\s-]/g, '');
  const bad = (why: string) =>
    new ShieldError('share_invalid', `Share ${position} is not valid: ${why}.`, { details: { share: position } });
  if (!cleaned.startsWith(PREFIX)) throw bad(`it must start with ${PREFIX}-`);
  const raw = unbase32(cleaned.slice(PREFIX.length));
  if (raw === null) throw bad('it contains characters outside A–Z and 2–7');
  if (raw.length < SET_ID_BYTES + 1 + 2 + CHECKSUM_BYTES) throw bad('it is too short');
  const body = raw.subarray(0, raw.length - CHECKSUM_BYTES);
  const checksum = raw.subarray(raw.length - CHECKSUM_BYTES);
  if (!constantTimeEqual(sha256(body).subarray(0, CHECKSUM_BYTES), checksum)) throw bad('its checksum does not match (mistyped?)');
  return {
    setId: body.subarray(0, SET_ID_BYTES).toString('hex'),
    threshold: body[SET_ID_BYTES]!,
    share: Buffer.from(body.subarray(SET_ID_BYTES + 1)),
  };
}

/** Rebuilds the recovery key; the caller wipes it. */
export async function combineShares(texts: readonly string[]): Promise<{ recoveryKey: Buffer; setId: string }> {
  if (texts.length === 0) throw new ShieldError('shares_insufficient', 'No recovery shares were given.');
  const parsed = texts.map((t, i) => parseShare(t, i + 1));
  const first = parsed[0]!;
  for (const [i, p] of parsed.entries()) {
    if (p.setId !== first.setId) {
      throw new ShieldError('shares_mismatch', `Share ${i + 1} belongs to a different recovery set than share 1.`);
    }
  }
  const distinct = new Map<number, Buffer>();
  for (const p of parsed) distinct.set(p.share[p.share.length - 1]!, p.share);
  if (distinct.size < first.threshold) {
    throw new ShieldError('shares_insufficient', `This recovery set needs ${first.threshold} different shares; ${distinct.size} given.`, {
      details: { needed: first.threshold, given: distinct.size },
    });
  }
  const combined = Buffer.from(await combine([...distinct.values()].map((s) => new Uint8Array(s))));
  for (const p of parsed) wipe(p.share);
  if (recoverySetId(combined) !== first.setId) {
    wipe(combined);
    throw new ShieldError('share_invalid', 'The shares do not combine to their recovery key (one share is damaged).');
  }
  return { recoveryKey: combined, setId: first.setId };
}
