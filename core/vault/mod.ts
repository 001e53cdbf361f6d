// Public face of the vault.
export { Vault, VAULT_FILE, type Protection, type UnlockMethod, type VaultStatus } from './vault.ts';
export { writeBackup, readBackupHeader, restoreBackup, type BackupHeader } from './backup.ts';
export { OsKeychain, KEYCHAIN_SERVICE, type Keychain } from './keychain.ts';
export { RECORD_KINDS, type RecordKind, type OpenedRecord } from './records.ts';
export type { AuditEntry, AuditProblem } from './audit.ts';
