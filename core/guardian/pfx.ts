// PKCS#12 (PFX) files for guardian certificates with their private keys, one file per certificate,
// as New-HgsGuardian -SigningCertificate/-EncryptionCertificate takes them.
//
// Export: node-forge's PKCS#12 writer with pbeWithSHAAnd3-KeyTripleDES-CBC for the key and an
// HMAC-SHA1 MAC (what Windows Server 2016 reads); certificates go in unencrypted.
// Import: the integrity MAC is checked here with node:crypto (RFC 7292 appendix B key derivation),
// so a wrong password is told apart from a damaged file and the work a file may ask for is capped
// before forge decrypts the bags. The password is never put into an error message.
import { createHash, createHmac, createPrivateKey, getHashes, timingSafeEqual, type KeyObject } from 'node:crypto';
import { children, forge, fromDer, oidOf, toDer, type Asn1 } from './forge.ts';
import { ShieldError } from '../errors.ts';
import { wipe } from '../crypto/mod.ts';
import { checkCertificatePair, keyMatchesCertificate, parseCertificate, parseGuardianSubject, type GuardianCerts, type GuardianKeys } from './guardian.ts';

export type Password = string | Buffer;

export interface GuardianPfx {
  signing: Buffer;
  encryption: Buffer;
}

/** Largest PFX accepted, and the most key-derivation work one file may ask for. */
export const MAX_PFX_BYTES = 1024 * 1024;
export const MAX_ITERATIONS = 200_000;
const MAX_TOTAL_ITERATIONS = 400_000;
const EXPORT_ITERATIONS = 2048;

const invalid = (why: string) => new ShieldError('pfx_invalid', `Not a usable PFX file: ${why}.`);
const wrongPassword = () => new ShieldError('wrong_password', 'The password does not open this PFX file.');

const { Class, Type } = forge.asn1;

function passwordText(password: Password): string {
  const text = typeof password === 'string' ? password : password.toString('utf8');
  if (text.includes('\u0000')) throw new ShieldError('invalid_argument', 'A PFX password may not contain NUL characters.', { details: { field: 'password' } });
  return text;
}

// ---- export ------------------------------------------------------------------------------------

/** One password-protected PFX per certificate, each with its private key. */
export function exportGuardianPfx(guardian: { certs: GuardianCerts; keys: GuardianKeys }, password: Password): GuardianPfx {
  const pass = passwordText(password);
  if (pass.length === 0) throw new ShieldError('invalid_argument', 'A PFX that holds private keys needs a password.', { details: { field: 'password' } });
  const pair = checkCertificatePair(guardian.certs.signingCertPem, guardian.certs.encryptionCertPem);
  const one = (certPem: string, keyPem: string) => {
    const x = parseCertificate(certPem);
    const key = createPrivateKey(keyPem);
    if (!keyMatchesCertificate(x, key)) throw new ShieldError('guardian_invalid', 'A guardian private key does not match its certificate.');
    // forge needs its own key object; it lives only for this call.
    const forgeKey = forge.pki.privateKeyFromPem(keyPem);
    const p12 = forge.pkcs12.toPkcs12Asn1(forgeKey, [forge.pki.certificateFromPem(certPem)], pass, {
      algorithm: '3des',
      count: EXPORT_ITERATIONS,
      friendlyName: parseGuardianSubject(x.subject) ? x.subject.slice(3) : 'Shielded VM guardian certificate',
    } as Parameters<typeof forge.pkcs12.toPkcs12Asn1>[3]);
    return toDer(p12);
  };
  return {
    signing: one(pair.certs.signingCertPem, guardian.keys.signingKeyPem),
    encryption: one(pair.certs.encryptionCertPem, guardian.keys.encryptionKeyPem),
  };
}

// ---- import ------------------------------------------------------------------------------------

/** Opens both PFX files and checks they form a guardian. Keys come back as PKCS#8 PEM. */
export function importGuardianPfx(files: GuardianPfx, password: Password): { name: string; host: string; certs: GuardianCerts; keys: GuardianKeys } {
  const pass = passwordText(password);
  const signing = openPfx(files.signing, pass, 'signing');
  const encryption = openPfx(files.encryption, pass, 'encryption');
  const pair = checkCertificatePair(signing.certPem, encryption.certPem);
  return {
    name: pair.name,
    host: pair.host,
    certs: pair.certs,
    keys: { signingKeyPem: pemOf(signing.key), encryptionKeyPem: pemOf(encryption.key) },
  };
}

