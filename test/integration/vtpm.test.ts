// core/vtpm against a real swtpm (libtpms), checked with tpm2-tools and openssl as independent
// oracles: first-start provisioning (SHA-256 bank only, EK, EK certificate from the owner
// guardian's CA in NV 0x01C00002), persistence across restarts, no plaintext or key on disk or in
// swtpm's command line/environment, refusal of copied state without its key or with a wrong one,
// and the crash signal.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createPublicKey, randomBytes, X509Certificate } from 'node:crypto';
import { cpSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ShieldError } from '../../core/errors.ts';
import { EK_CERT_NV_INDEX, TPMA_NV, TPM_ALG, TPM_RH, publicKeyPem } from '../../core/tpm/mod.ts';
import { EK_CERT_NV_ATTRIBUTES, EK_PERSISTENT_HANDLE, deriveVtpmKey, ekCaCertificate, provisionVtpm, readMarker, startVtpm, type Vtpm } from '../../core/vtpm/mod.ts';
import { launchSwtpm } from '../../core/vtpm/process.ts';
import { opensslGuardian } from '../helpers/guardian-certs.ts';
import { tempDir } from '../helpers/home.ts';
import { swtpmMissing, tpm2, tpm2ToolsMissing } from '../helpers/swtpm.ts';

const skip = swtpmMissing() ?? tpm2ToolsMissing() ?? false;
const PATTERN = Buffer.from(Array.from({ length: 64 }, (_, i) => (0x5a ^ (i * 37)) & 0xff));
const USER_NV = 0x01500001;

function stateBytes(dir: string): Buffer {
  return Buffer.concat(readdirSync(dir).filter((f) => statSync(join(dir, f)).isFile()).map((f) => readFileSync(join(dir, f))));
}

async function writePattern(vtpm: Vtpm): Promise<void> {
  const tpm = vtpm.client();
  try {
    await tpm.startup();
    await tpm.nvDefineSpace({ nvIndex: USER_NV, nameAlg: TPM_ALG.SHA256, attributes: TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.NO_DA, authPolicy: Buffer.alloc(0), dataSize: PATTERN.length });
    await tpm.nvWrite(USER_NV, PATTERN, { authHandle: TPM_RH.OWNER });
  } finally {
    await tpm.close();
  }
}

async function rejectsUnusable(p: Promise<unknown>): Promise<ShieldError> {
  try {
    await p;
  } catch (err) {
    assert.ok(err instanceof ShieldError, `a ShieldError, not ${String(err)}`);
    assert.equal(err.code, 'vtpm_state_invalid', err.message);
    assert.equal(err.details?.reason, 'state_key_mismatch', err.message);
    return err;
  }
  assert.fail('swtpm started on state it cannot decrypt');
}

