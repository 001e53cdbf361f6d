// Guardians: a signing and an encryption certificate, as Hyper-V's New-HgsGuardian -GenerateCertificates
// makes them. Keys come from node:crypto; node-forge only assembles the X.509 structure, and the
// signature over it is made by node:crypto, so no private key ever enters forge here.
// Parsing goes through node:crypto's X509Certificate; the key usage bits, which it does not expose,
// are read from the DER with forge's ASN.1 reader.
import { createHash, createPublicKey, generateKeyPairSync, randomBytes, sign, X509Certificate, type KeyObject } from 'node:crypto';
import { children, forge, fromDer, getTBSCertificate, oidOf, toDer, utf8Attribute } from './forge.ts';
import { ShieldError } from '../errors.ts';

export interface GuardianCerts {
  signingCertPem: string;
  encryptionCertPem: string;
}

/** PKCS#8 PEM. Secret: keep these short-lived and never log them. */
export interface GuardianKeys {
  signingKeyPem: string;
  encryptionKeyPem: string;
}

export interface GeneratedGuardian {
  certs: GuardianCerts;
  keys: GuardianKeys;
}

export interface CertInfo {
  subject: string;
  issuer: string;
  /** uppercase hex, as certutil and the Windows certificate dialog show it */
  serial: string;
  /** SHA-1 of the DER, uppercase hex without separators: Windows' Thumbprint */
  thumbprint: string;
  /** SHA-256 of the DER, uppercase hex */
  sha256: string;
  /** ISO 8601 */
  notBefore: string;
  notAfter: string;
  /** RFC 5280 names (digitalSignature, keyEncipherment, …); empty when the extension is absent */
  keyUsage: string[];
  publicKeyBits: number;
}

export type CertRole = 'signing' | 'encryption';

export interface ExpiryWarning {
  level: 'expired' | 'soon';
  /** whole days until notAfter; 0 or negative once expired */
  daysLeft: number;
}

export const MIN_RSA_BITS = 2048;
export const SOON_DAYS = 90;
const DAY_MS = 86_400_000;
const MAX_NAME_CHARS = 64;

const ROLE_TITLE: Record<CertRole, string> = { signing: 'Signing', encryption: 'Encryption' };
/** The key usages Hyper-V puts on generated guardian certificates, and the one each role needs. */
const ROLE_USAGE: Record<CertRole, { make: readonly KeyUsage[]; need: KeyUsage }> = {
  signing: { make: ['digitalSignature'], need: 'digitalSignature' },
  encryption: { make: ['keyEncipherment', 'dataEncipherment'], need: 'keyEncipherment' },
};

const KEY_USAGE_BITS = [
  'digitalSignature',
  'nonRepudiation',
  'keyEncipherment',
  'dataEncipherment',
  'keyAgreement',
  'keyCertSign',
  'cRLSign',
  'encipherOnly',
  'decipherOnly',
] as const;
type KeyUsage = (typeof KEY_USAGE_BITS)[number];

// ---- names and subjects ------------------------------------------------------------------------

/**
 * A guardian (or host) name as it appears in `CN=Shielded VM … Certificate (NAME) (HOST)`:
 * 1–64 characters, no parentheses (they delimit the fields), no control, format or lone surrogate
 * characters, no leading or trailing space. Returns the name; throws invalid_argument otherwise.
 */
export function validateGuardianName(name: unknown, what: 'guardian name' | 'host name' = 'guardian name'): string {
  const fail = (why: string) => new ShieldError('invalid_argument', `Invalid ${what}: ${why}.`, { details: { field: what === 'host name' ? 'host' : 'name' } });
  if (typeof name !== 'string') throw fail('it must be text');
  const chars = [...name].length;
  if (chars < 1 || chars > MAX_NAME_CHARS) throw fail(`it must be 1–${MAX_NAME_CHARS} characters long`);
  if (/[()]/.test(name)) throw fail('parentheses are not allowed (they delimit the name in the certificate subject)');
  if (/[\p{Cc}\p{Cf}\p{Cs}]/u.test(name)) throw fail('control and invisible formatting characters are not allowed');
  if (name.trim() !== name) throw fail('it may not start or end with a space');
  return name;
}

