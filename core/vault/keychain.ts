// The OS keychain behind a narrow port. Linux is pinned to the Secret Service: if it is missing we
// fail with `keychain_unavailable` — never a silent fallback to keyutils or memory.
import { AsyncEntry } from '@napi-rs/keyring';
import { ShieldError } from '../errors.ts';

export interface Keychain {
  /** Human-readable name of the backing store, for status output. */
  readonly store: string;
  get(account: string): Promise<Buffer | null>;
  set(account: string, secret: Buffer): Promise<void>;
  delete(account: string): Promise<boolean>;
}

export const KEYCHAIN_SERVICE = 'ShieldLab';

function storeName(): string {
  switch (process.platform) {
    case 'linux':
      return 'Secret Service';
    case 'darwin':
      return 'macOS Keychain';
    case 'win32':
      return 'Windows Credential Manager';
    default:
      return 'OS keychain';
  }
}

function unavailable(err: unknown): ShieldError {
  const reason = err instanceof Error ? err.message.split('\n')[0] : String(err);
  return new ShieldError(
    'keychain_unavailable',
    `The OS keychain (${storeName()}) is unavailable: ${reason}. Use a passphrase instead (--passphrase-file F, and --no-keychain when creating a vault).`,
    { details: { store: storeName() } },
  );
}

export class OsKeychain implements Keychain {
  readonly store = storeName();

  private entry(account: string): AsyncEntry {
    return new AsyncEntry(KEYCHAIN_SERVICE, account, { linux: { store: 'secret-service' } });
  }

  async get(account: string): Promise<Buffer | null> {
    try {
      const secret = await this.entry(account).getSecret();
      if (secret === null) return null;
      const buf = Buffer.from(secret);
      secret.fill(0);
      return buf;
    } catch (err) {
      throw unavailable(err);
    }
  }

  async set(account: string, secret: Buffer): Promise<void> {
    try {
      await this.entry(account).setSecret(secret);
    } catch (err) {
      throw unavailable(err);
    }
  }

  async delete(account: string): Promise<boolean> {
    try {
      return await this.entry(account).deleteCredential();
    } catch (err) {
      throw unavailable(err);
    }
  }
}
