// Attestation benchmark (issue 6): TPM-mode attest + key release end to end, ours next to the
// equivalent tpm2-tools pipeline (`tpm2_quote` + `tpm2_checkquote`). Target: ≥ 2× faster (p50),
// with p50/p90/p99 latency reported.
//
// One swtpm, started by the bench on loopback in a temp dir, serves both sides, after a simulated
// measured boot (a realistic UEFI + shim + GRUB event log whose measured events are PCR_Extend-ed
// into it), so PCRs 0–7 are non-trivial and the log replays to them.
//   ours       the product's own path in one long-running process, as the app, `disk serve` and the
//              VM launcher use it: a real vault in a temp home (made through the CLI as the
//              integration tests make it: vault, backed-up owner guardian, `host register --mode
//              tpm`, baseline of PCRs 0–7, an allow-list, a KP made with `--allow-mode tpm`),
//              unlocked once; per iteration AttestationService.attestTpm() — fresh nonce, quote,
//              AK signature, qualifying data, PCR digest, event-log replay, baseline compare,
//              code-integrity hashing of the allow-listed files (copies of qemu-img, the 4 MiB
//              OVMF_CODE_4M.fd firmware and swtpm, 5.8 MiB; --with-qemu-system adds the 17.5 MiB
//              qemu-system-x86_64, a full KVM host's list; the hashing is also timed on its own
//              and shown in the breakdown), clock check, the state and the health
//              certificate stored in the vault, audited — then releaseTransportKey() of the real KP
//              with the stored certificate (as `disk serve` calls it: certificate check, policy,
//              RSA unwrap, audited). Every vault write is a synchronous (FULL) SQLite commit.
//   ours CLI   (for information) `shieldlab host attest --mode tpm` then `kp release KP --check`,
//              a fresh process each: Node start-up with type stripping, vault unlock (scrypt,
//              16 MiB), the same attestation and a trial release.
//   peer       per iteration `tpm2_quote -c ak.ctx -l sha256:0,…,7 -q NONCE -m msg -s sig -o pcrs
//              -g sha256` then `tpm2_checkquote -u ak.pem -m msg -s sig -f pcrs -g sha256 -q NONCE`
//              (signature, nonce, PCR digest). The AK (ECC P-256, under the RSA EK, as tpm2_createak
//              makes it) is created once beforehand and its context saved: tpm2_quote loads it from
//              that context each time (ContextLoad), as it must. The PCR file is tpm2_quote's
//              default serialized format: tpm2_checkquote 5.4 cannot read 8 PCRs from a values
//              file (tpm2-tools issue #3542). swtpm has no resource manager and tpm2_quote leaves
//              the loaded AK behind (libtpms holds 3 objects), so `tpm2_flushcontext -t` runs after
//              each iteration, untimed: it stands in for /dev/tpmrm0 flushing on close.
//   peer+log   the same plus `tpm2_eventlog LOG` (parse and replay the event log), nearer what ours
//              checks. The verdict uses the plain quote + checkquote pipeline, as the issue states:
//              the stricter comparison, since ours also replays the log, compares the baseline,
//              hashes the binaries, issues and stores a certificate and releases a key.
// The peer's times include process creation (each tool is a fresh process, as the pipeline is);
// the floor of one spawn from this harness (`true`) is reported beside them.
// Runs: warm-up (checked: our certificate is valid and mode tpm, the release gives the same key
// every time; tpm2_checkquote accepts the quote and refuses it under another nonce), then rounds,
// interleaved, the order rotating within each round: ours N/R iterations, one peer, one peer+log,
// one hashing sample, and the CLI every few rounds. p50/p90/p99 (nearest rank; with 50 samples
// p99 is the second-largest), mean. Where our time goes: TPM commands (count and time per
// command, from Tpm.execute), vault writes and reads, hashing. Peak RSS: this process's VmHWM
// (ours runs in it; the harness only adds arrays of numbers). Machine load: load average and
// /proc/stat busy share of all cores over the measured part.
//
//   node_modules/.bin/node bench/attest.bench.ts [--runs N] [--peer-runs M] [--cli-runs K] [--with-qemu-system] [--json]
import { spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createHash, randomBytes } from 'node:crypto';
import { cpus, loadavg, tmpdir } from 'node:os';
import { basename, join, resolve } from 'node:path';
import { Vault } from '../core/vault/mod.ts';
import { GuardianStore } from '../core/guardian/store.ts';
import { AttestationService } from '../core/attestation/service.ts';
import { releaseTransportKey } from '../core/guardian/release.ts';
import { measureBinaries } from '../core/attestation/baseline.ts';
import { buildEventLog } from '../core/attestation/eventlog-build.ts';
import { Tpm } from '../core/tpm/mod.ts';
import { bootEvents } from '../test/helpers/eventlog.ts';
import { measureLog, startSwtpm } from '../test/helpers/swtpm.ts';
import { benchArgs } from './args.ts';

