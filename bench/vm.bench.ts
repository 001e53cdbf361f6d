// VM benchmark: what a shielded start costs and what the shielded disk gives the guest, next to the
// same guest run by hand. The guest is the test guest (test/helpers/guest.ts: Debian's kernel and a
// busybox initramfs, booted with -kernel/-initrd/-append) with 256 MiB and 1 vCPU, under KVM when
// /dev/kvm is usable and TCG otherwise (the accelerator is printed: under TCG every figure is slow
// and noisy, and the ratios are what to read).
//
//   ours     the real CLI, as a user runs it: a temp home (`vault init --no-keychain`, `guardian
//            create Owner` + its PFX backup, `host register-key`), raw disks shielded with `disk
//            shield … --allow-mode host-key`, `vm create … --level encryption-supported --kernel
//            --initrd --append`, then `vm start NAME --test-channel SOCK --json` in the foreground:
//            attestation (host key), key release, KP roll, the disk over our NBD server, the
//            encrypted vTPM (provisioned on the first start only), QEMU through OVMF.
//   by hand  swtpm (`swtpm socket --tpm2`, plain state, its control socket polled as a user's
//            script would) then QEMU, spawned by this bench on a plain file. Its command line is
//            core's own qemuArgs() (core/hypervisor/qemu.ts) for the same VM and level: q35, the same
//            accelerator and -cpu, OVMF_CODE_4M.fd + its own vars copy, -m/-smp, tpm-crb on the
//            swtpm, -sandbox, the serial console to a log file, the test channel, and the disk as
//            `if=virtio,cache=writeback` — only the drive differs: the raw file (`format=raw`) in
//            place of our NBD socket, or a LUKS image of the same data (`-object secret,file=… -drive
//            driver=luks,key-secret=…,file.filename=…`, aes-256-xts plain64, made by qemu-img
//            convert -O luks with iter-time=10 so key setup stays short).
//
// (1) Start overhead: the guest in `report` mode on a 4 MiB disk (it hashes its disk and reads
// its TPM's PCRs, then reports on the test channel and powers off). Timed from spawning (`vm start`;
// by hand: swtpm, then QEMU) to the report arriving on the channel, and to the end (the CLI's exit;
// by hand: QEMU's). The first start of our VM (vTPM provisioning: EK, EK certificate) is the
// warm-up and is printed apart; the by-hand side gets an untimed warm-up too. Our `vm start`'s
// notice (QEMU answering on QMP: all our set-up done) is printed as a breakdown.
// (2) Guest sequential throughput: the guest in `bench-seq` mode reads its whole disk, then writes
// it (zeros), in 1 MiB O_DIRECT blocks, the write closed by an fsync, timed inside the guest
// ($EPOCHREALTIME, µs), on: our shielded disk (through `vm start`), the raw file by hand, the LUKS
// image by hand, and the raw file and the LUKS image served by qemu-nbd to the same QEMU (the
// architecture ours has: a server process, the disk over an NBD Unix socket — qemu-nbd on the raw
// file is the hop's own cost with no encryption at all). The input is random data (every VHDX block allocated, like the LUKS and raw
// images); every file sits in the host page cache. MiB/s per side; ratios ours/raw and ours/luks
// of MiB/s (> 1: we are faster).
// Runs rotate the side order; one untimed warm-up per side first; median of N, [runs] for the noise.
// Everything lives in one temp folder, removed at the end (failure and Ctrl-C included), and every
// process started here (and the QEMU and swtpm that `vm start` started) is killed on the way out.
//
// `--unit-size N` adds a side: the same data shielded with N-byte data units (`disk shield
// --unit-size`; the default is 4096), to show what larger units give sequential I/O.
//
//   node_modules/.bin/node bench/vm.bench.ts [--runs N] [--size-mib M] [--unit-size N] [--json]
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes, randomFillSync } from 'node:crypto';
import { closeSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { OVMF, QEMU_BINARY, chooseAccel, qemuArgs, type VmShape } from '../core/hypervisor/qemu.ts';
import { benchArgs, exitUnlessTool } from './args.ts';
import { benchMiBps, buildGuest, guestAppend, guestMissing, listenForReport, ovmfMissing, startGuestSwtpm, type GuestBenchReport, type GuestMode } from '../test/helpers/guest.ts';
import { CLI } from '../test/helpers/home.ts';

const MiB = 1024 * 1024;
const { json, opt } = benchArgs();
const RUNS = Number(opt('--runs', '3'));
const SIZE_MIB = Number(opt('--size-mib', '256'));
/** Also a shielded disk with this data unit (bytes; the format's default is 4096): larger units trade random-I/O cost for sequential speed. */
const UNIT_SIZE = opt('--unit-size', '') === '' ? null : Number(opt('--unit-size', ''));
if (UNIT_SIZE !== null && (!Number.isInteger(UNIT_SIZE) || UNIT_SIZE < 512)) {
  process.stderr.write('usage: vm.bench.ts --unit-size N (a power of two, 512 to 1048576)\n');
  process.exit(2);
}
if (!Number.isInteger(RUNS) || RUNS < 1 || !Number.isInteger(SIZE_MIB) || SIZE_MIB < 16) {
  process.stderr.write('usage: vm.bench.ts [--runs N] [--size-mib M (>= 16)] [--json]\n');
  process.exit(2);
}
exitUnlessTool('vm', QEMU_BINARY, 'qemu-system-x86');
exitUnlessTool('vm', 'qemu-img', 'qemu-utils');
exitUnlessTool('vm', 'swtpm', 'swtpm');
{
  const missing = guestMissing() ?? ovmfMissing();
  if (missing) {
    process.stderr.write(`vm bench: the test guest ${missing}; skipped.\n`);
    process.exit(0);
  }
}

const BOOT_DISK = 4 * MiB;
const MEMORY_MIB = 256;
const CPUS = 1;
const BASE_APPEND = 'console=ttyS0 quiet panic=-1';
/** One guest run's ceiling (a TCG boot through OVMF takes ≈15–25 s on a 2-core host; bench-seq adds the I/O). */
const RUN_TIMEOUT_MS = 300_000;
const LUKS_OPTS = 'key-secret=sec0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,iter-time=10';

const out = (s: string) => {
  if (!json) process.stdout.write(s);
};
const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

// ---- the temp folder, and every process we start, go away on exit --------------------------------

const root = mkdtempSync(join(tmpdir(), 'shieldlab-vm-bench-'));
const home = join(root, 'home');
const passphrase = join(root, 'pp');
const H = ['--home', home, '--passphrase-file', passphrase];
const children = new Set<ChildProcess>();
const VM_NAMES = ['boot', 'seq', 'seq-unit'];

function track(child: ChildProcess): ChildProcess {
  children.add(child);
  child.once('exit', () => children.delete(child));
  return child;
}

/** QEMU and swtpm that a `vm start` child left behind (they run in their own process groups); only ours: their command line names our folder. */
function killVmLeftovers(): void {
  for (const name of VM_NAMES) {
    let st: { qemuPid?: number | null; swtpmPid?: number | null };
    try {
      st = JSON.parse(readFileSync(join(home, 'vms', name, 'state.json'), 'utf8')) as typeof st;
    } catch {
      continue;
    }
    for (const pid of [st.qemuPid, st.swtpmPid]) {
      if (typeof pid !== 'number' || pid <= 1) continue;
      try {
        if (!readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(root)) continue;
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone already
      }
    }
  }
}

let cleaned = false;
function cleanup(): void {
  if (cleaned) return;
  cleaned = true;
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  killVmLeftovers();
  rmSync(root, { recursive: true, force: true });
}
process.on('exit', cleanup);
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  process.once(sig, () => {
    process.stderr.write(`vm bench: ${sig}, cleaning up\n`);
    process.exit(130);
  });
}

