// Backup file: one AES-256-GCM blob under a key derived from the recovery key.
//   "SLBACKUP" ‖ u16 format ‖ u32 header length ‖ header JSON ‖ sealed(vault key ‖ database image)
// The header is authenticated as AAD, so any altered or truncated byte fails the whole file.
import { closeSync, existsSync, fsyncSync, mkdirSync, openSync, readFileSync, renameSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { writeFileAtomic } from '../files.ts';
import { aeadOpen, aeadSeal, hkdf, KEY_BYTES, wipe } from '../crypto/mod.ts';
import { ShieldError, toShieldError } from '../errors.ts';
import { combineShares } from './shares.ts';
import { openDb, getMeta } from './db.ts';
import { deleteSlot } from './slots.ts';
import { Vault, VAULT_FILE, type Protection } from './vault.ts';

const MAGIC = Buffer.from('SLBACKUP');
const FORMAT = 1;

export interface BackupHeader {
  format: number;
  vaultId: string;
  recoverySetId: string;
  createdAt: string;
  records: number;
}

function backupKey(recoveryKey: Buffer): Buffer {
  return hkdf(recoveryKey, 'shieldlab/backup/v1');
}

/** Written atomically: an interrupted backup leaves no half file. */
export function writeBackup(vault: Vault, out: string): BackupHeader {
  const { key: recoveryKey, setId } = vault.recoveryKey();
  const { image, vaultKey } = vault.snapshot();
  const key = backupKey(recoveryKey);
  const header: BackupHeader = {
    format: FORMAT,
    vaultId: vault.vaultId,
    recoverySetId: setId,
    createdAt: new Date().toISOString(),
    records: vault.status().records,
  };
  const headerBytes = Buffer.from(JSON.stringify(header), 'utf8');
  const prefix = Buffer.alloc(MAGIC.length + 6);
  MAGIC.copy(prefix);
  prefix.writeUInt16BE(FORMAT, MAGIC.length);
  prefix.writeUInt32BE(headerBytes.length, MAGIC.length + 2);
  const aad = Buffer.concat([prefix, headerBytes]);
  const payload = Buffer.concat([vaultKey, image]);
  const sealed = aeadSeal(key, payload, aad);
  wipe(payload, vaultKey, key, recoveryKey);
  writeFileAtomic(out, [aad, sealed]);
  vault.record({ action: 'vault.backup', outcome: 'ok', subject: out });
  return header;
}

export function readBackupHeader(file: string): { header: BackupHeader; aad: Buffer; sealed: Buffer } {
  let bytes: Buffer;
  try {
    bytes = readFileSync(file);
  } catch (err) {
    throw toShieldError(err);
  }
  const invalid = (why: string) => new ShieldError('backup_invalid', `${file} is not a usable ShieldLab backup: ${why}.`);
  if (bytes.length < MAGIC.length + 6 || !bytes.subarray(0, MAGIC.length).equals(MAGIC)) throw invalid('wrong file type');
  const format = bytes.readUInt16BE(MAGIC.length);
  if (format !== FORMAT) throw invalid(`unknown format ${format}`);
  const hlen = bytes.readUInt32BE(MAGIC.length + 2);
  const hend = MAGIC.length + 6 + hlen;
  if (hlen > 64 * 1024 || hend > bytes.length) throw invalid('truncated header');
  let header: BackupHeader;
  try {
    header = JSON.parse(bytes.subarray(MAGIC.length + 6, hend).toString('utf8')) as BackupHeader;
  } catch {
    throw invalid('damaged header');
  }
  if (typeof header.vaultId !== 'string' || typeof header.recoverySetId !== 'string') throw invalid('damaged header');
  return { header, aad: bytes.subarray(0, hend), sealed: bytes.subarray(hend) };
}

/**
 * Restores a backup into an empty home with M shares, then protects it as asked. Works on a temp
 * file and renames it into place only after the restored vault has opened with its key.
 */
export async function restoreBackup(opts: { home: string; file: string; shares: readonly string[]; protection: Protection }): Promise<Vault> {
  const target = join(opts.home, VAULT_FILE);
  if (existsSync(target)) throw new ShieldError('home_not_empty', `${opts.home} already holds a vault; restore into an empty home (--home DIR).`);
  if (!opts.protection.keychain && !opts.protection.passphrase) {
    throw new ShieldError('invalid_argument', 'The restored vault needs the OS keychain, a passphrase, or both.');
  }
  const { header, aad, sealed } = readBackupHeader(opts.file);
  const { recoveryKey, setId } = await combineShares(opts.shares);
  let payload: Buffer | null = null;
  try {
    if (setId !== header.recoverySetId) {
      throw new ShieldError('backup_wrong_key', 'These shares belong to another recovery set than the one this backup was made under.');
    }
    const key = backupKey(recoveryKey);
    payload = aeadOpen(key, sealed, aad);
    wipe(key);
  } finally {
    wipe(recoveryKey);
  }
  if (payload === null) throw new ShieldError('backup_invalid', `${opts.file} fails its integrity check: it was altered or truncated.`);
  const vaultKey = Buffer.from(payload.subarray(0, KEY_BYTES));
  const image = payload.subarray(KEY_BYTES);
  mkdirSync(opts.home, { recursive: true, mode: 0o700 });
  const tmp = join(opts.home, `${VAULT_FILE}.restoring`);
  const cleanup = () => {
    for (const suffix of ['', '-wal', '-shm']) rmSync(tmp + suffix, { force: true });
  };
  try {
    cleanup();
    const fd = openSync(tmp, 'w', 0o600);
    try {
      writeSync(fd, image);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    wipe(payload);
    const db = openDb(tmp);
    try {
      if (getMeta(db, 'vault_id') !== header.vaultId) throw new ShieldError('backup_invalid', 'The backup content does not match its header.');
      // The old machine's keychain entry and passphrase are not ours to rely on here.
      deleteSlot(db, 'keychain');
      deleteSlot(db, 'passphrase');
      db.pragma('wal_checkpoint(TRUNCATE)');
    } finally {
      db.close();
    }
    renameSync(tmp, target);
  } catch (err) {
    cleanup();
    wipe(vaultKey);
    throw toShieldError(err);
  }
  const vault = Vault.open(opts.home);
  try {
    vault.adoptKey(vaultKey);
    await vault.reprotect(opts.protection, 'vault.restore');
  } catch (err) {
    vault.close();
    for (const suffix of ['', '-wal', '-shm']) rmSync(target + suffix, { force: true });
    throw err;
  } finally {
    wipe(vaultKey);
  }
  return vault;
}
