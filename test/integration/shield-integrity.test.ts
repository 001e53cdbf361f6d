// Integrity mode against a storage admin who edits the file: flipped payload bits, flipped tag
// bits, two units swapped (with their tags), a unit zeroed with its tag, and a whole-disk rollback
// to an older copy are each detected — the read fails with integrity_violation (or the open with
// shield_rollback) and an event for the audit trail, and never returns the forged bytes. Crash
// recovery: only regions marked dirty are re-tagged on the next read-write open; an edit in a
// clean region is still caught. The independent parser confirms the tag region is Required = 1
// and the disk fully allocated; qemu refuses the file.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ShieldedDisk, shieldImage, type IntegrityEvent } from '../../core/shield/disk.ts';
import { TAG_REGION, TAG_BYTES, DIRTY_SPAN } from '../../core/shield/integrity.ts';
import { ShieldError } from '../../core/errors.ts';
import { tempDir } from '../helpers/home.ts';
import { MiB, qemuImg, qemuMissing } from '../helpers/qemu.ts';
import { rawBat, rawLayout } from '../helpers/vhdx-raw.ts';

const skip = qemuMissing() ?? false;
const KP = Buffer.from('stand-in key protector');
const UNIT = 4096;

async function expectCode(p: Promise<unknown>, code: string): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof ShieldError, `not a ShieldError: ${String(err)}`);
    assert.equal(err.code, code, err.message);
    return true;
  });
}

/** Where virtual byte `offset` lives in the file (block lookup through the independent parser). */
function fileOffsetOf(file: Buffer, offset: number): number {
  const l = rawLayout(file);
  const bat = rawBat(file, l);
  const block = Math.floor(offset / l.blockSize);
  return bat[block]!.fileOffset + (offset % l.blockSize);
}

function tagOffsetOf(file: Buffer, unit: number): number {
  return rawLayout(file).regions.find((r) => r.guid === TAG_REGION)!.fileOffset + unit * TAG_BYTES;
}

test('integrity mode: edits, swaps, zeroing and rollback are detected; clean regions are never re-tagged', { skip }, async () => {
  const { dir, cleanup } = tempDir();
  try {
    const plain = randomBytes(10 * MiB);
    plain.fill(0, 4 * MiB, 6 * MiB); // zeros are encrypted and tagged too
    const input = join(dir, 'in.raw');
    writeFileSync(input, plain);
    const path = join(dir, 'i.vhdx');
    const tk = randomBytes(32);
    const made = await shieldImage(input, 'raw', path, { kp: KP, transportKey: tk, integrity: true });
    assert.equal(made.integrity, true);
    const file = readFileSync(path);
    const l = rawLayout(file);
    const tagRegion = l.regions.find((r) => r.guid === TAG_REGION)!;
    assert.equal(tagRegion.required, 1, 'the tag region is Required');
    assert.ok(rawBat(file, l).slice(0, 5).every((e) => e.state === 6), 'every block allocated');
    assert.throws(() => qemuImg(['info', '-f', 'vhdx', path]));

    const events: IntegrityEvent[] = [];
    const open = async (p: string, opts: { readOnly?: boolean; lastSeenGeneration?: bigint } = {}) => ShieldedDisk.open(p, tk, { ...opts, onIntegrityEvent: (e) => events.push(e) });
    let d = await open(path, { readOnly: true });
    assert.ok((await d.read(0, plain.length)).equals(plain));
    await d.close();

    const tampered = (name: string, edit: (b: Buffer) => void) => {
      const b = Buffer.from(file);
      edit(b);
      const p = join(dir, `${name}.vhdx`);
      writeFileSync(p, b);
      return p;
    };
    const unitA = 300;
    const unitB = 301;
    const cases: [string, (b: Buffer) => void, number][] = [
      ['payload-bit', (b) => (b[fileOffsetOf(b, unitA * UNIT + 77)]! ^= 0x10), unitA],
      ['tag-bit', (b) => (b[tagOffsetOf(b, unitA) + 3]! ^= 0x01), unitA],
      [
        'swap',
        (b) => {
          const a = fileOffsetOf(b, unitA * UNIT);
          const c = fileOffsetOf(b, unitB * UNIT);
          const tmp = Buffer.from(b.subarray(a, a + UNIT));
          b.copy(b, a, c, c + UNIT);
          tmp.copy(b, c);
          const ta = tagOffsetOf(b, unitA);
          const tc = tagOffsetOf(b, unitB);
          const tt = Buffer.from(b.subarray(ta, ta + TAG_BYTES));
          b.copy(b, ta, tc, tc + TAG_BYTES);
          tt.copy(b, tc);
        },
        unitA,
      ],
      [
        'zeroed',
        (b) => {
          b.fill(0, fileOffsetOf(b, unitA * UNIT), fileOffsetOf(b, unitA * UNIT) + UNIT);
          b.fill(0, tagOffsetOf(b, unitA), tagOffsetOf(b, unitA) + TAG_BYTES);
        },
        unitA,
      ],
    ];
    for (const [name, edit, unit] of cases) {
      const p = tampered(name, edit);
      events.length = 0;
      d = await open(p, { readOnly: true });
      await expectCode(d.read(unit * UNIT, UNIT), 'integrity_violation');
      await expectCode(d.read(0, plain.length), 'integrity_violation');
      assert.ok((await d.read(0, unitA * UNIT)).equals(plain.subarray(0, unitA * UNIT)), `${name}: untouched units still read`);
      await d.close();
      assert.equal(events[0]?.kind, 'violation', name);
      assert.equal((events[0] as { unit: number }).unit, unit, name);
      // A read-write open does not launder it: the region was clean, so nothing is re-tagged.
      d = await open(p);
      await expectCode(d.read(unit * UNIT, UNIT), 'integrity_violation');
      await d.close();
    }

    // Rollback: generation 1 after shielding; each read-write open moves it on.
    const old = join(dir, 'old.vhdx');
    copyFileSync(path, old);
    d = await open(path);
    assert.equal(d.generation, 2n);
    await d.write(5000, Buffer.from('new data'));
    await d.close();
    copyFileSync(old, path);
    await expectCode(open(path, { lastSeenGeneration: 2n }), 'shield_rollback');

    // Crash recovery: a region marked dirty (write under way) is re-tagged from its contents on the
    // next read-write open; the same edit outside it is caught.
    d = await open(old);
    await d.write(2 * MiB, Buffer.alloc(UNIT, 0x42)); // marks region 0 dirty, durably
    const crashed = join(dir, 'crashed.vhdx');
    copyFileSync(old, crashed); // the file as a kill -9 would leave it: session open, region 0 dirty
    await d.close();
    const b = readFileSync(crashed);
    b[fileOffsetOf(b, 2 * MiB + 10)]! ^= 0xff; // "the data landed, its tag did not"
    writeFileSync(crashed, b);
    events.length = 0;
    const ro = await open(crashed, { readOnly: true });
    await assert.rejects(ro.read(2 * MiB, UNIT), /closed uncleanly/);
    await ro.close();
    d = await open(crashed);
    assert.deepEqual(events.map((e) => e.kind), ['violation', 'retagged']);
    assert.equal(DIRTY_SPAN > 10 * MiB, true); // the whole 10 MiB disk is region 0
    const after = await d.read(2 * MiB, UNIT);
    assert.equal(after.length, UNIT);
    await d.close();
  } finally {
    cleanup();
  }
});