// ---- set-up ---------------------------------------------------------------------------------------

function cli(args: string[]): Record<string, unknown> {
  const r = spawnSync(process.execPath, [CLI, ...H, ...args, '--json'], { encoding: 'utf8', timeout: 600_000 });
  if (r.status !== 0) throw new Error(`shieldlab ${args.join(' ')} failed (${r.status ?? r.signal}): ${r.stdout}${r.stderr}`);
  return JSON.parse(r.stdout) as Record<string, unknown>;
}

/** A raw disk of random bytes, with `marker` then zeros in its first sector. */
function makeRaw(path: string, size: number, marker: string): void {
  const fd = openSync(path, 'w');
  const buf = Buffer.alloc(4 * MiB);
  try {
    for (let at = 0; at < size; at += buf.length) {
      const n = Math.min(buf.length, size - at);
      randomFillSync(buf, 0, n);
      if (at === 0) {
        buf.fill(0, 0, 512);
        buf.write(marker, 0, 'ascii');
      }
      writeSync(fd, buf, 0, n, at);
    }
  } finally {
    closeSync(fd);
  }
}

function makeLuks(raw: string, path: string, secretFile: string): void {
  for (let attempt = 1; ; attempt++) {
    const r = spawnSync('qemu-img', ['convert', '-f', 'raw', '-O', 'luks', '--object', `secret,id=sec0,file=${secretFile}`, '-o', LUKS_OPTS, raw, path], { encoding: 'utf8' });
    if (r.status === 0) return;
    // QEMU's PBKDF calibration gives up now and then on a busy machine: again.
    if (!/Unable to get accurate CPU usage/.test(r.stderr) || attempt >= 5) throw new Error(`qemu-img convert -O luks failed: ${r.stderr}`);
    rmSync(path, { force: true });
  }
}

