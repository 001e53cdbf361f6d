// Seeded mutation fuzzing of the VHDX reader over real qemu-made images (dynamic, fixed, fixed with
// ZERO blocks, one with a dirty log) and a differencing child crafted over the dynamic one: headers,
// region tables, metadata, BAT, log, parent locator and sector bitmap mutated, checksums usually
// fixed so the deeper checks are reached, plus hand-written limit cases. Every case ends in a
// correct read or a typed ShieldError (vhdx_corrupt / vhdx_unsupported / vhdx_parent_invalid /
// invalid_argument): never another exception, never a hang (2 s per case), memory bounded.
// SHIELDLAB_FUZZ_SEED replays a run; SHIELDLAB_FUZZ_ROUNDS scales it; bench/vhdx-fuzz.ts runs long.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { tempDir } from '../helpers/home.ts';
import { qemuMissing } from '../helpers/qemu.ts';
import { makeSeeds, runFuzz } from '../helpers/vhdx-fuzz.ts';

const SEED = Number(process.env.SHIELDLAB_FUZZ_SEED ?? Date.now() % 1_000_000);
const ROUNDS = Number(process.env.SHIELDLAB_FUZZ_ROUNDS ?? 400);
const skip = qemuMissing() ?? false;

test(`VHDX reader survives mutated qemu-made images (seed ${SEED}, ${ROUNDS} rounds)`, { skip }, async (t) => {
  const { dir, cleanup } = tempDir('shieldlab-vhdx-fuzz-');
  t.after(cleanup);
  const seeds = makeSeeds(dir);
  const report = await runFuzz({ seeds, dir, seed: SEED, rounds: ROUNDS, caseTimeoutMs: 2000 });
  t.diagnostic(
    `${report.cases} cases (${report.targeted} targeted) in ${report.elapsedMs} ms, ${Math.round((report.cases * 1000) / Math.max(1, report.elapsedMs))}/s; ` +
      `outcomes ${JSON.stringify(report.outcomes)}; rss ${report.rssStartMb} → peak ${report.rssPeakMb} MB`,
  );
  t.diagnostic(`slowest: ${report.slowest.map((x) => `${x.ms} ms ${x.name}`).join(' | ')}`);
  t.diagnostic(`highest RSS after: ${report.hungriest.map((x) => `${x.rssMb} MB ${x.name}`).join(' | ')}`);
  const lines = report.failures.map((f) => `- ${f.name}\n    ${f.problem.split('\n').join('\n    ')}`);
  assert.equal(report.failures.length, 0, `${report.failures.length} failing cases (seed ${SEED}; replay with SHIELDLAB_FUZZ_SEED=${SEED}):\n${lines.join('\n')}`);
  assert.ok(report.cases >= ROUNDS, `only ${report.cases} cases ran`);
  assert.ok(report.rssPeakMb - report.rssStartMb < 300, `memory grew by ${report.rssPeakMb - report.rssStartMb} MB`);
});
