// The few node-forge entry points used here that @types/node-forge leaves out or types too narrowly.
// forge is for X.509 structure and PKCS#12 only; keys and bulk crypto stay with node:crypto.
import forge from 'node-forge';

export { forge };
export type Asn1 = forge.asn1.Asn1;

interface DerOptions {
  strict?: boolean;
  parseAllBytes?: boolean;
  decodeBitStrings?: boolean;
}

/** Strict DER, every byte consumed, BIT STRINGs left as bytes. */
export function fromDer(bytes: string | Buffer): Asn1 {
  const decode = forge.asn1.fromDer as unknown as (b: string, o: DerOptions) => Asn1;
  return decode(typeof bytes === 'string' ? bytes : bytes.toString('binary'), { strict: true, parseAllBytes: true, decodeBitStrings: false });
}

export function toDer(node: Asn1): Buffer {
  return Buffer.from(forge.asn1.toDer(node).getBytes(), 'binary');
}

export function getTBSCertificate(cert: forge.pki.Certificate): Asn1 {
  return (forge.pki as unknown as { getTBSCertificate(c: forge.pki.Certificate): Asn1 }).getTBSCertificate(cert);
}

/** A subject/issuer attribute; forge encodes a UTF8String value itself. */
export function utf8Attribute(shortName: string, value: string): forge.pki.CertificateField {
  return { shortName, value, valueTagClass: forge.asn1.Type.UTF8 } as unknown as forge.pki.CertificateField;
}

export const children = (n: Asn1 | undefined): Asn1[] => (Array.isArray(n?.value) ? (n.value as Asn1[]) : []);
export const oidOf = (n: Asn1 | undefined): string | null =>
  n?.tagClass === forge.asn1.Class.UNIVERSAL && n.type === forge.asn1.Type.OID && typeof n.value === 'string' ? forge.asn1.derToOid(n.value) : null;
