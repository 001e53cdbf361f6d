// Attestation (host-key mode), health certificates and key release on two vault homes = two hosts.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { Vault } from '../../core/vault/mod.ts';
import { AttestationService } from '../../core/attestation/service.ts';
import { createKeyProtector, grantGuardian, guardianEntry, parseKeyProtector, revokeGuardian, rollKeyProtector, type GuardianCertificates, type HeldGuardian } from '../../core/guardian/key-protector.ts';
import { checkRelease, releaseTransportKey, type GuardianDirectory } from '../../core/guardian/release.ts';
import { ShieldError } from '../../core/errors.ts';
import { opensslGuardian, publicOf } from '../helpers/guardian-certs.ts';
import { tempDir } from '../helpers/home.ts';

const code = (c: string, reason?: string) => (err: unknown) =>
  err instanceof ShieldError && err.code === c && (reason === undefined || err.details?.reason === reason);
const kdf = { N: 1 << 14, r: 8, p: 1 };

/** The guardian store's view for release: known public guardians plus the ones held here. */
function directory(known: GuardianCertificates[], held: HeldGuardian[]): GuardianDirectory {
  return {
    knownBySigningThumbprint: (t) => [...known, ...held].find((g) => guardianEntry(g).signingThumbprint === t)?.name ?? null,
    held: () => held.map((g) => ({ name: g.name, encryptionThumbprint: guardianEntry(g).encryptionThumbprint })),
    encryptionKey: (name) => held.find((g) => g.name === name)!.keys.encryptionKey,
  };
}

async function host(dir: string, name: string, now?: () => Date) {
  const vault = await Vault.create(join(dir, name), { passphrase: Buffer.from('pw'), kdf });
  return { vault, attestation: new AttestationService(vault, now ? { now } : {}) };
}

const GA = opensslGuardian('HostA-owner', 'host-a');
const GB = opensslGuardian('HostB', 'host-b');

test('host-key attestation: unregistered refused, registered gets an 8 h certificate; audited', async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  let clock = new Date('2026-11-24T10:00:00Z');
  const a = await host(dir, 'a', () => clock);
  assert.throws(() => a.attestation.attestHostKey(), code('attestation_failed', 'HostKeyMissing'));
  a.attestation.registerHostKey();
  const cert = a.attestation.attestHostKey();
  assert.equal(cert.claims.mode, 'host-key');
  assert.equal(cert.claims.hostId, a.attestation.hostId());
  assert.equal(Date.parse(cert.claims.expiresAt) - Date.parse(cert.claims.issuedAt), 8 * 3_600_000);
  assert.equal(a.attestation.status().certificate?.valid, true);

  clock = new Date('2026-11-24T18:00:01Z');
  assert.throws(() => a.attestation.verify(cert.encoded), code('health_certificate_invalid', 'Expired'));
  assert.equal(a.attestation.status().certificate?.problem, 'Expired');
  const fresh = a.attestation.attestHostKey();
  a.attestation.revokeBefore(new Date(clock.getTime() + 1000));
  assert.throws(() => a.attestation.verify(fresh.encoded), code('health_certificate_invalid', 'Revoked'));

  const b = await host(dir, 'b', () => clock);
  b.attestation.registerHostKey();
  const foreign = b.attestation.attestHostKey();
  assert.throws(() => a.attestation.verify(foreign.encoded), code('health_certificate_invalid', 'UntrustedIssuer'));
  assert.throws(() => a.attestation.verify(`${fresh.encoded.slice(0, -4)}AAAA`), code('health_certificate_invalid', 'UntrustedIssuer'));
  assert.throws(() => a.attestation.verify('garbage'), code('health_certificate_invalid', 'Malformed'));

  const actions = a.vault.readAudit().map((e) => `${e.action}:${e.outcome}:${e.reason ?? ''}`);
  assert.ok(actions.includes('host.attest:refused:HostKeyMissing'));
  assert.ok(actions.includes('host.attest:ok:'));
  a.vault.close();
  b.vault.close();
});

