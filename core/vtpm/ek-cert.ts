// EK certificates for our vTPMs, issued by a CA that the owner guardian controls.
//
// The CA is the guardian's own signing key, presented in a second certificate: "ShieldLab vTPM EK
// CA (<guardian>)", self-signed, CA:TRUE with keyCertSign. The guardian's signing certificate
// itself is CA:FALSE with digitalSignature only (as Hyper-V makes it), so chain checkers would
// refuse it as an issuer; a separate CA key would be one more secret for the vault to hold and
// back up. This certificate needs no storage: its serial, dates and key come from the guardian's
// signing certificate and RSA PKCS#1 v1.5 signatures are deterministic, so it is rebuilt byte for
// byte whenever needed, and anyone with the guardian's public file can see it holds the same key.
import { X509Certificate, createHash, createPublicKey, randomBytes, sign, type KeyObject } from 'node:crypto';
import { ShieldError } from '../errors.ts';
import { forge, getTBSCertificate, toDer, utf8Attribute } from '../guardian/forge.ts';

/** The owner guardian as key protectors hold it (HeldGuardian fits). */
export interface EkCaOwner {
  name: string;
  signingCertPem: string;
  keys: { signingKey: KeyObject };
}

/** tcg-kp-EKCertificate (TCG EK Credential Profile §3.2.16). */
const TCG_KP_EK_CERTIFICATE = '2.23.133.8.1';

function caSubject(owner: EkCaOwner): string {
  return `ShieldLab vTPM EK CA (${owner.name})`;
}

function positiveSerial(bytes: Buffer): string {
  const s = Buffer.from(bytes.subarray(0, 16));
  s[0] = (s[0]! & 0x3f) | 0x40; // positive, minimally encoded
  return s.toString('hex');
}

function signWith(cert: forge.pki.Certificate, key: KeyObject): void {
  const oid = forge.pki.oids['sha256WithRSAEncryption']!;
  cert.siginfo.algorithmOid = oid;
  cert.signatureOid = oid;
  cert.signature = sign('sha256', toDer(getTBSCertificate(cert)), key).toString('binary');
}

function ownerCert(owner: EkCaOwner): X509Certificate {
  let x: X509Certificate;
  try {
    x = new X509Certificate(owner.signingCertPem);
  } catch {
    throw new ShieldError('guardian_invalid', `Guardian "${owner.name}": its signing certificate is not readable.`);
  }
  const pub = createPublicKey(owner.keys.signingKey);
  if (pub.asymmetricKeyType !== 'rsa' || !x.publicKey.equals(pub)) {
    throw new ShieldError('guardian_invalid', `Guardian "${owner.name}": the signing key is not the RSA key of its signing certificate.`);
  }
  return x;
}

/** The owner guardian's vTPM EK CA certificate (PEM); the same bytes every time. */
export function ekCaCertificate(owner: EkCaOwner): string {
  const x = ownerCert(owner);
  const cert = forge.pki.createCertificate();
  cert.publicKey = forge.pki.publicKeyFromPem(x.publicKey.export({ type: 'spki', format: 'pem' }) as string);
  cert.serialNumber = positiveSerial(createHash('sha256').update('ShieldLab vTPM EK CA').update(x.raw).digest());
  cert.validity.notBefore = x.validFromDate;
  cert.validity.notAfter = x.validToDate;
  const name = [utf8Attribute('CN', caSubject(owner))];
  cert.setSubject(name);
  cert.setIssuer(name);
  cert.setExtensions([
    { name: 'basicConstraints', cA: true, pathLenConstraint: 0, critical: true },
    { name: 'keyUsage', keyCertSign: true, cRLSign: true, critical: true },
    { name: 'subjectKeyIdentifier' },
  ]);
  signWith(cert, owner.keys.signingKey);
  return forge.pki.certificateToPem(cert).replace(/\r\n/g, '\n');
}

export interface EkCertificateOptions {
  /** The EK's public key (SPKI PEM, or a KeyObject): publicKeyPem(ek.outPublic). */
  ekPublic: string | KeyObject;
  vmName: string;
  now?: Date;
}

/** An EK certificate (DER) for `ekPublic`, issued by the owner's vTPM EK CA; valid until the CA expires. */
export function issueEkCertificate(owner: EkCaOwner, opts: EkCertificateOptions): Buffer {
  const ca = ownerCert(owner);
  const caPub = forge.pki.publicKeyFromPem(ca.publicKey.export({ type: 'spki', format: 'pem' }) as string);
  const ekPem = typeof opts.ekPublic === 'string' ? opts.ekPublic : (opts.ekPublic.export({ type: 'spki', format: 'pem' }) as string);
  const cert = forge.pki.createCertificate();
  cert.publicKey = forge.pki.publicKeyFromPem(ekPem);
  cert.serialNumber = positiveSerial(randomBytes(16));
  const notBefore = new Date(Math.floor((opts.now ?? new Date()).getTime() / 1000) * 1000);
  if (notBefore >= ca.validToDate) throw new ShieldError('guardian_invalid', `Guardian "${owner.name}": its signing certificate has expired; it cannot issue EK certificates.`);
  cert.validity.notBefore = notBefore;
  cert.validity.notAfter = ca.validToDate;
  cert.setSubject([utf8Attribute('CN', `ShieldLab vTPM EK ${opts.vmName}`)]);
  cert.setIssuer([utf8Attribute('CN', caSubject(owner))]);
  const ekuValue = forge.asn1.create(forge.asn1.Class.UNIVERSAL, forge.asn1.Type.SEQUENCE, true, [
    forge.asn1.create(forge.asn1.Class.UNIVERSAL, forge.asn1.Type.OID, false, forge.asn1.oidToDer(TCG_KP_EK_CERTIFICATE).getBytes()),
  ]);
  cert.setExtensions([
    { name: 'basicConstraints', cA: false, critical: true },
    // An EK decrypts (credential activation); it never signs.
    { name: 'keyUsage', keyEncipherment: true, critical: true },
    { id: '2.5.29.37', value: forge.asn1.toDer(ekuValue).getBytes() },
    { name: 'authorityKeyIdentifier', keyIdentifier: forge.pki.getPublicKeyFingerprint(caPub, { type: 'RSAPublicKey' }).getBytes() },
  ]);
  signWith(cert, owner.keys.signingKey);
  return toDer(forge.pki.certificateToAsn1(cert));
}