// ---- one run of each side ------------------------------------------------------------------------

interface RunResult {
  /** ms from the first spawn to the report on the test channel. */
  reportMs: number;
  /** ms from the first spawn to the end (our CLI's exit; by hand: QEMU's exit). */
  exitMs: number;
  /** Ours: ms to `vm start`'s notice (QEMU answers on QMP); by hand: ms to spawning QEMU (swtpm answering). */
  noticeMs: number | null;
  /** The guest's uptime (s) in its report: its kernel's share of the time to the report. */
  guestUptime: number | null;
  line: string;
  bench: GuestBenchReport | null;
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([p, new Promise<T>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what}: nothing within ${ms} ms`)), ms)))]).finally(() => clearTimeout(timer));
}

function exited(child: ChildProcess): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve({ code: child.exitCode, signal: child.signalCode });
    child.once('close', (code, signal) => resolve({ code, signal }));
  });
}

let channelSeq = 0;

/** `vm start NAME --test-channel SOCK --json`, as a user runs it. */
async function runOurs(vm: string): Promise<RunResult> {
  const listener = await listenForReport(join(root, `ours-${++channelSeq}.sock`));
  try {
    const t0 = performance.now();
    const child = track(spawn(process.execPath, [CLI, ...H, 'vm', 'start', vm, '--test-channel', listener.socketPath, '--json'], { stdio: ['ignore', 'pipe', 'pipe'] }));
    let stdout = '';
    let stderr = '';
    let noticeAt: number | null = null;
    child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr!.on('data', (d: Buffer) => {
      stderr += d.toString();
      if (noticeAt === null && /\{"notice":/.test(stderr)) noticeAt = performance.now();
    });
    const end = exited(child).then((e) => ({ ...e, at: performance.now() }));
    const got = await withTimeout(
      Promise.race([listener.report, end.then((e) => Promise.reject(new Error(`vm start ${vm} ended (${e.code ?? e.signal}) before the guest reported: ${stdout}${stderr}`)))]),
      RUN_TIMEOUT_MS,
      `vm start ${vm}`,
    );
    const e = await withTimeout(end, RUN_TIMEOUT_MS, `vm start ${vm} (after the report)`);
    if (e.code !== 0) throw new Error(`vm start ${vm} exited ${e.code ?? e.signal}: ${stdout}${stderr}`);
    const body = JSON.parse(stdout) as { status?: string; cause?: string };
    if (body.status !== 'stopped' || body.cause !== 'guest') throw new Error(`vm start ${vm}: ${stdout}`);
    return { reportMs: got.at - t0, exitMs: e.at - t0, noticeMs: noticeAt === null ? null : noticeAt - t0, guestUptime: got.report?.uptime ?? got.bench?.uptime ?? null, line: got.line, bench: got.bench };
  } finally {
    await listener.close();
  }
}

/** A VM run by hand: its swtpm state and vars copy persist across runs, like a VM's would. */
interface HandVm {
  name: string;
  dir: string;
  /** The drive: a raw file, or a LUKS image with its secret file. */
  disk: { kind: 'raw'; file: string } | { kind: 'luks'; file: string; secretFile: string } | { kind: 'nbd-raw'; file: string } | { kind: 'nbd-luks'; file: string; secretFile: string };
  append: string;
}

function handArgs(h: HandVm, tpmCtrlSocket: string, testChannel: string): string[] {
  const vars = join(h.dir, 'OVMF_VARS.fd');
  if (!existsSync(vars)) copyFileSync(OVMF.vars, vars);
  const vm: VmShape = { name: h.name, memoryMiB: MEMORY_MIB, cpus: CPUS, kernel: guest.kernel, initrd: guest.initrd, append: h.append };
  const args = qemuArgs(vm, {
    level: 'encryption-supported',
    accel: ACCEL.accel,
    // A plain file where ours has the NBD socket (-drive file=<it>,format=raw,if=virtio,cache=writeback), or qemu-nbd's socket.
    nbdUri: h.disk.kind === 'nbd-luks' || h.disk.kind === 'nbd-raw' ? `nbd+unix:///?socket=${join(h.dir, 'nbd.sock')}` : h.disk.file,
    tpmCtrlSocket,
    qmpSocket: join(h.dir, 'qmp.sock'),
    firmware: { code: OVMF.code, vars, secureBoot: false },
    console: { kind: 'serial-log', file: join(h.dir, 'console.log') },
    testChannel,
  });
  if (h.disk.kind === 'luks') {
    const i = args.findIndex((a, k) => args[k - 1] === '-drive' && /,if=virtio,/.test(a));
    if (i < 0) throw new Error(`no virtio drive in ${args.join(' ')}`);
    const cache = /,cache=([a-z]+)/.exec(args[i]!)?.[1] ?? 'writeback';
    args[i] = `driver=luks,key-secret=sec0,file.filename=${h.disk.file.replace(/,/g, ',,')},if=virtio,cache=${cache}`;
    args.splice(i - 1, 0, '-object', `secret,id=sec0,file=${h.disk.secretFile.replace(/,/g, ',,')}`);
  }
  return args;
}

