// `vhdx check` and `--repair`, judged by independent oracles. Each damage is made with the raw test
// parser (test/helpers/vhdx-raw.ts, which shares no code with core/vhdx) on a qemu-made and on one
// of our own images; the check must name it with its stable code and leave the file untouched.
// After --repair our second check is clean, and so are the outside views: `qemu-img check` finds
// no errors, qemu's raw conversion and our reader give the expected bytes (dropped blocks read
// zeros, every other block keeps its data), vhdiinfo parses the file.
//
// What `qemu-img check` (7.2) itself says about each damaged file, asserted below:
// - BAT entry beyond EOF, BAT entry inside the BAT region: detected (exit 2), but its `-r all`
//   cannot fix them (it only replays logs);
// - dirty log: refuses the read-only open (exit 1, "needs to be replayed"); `-r all` replays it —
//   our repair must leave the same disk contents;
// - damaged header 2 or region table 2, two blocks sharing an offset, ZERO with an offset,
//   PARTIALLY_PRESENT in a dynamic disk, garbage after the last block: missed (exit 0). QEMU uses
//   header/table 1 only, has no leak accounting for VHDX, never compares offsets, and fails only
//   when a PARTIALLY_PRESENT block is read (EIO).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { copyFileSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { checkVhdx, createVhdx, openVhdx, type CheckReport } from '../../core/vhdx/mod.ts';
import { ShieldError } from '../../core/errors.ts';
import { cliJson, runCli, tempDir } from '../helpers/home.ts';
import { MiB, makeImage, qemuImg, qemuInfo, qemuMissing, vhdiinfo, vhdiMissing } from '../helpers/qemu.ts';
import {
  HEADER_OFFSETS,
  REGION_TABLE_OFFSETS,
  REGION_TABLE_SIZE,
  buildVhdx,
  craftDirtyLog,
  fixChecksum,
  linuxLocator,
  rawBat,
  rawHeader,
  rawLayout,
  type RawLayout,
} from '../helpers/vhdx-raw.ts';

const skip = qemuMissing() ?? vhdiMissing() ?? false;

const SIZE = 24 * MiB;
/** Written into every base image: blocks 0, 5 and 10 (1 MiB blocks) hold data, in that file order. */
const WRITES = [
  { offset: 0, length: 70000, byte: 0x5a },
  { offset: 5 * MiB, length: 4096, byte: 0x01 },
  { offset: 10 * MiB + 512, length: 8192, byte: 0x02 },
];
/** A block no write touched: damage points it somewhere. */
const VICTIM = 7;

function qemuCheck(path: string): { status: number | null; out: string } {
  const r = spawnSync('qemu-img', ['check', '-f', 'vhdx', path], { encoding: 'utf8' });
  return { status: r.status, out: `${r.stdout}${r.stderr}` };
}

function qemuRead(dir: string, path: string): Buffer {
  const raw = join(dir, `view-${Math.random().toString(36).slice(2)}.raw`);
  qemuImg(['convert', '-f', 'vhdx', '-O', 'raw', path, raw]);
  return readFileSync(raw);
}

async function ourRead(path: string): Promise<Buffer> {
  const img = await openVhdx(path);
  try {
    return await img.read(0, img.info.metadata.virtualSize);
  } finally {
    await img.close();
  }
}

function setBat(b: Buffer, l: RawLayout, block: number, state: number, offset: number): void {
  const chunkRatio = (2 ** 23 * l.logicalSectorSize) / l.blockSize;
  b.writeBigUInt64LE((BigInt(offset / MiB) << 20n) | BigInt(state), l.batOffset + 8 * (block + Math.floor(block / chunkRatio)));
}

function codes(r: CheckReport): string[] {
  return r.findings.map((f) => f.code);
}

function assertClean(r: CheckReport, what: string): void {
  assert.deepEqual(r.findings, [], `${what}: ${JSON.stringify(r.findings)}`);
  assert.equal(r.summary.errors + r.summary.leaks + r.summary.warnings, 0, what);
}

interface Damage {
  name: string;
  /** The damaged copy of `b` (a well-formed dynamic image with blocks 0, 5, 10 present). */
  make(b: Buffer, l: RawLayout): { bytes: Buffer; expect?: (mirror: Buffer) => void };
  code: string;
  severity: 'error' | 'leak';
  /** What `qemu-img check` (no -r) says about the damaged file. */
  qemu: { status: number; match?: RegExp };
}

