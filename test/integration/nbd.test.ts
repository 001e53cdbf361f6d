// The NBD server (core/nbd) judged by real clients: qemu-img (info, convert, compare, map),
// qemu-io (pattern writes with FUA, write -z, discard, read -P) and libnbd's nbdinfo and nbdcopy,
// all over nbd+unix://, with byte-for-byte comparisons against the backing file. A literal test
// client (test/helpers/nbd-client.ts) checks what the real ones do not show: chunk types, holes,
// DF, REQ_ONE, error codes, many requests in flight; and sends hostile input, each of which must
// close (or error) only that connection, with a logged reason, while another client keeps working
// and the server keeps accepting. The socket's placement rules (0600 socket, 0700 private folder,
// refusals) are checked on the file system.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { chmodSync, existsSync, lstatSync, mkdirSync, readdirSync, readFileSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { dirname, join } from 'node:path';
import { ShieldError } from '../../core/errors.ts';
import { RawFileDisk, startNbdServer, type NbdDisk, type NbdEvent, type NbdServer } from '../../core/nbd/mod.ts';
import { tempDir } from '../helpers/home.ts';
import { NBD, RawNbdClient } from '../helpers/nbd-client.ts';
import { MapDisk, nbdToolsMissing, qemuIoNbd, runTool, tool, uriOf } from '../helpers/nbd.ts';

const skip = nbdToolsMissing() ?? false;
const MiB = 1024 * 1024;
const KiB = 1024;

const { dir, cleanup } = tempDir('shieldlab-nbd-test-');

/** A server with its log kept for assertions. */
async function serve(disk: NbdDisk, opts: Partial<Parameters<typeof startNbdServer>[0]> = {}): Promise<{ server: NbdServer; events: NbdEvent[] }> {
  const events: NbdEvent[] = [];
  const server = await startNbdServer({ disk, log: (e) => events.push(e), ...opts });
  return { server, events };
}

function rawFile(name: string, size: number, fill: 'random' | 'zero' = 'random'): string {
  const p = join(dir, name);
  writeFileSync(p, fill === 'random' ? randomBytes(size) : Buffer.alloc(size));
  return p;
}

async function expectCode(p: Promise<unknown>, code: string): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof ShieldError, `not a ShieldError: ${String(err)}`);
    assert.equal(err.code, code, err.message);
    return true;
  });
}

const protocolErrors = (events: NbdEvent[]) => events.filter((e): e is Extract<NbdEvent, { event: 'protocol_error' }> => e.event === 'protocol_error');

// ---- one shared server over a raw file, for the real-client tests --------------------------------

const SIZE = 16 * MiB;
let file = '';
let disk: RawFileDisk;
let shared: { server: NbdServer; events: NbdEvent[] };

before(async () => {
  if (skip) return;
  file = rawFile('disk.raw', SIZE);
  disk = await RawFileDisk.open(file);
  shared = await serve(disk, { exportName: 'disk', description: 'ShieldLab test disk' });
});

after(async () => {
  if (!skip) {
    await shared.server.close();
    await disk.close();
  }
  cleanup();
});

test('the socket is 0600 in a private 0700 folder, removed on close', { skip }, async () => {
  const sock = shared.server.socketPath;
  assert.equal(lstatSync(sock).mode & 0o777, 0o600);
  assert.ok(lstatSync(sock).isSocket());
  assert.equal(statSync(dirname(sock)).mode & 0o777, 0o700);
  const d = new MapDisk(MiB);
  const { server } = await serve(d);
  const folder = dirname(server.socketPath);
  assert.ok(existsSync(server.socketPath));
  await server.close();
  assert.equal(existsSync(folder), false, 'private folder removed');
});

test('qemu-img and nbdinfo see the export: size, flags, block sizes, base:allocation, default name', { skip }, async () => {
  const sock = shared.server.socketPath;
  for (const name of ['', 'disk']) {
    const info = JSON.parse(await tool('qemu-img', ['info', '--output=json', '-f', 'raw', uriOf(sock, name)])) as { 'virtual-size': number };
    assert.equal(info['virtual-size'], SIZE);
  }
  const ni = JSON.parse(await tool('nbdinfo', ['--json', uriOf(sock, 'disk')])) as { protocol: string; structured: boolean; exports: Record<string, unknown>[] };
  assert.equal(ni.protocol, 'newstyle-fixed');
  assert.equal(ni.structured, true);
  const e = ni.exports[0]!;
  assert.equal(e['export-name'], 'disk');
  assert.equal(e.description, 'ShieldLab test disk');
  assert.equal(e['export-size'], SIZE);
  assert.deepEqual(e.contexts, ['base:allocation']);
  for (const k of ['can_flush', 'can_fua', 'can_trim', 'can_zero', 'can_df', 'can_multi_conn', 'can_fast_zero']) assert.equal(e[k], true, k);
  assert.equal(e.is_read_only, false);
  assert.equal(e.block_size_minimum, 512);
  assert.equal(e.block_size_preferred, 4096);
  assert.equal(e.block_size_maximum, 32 * MiB);
  const list = await tool('nbdinfo', ['--list', uriOf(sock)]);
  assert.match(list, /export="disk":/);
  assert.match(list, /description: ShieldLab test disk/);
  // A wrong export name is refused (NBD_REP_ERR_UNKNOWN), not served.
  const wrong = await runTool('qemu-img', ['info', '-f', 'raw', uriOf(sock, 'other')]);
  assert.notEqual(wrong.code, 0);
});

