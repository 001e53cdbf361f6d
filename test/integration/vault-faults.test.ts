// Bad input and faults through the real CLI: each gives one clear typed error (`--json` prints
// {"error":{"code":…}}, exit 1 — 2 for usage) and loses nothing: afterwards the earlier secrets are
// all readable and the audit chain verifies.
//
// Faults covered: wrong passphrase; recovery shares (too few, from another set, mistyped); damaged,
// truncated and stale backups; restore over an existing vault; recovery of a lost passphrase; a
// damaged or truncated vault.db and a file of random bytes; records and audit rows tampered with
// through the independent `sqlite3` tool; concurrent writers in several processes; a full disk
// (a small tmpfs, which needs mount(2): skipped, naming why, where that is refused).
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import {
  closeSync,
  copyFileSync,
  existsSync,
  mkdirSync,
  openSync,
  readFileSync,
  readdirSync,
  rmSync,
  statSync,
  truncateSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { ShieldLabApp } from '../../core/app/service.ts';
import { Vault } from '../../core/vault/mod.ts';
import { ShieldError, type ErrorCode } from '../../core/errors.ts';
import { ROOT, cliJson, secretFile, tempDir } from '../helpers/home.ts';
import { valueFor } from './fixtures/values.ts';

// ---- helpers ------------------------------------------------------------------------------------

type ErrorBody = { error?: { code: string; message: string; details?: Record<string, unknown> } };

const STACK_LINE = /^\s+at /m;

function noStack(text: string, where: string): void {
  assert.doesNotMatch(text, STACK_LINE, `${where}: a stack trace leaked:\n${text}`);
}

/** Runs the CLI with --json and expects one typed error. Returns the error. */
async function expectError(args: string[], codes: ErrorCode | ErrorCode[], exit = 1): Promise<NonNullable<ErrorBody['error']>> {
  const wanted = Array.isArray(codes) ? codes : [codes];
  const r = await cliJson<ErrorBody>(args);
  const where = `shieldlab ${args.join(' ')}`;
  assert.ok(r.body.error, `${where}: expected error ${wanted.join('|')}, got exit ${r.code} and ${JSON.stringify(r.body).slice(0, 300)}`);
  assert.ok(wanted.includes(r.body.error.code as ErrorCode), `${where}: expected ${wanted.join('|')}, got ${r.body.error.code}: ${r.body.error.message}`);
  assert.equal(r.code, exit, `${where}: exit status`);
  assert.ok(r.body.error.message.length > 0, `${where}: the error has no message`);
  noStack(r.stderr, where);
  noStack(r.body.error.message, where);
  return r.body.error;
}

async function expectOk<T = Record<string, unknown>>(args: string[]): Promise<T> {
  const r = await cliJson<T & ErrorBody>(args);
  assert.equal(r.code, 0, `shieldlab ${args.join(' ')}: exit ${r.code}: ${JSON.stringify(r.body).slice(0, 400)}\n${r.stderr}`);
  return r.body;
}

/** Runs fn over items with at most `limit` at a time (the CI machine has 2 cores). */
async function pool<T, R>(items: readonly T[], limit: number, fn: (item: T, index: number) => Promise<R>): Promise<R[]> {
  const results: R[] = new Array(items.length);
  let next = 0;
  const workers = Array.from({ length: Math.min(limit, items.length) }, async () => {
    while (next < items.length) {
      const i = next++;
      results[i] = await fn(items[i]!, i);
    }
  });
  await Promise.all(workers);
  return results;
}

const sha = (file: string) => createHash('sha256').update(readFileSync(file)).digest('hex');
const KDF = ['--kdf-memory-mib', '16'];

interface Fixture {
  home: string;
  passFile: string;
  passphrase: string;
  secrets: Map<string, string>;
  /** ['--home', home] */
  h: string[];
}

/** A vault made through the service (real core code), its passphrase file outside the home. */
async function seedVault(dir: string, label: string, secrets: Record<string, string>): Promise<Fixture> {
  const home = join(dir, `${label}-home`);
  const passphrase = `passphrase of ${label} ${randomBytes(6).toString('hex')}`;
  const passFile = secretFile(dir, `${label}.pp`, passphrase);
  const app = new ShieldLabApp({ home });
  try {
    await app.invoke('vault.init', { passphrase, keychain: false, kdfMemoryMib: 16 });
    for (const [name, value] of Object.entries(secrets)) await app.invoke('vault.put', { name, value });
  } finally {
    app.close();
  }
  return { home, passFile, passphrase, secrets: new Map(Object.entries(secrets)), h: ['--home', home] };
}

/** Everything still there: each secret with its value, no others, and an intact audit chain. */
async function assertIntact(home: string, passphrase: string, secrets: ReadonlyMap<string, string>, where: string): Promise<void> {
  const app = new ShieldLabApp({ home });
  try {
    await app.invoke('vault.unlock', { passphrase });
    const list = (await app.invoke('vault.list', { kind: 'secret' })) as { records: { name: string }[] };
    assert.deepEqual(list.records.map((r) => r.name).sort(), [...secrets.keys()].sort(), `${where}: the set of secrets changed`);
    for (const [name, value] of secrets) {
      const got = (await app.invoke('vault.get', { name })) as { value: string };
      assert.equal(got.value, value, `${where}: ${name} has the wrong value`);
    }
    const audit = (await app.invoke('vault.audit', { verify: true, limit: 1 })) as { verification: { ok: boolean; problems: unknown[] } };
    assert.deepEqual(audit.verification.problems, [], `${where}: audit chain broken`);
  } finally {
    app.close();
  }
}

function sqlite3Missing(): string | null {
  if (spawnSync('sh', ['-c', 'command -v sqlite3']).status === 0) return null;
  if (process.env.CI) throw new Error('CI=true but the sqlite3 command-line tool is missing: .ci/run must install it');
  return 'needs the sqlite3 command-line tool (Debian: sqlite3)';
}

function sqlite3(db: string, sql: string): string {
  return execFileSync('sqlite3', ['-bail', db, sql], { encoding: 'utf8' });
}

/**
 * A temp dir made by the suite's first `before` hook and removed by its `after`: nothing is created
 * (or leaked) for a suite that a name filter leaves out.
 */
function suiteDir(): { readonly dir: string } {
  let made: ReturnType<typeof tempDir> | undefined;
  before(() => {
    made = tempDir();
  });
  after(() => made?.cleanup());
  return {
    get dir() {
      if (!made) throw new Error('suiteDir used outside its suite');
      return made.dir;
    },
  };
}

const distinct = (prefix: string, n: number) =>
  Object.fromEntries(Array.from({ length: n }, (_, i) => [`${prefix}${String(i + 1).padStart(2, '0')}`, `${prefix} value ${i + 1} ${randomBytes(8).toString('hex')}`]));

// ---- wrong passphrase ---------------------------------------------------------------------------

test('wrong passphrase: wrong_passphrase for every unlocking command, audited as refused, nothing lost', async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const v = await seedVault(dir, 'wp', { alpha: 'alpha-1', beta: 'beta-2', gamma: 'gamma-3' });
  const wrong = secretFile(dir, 'wrong.pp', `${v.passphrase}!`);
  const value = secretFile(dir, 'value', 'should never be stored');
  const attempts = [['vault', 'unlock'], ['vault', 'get', 'alpha'], ['vault', 'list'], ['vault', 'put', 'delta', '--value-file', value], ['vault', 'delete', 'beta']];
  for (const cmd of attempts) {
    const e = await expectError([...v.h, ...cmd, '--passphrase-file', wrong], 'wrong_passphrase');
    assert.doesNotMatch(e.message, new RegExp(v.passphrase), 'the error repeats the passphrase');
  }
  // An empty passphrase is bad input (usage-class exit 2), not a refused unlock.
  await expectError([...v.h, 'vault', 'unlock', '--passphrase-file', secretFile(dir, 'empty.pp', '')], 'invalid_argument', 2);
  // A passphrase file that does not exist.
  await expectError([...v.h, 'vault', 'unlock', '--passphrase-file', join(dir, 'no-such-file')], 'not_found');

  const audit = await expectOk<{ entries: { action: string; outcome: string; reason?: string; subject?: string }[]; verification: { ok: boolean } }>([
    ...v.h, 'vault', 'audit', '--verify', '--passphrase-file', v.passFile,
  ]);
  const refused = audit.entries.filter((e) => e.action === 'vault.unlock' && e.outcome === 'refused');
  assert.equal(refused.length, attempts.length, `one refusal per wrong attempt: ${JSON.stringify(refused)}`);
  for (const e of refused) assert.deepEqual([e.subject, e.reason], ['passphrase', 'wrong_passphrase']);
  assert.equal(audit.verification.ok, true);
  await assertIntact(v.home, v.passphrase, v.secrets, 'after wrong passphrases');
});

