// Seeded mutation fuzzing of the event-log parser, replay and explanations: bit flips, truncation,
// inserted and deleted bytes, and sizes and counts inflated where they sit. Every case parses or is
// ShieldError('eventlog_invalid') — never another exception, never a hang.
// SHIELDLAB_FUZZ_SEED replays a run; SHIELDLAB_FUZZ_ROUNDS scales it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { buildEventLog } from '../../core/attestation/eventlog-build.ts';
import { diffEventLogs, explainPcrMismatch } from '../../core/attestation/eventlog-diff.ts';
import { MAX_LOG_BYTES, PCR_COUNT, parseEventLog, replayEventLog, type EventLog } from '../../core/attestation/eventlog.ts';
import { ShieldError } from '../../core/errors.ts';
import { bootEvents } from '../helpers/eventlog.ts';
import { mutate, rng } from '../helpers/random.ts';

const SEED = Number(process.env.SHIELDLAB_FUZZ_SEED ?? Date.now() % 1_000_000);
const ROUNDS = Number(process.env.SHIELDLAB_FUZZ_ROUNDS ?? 1500);

const ALL_PCRS = Array.from({ length: PCR_COUNT }, (_, i) => i);

/** Parse, then everything that reads a parsed log. Returns the log, or null when it was refused. */
function exercise(bytes: Buffer, base: EventLog, what: string): EventLog | null {
  try {
    const log = parseEventLog(bytes);
    const pcrs = replayEventLog(log);
    diffEventLogs(base, log, { pcrs: ALL_PCRS });
    diffEventLogs(log, base, { pcrs: ALL_PCRS });
    explainPcrMismatch(log, replayEventLog(base));
    assert.ok(Object.keys(pcrs).length > 0, `${what}: a parsed log replays to at least one bank`);
    return log;
  } catch (err) {
    if (err instanceof assert.AssertionError) throw err;
    assert.ok(err instanceof ShieldError, `${what}: untyped ${String((err as Error)?.stack ?? err)} (seed ${SEED})`);
    assert.equal(err.code, 'eventlog_invalid', `${what}: ${err.message} (seed ${SEED})`);
    assert.match(err.message, /event \d+ at byte \d+/, `${what}: the message names the event and offset`);
    return null;
  }
}

/** Overwrites a size or count field of a random event with a hostile value. */
function inflate(good: Buffer, log: EventLog, r: () => number): Buffer {
  const out = Buffer.from(good);
  const hostile = [0xffffffff, 0x80000000, 0x01000001, 0x7fffffff, good.length, good.length - 1, 2, 0];
  const value = hostile[Math.floor(r() * hostile.length)]!;
  const e = log.events[Math.floor(r() * log.events.length)]!;
  const pick = Math.floor(r() * 4);
  if (log.format === 'sha1' || (e.index === 0 && pick < 2)) {
    out.writeUInt32LE(value, e.offset + 28); // eventDataSize
  } else if (e.index === 0) {
    out.writeUInt32LE(value, e.offset + 32 + 24); // numberOfAlgorithms
    if (pick === 3) out[e.offset + 32 + 28 + 4 * log.specId!.algorithms.length] = Math.floor(r() * 256); // vendorInfoSize
  } else if (pick === 0) {
    out.writeUInt32LE(value, e.offset + 8); // digest count
  } else if (pick === 1) {
    const digestBytes = log.specId!.algorithms.reduce((n, a) => n + 2 + a.digestSize, 0);
    out.writeUInt32LE(value, e.offset + 12 + digestBytes); // eventSize
  } else if (pick === 2) {
    out.writeUInt32LE(value % 64, e.offset); // pcrIndex
  } else if (e.data.length >= 32) {
    // The u64 lengths inside UEFI_VARIABLE_DATA (at 16, 24) and UEFI_IMAGE_LOAD_EVENT (at 8, 24).
    const dataAt = e.data.byteOffset - good.byteOffset;
    out.writeBigUInt64LE(BigInt(value) * (r() < 0.5 ? 1n : 0x100000001n), dataAt + [8, 16, 24][Math.floor(r() * 3)]!);
  }
  return out;
}

test(`event logs survive mutation (seed ${SEED})`, () => {
  const started = Date.now();
  const r = rng(SEED);
  const goods = [
    buildEventLog(bootEvents({ startupLocality: 3 }), { algs: ['sha1', 'sha256'] }),
    buildEventLog(bootEvents({ secureBoot: 0 }), { algs: ['sha256'] }),
    buildEventLog(bootEvents(), { algs: ['sha256', 'sha384', 'sha1'] }),
    buildEventLog(bootEvents(), { format: 'sha1' }),
  ];
  const bases = goods.map((g) => parseEventLog(g));
  let parsed = 0;
  let refused = 0;
  for (let i = 0; i < ROUNDS; i++) {
    const k = Math.floor(r() * goods.length);
    const good = goods[k]!;
    const base = bases[k]!;
    let bad = r() < 0.3 ? inflate(good, base, r) : mutate(good, r);
    if (r() < 0.2) bad = mutate(bad, r);
    const t0 = Date.now();
    if (exercise(bad, base, `round ${i} (log ${k})`) === null) refused++;
    else parsed++;
    assert.ok(Date.now() - t0 < 2000, `round ${i} took ${Date.now() - t0} ms (seed ${SEED})`);
  }
  // Pure garbage, and garbage behind a valid header.
  for (let i = 0; i < ROUNDS / 5; i++) {
    const noise = Buffer.from(Array.from({ length: Math.floor(r() * 512) }, () => Math.floor(r() * 256)));
    if (exercise(noise, bases[0]!, `noise ${i}`) === null) refused++;
    else parsed++;
    const headerEnd = bases[0]!.events[1]!.offset;
    if (exercise(Buffer.concat([goods[0]!.subarray(0, headerEnd), noise]), bases[0]!, `header + noise ${i}`) === null) refused++;
    else parsed++;
  }
  assert.ok(refused > 0 && parsed > 0, `both outcomes happen (parsed ${parsed}, refused ${refused})`);
  assert.ok(Date.now() - started < 10_000, `${ROUNDS} rounds took ${Date.now() - started} ms`);
});

test('size limits: an oversized log and an oversized event are refused before any work', () => {
  const huge = Buffer.alloc(MAX_LOG_BYTES + 1);
  assert.throws(() => parseEventLog(huge), (e: unknown) => e instanceof ShieldError && e.code === 'eventlog_invalid' && /more than/.test(e.message));
  const good = buildEventLog(bootEvents(), { algs: ['sha256'] });
  const log = parseEventLog(good);
  const e = log.events[3]!;
  const bad = Buffer.from(good);
  bad.writeUInt32LE(16 * 1024 * 1024 + 1, e.offset + 12 + 34);
  assert.throws(
    () => parseEventLog(bad),
    (err: unknown) => err instanceof ShieldError && err.code === 'eventlog_invalid' && err.message.includes(`event 3 at byte ${e.offset}: event data of`),
  );
  const count = Buffer.from(good);
  count.writeUInt32LE(2, e.offset + 8);
  assert.throws(() => parseEventLog(count), (err: unknown) => err instanceof ShieldError && /2 digests but the Spec ID event lists 1/.test(err.message));
});
