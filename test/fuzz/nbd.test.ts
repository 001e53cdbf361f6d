// Seeded fuzzing of the NBD server's protocol input. Seeds are real sessions: what qemu-io,
// qemu-img map, nbdinfo --json / --list and a scripted simple-reply client sent, recorded by a
// proxy in front of the server. Each case mutates one (random byte mutations, and targeted ones on
// the option and request headers: option ids and lengths, command types, flags, offsets, lengths,
// magics; splices of two sessions), sends it in random pieces to a live server (a sparse MapDisk
// or a RawFileDisk, in turn), half-closes, and reads whatever comes back. Every case must end with
// the server closing that connection within a few seconds (after the client's end, nothing may
// hang), no exception may escape, memory must stay bounded, and afterwards the server must still
// answer real clients with the right bytes.
// SHIELDLAB_FUZZ_SEED replays a run (the seeds are recorded afresh: qemu-io and nbdinfo send the
// same bytes every time); SHIELDLAB_FUZZ_ROUNDS scales it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { RawFileDisk, startNbdServer, type NbdEvent, type NbdServer } from '../../core/nbd/mod.ts';
import { tempDir } from '../helpers/home.ts';
import { MapDisk, nbdToolsMissing, qemuIoNbd, recordingProxy, tool, uriOf } from '../helpers/nbd.ts';
import { NBD, RawNbdClient } from '../helpers/nbd-client.ts';
import { mutate, rng } from '../helpers/random.ts';

const SEED = Number(process.env.SHIELDLAB_FUZZ_SEED ?? Date.now() % 1_000_000);
const ROUNDS = Number(process.env.SHIELDLAB_FUZZ_ROUNDS ?? 1000);
const skip = nbdToolsMissing() ?? false;
const MiB = 1024 * 1024;
const CONCURRENCY = 4;

/** Where headers start in a recorded client stream: the fields worth aiming at. */
function landmarks(session: Buffer): { options: number[]; requests: number[] } {
  const options: number[] = [];
  const requests: number[] = [];
  for (let at = 0; at + 16 <= session.length; at++) {
    if (session.readBigUInt64BE(at) === NBD.IHAVEOPT) options.push(at);
  }
  // Requests: a magic with a plausible command type after it (payload bytes rarely look like that).
  for (let at = 0; at + 28 <= session.length; at++) {
    if (session.readUInt32BE(at) === NBD.REQUEST_MAGIC && session.readUInt16BE(at + 6) <= 8) requests.push(at);
  }
  return { options, requests };
}

const INTERESTING32 = [0, 1, 2, 511, 512, 4096, 0x7fffffff, 0x80000000, 0xfffffffe, 0xffffffff, 32 * MiB, 32 * MiB + 1, 64 * 1024 + 1];
const INTERESTING64 = [0n, 1n, 511n, 4n * BigInt(MiB) - 512n, 4n * BigInt(MiB), 8n * BigInt(MiB), 2n ** 53n, 2n ** 63n, 2n ** 64n - 1n];

/** One targeted mutation of a header field, or a generic one. Returns the new stream and what was done. */
function mutateNbd(seed: Buffer, other: Buffer, r: () => number): { bytes: Buffer; what: string } {
  const pick = (xs: readonly number[]) => xs[Math.floor(r() * xs.length)]!;
  const { options, requests } = landmarks(seed);
  const out = Buffer.from(seed);
  const roll = r();
  if (roll < 0.3 && requests.length > 0) {
    const at = pick(requests);
    const field = Math.floor(r() * 6);
    if (field === 0) out.writeUInt32BE(r() < 0.5 ? 0x21e41c71 : Math.floor(r() * 2 ** 32), at);
    else if (field === 1) out.writeUInt16BE(r() < 0.5 ? 1 << Math.floor(r() * 16) : Math.floor(r() * 65536), at + 4);
    else if (field === 2) out.writeUInt16BE(r() < 0.7 ? Math.floor(r() * 12) : Math.floor(r() * 65536), at + 6);
    else if (field === 3) out.writeBigUInt64BE(INTERESTING64[Math.floor(r() * INTERESTING64.length)]!, at + 16);
    else if (field === 4) out.writeUInt32BE(pick(INTERESTING32), at + 24);
    else out.writeBigUInt64BE(BigInt(Math.floor(r() * 2 ** 32)), at + 8); // cookie
    return { bytes: out, what: `request@${at} field ${field}` };
  }
  if (roll < 0.5 && options.length > 0) {
    const at = pick(options);
    const field = Math.floor(r() * 3);
    if (field === 0) out.writeUInt32BE(r() < 0.7 ? Math.floor(r() * 14) : Math.floor(r() * 2 ** 32), at + 8);
    else if (field === 1) out.writeUInt32BE(pick(INTERESTING32), at + 12);
    else if (at + 20 <= out.length) out.writeUInt32BE(pick(INTERESTING32), at + 16); // first field of the option data (a name or query length)
    return { bytes: out, what: `option@${at} field ${field}` };
  }
  if (roll < 0.55) {
    // The client flags (bytes 0..3).
    if (out.length >= 4) out.writeUInt32BE(r() < 0.5 ? Math.floor(r() * 8) : Math.floor(r() * 2 ** 32), 0);
    return { bytes: out, what: 'client flags' };
  }
  if (roll < 0.65) {
    const a = Math.floor(r() * seed.length);
    const b = Math.floor(r() * other.length);
    return { bytes: Buffer.concat([seed.subarray(0, a), other.subarray(b)]), what: `splice ${a}/${b}` };
  }
  if (roll < 0.7) {
    // A piece repeated many times (a flood of requests or options).
    const a = Math.floor(r() * seed.length);
    const piece = seed.subarray(a, a + 28 + Math.floor(r() * 200));
    return { bytes: Buffer.concat([seed.subarray(0, a), ...Array.from({ length: 2 + Math.floor(r() * 200) }, () => piece), seed.subarray(a)]), what: `repeat@${a}` };
  }
  let bytes: Buffer = out;
  const n = 1 + Math.floor(r() * 3);
  for (let i = 0; i < n; i++) bytes = mutate(bytes, r);
  return { bytes, what: `random x${n}` };
}