// ---- recovery shares and backups --------------------------------------------------------------

describe('recovery shares and backups', () => {
  const t = suiteDir();
  let a: Fixture; // the vault under test
  let x: Fixture; // another vault, for foreign shares
  let sharesA1: string[]; // first split of a
  let sharesA2: string[]; // a later split of a
  let sharesX: string[];
  let backup1: string; // made under sharesA1
  let homes = 0;
  const newHome = () => join(t.dir, `restored-${++homes}`);
  let newPass: string;

  const restoreArgs = (home: string, file: string, shares: string[]) => [
    '--home', home, 'vault', 'restore', file, ...shares.flatMap((s) => ['--share', s]), '--no-keychain', '--passphrase-file', newPass, ...KDF,
  ];

  before(async () => {
    [a, x] = await Promise.all([seedVault(t.dir, 'a', distinct('a-secret-', 6)), seedVault(t.dir, 'x', { other: 'other vault' })]);
    newPass = secretFile(t.dir, 'restored.pp', 'the passphrase of the restored copy');
    const [splitA, splitX] = await Promise.all([
      expectOk<{ shares: string[]; threshold: number; setId: string }>([...a.h, 'vault', 'recovery', 'split', '--shares', '5', '--threshold', '3', '--passphrase-file', a.passFile]),
      expectOk<{ shares: string[] }>([...x.h, 'vault', 'recovery', 'split', '--shares', '5', '--threshold', '3', '--passphrase-file', x.passFile]),
    ]);
    sharesA1 = splitA.shares;
    sharesX = splitX.shares;
    assert.equal(sharesA1.length, 5);
    assert.equal(new Set(sharesA1).size, 5);
    backup1 = join(t.dir, 'a-1.slbackup');
    const b = await expectOk<{ file: string; records: number; recoverySetId: string }>([...a.h, 'vault', 'backup', '--out', backup1, '--passphrase-file', a.passFile]);
    assert.equal(b.recoverySetId, splitA.setId);
    assert.ok(statSync(backup1).size > 100);
  });

  test('restore into a new empty home with 3 of 5 shares: identical secrets, new protection', async () => {
    const home = newHome();
    const status = await expectOk<{ vaultId: string; slots: string[]; unlocked: boolean }>(restoreArgs(home, backup1, [sharesA1[4]!, sharesA1[0]!, sharesA1[2]!]));
    const original = await expectOk<{ vaultId: string }>([...a.h, 'vault', 'status']);
    assert.equal(status.vaultId, original.vaultId);
    assert.deepEqual(status.slots, ['passphrase', 'recovery']);
    await assertIntact(home, readFileSync(newPass, 'utf8'), a.secrets, 'restored copy');
    // The old machine's passphrase does not open the copy.
    await expectError(['--home', home, 'vault', 'get', 'a-secret-01', '--passphrase-file', a.passFile], 'wrong_passphrase');
  });

  test('restore with 2 of the 3 needed shares: shares_insufficient, nothing written', async () => {
    const home = newHome();
    const e = await expectError(restoreArgs(home, backup1, [sharesA1[0]!, sharesA1[1]!]), 'shares_insufficient');
    assert.deepEqual(e.details, { needed: 3, given: 2 });
    // The same share twice is still only one share.
    await expectError(restoreArgs(home, backup1, [sharesA1[0]!, sharesA1[1]!, sharesA1[1]!]), 'shares_insufficient');
    assert.equal(existsSync(join(home, 'vault.db')), false);
  });

  test('a share of another vault mixed in: shares_mismatch', async () => {
    const home = newHome();
    await expectError(restoreArgs(home, backup1, [sharesA1[0]!, sharesA1[1]!, sharesX[2]!]), 'shares_mismatch');
    await expectError(restoreArgs(home, backup1, [sharesX[0]!, sharesA1[1]!, sharesA1[2]!]), 'shares_mismatch');
    assert.equal(existsSync(join(home, 'vault.db')), false);
  });

  test('a share with one character changed, or not a share at all: share_invalid', async () => {
    const home = newHome();
    const ALPHABET = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
    const original = sharesA1[1]!;
    // Change one character in each region of the share: set id, threshold, share body, checksum.
    const positions = [5, 14, 40, original.length - 3].filter((i) => ALPHABET.includes(original[i]!));
    assert.ok(positions.length >= 3);
    await pool(positions, 3, async (i) => {
      const c = original[i]!;
      const changed = original.slice(0, i) + ALPHABET[(ALPHABET.indexOf(c) + 7) % 32] + original.slice(i + 1);
      const e = await expectError(restoreArgs(home, backup1, [sharesA1[0]!, changed, sharesA1[2]!]), 'share_invalid');
      assert.deepEqual(e.details, { share: 2 }, `changed char ${i}: the error names share 2`);
    });
    // Not a share at all, characters outside the alphabet, a share cut short.
    await pool(['hello, world', 'SL1-0000-1111-8888', sharesA1[2]!.slice(0, -5)], 3, (bad) =>
      expectError(restoreArgs(home, backup1, [sharesA1[0]!, sharesA1[1]!, bad]), 'share_invalid'),
    );
    // Case and dashes do not matter: a share typed in lower case without dashes still works.
    const typed = sharesA1[3]!.toLowerCase().replace(/-/g, '');
    const ok = await cliJson(restoreArgs(newHome(), backup1, [sharesA1[0]!, typed, sharesA1[2]!]));
    assert.equal(ok.code, 0, JSON.stringify(ok.body));
    assert.equal(existsSync(join(home, 'vault.db')), false);
  });

  test('a truncated backup (several cut points): backup_invalid', async () => {
    const bytes = readFileSync(backup1);
    const hend = 14 + bytes.readUInt32BE(10);
    const cuts = [0, 8, 14, hend - 1, hend + 12, Math.floor(bytes.length / 2), bytes.length - 17, bytes.length - 1];
    await pool(cuts, 3, async (cut) => {
      const file = join(t.dir, `cut-${cut}.slbackup`);
      writeFileSync(file, bytes.subarray(0, cut));
      const home = newHome();
      await expectError(restoreArgs(home, file, sharesA1.slice(0, 3)), 'backup_invalid');
      assert.equal(existsSync(join(home, 'vault.db')), false, `cut at ${cut}: a vault appeared`);
    });
  });

  test('a backup with one byte flipped, in the header and in the body: backup_invalid', async () => {
    const bytes = readFileSync(backup1);
    const hend = 14 + bytes.readUInt32BE(10);
    const headerText = bytes.subarray(14, hend).toString('utf8');
    const inHeader = (needle: string, offset: number) => 14 + Buffer.byteLength(headerText.slice(0, headerText.indexOf(needle) + offset));
    const positions = [
      0, // magic
      9, // format
      13, // header length
      14, // '{'
      inHeader('"vaultId"', 12), // inside the vault id
      inHeader('"createdAt"', 15), // inside the date
      hend - 1, // '}'
      hend, // nonce
      hend + Math.floor((bytes.length - hend) / 2), // the middle of the body
      bytes.length - 1, // authentication tag
    ];
    await pool(positions, 3, async (pos) => {
      const copy = Buffer.from(bytes);
      copy[pos] = copy[pos]! ^ 0xff;
      const file = join(t.dir, `flip-${pos}.slbackup`);
      writeFileSync(file, copy);
      const home = newHome();
      await expectError(restoreArgs(home, file, sharesA1.slice(0, 3)), 'backup_invalid');
      assert.equal(existsSync(join(home, 'vault.db')), false, `flip at ${pos}: a vault appeared`);
    });
    // A flip inside the header's recovery-set id makes the right shares look like another set's:
    // the header is only authenticated under the key the shares rebuild, so the two cases cannot
    // be told apart. Either refusal is acceptable; a restore is not.
    const setPos = inHeader('"recoverySetId"', 18);
    const copy = Buffer.from(bytes);
    copy[setPos] = copy[setPos]! ^ 0x01;
    const file = join(t.dir, 'flip-set-id.slbackup');
    writeFileSync(file, copy);
    await expectError(restoreArgs(newHome(), file, sharesA1.slice(0, 3)), ['backup_invalid', 'backup_wrong_key']);
    // Not a backup at all.
    await expectError(restoreArgs(newHome(), a.passFile, sharesA1.slice(0, 3)), 'backup_invalid');
    await expectError(restoreArgs(newHome(), join(t.dir, 'no-such.slbackup'), sharesA1.slice(0, 3)), 'not_found');
  });

  test('after a new split, an older backup refuses the new shares (backup_wrong_key) but opens with its own', async () => {
    const split2 = await expectOk<{ shares: string[] }>([...a.h, 'vault', 'recovery', 'split', '--shares', '3', '--threshold', '2', '--passphrase-file', a.passFile]);
    sharesA2 = split2.shares;
    await expectError(restoreArgs(newHome(), backup1, sharesA2.slice(0, 2)), 'backup_wrong_key');
    // The old backup still opens with the shares it was made under...
    const old = newHome();
    await expectOk(restoreArgs(old, backup1, [sharesA1[1]!, sharesA1[3]!, sharesA1[4]!]));
    await assertIntact(old, readFileSync(newPass, 'utf8'), a.secrets, 'old backup, old shares');
    // ...and a new backup opens with the new shares, not the old ones.
    const backup2 = join(t.dir, 'a-2.slbackup');
    await expectOk([...a.h, 'vault', 'backup', '--out', backup2, '--passphrase-file', a.passFile]);
    await expectError(restoreArgs(newHome(), backup2, sharesA1.slice(0, 3)), 'backup_wrong_key');
    const fresh = newHome();
    await expectOk(restoreArgs(fresh, backup2, [sharesA2[2]!, sharesA2[0]!]));
    await assertIntact(fresh, readFileSync(newPass, 'utf8'), a.secrets, 'new backup, new shares');
  });

  test('restore into a home that already holds a vault: home_not_empty, that vault untouched', async () => {
    const db = join(a.home, 'vault.db');
    const before = sha(db);
    await expectError(restoreArgs(a.home, backup1, sharesA1.slice(0, 3)), 'home_not_empty');
    assert.equal(sha(db), before);
    await assertIntact(a.home, a.passphrase, a.secrets, 'after a refused restore over it');
  });

  test('recover: old shares refused (shares_mismatch), new shares set a new passphrase, the old one stops working', async () => {
    const recoverArgs = (shares: string[]) => [...a.h, 'vault', 'recover', ...shares.flatMap((s) => ['--share', s]), '--no-keychain', '--passphrase-file', newPass, ...KDF];
    const before = sha(join(a.home, 'vault.db'));
    await expectError(recoverArgs(sharesA1.slice(0, 3)), 'shares_mismatch');
    await expectError(recoverArgs(sharesA2.slice(0, 1)), 'shares_insufficient');
    assert.notEqual(sha(join(a.home, 'vault.db')), before, 'the shares_mismatch refusal was written to the audit trail');
    // Refused recoveries leave the protection alone: the old passphrase still works.
    await assertIntact(a.home, a.passphrase, a.secrets, 'after refused recoveries');

    const status = await expectOk<{ slots: string[]; unlocked: boolean }>(recoverArgs([sharesA2[1]!, sharesA2[2]!]));
    assert.deepEqual(status.slots, ['passphrase', 'recovery']);
    await expectError([...a.h, 'vault', 'get', 'a-secret-01', '--passphrase-file', a.passFile], 'wrong_passphrase');
    await assertIntact(a.home, readFileSync(newPass, 'utf8'), a.secrets, 'after recover');
    const audit = await expectOk<{ entries: { action: string; outcome: string; reason?: string }[] }>([...a.h, 'vault', 'audit', '--limit', '1000', '--passphrase-file', newPass]);
    const summary = audit.entries.map((e) => `${e.action}:${e.outcome}${e.reason ? `:${e.reason}` : ''}`);
    assert.ok(summary.includes('vault.unlock:refused:shares_mismatch'), summary.join('\n'));
    assert.ok(summary.includes('vault.recover:ok'), summary.join('\n'));
  });
});

