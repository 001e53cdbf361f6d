import { test } from 'node:test';
import assert from 'node:assert/strict';
import { crc32c } from '../../core/vhdx/crc32c.ts';
import { readGuid, writeGuid } from '../../core/vhdx/guid.ts';
import { batGeometry, batIndexOfBlock, decodeBatEntry, MiB, REGION } from '../../core/vhdx/structures.ts';

test('CRC-32C matches the Castagnoli check value', () => {
  assert.equal(crc32c(Buffer.from('123456789')), 0xe3069283);
  assert.equal(crc32c(Buffer.alloc(0)), 0);
});

test('GUIDs use the mixed-endian on-disk form (BAT region GUID as Windows writes it)', () => {
  const disk = Buffer.from('6677c22d23f600429d64115e9bfd4a08', 'hex');
  assert.equal(readGuid(disk, 0), REGION.BAT);
  const out = Buffer.alloc(16);
  writeGuid(REGION.BAT, out, 0);
  assert.deepEqual(out, disk);
});

test('BAT geometry: chunk ratio and interleaved sector-bitmap entries (MS-VHDX §2.5)', () => {
  const g = batGeometry({ blockSize: 32 * MiB, logicalSectorSize: 512, virtualSize: 10 * 1024 * MiB, hasParent: false, leaveBlockAllocated: false, virtualDiskId: '', physicalSectorSize: 512 });
  assert.equal(g.chunkRatio, 128);
  assert.equal(g.payloadBlocks, 320);
  assert.equal(g.entries, 320 + 2); // two sector-bitmap entries between payload blocks 128/129 and 256/257
  assert.equal(batIndexOfBlock(127, 128), 127);
  assert.equal(batIndexOfBlock(128, 128), 129);
  assert.equal(batGeometry({ blockSize: MiB, logicalSectorSize: 4096, virtualSize: MiB, hasParent: false, leaveBlockAllocated: false, virtualDiskId: '', physicalSectorSize: 4096 }).chunkRatio, 32768);
  assert.deepEqual(decodeBatEntry((5n << 20n) | 6n), { state: 6, fileOffset: 5 * MiB });
});
