// VHDX conversion benchmark: a 1 GiB raw disk → dynamic VHDX (32 MiB blocks) and that VHDX → raw,
// ours next to `qemu-img convert`, on three inputs:
//   sparse  real data (random bytes) in 30% of the blocks, the rest holes;
//   dense   the same data with the zeros really written (a disk copied without hole detection);
//   random  random bytes everywhere: incompressible, not one zero block.
// Like for like: the same input file for both sides (VHDX → raw reads one VHDX, made by qemu-img),
// the same block size, the input in the page cache, every side a whole fresh process timed by
// wall clock from spawn to exit (Node start-up included), every output removed (not only the one
// the run will write: no run starts with another's output in the page cache) and the disk synced
// (untimed) before every run so no run pays for another's writeback, then a pause (--settle-ms,
// 3 s): on a VM with free page reporting the memory a run frees (its output's page cache) goes back
// to the host after ~2 s, and a run started sooner gets it cheaply (bench/shield.bench.ts measured
// 0.4 s against 2.8 s for 1 GiB of qemu-img's output), so whoever runs right after a deleted output
// would be favoured: every run starts settled. Durability matched two ways:
//   no flush  qemu-img as it runs by default (cache=unsafe) | ours as a library, `durable: false`:
//             a fresh node importing core/vhdx/mod.ts through type stripping (module-ts), and
//             importing the same code built by tsc (module-js: how the packaged app runs it)
//   flushed   qemu-img -t writeback (flushes before it exits) | ours: the real CLI,
//             `shieldlab vhdx convert`, which always flushes (fdatasync, then the directory)
// Runs are interleaved (the order rotates), one untimed warm-up each, whose output is checked
// (qemu-img compare with the raw input, cmp for raw output); median of N, [min–max]
// shows the noise. Ratio = ours / qemu (target ≤ 1.0). Peak RSS: GNU time's %M per process when
// /usr/bin/time exists, else the module children's own VmHWM.
//
//   node_modules/.bin/node bench/vhdx-convert.bench.ts [--runs N] [--size-mib M] [--inputs sparse,dense,random] [--settle-ms MS] [--json]
import { execFileSync, spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { closeSync, existsSync, ftruncateSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { GNU_TIME, benchArgs, exitUnlessTool } from './args.ts';

const MiB = 1024 * 1024;
const BLOCK = 32 * MiB;
const ROOT = resolve(import.meta.dirname, '..');
const CLI = join(ROOT, 'bin/shieldlab.js');
const MOD = pathToFileURL(join(ROOT, 'core/vhdx/mod.ts')).href;
const { argv, json, opt } = benchArgs();
const RUNS = Number(opt('--runs', '5'));
const SIZE = Number(opt('--size-mib', '1024')) * MiB;
const KINDS = opt('--inputs', 'sparse,dense,random').split(',') as Kind[];
const SETTLE_MS = Number(opt('--settle-ms', '3000'));
type Kind = 'sparse' | 'dense' | 'random';
type Dir = 'to-vhdx' | 'to-raw';
if (
  !Number.isInteger(RUNS) || RUNS < 1 || !Number.isSafeInteger(SIZE) || SIZE < BLOCK || !KINDS.every((k) => ['sparse', 'dense', 'random'].includes(k)) ||
  !Number.isInteger(SETTLE_MS) || SETTLE_MS < 0
) {
  process.stderr.write('usage: vhdx-convert.bench.ts [--runs N] [--size-mib M (>= 32)] [--inputs sparse,dense,random] [--settle-ms MS] [--json]\n');
  process.exit(2);
}
exitUnlessTool('vhdx-convert', 'qemu-img', 'qemu-utils');
const TIME = GNU_TIME;

const root = mkdtempSync(join(tmpdir(), 'shieldlab-vhdx-bench-'));
const home = join(root, 'home'); // the CLI's --home: conversions need no vault, and none is made

/** Sparse and dense: data in 30% of the blocks, spread evenly. Random: data everywhere. */
function makeInput(path: string, kind: Kind): number {
  const dataBlock = (b: number) => kind === 'random' || (b * 3) % 10 < 3;
  const fd = openSync(path, 'w');
  const buf = Buffer.alloc(4 * MiB);
  let blocks = 0;
  try {
    ftruncateSync(fd, SIZE);
    for (let b = 0; b < SIZE / BLOCK; b++) {
      if (dataBlock(b)) blocks++;
      else if (kind === 'sparse') continue;
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

/**
 * The same code built the way the app ships it (tsc, tsconfig.build.json), so a library child can
 * run it without type stripping. Null when it cannot be built here.
 */
function buildJs(): string | null {
  const dist = join(root, 'dist');
  spawnSync(join(ROOT, 'node_modules/.bin/tsc'), ['-p', join(ROOT, 'tsconfig.build.json'), '--outDir', dist], { stdio: 'ignore' });
  const mod = join(dist, 'core/vhdx/mod.js');
  return existsSync(mod) ? pathToFileURL(mod).href : null;
}

/** Ours as a library user runs it: a fresh node importing the VHDX module, then one conversion. */
function moduleChild(mod: string, dir: Dir, from: string, to: string, durable: boolean): string[] {
  const call = dir === 'to-vhdx'
    ? `m.convertRawToVhdx(${JSON.stringify(from)}, ${JSON.stringify(to)}, { type: 'dynamic', blockSize: ${BLOCK}, durable: ${durable} })`
    : `m.convertVhdxToRaw(${JSON.stringify(from)}, ${JSON.stringify(to)}, { durable: ${durable} })`;
  const code = `const m = await import(${JSON.stringify(mod)}); await ${call};` +
    `const h = /^VmHWM:\\s+(\\d+) kB/m.exec((await import('node:fs')).readFileSync('/proc/self/status', 'utf8')); process.stdout.write(h ? h[1] : '');`;
  return [process.execPath, '--input-type=module', '-e', code];
}

type VariantName = 'qemu' | 'qemu-flushed' | 'module-ts' | 'module-js' | 'cli';
interface Variant {
  name: VariantName;
  cmd: (dir: Dir, from: string, to: string) => string[];
}
const qemuArgs = (dir: Dir) => (dir === 'to-vhdx' ? ['-f', 'raw', '-O', 'vhdx', '-o', `subformat=dynamic,block_size=${BLOCK}`] : ['-f', 'vhdx', '-O', 'raw']);
function variants(builtMod: string | null): Variant[] {
  return [
    { name: 'qemu', cmd: (dir, from, to) => ['qemu-img', 'convert', ...qemuArgs(dir), from, to] },
    { name: 'qemu-flushed', cmd: (dir, from, to) => ['qemu-img', 'convert', '-t', 'writeback', ...qemuArgs(dir), from, to] },
    { name: 'module-ts', cmd: (dir, from, to) => moduleChild(MOD, dir, from, to, false) },
    ...(builtMod ? [{ name: 'module-js' as const, cmd: (dir: Dir, from: string, to: string) => moduleChild(builtMod, dir, from, to, false) }] : []),
    {
      name: 'cli',
      cmd: (dir, from, to) => [process.execPath, CLI, '--home', home, 'vhdx', 'convert', from, to, ...(dir === 'to-vhdx' ? ['--block-size', `${BLOCK / MiB}M`] : [])],
    },
  ];
}

const outputOf = (v: { name: string }, dir: Dir) => join(root, `${v.name}.${dir === 'to-vhdx' ? 'vhdx' : 'raw'}`);
/** Every variant's output, both ways, and any partial file left by a failed run. */
function removeOutputs(): void {
  for (const name of ['qemu', 'qemu-flushed', 'module-ts', 'module-js', 'cli'] satisfies VariantName[]) {
    for (const dir of ['to-vhdx', 'to-raw'] as const) {
      rmSync(outputOf({ name }, dir), { force: true });
      rmSync(`${outputOf({ name }, dir)}.partial`, { force: true });
    }
  }
}

/** One whole process, timed from spawn to exit; peak RSS in KiB (null when unknown). */
function runOnce(argvOf: string[]): { ms: number; rssKiB: number | null } {
  removeOutputs();
  execFileSync('sync'); // untimed: nobody pays for earlier writeback
  // Untimed too: memory the previous run freed is handed back to the host after ~2 s where free
  // page reporting is on (virtio-balloon), and whoever runs before that gets it cheaply, after it
  // pays to fault it in again: every run starts after the same wait.
  if (SETTLE_MS > 0) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, SETTLE_MS);
  const rssFile = join(root, 'rss');
  const full = TIME ? [TIME, '-f', '%M', '-o', rssFile, ...argvOf] : argvOf;
  const t = performance.now();
  const r = spawnSync(full[0]!, full.slice(1), { encoding: 'utf8', maxBuffer: 1 << 20 });
  const ms = performance.now() - t;
  if (r.status !== 0) throw new Error(`${argvOf.slice(0, 3).join(' ')}… failed (${r.status}): ${r.stderr}`);
  const rss = TIME ? Number(readFileSync(rssFile, 'utf8').trim().split('\n').at(-1)) : Number(r.stdout) || null;
  return { ms, rssKiB: rss };
}

/** Fixed costs: how long a process takes to do nothing. */
function startup(builtMod: string | null): Record<string, number> {
  const cases: Record<string, string[]> = {
    'node -e 0': [process.execPath, '-e', '0'],
    'node importing core/vhdx/mod.ts': [process.execPath, '--input-type=module', '-e', `await import(${JSON.stringify(MOD)})`],
    ...(builtMod ? { 'node importing the built mod.js': [process.execPath, '--input-type=module', '-e', `await import(${JSON.stringify(builtMod)})`] } : {}),
    'shieldlab vhdx convert --help': [process.execPath, CLI, 'vhdx', 'convert', '--help'],
    'qemu-img --version': ['qemu-img', '--version'],
  };
  const out: Record<string, number> = {};
  for (const [name, a] of Object.entries(cases)) {
    spawnSync(a[0]!, a.slice(1)); // warm-up (and the CLI's strip cache)
    const xs: number[] = [];
    for (let i = 0; i < Math.max(RUNS, 5); i++) {
      const t = performance.now();
      spawnSync(a[0]!, a.slice(1));
      xs.push(performance.now() - t);
    }
    out[name] = median(xs);
  }
  return out;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const fmt = (ms: number) => `${ms.toFixed(0)} ms`;

interface Stat {
  medianMs: number;
  minMs: number;
  maxMs: number;
  peakRssMiB: number | null;
}
const report: Record<string, unknown> = { sizeMiB: SIZE / MiB, blockMiB: BLOCK / MiB, runs: RUNS, settleMs: SETTLE_MS, rss: TIME ? 'GNU time %M' : 'module children VmHWM only' };
const verdicts: { what: string; ratio: number }[] = [];
const out = (s: string) => {
  if (!json) process.stdout.write(s);
};
try {
  const builtMod = buildJs();
  const VARIANTS = variants(builtMod);
  const st = startup(builtMod);
  report.startupMs = st;
  out(`Start-up (median, whole process): ${Object.entries(st).map(([k, v]) => `${k} ${fmt(v)}`).join(' | ')}\n\n`);
  const input = join(root, 'in.raw');
  const common = join(root, 'common.vhdx'); // the one VHDX both sides convert back to raw
  for (const kind of KINDS) {
    rmSync(input, { force: true });
    rmSync(common, { force: true });
    const dataBlocks = makeInput(input, kind);
    execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'vhdx', '-o', `subformat=dynamic,block_size=${BLOCK}`, input, common]);
    execFileSync('sync');
    warm(input);
    warm(common);
    const rest = { sparse: ', the rest holes', dense: ', the rest zeros (written)', random: ': random bytes throughout' }[kind];
    out(`${kind} input: ${SIZE / MiB} MiB raw, data in ${dataBlocks}/${SIZE / BLOCK} blocks of ${BLOCK / MiB} MiB${rest}; median of ${RUNS} [min–max], ${SETTLE_MS} ms settle before each run\n`);
    const results: Record<string, Record<string, Stat>> = {};
    for (const dir of ['to-vhdx', 'to-raw'] as const) {
      const from = dir === 'to-vhdx' ? input : common;
      const samples = new Map<string, { ms: number; rssKiB: number | null }[]>(VARIANTS.map((v) => [v.name, []]));
      for (const v of VARIANTS) {
        // Warm-up, and the same content every way, or the timing means nothing.
        runOnce(v.cmd(dir, from, outputOf(v, dir)));
        if (dir === 'to-vhdx') execFileSync('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'vhdx', input, outputOf(v, dir)]);
        else execFileSync('cmp', ['-s', input, outputOf(v, dir)]);
      }
      for (let i = 0; i < RUNS; i++) {
        for (let k = 0; k < VARIANTS.length; k++) {
          const v = VARIANTS[(i + k) % VARIANTS.length]!;
          samples.get(v.name)!.push(runOnce(v.cmd(dir, from, outputOf(v, dir))));
        }
      }
      removeOutputs();
      const stats: Record<string, Stat> = {};
      for (const [name, xs] of samples) {
        const rss = xs.map((x) => x.rssKiB).filter((x): x is number => x !== null);
        stats[name] = {
          medianMs: median(xs.map((x) => x.ms)),
          minMs: Math.min(...xs.map((x) => x.ms)),
          maxMs: Math.max(...xs.map((x) => x.ms)),
          peakRssMiB: rss.length ? Math.max(...rss) / 1024 : null,
        };
      }
      results[dir] = stats;
      const s = (n: string) => `${fmt(stats[n]!.medianMs)} [${stats[n]!.minMs.toFixed(0)}–${stats[n]!.maxMs.toFixed(0)}]`;
      const ratio = (ours: string, peer: string, what: string) => {
        const r = stats[ours]!.medianMs / stats[peer]!.medianMs;
        verdicts.push({ what: `${kind} ${dir === 'to-vhdx' ? 'raw → VHDX' : 'VHDX → raw'}, ${what}`, ratio: r });
        return `ratio ${r.toFixed(2)} ${r <= 1 ? '(met)' : '(NOT met)'}`;
      };
      const rss = (n: string) => (stats[n]!.peakRssMiB === null ? 'n/a' : `${stats[n]!.peakRssMiB!.toFixed(0)} MiB`);
      out(`  ${dir === 'to-vhdx' ? 'raw → VHDX' : 'VHDX → raw'}\n`);
      const has = (n: VariantName) => stats[n] !== undefined;
      out(`    no flush  qemu-img ${s('qemu')} | ours module-ts ${s('module-ts')} ${ratio('module-ts', 'qemu', 'no flush, module-ts')}` +
        (has('module-js') ? ` | ours module-js ${s('module-js')} ${ratio('module-js', 'qemu', 'no flush, module-js')}` : '') + '\n');
      out(`    flushed   qemu-img -t writeback ${s('qemu-flushed')} | ours CLI ${s('cli')} ${ratio('cli', 'qemu-flushed', 'flushed, CLI')}\n`);
      out(`    peak RSS  ours module-ts ${rss('module-ts')}${has('module-js') ? `, module-js ${rss('module-js')}` : ''}, CLI ${rss('cli')}; qemu-img ${rss('qemu')}\n`);
    }
    report[kind] = { dataBlocks, blocks: SIZE / BLOCK, ...results };
    out('\n');
  }
  const met = verdicts.filter((v) => v.ratio <= 1);
  report.target = { ratioAtMost: 1, met: met.length, of: verdicts.length, verdicts };
  out(`Target (ours / qemu-img ≤ 1.0 in wall time): met in ${met.length} of ${verdicts.length} comparisons.\n`);
  for (const v of verdicts) out(`  ${v.ratio <= 1 ? 'met    ' : 'NOT met'} ${v.ratio.toFixed(2)}  ${v.what}\n`);
  if (json) process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
} finally {
  rmSync(root, { recursive: true, force: true });
}
