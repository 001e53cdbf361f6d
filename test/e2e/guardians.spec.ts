// Guardians and key protectors end to end, in web mode: create a guardian, back it up, attest this
// host, create a key protector, inspect it, check release, grant and revoke. Paths are typed into
// the page, as a user would: web mode is loopback-only, so they are paths on this machine.
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { expect, test, type Page } from '@playwright/test';
import { ROOT, serve, stop, watchForErrors, type Serving } from './serve.ts';

const PASSPHRASE = 'correct horse battery staple';
const PFX_PASSWORD = 'pfx-Backup-Passw0rd';
const OWNER = 'lab-owner';
const SECOND = 'lab-second';
const NOT_BACKED_UP = 'Not backed up — export a PFX or make a vault backup before it can own a key protector';

let server: Serving;
let files: string;
test.beforeAll(async () => {
  server = await serve();
  files = await mkdtemp(join(tmpdir(), 'shieldlab-e2e-files-'));
});
test.afterAll(async () => {
  if (server) await stop(server);
  if (files) await rm(files, { recursive: true, force: true });
});

async function go(page: Page, label: 'Guardians' | 'Key protectors') {
  await page.getByRole('navigation', { name: 'Main' }).getByRole('link', { name: label }).click();
  await expect(page.getByRole('heading', { name: label, level: 1 })).toBeVisible();
}

async function createGuardian(page: Page, name: string) {
  const form = page.getByRole('region', { name: 'Create a guardian' });
  await form.getByLabel('Name', { exact: true }).fill(name);
  await form.getByRole('button', { name: 'Create guardian' }).click();
  await expect(form.getByRole('status')).toContainText(`Created guardian “${name}”`);
}

