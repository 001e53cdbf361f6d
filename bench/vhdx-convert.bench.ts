// VHDX conversion benchmark: a 1 GiB raw disk (real data in 30% of its 32 MiB blocks; the rest
// holes, then again with the zeros written) → dynamic VHDX and back, ours next to `qemu-img
// convert` on the same input with the same block size. Each run is a fresh process (ours: node
// running core/vhdx, peak RSS = the child's VmHWM), outputs removed between runs, median of N
// runs; the input sits in the page cache for both. Ratio = ours / qemu in wall time (target ≤ 1.0).
// Ours flushes (fdatasync) before publishing the file; `qemu-img convert` defaults to cache=unsafe
// and does not, so ours is also timed with `durable: false`, the like-for-like number.
//
//   node_modules/.bin/node bench/vhdx-convert.bench.ts [--runs N] [--size-mib M] [--json]
import { execFileSync, spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { closeSync, ftruncateSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, statSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { convertRawToVhdx, convertVhdxToRaw } from '../core/vhdx/mod.ts';

const MiB = 1024 * 1024;
const BLOCK = 32 * MiB;
const argv = process.argv.slice(2);

// ---- child mode: one conversion, then report time and peak RSS on stdout ------------------------
if (argv[0] === '--child') {
  const [, dir, input, output, sync] = argv as [string, 'to-vhdx' | 'to-raw', string, string, 'durable' | 'no-sync'];
  const durable = sync !== 'no-sync';
  const t = performance.now();
  const r = dir === 'to-vhdx' ? await convertRawToVhdx(input, output, { type: 'dynamic', blockSize: BLOCK, durable }) : await convertVhdxToRaw(input, output, { durable });
  const ms = performance.now() - t;
  // VmHWM belongs to this process image alone (getrusage's maxRSS is inherited across fork+exec on Linux).
  const hwm = /^VmHWM:\s+(\d+) kB/m.exec(readFileSync('/proc/self/status', 'utf8'));
  const maxRssKiB = hwm ? Number(hwm[1]) : process.resourceUsage().maxRSS;
  process.stdout.write(JSON.stringify({ ms, maxRssKiB, dataBlocks: r.dataBlocks, blocks: r.blocks }));
  process.exit(0);
}

const json = argv.includes('--json');
const opt = (name: string, dflt: number) => {
  const i = argv.indexOf(name);
  return i >= 0 ? Number(argv[i + 1]) : dflt;
};
const RUNS = opt('--runs', 3);
const SIZE = opt('--size-mib', 1024) * MiB;
if (!Number.isInteger(RUNS) || RUNS < 1 || !Number.isSafeInteger(SIZE) || SIZE < BLOCK) {
  process.stderr.write('usage: vhdx-convert.bench.ts [--runs N] [--size-mib M (>= 32)] [--json]\n');
  process.exit(2);
}
if (spawnSync('sh', ['-c', 'command -v qemu-img']).status !== 0) {
  process.stderr.write('vhdx-convert bench: qemu-img not found (Debian: qemu-utils); skipped.\n');
  process.exit(0);
}

const root = mkdtempSync(join(tmpdir(), 'shieldlab-vhdx-bench-'));
const input = join(root, 'in.raw');

/**
 * Data (random bytes) in 30% of the 32 MiB blocks, spread evenly. The rest are holes (sparse), or
 * zeros really written (dense: a disk image copied without hole detection). qemu finds holes with
 * lseek(SEEK_DATA) and never reads them; Node has no lseek, so we read and test every block.
 */
function makeInput(dense: boolean): number {
  const dataBlock = (b: number) => (b * 3) % 10 < 3;
  const fd = openSync(input, 'w');
  const buf = Buffer.alloc(4 * MiB);
  let blocks = 0;
  try {
    ftruncateSync(fd, SIZE);
    for (let b = 0; b < SIZE / BLOCK; b++) {
      if (!dataBlock(b) && !dense) continue;
      if (dataBlock(b)) blocks++;
      for (let at = 0; at < BLOCK; at += buf.length) {
        if (dataBlock(b)) randomFillSync(buf);
        else buf.fill(0);
        writeSync(fd, buf, 0, buf.length, b * BLOCK + at);
      }
    }
  } finally {
    closeSync(fd);
  }
  return blocks;
}

/** Reads a file through a small buffer, so it sits in the page cache (and not in our heap). */
function warm(path: string): void {
  const fd = openSync(path, 'r');
  const buf = Buffer.alloc(4 * MiB);
  try {
    while (readSync(fd, buf) > 0);
  } finally {
    closeSync(fd);
  }
}

function wall(fn: () => void): number {
  const t = performance.now();
  fn();
  return performance.now() - t;
}

function ours(dir: 'to-vhdx' | 'to-raw', from: string, to: string, sync: 'durable' | 'no-sync'): { wallMs: number; inMs: number; maxRssKiB: number } {
  rmSync(to, { force: true });
  let out = '';
  const wallMs = wall(() => {
    out = execFileSync(process.execPath, [import.meta.filename, '--child', dir, from, to, sync], { encoding: 'utf8' });
  });
  const r = JSON.parse(out) as { ms: number; maxRssKiB: number };
  return { wallMs, inMs: r.ms, maxRssKiB: r.maxRssKiB };
}

function qemu(dir: 'to-vhdx' | 'to-raw', from: string, to: string): number {
  rmSync(to, { force: true });
  const args = dir === 'to-vhdx'
    ? ['convert', '-f', 'raw', '-O', 'vhdx', '-o', `subformat=dynamic,block_size=${BLOCK}`, from, to]
    : ['convert', '-f', 'vhdx', '-O', 'raw', from, to];
  return wall(() => execFileSync('qemu-img', args, { stdio: 'ignore' }));
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

type Row = {
  oursMs: number;
  oursInProcessMs: number;
  oursNoSyncMs: number;
  qemuMs: number;
  ratio: number;
  ratioNoSync: number;
  peakRssMiB: number;
  outputBytes: { ours: number; qemu: number };
};
const report: Record<string, unknown> = { sizeMiB: SIZE / MiB, blockMiB: BLOCK / MiB, blocks: SIZE / BLOCK, runs: RUNS };
try {
  for (const variant of ['sparse', 'dense'] as const) {
    rmSync(input, { force: true });
    const dataBlocks = makeInput(variant === 'dense');
    report.dataBlocks = dataBlocks;
    warm(input); // into the page cache for both sides
    const oursVhdx = join(root, 'ours.vhdx');
    const qemuVhdx = join(root, 'qemu.vhdx');
    const results: Record<string, Row> = {};
    for (const dir of ['to-vhdx', 'to-raw'] as const) {
      const o: ReturnType<typeof ours>[] = [];
      const n: ReturnType<typeof ours>[] = [];
      const q: number[] = [];
      for (let i = 0; i < RUNS; i++) {
        // Rotate who goes first so no one always gets the warmer cache.
        const runQ = () => q.push(dir === 'to-vhdx' ? qemu(dir, input, qemuVhdx) : qemu(dir, qemuVhdx, join(root, 'qemu.raw')));
        const runN = () => n.push(dir === 'to-vhdx' ? ours(dir, input, oursVhdx, 'no-sync') : ours(dir, oursVhdx, join(root, 'ours.raw'), 'no-sync'));
        const runO = () => o.push(dir === 'to-vhdx' ? ours(dir, input, oursVhdx, 'durable') : ours(dir, oursVhdx, join(root, 'ours.raw'), 'durable'));
        const order = [runQ, runN, runO];
        for (let k = 0; k < 3; k++) order[(i + k) % 3]!();
      }
      const oursMs = median(o.map((x) => x.wallMs));
      const qemuMs = median(q);
      const outOurs = dir === 'to-vhdx' ? oursVhdx : join(root, 'ours.raw');
      const outQemu = dir === 'to-vhdx' ? qemuVhdx : join(root, 'qemu.raw');
      results[dir === 'to-vhdx' ? 'raw → dynamic VHDX' : 'dynamic VHDX → raw'] = {
        oursMs,
        oursInProcessMs: median(o.map((x) => x.inMs)),
        oursNoSyncMs: median(n.map((x) => x.wallMs)),
        qemuMs,
        ratio: oursMs / qemuMs,
        ratioNoSync: median(n.map((x) => x.wallMs)) / qemuMs,
        peakRssMiB: Math.max(...o.map((x) => x.maxRssKiB), ...n.map((x) => x.maxRssKiB)) / 1024,
        outputBytes: { ours: statSync(outOurs).size, qemu: statSync(outQemu).size },
      };
    }
    // Same content both ways, or the timing means nothing.
    execFileSync('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'vhdx', input, oursVhdx]);
    execFileSync('cmp', ['-s', input, join(root, 'ours.raw')]);
    report[variant] = results;
    if (!json) {
      process.stdout.write(`VHDX convert, ${variant} input: ${SIZE / MiB} MiB raw, data in ${dataBlocks}/${SIZE / BLOCK} blocks of ${BLOCK / MiB} MiB, median of ${RUNS} (whole process, wall)\n`);
      for (const [name, r] of Object.entries(results)) {
        process.stdout.write(
          `  ${name.padEnd(20)} qemu-img ${r.qemuMs.toFixed(0).padStart(5)} ms | ours durable ${r.oursMs.toFixed(0).padStart(5)} ms (in-process ${r.oursInProcessMs.toFixed(0)}) ratio ${r.ratio.toFixed(2)}` +
            ` | ours no-sync (as qemu) ${r.oursNoSyncMs.toFixed(0).padStart(5)} ms ratio ${r.ratioNoSync.toFixed(2)} | peak RSS ${r.peakRssMiB.toFixed(0)} MiB\n`,
        );
      }
    }
  }
  if (json) process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
} finally {
  rmSync(root, { recursive: true, force: true });
}
