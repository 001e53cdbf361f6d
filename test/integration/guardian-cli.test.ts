// Two hosts on one machine (two homes), driven through the real CLI: guardians, key protectors,
// host-key attestation and the release check, with openssl reading the exported PFX files.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { cliFails, cliJson, cliOk, secretFile, tempDir } from '../helpers/home.ts';

type Json = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

test('guardians, key protectors and release across two hosts', async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const pp = secretFile(dir, 'pp', 'host passphrase');
  const pfxPassword = secretFile(dir, 'pfx-pw', 'pfx password');
  const A = ['--home', join(dir, 'a'), '--passphrase-file', pp];
  const B = ['--home', join(dir, 'b'), '--passphrase-file', pp];
  const kp = join(dir, 'lab-vm.slkp');
  const ok = (args: string[]) => cliOk<Json>(args);
  const fails = cliFails;

  for (const h of [A, B]) await ok([...h, 'vault', 'init', '--no-keychain', '--kdf-memory-mib', '16']);
  const owner = await ok([...A, 'guardian', 'create', 'Owner', '--host', 'host-a']);
  assert.equal(owner.signing.subject, 'CN=Shielded VM Signing Certificate (Owner) (host-a)');
  assert.equal(owner.backedUpAt, null);

  // A lost owner strands every VM: no key protector before the owner is backed up.
  await fails([...A, 'kp', 'create', '--owner', 'Owner', '--out', kp], 'guardian_not_backed_up');
  // An export that could not be written is no backup.
  const failed = await cliJson<Json>([...A, 'guardian', 'export', 'Owner', '--pfx', '--out-dir', join(pp, 'not-a-folder'), '--password-file', pfxPassword]);
  assert.equal(failed.code, 1, JSON.stringify(failed.body));
  assert.equal((await ok([...A, 'guardian', 'show', 'Owner'])).backedUpAt, null);
  const exported = await ok([...A, 'guardian', 'export', 'Owner', '--pfx', '--out-dir', join(dir, 'backup'), '--password-file', pfxPassword]);
  assert.equal(exported.backedUp, true);
  const keyText = execFileSync('openssl', ['pkcs12', '-in', exported.files[0], '-passin', `file:${pfxPassword}`, '-nocerts', '-nodes'], { encoding: 'utf8' });
  assert.match(keyText, /BEGIN PRIVATE KEY/);

  const created = await ok([...A, 'kp', 'create', '--owner', 'Owner', '--allow-mode', 'host-key,tpm', '--out', kp]);
  assert.deepEqual(created.policy.modes, ['host-key', 'tpm']);
  assert.deepEqual(created.guardians.map((g: Json) => [g.name, g.owner, g.heldHere]), [['Owner', true, true]]);

  // Host B: its own guardian and host key, attested.
  await ok([...B, 'guardian', 'create', 'HostB', '--host', 'host-b']);
  await ok([...B, 'host', 'register-key']);
  const status = await ok([...B, 'host', 'attest']);
  assert.equal(status.certificate.valid, true);
  assert.equal(status.certificate.mode, 'host-key');

  const check = async (expect: boolean, reason?: string) => {
    const r = await cliJson<Json>([...B, 'kp', 'release', kp, '--check']);
    assert.equal(r.code, expect ? 0 : 1, JSON.stringify(r.body));
    assert.equal(r.body.allowed, expect);
    if (reason) assert.equal(r.body.reasons[0].code, reason, JSON.stringify(r.body));
    return r.body;
  };
  await check(false, 'kp_untrusted_owner');
  await ok([...A, 'guardian', 'export', 'Owner', '--public', '--out', join(dir, 'owner.guardian')]);
  await ok([...B, 'guardian', 'import', join(dir, 'owner.guardian')]);
  await check(false, 'kp_unwrap_denied');

  await ok([...B, 'guardian', 'export', 'HostB', '--public', '--out', join(dir, 'hostb.guardian')]);
  const imported = await ok([...A, 'guardian', 'import', join(dir, 'hostb.guardian')]);
  assert.equal(imported.hasPrivateKeys, false);
  await fails([...B, 'kp', 'grant', kp, '--guardian', 'HostB'], 'kp_not_owner');
  const granted = await ok([...A, 'kp', 'grant', kp, '--guardian', 'HostB']);
  assert.deepEqual(granted.guardians.map((g: Json) => g.name), ['Owner', 'HostB']);
  const allowed = await check(true);
  assert.equal(allowed.guardian, 'HostB');
  const inspected = await ok([...B, 'kp', 'inspect', kp]);
  assert.match(inspected.summary, /This host holds HostB/);

  // Revoked, then rolled: B is out; the roll keeps a last-known-good copy until committed.
  await ok([...A, 'kp', 'revoke', kp, '--guardian', 'HostB']);
  const rolled = await ok([...A, 'kp', 'roll', kp]);
  assert.equal(rolled.lastKnownGood, `${kp}.lkg`);
  await check(false, 'kp_unwrap_denied');
  const committed = await ok([...A, 'kp', 'roll', kp, '--commit']);
  assert.equal(committed.lastKnownGood, null);
  assert.equal(existsSync(`${kp}.lkg`), false);

  // A policy that does not allow host-key attestation.
  const tpmOnly = join(dir, 'tpm-only.slkp');
  await ok([...A, 'kp', 'create', '--owner', 'Owner', '--guardian', 'HostB', '--allow-mode', 'tpm', '--out', tpmOnly]);
  const modeRefused = await cliJson<Json>([...B, 'kp', 'release', tpmOnly, '--check']);
  assert.equal(modeRefused.body.reasons[0].code, 'ModeNotAllowed');

  // Revoked health certificates.
  await ok([...A, 'kp', 'grant', kp, '--guardian', 'HostB']);
  await check(true);
  await ok([...B, 'host', 'revoke-certificates']);
  await check(false, 'Revoked');
  await ok([...B, 'host', 'attest']);
  await check(true);

  await fails([...A, 'guardian', 'delete', 'Owner'], 'guardian_in_use');

  // A vault backup holds every guardian's private keys, so it counts as their backup.
  await ok([...A, 'guardian', 'create', 'Second']);
  await ok([...A, 'vault', 'recovery', 'split', '--shares', '2', '--threshold', '2']);
  await ok([...A, 'vault', 'backup', '--out', join(dir, 'a.backup')]);
  const listed = await ok([...A, 'guardian', 'list']);
  const second = listed.guardians.find((g: Json) => g.name === 'Second');
  assert.notEqual(second.backedUpAt, null);
  assert.equal(listed.guardians.find((g: Json) => g.name === 'HostB').backedUpAt, null, 'a public-only guardian has nothing to back up');
  await ok([...A, 'guardian', 'delete', 'Second']);
  await fails([...B, 'host', 'attest', '--mode', 'tpm'], 'attestation_failed');
  const noKeys = await cliJson<Json>([...B, 'kp', 'release', kp]);
  assert.equal(noKeys.code, 2);

  const audit = await ok([...B, 'vault', 'audit', '--limit', '500']);
  const releases = audit.entries.filter((e: Json) => e.action === 'kp.release').map((e: Json) => `${e.outcome}:${e.reason}`);
  assert.ok(releases.includes('refused:kp_untrusted_owner') && releases.includes('ok:guardian HostB, host-key') && releases.includes('refused:Revoked'), releases.join(' '));
  assert.ok(!JSON.stringify(audit).includes('BEGIN PRIVATE KEY'));
});
