// Guardians kept in the vault: one 'guardian-key' record each, whose data is the JSON below
// (certificates always, private keys for guardians held here). Every record read is audited by the
// vault; public information is cached per record version, so listing does not add an audit entry
// per guardian on each refresh, while every use of a private key is read — and audited — afresh.
import { createPrivateKey, X509Certificate, type KeyObject } from 'node:crypto';
import { hostname } from 'node:os';
import { ShieldError } from '../errors.ts';
import { wipe } from '../crypto/mod.ts';
import type { Vault } from '../vault/mod.ts';
import {
  describeCertificate,
  expiryWarning,
  generateGuardian,
  validateGuardianName,
  worstWarning,
  type CertInfo,
  type ExpiryWarning,
  type GuardianCerts,
  type GuardianKeys,
} from './guardian.ts';
import { exportGuardianPfx, importGuardianPfx, type GuardianPfx, type Password } from './pfx.ts';
import { exportPublicGuardian, parsePublicGuardian } from './public-file.ts';
import type { GuardianPrivateKeys } from './key-protector.ts';

const KIND = 'guardian-key';

export type GuardianSource = 'generated' | 'imported-public' | 'imported-pfx';

/** The JSON in a guardian record's data. */
interface GuardianRecord {
  name: string;
  host: string;
  signingCertPem: string;
  encryptionCertPem: string;
  signingKeyPem?: string;
  encryptionKeyPem?: string;
  createdAt: string;
  backedUpAt?: string;
  source: GuardianSource;
}

type PublicRecord = Omit<GuardianRecord, 'signingKeyPem' | 'encryptionKeyPem'> & { hasPrivateKeys: boolean };

/** What may be shown anywhere: no key material. */
export interface GuardianInfo {
  name: string;
  host: string;
  source: GuardianSource;
  hasPrivateKeys: boolean;
  createdAt: string;
  backedUpAt: string | null;
  signing: CertInfo;
  encryption: CertInfo;
  warning: ExpiryWarning | null;
}

export type { GuardianPrivateKeys };

export interface GuardianStoreOptions {
  /** host name for new guardians' subjects; default: this machine's short host name */
  host?: () => string;
  /** clock for createdAt, backedUpAt and expiry warnings */
  now?: () => Date;
}

export function defaultGuardianHost(): string {
  return hostname().split('.')[0] || 'localhost';
}

export class GuardianStore {
  private readonly vault: Vault;
  private readonly host: () => string;
  private readonly now: () => Date;
  /** public part of each record, by record id, valid for one record version */
  private readonly cache = new Map<string, { version: number; record: PublicRecord; info: Omit<GuardianInfo, 'warning'> }>();

  constructor(vault: Vault, opts: GuardianStoreOptions = {}) {
    this.vault = vault;
    this.host = opts.host ?? defaultGuardianHost;
    this.now = opts.now ?? (() => new Date());
  }

  // ---- reading ---------------------------------------------------------------------------------

  list(): GuardianInfo[] {
    return this.vault.listRecords(KIND).map((r) => this.withWarning(this.publicEntry(r).info));
  }

  has(name: string): boolean {
    return this.vault.listRecords(KIND).some((r) => r.name === name);
  }

  get(name: string): GuardianInfo {
    return this.withWarning(this.publicEntry(this.meta(name)).info);
  }

  certificates(name: string): GuardianCerts {
    const r = this.publicEntry(this.meta(name)).record;
    return { signingCertPem: r.signingCertPem, encryptionCertPem: r.encryptionCertPem };
  }

  /** The guardian's private keys as KeyObjects, for key release. Never expose them over the API. */
  privateKeys(name: string, opts: { audit?: boolean } = {}): GuardianPrivateKeys {
    const r = this.readRecord(name, opts);
    if (!r.signingKeyPem || !r.encryptionKeyPem) {
      throw new ShieldError('guardian_no_private_key', `Guardian "${name}" is held here by its certificates only; its private keys are on the machine it came from.`, {
        details: { name },
      });
    }
    return { signingKey: createPrivateKey(r.signingKeyPem), encryptionKey: createPrivateKey(r.encryptionKeyPem) };
  }