const MiB = 1024 * 1024;
const ROOT = resolve(import.meta.dirname, '..');
const CLI = join(ROOT, 'bin/shieldlab.js');
const PCRS = [0, 1, 2, 3, 4, 5, 6, 7];
const { argv, json, opt } = benchArgs();
const RUNS = Number(opt('--runs', '200'));
const PEER_RUNS = Number(opt('--peer-runs', String(Math.max(5, Math.round(RUNS / 4)))));
const CLI_RUNS = Number(opt('--cli-runs', String(Math.min(10, PEER_RUNS))));
const WITH_QEMU_SYSTEM = argv.includes('--with-qemu-system');
if (![RUNS, PEER_RUNS, CLI_RUNS].every(Number.isInteger) || RUNS < 5 || PEER_RUNS < 1 || RUNS < PEER_RUNS || CLI_RUNS < 0 || CLI_RUNS > PEER_RUNS) {
  process.stderr.write('usage: attest.bench.ts [--runs N (>= 5, ours; default 200)] [--peer-runs M (1..N; default N/4)] [--cli-runs K (0..M; default 10)] [--with-qemu-system] [--json]\n');
  process.exit(2);
}
const TOOLS = ['swtpm', 'tpm2_quote', 'tpm2_checkquote', 'tpm2_eventlog', 'tpm2_createek', 'tpm2_createak', 'tpm2_flushcontext'];
const missing = TOOLS.filter((c) => spawnSync('sh', ['-c', `command -v ${c}`]).status !== 0);
if (missing.length > 0) {
  process.stderr.write(`attest bench: ${missing.join(', ')} not found (Debian: swtpm, swtpm-tools, tpm2-tools); skipped.\n`);
  process.exit(0);
}

const out = (s: string) => {
  if (!json) process.stdout.write(s);
};
const root = mkdtempSync(join(tmpdir(), 'shieldlab-attest-bench-'));
const home = join(root, 'home');
const passphrase = join(root, 'pp');
const PASSPHRASE = 'bench host passphrase';
const kpFile = join(root, 'vm.slkp');
const logFile = join(root, 'binary_bios_measurements');
const peerDir = join(root, 'peer');

function cli(args: string[]): Record<string, unknown> {
  const r = spawnSync(process.execPath, [CLI, '--home', home, '--passphrase-file', passphrase, ...args, '--json'], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`shieldlab ${args.join(' ')} failed (${r.status}): ${r.stdout}${r.stderr}`);
  return JSON.parse(r.stdout) as Record<string, unknown>;
}

/** A tpm2-tools command in the peer's directory; throws with its output on failure (unless `mayFail`). */
function tool(name: string, args: string[], tcti: string | null, mayFail = false): { ok: boolean; ms: number } {
  const t = performance.now();
  const r = spawnSync(name, tcti === null ? args : [...args, '-T', tcti], { cwd: peerDir, encoding: 'utf8', env: { ...process.env, TSS2_LOG: 'all+none' }, maxBuffer: 16 << 20 });
  const ms = performance.now() - t;
  if (r.status !== 0 && !mayFail) throw new Error(`${name} ${args.join(' ')} failed (${r.status}): ${r.stderr}${r.stdout.slice(0, 2000)}`);
  return { ok: r.status === 0, ms };
}