const DAMAGES: Damage[] = [
  {
    name: 'header 2 checksum broken',
    make: (b) => {
      b[HEADER_OFFSETS[1] + 200]! ^= 0xff;
      return { bytes: b };
    },
    code: 'header_invalid',
    severity: 'error',
    qemu: { status: 0 },
  },
  {
    name: 'region table 2 broken',
    make: (b) => {
      b[REGION_TABLE_OFFSETS[1] + 17]! ^= 0x01;
      return { bytes: b };
    },
    code: 'region_table_invalid',
    severity: 'error',
    qemu: { status: 0 },
  },
  {
    name: 'dirty log',
    make: (b) => {
      const dirty = craftDirtyLog(b, { block: 3, byte: 0xa5 });
      return {
        bytes: dirty.bytes,
        expect: (m) => {
          m.fill(0xa5, 3 * MiB, 4 * MiB);
          if (dirty.zeroed) m.fill(0, dirty.zeroed.offset, dirty.zeroed.offset + dirty.zeroed.length);
        },
      };
    },
    code: 'log_dirty',
    severity: 'error',
    qemu: { status: 1, match: /log that needs to be replayed/ },
  },
  {
    name: 'BAT entry beyond EOF',
    make: (b, l) => {
      setBat(b, l, VICTIM, 6, 100 * MiB);
      return { bytes: b };
    },
    code: 'bat_entry_beyond_eof',
    severity: 'error',
    qemu: { status: 2, match: /points after end of file/ },
  },
  {
    name: 'two BAT entries sharing an offset',
    make: (b, l) => {
      setBat(b, l, VICTIM, 6, rawBat(b, l)[5]!.fileOffset);
      return { bytes: b };
    },
    code: 'bat_entry_overlap',
    severity: 'error',
    qemu: { status: 0 },
  },
  {
    name: 'ZERO entry with a non-zero offset',
    make: (b, l) => {
      setBat(b, l, VICTIM, 2, rawBat(b, l)[5]!.fileOffset);
      return { bytes: b };
    },
    code: 'bat_offset_nonzero',
    severity: 'error',
    qemu: { status: 0 },
  },
  {
    name: 'trailing garbage after the last block',
    make: (b) => ({ bytes: Buffer.concat([b, Buffer.alloc(3 * MiB, 0xee)]) }),
    code: 'leaked_space',
    severity: 'leak',
    qemu: { status: 0 },
  },
  {
    name: 'PARTIALLY_PRESENT in a dynamic disk',
    make: (b, l) => {
      // Block 10 is the last in the file: dropped, its space is cut off with the rest of the tail.
      setBat(b, l, 10, 7, rawBat(b, l)[10]!.fileOffset);
      return { bytes: b, expect: (m) => m.fill(0, 10 * MiB, 11 * MiB) };
    },
    code: 'partially_present_in_non_differencing',
    severity: 'error',
    qemu: { status: 0 },
  },
];

async function bases(dir: string): Promise<{ name: string; path: string }[]> {
  const qemu = makeImage(dir, { type: 'dynamic', size: SIZE, blockSize: MiB, writes: WRITES }, 'qemu-base');
  const ours = join(dir, 'ours-base.vhdx');
  await createVhdx(ours, { size: SIZE, blockSize: MiB });
  const w = await openVhdx(ours, { readOnly: false });
  for (const x of WRITES) await w.write(x.offset, Buffer.alloc(x.length, x.byte));
  await w.close();
  return [
    { name: 'qemu-made', path: qemu.path },
    { name: 'ours', path: ours },
  ];
}

