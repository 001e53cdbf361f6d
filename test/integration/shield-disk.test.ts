// Shielded disks over real images, judged by independent oracles: qemu-made raw data shielded and
// read back (and unshielded) byte for byte, `cmp`-style against qemu's own conversion; no plaintext
// sector of the known pattern anywhere in the shielded file; qemu refuses to open it as a VHDX; a
// copy with the shield item's Required bit cleared (the only way qemu will look at it) passes
// `qemu-img check`; writes (aligned, unaligned, zeroes, discards) survive a reopen; resealing for a
// new KP or transport key rewrites the item only, never a payload byte.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { SHIELD_ITEM, ShieldedDisk, readShieldItem, shieldImage, unshieldImage } from '../../core/shield/mod.ts';
import { ShieldError } from '../../core/errors.ts';
import { tempDir } from '../helpers/home.ts';
import { MiB, makeImage, qemuImg, qemuMissing } from '../helpers/qemu.ts';
import { rawLayout } from '../helpers/vhdx-raw.ts';
import { rng } from '../helpers/random.ts';

const skip = qemuMissing() ?? false;
const KP = Buffer.from('stand-in key protector bytes (the KP format is tested with the guardians)');

async function expectCode(p: Promise<unknown>, code: string): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof ShieldError, `not a ShieldError: ${String(err)}`);
    assert.equal(err.code, code, err.message);
    return true;
  });
}

/** A copy qemu agrees to open: the shield item's IsRequired bit cleared (test only). */
function qemuViewable(dir: string, path: string): string {
  const b = readFileSync(path);
  const item = rawLayout(b).items.find((i) => i.itemId === SHIELD_ITEM)!;
  b.writeUInt32LE(item.flags & ~4, item.entryOffset + 24);
  const out = join(dir, 'viewable.vhdx');
  writeFileSync(out, b);
  return out;
}

const payloadHash = (path: string) => {
  const b = readFileSync(path);
  return createHash('sha256').update(b.subarray(rawLayout(b).regions.reduce((m, r) => Math.max(m, r.fileOffset + r.length), 0))).digest('hex');
};

test('shield → read → unshield round trip; no plaintext in the file; qemu refuses it', { skip }, async () => {
  const { dir, cleanup } = tempDir();
  try {
    // A recognisable 512-byte pattern in many places, as a filesystem would leave it.
    const img = makeImage(dir, {
      type: 'dynamic',
      size: 40 * MiB + 3 * 512,
      blockSize: MiB,
      writes: [
        { offset: 0, length: 3 * MiB, byte: 0x5a },
        { offset: 17 * MiB + 512, length: 5 * MiB, byte: 0xa5 },
        { offset: 40 * MiB, length: 1536, byte: 0x33 },
      ],
    });
    const raw = readFileSync(img.raw);
    const tk = randomBytes(32);
    for (const [from, input] of [['vhdx', img.path], ['raw', img.raw]] as const) {
      const out = join(dir, `shielded-${from}.vhdx`);
      const r = await shieldImage(input, from, out, { kp: KP, transportKey: tk });
      assert.equal(r.virtualSize, raw.length);
      assert.deepEqual([r.dataBlocks, r.blocks], [7, 21], "2 MiB blocks: only the 7 holding data are allocated");
      const file = readFileSync(out);
      for (const byte of [0x5a, 0xa5, 0x33]) assert.equal(file.indexOf(Buffer.alloc(512, byte)), -1, `plaintext 0x${byte.toString(16)} sector in the shielded file`);
      assert.throws(() => qemuImg(['info', '-f', 'vhdx', out]), 'qemu must refuse the shielded file');
      assert.match(qemuImg(['check', '-f', 'vhdx', qemuViewable(dir, out)]), /No errors were found/);
      const disk = await ShieldedDisk.open(out, tk, { readOnly: true });
      assert.ok((await disk.read(0, raw.length)).equals(raw), `${from}: decrypted reads equal qemu's raw conversion`);
      assert.ok((await disk.read(17 * MiB + 100, 7000)).equals(raw.subarray(17 * MiB + 100, 17 * MiB + 7100)), 'an unaligned read');
      await disk.close();
      await expectCode(ShieldedDisk.open(out, randomBytes(32)), 'shield_key_mismatch');
      const back = join(dir, `back-${from}.raw`);
      await unshieldImage(out, tk, back, 'raw');
      assert.ok(readFileSync(back).equals(raw), `${from}: unshield gives the original bytes`);
      const backVhdx = join(dir, `back-${from}.vhdx`);
      await unshieldImage(out, tk, backVhdx, 'vhdx');
      qemuImg(['compare', '-f', 'vhdx', '-F', 'raw', backVhdx, img.raw]);
      await expectCode(shieldImage(input, from, out, { kp: KP, transportKey: tk }), 'already_exists');
    }
  } finally {
    cleanup();
  }
});

test('writes through a shielded disk survive a reopen; reseal changes only the item', { skip }, async () => {
  const { dir, cleanup } = tempDir();
  try {
    const base = join(dir, 'base.raw');
    writeFileSync(base, Buffer.alloc(12 * MiB));
    const out = join(dir, 's.vhdx');
    const tk = randomBytes(32);
    await shieldImage(base, 'raw', out, { kp: KP, transportKey: tk });
    const mirror = Buffer.alloc(12 * MiB);
    const r = rng(5);
    let disk = await ShieldedDisk.open(out, tk);
    for (let i = 0; i < 60; i++) {
      const len = 512 * (1 + Math.floor(r() * 40));
      const off = 512 * Math.floor((r() * (mirror.length - len)) / 512);
      const data = randomBytes(len);
      data.copy(mirror, off);
      await disk.write(off, data, i % 10 === 0);
    }
    await disk.writeZeroes(2 * MiB, 2 * MiB); // whole blocks
    mirror.fill(0, 2 * MiB, 4 * MiB);
    await disk.writeZeroes(5 * MiB + 1000, 9000); // unaligned edges
    mirror.fill(0, 5 * MiB + 1000, 5 * MiB + 10000);
    await disk.trim(8 * MiB, 2 * MiB);
    mirror.fill(0, 8 * MiB, 10 * MiB);
    assert.ok((await disk.read(0, mirror.length)).equals(mirror));
    const status = await disk.blockStatus(0, mirror.length);
    assert.ok(status.some((s) => s.hole) && status.some((s) => !s.hole));
    await disk.close();
    disk = await ShieldedDisk.open(out, tk);
    assert.ok((await disk.read(0, mirror.length)).equals(mirror), 'after reopening');
    const before = payloadHash(out);
    const tk2 = randomBytes(32);
    await disk.reseal({ kp: Buffer.from('another KP'), transportKey: tk2 });
    await disk.close();
    assert.equal(payloadHash(out), before, 'resealing never touches the payload');
    const { item } = await readShieldItem(out);
    assert.equal(item.kp.toString(), 'another KP');
    await expectCode(ShieldedDisk.open(out, tk), 'shield_key_mismatch');
    disk = await ShieldedDisk.open(out, tk2);
    assert.ok((await disk.read(0, mirror.length)).equals(mirror));
    await disk.close();
    assert.match(qemuImg(['check', '-f', 'vhdx', qemuViewable(dir, out)]), /No errors were found/);
  } finally {
    cleanup();
  }
});
