// AD-group attestation against a real Active Directory: a Samba AD DC started by the harness
// (test/helpers/samba.ts) on a loopback address, with computer accounts, groups and nested groups
// made over LDAPS. No LDAP mock. The main flow goes through the CLI; the TLS/bind refusals, two DCs
// and the latency measurement go through the modules in-process. The in-chain matching rule is
// the independent cross-check of the transitive membership our tokenGroups read decides on.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { createServer, type AddressInfo } from 'node:net';
import { join } from 'node:path';
import { Vault } from '../../core/vault/mod.ts';
import { ShieldError } from '../../core/errors.ts';
import { AttestationService } from '../../core/attestation/service.ts';
import { runCli, secretFile, tempDir, type CliResult } from '../helpers/home.ts';
import { cloneDc, decodeSid, sambaMissing, startDc } from '../helpers/samba.ts';

type Json = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

const skip = sambaMissing() ?? false;
const SVC_PASSWORD = 'Svc!Passw0rd-1';
const WRONG_PASSWORD = 'Wr0ng!Passw0rd-9';
const kdf = { N: 1 << 14, r: 8, p: 1 };

/** Every CLI output, to search for the passwords at the end. */
const outputs: string[] = [];

async function cli(args: string[]): Promise<{ code: number | null; body: Json; raw: CliResult }> {
  const raw = await runCli([...args, '--json']);
  outputs.push(raw.stdout, raw.stderr);
  let body: Json;
  try {
    body = JSON.parse(raw.stdout) as Json;
  } catch {
    throw new Error(`${args.join(' ')}: not JSON (exit ${raw.code}): ${raw.stdout}\n${raw.stderr}`);
  }
  return { code: raw.code, body, raw };
}
async function ok(args: string[]): Promise<Json> {
  const r = await cli(args);
  if (r.code !== 0) throw new Error(`${args.join(' ')} exited ${r.code}: ${JSON.stringify(r.body)} ${r.raw.stderr}`);
  return r.body;
}
/** A refusal (exit 1; 2 for a bad argument), its error code and details.reason. */
async function refused(args: string[], reason: string, code = 'attestation_failed'): Promise<Json> {
  const r = await cli(args);
  assert.equal(r.code, code === 'attestation_failed' ? 1 : 2, `${args.join(' ')} should fail: ${JSON.stringify(r.body)}`);
  assert.equal(r.body.error?.code, code, JSON.stringify(r.body));
  assert.equal(r.body.error?.details?.reason, reason, JSON.stringify(r.body));
  return r.body.error as Json;
}

const adRefusal = (reason: string) => (err: unknown) => {
  assert.ok(err instanceof ShieldError, String(err));
  assert.equal(err.code, 'attestation_failed', err.message);
  assert.equal(err.details?.reason, reason, err.message);
  assert.ok(!err.message.includes(SVC_PASSWORD) && !err.message.includes(WRONG_PASSWORD));
  return true;
};

function filesUnder(dir: string): string[] {
  return readdirSync(dir).flatMap((n) => {
    const p = join(dir, n);
    return statSync(p).isDirectory() ? filesUnder(p) : [p];
  });
}

