// The offline key vault: one SQLite file, envelope-encrypted records, key slots, an audit chain.
import { existsSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes, randomUUID } from 'node:crypto';
import { rmSync } from 'node:fs';
import { getMeta, openDb, SCHEMA_VERSION, setMeta, type Db } from './db.ts';
import { anchorHolds, appendAudit, openAnchor, readAudit, sealAnchor, verifyAudit, type AuditEntry, type AuditEvent, type AuditProblem } from './audit.ts';
import { deleteSlot, listSlots, readSlot, unwrapSlot, writeSlot, type KeychainSlotParams, type RecoverySlotParams, type SlotKind } from './slots.ts';
import { deleteRecord, getRecord, listRecords, putRecord, resealAll, type OpenedRecord, type RecordKeys, type RecordKind } from './records.ts';
import { combineShares, recoverySetId, splitRecoveryKey } from './shares.ts';
import type { Keychain } from './keychain.ts';
import {
  aeadOpen,
  aeadSeal,
  deriveKeyFromPassphrase,
  hkdf,
  newScryptParams,
  newSealingKeyPair,
  randomKey,
  wipe,
  type ScryptParams,
} from '../crypto/mod.ts';
import { ShieldError, toShieldError } from '../errors.ts';

export const VAULT_FILE = 'vault.db';
const RECOVERY_RECORD = 'recovery-key';
const DEFAULT_AUTO_LOCK_MINUTES = 15;

export type UnlockMethod = { passphrase: Buffer } | { keychain: Keychain } | { shares: readonly string[] };

/** How a new or restored vault key is protected. At least one of the two. */
export interface Protection {
  passphrase?: Buffer;
  keychain?: Keychain;
  kdf?: Partial<Pick<ScryptParams, 'N' | 'r' | 'p'>>;
}

export interface VaultStatus {
  path: string;
  vaultId: string;
  unlocked: boolean;
  schemaVersion: number;
  slots: SlotKind[];
  kdf: { algorithm: 'scrypt'; N: number; r: number; p: number } | null;
  keychainStore: string | null;
  recovery: { shares: number; threshold: number } | null;
  records: number;
  auditEntries: number;
  autoLockMinutes: number;
  createdAt: string;
}

interface SessionKeys extends RecordKeys {
  auditPrivateKey: Buffer;
}

function deriveSession(vaultId: string, vaultKey: Buffer, auditSealed: string): SessionKeys {
  const lookupKey = hkdf(vaultKey, 'shieldlab/lookup/v1');
  const auditPrivateKey = aeadOpen(vaultKey, Buffer.from(auditSealed, 'base64'), Buffer.from(`shieldlab/audit-key/v1|${vaultId}`));
  if (auditPrivateKey === null) {
    wipe(lookupKey);
    throw new ShieldError('vault_corrupt', 'The vault opened but its audit key failed its integrity check.');
  }
  return { vaultId, vaultKey, lookupKey, auditPrivateKey };
}

export class Vault {
  readonly home: string;
  readonly path: string;
  readonly vaultId: string;
  private readonly db: Db;
  private readonly auditPublicKey: Buffer;
  private keys: SessionKeys | null = null;

  private constructor(home: string, db: Db) {
    this.home = home;
    this.path = join(home, VAULT_FILE);
    this.db = db;
    const id = getMeta(db, 'vault_id');
    const pub = getMeta(db, 'audit_public_key');
    if (!id || !pub) throw new ShieldError('vault_corrupt', 'The vault file lacks its identity; it is damaged or not a ShieldLab vault.');
    this.vaultId = id;
    this.auditPublicKey = Buffer.from(pub, 'base64');
  }

  static exists(home: string): boolean {
    return existsSync(join(home, VAULT_FILE));
  }

  static open(home: string): Vault {
    if (!Vault.exists(home)) {
      throw new ShieldError('vault_not_initialised', `No vault in ${home}. Create one with: shieldlab vault init`);
    }
    return new Vault(home, openDb(join(home, VAULT_FILE)));
  }