test('a certificate presented by another host is refused (host binding)', async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const a = await host(dir, 'a');
  a.attestation.registerHostKey();
  const cert = a.attestation.attestHostKey();
  // The host key changes (a reinstall, a copied vault on another machine): same issuer, other host.
  a.vault.deleteRecord('host-key', 'this-host');
  a.attestation.registerHostKey();
  assert.throws(() => a.attestation.verify(cert.encoded), code('health_certificate_invalid', 'WrongHost'));
  a.vault.close();
});

test('two hosts: B is refused until granted, then releases; revoked and rolled, refused again; every step audited', async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const b = await host(dir, 'b');
  b.attestation.registerHostKey();
  const cert = b.attestation.attestHostKey().encoded;
  const kp = createKeyProtector({ owner: GA, guardians: [], policy: { modes: ['host-key'], hosts: [] } });
  const onB = (known: GuardianCertificates[]) => ({ vault: b.vault, attestation: b.attestation, guardians: directory(known, [GB]), healthCertificate: cert });

  assert.throws(() => releaseTransportKey(kp, { ...onB([]), purpose: 'test' }), code('kp_untrusted_owner'));
  assert.throws(() => releaseTransportKey(kp, { ...onB([publicOf(GA)]), purpose: 'test' }), code('kp_unwrap_denied'));
  const check = checkRelease(kp, onB([publicOf(GA)]));
  assert.equal(check.allowed, false);
  assert.equal(check.reasons[0]?.code, 'kp_unwrap_denied');

  const granted = grantGuardian(parseKeyProtector(kp), GA, publicOf(GB));
  const released = releaseTransportKey(granted, { ...onB([publicOf(GA)]), purpose: 'vm.start lab' });
  assert.equal(released.guardian, 'HostB');
  assert.equal(released.transportKey.length, 32);
  const okCheck = checkRelease(granted, onB([publicOf(GA)]));
  assert.deepEqual([okCheck.allowed, okCheck.guardian, okCheck.mode], [true, 'HostB', 'host-key']);
  assert.ok(!JSON.stringify(okCheck).includes(released.transportKey.toString('base64')), 'a check never carries the key');

  const revoked = rollKeyProtector(parseKeyProtector(revokeGuardian(parseKeyProtector(granted), GA, 'HostB')), GA);
  assert.throws(() => releaseTransportKey(revoked.bytes, { ...onB([publicOf(GA)]), purpose: 'test' }), code('kp_unwrap_denied'));

  assert.throws(() => releaseTransportKey(granted, { ...onB([publicOf(GA)]), healthCertificate: null, purpose: 'test' }), code('release_denied', 'NoHealthCertificate'));
  const tpmOnly = createKeyProtector({ owner: GA, guardians: [publicOf(GB)], policy: { modes: ['tpm'], hosts: [] } });
  assert.throws(() => releaseTransportKey(tpmOnly, { ...onB([publicOf(GA)]), purpose: 'test' }), code('release_denied', 'ModeNotAllowed'));
  const otherHost = createKeyProtector({ owner: GA, guardians: [publicOf(GB)], policy: { modes: ['host-key'], hosts: ['00'.repeat(32)] } });
  assert.throws(() => releaseTransportKey(otherHost, { ...onB([publicOf(GA)]), purpose: 'test' }), code('release_denied', 'HostNotAllowed'));
  const thisHost = createKeyProtector({ owner: GA, guardians: [publicOf(GB)], policy: { modes: ['host-key'], hosts: [b.attestation.hostId()!] } });
  releaseTransportKey(thisHost, { ...onB([publicOf(GA)]), purpose: 'test' }).transportKey.fill(0);

  const trail = b.vault.readAudit().filter((e) => e.action === 'kp.release').map((e) => `${e.outcome}:${e.reason}`);
  assert.deepEqual(trail.reverse(), [
    'refused:kp_untrusted_owner',
    'refused:kp_unwrap_denied',
    'refused:kp_unwrap_denied',
    'ok:guardian HostB, host-key',
    'ok:guardian HostB, host-key',
    'refused:kp_unwrap_denied',
    'refused:NoHealthCertificate',
    'refused:ModeNotAllowed',
    'refused:HostNotAllowed',
    'ok:guardian HostB, host-key',
  ]);
  b.vault.close();
});
