// Append-only, hash-chained audit log. Entries are sealed to the vault's audit public key, so
// refusals can be recorded while the vault is locked; only an unlocked vault can read them.
// Each row's hash covers its sequence number, time, ciphertext and the previous hash; the
// vault also keeps an encrypted anchor (last seq + hash) so a truncated tail is detected too.
import type { Db } from './db.ts';
import { aeadOpen, aeadSeal, constantTimeEqual, openWithPrivateKey, sealToPublicKey, sha256 } from '../crypto/mod.ts';

export interface AuditEvent {
  action: string;
  outcome: 'ok' | 'refused' | 'failed';
  subject?: string;
  reason?: string;
}

export interface AuditEntry extends AuditEvent {
  seq: number;
  at: string;
}

export type AuditProblem = { seq: number; problem: 'edited' | 'missing' | 'reordered' | 'unreadable' | 'truncated' };

const GENESIS = Buffer.alloc(32);
const SEAL_INFO = 'shieldlab/audit-entry/v1';

function entryHash(seq: number, at: string, sealed: Buffer, prev: Buffer): Buffer {
  const seqBuf = Buffer.alloc(8);
  seqBuf.writeBigUInt64BE(BigInt(seq));
  return sha256(Buffer.from('shieldlab/audit/v1'), seqBuf, Buffer.from(at, 'utf8'), sealed, prev);
}

function aad(vaultId: string, seq: number): Buffer {
  return Buffer.from(`shieldlab/audit/v1|${vaultId}|${seq}`);
}

interface Row {
  seq: number;
  at: string;
  sealed: Buffer;
  prev_hash: Buffer;
  hash: Buffer;
}

export interface Anchor {
  seq: number;
  hash: string;
}

/** Appends one entry; call inside the caller's write transaction so the chain cannot fork. */
export function appendAudit(db: Db, opts: { vaultId: string; publicKey: Buffer; event: AuditEvent; now?: Date }): Anchor {
  const last = db.prepare('SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1').get() as { seq: number; hash: Buffer } | undefined;
  const seq = (last?.seq ?? 0) + 1;
  const prev = last?.hash ?? GENESIS;
  const at = (opts.now ?? new Date()).toISOString();
  const sealed = sealToPublicKey(opts.publicKey, Buffer.from(JSON.stringify(opts.event), 'utf8'), aad(opts.vaultId, seq), SEAL_INFO);
  const hash = entryHash(seq, at, sealed, prev);
  db.prepare('INSERT INTO audit (seq, at, sealed, prev_hash, hash) VALUES (?, ?, ?, ?, ?)').run(seq, at, sealed, prev, hash);
  return { seq, hash: hash.toString('hex') };
}

export function sealAnchor(vaultKey: Buffer, vaultId: string, anchor: Anchor): string {
  return aeadSeal(vaultKey, Buffer.from(JSON.stringify(anchor)), Buffer.from(`shieldlab/audit-anchor/v1|${vaultId}`)).toString('base64');
}

export function openAnchor(vaultKey: Buffer, vaultId: string, sealed: string | undefined): Anchor | null {
  if (sealed === undefined) return null;
  const plain = aeadOpen(vaultKey, Buffer.from(sealed, 'base64'), Buffer.from(`shieldlab/audit-anchor/v1|${vaultId}`));
  return plain === null ? null : (JSON.parse(plain.toString('utf8')) as Anchor);
}

/** True while the entry the anchor names is still in the chain, unchanged. */
export function anchorHolds(db: Db, anchor: Anchor): boolean {
  const row = db.prepare('SELECT hash FROM audit WHERE seq = ?').get(anchor.seq) as { hash: Buffer } | undefined;
  return row !== undefined && row.hash.toString('hex') === anchor.hash;
}

export function readAudit(db: Db, opts: { vaultId: string; privateKey: Buffer; limit?: number; afterSeq?: number }): AuditEntry[] {
  const rows = db
    .prepare('SELECT seq, at, sealed FROM audit WHERE seq > ? ORDER BY seq DESC LIMIT ?')
    .all(opts.afterSeq ?? 0, opts.limit ?? 1000) as Row[];
  return rows.map((r) => {
    const plain = openWithPrivateKey(opts.privateKey, r.sealed, aad(opts.vaultId, r.seq), SEAL_INFO);
    if (plain === null) return { seq: r.seq, at: r.at, action: 'unreadable', outcome: 'failed' as const, reason: 'entry cannot be decrypted' };
    return { seq: r.seq, at: r.at, ...(JSON.parse(plain.toString('utf8')) as AuditEvent) };
  });
}

/** Walks the whole chain. With the anchor (unlocked vault), a deleted tail is detected as well. */
export function verifyAudit(db: Db, opts: { vaultId: string; privateKey?: Buffer; anchor?: Anchor | null }): { entries: number; problems: AuditProblem[] } {
  const problems: AuditProblem[] = [];
  let expectedSeq = 1;
  let prev: Buffer = GENESIS;
  let entries = 0;
  const hashes = new Map<number, Buffer>();
  let previousFlagged = false;
  for (const r of db.prepare('SELECT seq, at, sealed, prev_hash, hash FROM audit ORDER BY seq').iterate() as Iterable<Row>) {
    entries++;
    if (r.seq > expectedSeq) {
      for (let s = expectedSeq; s < r.seq; s++) problems.push({ seq: s, problem: 'missing' });
    }
    const recomputed = entryHash(r.seq, r.at, r.sealed, r.prev_hash);
    const before = problems.length;
    if (!constantTimeEqual(recomputed, r.hash)) {
      problems.push({ seq: r.seq, problem: 'edited' });
    } else if (!constantTimeEqual(r.prev_hash, prev) && r.seq === expectedSeq && !previousFlagged) {
      // A link broken only because the previous entry was already named is not a second problem.
      problems.push({ seq: r.seq, problem: 'reordered' });
    } else if (opts.privateKey && openWithPrivateKey(opts.privateKey, r.sealed, aad(opts.vaultId, r.seq), SEAL_INFO) === null) {
      // The hash is intact but the ciphertext was moved here from another slot.
      problems.push({ seq: r.seq, problem: 'reordered' });
    }
    previousFlagged = problems.length > before;
    hashes.set(r.seq, r.hash);
    prev = r.hash;
    expectedSeq = r.seq + 1;
  }
  const anchor = opts.anchor;
  if (anchor) {
    const h = hashes.get(anchor.seq);
    if (h === undefined) {
      for (let s = expectedSeq; s <= anchor.seq; s++) problems.push({ seq: s, problem: 'truncated' });
    } else if (h.toString('hex') !== anchor.hash) {
      problems.push({ seq: anchor.seq, problem: 'edited' });
    }
  }
  return { entries, problems };
}
