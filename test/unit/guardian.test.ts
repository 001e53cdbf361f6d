import { test } from 'node:test';
import assert from 'node:assert/strict';
import { constants, createHash, createPrivateKey, createPublicKey, generateKeyPairSync, privateDecrypt, publicEncrypt, randomBytes, sign, verify, X509Certificate, type KeyObject } from 'node:crypto';
import forge from 'node-forge';
import {
  describeCertificate,
  expiryWarning,
  exportGuardianPfx,
  exportPublicGuardian,
  generateGuardian,
  GuardianStore,
  importGuardianPfx,
  parsePublicGuardian,
  validateGuardianName,
  type GeneratedGuardian,
} from '../../core/guardian/mod.ts';
import { pkcs12Kdf, MAX_ITERATIONS } from '../../core/guardian/pfx.ts';
import { Vault } from '../../core/vault/mod.ts';
import { defaultGuardianHost as defaultHost } from '../../core/guardian/mod.ts';
import { ShieldError } from '../../core/errors.ts';
import { tempDir } from '../helpers/home.ts';

const code = (c: string) => (err: unknown) => err instanceof ShieldError && err.code === c;
const kdf = { N: 1 << 14, r: 8, p: 1 };
const DAY = 86_400_000;

// One guardian for the pure tests: RSA generation is the slow part.
let shared: GeneratedGuardian | undefined;
const guardian = () => (shared ??= generateGuardian('Owner', { host: 'LAB1' }));

function bmp(text: string): Buffer {
  const b = Buffer.alloc((text.length + 1) * 2);
  for (let i = 0; i < text.length; i++) b.writeUInt16BE(text.charCodeAt(i), i * 2);
  return b;
}

/** A certificate made outside generateGuardian (forge structure, node:crypto signature), for the odd cases. */
function certWith(opts: { cn: string; usage: Record<string, boolean>; key?: { publicKey: KeyObject; privateKey: KeyObject }; bits?: number }): { pem: string; privateKey: KeyObject } {
  const key = opts.key ?? generateKeyPairSync('rsa', { modulusLength: opts.bits ?? 2048 });
  const cert = forge.pki.createCertificate();
  cert.publicKey = forge.pki.publicKeyFromPem(key.publicKey.export({ type: 'spki', format: 'pem' }) as string);
  cert.serialNumber = '4f' + randomBytes(15).toString('hex');
  cert.validity.notBefore = new Date();
  cert.validity.notAfter = new Date(Date.now() + 365 * DAY);
  cert.setSubject([{ shortName: 'CN', value: opts.cn }]);
  cert.setIssuer([{ shortName: 'CN', value: opts.cn }]);
  cert.setExtensions([{ name: 'keyUsage', critical: true, ...opts.usage }]);
  const oid = forge.pki.oids['sha256WithRSAEncryption']!;
  cert.siginfo.algorithmOid = oid;
  cert.signatureOid = oid;
  const tbs = Buffer.from(forge.asn1.toDer((forge.pki as unknown as { getTBSCertificate(c: unknown): forge.asn1.Asn1 }).getTBSCertificate(cert)).getBytes(), 'binary');
  cert.signature = sign('sha256', tbs, key.privateKey).toString('binary');
  return { pem: forge.pki.certificateToPem(cert), privateKey: key.privateKey };
}

function pfxOf(key: KeyObject | null, certPems: string[], password: string | null, opts: Record<string, unknown> = {}): Buffer {
  const forgeKey = key ? forge.pki.privateKeyFromPem(key.export({ type: 'pkcs8', format: 'pem' }) as string) : null;
  const certs = certPems.map((p) => forge.pki.certificateFromPem(p));
  const asn = forge.pkcs12.toPkcs12Asn1(forgeKey, certs.length ? certs : (null as unknown as forge.pki.Certificate[]), password, { algorithm: '3des', ...opts } as Parameters<typeof forge.pkcs12.toPkcs12Asn1>[3]);
  return Buffer.from(forge.asn1.toDer(asn).getBytes(), 'binary');
}