// ---- a damaged vault.db -----------------------------------------------------------------------

describe('a damaged vault.db', { concurrency: 2 }, () => {
  const t = suiteDir();
  let pristine: string;
  let v: Fixture;
  let valueFile: string;
  let homes = 0;

  before(async () => {
    // Values of ~2 KiB so that the records span many pages.
    v = await seedVault(t.dir, 'dmg', Object.fromEntries(Array.from({ length: 16 }, (_, i) => [`s${String(i).padStart(2, '0')}`, randomBytes(1500).toString('base64')])));
    pristine = join(t.dir, 'pristine.db');
    copyFileSync(join(v.home, 'vault.db'), pristine);
    assert.deepEqual(readdirSync(v.home), ['vault.db'], 'closed cleanly: no -wal or -shm left');
    valueFile = secretFile(t.dir, 'value', 'a new value');
  });

  /** A fresh home holding a damaged copy of the pristine vault. */
  function damaged(damage: (file: string, bytes: Buffer) => void): string {
    const home = join(t.dir, `damaged-${++homes}`);
    mkdirSync(home, { mode: 0o700 });
    const file = join(home, 'vault.db');
    copyFileSync(pristine, file);
    damage(file, readFileSync(pristine));
    return home;
  }

  const overwrite = (file: string, offset: number, bytes: Buffer) => {
    const fd = openSync(file, 'r+');
    try {
      writeSync(fd, bytes, 0, bytes.length, offset);
    } finally {
      closeSync(fd);
    }
  };

  const commands = (h: string[]) => [
    [...h, 'vault', 'status'],
    [...h, 'vault', 'get', 's03', '--passphrase-file', v.passFile],
    [...h, 'vault', 'list', '--passphrase-file', v.passFile],
    [...h, 'vault', 'audit', '--verify', '--passphrase-file', v.passFile],
    [...h, 'vault', 'put', 'fresh', '--value-file', valueFile, '--passphrase-file', v.passFile],
  ];

  /**
   * Every command fails with one of `codes`, prints no stack trace, and leaves the file as it found
   * it (no hot WAL left behind either). All commands run; the failures are reported together.
   */
  async function everyCommandRefuses(home: string, codes: ErrorCode[]): Promise<void> {
    const file = join(home, 'vault.db');
    const problems: string[] = [];
    for (const args of commands(['--home', home])) {
      const cmd = args.slice(2, args[3] === 'get' || args[3] === 'put' ? 5 : 4).join(' ');
      const before = sha(file);
      const r = await cliJson<ErrorBody>(args);
      if (STACK_LINE.test(r.stderr)) problems.push(`${cmd}: stack trace on stderr`);
      if (!r.body.error) problems.push(`${cmd}: succeeded (exit ${r.code})`);
      else if (!codes.includes(r.body.error.code as ErrorCode)) problems.push(`${cmd}: ${r.body.error.code} (${r.body.error.message})`);
      else if (r.code !== 1) problems.push(`${cmd}: exit ${r.code}`);
      if (sha(file) !== before) problems.push(`${cmd}: modified vault.db`);
      const wal = join(home, 'vault.db-wal');
      if (existsSync(wal) && statSync(wal).size > 0) problems.push(`${cmd}: left a non-empty WAL`);
    }
    assert.deepEqual(problems, [], `expected ${codes.join('|')} from every command:\n  ${problems.join('\n  ')}`);
  }

  test('a file of random bytes named vault.db: vault_corrupt from every command, file untouched', async () => {
    const home = damaged((file, bytes) => writeFileSync(file, randomBytes(bytes.length)));
    await everyCommandRefuses(home, ['vault_corrupt']);
  });

  for (const [label, cut] of [
    ['to 100 bytes (the header alone)', () => 100],
    ['to one page', () => 4096],
    ['to half', (n: number) => Math.floor(n / 2 / 4096) * 4096],
    ['by its last page', (n: number) => n - 4096],
  ] as const) {
    test(`vault.db truncated ${label}: vault_corrupt from every command, file untouched`, async () => {
      const home = damaged((file, bytes) => truncateSync(file, cut(bytes.length)));
      await everyCommandRefuses(home, ['vault_corrupt']);
    });
  }

  test('vault.db truncated to 0 bytes: vault_corrupt from every command, file left empty', async () => {
    const home = damaged((file) => truncateSync(file, 0));
    await everyCommandRefuses(home, ['vault_corrupt']);
    assert.equal(statSync(join(home, 'vault.db')).size, 0);
  });

  test('a page in the middle of vault.db overwritten: every command refuses (vault_corrupt), file untouched', async () => {
    const home = damaged((file, bytes) => {
      const pages = bytes.length / 4096;
      overwrite(file, Math.floor(pages / 2) * 4096, randomBytes(4096));
    });
    await everyCommandRefuses(home, ['vault_corrupt', 'record_tampered']);
  });

  test("bytes inside one record's ciphertext overwritten: that record is record_tampered, the others are intact", async () => {
    // Find s07's sealed blob (on a scratch copy, through core) and overwrite 16 bytes of its ciphertext.
    const scratch = damaged(() => undefined);
    let id: string;
    let sealed: Buffer;
    const vault = Vault.open(scratch);
    try {
      await vault.unlock({ passphrase: Buffer.from(v.passphrase) });
      id = vault.listRecords('secret').find((r) => r.name === 's07')!.id;
    } finally {
      vault.close();
    }
    const db = new Database(join(scratch, 'vault.db'), { readonly: true });
    try {
      sealed = (db.prepare('SELECT sealed FROM records WHERE id = ?').get(id) as { sealed: Buffer }).sealed;
    } finally {
      db.close();
    }
    const home = damaged((file, bytes) => {
      const at = bytes.indexOf(sealed.subarray(0, 32));
      assert.ok(at > 0, 'the sealed blob is in the file');
      overwrite(file, at + 40, randomBytes(16));
    });
    const h = ['--home', home];
    const get = await expectError([...h, 'vault', 'get', 's07', '--passphrase-file', v.passFile], 'record_tampered');
    assert.deepEqual(get.details, { id });
    await expectError([...h, 'vault', 'list', '--passphrase-file', v.passFile], 'record_tampered');
    const others = new Map([...v.secrets].filter(([name]) => name !== 's07'));
    const app = new ShieldLabApp({ home });
    try {
      await app.invoke('vault.unlock', { passphrase: v.passphrase });
      for (const [name, value] of others) assert.equal(((await app.invoke('vault.get', { name })) as { value: string }).value, value);
      const audit = (await app.invoke('vault.audit', { verify: true, limit: 1 })) as { verification: { problems: unknown[] } };
      assert.deepEqual(audit.verification.problems, []);
    } finally {
      app.close();
    }
    // Still reported on the next read: the damage is neither repaired silently nor spread.
    await expectError([...h, 'vault', 'get', 's07', '--passphrase-file', v.passFile], 'record_tampered');
  });
});

