// kill -9 during writes, many rounds on the same file, at random moments: a child process writes
// seeded 64 KiB slots, zeroes whole blocks and flushes; the test kills it, then checks that
//  - our read-only open (log replayed in memory) shows every flushed write, and for each slot
//    only content the slot could hold (its last flushed write, or a later unflushed one — never
//    torn or foreign bytes);
//  - our read-write open replays the log on disk, and afterwards `qemu-img check` is clean and
//    qemu reads exactly what our read-only view showed.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createVhdx, openVhdx } from '../../core/vhdx/mod.ts';
import { ROOT, tempDir } from '../helpers/home.ts';
import { qemuImg, qemuMissing } from '../helpers/qemu.ts';
import { rng } from '../helpers/random.ts';
import { rawHeader } from '../helpers/vhdx-raw.ts';
import { CRASH_BLOCK, CRASH_DISK, SLOT, SLOTS, crashOps, slotId, slotsOf } from '../helpers/vhdx-crash-ops.ts';

const skip = qemuMissing() ?? false;
const ROUNDS = Number(process.env.VHDX_CRASH_ROUNDS ?? 10);
const CHILD = join(ROOT, 'test/helpers/vhdx-crash-child.ts');
const NULL_GUID = '00000000-0000-0000-0000-000000000000';

/** Runs the child until a random moment after it is ready, kills it with SIGKILL, returns what it printed. */
async function runAndKill(path: string, seed: number, idBase: number, delayMs: number, writesOnly: boolean): Promise<{ issued: number; flushed: number }> {
  const child = spawn(process.execPath, [CHILD, path, String(seed), String(idBase), writesOnly ? 'writes-only' : 'all'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  await new Promise<void>((resolve, reject) => {
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      if (out.startsWith('ready\n')) resolve();
    });
    void exited.then(() => reject(new Error(`the child ended before it was killed: ${err}`)));
  });
  await new Promise((r) => setTimeout(r, delayMs));
  child.kill('SIGKILL');
  await exited;
  let issued = -1;
  let flushed = 0; // "f K": operations before K are durable
  for (const line of out.split('\n')) {
    const m = /^([wf]) (\d+)$/.exec(line);
    if (!m) continue;
    if (m[1] === 'w') issued = Number(m[2]);
    else flushed = Number(m[2]);
  }
  return { issued, flushed };
}

async function slotIds(path: string): Promise<(number | null)[]> {
  const img = await openVhdx(path);
  try {
    const disk = await img.read(0, CRASH_DISK);
    return Array.from({ length: SLOTS }, (_, s) => slotId(disk.subarray(s * SLOT, (s + 1) * SLOT), s));
  } finally {
    await img.close();
  }
}

// The fixed disk gets only writes into its allocated blocks: nothing there needs the log, which is
// the case where a session's dirty header must already have a valid (empty) entry to point at.
const VARIANTS = [
  { type: 'dynamic', writesOnly: false, rounds: ROUNDS, what: 'writes, block zeroing and flushes on a dynamic disk' },
  { type: 'fixed', writesOnly: true, rounds: Math.max(3, Math.ceil(ROUNDS / 3)), what: 'writes and flushes on a fixed disk (no BAT change at all)' },
] as const;

for (const v of VARIANTS) test(`kill -9 during ${v.what} (${v.rounds} rounds): flushed writes survive, the log replays, qemu-img check is clean`, { skip, timeout: 600_000 }, async (t) => {
  const ROUNDS = v.rounds;
  const { dir, cleanup } = tempDir();
  try {
    const path = join(dir, 'crash.vhdx');
    await createVhdx(path, { size: CRASH_DISK, blockSize: CRASH_BLOCK, type: v.type });
    let state: number[] = new Array<number>(SLOTS).fill(0);
    const r = rng(4242);
    let dirtyRounds = 0;
    let totalOps = 0;
    for (let round = 0; round < ROUNDS; round++) {
      const seed = 9000 + round;
      const idBase = (round + 1) * 1_000_000;
      const { issued, flushed } = await runAndKill(path, seed, idBase, 30 + Math.floor(r() * 900), v.writesOnly);
      totalOps += issued + 1;
      // What each slot may hold: its durable content, or that of any later write that may have landed.
      const durable = [...state];
      const candidates = state.map((id) => new Set([id]));
      let k = 0;
      for (const op of crashOps(seed, idBase, v.writesOnly)) {
        if (k > issued) break;
        const id = op.kind === 'write' ? op.id : 0;
        for (const s of slotsOf(op)) {
          if (k < flushed) {
            durable[s] = id;
            candidates[s] = new Set([id]);
          } else {
            candidates[s]!.add(id);
          }
        }
        k++;
      }
      const where = `round ${round} (seed ${seed}, ${issued + 1} operations issued, flushed before ${flushed})`;
      if (rawHeader(readFileSync(path), 0).logGuid !== NULL_GUID || rawHeader(readFileSync(path), 1).logGuid !== NULL_GUID) dirtyRounds++;

      const seen = await slotIds(path); // read-only: the log replayed in memory
      for (let s = 0; s < SLOTS; s++) {
        assert.notEqual(seen[s], null, `${where}: slot ${s} holds torn or foreign bytes`);
        assert.ok(candidates[s]!.has(seen[s]!), `${where}: slot ${s} holds write ${seen[s]}, expected one of ${[...candidates[s]!].join(', ')} (durable: ${durable[s]})`);
      }
      const w = await openVhdx(path, { readOnly: false }); // replays on disk
      await w.close();
      assert.match(qemuImg(['check', '-f', 'vhdx', path]), /No errors were found on the image/, where);
      const raw = join(dir, 'view.raw');
      qemuImg(['convert', '-f', 'vhdx', '-O', 'raw', path, raw]);
      const disk = readFileSync(raw);
      for (let s = 0; s < SLOTS; s++) {
        assert.equal(slotId(disk.subarray(s * SLOT, (s + 1) * SLOT), s), seen[s], `${where}: qemu reads slot ${s} differently after replay`);
      }
      state = seen as number[];
    }
    t.diagnostic(`${ROUNDS} rounds, ${totalOps} operations, log left dirty by the kill in ${dirtyRounds} rounds`);
    assert.ok(dirtyRounds > 0, 'at least one kill left a log to replay');
  } finally {
    cleanup();
  }
});
