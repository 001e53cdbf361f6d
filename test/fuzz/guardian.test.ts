// Seeded mutation fuzzing of the guardian file parsers: PFX files (ours, forge AES without a MAC so
// mutations reach the bag decoder, openssl-style PBES2), public guardian files (JSON and PEM, at
// the text and at the DER level) and random bytes. Every input ends in a result or a typed
// ShieldError — pfx_invalid, wrong_password or guardian_invalid — never another exception.
// SHIELDLAB_FUZZ_SEED replays a run; SHIELDLAB_FUZZ_ROUNDS scales it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createPrivateKey, X509Certificate } from 'node:crypto';
import forge from 'node-forge';
import { exportGuardianPfx, exportPublicGuardian, generateGuardian, importGuardianPfx, parsePublicGuardian, type GeneratedGuardian } from '../../core/guardian/mod.ts';
import { ShieldError } from '../../core/errors.ts';
import { mutate, rng } from '../helpers/random.ts';

const SEED = Number(process.env.SHIELDLAB_FUZZ_SEED ?? Date.now() % 1_000_000);
const ROUNDS = Number(process.env.SHIELDLAB_FUZZ_ROUNDS ?? 300);

function typed(err: unknown, allowed: readonly string[], what: string): void {
  assert.ok(err instanceof ShieldError, `${what}: untyped ${String(err)} (seed ${SEED})`);
  assert.ok(allowed.includes(err.code), `${what}: unexpected code ${err.code}: ${err.message} (seed ${SEED})`);
}

function forgePfx(g: GeneratedGuardian, role: 'signing' | 'encryption', password: string, opts: Record<string, unknown>): Buffer {
  const key = forge.pki.privateKeyFromPem(role === 'signing' ? g.keys.signingKeyPem : g.keys.encryptionKeyPem);
  const cert = forge.pki.certificateFromPem(role === 'signing' ? g.certs.signingCertPem : g.certs.encryptionCertPem);
  const asn = forge.pkcs12.toPkcs12Asn1(key, [cert], password, { count: 16, ...opts } as Parameters<typeof forge.pkcs12.toPkcs12Asn1>[3]);
  return Buffer.from(forge.asn1.toDer(asn).getBytes(), 'binary');
}

/** An accepted guardian re-exports and re-parses to itself, and any keys match their certificates. */
function consistent(got: { name: string; certs: GeneratedGuardian['certs']; keys?: GeneratedGuardian['keys'] }, what: string): void {
  const again = parsePublicGuardian(exportPublicGuardian({ name: got.name, certs: got.certs }));
  assert.deepEqual(again.certs, got.certs, `${what}: not stable (seed ${SEED})`);
  if (got.keys) {
    assert.ok(new X509Certificate(got.certs.signingCertPem).checkPrivateKey(createPrivateKey(got.keys.signingKeyPem)), `${what}: signing key mismatch (seed ${SEED})`);
    assert.ok(new X509Certificate(got.certs.encryptionCertPem).checkPrivateKey(createPrivateKey(got.keys.encryptionKeyPem)), `${what}: encryption key mismatch (seed ${SEED})`);
  }
}

const PFX_CODES = ['pfx_invalid', 'wrong_password', 'guardian_invalid'] as const;

test(`PFX files, public guardian files and random bytes survive mutation (seed ${SEED})`, () => {
  const r = rng(SEED);
  const started = performance.now();
  const g = generateGuardian('Owner', { host: 'FUZZ' });
  const password = 'fuzz pw';
  const ours = exportGuardianPfx(g, password);
  const targets: Record<string, { signing: Buffer; encryption: Buffer }> = {
    'ours (3DES, SHA-1 MAC)': ours,
    'forge AES-256, no MAC': { signing: forgePfx(g, 'signing', password, { algorithm: 'aes256', useMac: false }), encryption: ours.encryption },
    'forge 3DES, no MAC': { signing: forgePfx(g, 'signing', password, { algorithm: '3des', useMac: false }), encryption: ours.encryption },
  };
  let accepted = 0;
  for (const [name, files] of Object.entries(targets)) {
    assert.equal(importGuardianPfx(files, password).name, 'Owner', `${name} opens unmutated`);
    for (let i = 0; i < ROUNDS; i++) {
      const bad = mutate(files.signing, r);
      if (bad.equals(files.signing)) continue;
      try {
        const got = importGuardianPfx({ signing: bad, encryption: files.encryption }, password);
        if (name.startsWith('ours')) {
          // The MAC covers the contents: a tolerated mutation can only be outside them.
          assert.equal(got.certs.signingCertPem, g.certs.signingCertPem, `${name} round ${i}: a different certificate was accepted (seed ${SEED})`);
        }
        // Without a MAC nothing protects a certificate's issuer, say; what is accepted must still hang together.
        consistent(got, `${name} round ${i}`);
        assert.equal(createPrivateKey(got.keys.signingKeyPem).asymmetricKeyType, 'rsa');
        accepted++;
      } catch (err) {
        if (err instanceof assert.AssertionError) throw err;
        typed(err, PFX_CODES, `${name} round ${i}`);
      }
    }
  }

  const publicFile = Buffer.from(exportPublicGuardian({ name: 'Owner', certs: g.certs }));
  const bundle = Buffer.from(g.certs.signingCertPem + g.certs.encryptionCertPem);
  const certDer = Buffer.from(g.certs.encryptionCertPem.replace(/-----[A-Z ]+-----|\s/g, ''), 'base64');
  for (let i = 0; i < ROUNDS; i++) {
    const inputs: [string, Buffer][] = [
      ['json', mutate(publicFile, r)],
      ['pem', mutate(bundle, r)],
      // DER-level: a damaged certificate in a well-formed PEM, so the X.509 and key-usage readers see it.
      ['der', Buffer.from(g.certs.signingCertPem + `-----BEGIN CERTIFICATE-----\n${mutate(certDer, r).toString('base64')}\n-----END CERTIFICATE-----\n`)],
    ];
    for (const [kind, input] of inputs) {
      try {
        consistent(parsePublicGuardian(input), `${kind} round ${i}`);
        accepted++;
      } catch (err) {
        if (err instanceof assert.AssertionError) throw err;
        typed(err, ['guardian_invalid'], `public ${kind} round ${i}`);
      }
    }
  }

  for (let i = 0; i < ROUNDS; i++) {
    const noise = Buffer.from(Array.from({ length: Math.floor(r() * 600) }, () => Math.floor(r() * 256)));
    // Random bytes after a valid DER SEQUENCE header reach deeper than pure noise.
    const framed = Buffer.concat([Buffer.from([0x30, 0x82, noise.length >> 8, noise.length & 0xff]), noise]);
    for (const input of [noise, framed]) {
      try {
        importGuardianPfx({ signing: input, encryption: ours.encryption }, password);
        assert.fail(`random bytes opened as a PFX (seed ${SEED})`);
      } catch (err) {
        if (err instanceof assert.AssertionError) throw err;
        typed(err, PFX_CODES, `random PFX round ${i}`);
      }
      try {
        parsePublicGuardian(input);
        assert.fail(`random bytes parsed as a guardian (seed ${SEED})`);
      } catch (err) {
        if (err instanceof assert.AssertionError) throw err;
        typed(err, ['guardian_invalid'], `random public round ${i}`);
      }
    }
  }
  const ms = performance.now() - started;
  console.log(`guardian fuzz: ${ROUNDS} rounds per target in ${ms.toFixed(0)} ms, ${accepted} harmless mutations accepted (seed ${SEED})`);
});
