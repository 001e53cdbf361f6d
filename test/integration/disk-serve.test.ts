// The shielded-disk round trip through the real CLI and real NBD clients: raw → `disk shield` →
// `disk serve` (after host-key attestation) → `qemu-img convert` from the NBD socket →
// byte-identical to the input. Writes through NBD (qemu-io, with flush) survive a clean server
// restart and a kill -9 of the server; afterwards our `vhdx check` of the structure and
// `qemu-img check` of a viewable copy are clean. A host that is not attested is refused.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { CLI, cliJson, cliOk, secretFile, tempDir } from '../helpers/home.ts';
import { MiB, qemuImg, qemuIo, qemuMissing } from '../helpers/qemu.ts';
import { rawLayout } from '../helpers/vhdx-raw.ts';
import { SHIELD_ITEM } from '../../core/shield/mod.ts';

type Json = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any
const skip = qemuMissing() ?? false;

/** Starts `disk serve` and resolves once it says where it listens. */
async function serve(home: string[], file: string, socket: string): Promise<{ child: ChildProcess; uri: string; stopped: Promise<{ code: number | null; out: string }> }> {
  const child = spawn(process.execPath, [CLI, ...home, 'disk', 'serve', file, '--socket', socket, '--json'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  const stopped = new Promise<{ code: number | null; out: string }>((resolve) => child.on('exit', (code) => resolve({ code, out })));
  const uri = await new Promise<string>((resolve, reject) => {
    child.stderr!.on('data', (d: Buffer) => {
      err += d.toString();
      const m = /\{"notice":.*\}/.exec(err);
      if (m) resolve(/(nbd\+unix:\/\/\/\?socket=[^ ]+)/.exec((JSON.parse(m[0]) as { notice: string }).notice)![1]!);
    });
    void stopped.then(() => reject(new Error(`disk serve ended: ${err} ${out}`)));
  });
  return { child, uri, stopped };
}

test('raw → shielded → NBD → qemu-img: identical; writes survive restart and kill -9', { skip, timeout: 180_000 }, async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const pp = secretFile(dir, 'pp', 'host passphrase');
  const pfx = secretFile(dir, 'pfx', 'pfx password');
  const A = ['--home', join(dir, 'a'), '--passphrase-file', pp];
  const ok = (args: string[]) => cliOk<Json>(args);
  await ok([...A, 'vault', 'init', '--no-keychain', '--kdf-memory-mib', '16']);
  await ok([...A, 'guardian', 'create', 'Owner']);
  await ok([...A, 'guardian', 'export', 'Owner', '--pfx', '--out-dir', join(dir, 'backup'), '--password-file', pfx]);

  const input = join(dir, 'in.raw');
  const plain = Buffer.alloc(32 * MiB);
  randomBytes(3 * MiB).copy(plain, MiB);
  plain.fill(0x4d, 20 * MiB, 21 * MiB);
  writeFileSync(input, plain);
  const disk = join(dir, 'vm.vhdx');
  await ok([...A, 'disk', 'shield', input, '--out', disk, '--owner', 'Owner', '--allow-mode', 'host-key']);

  // Not attested yet: the release gate refuses, and nothing listens.
  const socket = join(dir, 'run', 'nbd.sock');
  const { mkdirSync } = await import('node:fs');
  mkdirSync(join(dir, 'run'), { mode: 0o700 });
  const refused = await cliJson<Json>([...A, 'disk', 'serve', disk, '--socket', socket]);
  assert.equal(refused.code, 1, JSON.stringify(refused.body));
  assert.equal(refused.body.error.code, 'release_denied', JSON.stringify(refused.body));
  assert.equal(existsSync(socket), false);

  await ok([...A, 'host', 'register-key']);
  await ok([...A, 'host', 'attest']);
  let s = await serve(A, disk, socket);
  const viaNbd = join(dir, 'via-nbd.raw');
  qemuImg(['convert', '-f', 'raw', '-O', 'raw', s.uri, viaNbd]);
  assert.ok(readFileSync(viaNbd).equals(plain), 'qemu-img reads the original bytes through our NBD server');

  // Writes with a flush (qemu-io flushes before it exits), then a clean stop.
  qemuIo(['-f', 'raw', '-c', `write -P 0x61 ${5 * MiB} ${MiB}`, '-c', `write -P 0x62 ${30 * MiB + 4096} 8192`, '-c', 'flush', s.uri]);
  plain.fill(0x61, 5 * MiB, 6 * MiB);
  plain.fill(0x62, 30 * MiB + 4096, 30 * MiB + 4096 + 8192);
  s.child.kill('SIGTERM');
  const first = await s.stopped;
  assert.equal(first.code, 0, first.out);
  assert.ok((JSON.parse(first.out) as Json).bytesWritten >= MiB);
  assert.equal(readFileSync(disk).indexOf(Buffer.alloc(4096, 0x61)), -1, 'written data is ciphertext on disk');

  // Restart: the writes are there. More writes, flushed, then kill -9.
  s = await serve(A, disk, socket);
  qemuIo(['-f', 'raw', '-c', `read -P 0x61 ${5 * MiB} ${MiB}`, '-c', `read -P 0x62 ${30 * MiB + 4096} 8192`, s.uri]);
  qemuIo(['-f', 'raw', '-c', `write -P 0x63 ${12 * MiB} ${2 * MiB}`, '-c', 'flush', s.uri]);
  plain.fill(0x63, 12 * MiB, 14 * MiB);
  s.child.kill('SIGKILL');
  await s.stopped;

  // The file after a kill: our check finds the structure sound (the dirty log is expected: it is replayed).
  const check = await cliJson<Json>([...A, 'vhdx', 'check', disk, '--json']);
  assert.ok(!check.body.before.findings.some((f: Json) => f.severity === 'error' && f.code !== 'log_dirty'), JSON.stringify(check.body.before.findings));
  s = await serve(A, disk, socket);
  const again = join(dir, 'again.raw');
  qemuImg(['convert', '-f', 'raw', '-O', 'raw', s.uri, again]);
  assert.ok(readFileSync(again).equals(plain), 'every flushed write survived the kill');
  s.child.kill('SIGTERM');
  assert.equal((await s.stopped).code, 0);
  const clean = await cliJson<Json>([...A, 'vhdx', 'check', disk, '--json']);
  assert.equal(clean.code, 0, JSON.stringify(clean.body));
  // qemu will only look at the structure with the Required bit of our item cleared (a copy).
  const b = readFileSync(disk);
  const item = rawLayout(b).items.find((i) => i.itemId === SHIELD_ITEM)!;
  b.writeUInt32LE(item.flags & ~4, item.entryOffset + 24);
  const viewable = join(dir, 'viewable.vhdx');
  writeFileSync(viewable, b);
  assert.match(qemuImg(['check', '-f', 'vhdx', viewable]), /No errors were found/);
});
