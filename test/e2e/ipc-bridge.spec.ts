// The bridge under Electron: when the preload exposes `window.shieldlab`, every call and event goes
// through it and none over HTTP. A stub stands in for electron/preload.ts, which also lets this test
// reach states the web-mode spec cannot cheaply: a keychain vault, a keychain refusal, an idle lock.
import { expect, test } from '@playwright/test';
import { serve, stop, watchForErrors, type Serving } from './serve.ts';

let server: Serving;
test.beforeAll(async () => {
  server = await serve();
});
test.afterAll(async () => {
  if (server) await stop(server);
});

test('under Electron the bridge uses the preload API: keychain unlock, refusal, idle lock', async ({ page }) => {
  const errors = watchForErrors(page);
  const webCalls: string[] = [];
  page.on('request', (r) => new URL(r.url()).pathname.startsWith('/api/') && webCalls.push(r.url()));
  page.on('websocket', (ws) => webCalls.push(ws.url()));

  // A stand-in for electron/preload.ts: canned outcomes, and a handle to push events.
  await page.addInitScript(() => {
    type Outcome = { ok: true; result: unknown } | { ok: false; error: { code: string; message: string } };
    const listeners = new Set<(e: unknown) => void>();
    const calls: [string, unknown, string | undefined][] = [];
    let unlocked = false;
    const status = () => ({
      initialised: true,
      home: '/home/ada/.local/share/shieldlab',
      unlocked,
      slots: ['keychain', 'passphrase'],
      keychainStore: 'Secret Service',
      records: 0,
      autoLockMinutes: 5,
    });
    const w = window as unknown as Record<string, unknown>;
    w.shieldlab = {
      async invoke(method: string, args: unknown, opts?: { callId?: string }): Promise<Outcome> {
        calls.push([method, args, opts?.callId]);
        if (method === 'vault.status') return { ok: true, result: status() };
        if (method === 'vault.list') return { ok: true, result: { records: [] } };
        if (method === 'vault.unlock') {
          if (calls.filter(([m]) => m === 'vault.unlock').length === 1) {
            return { ok: false, error: { code: 'keychain_entry_missing', message: 'The OS keychain has no entry for this vault.' } };
          }
          unlocked = true;
          return { ok: true, result: status() };
        }
        return { ok: false, error: { code: 'internal', message: `${method} is not stubbed` } };
      },
      onEvent(listener: (e: unknown) => void) {
        listeners.add(listener);
        return () => listeners.delete(listener);
      },
    };
    w.preloadStub = {
      calls,
      lockForIdle() {
        unlocked = false;
        for (const l of listeners) l({ type: 'state', unlocked: false, reason: 'idle' });
      },
    };
  });

  await page.goto(server.url);
  await expect(page.getByRole('heading', { name: 'Unlock the vault' })).toBeVisible();
  await expect(page.getByTestId('status-protection')).toHaveText('OS keychain (Secret Service) + passphrase');
  await expect(page.getByLabel('Passphrase')).toBeVisible();

  await page.getByRole('button', { name: 'Unlock with OS keychain' }).click();
  await expect(page.getByRole('alert')).toHaveText('Unlock refused: The OS keychain has no entry for this vault.');
  await page.getByRole('button', { name: 'Unlock with OS keychain' }).click();
  await expect(page.getByRole('heading', { name: 'Secrets' })).toBeVisible();

  await page.evaluate(() => (window as unknown as { preloadStub: { lockForIdle(): void } }).preloadStub.lockForIdle());
  await expect(page.getByRole('heading', { name: 'Unlock the vault' })).toBeVisible();
  await expect(page.getByRole('status').filter({ hasText: 'Locked after idle' })).toHaveText(
    'Locked after idle (5 min without activity). Unlock to continue.',
  );

  const calls = await page.evaluate(() => (window as unknown as { preloadStub: { calls: [string, unknown, string][] } }).preloadStub.calls);
  expect(calls.filter(([m]) => m === 'vault.unlock').map(([m, a]) => [m, a])).toEqual([
    ['vault.unlock', {}],
    ['vault.unlock', {}],
  ]);
  // Every call carries a distinct id that electron/ipc.ts accepts (it tags the call's progress events).
  for (const [, , id] of calls) expect(id).toMatch(/^[\w.:-]{1,64}$/);
  expect(new Set(calls.map(([, , id]) => id)).size).toBe(calls.length);
  expect(webCalls).toEqual([]);
  expect(errors).toEqual([]);
});
