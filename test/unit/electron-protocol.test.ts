// The app:// handler that serves dist/renderer: CSP on every answer, nothing outside the root.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { RENDERER_CSP, createRendererHandler, rendererFile } from '../../electron/protocol.ts';
import { tempDir } from '../helpers/home.ts';

function rendererRoot(t: TestContext): string {
  const { dir, cleanup } = tempDir('shieldlab-renderer-');
  t.after(cleanup);
  const root = join(dir, 'renderer');
  mkdirSync(join(root, 'assets'), { recursive: true });
  writeFileSync(join(root, 'index.html'), '<!doctype html><title>ShieldLab</title>');
  writeFileSync(join(root, 'assets', 'app.js'), 'console.log(1)');
  writeFileSync(join(dir, 'secret.txt'), 'outside the root');
  return root;
}

test('the CSP allows our own scripts and styles only, and no network', () => {
  const directives = new Map(RENDERER_CSP.split('; ').map((d) => [d.split(' ')[0], d.split(' ').slice(1).join(' ')]));
  assert.equal(directives.get('default-src'), "'none'");
  assert.equal(directives.get('script-src'), "'self'");
  assert.equal(directives.get('style-src'), "'self'");
  assert.equal(directives.get('connect-src'), "'none'");
  assert.equal(directives.get('frame-ancestors'), "'none'");
  assert.doesNotMatch(RENDERER_CSP, /unsafe-inline|unsafe-eval|\*/);
});

test('serves the renderer with the CSP and the right type', async (t) => {
  const handler = createRendererHandler({ root: rendererRoot(t) });
  const index = await handler(new Request('app://shieldlab/'));
  assert.equal(index.status, 200);
  assert.equal(index.headers.get('content-security-policy'), RENDERER_CSP);
  assert.equal(index.headers.get('x-content-type-options'), 'nosniff');
  assert.match(index.headers.get('content-type') ?? '', /^text\/html/);
  assert.match(await index.text(), /ShieldLab/);

  const script = await handler(new Request('app://shieldlab/assets/app.js'));
  assert.equal(script.status, 200);
  assert.match(script.headers.get('content-type') ?? '', /^text\/javascript/);

  // An unknown route gets the app shell; a missing asset is a 404, still under the CSP.
  assert.match(await (await handler(new Request('app://shieldlab/vault/secrets'))).text(), /ShieldLab/);
  const missing = await handler(new Request('app://shieldlab/assets/nope.js'));
  assert.equal(missing.status, 404);
  assert.equal(missing.headers.get('content-security-policy'), RENDERER_CSP);
});

test('nothing outside the renderer root, nor from another origin', async (t) => {
  const root = rendererRoot(t);
  const handler = createRendererHandler({ root });
  for (const url of ['app://shieldlab/%2e%2e/secret.txt', 'app://shieldlab/..%2fsecret.txt', 'app://shieldlab/assets/..%2F..%2Fsecret.txt', 'app://other/index.html', 'app://shieldlab/%00']) {
    const res = await handler(new Request(url));
    assert.equal(res.status, 404, url);
    assert.doesNotMatch(await res.text(), /outside the root/, url);
  }
  assert.equal(rendererFile(root, 'app://shieldlab/%E0%A4%A'), null); // a malformed escape
  assert.equal(rendererFile(root, 'app://shieldlab/assets/app.js'), join(root, 'assets', 'app.js'));
  assert.equal((await handler(new Request('app://shieldlab/index.html', { method: 'POST', body: 'x' }))).status, 405);
});
