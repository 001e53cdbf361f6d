// The public half of a guardian as a file another lab machine imports: ShieldLab's JSON, or a plain
// PEM bundle of the two certificates (what certutil/openssl produce), told apart by subject or key usage.
import { ShieldError } from '../errors.ts';
import { checkCertificatePair, parseCertificate, roleOf, validateGuardianName, type GuardianCerts } from './guardian.ts';

export const PUBLIC_GUARDIAN_FORMAT = 'shieldlab-guardian/1';
export const MAX_PUBLIC_GUARDIAN_BYTES = 256 * 1024;

export interface PublicGuardian {
  name: string;
  /** from the certificate subjects */
  host: string;
  certs: GuardianCerts;
}

interface PublicGuardianFile {
  format: typeof PUBLIC_GUARDIAN_FORMAT;
  name: string;
  signingCertificate: string;
  encryptionCertificate: string;
}

const invalid = (why: string) => new ShieldError('guardian_invalid', `Not a usable guardian file: ${why}.`);

export function exportPublicGuardian(guardian: { name: string; certs: GuardianCerts }): string {
  validateGuardianName(guardian.name);
  const pair = checkCertificatePair(guardian.certs.signingCertPem, guardian.certs.encryptionCertPem);
  const file: PublicGuardianFile = {
    format: PUBLIC_GUARDIAN_FORMAT,
    name: guardian.name,
    signingCertificate: pair.certs.signingCertPem,
    encryptionCertificate: pair.certs.encryptionCertPem,
  };
  return `${JSON.stringify(file, null, 2)}\n`;
}

/** A ShieldLab guardian file or a PEM bundle of exactly two certificates; guardian_invalid otherwise. */
export function parsePublicGuardian(bytes: Buffer | string): PublicGuardian {
  const size = typeof bytes === 'string' ? Buffer.byteLength(bytes) : bytes.length;
  if (size > MAX_PUBLIC_GUARDIAN_BYTES) throw invalid(`it is larger than ${MAX_PUBLIC_GUARDIAN_BYTES} bytes`);
  const text = (typeof bytes === 'string' ? bytes : bytes.toString('utf8')).replace(/^\uFEFF/, '').trim();
  if (text.startsWith('{')) return fromJson(text);
  if (text.includes('-----BEGIN')) return fromPemBundle(text);
  throw invalid('it is neither a ShieldLab guardian file nor PEM certificates');
}

function fromJson(text: string): PublicGuardian {
  let file: Partial<Record<keyof PublicGuardianFile, unknown>>;
  try {
    file = JSON.parse(text) as typeof file;
  } catch {
    throw invalid('it is not valid JSON');
  }
  if (file === null || typeof file !== 'object' || Array.isArray(file)) throw invalid('it is not a JSON object');
  if (file.format !== PUBLIC_GUARDIAN_FORMAT) throw invalid(`its format is not "${PUBLIC_GUARDIAN_FORMAT}"`);
  if (typeof file.signingCertificate !== 'string' || typeof file.encryptionCertificate !== 'string') throw invalid('it lacks the two certificates');
  const name = fileName(file.name);
  const pair = checkCertificatePair(onePem(file.signingCertificate, 'signing'), onePem(file.encryptionCertificate, 'encryption'));
  return { name, host: pair.host, certs: pair.certs };
}

function fromPemBundle(text: string): PublicGuardian {
  const blocks = [...text.matchAll(/-----BEGIN ([A-Z0-9 ]+)-----[\s\S]*?-----END \1-----/g)];
  const kinds = blocks.map((m) => m[1]);
  if (kinds.some((k) => k !== 'CERTIFICATE')) {
    throw invalid(kinds.some((k) => k?.includes('PRIVATE KEY')) ? 'it holds a private key (import private keys from PFX files instead)' : 'it holds PEM blocks other than certificates');
  }
  if (blocks.length !== 2) throw invalid(`it holds ${blocks.length} certificate(s), not 2`);
  const certs = blocks.map((m) => parseCertificate(m[0]));
  const roles = certs.map(roleOf);
  const signing = certs[roles.indexOf('signing')];
  const encryption = certs[roles.indexOf('encryption')];
  if (!signing || !encryption) throw invalid('it must hold one signing and one encryption certificate');
  const pair = checkCertificatePair(signing.raw, encryption.raw);
  return { name: pair.name, host: pair.host, certs: pair.certs };
}

function fileName(name: unknown): string {
  try {
    return validateGuardianName(name);
  } catch (err) {
    throw invalid(`its name is unusable (${(err as Error).message})`);
  }
}

/** One certificate PEM and nothing else. */
function onePem(pem: string, role: string): string {
  const blocks = pem.match(/-----BEGIN [A-Z0-9 ]+-----/g) ?? [];
  if (blocks.length !== 1 || blocks[0] !== '-----BEGIN CERTIFICATE-----') throw invalid(`its ${role} certificate is not one PEM certificate`);
  return pem;
}
