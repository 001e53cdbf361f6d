// VHDX files we write, judged by independent oracles: `qemu-img check` finds them clean,
// `qemu-img info` and Debian's `vhdiinfo` (libvhdi) read their geometry, qemu writes into them and
// reads what it wrote, and `qemu-img compare` finds our raw→VHDX conversions identical to the raw
// input; our VHDX→raw of qemu-made images equals qemu's own conversion. Also: the raw bytes of
// the structures (Required = 1 regions, metadata flags), 4096-byte logical sectors (which qemu
// cannot open, so vhdiinfo and our reader check them), cancellation and no-clobber.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { closeSync, existsSync, ftruncateSync, openSync, readFileSync, readSync, readdirSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { convertRawToVhdx, convertVhdxToRaw, createVhdx, openVhdx, parseSize, PAYLOAD_STATE } from '../../core/vhdx/mod.ts';
import { ShieldError } from '../../core/errors.ts';
import { cliJson, runCli, tempDir } from '../helpers/home.ts';
import { MiB, makeImage, qemuImg, qemuInfo, qemuIo, qemuMissing, vhdiinfo, vhdiMissing } from '../helpers/qemu.ts';
import { GUIDS, rawBat, rawLayout, fileHead } from '../helpers/vhdx-raw.ts';
import { rng } from '../helpers/random.ts';

const skip = qemuMissing() ?? vhdiMissing() ?? false;


function qemuCheckClean(path: string): void {
  const out = qemuImg(['check', '-f', 'vhdx', path]); // exits non-zero on any error or leak
  assert.match(out, /No errors were found on the image/, `${path}: ${out}`);
}

/** A raw image with seeded pattern extents (across block boundaries, in the last partial block). */
function patternedRaw(path: string, size: number, seed: number, extents: { offset: number; length: number }[]): void {
  const r = rng(seed);
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, size);
    for (const e of extents) {
      const buf = Buffer.alloc(e.length);
      for (let i = 0; i < buf.length; i += 512) buf.fill(1 + Math.floor(r() * 255), i, Math.min(buf.length, i + 512));
      writeSync(fd, buf, 0, buf.length, e.offset);
    }
  } finally {
    closeSync(fd);
  }
}

const sha = (p: string) => createHash('sha256').update(readFileSync(p)).digest('hex');

async function expectCode(p: Promise<unknown>, code: string): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof ShieldError, `not a ShieldError: ${String(err)}`);
    assert.equal(err.code, code, err.message);
    return true;
  });
}

const CREATE_CASES: { type: 'fixed' | 'dynamic'; size: number; blockSize: number }[] = [
  { type: 'dynamic', size: 10 * MiB + 4096, blockSize: MiB },
  { type: 'dynamic', size: 40 * MiB + 512, blockSize: 8 * MiB },
  { type: 'dynamic', size: 100 * MiB + 3 * 512, blockSize: 32 * MiB },
  { type: 'fixed', size: 10 * MiB + 4096, blockSize: MiB },
  { type: 'fixed', size: 40 * MiB + 512, blockSize: 8 * MiB },
  { type: 'fixed', size: 70 * MiB, blockSize: 32 * MiB },
];

