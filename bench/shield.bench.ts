// Shielding benchmark (issue 5): random data shielded by us next to `qemu-img convert` on the same
// input, to LUKS (AES-256-XTS with the plain64 tweak: the same cipher and tweak convention as a
// shielded disk's payload) and to VHDX without encryption. Targets: ≥ 2× faster than qemu-img to
// LUKS, and at most 1.25× the time of the unencrypted conversion. Integrity mode is reported
// against plain XTS.
//
// Like for like: one random input (incompressible, not one zero block) in the page cache, every
// side a whole fresh process timed by wall clock from spawn to exit (start-up included), outputs
// removed and the disk synced (untimed) before every run so no run pays for another's writeback,
// then a pause (--settle-ms, 3 s): on a VM with free page reporting the memory a run frees goes
// back to the host after ~2 s, and a run started sooner than that gets it cheaply — 1 GiB of
// qemu-img's VHDX output costs 0.4 s right after another run's output was deleted and 2.8 s
// three seconds later on the machine this was written on — so every run starts settled.
// LUKS key setup is minimised (iter-time=10 ms for the PBKDF), so that bulk encryption is what is
// compared; qemu-img still calibrates its PBKDF first (at least 0.5 s of CPU, see fixed costs), and
// the [bulk] ratios take every side's fixed cost out.
// Durability: shielding always flushes its output before publishing it (fdatasync), as the CLI
// does; qemu-img is timed both as it runs by default (cache=unsafe: no flush) and with
// `-t writeback` (flushes before it exits). The verdicts use the flushed qemu-img (the same work);
// the stricter ratio against unflushed qemu-img is printed beside it.
//   ours           a fresh node importing the shield module built by tsc (how the app ships it):
//                  shieldImage() with a random transport key and stand-in KP bytes (the library
//                  path), plain and integrity mode; ours-ts: the same importing core/shield/mod.ts
//                  through type stripping (Node 22 spends about half a second of start-up on it)
//   ours CLI       `shieldlab disk shield` (vault unlock, a real key protector, audit), plain
//                  (and integrity with --cli-integrity); a vault and a backed-up owner are made
//                  once in a temp home
//   qemu-img       convert -f raw -O luks (--object secret, aes-256 xts plain64) | -O vhdx
//                  (subformat=dynamic), each also with -t writeback
// Runs are interleaved (the order rotates), one untimed warm-up each whose output is checked
// (ours: decrypted back and compared with the input; qemu: qemu-img compare); median of N,
// [min–max] shows the noise. Fixed costs (each command on a 1 MiB input: start-up, the CLI's vault
// unlock and key protector, qemu-img's LUKS key setup, whose PBKDF calibration takes at least half
// a second of CPU whatever iter-time says) are measured too, and ratios are also given with them
// subtracted ([bulk]). Peak RSS: GNU time's %M when /usr/bin/time exists, else the library
// children's own VmHWM.
//
//   node_modules/.bin/node bench/shield.bench.ts [--size-mib M] [--runs N] [--settle-ms MS] [--no-cli] [--cli-integrity] [--json]
import { execFileSync, spawnSync } from 'node:child_process';
import { randomBytes, randomFillSync } from 'node:crypto';
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { ShieldedDisk } from '../core/shield/mod.ts';
import { GNU_TIME, benchArgs, exitUnlessTool } from './args.ts';

const MiB = 1024 * 1024;
const ROOT = resolve(import.meta.dirname, '..');
const CLI = join(ROOT, 'bin/shieldlab.js');
const MOD = pathToFileURL(join(ROOT, 'core/shield/mod.ts')).href;
const { argv, json, opt } = benchArgs();
const SIZE = Number(opt('--size-mib', '1024')) * MiB;
const RUNS = Number(opt('--runs', '5'));
const SETTLE_MS = Number(opt('--settle-ms', '3000'));
const WITH_CLI = !argv.includes('--no-cli');
const CLI_INTEGRITY = WITH_CLI && argv.includes('--cli-integrity');
if (!Number.isInteger(RUNS) || RUNS < 1 || !Number.isSafeInteger(SIZE) || SIZE < 4 * MiB || SIZE % MiB !== 0 || !Number.isInteger(SETTLE_MS) || SETTLE_MS < 0) {
  process.stderr.write('usage: shield.bench.ts [--size-mib M (>= 4)] [--runs N] [--settle-ms MS] [--no-cli] [--cli-integrity] [--json]\n');
  process.exit(2);
}
exitUnlessTool('shield', 'qemu-img', 'qemu-utils');
const TIME = GNU_TIME;
const LUKS_SECRET = 'bench-passphrase';
const LUKS_OPTS = 'key-secret=s0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,iter-time=10';