const pemOf = (key: KeyObject) => key.export({ type: 'pkcs8', format: 'pem' }) as string;

/** One PFX → its certificate (the one matching its only private key) and that key. */
function openPfx(bytes: Buffer, pass: string, which: 'signing' | 'encryption'): { certPem: string; key: KeyObject } {
  try {
    return openPfxInner(bytes, pass);
  } catch (err) {
    if (err instanceof ShieldError) {
      throw new ShieldError(err.code, `${which === 'signing' ? 'Signing' : 'Encryption'} PFX: ${err.message}`, { details: { file: which } });
    }
    throw invalid('it could not be decoded');
  }
}

function openPfxInner(bytes: Buffer, pass: string): { certPem: string; key: KeyObject } {
  if (!Buffer.isBuffer(bytes) || bytes.length === 0) throw invalid('the file is empty');
  if (bytes.length > MAX_PFX_BYTES) throw invalid(`it is larger than ${MAX_PFX_BYTES} bytes`);
  let pfx: Asn1;
  try {
    pfx = fromDer(bytes);
  } catch {
    throw invalid('it is not DER-encoded PKCS#12');
  }
  capWork(pfx);
  const forgePass = verifyMac(pfx, pass);

  // The MAC is checked: forge decrypts the bags. PBES2 (AES) bags take the password as UTF-8 bytes,
  // PKCS#12 PBE (3DES, RC2) bags as UTF-16; forge's one string cannot be both outside ASCII.
  const attempts = forgePass.useNull ? [undefined] : [...new Set([pass, forge.util.encodeUtf8(pass)])];
  let p12: forge.pkcs12.Pkcs12Pfx | undefined;
  let structural = false;
  for (const attempt of attempts) {
    try {
      p12 = forge.pkcs12.pkcs12FromAsn1(pfx, true, attempt as string);
      break;
    } catch (err) {
      // A wrong key can also yield garbage that happens to unpad: only the last attempt decides.
      structural = !isDecryptFailure(err);
    }
  }
  if (!p12) {
    if (forgePass.macChecked) throw invalid('its contents cannot be decrypted or read, although its MAC accepts the password');
    throw structural ? invalid('its structure is not PKCS#12 that ShieldLab can read') : wrongPassword();
  }

  const keyBags = [
    ...(p12.getBags({ bagType: forge.pki.oids['pkcs8ShroudedKeyBag']! })[forge.pki.oids['pkcs8ShroudedKeyBag']!] ?? []),
    ...(p12.getBags({ bagType: forge.pki.oids['keyBag']! })[forge.pki.oids['keyBag']!] ?? []),
  ];
  const certBags = p12.getBags({ bagType: forge.pki.oids['certBag']! })[forge.pki.oids['certBag']!] ?? [];
  if (keyBags.length === 0) throw invalid('it holds no private key');
  if (keyBags.length > 1) throw invalid('it holds more than one private key');
  const forgeKey = keyBags[0]!.key;
  if (!forgeKey) throw invalid('its private key is not an RSA key');
  const keyDer = toDer(forge.pki.wrapRsaPrivateKey(forge.pki.privateKeyToAsn1(forgeKey)));
  let key: KeyObject;
  try {
    key = createPrivateKey({ key: keyDer, format: 'der', type: 'pkcs8' });
  } catch {
    throw invalid('its private key is damaged');
  } finally {
    wipe(keyDer);
  }
  if (certBags.length === 0) throw invalid('it holds no certificate');
  for (const bag of certBags) {
    if (!bag.cert) continue;
    let x;
    try {
      x = parseCertificate(forge.pki.certificateToPem(bag.cert));
    } catch {
      continue;
    }
    if (keyMatchesCertificate(x, key)) return { certPem: x.toString(), key };
  }
  throw invalid('its private key does not match any certificate in it');
}

const isDecryptFailure = (err: unknown) => /decrypt|invalid password|wrong password/i.test((err as Error)?.message ?? '');

// ---- the integrity MAC (RFC 7292 §4, appendix B) ---------------------------------------------

