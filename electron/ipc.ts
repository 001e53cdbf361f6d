// Electron IPC, derived from the contract: one `handle` per method in METHOD_NAMES, no
// per-method code. Every call checks its sender frame (checklist item 17) and answers with a
// CallOutcome: nothing is thrown across IPC, no stack leaves the main process. A call made under a
// callId can be cancelled by it on one more channel, for every method alike (CallContext.signal).
//
// ipcMain is a parameter and only types come from 'electron', so tests can register against a
// recording stand-in without the Electron binary.
import { IPC_EVENT_CHANNEL, IPC_PREFIX, METHOD_NAMES, type AppEvent, type CallOutcome, type MethodName } from '../core/app/contract.ts';
import type { CallContext, ShieldLabApp } from '../core/app/service.ts';
import { ShieldError, toShieldError, type SerializedError } from '../core/errors.ts';
import type { FrameLike } from './origin.ts';

/**
 * Synchronous channel: the preload asks it, once, which channels exist. The preload is sandboxed
 * and cannot load the contract (nor zod), so this is how it learns the method list.
 */
export const IPC_MANIFEST_CHANNEL = 'shieldlab:channels';

/** Invoke channel: (callId) → true when a call running under that id was told to stop, else false. */
export const IPC_CANCEL_CHANNEL = 'shieldlab:cancel';

/** What the manifest channel returns to a trusted frame. Untrusted frames get null. */
export interface IpcManifest {
  prefix: string;
  eventChannel: string;
  cancelChannel: string;
  methods: readonly MethodName[];
}

/** The parts of Electron's IpcMainInvokeEvent / IpcMainEvent that we read. */
export interface InvokeEventLike {
  readonly senderFrame: FrameLike | null;
}
export interface SyncEventLike {
  readonly senderFrame: FrameLike | null;
  returnValue: unknown;
}

/** The part of Electron's ipcMain that registration uses; `ipcMain` itself satisfies it. */
export interface IpcMainLike {
  handle(channel: string, listener: (event: InvokeEventLike, ...args: unknown[]) => Promise<unknown>): void;
  removeHandler(channel: string): void;
  on(channel: string, listener: (event: SyncEventLike) => void): unknown;
  removeListener(channel: string, listener: (event: SyncEventLike) => void): unknown;
}

/** Where app events go: a window's webContents. */
export interface EventTargetLike {
  readonly mainFrame: FrameLike | null;
  isDestroyed(): boolean;
  send(channel: string, payload: AppEvent): void;
}

export interface IpcOptions {
  app: Pick<ShieldLabApp, 'invoke' | 'onEvent'>;
  ipcMain: IpcMainLike;
  isTrustedSender: (frame: FrameLike | null) => boolean;
  log?: (line: string) => void;
}

export interface IpcRegistration {
  /** Every channel registered with `handle`: one per contract method, then the cancel channel. */
  readonly channels: readonly string[];
  /** Sends app events to this window while its main frame shows our renderer; returns a detach. */
  attach(target: EventTargetLike): () => void;
  /** Removes every handler, stops forwarding events and cancels the calls still running. */
  dispose(): void;
}

export function methodChannel(method: MethodName): string {
  return IPC_PREFIX + method;
}

/** The frame that sent a message; Electron may throw or give null once it navigated away. */
function senderOf(event: { readonly senderFrame: FrameLike | null }): FrameLike | null {
  try {
    return event.senderFrame;
  } catch {
    return null;
  }
}

function describe(frame: FrameLike | null): string {
  return frame ? JSON.stringify(String(frame.url).slice(0, 200)) : 'a detached frame';
}

const CALL_ID = /^[\w.:-]{1,64}$/;

/** Only a short printable call id is accepted from the renderer. */
function callIdOf(opts: unknown): string | undefined {
  const callId = (opts as { callId?: unknown } | null | undefined)?.callId;
  return typeof callId === 'string' && CALL_ID.test(callId) ? callId : undefined;
}