async function runByHand(h: HandVm): Promise<RunResult> {
  const listener = await listenForReport(join(root, `hand-${++channelSeq}.sock`));
  let tpm: Awaited<ReturnType<typeof startGuestSwtpm>> | null = null;
  try {
    const t0 = performance.now();
    tpm = await startGuestSwtpm(join(h.dir, 'tpm'));
    track(tpm.process);
    if (h.disk.kind === 'nbd-luks' || h.disk.kind === 'nbd-raw') {
      // The same architecture as ours with QEMU's own parts: qemu-nbd serves (and for LUKS decrypts) the image, QEMU's NBD client reads it.
      const sock = join(h.dir, 'nbd.sock');
      rmSync(sock, { force: true });
      const image =
        h.disk.kind === 'nbd-raw'
          ? ['-f', 'raw', h.disk.file]
          : ['--object', `secret,id=sec0,file=${h.disk.secretFile}`, '--image-opts', `driver=luks,key-secret=sec0,file.filename=${h.disk.file.replace(/,/g, ',,')}`];
      const nbd = track(spawn('qemu-nbd', [...image, '--socket', sock, '--cache=writeback', '--shared=1'], { stdio: 'ignore' }));
      const deadline = performance.now() + 10_000;
      while (!existsSync(sock)) {
        if (nbd.exitCode !== null || performance.now() > deadline) throw new Error('qemu-nbd did not start');
        await new Promise((r) => setTimeout(r, 10));
      }
    }
    const args = handArgs(h, tpm.ctrlSocket, listener.socketPath);
    const spawnedAt = performance.now();
    const child = track(spawn(QEMU_BINARY, args, { stdio: ['ignore', 'ignore', 'pipe'] }));
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    const end = exited(child).then((e) => ({ ...e, at: performance.now() }));
    const got = await withTimeout(
      Promise.race([listener.report, end.then((e) => Promise.reject(new Error(`QEMU (${h.name}) exited ${e.code ?? e.signal} before the guest reported: ${stderr}`)))]),
      RUN_TIMEOUT_MS,
      `QEMU ${h.name}`,
    );
    const e = await withTimeout(end, RUN_TIMEOUT_MS, `QEMU ${h.name} (after the report)`);
    if (e.code !== 0) throw new Error(`QEMU (${h.name}) exited ${e.code ?? e.signal}: ${stderr}`);
    return { reportMs: got.at - t0, exitMs: e.at - t0, noticeMs: spawnedAt - t0, guestUptime: got.report?.uptime ?? got.bench?.uptime ?? null, line: got.line, bench: got.bench };
  } finally {
    await tpm?.stop();
    await listener.close();
  }
}