// ---- tampering through the sqlite3 tool ---------------------------------------------------------

describe('rows tampered with through the sqlite3 tool', { skip: sqlite3Missing() ?? false, concurrency: 2 }, () => {
  const t = suiteDir();
  let v: Fixture;
  let template: string;
  let ids: Map<string, string>;
  let lastSeq: number;
  let homes = 0;

  before(async () => {
    v = await seedVault(t.dir, 'tpl', { alpha: 'alpha value', beta: 'beta value', gamma: 'gamma value' });
    const app = new ShieldLabApp({ home: v.home });
    try {
      await app.invoke('vault.unlock', { passphrase: v.passphrase });
      for (const name of ['alpha', 'beta', 'gamma']) await app.invoke('vault.get', { name });
      const list = (await app.invoke('vault.list', {})) as { records: { name: string; id: string }[] };
      ids = new Map(list.records.map((r) => [r.name, r.id]));
    } finally {
      app.close();
    }
    template = join(t.dir, 'template.db');
    copyFileSync(join(v.home, 'vault.db'), template);
    lastSeq = Number(sqlite3(template, 'SELECT max(seq) FROM audit').trim());
    assert.ok(lastSeq >= 8, `enough audit entries (${lastSeq})`);
  });

  function tampered(sql: string): string[] {
    const home = join(t.dir, `tampered-${++homes}`);
    mkdirSync(home, { mode: 0o700 });
    copyFileSync(template, join(home, 'vault.db'));
    sqlite3(join(home, 'vault.db'), sql);
    return ['--home', home];
  }

  test("a record's sealed blob swapped with another record's: record_tampered; the third record is intact", async () => {
    const [a, b] = [ids.get('alpha')!, ids.get('beta')!];
    const h = tampered(
      `CREATE TEMP TABLE s AS SELECT id, sealed FROM records WHERE id IN ('${a}', '${b}');
       UPDATE records SET sealed = (SELECT sealed FROM s WHERE id = '${b}') WHERE id = '${a}';
       UPDATE records SET sealed = (SELECT sealed FROM s WHERE id = '${a}') WHERE id = '${b}';`,
    );
    const ea = await expectError([...h, 'vault', 'get', 'alpha', '--passphrase-file', v.passFile], 'record_tampered');
    assert.deepEqual(ea.details, { id: a });
    const eb = await expectError([...h, 'vault', 'get', 'beta', '--passphrase-file', v.passFile], 'record_tampered');
    assert.deepEqual(eb.details, { id: b });
    await expectError([...h, 'vault', 'list', '--passphrase-file', v.passFile], 'record_tampered');
    const gamma = await expectOk<{ value: string }>([...h, 'vault', 'get', 'gamma', '--passphrase-file', v.passFile]);
    assert.equal(gamma.value, 'gamma value');
  });

  test('the blind-index entries of two records swapped: each name finds the other record, record_tampered', async () => {
    const [a, b] = [ids.get('alpha')!, ids.get('beta')!];
    const h = tampered(
      `CREATE TEMP TABLE l AS SELECT id, lookup FROM records WHERE id IN ('${a}', '${b}');
       UPDATE records SET lookup = randomblob(32) WHERE id = '${b}';
       UPDATE records SET lookup = (SELECT lookup FROM l WHERE id = '${b}') WHERE id = '${a}';
       UPDATE records SET lookup = (SELECT lookup FROM l WHERE id = '${a}') WHERE id = '${b}';`,
    );
    await expectError([...h, 'vault', 'get', 'alpha', '--passphrase-file', v.passFile], 'record_tampered');
    await expectError([...h, 'vault', 'get', 'beta', '--passphrase-file', v.passFile], 'record_tampered');
    assert.equal((await expectOk<{ value: string }>([...h, 'vault', 'get', 'gamma', '--passphrase-file', v.passFile])).value, 'gamma value');
  });

  interface Verification {
    entries: unknown[];
    verification: { ok: boolean; entries: number; anchored: boolean; problems: { seq: number; problem: string }[] };
  }

  async function verifyBroken(h: string[], where: string): Promise<Verification['verification']> {
    const r = await cliJson<Verification & ErrorBody>([...h, 'vault', 'audit', '--verify', '--passphrase-file', v.passFile]);
    assert.equal(r.code, 1, `${where}: audit --verify must exit 1: ${JSON.stringify(r.body).slice(0, 400)}`);
    assert.ok(r.body.verification, `${where}: no verification in ${JSON.stringify(r.body).slice(0, 300)}`);
    assert.equal(r.body.verification.ok, false);
    noStack(r.stderr, where);
    return r.body.verification;
  }

  const seqs = (v: Verification['verification']) => v.problems.map((p) => `${p.seq}:${p.problem}`);

  test('an audit row edited (its time, or its sealed content): exit 1, names that entry as edited', async () => {
    const at = await verifyBroken(tampered(`UPDATE audit SET at = '2000-01-01T00:00:00.000Z' WHERE seq = 3;`), 'time edited');
    assert.deepEqual(seqs(at), ['3:edited']);
    const blob = await verifyBroken(tampered(`UPDATE audit SET sealed = randomblob(length(sealed)) WHERE seq = 5;`), 'content edited');
    assert.deepEqual(seqs(blob), ['5:edited']);
  });

  test('an audit row deleted: exit 1, names it missing', async () => {
    const r = await verifyBroken(tampered(`DELETE FROM audit WHERE seq = 4;`), 'deleted');
    assert.deepEqual(seqs(r), ['4:missing']);
  });

  test('the newest audit rows deleted: exit 1, names the cut (the anchor is not advanced past it)', async () => {
    const r = await verifyBroken(tampered(`DELETE FROM audit WHERE seq > ${lastSeq - 2};`), 'tail cut');
    // The CLI's own unlock entry is appended before the check and takes the next free number,
    // lastSeq - 1, so the anchor (lastSeq) is what proves the cut.
    assert.ok(seqs(r).includes(`${lastSeq}:truncated`), seqs(r).join(', '));
    assert.ok(r.problems.every((p) => p.seq >= lastSeq - 1 && p.seq <= lastSeq), seqs(r).join(', '));
  });

  test('two audit rows swapped: exit 1, names both', async (tc) => {
    const h = tampered(
      `CREATE TEMP TABLE s AS SELECT * FROM audit WHERE seq IN (3, 4);
       UPDATE audit SET at = (SELECT at FROM s WHERE seq = 7 - audit.seq), sealed = (SELECT sealed FROM s WHERE seq = 7 - audit.seq),
         prev_hash = (SELECT prev_hash FROM s WHERE seq = 7 - audit.seq), hash = (SELECT hash FROM s WHERE seq = 7 - audit.seq) WHERE seq IN (3, 4);`,
    );
    const r = await verifyBroken(h, 'swapped');
    tc.diagnostic(`reported: ${seqs(r).join(', ')}`);
    const named = new Set(r.problems.map((p) => p.seq));
    assert.ok(named.has(3) && named.has(4), `both swapped entries named: ${seqs(r).join(', ')}`);
    assert.ok([...named].every((s) => s >= 3 && s <= 4), `only the swapped entries are named: ${seqs(r).join(', ')}`);
  });

  test('two audit rows swapped with their hashes recomputed: exit 1, the moved ciphertexts are named', async (tc) => {
    // Moving sealed entries between positions and re-chaining the hashes (the chain is unkeyed,
    // anyone can recompute it) is caught by the per-entry AAD, which binds each entry to its seq.
    const rows = (JSON.parse(sqlite3(template, `SELECT json_group_array(json_object('seq', seq, 'at', at, 'sealed', hex(sealed), 'prev', hex(prev_hash), 'hash', hex(hash))) FROM (SELECT * FROM audit ORDER BY seq)`)) as {
      seq: number;
      at: string;
      sealed: string;
      prev: string;
      hash: string;
    }[]);
    const swapped = rows.map((r) => ({ ...r }));
    [swapped[2]!.sealed, swapped[3]!.sealed] = [rows[3]!.sealed, rows[2]!.sealed];
    let prev = Buffer.alloc(32);
    const sql: string[] = [];
    for (const r of swapped) {
      const seqBuf = Buffer.alloc(8);
      seqBuf.writeBigUInt64BE(BigInt(r.seq));
      const hash = createHash('sha256').update('shieldlab/audit/v1').update(seqBuf).update(r.at, 'utf8').update(Buffer.from(r.sealed, 'hex')).update(prev).digest();
      sql.push(`UPDATE audit SET sealed = x'${r.sealed}', prev_hash = x'${prev.toString('hex')}', hash = x'${hash.toString('hex')}' WHERE seq = ${r.seq};`);
      prev = hash;
    }
    const r = await verifyBroken(tampered(sql.join('\n')), 're-chained swap');
    tc.diagnostic(`reported: ${seqs(r).join(', ')}`);
    const named = new Set(r.problems.map((p) => p.seq));
    assert.ok(named.has(3) && named.has(4), `both moved entries named: ${seqs(r).join(', ')}`);
  });

  test('audit tampering leaves the records readable', async () => {
    const h = tampered(`DELETE FROM audit WHERE seq = 4; UPDATE audit SET at = '1999-01-01T00:00:00.000Z' WHERE seq = 6;`);
    for (const name of ['alpha', 'beta', 'gamma']) {
      assert.equal((await expectOk<{ value: string }>([...h, 'vault', 'get', name, '--passphrase-file', v.passFile])).value, `${name} value`);
    }
    assert.deepEqual(seqs(await verifyBroken(h, 'two tamperings')), ['4:missing', '6:edited']);
  });
});

