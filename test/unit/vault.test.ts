import { test } from 'node:test';
import assert from 'node:assert/strict';
import Database from 'better-sqlite3';
import { join } from 'node:path';
import { Vault } from '../../core/vault/mod.ts';
import { ShieldError } from '../../core/errors.ts';
import { tempDir } from '../helpers/home.ts';

const code = (c: string) => (err: unknown) => err instanceof ShieldError && err.code === c;
const pass = (s: string) => Buffer.from(s);
const kdf = { N: 1 << 14, r: 8, p: 1 };

async function fresh() {
  const t = tempDir();
  const vault = await Vault.create(t.dir, { passphrase: pass('pw-one'), kdf });
  return { ...t, vault };
}

test('records round-trip, are versioned, and need an unlocked vault', async (t) => {
  const { dir, vault, cleanup } = await fresh();
  t.after(cleanup);
  assert.equal(vault.putRecord('secret', { name: 'a', data: Buffer.from('one'), tags: ['x'] }).created, true);
  const second = vault.putRecord('secret', { name: 'a', data: Buffer.from('two') });
  assert.deepEqual([second.created, second.version], [false, 2]);
  assert.equal(Buffer.from(vault.getRecord('secret', 'a').data, 'base64').toString(), 'two');
  // Same name, other kind: a separate record.
  vault.putRecord('key-protector', { name: 'a', data: Buffer.from('kp') });
  assert.deepEqual(vault.listRecords().map((r) => `${r.kind}:${r.name}`), ['key-protector:a', 'secret:a']);
  assert.throws(() => vault.getRecord('secret', 'missing'), code('not_found'));
  vault.lock();
  assert.throws(() => vault.listRecords(), code('locked'));
  await assert.rejects(vault.unlock({ passphrase: pass('nope') }), code('wrong_passphrase'));
  await vault.unlock({ passphrase: pass('pw-one') });
  vault.deleteRecord('secret', 'a');
  assert.throws(() => vault.deleteRecord('secret', 'a'), code('not_found'));
  vault.close();
  // Reopen from disk: still there, names are not stored in clear.
  const again = Vault.open(dir);
  await again.unlock({ passphrase: pass('pw-one') });
  assert.deepEqual(again.listRecords().map((r) => r.name), ['a']);
  again.close();
  const db = new Database(join(dir, 'vault.db'), { readonly: true });
  const rows = db.prepare('SELECT * FROM records').all() as Record<string, unknown>[];
  db.close();
  assert.ok(!JSON.stringify(rows).includes('"a"'));
});

test('a sealed record moved to another row or version fails its integrity check', async (t) => {
  const { dir, vault, cleanup } = await fresh();
  t.after(cleanup);
  vault.putRecord('secret', { name: 'one', data: Buffer.from('1') });
  vault.putRecord('secret', { name: 'two', data: Buffer.from('2') });
  vault.close();
  const db = new Database(join(dir, 'vault.db'));
  const [a, b] = db.prepare('SELECT id, sealed FROM records ORDER BY id').all() as { id: string; sealed: Buffer }[];
  db.prepare('UPDATE records SET sealed = ? WHERE id = ?').run(b!.sealed, a!.id);
  db.close();
  const v = Vault.open(dir);
  await v.unlock({ passphrase: pass('pw-one') });
  assert.throws(() => v.listRecords(), code('record_tampered'));
  v.close();
});

test('audit chain: every action recorded; edits, deletions and a cut tail are detected', async (t) => {
  const { dir, vault, cleanup } = await fresh();
  t.after(cleanup);
  for (let i = 0; i < 5; i++) vault.putRecord('secret', { name: `s${i}`, data: Buffer.from('v') });
  vault.getRecord('secret', 's1');
  const actions = vault.readAudit().map((e) => e.action).reverse();
  assert.deepEqual(actions, ['vault.init', 'record.create', 'record.create', 'record.create', 'record.create', 'record.create', 'record.read']);
  assert.deepEqual(vault.verifyAudit().problems, []);
  vault.close();

  const db = new Database(join(dir, 'vault.db'));
  db.prepare("UPDATE audit SET at = '2020-01-01T00:00:00.000Z' WHERE seq = 3").run();
  db.prepare('DELETE FROM audit WHERE seq = 5').run();
  db.prepare('DELETE FROM audit WHERE seq = 7').run(); // the tail: only the anchor can tell
  db.close();
  const v = Vault.open(dir);
  assert.deepEqual(v.verifyAudit().problems.map((p) => `${p.seq}:${p.problem}`), ['3:edited', '5:missing']);
  await v.unlock({ passphrase: pass('pw-one') });
  // The unlock appended a new seq 7 after the cut; the anchor still names the old one.
  assert.deepEqual(v.verifyAudit().problems.map((p) => `${p.seq}:${p.problem}`), ['3:edited', '5:missing', '7:edited']);
  v.close();
});