const MAC_HASHES: Record<string, { name: string; blockBytes: number }> = {
  '1.3.14.3.2.26': { name: 'sha1', blockBytes: 64 },
  '2.16.840.1.101.3.4.2.4': { name: 'sha224', blockBytes: 64 },
  '2.16.840.1.101.3.4.2.1': { name: 'sha256', blockBytes: 64 },
  '2.16.840.1.101.3.4.2.2': { name: 'sha384', blockBytes: 128 },
  '2.16.840.1.101.3.4.2.3': { name: 'sha512', blockBytes: 128 },
};

/**
 * Checks the PFX's MAC and removes it from `pfx` (forge then skips its own check).
 * wrong_password when it does not match. An empty password is tried as the empty BMPString
 * and as no password at all, as OpenSSL does.
 */
function verifyMac(pfx: Asn1, pass: string): { macChecked: boolean; useNull: boolean } {
  const top = children(pfx);
  if (top.length < 2 || top.length > 3) throw invalid('it is not a PKCS#12 PFX');
  const macData = top[2];
  if (!macData) return { macChecked: false, useNull: false };
  const [digestInfo, saltNode, iterNode, ...extra] = children(macData);
  const [algorithm, digestNode] = children(digestInfo);
  const [oidNode, params, ...more] = children(algorithm);
  const oid = oidOf(oidNode);
  const nullParams = params === undefined || (params.tagClass === Class.UNIVERSAL && params.type === Type.NULL && !params.constructed);
  const sequences = [macData, digestInfo, algorithm].every((n) => n?.tagClass === Class.UNIVERSAL && n.type === Type.SEQUENCE && n.constructed);
  const octets = (n: Asn1 | undefined): n is Asn1 & { value: string } => n?.tagClass === Class.UNIVERSAL && n.type === Type.OCTETSTRING && typeof n.value === 'string';
  const integer = iterNode === undefined || (iterNode.tagClass === Class.UNIVERSAL && iterNode.type === Type.INTEGER);
  if (!sequences || oid === null || !nullParams || more.length > 0 || !octets(digestNode) || !octets(saltNode) || !integer || extra.length > 0) {
    throw invalid('its MAC is malformed');
  }
  const hash = MAC_HASHES[oid];
  if (!hash || !getHashes().includes(hash.name)) throw invalid(`its MAC uses an unsupported algorithm (${oid})`);
  const iterations = iterNode === undefined ? 1 : integerOf(iterNode);
  if (iterations < 1) throw invalid('its MAC iteration count is below 1');
  const content = authSafeContent(top[1]!);
  const expected = Buffer.from(digestNode.value, 'binary');
  const salt = Buffer.from(saltNode.value, 'binary');
  const forms = pass === '' ? [bmp(''), Buffer.alloc(0)] : [bmp(pass)];
  for (const [i, secret] of forms.entries()) {
    const digestBytes = createHash(hash.name).digest().length;
    const key = pkcs12Kdf(hash.name, hash.blockBytes, secret, salt, 3, iterations, digestBytes);
    const mac = createHmac(hash.name, key).update(content).digest();
    wipe(key, secret);
    if (mac.length === expected.length && timingSafeEqual(mac, expected)) {
      pfx.value = top.slice(0, 2);
      return { macChecked: true, useNull: i === 1 };
    }
  }
  throw wrongPassword();
}

/** The bytes the MAC covers: the authSafe ContentInfo's data OCTET STRING (BER chunks joined). */
function authSafeContent(contentInfo: Asn1): Buffer {
  const [type, explicit] = children(contentInfo);
  if (oidOf(type) !== forge.pki.oids['data']) {
    throw invalid('it is not in password integrity mode');
  }
  if (explicit?.tagClass !== Class.CONTEXT_SPECIFIC || explicit.type !== 0 || children(explicit).length !== 1) throw invalid('its content is malformed');
  const octets = children(explicit)[0]!;
  if (octets.tagClass !== Class.UNIVERSAL || octets.type !== Type.OCTETSTRING) throw invalid('its content is not an OCTET STRING');
  const flat = (n: Asn1): string => (typeof n.value === 'string' ? n.value : (n.value as Asn1[]).map(flat).join(''));
  return Buffer.from(flat(octets), 'binary');
}

