import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { ShieldLabApp } from '../../core/app/service.ts';
import { contract, METHOD_NAMES, type AppEvent } from '../../core/app/contract.ts';
import { ShieldError } from '../../core/errors.ts';
import { fieldsOf } from '../../core/cli/flags.ts';
import { tempDir } from '../helpers/home.ts';

const code = (c: string) => (err: unknown) => err instanceof ShieldError && err.code === c;

test('every contract method has a unique CLI path and CLI-expressible arguments', () => {
  const paths = METHOD_NAMES.map((m) => contract[m].cli.path.join(' '));
  assert.equal(new Set(paths).size, paths.length);
  for (const m of METHOD_NAMES) {
    const fields = fieldsOf(contract[m].args);
    for (const p of contract[m].cli.positional ?? []) assert.ok(fields.some((f) => f.key === p), `${m}: positional ${p} is not an argument`);
    // Secrets never travel on argv: every secret field is a string read from a file or stdin.
    for (const f of fields.filter((f) => f.secret)) assert.equal(f.kind, 'string', `${m}.${f.key}`);
  }
});

test('arguments are validated against the contract before anything runs', async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const app = new ShieldLabApp({ home: join(dir, 'h') });
  t.after(() => app.close());
  await assert.rejects(app.invoke('vault.nope', {}), code('usage'));
  await assert.rejects(app.invoke('vault.init', { keychain: 'yes' }), code('invalid_argument'));
  await assert.rejects(app.invoke('vault.init', { keychain: false }), code('invalid_argument'));
  await assert.rejects(app.invoke('vault.init', { keychain: false, passphrase: 'x', kdfMemoryMib: 48 }), code('invalid_argument'));
  assert.equal((await app.invoke('vault.status', {}) as { initialised: boolean }).initialised, false);
});

test('idle auto-lock wipes the session and tells front doors', async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  t.mock.timers.enable({ apis: ['setTimeout'] });
  const app = new ShieldLabApp({ home: join(dir, 'h') });
  t.after(() => app.close());
  const events: AppEvent[] = [];
  app.onEvent((e) => events.push(e));
  await app.invoke('vault.init', { keychain: false, passphrase: 'pass phrase', kdfMemoryMib: 16 });
  await app.invoke('vault.settings', { autoLockMinutes: 2 });
  await app.invoke('vault.put', { name: 'n', value: 'v' });
  t.mock.timers.tick(60_000);
  await app.invoke('vault.list', {}); // activity: the idle period starts again
  t.mock.timers.tick(119_000);
  // Polling the status is not activity.
  assert.equal((await app.invoke('vault.status', {}) as { unlocked: boolean }).unlocked, true);
  t.mock.timers.tick(1_001);
  assert.deepEqual(events.at(-1), { type: 'state', unlocked: false, reason: 'idle' });
  await assert.rejects(app.invoke('vault.get', { name: 'n' }), code('locked'));
  await app.invoke('vault.unlock', { passphrase: 'pass phrase' });
  assert.equal((await app.invoke('vault.get', { name: 'n' }) as { value: string }).value, 'v');
  const audit = (await app.invoke('vault.audit', {}) as { entries: { action: string; reason?: string }[] }).entries;
  assert.ok(audit.some((e) => e.action === 'vault.lock' && e.reason === 'idle'));
});

test('results carry only declared fields', async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const app = new ShieldLabApp({ home: join(dir, 'h') });
  t.after(() => app.close());
  await app.invoke('vault.init', { keychain: false, passphrase: 'pass phrase', kdfMemoryMib: 16 });
  await app.invoke('vault.put', { name: 'n', value: 'hidden-value', notes: 'a note' });
  const listed = await app.invoke('vault.list', {});
  assert.ok(!JSON.stringify(listed).includes('hidden-value'));
  assert.deepEqual(Object.keys((listed as { records: object[] }).records[0]!).sort(), ['createdAt', 'id', 'kind', 'name', 'notes', 'tags', 'updatedAt', 'version']);
});
