// A dirty log crafted per MS-VHDX §2.3: our read-only open replays it in memory (and never touches
// the file); QEMU replays the same file read-write; both must then read the same bytes.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomUUID } from 'node:crypto';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { openVhdx } from '../../core/vhdx/mod.ts';
import { ShieldError } from '../../core/errors.ts';
import { makeImage, qemuImg, qemuIo, qemuMissing, MiB } from '../helpers/qemu.ts';
import { crc32c, fixChecksum, HEADER_OFFSETS, rawLayout, writeGuid } from '../helpers/vhdx-raw.ts';
import { tempDir } from '../helpers/home.ts';

const skip = qemuMissing();
const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** One log entry at log offset 0: a data descriptor that rewrites the BAT's first 4 KiB sector. */
function craftDirtyLog(file: string, opts: { payloadAt: number; fill: number }): void {
  const b = readFileSync(file);
  const layout = rawLayout(b);
  const grown = Buffer.alloc(opts.payloadAt + MiB);
  b.copy(grown);
  grown.fill(opts.fill, opts.payloadAt, opts.payloadAt + MiB); // the payload a logged BAT update points to
  const newBatSector = Buffer.from(grown.subarray(layout.batOffset, layout.batOffset + 4096));
  newBatSector.writeBigUInt64LE((BigInt(opts.payloadAt / MiB) << 20n) | 6n, 0); // block 0: FULLY_PRESENT
  const logGuid = randomUUID();
  const entry = Buffer.alloc(8192);
  entry.write('loge', 0, 'latin1');
  entry.writeUInt32LE(8192, 8); // EntryLength
  entry.writeUInt32LE(0, 12); // Tail: itself
  entry.writeBigUInt64LE(1n, 16); // SequenceNumber
  entry.writeUInt32LE(1, 24); // DescriptorCount
  writeGuid(entry, 32, logGuid);
  entry.writeBigUInt64LE(BigInt(grown.length), 48); // FlushedFileOffset
  entry.writeBigUInt64LE(BigInt(grown.length), 56); // LastFileOffset
  const d = 64;
  entry.write('desc', d, 'latin1');
  newBatSector.copy(entry, d + 4, 4092, 4096); // TrailingBytes
  newBatSector.copy(entry, d + 8, 0, 8); // LeadingBytes
  entry.writeBigUInt64LE(BigInt(layout.batOffset), d + 16);
  entry.writeBigUInt64LE(1n, d + 24);
  entry.write('data', 4096, 'latin1');
  entry.writeUInt32LE(0, 4096 + 4); // SequenceHigh
  newBatSector.copy(entry, 4096 + 8, 8, 4092);
  entry.writeUInt32LE(1, 4096 + 4092); // SequenceLow
  entry.writeUInt32LE(crc32c(entry), 4);
  entry.copy(grown, layout.current.logOffset);
  for (const h of HEADER_OFFSETS) {
    writeGuid(grown, h + 48, logGuid);
    fixChecksum(grown, h, 4096);
  }
  writeFileSync(file, grown);
}

test('a dirty log: replayed in memory read-only (file untouched), same bytes as QEMU’s replay', { skip: skip ?? false }, async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const img = makeImage(dir, { type: 'dynamic', size: 8 * MiB, blockSize: MiB, writes: [{ offset: 3 * MiB, length: 4096, byte: 0x33 }] });
  craftDirtyLog(img.path, { payloadAt: 12 * MiB, fill: 0x5a });
  const before = sha(readFileSync(img.path));

  // QEMU refuses the read-only open and replays on a read-write one.
  assert.throws(() => qemuIo(['-r', '-f', 'vhdx', '-c', 'read 0 512', img.path]));
  const qemuCopy = join(dir, 'qemu-replayed.vhdx');
  copyFileSync(img.path, qemuCopy);
  qemuIo(['-f', 'vhdx', '-c', 'read -P 0x5a 0 1M', qemuCopy]);
  const qemuRaw = join(dir, 'qemu-replayed.raw');
  qemuImg(['convert', '-f', 'vhdx', '-O', 'raw', qemuCopy, qemuRaw]);

  const image = await openVhdx(img.path);
  try {
    assert.equal(image.info.logDirty, true);
    const ours = await image.read(0, image.info.metadata.virtualSize);
    assert.ok(ours.subarray(0, MiB).every((x) => x === 0x5a), 'block 0 comes from the logged BAT update');
    assert.ok(ours.subarray(3 * MiB, 3 * MiB + 4096).every((x) => x === 0x33));
    assert.equal(sha(ours), sha(readFileSync(qemuRaw)));
  } finally {
    await image.close();
  }
  assert.equal(sha(readFileSync(img.path)), before, 'a read-only open never writes');
});

test('a log entry with a bad checksum: refused as corrupt, with the reason', { skip: skip ?? false }, async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const img = makeImage(dir, { type: 'dynamic', size: 4 * MiB, blockSize: MiB });
  craftDirtyLog(img.path, { payloadAt: 12 * MiB, fill: 0x5a });
  const b = readFileSync(img.path);
  const logOffset = rawLayout(b).current.logOffset;
  b[logOffset + 4096 + 100]! ^= 0xff; // inside the data sector, covered by the entry checksum
  writeFileSync(img.path, b);
  await assert.rejects(openVhdx(img.path), (e: unknown) => e instanceof ShieldError && e.code === 'vhdx_corrupt' && /no valid log sequence/.test(e.message));
  // Truncated below FlushedFileOffset: refused too.
  craftDirtyLog(img.path, { payloadAt: 12 * MiB, fill: 0x5a });
  writeFileSync(img.path, readFileSync(img.path).subarray(0, 12 * MiB));
  await assert.rejects(openVhdx(img.path), (e: unknown) => e instanceof ShieldError && e.code === 'vhdx_corrupt' && /truncated/.test(e.message));
});
