// No plaintext at rest: after a full lifecycle through the CLI, no byte of any file under the home
// folder (vault.db, -wal, -shm, the backup) holds a secret value, a passphrase, a recovery share or
// key material — searched as raw bytes/UTF-8, UTF-16LE, base64 (every alignment, standard and URL
// alphabets) and hex (both cases, also as UTF-16LE text). The home is scanned after every step, and
// once more while a session holds the vault open with a non-empty WAL. Passphrase and value files
// live outside the home.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import Database from 'better-sqlite3';
import { ShieldLabApp } from '../../core/app/service.ts';
import { Vault } from '../../core/vault/mod.ts';
import { aeadOpen, deriveKeyFromPassphrase, hkdf, type ScryptParams } from '../../core/crypto/mod.ts';
import { cliJson, secretFile, tempDir } from '../helpers/home.ts';

// ---- the scanner --------------------------------------------------------------------------------

interface Needle {
  label: string;
  forms: { form: string; bytes: Buffer }[];
}

/** Base64 of `bytes` at each of the 3 alignments it can take inside a longer base64 text. */
function base64Alignments(bytes: Buffer, url: boolean): string[] {
  const out: string[] = [];
  for (let k = 0; k < 3; k++) {
    const text = Buffer.concat([Buffer.alloc(k), bytes]).toString(url ? 'base64url' : 'base64');
    const start = Math.ceil((8 * k) / 6);
    const end = Math.floor((8 * (k + bytes.length)) / 6);
    out.push(text.slice(start, end));
  }
  return out;
}

/** Every encoding a value might be stored in. */
function encodings(label: string, raw: Buffer, text?: string): Needle {
  const forms: { form: string; bytes: Buffer }[] = [{ form: 'raw/utf-8', bytes: raw }];
  if (text !== undefined) forms.push({ form: 'utf-16le', bytes: Buffer.from(text, 'utf16le') });
  const ascii: [string, string][] = [
    ['hex', raw.toString('hex')],
    ['HEX', raw.toString('hex').toUpperCase()],
    ...base64Alignments(raw, false).map((s, k) => [`base64@${k}`, s] as [string, string]),
    ...base64Alignments(raw, true).map((s, k) => [`base64url@${k}`, s] as [string, string]),
  ];
  for (const [form, s] of ascii) {
    forms.push({ form, bytes: Buffer.from(s, 'latin1') });
    forms.push({ form: `${form} as utf-16le`, bytes: Buffer.from(s, 'utf16le') });
  }
  for (const f of forms) assert.ok(f.bytes.length >= 12, `${label}/${f.form}: needle too short to be meaningful`);
  return { label, forms };
}

const textNeedle = (label: string, text: string) => encodings(label, Buffer.from(text, 'utf8'), text);
const keyNeedle = (label: string, key: Buffer) => encodings(label, Buffer.from(key));

function filesUnder(dir: string): string[] {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { withFileTypes: true, recursive: true })
    .filter((d) => d.isFile())
    .map((d) => join(d.parentPath, d.name));
}

function scan(files: string[], needles: Needle[]): string[] {
  const hits: string[] = [];
  for (const file of files) {
    const bytes = readFileSync(file);
    for (const n of needles) {
      for (const f of n.forms) {
        const at = bytes.indexOf(f.bytes);
        if (at >= 0) hits.push(`${file}: ${n.label} (${f.form}) at byte ${at}`);
      }
    }
  }
  return hits;
}

test('the scanner finds what it looks for (so a clean scan means something)', () => {
  const value = 'sk_live_scanner-selftest-0123456789';
  const needle = textNeedle('v', value);
  const plain = Buffer.from(value);
  for (const [what, hay] of [
    ['utf-8', Buffer.concat([randomBytes(10), plain, randomBytes(10)])],
    ['utf-16le', Buffer.from(`xx${value}yy`, 'utf16le')],
    ['base64 @0', Buffer.from(plain.toString('base64'))],
    ['base64 @1', Buffer.from(Buffer.concat([Buffer.from('a'), plain]).toString('base64'))],
    ['base64 @2', Buffer.from(Buffer.concat([Buffer.from('ab'), plain, Buffer.from('z')]).toString('base64'))],
    ['base64url @1 in utf-16', Buffer.from(Buffer.concat([Buffer.from('a'), plain]).toString('base64url'), 'utf16le')],
    ['hex', Buffer.from(`00${plain.toString('hex').toUpperCase()}ff`)],
  ] as const) {
    const { dir, cleanup } = tempDir();
    try {
      const f = join(dir, 'hay');
      writeFileSync(f, hay);
      assert.ok(scan([f], [needle]).length > 0, `${what} not found`);
    } finally {
      cleanup();
    }
  }
});

// ---- the lifecycle ------------------------------------------------------------------------------

interface KeyMaterial {
  vaultKey: Buffer;
  lookupKey: Buffer;
  auditPrivateKey: Buffer;
  passphraseKek: Buffer;
  recoveryKey?: Buffer;
  backupKey?: Buffer;
}

