// The window's security settings and the "is this ours?" origin test, without the Electron binary
// (electron/window.ts and electron/origin.ts take only types from 'electron').
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mainWindowOptions, secureWebPreferences } from '../../electron/window.ts';
import { APP_ENTRY_URL, APP_ORIGIN, isAppUrl, isTrustedFrame, originOf } from '../../electron/origin.ts';
import { homeFromArgv } from '../../electron/args.ts';

test('webPreferences: isolated, sandboxed, no Node, web security on, nothing experimental', () => {
  const prefs = secureWebPreferences({ preload: '/app/dist/electron/preload.cjs', devTools: false });
  assert.equal(prefs.preload, '/app/dist/electron/preload.cjs');
  assert.equal(prefs.contextIsolation, true);
  assert.equal(prefs.sandbox, true);
  assert.equal(prefs.nodeIntegration, false);
  assert.equal(prefs.nodeIntegrationInWorker, false);
  assert.equal(prefs.nodeIntegrationInSubFrames, false);
  assert.equal(prefs.webSecurity, true);
  assert.equal(prefs.allowRunningInsecureContent, false);
  assert.equal(prefs.experimentalFeatures, false);
  assert.equal(prefs.webviewTag, false);
  assert.equal(prefs.spellcheck, false);
  assert.equal(prefs.navigateOnDragDrop, false);
  assert.equal(prefs.devTools, false);
  assert.equal(prefs.enableBlinkFeatures, undefined);
  assert.equal(prefs.additionalArguments, undefined);
  assert.equal(secureWebPreferences({ preload: 'p', devTools: true }).devTools, true);
});

test('the main window uses those preferences and shows only once drawn', () => {
  const input = { preload: '/p.cjs', devTools: false };
  const opts = mainWindowOptions(input);
  assert.deepEqual(opts.webPreferences, secureWebPreferences(input));
  assert.equal(opts.show, false);
});

test('only app://shieldlab is ours: opaque origins and look-alikes are not', () => {
  assert.equal(APP_ORIGIN, 'app://shieldlab');
  assert.equal(originOf(APP_ENTRY_URL), APP_ORIGIN);
  for (const url of ['app://shieldlab/index.html', 'app://shieldlab/assets/x.js?v=1#top', 'APP://ShieldLab/']) {
    assert.equal(isAppUrl(url), true, url);
  }
  for (const url of [
    'data:text/html,<script>1</script>', // Node's URL gives these origin "null", like app:// itself
    'about:blank',
    'file:///work/dist/renderer/index.html',
    'app://shieldlab.evil.example/',
    'app://evil/shieldlab',
    'app://user@shieldlab/',
    'app://shieldlab:8080/',
    'http://shieldlab/',
    'https://127.0.0.1/',
    'javascript:alert(1)',
    '',
    'not a url',
  ]) {
    assert.equal(isAppUrl(url), false, url);
  }
  assert.equal(isTrustedFrame({ url: 'app://shieldlab/index.html' }), true);
  assert.equal(isTrustedFrame({ url: 'https://example.com/' }), false);
  assert.equal(isTrustedFrame(null), false);
  assert.equal(isTrustedFrame(undefined), false);
});

test('--home comes from argv (either spelling), else $SHIELDLAB_HOME', () => {
  assert.equal(homeFromArgv(['electron', '.', '--home', '/tmp/h1'], {}), '/tmp/h1');
  assert.equal(homeFromArgv(['electron', '.', '--no-sandbox', '--home=/tmp/h2'], {}), '/tmp/h2');
  assert.equal(homeFromArgv(['electron', '.'], { SHIELDLAB_HOME: '/tmp/h3' }), '/tmp/h3');
  assert.equal(homeFromArgv(['electron', '.', '--home', '--inspect'], { SHIELDLAB_HOME: '/tmp/h4' }), '/tmp/h4');
});