test('guardians and key protectors: back up, attest, create, inspect, release, grant, revoke', async ({ page }) => {
  const errors = watchForErrors(page);
  const kpFile = join(files, 'lab-vm.kp');
  const backupDir = join(files, 'backup');
  const publicFile = join(files, `${SECOND}.guardian`);
  const guardianRow = (name: string) => page.getByTestId('guardian-row').filter({ has: page.getByRole('rowheader', { name }) });

  await test.step('create a passphrase vault; the navigation offers Guardians and Key protectors', async () => {
    await page.goto(server.url);
    await page.getByLabel('Keep the key in the OS keychain').uncheck();
    await page.getByLabel('Passphrase', { exact: true }).fill(PASSPHRASE);
    await page.getByLabel('Confirm passphrase').fill(PASSPHRASE);
    await page.getByRole('button', { name: 'Create vault' }).click();
    await expect(page.getByTestId('status-vault')).toHaveText('Unlocked');
    await expect(page.getByRole('navigation', { name: 'Main' }).getByRole('link')).toHaveText(['Vault', 'Guardians', 'Key protectors', 'Disks', 'VMs', 'Host health', 'Audit']);
  });

  await test.step('create a guardian: it is not backed up', async () => {
    await go(page, 'Guardians');
    await expect(page.getByText('No guardians yet')).toBeVisible();
    await createGuardian(page, OWNER);
    const row = guardianRow(OWNER);
    await expect(row).toContainText('Private keys');
    await expect(row.getByTestId('not-backed-up')).toHaveText(NOT_BACKED_UP);
    await expect(row.getByTestId('expiry-warning')).toHaveCount(0); // ten years ahead
    const thumb = row.locator('code.thumb');
    await expect(thumb).toHaveText(/^[0-9A-F]{8}…[0-9A-F]{4}$/);
    await expect(thumb).toHaveAttribute('title', /^[0-9A-F]{40}$/);
  });

  await test.step('a key protector owned by a guardian not backed up is refused in words', async () => {
    await go(page, 'Key protectors');
    const form = page.getByRole('region', { name: 'Create a key protector' });
    await expect(form.getByLabel('Owner')).toHaveValue(OWNER);
    await expect(form.getByLabel('Owner').locator('option')).toHaveText([`${OWNER} (not backed up)`]);
    await form.getByLabel('Output file').fill(kpFile);
    await form.getByRole('button', { name: 'Create key protector' }).click();
    await expect(form.getByRole('alert')).toHaveText(
      `Not created: guardian ${OWNER} has not been backed up, and a lost owner would strand every VM it protects. Export its PFX files on the Guardians page, or make a vault backup, first.`,
    );
    expect(existsSync(kpFile)).toBe(false);
  });

  await test.step('export the PFX pair to a folder: the warning is gone', async () => {
    await go(page, 'Guardians');
    const row = guardianRow(OWNER);
    await row.getByRole('button', { name: `Export PFX ${OWNER}` }).click();
    const form = page.getByRole('form', { name: `Export PFX of ${OWNER}` });
    await form.getByLabel('Output folder').fill(backupDir);
    await form.getByLabel('PFX password').fill(PFX_PASSWORD);
    await form.getByLabel('Confirm password').fill(`${PFX_PASSWORD}?`);
    await form.getByRole('button', { name: 'Write PFX files' }).click();
    await expect(form.getByRole('alert')).toHaveText('The two passwords differ.');
    await form.getByLabel('Confirm password').fill(PFX_PASSWORD);
    await form.getByRole('button', { name: 'Write PFX files' }).click();
    await expect(form.getByRole('status')).toContainText(`${OWNER} is backed up`);
    expect(existsSync(join(backupDir, `${OWNER}-signing.pfx`))).toBe(true);
    expect(existsSync(join(backupDir, `${OWNER}-encryption.pfx`))).toBe(true);
    await expect(row.getByTestId('not-backed-up')).toHaveCount(0);
    await expect(row).toContainText('Backed up');
    await form.getByRole('button', { name: 'Close' }).click();
    await expect(form).toHaveCount(0);
  });

  await test.step('create a key protector owned by the guardian; it is inspected at once', async () => {
    await go(page, 'Key protectors');
    const form = page.getByRole('region', { name: 'Create a key protector' });
    await expect(form.getByLabel('Owner').locator('option')).toHaveText([OWNER]);
    await expect(form.getByLabel('TPM')).toBeChecked();
    await expect(form.getByLabel('Host key')).toBeChecked();
    await expect(form.getByLabel('AD group')).not.toBeChecked();
    await form.getByLabel('Output file').fill(kpFile);
    await form.getByRole('button', { name: 'Create key protector' }).click();
    await expect(form.getByRole('status')).toHaveText(`Created ${kpFile}.`);
    expect(existsSync(kpFile)).toBe(true);
    await expect(page.getByLabel('Key protector file')).toHaveValue(kpFile);
    await expect(page.getByTestId('kp-summary')).toContainText(`Owned by ${OWNER}. Only the owner may run this VM`);
  });

  await test.step('inspect it by path: owner, guardians, policy, versions', async () => {
    await page.getByLabel('Key protector file').fill(join(files, 'missing.kp'));
    await page.getByRole('button', { name: 'Inspect' }).click();
    await expect(page.getByRole('alert')).toContainText(`Cannot inspect it: Cannot read the key protector ${join(files, 'missing.kp')}`);
    await page.getByLabel('Key protector file').fill(kpFile);
    await page.getByRole('button', { name: 'Inspect' }).click();
    await expect(page.getByTestId('kp-summary')).toHaveText(
      `Owned by ${OWNER}. Only the owner may run this VM, after host-key or tpm attestation. This host holds ${OWNER}.`,
    );
    await expect(page.getByTestId('kp-modes')).toHaveText('host-key or tpm');
    await expect(page.getByTestId('kp-hosts')).toHaveText('any attested host');
    await expect(page.getByTestId('kp-version')).toHaveText('key v1, authorization v1');
    await expect(page.getByTestId('kp-lkg')).toContainText('none');
    const rows = page.getByTestId('kp-guardians').locator('tbody tr');
    await expect(rows).toHaveCount(1);
    await expect(rows.first().getByRole('rowheader')).toHaveText(OWNER);
    await expect(rows.first().getByRole('cell')).toHaveText(['Owner', 'held here', /^[0-9A-F]{8}…[0-9A-F]{4}$/, '']);
    await expect(rows.first().getByRole('button', { name: /Revoke/ })).toHaveCount(0); // never the owner
  });

  await test.step('release is refused without a health certificate; register, attest, and it is allowed', async () => {
    await expect(page.getByTestId('host-key-state')).toHaveText('not registered');
    await expect(page.getByTestId('host-certificate')).toHaveText('none');
    await expect(page.getByRole('button', { name: 'Attest (host-key)' })).toBeDisabled();

    await page.getByRole('button', { name: 'Check release on this host' }).click();
    await expect(page.getByTestId('release-result')).toHaveText('Refused: This host has no health certificate yet.');
    await expect(page.getByRole('status').filter({ hasText: 'Next:' })).toHaveText(
      'Next: register this host’s key, then attest under “This host” above, and check again.',
    );

    await page.getByRole('button', { name: 'Register host key' }).click();
    await expect(page.getByTestId('host-key-state')).toHaveText('registered');
    await expect(page.getByRole('button', { name: 'Register host key' })).toHaveCount(0);
    await page.getByRole('button', { name: 'Attest (host-key)' }).click();
    await expect(page.getByTestId('host-certificate')).toContainText(/^valid host-key, until /);

    await page.getByRole('button', { name: 'Check release on this host' }).click();
    await expect(page.getByTestId('release-result')).toHaveText(`Allowed: this host may release the key, as guardian ${OWNER} after host-key attestation.`);
  });

  await test.step('a second guardian: granted, listed, revoked', async () => {
    await go(page, 'Guardians');
    await createGuardian(page, SECOND);
    await expect(page.getByTestId('guardian-row')).toHaveCount(2);
    await expect(guardianRow(SECOND).getByTestId('not-backed-up')).toHaveText(NOT_BACKED_UP);
    await page.screenshot({ path: join(ROOT, 'test-results/e2e-guardians.png'), fullPage: true });

    await go(page, 'Key protectors');
    await expect(page.getByTestId('kp-summary')).toContainText(`Owned by ${OWNER}.`); // the inspected KP is shown again
    await expect(page.getByLabel('Grant another guardian')).toHaveValue(SECOND);
    await page.getByRole('button', { name: 'Grant', exact: true }).click();
    await expect(page.getByRole('status').filter({ hasText: 'Granted' })).toHaveText(`Granted ${SECOND}: it may now run this VM.`);
    const rows = page.getByTestId('kp-guardians').locator('tbody tr');
    await expect(rows).toHaveCount(2);
    await expect(rows.nth(1).getByRole('rowheader')).toHaveText(SECOND);
    await expect(rows.nth(1).getByRole('cell').first()).toHaveText('Allowed to run');
    await expect(page.getByTestId('kp-summary')).toContainText(`${OWNER} and ${SECOND} may run this VM`);
    await expect(page.getByTestId('kp-version')).toHaveText('key v2, authorization v2');
    await expect(page.getByLabel('Grant another guardian')).toBeDisabled(); // every known guardian is listed
    await page.getByRole('button', { name: 'Check release on this host' }).click();
    await expect(page.getByTestId('release-result')).toContainText('Allowed');
    await page.screenshot({ path: join(ROOT, 'test-results/e2e-kp.png'), fullPage: true });

    await page.getByRole('button', { name: `Revoke ${SECOND}` }).click();
    await expect(page.getByRole('status').filter({ hasText: 'Revoked' })).toHaveText(
      `Revoked ${SECOND}. Roll the transport key so the others get a key ${SECOND} has never seen.`,
    );
    await expect(rows).toHaveCount(1);
    await expect(page.getByTestId('kp-summary')).toContainText('Only the owner may run this VM');
  });

  await test.step('roll the transport key, then commit', async () => {
    await page.getByRole('button', { name: 'Roll transport key' }).click();
    await expect(page.getByTestId('kp-version')).toHaveText('key v4, authorization v3');
    await expect(page.getByTestId('kp-lkg')).toHaveText(`${kpFile}.lkg`);
    await page.getByRole('button', { name: 'Commit roll' }).click();
    await expect(page.getByTestId('kp-lkg')).toContainText('none');
    expect(existsSync(`${kpFile}.lkg`)).toBe(false);
  });

  await test.step('delete: refused in words for the owner; the second guardian goes, and comes back from its public file', async () => {
    await go(page, 'Guardians');
    const owner = guardianRow(OWNER);
    await owner.getByRole('button', { name: `Delete ${OWNER}` }).click();
    await owner.getByRole('button', { name: `Confirm delete ${OWNER}` }).click();
    await expect(page.getByRole('alert')).toHaveText(`Guardian "${OWNER}" cannot be deleted: it owns the key protector ${kpFile}`);

    const second = guardianRow(SECOND);
    await second.getByRole('button', { name: `Export public ${SECOND}` }).click();
    const form = page.getByRole('form', { name: `Export public file of ${SECOND}` });
    await form.getByLabel('Output file').fill(publicFile);
    await form.getByRole('button', { name: 'Write public file' }).click();
    await expect(form.getByRole('status')).toContainText(`Wrote ${publicFile}.`);
    await second.getByRole('button', { name: `Delete ${SECOND}` }).click();
    await second.getByRole('button', { name: `Confirm delete ${SECOND}` }).click();
    await expect(page.getByTestId('guardian-row')).toHaveCount(1);

    const importForm = page.getByRole('region', { name: 'Import a guardian' });
    await importForm.getByLabel('Guardian file or PFX folder').fill(publicFile);
    await importForm.getByRole('button', { name: 'Import guardian' }).click();
    await expect(importForm.getByRole('status')).toHaveText(`Imported “${SECOND}” (certificates only): it can be granted on key protectors owned here.`);
    await expect(guardianRow(SECOND)).toContainText('Public only');
    await expect(guardianRow(SECOND)).toContainText('Nothing to back up');
  });

  expect(errors).toEqual([]);
});
