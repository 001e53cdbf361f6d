// TPM-mode attestation against a real swtpm as the host's TPM, after a simulated measured boot
// (an event log built from realistic boot events, each measured event PCR_Extend-ed into the
// swtpm, so log and PCRs agree). Through the CLI where it is about the CLI; through the modules
// for the finer refusals (old, forged or rolled-back evidence fed to the verifier directly).
// tpm2-tools is the independent cross-check both ways: tpm2_checkquote verifies our quotes, and
// our verifier accepts tpm2_quote's.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { cpSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Vault } from '../../core/vault/mod.ts';
import { ShieldError } from '../../core/errors.ts';
import { AttestationService } from '../../core/attestation/service.ts';
import { buildEventLog, uefiVariable, x509SignatureList } from '../../core/attestation/eventlog-build.ts';
import { EFI_IMAGE_SECURITY_DATABASE } from '../../core/attestation/eventlog.ts';
import { addBinary, loadPolicy, measureBinaries, qualifyingData } from '../../core/attestation/baseline.ts';
import { captureBaseline, collectEvidence, loadTpmHost, registerTpmHost, type TpmHostState } from '../../core/attestation/tpm-mode.ts';
import { verifyTpmEvidence, type TpmEvidence, type TpmExpectations } from '../../core/attestation/tpm-verify.ts';
import { createKeyProtector } from '../../core/guardian/key-protector.ts';
import { checkRelease, type GuardianDirectory } from '../../core/guardian/release.ts';
import { guardianEntry, type HeldGuardian } from '../../core/guardian/key-protector.ts';
import { EK_CERT_NV_INDEX, TPMA_NV, TPM_ALG, TPM_RH, Tpm, parsePublic, publicKeyPem } from '../../core/tpm/mod.ts';
import { MICROSOFT_OWNER, bootEvents, fakeCert, type BootOptions } from '../helpers/eventlog.ts';
import { cliFails, cliJson, cliOk, secretFile, tempDir } from '../helpers/home.ts';
import { opensslGuardian } from '../helpers/guardian-certs.ts';
import { type Swtpm, freePortPair, measureLog, startSwtpm, swtpmMissing, tpm2, tpm2ToolsMissing } from '../helpers/swtpm.ts';

type Json = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

const skip = swtpmMissing() ?? tpm2ToolsMissing() ?? false;
const PCRS = [0, 1, 2, 3, 4, 5, 6, 7];
const kdf = { N: 1 << 14, r: 8, p: 1 };

/** A db update that adds one CA: the PCR 7 event firmware would measure after it. */
const dbUpdate = {
  pcr: 7,
  type: 'EV_EFI_VARIABLE_DRIVER_CONFIG' as const,
  data: uefiVariable('db', x509SignatureList(['Microsoft UEFI CA 2011', 'Debian Secure Boot CA', 'Someone Else CA'].map((n) => fakeCert(n)), MICROSOFT_OWNER), EFI_IMAGE_SECURITY_DATABASE),
};

/** An swtpm after a measured boot, with the boot's event log in a file. */
async function booted(t: Parameters<typeof startSwtpm>[0], boot: BootOptions = {}): Promise<{ sw: Swtpm; logFile: string; log: Buffer }> {
  const sw = await startSwtpm(t);
  const log = buildEventLog(bootEvents(boot));
  await measureLog(sw.address, log);
  const logFile = join(sw.dir, 'binary_bios_measurements');
  writeFileSync(logFile, log);
  return { sw, logFile, log };
}

const refusedWith = (reason: string, message?: RegExp) => (err: unknown) => {
  assert.ok(err instanceof ShieldError, String(err));
  assert.equal(err.code, 'attestation_failed', err.message);
  assert.ok((err.details?.reasons as string[]).includes(reason), `${reason} not in ${err.message}`);
  if (message) assert.match(err.message, message);
  return true;
};

async function moduleHost(dir: string, now?: () => Date) {
  const vault = await Vault.create(join(dir, 'home'), { passphrase: Buffer.from('pw'), kdf });
  return { vault, attestation: new AttestationService(vault, now ? { now } : {}) };
}

