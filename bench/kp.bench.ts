// Key protector benchmark: create, grant, parse+verify and release per second, in-process, next
// to the crypto floor each operation cannot go below (the same RSA operations done directly with
// node:crypto, no format, no vault, no audit). The ratio shows what the format, the checks and the
// audited vault cost on top of the cryptography.
//
//   node_modules/.bin/node bench/kp.bench.ts [--ops N] [--json]
import { constants, generateKeyPairSync, privateDecrypt, publicEncrypt, randomBytes, sign, verify } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Vault } from '../core/vault/mod.ts';
import { GuardianStore } from '../core/guardian/store.ts';
import { AttestationService } from '../core/attestation/service.ts';
import { createKeyProtector, grantGuardian, parseKeyProtector, type HeldGuardian } from '../core/guardian/key-protector.ts';
import { releaseTransportKey } from '../core/guardian/release.ts';

const argv = process.argv.slice(2);
const json = argv.includes('--json');
const opsArg = argv.indexOf('--ops');
const N = opsArg >= 0 ? Number(argv[opsArg + 1]) : 200;
if (!Number.isInteger(N) || N < 5) {
  process.stderr.write('usage: kp.bench.ts [--ops N (>= 5)] [--json]\n');
  process.exit(2);
}

const root = mkdtempSync(join(tmpdir(), 'shieldlab-kp-bench-'));
const rate = (ms: number, n = N) => (n * 1000) / ms;
function timed(fn: () => void, n = N): number {
  const t = performance.now();
  for (let i = 0; i < n; i++) fn();
  return performance.now() - t;
}

try {
  const vault = await Vault.create(join(root, 'home'), { passphrase: Buffer.from('bench'), kdf: { N: 1 << 14, r: 8, p: 1 } });
  const store = new GuardianStore(vault);
  const tCreateGuardian = performance.now();
  for (const name of ['Owner', 'G1', 'G2', 'G3']) store.create(name);
  const guardianMs = (performance.now() - tCreateGuardian) / 4;
  store.markBackedUp(['Owner']);
  const held = (name: string): HeldGuardian => ({ name, ...store.certificates(name), keys: store.privateKeys(name) });
  const owner = held('Owner');
  const pub = (name: string) => ({ name, ...store.certificates(name) });
  const attestation = new AttestationService(vault);
  attestation.registerHostKey();
  const cert = attestation.attestHostKey().encoded;

  let kpBytes: Buffer = Buffer.alloc(0);
  const createMs = timed(() => {
    kpBytes = createKeyProtector({ owner, guardians: [pub('G1'), pub('G2')], policy: { modes: ['host-key'], hosts: [] } });
  });
  const kp = parseKeyProtector(kpBytes);
  const grantMs = timed(() => grantGuardian(kp, owner, pub('G3')));
  const parseMs = timed(() => parseKeyProtector(kpBytes));
  const releaseMs = timed(() => releaseTransportKey(kpBytes, { vault, guardians: store, attestation, healthCertificate: cert, purpose: 'bench' }).transportKey.fill(0));

  // The crypto floor: what each operation needs at minimum, straight through node:crypto.
  const rsa = () => generateKeyPairSync('rsa', { modulusLength: 2048 });
  const [s, e1, e2, e3] = [rsa(), rsa(), rsa(), rsa()];
  const oaep = (key: typeof e1.publicKey, data: Buffer) => publicEncrypt({ key, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256' }, data);
  const pss = { padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: 32 };
  const msg = randomBytes(2048);
  const floorCreate = timed(() => {
    const k = randomBytes(32);
    for (const x of [e1, e2, e3]) oaep(x.publicKey, k);
    sign('sha256', msg, { key: s.privateKey, ...pss });
    sign('sha256', msg, { key: s.privateKey, ...pss });
  });
  const wrapped = oaep(e1.publicKey, randomBytes(32));
  const sig = sign('sha256', msg, { key: s.privateKey, ...pss });
  const floorVerify = timed(() => {
    verify('sha256', msg, { key: s.publicKey, ...pss }, sig);
    verify('sha256', msg, { key: s.publicKey, ...pss }, sig);
  });
  const floorRelease = timed(() => {
    verify('sha256', msg, { key: s.publicKey, ...pss }, sig);
    verify('sha256', msg, { key: s.publicKey, ...pss }, sig);
    privateDecrypt({ key: e1.privateKey, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256' }, wrapped);
  });
  const floorGrant = timed(() => {
    privateDecrypt({ key: e1.privateKey, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256' }, wrapped);
    const k = randomBytes(32);
    for (const x of [e1, e2, e3, e1]) oaep(x.publicKey, k);
    sign('sha256', msg, { key: s.privateKey, ...pss });
    sign('sha256', msg, { key: s.privateKey, ...pss });
  });
  vault.close();

  const measured: [string, number, number][] = [
    ['kp create (owner + 2 guardians)', rate(createMs), rate(floorCreate)],
    ['kp grant (+1 guardian)', rate(grantMs), rate(floorGrant)],
    ['kp parse + verify', rate(parseMs), rate(floorVerify)],
    ['kp release (verify, health cert, unwrap, audit)', rate(releaseMs), rate(floorRelease)],
  ];
  const rows = [
    { metric: 'guardian create (2 × RSA-2048 + 2 certificates)', ours: `${guardianMs.toFixed(0)} ms`, floor: '—', ratio: '—' },
    ...measured.map(([metric, ours, floor]) => ({ metric, ours: `${ours.toFixed(0)} ops/s`, floor: `${floor.toFixed(0)} ops/s`, ratio: (ours / floor).toFixed(2) })),
  ];
  if (json) process.stdout.write(`${JSON.stringify({ ops: N, node: process.versions.node, rows }, null, 2)}\n`);
  else {
    process.stdout.write(`ShieldLab key protector benchmark — ${N} operations each, Node ${process.versions.node}; floor: the same RSA operations via node:crypto alone\n\n`);
    const w = [48, 12, 12, 12];
    const line = (c: string[]) => c.map((x, i) => (i === 0 ? x.padEnd(w[i]!) : x.padStart(w[i]!))).join('  ');
    process.stdout.write(`${line(['metric', 'ours', 'floor', 'ours/floor'])}\n${line(w.map((n) => '-'.repeat(n)))}\n`);
    for (const r of rows) process.stdout.write(`${line([r.metric, r.ours, r.floor, r.ratio])}\n`);
  }
} finally {
  rmSync(root, { recursive: true, force: true });
}