  // ---- the view key release needs (core/guardian/release.ts GuardianDirectory) ------------------

  knownBySigningThumbprint(thumbprint: string): string | null {
    return this.list().find((g) => g.signing.thumbprint === thumbprint.toUpperCase())?.name ?? null;
  }

  held(): { name: string; encryptionThumbprint: string }[] {
    return this.list()
      .filter((g) => g.hasPrivateKeys)
      .map((g) => ({ name: g.name, encryptionThumbprint: g.encryption.thumbprint }));
  }

  /** For key release only: the release is audited itself (kp.release), so this read is not again. */
  encryptionKey(name: string): KeyObject {
    return this.privateKeys(name, { audit: false }).encryptionKey;
  }

  // ---- creating and importing ------------------------------------------------------------------

  create(name: string, opts: { host?: string; validityYears?: number; now?: Date; modulusLength?: number } = {}): GuardianInfo {
    validateGuardianName(name);
    this.refuseExisting(name);
    const host = opts.host ?? this.host();
    const made = generateGuardian(name, {
      host,
      validityYears: opts.validityYears ?? 10,
      now: opts.now ?? this.now(),
      ...(opts.modulusLength === undefined ? {} : { modulusLength: opts.modulusLength }),
    });
    return this.put({ name, host, ...made.certs, ...made.keys, createdAt: this.now().toISOString(), source: 'generated' });
  }

  /** A public guardian file or PEM bundle: certificates only. */
  importPublic(bytes: Buffer | string, opts: { name?: string } = {}): GuardianInfo {
    const g = parsePublicGuardian(bytes);
    const name = validateGuardianName(opts.name ?? g.name);
    this.refuseExisting(name, g.certs);
    return this.put({ name, host: g.host, ...g.certs, createdAt: this.now().toISOString(), source: 'imported-public' });
  }

  /** A signing and an encryption PFX (one password): certificates with private keys. */
  importPfx(files: GuardianPfx, password: Password, opts: { name?: string } = {}): GuardianInfo {
    const g = importGuardianPfx(files, password);
    const name = validateGuardianName(opts.name ?? g.name);
    this.refuseExisting(name, g.certs);
    return this.put({ name, host: g.host, ...g.certs, ...g.keys, createdAt: this.now().toISOString(), source: 'imported-pfx' });
  }

  // ---- exporting -------------------------------------------------------------------------------

  exportPublic(name: string): string {
    const c = this.certificates(name);
    return exportPublicGuardian({ name, certs: c });
  }

  /** Both PFX files (password-protected); marks the guardian as backed up. */
  exportPfx(name: string, password: Password): GuardianPfx {
    const r = this.readRecord(name);
    if (!r.signingKeyPem || !r.encryptionKeyPem) {
      throw new ShieldError('guardian_no_private_key', `Guardian "${name}" has no private keys here: export its public file instead.`, { details: { name } });
    }
    const keys: GuardianKeys = { signingKeyPem: r.signingKeyPem, encryptionKeyPem: r.encryptionKeyPem };
    const pfx = exportGuardianPfx({ certs: r, keys }, password);
    this.vault.record({ action: 'guardian.export', outcome: 'ok', subject: `${KIND}:${name}`, reason: 'pfx with private keys' });
    // Not yet a backup: the caller marks it with markBackedUp once both files are safely written.
    return pfx;
  }

  /** After a vault backup: these guardians' private keys now exist outside this machine. */
  markBackedUp(names: readonly string[], at: Date = this.now()): string[] {
    const present = new Set(this.vault.listRecords(KIND).map((r) => r.name));
    const marked: string[] = [];
    for (const name of names) {
      if (!present.has(name)) continue;
      this.put({ ...this.readRecord(name), backedUpAt: at.toISOString() });
      marked.push(name);
    }
    return marked;
  }

  // ---- deleting --------------------------------------------------------------------------------