  /** Creates a vault and returns it unlocked. The keychain entry is written last, after the file commits. */
  static async create(home: string, protection: Protection): Promise<Vault> {
    if (Vault.exists(home)) throw new ShieldError('vault_exists', `A vault already exists in ${home}.`);
    if (!protection.passphrase && !protection.keychain) {
      throw new ShieldError('invalid_argument', 'A vault needs the OS keychain, a passphrase, or both.');
    }
    mkdirSync(home, { recursive: true, mode: 0o700 });
    const vaultKey = randomKey();
    const vaultId = randomUUID();
    const audit = newSealingKeyPair();
    const prepared = await prepareSlots(vaultId, protection);
    const file = join(home, VAULT_FILE);
    let db: Db | undefined;
    try {
      db = openDb(file, { create: true });
      const d = db;
      d.transaction(() => {
        setMeta(d, 'vault_id', vaultId);
        setMeta(d, 'created_at', new Date().toISOString());
        setMeta(d, 'audit_public_key', audit.publicKey.toString('base64'));
        setMeta(d, 'audit_private_sealed', aeadSeal(vaultKey, audit.privateKey, Buffer.from(`shieldlab/audit-key/v1|${vaultId}`)).toString('base64'));
        setMeta(d, 'auto_lock_minutes', String(DEFAULT_AUTO_LOCK_MINUTES));
        for (const s of prepared.slots) writeSlot(d, { vaultId, vaultKey, ...s });
      }).immediate();
    } catch (err) {
      db?.close();
      for (const suffix of ['', '-wal', '-shm']) rmSync(file + suffix, { force: true });
      await prepared.abandon();
      prepared.dispose();
      wipe(vaultKey, audit.privateKey);
      throw toShieldError(err);
    }
    prepared.dispose();
    wipe(audit.privateKey);
    const vault = new Vault(home, db);
    vault.keys = deriveSession(vaultId, vaultKey, getMeta(db, 'audit_private_sealed')!);
    vault.record({ action: 'vault.init', outcome: 'ok', subject: listSlots(db).join('+') });
    return vault;
  }

  get unlocked(): boolean {
    return this.keys !== null;
  }

  close(): void {
    this.lock({ audit: false });
    if (this.db.open) this.db.close();
  }

  status(): VaultStatus {
    const slots = listSlots(this.db);
    const pass = readSlot<ScryptParams>(this.db, 'passphrase')?.params;
    const kc = readSlot<KeychainSlotParams>(this.db, 'keychain')?.params;
    const rec = readSlot<RecoverySlotParams>(this.db, 'recovery')?.params;
    const count = (sql: string) => (this.db.prepare(sql).get() as { n: number }).n;
    return {
      path: this.path,
      vaultId: this.vaultId,
      unlocked: this.unlocked,
      schemaVersion: SCHEMA_VERSION,
      slots,
      kdf: pass ? { algorithm: 'scrypt', N: pass.N, r: pass.r, p: pass.p } : null,
      keychainStore: kc?.store ?? null,
      recovery: rec ? { shares: rec.shares, threshold: rec.threshold } : null,
      records: count('SELECT count(*) AS n FROM records'),
      auditEntries: count('SELECT count(*) AS n FROM audit'),
      autoLockMinutes: this.autoLockMinutes(),
      createdAt: getMeta(this.db, 'created_at') ?? '',
    };
  }

  // ---- unlocking -------------------------------------------------------------------------

  async unlock(method: UnlockMethod): Promise<void> {
    if (this.keys) return;
    const { vaultKey, via } = await this.unwrapVaultKey(method);
    this.keys = deriveSession(this.vaultId, vaultKey, getMeta(this.db, 'audit_private_sealed')!);
    this.record({ action: 'vault.unlock', outcome: 'ok', subject: via });
  }

  lock(opts: { audit?: boolean; reason?: string } = {}): void {
    if (!this.keys) return;
    if (opts.audit !== false) this.record({ action: 'vault.lock', outcome: 'ok', ...(opts.reason ? { reason: opts.reason } : {}) });
    wipe(this.keys.vaultKey, this.keys.lookupKey, this.keys.auditPrivateKey);
    this.keys = null;
  }

