// Web mode against real HTTP and WebSocket clients: token, Host and Origin checks, CSP, events,
// and cancelling a long call by its X-Call-Id or by going away.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { request } from 'node:http';
import { randomBytes } from 'node:crypto';
import { closeSync, existsSync, mkdirSync, openSync, writeFileSync, writeSync } from 'node:fs';
import { networkInterfaces } from 'node:os';
import { join } from 'node:path';
import { connect } from 'node:net';
import WebSocket from 'ws';
import type { AppEvent, ProgressEvent } from '../../core/app/contract.ts';
import { ShieldLabApp } from '../../core/app/service.ts';
import { startServer, type RunningServer } from '../../core/server/server.ts';
import { tempDir } from '../helpers/home.ts';

interface Reply {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: string;
}

function http(server: RunningServer, opts: { method?: string; path: string; headers?: Record<string, string>; body?: string }): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const req = request(
      { host: '127.0.0.1', port: server.port, method: opts.method ?? 'GET', path: opts.path, headers: { host: `127.0.0.1:${server.port}`, ...opts.headers } },
      (res) => {
        let body = '';
        res.on('data', (d: Buffer) => (body += d.toString()));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
      },
    );
    req.on('error', reject);
    req.end(opts.body);
  });
}

describe('web mode server', () => {
  let server: RunningServer;
  let app: ShieldLabApp;
  const t = tempDir();
  let cookie = '';

  before(async () => {
    const staticDir = join(t.dir, 'renderer');
    mkdirSync(join(staticDir, 'assets'), { recursive: true });
    writeFileSync(join(staticDir, 'index.html'), '<!doctype html><title>ShieldLab</title>');
    app = new ShieldLabApp({ home: join(t.dir, 'home') });
    server = await startServer({ app, staticDir });
  });
  after(async () => {
    await server.close();
    app.close();
    t.cleanup();
  });

  test('binds to loopback only', async () => {
    assert.match(server.url, /^http:\/\/127\.0\.0\.1:\d+\/\?token=[\w-]{32}$/);
    const external = Object.values(networkInterfaces()).flat().find((i) => i && i.family === 'IPv4' && !i.internal);
    if (external) {
      const err = await new Promise<NodeJS.ErrnoException | null>((resolve) => {
        const s = connect({ host: external.address, port: server.port });
        s.on('connect', () => (s.destroy(), resolve(null)));
        s.on('error', (e) => resolve(e));
      });
      assert.equal(err?.code, 'ECONNREFUSED', `reachable on ${external.address}`);
    }
  });

  test('the printed URL trades its token for an HttpOnly SameSite=Strict cookie', async () => {
    assert.equal((await http(server, { path: '/' })).status, 401);
    assert.equal((await http(server, { path: '/?token=wrong' })).status, 401);
    const r = await http(server, { path: `/?token=${server.token}` });
    assert.equal(r.status, 303);
    assert.equal(r.headers.location, '/');
    const setCookie = String(r.headers['set-cookie']);
    assert.match(setCookie, /HttpOnly/);
    assert.match(setCookie, /SameSite=Strict/);
    cookie = setCookie.split(';')[0]!;
    const page = await http(server, { path: '/', headers: { cookie } });
    assert.equal(page.status, 200);
    assert.match(page.body, /ShieldLab/);
    const csp = String(page.headers['content-security-policy']);
    assert.match(csp, /default-src 'none'/);
    assert.match(csp, /script-src 'self'/);
    assert.doesNotMatch(csp, /unsafe-inline|unsafe-eval/);
    assert.match(csp, /frame-ancestors 'none'/);
    assert.equal(page.headers['x-content-type-options'], 'nosniff');
  });

  test('DNS rebinding: a foreign Host header is refused even with the token', async () => {
    for (const host of ['evil.example:80', `attacker.test:${server.port}`, `127.0.0.1.nip.io:${server.port}`]) {
      const r = await http(server, { path: `/?token=${server.token}`, headers: { host } });
      assert.equal(r.status, 403, host);
      const api = await http(server, { method: 'POST', path: '/api/call/vault.status', headers: { host, authorization: `Bearer ${server.token}`, 'content-type': 'application/json' }, body: '{}' });
      assert.equal(api.status, 403, host);
    }
    const ok = await http(server, { path: '/', headers: { host: `localhost:${server.port}`, cookie } });
    assert.equal(ok.status, 200);
  });

  test('API calls: token required, cross-origin and non-JSON posts refused, typed errors', async () => {
    const call = (headers: Record<string, string>, body = '{}', method = 'vault.status') =>
      http(server, { method: 'POST', path: `/api/call/${method}`, headers: { 'content-type': 'application/json', ...headers }, body });
    const origin = `http://127.0.0.1:${server.port}`;
    const ok = await call({ cookie, origin });
    assert.equal(ok.status, 200);
    assert.deepEqual(JSON.parse(ok.body).result.initialised, false);
    assert.equal((await call({ origin })).status, 401);
    assert.equal((await call({ cookie, origin: 'http://evil.example' })).status, 403);
    assert.equal((await call({ cookie })).status, 403, 'a cookie-only POST without Origin is not from our page');
    assert.equal((await call({ authorization: `Bearer ${server.token}` })).status, 200);
    assert.equal((await call({ cookie, origin, 'content-type': 'text/plain' })).status, 400);
    const bad = await call({ cookie, origin }, '{not json');
    assert.equal(JSON.parse(bad.body).error.code, 'invalid_argument');
    const unknown = await call({ cookie, origin }, '{}', 'vault.explode');
    assert.equal(JSON.parse(unknown.body).error.code, 'usage');
    const locked = await call({ cookie, origin }, '{}', 'vault.list');
    assert.equal(JSON.parse(locked.body).error.code, 'vault_not_initialised');
    // Over 1 MiB: refused (413) or the connection is cut before the body is read.
    const big = await call({ cookie, origin }, JSON.stringify({ pad: 'x'.repeat(2 * 1024 * 1024) })).catch((e: NodeJS.ErrnoException) => e.code);
    assert.ok(big === 'ECONNRESET' || big === 'EPIPE' || (typeof big === 'object' && big.status === 413), String(big));
  });

  test('events over WebSocket reach a same-origin page only', async () => {
    const origin = `http://127.0.0.1:${server.port}`;
    const url = `ws://127.0.0.1:${server.port}/api/events`;
    const refused = (headers: Record<string, string>) =>
      new Promise<number>((resolve) => {
        const ws = new WebSocket(url, { headers });
        ws.on('unexpected-response', (_req, res) => resolve(res.statusCode ?? 0));
        ws.on('open', () => (ws.close(), resolve(101)));
        ws.on('error', () => resolve(-1));
      });
    assert.equal(await refused({ origin: 'http://evil.example', cookie }), 403);
    assert.equal(await refused({ origin }), 401);
    const ws = new WebSocket(url, { headers: { origin, cookie } });
    const received: unknown[] = [];
    let wake: () => void = () => undefined;
    ws.on('message', (d) => (received.push(JSON.parse(d.toString())), wake()));
    const nth = (n: number) => new Promise<unknown>((resolve) => {
      const check = () => (received.length > n ? resolve(received[n]) : (wake = check));
      check();
    });
    // A new connection first learns the current state, so it never starts stale.
    assert.deepEqual(await nth(0), { type: 'state', unlocked: false });
    const event = nth(1);
    const init = await http(server, {
      method: 'POST',
      path: '/api/call/vault.init',
      headers: { cookie, origin, 'content-type': 'application/json' },
      body: JSON.stringify({ keychain: false, passphrase: 'correct horse battery', kdfMemoryMib: 16 }),
    });
    assert.equal(init.status, 200, init.body);
    assert.deepEqual(await event, { type: 'state', unlocked: true });
    ws.close();
  });
});