// ---- certificates ------------------------------------------------------------------------------

test('generated certificates have Hyper-V subjects, key usages, a random positive serial and 10-year validity', () => {
  const now = new Date('2030-01-02T03:04:05.678Z');
  const t0 = performance.now();
  const g = generateGuardian('UntrustedGuardian', { host: 'HV01', now });
  const ms = performance.now() - t0;
  const s = describeCertificate(g.certs.signingCertPem);
  const e = describeCertificate(g.certs.encryptionCertPem);
  assert.equal(s.subject, 'CN=Shielded VM Signing Certificate (UntrustedGuardian) (HV01)');
  assert.equal(e.subject, 'CN=Shielded VM Encryption Certificate (UntrustedGuardian) (HV01)');
  assert.equal(s.issuer, s.subject);
  assert.deepEqual(s.keyUsage, ['digitalSignature']);
  assert.deepEqual(e.keyUsage, ['keyEncipherment', 'dataEncipherment']);
  assert.equal(s.notBefore, '2030-01-02T03:04:05.000Z');
  assert.equal(s.notAfter, '2040-01-02T03:04:05.000Z');
  assert.equal(s.publicKeyBits, 2048);
  assert.match(s.serial, /^[4-7][0-9A-F]{31}$/); // 16 bytes, top bit clear
  assert.notEqual(s.serial, e.serial);
  for (const [pem, keyPem] of [
    [g.certs.signingCertPem, g.keys.signingKeyPem],
    [g.certs.encryptionCertPem, g.keys.encryptionKeyPem],
  ] as const) {
    const x = new X509Certificate(pem);
    assert.equal(x.verify(x.publicKey), true, 'self-signed');
    assert.equal(x.ca, false);
    assert.match(keyPem, /^-----BEGIN PRIVATE KEY-----\n/);
    assert.equal(createPublicKey(keyPem).equals(x.publicKey), true);
    const info = describeCertificate(pem);
    assert.equal(info.thumbprint, createHash('sha1').update(x.raw).digest('hex').toUpperCase());
    assert.equal(info.sha256, x.fingerprint256.replace(/:/g, ''));
    // subjectKeyIdentifier and basicConstraints are present (forge reads them back)
    const names = forge.pki.certificateFromPem(pem).extensions.map((x: { name: string }) => x.name);
    assert.deepEqual(names.sort(), ['basicConstraints', 'keyUsage', 'subjectKeyIdentifier']);
  }
  assert.equal(createPublicKey(g.keys.signingKeyPem).equals(createPublicKey(g.keys.encryptionKeyPem)), false);
  console.log(`guardian create (2 × RSA-2048 + certificates): ${ms.toFixed(0)} ms`);
});

test('guardian names are validated with a typed error', () => {
  for (const bad of ['', 'a(b', 'x)', 'tab\there', 'nl\n', ' lead', 'trail ', 'x'.repeat(65), 'rtl\u202Eoverride', '\uD800']) {
    assert.throws(() => validateGuardianName(bad), code('invalid_argument'), JSON.stringify(bad));
    assert.throws(() => generateGuardian(bad, { host: 'h' }), code('invalid_argument'));
  }
  assert.throws(() => generateGuardian('ok', { host: 'bad(host)' }), code('invalid_argument'));
  assert.throws(() => generateGuardian('ok', { host: 'h', modulusLength: 1024 }), code('invalid_argument'));
  assert.throws(() => generateGuardian('ok', { host: 'h', validityYears: 0 }), code('invalid_argument'));
  for (const good of ['a', 'x'.repeat(64), 'Lab owner, 2nd', 'Zürich-Ω', 'a\\b"c+d;e<f>g=h#']) assert.equal(validateGuardianName(good), good);
});

test('names with RFC 2253 special characters survive the subject round trip', () => {
  const g = generateGuardian('a,b+c "q" \\ #1', { host: 'hé', modulusLength: 2048 });
  const parsed = parsePublicGuardian(exportPublicGuardian({ name: 'renamed', certs: g.certs }));
  assert.equal(parsed.name, 'renamed');
  assert.equal(parsed.host, 'hé');
  const bundle = parsePublicGuardian(g.certs.encryptionCertPem + g.certs.signingCertPem);
  assert.equal(bundle.name, 'a,b+c "q" \\ #1');
});

