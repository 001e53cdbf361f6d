// Guardians against an independent X.509 / PKCS#12 implementation: the openssl command line.
// Our certificates and PFX files must read in openssl exactly as Hyper-V's would, and PFX files
// that openssl writes (default AES/PBES2, -legacy RC2/3DES, Windows-style 3DES) must import.
// Skips only when openssl is absent and CI is not set; under CI=true it must exist.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createPrivateKey } from 'node:crypto';
import { describeCertificate, exportGuardianPfx, generateGuardian, importGuardianPfx, parsePublicGuardian } from '../../core/guardian/mod.ts';
import { ShieldError } from '../../core/errors.ts';
import { tempDir } from '../helpers/home.ts';

function opensslMissing(): string | null {
  if (spawnSync('openssl', ['version']).status === 0) return null;
  if (process.env.CI) throw new Error('CI=true but openssl is missing: .ci/run must install it');
  return 'needs openssl (Debian: openssl)';
}
const skip = opensslMissing() ?? false;

function openssl(args: string[], opts: { input?: string } = {}): { code: number | null; out: string } {
  const r = spawnSync('openssl', args, { encoding: 'utf8', input: opts.input ?? '' });
  return { code: r.status, out: `${r.stdout}${r.stderr}` };
}
function ok(args: string[]): string {
  const r = openssl(args);
  assert.equal(r.code, 0, `openssl ${args.join(' ')}\n${r.out}`);
  return r.out;
}
/** "Nov 24 13:52:10 2036 GMT" → Date */
const opensslDate = (out: string, field: 'notBefore' | 'notAfter') => new Date(new RegExp(`${field}=(.+)`).exec(out)![1]!);

test('openssl reads our certificates: Hyper-V subjects, key usages, 10-year validity, valid self-signatures, same thumbprints', { skip }, (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const g = generateGuardian('Owner', { host: 'HV-LAB-01' });
  const expect = {
    signing: { pem: g.certs.signingCertPem, title: 'Signing', usage: 'Digital Signature' },
    encryption: { pem: g.certs.encryptionCertPem, title: 'Encryption', usage: 'Key Encipherment, Data Encipherment' },
  };
  for (const [role, e] of Object.entries(expect)) {
    const file = join(dir, `${role}.pem`);
    writeFileSync(file, e.pem);
    const out = ok(['x509', '-noout', '-subject', '-issuer', '-dates', '-ext', 'keyUsage,basicConstraints', '-in', file]);
    assert.match(out, new RegExp(`^subject=CN = Shielded VM ${e.title} Certificate \\(Owner\\) \\(HV-LAB-01\\)$`, 'm'));
    assert.match(out, new RegExp(`^issuer=CN = Shielded VM ${e.title} Certificate \\(Owner\\) \\(HV-LAB-01\\)$`, 'm'));
    assert.match(out, new RegExp(`X509v3 Key Usage: critical\\n\\s+${e.usage}\\n`));
    assert.match(out, /X509v3 Basic Constraints: ?\n\s+CA:FALSE/);
    const from = opensslDate(out, 'notBefore');
    const to = opensslDate(out, 'notAfter');
    const years = new Date(from);
    years.setUTCFullYear(years.getUTCFullYear() + 10);
    assert.equal(to.getTime(), years.getTime(), '10 years');
    assert.ok(Math.abs(from.getTime() - Date.now()) < 60_000);
    // Self-signed: the certificate verifies as its own trust anchor.
    assert.match(ok(['verify', '-CAfile', file, file]), new RegExp(`${role}.pem: OK`));
    const info = describeCertificate(e.pem);
    // OpenSSL 3 prints "sha1 Fingerprint=", 1.1 "SHA1 Fingerprint=".
    assert.equal(ok(['x509', '-noout', '-fingerprint', '-sha1', '-in', file]).trim().replace(/^sha1/i, 'SHA1'), `SHA1 Fingerprint=${info.thumbprint.replace(/(..)(?!$)/g, '$1:')}`);
    assert.equal(ok(['x509', '-noout', '-serial', '-in', file]).trim(), `serial=${info.serial}`);
    assert.match(ok(['x509', '-noout', '-text', '-in', file]), /Public-Key: \(2048 bit\)[\s\S]*Subject Key Identifier/);
  }
});