/** The allow-listed files: copies of what touches a shielded VM on a KVM host (random stand-ins of the same size when absent). */
function allowListFiles(): { path: string; bytes: number; from: string }[] {
  const dir = join(root, 'bin');
  mkdirSync(dir);
  const wanted = [
    ...(WITH_QEMU_SYSTEM ? [{ src: '/usr/bin/qemu-system-x86_64', size: 18 * MiB }] : []),
    { src: '/usr/bin/qemu-img', size: 2 * MiB },
    { src: '/usr/share/OVMF/OVMF_CODE_4M.fd', size: 4 * MiB },
    { src: '/usr/bin/swtpm', size: 36 * 1024 },
  ];
  return wanted.map(({ src, size }) => {
    const path = join(dir, basename(src));
    if (existsSync(src)) copyFileSync(src, path);
    else writeFileSync(path, randomBytes(size));
    return { path, bytes: statSync(path).size, from: existsSync(src) ? src : `random (${src} absent)` };
  });
}

// ---- instrumentation: where our time goes --------------------------------------------------------

interface Tally {
  count: number;
  ms: number;
}
const tallies = new Map<string, Tally>();
let tallying = false;
function tally(name: string, ms: number): void {
  if (!tallying) return;
  const t = tallies.get(name) ?? { count: 0, ms: 0 };
  t.count++;
  t.ms += ms;
  tallies.set(name, t);
}
function wrap<T extends object>(proto: T, method: string, nameOf: (args: unknown[]) => string): void {
  const p = proto as unknown as Record<string, unknown>;
  const orig = p[method] as (...args: unknown[]) => unknown;
  p[method] = function (this: unknown, ...args: unknown[]) {
    const t = performance.now();
    const r = orig.apply(this, args);
    if (r instanceof Promise) return r.finally(() => tally(nameOf(args), performance.now() - t));
    tally(nameOf(args), performance.now() - t);
    return r;
  };
}
// One performance.now() pair per call: microseconds against milliseconds of work.
wrap(Tpm.prototype, 'execute', (a) => `tpm ${(a[0] as { name: string }).name}`);
wrap(Vault.prototype, 'putRecord', () => 'vault putRecord (write + audit, 1 commit)');
wrap(Vault.prototype, 'record', () => 'vault audit record (1 commit)');
wrap(Vault.prototype, 'getRecord', () => 'vault getRecord (read, decrypt)');

// ---- statistics ------------------------------------------------------------------------------------

interface Stat {
  n: number;
  p50: number;
  p90: number;
  p99: number;
  mean: number;
  min: number;
  max: number;
}
function stat(xs: number[]): Stat {
  const s = [...xs].sort((a, b) => a - b);
  const rank = (p: number) => s[Math.max(0, Math.ceil((p / 100) * s.length) - 1)]!;
  return { n: s.length, p50: rank(50), p90: rank(90), p99: rank(99), mean: s.reduce((a, b) => a + b, 0) / s.length, min: s[0]!, max: s.at(-1)! };
}
function cpuTimes(): { busy: number; total: number } {
  const line = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number);
  const idle = (line[3] ?? 0) + (line[4] ?? 0);
  const total = line.reduce((a, b) => a + b, 0);
  return { busy: total - idle, total };
}
const vmHwmMiB = () => Number(/^VmHWM:\s+(\d+) kB/m.exec(readFileSync('/proc/self/status', 'utf8'))?.[1] ?? 0) / 1024;
const vmRssMiB = () => Number(/^VmRSS:\s+(\d+) kB/m.exec(readFileSync('/proc/self/status', 'utf8'))?.[1] ?? 0) / 1024;
/** Heap and external memory, after a full GC when node runs with --expose-gc (to tell growth from garbage). */
function heapMiB(): { heapUsedMiB: number; externalMiB: number; gc: boolean } {
  const gc = (globalThis as { gc?: () => void }).gc;
  gc?.();
  const m = process.memoryUsage();
  return { heapUsedMiB: +(m.heapUsed / MiB).toFixed(1), externalMiB: +(m.external / MiB).toFixed(1), gc: gc !== undefined };
}