function checkBoot(r: RunResult, marker: string, who: string): void {
  const m = /"marker":"([^"]*)"/.exec(r.line)?.[1];
  const errors = /"errors":"([^"]*)"/.exec(r.line)?.[1];
  if (m !== marker || errors !== '') throw new Error(`${who}: the guest reported ${r.line}`);
}

function checkBench(r: RunResult, who: string): GuestBenchReport {
  const b = r.bench;
  if (!b || b.errors !== '' || b.bytes !== SIZE_MIB * MiB || !(b.readMs > 0) || !(b.writeMs > 0)) throw new Error(`${who}: the guest reported ${r.line}`);
  return b;
}

// ---- main ------------------------------------------------------------------------------------------

const ACCEL = chooseAccel();
const guest = buildGuest(join(root, 'guest'));
const load0 = loadavg();
const t00 = performance.now();

// The home, the disks, the VMs.
writeFileSync(passphrase, 'bench host passphrase', { mode: 0o600 });
writeFileSync(join(root, 'pfx-pw'), 'bench pfx password', { mode: 0o600 });
cli(['vault', 'init', '--no-keychain', '--kdf-memory-mib', '16']);
cli(['guardian', 'create', 'Owner']);
cli(['guardian', 'export', 'Owner', '--pfx', '--out-dir', join(root, 'pfx'), '--password-file', join(root, 'pfx-pw')]);
cli(['host', 'register-key']);

const marker = `SHIELDLAB-MARKER-${randomBytes(8).toString('hex')}`;
const bootRaw = join(root, 'boot.raw');
makeRaw(bootRaw, BOOT_DISK, marker);
const seqRaw = join(root, 'seq.raw');
makeRaw(seqRaw, SIZE_MIB * MiB, 'SHIELDLAB-SEQ');
const tShield = performance.now();
cli(['disk', 'shield', bootRaw, '--out', join(root, 'boot.vhdx'), '--owner', 'Owner', '--allow-mode', 'host-key']);
cli(['disk', 'shield', seqRaw, '--out', join(root, 'seq.vhdx'), '--owner', 'Owner', '--allow-mode', 'host-key']);
if (UNIT_SIZE !== null) cli(['disk', 'shield', seqRaw, '--out', join(root, 'seq-unit.vhdx'), '--owner', 'Owner', '--allow-mode', 'host-key', '--unit-size', String(UNIT_SIZE)]);
const shieldMs = performance.now() - tShield;
const luksSecret = join(root, 'luks.secret');
writeFileSync(luksSecret, 'bench luks passphrase', { mode: 0o600 });
const seqLuks = join(root, 'seq.luks');
makeLuks(seqRaw, seqLuks, luksSecret);
const appendOf = (mode: GuestMode) => `${BASE_APPEND} ${guestAppend(mode)}`;
for (const [name, mode] of [['boot', 'report'], ['seq', 'bench-seq'], ...(UNIT_SIZE !== null ? [['seq-unit', 'bench-seq'] as const] : [])] as const) {
  cli(['vm', 'create', name, '--disk', join(root, `${name}.vhdx`), '--memory', String(MEMORY_MIB), '--cpus', String(CPUS), '--level', 'encryption-supported', '--kernel', guest.kernel, '--initrd', guest.initrd, '--append', appendOf(mode)]);
}
const hand = (name: string, disk: HandVm['disk'], mode: GuestMode): HandVm => {
  const dir = join(root, 'hand', name);
  mkdirSync(dir, { recursive: true });
  return { name, dir, disk, append: appendOf(mode) };
};
const handBoot = hand('boot', { kind: 'raw', file: bootRaw }, 'report');
const handRaw = hand('seq-raw', { kind: 'raw', file: seqRaw }, 'bench-seq');
const handLuks = hand('seq-luks', { kind: 'luks', file: seqLuks, secretFile: luksSecret }, 'bench-seq');
const handNbdRaw = hand('seq-nbd-raw', { kind: 'nbd-raw', file: seqRaw }, 'bench-seq');
const handNbdLuks = hand('seq-nbd-luks', { kind: 'nbd-luks', file: seqLuks, secretFile: luksSecret }, 'bench-seq');