test('openssl opens our PFX files (with and without -legacy), keys match certificates, wrong passwords fail', { skip }, (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const g = generateGuardian('Owner', { host: 'HV-LAB-01' });
  for (const password of ['Pa55word!', 'Grüße ✓ パス']) {
    const pfx = exportGuardianPfx(g, password);
    const passFile = join(dir, 'P');
    writeFileSync(passFile, password, { mode: 0o600 });
    writeFileSync(join(dir, 'bad'), `${password}x`, { mode: 0o600 });
    for (const [role, bytes, certPem] of [
      ['signing', pfx.signing, g.certs.signingCertPem],
      ['encryption', pfx.encryption, g.certs.encryptionCertPem],
    ] as const) {
      const file = join(dir, `${role}.pfx`);
      writeFileSync(file, bytes);
      writeFileSync(join(dir, 'orig.pem'), certPem);
      const info = ok(['pkcs12', '-in', file, '-passin', `file:${passFile}`, '-info', '-noout']);
      assert.match(info, /MAC: sha1, Iteration 2048/);
      assert.match(info, /Shrouded Keybag: pbeWithSHA1And3-KeyTripleDES-CBC, Iteration 2048/);
      const expected = ok(['x509', '-noout', '-modulus', '-in', join(dir, 'orig.pem')]).trim();
      for (const legacy of [[], ['-legacy']]) {
        const out = join(dir, 'out.pem');
        ok(['pkcs12', ...legacy, '-in', file, '-passin', `file:${passFile}`, '-nodes', '-out', out]);
        assert.equal(ok(['rsa', '-noout', '-modulus', '-in', out]).trim(), expected, `${role} key ${legacy.join('')}`);
        assert.equal(ok(['x509', '-noout', '-modulus', '-in', out]).trim(), expected, `${role} cert ${legacy.join('')}`);
        assert.match(readFileSync(out, 'utf8'), /friendlyName: Shielded VM (Signing|Encryption) Certificate \(Owner\) \(HV-LAB-01\)/);
        const wrong = openssl(['pkcs12', ...legacy, '-in', file, '-passin', `file:${join(dir, 'bad')}`, '-nodes', '-noout']);
        assert.notEqual(wrong.code, 0, 'wrong password must fail');
        assert.match(wrong.out, /mac verify failure|invalid password/i);
      }
    }
  }
});

