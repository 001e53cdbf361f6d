// Writing files so that a crash never leaves a half-written one: temp file, fsync, rename.
import { closeSync, existsSync, fsyncSync, mkdirSync, openSync, renameSync, rmSync, writeSync } from 'node:fs';
import { dirname } from 'node:path';
import { toShieldError } from './errors.ts';

export function writeFileAtomic(path: string, parts: Buffer | readonly Buffer[], mode = 0o600): void {
  const tmp = `${path}.partial`;
  try {
    // One missing folder level is created; deeper ones are a typo more often than not (and a
    // recursive mkdir under /proc never returns on Linux).
    if (!existsSync(dirname(path))) mkdirSync(dirname(path), { mode: 0o700 });
    const fd = openSync(tmp, 'w', mode);
    try {
      for (const p of Buffer.isBuffer(parts) ? [parts] : parts) writeSync(fd, p);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(tmp, path);
  } catch (err) {
    rmSync(tmp, { force: true });
    throw toShieldError(err);
  }
}