/** Opens the vault in-process (core/vault) and collects every key it can reach. */
async function keyMaterial(home: string, passphrase: string): Promise<KeyMaterial> {
  const vault = Vault.open(home);
  let out: KeyMaterial;
  try {
    await vault.unlock({ passphrase: Buffer.from(passphrase) });
    const { vaultKey } = vault.snapshot();
    let recovery: { key: Buffer } | undefined;
    try {
      recovery = vault.recoveryKey();
    } catch {
      recovery = undefined;
    }
    const db = new Database(join(home, 'vault.db'), { readonly: true });
    let params: ScryptParams;
    let auditSealed: string;
    try {
      params = JSON.parse((db.prepare("SELECT params FROM key_slots WHERE kind = 'passphrase'").get() as { params: string }).params) as ScryptParams;
      auditSealed = (db.prepare("SELECT value FROM meta WHERE key = 'audit_private_sealed'").get() as { value: string }).value;
    } finally {
      db.close();
    }
    const auditPrivateKey = aeadOpen(vaultKey, Buffer.from(auditSealed, 'base64'), Buffer.from(`shieldlab/audit-key/v1|${vault.vaultId}`));
    assert.ok(auditPrivateKey, 'the audit private key opens');
    out = {
      vaultKey,
      lookupKey: hkdf(vaultKey, 'shieldlab/lookup/v1'),
      auditPrivateKey,
      passphraseKek: await deriveKeyFromPassphrase(Buffer.from(passphrase), params),
      ...(recovery ? { recoveryKey: recovery.key, backupKey: hkdf(recovery.key, 'shieldlab/backup/v1') } : {}),
    };
  } finally {
    vault.close();
  }
  return out;
}

function keyNeedles(tag: string, k: KeyMaterial): Needle[] {
  const needles = [
    keyNeedle(`${tag} vault key`, k.vaultKey),
    keyNeedle(`${tag} lookup key`, k.lookupKey),
    keyNeedle(`${tag} audit private key (PKCS#8)`, k.auditPrivateKey),
    // The raw X25519 scalar is the last 32 bytes of the PKCS#8 encoding.
    keyNeedle(`${tag} audit private scalar`, k.auditPrivateKey.subarray(k.auditPrivateKey.length - 32)),
    keyNeedle(`${tag} passphrase KEK`, k.passphraseKek),
  ];
  if (k.recoveryKey) needles.push(keyNeedle(`${tag} recovery key`, k.recoveryKey));
  if (k.backupKey) needles.push(keyNeedle(`${tag} backup key`, k.backupKey));
  return needles;
}

/** Decodes a printed share (SL1-XXXX-…) to its bytes, for a binary search as well. */
function shareBytes(share: string): Buffer {
  const ALPHABET = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
  let bits = 0;
  let value = 0;
  const out: number[] = [];
  for (const ch of share.replace(/-/g, '').slice(3)) {
    value = ((value << 5) | ALPHABET.indexOf(ch)) & 0xffff;
    bits += 5;
    if (bits >= 8) {
      out.push((value >>> (bits - 8)) & 0xff);
      bits -= 8;
    }
  }
  return Buffer.from(out);
}

