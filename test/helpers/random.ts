// Seeded randomness for fuzzing and fault schedules: a failing run is replayed from its seed.

/** mulberry32: small, seeded, reproducible. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** One random mutation of real input: truncate, overwrite, insert, flip a bit, or delete bytes. */
export function mutate(input: Buffer, r: () => number): Buffer {
  const out = Buffer.from(input);
  const pick = Math.floor(r() * 5);
  if (pick === 0) return out.subarray(0, Math.floor(r() * out.length));
  if (pick === 1) {
    for (let i = 0, n = 1 + Math.floor(r() * 4); i < n; i++) out[Math.floor(r() * out.length)] = Math.floor(r() * 256);
    return out;
  }
  if (pick === 2) {
    const at = Math.floor(r() * out.length);
    return Buffer.concat([out.subarray(0, at), Buffer.from(Array.from({ length: 1 + Math.floor(r() * 16) }, () => Math.floor(r() * 256))), out.subarray(at)]);
  }
  if (pick === 3) {
    // Flip one bit: lengths, tags and counts off by a little.
    const at = Math.floor(r() * out.length);
    out[at] = out[at]! ^ (1 << Math.floor(r() * 8));
    return out;
  }
  const at = Math.floor(r() * out.length);
  return Buffer.concat([out.subarray(0, at), out.subarray(at + 1 + Math.floor(r() * 8))]);
}
