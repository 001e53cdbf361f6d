// `disk shield` interrupted half-way, through the real CLI, on a 256 MiB input:
//   Ctrl-C (SIGINT) once the output is being written (OUT.partial exists and grows): exit 1 with
//     [cancelled], no output, no .partial left behind, the input byte-identical, nothing audited
//     as shielded;
//   kill -9 at the same point: the output path never appears; all that may remain is OUT.partial,
//     visibly incomplete (smaller than a finished output) and never taken for one: a rerun refuses
//     while it is there and leaves it alone; once it is removed, the rerun succeeds and the disk
//     unshields to the input's exact bytes.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, existsSync, mkdirSync, openSync, readdirSync, readSync, rmSync, statSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { CLI, cliFails, cliOk, secretFile, tempDir } from '../helpers/home.ts';
import { MiB, qemuMissing } from '../helpers/qemu.ts';

type Json = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any
const skip = qemuMissing() ?? false;
const SIZE = 256 * MiB;

/** 256 MiB of data in every block (one random MiB, each copy stamped with its number): fast to make, nothing skipped as zeros. */
function makeInput(path: string): void {
  const chunk = randomBytes(MiB);
  const fd = openSync(path, 'w');
  try {
    for (let i = 0; i < SIZE / MiB; i++) {
      chunk.writeUInt32LE(i, 0);
      writeSync(fd, chunk, 0, MiB, i * MiB);
    }
  } finally {
    closeSync(fd);
  }
}

const sha256 = (path: string) => {
  const h = createHash('sha256');
  const fd = openSync(path, 'r');
  const buf = Buffer.alloc(8 * MiB);
  try {
    for (let n; (n = readSync(fd, buf, 0, buf.length, null)) > 0; ) h.update(buf.subarray(0, n));
  } finally {
    closeSync(fd);
  }
  return h.digest('hex');
};

const sizeOf = (path: string) => {
  try {
    return statSync(path).size;
  } catch {
    return -1;
  }
};

/**
 * Starts `disk shield` and resolves once OUT.partial exists and has grown past its first size
 * (the payload is being written).
 */
async function shieldUntilWriting(args: string[], partial: string): Promise<{ exited: Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }>; kill: (s: NodeJS.Signals) => void }> {
  const child = spawn(process.execPath, [CLI, ...args, '--json'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }>((resolve) =>
    child.on('close', (code, signal) => resolve({ code, signal, stdout, stderr })),
  );
  let done = false;
  void exited.then(() => (done = true));
  const deadline = Date.now() + 120_000;
  let first = -1;
  for (;;) {
    if (done) throw new Error(`disk shield ended before it was interrupted: ${stdout} ${stderr}`);
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error('disk shield never started writing its output');
    }
    const size = sizeOf(partial);
    if (size >= 0 && first < 0) first = size;
    if (first >= 0 && size > first) return { exited, kill: (s) => child.kill(s) };
    await new Promise((r) => setTimeout(r, 5));
  }
}

test('disk shield interrupted: Ctrl-C cancels cleanly; kill -9 leaves only an evidently partial file; a rerun succeeds', { skip, timeout: 600_000 }, async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const pp = secretFile(dir, 'pp', 'host passphrase');
  const pfx = secretFile(dir, 'pfx', 'pfx password');
  const A = ['--home', join(dir, 'home'), '--passphrase-file', pp];
  await cliOk([...A, 'vault', 'init', '--no-keychain', '--kdf-memory-mib', '16']);
  await cliOk([...A, 'guardian', 'create', 'Owner']);
  await cliOk([...A, 'guardian', 'export', 'Owner', '--pfx', '--out-dir', join(dir, 'backup'), '--password-file', pfx]);

  const data = join(dir, 'data');
  mkdirSync(data);
  const input = join(data, 'in.raw');
  makeInput(input);
  const inputHash = sha256(input);
  const out = join(data, 'vm.vhdx');
  const partial = `${out}.partial`;
  const shield = [...A, 'disk', 'shield', input, '--out', out, '--owner', 'Owner'];

  // Ctrl-C half-way.
  const interrupted = await shieldUntilWriting(shield, partial);
  interrupted.kill('SIGINT');
  const cancelled = await interrupted.exited;
  assert.equal(cancelled.code, 1, `${cancelled.stdout} ${cancelled.stderr}`);
  assert.equal((JSON.parse(cancelled.stdout) as Json).error?.code, 'cancelled', cancelled.stdout);
  assert.deepEqual(readdirSync(data), ['in.raw'], 'no output and no partial file left');
  assert.equal(sha256(input), inputHash, 'the input is untouched');
  const audit = await cliOk([...A, 'vault', 'audit']);
  assert.ok(!audit.entries.some((e: Json) => e.action === 'disk.shield'), 'nothing was recorded as shielded');

  // kill -9 half-way.
  const killed = await shieldUntilWriting(shield, partial);
  killed.kill('SIGKILL');
  const gone = await killed.exited;
  assert.equal(gone.signal, 'SIGKILL');
  assert.equal(existsSync(out), false, 'the output path never appears before the output is complete');
  const left = readdirSync(data).filter((f) => f !== 'in.raw');
  assert.ok(left.every((f) => f === 'vm.vhdx.partial'), `only OUT.partial may remain, not ${left.join(', ')}`);
  t.diagnostic(`left after kill -9: ${left.join(', ') || 'nothing'} (${sizeOf(partial)} bytes)`);
  assert.equal(sha256(input), inputHash, 'the input is untouched');
  if (left.length > 0) {
    // It is never taken for a finished disk: a rerun refuses while it is there and leaves it alone.
    const before = sha256(partial);
    const refused = await cliFails(shield, 'already_exists');
    assert.match(refused.error.message, /vm\.vhdx\.partial/);
    assert.equal(sha256(partial), before, 'the leftover is left alone');
    assert.equal(existsSync(out), false);
  }
  const leftSize = sizeOf(partial);
  rmSync(partial, { force: true });

  // After removing it, a rerun succeeds, and the result is the whole disk.
  const made = await cliOk(shield);
  assert.equal(made.virtualSize, SIZE);
  assert.equal(made.dataBlocks, made.blocks, 'every block holds data');
  assert.deepEqual(readdirSync(data).sort(), ['in.raw', 'vm.vhdx']);
  assert.ok(leftSize < sizeOf(out), `the killed run's leftover (${leftSize} bytes) is smaller than a finished output (${sizeOf(out)} bytes)`);
  const back = join(dir, 'back.raw');
  await cliOk([...A, 'disk', 'unshield', out, '--out', back]);
  assert.equal(sha256(back), inputHash, 'the rerun unshields to the input, byte for byte');
  assert.equal(sha256(input), inputHash);
});