test('after a full CLI lifecycle no file under the home holds a secret, passphrase, share or key', async (t) => {
  const { dir, cleanup } = tempDir('shieldlab-scan-');
  t.after(cleanup);
  const home = join(dir, 'home');
  const outside = join(dir, 'outside');
  mkdirSync(outside, { mode: 0o700 });
  const tag = randomBytes(6).toString('hex');
  const pass1 = `first passphrase, long enough ${tag}`;
  const pass2 = `second passphrase after the change ${tag}`;
  const pp1 = secretFile(outside, 'pp1', pass1);
  const pp2 = secretFile(outside, 'pp2', pass2);
  const secrets: Record<string, string> = {
    'db-password': `Tr0ub4dor&3-correct-horse-battery-staple-${tag}`,
    'api-token': `sk_live_${randomBytes(24).toString('hex')}`,
    'unicode-note': `Grüße aus Zürich — 秘密のメモ ${tag}`,
    'ssh-key': `-----BEGIN OPENSSH PRIVATE KEY-----\n${randomBytes(600).toString('base64')}\n-----END OPENSSH PRIVATE KEY-----`,
    'to-delete': `this value is deleted later ${tag}`,
  };
  const late = `written by an in-process session at the end ${tag}`;
  const h = ['--home', home];
  const backupFile = join(home, 'backups', 'vault.slbackup');

  const needles: Needle[] = [textNeedle('passphrase 1', pass1), textNeedle('passphrase 2', pass2), textNeedle('late secret', late)];
  for (const [name, value] of Object.entries(secrets)) {
    needles.push(textNeedle(`secret ${name}`, value));
    // Long values: any 32-byte piece of them, too.
    if (value.length > 64) for (let i = 0; i + 32 <= value.length; i += 32) needles.push(textNeedle(`secret ${name}[${i}..${i + 32}]`, value.slice(i, i + 32)));
  }

  const scanned = new Set<string>();
  const hits: string[] = [];
  const check = (step: string) => {
    const files = filesUnder(home);
    for (const f of files) scanned.add(relative(home, f));
    for (const hit of scan(files, needles)) hits.push(`after ${step}: ${hit}`);
  };
  const cli = async (step: string, args: string[]) => {
    const r = await cliJson<Record<string, unknown>>([...h, ...args]);
    assert.equal(r.code, 0, `${step}: ${JSON.stringify(r.body).slice(0, 300)}\n${r.stderr}`);
    check(step);
    return r.body;
  };

  await cli('init', ['vault', 'init', '--no-keychain', '--passphrase-file', pp1, '--kdf-memory-mib', '16']);
  for (const [name, value] of Object.entries(secrets)) {
    await cli(`put ${name}`, ['vault', 'put', name, '--value-file', secretFile(outside, `${name}.value`, value), '--tags', 'scan', '--passphrase-file', pp1]);
  }
  const got = await cli('get', ['vault', 'get', 'unicode-note', '--passphrase-file', pp1]);
  assert.equal(got.value, secrets['unicode-note']);
  await cli('delete', ['vault', 'delete', 'to-delete', '--passphrase-file', pp1]);

  const before = await keyMaterial(home, pass1);
  needles.push(...keyNeedles('original', before));
  check('key capture 1');

  const split = (await cli('recovery split', ['vault', 'recovery', 'split', '--shares', '5', '--threshold', '3', '--passphrase-file', pp1])) as { shares: string[] };
  assert.equal(split.shares.length, 5);
  for (const [i, share] of split.shares.entries()) {
    needles.push(textNeedle(`share ${i + 1}`, share), textNeedle(`share ${i + 1} without dashes`, share.replace(/-/g, '')), keyNeedle(`share ${i + 1} bytes`, shareBytes(share)));
  }
  const withRecovery = await keyMaterial(home, pass1);
  assert.ok(withRecovery.recoveryKey && withRecovery.backupKey);
  needles.push(keyNeedle('recovery key', withRecovery.recoveryKey), keyNeedle('backup key', withRecovery.backupKey));
  check('key capture 2');

  await cli('backup', ['vault', 'backup', '--out', backupFile, '--passphrase-file', pp1]);
  assert.ok(statSync(backupFile).size > 0);
  const rotated = await cli('rotate-key', ['vault', 'rotate-key', '--passphrase-file', pp1]);
  assert.equal(rotated.records, 5, 'four secrets and the recovery record re-encrypted');
  const afterRotation = await keyMaterial(home, pass1);
  assert.notDeepEqual(afterRotation.vaultKey, before.vaultKey, 'the vault key changed');
  needles.push(...keyNeedles('rotated', afterRotation));
  check('key capture 3');

  await cli('passphrase change', ['vault', 'passphrase', '--new-passphrase-file', pp2, '--kdf-memory-mib', '16', '--passphrase-file', pp1]);
  const afterChange = await keyMaterial(home, pass2);
  needles.push(keyNeedle('new passphrase KEK', afterChange.passphraseKek));
  check('key capture 4');
  await cli('lock', ['vault', 'lock']);

  // A session that holds the vault open: reads every secret and writes one, then the home is
  // scanned with the WAL and shared-memory files present.
  const app = new ShieldLabApp({ home });
  try {
    await app.invoke('vault.unlock', { passphrase: pass2 });
    for (const name of Object.keys(secrets).filter((n) => n !== 'to-delete')) {
      assert.equal(((await app.invoke('vault.get', { name })) as { value: string }).value, secrets[name]);
    }
    await app.invoke('vault.put', { name: 'late', value: late });
    assert.ok(existsSync(join(home, 'vault.db-wal')) && statSync(join(home, 'vault.db-wal')).size > 0, 'the WAL holds the session’s writes');
    assert.ok(existsSync(join(home, 'vault.db-shm')));
    check('an open session (WAL present)');
    await app.invoke('vault.lock', {});
    check('lock in the open session');
  } finally {
    app.close();
  }
  check('the session closed');

  // The data is all still there (the scan found nothing because it is encrypted, not because it is gone).
  const list = await cliJson<{ records: { name: string }[] }>([...h, 'vault', 'list', '--kind', 'secret', '--passphrase-file', pp2]);
  assert.deepEqual(list.body.records.map((r) => r.name).sort(), ['api-token', 'db-password', 'late', 'ssh-key', 'unicode-note']);
  // And the values really were on disk outside the home, where the scanner does see them.
  assert.ok(scan(filesUnder(outside), needles).length >= Object.keys(secrets).length + 2, 'the scanner sees the files outside the home');

  for (const f of ['vault.db', 'vault.db-wal', 'vault.db-shm', 'backups/vault.slbackup']) assert.ok(scanned.has(f), `${f} was scanned`);
  t.diagnostic(`scanned ${[...scanned].sort().join(', ')} with ${needles.length} needles × ${needles[0]!.forms.length} encodings after every step`);
  assert.deepEqual(hits, [], `plaintext found:\n  ${hits.join('\n  ')}`);
});