test('expiry warnings: none, soon (< 90 days), expired', () => {
  const notAfter = '2030-06-01T00:00:00.000Z';
  const at = (days: number) => new Date(Date.parse(notAfter) - days * DAY);
  assert.equal(expiryWarning({ notAfter }, at(400)), null);
  assert.equal(expiryWarning({ notAfter }, at(90)), null);
  assert.deepEqual(expiryWarning({ notAfter }, at(89.5)), { level: 'soon', daysLeft: 89 });
  assert.deepEqual(expiryWarning({ notAfter }, at(1)), { level: 'soon', daysLeft: 1 });
  assert.deepEqual(expiryWarning({ notAfter }, at(0)), { level: 'expired', daysLeft: 0 });
  assert.deepEqual(expiryWarning({ notAfter }, at(-3)), { level: 'expired', daysLeft: -3 });
});

// ---- public guardian files ---------------------------------------------------------------------

test('public guardian file: JSON round trip, PEM bundle in either order', () => {
  const g = guardian();
  const text = exportPublicGuardian({ name: 'Owner', certs: g.certs });
  const json = JSON.parse(text) as Record<string, string>;
  assert.deepEqual(Object.keys(json), ['format', 'name', 'signingCertificate', 'encryptionCertificate']);
  assert.equal(json.format, 'shieldlab-guardian/1');
  assert.doesNotMatch(text, /PRIVATE KEY/);
  const back = parsePublicGuardian(Buffer.from(text));
  assert.deepEqual(back, { name: 'Owner', host: 'LAB1', certs: g.certs });
  for (const bundle of [g.certs.signingCertPem + g.certs.encryptionCertPem, `\uFEFF${g.certs.encryptionCertPem}\r\n${g.certs.signingCertPem}`]) {
    assert.deepEqual(parsePublicGuardian(bundle), { name: 'Owner', host: 'LAB1', certs: g.certs });
  }
});

test('public guardian file: what is refused, with guardian_invalid', () => {
  const g = guardian();
  const other = generateGuardian('Other', { host: 'LAB1' });
  const json = (patch: Record<string, unknown>) =>
    JSON.stringify({ format: 'shieldlab-guardian/1', name: 'Owner', signingCertificate: g.certs.signingCertPem, encryptionCertificate: g.certs.encryptionCertPem, ...patch });
  const weak = certWith({ cn: 'Shielded VM Encryption Certificate (Owner) (LAB1)', usage: { keyEncipherment: true }, bits: 1024 });
  const ec = (() => {
    const k = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const c = new X509Certificate(certWithEc(k));
    return c.toString();
  })();
  const noUsage = certWith({ cn: 'Shielded VM Encryption Certificate (Owner) (LAB1)', usage: { digitalSignature: true } });
  const cases: [string, string][] = [
    ['empty', ''],
    ['not JSON', '{ nope'],
    ['JSON array', '[1]'],
    ['wrong format', json({ format: 'other/1' })],
    ['swapped roles', json({ signingCertificate: g.certs.encryptionCertPem, encryptionCertificate: g.certs.signingCertPem })],
    ['two guardians', json({ encryptionCertificate: other.certs.encryptionCertPem })],
    ['same cert twice', g.certs.signingCertPem + g.certs.signingCertPem],
    ['one cert', g.certs.signingCertPem],
    ['three certs', g.certs.signingCertPem + g.certs.encryptionCertPem + other.certs.signingCertPem],
    ['a private key', g.certs.signingCertPem + g.certs.encryptionCertPem + guardian().keys.signingKeyPem],
    ['bad name', json({ name: 'x(y)' })],
    ['garbage cert', json({ signingCertificate: '-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n' })],
    ['1024-bit RSA', json({ encryptionCertificate: weak.pem })],
    ['EC key', json({ encryptionCertificate: ec })],
    ['encryption cert without keyEncipherment', json({ encryptionCertificate: noUsage.pem })],
    ['non-Hyper-V subjects', certWith({ cn: 'sign', usage: { digitalSignature: true } }).pem + certWith({ cn: 'enc', usage: { keyEncipherment: true } }).pem],
    ['too large', 'x'.repeat(300 * 1024)],
  ];
  for (const [what, input] of cases) {
    assert.throws(() => parsePublicGuardian(input), (err: unknown) => err instanceof ShieldError && err.code === 'guardian_invalid', what);
  }
  // A tampered self-signature is refused.
  const der = Buffer.from(new X509Certificate(g.certs.signingCertPem).raw);
  der[der.length - 5]! ^= 0x01;
  const tampered = `-----BEGIN CERTIFICATE-----\n${der.toString('base64')}\n-----END CERTIFICATE-----\n`;
  assert.throws(() => parsePublicGuardian(json({ signingCertificate: tampered })), /signature does not verify/);
});

