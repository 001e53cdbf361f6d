// The operations a crash-test child performs on a VHDX, generated from a seed so the parent can
// replay the same list and know what each 64 KiB slot may hold after a kill -9.
import { rng } from './random.ts';

export const SLOT = 64 * 1024;
export const CRASH_DISK = 48 * 1024 * 1024;
export const CRASH_BLOCK = 1024 * 1024;
export const SLOTS = CRASH_DISK / SLOT;
const SLOTS_PER_BLOCK = CRASH_BLOCK / SLOT;

export type CrashOp = { kind: 'write'; slot: number; id: number } | { kind: 'zero-block'; block: number } | { kind: 'flush' };

/**
 * An endless seeded list of operations; write ids start above `idBase`. `writesOnly` leaves out
 * block zeroing, so on a fixed disk no operation needs the log at all.
 */
export function* crashOps(seed: number, idBase: number, writesOnly = false): Generator<CrashOp> {
  const r = rng(seed);
  for (let n = 1; ; n++) {
    const p = r();
    if (p < 0.8) yield { kind: 'write', slot: Math.floor(r() * SLOTS), id: idBase + n };
    else if (p < 0.86) {
      const block = Math.floor(r() * (CRASH_DISK / CRASH_BLOCK));
      if (!writesOnly) yield { kind: 'zero-block', block };
    }
    else yield { kind: 'flush' };
  }
}

/** A slot's bytes for write `id`: its id and slot number up front, then a fill byte derived from both. */
export function slotContent(id: number, slot: number): Buffer {
  const b = Buffer.alloc(SLOT, ((id * 31 + slot) & 0xff) | 1);
  b.writeUInt32LE(id, 0);
  b.writeUInt32LE(slot, 4);
  return b;
}

/** Which write a slot's bytes came from (0 = zeros), or null when they match no write at all (torn or foreign data). */
export function slotId(bytes: Buffer, slot: number): number | null {
  if (bytes.every((x) => x === 0)) return 0;
  const id = bytes.readUInt32LE(0);
  return slotContent(id, slot).equals(bytes) ? id : null;
}

/** Slots an operation changes. */
export function slotsOf(op: CrashOp): number[] {
  if (op.kind === 'write') return [op.slot];
  if (op.kind === 'zero-block') return Array.from({ length: SLOTS_PER_BLOCK }, (_, i) => op.block * SLOTS_PER_BLOCK + i);
  return [];
}
