// Handlers for guardians, key protectors and host attestation. Plugged into ShieldLabApp's
// handler table; they only translate between the contract and the domain modules.
import { copyFileSync, existsSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { ShieldError, toShieldError } from '../errors.ts';
import { writeFileAtomic } from '../files.ts';
import { wipe } from '../crypto/mod.ts';
import type { Vault } from '../vault/mod.ts';
import { GuardianStore } from '../guardian/store.ts';
import {
  createKeyProtector,
  grantGuardian,
  parseKeyProtector,
  revokeGuardian,
  rollKeyProtector,
  type HeldGuardian,
  type KeyProtector,
} from '../guardian/key-protector.ts';
import { checkRelease, type GuardianDirectory } from '../guardian/release.ts';
import { AttestationService } from '../attestation/service.ts';
import { addBinary, loadPolicy, removeBinary, sha256File, type CodeIntegrityPolicy } from '../attestation/baseline.ts';
import { captureBaseline, diffBaseline, showBaseline } from '../attestation/tpm-mode.ts';
import { adInfo, type AdConfigInput } from '../attestation/ad-mode.ts';
import type { GuardianInfo, KpInfo, MethodName, ParsedArgs, Result } from './contract.ts';

type Handler<M extends MethodName> = (args: ParsedArgs<M>) => Promise<Result<M>>;
type GuardianMethods = Extract<MethodName, `guardian.${string}` | `kp.${string}` | `host.${string}`>;

export function readInput(path: string, what: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    const e = toShieldError(err);
    throw new ShieldError(e.code === 'internal' ? 'io_error' : e.code, `Cannot read the ${what} ${path}: ${e.message}`);
  }
}

function lkgPath(file: string): string {
  return `${file}.lkg`;
}

export function held(store: GuardianStore, name: string): HeldGuardian {
  const certs = store.certificates(name);
  return { name, ...certs, keys: store.privateKeys(name) };
}

function guardianInfo(g: ReturnType<GuardianStore['get']>): GuardianInfo {
  return { ...g, backedUpAt: g.backedUpAt ?? null, warning: g.warning ?? null };
}

/** "a", "a and b", "a, b and c". */
function listInWords(items: readonly string[], last = 'and'): string {
  return items.length <= 1 ? (items[0] ?? '') : `${items.slice(0, -1).join(', ')} ${last} ${items.at(-1)}`;
}

export function describeKp(kp: KeyProtector, file: string, store: GuardianStore): KpInfo {
  const known = store.list();
  const heldHere = new Set(known.filter((g) => g.hasPrivateKeys).map((g) => g.encryption.thumbprint));
  const { authorization: a, keyBlock: k } = kp;
  const signer = a.guardians.find((g) => g.signingThumbprint === k.signer);
  const guardians = a.guardians.map((g) => ({
    name: g.name,
    signingThumbprint: g.signingThumbprint,
    encryptionThumbprint: g.encryptionThumbprint,
    heldHere: heldHere.has(g.encryptionThumbprint),
    owner: g.signingThumbprint === a.owner,
  }));
  const trusted = known.some((g) => g.signing.thumbprint === a.owner);
  const mine = guardians.filter((g) => g.heldHere).map((g) => g.name);
  const summary = [
    `Owned by ${kp.owner.name}${trusted ? '' : ' (not a guardian known here)'}.`,
    `${guardians.length === 1 ? 'Only the owner' : listInWords(guardians.map((g) => g.name))} may run this VM, after ${listInWords(a.policy.modes, 'or')} attestation${a.policy.hosts.length ? ` on ${a.policy.hosts.length} listed host(s)` : ''}.`,
    mine.length ? `This host holds ${listInWords(mine)}.` : 'This host holds none of its guardians: it cannot release the key.',
  ].join(' ');
  return {
    file,
    kpId: a.kpId,
    version: k.version,
    authVersion: a.authVersion,
    rolledAt: k.rolledAt,
    owner: { name: kp.owner.name, thumbprint: a.owner, trusted, heldHere: heldHere.has(kp.owner.encryptionThumbprint) },
    guardians,
    policy: { modes: a.policy.modes, hosts: a.policy.hosts },
    signedBy: signer?.name ?? k.signer,
    lastKnownGood: existsSync(lkgPath(file)) ? lkgPath(file) : null,
    summary,
  };
}