export function guardianSubject(role: CertRole, name: string, host: string): string {
  return `Shielded VM ${ROLE_TITLE[role]} Certificate (${name}) (${host})`;
}

const SUBJECT_PATTERN = /^Shielded VM (Signing|Encryption) Certificate \(([^()]+)\) \(([^()]+)\)$/;

/** The Hyper-V fields of a certificate's common name, or null when it does not follow the pattern. */
export function parseGuardianSubject(subject: string): { role: CertRole; name: string; host: string } | null {
  const m = SUBJECT_PATTERN.exec(commonName(subject) ?? '');
  if (!m) return null;
  return { role: m[1] === 'Signing' ? 'signing' : 'encryption', name: m[2]!, host: m[3]! };
}

/** The CN of a subject as node:crypto prints it (one RDN a line, RFC 2253 escapes). */
function commonName(subject: string): string | null {
  const line = subject.split('\n').find((l) => l.startsWith('CN='));
  return line === undefined ? null : line.slice(3).replace(/\\(.)/g, '$1');
}

// ---- generation -------------------------------------------------------------------------------

export interface GenerateOptions {
  host: string;
  validityYears?: number;
  now?: Date;
  modulusLength?: number;
}

/** Two RSA key pairs in self-signed certificates with Hyper-V's subjects and key usages. */
export function generateGuardian(name: string, opts: GenerateOptions): GeneratedGuardian {
  validateGuardianName(name);
  validateGuardianName(opts.host, 'host name');
  const years = opts.validityYears ?? 10;
  if (!Number.isInteger(years) || years < 1 || years > 100) {
    throw new ShieldError('invalid_argument', 'Validity must be a whole number of years from 1 to 100.', { details: { field: 'validityYears' } });
  }
  const modulusLength = opts.modulusLength ?? 2048;
  if (!Number.isInteger(modulusLength) || modulusLength < MIN_RSA_BITS || modulusLength > 16384 || modulusLength % 8 !== 0) {
    throw new ShieldError('invalid_argument', `RSA keys must be ${MIN_RSA_BITS}–16384 bits, a multiple of 8.`, { details: { field: 'modulusLength' } });
  }
  const notBefore = new Date(Math.floor((opts.now ?? new Date()).getTime() / 1000) * 1000);
  const notAfter = new Date(notBefore);
  notAfter.setUTCFullYear(notAfter.getUTCFullYear() + years);

  const make = (role: CertRole) => {
    const { publicKey, privateKey } = generateKeyPairSync('rsa', { modulusLength, publicExponent: 0x10001 });
    const certPem = selfSignedCertificate({ subject: guardianSubject(role, name, opts.host), usage: ROLE_USAGE[role].make, publicKey, privateKey, notBefore, notAfter });
    return { certPem, keyPem: privateKey.export({ type: 'pkcs8', format: 'pem' }) as string };
  };
  const signing = make('signing');
  const encryption = make('encryption');
  return {
    certs: { signingCertPem: signing.certPem, encryptionCertPem: encryption.certPem },
    keys: { signingKeyPem: signing.keyPem, encryptionKeyPem: encryption.keyPem },
  };
}

function selfSignedCertificate(args: {
  subject: string;
  usage: readonly KeyUsage[];
  publicKey: KeyObject;
  privateKey: KeyObject;
  notBefore: Date;
  notAfter: Date;
}): string {
  const cert = forge.pki.createCertificate();
  cert.publicKey = forge.pki.publicKeyFromPem(args.publicKey.export({ type: 'spki', format: 'pem' }) as string);
  // 16 random bytes, top bits 01: positive and minimally encoded (DER forbids a leading 0x00).
  const serial = randomBytes(16);
  serial[0] = (serial[0]! & 0x3f) | 0x40;
  cert.serialNumber = serial.toString('hex');
  cert.validity.notBefore = args.notBefore;
  cert.validity.notAfter = args.notAfter;
  cert.setSubject([utf8Attribute('CN', args.subject)]);
  cert.setIssuer([utf8Attribute('CN', args.subject)]);
  const keyUsage: Record<string, unknown> = { name: 'keyUsage', critical: true };
  for (const u of args.usage) keyUsage[u] = true;
  cert.setExtensions([{ name: 'basicConstraints', cA: false }, keyUsage, { name: 'subjectKeyIdentifier' }]);
  // Sign the TBSCertificate with node:crypto instead of forge's cert.sign().
  const oid = forge.pki.oids['sha256WithRSAEncryption']!;
  cert.siginfo.algorithmOid = oid;
  cert.signatureOid = oid;
  const tbs = toDer(getTBSCertificate(cert));
  cert.signature = sign('sha256', tbs, args.privateKey).toString('binary');
  return forge.pki.certificateToPem(cert).replace(/\r\n/g, '\n');
}

