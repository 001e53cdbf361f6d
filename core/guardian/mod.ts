// Public face of guardians: certificates, files, and the store in the vault.
export {
  generateGuardian,
  describeCertificate,
  expiryWarning,
  validateGuardianName,
  MIN_RSA_BITS,
  SOON_DAYS,
  type CertInfo,
  type ExpiryWarning,
  type GeneratedGuardian,
  type GenerateOptions,
  type GuardianCerts,
  type GuardianKeys,
} from './guardian.ts';
export { exportPublicGuardian, parsePublicGuardian, PUBLIC_GUARDIAN_FORMAT, type PublicGuardian } from './public-file.ts';
export { exportGuardianPfx, importGuardianPfx, type GuardianPfx, type Password } from './pfx.ts';
export { GuardianStore, defaultGuardianHost, type GuardianInfo, type GuardianPrivateKeys, type GuardianSource, type GuardianStoreOptions } from './store.ts';