  private async unwrapVaultKey(method: UnlockMethod): Promise<{ vaultKey: Buffer; via: SlotKind }> {
    const refuse = (code: 'wrong_passphrase' | 'keychain_entry_missing' | 'share_invalid' | 'invalid_argument', via: SlotKind, message: string): never => {
      this.record({ action: 'vault.unlock', outcome: 'refused', subject: via, reason: code });
      throw new ShieldError(code, message);
    };
    if ('passphrase' in method) {
      const slot = readSlot<ScryptParams>(this.db, 'passphrase');
      if (!slot) return refuse('invalid_argument', 'passphrase', 'This vault has no passphrase; unlock it with the OS keychain.');
      const kek = await deriveKeyFromPassphrase(method.passphrase, slot.params);
      const vaultKey = unwrapSlot({ vaultId: this.vaultId, kind: 'passphrase', kek, wrapped: slot.wrapped });
      wipe(kek);
      return vaultKey ? { vaultKey, via: 'passphrase' } : refuse('wrong_passphrase', 'passphrase', 'Wrong passphrase.');
    }
    if ('keychain' in method) {
      const slot = readSlot<KeychainSlotParams>(this.db, 'keychain');
      if (!slot) return refuse('invalid_argument', 'keychain', 'This vault is not stored in the OS keychain; unlock it with its passphrase (--passphrase-file F).');
      const kek = await method.keychain.get(slot.params.account);
      if (!kek) {
        return refuse('keychain_entry_missing', 'keychain', `The OS keychain has no entry for this vault (${slot.params.account}). Unlock with the passphrase or recover with shares.`);
      }
      const vaultKey = unwrapSlot({ vaultId: this.vaultId, kind: 'keychain', kek, wrapped: slot.wrapped });
      wipe(kek);
      return vaultKey ? { vaultKey, via: 'keychain' } : refuse('keychain_entry_missing', 'keychain', 'The OS keychain entry for this vault does not open it.');
    }
    const slot = readSlot<RecoverySlotParams>(this.db, 'recovery');
    if (!slot) throw new ShieldError('recovery_not_configured', 'This vault has no recovery shares configured.');
    let combined: { recoveryKey: Buffer; setId: string };
    try {
      combined = await combineShares(method.shares);
    } catch (err) {
      this.record({ action: 'vault.unlock', outcome: 'refused', subject: 'recovery', reason: toShieldError(err).code });
      throw err;
    }
    const { recoveryKey, setId } = combined;
    try {
      if (setId !== slot.params.setId) {
        this.record({ action: 'vault.unlock', outcome: 'refused', subject: 'recovery', reason: 'shares_mismatch' });
        throw new ShieldError('shares_mismatch', 'These shares belong to another recovery set (an older split, or another vault).');
      }
      const vaultKey = unwrapSlot({ vaultId: this.vaultId, kind: 'recovery', kek: recoveryKey, wrapped: slot.wrapped });
      return vaultKey ? { vaultKey, via: 'recovery' } : refuse('share_invalid', 'recovery', 'The shares do not open this vault.');
    } finally {
      wipe(recoveryKey);
    }
  }

  private session(): SessionKeys {
    if (!this.keys) throw new ShieldError('locked', 'The vault is locked. Unlock it first (OS keychain or --passphrase-file F).');
    this.assertKeyCurrent(this.keys);
    return this.keys;
  }

  /** Another process may have rotated the vault key since this session unlocked: never use a stale key. */
  private assertKeyCurrent(keys: SessionKeys): void {
    const sealed = getMeta(this.db, 'audit_private_sealed');
    const check = sealed === undefined ? null : aeadOpen(keys.vaultKey, Buffer.from(sealed, 'base64'), Buffer.from(`shieldlab/audit-key/v1|${this.vaultId}`));
    if (check === null) {
      this.lock({ audit: false });
      throw new ShieldError('locked', 'The vault key was changed by another process (key rotation): unlock again.');
    }
    wipe(check);
  }

  // ---- audit -----------------------------------------------------------------------------

  /** Appends an audit entry (works locked too); advances the encrypted anchor when unlocked. */
  record(event: AuditEvent): void {
    this.write(() => undefined, event);
  }

  /**
   * Runs several writes (each with its audit entry) as one transaction: one commit to disk instead
   * of one each, and all of them land or none does. `fn` must be synchronous.
   */
  atomically<T>(fn: () => T): T {
    try {
      return this.db.transaction(fn).immediate();
    } catch (err) {
      throw toShieldError(err);
    }
  }

