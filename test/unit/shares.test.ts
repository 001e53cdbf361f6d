import { test } from 'node:test';
import assert from 'node:assert/strict';
import { combineShares, recoverySetId, splitRecoveryKey } from '../../core/vault/shares.ts';
import { randomKey } from '../../core/crypto/mod.ts';
import { ShieldError } from '../../core/errors.ts';

const code = (c: string) => (err: unknown) => err instanceof ShieldError && err.code === c;

test('any 3 of 5 printable shares rebuild the key; the format is printable and grouped', async () => {
  const key = randomKey();
  const shares = await splitRecoveryKey(key, 5, 3);
  assert.equal(shares.length, 5);
  for (const s of shares) assert.match(s, /^SL1(-[A-Z2-7]{1,4})+$/);
  for (const pick of [[0, 1, 2], [0, 2, 4], [4, 3, 1], [0, 1, 2, 3, 4]]) {
    const { recoveryKey, setId } = await combineShares(pick.map((i) => shares[i]!));
    assert.deepEqual(recoveryKey, key);
    assert.equal(setId, recoverySetId(key));
  }
  // Lower case and stray spaces are forgiven (people type shares back in).
  const typed = shares.slice(0, 3).map((s) => ` ${s.toLowerCase().replace(/-/g, ' - ')} `);
  assert.deepEqual((await combineShares(typed)).recoveryKey, key);
});

test('too few, duplicated, mistyped or foreign shares give typed errors', async () => {
  const shares = await splitRecoveryKey(randomKey(), 5, 3);
  const other = await splitRecoveryKey(randomKey(), 5, 3);
  await assert.rejects(combineShares(shares.slice(0, 2)), code('shares_insufficient'));
  await assert.rejects(combineShares([shares[0]!, shares[0]!, shares[1]!]), code('shares_insufficient'));
  await assert.rejects(combineShares([shares[0]!, shares[1]!, other[2]!]), code('shares_mismatch'));
  const s = shares[1]!;
  const i = s.length - 3;
  const mistyped = s.slice(0, i) + (s[i] === 'A' ? 'B' : 'A') + s.slice(i + 1);
  await assert.rejects(combineShares([shares[0]!, mistyped, shares[2]!]), (e: unknown) => code('share_invalid')(e) && /Share 2/.test((e as Error).message));
  await assert.rejects(combineShares(['hello', shares[0]!, shares[1]!]), code('share_invalid'));
  await assert.rejects(combineShares([]), code('shares_insufficient'));
});

test('split parameters are checked', async () => {
  await assert.rejects(splitRecoveryKey(randomKey(), 2, 3), code('invalid_argument'));
  await assert.rejects(splitRecoveryKey(randomKey(), 5, 1), code('invalid_argument'));
});
