// Vault benchmark: unlock time (scrypt at 128 MiB, the default, and at 16 MiB), then put and get
// throughput in-process through ShieldLabApp.invoke, against a plain peer on the same input:
// better-sqlite3 with the vault's pragmas (WAL, synchronous=FULL, secure_delete) storing the same
// values in plaintext, one transaction per operation, as the vault does.
//
//   node_modules/.bin/node bench/vault.bench.ts [--records N] [--json]
//
// Ratios are ours / baseline in operations per second (1.0 = as fast as plain SQLite; 0.25 = a
// quarter of its speed). Each vault get is audited (one write transaction per read), so the table
// also shows a baseline that logs each read, which is the like-for-like comparison.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import Database from 'better-sqlite3';
import { ShieldLabApp } from '../core/app/service.ts';
import { Vault } from '../core/vault/mod.ts';

const argv = process.argv.slice(2);
const json = argv.includes('--json');
const recordsArg = argv.indexOf('--records');
const N = recordsArg >= 0 ? Number(argv[recordsArg + 1]) : 2000;
if (!Number.isInteger(N) || N < 10) {
  process.stderr.write('usage: vault.bench.ts [--records N (>= 10)] [--json]\n');
  process.exit(2);
}

const root = mkdtempSync(join(tmpdir(), 'shieldlab-bench-'));
const passphrase = 'benchmark passphrase';
const names = Array.from({ length: N }, (_, i) => `record-${String(i).padStart(6, '0')}`);
const values = names.map(() => randomBytes(48).toString('base64')); // 64 characters each

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

async function time(fn: () => unknown): Promise<number> {
  const t = performance.now();
  await fn();
  return performance.now() - t;
}

/** Creates a vault with the given scrypt memory, then times fresh open + unlock `reps` times. */
async function unlockTimes(label: string, mib: number, reps: number): Promise<number[]> {
  const home = join(root, label);
  const init = new ShieldLabApp({ home });
  await init.invoke('vault.init', { passphrase, keychain: false, kdfMemoryMib: mib });
  init.close();
  const times: number[] = [];
  for (let i = 0; i < reps; i++) {
    const app = new ShieldLabApp({ home });
    times.push(await time(() => app.invoke('vault.unlock', { passphrase })));
    app.close();
  }
  return times;
}

interface Row {
  metric: string;
  ours: number;
  baseline: number | null;
  unit: string;
  note?: string;
}