out(
  `VM bench: test guest (Linux ${guest.kernelVersion} + busybox initramfs), ${MEMORY_MIB} MiB, ${CPUS} vCPU, ${ACCEL.accel.toUpperCase()} (${ACCEL.reason}), ` +
    `q35 + OVMF_CODE_4M.fd, tpm-crb on swtpm; median of ${RUNS} after one warm-up per side; load average ${load0.map((x) => x.toFixed(2)).join(' ')} (${process.env.SHIELDLAB_BENCH_NOTE ?? 'a shared machine: other work may be running'})\n`,
);
out(`  set-up: 2 disks shielded in ${shieldMs.toFixed(0)} ms, LUKS image made, 2 VMs created\n`);

// (1) start overhead.
out(`\n(1) start → guest report (report mode, ${BOOT_DISK / MiB} MiB disk)\n`);
const first = await runOurs('boot'); // the first start: vTPM provisioning
checkBoot(first, marker, 'ours, first start');
out(`  ours, first start (vTPM provisioned): report ${first.reportMs.toFixed(0)} ms, vm start exit ${first.exitMs.toFixed(0)} ms, QEMU up (notice) ${first.noticeMs?.toFixed(0)} ms\n`);
checkBoot(await runByHand(handBoot), marker, 'by hand, warm-up');
const startRuns = { ours: [] as RunResult[], hand: [] as RunResult[] };
for (let i = 0; i < RUNS; i++) {
  const order = i % 2 === 0 ? (['ours', 'hand'] as const) : (['hand', 'ours'] as const);
  for (const side of order) {
    const r = side === 'ours' ? await runOurs('boot') : await runByHand(handBoot);
    checkBoot(r, marker, side);
    startRuns[side].push(r);
  }
}
const sm = (side: 'ours' | 'hand', k: 'reportMs' | 'exitMs') => median(startRuns[side].map((r) => r[k]));
const list = (xs: number[]) => `[${xs.map((x) => x.toFixed(0)).join(', ')}]`;
const oursNotice = median(startRuns.ours.map((r) => r.noticeMs ?? NaN));
const handSpawn = median(startRuns.hand.map((r) => r.noticeMs ?? NaN));
const uptime = (side: 'ours' | 'hand') => median(startRuns[side].map((r) => r.guestUptime ?? NaN));
const start = {
  ours: { reportMs: sm('ours', 'reportMs'), exitMs: sm('ours', 'exitMs'), qemuUpMs: oursNotice, guestUptimeS: uptime('ours'), reportRuns: startRuns.ours.map((r) => r.reportMs), exitRuns: startRuns.ours.map((r) => r.exitMs) },
  byHand: { reportMs: sm('hand', 'reportMs'), exitMs: sm('hand', 'exitMs'), qemuSpawnMs: handSpawn, guestUptimeS: uptime('hand'), reportRuns: startRuns.hand.map((r) => r.reportMs), exitRuns: startRuns.hand.map((r) => r.exitMs) },
  firstStart: { reportMs: first.reportMs, exitMs: first.exitMs, noticeMs: first.noticeMs },
  ratio: 0,
  diffMs: 0,
  exitRatio: 0,
  exitDiffMs: 0,
};
start.ratio = start.ours.reportMs / start.byHand.reportMs;
start.diffMs = start.ours.reportMs - start.byHand.reportMs;
start.exitRatio = start.ours.exitMs / start.byHand.exitMs;
start.exitDiffMs = start.ours.exitMs - start.byHand.exitMs;
out(`  ${''.padEnd(26)}${'to report'.padStart(11)}  ${'runs'.padEnd(20)}${'to exit'.padStart(9)}  runs\n`);
out(`  ${'ours (vm start)'.padEnd(26)}${start.ours.reportMs.toFixed(0).padStart(8)} ms  ${list(start.ours.reportRuns).padEnd(20)}${start.ours.exitMs.toFixed(0).padStart(6)} ms  ${list(start.ours.exitRuns)}\n`);
out(`  ${'by hand (swtpm + qemu)'.padEnd(26)}${start.byHand.reportMs.toFixed(0).padStart(8)} ms  ${list(start.byHand.reportRuns).padEnd(20)}${start.byHand.exitMs.toFixed(0).padStart(6)} ms  ${list(start.byHand.exitRuns)}\n`);
out(`  ratio ours/by hand: ${start.ratio.toFixed(2)} to the report (+${start.diffMs.toFixed(0)} ms), ${start.exitRatio.toFixed(2)} to the exit (+${start.exitDiffMs.toFixed(0)} ms)\n`);
out(`  breakdown (medians): ours: QEMU up (vm start's notice: unlock, attest, key release, KP roll, NBD, vTPM, QEMU answering QMP) after ${oursNotice.toFixed(0)} ms; by hand: QEMU spawned (swtpm answering) after ${handSpawn.toFixed(0)} ms\n`);
out(`                      guest kernel uptime at its report: ours ${start.ours.guestUptimeS.toFixed(2)} s, by hand ${start.byHand.guestUptimeS.toFixed(2)} s (the rest is QEMU + OVMF + our set-up)\n`);