test('ad-group attestation against a real Samba AD DC', { skip, timeout: 170_000 }, async (t) => {
  const dc = await startDc(t);
  const svc = await dc.addUser('svc-shieldlab', SVC_PASSWORD);
  const host1 = await dc.addComputer('LABHOST1');
  const host2 = await dc.addComputer('LABHOST2');
  await dc.addComputer('LABHOST3');
  const approved = await dc.addGroup('Shielded Hosts');
  const inner = await dc.addGroup('Lab Hosts');
  await dc.addMember(approved.dn, 'LABHOST1');
  await dc.addMember(approved.dn, inner.dn);
  await dc.addMember(inner.dn, 'LABHOST2');

  const { dir, cleanup } = tempDir('shieldlab-ad-');
  t.after(cleanup);
  const pp = secretFile(dir, 'pp', 'vault passphrase');
  const svcPw = secretFile(dir, 'svc-pw', SVC_PASSWORD);
  const wrongPw = secretFile(dir, 'wrong-pw', WRONG_PASSWORD);
  const H = ['--home', join(dir, 'home'), '--passphrase-file', pp];
  await ok([...H, 'vault', 'init', '--no-keychain', '--kdf-memory-mib', '16']);

  // --- configure: LDAPS, the DC's CA pinned, its TLS name, the service account, the group by SID
  const base = ['--url', dc.url, '--ca-file', dc.caFile, '--tls-name', dc.hostName, '--bind-dn', svc.dn, '--password-file', svcPw, '--group-sid', approved.sid];
  const configured = await ok([...H, 'host', 'ad', 'configure', ...base, '--computer', 'LABHOST1$']);
  assert.equal(configured.warning, null);
  assert.deepEqual(configured.groups, [{ sid: approved.sid, name: 'Shielded Hosts' }]);
  assert.equal(configured.computer, 'LABHOST1$');
  assert.equal(configured.warning, null);

  // --- host ad test: each step on its own line, ✓, with a time
  const human = await runCli([...H, 'host', 'ad', 'test']);
  outputs.push(human.stdout, human.stderr);
  assert.equal(human.code, 0, human.stdout + human.stderr);
  for (const step of ['connect', 'tls', 'bind', 'computer', 'enabled', 'membership']) assert.match(human.stdout, new RegExp(`✓ ${step} .*\\(\\d+(\\.\\d)? ms\\)`), human.stdout);
  assert.match(human.stdout, /LABHOST1\$ → Shielded Hosts/);
  assert.match(human.stdout, /weaker than tpm mode/);
  const tested = await ok([...H, 'host', 'ad', 'test']);
  assert.deepEqual(tested.steps.map((s: Json) => s.step), ['connect', 'tls', 'bind', 'computer', 'enabled', 'membership']);
  assert.equal(tested.computer.sid, host1.sid);

  // --- direct member → an ad-group certificate, and key release for a KP that allows ad-group
  const attested = await ok([...H, 'host', 'attest', '--mode', 'ad-group']);
  assert.equal(attested.certificate.mode, 'ad-group');
  assert.equal(attested.certificate.valid, true);
  assert.equal(attested.certificate.hostId, attested.ad.hostId);
  assert.equal(attested.ad.lastAttestation.computerSid, host1.sid);
  assert.deepEqual(attested.ad.lastAttestation.membership.path, ['Shielded Hosts']);
  assert.equal(Date.parse(attested.certificate.expiresAt) - Date.parse(attested.certificate.issuedAt), 8 * 3_600_000);
  const kp = join(dir, 'vm.kp');
  await ok([...H, 'guardian', 'create', 'Owner']);
  await ok([...H, 'guardian', 'export', 'Owner', '--pfx', '--out-dir', join(dir, 'backup'), '--password-file', pp]);
  await ok([...H, 'kp', 'create', '--owner', 'Owner', '--allow-mode', 'ad-group', '--out', kp]);
  const release = await ok([...H, 'kp', 'release', kp, '--check']);
  assert.equal(release.allowed, true, JSON.stringify(release));
  assert.equal(release.mode, 'ad-group');

  // --- group renamed: the SID is what was registered, so nothing changes
  await dc.renameGroup(approved.dn, 'Guarded Hosts');
  const renamed = await ok([...H, 'host', 'attest', '--mode', 'ad-group']);
  assert.deepEqual(renamed.ad.lastAttestation.membership.path, ['Guarded Hosts']);

  // --- DC stopped: DcUnreachable, but the still-valid certificate keeps releasing until it expires
  await dc.stop();
  const down = await refused([...H, 'host', 'attest', '--mode', 'ad-group'], 'DcUnreachable');
  assert.match(down.message, /ECONNREFUSED/);
  const stillOk = await ok([...H, 'kp', 'release', kp, '--check']);
  assert.equal(stillOk.allowed, true);
  const downTest = await cli([...H, 'host', 'ad', 'test']);
  assert.equal(downTest.code, 1);
  assert.equal(downTest.body.reason, 'DcUnreachable');
  assert.deepEqual(downTest.body.steps.map((s: Json) => [s.step, s.ok]), [['connect', false]]);
  await dc.start();

  // --- removed from the group: NotAMember, and the earlier certificate is withdrawn
  await dc.removeMember('Guarded Hosts', 'LABHOST1');
  const removed = await refused([...H, 'host', 'attest', '--mode', 'ad-group'], 'NotAMember');
  assert.match(removed.message, /none of them approved/);
  assert.equal((await ok([...H, 'host', 'status'])).certificate, null);
  const denied = await cli([...H, 'kp', 'release', kp, '--check']);
  assert.equal(denied.code, 1);
  assert.equal(denied.body.allowed, false);
  await dc.addMember('Guarded Hosts', 'LABHOST1');
  await ok([...H, 'host', 'attest', '--mode', 'ad-group']);

  // --- disabled account: ComputerDisabled
  await dc.disableAccount('LABHOST1');
  await refused([...H, 'host', 'attest', '--mode', 'ad-group'], 'ComputerDisabled');
  await dc.enableAccount('LABHOST1');

  // --- nested: LABHOST2 is in Lab Hosts, which is in the approved group; the path names Lab Hosts
  await ok([...H, 'host', 'ad', 'configure', '--computer', 'LABHOST2$']);
  const nested = await ok([...H, 'host', 'attest', '--mode', 'ad-group']);
  assert.equal(nested.certificate.mode, 'ad-group');
  assert.deepEqual(nested.ad.lastAttestation.membership.path, ['Lab Hosts', 'Guarded Hosts']);
  // Independent cross-check: the in-chain matching rule, as the service account.
  const c = await dc.bind(svc.dn, SVC_PASSWORD);
  const chain = await c.search(dc.baseDn, {
    filter: `(&(objectClass=group)(member:1.2.840.113556.1.4.1941:=${host2.dn}))`,
    attributes: ['objectSid'],
    explicitBufferAttributes: ['objectSid'],
  });
  await c.unbind();
  assert.deepEqual(chain.searchEntries.map((e) => decodeSid(e.objectSid as Buffer)).sort(), [inner.sid, approved.sid].sort());

  // --- not a member at all: NotAMember; a computer that does not exist: ComputerNotFound
  await ok([...H, 'host', 'ad', 'configure', '--computer', 'LABHOST3$']);
  await refused([...H, 'host', 'attest', '--mode', 'ad-group'], 'NotAMember');
  await ok([...H, 'host', 'ad', 'configure', '--computer', 'NOSUCHHOST$']);
  await refused([...H, 'host', 'attest', '--mode', 'ad-group'], 'ComputerNotFound');

  // --- plain ldap:// refused without --allow-plain-ldap; ldap:// + StartTLS works
  await refused([...H, 'host', 'ad', 'configure', '--url', dc.starttlsUrl, '--computer', 'LABHOST1$'], 'PlainLdapRefused', 'invalid_argument');
  const st = await ok([...H, 'host', 'ad', 'test', '--url', dc.starttlsUrl, '--starttls', '--computer', 'LABHOST1$']);
  assert.equal(st.ok, true);
  assert.match(st.steps.find((s: Json) => s.step === 'tls').detail, /StartTLS/);
  await ok([...H, 'host', 'ad', 'configure', '--url', dc.starttlsUrl, '--starttls', '--computer', 'LABHOST1$']);
  await ok([...H, 'host', 'attest', '--mode', 'ad-group']);
  // Lab-only plain LDAP: Samba itself refuses a simple bind without TLS.
  const plain = await cli([...H, 'host', 'ad', 'test', '--url', dc.starttlsUrl, '--allow-plain-ldap', '--no-starttls']);
  assert.equal(plain.code, 1);
  assert.equal(plain.body.reason, 'BindFailed', JSON.stringify(plain.body));
  assert.match(plain.body.message, /strong auth/);
  assert.match(plain.body.steps.find((s: Json) => s.step === 'tls').detail, /plain LDAP allowed for a lab/);

  // --- the bind password never shows: not in show --json, the audit trail, any output, the home's files
  const shown = await ok([...H, 'host', 'ad', 'show']);
  assert.equal(shown.bindDn, svc.dn);
  assert.ok(!('bindPassword' in shown) && !('password' in shown));
  await ok([...H, 'host', 'ad', 'configure', '--password-file', wrongPw]);
  await refused([...H, 'host', 'attest', '--mode', 'ad-group'], 'BindFailed');
  const audit = (await ok([...H, 'vault', 'audit', '--limit', '500'])).entries as Json[];
  const attests = audit.filter((e) => e.action === 'host.attest' && e.subject === 'ad-group');
  for (const reason of ['DcUnreachable', 'NotAMember', 'ComputerDisabled', 'ComputerNotFound', 'BindFailed']) assert.ok(attests.some((e) => e.reason === reason), reason);
  assert.ok(audit.some((e) => e.action === 'host.certificate-withdrawn' && e.reason === 'NotAMember'));
  const everything = outputs.join('\n') + JSON.stringify(audit) + filesUnder(join(dir, 'home')).map((f) => readFileSync(f).toString('latin1')).join('');
  for (const secret of [SVC_PASSWORD, WRONG_PASSWORD]) {
    assert.ok(!everything.includes(secret), `the bind password ${secret} leaked`);
    assert.ok(!everything.includes(Buffer.from(secret, 'utf16le').toString('latin1')));
  }

  // --- in-process from here: TLS pin, bind password, two DCs, latency
  const vault = await Vault.create(join(dir, 'home2'), { passphrase: Buffer.from('pw'), kdf });
  t.after(() => vault.close());
  const svcIn = new AttestationService(vault);
  const input = { urls: [dc.url], tlsNames: [dc.hostName], caPem: dc.caPem, bindDn: svc.dn, bindPassword: SVC_PASSWORD, computer: 'LABHOST1$', groupSids: [approved.sid] };
  await svcIn.configureAd(input);
  await svcIn.attestAdGroup();

  // Wrong CA pin (a copy of the DC with a CA of its own), then the right CA but another name.
  const other = await cloneDc(t, dc);
  await svcIn.configureAd({ caPem: other.caPem });
  await assert.rejects(svcIn.attestAdGroup(), adRefusal('TlsUntrusted'));
  const tlsReport = await svcIn.testAd();
  assert.deepEqual(tlsReport.steps.map((s) => [s.step, s.ok]), [['connect', true], ['tls', false]]);
  assert.equal(svcIn.status().certificate?.valid, true, 'an untrusted DC proves nothing: the certificate stands');
  await other.stop();
  await svcIn.configureAd({ caPem: dc.caPem, tlsNames: ['dc9.shieldlab.test'] });
  await assert.rejects(svcIn.attestAdGroup(), adRefusal('TlsUntrusted'));
  // No TLS name: the DC's IP is checked against the certificate, which names no IP.
  const vault3 = await Vault.create(join(dir, 'home3'), { passphrase: Buffer.from('pw'), kdf });
  t.after(() => vault3.close());
  await new AttestationService(vault3).configureAd({ ...input, tlsNames: [] });
  await assert.rejects(new AttestationService(vault3).attestAdGroup(), (e: unknown) => adRefusal('TlsUntrusted')(e) && /--tls-name/.test((e as Error).message));

  // Wrong bind password.
  await svcIn.configureAd({ tlsNames: [dc.hostName], bindPassword: WRONG_PASSWORD });
  await assert.rejects(svcIn.attestAdGroup(), (e: unknown) => adRefusal('BindFailed')(e) && /credentials/.test((e as Error).message));
  await svcIn.configureAd({ bindPassword: SVC_PASSWORD });

  // Two DCs, the first stopped: the second answers; the test report shows both.
  const second = await cloneDc(t, dc, { keepCa: true });
  await svcIn.configureAd({ urls: [dc.url, second.url], tlsNames: [dc.hostName] });
  await dc.stop();
  const cert = await svcIn.attestAdGroup();
  assert.equal(cert.claims.mode, 'ad-group');
  assert.equal(svcIn.status().ad?.lastAttestation?.dc, second.url);
  const two = await svcIn.testAd();
  assert.equal(two.ok, true);
  assert.equal(two.dc, second.url);
  assert.deepEqual(two.failedDcs.map((f) => [f.dc, f.reason]), [[dc.url, 'DcUnreachable']]);
  assert.deepEqual(two.steps.map((s) => [s.dc === dc.url ? 1 : 2, s.step, s.ok]), [
    [1, 'connect', false], [2, 'connect', true], [2, 'tls', true], [2, 'bind', true], [2, 'computer', true], [2, 'enabled', true], [2, 'membership', true],
  ]);
  // Both down: every DC named in the refusal.
  await second.stop();
  await assert.rejects(svcIn.attestAdGroup(), (e: unknown) => adRefusal('DcUnreachable')(e) && (e as ShieldError).message.includes(dc.url) && (e as ShieldError).message.includes(second.url));
  await dc.start();

  // A DC that accepts the connection and then never says a word (hung, or a black hole in
  // between): bounded by the timeout, then the next DC answers.
  const silent = createServer((socket) => void socket); // holds every connection open, answers nothing
  await new Promise<void>((r) => silent.listen(0, '127.0.0.1', () => r()));
  t.after(() => silent.close());
  const silentUrl = `ldaps://127.0.0.1:${(silent.address() as AddressInfo).port}`;
  await svcIn.configureAd({ urls: [silentUrl, dc.url], tlsNames: [dc.hostName], timeoutMs: 1000 });
  const started = performance.now();
  const viaSecond = await svcIn.testAd();
  const waited = performance.now() - started;
  assert.equal(viaSecond.ok, true);
  assert.equal(viaSecond.dc, dc.url);
  assert.deepEqual(viaSecond.failedDcs.map((f) => [f.dc, f.reason]), [[silentUrl, 'DcUnreachable']]);
  assert.ok(waited >= 900 && waited < 8000, `the silent DC cost ${waited.toFixed(0)} ms (timeout 1 s)`);
  await svcIn.configureAd({ urls: [silentUrl] });
  await assert.rejects(svcIn.attestAdGroup(), (e: unknown) => adRefusal('DcUnreachable')(e) && /time/i.test((e as Error).message));

  // Latency: median of 10 in-process attestations against the DC (LDAPS, CA pinned).
  await svcIn.configureAd({ urls: [dc.url], timeoutMs: 5000 });
  const times: number[] = [];
  for (let i = 0; i < 10; i++) {
    const s = performance.now();
    await svcIn.attestAdGroup();
    times.push(performance.now() - s);
  }
  times.sort((a, b) => a - b);
  const median = (times[4]! + times[5]!) / 2;
  t.diagnostic(`ad-group attest latency against the Samba DC: median ${median.toFixed(1)} ms (min ${times[0]!.toFixed(1)}, max ${times[9]!.toFixed(1)}; 10 runs, LDAPS + tokenGroups + memberOf walk)`);
  assert.ok(median < 2000);
});