const rows: Row[] = [];
const started = performance.now();
try {
  // ---- unlock ----
  const unlock128 = await unlockTimes('kdf-128', 128, 3);
  const unlock16 = await unlockTimes('kdf-16', 16, 5);
  rows.push({ metric: 'unlock, scrypt 128 MiB (default)', ours: median(unlock128), baseline: null, unit: 'ms', note: `median of ${unlock128.length}` });
  rows.push({ metric: 'unlock, scrypt 16 MiB', ours: median(unlock16), baseline: null, unit: 'ms', note: `median of ${unlock16.length}` });

  // ---- ours: through the service ----
  const home = join(root, 'ops');
  const app = new ShieldLabApp({ home });
  await app.invoke('vault.init', { passphrase, keychain: false, kdfMemoryMib: 16 });
  for (let i = 0; i < 20; i++) await app.invoke('vault.put', { name: `warm-${i}`, value: values[i]! });
  const putMs = await time(async () => {
    for (let i = 0; i < N; i++) await app.invoke('vault.put', { name: names[i]!, value: values[i]! });
  });
  const getMs = await time(async () => {
    for (let i = 0; i < N; i++) {
      const r = (await app.invoke('vault.get', { name: names[i]! })) as { value: string };
      if (r.value !== values[i]) throw new Error(`read back the wrong value for ${names[i]}`);
    }
  });
  app.close();

  // ---- ours: core Vault without the service layer (where the time goes) ----
  const coreHome = join(root, 'core');
  const vault = await Vault.create(coreHome, { passphrase: Buffer.from(passphrase), kdf: { N: 16 * 1024, r: 8, p: 1 } });
  const corePutMs = await time(() => {
    for (let i = 0; i < N; i++) vault.putRecord('secret', { name: names[i]!, data: Buffer.from(values[i]!) });
  });
  const coreGetMs = await time(() => {
    for (let i = 0; i < N; i++) vault.getRecord('secret', names[i]!);
  });
  vault.close();

  // ---- baseline: plain better-sqlite3, same pragmas, plaintext rows ----
  const db = new Database(join(root, 'baseline.db'));
  db.pragma('busy_timeout = 5000');
  db.pragma('journal_mode = WAL');
  db.pragma('synchronous = FULL');
  db.pragma('secure_delete = ON');
  db.pragma('foreign_keys = ON');
  db.exec(`CREATE TABLE kv (name TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
           CREATE TABLE log (seq INTEGER PRIMARY KEY, at TEXT NOT NULL, entry TEXT NOT NULL) STRICT;`);
  const insert = db.prepare('INSERT INTO kv (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value');
  const select = db.prepare('SELECT value FROM kv WHERE name = ?');
  const log = db.prepare('INSERT INTO log (at, entry) VALUES (?, ?)');
  for (let i = 0; i < 20; i++) insert.run(`warm-${i}`, values[i]!);
  const basePutMs = await time(() => {
    for (let i = 0; i < N; i++) insert.run(names[i]!, values[i]!);
  });
  const baseGetMs = await time(() => {
    for (let i = 0; i < N; i++) {
      const r = select.get(names[i]!) as { value: string };
      if (r.value !== values[i]) throw new Error('baseline read mismatch');
    }
  });
  const readAndLog = db.transaction((name: string) => {
    const r = select.get(name) as { value: string };
    log.run(new Date().toISOString(), `read ${name}`);
    return r;
  });
  const baseGetLogMs = await time(() => {
    for (let i = 0; i < N; i++) readAndLog.immediate(names[i]!);
  });
  db.close();

  const ops = (ms: number) => (N / ms) * 1000;
  rows.push({ metric: `put via ShieldLabApp.invoke (${N})`, ours: ops(putMs), baseline: ops(basePutMs), unit: 'ops/s' });
  rows.push({ metric: `get via ShieldLabApp.invoke (${N})`, ours: ops(getMs), baseline: ops(baseGetMs), unit: 'ops/s', note: 'baseline: plain SELECT' });
  rows.push({ metric: `get via ShieldLabApp.invoke (${N})`, ours: ops(getMs), baseline: ops(baseGetLogMs), unit: 'ops/s', note: 'baseline: SELECT + log row, 1 txn' });
  rows.push({ metric: `put, core Vault.putRecord (${N})`, ours: ops(corePutMs), baseline: ops(basePutMs), unit: 'ops/s' });
  rows.push({ metric: `get, core Vault.getRecord (${N})`, ours: ops(coreGetMs), baseline: ops(baseGetLogMs), unit: 'ops/s', note: 'baseline: SELECT + log row, 1 txn' });
} finally {
  rmSync(root, { recursive: true, force: true });
}
const totalMs = performance.now() - started;

const fmt = (x: number, unit: string) => (unit === 'ms' ? `${x.toFixed(0)} ms` : `${Math.round(x).toLocaleString('en-US')} ops/s`);
const ratio = (r: Row) => (r.baseline === null ? null : r.ours / r.baseline);

if (json) {
  process.stdout.write(
    `${JSON.stringify(
      {
        records: N,
        node: process.versions.node,
        sqlite: (() => {
          const d = new Database(':memory:');
          const v = (d.prepare('SELECT sqlite_version() AS v').get() as { v: string }).v;
          d.close();
          return v;
        })(),
        totalMs: Math.round(totalMs),
        results: rows.map((r) => ({ ...r, ratio: ratio(r) })),
      },
      null,
      2,
    )}\n`,
  );
} else {
  const table = [
    ['metric', 'ours', 'baseline', 'ours/baseline', 'note'],
    ...rows.map((r) => [r.metric, fmt(r.ours, r.unit), r.baseline === null ? '—' : fmt(r.baseline, r.unit), ratio(r) === null ? '—' : ratio(r)! >= 0.1 ? ratio(r)!.toFixed(2) : ratio(r)!.toPrecision(2), r.note ?? '']),
  ];
  const widths = table[0]!.map((_, i) => Math.max(...table.map((row) => row[i]!.length)));
  const line = (row: string[]) => row.map((c, i) => (i === 1 || i === 2 || i === 3 ? c.padStart(widths[i]!) : c.padEnd(widths[i]!))).join('  ').trimEnd();
  process.stdout.write(
    [
      `ShieldLab vault benchmark — ${N} records, Node ${process.versions.node}; baseline: better-sqlite3, same pragmas, plaintext, 1 txn per op`,
      '',
      line(table[0]!),
      line(widths.map((w) => '-'.repeat(w))),
      ...table.slice(1).map(line),
      '',
      `total ${(totalMs / 1000).toFixed(1)} s`,
      '',
    ].join('\n'),
  );
}
