// Envelope-encrypted records. Names are looked up by HMAC (a blind index), never stored in clear;
// the AAD binds vault id + record id + kind + version, so a sealed blob moved to another row,
// kind or version fails to open.
import { randomUUID } from 'node:crypto';
import type { Db } from './db.ts';
import { aeadOpen, aeadSeal, hmacSha256 } from '../crypto/mod.ts';
import { ShieldError } from '../errors.ts';

export const RECORD_KINDS = ['secret', 'guardian-key', 'key-protector', 'recovery', 'host-key', 'attestation', 'shielded-disk', 'vm'] as const;
export type RecordKind = (typeof RECORD_KINDS)[number];

export interface RecordPayload {
  name: string;
  tags: string[];
  notes: string;
  /** base64 of the protected bytes */
  data: string;
}

export interface RecordKeys {
  vaultId: string;
  vaultKey: Buffer;
  lookupKey: Buffer;
}

interface Row {
  id: string;
  kind: RecordKind;
  version: number;
  sealed: Buffer;
  created_at: string;
  updated_at: string;
}

export interface OpenedRecord extends RecordPayload {
  id: string;
  kind: RecordKind;
  version: number;
  createdAt: string;
  updatedAt: string;
}

export function recordAad(vaultId: string, id: string, kind: string, version: number): Buffer {
  return Buffer.from(`shieldlab/record/v1|${vaultId}|${id}|${kind}|${version}`);
}

export function lookupOf(lookupKey: Buffer, kind: RecordKind, name: string): Buffer {
  return hmacSha256(lookupKey, Buffer.from(`${kind}\u0000${name}`, 'utf8'));
}

function open(keys: RecordKeys, row: Row): OpenedRecord {
  const plain = aeadOpen(keys.vaultKey, row.sealed, recordAad(keys.vaultId, row.id, row.kind, row.version));
  if (plain === null) {
    throw new ShieldError('record_tampered', `Record ${row.id} failed its integrity check (altered, or moved from another slot).`, {
      details: { id: row.id },
    });
  }
  try {
    const payload = JSON.parse(plain.toString('utf8')) as RecordPayload;
    return { ...payload, id: row.id, kind: row.kind, version: row.version, createdAt: row.created_at, updatedAt: row.updated_at };
  } finally {
    plain.fill(0);
  }
}

export function getRecord(db: Db, keys: RecordKeys, kind: RecordKind, name: string): OpenedRecord | undefined {
  const row = db
    .prepare('SELECT id, kind, version, sealed, created_at, updated_at FROM records WHERE lookup = ?')
    .get(lookupOf(keys.lookupKey, kind, name)) as Row | undefined;
  if (!row) return undefined;
  const rec = open(keys, row);
  if (rec.kind !== kind || rec.name !== name) {
    throw new ShieldError('record_tampered', `Record ${row.id} does not match its index entry.`, { details: { id: row.id } });
  }
  return rec;
}

export function listRecords(db: Db, keys: RecordKeys, kind?: RecordKind): OpenedRecord[] {
  const rows = (
    kind
      ? db.prepare('SELECT id, kind, version, sealed, created_at, updated_at FROM records WHERE kind = ?').all(kind)
      : db.prepare('SELECT id, kind, version, sealed, created_at, updated_at FROM records').all()
  ) as Row[];
  return rows.map((r) => open(keys, r)).sort((a, b) => a.kind.localeCompare(b.kind) || a.name.localeCompare(b.name));
}

/** Insert or replace by (kind, name); bumps the version on every write. */
export function putRecord(db: Db, keys: RecordKeys, kind: RecordKind, payload: RecordPayload): { id: string; version: number; created: boolean } {
  const lookup = lookupOf(keys.lookupKey, kind, payload.name);
  const existing = db.prepare('SELECT id, version, created_at FROM records WHERE lookup = ?').get(lookup) as
    | { id: string; version: number; created_at: string }
    | undefined;
  const id = existing?.id ?? randomUUID();
  const version = (existing?.version ?? 0) + 1;
  const now = new Date().toISOString();
  const plain = Buffer.from(JSON.stringify(payload), 'utf8');
  const sealed = aeadSeal(keys.vaultKey, plain, recordAad(keys.vaultId, id, kind, version));
  plain.fill(0);
  db.prepare(
    `INSERT INTO records (id, kind, lookup, version, sealed, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)
     ON CONFLICT(id) DO UPDATE SET version = excluded.version, sealed = excluded.sealed, updated_at = excluded.updated_at`,
  ).run(id, kind, lookup, version, sealed, existing?.created_at ?? now, now);
  return { id, version, created: existing === undefined };
}

export function deleteRecord(db: Db, keys: RecordKeys, kind: RecordKind, name: string): boolean {
  return db.prepare('DELETE FROM records WHERE lookup = ?').run(lookupOf(keys.lookupKey, kind, name)).changes > 0;
}

/** Re-seal every record under new keys (vault key rotation); the caller owns the transaction. */
export function resealAll(db: Db, from: RecordKeys, to: RecordKeys, onRecord?: () => void): number {
  const rows = db.prepare('SELECT id, kind, version, sealed, created_at, updated_at FROM records').all() as Row[];
  const update = db.prepare('UPDATE records SET lookup = ?, sealed = ? WHERE id = ?');
  // Lookups change with the key: clear them first so the UNIQUE index never sees a transient clash.
  db.prepare('UPDATE records SET lookup = randomblob(32)').run();
  for (const row of rows) {
    const rec = open(from, row);
    const payload: RecordPayload = { name: rec.name, tags: rec.tags, notes: rec.notes, data: rec.data };
    const plain = Buffer.from(JSON.stringify(payload), 'utf8');
    update.run(lookupOf(to.lookupKey, row.kind, rec.name), aeadSeal(to.vaultKey, plain, recordAad(to.vaultId, row.id, row.kind, row.version)), row.id);
    plain.fill(0);
    onRecord?.();
  }
  return rows.length;
}