test('images we create pass qemu-img check, qemu-img info, vhdiinfo and our reader; qemu writes and reads them', { skip }, async (t) => {
  const { dir, cleanup } = tempDir('shieldlab-vhdx-create-');
  t.after(cleanup);
  for (const [i, c] of CREATE_CASES.entries()) {
    const path = join(dir, `c${i}.vhdx`);
    const label = `${c.type} ${c.size} bytes, ${c.blockSize / MiB} MiB blocks`;
    const made = await createVhdx(path, { size: c.size, type: c.type, blockSize: c.blockSize });
    assert.equal(made.virtualSize, c.size);
    assert.ok(!existsSync(`${path}.partial`));
    const blocks = Math.ceil(c.size / c.blockSize);

    // Raw structure bytes, read independently of core/vhdx.
    const raw = rawLayout(fileHead(path, 8 * MiB));
    assert.equal(raw.creator, 'ShieldLab 0.1.0', label);
    assert.ok(raw.headers[0].valid && raw.headers[1].valid, label);
    assert.equal(raw.headers[1].sequenceNumber, raw.headers[0].sequenceNumber + 1n);
    assert.equal(raw.headers[0].dataWriteGuid, raw.headers[1].dataWriteGuid);
    assert.equal(raw.current.logGuid, '00000000-0000-0000-0000-000000000000');
    assert.equal(raw.current.logOffset, MiB);
    assert.equal(raw.current.logLength, MiB);
    assert.deepEqual(raw.regions.map((r) => r.required), [1, 1], 'regions Required = 1, as Hyper-V writes them');
    assert.deepEqual(fileHead(path, 0x40000 + 0x10000).subarray(0x30000, 0x40000), fileHead(path, 0x50000).subarray(0x40000, 0x50000), 'both region tables identical');
    assert.deepEqual(
      raw.items.map((x) => [x.itemId, x.flags]),
      [[GUIDS.fileParameters, 4], [GUIDS.virtualDiskSize, 6], [GUIDS.virtualDiskId, 6], [GUIDS.logicalSectorSize, 6], [GUIDS.physicalSectorSize, 6]],
    );
    assert.equal(raw.blockSize, c.blockSize);
    assert.equal(raw.flags, c.type === 'fixed' ? 1 : 0);
    const bat = rawBat(fileHead(path, 8 * MiB), raw);
    if (c.type === 'fixed') {
      const offsets = bat.map((e) => e.fileOffset);
      assert.ok(bat.every((e) => e.state === PAYLOAD_STATE.FULLY_PRESENT), label);
      assert.equal(new Set(offsets).size, blocks);
      assert.ok(statSync(path).size >= Math.max(...offsets) + c.blockSize, 'the file holds every block');
    } else {
      assert.ok(bat.every((e) => e.state === PAYLOAD_STATE.NOT_PRESENT && e.fileOffset === 0), label);
    }

    // Independent oracles.
    qemuCheckClean(path);
    assert.equal(qemuInfo(path)['virtual-size'], c.size, label);
    const vi = vhdiinfo(path);
    assert.equal(vi.mediaSize, c.size, label);
    assert.equal(vi.bytesPerSector, 512);
    assert.equal(vi.diskType, c.type);

    // Our reader.
    const img = await openVhdx(path);
    try {
      assert.equal(img.info.type, c.type);
      assert.equal(img.info.metadata.virtualSize, c.size);
      assert.equal(img.info.metadata.blockSize, c.blockSize);
      assert.deepEqual(img.info.bat.states, c.type === 'fixed' ? { FULLY_PRESENT: blocks } : { NOT_PRESENT: blocks });
      assert.ok(isAllZero(await img.read(0, Math.min(c.size, 2 * MiB))));
    } finally {
      await img.close();
    }

    // qemu writes into our image (allocating in the dynamic case) and reads back what it wrote.
    const at = c.size - 4096 - c.blockSize; // crosses into the last, partial block
    qemuIo(['-f', 'vhdx', '-c', `write -P 0x5a ${at} ${8192}`, '-c', `read -P 0x5a ${at} 8192`, path]);
    qemuCheckClean(path);
    const after = await openVhdx(path);
    try {
      assert.ok((await after.read(at, 8192)).every((b) => b === 0x5a), label);
    } finally {
      await after.close();
    }
  }
});

function isAllZero(b: Buffer): boolean {
  return b.every((x) => x === 0);
}

test('4096-byte logical sectors: vhdiinfo and our reader agree (qemu cannot open them)', { skip }, async (t) => {
  const { dir, cleanup } = tempDir('shieldlab-vhdx-create-');
  t.after(cleanup);
  for (const type of ['dynamic', 'fixed'] as const) {
    const path = join(dir, `s4k-${type}.vhdx`);
    await createVhdx(path, { size: 100 * MiB + 4096, type, blockSize: 8 * MiB, logicalSectorSize: 4096 });
    const vi = vhdiinfo(path);
    assert.equal(vi.mediaSize, 100 * MiB + 4096);
    assert.equal(vi.bytesPerSector, 4096);
    assert.equal(vi.diskType, type);
    const raw = rawLayout(fileHead(path, 8 * MiB));
    assert.equal(raw.logicalSectorSize, 4096);
    const img = await openVhdx(path);
    assert.equal(img.info.metadata.logicalSectorSize, 4096);
    assert.equal(img.info.bat.chunkRatio, (2 ** 23 * 4096) / (8 * MiB));
    await img.close();
  }
  // raw → 4096-sector VHDX → raw through us: the same bytes.
  const src = join(dir, 'p4k.raw');
  patternedRaw(src, 24 * MiB, 9, [{ offset: MiB - 4096, length: 3 * MiB }, { offset: 20 * MiB, length: 4096 }]);
  await convertRawToVhdx(src, join(dir, 'p4k.vhdx'), { blockSize: MiB, logicalSectorSize: 4096 });
  assert.equal(vhdiinfo(join(dir, 'p4k.vhdx')).bytesPerSector, 4096);
  await convertVhdxToRaw(join(dir, 'p4k.vhdx'), join(dir, 'p4k.back.raw'));
  assert.equal(sha(join(dir, 'p4k.back.raw')), sha(src));
});

