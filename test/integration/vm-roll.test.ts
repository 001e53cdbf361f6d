// The KP rolls on every start: after each `vm start` the disk holds a new key protector (same
// authorization, a fresh transport key, version + 1, `kp.roll` audited); an older copy of the KP
// opens neither the disk (shield_key_mismatch) nor the vTPM state (vtpm_state_invalid); the new one
// opens both; the guest's vTPM keeps its identity (the same EK) and the disk its data. A start
// killed mid-roll (SHIELDLAB_TEST_CRASH_AT: before the commit, right after it, between the two
// renames) leaves the VM startable, and the next start finishes or drops the roll.
// The VM is a shielded one without a kernel (the firmware waits in its boot manager): cheap to run.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createPrivateKey, randomBytes } from 'node:crypto';
import { existsSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { CLI, cliOk, secretFile, tempDir } from '../helpers/home.ts';
import { ovmfMissing } from '../helpers/guest.ts';
import { swtpmMissing } from '../helpers/swtpm.ts';
import { importGuardianPfx } from '../../core/guardian/pfx.ts';
import { parseKeyProtector, unwrapTransportKey } from '../../core/guardian/key-protector.ts';
import { ShieldedDisk, readShieldItem } from '../../core/shield/mod.ts';
import { deriveVtpmKey, startVtpm, EK_PERSISTENT_HANDLE } from '../../core/vtpm/mod.ts';
import { publicKeyPem } from '../../core/tpm/mod.ts';
import { ReadPublic } from '../../core/tpm/commands.ts';

type Json = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any
const skip = swtpmMissing() ?? ovmfMissing() ?? false;
const MiB = 1024 * 1024;

function run(home: string[], args: string[], env: NodeJS.ProcessEnv = {}): Promise<{ code: number | null; out: string; err: string; child: ReturnType<typeof spawn> }> & { child: ReturnType<typeof spawn> } {
  const child = spawn(process.execPath, [CLI, ...home, ...args, '--json'], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  let out = '';
  let err = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const timer = setTimeout(() => child.kill('SIGKILL'), 120_000);
  const p = new Promise<{ code: number | null; out: string; err: string; child: ReturnType<typeof spawn> }>((resolve) =>
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, out, err, child });
    }),
  ) as Promise<{ code: number | null; out: string; err: string; child: ReturnType<typeof spawn> }> & { child: ReturnType<typeof spawn> };
  p.child = child;
  return p;
}

