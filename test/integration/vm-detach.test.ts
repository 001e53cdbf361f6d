// `vm start --detach` through the real CLI, on a shielded VM (Secure Boot OVMF, no kernel: the
// firmware waits in its boot manager, so the VM runs until stopped):
// - a start while another process holds the VM's start lock is refused before any key release;
// - two detached starts at once: exactly one runs, the other is refused with vm_running, and the
//   key protector was released and rolled once (the start lock covers the roll);
// - the CLI call returns and the VM keeps running under its supervisor (the passphrase reached it
//   through a pipe: this home has no keychain);
// - the supervisor killed with SIGKILL: QEMU and swtpm are left behind — the next `vm status`
//   stops them (their pids end), says why, and audits vm.crash;
// - `vm stop --timeout 2`: the firmware ignores the ACPI power button, so after 2 s QEMU is told to
//   quit; the supervisor ends and releases the lock;
// - a start the supervisor refuses comes back as the same typed error.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cliJson, cliOk, secretFile, tempDir } from '../helpers/home.ts';
import { guestMissing, ovmfMissing } from '../helpers/guest.ts';
import { swtpmMissing } from '../helpers/swtpm.ts';

type Json = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any
const skip = guestMissing() ?? swtpmMissing() ?? ovmfMissing() ?? false;

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

