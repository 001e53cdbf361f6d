// Re-keying a vTPM's state (the KP roll at every start): the state under the old key is read out of
// one swtpm and written into another that stores it under the new key, in a NEW folder; the old
// folder is left as it was. The plaintext state only ever lives in this process's memory and in the
// two swtpm processes (CMD_GET_STATEBLOB decrypted → CMD_SET_STATEBLOB), never on disk, and it is
// zeroed once handed over. Neither swtpm runs the TPM (no CMD_INIT), so the state is moved, not
// changed: the guest's vTPM (its EK, NV, persistent objects, clock) is the same one after the roll.
//
// Each folder carries a key check value (KEY_CHECK_FILE, vtpmKeyCheck) naming the key it is under,
// so recovery after a crash (settleVtpmState) picks the right folder without trying keys.
import { closeSync, copyFileSync, existsSync, fsyncSync, openSync, readFileSync, readdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ShieldError } from '../errors.ts';
import { vtpmKeyCheck } from './key.ts';
import { startVtpm } from './process.ts';
import { MARKER_FILE } from './provision.ts';
import { BLOB, type BlobType, ctrlGetStateBlob, ctrlInit, ctrlSetStateBlob } from './socket.ts';

export const KEY_CHECK_FILE = 'shieldlab-vtpm-key.check';

/** The key check value recorded in a state folder, or null (none recorded: a folder from before rolls). */
export function readKeyCheck(stateDir: string): string | null {
  try {
    return readFileSync(join(stateDir, KEY_CHECK_FILE), 'utf8').trim() || null;
  } catch {
    return null;
  }
}

function syncPath(p: string): void {
  let fd: number | undefined;
  try {
    fd = openSync(p, 'r');
    fsyncSync(fd);
  } catch {
    // best effort (some file systems refuse fsync on folders)
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
}

export function writeKeyCheck(stateDir: string, key: Buffer): void {
  const file = join(stateDir, KEY_CHECK_FILE);
  writeFileSync(`${file}.tmp`, `${vtpmKeyCheck(key)}\n`, { mode: 0o600 });
  syncPath(`${file}.tmp`);
  renameSync(`${file}.tmp`, file);
}

export interface RekeyOptions {
  /** The state folder under `oldKey`; only read. */
  from: string;
  /** The new folder (replaced if it exists), left under `newKey` with the marker and the key check. */
  to: string;
  oldKey: Buffer;
  newKey: Buffer;
  /** A private folder for the two swtpm's sockets. */
  runDir: string;
  swtpm?: string;
}

/** Copies the vTPM state from `from` (under oldKey) into `to` (under newKey); the keys stay the caller's to wipe. */
export async function rekeyVtpmState(o: RekeyOptions): Promise<{ blobs: number; bytes: number }> {
  rmSync(o.to, { recursive: true, force: true });
  const blobs: [BlobType, Buffer][] = [];
  // The blobs the folder holds (the volatile and savestate ones only after some runs).
  const types: BlobType[] = [BLOB.PERMANENT];
  if (existsSync(join(o.from, 'tpm2-00.volatilestate'))) types.push(BLOB.VOLATILE);
  if (existsSync(join(o.from, 'tpm2-00.savestate'))) types.push(BLOB.SAVESTATE);
  try {
    // swtpm hands its state over only while the TPM is up: this start decrypts (a wrong key fails
    // here, vtpm_state_invalid) but runs no TPM command, so nothing in the state changes.
    const src = await startVtpm({ stateDir: o.from, key: o.oldKey, runDir: join(o.runDir, 'rekey-from'), ...(o.swtpm ? { swtpm: o.swtpm } : {}) });
    try {
      for (const type of types) {
        const blob = await ctrlGetStateBlob(src.ctrlSocket, type);
        if (blob) blobs.push([type, blob]);
      }
    } finally {
      await src.stop();
    }
    if (!blobs.some(([t]) => t === BLOB.PERMANENT)) throw new ShieldError('tpm_error', `swtpm gave no permanent state for ${o.from}.`, { details: { rc: 0, rcName: 'swtpm CMD_GET_STATEBLOB' } });
    const dst = await startVtpm({ stateDir: o.to, key: o.newKey, runDir: join(o.runDir, 'rekey-to'), init: false, ...(o.swtpm ? { swtpm: o.swtpm } : {}) });
    try {
      for (const [type, blob] of blobs) await ctrlSetStateBlob(dst.ctrlSocket, type, blob);
      // libtpms takes set state as what its next start loads; this start loads it and stores it
      // through swtpm, encrypted under the new key (no TPM command runs: the state is unchanged).
      await ctrlInit(dst.ctrlSocket);
    } finally {
      await dst.stop();
    }
  } finally {
    for (const [, b] of blobs) b.fill(0);
  }
  // Proof before anyone relies on it: the new folder opens (decrypts) under the new key.
  const check = await startVtpm({ stateDir: o.to, key: o.newKey, runDir: join(o.runDir, 'rekey-check'), ...(o.swtpm ? { swtpm: o.swtpm } : {}) });
  await check.stop();
  if (existsSync(join(o.from, MARKER_FILE))) copyFileSync(join(o.from, MARKER_FILE), join(o.to, MARKER_FILE));
  for (const f of readdirSync(o.to)) syncPath(join(o.to, f));
  writeKeyCheck(o.to, o.newKey);
  syncPath(o.to);
  return { blobs: blobs.length, bytes: blobs.reduce((n, [, b]) => n + b.length, 0) };
}

export interface StateFolders {
  /** The current state folder (swtpm runs on this one). */
  current: string;
  /** A roll's new folder, until it becomes current. */
  next: string;
  /** The old folder, for the moment of the switch. */
  old: string;
}

/** The folder next to `current` that a roll fills, and the one the old state passes through. */
export function stateFolders(current: string): StateFolders {
  return { current, next: `${current}.next`, old: `${current}.old` };
}

/**
 * Makes `next` current (after the commit point: the disk's KP is the new one). Two renames; a
 * crash between them leaves `current` missing, which settleVtpmState repairs.
 */
export function promoteNext(f: StateFolders, between?: () => void): void {
  rmSync(f.old, { recursive: true, force: true });
  if (existsSync(f.current)) renameSync(f.current, f.old);
  between?.();
  renameSync(f.next, f.current);
  syncPath(join(f.current, '..'));
  rmSync(f.old, { recursive: true, force: true });
}

/**
 * Recovery before a start, with the key of the transport key the disk's KP holds NOW:
 *   - `next` under that key: a roll committed (the disk was resealed) and died before the switch;
 *     finish it (next → current);
 *   - `next` under another key: a roll died before its commit; the old state is still the one; drop next;
 *   - `current` missing but `old` there (a crash between the two renames of an aborted switch): old back.
 * Returns what it did, for the audit.
 */
export function settleVtpmState(f: StateFolders, key: Buffer): 'clean' | 'finished' | 'discarded' {
  const check = vtpmKeyCheck(key);
  let did: 'clean' | 'finished' | 'discarded' = 'clean';
  if (existsSync(f.next)) {
    if (readKeyCheck(f.next) === check) {
      promoteNext(f);
      did = 'finished';
    } else {
      rmSync(f.next, { recursive: true, force: true });
      did = 'discarded';
    }
  }
  if (!existsSync(f.current) && existsSync(f.old)) {
    renameSync(f.old, f.current);
    did = did === 'clean' ? 'finished' : did;
  }
  rmSync(f.old, { recursive: true, force: true });
  return did;
}
