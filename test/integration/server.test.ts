// Web mode against real HTTP and WebSocket clients: token, Host and Origin checks, CSP, events.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { request } from 'node:http';
import { mkdirSync, writeFileSync } from 'node:fs';
import { networkInterfaces } from 'node:os';
import { join } from 'node:path';
import { connect } from 'node:net';
import WebSocket from 'ws';
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