test('each damage is found with its code, left untouched by a check, and repaired so that qemu, our reader and vhdiinfo agree', { skip }, async () => {
  const { dir, cleanup } = tempDir();
  try {
    for (const base of await bases(dir)) {
      const original = readFileSync(base.path);
      const l = rawLayout(original);
      const mirror = qemuRead(dir, base.path);
      assertClean((await checkVhdx(base.path)).before, `${base.name}: the undamaged image`);
      for (const [i, d] of DAMAGES.entries()) {
        const what = `${base.name}, ${d.name}`;
        const path = join(dir, `${base.name}-${i}.vhdx`);
        const made = d.make(Buffer.from(original), l);
        writeFileSync(path, made.bytes);

        // QEMU's view of the damaged file (see the header comment).
        const q = qemuCheck(path);
        assert.equal(q.status, d.qemu.status, `${what}: qemu-img check said ${q.out}`);
        if (d.qemu.match) assert.match(q.out, d.qemu.match, what);

        // Read-only: the finding, and not one byte changed.
        const found = await checkVhdx(path);
        assert.ok(codes(found.before).includes(d.code), `${what}: ${JSON.stringify(found.before.findings)}`);
        const f = found.before.findings.find((x) => x.code === d.code)!;
        assert.equal(f.severity, d.severity, what);
        assert.equal(f.repairable, true, what);
        assert.equal(f.repaired, false, what);
        assert.equal(found.after, null);
        assert.ok(readFileSync(path).equals(made.bytes), `${what}: a check without --repair never writes`);

        // Repair: both reports, the second clean.
        const fixed = await checkVhdx(path, { repair: true });
        assert.ok(fixed.before.findings.find((x) => x.code === d.code)!.repaired, `${what}: marked repaired`);
        assertClean(fixed.after!, `${what}: after repair`);

        // The independent oracles.
        const expected = Buffer.from(mirror);
        made.expect?.(expected);
        const qc = qemuCheck(path);
        assert.equal(qc.status, 0, `${what}: qemu-img check after repair: ${qc.out}`);
        assert.match(qc.out, /No errors were found/, what);
        assert.ok(qemuRead(dir, path).equals(expected), `${what}: qemu reads the expected bytes`);
        assert.ok((await ourRead(path)).equals(expected), `${what}: our reader reads the expected bytes`);
        assert.equal(vhdiinfo(path).mediaSize, SIZE, what);
        const after = readFileSync(path);
        const al = rawLayout(after);
        assert.ok(rawHeader(after, 0).valid && rawHeader(after, 1).valid, `${what}: both headers valid`);
        assert.equal(al.current.logGuid, '00000000-0000-0000-0000-000000000000', `${what}: the log is empty`);
        const t1 = after.subarray(REGION_TABLE_OFFSETS[0], REGION_TABLE_OFFSETS[0] + REGION_TABLE_SIZE);
        const t2 = after.subarray(REGION_TABLE_OFFSETS[1], REGION_TABLE_OFFSETS[1] + REGION_TABLE_SIZE);
        assert.ok(t1.equals(t2), `${what}: both region tables agree`);
        const batAfter = rawBat(after, al);
        for (const e of batAfter) if (e.state !== 6) assert.equal(e.fileOffset, 0, `${what}: FileOffsetMB 0 outside FULLY_PRESENT`);
        if (d.code === 'bat_entry_beyond_eof' || d.code === 'bat_entry_overlap') assert.equal(batAfter[VICTIM]!.state, 2, `${what}: the dropped block is ZERO`);
        if (d.code === 'bat_entry_overlap') assert.equal(batAfter[5]!.state, 6, `${what}: the first block keeps its place`);
        if (d.code === 'leaked_space' || d.code === 'partially_present_in_non_differencing') {
          assert.ok(after.length <= original.length, `${what}: the tail was cut off (${after.length} bytes)`);
        }
      }
    }
  } finally {
    cleanup();
  }
});

