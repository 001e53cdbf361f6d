// The QEMU command line per security level (core/hypervisor/qemu.ts): a shielded VM's argv holds no
// way in for an admin — no display, console, serial, parallel, HMP monitor, gdb stub, snapshot or
// test channel — and carries SMM + Secure Boot pflash, tpm-crb and our NBD drive; the
// encryption-supported level keeps a console (serial log or VNC on loopback). The checker itself
// catches each forbidden option. When QEMU is installed, the shielded argv is one QEMU accepts.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { firmwareFor, forbiddenInShielded, probeSmm, qemuArgs, OVMF, type LaunchOptions, type VmShape } from '../../core/hypervisor/qemu.ts';
import { ShieldError } from '../../core/errors.ts';

/** Skipped only where QEMU is truly absent and CI is not set (CI installs qemu-system-x86). */
const QEMU_SKIP = spawnSync('sh', ['-c', 'command -v qemu-system-x86_64']).status !== 0 && process.env.CI !== 'true' ? 'needs qemu-system-x86_64 (Debian: qemu-system-x86)' : false;

const vm: VmShape = { name: 'lab', memoryMiB: 512, cpus: 2 };
const base: LaunchOptions = {
  level: 'shielded',
  accel: 'tcg',
  nbdUri: 'nbd+unix:///?socket=/run/x/nbd.sock',
  tpmCtrlSocket: '/run/x/tpm/swtpm.sock.ctrl',
  qmpSocket: '/run/x/qmp.sock',
  firmware: { code: OVMF.secureBootCode, vars: '/home/x/vms/lab/OVMF_VARS.fd', secureBoot: true },
};

function valueOf(args: string[], opt: string): string[] {
  return args.flatMap((a, i) => (a === opt ? [args[i + 1]!] : []));
}

test('shielded argv: nothing to reach inside, SMM + Secure Boot, tpm-crb, our NBD disk, only our QMP', () => {
  const args = qemuArgs(vm, base);
  assert.deepEqual(forbiddenInShielded(args), []);
  for (const opt of ['-vnc', '-spice', '-gdb', '-s', '-S', '-snapshot', '-nographic', '-mon', '-curses', '-loadvm', '-incoming', '-kernel']) assert.ok(!args.includes(opt), `${opt} in ${args.join(' ')}`);
  for (const opt of ['-serial', '-parallel', '-monitor', '-vga', '-display']) assert.deepEqual(valueOf(args, opt), ['none'], opt);
  assert.deepEqual(valueOf(args, '-qmp'), ['unix:/run/x/qmp.sock,server=on,wait=off']);
  assert.ok(args.includes('-nodefaults'));
  assert.match(valueOf(args, '-machine')[0]!, /^q35,accel=tcg,smm=on$/);
  assert.ok(valueOf(args, '-global').includes('driver=cfi.pflash01,property=secure,value=on'));
  assert.ok(valueOf(args, '-drive').includes(`if=pflash,format=raw,unit=0,readonly=on,file=${OVMF.secureBootCode}`));
  assert.ok(valueOf(args, '-device').includes('tpm-crb,tpmdev=tpm0'));
  assert.ok(valueOf(args, '-drive').some((d) => d.startsWith('file=nbd+unix:///?socket=/run/x/nbd.sock,format=raw,if=virtio')));
  assert.ok(!args.join(' ').includes('snapshot'));
});

test('shielded level refuses a console, a test channel and firmware without Secure Boot', () => {
  const refused = (o: Partial<LaunchOptions>, reason: string) =>
    assert.throws(() => qemuArgs(vm, { ...base, ...o }), (e: unknown) => e instanceof ShieldError && e.details?.reason === reason);
  refused({ testChannel: '/tmp/report.sock' }, 'test_channel_in_shielded');
  refused({ console: { kind: 'vnc' } }, 'console_in_shielded');
  refused({ firmware: { code: OVMF.code, vars: '/v', secureBoot: false } }, 'secure_boot_required');
});

test('encryption-supported keeps a console: a serial log or VNC on 127.0.0.1; the test channel is allowed', () => {
  const es = { ...base, level: 'encryption-supported' as const, firmware: { code: OVMF.code, vars: '/v', secureBoot: false } };
  const log = qemuArgs(vm, { ...es, console: { kind: 'serial-log', file: '/run/x/console.log' }, testChannel: '/tmp/r.sock' });
  assert.deepEqual(valueOf(log, '-serial'), ['file:/run/x/console.log']);
  assert.deepEqual(valueOf(log, '-monitor'), ['none']);
  assert.ok(valueOf(log, '-device').includes('virtserialport,chardev=shieldlabtest,name=org.shieldlab.test'));
  assert.match(valueOf(log, '-machine')[0]!, /^q35,accel=tcg$/);
  const vnc = qemuArgs({ ...vm, kernel: '/boot/k', initrd: '/boot/i', append: 'console=ttyS0' }, { ...es, console: { kind: 'vnc' } });
  assert.deepEqual(valueOf(vnc, '-vnc'), ['127.0.0.1:0,to=99']);
  assert.deepEqual(valueOf(vnc, '-kernel'), ['/boot/k']);
  assert.ok(forbiddenInShielded(vnc).includes('-vnc'));
  assert.ok(forbiddenInShielded(log).some((f) => f.startsWith('-serial')));
});

