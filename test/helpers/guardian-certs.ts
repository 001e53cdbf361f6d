// Guardians made with the openssl CLI (an independent tool), for key protector and release tests.
import { execFileSync } from 'node:child_process';
import { createPrivateKey, generateKeyPairSync } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { HeldGuardian } from '../../core/guardian/key-protector.ts';
import { tempDir } from './home.ts';

function selfSigned(dir: string, cn: string, usage: string, keyPem: string): string {
  const keyFile = join(dir, `${usage}.key`);
  writeFileSync(keyFile, keyPem, { mode: 0o600 });
  return execFileSync('openssl', ['req', '-x509', '-new', '-key', keyFile, '-subj', `/CN=${cn}`, '-days', '3650', '-sha256', '-addext', `keyUsage=critical,${usage}`, '-addext', 'basicConstraints=CA:FALSE'], { encoding: 'utf8' });
}

export function opensslGuardian(name: string, host = 'testhost'): HeldGuardian {
  const t = tempDir('shieldlab-cert-');
  try {
    const sk = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
    const ek = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
    return {
      name,
      signingCertPem: selfSigned(t.dir, `Shielded VM Signing Certificate (${name}) (${host})`, 'digitalSignature', sk),
      encryptionCertPem: selfSigned(t.dir, `Shielded VM Encryption Certificate (${name}) (${host})`, 'keyEncipherment,dataEncipherment', ek),
      keys: { signingKey: createPrivateKey(sk), encryptionKey: createPrivateKey(ek) },
    };
  } finally {
    t.cleanup();
  }
}

/** Public half only. */
export function publicOf(g: HeldGuardian): { name: string; signingCertPem: string; encryptionCertPem: string } {
  return { name: g.name, signingCertPem: g.signingCertPem, encryptionCertPem: g.encryptionCertPem };
}