function certWithEc(k: { publicKey: KeyObject; privateKey: KeyObject }): string {
  // forge cannot hold an EC key: splice an EC SPKI into a certificate and sign with ECDSA.
  const base = forge.pki.certificateFromPem(certWith({ cn: 'Shielded VM Encryption Certificate (Owner) (LAB1)', usage: { keyEncipherment: true } }).pem);
  const tbsAsn = (forge.pki as unknown as { getTBSCertificate(c: unknown): forge.asn1.Asn1 }).getTBSCertificate(base);
  const kids = tbsAsn.value as forge.asn1.Asn1[];
  kids[6] = forge.asn1.fromDer((k.publicKey.export({ type: 'spki', format: 'der' }) as Buffer).toString('binary'));
  const ecdsa = forge.asn1.create(forge.asn1.Class.UNIVERSAL, forge.asn1.Type.SEQUENCE, true, [
    forge.asn1.create(forge.asn1.Class.UNIVERSAL, forge.asn1.Type.OID, false, forge.asn1.oidToDer('1.2.840.10045.4.3.2').getBytes()),
  ]);
  kids[2] = ecdsa;
  const tbs = Buffer.from(forge.asn1.toDer(tbsAsn).getBytes(), 'binary');
  const sig = sign('sha256', tbs, k.privateKey);
  const cert = forge.asn1.create(forge.asn1.Class.UNIVERSAL, forge.asn1.Type.SEQUENCE, true, [
    tbsAsn,
    ecdsa,
    forge.asn1.create(forge.asn1.Class.UNIVERSAL, forge.asn1.Type.BITSTRING, false, `\u0000${sig.toString('binary')}`),
  ]);
  return `-----BEGIN CERTIFICATE-----\n${Buffer.from(forge.asn1.toDer(cert).getBytes(), 'binary').toString('base64')}\n-----END CERTIFICATE-----\n`;
}

// ---- PFX ---------------------------------------------------------------------------------------

