// The promise end to end, through the real CLI: a raw disk whose first sector holds a random marker
// is shielded; `vm create` + `vm start` (encryption-supported level, the test guest booted with
// --kernel/--initrd through OVMF under TCG) attests the host by itself, releases the key, serves the
// disk over our NBD server, provisions and starts the encrypted vTPM and launches QEMU. The guest
// reports, on the test channel this test owns, the marker it read from its virtio disk and its
// TPM 2.0's SHA-256 PCRs, then powers off; `vm start` exits 0 and `vm status` says stopped, TCG.
// Exfiltration: the shielded disk and the vTPM state copied into a second home (another host with
// its own vault and host key, which knows the owner's public guardian but holds no authorised one)
// — `vm start` is refused naming the guardian it lacks; qemu-img refuses the copied file; its bytes
// hold no marker; swtpm refuses the copied vTPM state without its key.
// Teardown: a shielded VM (Secure Boot OVMF, SMM, no console; no kernel, so the firmware waits
// in its boot manager) whose swtpm is killed with SIGKILL: QEMU is torn down, `vm start` exits 1
// reporting the crash, and `vm.crash` is audited; then `vm stop --force` from another process.
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { cpSync, existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { CLI, cliJson, cliOk, secretFile, tempDir } from '../helpers/home.ts';
import { buildGuest, CONSOLE_PREFIX, guestMissing, listenForReport, ovmfMissing, type Guest } from '../helpers/guest.ts';
import { swtpmMissing } from '../helpers/swtpm.ts';
import { launchSwtpm } from '../../core/vtpm/process.ts';

type Json = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any
const skip = guestMissing() ?? swtpmMissing() ?? ovmfMissing() ?? false;
const MiB = 1024 * 1024;
const RUN_TIMEOUT_MS = 150_000;

let guest: Guest;
before(() => {
  if (skip) return;
  guest = buildGuest();
});

interface Started {
  child: ChildProcess;
  notice: Promise<string>;
  ended: Promise<{ code: number | null; signal: NodeJS.Signals | null; body: Json | null; stderr: string }>;
}

/** `vm start` in the background (it runs until the VM stops). */
function startVm(home: string[], name: string, extra: string[] = []): Started {
  const child = spawn(process.execPath, [CLI, ...home, 'vm', 'start', name, ...extra, '--json'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  let gotNotice: (s: string) => void = () => undefined;
  const notice = new Promise<string>((r) => (gotNotice = r));
  child.stderr!.on('data', (d: Buffer) => {
    err += d.toString();
    const m = /\{"notice":.*\}/.exec(err);
    if (m) gotNotice((JSON.parse(m[0]) as { notice: string }).notice);
  });
  const timer = setTimeout(() => child.kill('SIGKILL'), RUN_TIMEOUT_MS);
  const ended = new Promise<{ code: number | null; signal: NodeJS.Signals | null; body: Json | null; stderr: string }>((resolve) =>
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      let body: Json | null = null;
      try {
        body = JSON.parse(out) as Json;
      } catch {
        body = null;
      }
      resolve({ code, signal, body, stderr: err });
    }),
  );
  return { child, notice, ended };
}

async function setupOwnerHome(dir: string, name: string): Promise<string[]> {
  const pp = secretFile(dir, `${name}-pp`, 'host passphrase');
  const H = ['--home', join(dir, name), '--passphrase-file', pp];
  await cliOk([...H, 'vault', 'init', '--no-keychain', '--kdf-memory-mib', '16']);
  await cliOk([...H, 'guardian', 'create', 'Owner']);
  await cliOk([...H, 'guardian', 'export', 'Owner', '--pfx', '--out-dir', join(dir, `${name}-backup`), '--password-file', secretFile(dir, `${name}-pfx`, 'pfx password')]);
  await cliOk([...H, 'host', 'register-key']);
  return H;
}

test('vm start boots a real guest from a shielded disk with an encrypted vTPM; a copy on another host does not start', { skip, timeout: 400_000 }, async (t) => {
  const t0 = Date.now();
  const { dir, cleanup } = tempDir('shieldlab-vm-');
  t.after(cleanup);
  const A = await setupOwnerHome(dir, 'a');

  // A raw disk: the marker in sector 0, random bytes after; shielded for host-key attestation.
  const marker = `SHIELDLAB-MARKER-${randomBytes(12).toString('hex')}`;
  const raw = Buffer.alloc(4 * MiB);
  raw.write(marker, 0, 'ascii');
  randomBytes(raw.length - 512).copy(raw, 512);
  writeFileSync(join(dir, 'in.raw'), raw);
  const disk = join(dir, 'lab.vhdx');
  await cliOk([...A, 'disk', 'shield', join(dir, 'in.raw'), '--out', disk, '--owner', 'Owner', '--allow-mode', 'host-key']);

  const created = await cliOk<Json>([...A, 'vm', 'create', 'lab', '--disk', disk, '--memory', '256', '--cpus', '1', '--level', 'encryption-supported', '--kernel', guest.kernel, '--initrd', guest.initrd, '--append', 'console=ttyS0 quiet panic=-1']);
  assert.equal(created.status, 'stopped');
  assert.equal(created.level, 'encryption-supported');
  assert.equal(created.vtpmProvisioned, false);
  assert.equal(created.accel, existsSync('/dev/kvm') ? created.accel : 'tcg');

  // The report channel this test owns; `vm start` attests by itself (no `host attest` before).
  const report = await listenForReport(join(dir, 'report.sock'));
  t.after(() => report.close());
  const run = startVm(A, 'lab', ['--test-channel', report.socketPath]);
  t.after(() => run.child.kill('SIGKILL'));
  const notice = await Promise.race([run.notice, run.ended.then((e) => Promise.reject(new Error(`vm start ended: ${JSON.stringify(e)}`)))]);
  t.diagnostic(`notice after ${Date.now() - t0} ms: ${notice}`);
  assert.match(notice, /VM lab runs \(encryption-supported, (TCG emulation|KVM)/);
  const running = await cliOk<Json>([...A, 'vm', 'status', 'lab']);
  assert.equal(running.vms[0].status, 'running');

  const got = await report.report;
  t.diagnostic(`guest report after ${Date.now() - t0} ms: ${got.line}`);
  const r = got.report;
  assert.ok(r, got.line);
  assert.equal(r.marker, marker, 'the guest read our marker through the shielded disk');
  assert.equal(r.errors, '');
  assert.equal(r.disk.sectors, raw.length / 512);
  assert.equal(r.tpm.present, true);
  assert.equal(r.tpm.versionMajor, 2);
  const pcrs = r.tpm.pcrs.sha256;
  for (let i = 0; i < 24; i++) assert.match(pcrs[String(i)] ?? '', /^[0-9A-F]{64}$/i, `sha256 PCR ${i}`);
  assert.doesNotMatch(pcrs['0']!, /^0+$/, 'the firmware measured itself into PCR 0');
  assert.deepEqual(r.tpm.pcrs.sha1, {}, 'provisioning left the SHA-256 bank alone');

  const ended = await run.ended;
  t.diagnostic(`vm start exited after ${Date.now() - t0} ms`);
  assert.equal(ended.code, 0, `${ended.stderr} ${JSON.stringify(ended.body)}`);
  assert.equal(ended.body?.status, 'stopped', JSON.stringify(ended.body));
  assert.equal(ended.body?.cause, 'guest');
  assert.equal(ended.body?.vtpmProvisioned, true);
  const status = await cliOk<Json>([...A, 'vm', 'status', 'lab']);
  const vm = status.vms[0];
  assert.equal(vm.status, 'stopped');
  assert.equal(vm.accel, existsSync('/dev/kvm') ? vm.accel : 'tcg');
  assert.equal(status.host.accel, vm.accel);
  assert.equal(vm.vtpmProvisioned, true);
  // The serial console of the run, kept after it stopped (0600), read through the API.
  const cons = await cliOk<Json>([...A, 'vm', 'console', 'lab']);
  assert.equal(cons.status, 'stopped');
  assert.equal(cons.file, join(dir, 'a', 'vms', 'lab', 'console.log'));
  assert.equal(statSync(cons.file).mode & 0o777, 0o600);
  assert.ok(cons.text.includes(`${CONSOLE_PREFIX}{"marker":"${marker}"`), cons.text.slice(-2000));
  assert.doesNotMatch(cons.text, /[\u0000-\u0008\u001b]/, 'no control characters or escape sequences');
  const tail = await cliOk<Json>([...A, 'vm', 'console', 'lab', '--bytes', '100']);
  assert.equal(tail.truncated, true);
  assert.ok(tail.text.length <= 100 && cons.text.endsWith(tail.text), 'the end of the same log, from a line start');
  const audit = await cliOk<Json>([...A, 'vault', 'audit', '--limit', '200']);
  const actions = audit.entries.map((e: Json) => `${e.action}:${e.outcome}`);
  for (const a of ['vm.create:ok', 'kp.release:ok', 'kp.roll:ok', 'vm.vtpm-provision:ok', 'vm.start:ok', 'vm.stop:ok']) assert.ok(actions.includes(a), `${a} in ${actions.join(' ')}`);

  // ---- exfiltration: the disk and the vTPM state on another host --------------------------------
  const pp = secretFile(dir, 'b-pp', 'other host passphrase');
  const B = ['--home', join(dir, 'b'), '--passphrase-file', pp];
  await cliOk([...B, 'vault', 'init', '--no-keychain', '--kdf-memory-mib', '16']);
  await cliOk([...B, 'guardian', 'create', 'Thief']);
  await cliOk([...A, 'guardian', 'export', 'Owner', '--public', '--out', join(dir, 'owner.guardian')]);
  await cliOk([...B, 'guardian', 'import', join(dir, 'owner.guardian')]);
  await cliOk([...B, 'host', 'register-key']);
  const copy = join(dir, 'stolen.vhdx');
  cpSync(disk, copy);
  await cliOk([...B, 'vm', 'create', 'lab', '--disk', copy, '--memory', '256', '--cpus', '1', '--level', 'encryption-supported', '--kernel', guest.kernel, '--initrd', guest.initrd]);
  mkdirSync(join(dir, 'b', 'vms', 'lab'), { recursive: true });
  cpSync(join(dir, 'a', 'vms', 'lab', 'tpm'), join(dir, 'b', 'vms', 'lab', 'tpm'), { recursive: true });
  const refused = await cliJson<Json>([...B, 'vm', 'start', 'lab']);
  assert.equal(refused.code, 1, JSON.stringify(refused.body));
  assert.equal(refused.body.error.code, 'kp_unwrap_denied', JSON.stringify(refused.body));
  assert.match(refused.body.error.message, /it allows: Owner/);
  const bAudit = await cliOk<Json>([...B, 'vault', 'audit', '--limit', '50']);
  assert.ok(bAudit.entries.some((e: Json) => e.action === 'kp.release' && e.outcome === 'refused' && /vm\.start lab/.test(e.subject)), 'the refusal is audited on the other host');
  assert.equal((await cliOk<Json>([...B, 'vm', 'status', 'lab'])).vms[0].status, 'stopped');

  // QEMU by hand on the copied file: the shield item is a required metadata item it does not know.
  const info = spawnSync('qemu-img', ['info', '-f', 'vhdx', copy], { encoding: 'utf8' });
  assert.notEqual(info.status, 0, info.stdout);
  t.diagnostic(`qemu-img info: ${info.stderr.trim()}`);
  const qemu = spawnSync('qemu-system-x86_64', ['-nodefaults', '-display', 'none', '-machine', 'q35', '-accel', 'tcg', '-drive', `file=${copy},format=vhdx,if=virtio,readonly=on`, '-S', '-qmp', 'stdio'], {
    encoding: 'utf8',
    input: '{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
    timeout: 20_000,
  });
  assert.notEqual(qemu.status, 0, 'QEMU opened the shielded file');
  t.diagnostic(`qemu-system: ${qemu.stderr.trim()}`);
  const bytes = readFileSync(copy);
  assert.equal(bytes.indexOf(Buffer.from(marker)), -1, 'the copied disk holds no marker');
  assert.equal(bytes.indexOf(raw.subarray(512, 512 + 64)), -1, 'nor any plaintext sector');
  // The copied vTPM state, without its key: swtpm refuses it.
  await assert.rejects(
    launchSwtpm({ stateDir: join(dir, 'b', 'vms', 'lab', 'tpm'), key: null, runDir: join(dir, 'b-swtpm-run') }),
    (e: Json) => e.code === 'vtpm_state_invalid' || e.code === 'tpm_unavailable',
  );
  t.diagnostic(`whole test ${Date.now() - t0} ms`);
});

test('a shielded VM (Secure Boot, no console) is torn down when its swtpm dies; vm stop --force from another process', { skip, timeout: 300_000 }, async (t) => {
  const t0 = Date.now();
  const { dir, cleanup } = tempDir('shieldlab-vmk-');
  t.after(cleanup);
  const A = await setupOwnerHome(dir, 'a');
  const raw = Buffer.alloc(2 * MiB, 0x5a);
  writeFileSync(join(dir, 'in.raw'), raw);
  const disk = join(dir, 'sh.vhdx');
  await cliOk([...A, 'disk', 'shield', join(dir, 'in.raw'), '--out', disk, '--owner', 'Owner', '--allow-mode', 'host-key']);
  await cliOk([...A, 'vm', 'create', 'sh', '--disk', disk, '--memory', '256', '--cpus', '1']);
  const noConsole = await cliJson<Json>([...A, 'vm', 'console', 'sh']);
  assert.equal(noConsole.body.error?.details?.reason, 'no_console', JSON.stringify(noConsole.body));
  const refusedChannel = await cliJson<Json>([...A, 'vm', 'start', 'sh', '--test-channel', join(dir, 'x.sock')]);
  assert.equal(refusedChannel.body.error?.code, 'invalid_argument', JSON.stringify(refusedChannel.body));

  const run = startVm(A, 'sh');
  t.after(() => run.child.kill('SIGKILL'));
  const notice = await Promise.race([run.notice, run.ended.then((e) => Promise.reject(new Error(`vm start ended: ${JSON.stringify(e)}`)))]);
  t.diagnostic(`shielded VM up after ${Date.now() - t0} ms: ${notice}`);
  assert.match(notice, /VM sh runs \(shielded, .*Secure Boot/);
  const state = JSON.parse(readFileSync(join(dir, 'a', 'vms', 'sh', 'state.json'), 'utf8')) as Json;
  assert.equal(state.status, 'running');
  assert.equal(state.secureBoot, true);
  const args = readFileSync(`/proc/${state.qemuPid}/cmdline`, 'utf8').split('\0');
  assert.ok(!args.includes('-vnc') && !args.includes('-gdb') && !args.includes('-snapshot'));
  assert.ok(args.includes('smm=on') || args.some((a) => a.includes('smm=on')));

  process.kill(state.swtpmPid as number, 'SIGKILL');
  const ended = await run.ended;
  t.diagnostic(`torn down ${Date.now() - t0} ms: ${JSON.stringify(ended.body)}`);
  assert.equal(ended.code, 1, ended.stderr);
  assert.equal(ended.body?.status, 'crashed');
  assert.equal(ended.body?.cause, 'swtpm');
  assert.throws(() => process.kill(state.qemuPid as number, 0), 'QEMU is gone');
  assert.equal(existsSync(join(dir, 'a', 'vms', 'sh', 'run')), false, 'the run folder (sockets) is gone');
  const audit = await cliOk<Json>([...A, 'vault', 'audit', '--limit', '50']);
  assert.ok(audit.entries.some((e: Json) => e.action === 'vm.crash' && e.outcome === 'failed' && /swtpm/.test(e.reason ?? '')), 'vm.crash audited');
  assert.equal((await cliOk<Json>([...A, 'vm', 'status', 'sh'])).vms[0].status, 'crashed');

  // Again, stopped from another process.
  const again = startVm(A, 'sh');
  t.after(() => again.child.kill('SIGKILL'));
  await Promise.race([again.notice, again.ended.then((e) => Promise.reject(new Error(`vm start ended: ${JSON.stringify(e)}`)))]);
  const stopped = await cliOk<Json>([...A, 'vm', 'stop', 'sh', '--force']);
  assert.equal(stopped.how, 'quit');
  const end2 = await again.ended;
  assert.equal(end2.code, 0, `${end2.stderr} ${JSON.stringify(end2.body)}`);
  assert.equal(end2.body?.status, 'stopped');
  const unconfirmed = await cliJson<Json>([...A, 'vm', 'delete', 'sh']);
  assert.equal(unconfirmed.body.error?.code, 'usage', JSON.stringify(unconfirmed.body));
  assert.match(unconfirmed.body.error.message, /--yes/);
  assert.ok(existsSync(join(dir, 'a', 'vms', 'sh', 'tpm')), 'nothing deleted without --yes');
  await cliOk([...A, 'vm', 'delete', 'sh', '--yes']);
  assert.equal(existsSync(join(dir, 'a', 'vms', 'sh')), false);
  assert.deepEqual((await cliOk<Json>([...A, 'vm', 'list'])).vms, []);
});