// (2) guest sequential throughput.
out(`\n(2) guest sequential throughput (bench-seq: ${SIZE_MIB} MiB read then written, 1 MiB O_DIRECT blocks, write + fsync; timed in the guest)\n`);
type SeqSide = 'ours' | 'oursUnit' | 'raw' | 'luks' | 'nbdRaw' | 'nbdLuks';
const HAND: Record<Exclude<SeqSide, 'ours' | 'oursUnit'>, HandVm> = { raw: handRaw, luks: handLuks, nbdRaw: handNbdRaw, nbdLuks: handNbdLuks };
const seqRun = (side: SeqSide) => (side === 'ours' ? runOurs('seq') : side === 'oursUnit' ? runOurs('seq-unit') : runByHand(HAND[side]));
const sides: SeqSide[] = [...(['ours'] as const), ...(UNIT_SIZE !== null ? (['oursUnit'] as const) : []), 'raw', 'luks', 'nbdRaw', 'nbdLuks'];
for (const side of sides) checkBench(await seqRun(side), `${side}, warm-up`);
const seqRuns: Record<SeqSide, { readMiBps: number; writeMiBps: number; readMs: number; writeMs: number }[]> = { ours: [], oursUnit: [], raw: [], luks: [], nbdRaw: [], nbdLuks: [] };
for (let i = 0; i < RUNS; i++) {
  for (let k = 0; k < sides.length; k++) {
    const side = sides[(i + k) % sides.length]!;
    const b = checkBench(await seqRun(side), side);
    seqRuns[side].push({ ...benchMiBps(b), readMs: b.readMs, writeMs: b.writeMs });
  }
}
const seq = Object.fromEntries(
  sides.map((s) => [s, { readMiBps: median(seqRuns[s].map((r) => r.readMiBps)), writeMiBps: median(seqRuns[s].map((r) => r.writeMiBps)), runs: seqRuns[s] }]),
) as Record<SeqSide, { readMiBps: number; writeMiBps: number; runs: (typeof seqRuns)['ours'] }>;
const ratios = {
  oursOverRaw: { read: seq.ours.readMiBps / seq.raw.readMiBps, write: seq.ours.writeMiBps / seq.raw.writeMiBps },
  oursOverLuks: { read: seq.ours.readMiBps / seq.luks.readMiBps, write: seq.ours.writeMiBps / seq.luks.writeMiBps },
  oursOverNbdRaw: { read: seq.ours.readMiBps / seq.nbdRaw.readMiBps, write: seq.ours.writeMiBps / seq.nbdRaw.writeMiBps },
  oursOverNbdLuks: { read: seq.ours.readMiBps / seq.nbdLuks.readMiBps, write: seq.ours.writeMiBps / seq.nbdLuks.writeMiBps },
  ...(UNIT_SIZE !== null ? { oursUnitOverLuks: { read: seq.oursUnit.readMiBps / seq.luks.readMiBps, write: seq.oursUnit.writeMiBps / seq.luks.writeMiBps } } : {}),
};
const label: Record<SeqSide, string> = { ours: 'ours (shielded, vm start)', oursUnit: `ours, ${UNIT_SIZE} B units`, raw: 'by hand, raw file', luks: 'by hand, QEMU LUKS', nbdRaw: 'by hand, qemu-nbd raw', nbdLuks: 'by hand, qemu-nbd LUKS' };
const mbList = (xs: number[]) => `[${xs.map((x) => x.toFixed(0)).join(', ')}]`;
out(`  ${''.padEnd(28)}${'read MiB/s'.padStart(11)}  ${'runs'.padEnd(16)}${'write MiB/s'.padStart(12)}  runs\n`);
for (const s of sides) {
  out(
    `  ${label[s].padEnd(28)}${seq[s].readMiBps.toFixed(0).padStart(11)}  ${mbList(seq[s].runs.map((r) => r.readMiBps)).padEnd(16)}${seq[s].writeMiBps.toFixed(0).padStart(12)}  ${mbList(seq[s].runs.map((r) => r.writeMiBps))}\n`,
  );
}
out(`  ratio ours/raw  (MiB/s, > 1: we are faster): read ${ratios.oursOverRaw.read.toFixed(2)}, write ${ratios.oursOverRaw.write.toFixed(2)}\n`);
out(`  ratio ours/luks (MiB/s, > 1: we are faster): read ${ratios.oursOverLuks.read.toFixed(2)}, write ${ratios.oursOverLuks.write.toFixed(2)}\n`);
out(`  ratio ours/qemu-nbd raw (the NBD hop alone, no encryption): read ${ratios.oursOverNbdRaw.read.toFixed(2)}, write ${ratios.oursOverNbdRaw.write.toFixed(2)}\n`);
out(`  ratio ours/qemu-nbd luks (the same NBD architecture): read ${ratios.oursOverNbdLuks.read.toFixed(2)}, write ${ratios.oursOverNbdLuks.write.toFixed(2)}\n`);
if (ratios.oursUnitOverLuks) out(`  ratio ours with ${UNIT_SIZE} B units/luks: read ${ratios.oursUnitOverLuks.read.toFixed(2)}, write ${ratios.oursUnitOverLuks.write.toFixed(2)}\n`);
const load1 = loadavg();
out(`\nload average at the end ${load1.map((x) => x.toFixed(2)).join(' ')}; whole bench ${((performance.now() - t00) / 1000).toFixed(0)} s\n`);

if (json) {
  process.stdout.write(
    `${JSON.stringify(
      {
        runs: RUNS,
        sizeMiB: SIZE_MIB,
        accel: ACCEL.accel,
        guest: { kernel: guest.kernelVersion, memoryMiB: MEMORY_MIB, cpus: CPUS, bootDiskMiB: BOOT_DISK / MiB },
        loadAverage: { start: load0, end: load1 },
        start,
        seq: { ...seq, ratios },
        byHandArgs: handArgs(handRaw, '<swtpm ctrl socket>', '<test channel>'),
      },
      null,
      2,
    )}\n`,
  );
}
// The exit handler (cleanup) removes the temp folder.
