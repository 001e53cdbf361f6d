// The real `shieldlab` binary: commands derived from the contract, exit statuses, secrets only from files.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { contract, METHOD_NAMES } from '../../core/app/contract.ts';
import { CLI, cliJson, runCli, secretFile, tempDir } from '../helpers/home.ts';

const noStack = (s: string) => assert.doesNotMatch(s, /^\s+at /m, `stack trace leaked:\n${s}`);

test('help lists every contract method; each command has its own help', async () => {
  const r = await runCli(['--help']);
  assert.equal(r.code, 0);
  for (const m of METHOD_NAMES) assert.ok(r.stdout.includes(contract[m].cli.path.join(' ')), `${m} missing from help`);
  const put = await runCli(['vault', 'put', '--help']);
  assert.match(put.stdout, /--value-file F \| --value-stdin/);
  assert.match(put.stdout, /--passphrase-file F/);
});

test('usage errors exit 2 with one line naming the code; no stack traces', async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  for (const args of [['vault', 'explode'], ['vault', 'put'], ['vault', 'put', 'x', '--value', 'on-argv'], ['vault', 'recovery', 'split', '--shares', 'many'], ['--home']]) {
    const r = await runCli(['--home', dir, ...args]);
    assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, /^shieldlab: error \[(usage|invalid_argument)\]: .+\n$/);
    noStack(r.stderr);
  }
  const j = await cliJson<{ error: { code: string } }>(['--home', dir, 'vault', 'get']);
  assert.equal(j.code, 2);
  assert.equal(j.body.error.code, 'usage');
});

test('a full round through the CLI with --json; secrets from files, stdin and /dev/fd/N', async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const home = join(dir, 'home');
  const pp = secretFile(dir, 'pp', 'a long passphrase\n');
  const h = ['--home', home];
  const status0 = await cliJson<{ initialised: boolean }>([...h, 'vault', 'status']);
  assert.deepEqual([status0.code, status0.body.initialised], [0, false]);
  const notInit = await cliJson<{ error: { code: string } }>([...h, 'vault', 'list', '--passphrase-file', pp]);
  assert.deepEqual([notInit.code, notInit.body.error.code], [1, 'vault_not_initialised']);

  const init = await cliJson<{ slots: string[]; kdf: { N: number } }>([...h, 'vault', 'init', '--no-keychain', '--passphrase-file', pp, '--kdf-memory-mib', '16']);
  assert.equal(init.code, 0, init.stderr);
  assert.deepEqual(init.body.slots, ['passphrase']);
  assert.equal(init.body.kdf.N, 16 * 1024);
  // Owner-only files, even inside a folder others can list.
  assert.equal(statSync(join(home, 'vault.db')).mode & 0o777, 0o600);
  assert.equal(statSync(home).mode & 0o777, 0o700);
  const again = await cliJson<{ error: { code: string } }>([...h, 'vault', 'init', '--no-keychain', '--passphrase-file', pp]);
  assert.equal(again.body.error.code, 'vault_exists');

  const valueFile = secretFile(dir, 'v', 'from a file');
  assert.equal((await runCli([...h, 'vault', 'put', 'one', '--value-file', valueFile, '--passphrase-file', pp, '--tags', 'a', '--tags', 'b'])).code, 0);
  assert.equal((await runCli([...h, 'vault', 'put', 'two', '--value-stdin', '--passphrase-file', pp], { stdin: 'from stdin' })).code, 0);
  // The passphrase through a pipe (bash process substitution gives /dev/fd/N): no file on disk at all.
  const viaFd = await new Promise<string>((resolve) => {
    const script = `exec "$0" "$1" --home "$2" vault get one --passphrase-file <(printf '%s' 'a long passphrase')`;
    const child = spawn('bash', ['-c', script, process.execPath, CLI, home], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d));
    child.on('close', () => resolve(out));
  });
  assert.equal(viaFd, 'from a file\n');
  const got = await cliJson<{ value: string; tags: string[] }>([...h, 'vault', 'get', 'two', '--passphrase-file', pp]);
  assert.equal(got.body.value, 'from stdin');
  const list = await cliJson<{ records: { name: string; tags: string[] }[] }>([...h, 'vault', 'list', '--passphrase-file', pp]);
  assert.deepEqual(list.body.records.map((r) => [r.name, r.tags]), [['one', ['a', 'b']], ['two', []]]);
  assert.ok(!JSON.stringify(list.body).includes('from a file'), 'list never returns values');

  const wrong = await cliJson<{ error: { code: string } }>([...h, 'vault', 'get', 'one', '--passphrase-file', valueFile]);
  assert.deepEqual([wrong.code, wrong.body.error.code], [1, 'wrong_passphrase']);
  const missing = await runCli([...h, 'vault', 'get', 'nope', '--passphrase-file', pp]);
  assert.equal(missing.code, 1);
  assert.match(missing.stderr, /\[not_found\]/);
  const del = await runCli([...h, 'vault', 'delete', 'two', '--passphrase-file', pp]);
  assert.equal(del.code, 0);

  const settings = await cliJson<{ autoLockMinutes: number }>([...h, 'vault', 'settings', '--auto-lock-minutes', '5', '--passphrase-file', pp]);
  assert.equal(settings.body.autoLockMinutes, 5);

  const audit = await cliJson<{ entries: { action: string; outcome: string }[]; verification: { ok: boolean; entries: number } }>([...h, 'vault', 'audit', '--verify', '--passphrase-file', pp]);
  assert.equal(audit.code, 0);
  assert.equal(audit.body.verification.ok, true);
  const actions = audit.body.entries.map((e) => `${e.action}:${e.outcome}`);
  for (const a of ['vault.init:ok', 'record.create:ok', 'record.read:ok', 'vault.unlock:refused', 'record.read:failed', 'record.delete:ok', 'vault.settings:ok']) {
    assert.ok(actions.includes(a), `${a} not in audit`);
  }
});

test('SHIELDLAB_HOME and the per-user default folder are honoured', async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const viaEnv = await cliJson<{ home: string }>(['vault', 'status'], { env: { SHIELDLAB_HOME: join(dir, 'env-home') } });
  assert.equal(viaEnv.body.home, join(dir, 'env-home'));
  const viaXdg = await cliJson<{ home: string }>(['vault', 'status'], { env: { SHIELDLAB_HOME: '', XDG_DATA_HOME: join(dir, 'xdg') } });
  assert.equal(viaXdg.body.home, join(dir, 'xdg', 'shieldlab'));
});