test('qemu-io writes (patterns, FUA, write -z, discard) land byte for byte in the backing file', { skip }, async () => {
  const uri = uriOf(shared.server.socketPath, 'disk');
  const mirror = Buffer.from(readFileSync(file));
  const cmds: string[] = [];
  const w = (byte: number, off: number, len: number, fua = false) => {
    cmds.push(`write ${fua ? '-f ' : ''}-P 0x${byte.toString(16)} ${off} ${len}`);
    mirror.fill(byte, off, off + len);
  };
  w(0xa1, 0, 64 * KiB);
  w(0xb2, MiB + 512, 3 * KiB + 512, true);
  w(0xc3, SIZE - 4 * KiB, 4 * KiB, true);
  w(0xd4, 5 * MiB, 2 * MiB); // bigger than one socket chunk: assembled from pieces
  cmds.push(`write -z ${3 * MiB} ${MiB}`);
  mirror.fill(0, 3 * MiB, 4 * MiB);
  cmds.push(`write -z -f ${9 * MiB + 512} 1024`);
  mirror.fill(0, 9 * MiB + 512, 9 * MiB + 1536);
  cmds.push(`discard ${12 * MiB} ${MiB}`); // RawFileDisk: trim writes zeros
  mirror.fill(0, 12 * MiB, 13 * MiB);
  cmds.push('flush');
  cmds.push(`read -P 0xa1 0 ${64 * KiB}`, `read -P 0xb2 ${MiB + 512} ${3 * KiB + 512}`, `read -P 0 ${3 * MiB} ${MiB}`, `read -P 0xd4 ${5 * MiB} ${2 * MiB}`, `read -P 0 ${12 * MiB} ${MiB}`);
  await qemuIoNbd(uri, cmds);
  assert.ok(readFileSync(file).equals(mirror), 'backing file equals the expected bytes');
  // Unaligned I/O from qemu-io: qemu aligns to the advertised 512-byte minimum (read-modify-write).
  await qemuIoNbd(uri, [`write -P 0x5e ${7 * MiB + 100} 300`, `read -P 0x5e ${7 * MiB + 100} 300`]);
  mirror.fill(0x5e, 7 * MiB + 100, 7 * MiB + 400);
  assert.ok(readFileSync(file).equals(mirror));
  const cmp = await runTool('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uri, file]);
  assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
  const requestErrors = shared.events.filter((e) => e.event === 'request_error');
  assert.deepEqual(requestErrors, [], 'no request failed');
});

test('qemu-img convert/map and nbdcopy in both directions match the backing file', { skip }, async () => {
  const uri = uriOf(shared.server.socketPath);
  const out = join(dir, 'convert.raw');
  await tool('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, out]);
  assert.ok(readFileSync(out).equals(readFileSync(file)), 'qemu-img convert');
  const map = JSON.parse(await tool('qemu-img', ['map', '--output=json', '-f', 'raw', uri])) as { start: number; length: number; data: boolean; zero: boolean }[];
  assert.deepEqual(
    map.map((m) => [m.start, m.length, m.data, m.zero]),
    [[0, SIZE, true, false]],
    'a raw file reports everything as data',
  );
  const copied = join(dir, 'nbdcopy-out.raw');
  await tool('nbdcopy', [uri, copied]);
  assert.ok(readFileSync(copied).equals(readFileSync(file)), 'nbdcopy from the server');
  const source = rawFile('nbdcopy-in.raw', SIZE);
  await tool('nbdcopy', [source, uri]);
  assert.ok(readFileSync(file).equals(readFileSync(source)), 'nbdcopy to the server');
  const map2 = await tool('nbdinfo', ['--map', uri]);
  assert.match(map2, new RegExp(`^\\s*0\\s+${SIZE}\\s+0\\s+data`, 'm'));
});

test('RawFileDisk with inlineIo serves the same bytes (qemu-io, nbdcopy)', { skip }, async () => {
  const path = rawFile('inline.raw', 4 * MiB);
  const d = await RawFileDisk.open(path, { inlineIo: true });
  const { server } = await serve(d);
  try {
    const uri = uriOf(server.socketPath);
    const mirror = Buffer.from(readFileSync(path));
    await qemuIoNbd(uri, ['write -P 0x3c 4096 4096', `write -f -P 0x4d ${MiB} ${256 * KiB}`, 'write -z 8192 8192', 'read -P 0x3c 4096 4096', `read -P 0x4d ${MiB} ${256 * KiB}`]);
    mirror.fill(0x3c, 4096, 8192);
    mirror.fill(0x4d, MiB, MiB + 256 * KiB);
    mirror.fill(0, 8192, 16384);
    assert.ok(readFileSync(path).equals(mirror));
    const out = join(dir, 'inline-copy.raw');
    await tool('nbdcopy', [uri, out]);
    assert.ok(readFileSync(out).equals(mirror));
  } finally {
    await server.close();
    await d.close();
  }
});

test('two real clients at once, plus many requests in flight on one connection', { skip }, async () => {
  const uri = uriOf(shared.server.socketPath, 'disk');
  const before = Buffer.from(readFileSync(file));
  const copy = join(dir, 'concurrent-copy.raw');
  // qemu-io writes the first half while nbdcopy reads the second half's bytes… and the whole disk.
  const [io] = await Promise.all([
    qemuIoNbd(uri, Array.from({ length: 8 }, (_, i) => `write -P 0x${(0x30 + i).toString(16)} ${i * MiB} ${MiB}`)),
    tool('nbdcopy', ['--requests=16', '--connections=2', uri, copy]),
    qemuIoNbd(uri, [`read -P ${before[9 * MiB]} ${9 * MiB} 1`]),
  ]);
  assert.match(io, /wrote/);
  const now = readFileSync(file);
  for (let i = 0; i < 8; i++) assert.ok(now.subarray(i * MiB, (i + 1) * MiB).every((b) => b === 0x30 + i));
  assert.ok(now.subarray(8 * MiB).equals(before.subarray(8 * MiB)), 'the other half is untouched');
  assert.ok(readFileSync(copy).subarray(8 * MiB).equals(before.subarray(8 * MiB)), 'nbdcopy read the untouched half correctly');
  // 64 reads and writes in flight at once on one connection: every reply arrives, cookies match.
  const c = await RawNbdClient.connect(shared.server.socketPath);
  await c.handshake();
  const expected = new Map<bigint, Buffer>();
  for (let i = 0; i < 32; i++) {
    const data = randomBytes(4096 * (1 + (i % 5)));
    const offset = 10 * MiB + i * 32 * KiB;
    c.request(NBD.CMD.WRITE, { offset, data, cookie: BigInt(1000 + i) });
    expected.set(BigInt(1000 + i), data);
  }
  const writes = [];
  for (let i = 0; i < 32; i++) writes.push(await c.reply());
  assert.deepEqual(new Set(writes.map((r) => r.cookie)), new Set(expected.keys()));
  assert.ok(writes.every((r) => r.error === 0));
  c.request(NBD.CMD.FLUSH);
  assert.equal((await c.reply()).error, 0);
  const cookies = [...expected.keys()];
  for (const [i, k] of cookies.entries()) c.request(NBD.CMD.READ, { offset: 10 * MiB + i * 32 * KiB, length: expected.get(k)!.length, cookie: k + 5000n });
  for (let i = 0; i < cookies.length; i++) {
    const r = await c.reply();
    assert.equal(r.error, 0);
    assert.ok(r.data.equals(expected.get(r.cookie - 5000n)!), `read ${r.cookie}`);
  }
  c.disconnect();
  assert.ok(await c.waitClosed());
});

test('holes: unallocated and zero blocks are holes in BLOCK_STATUS and OFFSET_HOLE in reads', { skip }, async () => {
  const d = new MapDisk(8 * MiB);
  const { server } = await serve(d);
  try {
    const uri = uriOf(server.socketPath);
    await qemuIoNbd(uri, [`write -P 0x11 0 ${MiB}`, `write -P 0x22 ${4 * MiB} ${256 * KiB}`, `write -z -u ${4 * MiB} ${128 * KiB}`, `write -P 0x33 ${6 * MiB} 4096`, `discard ${6 * MiB} ${64 * KiB}`]);
    assert.deepEqual(d.states.slice(64, 68), ['zero', 'zero', 'data', 'data']);
    assert.equal(d.states[96], 'unallocated');
    const map = JSON.parse(await tool('qemu-img', ['map', '--output=json', '-f', 'raw', uri])) as { start: number; length: number; data: boolean; zero: boolean }[];
    assert.deepEqual(
      map.map((m) => [m.start, m.length, m.data, m.zero]),
      [
        [0, MiB, true, false],
        [MiB, 3 * MiB + 128 * KiB, false, true], // unallocated, then the ZERO blocks of write -z: one hole
        [4 * MiB + 128 * KiB, 128 * KiB, true, false],
        [4 * MiB + 256 * KiB, 4 * MiB - 256 * KiB, false, true],
      ],
    );
    const nmap = await tool('nbdinfo', ['--map', uri]);
    assert.match(nmap, new RegExp(`^\\s*${MiB}\\s+${3 * MiB + 128 * KiB}\\s+3\\s+hole,zero`, 'm'));
    assert.match(nmap, new RegExp(`^\\s*${4 * MiB + 128 * KiB}\\s+${128 * KiB}\\s+0\\s+data`, 'm'));
    const converted = join(dir, 'map-convert.raw');
    await tool('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, converted]);
    assert.ok(readFileSync(converted).equals(d.bytes));

    const c = await RawNbdClient.connect(server.socketPath);
    const n = await c.handshake();
    assert.equal(n.contextId, 1);
    // All hole: one OFFSET_HOLE chunk, no data on the wire.
    let r = await c.read(2 * MiB, MiB);
    assert.deepEqual(r.chunks.map((x) => x.type), [NBD.CHUNK.OFFSET_HOLE]);
    assert.ok(r.data.equals(Buffer.alloc(MiB)));
    // Mixed: data + hole chunks, DONE on the last; with DF one data chunk.
    r = await c.read(MiB - 4096, 8192);
    assert.deepEqual(r.chunks.map((x) => x.type), [NBD.CHUNK.OFFSET_DATA, NBD.CHUNK.OFFSET_HOLE]);
    assert.deepEqual(r.chunks.map((x) => x.flags), [0, 1]);
    assert.ok(r.data.equals(d.bytes.subarray(MiB - 4096, MiB + 4096)));
    r = await c.read(MiB - 4096, 8192, NBD.FLAG.DF);
    assert.deepEqual(r.chunks.map((x) => x.type), [NBD.CHUNK.OFFSET_DATA]);
    assert.ok(r.data.equals(d.bytes.subarray(MiB - 4096, MiB + 4096)));
    // BLOCK_STATUS: extents merged and clipped; REQ_ONE gives exactly one.
    let bs = await c.blockStatus(0, 8 * MiB);
    assert.equal(bs.contextId, 1);
    assert.deepEqual(bs.extents.slice(0, 3), [
      { length: MiB, flags: 0 },
      { length: 3 * MiB + 128 * KiB, flags: 3 },
      { length: 128 * KiB, flags: 0 },
    ]);
    assert.equal(bs.extents.reduce((a, e) => a + e.length, 0), 8 * MiB);
    bs = await c.blockStatus(512, 4 * MiB, NBD.FLAG.REQ_ONE);
    assert.deepEqual(bs.extents, [{ length: MiB - 512, flags: 0 }]);
    bs = await c.blockStatus(MiB, 1000);
    assert.deepEqual(bs.extents, [{ length: 1000, flags: 3 }]);
    // Whatever the disk says is passed on: zero but allocated (flags 2) still reads as a hole chunk;
    // extents beyond the request are clipped, a short answer for a read is completed with data.
    const real = d.blockStatus.bind(d);
    d.blockStatus = async (offset, length) => [{ length: length + 4096, hole: false, zero: true }];
    bs = await c.blockStatus(0, 8192);
    assert.deepEqual(bs.extents, [{ length: 8192, flags: 2 }]);
    r = await c.read(0, 8192);
    assert.deepEqual(r.chunks.map((x) => x.type), [NBD.CHUNK.OFFSET_HOLE]);
    d.blockStatus = async () => [{ length: 4096, hole: true, zero: true }];
    r = await c.read(4096, 8192);
    assert.deepEqual(r.chunks.map((x) => x.type), [NBD.CHUNK.OFFSET_HOLE, NBD.CHUNK.OFFSET_DATA]);
    assert.ok(r.data.equals(Buffer.concat([Buffer.alloc(4096), d.bytes.subarray(8192, 12288)])));
    d.blockStatus = real;
    // FAST_ZERO: whole blocks are fast here; a partial block is not → ENOTSUP, nothing written.
    c.request(NBD.CMD.WRITE_ZEROES, { offset: 0, length: 64 * KiB, flags: NBD.FLAG.FAST_ZERO });
    assert.equal((await c.reply()).error, 0);
    assert.equal(d.states[0], 'zero');
    c.request(NBD.CMD.WRITE_ZEROES, { offset: 64 * KiB, length: 4096, flags: NBD.FLAG.FAST_ZERO });
    assert.equal((await c.reply()).error, NBD.ERR.ENOTSUP);
    assert.equal(d.bytes[64 * KiB], 0x11);
    c.request(NBD.CMD.WRITE_ZEROES, { offset: 128 * KiB, length: 64 * KiB, flags: NBD.FLAG.NO_HOLE | NBD.FLAG.FUA });
    assert.equal((await c.reply()).error, 0);
    assert.equal(d.states[2], 'data');
    assert.ok(d.flushes > 0, 'FUA flushed');
    c.disconnect();
    assert.ok(await c.waitClosed());
  } finally {
    await server.close();
  }
});

test('handshake options: LIST, INFO, meta contexts, TLS and extended headers refused, EXPORT_NAME', { skip }, async () => {
  const sock = shared.server.socketPath;
  const c = await RawNbdClient.connect(sock);
  const hs = await c.greeting();
  assert.equal(hs, 3, 'FIXED_NEWSTYLE | NO_ZEROES');
  c.sendClientFlags(3);
  c.sendOption(NBD.OPT.LIST);
  let rs = await c.optionReplies();
  assert.deepEqual(rs.map((r) => r.type), [NBD.REP.SERVER, NBD.REP.ACK]);
  assert.equal(rs[0]!.data.toString('utf8', 4, 4 + rs[0]!.data.readUInt32BE(0)), 'disk');
  c.sendOption(NBD.OPT.LIST, Buffer.from('x'));
  assert.equal((await c.optionReply()).type, NBD.REP.ERR_INVALID);
  c.sendOption(NBD.OPT.STARTTLS);
  assert.equal((await c.optionReply()).type, NBD.REP.ERR_POLICY);
  c.sendOption(NBD.OPT.EXTENDED_HEADERS);
  assert.equal((await c.optionReply()).type, NBD.REP.ERR_UNSUP);
  c.sendOption(4242, Buffer.from('whatever'));
  assert.equal((await c.optionReply()).type, NBD.REP.ERR_UNSUP);
  c.sendOption(NBD.OPT.SET_META_CONTEXT, RawNbdClient.metaContextData('', ['base:allocation']));
  assert.equal((await c.optionReply()).type, NBD.REP.ERR_INVALID, 'meta contexts need structured replies first');
  c.sendOption(NBD.OPT.STRUCTURED_REPLY);
  assert.equal((await c.optionReply()).type, NBD.REP.ACK);
  c.sendOption(NBD.OPT.LIST_META_CONTEXT, RawNbdClient.metaContextData('disk', []));
  rs = await c.optionReplies();
  assert.deepEqual(rs.map((r) => r.type), [NBD.REP.META_CONTEXT, NBD.REP.ACK]);
  assert.equal(rs[0]!.data.toString('utf8', 4), 'base:allocation');
  c.sendOption(NBD.OPT.LIST_META_CONTEXT, RawNbdClient.metaContextData('disk', ['qemu:dirty-bitmap:x', 'x-foo:bar']));
  assert.deepEqual((await c.optionReplies()).map((r) => r.type), [NBD.REP.ACK], 'unknown namespaces are ignored');
  c.sendOption(NBD.OPT.SET_META_CONTEXT, RawNbdClient.metaContextData('nope', ['base:allocation']));
  assert.equal((await c.optionReply()).type, NBD.REP.ERR_UNKNOWN);
  c.sendOption(NBD.OPT.SET_META_CONTEXT, Buffer.concat([RawNbdClient.metaContextData('', ['base:allocation']), Buffer.from([1])]));
  assert.equal((await c.optionReply()).type, NBD.REP.ERR_INVALID, 'trailing bytes');
  c.sendOption(NBD.OPT.INFO, RawNbdClient.infoData('disk', [1, 2, 3]));
  rs = await c.optionReplies();
  const infos = new Map(rs.filter((r) => r.type === NBD.REP.INFO).map((r) => [r.data.readUInt16BE(0), r.data]));
  assert.equal(infos.get(1)!.toString('utf8', 2), 'disk');
  assert.equal(infos.get(2)!.toString('utf8', 2), 'ShieldLab test disk');
  assert.equal(Number(infos.get(0)!.readBigUInt64BE(2)), SIZE);
  assert.deepEqual([infos.get(3)!.readUInt32BE(2), infos.get(3)!.readUInt32BE(6), infos.get(3)!.readUInt32BE(10)], [512, 4096, 32 * MiB]);
  assert.equal(rs.at(-1)!.type, NBD.REP.ACK);
  c.sendOption(NBD.OPT.GO, RawNbdClient.infoData('nope', []));
  assert.equal((await c.optionReply()).type, NBD.REP.ERR_UNKNOWN);
  c.sendOption(NBD.OPT.GO, Buffer.from([0, 0, 0, 9, 1]));
  assert.equal((await c.optionReply()).type, NBD.REP.ERR_INVALID);
  // EXPORT_NAME with NO_ZEROES: size + flags, no padding, then transmission (simple replies only).
  c.sendOption(NBD.OPT.EXPORT_NAME, Buffer.from('disk'));
  const ex = await c.readExact(10);
  assert.equal(Number(ex.readBigUInt64BE(0)), SIZE);
  const flags = ex.readUInt16BE(8);
  assert.equal(flags & NBD.TX.SEND_DF, NBD.TX.SEND_DF, 'structured replies were negotiated before EXPORT_NAME');
  c.structured = true;
  const r = await c.read(0, 4096);
  assert.ok(r.data.equals(readFileSync(file).subarray(0, 4096)));
  c.disconnect();
  assert.ok(await c.waitClosed());

  // Without NO_ZEROES, EXPORT_NAME's reply carries 124 zero bytes; without structured replies, simple replies.
  const s = await RawNbdClient.connect(sock);
  await s.greeting();
  s.sendClientFlags(1);
  s.sendOption(NBD.OPT.EXPORT_NAME);
  const ex2 = await s.readExact(134);
  assert.ok(ex2.subarray(10).equals(Buffer.alloc(124)));
  assert.equal(ex2.readUInt16BE(8) & NBD.TX.SEND_DF, 0, 'no DF without structured replies');
  const simple = await s.read(8192, 1024);
  assert.equal(simple.simple, true);
  assert.ok(simple.data.equals(readFileSync(file).subarray(8192, 9216)));
  s.request(NBD.CMD.READ, { offset: SIZE, length: 512 });
  const err = await s.reply();
  assert.deepEqual([err.simple, err.error], [true, NBD.ERR.EINVAL]);
  s.request(NBD.CMD.BLOCK_STATUS, { offset: 0, length: 512 });
  assert.equal((await s.reply()).error, NBD.ERR.EINVAL, 'BLOCK_STATUS without a meta context');
  s.disconnect();
  assert.ok(await s.waitClosed());
  // ABORT is acknowledged, then the connection ends.
  const a = await RawNbdClient.connect(sock);
  await a.greeting();
  a.sendClientFlags(3);
  a.sendOption(NBD.OPT.ABORT);
  assert.equal((await a.optionReply()).type, NBD.REP.ACK);
  assert.ok(await a.waitClosed());
});

test('request errors: bounds, alignment, unknown command and flags, read-only; the connection stays usable', { skip }, async () => {
  const c = await RawNbdClient.connect(shared.server.socketPath);
  const n = await c.handshake();
  assert.equal(n.size, SIZE);
  const expectError = async (type: number, r: Parameters<RawNbdClient['request']>[1], errno: number) => {
    c.request(type, r);
    const reply = await c.reply();
    assert.equal(reply.error, errno, `${type} ${JSON.stringify({ ...r, data: r?.data?.length })}: ${reply.message}`);
    assert.ok(reply.chunks.length === 0 || reply.chunks.at(-1)!.type === NBD.CHUNK.ERROR);
    assert.ok(reply.message.length < 200);
  };
  await expectError(NBD.CMD.READ, { offset: SIZE - 512, length: 1024 }, NBD.ERR.EINVAL);
  await expectError(NBD.CMD.READ, { offset: 2 ** 62, length: 512 }, NBD.ERR.EINVAL);
  await expectError(NBD.CMD.WRITE, { offset: SIZE, data: Buffer.alloc(512) }, NBD.ERR.ENOSPC);
  await expectError(NBD.CMD.WRITE_ZEROES, { offset: SIZE - 512, length: 4096 }, NBD.ERR.ENOSPC);
  await expectError(NBD.CMD.READ, { offset: 100, length: 512 }, NBD.ERR.EINVAL);
  await expectError(NBD.CMD.WRITE, { offset: 512, data: Buffer.alloc(100) }, NBD.ERR.EINVAL);
  await expectError(NBD.CMD.READ, { offset: 0, length: 33 * MiB }, NBD.ERR.EINVAL);
  await expectError(99, { offset: 0, length: 512 }, NBD.ERR.EINVAL);
  await expectError(NBD.CMD.CACHE, { offset: 0, length: 512 }, NBD.ERR.EINVAL);
  await expectError(NBD.CMD.READ, { offset: 0, length: 512, flags: 0x80 }, NBD.ERR.EINVAL);
  await expectError(NBD.CMD.READ, { offset: 0, length: 512, flags: NBD.FLAG.FUA }, NBD.ERR.EINVAL);
  await expectError(NBD.CMD.WRITE, { offset: 0, data: Buffer.alloc(512), flags: NBD.FLAG.REQ_ONE }, NBD.ERR.EINVAL);
  await expectError(NBD.CMD.FLUSH, { offset: 512, length: 0 }, NBD.ERR.EINVAL);
  await expectError(NBD.CMD.BLOCK_STATUS, { offset: 0, length: 0 }, NBD.ERR.EINVAL);
  await expectError(NBD.CMD.WRITE_ZEROES, { offset: 0, length: 4096, flags: NBD.FLAG.FAST_ZERO }, NBD.ERR.ENOTSUP);
  // Still in sync after every refusal (the refused WRITEs' payloads were consumed).
  const r = await c.read(0, 4096);
  assert.equal(r.error, 0);
  assert.ok(r.data.equals(readFileSync(file).subarray(0, 4096)));
  c.disconnect();
  assert.ok(await c.waitClosed());

  // A read-only disk: READ_ONLY flag, writes refused with EPERM.
  const ro = await RawFileDisk.open(rawFile('ro.raw', MiB), { readOnly: true });
  const { server } = await serve(ro);
  try {
    const c2 = await RawNbdClient.connect(server.socketPath);
    const n2 = await c2.handshake();
    assert.equal(n2.flags & NBD.TX.READ_ONLY, NBD.TX.READ_ONLY);
    c2.request(NBD.CMD.WRITE, { offset: 0, data: Buffer.alloc(512) });
    assert.equal((await c2.reply()).error, NBD.ERR.EPERM);
    c2.request(NBD.CMD.TRIM, { offset: 0, length: 512 });
    assert.equal((await c2.reply()).error, NBD.ERR.EPERM);
    assert.equal((await c2.read(0, 512)).error, 0);
    c2.disconnect();
    const q = await runTool('qemu-io', ['-f', 'raw', '-c', 'write 0 512', uriOf(server.socketPath)]);
    assert.match(q.stdout + q.stderr, /read-only|Permission denied|not permitted|failed/i);
  } finally {
    await server.close();
    await ro.close();
  }
});

test('disk errors become NBD errors with a short text; the details stay in the log', { skip }, async () => {
  const d = new MapDisk(MiB);
  d.states.fill('data');
  d.read = async () => {
    throw new ShieldError('io_error', 'secret internal path /var/lib/x failed');
  };
  d.write = async () => {
    throw new ShieldError('disk_full', 'The disk is full.');
  };
  d.trim = async () => {
    throw new ShieldError('forbidden', 'The disk is read-only.');
  };
  d.flush = async () => {
    throw new Error('EBADF: something low-level');
  };
  const { server, events } = await serve(d);
  try {
    const c = await RawNbdClient.connect(server.socketPath);
    await c.handshake({ meta: false });
    const r = await c.read(0, 512);
    assert.equal(r.error, NBD.ERR.EIO);
    assert.equal(r.message, 'I/O error');
    assert.equal((await c.write(0, Buffer.alloc(512))).error, NBD.ERR.ENOSPC);
    c.request(NBD.CMD.TRIM, { offset: 0, length: 512 });
    assert.equal((await c.reply()).error, NBD.ERR.EPERM);
    c.request(NBD.CMD.FLUSH);
    const f = await c.reply();
    assert.deepEqual([f.error, f.message], [NBD.ERR.EIO, 'I/O error']);
    c.disconnect();
    assert.ok(await c.waitClosed());
    const logged = events.filter((e) => e.event === 'request_error');
    assert.ok(logged.some((e) => e.event === 'request_error' && e.code === 'io_error' && /secret internal path/.test(e.message)));
  } finally {
    await server.close();
  }
});

test('hostile input closes only that connection, with a logged reason; others carry on', { skip }, async () => {
  const d = new MapDisk(4 * MiB);
  d.bytes.fill(0x77);
  d.states.fill('data');
  const { server, events } = await serve(d, { maxOptions: 20, handshakeTimeoutMs: 400 });
  try {
    const bystander = await RawNbdClient.connect(server.socketPath);
    await bystander.handshake();
    const check = async (what: string) => {
      const r = await bystander.read(4096, 4096);
      assert.equal(r.error, 0, `bystander after ${what}`);
      assert.ok(r.data.every((b) => b === 0x77));
    };
    const hostile: { name: string; reason: RegExp; act: (c: RawNbdClient) => Promise<void> }[] = [
      { name: 'unknown client flags', reason: /unknown client flags/, act: async (c) => (await c.greeting(), c.sendClientFlags(0x80000003)) },
      {
        name: 'bad option magic',
        reason: /bad option magic/,
        act: async (c) => {
          await c.greeting();
          c.sendClientFlags(3);
          c.send(Buffer.from('NOTMAGIC\0\0\0\x07\0\0\0\0'));
        },
      },
      {
        name: 'huge option length',
        reason: /limit/,
        act: async (c) => {
          await c.greeting();
          c.sendClientFlags(3);
          c.sendOption(NBD.OPT.GO, Buffer.alloc(0), 0xfffffff0);
        },
      },
      {
        name: 'truncated handshake',
        reason: /truncated/,
        act: async (c) => {
          await c.greeting();
          c.sendClientFlags(3);
          c.send(Buffer.from('IHAVEOPT\0\0'));
          c.socket.end();
        },
      },
      {
        name: 'too many options',
        reason: /more than 20 options/,
        act: async (c) => {
          await c.greeting();
          c.sendClientFlags(3);
          for (let i = 0; i < 25; i++) c.sendOption(NBD.OPT.LIST);
        },
      },
      { name: 'handshake never finished', reason: /handshake not finished/, act: async (c) => void (await c.greeting()) },
      {
        name: 'unknown export via EXPORT_NAME',
        reason: /unknown export/,
        act: async (c) => {
          await c.greeting();
          c.sendClientFlags(3);
          c.sendOption(NBD.OPT.EXPORT_NAME, Buffer.from('nope'));
        },
      },
      {
        name: 'bad request magic',
        reason: /bad request magic/,
        act: async (c) => {
          await c.handshake();
          c.request(NBD.CMD.READ, { offset: 0, length: 512, magic: 0xdeadbeef });
        },
      },
      {
        name: 'write longer than the maximum payload',
        reason: /WRITE of 4294967295 bytes/,
        act: async (c) => {
          await c.handshake();
          c.request(NBD.CMD.WRITE, { offset: 0, length: 0xffffffff });
          c.send(Buffer.alloc(64 * KiB, 1));
        },
      },
      {
        name: 'truncated write payload',
        reason: /truncated write payload/,
        act: async (c) => {
          await c.handshake();
          c.request(NBD.CMD.WRITE, { offset: 0, length: 8192 });
          c.send(Buffer.alloc(100));
          c.socket.end();
        },
      },
      {
        name: 'garbage instead of a handshake',
        reason: /./,
        act: async (c) => {
          await c.greeting();
          c.send(randomBytes(4096));
        },
      },
    ];
    for (const h of hostile) {
      const before = protocolErrors(events).length;
      const c = await RawNbdClient.connect(server.socketPath);
      await h.act(c);
      assert.ok(await c.waitClosed(3000), `${h.name}: the server closed the connection`);
      const logged = protocolErrors(events).slice(before);
      assert.ok(logged.some((e) => h.reason.test(e.reason)), `${h.name}: logged reason, got ${JSON.stringify(logged)}`);
      await check(h.name);
    }
    // Requests beyond the end and unknown commands are errors, not disconnects.
    const c = await RawNbdClient.connect(server.socketPath);
    await c.handshake();
    c.request(NBD.CMD.READ, { offset: 4 * MiB, length: 4096 });
    assert.equal((await c.reply()).error, NBD.ERR.EINVAL);
    c.request(77, { offset: 0, length: 0 });
    assert.equal((await c.reply()).error, NBD.ERR.EINVAL);
    assert.equal(c.isClosed, false);
    // A flood of bad requests: answered, counted, but only the first 100 per connection are logged.
    for (let i = 0; i < 150; i++) c.request(77, { offset: 0, length: 0 });
    for (let i = 0; i < 150; i++) assert.equal((await c.reply()).error, NBD.ERR.EINVAL);
    const mine = events.filter((e) => 'conn' in e && e.conn === events.findLast((x) => x.event === 'ready')!.conn);
    assert.equal(mine.filter((e) => e.event === 'request_error').length, 100);
    assert.equal(mine.filter((e) => e.event === 'log_suppressed').length, 1);
    c.disconnect();
    // The server still accepts and serves real clients.
    const info = JSON.parse(await tool('qemu-img', ['info', '--output=json', '-f', 'raw', uriOf(server.socketPath)])) as { 'virtual-size': number };
    assert.equal(info['virtual-size'], 4 * MiB);
    await qemuIoNbd(uriOf(server.socketPath), ['read -P 0x77 0 65536']);
    await check('all of them');
    bystander.disconnect();
    assert.ok(await bystander.waitClosed());
    assert.equal(server.stats().protocolErrors, hostile.length);
  } finally {
    await server.close();
  }
});

test('a client that never reads its replies is paused, not buffered without bound', { skip }, async () => {
  const d = new MapDisk(64 * MiB);
  d.states.fill('data');
  const { server } = await serve(d, { maxInFlight: 8, maxInFlightBytes: 8 * MiB });
  try {
    const c = await RawNbdClient.connect(server.socketPath);
    await c.handshake();
    c.socket.pause(); // stop reading replies
    const rss0 = process.memoryUsage().rss;
    // 2 GiB of READ requests (2048 × 1 MiB): the server must stop reading them.
    const h = Buffer.alloc(28 * 2048);
    for (let i = 0; i < 2048; i++) {
      h.writeUInt32BE(NBD.REQUEST_MAGIC, i * 28);
      h.writeBigUInt64BE(BigInt(i + 1), i * 28 + 8);
      h.writeBigUInt64BE(BigInt((i % 64) * MiB), i * 28 + 16);
      h.writeUInt32BE(MiB, i * 28 + 24);
    }
    c.socket.write(h);
    await new Promise((r) => setTimeout(r, 700));
    const grown = (process.memoryUsage().rss - rss0) / MiB;
    assert.ok(grown < 150, `RSS grew by ${grown.toFixed(0)} MiB while the client did not read`);
    c.close();
    // Another client is served meanwhile and afterwards.
    await qemuIoNbd(uriOf(server.socketPath), ['read -P 0 0 4096']);
  } finally {
    await server.close();
  }
});

test('limits: connections beyond maxConnections are refused; close() drains and ends connections', { skip }, async () => {
  const d = new MapDisk(MiB);
  d.states.fill('data');
  const read = d.read.bind(d);
  d.read = async (offset, length, into) => {
    await new Promise((r) => setTimeout(r, 200));
    return read(offset, length, into);
  };
  const { server, events } = await serve(d, { maxConnections: 2 });
  const a = await RawNbdClient.connect(server.socketPath);
  await a.handshake();
  const b = await RawNbdClient.connect(server.socketPath);
  await b.greeting();
  const c = await RawNbdClient.connect(server.socketPath);
  assert.ok(await c.waitClosed(), 'third connection refused');
  assert.ok(events.some((e) => e.event === 'refused'));
  assert.equal(server.connections, 2);
  // close(): a request in flight still gets its answer, then both connections end.
  const requests = server.stats().requests;
  a.request(NBD.CMD.READ, { offset: 0, length: 65536 });
  const reply = a.reply(65536);
  while (server.stats().requests === requests) await new Promise((r) => setTimeout(r, 5));
  await server.close();
  assert.equal((await reply).error, 0);
  assert.ok(await a.waitClosed());
  assert.ok(await b.waitClosed());
  assert.equal(server.connections, 0);
  assert.ok(events.some((e) => e.event === 'closed'));
});

test('DISC behind a request in flight, then more bytes and the client’s end: the connection ends at once, not after the grace period', { skip, timeout: 20_000 }, async () => {
  const d = new MapDisk(MiB);
  d.states.fill('data');
  const read = d.read.bind(d);
  d.read = async (offset, length, into) => {
    await new Promise((r) => setTimeout(r, 100));
    return read(offset, length, into);
  };
  const { server, events } = await serve(d);
  const c = await RawNbdClient.connect(server.socketPath);
  await c.handshake();
  c.request(NBD.CMD.READ, { offset: 0, length: 4096 });
  c.request(NBD.CMD.DISC);
  await new Promise((r) => setTimeout(r, 20));
  c.send(Buffer.alloc(4096, 0x55)); // after DISC: dropped, and it must not hold the socket open
  const t0 = Date.now();
  c.end();
  while (server.connections > 0 && Date.now() - t0 < 4000) await new Promise((r) => setTimeout(r, 10));
  assert.equal(server.connections, 0);
  assert.ok(Date.now() - t0 < 1000, `closed ${Date.now() - t0} ms after the client's end`);
  assert.ok(events.some((e) => e.event === 'disconnect' && e.reason === 'client disconnected (DISC)'));
  await server.close();
});

test('socketPath rules: private folder only, never replacing a file, stale sockets reused', { skip }, async () => {
  const d = new MapDisk(MiB);
  const open = join(dir, 'world-writable');
  mkdirSync(open);
  chmodSync(open, 0o777);
  await expectCode(startNbdServer({ disk: d, socketPath: join(open, 'x.sock'), log: () => undefined }), 'forbidden');
  const groupW = join(dir, 'group-writable');
  mkdirSync(groupW);
  chmodSync(groupW, 0o770);
  await expectCode(startNbdServer({ disk: d, socketPath: join(groupW, 'x.sock'), log: () => undefined }), 'forbidden');
  await expectCode(startNbdServer({ disk: d, socketPath: join(dir, 'missing', 'x.sock'), log: () => undefined }), 'not_found');

  const priv = join(dir, 'private');
  mkdirSync(priv, { mode: 0o700 });
  const target = join(priv, 'disk.sock');
  writeFileSync(target, 'not a socket');
  await expectCode(startNbdServer({ disk: d, socketPath: target, log: () => undefined }), 'already_exists');
  assert.equal(readFileSync(target, 'utf8'), 'not a socket', 'the file is untouched');
  const link = join(priv, 'link.sock');
  symlinkSync(join(dir, 'elsewhere'), link);
  await expectCode(startNbdServer({ disk: d, socketPath: link, log: () => undefined }), 'already_exists');
  assert.ok(lstatSync(link).isSymbolicLink());

  // A live socket is refused; a stale one (left by a killed server) is replaced.
  const live = join(priv, 'live.sock');
  const other = createServer();
  await new Promise<void>((r) => other.listen(live, r));
  await expectCode(startNbdServer({ disk: d, socketPath: live, log: () => undefined }), 'already_exists');
  await new Promise<void>((r) => other.close(() => r()));
  const stale = join(priv, 'stale.sock');
  await runTool(process.execPath, ['-e', `require('node:net').createServer().listen(${JSON.stringify(stale)}, () => process.kill(process.pid, 'SIGKILL'))`]);
  assert.ok(lstatSync(stale).isSocket(), 'a stale socket was left behind');
  const staleIno = lstatSync(stale).ino;
  {
    const { server } = await serve(d, { socketPath: stale });
    try {
      assert.notEqual(lstatSync(stale).ino, staleIno);
      assert.equal(lstatSync(stale).mode & 0o777, 0o600);
      await qemuIoNbd(uriOf(stale), ['read -P 0 0 512']);
    } finally {
      await server.close();
    }
    assert.equal(existsSync(stale), false, 'our socket is removed on close');
  }
  // A fresh path: 0600, works, and the temporary binding folder is gone.
  const fresh = join(priv, 'fresh.sock');
  const { server } = await serve(d, { socketPath: fresh });
  try {
    assert.equal(lstatSync(fresh).mode & 0o777, 0o600);
    assert.ok(lstatSync(fresh).isSocket());
    const info = JSON.parse(await tool('nbdinfo', ['--json', uriOf(fresh)])) as { exports: { 'export-size': number }[] };
    assert.equal(info.exports[0]!['export-size'], MiB);
  } finally {
    await server.close();
  }
  assert.equal(existsSync(fresh), false);
  assert.deepEqual(readdirSync(priv).sort(), ['disk.sock', 'link.sock'], 'no temporary binding folder left');
});
