// A stand-in for the parts of Electron's main-process API that electron/ uses, for tests on a
// machine without the Electron binary. It records what our code asks of Electron (registries,
// handlers, window options) and lets a test fire Electron's events; it implements none of our logic.
import { EventEmitter } from 'node:events';
import { registerHooks } from 'node:module';
import type { InvokeEventLike, IpcMainLike, SyncEventLike } from '../../electron/ipc.ts';
import type { FrameLike } from '../../electron/origin.ts';

type InvokeListener = (event: InvokeEventLike, ...args: unknown[]) => Promise<unknown>;
type SyncListener = (event: SyncEventLike) => void;

/** ipcMain as a registry, with Electron's one-handler-per-channel rule and structured cloning. */
export class RecordingIpcMain implements IpcMainLike {
  readonly handlers = new Map<string, InvokeListener>();
  readonly listeners = new Map<string, Set<SyncListener>>();

  handle(channel: string, listener: InvokeListener): void {
    if (this.handlers.has(channel)) throw new Error(`Attempted to register a second handler for '${channel}'`);
    this.handlers.set(channel, listener);
  }
  removeHandler(channel: string): void {
    this.handlers.delete(channel);
  }
  on(channel: string, listener: SyncListener): this {
    if (!this.listeners.has(channel)) this.listeners.set(channel, new Set());
    this.listeners.get(channel)!.add(listener);
    return this;
  }
  removeListener(channel: string, listener: SyncListener): this {
    this.listeners.get(channel)?.delete(listener);
    return this;
  }

  /** What ipcRenderer.invoke from `frame` gets back. */
  async invokeFrom(frame: FrameLike | null, channel: string, ...args: unknown[]): Promise<unknown> {
    const handler = this.handlers.get(channel);
    if (!handler) throw new Error(`No handler registered for '${channel}'`);
    return structuredClone(await handler({ senderFrame: frame }, ...structuredClone(args)));
  }

  /** What ipcRenderer.sendSync from `frame` gets back. */
  sendSyncFrom(frame: FrameLike | null, channel: string): unknown {
    const event: SyncEventLike = { senderFrame: frame, returnValue: undefined };
    for (const l of this.listeners.get(channel) ?? []) l(event);
    return structuredClone(event.returnValue);
  }
}

/** An Electron-style cancellable event. */
export function electronEvent<T extends object>(fields: T): T & { defaultPrevented: boolean; preventDefault(): void } {
  const e = { ...fields, defaultPrevented: false, preventDefault: () => (e.defaultPrevented = true) };
  return e;
}

export class StandInWebContents extends EventEmitter {
  readonly mainFrame = { url: '' };
  readonly sent: [string, unknown][] = [];
  windowOpenHandler: ((details: { url: string }) => { action: string }) | null = null;
  isDestroyed(): boolean {
    return false;
  }
  send(channel: string, payload: unknown): void {
    this.sent.push([channel, structuredClone(payload)]);
  }
  setWindowOpenHandler(handler: (details: { url: string }) => { action: string }): void {
    this.windowOpenHandler = handler;
  }
}

/** The stand-in module, plus what was recorded. `ready()` fires Electron's 'ready'. */
export function electronStandIn() {
  const log: string[] = [];
  let isReady = false;
  let fireReady!: () => void;
  const readyPromise = new Promise<void>((r) => (fireReady = r));
  const windows: StandInBrowserWindow[] = [];
  const protocolHandlers = new Map<string, (req: Request) => Promise<Response>>();
  const privileged: unknown[] = [];
  const sessionHandlers: Record<string, unknown> = {};

  const app = Object.assign(new EventEmitter(), {
    isPackaged: false,
    enableSandbox: () => log.push(`app.enableSandbox ready=${isReady}`),
    requestSingleInstanceLock: () => (log.push('app.requestSingleInstanceLock'), true),
    whenReady: () => readyPromise,
    quit: () => log.push('app.quit'),
    exit: (code: number) => log.push(`app.exit ${code}`),
  });

  class StandInBrowserWindow extends EventEmitter {
    readonly webContents = new StandInWebContents();
    loadedUrl = '';
    readonly options: { webPreferences?: Record<string, unknown> };
    constructor(options: { webPreferences?: Record<string, unknown> }) {
      super();
      this.options = options;
      windows.push(this);
      app.emit('web-contents-created', {}, this.webContents);
    }
    loadURL(url: string): Promise<void> {
      this.loadedUrl = url;
      this.webContents.mainFrame.url = url;
      return Promise.resolve();
    }
    show(): void {}
    focus(): void {}
    restore(): void {}
    isMinimized(): boolean {
      return false;
    }
  }

  const module = {
    app,
    BrowserWindow: StandInBrowserWindow,
    ipcMain: new RecordingIpcMain(),
    protocol: {
      registerSchemesAsPrivileged: (schemes: unknown[]) => {
        log.push(`protocol.registerSchemesAsPrivileged ready=${isReady}`);
        privileged.push(...schemes);
      },
      handle: (scheme: string, handler: (req: Request) => Promise<Response>) => protocolHandlers.set(scheme, handler),
    },
    session: {
      defaultSession: {
        setPermissionRequestHandler: (h: unknown) => (sessionHandlers.permissionRequest = h),
        setPermissionCheckHandler: (h: unknown) => (sessionHandlers.permissionCheck = h),
        setDevicePermissionHandler: (h: unknown) => (sessionHandlers.devicePermission = h),
        webRequest: { onBeforeRequest: (filter: unknown, h: unknown) => (sessionHandlers.beforeRequest = { filter, h }) },
      },
    },
  };

  return {
    module,
    log,
    windows,
    protocolHandlers,
    privileged,
    sessionHandlers,
    ready: () => {
      isReady = true;
      app.emit('ready');
      fireReady();
    },
  };
}

const SPECIFIER = 'shieldlab-test:electron';
const EXPORTS = ['app', 'BrowserWindow', 'ipcMain', 'protocol', 'session'];

/** Makes `import … from 'electron'` in this process load the stand-in. */
export function installElectronStandIn(standIn: ReturnType<typeof electronStandIn>): void {
  (globalThis as { __electronStandIn?: unknown }).__electronStandIn = standIn.module;
  registerHooks({
    resolve: (specifier, context, next) => (specifier === 'electron' ? { url: SPECIFIER, shortCircuit: true } : next(specifier, context)),
    load: (url, context, next) =>
      url === SPECIFIER
        ? {
            format: 'module',
            shortCircuit: true,
            source: `const e = globalThis.__electronStandIn; export default e; export const { ${EXPORTS.join(', ')} } = e;`,
          }
        : next(url, context),
  });
}
