// Worker thread of the VHDX fuzzer (see runFuzz in vhdx-fuzz.ts): runs cases from `startAt` and
// reports each one, so the main thread can tell a blocked worker (a synchronous hang) from a slow
// one and continue in a fresh worker.
import { parentPort, workerData } from 'node:worker_threads';
import { closeSync, ftruncateSync, openSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { UntypedFailure, judge, loadSeeds, logScanBomb, randomCase, runCase, sparseCases, targetedCases, type FuzzCase, type WorkerInput, type WorkerMessage } from './vhdx-fuzz.ts';

const run = workerData as WorkerInput;
const port = parentPort!;
const post = (m: WorkerMessage) => port.postMessage(m);
const seeds = loadSeeds(run.seeds);
const timeout = run.caseTimeoutMs ?? 2000;
const file = join(run.dir, 'case.vhdx');

// The case file is rewritten only where it differs from the previous case (most cases change a few
// bytes of a 10–16 MiB image): 64 KiB chunks compared with memcmp.
let onDisk: Buffer | null = null;
function writeCase(bytes: Buffer): void {
  if (!onDisk) {
    writeFileSync(file, bytes);
    onDisk = Buffer.from(bytes);
    return;
  }
  const fd = openSync(file, 'r+');
  try {
    const CH = 64 * 1024;
    for (let o = 0; o < bytes.length; o += CH) {
      const a = bytes.subarray(o, o + CH);
      if (o + a.length <= onDisk.length && a.equals(onDisk.subarray(o, o + a.length))) continue;
      writeSync(fd, a, 0, a.length, o);
    }
    if (bytes.length !== onDisk.length) ftruncateSync(fd, bytes.length);
  } finally {
    closeSync(fd);
  }
  if (onDisk.length === bytes.length) bytes.copy(onDisk);
  else onDisk = Buffer.from(bytes);
}

function writeSparse(c: FuzzCase, path: string): void {
  const fd = openSync(path, 'w');
  try {
    writeSync(fd, c.bytes, 0, c.bytes.length, 0);
    for (const [at, part] of c.sparse!.parts) writeSync(fd, part, 0, part.length, at);
    ftruncateSync(fd, c.sparse!.size);
  } finally {
    closeSync(fd);
  }
}

async function one(index: number, c: FuzzCase): Promise<void> {
  if (c.sparse) {
    writeSparse(c, file);
    onDisk = null; // the next case rewrites the whole file
  } else writeCase(c.bytes);
  post({ type: 'start', index, name: c.name, file });
  const t0 = performance.now();
  let failure: string | null = null;
  let outcome = 'untyped';
  let timer: NodeJS.Timeout | undefined;
  let hung = false;
  try {
    const o = await Promise.race([
      runCase(file, c.expect === 'same' ? c.seed.raw : null),
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => {
          hung = true;
          reject(new UntypedFailure(`hang: no result after ${timeout} ms`));
        }, timeout);
      }),
    ]);
    outcome = o.ok ? 'ok' : o.code;
    failure = judge(c, o);
  } catch (err) {
    if (hung) outcome = 'hang';
    failure = hung ? (err as Error).message : err instanceof UntypedFailure ? `never another exception: ${err.message}` : `harness: ${String(err)}`;
  } finally {
    clearTimeout(timer);
  }
  const ms = performance.now() - t0;
  let kept = file;
  if (failure) {
    kept = join(run.dir, `failure-${index}.vhdx`);
    if (c.sparse) writeSparse(c, kept);
    else writeFileSync(kept, c.bytes);
  }
  post({ type: 'done', index, name: c.name, ms, rss: process.memoryUsage().rss, outcome, ...(failure ? { failure: { name: c.name, problem: failure, file: kept } } : {}) });
  // The timed-out case is still running here: leave, and let a fresh worker take the next case.
  if (hung) process.exit(0);
}

const targeted = run.targeted === false ? [] : targetedCases(seeds);
if (run.targeted !== false) {
  targeted.push(...sparseCases(seeds), () => logScanBomb(seeds[0]!, 4 * 1024 * 1024));
  if (run.heavy) targeted.push(() => logScanBomb(seeds[0]!, 64 * 1024 * 1024));
}
for (let i = run.startAt; i < targeted.length + run.rounds; i++) {
  if (i >= targeted.length && run.deadline !== null && Date.now() > run.deadline) break;
  await one(i, i < targeted.length ? targeted[i]!() : randomCase(seeds, run.seed, i - targeted.length));
}
post({ type: 'end', targeted: targeted.length });
