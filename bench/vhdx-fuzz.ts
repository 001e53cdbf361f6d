// VHDX reader fuzzing, the long run: the same engine as test/fuzz/vhdx.test.ts (mutated qemu-made
// images, targeted limit cases, one case per worker step with hang and memory watch), for a time
// budget instead of a round count. Reports cases tried, cases/second, outcomes, peak RSS and every
// failing case (the mutated images are kept in the printed folder).
//
//   node_modules/.bin/node bench/vhdx-fuzz.ts [--seconds N (60)] [--seed S] [--heavy] [--json]
//
// --heavy adds the 64 MiB log-scan case (minutes on a reader whose log scan is quadratic).
// Needs qemu-img/qemu-io (Debian: qemu-utils) for the seed images.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { qemuMissing } from '../test/helpers/qemu.ts';
import { makeSeeds, runFuzz } from '../test/helpers/vhdx-fuzz.ts';

const argv = process.argv.slice(2);
const opt = (name: string): string | undefined => {
  const i = argv.indexOf(name);
  return i >= 0 ? argv[i + 1] : undefined;
};
const json = argv.includes('--json');
const seconds = Number(opt('--seconds') ?? 60);
const seed = Number(opt('--seed') ?? Date.now() % 1_000_000);
if (!(seconds > 0) || !Number.isInteger(seed)) {
  process.stderr.write('usage: vhdx-fuzz.ts [--seconds N] [--seed S] [--heavy] [--json]\n');
  process.exit(2);
}
const missing = qemuMissing();
if (missing) {
  process.stderr.write(`vhdx-fuzz: ${missing}\n`);
  process.exit(2);
}

const dir = mkdtempSync(join(tmpdir(), 'shieldlab-vhdx-fuzz-bench-'));
let lastReport = Date.now();
const report = await runFuzz({ seeds: makeSeeds(dir), dir, seed, rounds: Number.MAX_SAFE_INTEGER, seconds, heavy: argv.includes('--heavy'), caseTimeoutMs: 2000 }, (n) => {
  if (!json && Date.now() - lastReport > 5000) {
    lastReport = Date.now();
    process.stderr.write(`  … ${n} cases\n`);
  }
});
const perSecond = Math.round((report.cases * 1000) / Math.max(1, report.elapsedMs));
const result = {
  seed,
  seconds: Math.round(report.elapsedMs / 100) / 10,
  cases: report.cases,
  targeted: report.targeted,
  casesPerSecond: perSecond,
  outcomes: report.outcomes,
  rssBaselineMb: report.rssStartMb,
  rssPeakMb: report.rssPeakMb,
  slowest: report.slowest,
  failures: report.failures,
  keptIn: report.failures.length > 0 ? dir : null,
};
if (json) process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
else {
  process.stdout.write(
    [
      `VHDX fuzz, seed ${seed}: ${report.cases} cases (${report.targeted} targeted) in ${result.seconds} s = ${perSecond} cases/s`,
      `outcomes: ${Object.entries(report.outcomes)
        .map(([k, v]) => `${k} ${v}`)
        .join(', ')}`,
      `RSS: ${report.rssStartMb} MB after the first case, peak ${report.rssPeakMb} MB`,
      `slowest: ${report.slowest.map((x) => `${x.ms} ms ${x.name}`).join('\n         ')}`,
      report.failures.length === 0 ? 'failures: none' : `failures (${report.failures.length}, images in ${dir}):\n${report.failures.map((f) => `  - ${f.name}\n      ${f.problem.split('\n').join('\n      ')}\n      ${f.file}`).join('\n')}`,
    ].join('\n') + '\n',
  );
}
if (report.failures.length === 0) rmSync(dir, { recursive: true, force: true });
process.exit(report.failures.length === 0 ? 0 : 1);