/** Sends bytes in random pieces, half-closes, drains replies; resolves with how the connection ended. */
function runCase(socketPath: string, bytes: Buffer, r: () => number, timeoutMs: number): Promise<{ closed: boolean; received: number; ms: number }> {
  return new Promise((resolve) => {
    const t0 = Date.now();
    let received = 0;
    let done = false;
    const s = connect(socketPath);
    const finish = (closed: boolean) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      s.destroy();
      resolve({ closed, received, ms: Date.now() - t0 });
    };
    const timer = setTimeout(() => finish(false), timeoutMs);
    s.on('data', (d: Buffer) => (received += d.length));
    s.on('error', () => undefined);
    s.on('close', () => finish(true));
    s.on('connect', async () => {
      let at = 0;
      while (at < bytes.length && !s.destroyed) {
        const n = 1 + Math.floor(r() * (r() < 0.2 ? 16 : 16384));
        s.write(bytes.subarray(at, at + n));
        at += n;
        if (r() < 0.05) await new Promise((res) => setImmediate(res));
      }
      if (!s.destroyed) s.end();
    });
  });
}

/** Real sessions, recorded through a proxy in front of `server`. */
async function recordSeeds(server: NbdServer, dir: string): Promise<{ name: string; bytes: Buffer }[]> {
  const proxy = await recordingProxy(server.socketPath, join(dir, 'proxy.sock'));
  const names: string[] = [];
  try {
    const uri = uriOf(proxy.path);
    await qemuIoNbd(uri, ['write -P 0x5a 4096 8192', 'write -f -P 0x11 0 512', 'write -z 65536 65536', 'discard 131072 65536', 'read -P 0x5a 4096 8192', 'flush']);
    names.push('qemu-io');
    await tool('qemu-img', ['map', '--output=json', '-f', 'raw', uri]);
    names.push('qemu-img map');
    await tool('nbdinfo', ['--json', uri]);
    names.push('nbdinfo --json');
    await tool('nbdinfo', ['--list', uri]);
    names.push('nbdinfo --list');
    await tool('nbdinfo', ['--map', uri]);
    names.push('nbdinfo --map');
    // A client without structured replies, going in through EXPORT_NAME, with DF and REQ_ONE elsewhere.
    const c = await RawNbdClient.connect(proxy.path);
    await c.greeting();
    c.sendClientFlags(1);
    c.sendOption(NBD.OPT.EXPORT_NAME);
    await c.readExact(134);
    await c.read(0, 4096);
    await c.write(512, Buffer.alloc(1024, 7));
    c.request(NBD.CMD.TRIM, { offset: 0, length: 4096 });
    await c.reply();
    c.disconnect();
    await c.waitClosed();
    names.push('simple client');
    const d = await RawNbdClient.connect(proxy.path);
    await d.handshake();
    await d.read(0, 65536, NBD.FLAG.DF);
    await d.blockStatus(0, 4 * MiB, NBD.FLAG.REQ_ONE);
    d.request(NBD.CMD.WRITE_ZEROES, { offset: 0, length: 4096, flags: NBD.FLAG.FAST_ZERO | NBD.FLAG.NO_HOLE });
    await d.reply();
    d.disconnect();
    await d.waitClosed();
    names.push('structured client');
  } finally {
    await proxy.close();
  }
  // One connection per tool run, except nbdinfo --list (one connection) — pair them by order.
  const sessions = proxy.sessions.map((s) => Buffer.concat(s)).filter((b) => b.length > 0);
  return sessions.map((bytes, i) => ({ name: `${names[Math.min(i, names.length - 1)] ?? 'session'}#${i}`, bytes }));
}