test('the checker catches every way in', () => {
  const cases: [string[], string][] = [
    [['-vnc', ':0'], '-vnc'],
    [['-serial', 'stdio'], '-serial stdio'],
    [['-serial', 'pty'], '-serial pty'],
    [['-monitor', 'stdio'], '-monitor stdio'],
    [['-monitor', 'unix:/tmp/m,server'], '-monitor unix:/tmp/m,server'],
    [['-gdb', 'tcp::1234'], '-gdb'],
    [['-s'], '-s'],
    [['-snapshot'], '-snapshot'],
    [['-display', 'gtk'], '-display gtk'],
    [['-nographic'], '-nographic'],
    [['-mon', 'chardev=m,mode=readline'], '-mon'],
    [['-parallel', 'file:/tmp/p'], '-parallel file:/tmp/p'],
    [['-qmp', 'tcp:127.0.0.1:4444,server'], '-qmp tcp:127.0.0.1:4444,server'],
    [['-chardev', 'socket,id=mon0,path=/tmp/m,server=on'], '-chardev socket,id=mon0,path=/tmp/m,server=on'],
    [['-drive', 'file=x.raw,snapshot=on'], '-drive file=x.raw,snapshot=on'],
    [['-device', 'virtserialport,chardev=c,name=x'], '-device virtserialport,chardev=c,name=x'],
    [['--vnc', ':1'], '-vnc'],
  ];
  for (const [args, want] of cases) assert.deepEqual(forbiddenInShielded(args), [want], args.join(' '));
});

test('QEMU accepts the shielded command line (it starts, then quits over QMP)', { skip: QEMU_SKIP }, () => {
  // Same argv, but with QMP on stdio (to quit at once) and no TPM/NBD backends to connect to.
  const args = qemuArgs(vm, { ...base, firmware: { ...base.firmware, vars: OVMF.secureBootVars } })
    .filter((_, i, a) => !['-chardev', '-tpmdev'].includes(a[i]!) && !['-chardev', '-tpmdev'].includes(a[i - 1]!))
    .filter((a, i, all) => !(all[i - 1] === '-device' && a.startsWith('tpm-crb')) && !(a === '-device' && all[i + 1]?.startsWith('tpm-crb')))
    .filter((a, i, all) => !(all[i - 1] === '-drive' && a.startsWith('file=nbd')) && !(a === '-drive' && all[i + 1]?.startsWith('file=nbd')))
    .map((a, i, all) => (all[i - 1] === '-qmp' ? 'stdio' : a))
    .map((a) => (a.startsWith('if=pflash,format=raw,unit=1') ? a.replace('unit=1,', 'unit=1,readonly=on,') : a));
  const r = spawnSync('qemu-system-x86_64', args, { input: '{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n', timeout: 20_000, encoding: 'utf8' });
  assert.equal(r.status, 0, `${r.stderr}\n${args.join(' ')}`);
});

test('firmware: a shielded VM without SMM is refused with secure_boot_unavailable, never run without Secure Boot; encryption-supported needs no SMM', async () => {
  const noSmm = { smm: false, detail: 'SMM is not supported by this KVM' };
  assert.throws(
    () => firmwareFor('shielded', noSmm, '/home/x/vms/lab/OVMF_VARS.fd'),
    (e: unknown) => e instanceof ShieldError && e.code === 'secure_boot_unavailable' && e.details?.reason === 'secure_boot_unavailable' && /SMM is not supported by this KVM/.test(e.message),
  );
  const plain = firmwareFor('encryption-supported', noSmm, '/v.fd');
  assert.equal(plain.secureBoot, false);
  assert.equal(plain.code, OVMF.code);
  assert.deepEqual(firmwareFor('shielded', { smm: true, detail: '' }, '/v.fd'), { code: OVMF.secureBootCode, vars: '/v.fd', secureBoot: true });
});

test('probeSmm asks the real QEMU: TCG gives q35 SMM; a QEMU that cannot start says why', { skip: QEMU_SKIP }, async () => {
  assert.deepEqual(await probeSmm('tcg'), { smm: true, detail: 'SMM available under tcg' });
  const none = await probeSmm('tcg', '/nonexistent/qemu-system-x86_64');
  assert.equal(none.smm, false);
  assert.match(none.detail, /did not start/);
});