// ---- parsing ----------------------------------------------------------------------------------

/** Parses one PEM certificate with node:crypto; guardian_invalid when it is not one. */
export function parseCertificate(pem: string | Buffer): X509Certificate {
  try {
    const x = new X509Certificate(pem);
    // node:crypto decodes some parts lazily: touch every one used here, so a damaged public key
    // or date fails now, typed, rather than later.
    void [x.publicKey.asymmetricKeyDetails, x.validFromDate.toISOString(), x.validToDate.toISOString(), x.subject, x.issuer, x.serialNumber];
    return x;
  } catch {
    throw new ShieldError('guardian_invalid', 'Not a readable X.509 certificate.');
  }
}

export function describeCertificate(pem: string | Buffer | X509Certificate): CertInfo {
  const x = pem instanceof X509Certificate ? pem : parseCertificate(pem);
  const details = x.publicKey.asymmetricKeyDetails;
  return {
    subject: x.subject.split('\n').reverse().join(', '),
    issuer: x.issuer.split('\n').reverse().join(', '),
    serial: x.serialNumber.toUpperCase(),
    thumbprint: createHash('sha1').update(x.raw).digest('hex').toUpperCase(),
    sha256: createHash('sha256').update(x.raw).digest('hex').toUpperCase(),
    notBefore: x.validFromDate.toISOString(),
    notAfter: x.validToDate.toISOString(),
    keyUsage: keyUsageOf(x.raw),
    publicKeyBits: details?.modulusLength ?? 0,
  };
}

/** The keyUsage extension's bits by name; [] when absent. */
function keyUsageOf(der: Buffer): string[] {
  try {
    const tbs = children(fromDer(der))[0];
    const explicit = children(tbs).find((n) => n.tagClass === forge.asn1.Class.CONTEXT_SPECIFIC && n.type === 3);
    for (const ext of children(children(explicit)[0])) {
      const parts = children(ext);
      if (oidOf(parts[0]) !== '2.5.29.15') continue;
      const bits = fromDer(parts[parts.length - 1]!.value as string).value;
      if (typeof bits !== 'string') return [];
      const bytes = Buffer.from(bits, 'binary').subarray(1); // first byte: unused bit count
      return KEY_USAGE_BITS.filter((_, i) => ((bytes[i >> 3] ?? 0) & (0x80 >> (i & 7))) !== 0);
    }
  } catch {
    // node:crypto already accepted this DER; a keyUsage we cannot read counts as none.
  }
  return [];
}

// ---- checks -----------------------------------------------------------------------------------

export interface CheckedPair {
  name: string;
  host: string;
  certs: GuardianCerts;
  signing: X509Certificate;
  encryption: X509Certificate;
}

/** The role a certificate plays, from its Hyper-V subject or else its key usage. */
export function roleOf(x: X509Certificate): CertRole | null {
  const fromSubject = parseGuardianSubject(x.subject)?.role;
  if (fromSubject) return fromSubject;
  const usage = keyUsageOf(x.raw);
  if (usage.includes('keyEncipherment')) return 'encryption';
  if (usage.includes('digitalSignature')) return 'signing';
  return null;
}

/**
 * Checks a signing + encryption certificate pair: each parses, is RSA ≥ 2048 with the key usage
 * its role needs and a valid self-signature when self-issued, and both name the same guardian
 * and host in Hyper-V's subject pattern. Returns canonical PEMs (re-encoded from the DER).
 */