/** A registered host with a baseline and one allowed binary, through the modules. */
async function readyHost(t: Parameters<typeof startSwtpm>[0], dir: string, now?: () => Date) {
  const { sw, logFile, log } = await booted(t);
  const h = await moduleHost(dir, now);
  const qemu = join(dir, 'qemu-system-x86_64');
  writeFileSync(qemu, 'qemu 8.2 stand-in');
  await h.attestation.registerTpm({ address: sw.address });
  await captureBaseline(h.vault, { address: sw.address, eventLog: logFile, now: new Date() });
  addBinary(h.vault, qemu, new Date());
  return { ...h, sw, logFile, log, qemu, state: loadTpmHost(h.vault)! };
}

/** Host side by hand: evidence for `nonce`, as the attest path collects it. */
async function evidence(sw: Swtpm, state: TpmHostState, nonce: Buffer, logFile: string, binaries: string[]): Promise<TpmEvidence> {
  const tpm = await Tpm.open(sw.address);
  try {
    return await collectEvidence(tpm, { public: Buffer.from(state.ak.public, 'base64'), private: Buffer.from(state.ak.private, 'base64') }, { nonce, pcrs: PCRS, eventLogPath: logFile, binaries });
  } finally {
    await tpm.close();
  }
}

function expectations(h: { vault: Vault; state: TpmHostState }, nonce: Buffer): TpmExpectations {
  const state = loadTpmHost(h.vault)!;
  return { akPublic: Buffer.from(state.ak.public, 'base64'), nonce, pcrs: PCRS, baseline: state.baseline, policy: loadPolicy(h.vault), lastClock: state.lastClock };
}

/**
 * PCR values in tpm2-tools' "serialized" file format (tpm2_quote -o without -F): the C structs as
 * they lie in memory, little-endian — TPML_PCR_SELECTION (count, 16 × {hash u16, sizeofSelect u8,
 * pcrSelect[4], pad}), the number of TPML_DIGESTs, then each (count, 8 × TPM2B_DIGEST of 2 + 64
 * bytes). tpm2_checkquote 5.4 cannot read 8 or more PCRs from a plain values file with -l
 * (tpm2-tools issue #3542), but reads this.
 */
function serializedPcrs(pcrs: readonly number[], values: Record<number, string>): Buffer {
  const sel = Buffer.alloc(4 + 16 * 8);
  sel.writeUInt32LE(1, 0);
  sel.writeUInt16LE(0x000b, 4);
  sel[6] = 3;
  for (const p of pcrs) sel[7 + (p >> 3)]! |= 1 << (p & 7);
  const chunks: Buffer[] = [];
  for (let i = 0; i < pcrs.length; i += 8) {
    const list = Buffer.alloc(4 + 8 * 66);
    const part = pcrs.slice(i, i + 8);
    list.writeUInt32LE(part.length, 0);
    part.forEach((p, j) => {
      list.writeUInt16LE(32, 4 + 66 * j);
      Buffer.from(values[p]!, 'hex').copy(list, 6 + 66 * j);
    });
    chunks.push(list);
  }
  const n = Buffer.alloc(4);
  n.writeUInt32LE(chunks.length);
  return Buffer.concat([sel, n, ...chunks]);
}

const reasonsOf = (v: { problems: { reason: string }[] }) => v.problems.map((p) => p.reason);