describe('web mode: cancelling a long call', () => {
  let server: RunningServer;
  let app: ShieldLabApp;
  const t = tempDir();
  /** Long enough to convert for most of a second on a fast machine: 16 blocks of 32 MiB, one progress event each. */
  const SIZE = 512 * 1024 * 1024;
  const input = join(t.dir, 'big.raw');
  let origin = '';
  let events: ReturnType<typeof listen>;
  let n = 0;

  before(async () => {
    // Random data (one random 8 MiB piece over and over): no block reads as zeros, so every one is copied.
    const piece = randomBytes(8 * 1024 * 1024);
    const fd = openSync(input, 'w');
    for (let at = 0; at < SIZE; at += piece.length) writeSync(fd, piece);
    closeSync(fd);
    app = new ShieldLabApp({ home: join(t.dir, 'home') });
    server = await startServer({ app, staticDir: join(t.dir, 'no-renderer') });
    origin = `http://127.0.0.1:${server.port}`;
    events = listen(server, origin);
    await events.opened;
  });
  after(async () => {
    events?.close();
    await server.close();
    app.close();
    t.cleanup();
  });

  const auth = () => ({ authorization: `Bearer ${server.token}`, 'content-type': 'application/json' });
  const convert = (callId: string, output: string) =>
    http(server, { method: 'POST', path: '/api/call/vhdx.convert', headers: { ...auth(), 'x-call-id': callId }, body: JSON.stringify({ input, output }) });
  const cancel = (callId: string, headers: Record<string, string> = auth()) => http(server, { method: 'POST', path: `/api/cancel/${encodeURIComponent(callId)}`, headers, body: '{}' });
  const fresh = (name: string) => ({ callId: `${name}-${++n}-${Date.now()}`, output: join(t.dir, `${name}-${n}.vhdx`) });

  test('POST /api/cancel/<callId> stops the call: 204, the call answers `cancelled`, no output and no .partial remain', async () => {
    const { callId, output } = fresh('cancelled');
    const first = events.progressOf(callId);
    const answer = convert(callId, output);
    const progress = await first;
    assert.ok(progress.done < progress.total, 'still running at its first progress event');

    // One id, one running call: a second call under the same id is refused.
    const twin = await convert(callId, join(t.dir, 'twin.vhdx'));
    assert.equal(twin.status, 400, twin.body);
    assert.equal(JSON.parse(twin.body).error.code, 'usage');

    const r = await cancel(callId);
    assert.equal(r.status, 204, r.body);
    assert.equal(r.body, '');
    const reply = await answer;
    assert.equal(reply.status, 409, reply.body);
    const error = JSON.parse(reply.body).error;
    assert.equal(error.code, 'cancelled');
    assert.match(error.message, /^Cancelled\b.*nothing was written/);
    assert.equal(existsSync(output), false, 'no output');
    assert.equal(existsSync(`${output}.partial`), false, 'no .partial');
    assert.equal(existsSync(join(t.dir, 'twin.vhdx')), false);
    // It ended, so it is no longer running: cancelling it again finds nothing.
    assert.equal((await cancel(callId)).status, 404);
  });

  test('cancelling an id that runs nothing is 404 not_found', async () => {
    const r = await cancel('no-such-call');
    assert.equal(r.status, 404);
    assert.equal(JSON.parse(r.body).error.code, 'not_found');
    assert.equal((await cancel('%E0%A4%A')).status, 404, 'a malformed id is not a route');
  });

  test('cancel has the rules of /api/call: token, Origin, JSON; a refused cancel stops nothing', async () => {
    const { callId, output } = fresh('kept');
    const first = events.progressOf(callId);
    const answer = convert(callId, output);
    await first;
    const json = { 'content-type': 'application/json' };
    const refusals: [Record<string, string>, number][] = [
      [{ ...json, origin }, 401], // no token
      [{ ...json, origin, authorization: 'Bearer wrong' }, 401],
      [{ ...json, origin: 'http://evil.example', authorization: `Bearer ${server.token}` }, 403],
      [{ ...json, cookie: `shieldlab_token=${server.token}` }, 403], // a cookie alone, without Origin: not our page
      [{ authorization: `Bearer ${server.token}`, 'content-type': 'text/plain' }, 400], // a cross-site form's content type
    ];
    for (const [headers, status] of refusals) assert.equal((await cancel(callId, headers)).status, status, JSON.stringify(headers));
    const foreignHost = await cancel(callId, { ...auth(), host: `evil.example:${server.port}` });
    assert.equal(foreignHost.status, 403);
    assert.equal((await http(server, { path: `/api/cancel/${callId}`, headers: auth() })).status, 404, 'GET is no cancel');

    const reply = await answer;
    assert.equal(reply.status, 200, reply.body);
    assert.equal(JSON.parse(reply.body).result.output, output);
    assert.equal(existsSync(output), true);
    assert.equal(existsSync(`${output}.partial`), false);
  });

  test('a client that goes away mid-call cancels it: the output and the .partial are removed', async () => {
    const { callId, output } = fresh('abandoned');
    const first = events.progressOf(callId);
    const body = JSON.stringify({ input, output });
    const req = request({
      host: '127.0.0.1',
      port: server.port,
      method: 'POST',
      path: '/api/call/vhdx.convert',
      agent: false,
      headers: { host: `127.0.0.1:${server.port}`, ...auth(), 'x-call-id': callId, 'content-length': String(Buffer.byteLength(body)) },
    });
    let answered = false;
    req.on('response', () => (answered = true));
    req.on('error', () => undefined); // we hang up ourselves
    req.end(body);
    const progress = await first;
    assert.ok(progress.done < progress.total);
    assert.equal(existsSync(`${output}.partial`), true, 'it is writing');
    req.destroy();
    // Its .partial goes when it ends: removed if it was cancelled, renamed into place had it run to the end.
    const deadline = Date.now() + 20_000;
    while (existsSync(`${output}.partial`)) {
      assert.ok(Date.now() < deadline, 'the call never ended');
      await new Promise((r) => setTimeout(r, 20));
    }
    assert.equal(answered, false);
    assert.equal(existsSync(output), false, 'no output: the conversion did not run to its end');
    assert.equal(existsSync(`${output}.partial`), false, 'no .partial');
  });
});

/** The server's event stream, with a wait for the first progress event of one call. */
function listen(server: RunningServer, origin: string) {
  const ws = new WebSocket(`ws://127.0.0.1:${server.port}/api/events`, { headers: { origin, authorization: `Bearer ${server.token}` } });
  const waiting = new Map<string, (e: ProgressEvent) => void>();
  ws.on('message', (d) => {
    const e = JSON.parse(d.toString()) as AppEvent;
    if (e.type === 'progress') waiting.get(e.callId)?.(e);
  });
  return {
    opened: new Promise<void>((resolve, reject) => (ws.once('open', () => resolve()), ws.once('error', reject))),
    progressOf(callId: string): Promise<ProgressEvent> {
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no progress event for ${callId} in 20 s`)), 20_000);
        waiting.set(callId, (e) => {
          clearTimeout(timer);
          waiting.delete(callId);
          resolve(e);
        });
      });
    },
    close: () => ws.close(),
  };
}