export function checkCertificatePair(signingPem: string | Buffer, encryptionPem: string | Buffer): CheckedPair {
  const signing = parseCertificate(signingPem);
  const encryption = parseCertificate(encryptionPem);
  checkRole(signing, 'signing');
  checkRole(encryption, 'encryption');
  const s = parseGuardianSubject(signing.subject);
  const e = parseGuardianSubject(encryption.subject);
  if (!s || !e) {
    throw new ShieldError('guardian_invalid', 'Guardian certificates must have Hyper-V subjects: "CN=Shielded VM Signing|Encryption Certificate (NAME) (HOST)".');
  }
  if (s.name !== e.name || s.host !== e.host) {
    throw new ShieldError('guardian_invalid', `The certificates belong to different guardians: "${s.name}" on "${s.host}" and "${e.name}" on "${e.host}".`);
  }
  try {
    validateGuardianName(s.name);
    validateGuardianName(s.host, 'host name');
  } catch (err) {
    throw new ShieldError('guardian_invalid', `The certificate subject holds an unusable name: ${(err as Error).message}`);
  }
  if (signing.raw.equals(encryption.raw) || signing.publicKey.equals(encryption.publicKey)) {
    throw new ShieldError('guardian_invalid', 'The signing and encryption certificates must have different keys.');
  }
  return { name: s.name, host: s.host, certs: { signingCertPem: toPem(signing), encryptionCertPem: toPem(encryption) }, signing, encryption };
}

function checkRole(x: X509Certificate, role: CertRole): void {
  const title = `${ROLE_TITLE[role].toLowerCase()} certificate`;
  const subjectRole = parseGuardianSubject(x.subject)?.role;
  if (subjectRole !== undefined && subjectRole !== role) {
    throw new ShieldError('guardian_invalid', `The ${title} is a ${subjectRole} certificate (by its subject).`);
  }
  const key = x.publicKey;
  const bits = key.asymmetricKeyDetails?.modulusLength ?? 0;
  if (key.asymmetricKeyType !== 'rsa' || bits < MIN_RSA_BITS) {
    const has = key.asymmetricKeyType === 'rsa' ? `${bits} bits` : `a ${key.asymmetricKeyType ?? 'unknown'} key`;
    throw new ShieldError('guardian_invalid', `The ${title} must hold an RSA key of at least ${MIN_RSA_BITS} bits (it has ${has}).`);
  }
  const usage = keyUsageOf(x.raw);
  const need = ROLE_USAGE[role].need;
  if (!usage.includes(need)) {
    throw new ShieldError('guardian_invalid', `The ${title} lacks the ${need} key usage (it has: ${usage.join(', ') || 'none'}).`);
  }
  if (x.subject === x.issuer && !x.verify(key)) {
    throw new ShieldError('guardian_invalid', `The ${title} is self-issued but its signature does not verify.`);
  }
}

export function toPem(x: X509Certificate): string {
  const b64 = x.raw.toString('base64').replace(/.{64}/g, '$&\n').replace(/\n$/, '');
  return `-----BEGIN CERTIFICATE-----\n${b64}\n-----END CERTIFICATE-----\n`;
}

/** Does this private key belong to this certificate? (compares the public halves) */
export function keyMatchesCertificate(x: X509Certificate, privateKey: KeyObject): boolean {
  return createPublicKey(privateKey).equals(x.publicKey);
}

// ---- expiry -----------------------------------------------------------------------------------

export function expiryWarning(info: Pick<CertInfo, 'notAfter'>, now: Date = new Date()): ExpiryWarning | null {
  const left = Date.parse(info.notAfter) - now.getTime();
  if (left <= 0) return { level: 'expired', daysLeft: Math.ceil(left / DAY_MS) };
  const daysLeft = Math.floor(left / DAY_MS);
  return daysLeft < SOON_DAYS ? { level: 'soon', daysLeft } : null;
}

/** The more urgent of several warnings (expired before soon, fewer days first). */
export function worstWarning(...warnings: (ExpiryWarning | null)[]): ExpiryWarning | null {
  let worst: ExpiryWarning | null = null;
  for (const w of warnings) {
    if (w && (!worst || w.daysLeft < worst.daysLeft)) worst = w;
  }
  return worst;
}