test('bad create options are invalid_argument; sizes parse with suffixes', async (t) => {
  const { dir, cleanup } = tempDir('shieldlab-vhdx-create-');
  t.after(cleanup);
  const f = join(dir, 'x.vhdx');
  await expectCode(createVhdx(f, { size: 10 * MiB + 100 }), 'invalid_argument'); // not a sector multiple
  await expectCode(createVhdx(f, { size: 4096 + 512, logicalSectorSize: 4096 }), 'invalid_argument');
  await expectCode(createVhdx(f, { size: 64 * 1024 * 1024 * MiB + 512 }), 'invalid_argument'); // > 64 TiB
  await expectCode(createVhdx(f, { size: 0 }), 'invalid_argument');
  await expectCode(createVhdx(f, { size: MiB, blockSize: 3 * MiB }), 'invalid_argument');
  await expectCode(createVhdx(f, { size: MiB, blockSize: 512 * MiB }), 'invalid_argument');
  await expectCode(createVhdx(f, { size: MiB, blockSize: MiB / 2 }), 'invalid_argument');
  await expectCode(createVhdx(f, { size: MiB, logicalSectorSize: 1024 }), 'invalid_argument');
  assert.deepEqual(readdirSync(dir), [], 'nothing written');
  assert.equal(parseSize('10M'), 10 * MiB);
  assert.equal(parseSize('1G'), 1024 * MiB);
  assert.equal(parseSize('512K'), 512 * 1024);
  assert.equal(parseSize('2MiB'), 2 * MiB);
  assert.equal(parseSize('4096'), 4096);
  assert.throws(() => parseSize('10Q'), (e: unknown) => e instanceof ShieldError && e.code === 'invalid_argument');
  // 64 TiB exactly is allowed (a dynamic file stays small).
  const big = await createVhdx(join(dir, 'big.vhdx'), { size: 64 * 1024 * 1024 * MiB, blockSize: 256 * MiB });
  assert.ok(big.fileSize < 16 * MiB);
  await expectCode(createVhdx(join(dir, 'big.vhdx'), { size: MiB }), 'already_exists');
});

test('raw → VHDX (ours) is identical to the raw input for qemu-img compare; VHDX → raw (ours) round-trips', { skip }, async (t) => {
  const { dir, cleanup } = tempDir('shieldlab-vhdx-convert-');
  t.after(cleanup);
  const size = 70 * MiB + 3 * 512; // not a multiple of any block size
  const src = join(dir, 'in.raw');
  patternedRaw(src, size, 42, [
    { offset: MiB - 4096, length: 8192 },
    { offset: 8 * MiB - 512, length: 3 * MiB },
    { offset: 33 * MiB, length: 100 * 1024 },
    { offset: size - 1024, length: 1024 },
  ]);
  const before = sha(src);
  // qemu-io writes a pattern too (an independent writer of the raw input).
  qemuIo(['-f', 'raw', '-c', `write -P 0xc4 ${40 * MiB} ${MiB + 4096}`, src]);
  const inputHash = sha(src);
  assert.notEqual(inputHash, before);
  for (const type of ['dynamic', 'fixed'] as const) {
    for (const blockSize of [MiB, 8 * MiB, 32 * MiB]) {
      const out = join(dir, `out-${type}-${blockSize / MiB}.vhdx`);
      const progress: number[] = [];
      const r = await convertRawToVhdx(src, out, { type, blockSize, onProgress: (done, total) => { assert.equal(total, size); progress.push(done); } });
      assert.equal(r.virtualSize, size);
      assert.equal(progress.length, Math.ceil(size / blockSize), 'progress every block');
      assert.equal(progress.at(-1), size);
      qemuCheckClean(out);
      assert.match(qemuImg(['compare', '-f', 'raw', '-F', 'vhdx', src, out]), /Images are identical/);
      if (type === 'dynamic') {
        const img = await openVhdx(out);
        const states = img.info.bat.states;
        await img.close();
        assert.equal(states.FULLY_PRESENT, r.dataBlocks);
        assert.equal((states.ZERO ?? 0) + r.dataBlocks, r.blocks);
        if (blockSize < 32 * MiB) {
          assert.ok((states.ZERO ?? 0) > 0, 'zero blocks left unallocated');
          assert.ok(statSync(out).size < size, 'dynamic output smaller than the disk');
        }
      }
      const back = join(dir, `back-${type}-${blockSize / MiB}.raw`);
      await convertVhdxToRaw(out, back);
      assert.equal(sha(back), inputHash, `${type} ${blockSize}`);
    }
  }
  assert.equal(sha(src), inputHash, 'the input is never touched');
});