  /** Runs `fn` and its audit entry in one immediate transaction: both land or neither does. */
  private write<T>(fn: () => T, event: AuditEvent | ((result: T) => AuditEvent)): T {
    try {
      return this.db
        .transaction(() => {
          if (this.keys) this.assertKeyCurrent(this.keys);
          const result = fn();
          const ev = typeof event === 'function' ? event(result) : event;
          const keys = this.keys;
          // Read the anchor before appending; advance it only while the chain still holds it, so
          // evidence of a cut or edited tail is never overwritten by the next entry.
          const sealed = getMeta(this.db, 'audit_anchor');
          const current = keys ? openAnchor(keys.vaultKey, this.vaultId, sealed) : null;
          const anchor = appendAudit(this.db, { vaultId: this.vaultId, publicKey: this.auditPublicKey, event: ev });
          if (keys && (sealed === undefined || (current !== null && anchorHolds(this.db, current)))) {
            setMeta(this.db, 'audit_anchor', sealAnchor(keys.vaultKey, this.vaultId, anchor));
          }
          return result;
        })
        .immediate();
    } catch (err) {
      throw toShieldError(err);
    }
  }

  readAudit(opts: { limit?: number; afterSeq?: number } = {}): AuditEntry[] {
    const keys = this.session();
    return readAudit(this.db, { vaultId: this.vaultId, privateKey: keys.auditPrivateKey, ...opts });
  }

  verifyAudit(): { entries: number; anchored: boolean; problems: AuditProblem[] } {
    const keys = this.keys;
    const anchor = keys ? openAnchor(keys.vaultKey, this.vaultId, getMeta(this.db, 'audit_anchor')) : null;
    const result = keys
      ? verifyAudit(this.db, { vaultId: this.vaultId, privateKey: keys.auditPrivateKey, anchor })
      : verifyAudit(this.db, { vaultId: this.vaultId });
    return { ...result, anchored: anchor !== null };
  }

  // ---- records ---------------------------------------------------------------------------

  putRecord(kind: RecordKind, payload: { name: string; data: Buffer; tags?: string[]; notes?: string }): { id: string; version: number; created: boolean } {
    const keys = this.session();
    const data = payload.data.toString('base64');
    return this.write(
      () => putRecord(this.db, keys, kind, { name: payload.name, tags: payload.tags ?? [], notes: payload.notes ?? '', data }),
      (r) => ({ action: r.created ? 'record.create' : 'record.update', outcome: 'ok', subject: `${kind}:${payload.name}` }),
    );
  }

  /**
   * Reads a record. Reads are audited; a domain module whose own operation is audited (a key
   * release, an attestation) passes `audit: false` so the trail says what happened, once.
   */
  getRecord(kind: RecordKind, name: string, opts: { audit?: boolean } = {}): OpenedRecord {
    const keys = this.session();
    const audit = opts.audit !== false;
    let rec: OpenedRecord | undefined;
    try {
      rec = getRecord(this.db, keys, kind, name);
    } catch (err) {
      this.record({ action: 'record.read', outcome: 'failed', subject: `${kind}:${name}`, reason: toShieldError(err).code });
      throw err;
    }
    if (!rec) {
      if (audit) this.record({ action: 'record.read', outcome: 'failed', subject: `${kind}:${name}`, reason: 'not_found' });
      throw new ShieldError('not_found', `No ${kind} named "${name}" in the vault.`);
    }
    if (audit) this.record({ action: 'record.read', outcome: 'ok', subject: `${kind}:${name}` });
    return rec;
  }

  /** True when a record of that kind and name exists (not audited). */
  hasRecord(kind: RecordKind, name: string): boolean {
    return getRecord(this.db, this.session(), kind, name) !== undefined;
  }

  listRecords(kind?: RecordKind): Omit<OpenedRecord, 'data'>[] {
    const keys = this.session();
    return listRecords(this.db, keys, kind).map(({ data: _data, ...rest }) => rest);
  }

  deleteRecord(kind: RecordKind, name: string): void {
    const keys = this.session();
    const gone = this.write(
      () => deleteRecord(this.db, keys, kind, name),
      (ok) => ({ action: 'record.delete', outcome: ok ? 'ok' : 'failed', subject: `${kind}:${name}`, ...(ok ? {} : { reason: 'not_found' }) }),
    );
    if (!gone) throw new ShieldError('not_found', `No ${kind} named "${name}" in the vault.`);
  }

  // ---- protection: passphrase, keychain, rotation ---------------------------------------------

  autoLockMinutes(): number {
    return Number(getMeta(this.db, 'auto_lock_minutes') ?? DEFAULT_AUTO_LOCK_MINUTES);
  }

  setAutoLock(minutes: number): void {
    this.session();
    this.write(() => setMeta(this.db, 'auto_lock_minutes', String(minutes)), { action: 'vault.settings', outcome: 'ok', subject: `auto-lock=${minutes}m` });
  }