/** Remembers which key protectors exist, so a guardian they depend on is not deleted. */
export function registerKp(vault: Vault, kp: KeyProtector, file: string): void {
  const data = Buffer.from(JSON.stringify({ file, owner: kp.authorization.owner, guardians: kp.authorization.guardians.map((g) => ({ name: g.name, signingThumbprint: g.signingThumbprint })) }));
  vault.putRecord('key-protector', { name: kp.authorization.kpId, data, notes: file });
}

function dependents(vault: Vault, store: GuardianStore, name: string): string | null {
  const target = store.get(name);
  const heldNames = new Set(store.list().filter((g) => g.hasPrivateKeys).map((g) => g.signing.thumbprint));
  for (const rec of vault.listRecords('key-protector')) {
    const kp = JSON.parse(Buffer.from(vault.getRecord('key-protector', rec.name, { audit: false }).data, 'base64').toString('utf8')) as {
      file: string;
      owner: string;
      guardians: { name: string; signingThumbprint: string }[];
    };
    if (!existsSync(kp.file)) continue; // a deleted KP file depends on nothing
    if (kp.owner === target.signing.thumbprint) return `it owns the key protector ${kp.file}`;
    const listed = kp.guardians.filter((g) => heldNames.has(g.signingThumbprint));
    if (listed.length === 1 && listed[0]!.signingThumbprint === target.signing.thumbprint) {
      return `it is this host’s only guardian authorised by ${kp.file}`;
    }
  }
  return null;
}

// One store per vault session: it caches public guardian info, so listing is not re-audited.
const stores = new WeakMap<Vault, GuardianStore>();
export function storeOf(v: Vault): GuardianStore {
  let s = stores.get(v);
  if (!s) stores.set(v, (s = new GuardianStore(v)));
  return s;
}

/** The owner guardian for a new key protector: held here and backed up, or a typed refusal. */
export function ownerForNewKp(s: GuardianStore, name: string): HeldGuardian {
  const owner = s.get(name);
  if (!owner.hasPrivateKeys) throw new ShieldError('guardian_no_private_key', `Guardian ${name} is public only here: the owner must be a guardian this host holds.`);
  if (!owner.backedUpAt) {
    throw new ShieldError(
      'guardian_not_backed_up',
      `Guardian ${name} has not been backed up: a lost owner would strand every VM it protects. Run \`shieldlab guardian export ${name} --pfx --out-dir D --password-file P\` or \`shieldlab vault backup --out F\` first.`,
    );
  }
  return held(s, name);
}

/** The held owner of a key protector, for owner-only changes; `what` names the change in the refusal. */
export function heldOwnerOf(s: GuardianStore, kp: KeyProtector, what: string): HeldGuardian {
  const ownerName = s.list().find((g) => g.signing.thumbprint === kp.authorization.owner && g.hasPrivateKeys)?.name;
  if (!ownerName) throw new ShieldError('kp_not_owner', `Only the owner (${kp.owner.name}) can ${what}, and this host does not hold it.`);
  return held(s, ownerName);
}

/** The allow-list with each binary checked against its file now. */
function policyNow(policy: CodeIntegrityPolicy): Result<'host.policyShow'> {
  return {
    binaries: policy.binaries.map((b) => {
      const now = sha256File(b.path);
      return { ...b, current: now === null ? ('missing' as const) : now === b.sha256 ? ('ok' as const) : ('changed' as const) };
    }),
  };
}

