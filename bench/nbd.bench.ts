// NBD serving benchmark: our server (core/nbd) next to qemu-nbd, both serving the same file, with
// the same client: `qemu-img bench` over `nbd+unix://` (QEMU's own NBD client, up to 16 requests
// in flight). Workloads (the issue's):
//   seq-read   256 KiB sequential reads,  depth 8   (-s 256K -S 256K -d 8)
//   seq-write  256 KiB sequential writes, depth 8   (-w, same)
//   rand-read  4 KiB "random" reads,      depth 16
//   rand-write 4 KiB "random" writes,     depth 16
// qemu-img bench only walks with a fixed step (offset += step, modulo the disk size), so "random"
// is a large odd stride: step = 7919 × 4 KiB (7919 is prime, the disk is 2^k × 4 KiB, so every
// 4 KiB block is visited once per lap in a scattered order; consecutive requests are 31 MiB apart,
// which defeats read-ahead and merging).
// Each server runs as its own process; servers and workloads alternate, median of N runs; the
// disk file sits in the page cache. Ratio = peer time / our time (> 1: we are faster; targets
// ≥ 1.5 sequential, ≥ 1.0 random). Our peak RSS (VmHWM) is read after every workload, to show it
// stays flat.
//
// Backends are parameters: `--ours NAME[,NAME…] --peer NAME` from BACKENDS below (`ours-raw`:
// RawFileDisk with its I/O in libuv's thread pool, as qemu-nbd's aio=threads; `ours-raw-inline`:
// RawFileDisk with inlineIo; `qemu-nbd-raw`). Shielded disks (issue 5): `ours-shielded` and
// `ours-shielded-integrity` serve a ShieldedDisk (core/shield, plain XTS / integrity mode) made
// from the same raw file, against `qemu-nbd-luks`, qemu-nbd serving a LUKS image of the same data
// (aes-256-xts, plain64: the same cipher and tweak convention); `--shielded` selects these three.
// The images are made once, before the runs, and sit in the page cache like the raw file.
//
//   node_modules/.bin/node bench/nbd.bench.ts [--size-mib M] [--runs N] [--ours ours-raw,ours-raw-inline] [--peer qemu-nbd-raw]
//       [--shielded] [--only seq-read,rand-read] [--json]
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes, randomFillSync } from 'node:crypto';
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { RawFileDisk, startNbdServer } from '../core/nbd/mod.ts';
import { ShieldedDisk, shieldImage } from '../core/shield/mod.ts';

const MiB = 1024 * 1024;
const argv = process.argv.slice(2);

// ---- child mode: serve a raw file with our server until SIGTERM ---------------------------------
if (argv[0] === '--serve-raw') {
  const disk = await RawFileDisk.open(argv[1]!, { inlineIo: argv[2] === 'inline' });
  const server = await startNbdServer({ disk, log: () => undefined });
  process.stdout.write(`${server.socketPath}\n`);
  process.on('SIGTERM', () => {
    void server.close().then(() => disk.close()).then(() => process.exit(0));
  });
  await new Promise(() => undefined);
}

// ---- child mode: serve a shielded disk (its stand-in transport key in a file) until SIGTERM ------
if (argv[0] === '--serve-shielded') {
  const disk = await ShieldedDisk.open(argv[1]!, readFileSync(argv[2]!));
  const server = await startNbdServer({ disk, log: () => undefined });
  process.stdout.write(`${server.socketPath}\n`);
  process.on('SIGTERM', () => {
    void server.close().then(() => disk.close()).then(() => process.exit(0));
  });
  await new Promise(() => undefined);
}

const json = argv.includes('--json');
const opt = (name: string, dflt: string) => {
  const i = argv.indexOf(name);
  return i >= 0 ? argv[i + 1]! : dflt;
};
const SIZE = Number(opt('--size-mib', '1024')) * MiB;
const RUNS = Number(opt('--runs', '3'));
const SHIELDED = argv.includes('--shielded');
const OURS = opt('--ours', SHIELDED ? 'ours-shielded,ours-shielded-integrity' : 'ours-raw,ours-raw-inline').split(',').filter(Boolean);
const PEER = opt('--peer', SHIELDED ? 'qemu-nbd-luks' : 'qemu-nbd-raw');
const ONLY = opt('--only', '').split(',').filter(Boolean);