/** UTF-16BE with a terminating NUL: the BMPString PKCS#12 derives keys from. */
function bmp(text: string): Buffer {
  const out = Buffer.alloc((text.length + 1) * 2);
  for (let i = 0; i < text.length; i++) out.writeUInt16BE(text.charCodeAt(i), i * 2);
  return out;
}

/** RFC 7292 appendix B.2 key derivation. */
export function pkcs12Kdf(hash: string, v: number, password: Buffer, salt: Buffer, id: 1 | 2 | 3, iterations: number, bytes: number): Buffer {
  const stretch = (src: Buffer) => {
    const out = Buffer.alloc(src.length === 0 ? 0 : v * Math.ceil(src.length / v));
    for (let i = 0; i < out.length; i++) out[i] = src[i % src.length]!;
    return out;
  };
  const D = Buffer.alloc(v, id);
  const I = Buffer.concat([stretch(salt), stretch(password)]);
  const blocks: Buffer[] = [];
  let produced = 0;
  while (produced < bytes) {
    let A = createHash(hash).update(D).update(I).digest();
    for (let r = 1; r < iterations; r++) A = createHash(hash).update(A).digest();
    blocks.push(A);
    produced += A.length;
    if (produced >= bytes) break;
    const B = stretch(A).subarray(0, v);
    // I_j = (I_j + B + 1) mod 2^(8v), for each v-byte block of I
    for (let j = 0; j < I.length; j += v) {
      let carry = 1;
      for (let k = v - 1; k >= 0; k--) {
        const sum = I[j + k]! + B[k]! + carry;
        I[j + k] = sum & 0xff;
        carry = sum >> 8;
      }
    }
  }
  const out = Buffer.concat(blocks).subarray(0, bytes);
  const result = Buffer.from(out);
  wipe(I, ...blocks);
  return result;
}

// ---- bounding the work a file may ask for ----------------------------------------------------

/**
 * Every iteration count in the file: the MAC's, and those of PBE parameters (PKCS#12 pbeParams,
 * PBKDF2-params). Each is a SEQUENCE in which a salt OCTET STRING is followed by an INTEGER; such
 * pairs are looked for everywhere, including inside OCTET STRINGs that hold DER.
 */
function capWork(pfx: Asn1): void {
  let total = 0;
  let nodes = 0;
  const visit = (n: Asn1, depth: number) => {
    if (++nodes > 20_000 || depth > 64) throw invalid('it is nested too deeply or holds too many elements');
    if (n.tagClass === Class.UNIVERSAL && n.type === Type.OCTETSTRING && typeof n.value === 'string') {
      let inner: Asn1 | undefined;
      try {
        inner = n.value.length > 0 ? fromDer(n.value) : undefined;
      } catch {
        inner = undefined;
      }
      if (inner) visit(inner, depth + 1);
      return;
    }
    const kids = children(n);
    for (let i = 0; i + 1 < kids.length; i++) {
      if (kids[i]!.type === Type.OCTETSTRING && kids[i]!.tagClass === Class.UNIVERSAL && kids[i + 1]!.type === Type.INTEGER && kids[i + 1]!.tagClass === Class.UNIVERSAL) {
        const count = integerOf(kids[i + 1]!);
        if (count > MAX_ITERATIONS) throw invalid(`it asks for ${count} key-derivation iterations (at most ${MAX_ITERATIONS} are accepted)`);
        total += count;
      }
    }
    if (total > MAX_TOTAL_ITERATIONS) throw invalid(`it asks for more than ${MAX_TOTAL_ITERATIONS} key-derivation iterations in all`);
    for (const k of kids) visit(k, depth + 1);
  };
  visit(pfx, 0);
}

/** A non-negative INTEGER up to 2^48; anything larger or negative counts as "too large". */
function integerOf(n: Asn1): number {
  const bytes = Buffer.from(typeof n.value === 'string' ? n.value : '', 'binary');
  if (bytes.length === 0) throw invalid('it holds an empty INTEGER');
  if (bytes[0]! & 0x80) return Number.MAX_SAFE_INTEGER;
  const trimmed = bytes.subarray(bytes.findIndex((b) => b !== 0) === -1 ? bytes.length : bytes.findIndex((b) => b !== 0));
  return trimmed.length > 6 ? Number.MAX_SAFE_INTEGER : trimmed.length === 0 ? 0 : trimmed.readUIntBE(0, trimmed.length);
}