test('CLI: register, baseline, allow-list, attest (tpm) → release allowed; each refusal with its reason; re-learn with --yes', { skip }, async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const { sw, logFile } = await booted(t);
  const pp = secretFile(dir, 'pp', 'host passphrase');
  const H = ['--home', join(dir, 'home'), '--passphrase-file', pp];
  const qemu = join(dir, 'qemu-system-x86_64');
  writeFileSync(qemu, 'qemu 8.2 stand-in');
  await cliOk([...H, 'vault', 'init', '--no-keychain', '--kdf-memory-mib', '16']);

  const registered = await cliOk<Json>([...H, 'host', 'register', '--mode', 'tpm', '--tpm', sw.address]);
  assert.equal(registered.tpm.ekCertificate, 'none'); // a plain swtpm has no EK certificate in NV
  assert.match(registered.tpm.hostId, /^[0-9a-f]{64}$/);
  assert.equal(registered.tpm.address, sw.address);
  const hostId = registered.tpm.hostId as string;

  const baseline = await cliOk<Json>([...H, 'host', 'baseline', 'capture', '--event-log', logFile, '--pcrs', '0,1,2,3,4,5,6,7']);
  assert.deepEqual(baseline.pcrs, PCRS);
  assert.equal(baseline.changed, true);
  assert.equal(Object.keys(baseline.values).length, 8);
  assert.deepEqual((await cliOk<Json>([...H, 'host', 'baseline', 'show'])).values, baseline.values);
  const policy = await cliOk<Json>([...H, 'host', 'policy', 'add-binary', qemu]);
  assert.deepEqual(policy.binaries.map((b: Json) => [b.path, b.current]), [[qemu, 'ok']]);

  // --tpm defaults to the registered address, --event-log to the baseline's.
  const attested = await cliOk<Json>([...H, 'host', 'attest', '--mode', 'tpm']);
  assert.equal(attested.certificate.mode, 'tpm');
  assert.equal(attested.certificate.hostId, hostId);
  assert.equal(attested.certificate.valid, true);
  assert.equal((await cliOk<Json>([...H, 'host', 'status'])).certificate.valid, true);

  // The release gate accepts it for a KP that allows tpm.
  const kp = join(dir, 'vm.slkp');
  await cliOk([...H, 'guardian', 'create', 'Owner']);
  await cliOk([...H, 'guardian', 'export', 'Owner', '--pfx', '--out-dir', join(dir, 'backup'), '--password-file', pp]);
  await cliOk([...H, 'kp', 'create', '--owner', 'Owner', '--allow-mode', 'tpm', '--out', kp]);
  const release = await cliOk<Json>([...H, 'kp', 'release', kp, '--check']);
  assert.deepEqual([release.allowed, release.mode, release.hostId], [true, 'tpm', hostId]);

  // A changed binary on the allow-list: refused, the file named.
  writeFileSync(qemu, 'qemu 8.2 stand-in, patched');
  const ci = await cliFails([...H, 'host', 'attest', '--mode', 'tpm'], 'attestation_failed');
  assert.match(ci.error.message, new RegExp(`CodeIntegrityPolicy.*${qemu.replace(/[/.]/g, '\\$&')} changed`, 's'));
  writeFileSync(qemu, 'qemu 8.2 stand-in');
  // That refusal withdrew the tpm certificate issued before: no more releases on its strength.
  assert.equal((await cliOk<Json>([...H, 'host', 'status'])).certificate, null);
  const withdrawn = await cliJson<Json>([...H, 'kp', 'release', kp, '--check']);
  assert.deepEqual([withdrawn.body.allowed, withdrawn.body.reasons[0].code], [false, 'NoHealthCertificate']);
  await cliOk([...H, 'host', 'attest', '--mode', 'tpm']);

  // Another TPM than the registered one.
  const other = await booted(t);
  const wrong = await cliFails([...H, 'host', 'attest', '--mode', 'tpm', '--tpm', other.sw.address, '--event-log', other.logFile], 'attestation_failed');
  assert.deepEqual((wrong.error as Json).details.reasons, ['UnauthorizedHost']);

  // No TPM at all: a clear error that points to the other modes.
  const closed = await freePortPair();
  const none = await cliFails([...H, 'host', 'attest', '--mode', 'tpm', '--tpm', `swtpm:host=127.0.0.1,port=${closed}`], 'tpm_unavailable');
  assert.match(none.error.message, /host-key or ad-group/);

  // After the baseline: the db gains a CA (PCR 7 extended, the event appended to the log).
  await measureLog(sw.address, buildEventLog([dbUpdate]));
  const newLog = join(dir, 'after-db-update.log');
  writeFileSync(newLog, buildEventLog(bootEvents({ extra: [dbUpdate] })));
  const sb = await cliFails([...H, 'host', 'attest', '--mode', 'tpm', '--event-log', newLog], 'attestation_failed');
  assert.deepEqual((sb.error as Json).details.reasons, ['SecureBootSettings']);
  assert.match(sb.error.message, /PCR 7 differs from the baseline \(Secure Boot configuration changed\): PCR 7: Secure Boot db added/);
  // The old log no longer replays to the quoted PCR 7.
  const stale = await cliFails([...H, 'host', 'attest', '--mode', 'tpm', '--event-log', logFile], 'attestation_failed');
  assert.deepEqual((stale.error as Json).details.reasons, ['TcgLogVerification', 'SecureBootSettings']);
  assert.match(stale.error.message, /does not replay to the quoted PCR 7/);

  const diff = await cliJson<Json>([...H, 'host', 'baseline', 'diff', '--event-log', newLog]);
  assert.equal(diff.code, 1);
  assert.equal(diff.body.matches, false);
  assert.deepEqual(diff.body.pcrs.filter((p: Json) => !p.matches).map((p: Json) => p.pcr), [7]);
  assert.ok(diff.body.findings.some((f: string) => /^PCR 7: Secure Boot db added/.test(f)), JSON.stringify(diff.body));

  // Re-learning is deliberate: without --yes a usage error that shows the diff; with it, audited.
  const unconfirmed = await cliJson<Json>([...H, 'host', 'baseline', 'capture', '--event-log', newLog]);
  assert.equal(unconfirmed.code, 2);
  assert.equal(unconfirmed.body.error.code, 'usage');
  assert.match(unconfirmed.body.error.message, /The baseline would change:\n {2}PCR 7: Secure Boot db added.*--yes/s);
  assert.deepEqual((await cliOk<Json>([...H, 'host', 'baseline', 'show'])).values, baseline.values);
  const relearnt = await cliOk<Json>([...H, 'host', 'baseline', 'capture', '--event-log', newLog, '--yes']);
  assert.equal(relearnt.relearned, true);
  assert.notEqual(relearnt.values['7'], baseline.values['7']);
  assert.equal(relearnt.values['0'], baseline.values['0']);
  const again = await cliOk<Json>([...H, 'host', 'attest', '--mode', 'tpm']);
  assert.equal(again.certificate.valid, true);

  // A revoked certificate is refused by the release gate.
  await cliOk([...H, 'host', 'revoke-certificates', '--before', new Date(Date.now() + 60_000).toISOString()]);
  const revoked = await cliJson<Json>([...H, 'kp', 'release', kp, '--check']);
  assert.equal(revoked.body.allowed, false);
  assert.equal(revoked.body.reasons[0].code, 'Revoked');

  // Every success and refusal is in the audit trail, with its reasons.
  const audit = (await cliOk<Json>([...H, 'vault', 'audit', '--limit', '500'])).entries as Json[];
  const trail = audit
    .filter((e) => e.action.startsWith('host.'))
    .reverse()
    .map((e) => `${e.action}:${e.outcome}${e.reason && e.action === 'host.attest' ? `:${e.reason}` : ''}`);
  assert.deepEqual(trail, [
    'host.register:ok',
    'host.baseline-capture:ok',
    'host.policy-add-binary:ok',
    'host.attest:ok',
    'host.attest:refused:CodeIntegrityPolicy',
    'host.certificate-withdrawn:ok',
    'host.attest:ok',
    'host.attest:refused:UnauthorizedHost',
    'host.certificate-withdrawn:ok',
    'host.attest:refused:TpmUnavailable',
    'host.attest:refused:SecureBootSettings',
    'host.attest:refused:TcgLogVerification,SecureBootSettings',
    'host.baseline-relearn:refused',
    'host.baseline-relearn:ok',
    'host.attest:ok',
    'host.revoke-certificates:ok',
  ]);
  assert.match(audit.find((e) => e.action === 'host.baseline-relearn' && e.outcome === 'ok')?.reason, /PCR 7: Secure Boot db added/);
});