test('PFX: export and import round trip; wrong password and damage are told apart; no secrets in messages', () => {
  const g = guardian();
  const password = 'correct horse ✓';
  const t0 = performance.now();
  const pfx = exportGuardianPfx(g, password);
  const ms = performance.now() - t0;
  console.log(`PFX export (both files, 3DES/SHA-1 MAC, 2048 iterations): ${ms.toFixed(0)} ms`);
  const back = importGuardianPfx(pfx, Buffer.from(password));
  assert.equal(back.name, 'Owner');
  assert.equal(back.host, 'LAB1');
  assert.deepEqual(back.certs, g.certs);
  assert.equal(createPublicKey(back.keys.signingKeyPem).equals(createPublicKey(g.keys.signingKeyPem)), true);
  assert.equal(createPublicKey(back.keys.encryptionKeyPem).equals(createPublicKey(g.keys.encryptionKeyPem)), true);

  const secretBits = [password, g.keys.signingKeyPem.slice(40, 80)];
  const expect = (fn: () => unknown, c: string, what: string) =>
    assert.throws(fn, (err: unknown) => {
      assert.ok(err instanceof ShieldError, `${what}: ${String(err)}`);
      assert.equal(err.code, c, `${what}: ${err.message}`);
      for (const s of secretBits) assert.ok(!err.message.includes(s) && !JSON.stringify(err.details ?? {}).includes(s), `${what}: leaks`);
      return true;
    });
  expect(() => importGuardianPfx(pfx, 'correct horse'), 'wrong_password', 'wrong password');
  expect(() => importGuardianPfx(pfx, ''), 'wrong_password', 'empty password');
  expect(() => importGuardianPfx({ signing: randomBytes(2000), encryption: pfx.encryption }, password), 'pfx_invalid', 'random bytes');
  expect(() => importGuardianPfx({ signing: Buffer.alloc(0), encryption: pfx.encryption }, password), 'pfx_invalid', 'empty file');
  expect(() => importGuardianPfx({ signing: Buffer.from(g.certs.signingCertPem), encryption: pfx.encryption }, password), 'pfx_invalid', 'a PEM');
  expect(() => importGuardianPfx({ signing: pfx.encryption, encryption: pfx.signing }, password), 'guardian_invalid', 'swapped files');
  expect(() => importGuardianPfx({ signing: pfx.signing, encryption: pfx.signing }, password), 'guardian_invalid', 'same file twice');
  expect(() => exportGuardianPfx(g, ''), 'invalid_argument', 'export without password');
  expect(() => exportGuardianPfx({ certs: g.certs, keys: { ...g.keys, signingKeyPem: g.keys.encryptionKeyPem } }, password), 'guardian_invalid', 'export with a foreign key');

  const sKey = { privateKey: createPrivateKey(g.keys.signingKeyPem) };
  const foreign = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey;
  expect(() => importGuardianPfx({ signing: pfxOf(foreign, [g.certs.signingCertPem], password), encryption: pfx.encryption }, password), 'pfx_invalid', 'key/cert mismatch');
  expect(() => importGuardianPfx({ signing: pfxOf(null, [g.certs.signingCertPem], password), encryption: pfx.encryption }, password), 'pfx_invalid', 'no key');
  expect(() => importGuardianPfx({ signing: pfxOf(sKey.privateKey, [], password), encryption: pfx.encryption }, password), 'pfx_invalid', 'no certificate');
  // The matching certificate is found among others (a chain).
  const chained = pfxOf(sKey.privateKey, [g.certs.encryptionCertPem, g.certs.signingCertPem], password);
  assert.deepEqual(importGuardianPfx({ signing: chained, encryption: pfx.encryption }, password).certs, g.certs);
});


test('PFX: a file asking for too many key-derivation iterations is refused before any work', () => {
  const g = guardian();
  const pfx = exportGuardianPfx(g, 'pw').signing;
  const asn = forge.asn1.fromDer(pfx.toString('binary'));
  const macData = (asn.value as forge.asn1.Asn1[])[2]!;
  (macData.value as forge.asn1.Asn1[])[2]!.value = String.fromCharCode(0x7f, 0xff, 0xff, 0xff);
  const patched = Buffer.from(forge.asn1.toDer(asn).getBytes(), 'binary');
  const t0 = performance.now();
  assert.throws(() => importGuardianPfx({ signing: patched, encryption: patched }, 'pw'), (err: unknown) => err instanceof ShieldError && err.code === 'pfx_invalid' && /iterations/.test(err.message));
  assert.ok(performance.now() - t0 < 1000);
  assert.ok(MAX_ITERATIONS >= 10_000, 'room for Java keytool and Windows counts');
});

