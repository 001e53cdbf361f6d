// Shielded disks through the real CLI, two hosts (two homes): the owner shields a qemu-made disk,
// `disk info` explains it, the owner unshields it byte for byte (qemu-img compare), host B may not
// unshield, grant/revoke rewrite only the shield item (payload hash unchanged) and are audited,
// and the KP inside the disk names B only after the grant.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { cliFails, cliJson, cliOk, secretFile, tempDir } from '../helpers/home.ts';
import { MiB, makeImage, qemuImg, qemuMissing } from '../helpers/qemu.ts';
import { rawLayout } from '../helpers/vhdx-raw.ts';

type Json = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any
const skip = qemuMissing() ?? false;

const payloadHash = (path: string) => {
  const b = readFileSync(path);
  return createHash('sha256').update(b.subarray(rawLayout(b).regions.reduce((m, r) => Math.max(m, r.fileOffset + r.length), 0))).digest('hex');
};

test('disk shield / info / unshield / grant / revoke across two hosts', { skip }, async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const pp = secretFile(dir, 'pp', 'host passphrase');
  const pfxPassword = secretFile(dir, 'pfx-pw', 'pfx password');
  const A = ['--home', join(dir, 'a'), '--passphrase-file', pp];
  const B = ['--home', join(dir, 'b'), '--passphrase-file', pp];
  const ok = (args: string[]) => cliOk<Json>(args);
  const fails = cliFails;
  for (const h of [A, B]) await ok([...h, 'vault', 'init', '--no-keychain', '--kdf-memory-mib', '16']);
  await ok([...A, 'guardian', 'create', 'Owner']);
  await ok([...B, 'guardian', 'create', 'HostB']);
  await ok([...B, 'guardian', 'export', 'HostB', '--public', '--out', join(dir, 'hostb.guardian')]);
  await ok([...A, 'guardian', 'import', join(dir, 'hostb.guardian')]);

  const img = makeImage(dir, { type: 'dynamic', size: 24 * MiB, blockSize: MiB, writes: [{ offset: MiB, length: 3 * MiB, byte: 0x6b }] });
  const shielded = join(dir, 'lab.vhdx');
  await fails([...A, 'disk', 'shield', img.path, '--out', shielded, '--owner', 'Owner'], 'guardian_not_backed_up');
  await ok([...A, 'guardian', 'export', 'Owner', '--pfx', '--out-dir', join(dir, 'backup'), '--password-file', pfxPassword]);
  const made = await ok([...A, 'disk', 'shield', img.path, '--out', shielded, '--owner', 'Owner', '--allow-mode', 'host-key']);
  assert.equal(made.from, 'vhdx');
  assert.equal(made.dataBlocks, 2);
  assert.deepEqual(made.kp.guardians.map((g: Json) => g.name), ['Owner']);
  assert.equal(readFileSync(shielded).indexOf(Buffer.alloc(512, 0x6b)), -1, 'no plaintext sector');

  const info = await ok([...A, 'disk', 'info', shielded]);
  assert.equal(info.cipher, 'aes-256-xts');
  assert.equal(info.unitSize, 4096);
  assert.equal(info.virtualSize, 24 * MiB);
  assert.match(info.kp.summary, /Only the owner may run this VM, after host-key attestation/);

  const back = join(dir, 'back.raw');
  await ok([...A, 'disk', 'unshield', shielded, '--out', back]);
  qemuImg(['compare', '-f', 'raw', '-F', 'raw', back, img.raw]);
  await fails([...B, 'disk', 'unshield', shielded, '--out', join(dir, 'b.raw')], 'kp_not_owner');

  const before = payloadHash(shielded);
  const granted = await ok([...A, 'disk', 'grant', shielded, '--guardian', 'HostB']);
  assert.deepEqual(granted.kp.guardians.map((g: Json) => g.name), ['Owner', 'HostB']);
  assert.equal(payloadHash(shielded), before, 'grant rewrites the item only');
  const seenByB = await ok([...B, 'disk', 'info', shielded]);
  assert.match(seenByB.kp.summary, /This host holds HostB/);
  const revoked = await ok([...A, 'disk', 'revoke', shielded, '--guardian', 'HostB']);
  assert.deepEqual(revoked.kp.guardians.map((g: Json) => g.name), ['Owner']);
  assert.equal(payloadHash(shielded), before, 'revoke rewrites the item only');
  // Still the same data after both reseals.
  const again = join(dir, 'again.vhdx');
  await ok([...A, 'disk', 'unshield', shielded, '--out', again]);
  qemuImg(['compare', '-f', 'vhdx', '-F', 'raw', again, img.raw]);

  const audit = await ok([...A, 'vault', 'audit']);
  const actions = audit.entries.map((e: Json) => e.action);
  for (const a of ['disk.shield', 'disk.unshield', 'disk.grant', 'disk.revoke']) assert.ok(actions.includes(a), `${a} audited (${actions.join(', ')})`);
  const refused = await ok([...B, 'vault', 'audit']);
  assert.ok(refused.entries.some((e: Json) => e.action === 'disk.unshield' && e.outcome === 'refused'), 'the refusal is audited on B');
});