test('more damages: disagreeing headers (QEMU refuses), a file cut short (QEMU detects), a reserved state', { skip }, async () => {
  const { dir, cleanup } = tempDir();
  try {
    const [qemu] = await bases(dir);
    const original = readFileSync(qemu!.path);
    const l = rawLayout(original);
    const mirror = qemuRead(dir, qemu!.path);
    const cases: { name: string; bytes: Buffer; code: string; qemu: number; expect?: Buffer }[] = [];
    const disagree = Buffer.from(original);
    disagree.writeBigUInt64LE(disagree.readBigUInt64LE(HEADER_OFFSETS[0] + 8), HEADER_OFFSETS[1] + 8);
    disagree[HEADER_OFFSETS[1] + 16]! ^= 1; // another FileWriteGuid, same sequence number
    fixChecksum(disagree, HEADER_OFFSETS[1], 4096);
    cases.push({ name: 'equal sequence numbers, different headers', bytes: disagree, code: 'headers_disagree', qemu: 1 });
    // Cut inside the last block (block 10, whose data is in its first 9 KiB): the rest is zero-filled.
    cases.push({ name: 'file cut short', bytes: original.subarray(0, original.length - MiB / 2), code: 'file_truncated', qemu: 2 });
    const reserved = Buffer.from(original);
    setBat(reserved, l, VICTIM, 4, 0); // readers refuse it (QEMU: EIO); repaired to ZERO
    cases.push({ name: 'reserved state 4', bytes: reserved, code: 'bat_reserved_state', qemu: 0 });
    for (const c of cases) {
      const path = join(dir, `more-${c.code}.vhdx`);
      writeFileSync(path, c.bytes);
      assert.equal(qemuCheck(path).status, c.qemu, `${c.name}: ${qemuCheck(path).out}`);
      const r = await checkVhdx(path, { repair: true });
      assert.deepEqual(codes(r.before), [c.code], c.name);
      assertClean(r.after!, c.name);
      assert.equal(qemuCheck(path).status, 0, c.name);
      const expected = c.expect ?? mirror;
      assert.ok(qemuRead(dir, path).equals(expected), `${c.name}: qemu reads the expected bytes`);
      assert.ok((await ourRead(path)).equals(expected), `${c.name}: our reader too`);
    }
  } finally {
    cleanup();
  }
});

test('a dirty log: our repair leaves the disk qemu-img check -r all leaves', { skip }, async () => {
  const { dir, cleanup } = tempDir();
  try {
    const [qemu] = await bases(dir);
    const dirty = craftDirtyLog(readFileSync(qemu!.path), { block: 2, byte: 0x3c });
    const ours = join(dir, 'ours.vhdx');
    const theirs = join(dir, 'theirs.vhdx');
    writeFileSync(ours, dirty.bytes);
    writeFileSync(theirs, dirty.bytes);
    const q = spawnSync('qemu-img', ['check', '-r', 'all', '-f', 'vhdx', theirs], { encoding: 'utf8' });
    assert.equal(q.status, 0, q.stdout + q.stderr);
    assert.match(q.stdout, /found and repaired:[\s\S]*\b1 corruptions/, 'qemu counts the replay as one repaired corruption');
    const r = await checkVhdx(ours, { repair: true });
    assert.deepEqual(codes(r.before), ['log_dirty']);
    assertClean(r.after!, 'after repair');
    assert.ok(qemuRead(dir, ours).equals(qemuRead(dir, theirs)), 'the same disk contents as QEMU after its replay');
  } finally {
    cleanup();
  }
});

test('fixed disks keep their size; region table 1 damaged (QEMU refuses) is rewritten from table 2', { skip }, async () => {
  const { dir, cleanup } = tempDir();
  try {
    const path = join(dir, 'fixed.vhdx');
    await createVhdx(path, { size: 8 * MiB, type: 'fixed', blockSize: MiB });
    const w = await openVhdx(path, { readOnly: false });
    await w.write(0, Buffer.alloc(8 * MiB, 0x44));
    await w.close();
    const b = readFileSync(path);
    const l = rawLayout(b);
    const size = b.length;
    setBat(b, l, 6, 6, 4096 * MiB); // beyond EOF
    b[REGION_TABLE_OFFSETS[0] + 17]! ^= 0x01;
    writeFileSync(path, b);
    assert.equal(qemuCheck(path).status, 1, 'QEMU cannot even open it (table 1 only)');
    const r = await checkVhdx(path, { repair: true });
    assert.deepEqual(codes(r.before).sort(), ['bat_entry_beyond_eof', 'region_table_invalid']);
    assertClean(r.after!, 'after repair');
    assert.equal(statSync(path).size, size, 'a fixed file keeps its size');
    const expected = Buffer.alloc(8 * MiB, 0x44).fill(0, 6 * MiB, 7 * MiB);
    assert.ok(qemuRead(dir, path).equals(expected));
    assert.ok((await ourRead(path)).equals(expected));
    assert.equal(qemuCheck(path).status, 0);
  } finally {
    cleanup();
  }
});