// ---- concurrent writers -----------------------------------------------------------------------

describe('several processes writing at once', () => {
  const t = suiteDir();

  test('4 processes × 10 `vault put` each, in parallel: each put succeeds or is vault_busy; no lost write, no fork', async (tc) => {
    const v = await seedVault(t.dir, 'cc', { before: 'written before' });
    const lanes = 4;
    const perLane = 10;
    const succeeded = new Map<string, string>(v.secrets);
    const busy: string[] = [];
    const others: string[] = [];
    await Promise.all(
      Array.from({ length: lanes }, async (_, lane) => {
        for (let i = 0; i < perLane; i++) {
          const name = `lane${lane}-${i}`;
          const file = secretFile(t.dir, `${name}.value`, valueFor(name));
          const r = await cliJson<ErrorBody & { name?: string; created?: boolean }>([...v.h, 'vault', 'put', name, '--value-file', file, '--passphrase-file', v.passFile]);
          noStack(r.stderr, name);
          if (r.code === 0 && r.body.created === true) succeeded.set(name, valueFor(name));
          else if (r.code === 1 && r.body.error?.code === 'vault_busy') busy.push(name);
          else others.push(`${name}: exit ${r.code} ${JSON.stringify(r.body)}`);
        }
      }),
    );
    assert.deepEqual(others, [], 'every put either succeeded or was vault_busy');
    assert.ok(succeeded.size > 1, 'some puts succeeded');
    await assertIntact(v.home, v.passphrase, succeeded, 'after concurrent CLI puts');
    // Every successful put has exactly one audit entry: the chain did not fork or drop one.
    const app = new ShieldLabApp({ home: v.home });
    try {
      await app.invoke('vault.unlock', { passphrase: v.passphrase });
      const audit = (await app.invoke('vault.audit', { limit: 100_000 })) as { entries: { seq: number; action: string; subject?: string }[] };
      const creates = audit.entries.filter((e) => e.action === 'record.create').map((e) => e.subject).sort();
      assert.deepEqual(creates, [...succeeded.keys()].map((n) => `secret:${n}`).sort());
      const ordered = audit.entries.map((e) => e.seq).sort((x, y) => x - y);
      assert.deepEqual(ordered, ordered.map((_, i) => i + 1), 'audit sequence numbers are 1..n without gaps or duplicates');
    } finally {
      app.close();
    }
    tc.diagnostic(`CLI writers: ${succeeded.size - 1} stored, ${busy.length} vault_busy`);
  });

  test('4 in-process writers × 50 puts each, in parallel: every acked put is readable, chain intact', async () => {
    const v = await seedVault(t.dir, 'cw', { before: 'written before' });
    const writer = join(ROOT, 'test/integration/fixtures/vault-writer.ts');
    const outs = await Promise.all(
      Array.from(
        { length: 4 },
        (_, w) =>
          new Promise<{ code: number | null; lines: string[]; stderr: string }>((resolve, reject) => {
            const child = spawn(process.execPath, [writer, v.home, v.passFile, `w${w}`, '50'], { stdio: ['ignore', 'pipe', 'pipe'] });
            let out = '';
            let stderr = '';
            child.stdout.on('data', (d: Buffer) => (out += d));
            child.stderr.on('data', (d: Buffer) => (stderr += d));
            child.on('error', reject);
            child.on('close', (code) => resolve({ code, lines: out.split('\n').filter(Boolean), stderr }));
          }),
      ),
    );
    const expected = new Map<string, string>(v.secrets);
    for (const [w, o] of outs.entries()) {
      assert.equal(o.code, 0, `writer ${w}: ${o.lines.filter((l) => l.startsWith('error')).join('; ')}\n${o.stderr}`);
      const acks = o.lines.filter((l) => l.startsWith('ack ')).map((l) => l.slice(4));
      const busy = o.lines.filter((l) => l.startsWith('busy ')).map((l) => l.slice(5));
      assert.equal(acks.length + busy.length, 50, `writer ${w}: every put acked or busy`);
      for (const name of acks) expected.set(name, valueFor(name));
    }
    await assertIntact(v.home, v.passphrase, expected, 'after concurrent in-process writers');
  });
  test('a session left unlocked while another process rotates the key: its next put is refused or readable, never lost', async () => {
    // The long-lived session is what `shieldlab serve` and the desktop app hold; the rotation comes
    // from the CLI in another process.
    const v = await seedVault(t.dir, 'rot', { kept: 'kept value', other: 'other value' });
    const expected = new Map(v.secrets);
    const app = new ShieldLabApp({ home: v.home });
    // Everything that goes wrong is collected, so one run shows the whole picture.
    const problems: string[] = [];
    const refusal = (what: string, err: unknown) => {
      const code = (err as { code?: string }).code;
      if (!(err instanceof ShieldError) || code === 'internal' || code === 'not_found') problems.push(`${what}: ${code}: ${(err as Error).message}`);
    };
    try {
      await app.invoke('vault.unlock', { passphrase: v.passphrase });
      await app.invoke('vault.get', { name: 'kept' });
      const rotated = await expectOk<{ records: number }>([...v.h, 'vault', 'rotate-key', '--passphrase-file', v.passFile]);
      assert.equal(rotated.records, 2);
      // A read in the stale session returns the value or refuses; "not found" would be a lie.
      try {
        const got = (await app.invoke('vault.get', { name: 'kept' })) as { value: string };
        if (got.value !== 'kept value') problems.push(`stale get: wrong value ${got.value}`);
      } catch (err) {
        refusal('stale get', err);
      }
      try {
        await app.invoke('vault.put', { name: 'late', value: 'written by the stale session' });
        expected.set('late', 'written by the stale session');
      } catch (err) {
        refusal('stale put', err);
      }
    } finally {
      app.close();
    }
    // Whatever the stale session was told, the vault holds exactly that, readable with the new key.
    try {
      await assertIntact(v.home, v.passphrase, expected, 'afterwards, in a new session');
    } catch (err) {
      problems.push(`afterwards, in a new session: ${(err as { code?: string }).code ?? ''} ${(err as Error).message.split('\n')[0]!}`);
    }
    assert.deepEqual(problems, [], `a stale session after a key rotation:\n  ${problems.join('\n  ')}`);
  });
});

