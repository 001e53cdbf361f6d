import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import {
  createKeyProtector,
  grantGuardian,
  parseKeyProtector,
  revokeGuardian,
  rollKeyProtector,
  setPolicy,
  unwrapTransportKey,
  guardianEntry,
  type HeldGuardian,
} from '../../core/guardian/key-protector.ts';
import { ShieldError } from '../../core/errors.ts';
import { opensslGuardian, publicOf } from '../helpers/guardian-certs.ts';

const code = (...c: string[]) => (err: unknown) => err instanceof ShieldError && c.includes(err.code);
const owner = opensslGuardian('Owner');
const alice = opensslGuardian('Alice');
const bob = opensslGuardian('Bob');
const unwrap = (bytes: Buffer, g: HeldGuardian) =>
  unwrapTransportKey(parseKeyProtector(bytes), { encryptionThumbprint: guardianEntry(g).encryptionThumbprint, encryptionKey: g.keys.encryptionKey });

test('create: owner and listed guardians unwrap the same key; others cannot', () => {
  const kp = createKeyProtector({ owner, guardians: [publicOf(alice)], policy: { modes: ['host-key', 'tpm'], hosts: [] } });
  const parsed = parseKeyProtector(kp);
  assert.deepEqual(parsed.authorization.guardians.map((g) => g.name), ['Owner', 'Alice']);
  assert.deepEqual(parsed.authorization.policy, { modes: ['host-key', 'tpm'], hosts: [] });
  assert.equal(parsed.keyBlock.version, 1);
  const k1 = unwrap(kp, owner);
  assert.equal(k1.length, 32);
  assert.deepEqual(unwrap(kp, alice), k1);
  assert.throws(() => unwrap(kp, bob), code('kp_unwrap_denied'));
  assert.throws(() => createKeyProtector({ owner, guardians: [], policy: { modes: [], hosts: [] } }), code('invalid_argument'));
});

test('grant and revoke re-wrap the same key (owner only); a roll after revocation shuts the revoked guardian out', () => {
  const kp = createKeyProtector({ owner, guardians: [], policy: { modes: ['host-key'], hosts: [] } });
  const key = unwrap(kp, owner);
  assert.throws(() => grantGuardian(parseKeyProtector(kp), alice, publicOf(bob)), code('kp_not_owner'));
  const granted = grantGuardian(parseKeyProtector(kp), owner, publicOf(alice));
  assert.deepEqual(unwrap(granted, alice), key);
  assert.throws(() => grantGuardian(parseKeyProtector(granted), owner, publicOf(alice)), code('already_exists'));
  assert.equal(parseKeyProtector(granted).authorization.authVersion, 2);

  // Alice, an authorised guardian, may roll (fresh key for everyone) but not change who is authorised.
  const rolled = rollKeyProtector(parseKeyProtector(granted), alice);
  assert.notDeepEqual(rolled.transportKey, key);
  assert.deepEqual(unwrap(rolled.bytes, owner), rolled.transportKey);
  assert.equal(parseKeyProtector(rolled.bytes).keyBlock.version, 3);
  assert.throws(() => rollKeyProtector(parseKeyProtector(kp), bob), code('kp_unwrap_denied'));

  const revoked = revokeGuardian(parseKeyProtector(rolled.bytes), owner, 'Alice');
  assert.throws(() => unwrap(revoked, alice), code('kp_unwrap_denied'));
  const after = rollKeyProtector(parseKeyProtector(revoked), owner);
  assert.throws(() => unwrap(after.bytes, alice), code('kp_unwrap_denied'));
  assert.notDeepEqual(after.transportKey, rolled.transportKey);
  assert.throws(() => revokeGuardian(parseKeyProtector(after.bytes), owner, 'Owner'), code('invalid_argument'));
  assert.throws(() => revokeGuardian(parseKeyProtector(after.bytes), owner, 'Nobody'), code('not_found'));
  const narrowed = setPolicy(parseKeyProtector(after.bytes), owner, { modes: ['tpm'], hosts: ['ab'] });
  assert.deepEqual(parseKeyProtector(narrowed).authorization.policy, { modes: ['tpm'], hosts: ['ab'] });
});

test('a guardian cannot splice a new authorization onto a key block it signed', () => {
  const kp = parseKeyProtector(createKeyProtector({ owner, guardians: [publicOf(alice)], policy: { modes: ['host-key'], hosts: [] } }));
  // Alice builds her own KP (she owns it) naming Bob, and grafts its authorization onto the owner's KP.
  const forged = parseKeyProtector(createKeyProtector({ owner: alice, guardians: [publicOf(bob)], policy: { modes: ['host-key'], hosts: [] } }));
  const spliced = Buffer.concat([kp.bytes.subarray(0, 5), forged.bytes.subarray(5, 5 + 4 + forged.authBytes.length + 2 + forged.authSignature.length), kp.bytes.subarray(5 + 4 + kp.authBytes.length + 2 + kp.authSignature.length)]);
  assert.throws(() => parseKeyProtector(spliced), code('kp_invalid', 'kp_signature_invalid'));
});

test('every single-bit change is rejected with a typed error', () => {
  const kp = createKeyProtector({ owner, guardians: [publicOf(alice)], policy: { modes: ['host-key'], hosts: [] } });
  let checked = 0;
  // Every byte once (rotating the bit), plus the first 64 bytes at all 8 bits: headers and lengths.
  const flips: [number, number][] = [];
  for (let i = 0; i < kp.length; i++) flips.push([i, i % 8]);
  for (let i = 0; i < 64; i++) for (let b = 0; b < 8; b++) flips.push([i, b]);
  for (const [i, b] of flips) {
    const t = Buffer.from(kp);
    t[i]! ^= 1 << b;
    assert.throws(() => parseKeyProtector(t), code('kp_invalid', 'kp_signature_invalid'), `bit ${b} of byte ${i}`);
    checked++;
  }
  assert.ok(checked > kp.length);
});

test('random bytes, truncations and extensions are typed errors (property)', () => {
  const kp = createKeyProtector({ owner, guardians: [], policy: { modes: ['host-key'], hosts: [] } });
  for (let i = 0; i < 500; i++) {
    const r = randomBytes(i % 3 === 0 ? 4 + (i % 40) : 1 + (i * 37) % 4000);
    if (i % 5 === 0) Buffer.from('SLKP\u0001').copy(r);
    assert.throws(() => parseKeyProtector(r), code('kp_invalid', 'kp_signature_invalid'));
  }
  for (const cut of [0, 4, 5, 9, 100, kp.length - 1]) assert.throws(() => parseKeyProtector(kp.subarray(0, cut)), code('kp_invalid'));
  assert.throws(() => parseKeyProtector(Buffer.concat([kp, Buffer.from([0])])), code('kp_invalid'));
});
