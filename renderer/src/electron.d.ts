// What Electron's preload exposes on `window` (contextBridge). Absent in web mode.
import type { AppEvent, CallOutcome, MethodName } from '../../core/app/contract.ts';

export interface ShieldLabPreload {
  /** `callId` tags the progress events of this call (a short printable id) and lets `cancel` find it. */
  invoke(method: MethodName, args: unknown, opts?: { callId?: string }): Promise<CallOutcome>;
  /** Asks the call made under `callId` to stop; true when one was running (its invoke then answers `cancelled`). */
  cancel(callId: string): Promise<boolean>;
  /** Subscribes to pushed events; returns the unsubscribe function. */
  onEvent(listener: (event: AppEvent) => void): () => void;
}

declare global {
  interface Window {
    shieldlab?: ShieldLabPreload;
  }
}