test('audit anchor detects a truncated tail', async (t) => {
  const { dir, vault, cleanup } = await fresh();
  t.after(cleanup);
  for (let i = 0; i < 3; i++) vault.putRecord('secret', { name: `s${i}`, data: Buffer.from('v') });
  vault.close();
  const db = new Database(join(dir, 'vault.db'));
  db.prepare('DELETE FROM audit WHERE seq >= 3').run();
  db.close();
  const v = Vault.open(dir);
  assert.deepEqual(v.verifyAudit().problems, [], 'without the key only the chain can be checked');
  // Unlocking appends seq 3 with a different hash than the anchored one.
  await v.unlock({ passphrase: pass('pw-one') });
  assert.deepEqual(v.verifyAudit().problems.map((p) => `${p.seq}:${p.problem}`), ['4:truncated']);
  // Later entries do not paper over it: seq 4 now exists, but it is not the anchored one.
  v.putRecord('secret', { name: 'later', data: Buffer.from('v') });
  assert.deepEqual(v.verifyAudit().problems.map((p) => `${p.seq}:${p.problem}`), ['4:edited']);
  v.close();
});

test('rotating the vault key re-encrypts everything in one go; old key and lookups are gone', async (t) => {
  const { dir, vault, cleanup } = await fresh();
  t.after(cleanup);
  for (let i = 0; i < 20; i++) vault.putRecord('secret', { name: `s${i}`, data: Buffer.from(`value ${i}`) });
  await vault.splitRecovery(3, 2);
  const before = vault.snapshot();
  await assert.rejects(vault.rotateKey({}), code('invalid_argument'));
  await assert.rejects(vault.rotateKey({ passphrase: pass('wrong') }), code('wrong_passphrase'));
  let seen = 0;
  const r = await vault.rotateKey({ passphrase: pass('pw-one'), onProgress: (d) => (seen = d) });
  assert.equal(r.records, 21); // 20 secrets + the recovery key
  assert.equal(seen, 21);
  const after = vault.snapshot();
  assert.notDeepEqual(after.vaultKey, before.vaultKey);
  assert.equal(Buffer.from(vault.getRecord('secret', 's7').data, 'base64').toString(), 'value 7');
  assert.deepEqual(vault.verifyAudit().problems, []);
  vault.close();
  const v = Vault.open(dir);
  await v.unlock({ passphrase: pass('pw-one') });
  assert.equal(v.listRecords('secret').length, 20);
  v.close();
});

test('passphrase change, recovery with shares, and a stale split', async (t) => {
  const { dir, vault, cleanup } = await fresh();
  t.after(cleanup);
  vault.putRecord('secret', { name: 'k', data: Buffer.from('v') });
  const old = await vault.splitRecovery(3, 2);
  const split = await vault.splitRecovery(3, 2);
  await vault.reprotect({ passphrase: pass('pw-two'), kdf });
  vault.close();
  const v = Vault.open(dir);
  await assert.rejects(v.unlock({ passphrase: pass('pw-one') }), code('wrong_passphrase'));
  await assert.rejects(v.unlock({ shares: old.shares.slice(0, 2) }), code('shares_mismatch'));
  await v.unlock({ shares: [split.shares[2]!, split.shares[0]!] });
  assert.equal(v.listRecords('secret').length, 1);
  await v.reprotect({ passphrase: pass('pw-three'), kdf, dropOthers: true });
  v.lock();
  await v.unlock({ passphrase: pass('pw-three') });
  assert.deepEqual(v.status().slots, ['passphrase', 'recovery']);
  v.close();
});

test('schema versions: a newer vault is refused, a non-vault file is corrupt', async (t) => {
  const { dir, vault, cleanup } = await fresh();
  t.after(cleanup);
  vault.close();
  const db = new Database(join(dir, 'vault.db'));
  db.pragma('user_version = 99');
  db.close();
  assert.throws(() => Vault.open(dir), code('vault_too_new'));
  assert.throws(() => Vault.open(join(dir, 'nowhere')), code('vault_not_initialised'));
});

test('atomically: several writes and their audit entries land together, or none does', async (t) => {
  const { vault, cleanup } = await fresh();
  t.after(() => {
    vault.close();
    cleanup();
  });
  const entries = () => vault.readAudit({ limit: 1000 }).length;
  const before = entries();
  assert.throws(
    () =>
      vault.atomically(() => {
        vault.putRecord('secret', { name: 'x', data: Buffer.from('1') });
        vault.record({ action: 'host.attest', outcome: 'ok', subject: 'tpm' });
        throw new ShieldError('disk_full', 'stand-in for a failure half-way');
      }),
    code('disk_full'),
  );
  assert.equal(vault.hasRecord('secret', 'x'), false);
  assert.equal(entries(), before);
  vault.atomically(() => {
    vault.putRecord('secret', { name: 'x', data: Buffer.from('1') });
    vault.record({ action: 'host.attest', outcome: 'ok', subject: 'tpm' });
  });
  assert.equal(vault.hasRecord('secret', 'x'), true);
  assert.equal(entries(), before + 2);
  assert.deepEqual(vault.verifyAudit().problems, []);
});