/** The AD configuration arguments as the domain takes them (the CA file read here). */
function adInput(args: ParsedArgs<'host.adConfigure'>): AdConfigInput {
  if (args.caFile !== undefined && args.caPem !== undefined) throw new ShieldError('usage', 'Give the CA once: --ca-file F or --ca-pem PEM.');
  const caPem = args.caFile !== undefined ? readInput(args.caFile, 'CA certificate').toString('utf8') : args.caPem;
  return {
    urls: args.url,
    tlsNames: args.tlsName,
    caPem,
    startTls: args.starttls,
    allowPlainLdap: args.allowPlainLdap,
    bindDn: args.bindDn,
    bindPassword: args.password,
    computer: args.computer,
    groupSids: args.groupSid,
    groupNames: args.group,
    validityHours: args.validityHours,
    timeoutMs: args.timeoutSeconds === undefined ? undefined : Math.round(args.timeoutSeconds * 1000),
  };
}

function anyAdArg(args: ParsedArgs<'host.adConfigure'>): boolean {
  return Object.values(args).some((v) => (Array.isArray(v) ? v.length > 0 : v !== undefined));
}

export function guardianHandlers(vault: () => Vault): { [M in GuardianMethods]: Handler<M> } {
  const store = () => storeOf(vault());
  const attestation = () => new AttestationService(vault());
  const loadKp = (file: string) => parseKeyProtector(readInput(file, 'key protector'));
  const writeKp = (file: string, bytes: Buffer) => {
    const kp = parseKeyProtector(bytes);
    writeFileAtomic(file, bytes, 0o644); // a KP holds no secret in clear: wrapped keys and certificates
    registerKp(vault(), kp, file);
    return kp;
  };

  return {
    'guardian.create': async (args) => guardianInfo(store().create(args.name, { ...(args.host ? { host: args.host } : {}), validityYears: args.validityYears })),
    'guardian.list': async () => ({ guardians: store().list().map(guardianInfo) }),
    'guardian.show': async (args) => guardianInfo(store().get(args.name)),

    'guardian.export': async (args) => {
      if (args.public === args.pfx) throw new ShieldError('usage', 'Choose one: --public (certificates) or --pfx (full guardian, a backup).');
      const s = store();
      if (args.public) {
        if (!args.out) throw new ShieldError('usage', '--public needs --out F.');
        writeFileAtomic(args.out, Buffer.from(s.exportPublic(args.name)), 0o644);
        return { name: args.name, files: [args.out], backedUp: s.get(args.name).backedUpAt !== undefined && s.get(args.name).backedUpAt !== null };
      }
      if (!args.outDir) throw new ShieldError('usage', '--pfx needs --out-dir D.');
      if (!args.password) throw new ShieldError('usage', '--pfx needs a password (--password-file P).');
      const password = Buffer.from(args.password, 'utf8');
      try {
        const pfx = s.exportPfx(args.name, password);
        const files = [join(args.outDir, `${args.name}-signing.pfx`), join(args.outDir, `${args.name}-encryption.pfx`)];
        writeFileAtomic(files[0]!, pfx.signing);
        writeFileAtomic(files[1]!, pfx.encryption);
        s.markBackedUp([args.name]);
        return { name: args.name, files, backedUp: true };
      } finally {
        wipe(password);
      }
    },

    'guardian.import': async (args) => {
      const s = store();
      const opts = args.name ? { name: args.name } : {};
      const isDir = existsSync(args.file) && statSync(args.file).isDirectory();
      if (!isDir && !args.encryptionFile && !args.password) return guardianInfo(s.importPublic(readInput(args.file, 'guardian file'), opts));
      if (!args.password) throw new ShieldError('usage', 'Importing PFX files needs their password (--password-file P).');
      let signingFile = args.file;
      let encryptionFile = args.encryptionFile;
      if (isDir) {
          const names = readdirSync(args.file);
        const sig = names.find((n) => n.endsWith('-signing.pfx'));
        const enc = names.find((n) => n.endsWith('-encryption.pfx'));
        if (!sig || !enc) throw new ShieldError('not_found', `${args.file} has no NAME-signing.pfx and NAME-encryption.pfx pair.`);
        signingFile = join(args.file, sig);
        encryptionFile = join(args.file, enc);
      }
      if (!encryptionFile) throw new ShieldError('usage', 'A signing PFX needs its encryption PFX too (--encryption-file F).');
      const password = Buffer.from(args.password, 'utf8');
      try {
        return guardianInfo(s.importPfx({ signing: readInput(signingFile, 'PFX'), encryption: readInput(encryptionFile, 'PFX') }, password, opts));
      } finally {
        wipe(password);
      }
    },

    'guardian.delete': async (args) => {
      const v = vault();
      store().delete(args.name, { isNeeded: (n) => dependents(v, store(), n) });
      return { name: args.name, deleted: true as const };
    },

    'kp.create': async (args) => {
      const s = store();
      const owner = ownerForNewKp(s, args.owner);
      if (existsSync(args.out)) throw new ShieldError('already_exists', `${args.out} exists; choose another --out.`);
      const bytes = createKeyProtector({
        owner,
        guardians: args.guardian.map((g) => ({ name: g, ...s.certificates(g) })),
        policy: { modes: args.allowMode, hosts: args.allowHost },
      });
      const kp = writeKp(args.out, bytes);
      vault().record({ action: 'kp.create', outcome: 'ok', subject: `${kp.authorization.kpId} ${args.out}` });
      return describeKp(kp, args.out, s);
    },

    'kp.inspect': async (args) => describeKp(loadKp(args.file), args.file, store()),

    'kp.grant': async (args) => {
      const s = store();
      const kp = loadKp(args.file);
      const next = writeKp(args.file, grantGuardian(kp, heldOwnerOf(s, kp, 'grant'), { name: args.guardian, ...s.certificates(args.guardian) }));
      vault().record({ action: 'kp.grant', outcome: 'ok', subject: `${kp.authorization.kpId} +${args.guardian}` });
      return describeKp(next, args.file, s);
    },

    'kp.revoke': async (args) => {
      const s = store();
      const kp = loadKp(args.file);
      const next = writeKp(args.file, revokeGuardian(kp, heldOwnerOf(s, kp, 'revoke'), args.guardian));
      vault().record({ action: 'kp.revoke', outcome: 'ok', subject: `${kp.authorization.kpId} -${args.guardian}` });
      return describeKp(next, args.file, s);
    },

    'kp.roll': async (args) => {
      const s = store();
      if (args.commit) {
        rmSync(lkgPath(args.file), { force: true });
        vault().record({ action: 'kp.commit', outcome: 'ok', subject: args.file });
        return describeKp(loadKp(args.file), args.file, s);
      }
      const kp = loadKp(args.file);
      const authorised = new Set(kp.authorization.guardians.map((g) => g.signingThumbprint));
      const signer = s.list().find((g) => g.hasPrivateKeys && authorised.has(g.signing.thumbprint));
      if (!signer) throw new ShieldError('kp_unwrap_denied', 'None of this host’s guardians is authorised by this key protector, so it cannot roll it.');
      const rolled = rollKeyProtector(kp, held(s, signer.name));
      wipe(rolled.transportKey);
      // The previous KP stays as last-known-good until the new one is committed (first copy wins).
      if (!existsSync(lkgPath(args.file))) copyFileSync(args.file, lkgPath(args.file));
      const next = writeKp(args.file, rolled.bytes);
      vault().record({ action: 'kp.roll', outcome: 'ok', subject: `${kp.authorization.kpId} v${next.keyBlock.version}` });
      return describeKp(next, args.file, s);
    },

    'kp.release': async (args) => {
      if (!args.check) throw new ShieldError('usage', 'A released key never leaves ShieldLab; use --check to see whether this host may release it.');
      const a = attestation();
      return checkRelease(readInput(args.file, 'key protector'), {
        vault: vault(),
        guardians: store() satisfies GuardianDirectory,
        attestation: a,
        // The stored certificate as it is: the gate explains an expired or revoked one.
        healthCertificate: a.currentEncoded(),
      });
    },

    'host.status': async () => attestation().status(),
    'host.registerKey': async (args) => {
      const { publicKey: _pk, ...host } = attestation().registerHostKey({
        ...(args.publicKeyFile ? { publicKey: readInput(args.publicKeyFile, 'public key') } : {}),
        ...(args.name ? { name: args.name } : {}),
      });
      return host;
    },
    'host.exportKey': async (args) => {
      const a = attestation();
      writeFileAtomic(args.out, Buffer.from(a.exportHostKey()), 0o644);
      return { file: args.out, hostId: a.hostId()! };
    },
    'host.attest': async (args) => {
      const a = attestation();
      if (args.mode === 'tpm') {
        await a.attestTpm({ address: a.tpmAddress(args.tpm), eventLog: args.eventLog });
        return a.status();
      }
      if (args.tpm !== undefined || args.eventLog !== undefined) throw new ShieldError('usage', '--tpm and --event-log apply to --mode tpm only.');
      if (args.mode === 'ad-group') {
        await a.attestAdGroup();
        return a.status();
      }
      if (args.mode !== 'host-key') {
        vault().record({ action: 'host.attest', outcome: 'refused', subject: args.mode, reason: 'ModeUnavailable' });
        throw new ShieldError('attestation_failed', `${args.mode} attestation is not available in this version; use --mode tpm or --mode host-key.`, { details: { reason: 'ModeUnavailable' } });
      }
      a.attestHostKey();
      return a.status();
    },
    'host.register': async (args) => {
      const a = attestation();
      if (args.mode === 'host-key') {
        if (args.tpm !== undefined) throw new ShieldError('usage', '--tpm applies to --mode tpm only.');
        a.registerHostKey(args.name ? { name: args.name } : {});
      } else if (args.mode === 'tpm') {
        await a.registerTpm({ ...(args.tpm ? { address: args.tpm } : {}), ...(args.name ? { name: args.name } : {}), replace: args.yes });
      } else {
        throw new ShieldError('invalid_argument', 'ad-group mode has no registration: configure it with `shieldlab host ad configure` (DCs, pinned CA, service account, approved group SIDs).');
      }
      return a.status();
    },
    'host.adConfigure': async (args) => {
      const { info, warning } = await attestation().configureAd(adInput(args));
      return { ...info, warning };
    },
    'host.adTest': async (args) => {
      if (args.group.length > 0) throw new ShieldError('usage', '--group is resolved by `host ad configure`; test with --group-sid.');
      return attestation().testAd(anyAdArg(args) ? adInput(args) : null);
    },
    'host.adShow': async () => {
      const info = adInfo(vault());
      if (!info) throw new ShieldError('not_found', 'AD-group mode is not configured: run `shieldlab host ad configure` first.');
      return info;
    },
    'host.baselineCapture': async (args) => {
      const a = attestation();
      return captureBaseline(vault(), { address: a.tpmAddress(args.tpm), eventLog: args.eventLog, pcrs: args.pcrs, yes: args.yes, now: new Date() });
    },
    'host.baselineShow': async () => showBaseline(vault()),
    'host.baselineDiff': async (args) => diffBaseline(vault(), { address: attestation().tpmAddress(args.tpm), eventLog: args.eventLog }),
    'host.policyAddBinary': async (args) => policyNow(addBinary(vault(), args.path, new Date())),
    'host.policyRemoveBinary': async (args) => policyNow(removeBinary(vault(), args.path)),
    'host.policyShow': async () => policyNow(loadPolicy(vault())),
    'host.revokeCertificates': async (args) => {
      const a = attestation();
      a.revokeBefore(args.before ? new Date(args.before) : new Date());
      return a.status();
    },
  };
}
