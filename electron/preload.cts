// The sandboxed preload. A sandboxed preload is CommonJS and may require only Electron's renderer
// modules, so this file (.cts → dist/electron/preload.cjs) imports nothing of ours: the method list
// and channel names come from the main process over one synchronous channel, asked once.
//
// The page gets exactly three functions on `window.shieldlab` (invoke, cancel, onEvent);
// ipcRenderer is never exposed, and the IPC event object never reaches page code.
const { contextBridge, ipcRenderer } = require('electron') as typeof import('electron');

/** Must equal IPC_MANIFEST_CHANNEL in electron/ipc.ts (a unit test checks). */
const MANIFEST_CHANNEL = 'shieldlab:channels';

interface Manifest {
  prefix: string;
  eventChannel: string;
  cancelChannel: string;
  methods: ReadonlySet<string>;
}

type Outcome = { ok: false; error: { code: string; message: string } } | { ok: true; result: unknown };

let manifest: Manifest | undefined;

function readManifest(): Manifest {
  if (manifest) return manifest;
  let raw: unknown = null;
  try {
    raw = ipcRenderer.sendSync(MANIFEST_CHANNEL);
  } catch {
    raw = null;
  }
  const m = raw as { prefix?: unknown; eventChannel?: unknown; cancelChannel?: unknown; methods?: unknown } | null;
  const valid =
    m !== null &&
    typeof m === 'object' &&
    typeof m.prefix === 'string' &&
    typeof m.eventChannel === 'string' &&
    typeof m.cancelChannel === 'string' &&
    Array.isArray(m.methods) &&
    m.methods.every((x) => typeof x === 'string');
  // Refused (this page is not ours) or malformed: no methods, no events. Fail closed, and stay so.
  manifest = valid
    ? { prefix: m.prefix as string, eventChannel: m.eventChannel as string, cancelChannel: m.cancelChannel as string, methods: new Set(m.methods as string[]) }
    : { prefix: '', eventChannel: '', cancelChannel: '', methods: new Set() };
  return manifest;
}

function refusal(code: string, message: string): Promise<Outcome> {
  return Promise.resolve({ ok: false, error: { code, message } });
}

const shieldlab = Object.freeze({
  invoke(method: unknown, args: unknown, opts?: unknown): Promise<Outcome> {
    const { prefix, methods } = readManifest();
    if (typeof method !== 'string' || !methods.has(method)) return refusal('usage', `Unknown method: ${String(method).slice(0, 100)}`);
    const callId = (opts as { callId?: unknown } | null | undefined)?.callId;
    const extra = typeof callId === 'string' ? [{ callId }] : [];
    return (ipcRenderer.invoke(prefix + method, args, ...extra) as Promise<Outcome>).catch(() =>
      refusal('invalid_argument', 'The arguments could not be sent to the main process (only plain data can be).'),
    );
  },

  /** Asks the call made under `callId` to stop; true when one was running. Its invoke then answers `cancelled`. */
  cancel(callId: unknown): Promise<boolean> {
    const { cancelChannel } = readManifest();
    if (cancelChannel === '' || typeof callId !== 'string') return Promise.resolve(false);
    return (ipcRenderer.invoke(cancelChannel, callId) as Promise<unknown>).then(
      (answer) => answer === true,
      () => false,
    );
  },

  onEvent(listener: unknown): () => void {
    if (typeof listener !== 'function') throw new TypeError('onEvent needs a function');
    const { eventChannel } = readManifest();
    if (eventChannel === '') return () => undefined;
    const forward = (_event: unknown, payload: unknown) => {
      (listener as (payload: unknown) => void)(payload);
    };
    ipcRenderer.on(eventChannel, forward);
    return () => {
      ipcRenderer.removeListener(eventChannel, forward);
    };
  },
});

contextBridge.exposeInMainWorld('shieldlab', shieldlab);