async function until(what: string, ok: () => boolean, ms = 15_000): Promise<void> {
  const end = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** A home whose owner guardian is backed up and whose host key is registered; QEMU/swtpm/supervisor pids pushed to `pids` are killed at the end. */
async function ownerHome(t: { after(fn: () => void): void }, prefix: string): Promise<{ dir: string; A: string[]; pids: number[] }> {
  const { dir, cleanup } = tempDir(prefix);
  const pids: number[] = [];
  t.after(() => {
    for (const p of pids) if (alive(p)) process.kill(p, 'SIGKILL');
    cleanup();
  });
  const A = ['--home', join(dir, 'a'), '--passphrase-file', secretFile(dir, 'pp', 'host passphrase')];
  await cliOk([...A, 'vault', 'init', '--no-keychain', '--kdf-memory-mib', '16']);
  await cliOk([...A, 'guardian', 'create', 'Owner']);
  await cliOk([...A, 'guardian', 'export', 'Owner', '--pfx', '--out-dir', join(dir, 'backup'), '--password-file', secretFile(dir, 'pfx', 'pfx password')]);
  await cliOk([...A, 'host', 'register-key']);
  return { dir, A, pids };
}

test('vm start --detach: one start at a time, the VM outlives the call, a killed supervisor is cleaned up, stop after the power-down timeout', { skip, timeout: 300_000 }, async (t) => {
  const t0 = Date.now();
  const { dir, A, pids } = await ownerHome(t, 'shieldlab-vmd-');
  writeFileSync(join(dir, 'in.raw'), Buffer.alloc(2 << 20, 0x5a));
  const disk = join(dir, 'sh.vhdx');
  await cliOk([...A, 'disk', 'shield', join(dir, 'in.raw'), '--out', disk, '--owner', 'Owner', '--allow-mode', 'host-key']);
  await cliOk([...A, 'vm', 'create', 'sh', '--disk', disk, '--memory', '256', '--cpus', '1']);
  const vmDir = join(dir, 'a', 'vms', 'sh');

  // A refusal inside the supervisor comes back typed.
  const refused = await cliJson<Json>([...A, 'vm', 'start', 'sh', '--detach', '--test-channel', join(dir, 'x.sock')]);
  assert.equal(refused.code, 2, JSON.stringify(refused.body));
  assert.equal(refused.body.error?.code, 'invalid_argument', JSON.stringify(refused.body));
  assert.equal(refused.body.error?.details?.reason, 'test_channel_in_shielded');

  // A start under way elsewhere (its lock held by a live process: this one) refuses before any key is released.
  writeFileSync(join(vmDir, 'start.lock'), `${process.pid}\n`);
  const held = await cliJson<Json>([...A, 'vm', 'start', 'sh', '--detach']);
  assert.equal(held.body.error?.code, 'vm_running', JSON.stringify(held.body));
  assert.match(held.body.error.message, new RegExp(`pid ${process.pid}`));
  const none = (await cliOk<Json>([...A, 'vault', 'audit', '--limit', '100'])).entries as Json[];
  assert.equal(none.filter((e) => e.action === 'kp.release').length, 0, 'no key released while another start holds the lock');
  rmSync(join(vmDir, 'start.lock'));

  // Two at once.
  const [r1, r2] = await Promise.all([cliJson<Json>([...A, 'vm', 'start', 'sh', '--detach']), cliJson<Json>([...A, 'vm', 'start', 'sh', '--detach'])]);
  t.diagnostic(`two starts after ${Date.now() - t0} ms: ${r1.code} ${r2.code}`);
  const won = [r1, r2].filter((r) => r.code === 0);
  const lost = [r1, r2].filter((r) => r.code !== 0);
  assert.equal(won.length, 1, `${JSON.stringify(r1.body)} ${JSON.stringify(r2.body)}`);
  assert.equal(lost[0]!.body.error?.code, 'vm_running', JSON.stringify(lost[0]!.body));
  const run = won[0]!.body;
  assert.equal(run.status, 'running');
  assert.equal(run.secureBoot, true);
  assert.equal(run.supervisorLog, join(vmDir, 'supervisor.log'));
  pids.push(run.pid, run.qemuPid);

  // The call has returned; the VM runs on under its supervisor.
  assert.ok(alive(run.pid), 'the supervisor runs');
  assert.ok(alive(run.qemuPid), 'QEMU runs');
  const st = await cliOk<Json>([...A, 'vm', 'status', 'sh']);
  assert.equal(st.vms[0].status, 'running');
  assert.equal(st.vms[0].pid, run.pid);
  assert.equal(readFileSync(join(vmDir, 'start.lock'), 'utf8').trim(), String(run.pid));
  const state = JSON.parse(readFileSync(join(vmDir, 'state.json'), 'utf8')) as Json;
  pids.push(state.swtpmPid);
  const audit = (await cliOk<Json>([...A, 'vault', 'audit', '--limit', '100'])).entries as Json[];
  assert.equal(audit.filter((e) => e.action === 'kp.release' && e.outcome === 'ok').length, 1, 'the key was released once');
  assert.equal(audit.filter((e) => e.action === 'kp.roll' && e.outcome === 'ok').length, 1, 'the key protector rolled once');
  const log = readFileSync(run.supervisorLog, 'utf8');
  assert.match(log, /VM sh runs \(shielded/);
  assert.doesNotMatch(log, /host passphrase/);

  // The supervisor dies hard: its QEMU and swtpm are found and stopped by the next status.
  process.kill(run.pid, 'SIGKILL');
  await until('the supervisor to end', () => !alive(run.pid));
  assert.ok(alive(run.qemuPid) && alive(state.swtpmPid), 'QEMU and swtpm outlive a killed supervisor');
  const after = (await cliOk<Json>([...A, 'vm', 'status', 'sh'])).vms[0];
  assert.equal(after.status, 'crashed');
  assert.match(after.reason, new RegExp(`pid ${run.pid}\\) ended without stopping it; QEMU \\(pid ${run.qemuPid}\\) and swtpm \\(pid ${state.swtpmPid}\\) stopped`));
  await until('QEMU and swtpm to end', () => !alive(run.qemuPid) && !alive(state.swtpmPid));
  assert.equal(existsSync(join(vmDir, 'run')), false, 'the run folder (sockets) is gone');
  const crash = (await cliOk<Json>([...A, 'vault', 'audit', '--limit', '100'])).entries as Json[];
  assert.equal(crash.filter((e) => e.action === 'vm.crash' && e.outcome === 'failed').length, 1, 'vm.crash audited once');
  assert.equal((await cliOk<Json>([...A, 'vm', 'status', 'sh'])).vms[0].status, 'crashed', 'read again: still crashed, nothing reaped twice');

  // Again (the stale lock of the killed supervisor is taken over), then a graceful stop that times out.
  const again = await cliOk<Json>([...A, 'vm', 'start', 'sh', '--detach']);
  pids.push(again.pid, again.qemuPid);
  assert.equal(again.status, 'running');
  const stopped = await cliOk<Json>([...A, 'vm', 'stop', 'sh', '--timeout', '2']);
  assert.equal(stopped.how, 'quit', 'the firmware ignored the power button; QEMU was told to quit');
  assert.equal(stopped.status, 'stopped');
  await until('the supervisor to end', () => !alive(again.pid));
  assert.equal(existsSync(join(vmDir, 'start.lock')), false, 'the lock is released');
  assert.match(readFileSync(again.supervisorLog, 'utf8'), /"status": "stopped"/);
  t.diagnostic(`whole test ${Date.now() - t0} ms`);
});

test('in the app (web mode, Electron) a detached VM belongs to the app process: the call returns, vm.stop stops it there, shutdown powers the rest down', { skip, timeout: 300_000 }, async (t) => {
  const { ShieldLabApp } = await import('../../core/app/service.ts');
  const { dir, A, pids } = await ownerHome(t, 'shieldlab-vma-');
  writeFileSync(join(dir, 'in.raw'), Buffer.alloc(2 << 20, 0x5a));
  for (const name of ['one', 'two']) {
    await cliOk([...A, 'disk', 'shield', join(dir, 'in.raw'), '--out', join(dir, `${name}.vhdx`), '--owner', 'Owner', '--allow-mode', 'host-key']);
    await cliOk([...A, 'vm', 'create', name, '--disk', join(dir, `${name}.vhdx`), '--memory', '256', '--cpus', '1']);
  }

  const app = new ShieldLabApp({ home: join(dir, 'a') });
  await app.invoke('vault.unlock', { passphrase: 'host passphrase' });
  const steps: string[] = [];
  const call = new AbortController();
  const one = (await app.invoke('vm.start', { name: 'one', detach: true }, { signal: call.signal, onProgress: (e) => steps.push(`${e.done}/${e.total} ${e.phase}`) })) as Json;
  assert.equal(one.status, 'running');
  assert.equal(one.pid, process.pid, 'this process runs it');
  assert.deepEqual(steps, ['0/4 reading the shielded disk', '1/4 attesting this host', '2/4 releasing the key and rolling the key protector', '3/4 starting the vTPM and QEMU', '4/4 running']);
  pids.push(one.qemuPid);
  call.abort(); // the page that started it went away: the VM does not care
  await new Promise((r) => setTimeout(r, 500));
  assert.ok(alive(one.qemuPid));
  // Another process sees it running, owned by this one.
  const seen = (await cliOk<Json>([...A, 'vm', 'status', 'one'])).vms[0];
  assert.equal(seen.status, 'running');
  assert.equal(seen.pid, process.pid);
  const two = (await app.invoke('vm.start', { name: 'two', detach: true })) as Json;
  pids.push(two.qemuPid);

  // vm.stop in the owning process: the firmware ignores the power button, so after 1 s QEMU is told to quit.
  const stopped = (await app.invoke('vm.stop', { name: 'one', timeout: 1 })) as Json;
  assert.deepEqual(stopped, { name: 'one', how: 'quit', status: 'stopped' });
  assert.equal(alive(one.qemuPid), false);
  const oneAfter = ((await app.invoke('vm.status', { name: 'one' })) as Json).vms[0];
  assert.equal(oneAfter.reason, 'stopped on request');

  // Quitting the app powers down what it still runs (here: the power-down times out, then quit).
  await app.shutdown({ vmTimeoutMs: 1000 });
  assert.equal(alive(two.qemuPid), false, 'QEMU of the VM still running is gone');
  const twoAfter = (await cliOk<Json>([...A, 'vm', 'status', 'two'])).vms[0];
  assert.equal(twoAfter.status, 'stopped');
  assert.equal(twoAfter.reason, 'stopped on request');
  const audit = (await cliOk<Json>([...A, 'vault', 'audit', '--limit', '100'])).entries as Json[];
  assert.equal(audit.filter((e) => e.action === 'vm.stop' && e.outcome === 'ok' && e.subject === 'two').length, 1, 'the shutdown stop is audited');
});

test('vm stop from another process: the ACPI power button, and a guest that shuts down by itself (the test guest in acpi mode)', { skip, timeout: 300_000 }, async (t) => {
  const { buildGuest, guestAppend, listenForReport, POWERDOWN_MARKER } = await import('../helpers/guest.ts');
  const guest = buildGuest();
  const { dir, A, pids } = await ownerHome(t, 'shieldlab-vmp-');
  const raw = Buffer.alloc(2 << 20);
  raw.write('ACPI-MARKER', 0, 'ascii');
  writeFileSync(join(dir, 'in.raw'), raw);
  await cliOk([...A, 'disk', 'shield', join(dir, 'in.raw'), '--out', join(dir, 'p.vhdx'), '--owner', 'Owner', '--allow-mode', 'host-key']);
  await cliOk([...A, 'vm', 'create', 'p', '--disk', join(dir, 'p.vhdx'), '--memory', '256', '--cpus', '1', '--level', 'encryption-supported', '--kernel', guest.kernel, '--initrd', guest.initrd, '--append', `console=ttyS0 quiet panic=-1 ${guestAppend('acpi')}`]);
  const report = await listenForReport(join(dir, 'report.sock'));
  t.after(() => report.close());
  const run = await cliOk<Json>([...A, 'vm', 'start', 'p', '--detach', '--test-channel', report.socketPath]);
  pids.push(run.pid, run.qemuPid);
  const got = await report.report;
  assert.equal(got.report?.marker, 'ACPI-MARKER', got.line);
  assert.equal(got.report?.errors, '', got.line);
  // The guest now waits for its power button.
  const stopped = await cliOk<Json>([...A, 'vm', 'stop', 'p', '--timeout', '60']);
  assert.equal(stopped.how, 'powerdown', 'the guest shut down on the ACPI power button, before any hard stop');
  assert.equal(stopped.status, 'stopped');
  await until('the supervisor to end', () => !alive(run.pid));
  const cons = await cliOk<Json>([...A, 'vm', 'console', 'p']);
  assert.match(cons.text, new RegExp(POWERDOWN_MARKER));
  const vm = (await cliOk<Json>([...A, 'vm', 'status', 'p'])).vms[0];
  assert.equal(vm.status, 'stopped');
  assert.equal(vm.reason, 'stopped on request', 'the supervisor knew the stop was asked for');
  const audit = (await cliOk<Json>([...A, 'vault', 'audit', '--limit', '100'])).entries as Json[];
  assert.ok(audit.some((e) => e.action === 'vm.stop' && e.reason === 'requested (powerdown)'), 'the stop request is audited');
});