const sw = await startSwtpm(null);
const report: Record<string, unknown> = { runs: { ours: RUNS, peer: PEER_RUNS, cli: CLI_RUNS }, swtpm: 'loopback TCP', cores: cpus().length };
let vault: Vault | null = null;
try {
  // ---- set-up (untimed) --------------------------------------------------------------------------
  const log = buildEventLog(bootEvents());
  await measureLog(sw.address, log);
  writeFileSync(logFile, log);
  writeFileSync(passphrase, PASSPHRASE, { mode: 0o600 });
  writeFileSync(join(root, 'pfx-pw'), 'bench pfx password', { mode: 0o600 });
  const files = allowListFiles();
  cli(['vault', 'init', '--no-keychain', '--kdf-memory-mib', '16']);
  cli(['guardian', 'create', 'Owner']);
  cli(['guardian', 'export', 'Owner', '--pfx', '--out-dir', join(root, 'pfx'), '--password-file', join(root, 'pfx-pw')]);
  cli(['kp', 'create', '--owner', 'Owner', '--allow-mode', 'tpm', '--out', kpFile]);
  cli(['host', 'register', '--mode', 'tpm', '--tpm', sw.address]);
  const baseline = cli(['host', 'baseline', 'capture', '--event-log', logFile, '--pcrs', PCRS.join(',')]) as { events: number; values: Record<string, string> };
  for (const f of files) cli(['host', 'policy', 'add-binary', f.path]);
  const allowBytes = files.reduce((a, f) => a + f.bytes, 0);
  report.allowList = files;
  report.eventLog = { bytes: log.length, events: baseline.events };

  // The peer's AK: tpm2_createek + tpm2_createak, contexts saved in files.
  mkdirSync(peerDir);
  writeFileSync(join(peerDir, 'eventlog.bin'), log);
  tool('tpm2_createek', ['-c', 'ek.ctx', '-G', 'rsa', '-u', 'ek.pub'], sw.address);
  tool('tpm2_flushcontext', ['-t'], sw.address);
  tool('tpm2_createak', ['-C', 'ek.ctx', '-c', 'ak.ctx', '-G', 'ecc', '-g', 'sha256', '-s', 'ecdsa', '-u', 'ak.pem', '-f', 'pem', '-n', 'ak.name'], sw.address);
  tool('tpm2_flushcontext', ['-t'], sw.address);

  // Ours: one long-running process, the vault unlocked once.
  vault = Vault.open(home);
  await vault.unlock({ passphrase: Buffer.from(PASSPHRASE) });
  const attestation = new AttestationService(vault);
  const guardians = new GuardianStore(vault);
  const kpBytes = readFileSync(kpFile);
  let keyDigest: string | null = null;

  const ours = async (): Promise<{ ms: number; attestMs: number; releaseMs: number }> => {
    const t0 = performance.now();
    const cert = await attestation.attestTpm();
    const t1 = performance.now();
    const r = releaseTransportKey(kpBytes, { vault: vault!, guardians, attestation, healthCertificate: attestation.currentEncoded(), purpose: 'bench vm.start' });
    const t2 = performance.now();
    const digest = createHash('sha256').update(r.transportKey).digest('hex');
    r.transportKey.fill(0);
    if (cert.claims.mode !== 'tpm' || r.certificate.claims.mode !== 'tpm') throw new Error('ours: not a tpm-mode certificate');
    if (keyDigest !== null && digest !== keyDigest) throw new Error('ours: the release gave another key');
    keyDigest = digest;
    return { ms: t2 - t0, attestMs: t1 - t0, releaseMs: t2 - t1 };
  };

  const peer = (withLog: boolean): { ms: number; quoteMs: number; checkMs: number; logMs: number } => {
    const nonce = randomBytes(32).toString('hex');
    const q = tool('tpm2_quote', ['-c', 'ak.ctx', '-l', `sha256:${PCRS.join(',')}`, '-q', nonce, '-m', 'msg', '-s', 'sig', '-o', 'pcrs', '-g', 'sha256'], sw.address);
    const c = tool('tpm2_checkquote', ['-u', 'ak.pem', '-m', 'msg', '-s', 'sig', '-f', 'pcrs', '-g', 'sha256', '-q', nonce], null);
    const l = withLog ? tool('tpm2_eventlog', ['eventlog.bin'], null) : { ms: 0 };
    tool('tpm2_flushcontext', ['-t'], sw.address); // untimed: the resource manager's flush on close
    return { ms: q.ms + c.ms + l.ms, quoteMs: q.ms, checkMs: c.ms, logMs: l.ms };
  };

  const cliRun = (): { ms: number; attestMs: number; releaseMs: number } => {
    const t0 = performance.now();
    const a = cli(['host', 'attest', '--mode', 'tpm']) as { certificate?: { valid?: boolean; mode?: string } };
    const t1 = performance.now();
    const r = cli(['kp', 'release', kpFile, '--check']) as { allowed?: boolean };
    const t2 = performance.now();
    if (a.certificate?.valid !== true || a.certificate.mode !== 'tpm' || r.allowed !== true) throw new Error(`CLI: ${JSON.stringify(a)} ${JSON.stringify(r)}`);
    return { ms: t2 - t0, attestMs: t1 - t0, releaseMs: t2 - t1 };
  };

  const hashing = (): number => {
    const t = performance.now();
    measureBinaries(files.map((f) => f.path));
    return performance.now() - t;
  };

  const spawnFloor = (): number => {
    const t = performance.now();
    spawnSync('true');
    return performance.now() - t;
  };

  // ---- warm-up, and the proof that each side does the whole job -------------------------------------
  for (let i = 0; i < 5; i++) await ours();
  if (attestation.currentEncoded() === null || !attestation.status().certificate?.valid) throw new Error('ours: no valid stored certificate after the warm-up');
  for (let i = 0; i < 2; i++) peer(true);
  {
    const nonce = randomBytes(32).toString('hex');
    tool('tpm2_quote', ['-c', 'ak.ctx', '-l', `sha256:${PCRS.join(',')}`, '-q', nonce, '-m', 'msg', '-s', 'sig', '-o', 'pcrs', '-g', 'sha256'], sw.address);
    tool('tpm2_flushcontext', ['-t'], sw.address);
    if (tool('tpm2_checkquote', ['-u', 'ak.pem', '-m', 'msg', '-s', 'sig', '-f', 'pcrs', '-g', 'sha256', '-q', randomBytes(32).toString('hex')], null, true).ok) {
      throw new Error('peer: tpm2_checkquote accepted a quote under another nonce');
    }
  }
  if (CLI_RUNS > 0) cliRun();
  for (let i = 0; i < 3; i++) hashing();

  // ---- measured rounds ---------------------------------------------------------------------------
  const samples = {
    ours: [] as number[],
    oursAttest: [] as number[],
    oursRelease: [] as number[],
    oursFirst: [] as number[],
    oursRest: [] as number[],
    peer: [] as number[],
    peerQuote: [] as number[],
    peerCheck: [] as number[],
    peerLog: [] as number[],
    peerLogLog: [] as number[],
    cli: [] as number[],
    cliAttest: [] as number[],
    cliRelease: [] as number[],
    hashing: [] as number[],
    spawn: [] as number[],
  };
  const rounds = PEER_RUNS;
  const cliEvery = CLI_RUNS > 0 ? Math.floor(rounds / CLI_RUNS) : Infinity;
  const heapStart = heapMiB();
  const rssStart = vmRssMiB();
  const load0 = loadavg();
  const cpu0 = cpuTimes();
  const self0 = process.cpuUsage();
  const wall0 = performance.now();
  tallies.clear();
  for (let r = 0; r < rounds; r++) {
    const oursHere = Math.floor(((r + 1) * RUNS) / rounds) - Math.floor((r * RUNS) / rounds);
    const steps: (() => Promise<void> | void)[] = [
      async () => {
        tallying = true;
        for (let i = 0; i < oursHere; i++) {
          const o = await ours();
          samples.ours.push(o.ms);
          samples.oursAttest.push(o.attestMs);
          samples.oursRelease.push(o.releaseMs);
          (i === 0 ? samples.oursFirst : samples.oursRest).push(o.ms);
        }
        tallying = false;
      },
      () => {
        const p = peer(false);
        samples.peer.push(p.ms);
        samples.peerQuote.push(p.quoteMs);
        samples.peerCheck.push(p.checkMs);
      },
      () => {
        const p = peer(true);
        samples.peerLog.push(p.ms);
        samples.peerLogLog.push(p.logMs);
      },
      () => {
        samples.hashing.push(hashing());
        samples.spawn.push(spawnFloor());
      },
    ];
    if (r % cliEvery === 0 && samples.cli.length < CLI_RUNS) {
      steps.push(() => {
        const c = cliRun();
        samples.cli.push(c.ms);
        samples.cliAttest.push(c.attestMs);
        samples.cliRelease.push(c.releaseMs);
      });
    }
    for (let k = 0; k < steps.length; k++) await steps[(r + k) % steps.length]!();
  }
  const wallMs = performance.now() - wall0;
  const cpu1 = cpuTimes();
  const self1 = process.cpuUsage(self0);
  const load1 = loadavg();
  const busy = (cpu1.busy - cpu0.busy) / Math.max(1, cpu1.total - cpu0.total);
  report.machine = {
    cores: cpus().length,
    loadavgBefore: load0.map((x) => +x.toFixed(2)),
    loadavgAfter: load1.map((x) => +x.toFixed(2)),
    busyShare: +busy.toFixed(3),
    benchProcessCpuShare: +((self1.user + self1.system) / 1000 / wallMs / cpus().length).toFixed(3),
    measuredSeconds: +(wallMs / 1000).toFixed(1),
  };

  const stats: Record<string, Stat> = {};
  for (const [k, xs] of Object.entries(samples)) if (xs.length > 0) stats[k] = stat(xs);
  report.results = stats;
  const rss = { afterWarmUpMiB: +rssStart.toFixed(1), endMiB: +vmRssMiB().toFixed(1), peakMiB: +vmHwmMiB().toFixed(1), heapAfterWarmUp: heapStart, heapEnd: heapMiB() };
  report.oursRss = rss;

  const iterations = samples.ours.length;
  const breakdown = [...tallies.entries()]
    .map(([name, t]) => ({ name, perIteration: t.count / iterations, msPerIteration: t.ms / iterations }))
    .sort((a, b) => b.msPerIteration - a.msPerIteration);
  report.oursBreakdown = breakdown;

  const f = (ms: number) => (ms >= 100 ? ms.toFixed(0) : ms.toFixed(1)).padStart(6);
  const row = (key: string, label: string, what: string) => {
    const s = stats[key];
    if (s) out(`  ${label.padEnd(22)} ${String(s.n).padStart(4)} ${f(s.p50)} ${f(s.p90)} ${f(s.p99)} ${f(s.mean)}   ${what}\n`);
  };
  const m = report.machine as { loadavgBefore: number[]; loadavgAfter: number[]; busyShare: number; benchProcessCpuShare: number; measuredSeconds: number };
  out(`Attest + key release bench: one swtpm on loopback, PCRs 0–7 after a simulated measured boot (${baseline.events} events, ${log.length} bytes)\n`);
  out(`  allow-list: ${files.map((x) => `${basename(x.path)} ${(x.bytes / MiB).toFixed(1)} MiB`).join(', ')} (${(allowBytes / MiB).toFixed(1)} MiB hashed per attestation)\n`);
  out(`  machine: ${m.measuredSeconds} s measured, ${cpus().length} cores, load average ${m.loadavgBefore.join(' ')} → ${m.loadavgAfter.join(' ')}, ` +
    `all cores ${(m.busyShare * 100).toFixed(0)}% busy (this process ${(m.benchProcessCpuShare * 100).toFixed(0)}% of them)\n\n`);
  out(`  ${'ms'.padEnd(22)} ${'n'.padStart(4)} ${'p50'.padStart(6)} ${'p90'.padStart(6)} ${'p99'.padStart(6)} ${'mean'.padStart(6)}\n`);
  row('ours', 'ours', 'attestTpm() + releaseTransportKey(), in-process, vault unlocked');
  row('oursAttest', '  attest', 'quote, full verification, certificate issued and stored');
  row('oursRelease', '  release', 'certificate check, policy, unwrap, audit');
  row('oursFirst', '  1st of a round', 'the first of each round, right after the other sides ran');
  row('oursRest', '  later in a round', 'the others (back to back)');
  row('hashing', '  (hashing)', `measureBinaries() of the allow-list alone (inside attest)`);
  row('peer', 'peer', 'tpm2_quote + tpm2_checkquote');
  row('peerQuote', '  tpm2_quote', 'ContextLoad of the AK, Quote');
  row('peerCheck', '  tpm2_checkquote', 'signature, nonce, PCR digest');
  row('peerLog', 'peer+eventlog', 'tpm2_quote + tpm2_checkquote + tpm2_eventlog');
  row('peerLogLog', '  tpm2_eventlog', 'parse and replay the log');
  row('spawn', '  (spawn floor)', 'spawnSync(`true`): one process from this harness');
  row('cli', 'ours CLI', '`host attest --mode tpm` + `kp release --check`, fresh processes');
  row('cliAttest', '  host attest', '');
  row('cliRelease', '  kp release --check', '');

  out(`\n  Where ours goes, per iteration (mean of ${iterations}; p50 ${stats.ours!.p50.toFixed(1)} ms):\n`);
  for (const b of breakdown) out(`    ${b.msPerIteration.toFixed(2).padStart(7)} ms  ${b.perIteration.toFixed(1).padStart(4)}×  ${b.name}\n`);
  const tpmMs = breakdown.filter((b) => b.name.startsWith('tpm ')).reduce((a, b) => a + b.msPerIteration, 0);
  const tpmCount = breakdown.filter((b) => b.name.startsWith('tpm ')).reduce((a, b) => a + b.perIteration, 0);
  out(`    TPM: ${tpmCount.toFixed(1)} commands, ${tpmMs.toFixed(2)} ms; hashing (measured alone) ${stats.hashing!.mean.toFixed(2)} ms; the rest is verification, certificate, release crypto and Node\n`);
  out(`  Peak RSS of ours (this process, VmHWM): ${rss.peakMiB.toFixed(0)} MiB; RSS after warm-up ${rss.afterWarmUpMiB.toFixed(0)} MiB → end ${rss.endMiB.toFixed(0)} MiB; ` +
    `V8 heap used ${rss.heapAfterWarmUp.heapUsedMiB} → ${rss.heapEnd.heapUsedMiB} MiB, external ${rss.heapAfterWarmUp.externalMiB} → ${rss.heapEnd.externalMiB} MiB${rss.heapEnd.gc ? ' (after a full GC)' : ' (run node with --expose-gc to read them after a full GC)'}\n`);

  const speedup = stats.peer!.p50 / stats.ours!.p50;
  const verdicts = [
    { target: 'speed-up ≥ 2 (p50)', peer: 'peer', ratio: speedup, met: speedup >= 2, main: true },
    { target: 'speed-up (p99)', peer: 'peer', ratio: stats.peer!.p99 / stats.ours!.p99, met: stats.peer!.p99 / stats.ours!.p99 >= 2, main: false },
    { target: 'speed-up ≥ 2 (p50)', peer: 'peer+eventlog', ratio: stats.peerLog!.p50 / stats.ours!.p50, met: stats.peerLog!.p50 / stats.ours!.p50 >= 2, main: false },
    ...(stats.cli ? [{ target: 'CLI speed-up (p50), information', peer: 'peer', ratio: stats.peer!.p50 / stats.cli.p50, met: stats.peer!.p50 / stats.cli.p50 >= 2, main: false }] : []),
  ];
  report.verdicts = verdicts;
  out(`\nTarget — verdict on the p50s against the plain quote + checkquote pipeline (peer / ours = speed-up); the others for information:\n`);
  for (const v of verdicts) out(`  ${v.main ? '' : '[info] '}${v.met ? 'met    ' : 'NOT met'} ${v.ratio.toFixed(2)}×  ${v.target}: ours vs ${v.peer}${v.target.startsWith('CLI') ? ' (ours CLI)' : ''}\n`);
  if (json) process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
} finally {
  vault?.close();
  await sw.stop();
  rmSync(root, { recursive: true, force: true });
}