  /** Re-protects the current vault key: new passphrase and/or keychain entry (used by passphrase change and recover). */
  async reprotect(protection: Protection & { dropOthers?: boolean }, action = 'vault.protection'): Promise<void> {
    const keys = this.session();
    const previousAccount = readSlot<KeychainSlotParams>(this.db, 'keychain')?.params.account;
    const prepared = await prepareSlots(this.vaultId, protection);
    try {
      this.write(() => {
        if (protection.dropOthers) {
          deleteSlot(this.db, 'passphrase');
          deleteSlot(this.db, 'keychain');
        }
        for (const s of prepared.slots) writeSlot(this.db, { vaultId: this.vaultId, vaultKey: keys.vaultKey, ...s });
      }, { action, outcome: 'ok', subject: prepared.slots.map((s) => s.kind).join('+') });
    } catch (err) {
      await prepared.abandon();
      throw err;
    } finally {
      prepared.dispose();
    }
    const nowAccount = readSlot<KeychainSlotParams>(this.db, 'keychain')?.params.account;
    if (previousAccount && previousAccount !== nowAccount && protection.keychain) {
      await protection.keychain.delete(previousAccount).catch(() => false);
    }
  }

  /** New vault key; every record, slot and sealed item re-encrypted in one transaction. */
  async rotateKey(opts: { passphrase?: Buffer; keychain?: Keychain; onProgress?: (done: number, total: number) => void }): Promise<{ records: number }> {
    const keys = this.session();
    const slots = listSlots(this.db);
    if (slots.includes('passphrase') && !opts.passphrase) {
      throw new ShieldError('invalid_argument', 'Rotating the vault key re-wraps the passphrase slot: give the passphrase (--passphrase-file F).');
    }
    const newKey = randomKey();
    const keks: { kind: SlotKind; kek: Buffer; params: unknown }[] = [];
    try {
      if (slots.includes('passphrase')) {
        const slot = readSlot<ScryptParams>(this.db, 'passphrase')!;
        const kek = await deriveKeyFromPassphrase(opts.passphrase!, slot.params);
        const check = unwrapSlot({ vaultId: this.vaultId, kind: 'passphrase', kek, wrapped: slot.wrapped });
        if (!check) {
          wipe(kek);
          throw new ShieldError('wrong_passphrase', 'Wrong passphrase.');
        }
        wipe(check);
        keks.push({ kind: 'passphrase', kek, params: slot.params });
      }
      if (slots.includes('keychain')) {
        if (!opts.keychain) throw new ShieldError('keychain_unavailable', 'Rotating the vault key re-wraps the keychain slot, but no keychain is available.');
        const slot = readSlot<KeychainSlotParams>(this.db, 'keychain')!;
        const kek = await opts.keychain.get(slot.params.account);
        if (!kek) throw new ShieldError('keychain_entry_missing', 'The OS keychain has no entry for this vault.');
        keks.push({ kind: 'keychain', kek, params: slot.params });
      }
      if (slots.includes('recovery')) {
        const rec = getRecord(this.db, keys, 'recovery', RECOVERY_RECORD);
        const slot = readSlot<RecoverySlotParams>(this.db, 'recovery')!;
        if (rec) keks.push({ kind: 'recovery', kek: Buffer.from(rec.data, 'base64'), params: slot.params });
      }
      const next: SessionKeys = {
        vaultId: this.vaultId,
        vaultKey: newKey,
        lookupKey: hkdf(newKey, 'shieldlab/lookup/v1'),
        auditPrivateKey: Buffer.from(keys.auditPrivateKey),
      };
      const total = (this.db.prepare('SELECT count(*) AS n FROM records').get() as { n: number }).n;
      let done = 0;
      const count = this.write(() => {
        const n = resealAll(this.db, keys, next, () => opts.onProgress?.(++done, total));
        setMeta(this.db, 'audit_private_sealed', aeadSeal(newKey, next.auditPrivateKey, Buffer.from(`shieldlab/audit-key/v1|${this.vaultId}`)).toString('base64'));
        for (const k of keks) writeSlot(this.db, { vaultId: this.vaultId, kind: k.kind, kek: k.kek, vaultKey: newKey, params: k.params as KeychainSlotParams });
        // Swap keys before the audit entry so its anchor is sealed under the new key.
        const anchor = openAnchor(keys.vaultKey, this.vaultId, getMeta(this.db, 'audit_anchor'));
        if (anchor) setMeta(this.db, 'audit_anchor', sealAnchor(newKey, this.vaultId, anchor));
        this.keys = next;
        return n;
      }, { action: 'vault.rotate-key', outcome: 'ok' });
      wipe(keys.vaultKey, keys.lookupKey, keys.auditPrivateKey);
      return { records: count };
    } catch (err) {
      // The transaction rolled back: keep the old session, drop the new key.
      if (this.keys !== keys) {
        wipe(this.keys?.vaultKey, this.keys?.lookupKey, this.keys?.auditPrivateKey);
        this.keys = keys;
      }
      wipe(newKey);
      throw err;
    } finally {
      for (const k of keks) wipe(k.kek);
    }
  }