const root = mkdtempSync(join(tmpdir(), 'shieldlab-shield-bench-'));
const home = join(root, 'home');
const passphrase = join(root, 'pp');
/** The library children's transport key (a stand-in: random, known to the bench so it can check the output). */
const transportKey = randomBytes(32);

function makeInput(path: string): void {
  const fd = openSync(path, 'w');
  const buf = Buffer.alloc(4 * MiB);
  try {
    for (let at = 0; at < SIZE; at += buf.length) writeSync(fd, randomFillSync(buf), 0, Math.min(buf.length, SIZE - at), at);
  } finally {
    closeSync(fd);
  }
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

function cli(args: string[]): Record<string, unknown> {
  const r = spawnSync(process.execPath, [CLI, '--home', home, '--passphrase-file', passphrase, ...args, '--json'], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`shieldlab ${args.join(' ')} failed (${r.status}): ${r.stdout}${r.stderr}`);
  return JSON.parse(r.stdout) as Record<string, unknown>;
}

/** A vault and an owner guardian that is backed up (disk shield refuses one that is not). */
function setUpHome(): void {
  writeFileSync(passphrase, 'bench host passphrase', { mode: 0o600 });
  writeFileSync(join(root, 'pfx-pw'), 'bench pfx password', { mode: 0o600 });
  cli(['vault', 'init', '--no-keychain', '--kdf-memory-mib', '16']);
  cli(['guardian', 'create', 'Owner']);
  cli(['guardian', 'export', 'Owner', '--pfx', '--out-dir', join(root, 'pfx'), '--password-file', join(root, 'pfx-pw')]);
}

/**
 * The same code built the way the app ships it (tsc, tsconfig.build.json), so a library child can
 * run it without type stripping (about half a second of Node 22's start-up). Null when it cannot be
 * built here.
 */
function buildJs(): string | null {
  const dist = join(root, 'dist');
  spawnSync(join(ROOT, 'node_modules/.bin/tsc'), ['-p', join(ROOT, 'tsconfig.build.json'), '--outDir', dist], { stdio: 'ignore' });
  const mod = join(dist, 'core/shield/mod.js');
  return existsSync(mod) ? pathToFileURL(mod).href : null;
}

/** Ours as a library user runs it: a fresh node importing the shield module, then one shieldImage(). */
function libraryChild(mod: string, input: string, output: string, integrity: boolean): string[] {
  const code =
    `const m = await import(${JSON.stringify(mod)});` +
    `await m.shieldImage(${JSON.stringify(input)}, 'raw', ${JSON.stringify(output)}, { kp: Buffer.from('stand-in key protector bytes'), transportKey: Buffer.from(${JSON.stringify(transportKey.toString('hex'))}, 'hex'), integrity: ${integrity} });` +
    `const h = /^VmHWM:\\s+(\\d+) kB/m.exec((await import('node:fs')).readFileSync('/proc/self/status', 'utf8')); process.stdout.write(h ? h[1] : '');`;
  return [process.execPath, '--input-type=module', '-e', code];
}

type Check = 'decrypt' | 'luks' | 'vhdx' | 'none';
interface Variant {
  name: string;
  what: string;
  ext: string;
  cmd: (input: string, output: string) => string[];
  check: Check;
}
const qemuLuks = (flushed: boolean) => (input: string, output: string) => [
  'qemu-img', 'convert', ...(flushed ? ['-t', 'writeback'] : []), '-f', 'raw', '-O', 'luks', '--object', `secret,id=s0,data=${LUKS_SECRET}`, '-o', LUKS_OPTS, input, output,
];
const qemuVhdx = (flushed: boolean) => (input: string, output: string) => ['qemu-img', 'convert', ...(flushed ? ['-t', 'writeback'] : []), '-f', 'raw', '-O', 'vhdx', '-o', 'subformat=dynamic', input, output];
const cliShield = (integrity: boolean) => (input: string, output: string) => [
  process.execPath, CLI, '--home', home, '--passphrase-file', passphrase, 'disk', 'shield', input, '--out', output, '--owner', 'Owner', '--from', 'raw', ...(integrity ? ['--integrity'] : []),
];
const BUILT = buildJs();
const LIB = BUILT ?? MOD;
const libWhat = BUILT ? 'the tsc-built module, as the app ships it' : 'core/shield/mod.ts (the build failed)';
const VARIANTS: Variant[] = [
  { name: 'ours', what: `shieldImage() in a fresh node (${libWhat}), plain XTS`, ext: 'vhdx', cmd: (i, o) => libraryChild(LIB, i, o, false), check: 'decrypt' },
  { name: 'ours-integrity', what: `shieldImage() in a fresh node (${libWhat}), integrity mode`, ext: 'vhdx', cmd: (i, o) => libraryChild(LIB, i, o, true), check: 'decrypt' },
  ...(BUILT ? [{ name: 'ours-ts', what: 'shieldImage() in a fresh node importing core/shield/mod.ts (type stripping at start-up)', ext: 'vhdx', cmd: (i: string, o: string) => libraryChild(MOD, i, o, false), check: 'decrypt' as const }] : []),
  ...(WITH_CLI ? [{ name: 'cli', what: 'shieldlab disk shield', ext: 'vhdx', cmd: cliShield(false), check: 'none' as const }] : []),
  ...(CLI_INTEGRITY ? [{ name: 'cli-integrity', what: 'shieldlab disk shield --integrity', ext: 'vhdx', cmd: cliShield(true), check: 'none' as const }] : []),
  { name: 'qemu-luks', what: 'qemu-img convert -O luks (no flush)', ext: 'luks', cmd: qemuLuks(false), check: 'luks' },
  { name: 'qemu-luks-flushed', what: 'qemu-img convert -t writeback -O luks', ext: 'luks', cmd: qemuLuks(true), check: 'luks' },
  { name: 'qemu-vhdx', what: 'qemu-img convert -O vhdx subformat=dynamic (no flush)', ext: 'vhdx', cmd: qemuVhdx(false), check: 'vhdx' },
  { name: 'qemu-vhdx-flushed', what: 'qemu-img convert -t writeback -O vhdx subformat=dynamic', ext: 'vhdx', cmd: qemuVhdx(true), check: 'vhdx' },
];

/** One whole process, timed from spawn to exit; peak RSS in KiB (null when unknown). */
function runOnce(argvOf: string[], output: string, settle = true, attempt = 1): { ms: number; rssKiB: number | null } {
  rmSync(output, { force: true });
  rmSync(`${output}.partial`, { force: true });
  execFileSync('sync'); // untimed: nobody pays for earlier writeback
  // Untimed too: memory the previous run freed (its output's page cache) is handed back to the
  // host after ~2 s where free page reporting is on (virtio-balloon), and whoever runs before that
  // gets it cheaply, after it pays to fault it in again: every run starts after the same wait.
  if (settle && SETTLE_MS > 0) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, SETTLE_MS);
  const rssFile = join(root, 'rss');
  const full = TIME ? [TIME, '-f', '%M', '-o', rssFile, ...argvOf] : argvOf;
  const t = performance.now();
  const r = spawnSync(full[0]!, full.slice(1), { encoding: 'utf8', maxBuffer: 1 << 20 });
  const ms = performance.now() - t;
  // QEMU's PBKDF calibration gives up now and then on a busy machine with iter-time this short: run again.
  if (r.status !== 0 && /Unable to get accurate CPU usage/.test(r.stderr) && attempt < 5) return runOnce(argvOf, output, settle, attempt + 1);
  if (r.status !== 0) throw new Error(`${argvOf.slice(0, 3).join(' ')}… failed (${r.status}): ${r.stderr}${r.stdout.slice(0, 2000)}`);
  const rss = TIME ? Number(readFileSync(rssFile, 'utf8').trim().split('\n').at(-1)) : Number(r.stdout) || null;
  return { ms, rssKiB: rss };
}