test(`NBD server survives mutated client sessions (seed ${SEED}, ${ROUNDS} rounds)`, { skip }, async (t) => {
  const { dir, cleanup } = tempDir('shieldlab-nbd-fuzz-');
  let errorsLogged = 0;
  // Errors that are the server's own fault, not the input's: a request failing inside the server
  // or the disk (not refused by validation), or a parser exception.
  const bugs: NbdEvent[] = [];
  const log = (e: NbdEvent) => {
    if (e.event === 'protocol_error' || e.event === 'request_error') errorsLogged++;
    if ((e.event === 'request_error' && e.code !== 'refused') || (e.event === 'protocol_error' && /internal error/.test(e.reason))) {
      if (bugs.length < 20) bugs.push(e);
    }
  };
  const map = new MapDisk(4 * MiB);
  const rawPath = join(dir, 'fuzz.raw');
  writeFileSync(rawPath, Buffer.alloc(4 * MiB, 0x42));
  const raw = await RawFileDisk.open(rawPath);
  const servers = [
    await startNbdServer({ disk: map, log, handshakeTimeoutMs: 3000 }),
    await startNbdServer({ disk: raw, log, handshakeTimeoutMs: 3000, exportName: 'raw' }),
  ];
  t.after(async () => {
    for (const s of servers) await s.close();
    await raw.close();
    cleanup();
  });

  const seeds = await recordSeeds(servers[0]!, dir);
  assert.ok(seeds.length >= 6, `recorded ${seeds.length} sessions`);
  const rss0 = process.memoryUsage().rss;
  let rssPeak = rss0;
  const failures: string[] = [];
  const outcomes = { closedBy: 0, slowest: 0, receivedBytes: 0 };
  const t0 = Date.now();
  let next = 0;
  const worker = async () => {
    while (next < ROUNDS && failures.length < 5) {
      const i = next++;
      // Each case has its own generator: a case replays the same whatever the interleaving.
      const r = rng((SEED * 1_000_003 + i) >>> 0);
      const seed = seeds[Math.floor(r() * seeds.length)]!;
      const other = seeds[Math.floor(r() * seeds.length)]!;
      const { bytes, what } = mutateNbd(seed.bytes, other.bytes, r);
      const server = servers[i % servers.length]!;
      const res = await runCase(server.socketPath, bytes, r, 8000);
      outcomes.closedBy += res.closed ? 1 : 0;
      outcomes.slowest = Math.max(outcomes.slowest, res.ms);
      outcomes.receivedBytes += res.received;
      if (!res.closed) failures.push(`case ${i} (${seed.name}, ${what}, ${bytes.length} bytes): the server did not close the connection within 8 s of the client's end`);
      if (i % 10 === 0) rssPeak = Math.max(rssPeak, process.memoryUsage().rss);
    }
  };
  await Promise.all(Array.from({ length: CONCURRENCY }, worker));
  const elapsed = Date.now() - t0;
  t.diagnostic(
    `${ROUNDS} cases in ${elapsed} ms over ${seeds.length} recorded sessions (${seeds.map((s) => `${s.name} ${s.bytes.length} B`).join(', ')}); ` +
      `${errorsLogged} protocol/request errors logged; slowest ${outcomes.slowest} ms; ${(outcomes.receivedBytes / MiB).toFixed(1)} MiB of replies; ` +
      `rss ${(rss0 / MiB).toFixed(0)} → peak ${(rssPeak / MiB).toFixed(0)} MB`,
  );
  assert.deepEqual(failures, [], `seed ${SEED}; replay with SHIELDLAB_FUZZ_SEED=${SEED}`);
  assert.deepEqual(bugs, [], `seed ${SEED}: errors that are not the input's fault`);
  assert.ok(errorsLogged > 0, 'the fuzzer reached the error paths');
  assert.ok((rssPeak - rss0) / MiB < 300, `memory grew by ${((rssPeak - rss0) / MiB).toFixed(0)} MB`);

  // Still up: both servers answer real clients correctly, and no connection was left behind.
  for (let i = 0; i < 50 && servers.some((s) => s.connections > 0); i++) await new Promise((res) => setTimeout(res, 20));
  assert.deepEqual(servers.map((s) => s.connections), [0, 0]);
  await qemuIoNbd(uriOf(servers[0]!.socketPath), ['write -P 0x6b 0 65536', 'read -P 0x6b 0 65536']);
  assert.ok(map.bytes.subarray(0, 65536).every((b) => b === 0x6b));
  await qemuIoNbd(uriOf(servers[1]!.socketPath, 'raw'), ['write -P 0x6c 1048576 4096', 'read -P 0x6c 1048576 4096']);
  const info = JSON.parse(await tool('nbdinfo', ['--json', uriOf(servers[1]!.socketPath, 'raw')])) as { exports: { 'export-size': number }[] };
  assert.equal(info.exports[0]!['export-size'], 4 * MiB);
});