test('registration: an AK from another TPM claimed with this TPM’s EK fails credential activation (AkNotBound)', { skip }, async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const a = await startSwtpm(t);
  const b = await startSwtpm(t);
  const h = await moduleHost(dir);
  await assert.rejects(registerTpmHost(h.vault, { address: a.address, akAddress: b.address, now: new Date() }), refusedWith('AkNotBound', /credential activation/));
  assert.equal(loadTpmHost(h.vault), null);
  const state = await registerTpmHost(h.vault, { address: a.address, now: new Date() });
  assert.equal(state.ek.certificate, null);
  const trail = h.vault.readAudit().filter((e) => e.action === 'host.register').map((e) => `${e.outcome}:${e.reason}`);
  assert.deepEqual(trail.reverse(), ['refused:AkNotBound', 'ok:no EK certificate']);
  // The registered TPM's id is the certificate's host id.
  assert.equal(h.attestation.status().tpm?.hostId, state.hostId);
  h.vault.close();
});

/** An EK certificate as a manufacturer would put it in NV 0x01C00002: made by openssl for `subjectKeyPem`. */
async function provisionEkCertificate(sw: Swtpm, subjectKeyPem: string, cn: string): Promise<void> {
  const o = (...args: string[]) => execFileSync('openssl', args, { cwd: sw.dir, stdio: ['ignore', 'pipe', 'pipe'] });
  writeFileSync(join(sw.dir, 'ek.pem'), subjectKeyPem);
  o('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'ca.key', '-out', 'ca.pem', '-subj', '/CN=Test TPM Manufacturer CA', '-days', '30');
  o('req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'csr.key', '-out', 'ek.csr', '-subj', `/CN=${cn}`);
  o('x509', '-req', '-in', 'ek.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-force_pubkey', 'ek.pem', '-days', '30', '-outform', 'DER', '-out', 'ek.der');
  const der = readFileSync(join(sw.dir, 'ek.der'));
  const tpm = await Tpm.open(sw.address);
  try {
    const index = EK_CERT_NV_INDEX.RSA2048;
    await tpm.nvDefineSpace({ nvIndex: index, nameAlg: TPM_ALG.SHA256, attributes: TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHREAD | TPMA_NV.NO_DA, authPolicy: Buffer.alloc(0), dataSize: der.length });
    await tpm.nvWrite(index, der, { authHandle: TPM_RH.OWNER });
  } finally {
    await tpm.close();
  }
}

test('registration reads the EK certificate from NV 0x01C00002, and refuses one that certifies another key', { skip }, async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const a = await startSwtpm(t);
  const tpm = await Tpm.open(a.address);
  const ekPem = await tpm.withTransient(tpm.createEk('rsa'), async (ek) => publicKeyPem(ek.outPublic.publicArea));
  await tpm.close();
  await provisionEkCertificate(a, ekPem, 'TPM EK a');
  const h = await moduleHost(join(dir, 'a'));
  await h.attestation.registerTpm({ address: a.address });
  assert.match(h.attestation.status().tpm!.ekCertificate, /CN=TPM EK a.*issued by CN=Test TPM Manufacturer CA/);
  h.vault.close();

  // A certificate in NV that names some other key: not this TPM's EK.
  const b = await startSwtpm(t);
  await provisionEkCertificate(b, ekPem, 'TPM EK of a, copied');
  const hb = await moduleHost(join(dir, 'b'));
  await assert.rejects(hb.attestation.registerTpm({ address: b.address }), refusedWith('UnauthorizedHost', /does not certify this TPM’s EK/));
  hb.vault.close();
});

test('verifier: a replayed nonce, a forged signature, PCR values that are not the quoted ones, a rolled-back clock, a log that does not replay', { skip }, async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const h = await readyHost(t, dir);
  const binaries = [h.qemu];
  const nonce = randomBytes(32);
  const good = await evidence(h.sw, h.state, nonce, h.logFile, binaries);
  const ok = verifyTpmEvidence(good, expectations(h, nonce));
  assert.deepEqual(reasonsOf(ok), []);
  assert.equal(ok.ok, true);

  // An old quote answered to a new challenge.
  assert.deepEqual(reasonsOf(verifyTpmEvidence(good, expectations(h, randomBytes(32)))), ['NonceMismatch']);
  // The binaries reported are bound to the quote: another list does not match its qualifying data.
  assert.deepEqual(reasonsOf(verifyTpmEvidence({ ...good, binaries: [{ path: h.qemu, sha256: '00'.repeat(32) }] }, expectations(h, nonce))), ['NonceMismatch', 'CodeIntegrityPolicy']);

  const forged = Buffer.from(good.signature);
  forged[forged.length - 1]! ^= 1;
  const f = verifyTpmEvidence({ ...good, signature: forged }, expectations(h, nonce));
  assert.deepEqual(reasonsOf(f), ['QuoteSignature']);
  assert.match(f.problems[0]!.message, /not signed by the registered attestation key/);
  const edited = Buffer.from(good.quoted);
  edited[edited.length - 1]! ^= 1;
  assert.deepEqual(reasonsOf(verifyTpmEvidence({ ...good, quoted: edited }, expectations(h, nonce))), ['QuoteSignature']);

  // The host sends PCR values that are not what the TPM quoted (to hide a change).
  assert.deepEqual(reasonsOf(verifyTpmEvidence({ ...good, pcrValues: { ...good.pcrValues, 7: 'ab'.repeat(32) } }, expectations(h, nonce))), ['PcrDigestMismatch']);

  // The counters of the last accepted quote were ahead of these: the TPM state was rolled back.
  const clock = verifyTpmEvidence(good, expectations(h, nonce)).clock!;
  const ahead = { ...expectations(h, nonce), lastClock: { ...clock, resetCount: (clock.resetCount + 1) >>> 0 } };
  const rolled = verifyTpmEvidence(good, ahead);
  assert.deepEqual(reasonsOf(rolled), ['ClockRollback']);
  assert.match(rolled.problems[0]!.message, /reset counter went backwards/);
  const later = { ...expectations(h, nonce), lastClock: { ...clock, clock: (BigInt(clock.clock) + 1000n).toString() } };
  assert.match(verifyTpmEvidence(good, later).problems[0]!.message, /clock went backwards within one reset/);
  // A later reset (resetCount + 1 from the last one) is fine, whatever the clock says.
  assert.deepEqual(reasonsOf(verifyTpmEvidence(good, { ...later, lastClock: { ...later.lastClock, resetCount: (clock.resetCount - 1) >>> 0 } })), []);

  // A log from another boot (different firmware version: PCR 0) with the same PCRs quoted.
  const otherLog = join(dir, 'other.log');
  writeFileSync(otherLog, buildEventLog(bootEvents({ firmwareVersion: 'edk2-stable202402' })));
  const n2 = randomBytes(32);
  const wrongLog = verifyTpmEvidence(await evidence(h.sw, h.state, n2, otherLog, binaries), expectations(h, n2));
  assert.deepEqual(reasonsOf(wrongLog), ['TcgLogVerification']);
  assert.match(wrongLog.findings.join('\n'), /PCR 0 \(sha256\): the event log \(\d+ events\) replays to/);

  // Through the service: a real attestation records the clock; the next one must not be behind it.
  await h.attestation.attestTpm({ eventLog: h.logFile });
  assert.ok(loadTpmHost(h.vault)!.lastClock);
  const cert = await h.attestation.attestTpm({ eventLog: h.logFile });
  assert.equal(cert.claims.mode, 'tpm');

  // A PCR other than 7 changes (another boot application measured into PCR 4): PcrMismatch, explained.
  const app = { pcr: 4, type: 'EV_EFI_BOOT_SERVICES_APPLICATION' as const, data: Buffer.from('\\EFI\\tools\\shell.efi'), measured: Buffer.from('uefi shell') };
  await measureLog(h.sw.address, buildEventLog([app]));
  writeFileSync(h.logFile, buildEventLog(bootEvents({ extra: [app] })));
  await assert.rejects(h.attestation.attestTpm({ eventLog: h.logFile }), refusedWith('PcrMismatch', /PCR 4 differs from the baseline \(boot configuration changed\): PCR 4: boot application added/));
  h.vault.close();
});