test('the KP rolls on every vm start; old KPs open nothing; the vTPM keeps its EK; a crash mid-roll leaves the VM startable', { skip, timeout: 400_000 }, async (t) => {
  const t0 = Date.now();
  const { dir, cleanup } = tempDir('shieldlab-roll-');
  t.after(cleanup);
  const pp = secretFile(dir, 'pp', 'host passphrase');
  const A = ['--home', join(dir, 'a'), '--passphrase-file', pp];
  await cliOk([...A, 'vault', 'init', '--no-keychain', '--kdf-memory-mib', '16']);
  await cliOk([...A, 'guardian', 'create', 'Owner']);
  const backup = join(dir, 'backup');
  await cliOk([...A, 'guardian', 'export', 'Owner', '--pfx', '--out-dir', backup, '--password-file', secretFile(dir, 'pfx', 'pfx password')]);
  await cliOk([...A, 'host', 'register-key']);
  const pfx = readdirSync(backup).filter((f) => f.endsWith('.pfx'));
  const owner = importGuardianPfx(
    { signing: readFileSync(join(backup, pfx.find((f) => /sign/i.test(f))!)), encryption: readFileSync(join(backup, pfx.find((f) => /encr/i.test(f))!)) },
    'pfx password',
  );
  const encryptionKey = createPrivateKey(owner.keys.encryptionKeyPem);
  const tkOf = (kpBytes: Buffer) => {
    const kp = parseKeyProtector(kpBytes);
    return unwrapTransportKey(kp, { encryptionThumbprint: kp.keyBlock.keys[0]!.encryptionThumbprint, encryptionKey });
  };

  const marker = `SHIELDLAB-ROLL-${randomBytes(12).toString('hex')}`;
  const raw = Buffer.alloc(4 * MiB);
  raw.write(marker, 0, 'ascii');
  writeFileSync(join(dir, 'in.raw'), raw);
  const disk = join(dir, 'r.vhdx');
  await cliOk([...A, 'disk', 'shield', join(dir, 'in.raw'), '--out', disk, '--owner', 'Owner', '--allow-mode', 'host-key']);
  await cliOk([...A, 'vm', 'create', 'r', '--disk', disk, '--memory', '128', '--cpus', '1', '--level', 'shielded']);
  const tpmDir = join(dir, 'a', 'vms', 'r', 'tpm');
  const kpNow = async () => (await readShieldItem(disk)).item.kp;

  /** One full start (until QEMU runs), then a forced stop. */
  const startStop = async () => {
    const r = run(A, ['vm', 'start', 'r']);
    for (let i = 0; i < 600; i++) {
      const s = await cliOk<Json>([...A, 'vm', 'status', 'r']);
      if (s.vms[0].status === 'running') break;
      if (r.child.exitCode !== null) break;
      await new Promise((res) => setTimeout(res, 200));
    }
    await cliOk([...A, 'vm', 'stop', 'r', '--force']);
    const e = await r;
    assert.equal(e.code, 0, `vm start: ${e.out} ${e.err}`);
  };
  const ekOf = async (tk: Buffer) => {
    const v = await startVtpm({ stateDir: tpmDir, key: deriveVtpmKey(tk), dataSocket: true, runDir: join(dir, 'probe-run') });
    const c = v.client();
    try {
      await c.startup();
      const { outPublic } = await c.execute(ReadPublic, { objectHandle: EK_PERSISTENT_HANDLE });
      return publicKeyPem(outPublic.publicArea);
    } finally {
      await c.close();
      await v.stop();
    }
  };
  const opens = async (kpBytes: Buffer) => {
    const tk = tkOf(kpBytes);
    const res = { disk: 'ok', vtpm: 'ok' };
    try {
      const d = await ShieldedDisk.open(disk, tk, { readOnly: true });
      assert.equal((await d.read(0, 512)).subarray(0, marker.length).toString('ascii'), marker, 'the disk data is unchanged');
      await d.close();
    } catch (err) {
      res.disk = (err as { code?: string }).code ?? String(err);
    }
    try {
      await (await startVtpm({ stateDir: tpmDir, key: deriveVtpmKey(tk), runDir: join(dir, 'probe-run') })).stop();
    } catch (err) {
      res.vtpm = (err as { code?: string }).code ?? String(err);
    }
    return res;
  };

  const kp0 = await kpNow();
  await startStop(); // first start: provisions the vTPM under the rolled KP
  const kp1 = await kpNow();
  t.diagnostic(`first start + stop after ${Date.now() - t0} ms`);
  assert.ok(!kp1.equals(kp0), 'the first start rolled the KP');
  assert.equal(parseKeyProtector(kp1).keyBlock.version, parseKeyProtector(kp0).keyBlock.version + 1);
  assert.equal(parseKeyProtector(kp1).authorization.kpId, parseKeyProtector(kp0).authorization.kpId, 'same authorization');
  assert.deepEqual(await opens(kp0), { disk: 'shield_key_mismatch', vtpm: 'vtpm_state_invalid' });
  const ek1 = await ekOf(tkOf(kp1));

  const t1 = Date.now();
  await startStop();
  const kp2 = await kpNow();
  t.diagnostic(`second start + stop (a roll of provisioned state) in ${Date.now() - t1} ms`);
  assert.ok(!kp2.equals(kp1));
  assert.ok(!tkOf(kp2).equals(tkOf(kp1)), 'a new transport key');
  assert.deepEqual(await opens(kp1), { disk: 'shield_key_mismatch', vtpm: 'vtpm_state_invalid' }, 'the KP of the last start opens nothing now');
  assert.deepEqual(await opens(kp2), { disk: 'ok', vtpm: 'ok' });
  assert.equal(await ekOf(tkOf(kp2)), ek1, 'the vTPM kept its EK');

  // Killed mid-roll, at each step; every time the VM is left startable by the KP the disk holds.
  const crash = async (point: string) => {
    const before = await kpNow();
    const e = await run(A, ['vm', 'start', 'r'], { SHIELDLAB_TEST_CRASH_AT: point });
    assert.equal(e.code, 137, `${point}: ${e.out} ${e.err}`);
    const after = await kpNow();
    assert.equal(after.equals(before), point === 'after-vtpm-rekey', `${point}: the disk's KP ${point === 'after-vtpm-rekey' ? 'is still the old one' : 'is the new one'}`);
    return after;
  };
  await crash('after-vtpm-rekey');
  assert.ok(existsSync(`${tpmDir}.next`), 'the unfinished roll left tpm.next');
  await crash('after-reseal'); // settles the first (drops tpm.next), dies after its own commit
  await crash('mid-switch'); // finishes the second, dies between its renames
  assert.ok(!existsSync(tpmDir) && existsSync(`${tpmDir}.next`) && existsSync(`${tpmDir}.old`));
  await startStop(); // settles (finishes the switch), rolls again, runs
  const kpLast = await kpNow();
  assert.equal(parseKeyProtector(kpLast).keyBlock.version, parseKeyProtector(kp2).keyBlock.version + 3);
  assert.ok(!existsSync(`${tpmDir}.next`) && !existsSync(`${tpmDir}.old`));
  assert.deepEqual(await opens(kpLast), { disk: 'ok', vtpm: 'ok' });
  assert.deepEqual(await opens(kp2), { disk: 'shield_key_mismatch', vtpm: 'vtpm_state_invalid' });
  assert.equal(await ekOf(tkOf(kpLast)), ek1, 'the vTPM kept its EK through the crashes');

  const audit = await cliOk<Json>([...A, 'vault', 'audit', '--limit', '200']);
  const rolls = (audit.entries as Json[]).filter((e) => e.action === 'kp.roll');
  t.diagnostic(`kp.roll entries: ${rolls.map((e) => `${e.outcome} ${e.reason}`).join(' | ')}`);
  assert.equal(rolls.filter((e) => e.outcome === 'ok' && /→/.test(e.reason ?? '')).length, 5, 'every committed roll audited (the killed ones too)');
  assert.ok(rolls.some((e) => /finished an interrupted roll/.test(e.reason ?? '')));
  assert.ok(rolls.some((e) => /dropped an unfinished roll/.test(e.reason ?? '')));
  t.diagnostic(`total ${Date.now() - t0} ms`);
});