test('VHDX (qemu-made) → raw through us equals qemu-img convert', { skip }, async (t) => {
  const { dir, cleanup } = tempDir('shieldlab-vhdx-convert-');
  t.after(cleanup);
  const specs = [
    { type: 'dynamic' as const, size: 20 * MiB + 4096, blockSize: MiB, writes: [{ offset: MiB - 512, length: 4096, byte: 0x31 }, { offset: 20 * MiB, length: 4096, byte: 0x32 }], zeroWrites: [{ offset: 5 * MiB, length: MiB }] },
    { type: 'fixed' as const, size: 40 * MiB + 512, blockSize: 8 * MiB, writes: [{ offset: 16 * MiB - 4096, length: 8192, byte: 0x41 }] },
    { type: 'dynamic' as const, size: 48 * MiB, blockSize: 32 * MiB, blockStateZero: false, writes: [{ offset: 33 * MiB, length: 512, byte: 0x51 }] },
  ];
  for (const [i, spec] of specs.entries()) {
    const img = makeImage(dir, spec, `q${i}`);
    const ours = join(dir, `q${i}.ours.raw`);
    const progress: number[] = [];
    await convertVhdxToRaw(img.path, ours, { onProgress: (d) => progress.push(d) });
    assert.equal(progress.at(-1), spec.size);
    assert.equal(sha(ours), sha(img.raw), `case ${i}`);
    assert.ok(statSync(ours).blocks * 512 < spec.size, 'zero ranges left as holes');
  }
});

test('cancel mid-convert leaves no output and no .partial; an existing output is already_exists', { skip }, async (t) => {
  const { dir, cleanup } = tempDir('shieldlab-vhdx-convert-');
  t.after(cleanup);
  const src = join(dir, 'in.raw');
  patternedRaw(src, 32 * MiB, 5, [{ offset: 0, length: 32 * MiB }]);
  const inputHash = sha(src);
  const out = join(dir, 'out.vhdx');
  for (const [from, dest] of [['raw', out], ['vhdx', join(dir, 'back.raw')]] as const) {
    const ac = new AbortController();
    let calls = 0;
    const input = from === 'raw' ? src : join(dir, 'done.vhdx');
    if (from === 'vhdx' && !existsSync(input)) await convertRawToVhdx(src, input, { blockSize: MiB });
    const run = from === 'raw'
      ? convertRawToVhdx(input, dest, { blockSize: MiB, signal: ac.signal, onProgress: () => { if (++calls === 3) ac.abort(); } })
      : convertVhdxToRaw(input, dest, { signal: ac.signal, onProgress: () => { if (++calls === 3) ac.abort(); } });
    await assert.rejects(run, (e: unknown) => (e as Error).name === 'AbortError');
    assert.ok(!existsSync(dest), `${from}: no output`);
    assert.ok(!existsSync(`${dest}.partial`), `${from}: no .partial`);
  }
  assert.equal(sha(src), inputHash, 'the input is never touched');

  // Onto an existing output: refused, and the existing file is left as it was.
  await convertRawToVhdx(src, out, { blockSize: 8 * MiB });
  const outHash = sha(out);
  await expectCode(convertRawToVhdx(src, out), 'already_exists');
  await expectCode(convertVhdxToRaw(out, src), 'already_exists');
  assert.equal(sha(out), outHash);
  assert.equal(sha(src), inputHash);
  // A leftover .partial (a crash, or a concurrent run) is never clobbered either.
  writeFileSync(join(dir, 'other.vhdx.partial'), 'someone else');
  await expectCode(convertRawToVhdx(src, join(dir, 'other.vhdx')), 'already_exists');
  assert.equal(readFileSync(join(dir, 'other.vhdx.partial'), 'utf8'), 'someone else');
  await expectCode(convertRawToVhdx(join(dir, 'missing.raw'), join(dir, 'm.vhdx')), 'not_found');
  await expectCode(convertVhdxToRaw(src, join(dir, 'm.raw')), 'vhdx_corrupt');
  assert.ok(!existsSync(join(dir, 'm.raw')) && !existsSync(join(dir, 'm.raw.partial')));
});