test('release gate: a tpm health certificate is refused once expired, and by a KP that allows only host-key', { skip }, async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  let clock = new Date();
  const h = await readyHost(t, dir, () => clock);
  const cert = await h.attestation.attestTpm({ eventLog: h.logFile });
  assert.equal(cert.claims.hostId, h.state.hostId);
  const owner: HeldGuardian = opensslGuardian('Owner', 'tpm-host');
  const guardians: GuardianDirectory = {
    knownBySigningThumbprint: (tp) => (guardianEntry(owner).signingThumbprint === tp ? owner.name : null),
    held: () => [{ name: owner.name, encryptionThumbprint: guardianEntry(owner).encryptionThumbprint }],
    encryptionKey: () => owner.keys.encryptionKey,
  };
  const check = (modes: ('tpm' | 'host-key')[]) =>
    checkRelease(createKeyProtector({ owner, guardians: [], policy: { modes, hosts: [] } }), { vault: h.vault, guardians, attestation: h.attestation, healthCertificate: cert.encoded });
  assert.deepEqual([check(['tpm']).allowed, check(['tpm']).mode], [true, 'tpm']);
  assert.equal(check(['host-key']).reasons[0]?.code, 'ModeNotAllowed');
  clock = new Date(clock.getTime() + 8 * 3_600_000 + 1000);
  const expired = check(['tpm']);
  assert.equal(expired.allowed, false);
  assert.equal(expired.reasons[0]?.code, 'Expired');
  // Host-key behaviour is unchanged beside it: a host-key certificate of this host still verifies.
  h.attestation.registerHostKey();
  assert.equal(h.attestation.attestHostKey().claims.mode, 'host-key');
  h.vault.close();
});