/** A running server: where to connect, its pid (for RSS), and how to stop it. */
interface Served {
  uri: string;
  pid: number;
  stop(): Promise<void>;
}
interface Backend {
  name: string;
  /** What it serves; `file` is a raw disk image in the page cache. */
  describe: string;
  start(file: string, dir: string): Promise<Served>;
}

function waitForLine(child: ChildProcess): Promise<string> {
  return new Promise((resolve, reject) => {
    let out = '';
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      const nl = out.indexOf('\n');
      if (nl >= 0) resolve(out.slice(0, nl));
    });
    child.once('exit', (code) => reject(new Error(`server exited (${code}) before it was ready`)));
  });
}

function stopChild(child: ChildProcess): Promise<void> {
  return new Promise((resolve) => {
    if (child.exitCode !== null) return resolve();
    child.once('exit', () => resolve());
    child.kill('SIGTERM');
  });
}

async function waitForSocket(path: string): Promise<void> {
  for (let i = 0; i < 200; i++) {
    if (spawnSync('test', ['-S', path]).status === 0) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`${path} never appeared`);
}

async function startOurs(file: string, io: 'pool' | 'inline'): Promise<Served> {
  return startChild(['--serve-raw', file, io]);
}

async function startChild(args: string[]): Promise<Served> {
  const child = spawn(process.execPath, [import.meta.filename, ...args], { stdio: ['ignore', 'pipe', 'inherit'] });
  const socket = await waitForLine(child);
  return { uri: `nbd+unix:///?socket=${socket}`, pid: child.pid!, stop: () => stopChild(child) };
}

/** Images made from the raw file once, on first use (the same data for every server). */
const made = new Map<string, Promise<string>>();
function derived(name: string, make: () => Promise<string>): Promise<string> {
  let p = made.get(name);
  if (!p) made.set(name, (p = make()));
  return p;
}

/** A shielded VHDX of the raw file, under a random stand-in transport key kept in a 0600 file beside it. */
function shielded(file: string, dir: string, integrity: boolean): Promise<{ path: string; keyFile: string }> {
  const path = join(dir, integrity ? 'shielded-integrity.vhdx' : 'shielded.vhdx');
  const keyFile = join(dir, 'transport.key');
  return derived(path, async () => {
    if (!existsSync(keyFile)) writeFileSync(keyFile, randomBytes(32), { mode: 0o600 });
    await shieldImage(file, 'raw', path, { kp: Buffer.from('stand-in key protector bytes'), transportKey: readFileSync(keyFile), integrity });
    warm(path);
    return path;
  }).then((p) => ({ path: p, keyFile }));
}

const LUKS_SECRET = 'bench-passphrase';
/** A LUKS image of the raw file, as a shielded disk's payload is encrypted (the PBKDF kept short). */
function luks(file: string, dir: string): Promise<string> {
  const path = join(dir, 'disk.luks');
  return derived(path, async () => {
    const opts = 'key-secret=s0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,iter-time=10';
    for (let attempt = 1; ; attempt++) {
      const r = spawnSync('qemu-img', ['convert', '-f', 'raw', '-O', 'luks', '--object', `secret,id=s0,data=${LUKS_SECRET}`, '-o', opts, file, path], { encoding: 'utf8' });
      if (r.status === 0) break;
      // QEMU's PBKDF calibration gives up now and then on a busy machine ("Unable to get accurate CPU usage"): again.
      if (!/Unable to get accurate CPU usage/.test(r.stderr) || attempt >= 5) throw new Error(`qemu-img convert -O luks failed: ${r.stderr}`);
      rmSync(path, { force: true });
    }
    warm(path);
    return path;
  });
}

/** Reads a file through a small buffer, so it sits in the page cache. */
function warm(path: string): void {
  const fd = openSync(path, 'r');
  const b = Buffer.alloc(4 * MiB);
  try {
    while (readSync(fd, b) > 0);
  } finally {
    closeSync(fd);
  }
}

async function startQemuNbd(dir: string, args: string[]): Promise<Served> {
  const socket = join(dir, 'qemu-nbd.sock');
  rmSync(socket, { force: true });
  const child = spawn('qemu-nbd', [...args, '--persistent', '-x', '', `--socket=${socket}`], { stdio: ['ignore', 'ignore', 'inherit'] });
  await waitForSocket(socket);
  return { uri: `nbd+unix:///?socket=${socket}`, pid: child.pid!, stop: () => stopChild(child) };
}

