// The renderer's one door to ShieldLab. Two transports behind one narrow interface: Electron IPC
// (the preload's `window.shieldlab`) or web mode (fetch + WebSocket to the same origin). Views see
// only `api.call(method, args, { onProgress, signal })`, typed from the contract, and `api.onEvent`.
// Type-only imports from core: nothing of core (nor zod) is bundled into the renderer.
import type { AppEvent, Args, CallOutcome, MethodName, ProgressEvent, Result } from '../../core/app/contract.ts';
import type { ErrorCode } from '../../core/errors.ts';
import type { ShieldLabPreload } from './electron.d.ts';

/** Codes from core, plus the two failures only a front end can see. */
export type BridgeErrorCode = ErrorCode | 'unreachable' | 'bad_response';

export class BridgeError extends Error {
  readonly code: BridgeErrorCode;
  readonly details: Record<string, unknown> | undefined;

  constructor(code: BridgeErrorCode, message: string, details?: Record<string, unknown>) {
    super(message);
    this.name = 'BridgeError';
    this.code = code;
    this.details = details;
  }
}

interface Transport {
  invoke(method: MethodName, args: unknown, callId: string): Promise<CallOutcome>;
  /** Asks the call running under `callId` to stop; false when none runs under it (yet, or any more). */
  cancel(callId: string): Promise<boolean>;
  onEvent(listener: (event: AppEvent) => void): () => void;
}

function ipcTransport(preload: ShieldLabPreload): Transport {
  return {
    invoke: (method, args, callId) =>
      preload.invoke(method, args, { callId }).catch(() => {
        throw new BridgeError('unreachable', 'The ShieldLab main process did not answer.');
      }),
    cancel: (callId) => preload.cancel(callId).catch(() => false),
    onEvent: (listener) => preload.onEvent(listener),
  };
}

function webTransport(): Transport {
  const listeners = new Set<(event: AppEvent) => void>();
  let socket: WebSocket | null = null;
  let retry: ReturnType<typeof setTimeout> | null = null;
  let delay = 500;

  const connect = () => {
    retry = null;
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const ws = new WebSocket(`${scheme}//${location.host}/api/events`);
    socket = ws;
    ws.onopen = () => (delay = 500);
    ws.onmessage = (m) => {
      let event: AppEvent;
      try {
        event = JSON.parse(String(m.data)) as AppEvent;
      } catch {
        return;
      }
      for (const l of listeners) l(event);
    };
    ws.onclose = () => {
      socket = null;
      if (listeners.size === 0) return;
      retry = setTimeout(connect, delay);
      delay = Math.min(delay * 2, 10_000);
    };
  };

  return {
    async invoke(method, args, callId) {
      let res: Response;
      try {
        res = await fetch(`/api/call/${encodeURIComponent(method)}`, {
          method: 'POST',
          credentials: 'same-origin',
          headers: { 'Content-Type': 'application/json', 'X-Call-Id': callId },
          body: JSON.stringify(args ?? {}),
        });
      } catch {
        throw new BridgeError('unreachable', 'ShieldLab is not reachable: is `shieldlab serve` still running?');
      }
      if (!(res.headers.get('content-type') ?? '').startsWith('application/json')) {
        throw new BridgeError('bad_response', `Unexpected answer from ShieldLab (HTTP ${res.status}).`);
      }
      return (await res.json()) as CallOutcome;
    },
    async cancel(callId) {
      try {
        const res = await fetch(`/api/cancel/${encodeURIComponent(callId)}`, {
          method: 'POST',
          credentials: 'same-origin',
          headers: { 'Content-Type': 'application/json' },
          body: '{}',
        });
        return res.status === 204;
      } catch {
        return false; // the call itself will say the server is gone
      }
    },
    onEvent(listener) {
      listeners.add(listener);
      if (!socket && !retry) connect();
      return () => {
        listeners.delete(listener);
        if (listeners.size > 0) return;
        if (retry) clearTimeout(retry);
        retry = null;
        socket?.close();
        socket = null;
      };
    },
  };
}

function newCallId(): string {
  return globalThis.crypto?.randomUUID?.() ?? `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

export interface CallOptions {
  onProgress?: (event: ProgressEvent) => void;
  /**
   * Cancels the call: the work stops, what it had half-made is removed, and the call rejects with
   * the server's `cancelled` error (a call that finishes first keeps its result).
   */
  signal?: AbortSignal;
}

/** How often a cancel is asked again while the call is not yet (or no longer) known to the other side. */
const CANCEL_RETRY_MS = 250;

export interface Client {
  call<M extends MethodName>(method: M, args: Args<M>, opts?: CallOptions): Promise<Result<M>>;
  onEvent(listener: (event: AppEvent) => void): () => void;
  readonly mode: 'electron' | 'web';
}

export function createClient(transport: Transport, mode: Client['mode']): Client {
  return {
    mode,
    onEvent: (listener) => transport.onEvent(listener),
    async call(method, args, opts = {}) {
      const callId = newCallId();
      const { onProgress, signal } = opts;
      if (signal?.aborted) throw new BridgeError('cancelled', 'Cancelled before it started: nothing was written.');
      const stop = onProgress
        ? transport.onEvent((e) => {
            if (e.type === 'progress' && e.callId === callId) onProgress(e);
          })
        : undefined;
      let settled = false;
      // A cancel can overtake its call on the way (web mode: two requests); asked again until one lands or the call ends.
      const cancel = async () => {
        while (!settled && !(await transport.cancel(callId))) {
          await new Promise((resolve) => setTimeout(resolve, CANCEL_RETRY_MS));
        }
      };
      const onAbort = () => void cancel();
      signal?.addEventListener('abort', onAbort, { once: true });
      try {
        const outcome = await transport.invoke(method, args, callId);
        if (outcome.ok) return outcome.result as Result<typeof method>;
        throw new BridgeError(outcome.error.code, outcome.error.message, outcome.error.details);
      } finally {
        settled = true;
        signal?.removeEventListener('abort', onAbort);
        stop?.();
      }
    },
  };
}

export const api: Client =
  typeof window !== 'undefined' && window.shieldlab
    ? createClient(ipcTransport(window.shieldlab), 'electron')
    : createClient(webTransport(), 'web');

/** The call ended because it was cancelled (its `signal`, or another front door): nothing was written. */
export function isCancelled(err: unknown): boolean {
  return err instanceof BridgeError && err.code === 'cancelled';
}

/** A failure as words for the page: the server's own message, never a bare code. */
export function describeError(err: unknown): string {
  if (err instanceof BridgeError) return err.message;
  return err instanceof Error ? err.message : String(err);
}