test('vTPM with encrypted state', { skip }, async (t) => {
  const work = tempDir('shieldlab-vtpm-test-');
  const owner = opensslGuardian('owner');
  const transportKey = randomBytes(32);
  const key = deriveVtpmKey(transportKey);
  const stateDir = join(work.dir, 'state');
  const started: Vtpm[] = [];
  t.after(async () => {
    for (const v of started) await v.stop();
    work.cleanup();
  });
  const start = async (opts: Partial<Parameters<typeof startVtpm>[0]> = {}) => {
    const v = await startVtpm({ stateDir, key, dataSocket: true, ...opts });
    started.push(v);
    return v;
  };
  let ekPem = '';

  await t.test('the key is HKDF of the transport key under its own label', () => {
    assert.equal(key.length, 32);
    assert.deepEqual(deriveVtpmKey(transportKey), key);
    assert.notDeepEqual(deriveVtpmKey(randomBytes(32)), key);
  });

  await t.test('first start provisions: SHA-256 bank, EK, EK certificate from the guardian CA', async () => {
    const t0 = Date.now();
    const vtpm = await start();
    assert.equal(statSync(vtpm.runDir).mode & 0o777, 0o700);
    assert.equal(statSync(vtpm.ctrlSocket).mode & 0o777, 0o600);
    const res = await provisionVtpm(vtpm, { owner, vmName: 'vm-one' });
    const took = Date.now() - t0;
    assert.equal(res.provisioned, true);
    t.diagnostic(`start + provision: ${took} ms`);
    const certDer = res.ekCertDer!;
    ekPem = res.ekPublicPem!;

    // Our client: the NV index and its attributes, the persistent EK.
    const tpm = vtpm.client();
    try {
      assert.deepEqual(await tpm.nvRead(EK_CERT_NV_INDEX.RSA2048), certDer);
      const { nvPublic } = await tpm.nvReadPublic(EK_CERT_NV_INDEX.RSA2048);
      assert.equal(nvPublic.attributes & ~TPMA_NV.WRITTEN & ~TPMA_NV.WRITELOCKED, EK_CERT_NV_ATTRIBUTES);
      assert.ok(nvPublic.attributes & TPMA_NV.WRITELOCKED, 'write-locked');
      assert.equal(publicKeyPem((await tpm.readPublic(EK_PERSISTENT_HANDLE)).outPublic.publicArea), ekPem);
    } finally {
      await tpm.close();
    }

    // tpm2-tools and openssl as oracles.
    const d = join(work.dir, 'oracle');
    mkdirSync(d);
    tpm2('tpm2_nvread', ['0x01c00002', '-C', '0x01c00002', '-o', join(d, 'ek.der')], vtpm.tcti);
    assert.deepEqual(readFileSync(join(d, 'ek.der')), certDer);
    tpm2('tpm2_readpublic', ['-c', '0x81010001', '-f', 'pem', '-o', join(d, 'ekpub.pem')], vtpm.tcti);
    const fromCert = execFileSync('openssl', ['x509', '-inform', 'der', '-in', join(d, 'ek.der'), '-noout', '-pubkey'], { encoding: 'utf8' });
    const fromTpm = readFileSync(join(d, 'ekpub.pem'), 'utf8');
    assert.ok(createPublicKey(fromCert).equals(createPublicKey(fromTpm)), 'certificate key = EK public');
    assert.ok(createPublicKey(fromTpm).equals(createPublicKey(ekPem)));
    writeFileSync(join(d, 'ca.pem'), ekCaCertificate(owner));
    assert.equal(ekCaCertificate(owner), ekCaCertificate(owner), 'the CA certificate is rebuilt byte for byte');
    writeFileSync(join(d, 'ek.pem'), new X509Certificate(certDer).toString());
    assert.match(execFileSync('openssl', ['verify', '-CAfile', join(d, 'ca.pem'), join(d, 'ek.pem')], { encoding: 'utf8' }), /ek\.pem: OK/);
    const text = execFileSync('openssl', ['x509', '-in', join(d, 'ek.pem'), '-noout', '-text'], { encoding: 'utf8' });
    assert.match(text, /Subject: CN ?= ?ShieldLab vTPM EK vm-one/);
    assert.match(text, /Issuer: CN ?= ?ShieldLab vTPM EK CA \(owner\)/);
    assert.match(text, /2\.23\.133\.8\.1/);
    // The guardian's own signing certificate (CA:FALSE) holds the same key as the CA certificate.
    assert.ok(new X509Certificate(owner.signingCertPem).publicKey.equals(new X509Certificate(ekCaCertificate(owner)).publicKey));

    const pcrs = tpm2('tpm2_getcap', ['pcrs'], vtpm.tcti);
    t.diagnostic(`tpm2_getcap pcrs:\n${pcrs.trim()}`);
    assert.match(pcrs, /sha256: \[ 0, 1, 2/);
    for (const other of ['sha1', 'sha384', 'sha512']) assert.doesNotMatch(pcrs, new RegExp(`${other}: \\[ \\d`), `${other} bank deallocated`);
    assert.equal(readMarker(stateDir)?.pcrBanks[0], 'sha256');
  });

  await t.test('no key in swtpm’s command line or environment; no plaintext or key on disk', async () => {
    const vtpm = started.at(-1)!;
    for (const f of ['cmdline', 'environ']) {
      const bytes = readFileSync(`/proc/${vtpm.pid}/${f}`);
      assert.equal(bytes.indexOf(key), -1, `raw key in /proc/pid/${f}`);
      assert.equal(bytes.toString('latin1').toLowerCase().indexOf(key.toString('hex')), -1, `hex key in /proc/pid/${f}`);
      assert.equal(bytes.toString('latin1').indexOf(key.toString('base64')), -1, `base64 key in /proc/pid/${f}`);
    }
    assert.match(readFileSync(`/proc/${vtpm.pid}/cmdline`, 'latin1'), /--key\0fd=3,mode=aes-256-cbc/);
    await writePattern(vtpm);
    await vtpm.stop();
    const disk = stateBytes(stateDir);
    assert.ok(disk.length > 1000);
    assert.equal(disk.indexOf(PATTERN), -1, 'NV plaintext in the state files');
    assert.equal(disk.indexOf(PATTERN.subarray(0, 16)), -1);
    assert.equal(disk.indexOf(key), -1, 'key in the state folder');
    assert.equal(disk.toString('latin1').indexOf(key.toString('hex')), -1);
  });

  await t.test('control: without a key the same pattern is on disk in clear (the scan can see it)', async () => {
    const plainDir = join(work.dir, 'plain');
    const v = await launchSwtpm({ stateDir: plainDir, key: null, dataSocket: true });
    started.push(v);
    await writePattern(v);
    await v.stop();
    assert.notEqual(stateBytes(plainDir).indexOf(PATTERN), -1);
  });

  await t.test('restart with the same key: same EK, no re-provisioning, NV kept', async () => {
    const vtpm = await start();
    const res = await provisionVtpm(vtpm, { owner, vmName: 'vm-one' });
    assert.equal(res.provisioned, false);
    const tpm = vtpm.client();
    try {
      await tpm.startup();
      assert.equal(publicKeyPem((await tpm.readPublic(EK_PERSISTENT_HANDLE)).outPublic.publicArea), ekPem);
      const again = await tpm.withTransient(tpm.createEk('rsa'), async (ek) => publicKeyPem(ek.outPublic.publicArea));
      assert.equal(again, ekPem, 'the template EK is the persisted one');
      assert.deepEqual(await tpm.nvRead(USER_NV, { authHandle: TPM_RH.OWNER }), PATTERN);
      const banks = await tpm.pcrBanks();
      assert.deepEqual(banks.filter((b) => b.pcrs.length > 0).map((b) => b.hash), [TPM_ALG.SHA256]);
    } finally {
      await tpm.close();
    }
    await vtpm.stop();
  });

  await t.test('copied state without the key, or with a wrong key, is refused', async () => {
    const copyA = join(work.dir, 'copy-a');
    const copyB = join(work.dir, 'copy-b');
    cpSync(stateDir, copyA, { recursive: true });
    cpSync(stateDir, copyB, { recursive: true });
    const none = await rejectsUnusable(launchSwtpm({ stateDir: copyA, key: null, dataSocket: true }));
    t.diagnostic(`no key: ${none.message} / ${String(none.details?.stderr).trim().split('\n')[0]}`);
    const wrong = await rejectsUnusable(startVtpm({ stateDir: copyB, key: deriveVtpmKey(randomBytes(32)), dataSocket: true }));
    t.diagnostic(`wrong key: ${String(wrong.details?.stderr).trim().split('\n')[0]}`);
    // And the right key still opens the copy.
    const ok = await start({ stateDir: copyB });
    await ok.stop();
  });

  await t.test('VM mode: control socket only, for QEMU', async () => {
    const vtpm = await start({ dataSocket: false });
    assert.equal(vtpm.dataSocket, null);
    assert.throws(() => vtpm.client(), ShieldError);
    const caps = execFileSync('swtpm_ioctl', ['--unix', vtpm.ctrlSocket, '-c'], { encoding: 'utf8' });
    assert.match(caps, /ptm capability is 0x/);
    await vtpm.stop();
  });

  await t.test('kill -9: crashed fires', async () => {
    const vtpm = await start();
    let fired = false;
    void vtpm.crashed.then(() => (fired = true));
    process.kill(vtpm.pid, 'SIGKILL');
    const exit = await vtpm.crashed;
    assert.equal(exit.signal, 'SIGKILL');
    assert.ok(fired);
    await vtpm.stop(); // idempotent after a crash
    // A clean stop does not count as a crash.
    const calm = await start();
    let crashed = false;
    void calm.crashed.then(() => (crashed = true));
    await calm.stop();
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(crashed, false);
  });
});