const BACKENDS: Record<string, Backend> = {
  'ours-raw': {
    name: 'ours-raw',
    describe: 'core/nbd over RawFileDisk, I/O in libuv\'s thread pool (one node process)',
    start: (file) => startOurs(file, 'pool'),
  },
  'ours-raw-inline': {
    name: 'ours-raw-inline',
    describe: 'core/nbd over RawFileDisk with inlineIo (small I/O synchronous while the page cache answers)',
    start: (file) => startOurs(file, 'inline'),
  },
  'qemu-nbd-raw': {
    name: 'qemu-nbd-raw',
    describe: 'qemu-nbd -f raw --persistent (cache=writeback, aio=threads: its defaults)',
    start: (file, dir) => startQemuNbd(dir, ['-f', 'raw', file]),
  },
  'ours-shielded': {
    name: 'ours-shielded',
    describe: 'core/nbd over ShieldedDisk: a shielded VHDX of the same data (AES-256-XTS, 4 KiB units)',
    async start(file, dir) {
      const s = await shielded(file, dir, false);
      return startChild(['--serve-shielded', s.path, s.keyFile]);
    },
  },
  'ours-shielded-integrity': {
    name: 'ours-shielded-integrity',
    describe: 'core/nbd over ShieldedDisk in integrity mode (every unit\'s tag checked on read, written on write)',
    async start(file, dir) {
      const s = await shielded(file, dir, true);
      return startChild(['--serve-shielded', s.path, s.keyFile]);
    },
  },
  'qemu-nbd-luks': {
    name: 'qemu-nbd-luks',
    describe: 'qemu-nbd --image-opts driver=luks (aes-256-xts plain64) over a LUKS image of the same data (its defaults otherwise)',
    async start(file, dir) {
      const path = await luks(file, dir);
      return startQemuNbd(dir, ['--object', `secret,id=s0,data=${LUKS_SECRET}`, '--image-opts', `driver=luks,key-secret=s0,file.filename=${path}`]);
    },
  },
};

interface Workload {
  name: string;
  args: (size: number) => string[];
}
const RAND_STEP = 7919 * 4096;
const WORKLOADS: Workload[] = ([
  { name: 'seq-read', args: (size) => ['-c', String(size / (256 * 1024)), '-d', '8', '-s', '262144', '-S', '262144'] },
  { name: 'seq-write', args: (size) => ['-w', '-c', String(size / (256 * 1024)), '-d', '8', '-s', '262144', '-S', '262144'] },
  { name: 'rand-read', args: () => ['-c', '40000', '-d', '16', '-s', '4096', '-S', String(RAND_STEP)] },
  { name: 'rand-write', args: () => ['-w', '-c', '40000', '-d', '16', '-s', '4096', '-S', String(RAND_STEP)] },
] as Workload[]).filter((w) => ONLY.length === 0 || ONLY.includes(w.name));

function usage(msg: string): never {
  process.stderr.write(`nbd bench: ${msg}\nusage: nbd.bench.ts [--size-mib M (power of two >= 64)] [--runs N] [--ours ${Object.keys(BACKENDS).join('|')}] [--peer …] [--shielded] [--only ${WORKLOADS.map((w) => w.name).join(',')}] [--json]\n`);
  process.exit(2);
}
if (!Number.isInteger(RUNS) || RUNS < 1) usage('--runs must be a positive integer');
if (!Number.isSafeInteger(SIZE) || SIZE < 64 * MiB || (SIZE & (SIZE - 1)) !== 0) usage('--size-mib must be a power of two, 64 or more');
if (OURS.length === 0 || !OURS.every((n) => BACKENDS[n]) || !BACKENDS[PEER]) usage(`unknown backend (have ${Object.keys(BACKENDS).join(', ')})`);
if (WORKLOADS.length === 0) usage('no workload selected');
for (const tool of ['qemu-img', 'qemu-nbd']) {
  if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0) {
    process.stderr.write(`nbd bench: ${tool} not found (Debian: qemu-utils); skipped.\n`);
    process.exit(0);
  }
}

function rssOf(pid: number): { rssMiB: number; hwmMiB: number } {
  const s = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(s)?.[1] ?? NaN);
  return { rssMiB: kb('VmRSS') / 1024, hwmMiB: kb('VmHWM') / 1024 };
}

