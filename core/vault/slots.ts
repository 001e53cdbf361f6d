// Key slots: the vault key wrapped (AES-256-GCM) under each way of unlocking it.
// keychain: a random key-encryption key kept in the OS keychain;
// passphrase: a KEK derived with scrypt (parameters stored in the slot);
// recovery: the recovery key whose shares the owner printed.
import type { Db } from './db.ts';
import { aeadOpen, aeadSeal, type ScryptParams } from '../crypto/mod.ts';

export type SlotKind = 'keychain' | 'passphrase' | 'recovery';

export interface KeychainSlotParams {
  account: string;
  store: string;
}
export interface RecoverySlotParams {
  setId: string;
  shares: number;
  threshold: number;
}
export type SlotParams = KeychainSlotParams | ScryptParams | RecoverySlotParams;

function slotAad(vaultId: string, kind: SlotKind): Buffer {
  return Buffer.from(`shieldlab/slot/v1|${vaultId}|${kind}`);
}

export function writeSlot(db: Db, opts: { vaultId: string; kind: SlotKind; kek: Buffer; vaultKey: Buffer; params: SlotParams }): void {
  const wrapped = aeadSeal(opts.kek, opts.vaultKey, slotAad(opts.vaultId, opts.kind));
  db.prepare(
    `INSERT INTO key_slots (kind, params, wrapped, created_at) VALUES (?, ?, ?, ?)
     ON CONFLICT(kind) DO UPDATE SET params = excluded.params, wrapped = excluded.wrapped, created_at = excluded.created_at`,
  ).run(opts.kind, JSON.stringify(opts.params), wrapped, new Date().toISOString());
}

export function readSlot<P extends SlotParams>(db: Db, kind: SlotKind): { params: P; wrapped: Buffer } | undefined {
  const row = db.prepare('SELECT params, wrapped FROM key_slots WHERE kind = ?').get(kind) as { params: string; wrapped: Buffer } | undefined;
  return row && { params: JSON.parse(row.params) as P, wrapped: row.wrapped };
}

export function unwrapSlot(opts: { vaultId: string; kind: SlotKind; kek: Buffer; wrapped: Buffer }): Buffer | null {
  return aeadOpen(opts.kek, opts.wrapped, slotAad(opts.vaultId, opts.kind));
}

export function deleteSlot(db: Db, kind: SlotKind): void {
  db.prepare('DELETE FROM key_slots WHERE kind = ?').run(kind);
}

export function listSlots(db: Db): SlotKind[] {
  return (db.prepare('SELECT kind FROM key_slots ORDER BY kind').all() as { kind: SlotKind }[]).map((r) => r.kind);
}