test('PFX: an empty password and a NULL password both open, as OpenSSL allows', () => {
  const g = guardian();
  const { signingKeyPem } = g.keys;
  const key = createPrivateKey(signingKeyPem);
  const withEmpty = pfxOf(key, [g.certs.signingCertPem], '');
  const encryption = pfxOf(createPrivateKey(g.keys.encryptionKeyPem), [g.certs.encryptionCertPem], '');
  assert.equal(importGuardianPfx({ signing: withEmpty, encryption }, '').name, 'Owner');
  assert.throws(() => importGuardianPfx({ signing: withEmpty, encryption }, 'x'), code('wrong_password'));
  // No password at all: a MAC keyed by the empty string (not the empty BMPString) and a plain keyBag.
  const withNull = pfxOf(key, [g.certs.signingCertPem], null);
  assert.equal(importGuardianPfx({ signing: withNull, encryption }, '').name, 'Owner');
  assert.throws(() => importGuardianPfx({ signing: withNull, encryption }, 'x'), code('wrong_password'));
});

test('PKCS#12 key derivation matches the published vector and forge, for every MAC hash', () => {
  // RFC 7292 appendix B.2 vector used by Bouncy Castle and OpenSSL tests: "smeg", SHA-1.
  assert.equal(pkcs12Kdf('sha1', 64, bmp('smeg'), Buffer.from('0A58CF64530D823F', 'hex'), 1, 1, 24).toString('hex'), '8aaae6297b6cb04642ab5b077851284eb7128f1a2a7fbca3');
  assert.equal(pkcs12Kdf('sha1', 64, bmp('smeg'), Buffer.from('0A58CF64530D823F', 'hex'), 2, 1, 8).toString('hex'), '79993dfe048d3b76');
  const mds = { sha1: forge.md.sha1, sha256: forge.md.sha256, sha384: forge.md.sha384, sha512: forge.md.sha512 } as const;
  for (const [name, md] of Object.entries(mds)) {
    const v = name === 'sha384' || name === 'sha512' ? 128 : 64;
    for (const [pw, saltLen, id, iter, n] of [
      ['queeg', 8, 3, 1000, 20],
      ['', 20, 1, 3, 70],
      ['pässwörd ✓', 65, 2, 2048, 150],
    ] as const) {
      const salt = randomBytes(saltLen);
      const ours = pkcs12Kdf(name, v, bmp(pw), salt, id, iter, n);
      const pbe = (forge.pki as unknown as { pbe: { generatePkcs12Key(p: string, s: unknown, id: number, iter: number, n: number, md: unknown): forge.util.ByteStringBuffer } }).pbe;
      const theirs = pbe.generatePkcs12Key(pw, forge.util.createBuffer(salt.toString('binary')), id, iter, n, md.create());
      assert.equal(ours.toString('hex'), Buffer.from(theirs.getBytes(), 'binary').toString('hex'), `${name} ${pw} ${saltLen}`);
    }
  }
});

// ---- the store --------------------------------------------------------------------------------

async function vaultIn(dir: string): Promise<Vault> {
  return Vault.create(dir, { passphrase: Buffer.from('x'), kdf });
}