  /** `isNeeded` names what still depends on the guardian (a key protector), or returns null. */
  delete(name: string, opts: { isNeeded: (name: string) => string | null }): void {
    this.meta(name);
    const reason = opts.isNeeded(name);
    if (reason !== null) {
      throw new ShieldError('guardian_in_use', `Guardian "${name}" cannot be deleted: ${reason}`, { details: { name, reason } });
    }
    this.vault.deleteRecord(KIND, name);
  }

  // ---- internals -------------------------------------------------------------------------------

  private meta(name: string): { id: string; name: string; version: number } {
    const found = this.vault.listRecords(KIND).find((r) => r.name === name);
    if (!found) throw new ShieldError('not_found', `No guardian named "${name}".`, { details: { name } });
    return found;
  }

  private refuseExisting(name: string, certs?: GuardianCerts): void {
    if (this.has(name)) throw new ShieldError('already_exists', `A guardian named "${name}" already exists.`, { details: { name } });
    if (!certs) return;
    const thumbprints = [certs.signingCertPem, certs.encryptionCertPem].map((p) => describeCertificate(p).thumbprint);
    const same = this.list().find((g) => thumbprints.includes(g.signing.thumbprint) || thumbprints.includes(g.encryption.thumbprint));
    if (same) {
      throw new ShieldError('already_exists', `These certificates are already here, as guardian "${same.name}".`, { details: { name: same.name } });
    }
  }

  /** Reads (audited) and decodes a record, keys included. */
  private readRecord(name: string, opts: { audit?: boolean } = {}): GuardianRecord {
    const data = Buffer.from(this.vault.getRecord(KIND, name, opts).data, 'base64');
    try {
      return decodeRecord(data, name);
    } finally {
      wipe(data);
    }
  }

  private publicEntry(meta: { id: string; name: string; version: number }) {
    const hit = this.cache.get(meta.id);
    if (hit && hit.version === meta.version) return hit;
    return this.remember(meta, this.readRecord(meta.name));
  }

  private put(record: GuardianRecord): GuardianInfo {
    const data = Buffer.from(JSON.stringify(record), 'utf8');
    let written: { id: string; version: number };
    try {
      written = this.vault.putRecord(KIND, { name: record.name, data, tags: ['guardian', record.source] });
    } finally {
      wipe(data);
    }
    return this.withWarning(this.remember(written, record).info);
  }

  private remember(meta: { id: string; version: number }, full: GuardianRecord) {
    const { signingKeyPem, encryptionKeyPem, ...rest } = full;
    const record: PublicRecord = { ...rest, hasPrivateKeys: Boolean(signingKeyPem && encryptionKeyPem) };
    const entry = { version: meta.version, record, info: infoOf(record) };
    this.cache.set(meta.id, entry);
    return entry;
  }

  private withWarning(info: Omit<GuardianInfo, 'warning'>): GuardianInfo {
    const now = this.now();
    return { ...info, warning: worstWarning(expiryWarning(info.signing, now), expiryWarning(info.encryption, now)) };
  }
}

function infoOf(r: PublicRecord): Omit<GuardianInfo, 'warning'> {
  return {
    name: r.name,
    host: r.host,
    source: r.source,
    hasPrivateKeys: r.hasPrivateKeys,
    createdAt: r.createdAt,
    backedUpAt: r.backedUpAt ?? null,
    signing: describeCertificate(new X509Certificate(r.signingCertPem)),
    encryption: describeCertificate(new X509Certificate(r.encryptionCertPem)),
  };
}

function decodeRecord(data: Buffer, name: string): GuardianRecord {
  let r: Partial<GuardianRecord>;
  try {
    r = JSON.parse(data.toString('utf8')) as Partial<GuardianRecord>;
  } catch {
    r = {};
  }
  const sources: readonly string[] = ['generated', 'imported-public', 'imported-pfx'];
  const ok =
    r.name === name &&
    typeof r.host === 'string' &&
    typeof r.signingCertPem === 'string' &&
    typeof r.encryptionCertPem === 'string' &&
    typeof r.createdAt === 'string' &&
    typeof r.source === 'string' &&
    sources.includes(r.source);
  if (!ok) throw new ShieldError('vault_corrupt', `The vault record of guardian "${name}" is not a guardian.`, { details: { name } });
  return r as GuardianRecord;
}
