// The shielded disk's cryptography against independent oracles: each XTS data unit equals what
// Python's `cryptography` (Debian python3-cryptography) produces with the unit number as the little-endian tweak (dm-crypt's plain64
// convention), so a unit decrypts wherever its block lives; the shield item's key wrapping and MAC
// refuse a wrong transport key, a flipped bit anywhere and a swapped KP, with distinct codes.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { xtsUnits } from '../../core/shield/cipher.ts';
import { buildShieldItem, newDataKey, openShieldItem, parseShieldItem, reseal } from '../../core/shield/format.ts';
import { ShieldError } from '../../core/errors.ts';
import { tempDir } from '../helpers/home.ts';

const PY_XTS = `
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
key, unit, path = bytes.fromhex(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
e = Cipher(algorithms.AES(key), modes.XTS(unit.to_bytes(16, 'little'))).encryptor()
sys.stdout.buffer.write(e.update(open(path, 'rb').read()) + e.finalize())
`;

/** The oracle: one unit encrypted by Python's cryptography with the unit number as a 16-byte little-endian tweak. */
function pythonXts(key: Buffer, unit: number, data: Buffer, dir: string): Buffer {
  const f = join(dir, 'unit.bin');
  writeFileSync(f, data);
  return execFileSync('/usr/bin/python3', ['-c', PY_XTS, key.toString('hex'), String(unit), f]);
}

test('XTS units match Python cryptography with the unit number as tweak; all-zero ciphertext reads as zeros', () => {
  const { dir, cleanup } = tempDir();
  try {
    const key = newDataKey();
    for (const unitSize of [512, 4096, 65536]) {
      const plain = randomBytes(unitSize * 3);
      const first = 2 ** 33 + 5; // above 32 bits: the whole 64-bit tweak is used
      const ct = Buffer.alloc(plain.length);
      xtsUnits('encrypt', key.xts, unitSize, first, plain, ct);
      for (let u = 0; u < 3; u++) {
        const want = pythonXts(key.xts, first + u, plain.subarray(u * unitSize, (u + 1) * unitSize), dir);
        assert.ok(ct.subarray(u * unitSize, (u + 1) * unitSize).equals(want), `unit ${u} of ${unitSize}`);
      }
      const back = Buffer.alloc(ct.length);
      xtsUnits('decrypt', key.xts, unitSize, first, ct, back);
      assert.ok(back.equals(plain));
      // Moved to another unit number, the same ciphertext decrypts to something else.
      xtsUnits('decrypt', key.xts, unitSize, first + 1, ct.subarray(0, unitSize), back.subarray(0, unitSize));
      assert.ok(!back.subarray(0, unitSize).equals(plain.subarray(0, unitSize)));
      const zeros = Buffer.alloc(unitSize);
      xtsUnits('decrypt', key.xts, unitSize, 7, zeros, back.subarray(0, unitSize));
      assert.ok(back.subarray(0, unitSize).every((b) => b === 0));
    }
  } finally {
    cleanup();
  }
});

test('shield item: round trip, wrong transport key, any flipped bit, KP swap, reseal keeps the data key', () => {
  const tk = randomBytes(32);
  const key = newDataKey();
  const params = { integrity: true, unitSize: 4096, diskId: '01234567-89ab-cdef-0123-456789abcdef', generation: 3n };
  const kp = Buffer.from('{"a key protector":"stand-in bytes; the KP format is tested elsewhere"}');
  const bytes = buildShieldItem(params, kp, tk, key);
  const item = parseShieldItem(bytes);
  assert.equal(item.unitSize, 4096);
  assert.equal(item.integrity, true);
  assert.equal(item.generation, 3n);
  assert.equal(item.diskId, params.diskId);
  assert.ok(item.kp.equals(kp));
  const opened = openShieldItem(item, tk);
  assert.ok(opened.xts.equals(key.xts) && opened.mac.equals(key.mac));

  const code = (f: () => unknown) => {
    try {
      f();
      return 'ok';
    } catch (err) {
      assert.ok(err instanceof ShieldError, String(err));
      return err.code;
    }
  };
  assert.equal(code(() => openShieldItem(item, randomBytes(32))), 'shield_key_mismatch');
  const seen = new Set<string>();
  for (let bit = 0; bit < bytes.length * 8; bit += 7) {
    const b = Buffer.from(bytes);
    b[bit >> 3]! ^= 1 << (bit & 7);
    const c = code(() => openShieldItem(parseShieldItem(b), tk));
    assert.notEqual(c, 'ok', `bit ${bit} flipped went unnoticed`);
    seen.add(c);
  }
  assert.deepEqual([...seen].sort(), ['shield_invalid', 'shield_key_mismatch', 'shield_tampered']);
  // Another KP under the same wrapped key: the MAC (made with the data key) refuses a KP swapped in by hand.
  const swapped = Buffer.concat([bytes.subarray(0, 44), Buffer.from([kp.length + 1, 0, 0, 0]), bytes.subarray(48, 52), kp, Buffer.from('x'), bytes.subarray(52 + kp.length)]);
  assert.equal(code(() => openShieldItem(parseShieldItem(swapped), tk)), 'shield_tampered');
  // Grant/revoke (new KP) and roll (new transport key) keep the data key.
  const tk2 = randomBytes(32);
  const rolled = parseShieldItem(reseal(item, opened, { kp: Buffer.from('new kp'), transportKey: tk2, generation: 4n }));
  const again = openShieldItem(rolled, tk2);
  assert.ok(again.xts.equals(key.xts));
  assert.equal(code(() => openShieldItem(rolled, tk)), 'shield_key_mismatch');
  assert.equal(rolled.generation, 4n);
  opened.wipe();
  assert.ok(opened.xts.every((b) => b === 0));
});
