// The renderer end to end, in web mode: the real `shieldlab serve` on a fresh home, the built
// renderer (dist/renderer), the system Chromium. Passphrase mode only: no Secret Service needed.
import { join } from 'node:path';
import { expect, test } from '@playwright/test';
import { ROOT, serve, stop, watchForErrors, type Serving } from './serve.ts';

const PASSPHRASE = 'correct horse battery staple';
const SECRET = { name: 'lab-db', value: 'pg-S3cret!value', tags: 'lab, db', notes: 'Postgres on the lab host' };

let server: Serving;
test.beforeAll(async () => {
  server = await serve();
});
test.afterAll(async () => {
  if (server) await stop(server);
});

test('the server refuses the API without the session cookie', async ({ request }) => {
  const call = await request.post(`${server.origin}/api/call/vault.status`, { headers: { Origin: server.origin }, data: {} });
  expect(call.status()).toBe(401);
  expect((await call.json()) as unknown).toMatchObject({ ok: false, error: { code: 'unauthorized' } });
  const page = await request.get(`${server.origin}/`);
  expect(page.status()).toBe(401);
});

test('create a vault, keep a secret, lock, unlock, read the audit trail', async ({ page }) => {
  const errors = watchForErrors(page);

  await test.step('open the printed URL: the token becomes a cookie, the page has a strict CSP', async () => {
    const response = await page.goto(server.url);
    expect(response?.status()).toBe(200);
    expect(page.url()).not.toContain('token=');
    const csp = response?.headers()['content-security-policy'] ?? '';
    expect(csp).toContain("default-src 'none'");
    expect(csp).toContain("script-src 'self'");
    expect(csp).toContain("style-src 'self'");
    await expect(page.getByRole('heading', { name: 'Create the vault' })).toBeVisible();
    await expect(page.getByTestId('status-vault')).toHaveText('No vault');
    await page.screenshot({ path: join(ROOT, 'test-results/e2e-create.png'), fullPage: true });
    await expect(page.getByRole('navigation', { name: 'Main' }).getByRole('link')).toHaveText(['Vault', 'Guardians', 'Key protectors', 'Disks', 'VMs', 'Host health', 'Audit']);
    // The stylesheet loaded under the CSP: the side navigation has its dark background.
    await expect(page.getByRole('navigation', { name: 'Main' })).toHaveCSS('background-color', 'rgb(39, 49, 62)');
  });

  await test.step('create the vault with a passphrase and no keychain', async () => {
    await page.getByLabel('Keep the key in the OS keychain').uncheck();
    await page.getByLabel('Passphrase', { exact: true }).fill(PASSPHRASE);
    await page.getByLabel('Confirm passphrase').fill(`${PASSPHRASE}!`);
    await page.getByRole('button', { name: 'Create vault' }).click();
    await expect(page.getByRole('alert')).toHaveText('The two passphrases differ.');
    await page.getByLabel('Confirm passphrase').fill(PASSPHRASE);
    await page.getByRole('button', { name: 'Create vault' }).click();
    await expect(page.getByTestId('status-vault')).toHaveText('Unlocked');
    await expect(page.getByTestId('status-protection')).toHaveText('Passphrase');
    await expect(page.getByRole('heading', { name: 'Secrets' })).toBeVisible();
    await expect(page.getByText('No secrets yet')).toBeVisible();
  });

  const row = page.getByRole('row', { name: new RegExp(SECRET.name) });

  await test.step('add secrets; one is listed with its tags, one is deleted', async () => {
    for (const s of [SECRET, { name: 'scratch', value: 'temporary', tags: '', notes: '' }]) {
      await page.getByLabel('Name', { exact: true }).fill(s.name);
      await page.getByLabel('Value').fill(s.value);
      await page.getByLabel('Tags').fill(s.tags);
      await page.getByLabel('Notes').fill(s.notes);
      await page.getByRole('button', { name: 'Save secret' }).click();
      await expect(page.getByRole('status').filter({ hasText: `Saved “${s.name}”.` })).toBeVisible();
    }
    await expect(page.getByTestId('secret-row')).toHaveCount(2);
    await expect(page.getByTestId('status-records')).toHaveText('2');
    await expect(row).toContainText(SECRET.notes);
    await expect(row.locator('.tag')).toHaveText(['lab', 'db']);
    await expect(row).not.toContainText(SECRET.value);

    const scratch = page.getByRole('row', { name: /scratch/ });
    await scratch.getByRole('button', { name: 'Delete scratch' }).click();
    await scratch.getByRole('button', { name: 'Cancel' }).click();
    await scratch.getByRole('button', { name: 'Delete scratch' }).click();
    await scratch.getByRole('button', { name: 'Confirm delete scratch' }).click();
    await expect(page.getByTestId('secret-row')).toHaveCount(1);
    await expect(page.getByTestId('status-records')).toHaveText('1');
  });

  await test.step('reveal the value, then hide it', async () => {
    await row.getByRole('button', { name: 'Reveal' }).click();
    await expect(row.getByTestId('secret-value')).toHaveText(SECRET.value);
    await page.screenshot({ path: join(ROOT, 'test-results/e2e-vault.png'), fullPage: true });
    await row.getByRole('button', { name: 'Hide' }).click();
    await expect(row.getByTestId('secret-value')).toHaveCount(0);
  });

  await test.step('lock; a wrong passphrase is refused in words; the right one unlocks', async () => {
    await page.getByRole('button', { name: 'Lock', exact: true }).click();
    await expect(page.getByRole('heading', { name: 'Unlock the vault' })).toBeVisible();
    await expect(page.getByTestId('status-vault')).toHaveText('Locked');
    await expect(page.getByRole('button', { name: 'Unlock with OS keychain' })).toHaveCount(0); // no keychain slot

    await page.getByLabel('Passphrase').fill('not the passphrase');
    await page.getByRole('button', { name: 'Unlock', exact: true }).click();
    await expect(page.getByRole('alert')).toHaveText('Unlock refused: Wrong passphrase.');
    await page.screenshot({ path: join(ROOT, 'test-results/e2e-unlock.png'), fullPage: true });
    await expect(page.getByTestId('status-vault')).toHaveText('Locked');

    await page.getByLabel('Passphrase').fill(PASSPHRASE);
    await page.getByRole('button', { name: 'Unlock', exact: true }).click();
    await expect(page.getByTestId('status-vault')).toHaveText('Unlocked');
    await expect(row).toBeVisible();
  });

  await test.step('a lock from another front door reaches the page as an event', async () => {
    const lock = await page.request.post(`${server.origin}/api/call/vault.lock`, { headers: { Origin: server.origin }, data: {} });
    expect(lock.status()).toBe(200);
    await expect(page.getByRole('heading', { name: 'Unlock the vault' })).toBeVisible();
    await page.getByLabel('Passphrase').fill(PASSPHRASE);
    await page.getByRole('button', { name: 'Unlock', exact: true }).click();
    await expect(row).toBeVisible();
  });

  await test.step('the audit trail shows every step and its chain verifies', async () => {
    await page.getByRole('link', { name: 'Audit' }).click();
    await expect(page).toHaveURL(/#\/audit$/);
    await expect(page.getByRole('link', { name: 'Audit' })).toHaveAttribute('aria-current', 'page');
    await expect(page.getByRole('heading', { name: 'Audit trail' })).toBeVisible();
    const rows = page.getByTestId('audit').locator('tbody tr');
    const entry = (action: string, outcome: string) => rows.filter({ hasText: action }).filter({ hasText: outcome });
    await expect(entry('vault.init', 'ok')).toHaveCount(1);
    await expect(entry('vault.unlock', 'refused')).toContainText('wrong_passphrase');
    await expect(entry('vault.unlock', 'ok')).toHaveCount(2);
    await expect(entry('record.create', 'ok')).toHaveCount(2);
    await expect(entry('record.read', 'ok')).toContainText(`secret:${SECRET.name}`);
    await expect(entry('record.delete', 'ok')).toContainText('secret:scratch');
    await expect(entry('vault.lock', 'ok')).toHaveCount(2);

    await page.getByRole('button', { name: 'Verify chain' }).click();
    await expect(page.getByRole('status').filter({ hasText: 'Chain intact' })).toHaveText(/^Chain intact: \d+ entries/);
    await page.screenshot({ path: join(ROOT, 'test-results/e2e-audit.png'), fullPage: true });
  });

  expect(errors).toEqual([]);
});
