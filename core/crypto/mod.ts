// Thin typed wrappers over node:crypto. Every secret is a Buffer so it can be zeroed.
import {
  createCipheriv,
  createDecipheriv,
  createHash,
  createHmac,
  createPrivateKey,
  createPublicKey,
  diffieHellman,
  generateKeyPairSync,
  hkdfSync,
  randomBytes,
  scrypt,
  timingSafeEqual,
} from 'node:crypto';

export const KEY_BYTES = 32;
const NONCE_BYTES = 12;
const TAG_BYTES = 16;

export function randomKey(bytes = KEY_BYTES): Buffer {
  return randomBytes(bytes);
}

/** Zero key material once it is no longer needed. */
export function wipe(...buffers: Array<Buffer | Uint8Array | null | undefined>): void {
  for (const b of buffers) b?.fill(0);
}

/** AES-256-GCM with a fresh random nonce. Output: nonce ‖ ciphertext ‖ tag. */
export function aeadSeal(key: Buffer, plaintext: Buffer, aad: Buffer): Buffer {
  const nonce = randomBytes(NONCE_BYTES);
  const cipher = createCipheriv('aes-256-gcm', key, nonce);
  cipher.setAAD(aad);
  const body = Buffer.concat([cipher.update(plaintext), cipher.final()]);
  return Buffer.concat([nonce, body, cipher.getAuthTag()]);
}

/** Opens an aeadSeal blob; null when the key, AAD or bytes are wrong (never partial plaintext). */
export function aeadOpen(key: Buffer, sealed: Buffer, aad: Buffer): Buffer | null {
  if (sealed.length < NONCE_BYTES + TAG_BYTES) return null;
  const nonce = sealed.subarray(0, NONCE_BYTES);
  const tag = sealed.subarray(sealed.length - TAG_BYTES);
  const body = sealed.subarray(NONCE_BYTES, sealed.length - TAG_BYTES);
  try {
    const decipher = createDecipheriv('aes-256-gcm', key, nonce);
    decipher.setAAD(aad);
    decipher.setAuthTag(tag);
    return Buffer.concat([decipher.update(body), decipher.final()]);
  } catch {
    return null;
  }
}

export function hkdf(key: Buffer, info: string | Buffer, bytes = KEY_BYTES, salt: Buffer = Buffer.alloc(0)): Buffer {
  return Buffer.from(hkdfSync('sha256', key, salt, typeof info === 'string' ? Buffer.from(info, 'utf8') : info, bytes));
}

export function sha256(...parts: Buffer[]): Buffer {
  const h = createHash('sha256');
  for (const p of parts) h.update(p);
  return h.digest();
}

export function hmacSha256(key: Buffer, ...parts: Buffer[]): Buffer {
  const h = createHmac('sha256', key);
  for (const p of parts) h.update(p);
  return h.digest();
}

export function constantTimeEqual(a: Buffer, b: Buffer): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}

/** scrypt is memory-hard (N·r·128 bytes); its parameters travel with what it protects. */
export interface ScryptParams {
  algorithm: 'scrypt';
  N: number;
  r: number;
  p: number;
  salt: string; // base64
}

/** Defaults: N=2^17, r=8 → 128 MiB per derivation (OWASP's scrypt recommendation). */
export function newScryptParams(overrides?: Partial<Pick<ScryptParams, 'N' | 'r' | 'p'>>): ScryptParams {
  return { algorithm: 'scrypt', N: 1 << 17, r: 8, p: 1, ...overrides, salt: randomBytes(16).toString('base64') };
}

export function deriveKeyFromPassphrase(passphrase: Buffer, params: ScryptParams): Promise<Buffer> {
  const maxmem = 128 * params.N * params.r * params.p + 32 * 1024 * 1024;
  return new Promise((resolve, reject) => {
    scrypt(passphrase, Buffer.from(params.salt, 'base64'), KEY_BYTES, { N: params.N, r: params.r, p: params.p, maxmem }, (err, key) =>
      err ? reject(err) : resolve(key),
    );
  });
}

/** X25519 key pair for sealing data while the vault is locked (audit records). */
export interface SealingKeyPair {
  publicKey: Buffer; // SPKI DER
  privateKey: Buffer; // PKCS#8 DER — secret
}

export function newSealingKeyPair(): SealingKeyPair {
  const { publicKey, privateKey } = generateKeyPairSync('x25519');
  return {
    publicKey: publicKey.export({ type: 'spki', format: 'der' }),
    privateKey: privateKey.export({ type: 'pkcs8', format: 'der' }),
  };
}

/** ECIES: ephemeral X25519 → HKDF → AES-256-GCM. Output: ephemeral SPKI length ‖ SPKI ‖ aeadSeal blob. */
export function sealToPublicKey(publicKeyDer: Buffer, plaintext: Buffer, aad: Buffer, info: string): Buffer {
  const recipient = createPublicKey({ key: publicKeyDer, format: 'der', type: 'spki' });
  const eph = generateKeyPairSync('x25519');
  const shared = diffieHellman({ privateKey: eph.privateKey, publicKey: recipient });
  const ephDer = eph.publicKey.export({ type: 'spki', format: 'der' });
  const key = hkdf(shared, info, KEY_BYTES, ephDer);
  try {
    const len = Buffer.alloc(2);
    len.writeUInt16BE(ephDer.length);
    return Buffer.concat([len, ephDer, aeadSeal(key, plaintext, aad)]);
  } finally {
    wipe(shared, key);
  }
}

export function openWithPrivateKey(privateKeyDer: Buffer, sealed: Buffer, aad: Buffer, info: string): Buffer | null {
  if (sealed.length < 2) return null;
  const len = sealed.readUInt16BE(0);
  if (sealed.length < 2 + len) return null;
  const ephDer = sealed.subarray(2, 2 + len);
  let shared: Buffer | undefined;
  let key: Buffer | undefined;
  try {
    const priv = createPrivateKey({ key: privateKeyDer, format: 'der', type: 'pkcs8' });
    const eph = createPublicKey({ key: ephDer, format: 'der', type: 'spki' });
    shared = diffieHellman({ privateKey: priv, publicKey: eph });
    key = hkdf(shared, info, KEY_BYTES, ephDer);
    return aeadOpen(key, sealed.subarray(2 + len), aad);
  } catch {
    return null;
  } finally {
    wipe(shared, key);
  }
}
