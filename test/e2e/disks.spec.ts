// Shielded disks end to end, in web mode: shield a raw disk with a progress bar, open it, grant and
// revoke a guardian, unshield it and compare byte for byte; refusals in words; cancel a shield from
// its progress bar. The vault and the guardians are set up through the API (the Guardians spec
// covers doing that in the page).
import { randomBytes } from 'node:crypto';
import { closeSync, existsSync, openSync, writeSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { expect, test, type Page } from '@playwright/test';
import type { ProgressEvent } from '../../core/app/contract.ts';
import { call, ROOT, serve, stop, watchForErrors, type Serving } from './serve.ts';

const OWNER = 'disk-owner';
const SECOND = 'disk-second';
const MiB = 1024 * 1024;
const SIZE = 8 * MiB;
const MARKER = Buffer.from('ShieldLab e2e disk: recognisable plaintext');

let server: Serving;
let files: string;
test.beforeAll(async () => {
  server = await serve();
  files = await mkdtemp(join(tmpdir(), 'shieldlab-e2e-disks-'));
  await call(server, 'vault.init', { keychain: false, passphrase: 'correct horse battery staple', kdfMemoryMib: 16 });
  await call(server, 'guardian.create', { name: OWNER });
  await call(server, 'guardian.export', { name: OWNER, pfx: true, outDir: join(files, 'backup'), password: 'pfx-Backup-Passw0rd' });
  await call(server, 'guardian.create', { name: SECOND }); // held here, never backed up: it cannot own a disk
});
test.afterAll(async () => {
  if (server) await stop(server);
  if (files) await rm(files, { recursive: true, force: true });
});

/**
 * 8 MiB in four 2 MiB blocks: the marker and random bytes at the start, across a unit boundary in
 * the second block and at the very end; the third block all zeros (it stays unallocated).
 */
function plainDisk(): Buffer {
  const disk = Buffer.alloc(SIZE);
  for (const [offset, length] of [
    [0, 64 * 1024],
    [3 * MiB + 4097, 10_000],
    [SIZE - 4096, 4096],
  ] as const) {
    MARKER.copy(disk, offset);
    randomBytes(length - MARKER.length).copy(disk, offset + MARKER.length);
  }
  return disk;
}

/** Every value the page's progress bars show, in order: bars added, and their `value` changing. */
async function recordProgressBars(page: Page) {
  await page.evaluate(() => {
    const seen: { label: string; value: number; max: number }[] = [];
    (window as unknown as { progressSeen: typeof seen }).progressSeen = seen;
    const note = (bar: HTMLProgressElement) => {
      if (!bar.hasAttribute('value')) return; // indeterminate: nothing known yet
      const label = document.getElementById(bar.getAttribute('aria-labelledby') ?? '')?.textContent ?? '';
      seen.push({ label, value: bar.value, max: bar.max });
    };
    new MutationObserver((records) => {
      for (const r of records) {
        if (r.type === 'attributes' && r.target instanceof HTMLProgressElement) note(r.target);
        for (const node of Array.from(r.addedNodes)) {
          if (node instanceof HTMLProgressElement) note(node);
          else if (node instanceof Element) node.querySelectorAll('progress').forEach(note);
        }
      }
    }).observe(document.body, { subtree: true, childList: true, attributes: true, attributeFilter: ['value'] });
  });
  return async (label: string) =>
    (await page.evaluate(() => (window as unknown as { progressSeen: { label: string; value: number; max: number }[] }).progressSeen)).filter((s) => s.label === label);
}

test('disks: shield with progress, open, grant and revoke, unshield byte for byte, refusals in words', async ({ page }) => {
  const errors = watchForErrors(page);
  const input = join(files, 'lab-disk.img');
  const shielded = join(files, 'lab-disk.vhdx');
  const plain = join(files, 'lab-disk-plain.img');
  const original = plainDisk();
  await writeFile(input, original);

  // What the page hears: the id each disk call is made under, and every progress event on the WebSocket.
  const calls: { method: string; callId: string }[] = [];
  const events: ProgressEvent[] = [];
  page.on('request', (r) => {
    const m = /^\/api\/call\/(disk\.\w+)$/.exec(new URL(r.url()).pathname);
    if (m) calls.push({ method: m[1]!, callId: r.headers()['x-call-id'] ?? '' });
  });
  page.on('websocket', (ws) =>
    ws.on('framereceived', (frame) => {
      const event = JSON.parse(String(frame.payload)) as { type: string };
      if (event.type === 'progress') events.push(event as ProgressEvent);
    }),
  );
  const eventsOf = (method: string) => {
    const callId = calls.find((c) => c.method === method)?.callId;
    return events.filter((e) => e.callId === callId);
  };

  const shieldForm = page.getByRole('region', { name: 'Shield a disk' });
  const openPanel = page.getByRole('region', { name: 'Open a shielded disk' });
  const unshieldPanel = page.getByRole('region', { name: 'Unshield' });

  await test.step('the Disks view: only a guardian held here and backed up may own a disk, and the form says why', async () => {
    await page.goto(server.url);
    await expect(page.getByTestId('status-vault')).toHaveText('Unlocked');
    await page.getByRole('navigation', { name: 'Main' }).getByRole('link', { name: 'Disks' }).click();
    await expect(page.getByRole('heading', { name: 'Disks', level: 1 })).toBeVisible();
    await expect(openPanel.getByText('Enter the path of a shielded disk')).toBeVisible();
    const owner = shieldForm.getByLabel('Owner');
    await expect(owner.locator('option')).toHaveText([OWNER, `${SECOND} (not backed up)`]);
    await expect(owner.locator('option', { hasText: SECOND })).toBeDisabled();
    await expect(owner).toHaveValue(OWNER);
    await expect(shieldForm.getByTestId('owner-unavailable')).toHaveText(
      `Greyed out: ${SECOND} is not backed up. Back a guardian up by exporting its PFX files on the Guardians page, or with a vault backup.`,
    );
    await expect(shieldForm.getByRole('checkbox', { name: SECOND })).not.toBeChecked();
    await expect(shieldForm.getByLabel('TPM')).toBeChecked();
    await expect(shieldForm.getByLabel('Host key')).toBeChecked();
    await expect(shieldForm.getByLabel('AD group')).not.toBeChecked();
  });

  await test.step('shield the raw disk: the progress bar follows the call’s progress events to 100%', async () => {
    const seen = await recordProgressBars(page);
    await shieldForm.getByLabel('Disk to shield').fill(input);
    await shieldForm.getByLabel('Shielded VHDX to write').fill(shielded);
    await shieldForm.getByRole('button', { name: 'Shield disk' }).click();

    const label = 'Shielding lab-disk.img into lab-disk.vhdx';
    const bar = shieldForm.getByRole('progressbar', { name: label });
    await expect(shieldForm.getByRole('status').filter({ hasText: 'Shielded' })).toHaveText(`Shielded ${input} into ${shielded}: 3 of 4 blocks hold data.`);
    await expect(bar).toHaveAttribute('max', String(SIZE));
    await expect(bar).toHaveAttribute('value', String(SIZE));
    await expect(shieldForm.getByTestId('transfer-percent')).toHaveText('100%');
    await expect(shieldForm.getByTestId('transfer-detail')).toHaveText(/^8 MiB in [\d.]+ (s|min)( \([\d.]+ [KMG]iB\/s\))?\.$/);
    await expect(shieldForm.getByRole('button', { name: 'Shield disk' })).toBeEnabled();
    await expect(shieldForm.getByLabel('Disk to shield')).toHaveValue('');

    // The events of this call (by its X-Call-Id) reached the page: bytes, rising, ending at the whole disk.
    await expect.poll(() => eventsOf('disk.shield').at(-1)?.done).toBe(SIZE);
    const mine = eventsOf('disk.shield');
    expect(mine.length).toBeGreaterThanOrEqual(2);
    for (const e of mine) expect(e).toMatchObject({ method: 'disk.shield', unit: 'bytes', total: SIZE });
    expect(mine.map((e) => e.done)).toEqual([...mine.map((e) => e.done)].sort((a, b) => a - b));
    // And the bar only ever moved forward, to the end.
    const values = await seen(label);
    expect(values.length).toBeGreaterThanOrEqual(1);
    expect(values.map((v) => v.value)).toEqual([...values.map((v) => v.value)].sort((a, b) => a - b));
    expect(values.at(-1)).toEqual({ label, value: SIZE, max: SIZE });

    const ciphertext = await readFile(shielded);
    expect(ciphertext.indexOf(MARKER)).toBe(-1);
  });

  await test.step('the new disk is open: size, cipher, unit, id, generation, blocks and its key protector', async () => {
    await expect(openPanel.getByLabel('Shielded disk file')).toHaveValue(shielded);
    await expect(page.getByTestId('kp-summary')).toHaveText(
      `Owned by ${OWNER}. Only the owner may run this VM, after host-key or tpm attestation. This host holds ${OWNER}.`,
    );
    await expect(page.getByTestId('disk-size')).toHaveText(/^8 MiB \(8\D?388\D?608 bytes\)$/);
    await expect(page.getByTestId('disk-cipher')).toHaveText('AES-256-XTS');
    await expect(page.getByTestId('disk-unit')).toHaveText('4 KiB');
    await expect(page.getByTestId('disk-blocks')).toHaveText('3 with data · 1 never written (2 MiB each)');
    await expect(page.getByTestId('disk-id')).toHaveText(/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i);
    await expect(page.getByTestId('disk-generation')).toHaveText('1');
    await expect(page.getByTestId('kp-modes')).toHaveText('host-key or tpm');
    const rows = page.getByTestId('kp-guardians').locator('tbody tr');
    await expect(rows).toHaveCount(1);
    await expect(rows.first().getByRole('rowheader')).toHaveText(OWNER);
    await expect(rows.first().getByRole('cell')).toHaveText(['Owner', 'held here', /^[0-9A-F]{8}…[0-9A-F]{4}$/, '']);
    await page.screenshot({ path: join(ROOT, 'test-results/e2e-disks.png'), fullPage: true });
  });

  await test.step('a file that is not a shielded disk is refused in words; the disk opens again by path', async () => {
    await openPanel.getByLabel('Shielded disk file').fill(input);
    await openPanel.getByRole('button', { name: 'Open' }).click();
    await expect(openPanel.getByRole('alert')).toHaveText(/^Cannot open it: .*not a VHDX file/);
    await expect(openPanel.getByRole('alert')).not.toContainText(/\bat \S+:\d+/); // words, never a stack
    await expect(page.getByTestId('disk-details')).toHaveCount(0);
    await openPanel.getByLabel('Shielded disk file').fill(shielded);
    await openPanel.getByRole('button', { name: 'Open' }).click();
    await expect(page.getByTestId('kp-summary')).toContainText(`Owned by ${OWNER}.`);
    await expect(openPanel.getByRole('alert')).toHaveCount(0);
  });

  await test.step('grant a second guardian, then revoke it: the key protector changes, the data does not', async () => {
    const before = (await readFile(shielded)).length;
    const rows = page.getByTestId('kp-guardians').locator('tbody tr');
    await expect(openPanel.getByLabel('Grant another guardian')).toHaveValue(SECOND);
    await openPanel.getByRole('button', { name: 'Grant', exact: true }).click();
    await expect(openPanel.getByRole('status').filter({ hasText: 'Granted' })).toHaveText(
      `Granted ${SECOND}: it may now run this disk. Only the key protector was rewritten, not the data.`,
    );
    await expect(rows).toHaveCount(2);
    await expect(rows.nth(1).getByRole('rowheader')).toHaveText(SECOND);
    await expect(rows.nth(1).getByRole('cell').first()).toHaveText('Allowed to run');
    await expect(page.getByTestId('kp-summary')).toContainText(`${OWNER} and ${SECOND} may run this VM`);
    await expect(openPanel.getByLabel('Grant another guardian')).toBeDisabled(); // every known guardian is listed

    await openPanel.getByRole('button', { name: `Revoke ${SECOND}` }).click();
    await expect(openPanel.getByRole('status').filter({ hasText: 'Revoked' })).toHaveText(`Revoked ${SECOND}: the key protector no longer lists it.`);
    await expect(rows).toHaveCount(1);
    await expect(page.getByTestId('kp-summary')).toContainText('Only the owner may run this VM');
    await expect(page.getByTestId('disk-blocks')).toHaveText('3 with data · 1 never written (2 MiB each)');
    expect((await readFile(shielded)).length).toBe(before);
  });

  await test.step('unshield to a raw file with its own progress bar: byte for byte the original', async () => {
    await unshieldPanel.getByLabel('Plain disk to write').fill(plain);
    await unshieldPanel.getByRole('button', { name: 'Unshield' }).click();
    await expect(unshieldPanel.getByRole('status')).toHaveText(`Unshielded to ${plain} (raw image): 3 blocks with data written.`);
    const bar = unshieldPanel.getByRole('progressbar', { name: 'Unshielding lab-disk.vhdx to lab-disk-plain.img' });
    await expect(bar).toHaveAttribute('value', String(SIZE));
    await expect(unshieldPanel.getByTestId('transfer-percent')).toHaveText('100%');
    await expect.poll(() => eventsOf('disk.unshield').at(-1)?.done).toBe(SIZE);
    await expect(unshieldPanel.getByLabel('Plain disk to write')).toHaveValue('');

    const copy = await readFile(plain);
    expect(copy.length).toBe(original.length);
    expect(copy.equals(original)).toBe(true);
  });

  await test.step('an output that exists is refused in words, and nothing is written', async () => {
    const existing = await readFile(shielded);
    await shieldForm.getByLabel('Disk to shield').fill(input);
    await shieldForm.getByLabel('Shielded VHDX to write').fill(shielded);
    await shieldForm.getByRole('button', { name: 'Shield disk' }).click();
    await expect(shieldForm.getByRole('alert')).toHaveText(`Not shielded: ${shielded} already exists; nothing was written.`);
    await expect(shieldForm.getByRole('progressbar')).toHaveCount(0);
    await expect(shieldForm.getByRole('status')).toHaveCount(0);
    expect((await readFile(shielded)).equals(existing)).toBe(true);
    expect(existsSync(`${shielded}.partial`)).toBe(false);

    await unshieldPanel.getByLabel('Plain disk to write').fill(plain);
    await unshieldPanel.getByRole('button', { name: 'Unshield' }).click();
    await expect(unshieldPanel.getByRole('alert')).toHaveText(`Not unshielded: ${plain} already exists; nothing was written.`);
    expect((await readFile(plain)).equals(original)).toBe(true);
  });

  await test.step('the audit trail names the shield and the unshield', async () => {
    await page.getByRole('navigation', { name: 'Main' }).getByRole('link', { name: 'Audit' }).click();
    const audit = page.getByTestId('audit');
    for (const action of ['disk.shield', 'disk.grant', 'disk.revoke', 'disk.unshield']) {
      await expect(audit.getByRole('row').filter({ has: page.getByText(action, { exact: true }) }).first()).toContainText('ok');
    }
  });

  expect(errors).toEqual([]);
});

test('disks: a long shield is cancelled from its progress bar, and leaves no file behind', async ({ page }) => {
  const errors = watchForErrors(page);
  // 512 MiB that is nowhere zero: every block is encrypted, which takes seconds.
  const input = join(files, 'big-disk.img');
  const output = join(files, 'big-disk.vhdx');
  const piece = randomBytes(8 * MiB);
  const fd = openSync(input, 'w');
  for (let i = 0; i < 64; i++) writeSync(fd, piece);
  closeSync(fd);

  const answers: { path: string; status: number; body: string }[] = [];
  page.on('response', async (r) => {
    const path = new URL(r.url()).pathname;
    if (/^\/api\/(call\/disk\.shield|cancel\/)/.test(path)) answers.push({ path, status: r.status(), body: await r.text().catch(() => '') });
  });

  await page.goto(server.url);
  await expect(page.getByTestId('status-vault')).toHaveText('Unlocked');
  await page.getByRole('navigation', { name: 'Main' }).getByRole('link', { name: 'Disks' }).click();
  const shieldForm = page.getByRole('region', { name: 'Shield a disk' });
  await expect(shieldForm.getByLabel('Owner')).toHaveValue(OWNER);

  await shieldForm.getByLabel('Disk to shield').fill(input);
  await shieldForm.getByLabel('Shielded VHDX to write').fill(output);
  await shieldForm.getByRole('button', { name: 'Shield disk' }).click();
  const bar = shieldForm.getByRole('progressbar', { name: 'Shielding big-disk.img into big-disk.vhdx' });
  await expect(bar).toHaveAttribute('value', /^[1-9]\d*$/); // the first progress events arrived
  expect(Number(await bar.getAttribute('value'))).toBeLessThan(512 * MiB);
  expect(existsSync(`${output}.partial`)).toBe(true);

  // What the button and the line beneath the bar show between the click and the answer, however short.
  await page.evaluate(() => {
    const seen: string[] = [];
    (window as unknown as { cancelSeen: string[] }).cancelSeen = seen;
    const look = () => {
      const button = document.querySelector<HTMLButtonElement>('[data-testid="transfer"] button');
      const detail = document.querySelector('[data-testid="transfer-detail"]')?.textContent ?? '';
      seen.push(`${button ? `${button.textContent}${button.disabled ? ' (disabled)' : ''}` : 'no button'} | ${detail}`);
    };
    new MutationObserver(look).observe(document.body, { subtree: true, childList: true, attributes: true, characterData: true });
  });
  const cancel = shieldForm.getByRole('button', { name: 'Cancel', exact: true });
  await expect(cancel).toBeEnabled();
  await cancel.click();

  await expect(shieldForm.getByRole('status').filter({ hasText: 'Cancelled' })).toHaveText('Cancelled — nothing was written.');
  const seen = await page.evaluate(() => (window as unknown as { cancelSeen: string[] }).cancelSeen);
  expect(seen).toContain('Cancel (disabled) | Cancelling…');
  await expect(shieldForm.getByRole('progressbar')).toHaveCount(0);
  await expect(shieldForm.getByRole('button', { name: 'Cancel', exact: true })).toHaveCount(0);
  await expect(shieldForm.getByRole('alert')).toHaveCount(0);
  await expect(shieldForm.getByRole('button', { name: 'Shield disk' })).toBeEnabled();
  await expect(shieldForm.getByLabel('Disk to shield')).toHaveValue(input); // kept, to try again

  // The server stopped it: the cancel landed (204), the call answered `cancelled`, and the core removed its output.
  await expect.poll(() => answers.length).toBeGreaterThanOrEqual(2);
  expect(answers.filter((a) => a.path.startsWith('/api/cancel/')).map((a) => a.status)).toContain(204);
  const call = answers.find((a) => a.path === '/api/call/disk.shield')!;
  expect(call.status).toBe(409);
  expect(JSON.parse(call.body)).toMatchObject({ ok: false, error: { code: 'cancelled' } });
  expect(existsSync(output)).toBe(false);
  expect(existsSync(`${output}.partial`)).toBe(false);
  expect(errors).toEqual([]);
});
