// Smoke test of the Samba AD harness (test/helpers/samba.ts): a real DC, objects created over
// LDAPS, a service account that binds with the DC's CA pinned and reads transitive membership.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Client } from 'ldapts';
import { cloneDc, decodeSid, encodeSid, sambaMissing, startDc } from '../helpers/samba.ts';

const skip = sambaMissing() ?? false;
const SVC_PASSWORD = 'Svc!Passw0rd-1';

/** ldapts gives one value as a Buffer, several as Buffer[]. */
function values(v: unknown): Buffer[] {
  return v === undefined ? [] : Array.isArray(v) ? (v as Buffer[]) : [v as Buffer];
}

test('SID codec round-trips', () => {
  const sid = 'S-1-5-21-1034229897-2611858962-1582205763-1105';
  assert.equal(decodeSid(encodeSid(sid)), sid);
  assert.equal(decodeSid(Buffer.from('010100000000000512000000', 'hex')), 'S-1-5-18');
  assert.throws(() => decodeSid(Buffer.from('0102', 'hex')));
});

test('a real Samba AD DC: LDAPS bind with a pinned CA, tokenGroups, stop and start', { skip, timeout: 90_000 }, async (t) => {
  const dc = await startDc(t);
  assert.match(dc.url, /^ldaps:\/\/127\.0\.0\.\d+:636$/);
  assert.equal(dc.hostName, 'dc1.shieldlab.test');
  assert.match(dc.caPem, /BEGIN CERTIFICATE/);

  const svc = await dc.addUser('svc-shieldlab', SVC_PASSWORD);
  const host = await dc.addComputer('HOST1');
  const other = await dc.addComputer('HOST2');
  const inner = await dc.addGroup('Shielded Hosts Inner');
  const outer = await dc.addGroup('Shielded Hosts');
  await dc.addMember(outer.dn, inner.dn);
  await dc.addMember('Shielded Hosts Inner', 'HOST1');
  assert.equal(host.sAMAccountName, 'HOST1$');
  assert.match(outer.sid, /^S-1-5-21-\d+-\d+-\d+-\d+$/);

  // The service account, as the product will: LDAPS, CA pinned, DC name checked.
  const c = await dc.bind(svc.dn, SVC_PASSWORD);
  t.after(() => c.unbind().catch(() => {}));
  const { searchEntries: found } = await c.search(dc.baseDn, {
    filter: '(&(objectCategory=computer)(sAMAccountName=HOST1$))',
    attributes: ['userAccountControl', 'objectSid'],
    explicitBufferAttributes: ['objectSid'],
  });
  assert.equal(found.length, 1);
  assert.equal(found[0]!.dn, host.dn);
  assert.equal(Number(found[0]!.userAccountControl) & 0x2, 0);
  assert.equal(decodeSid(found[0]!.objectSid as Buffer), host.sid);

  const tokenGroups = async (dn: string): Promise<string[]> => {
    const [e] = (await c.search(dn, { scope: 'base', attributes: ['tokenGroups'], explicitBufferAttributes: ['tokenGroups'] })).searchEntries;
    return values(e?.tokenGroups).map(decodeSid);
  };
  const tg = await tokenGroups(host.dn);
  assert.ok(tg.includes(inner.sid), 'direct group');
  assert.ok(tg.includes(outer.sid), 'nested group');
  assert.ok(!(await tokenGroups(other.dn)).includes(outer.sid));

  // The in-chain matching rule gives the same answer.
  const chain = await c.search(dc.baseDn, {
    filter: `(&(objectClass=group)(member:1.2.840.113556.1.4.1941:=${host.dn}))`,
    attributes: ['objectSid'],
    explicitBufferAttributes: ['objectSid'],
  });
  assert.deepEqual(chain.searchEntries.map((e) => decodeSid(e.objectSid as Buffer)).sort(), [inner.sid, outer.sid].sort());

  // Removal and disabling show up at once; a rename keeps the SID.
  await dc.removeMember(inner.dn, 'HOST1');
  assert.ok(!(await tokenGroups(host.dn)).includes(outer.sid));
  await dc.addMember(inner.dn, host.dn);
  const renamed = await dc.renameGroup(outer.dn, 'Guarded Hosts');
  assert.equal((await dc.lookup('Guarded Hosts')).sid, outer.sid);
  assert.equal((await dc.lookup(renamed)).sid, outer.sid);
  assert.ok((await tokenGroups(host.dn)).includes(outer.sid));
  await dc.disableAccount('HOST1');
  const [h] = (await c.search(host.dn, { scope: 'base', attributes: ['userAccountControl'] })).searchEntries;
  assert.equal(Number(h!.userAccountControl) & 0x2, 0x2);

  // Wrong password → invalidCredentials (49); a simple bind without TLS → strongAuthRequired (8).
  await assert.rejects(dc.bind(svc.dn, 'wrong'), (e: Error & { code?: number }) => e.code === 49);
  const plain = new Client({ url: dc.starttlsUrl });
  await assert.rejects(plain.bind(svc.dn, SVC_PASSWORD), (e: Error & { code?: number }) => e.code === 8);
  await plain.unbind().catch(() => {});
  // StartTLS on 389 with the same pin works.
  const st = new Client({ url: dc.starttlsUrl });
  await st.startTLS(dc.tlsOptions());
  await st.bind(svc.dn, SVC_PASSWORD);
  await st.unbind();

  // A second DC (a copy: same domain, objects and SIDs) with its own CA: pinning that CA fails against the first.
  const dc2 = await cloneDc(t, dc);
  assert.notEqual(dc2.address, dc.address);
  assert.notEqual(dc2.caPem, dc.caPem);
  const wrongCa = new Client({ url: dc.url, tlsOptions: { ca: [dc2.caPem], servername: dc.hostName } });
  await assert.rejects(wrongCa.bind(svc.dn, SVC_PASSWORD), (e: Error & { code?: string }) => /^(UNABLE_TO_VERIFY_LEAF_SIGNATURE|SELF_SIGNED_CERT_IN_CHAIN|DEPTH_ZERO_SELF_SIGNED_CERT|CERT_SIGNATURE_FAILURE)$/.test(String(e.code)));
  await wrongCa.unbind().catch(() => {});
  // The right CA but another name → hostname check fails: verification stays real.
  const wrongName = new Client({ url: dc.url, tlsOptions: { ca: [dc.caPem], servername: 'dc9.shieldlab.test' } });
  await assert.rejects(wrongName.bind(svc.dn, SVC_PASSWORD), (e: Error & { code?: string }) => e.code === 'ERR_TLS_CERT_ALTNAME_INVALID');
  await wrongName.unbind().catch(() => {});

  // Stop → connection refused; the copy still answers with the same SIDs; start → works again.
  await dc.stop();
  await assert.rejects(dc.bind(svc.dn, SVC_PASSWORD), (e: Error & { code?: string }) => e.code === 'ECONNREFUSED');
  const c2 = await dc2.bind(svc.dn, SVC_PASSWORD);
  const [e2] = (await c2.search(host.dn, { scope: 'base', attributes: ['tokenGroups'], explicitBufferAttributes: ['tokenGroups'] })).searchEntries;
  assert.ok(values(e2?.tokenGroups).map(decodeSid).includes(outer.sid));
  await c2.unbind();
  await dc.start();
  const again = await dc.bind(svc.dn, SVC_PASSWORD);
  assert.ok((await dc.tokenGroups('HOST1')).includes(inner.sid));
  await again.unbind();
});