/** Decrypts a shielded output (integrity tags verified on the way) and compares it with the input. */
async function checkShielded(input: string, output: string): Promise<void> {
  const disk = await ShieldedDisk.open(output, transportKey, { readOnly: true });
  const fd = openSync(input, 'r');
  const want = Buffer.alloc(8 * MiB);
  const got = Buffer.alloc(8 * MiB);
  try {
    if (disk.size !== SIZE) throw new Error(`${output}: ${disk.size} bytes, not ${SIZE}`);
    for (let at = 0; at < SIZE; at += want.length) {
      const n = Math.min(want.length, SIZE - at);
      readSync(fd, want, 0, n, at);
      await disk.read(at, n, got.subarray(0, n));
      if (!got.subarray(0, n).equals(want.subarray(0, n))) throw new Error(`${output}: decrypted bytes differ from the input at ${at}`);
    }
  } finally {
    closeSync(fd);
    await disk.close();
  }
}

function checkQemu(check: Check, input: string, output: string): void {
  if (check === 'luks') {
    execFileSync('qemu-img', ['compare', '-q', '--object', `secret,id=s0,data=${LUKS_SECRET}`, '--image-opts', `driver=raw,file.filename=${input}`, `driver=luks,key-secret=s0,file.filename=${output}`]);
  } else if (check === 'vhdx') {
    execFileSync('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'vhdx', input, output]);
  }
}

/**
 * Fixed costs: each variant on a 1 MiB input (start-up, imports, the CLI's vault unlock and key
 * protector, qemu-img's LUKS key setup, which calibrates its PBKDF for at least half a second of
 * CPU whatever iter-time says). Subtracted, they leave the bulk work the targets are about.
 */
function fixedCosts(tiny: string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const v of VARIANTS) {
    const o = join(root, `tiny-${v.name}.${v.ext}`);
    const xs: number[] = [];
    for (let i = 0; i < Math.max(RUNS, 3) + 1; i++) {
      const ms = runOnce(v.cmd(tiny, o), o, false).ms;
      if (i > 0) xs.push(ms); // the first is a warm-up
    }
    rmSync(o, { force: true });
    out[v.name] = median(xs);
  }
  return out;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const fmt = (ms: number) => `${(ms / 1000).toFixed(2)} s`;
const out = (s: string) => {
  if (!json) process.stdout.write(s);
};

interface Stat {
  medianMs: number;
  minMs: number;
  maxMs: number;
  runsMs: number[];
  peakRssMiB: number | null;
}
const report: Record<string, unknown> = { sizeMiB: SIZE / MiB, runs: RUNS, settleMs: SETTLE_MS, input: 'random', rss: TIME ? 'GNU time %M' : 'library children VmHWM only', luks: LUKS_OPTS };
try {
  const input = join(root, 'in.raw');
  const tiny = join(root, 'tiny.raw');
  makeInput(input);
  writeFileSync(tiny, randomBytes(MiB));
  if (WITH_CLI) setUpHome();
  execFileSync('sync');
  warm(input);
  const fixed = fixedCosts(tiny);
  report.fixedMs = fixed;
  out(`Shield bench: ${SIZE / MiB} MiB of random data (page cache), whole processes, median of ${RUNS} [min–max]\n`);
  out(`  LUKS: ${LUKS_OPTS} — the PBKDF time is minimised (iter-time=10 ms) so only bulk encryption is compared\n`);
  out(`    (qemu-img still calibrates its PBKDF before it starts: part of its fixed cost below, which the [bulk] ratios take out)\n`);
  out(`  ours always flushes (fdatasync) before publishing; qemu-img timed without flush (its default) and with -t writeback\n`);
  out(`  fixed cost = the same command on a 1 MiB input (start-up, key setup); bulk = the run minus it; ${SETTLE_MS} ms settle before each run\n\n`);

  const outputOf = (v: Variant) => join(root, `${v.name}.${v.ext}`);
  const samples = new Map<string, { ms: number; rssKiB: number | null }[]>(VARIANTS.map((v) => [v.name, []]));
  for (const v of VARIANTS) {
    // Warm-up, and the proof that each side did the whole job.
    runOnce(v.cmd(input, outputOf(v)), outputOf(v));
    if (v.check === 'decrypt') await checkShielded(input, outputOf(v));
    else checkQemu(v.check, input, outputOf(v));
    rmSync(outputOf(v), { force: true });
  }
  for (let i = 0; i < RUNS; i++) {
    for (let k = 0; k < VARIANTS.length; k++) {
      const v = VARIANTS[(i + k) % VARIANTS.length]!;
      samples.get(v.name)!.push(runOnce(v.cmd(input, outputOf(v)), outputOf(v)));
      rmSync(outputOf(v), { force: true });
    }
  }
  const stats: Record<string, Stat> = {};
  for (const [name, xs] of samples) {
    const rss = xs.map((x) => x.rssKiB).filter((x): x is number => x !== null);
    stats[name] = {
      medianMs: median(xs.map((x) => x.ms)),
      minMs: Math.min(...xs.map((x) => x.ms)),
      maxMs: Math.max(...xs.map((x) => x.ms)),
      runsMs: xs.map((x) => Math.round(x.ms)),
      peakRssMiB: rss.length ? Math.max(...rss) / 1024 : null,
    };
  }
  report.results = stats;
  const s = (n: string) => `${fmt(stats[n]!.medianMs)} [${fmt(stats[n]!.minMs)}–${fmt(stats[n]!.maxMs)}]`;
  const rss = (n: string) => (stats[n]!.peakRssMiB === null ? 'n/a' : `${stats[n]!.peakRssMiB!.toFixed(0)} MiB`);
  for (const v of VARIANTS) {
    out(`  ${v.name.padEnd(18)} ${s(v.name).padEnd(26)} fixed ${fmt(fixed[v.name]!)}  peak RSS ${rss(v.name).padStart(8)}   ${v.what}\n`);
  }

  // Targets: speed-up over LUKS = qemu time / ours (≥ 2); cost over VHDX = ours / qemu time (≤ 1.25).
  const m = (n: string) => stats[n]!.medianMs;
  const bulk = (n: string) => Math.max(1, m(n) - fixed[n]!);
  const verdicts: { target: string; ours: string; peer: string; measure: 'whole' | 'bulk'; ratio: number; met: boolean }[] = [];
  const judge = (ours: string) => {
    for (const flushed of [true, false]) {
      const luks = flushed ? 'qemu-luks-flushed' : 'qemu-luks';
      const vhdx = flushed ? 'qemu-vhdx-flushed' : 'qemu-vhdx';
      for (const measure of ['whole', 'bulk'] as const) {
        const t = measure === 'whole' ? m : bulk;
        const speedup = t(luks) / t(ours);
        const cost = t(ours) / t(vhdx);
        verdicts.push({ target: 'LUKS speed-up ≥ 2', ours, peer: luks, measure, ratio: speedup, met: speedup >= 2 });
        verdicts.push({ target: 'time vs VHDX ≤ 1.25', ours, peer: vhdx, measure, ratio: cost, met: cost <= 1.25 });
      }
    }
  };
  judge('ours');
  if (WITH_CLI) judge('cli');
  report.verdicts = verdicts;
  const integrityCost = m('ours-integrity') / m('ours');
  report.integrityOverPlain = integrityCost;
  out(`\n  Integrity mode costs ${integrityCost.toFixed(2)}× plain XTS (ours-integrity / ours)` +
    (CLI_INTEGRITY ? `; through the CLI ${(m('cli-integrity') / m('cli')).toFixed(2)}×` : '') +
    `; vs qemu-img LUKS (flushed) ${(m('qemu-luks-flushed') / m('ours-integrity')).toFixed(2)}× faster\n`);
  out(`\nTargets — verdicts on whole processes against the flushed qemu-img (the same work). Also shown: [bulk] with each side's\n` +
    `fixed cost subtracted, and [no flush] against qemu-img's default, which leaves its output in the page cache:\n`);
  for (const v of verdicts) {
    const tags = `${v.peer.endsWith('-flushed') ? '' : '[no flush] '}${v.measure === 'bulk' ? '[bulk] ' : ''}`;
    out(`  ${tags.padEnd(19)}${v.met ? 'met    ' : 'NOT met'} ${v.ratio.toFixed(2)}  ${v.target}: ${v.ours} vs ${v.peer}\n`);
  }
  if (json) process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
} finally {
  rmSync(root, { recursive: true, force: true });
}