function bench(uri: string, w: Workload): number {
  const r = spawnSync('qemu-img', ['bench', '-f', 'raw', ...w.args(SIZE), uri], { encoding: 'utf8' });
  const m = /Run completed in ([\d.]+) seconds/.exec(r.stdout);
  if (r.status !== 0 || !m) throw new Error(`qemu-img bench ${w.name} failed (${r.status}): ${r.stderr}${r.stdout}`);
  return Number(m[1]) * 1000;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const out = (s: string) => {
  if (!json) process.stdout.write(s);
};

const root = mkdtempSync(join(tmpdir(), 'shieldlab-nbd-bench-'));
try {
  const file = join(root, 'disk.raw');
  const fd = openSync(file, 'w');
  const buf = Buffer.alloc(4 * MiB);
  for (let at = 0; at < SIZE; at += buf.length) writeSync(fd, randomFillSync(buf), 0, buf.length, at);
  closeSync(fd);
  const ours = OURS.map((n) => BACKENDS[n]!);
  const peer = BACKENDS[PEER]!;
  out(`NBD bench: ${SIZE / MiB} MiB raw file (page cache), client qemu-img bench over nbd+unix, median of ${RUNS}; ratio = peer time / ours\n`);
  for (const o of ours) out(`  ours: ${o.name}: ${o.describe}\n`);
  out(`  peer: ${peer.name}: ${peer.describe}\n`);
  // Every server runs for the whole bench (its RSS is followed); runs rotate so none always goes first.
  const servers = [...ours, peer].map((b) => ({ backend: b, served: null as Served | null, ms: new Map<string, number[]>() }));
  const results: Record<string, Record<string, { ms: number; runs: number[]; ratio?: number; rssMiB?: number; peakRssMiB?: number }>> = {};
  const startRss: Record<string, number> = {};
  try {
    for (const s of servers) s.served = await s.backend.start(file, root);
    for (const s of servers) startRss[s.backend.name] = rssOf(s.served!.pid).rssMiB;
    out(`  RSS after start: ${servers.map((s) => `${s.backend.name} ${startRss[s.backend.name]!.toFixed(0)} MiB`).join(', ')}\n`);
    for (const s of servers) bench(s.served!.uri, WORKLOADS[0]!); // warm-up: each process, and the page cache
    for (const w of WORKLOADS) {
      for (let i = 0; i < RUNS; i++) {
        for (let k = 0; k < servers.length; k++) {
          const s = servers[(i + k) % servers.length]!;
          const xs = s.ms.get(w.name) ?? [];
          xs.push(bench(s.served!.uri, w));
          s.ms.set(w.name, xs);
        }
      }
      const target = w.name.startsWith('seq') ? 1.5 : 1.0;
      const peerRuns = servers.at(-1)!.ms.get(w.name)!;
      const peerMem = rssOf(servers.at(-1)!.served!.pid);
      const row: (typeof results)[string] = { [peer.name]: { ms: median(peerRuns), runs: peerRuns, rssMiB: peerMem.rssMiB, peakRssMiB: peerMem.hwmMiB } };
      out(`  ${w.name.padEnd(10)} peer ${median(peerRuns).toFixed(0).padStart(6)} ms [${peerRuns.map((x) => x.toFixed(0)).join(', ')}]  RSS ${peerMem.rssMiB.toFixed(0)} MiB, peak ${peerMem.hwmMiB.toFixed(0)} MiB\n`);
      for (const s of servers.slice(0, -1)) {
        const runs = s.ms.get(w.name)!;
        const mem = rssOf(s.served!.pid);
        const ratio = median(peerRuns) / median(runs);
        row[s.backend.name] = { ms: median(runs), runs, ratio, rssMiB: mem.rssMiB, peakRssMiB: mem.hwmMiB };
        out(
          `  ${''.padEnd(10)} ${s.backend.name.padEnd(24)} ${median(runs).toFixed(0).padStart(6)} ms [${runs.map((x) => x.toFixed(0)).join(', ')}]  ` +
            `ratio ${ratio.toFixed(2)} (target ≥ ${target}: ${ratio >= target ? 'met' : 'NOT met'})  RSS ${mem.rssMiB.toFixed(0)} MiB, peak ${mem.hwmMiB.toFixed(0)} MiB\n`,
        );
      }
      results[w.name] = row;
    }
  } finally {
    for (const s of servers) await s.served?.stop();
  }
  if (json) process.stdout.write(`${JSON.stringify({ sizeMiB: SIZE / MiB, runs: RUNS, ours: OURS, peer: PEER, randStep: RAND_STEP, startRssMiB: startRss, results }, null, 2)}\n`);
} finally {
  rmSync(root, { recursive: true, force: true });
}