  // ---- recovery --------------------------------------------------------------------------

  /** New recovery key split M-of-N; replaces any earlier split (old shares stop working). */
  async splitRecovery(shares: number, threshold: number): Promise<{ shares: string[]; setId: string }> {
    const keys = this.session();
    const recoveryKey = randomKey();
    try {
      const texts = await splitRecoveryKey(recoveryKey, shares, threshold);
      const setId = recoverySetId(recoveryKey);
      this.write(() => {
        putRecord(this.db, keys, 'recovery', { name: RECOVERY_RECORD, tags: [], notes: `set ${setId}, ${threshold} of ${shares}`, data: recoveryKey.toString('base64') });
        writeSlot(this.db, { vaultId: this.vaultId, kind: 'recovery', kek: recoveryKey, vaultKey: keys.vaultKey, params: { setId, shares, threshold } });
      }, { action: 'recovery.split', outcome: 'ok', subject: `set ${setId} (${threshold} of ${shares})` });
      return { shares: texts, setId };
    } finally {
      wipe(recoveryKey);
    }
  }

  /** The recovery key, for backups; the caller wipes it. */
  recoveryKey(): { key: Buffer; setId: string } {
    const keys = this.session();
    const slot = readSlot<RecoverySlotParams>(this.db, 'recovery');
    const rec = getRecord(this.db, keys, 'recovery', RECOVERY_RECORD);
    if (!slot || !rec) {
      throw new ShieldError('recovery_not_configured', 'Backups are encrypted under the recovery key: create it first with `shieldlab vault recovery split --shares N --threshold M`.');
    }
    return { key: Buffer.from(rec.data, 'base64'), setId: slot.params.setId };
  }

  /** A consistent image of the database and the current vault key, for the backup writer. */
  snapshot(): { image: Buffer; vaultKey: Buffer } {
    const keys = this.session();
    return { image: this.db.serialize(), vaultKey: Buffer.from(keys.vaultKey) };
  }

  /** Checks a restored image opens with this key (used by restore before it commits). */
  adoptKey(vaultKey: Buffer): void {
    this.keys = deriveSession(this.vaultId, Buffer.from(vaultKey), getMeta(this.db, 'audit_private_sealed')!);
  }
}

/**
 * Wraps the vault key for the requested protections. A keychain KEK goes under a fresh account
 * name and is stored *before* the database refers to it, so a failure at any point leaves either
 * the old slot or the new one working, never a slot whose KEK is gone.
 */
async function prepareSlots(vaultId: string, protection: Protection) {
  const slots: { kind: SlotKind; kek: Buffer; params: KeychainSlotParams | ScryptParams }[] = [];
  let account: string | null = null;
  try {
    if (protection.keychain) {
      const kek = randomKey();
      account = `vault-${vaultId}-${randomBytes(4).toString('hex')}`;
      await protection.keychain.set(account, kek);
      slots.push({ kind: 'keychain', kek, params: { account, store: protection.keychain.store } });
    }
    if (protection.passphrase) {
      const params = newScryptParams(protection.kdf);
      slots.push({ kind: 'passphrase', kek: await deriveKeyFromPassphrase(protection.passphrase, params), params });
    }
  } catch (err) {
    for (const s of slots) wipe(s.kek);
    if (account && protection.keychain) await protection.keychain.delete(account).catch(() => false);
    throw err;
  }
  return {
    slots,
    /** After a failed commit: drop the keychain entry nobody refers to. */
    async abandon() {
      if (account && protection.keychain) await protection.keychain.delete(account).catch(() => false);
    },
    dispose() {
      for (const s of slots) wipe(s.kek);
    },
  };
}
