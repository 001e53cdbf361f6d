import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  aeadOpen,
  aeadSeal,
  deriveKeyFromPassphrase,
  hkdf,
  newSealingKeyPair,
  openWithPrivateKey,
  randomKey,
  sealToPublicKey,
  wipe,
} from '../../core/crypto/mod.ts';

test('AES-256-GCM seals with a fresh nonce and refuses any change of key, AAD or byte', () => {
  const key = randomKey();
  const aad = Buffer.from('record|1|secret|1');
  const a = aeadSeal(key, Buffer.from('hello'), aad);
  const b = aeadSeal(key, Buffer.from('hello'), aad);
  assert.notDeepEqual(a.subarray(0, 12), b.subarray(0, 12), 'nonces must differ');
  assert.equal(aeadOpen(key, a, aad)?.toString(), 'hello');
  assert.equal(aeadOpen(randomKey(), a, aad), null);
  assert.equal(aeadOpen(key, a, Buffer.from('record|2|secret|1')), null);
  for (let i = 0; i < a.length; i++) {
    const t = Buffer.from(a);
    t[i]! ^= 1;
    assert.equal(aeadOpen(key, t, aad), null, `flip at ${i}`);
  }
  assert.equal(aeadOpen(key, a.subarray(0, 20), aad), null);
});

test('HKDF-SHA256 matches RFC 5869 test case 1', () => {
  // RFC 5869 A.1: IKM = 0x0b*22, salt = 000102…0c, info = f0…f9, L = 42
  const ikm = Buffer.alloc(22, 0x0b);
  const salt = Buffer.from('000102030405060708090a0b0c', 'hex');
  const okm = hkdf(ikm, Buffer.from('f0f1f2f3f4f5f6f7f8f9', 'hex'), 42, salt);
  assert.equal(okm.toString('hex'), '3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865');
});

test('scrypt matches RFC 7914 §12 test vector 2 (prefix)', async () => {
  // scrypt(P="password", S="NaCl", N=1024, r=8, p=16, dkLen=64); our KDF returns the first 32 bytes.
  const key = await deriveKeyFromPassphrase(Buffer.from('password'), { algorithm: 'scrypt', N: 1024, r: 8, p: 16, salt: Buffer.from('NaCl').toString('base64') });
  assert.equal(key.toString('hex'), 'fdbabe1c9d3472007856e7190d01e9fe7c6ad7cbc8237830e77376634b373162');
});

test('X25519 sealing: only the private key opens, AAD bound', () => {
  const kp = newSealingKeyPair();
  const sealed = sealToPublicKey(kp.publicKey, Buffer.from('audit entry'), Buffer.from('seq 1'), 'info');
  assert.equal(openWithPrivateKey(kp.privateKey, sealed, Buffer.from('seq 1'), 'info')?.toString(), 'audit entry');
  assert.equal(openWithPrivateKey(kp.privateKey, sealed, Buffer.from('seq 2'), 'info'), null);
  assert.equal(openWithPrivateKey(newSealingKeyPair().privateKey, sealed, Buffer.from('seq 1'), 'info'), null);
  assert.equal(openWithPrivateKey(kp.privateKey, Buffer.from([0xff, 0xff, 1]), Buffer.from('seq 1'), 'info'), null);
});

test('wipe zeroes buffers and tolerates nulls', () => {
  const k = randomKey();
  wipe(k, null, undefined);
  assert.ok(k.every((b) => b === 0));
});