function failure(err: unknown): CallOutcome {
  // toJSON carries code, message and details only; the JSON round trip guarantees that what
  // crosses IPC is plain data (structured clone would choke on anything else in details).
  return { ok: false, error: JSON.parse(JSON.stringify(toShieldError(err).toJSON())) as SerializedError };
}

export function registerIpc(opts: IpcOptions): IpcRegistration {
  const { app, ipcMain, isTrustedSender } = opts;
  const log = opts.log ?? (() => undefined);
  const methodChannels = METHOD_NAMES.map(methodChannel);
  const channels = [...methodChannels, IPC_CANCEL_CHANNEL];
  for (const reserved of [IPC_MANIFEST_CHANNEL, IPC_EVENT_CHANNEL, IPC_CANCEL_CHANNEL]) {
    if (methodChannels.includes(reserved)) throw new ShieldError('internal', `IPC channel clash: ${reserved} is also a method channel.`);
  }

  /** The calls running under a callId, to cancel them by it; each removes itself when it ends. */
  const running = new Map<string, AbortController>();
  /** Every call running, with or without an id: dispose stops them all. */
  const inFlight = new Set<AbortController>();

  for (const method of METHOD_NAMES) {
    const channel = methodChannel(method);
    ipcMain.handle(channel, async (event, args, callOpts): Promise<CallOutcome> => {
      const frame = senderOf(event);
      if (!isTrustedSender(frame)) {
        log(`refused IPC ${channel} from ${describe(frame)}`);
        return failure(new ShieldError('forbidden', 'This window is not allowed to call ShieldLab.'));
      }
      const callId = callIdOf(callOpts);
      if (callId !== undefined && running.has(callId)) return failure(new ShieldError('usage', 'A call with this id is already running.'));
      const controller = new AbortController();
      // Registered before the first await: a cancel sent after the invoke always finds its call.
      inFlight.add(controller);
      if (callId !== undefined) running.set(callId, controller);
      const ctx: CallContext = callId !== undefined ? { callId, signal: controller.signal } : { signal: controller.signal };
      try {
        const result = await app.invoke(method, args, ctx);
        return { ok: true, result } as CallOutcome;
      } catch (err) {
        return failure(err);
      } finally {
        inFlight.delete(controller);
        if (callId !== undefined && running.get(callId) === controller) running.delete(callId);
      }
    });
  }

  ipcMain.handle(IPC_CANCEL_CHANNEL, async (event, callId): Promise<boolean> => {
    const frame = senderOf(event);
    if (!isTrustedSender(frame)) {
      log(`refused IPC ${IPC_CANCEL_CHANNEL} from ${describe(frame)}`);
      return false;
    }
    const controller = typeof callId === 'string' ? running.get(callId) : undefined;
    if (!controller) return false;
    controller.abort();
    return true;
  });

  const manifest: IpcManifest = { prefix: IPC_PREFIX, eventChannel: IPC_EVENT_CHANNEL, cancelChannel: IPC_CANCEL_CHANNEL, methods: [...METHOD_NAMES] };
  const onManifest = (event: SyncEventLike) => {
    const frame = senderOf(event);
    const trusted = isTrustedSender(frame);
    if (!trusted) log(`refused IPC ${IPC_MANIFEST_CHANNEL} from ${describe(frame)}`);
    // Always answer: a sync sender blocks until it gets a value.
    event.returnValue = trusted ? manifest : null;
  };
  ipcMain.on(IPC_MANIFEST_CHANNEL, onManifest);

  const targets = new Set<EventTargetLike>();
  const unsubscribe = app.onEvent((e) => {
    for (const target of targets) {
      if (target.isDestroyed()) targets.delete(target);
      else if (isTrustedSender(target.mainFrame)) target.send(IPC_EVENT_CHANNEL, e);
    }
  });

  return {
    channels,
    attach(target) {
      targets.add(target);
      return () => targets.delete(target);
    },
    dispose() {
      unsubscribe();
      targets.clear();
      for (const channel of channels) ipcMain.removeHandler(channel);
      ipcMain.removeListener(IPC_MANIFEST_CHANNEL, onManifest);
      // The window is going away: calls still running stop, and remove what they had half-made.
      for (const controller of inFlight) controller.abort();
    },
  };
}
