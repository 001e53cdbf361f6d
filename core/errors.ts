// Typed, serialisable errors. The same `code` reaches the CLI (exit status, --json) and the UI.

export const ERROR_CODES = [
  'usage',
  'invalid_argument',
  'not_found',
  'already_exists',
  'vault_not_initialised',
  'vault_exists',
  'locked',
  'wrong_passphrase',
  'keychain_unavailable',
  'keychain_entry_missing',
  'vault_corrupt',
  'vault_busy',
  'vault_too_new',
  'record_tampered',
  'audit_broken',
  'backup_invalid',
  'backup_wrong_key',
  'share_invalid',
  'shares_insufficient',
  'shares_mismatch',
  'recovery_not_configured',
  'wrong_password',
  'pfx_invalid',
  'guardian_invalid',
  'guardian_no_private_key',
  'guardian_in_use',
  'guardian_not_backed_up',
  'home_not_empty',
  'disk_full',
  'io_error',
  'kp_invalid',
  'kp_signature_invalid',
  'kp_untrusted_owner',
  'kp_not_owner',
  'kp_unwrap_denied',
  'release_denied',
  'health_certificate_invalid',
  'attestation_failed',
  'host_not_registered',
  'vhdx_corrupt',
  'vhdx_unsupported',
  'vhdx_parent_invalid',
  'shield_invalid',
  'shield_key_mismatch',
  'shield_tampered',
  'shield_rollback',
  'integrity_violation',
  'tpm_unavailable',
  'tpm_error',
  'tpm_malformed',
  'eventlog_invalid',
  'vtpm_state_invalid',
  'vm_running',
  'secure_boot_unavailable',
  'cancelled',
  'unauthorized',
  'forbidden',
  'internal',
] as const;

export type ErrorCode = (typeof ERROR_CODES)[number];

export interface SerializedError {
  code: ErrorCode;
  message: string;
  details?: Record<string, unknown>;
}

export class ShieldError extends Error {
  readonly code: ErrorCode;
  readonly details: Record<string, unknown> | undefined;

  constructor(code: ErrorCode, message: string, options?: { details?: Record<string, unknown>; cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'ShieldError';
    this.code = code;
    this.details = options?.details;
  }

  toJSON(): SerializedError {
    return this.details === undefined
      ? { code: this.code, message: this.message }
      : { code: this.code, message: this.message, details: this.details };
  }
}

export function isErrorCode(value: unknown): value is ErrorCode {
  return typeof value === 'string' && (ERROR_CODES as readonly string[]).includes(value);
}

/** Any thrown value as a ShieldError; unknown failures become `internal` without leaking internals. */
export function toShieldError(err: unknown): ShieldError {
  if (err instanceof ShieldError) return err;
  const e = err as { code?: unknown; message?: unknown } | null;
  const sysCode = typeof e?.code === 'string' ? e.code : '';
  // SQLITE_IOERR_SHMSIZE: SQLite could not grow the -shm file, which on a full disk is the first thing to fail.
  if (sysCode === 'ENOSPC' || sysCode === 'SQLITE_FULL' || sysCode === 'SQLITE_IOERR_SHMSIZE') {
    return new ShieldError('disk_full', 'The disk is full: nothing was written.', { cause: err });
  }
  if (sysCode === 'SQLITE_BUSY' || sysCode === 'SQLITE_LOCKED' || sysCode === 'SQLITE_BUSY_SNAPSHOT') {
    return new ShieldError('vault_busy', 'Another process is writing to the vault; try again.', { cause: err });
  }
  if (sysCode.startsWith('SQLITE_CORRUPT') || sysCode === 'SQLITE_NOTADB') {
    return new ShieldError('vault_corrupt', 'The vault database file is damaged or is not a vault.', { cause: err });
  }
  if (sysCode === 'ENOENT') {
    return new ShieldError('not_found', `File not found: ${String((err as { path?: string }).path ?? '')}`, { cause: err });
  }
  if (sysCode === 'EACCES' || sysCode === 'EPERM' || sysCode === 'EISDIR' || sysCode === 'ENOTDIR') {
    return new ShieldError('io_error', `Cannot access ${String((err as { path?: string }).path ?? 'a file')} (${sysCode}).`, { cause: err });
  }
  return new ShieldError('internal', 'Internal error (see the log for details).', { cause: err });
}