test('store: create, list, and the private keys sign (RSA-PSS) and decrypt (RSA-OAEP-SHA-256)', async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const vault = await vaultIn(dir);
  t.after(() => vault.close());
  const store = new GuardianStore(vault, { host: () => 'WS1' });
  const info = store.create('Owner');
  assert.equal(info.name, 'Owner');
  assert.equal(info.host, 'WS1');
  assert.equal(info.source, 'generated');
  assert.equal(info.hasPrivateKeys, true);
  assert.equal(info.backedUpAt, null);
  assert.equal(info.warning, null);
  assert.equal(info.signing.subject, 'CN=Shielded VM Signing Certificate (Owner) (WS1)');
  assert.deepEqual(store.list(), [info]);
  assert.deepEqual(store.get('Owner'), info);
  assert.throws(() => store.create('Owner'), code('already_exists'));
  assert.throws(() => store.get('nobody'), code('not_found'));
  assert.throws(() => store.privateKeys('nobody'), code('not_found'));
  assert.throws(() => store.create('bad(name)'), code('invalid_argument'));

  const certs = store.certificates('Owner');
  const { signingKey, encryptionKey } = store.privateKeys('Owner');
  const message = Buffer.from('transport key wrap');
  const pss = { padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: 32 };
  const signature = sign('sha256', message, { key: signingKey, ...pss });
  assert.equal(verify('sha256', message, { key: new X509Certificate(certs.signingCertPem).publicKey, ...pss }, signature), true);
  const wrapped = publicEncrypt({ key: new X509Certificate(certs.encryptionCertPem).publicKey, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256' }, message);
  assert.deepEqual(privateDecrypt({ key: encryptionKey, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256' }, wrapped), message);

  // The key-release directory view.
  assert.equal(store.knownBySigningThumbprint(info.signing.thumbprint), 'Owner');
  assert.equal(store.knownBySigningThumbprint(info.signing.thumbprint.toLowerCase()), 'Owner');
  assert.equal(store.knownBySigningThumbprint('00'), null);
  assert.deepEqual(store.held(), [{ name: 'Owner', encryptionThumbprint: info.encryption.thumbprint }]);
  assert.equal(store.encryptionKey('Owner').equals(encryptionKey), true);

  // Nothing readable without unlocking, and no key material in the unaudited listing.
  const listing = JSON.stringify(vault.listRecords('guardian-key'));
  assert.doesNotMatch(listing, /PRIVATE KEY|CERTIFICATE/);
});

test('store: listing is served from a per-version cache; private keys are read (and audited, except for a key release) every time', async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const vault = await vaultIn(dir);
  t.after(() => vault.close());
  const reads = () => vault.readAudit({ limit: 1000 }).filter((e) => e.action === 'record.read').length;
  const store = new GuardianStore(vault);
  store.create('A');
  store.create('B');
  const before = reads();
  store.list();
  store.list();
  store.get('A');
  assert.equal(reads(), before, 'known versions are not re-read');
  // A second store (another process, say) reads each record once.
  const other = new GuardianStore(vault);
  other.list();
  other.list();
  assert.equal(reads(), before + 2);
  store.privateKeys('A');
  store.privateKeys('A');
  assert.equal(reads(), before + 4);
  // Key release reads the key unaudited: the release is in the trail itself (kp.release).
  store.encryptionKey('A');
  assert.equal(reads(), before + 4);
  assert.equal(store.list().find((g) => g.name === 'A')?.host, defaultHost());
});


test('store: public import holds no private keys; PFX export → import in another vault keeps thumbprints and keys', async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const a = await vaultIn(`${dir}/a`);
  const b = await vaultIn(`${dir}/b`);
  t.after(() => (a.close(), b.close()));
  let clock = new Date('2031-03-01T00:00:00Z');
  const home = new GuardianStore(a, { host: () => 'HOME', now: () => clock });
  const lab = new GuardianStore(b, { host: () => 'LAB', now: () => clock });
  const owner = home.create('Owner');

  const pub = lab.importPublic(home.exportPublic('Owner'));
  assert.equal(pub.source, 'imported-public');
  assert.equal(pub.hasPrivateKeys, false);
  assert.equal(pub.host, 'HOME');
  assert.equal(pub.signing.thumbprint, owner.signing.thumbprint);
  assert.throws(() => lab.privateKeys('Owner'), code('guardian_no_private_key'));
  assert.throws(() => lab.exportPfx('Owner', 'pw'), code('guardian_no_private_key'));
  assert.deepEqual(lab.held(), []);
  assert.throws(() => lab.importPublic(home.exportPublic('Owner')), code('already_exists'));
  assert.throws(() => lab.importPublic(home.exportPublic('Owner'), { name: 'Again' }), (e: unknown) => e instanceof ShieldError && e.code === 'already_exists' && /as guardian "Owner"/.test(e.message));
  lab.delete('Owner', { isNeeded: () => null });

  clock = new Date('2031-03-02T00:00:00Z');
  const t0 = performance.now();
  const pfx = home.exportPfx('Owner', 'backup pw');
  console.log(`store.exportPfx: ${(performance.now() - t0).toFixed(0)} ms`);
  // Bytes in memory are not a backup yet: the caller marks it once the files are written.
  assert.equal(home.get('Owner').backedUpAt, null);
  home.markBackedUp(['Owner']);
  assert.equal(home.get('Owner').backedUpAt, '2031-03-02T00:00:00.000Z');
  assert.ok(a.readAudit({ limit: 1000 }).some((e) => e.action === 'guardian.export' && e.subject === 'guardian-key:Owner'));
  assert.throws(() => lab.importPfx(pfx, 'wrong'), code('wrong_password'));
  const imported = lab.importPfx(pfx, 'backup pw', { name: 'HomeOwner' });
  assert.equal(imported.name, 'HomeOwner');
  assert.equal(imported.source, 'imported-pfx');
  assert.equal(imported.hasPrivateKeys, true);
  assert.equal(imported.signing.thumbprint, owner.signing.thumbprint);
  assert.equal(imported.encryption.thumbprint, owner.encryption.thumbprint);
  // Something wrapped to the original certificate opens with the imported key.
  const secret = randomBytes(32);
  const wrapped = publicEncrypt({ key: new X509Certificate(home.certificates('Owner').encryptionCertPem).publicKey, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256' }, secret);
  assert.deepEqual(privateDecrypt({ key: lab.privateKeys('HomeOwner').encryptionKey, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256' }, wrapped), secret);
  const sig = sign('sha256', secret, { key: lab.privateKeys('HomeOwner').signingKey, padding: constants.RSA_PKCS1_PSS_PADDING });
  assert.equal(verify('sha256', secret, { key: home.privateKeys('Owner').signingKey, padding: constants.RSA_PKCS1_PSS_PADDING }, sig), true);
});

test('store: delete is refused while something depends on the guardian; markBackedUp', async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const vault = await vaultIn(dir);
  t.after(() => vault.close());
  const store = new GuardianStore(vault, { now: () => new Date('2032-01-01T00:00:00Z') });
  store.create('Owner');
  store.create('Spare');
  const asked: string[] = [];
  assert.throws(
    () =>
      store.delete('Owner', {
        isNeeded: (n) => {
          asked.push(n);
          return 'it owns the key protector of VM "web01".';
        },
      }),
    (e: unknown) => e instanceof ShieldError && e.code === 'guardian_in_use' && e.message.includes('web01') && e.details?.reason === 'it owns the key protector of VM "web01".',
  );
  assert.deepEqual(asked, ['Owner']);
  assert.throws(() => store.delete('nobody', { isNeeded: () => null }), code('not_found'));
  assert.deepEqual(store.markBackedUp(['Owner', 'nobody']), ['Owner']);
  assert.equal(store.get('Owner').backedUpAt, '2032-01-01T00:00:00.000Z');
  assert.equal(store.get('Spare').backedUpAt, null);
  store.delete('Owner', { isNeeded: () => null });
  assert.deepEqual(store.list().map((g) => g.name), ['Spare']);
  assert.throws(() => store.privateKeys('Owner'), code('not_found'));
});

test('store: expiry warnings for guardians created in the past', async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const vault = await vaultIn(dir);
  t.after(() => vault.close());
  const now = new Date('2035-05-05T12:00:00Z');
  const store = new GuardianStore(vault, { now: () => now });
  store.create('Old', { now: new Date(now.getTime() - (365 * 2 + 1) * DAY), validityYears: 2 });
  store.create('Soon', { now: new Date(now.getTime() - (365 * 10 - 30) * DAY), validityYears: 10 });
  store.create('Fresh', { now });
  const warnings = Object.fromEntries(store.list().map((g) => [g.name, g.warning]));
  assert.equal(warnings.Old?.level, 'expired');
  assert.ok((warnings.Old?.daysLeft ?? 1) <= 0);
  assert.equal(warnings.Soon?.level, 'soon');
  assert.ok(Math.abs((warnings.Soon?.daysLeft ?? 0) - 32) <= 2, String(warnings.Soon?.daysLeft)); // 10 years hold 2–3 leap days
  assert.equal(warnings.Fresh, null);
});
