// The vault key protected by a real Secret Service (gnome-keyring on a private D-Bus), checked
// from the outside with secret-tool.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { cliJson, runCli, secretFile, tempDir } from '../helpers/home.ts';
import { secretServiceMissing, startSecretService, type SecretService } from '../helpers/secret-service.ts';

const skip = secretServiceMissing();

describe('OS keychain (Secret Service)', { skip: skip ?? false }, () => {
  let ss: SecretService;
  const t = tempDir();
  before(async () => {
    ss = await startSecretService();
  });
  after(() => {
    ss?.stop();
    t.cleanup();
  });

  const accountsOf = (vaultId: string) =>
    [...ss.secretTool(['search', '--all', 'service', 'ShieldLab']).stdout.matchAll(/attribute\.username = (\S+)/g)].map((m) => m[1]!).filter((a) => a.includes(vaultId));

  test('init stores a key-encryption key under service "ShieldLab"; later commands unlock without a passphrase', async () => {
    const home = join(t.dir, 'kc');
    const init = await cliJson<{ vaultId: string; slots: string[]; keychainStore: string }>(['--home', home, 'vault', 'init'], { env: ss.env });
    assert.equal(init.code, 0, init.stderr);
    assert.deepEqual(init.body.slots, ['keychain']);
    assert.equal(init.body.keychainStore, 'Secret Service');
    const accounts = accountsOf(init.body.vaultId);
    assert.equal(accounts.length, 1);
    // The keychain holds a random KEK, not the vault key, and it opens nothing by itself.
    const stored = ss.secretTool(['lookup', 'service', 'ShieldLab', 'username', accounts[0]!]);
    assert.equal(stored.code, 0);
    assert.equal((await runCli(['--home', home, 'vault', 'put', 'api-token', '--value-stdin'], { env: ss.env, stdin: 'tok-123' })).code, 0);
    const got = await cliJson<{ value: string }>(['--home', home, 'vault', 'get', 'api-token'], { env: ss.env });
    assert.equal(got.body.value, 'tok-123');

    // Rotation re-wraps the keychain slot; the same entry still opens the vault.
    const rot = await runCli(['--home', home, 'vault', 'rotate-key'], { env: ss.env });
    assert.equal(rot.code, 0, rot.stderr);
    assert.equal((await cliJson<{ value: string }>(['--home', home, 'vault', 'get', 'api-token'], { env: ss.env })).body.value, 'tok-123');
  });

  test('without a Secret Service: keychain_unavailable, and nothing is created', async () => {
    const home = join(t.dir, 'nobus');
    const env = { DBUS_SESSION_BUS_ADDRESS: `unix:path=${join(t.dir, 'no-such-bus')}` };
    const r = await cliJson<{ error: { code: string; message: string } }>(['--home', home, 'vault', 'init'], { env });
    assert.equal(r.code, 1);
    assert.equal(r.body.error.code, 'keychain_unavailable');
    assert.match(r.body.error.message, /passphrase/);
    const status = await cliJson<{ initialised: boolean }>(['--home', home, 'vault', 'status'], { env });
    assert.equal(status.body.initialised, false);
    // Passphrase mode works with no keychain at all.
    const pp = secretFile(t.dir, 'pp-nobus', 'passphrase without keychain');
    const ok = await cliJson<{ slots: string[] }>(['--home', home, 'vault', 'init', '--no-keychain', '--passphrase-file', pp, '--kdf-memory-mib', '16'], { env });
    assert.deepEqual(ok.body.slots, ['passphrase']);
  });

  test('a lost keychain entry: the passphrase still opens; shares re-enrol a fresh entry', async () => {
    const home = join(t.dir, 'lost');
    const pp = secretFile(t.dir, 'pp-lost', 'second factor passphrase');
    const init = await cliJson<{ vaultId: string; slots: string[] }>(['--home', home, 'vault', 'init', '--passphrase-file', pp, '--kdf-memory-mib', '16'], { env: ss.env });
    assert.deepEqual(init.body.slots, ['keychain', 'passphrase']);
    assert.equal((await runCli(['--home', home, 'vault', 'put', 'k', '--value-stdin'], { env: ss.env, stdin: 'v' })).code, 0);
    const split = await cliJson<{ shares: string[] }>(['--home', home, 'vault', 'recovery', 'split', '--shares', '3', '--threshold', '2'], { env: ss.env });
    const [account] = accountsOf(init.body.vaultId);
    assert.equal(ss.secretTool(['clear', 'service', 'ShieldLab', 'username', account!]).code, 0);

    const gone = await cliJson<{ error: { code: string } }>(['--home', home, 'vault', 'get', 'k'], { env: ss.env });
    assert.equal(gone.body.error.code, 'keychain_entry_missing');
    assert.equal((await cliJson<{ value: string }>(['--home', home, 'vault', 'get', 'k', '--passphrase-file', pp], { env: ss.env })).body.value, 'v');

    const rec = await cliJson<{ slots: string[] }>(['--home', home, 'vault', 'recover', '--share', split.body.shares[0]!, '--share', split.body.shares[2]!], { env: ss.env });
    assert.equal(rec.code, 0, rec.stderr);
    assert.deepEqual(rec.body.slots, ['keychain', 'recovery']);
    const fresh = accountsOf(init.body.vaultId);
    assert.equal(fresh.length, 1);
    assert.notEqual(fresh[0], account);
    assert.equal((await cliJson<{ value: string }>(['--home', home, 'vault', 'get', 'k'], { env: ss.env })).body.value, 'v');
    // The old passphrase slot was replaced by the recovery's chosen protection.
    const old = await cliJson<{ error: { code: string } }>(['--home', home, 'vault', 'get', 'k', '--passphrase-file', pp], { env: ss.env });
    assert.equal(old.body.error.code, 'invalid_argument');
  });
});
