// The compiled main process (tsconfig.build.json → a temp dist), run against a stand-in for
// Electron's API: its imports resolve, it hardens before and after 'ready' as it should, serves the
// renderer under the CSP, points the window at an existing CommonJS preload, and wires IPC to a
// real ShieldLabApp. Electron itself cannot run here; this is the closest check of dist/electron.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setImmediate as tick } from 'node:timers/promises';
import { pathToFileURL } from 'node:url';
import { METHOD_NAMES, type CallOutcome } from '../../core/app/contract.ts';
import { electronEvent, electronStandIn, installElectronStandIn } from '../helpers/electron-stand-in.ts';
import { ROOT, tempDir } from '../helpers/home.ts';

test('dist/electron/main.js against an Electron stand-in', async (t) => {
  const { dir, cleanup } = tempDir('shieldlab-dist-');
  t.after(cleanup);
  const out = join(dir, 'dist');
  const tsc = spawnSync(process.execPath, [join(ROOT, 'node_modules/typescript/bin/tsc'), '-p', join(ROOT, 'tsconfig.build.json'), '--outDir', out], { encoding: 'utf8' });
  assert.equal(tsc.status, 0, tsc.stdout + tsc.stderr);
  // As in the project: dist/ sits next to package.json ("type": "module") and node_modules.
  writeFileSync(join(dir, 'package.json'), '{"type":"module"}');
  symlinkSync(join(ROOT, 'node_modules'), join(dir, 'node_modules'), 'dir');
  mkdirSync(join(out, 'renderer'));
  writeFileSync(join(out, 'renderer/index.html'), '<!doctype html><title>ShieldLab</title>');
  const home = join(dir, 'home');
  process.env.SHIELDLAB_HOME = home;

  await t.test('the preload is emitted as CommonJS that requires only electron', () => {
    const preload = readFileSync(join(out, 'electron/preload.cjs'), 'utf8');
    assert.doesNotMatch(preload, /^\s*(import|export)\s/m);
    assert.deepEqual([...preload.matchAll(/require\(['"]([^'"]+)['"]\)/g)].map((m) => m[1]), ['electron']);
  });

  const electron = electronStandIn();
  installElectronStandIn(electron);
  await import(pathToFileURL(join(out, 'electron/main.js')).href);

  await t.test('before ready: app:// is privileged, the sandbox is forced, one instance', () => {
    assert.deepEqual(electron.log, ['protocol.registerSchemesAsPrivileged ready=false', 'app.enableSandbox ready=false', 'app.requestSingleInstanceLock']);
    assert.deepEqual(electron.privileged, [{ scheme: 'app', privileges: { standard: true, secure: true, supportFetchAPI: true } }]);
    assert.equal(electron.windows.length, 0);
  });

  electron.ready();
  await tick();

  await t.test('after ready: permissions denied, foreign requests cancelled', () => {
    const h = electron.sessionHandlers as Record<string, (...a: unknown[]) => unknown>;
    let granted: boolean | undefined;
    h.permissionRequest!({}, 'media', (g: boolean) => (granted = g));
    assert.equal(granted, false);
    assert.equal(h.permissionCheck!({}, 'notifications'), false);
    assert.equal(h.devicePermission!({}), false);
    const { filter, h: onBefore } = electron.sessionHandlers.beforeRequest as { filter: { urls: string[] }; h: (d: unknown, cb: (r: unknown) => void) => void };
    assert.ok(filter.urls.includes('*://*/*'));
    let response: unknown;
    onBefore({ url: 'https://example.com/' }, (r) => (response = r));
    assert.deepEqual(response, { cancel: true });
  });

  const win = electron.windows[0]!;
  await t.test('one window, hardened, loading app://shieldlab/index.html with an existing preload', () => {
    assert.equal(electron.windows.length, 1);
    assert.equal(win.loadedUrl, 'app://shieldlab/index.html');
    const prefs = win.options.webPreferences!;
    assert.equal(prefs.sandbox, true);
    assert.equal(prefs.contextIsolation, true);
    assert.equal(prefs.nodeIntegration, false);
    assert.equal(prefs.preload, join(out, 'electron/preload.cjs'));
    assert.ok(existsSync(prefs.preload as string));
  });

  await t.test('the renderer is served from dist/renderer under the CSP', async () => {
    const handler = electron.protocolHandlers.get('app')!;
    const res = await handler(new Request('app://shieldlab/index.html'));
    assert.equal(res.status, 200);
    assert.match(await res.text(), /ShieldLab/);
    assert.match(res.headers.get('content-security-policy') ?? '', /script-src 'self'/);
  });

  await t.test('navigation, new windows and webviews are refused', () => {
    const wc = win.webContents;
    const away = electronEvent({ url: 'https://evil.example/' });
    wc.emit('will-navigate', away);
    assert.equal(away.defaultPrevented, true);
    const home = electronEvent({ url: 'app://shieldlab/index.html#/audit' });
    wc.emit('will-navigate', home);
    assert.equal(home.defaultPrevented, false);
    const redirect = electronEvent({ url: 'data:text/html,x' });
    wc.emit('will-redirect', redirect);
    assert.equal(redirect.defaultPrevented, true);
    const webview = electronEvent({});
    wc.emit('will-attach-webview', webview, {}, {});
    assert.equal(webview.defaultPrevented, true);
    assert.deepEqual(wc.windowOpenHandler?.({ url: 'app://shieldlab/index.html' }), { action: 'deny' });
  });

  await t.test('IPC: one channel per method, wired to a real app, our window only', async () => {
    const ipc = electron.module.ipcMain;
    assert.equal(ipc.handlers.size, METHOD_NAMES.length + 1); // and the cancel channel
    const ours = (await ipc.invokeFrom(win.webContents.mainFrame, 'shieldlab:vault.status', {})) as CallOutcome<'vault.status'>;
    assert.deepEqual(ours, { ok: true, result: { initialised: false, home, unlocked: false, slots: [] } });
    const evil = (await ipc.invokeFrom({ url: 'https://evil.example/' }, 'shieldlab:vault.status', {})) as CallOutcome;
    assert.equal(!evil.ok && evil.error.code, 'forbidden');
  });

  await t.test('quitting removes the IPC handlers, lets the app power its VMs down, then quits', async () => {
    const quits = () => electron.log.filter((l) => l === 'app.quit').length;
    const before = quits();
    const first = electronEvent({});
    electron.module.app.emit('will-quit', first);
    assert.equal(first.defaultPrevented, true, 'the first quit waits for the app to shut down');
    assert.equal(electron.module.ipcMain.handlers.size, 0);
    for (let i = 0; i < 100 && quits() === before; i++) await new Promise((r) => setTimeout(r, 10));
    assert.equal(quits(), before + 1, 'then quits again');
    const second = electronEvent({});
    electron.module.app.emit('will-quit', second);
    assert.equal(second.defaultPrevented, false, 'the second quit goes through');
  });
});