test('cross-check with tpm2-tools: tpm2_checkquote verifies our quote; our verifier accepts tpm2_quote’s', { skip }, async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const h = await readyHost(t, dir);
  const nonce = randomBytes(32);
  const e = await evidence(h.sw, h.state, nonce, h.logFile, [h.qemu]);
  const w = (name: string, data: Buffer | string) => writeFileSync(join(dir, name), data);
  w('ak.pem', publicKeyPem(parsePublic(Buffer.from(h.state.ak.public, 'base64'))));
  w('q.msg', e.quoted);
  w('q.sig', e.signature);
  w('q.pcrs', serializedPcrs(PCRS, e.pcrValues));
  const qualifying = qualifyingData(nonce, e.binaries).toString('hex');
  const check = (q: string) => tpm2('tpm2_checkquote', ['-u', 'ak.pem', '-m', 'q.msg', '-s', 'q.sig', '-f', 'q.pcrs', '-g', 'sha256', '-q', q], null, { cwd: dir });
  check(qualifying);
  assert.throws(() => check(nonce.toString('hex')), /failed/); // the bare nonce is not what was quoted
  // Nor does it take PCR values other than the quoted ones.
  w('q.pcrs', serializedPcrs(PCRS, { ...e.pcrValues, 7: 'ab'.repeat(32) }));
  assert.throws(() => check(qualifying), /PCR values failed to match/);

  // tpm2-tools makes its own EK and AK (under the EK) and quotes; our verifier checks it against the baseline.
  const tools = (tool: string, ...args: string[]) => tpm2(tool, args, h.sw.address, { cwd: dir });
  tools('tpm2_createek', '-c', 'ek.ctx', '-G', 'rsa', '-u', 'ek.pub');
  tools('tpm2_flushcontext', '-t'); // tpm2-tools keep contexts in files; libtpms has few slots
  tools('tpm2_createak', '-C', 'ek.ctx', '-c', 'ak.ctx', '-G', 'ecc', '-g', 'sha256', '-s', 'ecdsa', '-u', 'ak.pub');
  tools('tpm2_flushcontext', '-t');
  const n2 = randomBytes(32);
  const binaries = measureBinaries([h.qemu]);
  tools('tpm2_quote', '-c', 'ak.ctx', '-l', `sha256:${PCRS.join(',')}`, '-q', qualifyingData(n2, binaries).toString('hex'), '-m', 'tq.msg', '-s', 'tq.sig', '-o', 'tq.pcrs', '-F', 'values', '-g', 'sha256');
  // tpm2_quote's own serialized PCR file is the format we write above, byte for byte.
  tools('tpm2_quote', '-c', 'ak.ctx', '-l', `sha256:${PCRS.join(',')}`, '-q', 'ab', '-m', 'tq2.msg', '-s', 'tq2.sig', '-o', 'tq2.ser', '-g', 'sha256');
  tools('tpm2_flushcontext', '-t');
  const pcrs = readFileSync(join(dir, 'tq.pcrs'));
  assert.deepEqual(readFileSync(join(dir, 'tq2.ser')), serializedPcrs(PCRS, Object.fromEntries(PCRS.map((p, i) => [p, pcrs.subarray(32 * i, 32 * i + 32).toString('hex')]))));
  const theirs: TpmEvidence = {
    quoted: readFileSync(join(dir, 'tq.msg')),
    signature: readFileSync(join(dir, 'tq.sig')),
    pcrValues: Object.fromEntries(PCRS.map((p, i) => [p, pcrs.subarray(32 * i, 32 * i + 32).toString('hex')])),
    eventLog: h.log,
    binaries,
  };
  const akPublic = readFileSync(join(dir, 'ak.pub')).subarray(2); // TPM2B_PUBLIC → TPMT_PUBLIC
  const verdict = verifyTpmEvidence(theirs, { ...expectations(h, n2), akPublic, lastClock: null });
  assert.deepEqual(reasonsOf(verdict), []);
  assert.deepEqual(verdict.quoted, e.pcrValues);
  // …and tells it from one signed by another key.
  assert.deepEqual(reasonsOf(verifyTpmEvidence(theirs, expectations(h, n2))), ['QuoteSignature']);
  h.vault.close();
});

