// A real Linux guest boots from a disk served by our NBD server: Debian's kernel and a busybox
// initramfs (test/helpers/guest.ts) under QEMU (TCG), with an swtpm as its TPM. The guest reads
// the marker we wrote in its disk's first sector and hashes the whole disk, reads its TPM's PCRs
// from sysfs, reports both on a virtio-serial port this test owns, and powers off. Asserted: the
// marker and the hash are ours, every byte came through our server, the TPM is a TPM 2.0 whose
// firmware-measured PCRs are set, and QEMU exited on its own (power-off) within the time limit.
// The OVMF variant boots the same kernel through UEFI: PCR 4 (boot application: the kernel as QEMU
// hands it over) and PCR 9 (the EFI stub's initrd measurement) are then set too, and both change
// with the initrd/command line, whereas SeaBIOS's direct-kernel PCRs 0–7 measure only firmware.
// The acpi mode (shieldlab.mode=acpi) reports the same, then waits for the ACPI power button:
// QMP system_powerdown once the report is in makes it print SHIELDLAB-POWERDOWN and power off.
import { test, before, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { RawFileDisk, startNbdServer, type NbdEvent } from '../../core/nbd/mod.ts';
import { bootGuest, buildGuest, CONSOLE_PREFIX, guestAppend, guestMissing, ovmfMissing, POWERDOWN_MARKER, qmpExecute, startGuestSwtpm, type BootOptions, type BootResult, type Guest } from '../helpers/guest.ts';
import { tempDir } from '../helpers/home.ts';
import { uriOf } from '../helpers/nbd.ts';
import { swtpmMissing } from '../helpers/swtpm.ts';

const skip = guestMissing() ?? swtpmMissing() ?? false;
const MiB = 1024 * 1024;
const DISK_SIZE = 4 * MiB;
const ZERO_PCR = /^0+$/;
/** One boot under TCG takes ≈10 s (SeaBIOS) or ≈25 s (OVMF) on a 2-core host; this is the ceiling. */
const BOOT_TIMEOUT_MS = 75_000;

let guest: Guest;
before(() => {
  if (skip) return;
  guest = buildGuest();
});

/** A raw disk: "SHIELDLAB-MARKER-<hex>" then zeros in sector 0, random bytes after. */
function writeDisk(path: string): { marker: string; sha256: string } {
  const marker = `SHIELDLAB-MARKER-${randomBytes(12).toString('hex')}`;
  const disk = Buffer.alloc(DISK_SIZE);
  disk.write(marker, 0, 'ascii');
  randomBytes(DISK_SIZE - 512).copy(disk, 512);
  writeFileSync(path, disk);
  return { marker, sha256: createHash('sha256').update(disk).digest('hex') };
}

function describe(r: BootResult): string {
  return `exit ${JSON.stringify(r.exit)}, timedOut ${r.timedOut}, via ${r.via}, report ${r.line ?? 'none'}\nqemu ${r.args.join(' ')}\nconsole:\n${r.console.slice(-4000)}`;
}

async function bootFromNbd(t: TestContext, firmware: 'direct-kernel' | 'ovmf', extra: (dir: string) => Partial<BootOptions> = () => ({})) {
  const { dir, cleanup } = tempDir('shieldlab-guest-boot-');
  t.after(cleanup);
  const diskPath = join(dir, 'disk.raw');
  const want = writeDisk(diskPath);
  const disk = await RawFileDisk.open(diskPath, { readOnly: true });
  const events: NbdEvent[] = [];
  const server = await startNbdServer({ disk, log: (e) => events.push(e) });
  t.after(async () => {
    await server.close();
    await disk.close();
  });
  const tpm = await startGuestSwtpm(join(dir, 'tpm'));
  t.after(() => tpm.stop());
  const r = await bootGuest({ kernel: guest.kernel, initrd: guest.initrd, disk: uriOf(server.socketPath), tpmCtrlSocket: tpm.ctrlSocket, firmware, workDir: join(dir, 'vm'), timeoutMs: BOOT_TIMEOUT_MS, ...extra(dir) });
  t.diagnostic(`${firmware}: report after ${r.reportMs} ms, QEMU exited after ${r.exitMs} ms (guest uptime ${r.report?.uptime} s); initramfs built in ${guest.buildMs} ms`);

  assert.equal(r.timedOut, false, `QEMU did not power off within ${BOOT_TIMEOUT_MS} ms: ${describe(r)}`);
  assert.deepEqual(r.exit, { code: 0, signal: null }, describe(r));
  assert.equal(r.via, 'virtio-serial', describe(r));
  const report = r.report;
  assert.ok(report, describe(r));
  assert.equal(report.errors, '', describe(r));
  assert.equal(report.marker, want.marker);
  assert.equal(report.disk.sha256, want.sha256, 'the guest read other bytes than the disk holds');
  assert.equal(report.disk.sectors, DISK_SIZE / 512);
  // Every byte the guest hashed came through our server.
  assert.ok(server.stats().bytesRead >= DISK_SIZE, `NBD server served ${server.stats().bytesRead} bytes`);
  assert.equal(server.stats().bytesWritten, 0);
  assert.ok(events.some((e) => e.event === 'ready'), 'QEMU never completed an NBD handshake');

  assert.equal(report.tpm.present, true, 'no /dev/tpm0 in the guest');
  assert.equal(report.tpm.versionMajor, 2);
  const pcrs = report.tpm.pcrs.sha256;
  for (let i = 0; i < 24; i++) assert.match(pcrs[String(i)] ?? '', /^[0-9A-F]{64}$/i, `sha256 PCR ${i}: ${pcrs[String(i)]}`);
  // The firmware (SeaBIOS or OVMF) measured itself into PCR 0; nothing extends the debug PCR 16.
  assert.doesNotMatch(pcrs['0']!, ZERO_PCR, 'PCR 0 is zero: nothing measured the firmware');
  assert.match(pcrs['16']!, ZERO_PCR);
  t.diagnostic(`sha256 PCRs 0-10: ${Array.from({ length: 11 }, (_, i) => `${i}=${pcrs[String(i)]!.slice(0, 12)}`).join(' ')}`);
  return { r, report };
}

test('a busybox guest boots (direct kernel, SeaBIOS) from our NBD server and reports its disk marker and TPM', { skip, timeout: 150_000 }, async (t) => {
  const t0 = Date.now();
  const { r } = await bootFromNbd(t, 'direct-kernel');
  assert.ok(r.exitMs < BOOT_TIMEOUT_MS);
  t.diagnostic(`whole test ${Date.now() - t0} ms`);
});

test('the same guest through OVMF: PCRs 0–7 and 9 carry UEFI and EFI-stub measurements', { skip: skip || ovmfMissing() || false, timeout: 150_000 }, async (t) => {
  const { report } = await bootFromNbd(t, 'ovmf');
  const pcrs = report.tpm.pcrs.sha256;
  for (const i of ['0', '2', '4', '7', '9']) assert.doesNotMatch(pcrs[i]!, ZERO_PCR, `PCR ${i} is zero under OVMF`);
});

test('an acpi-mode guest reports, then powers off on QMP system_powerdown (the ACPI power button)', { skip, timeout: 150_000 }, async (t) => {
  // Through OVMF when it is there (how real VMs boot: OVMF hands over QEMU's ACPI tables), else SeaBIOS.
  const firmware = ovmfMissing() ? 'direct-kernel' : 'ovmf';
  let sent: unknown = null;
  const { r } = await bootFromNbd(t, firmware, (dir) => {
    const qmpSocket = join(dir, 'qmp.sock');
    return {
      append: guestAppend('acpi'),
      qmpSocket,
      onReport: async () => {
        sent = await qmpExecute(qmpSocket, 'system_powerdown');
      },
    };
  });
  assert.deepEqual(sent, {}, `system_powerdown was not accepted: ${describe(r)}`);
  assert.ok(r.console.includes(POWERDOWN_MARKER), `no ${POWERDOWN_MARKER} on the console: ${describe(r)}`);
  assert.ok(r.console.indexOf(POWERDOWN_MARKER) > r.console.lastIndexOf(CONSOLE_PREFIX), 'the power-down came after the report');
  t.diagnostic(`${firmware}: QEMU exited ${r.exitMs - r.reportMs!} ms after the report (and the power button)`);
});