test('PFX files made by openssl import (AES/PBES2, -legacy, Windows-style 3DES), and a PEM bundle of their certificates', { skip }, (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const make = (role: 'Signing' | 'Encryption', usage: string) => {
    const key = join(dir, `${role}.key`);
    const cert = join(dir, `${role}.crt`);
    ok(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert, '-days', '3650', '-subj', `/CN=Shielded VM ${role} Certificate (ext) (hostx)`, '-addext', `keyUsage=critical,${usage}`]);
    return { key, cert };
  };
  const s = make('Signing', 'digitalSignature');
  const e = make('Encryption', 'keyEncipherment,dataEncipherment');
  const modulus = (file: string) => ok(['x509', '-noout', '-modulus', '-in', file]).trim().replace('Modulus=', '');
  const thumb = (file: string) => ok(['x509', '-noout', '-fingerprint', '-sha1', '-in', file]).trim().replace(/^SHA1 Fingerprint=/i, '').replace(/:/g, '');

  const variants: Record<string, string[]> = {
    'default (PBES2 AES-256, SHA-256 MAC)': [],
    '-legacy (RC2-40 certificates, 3DES key)': ['-legacy'],
    'Windows-style 3DES + SHA-1 MAC': ['-keypbe', 'PBE-SHA1-3DES', '-certpbe', 'PBE-SHA1-3DES', '-macalg', 'sha1'],
    'no certificate encryption, SHA-512 MAC': ['-certpbe', 'NONE', '-macalg', 'sha512'],
  };
  for (const password of ['ext-pass', 'Grüße ✓ パス']) {
    const passFile = join(dir, 'P');
    writeFileSync(passFile, password, { mode: 0o600 });
    for (const [what, extra] of Object.entries(variants)) {
      const pfx = (x: { key: string; cert: string }) => {
        const out = join(dir, 'x.pfx');
        ok(['pkcs12', '-export', ...extra, '-inkey', x.key, '-in', x.cert, '-passout', `file:${passFile}`, '-out', out]);
        return readFileSync(out);
      };
      const files = { signing: pfx(s), encryption: pfx(e) };
      const label = `${what}, password ${JSON.stringify(password)}`;
      const g = importGuardianPfx(files, password);
      assert.equal(g.name, 'ext', label);
      assert.equal(g.host, 'hostx', label);
      assert.equal(describeCertificate(g.certs.signingCertPem).thumbprint, thumb(s.cert), label);
      assert.equal(describeCertificate(g.certs.encryptionCertPem).thumbprint, thumb(e.cert), label);
      const n = (pem: string) => (createPrivateKey(pem).export({ format: 'jwk' }).n as string);
      assert.equal(Buffer.from(n(g.keys.signingKeyPem), 'base64url').toString('hex').toUpperCase(), modulus(s.cert), label);
      assert.equal(Buffer.from(n(g.keys.encryptionKeyPem), 'base64url').toString('hex').toUpperCase(), modulus(e.cert), label);
      assert.throws(() => importGuardianPfx(files, `${password}!`), (err: unknown) => err instanceof ShieldError && err.code === 'wrong_password', label);
    }
  }
  // The same two certificates as a plain PEM bundle (what `cat a.crt b.crt` gives) import as a public guardian.
  const bundle = readFileSync(e.cert, 'utf8') + readFileSync(s.cert, 'utf8');
  const pub = parsePublicGuardian(Buffer.from(bundle));
  assert.deepEqual([pub.name, pub.host], ['ext', 'hostx']);
  assert.equal(describeCertificate(pub.certs.signingCertPem).thumbprint, thumb(s.cert));
});

test('openssl certificates that do not fit a guardian are refused', { skip }, (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const cert = (name: string, cn: string, args: string[]) => {
    const file = join(dir, `${name}.crt`);
    ok(['req', '-x509', '-nodes', '-keyout', join(dir, `${name}.key`), '-out', file, '-days', '30', '-subj', `/CN=${cn}`, ...args]);
    return readFileSync(file, 'utf8');
  };
  const good = cert('s', 'Shielded VM Signing Certificate (ext) (hostx)', ['-newkey', 'rsa:2048', '-addext', 'keyUsage=critical,digitalSignature']);
  const weak = cert('w', 'Shielded VM Encryption Certificate (ext) (hostx)', ['-newkey', 'rsa:1024', '-addext', 'keyUsage=critical,keyEncipherment']);
  const ec = cert('ec', 'Shielded VM Encryption Certificate (ext) (hostx)', ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-addext', 'keyUsage=critical,keyEncipherment']);
  const other = cert('o', 'Shielded VM Encryption Certificate (other) (hostx)', ['-newkey', 'rsa:2048', '-addext', 'keyUsage=critical,keyEncipherment']);
  for (const [what, enc] of [
    ['1024-bit RSA', weak],
    ['EC key', ec],
    ['another guardian', other],
  ] as const) {
    assert.throws(() => parsePublicGuardian(good + enc), (err: unknown) => err instanceof ShieldError && err.code === 'guardian_invalid', what);
  }
});