// ---- a full disk ---------------------------------------------------------------------------

test('a full disk: a put that does not fit gives disk_full; nothing written; earlier secrets intact once space is back', async (t) => {
  // A small tmpfs is the disk; mounting one needs CAP_SYS_ADMIN (root in CI). Without it, skip and say why.
  const { dir, cleanup } = tempDir();
  const mnt = join(dir, 'small-disk');
  mkdirSync(mnt);
  const mounted = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=768k,mode=0700', 'shieldlab-test', mnt], { encoding: 'utf8' });
  if (mounted.status !== 0) {
    cleanup();
    t.skip(`needs a small tmpfs, and mount(2) is refused here: ${(mounted.stderr || mounted.error?.message || `exit ${mounted.status}`).trim()}`);
    return;
  }
  t.after(() => {
    for (let i = 0; i < 50 && spawnSync('umount', [mnt]).status !== 0; i++) spawnSync('sleep', ['0.1']);
    cleanup();
  });
  const home = join(mnt, 'home');
  const passphrase = 'full disk passphrase';
  const passFile = secretFile(dir, 'pp', passphrase); // outside the small disk
  const h = ['--home', home];
  await expectOk([...h, 'vault', 'init', '--no-keychain', '--passphrase-file', passFile, ...KDF]);
  const secrets = new Map([['one', 'first'], ['two', 'second'], ['three', 'third']]);
  for (const [name, value] of secrets) await expectOk([...h, 'vault', 'put', name, '--value-file', secretFile(dir, name, value), '--passphrase-file', passFile]);
  const big = secretFile(dir, 'big', randomBytes(45 * 1024).toString('base64').slice(0, 60 * 1024));

  // Fill the disk, then give back `free` bytes: a little (the put's pages do not fit) and none.
  const filler = join(mnt, 'filler');
  const fill = (free: number) => {
    const fd = openSync(filler, 'w');
    const chunk = Buffer.alloc(4096);
    try {
      for (;;) writeSync(fd, chunk);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOSPC') throw err;
    } finally {
      closeSync(fd);
    }
    truncateSync(filler, Math.max(0, statSync(filler).size - free));
  };
  const problems: string[] = [];
  for (const free of [48 * 1024, 0]) {
    fill(free);
    const put = await cliJson<ErrorBody>([...h, 'vault', 'put', 'big', '--value-file', big, '--passphrase-file', passFile]);
    noStack(put.stderr, `put with ${free} bytes free`);
    if (put.body.error?.code !== 'disk_full' || put.code !== 1) problems.push(`put, ${free} bytes free: exit ${put.code}, ${JSON.stringify(put.body).slice(0, 200)}`);
    // A read on a full disk either works or says disk_full (it writes its audit entry).
    const get = await cliJson<ErrorBody & { value?: string }>([...h, 'vault', 'get', 'two', '--passphrase-file', passFile]);
    noStack(get.stderr, `get with ${free} bytes free`);
    if (!(get.code === 0 && get.body.value === 'second') && !(get.code === 1 && get.body.error?.code === 'disk_full')) {
      problems.push(`get, ${free} bytes free: exit ${get.code}, ${JSON.stringify(get.body).slice(0, 200)}`);
    }
    rmSync(filler);
  }
  assert.deepEqual(problems, [], `expected disk_full:\n  ${problems.join('\n  ')}`);
  // Space back: nothing lost, nothing half-written.
  await expectError([...h, 'vault', 'get', 'big', '--passphrase-file', passFile], 'not_found');
  await assertIntact(home, passphrase, secrets, 'after a full disk');
});