test('differencing disks are checked, not repaired; interior leaks are reported and stay', { skip }, async () => {
  const { dir, cleanup } = tempDir();
  try {
    const base = buildVhdx({ virtualSize: 8 * MiB, blockSize: MiB, logicalSectorSize: 512, blocks: { 0: { state: 'full', tag: 1 } } });
    writeFileSync(join(dir, 'base.vhdx'), base.bytes);
    const child = buildVhdx({
      virtualSize: 8 * MiB,
      blockSize: MiB,
      logicalSectorSize: 512,
      locator: linuxLocator(join(dir, 'base.vhdx'), base.dataWriteGuid, 'base.vhdx'),
      blocks: { 1: { state: 'partial', tag: 2, present: [[0, 8]] }, 2: { state: 'full', tag: 3 } },
    });
    const path = join(dir, 'child.vhdx');
    writeFileSync(path, child.bytes);
    assertClean((await checkVhdx(path)).before, 'a well-formed differencing disk');
    const b = Buffer.from(child.bytes);
    setBat(b, rawLayout(b), 3, 6, 999 * MiB);
    writeFileSync(path, b);
    const r = await checkVhdx(path, { repair: true });
    assert.deepEqual(codes(r.before), ['bat_entry_beyond_eof']);
    assert.equal(r.before.findings[0]!.repairable, false);
    assert.match(r.before.cannotRepair ?? '', /differencing/);
    assert.ok(readFileSync(path).equals(b), 'nothing written');
    assert.deepEqual(codes(r.after!), ['bat_entry_beyond_eof']);

    // A block given back in the middle of a dynamic disk leaves a hole nothing references.
    const dyn = join(dir, 'holes.vhdx');
    await createVhdx(dyn, { size: 8 * MiB, blockSize: MiB });
    const w = await openVhdx(dyn, { readOnly: false });
    await w.write(0, Buffer.alloc(8 * MiB, 9));
    await w.flush();
    await w.discard(2 * MiB, 2 * MiB);
    await w.close();
    const holes = await checkVhdx(dyn, { repair: true });
    assert.deepEqual(codes(holes.before), ['leaked_space']);
    assert.equal(holes.before.findings[0]!.bytes, 2 * MiB);
    assert.equal(holes.before.findings[0]!.repairable, false);
    assert.deepEqual(codes(holes.after!), ['leaked_space']);
    assert.equal(qemuCheck(dyn).status, 0, 'qemu has no leak accounting for VHDX');
  } finally {
    cleanup();
  }
});

test('a large disk: the BAT is streamed with progress; an unparseable file is vhdx_corrupt', { skip }, async () => {
  const { dir, cleanup } = tempDir();
  try {
    const path = join(dir, 'big.vhdx');
    await createVhdx(path, { size: 2 * 1024 * 1024 * MiB, blockSize: MiB }); // 2 TiB: a 16 MiB BAT
    const events: [string, number, number][] = [];
    const r = await checkVhdx(path, { onProgress: (phase, done, total) => events.push([phase, done, total]) });
    assertClean(r.before, 'a fresh 2 TiB disk');
    assert.equal(r.before.checkedBlocks, 2 * 1024 * 1024);
    const last = events[events.length - 1]!;
    assert.equal(last[0], 'checking');
    assert.equal(last[1], last[2]);
    assert.ok(last[2] >= 2 * 1024 * 1024 * 8 && events.length > 16, `progress per BAT page (${events.length} events)`);

    // 300 bad entries spread over the BAT: 20 listed, the rest summed up in one line; all repaired.
    const b = readFileSync(path);
    const l = rawLayout(b);
    for (let i = 0; i < 300; i++) setBat(b, l, i * 6000, 6, (100000 + i) * MiB);
    writeFileSync(path, b);
    const many = await checkVhdx(path, { repair: true });
    assert.equal(many.before.summary.errors, 300);
    assert.equal(many.before.findings.length, 21);
    assert.deepEqual(many.before.findings[20], { code: 'bat_entry_beyond_eof', severity: 'error', message: '… and 280 more like these', repairable: true, repaired: true, count: 280 });
    assertClean(many.after!, 'after repairing 300 entries');
    assert.equal(qemuCheck(path).status, 0);

    writeFileSync(join(dir, 'junk.vhdx'), Buffer.alloc(2 * MiB, 7));
    await assert.rejects(checkVhdx(join(dir, 'junk.vhdx')), (err: unknown) => err instanceof ShieldError && err.code === 'vhdx_corrupt');
    await assert.rejects(checkVhdx(join(dir, 'missing.vhdx')), (err: unknown) => err instanceof ShieldError && err.code === 'not_found');
  } finally {
    cleanup();
  }
});