test('`shieldlab vhdx create` and `vhdx convert` (no vault; format by extension or --from/--to)', { skip }, async (t) => {
  const { dir, cleanup } = tempDir('shieldlab-vhdx-cli-');
  t.after(cleanup);
  const home = join(dir, 'home');
  const f = join(dir, 'new.vhdx');
  const c = await cliJson(['--home', home, 'vhdx', 'create', f, '--size', '10M', '--fixed', '--block-size', '1M']);
  assert.equal(c.code, 0, c.stderr);
  assert.equal(c.body.virtualSize, 10 * MiB);
  assert.equal(c.body.type, 'fixed');
  qemuCheckClean(f);
  const again = await cliJson(['--home', home, 'vhdx', 'create', f, '--size', '10M']);
  assert.equal(again.code, 1);
  assert.equal((again.body as { error: { code: string } }).error.code, 'already_exists');
  const bad = await cliJson(['--home', home, 'vhdx', 'create', join(dir, 'b.vhdx'), '--size', '10M', '--logical-sector', '1000']);
  assert.equal((bad.body as { error: { code: string } }).error.code, 'invalid_argument');

  const src = join(dir, 'disk.img');
  patternedRaw(src, 9 * MiB, 3, [{ offset: 4 * MiB, length: 4096 }]);
  const conv = await cliJson(['--home', home, 'vhdx', 'convert', src, join(dir, 'disk.vhdx'), '--block-size', '1M']);
  assert.equal(conv.code, 0, conv.stderr);
  assert.equal(conv.body.from, 'raw');
  assert.equal(conv.body.to, 'vhdx');
  assert.match(qemuImg(['compare', '-f', 'raw', '-F', 'vhdx', src, join(dir, 'disk.vhdx')]), /Images are identical/);
  const back = await runCli(['--home', home, 'vhdx', 'convert', join(dir, 'disk.vhdx'), join(dir, 'disk.out'), '--to', 'raw']);
  assert.equal(back.code, 0, back.stderr);
  assert.match(back.stdout, /Converted .*disk\.vhdx \(vhdx\) to .*disk\.out \(raw\)/);
  assert.equal(sha(join(dir, 'disk.out')), sha(src));
  const unknown = await cliJson(['--home', home, 'vhdx', 'convert', src, join(dir, 'x.bin')]);
  assert.equal((unknown.body as { error: { code: string } }).error.code, 'invalid_argument');
  assert.ok(!existsSync(home), 'no vault needed, none created');
});

test('Ctrl-C during `vhdx convert`: exit 1 [cancelled], no output and no partial file left', async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  // 768 MiB of non-zero data: long enough that the signal lands mid-conversion.
  const input = join(dir, 'big.raw');
  const fd = openSync(input, 'w');
  const chunk = Buffer.alloc(MiB, 0x6b);
  for (let i = 0; i < 768; i++) writeSync(fd, chunk);
  closeSync(fd);
  const output = join(dir, 'big.vhdx');
  const { spawn } = await import('node:child_process');
  const { CLI } = await import('../helpers/home.ts');
  const child = spawn(process.execPath, [CLI, 'vhdx', 'convert', input, output], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d));
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  const deadline = Date.now() + 20_000;
  while (!existsSync(`${output}.partial`) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
  assert.ok(existsSync(`${output}.partial`), 'the conversion started');
  child.kill('SIGINT');
  assert.equal(await exited, 1, stderr);
  assert.match(stderr, /\[cancelled\]/);
  assert.equal(existsSync(output), false);
  assert.equal(existsSync(`${output}.partial`), false);
});
