// The renderer's view of the vault: its status, read through the bridge and kept fresh by the
// `state` events the app pushes (unlocks and locks from any front door, auto-lock on idle).
import type { Args, MethodName, Result } from '../../core/app/contract.ts';
import { api, BridgeError, describeError, type CallOptions } from './bridge.ts';

export type VaultStatus = Result<'vault.status'>;
export type Phase = 'loading' | 'blocked' | 'none' | 'locked' | 'unlocked';

/** Codes after which our idea of the vault's state is stale. */
const STALE = new Set(['locked', 'vault_not_initialised', 'unauthorized', 'unreachable']);

class Session {
  status = $state<VaultStatus | null>(null);
  /** Why the vault locked without being asked; shown on the unlock screen. */
  notice = $state<string | null>(null);
  /** A failure that stops every view: no session token, or the server is gone. */
  blocked = $state<string | null>(null);

  phase: Phase = $derived.by(() => {
    if (this.blocked) return 'blocked';
    if (!this.status) return 'loading';
    if (!this.status.initialised) return 'none';
    return this.status.unlocked ? 'unlocked' : 'locked';
  });

  async refresh(): Promise<void> {
    try {
      this.adopt(await api.call('vault.status', {}));
      this.blocked = null;
    } catch (err) {
      this.blocked = describeError(err);
    }
  }

  /** Takes the status a call returned (init, unlock, lock) as the current one. */
  adopt(status: VaultStatus): void {
    this.status = status;
    if (status.unlocked) this.notice = null;
  }

  /** api.call, plus a status refresh when the answer says our picture is out of date. */
  async call<M extends MethodName>(method: M, args: Args<M>, opts?: CallOptions): Promise<Result<M>> {
    try {
      return await api.call(method, args, opts);
    } catch (err) {
      if (err instanceof BridgeError && STALE.has(err.code)) void this.refresh();
      throw err;
    }
  }

  /** Follows pushed state changes; returns the unsubscribe function. */
  watch(): () => void {
    return api.onEvent(async (event) => {
      if (event.type !== 'state') return;
      await this.refresh();
      if (!event.unlocked && event.reason === 'idle') {
        const minutes = this.status?.autoLockMinutes;
        this.notice = `Locked after idle${minutes ? ` (${minutes} min without activity)` : ''}. Unlock to continue.`;
      }
    });
  }
}

export const session = new Session();

/** "OS keychain (Secret Service) + passphrase", from the vault's key slots. */
export function describeProtection(status: VaultStatus): string {
  const parts = status.slots.map((slot) => {
    switch (slot) {
      case 'keychain':
        return status.keychainStore ? `OS keychain (${status.keychainStore})` : 'OS keychain';
      case 'passphrase':
        return 'passphrase';
      case 'recovery':
        return status.recovery ? `recovery shares (${status.recovery.threshold} of ${status.recovery.shares})` : 'recovery shares';
    }
  });
  const text = parts.join(' + ');
  return text.charAt(0).toUpperCase() + text.slice(1);
}

export function formatTime(iso: string, precise = false): string {
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString(undefined, { dateStyle: 'medium', timeStyle: precise ? 'medium' : 'short' });
}

export function formatDate(iso: string): string {
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleDateString(undefined, { dateStyle: 'medium' });
}