test('CLI: vhdx check exits 0 / 2 / 3 like qemu-img check, --repair with --json, vhdx resize', { skip }, async () => {
  const { dir, cleanup } = tempDir();
  try {
    const home = ['--home', join(dir, 'home')];
    const clean = join(dir, 'clean.vhdx');
    await createVhdx(clean, { size: 16 * MiB, blockSize: MiB });
    const w = await openVhdx(clean, { readOnly: false });
    await w.write(0, Buffer.alloc(3 * MiB, 0x61));
    await w.close();
    const ok = await runCli([...home, 'vhdx', 'check', clean]);
    assert.equal(ok.code, 0, ok.stderr);
    assert.match(ok.stdout, /No errors were found/);

    const leaky = join(dir, 'leaky.vhdx');
    writeFileSync(leaky, Buffer.concat([readFileSync(clean), Buffer.alloc(2 * MiB, 1)]));
    const leak = await cliJson<{ before: CheckReport; after: null }>([...home, 'vhdx', 'check', leaky]);
    assert.equal(leak.code, 3, 'leaks only');
    assert.equal(leak.body.before.summary.leakedBytes, 2 * MiB);
    assert.equal(leak.body.after, null);

    const broken = join(dir, 'broken.vhdx');
    copyFileSync(leaky, broken);
    const b = readFileSync(broken);
    setBat(b, rawLayout(b), 9, 6, 512 * MiB);
    writeFileSync(broken, b);
    const text = await runCli([...home, 'vhdx', 'check', broken]);
    assert.equal(text.code, 2, 'errors');
    assert.match(text.stdout, /ERROR +bat_entry_beyond_eof: payload block 9/);
    assert.match(text.stdout, /LEAK +leaked_space/);
    assert.match(text.stdout, /--repair/);

    const fixed = await cliJson<{ repair: boolean; before: CheckReport; after: CheckReport }>([...home, 'vhdx', 'check', broken, '--repair']);
    assert.equal(fixed.code, 0, JSON.stringify(fixed.body));
    assert.equal(fixed.body.repair, true);
    assert.deepEqual(codes(fixed.body.before).sort(), ['bat_entry_beyond_eof', 'leaked_space']);
    assert.ok(fixed.body.before.findings.every((f) => f.repaired));
    assertClean(fixed.body.after, 'after --repair');
    assert.equal((await runCli([...home, 'vhdx', 'check', broken])).code, 0);
    assert.equal(qemuCheck(broken).status, 0);

    const junk = join(dir, 'junk.vhdx');
    writeFileSync(junk, Buffer.alloc(2 * MiB));
    const bad = await cliJson<{ error: { code: string } }>([...home, 'vhdx', 'check', junk]);
    assert.equal(bad.code, 1);
    assert.equal(bad.body.error.code, 'vhdx_corrupt');

    const grown = await cliJson<{ oldSize: number; newSize: number; batMoved: boolean }>([...home, 'vhdx', 'resize', clean, '--size', '40M']);
    assert.equal(grown.code, 0, JSON.stringify(grown.body));
    assert.deepEqual(grown.body, { file: clean, oldSize: 16 * MiB, newSize: 40 * MiB, batMoved: false });
    assert.equal(qemuInfo(clean)['virtual-size'], 40 * MiB);
    const human = await runCli([...home, 'vhdx', 'resize', clean, '--size', '1T']);
    assert.equal(human.code, 0, human.stderr);
    assert.match(human.stdout, /Resized .*41943040 → 1099511627776 bytes/);
    const shrink = await cliJson<{ error: { code: string } }>([...home, 'vhdx', 'resize', clean, '--size', '1M']);
    assert.equal(shrink.code, 2);
    assert.equal(shrink.body.error.code, 'invalid_argument');
    assert.equal(qemuCheck(clean).status, 0);
  } finally {
    cleanup();
  }
});