test('a TPM whose state was put back to an older copy (restarted on it) is refused: ClockRollback from the real counters', { skip }, async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const state = join(dir, 'tpm-state');
  const old = join(dir, 'tpm-state-old');
  mkdirSync(state);
  const log = buildEventLog(bootEvents());
  const logFile = join(dir, 'binary_bios_measurements');
  writeFileSync(logFile, log);
  /**
   * One power cycle: swtpm on the folder (TPM2_Startup(CLEAR) counts a reset), the boot measured;
   * stop() shuts it down in order (TPM2_Shutdown, as the OS does), else its clock is not "safe".
   */
  const boot = async (folder: string) => {
    const sw = await startSwtpm(null, 'started', { stateDir: folder });
    await measureLog(sw.address, log);
    const stop = async () => {
      const tpm = await Tpm.open(sw.address);
      try {
        await tpm.shutdown();
      } finally {
        await tpm.close();
      }
      await sw.stop();
    };
    return { ...sw, stop };
  };
  const h = await moduleHost(dir);
  const qemu = join(dir, 'qemu-system-x86_64');
  writeFileSync(qemu, 'qemu 8.2 stand-in');
  let sw = await boot(state);
  try {
    await h.attestation.registerTpm({ address: sw.address });
    await captureBaseline(h.vault, { address: sw.address, eventLog: logFile, now: new Date() });
    addBinary(h.vault, qemu, new Date());
    await h.attestation.attestTpm({ address: sw.address, eventLog: logFile });
  } finally {
    await sw.stop();
  }
  cpSync(state, old, { recursive: true }); // the copy an attacker keeps
  for (let cycle = 0; cycle < 2; cycle++) {
    sw = await boot(state);
    try {
      assert.equal((await h.attestation.attestTpm({ address: sw.address, eventLog: logFile })).claims.mode, 'tpm', `power cycle ${cycle + 1}`);
    } finally {
      await sw.stop();
    }
  }
  const before = loadTpmHost(h.vault)!.lastClock!;
  // The older copy, started: same EK and AK (same seeds), PCRs as the baseline — but its reset
  // counter is behind the one the guardian last saw.
  sw = await boot(old);
  try {
    await assert.rejects(h.attestation.attestTpm({ address: sw.address, eventLog: logFile }), refusedWith('ClockRollback', /reset counter went backwards/));
  } finally {
    await sw.stop();
  }
  assert.deepEqual(loadTpmHost(h.vault)!.lastClock, before, 'a refused attestation does not move the recorded clock');
  // And the real TPM, booted again, still attests.
  sw = await boot(state);
  try {
    await h.attestation.attestTpm({ address: sw.address, eventLog: logFile });
  } finally {
    await sw.stop();
  }
  h.vault.close();
});
