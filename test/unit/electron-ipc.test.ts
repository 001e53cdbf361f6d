// Electron IPC without Electron: registerIpc runs against a recording stand-in for ipcMain, and
// the real preload (electron/preload.cts, transpiled as tsc would) runs against a stand-in
// ipcRenderer wired to it, so a call travels preload → channel → sender check → a real
// ShieldLabApp in a temp home, and back, structured-cloned at each hop as IPC would. Cancelling a
// call by its callId aborts the signal the app got for it.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import { closeSync, existsSync, openSync, readFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import ts from 'typescript';
import { ShieldLabApp, type CallContext } from '../../core/app/service.ts';
import { IPC_EVENT_CHANNEL, IPC_PREFIX, METHOD_NAMES, type AppEvent, type CallOutcome, type ProgressEvent } from '../../core/app/contract.ts';
import { ShieldError } from '../../core/errors.ts';
import { IPC_CANCEL_CHANNEL, IPC_MANIFEST_CHANNEL, registerIpc, type EventTargetLike } from '../../electron/ipc.ts';
import { isTrustedFrame, type FrameLike } from '../../electron/origin.ts';
import { RecordingIpcMain } from '../helpers/electron-stand-in.ts';
import { ROOT, tempDir } from '../helpers/home.ts';

const OURS: FrameLike = { url: 'app://shieldlab/index.html' };
const EVIL: FrameLike = { url: 'https://evil.example/' };

function setup(t: TestContext) {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const app = new ShieldLabApp({ home: join(dir, 'home') });
  t.after(() => app.close());
  const ipcMain = new RecordingIpcMain();
  const refused: string[] = [];
  const ipc = registerIpc({ app, ipcMain, isTrustedSender: isTrustedFrame, log: (l) => refused.push(l) });
  t.after(() => ipc.dispose());
  return { app, ipcMain, ipc, refused, home: join(dir, 'home') };
}

const INIT_ARGS = { keychain: false, passphrase: 'correct horse battery staple', kdfMemoryMib: 16 };

test('every contract method gets exactly one channel, derived from its name, plus the cancel channel', (t) => {
  const { ipcMain, ipc } = setup(t);
  const expected = [...METHOD_NAMES.map((m) => `${IPC_PREFIX}${m}`), IPC_CANCEL_CHANNEL].sort();
  assert.deepEqual([...ipcMain.handlers.keys()].sort(), expected);
  assert.deepEqual([...ipc.channels].sort(), expected);
  assert.equal(ipcMain.listeners.get(IPC_MANIFEST_CHANNEL)?.size, 1);
});

test('a call from a trusted frame reaches the real app and answers a CallOutcome', async (t) => {
  const { ipcMain, home } = setup(t);
  const status = (await ipcMain.invokeFrom(OURS, 'shieldlab:vault.status', {})) as CallOutcome<'vault.status'>;
  assert.deepEqual(status, { ok: true, result: { initialised: false, home, unlocked: false, slots: [] } });

  // Failures come back as data, with the code and message only: no throw, no stack.
  const bad = (await ipcMain.invokeFrom(OURS, 'shieldlab:vault.init', { keychain: 'yes' })) as CallOutcome;
  assert.equal(bad.ok, false);
  assert.equal(!bad.ok && bad.error.code, 'invalid_argument');
  assert.deepEqual(Object.keys(!bad.ok ? bad.error : {}).sort(), ['code', 'message']);
  const locked = (await ipcMain.invokeFrom(OURS, 'shieldlab:vault.list', {})) as CallOutcome;
  assert.equal(!locked.ok && locked.error.code, 'vault_not_initialised');
  assert.doesNotMatch(JSON.stringify(locked), /\bat \/|\.ts:\d+/);
});

test('a call from any other frame is refused as forbidden and never reaches the app', async (t) => {
  const { ipcMain, home, refused } = setup(t);
  for (const frame of [EVIL, { url: 'data:text/html,x' }, { url: 'about:blank' }, { url: 'file:///tmp/x.html' }, null]) {
    const outcome = (await ipcMain.invokeFrom(frame, 'shieldlab:vault.init', INIT_ARGS)) as CallOutcome;
    assert.equal(outcome.ok, false);
    assert.equal(!outcome.ok && outcome.error.code, 'forbidden', JSON.stringify(frame));
  }
  assert.equal(refused.length, 5);
  // Nothing was created: the vault still does not exist.
  const status = (await ipcMain.invokeFrom(OURS, 'shieldlab:vault.status', {})) as CallOutcome<'vault.status'>;
  assert.deepEqual(status, { ok: true, result: { initialised: false, home, unlocked: false, slots: [] } });
  // A frame whose accessor throws (destroyed frame) is refused too.
  const handler = ipcMain.handlers.get('shieldlab:vault.status')!;
  const throwing = {
    get senderFrame(): FrameLike {
      throw new Error('frame destroyed');
    },
  };
  assert.equal(((await handler(throwing)) as CallOutcome).ok, false);
});

test('the manifest goes to our frames only', (t) => {
  const { ipcMain } = setup(t);
  assert.deepEqual(ipcMain.sendSyncFrom(OURS, IPC_MANIFEST_CHANNEL), {
    prefix: IPC_PREFIX,
    eventChannel: IPC_EVENT_CHANNEL,
    cancelChannel: IPC_CANCEL_CHANNEL,
    methods: METHOD_NAMES,
  });
  assert.equal(ipcMain.sendSyncFrom(EVIL, IPC_MANIFEST_CHANNEL), null);
  assert.equal(ipcMain.sendSyncFrom(null, IPC_MANIFEST_CHANNEL), null);
});

test('app events reach attached windows that show our renderer, until detached', async (t) => {
  const { ipcMain, ipc } = setup(t);
  const sent = { ours: [] as AppEvent[], evil: [] as AppEvent[], gone: [] as AppEvent[] };
  const target = (frame: FrameLike, into: AppEvent[], destroyed = false): EventTargetLike => ({
    mainFrame: frame,
    isDestroyed: () => destroyed,
    send: (channel, payload) => {
      assert.equal(channel, IPC_EVENT_CHANNEL);
      into.push(payload);
    },
  });
  const detach = ipc.attach(target(OURS, sent.ours));
  ipc.attach(target(EVIL, sent.evil));
  ipc.attach(target(OURS, sent.gone, true));
  assert.equal(((await ipcMain.invokeFrom(OURS, 'shieldlab:vault.init', INIT_ARGS)) as CallOutcome).ok, true);
  assert.deepEqual(sent.ours, [{ type: 'state', unlocked: true }]);
  assert.deepEqual(sent.evil, []);
  assert.deepEqual(sent.gone, []);
  detach();
  await ipcMain.invokeFrom(OURS, 'shieldlab:vault.lock', {});
  assert.equal(sent.ours.length, 1);
});

test('dispose removes every handler and listener', (t) => {
  const { ipcMain, ipc } = setup(t);
  ipc.dispose();
  assert.equal(ipcMain.handlers.size, 0);
  assert.equal(ipcMain.listeners.get(IPC_MANIFEST_CHANNEL)?.size, 0);
});

// ---- cancelling ------------------------------------------------------------------------------------

/** An app whose calls run until their signal fires, recording the context each one got. */
function pendingApp() {
  const calls: { method: string; ctx: CallContext }[] = [];
  const finish = new Map<string, () => void>();
  const app = {
    invoke: (method: string, _args: unknown, ctx: CallContext = {}) =>
      new Promise<unknown>((resolve, reject) => {
        calls.push({ method, ctx });
        if (ctx.callId) finish.set(ctx.callId, () => resolve({ records: 0 }));
        ctx.signal?.addEventListener('abort', () => reject(new ShieldError('cancelled', 'Cancelled: nothing was written.')));
      }),
    onEvent: () => () => undefined,
  };
  return { app, calls, finish };
}

test('the cancel channel aborts the signal the app got for that callId, and that call only', async (t) => {
  const { app, calls, finish } = pendingApp();
  const ipcMain = new RecordingIpcMain();
  const refused: string[] = [];
  const ipc = registerIpc({ app, ipcMain, isTrustedSender: isTrustedFrame, log: (l) => refused.push(l) });
  t.after(() => ipc.dispose());

  const first = ipcMain.invokeFrom(OURS, 'shieldlab:vault.rotateKey', {}, { callId: 'call-1' }) as Promise<CallOutcome>;
  const second = ipcMain.invokeFrom(OURS, 'shieldlab:vault.rotateKey', {}, { callId: 'call-2' }) as Promise<CallOutcome>;
  await new Promise((r) => setImmediate(r));
  assert.deepEqual(calls.map((c) => c.ctx.callId), ['call-1', 'call-2']);
  const [one, two] = calls.map((c) => c.ctx.signal!);
  assert.ok(one && two && !one.aborted && !two.aborted);

  // Another frame may not cancel; an id that runs nothing is not cancelled.
  assert.equal(await ipcMain.invokeFrom(EVIL, IPC_CANCEL_CHANNEL, 'call-1'), false);
  assert.equal(await ipcMain.invokeFrom(null, IPC_CANCEL_CHANNEL, 'call-1'), false);
  assert.equal(one.aborted, false);
  assert.equal(refused.length, 2);
  assert.equal(await ipcMain.invokeFrom(OURS, IPC_CANCEL_CHANNEL, 'call-3'), false);
  assert.equal(await ipcMain.invokeFrom(OURS, IPC_CANCEL_CHANNEL, { callId: 'call-1' }), false);

  // One id, one running call.
  const twin = (await ipcMain.invokeFrom(OURS, 'shieldlab:vault.rotateKey', {}, { callId: 'call-1' })) as CallOutcome;
  assert.equal(!twin.ok && twin.error.code, 'usage');

  assert.equal(await ipcMain.invokeFrom(OURS, IPC_CANCEL_CHANNEL, 'call-1'), true);
  assert.equal(one.aborted, true);
  assert.equal(two.aborted, false);
  assert.deepEqual(await first, { ok: false, error: { code: 'cancelled', message: 'Cancelled: nothing was written.' } });
  // Ended: its id runs nothing any more.
  assert.equal(await ipcMain.invokeFrom(OURS, IPC_CANCEL_CHANNEL, 'call-1'), false);

  finish.get('call-2')!();
  assert.deepEqual(await second, { ok: true, result: { records: 0 } });
  assert.equal(await ipcMain.invokeFrom(OURS, IPC_CANCEL_CHANNEL, 'call-2'), false);
  assert.equal(two.aborted, false);
});

test('dispose cancels the calls still running, with or without a callId', async (t) => {
  const { app, calls } = pendingApp();
  const ipcMain = new RecordingIpcMain();
  const ipc = registerIpc({ app, ipcMain, isTrustedSender: isTrustedFrame });
  t.after(() => ipc.dispose());
  const tagged = ipcMain.invokeFrom(OURS, 'shieldlab:vault.rotateKey', {}, { callId: 'c' }) as Promise<CallOutcome>;
  const bare = ipcMain.invokeFrom(OURS, 'shieldlab:vault.rotateKey', {}) as Promise<CallOutcome>;
  await new Promise((r) => setImmediate(r));
  assert.equal(calls.length, 2);
  ipc.dispose();
  for (const outcome of await Promise.all([tagged, bare])) assert.equal(!outcome.ok && outcome.error.code, 'cancelled');
});

// ---- the preload ---------------------------------------------------------------------------------

interface Exposed {
  invoke(method: unknown, args: unknown, opts?: unknown): Promise<CallOutcome>;
  cancel(callId: unknown): Promise<boolean>;
  onEvent(listener: (e: unknown) => void): () => void;
}

/** Runs electron/preload.cts as the sandbox would: CommonJS, with only `electron` to require. */
function loadPreload(ipcMain: RecordingIpcMain, frame: FrameLike) {
  const source = readFileSync(join(ROOT, 'electron/preload.cts'), 'utf8');
  const { outputText } = ts.transpileModule(source, { compilerOptions: { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2022 } });
  const renderer = new EventEmitter();
  const exposed = new Map<string, unknown>();
  const required: string[] = [];
  const electron = {
    contextBridge: { exposeInMainWorld: (key: string, api: unknown) => exposed.set(key, api) },
    ipcRenderer: {
      sendSync: (channel: string) => ipcMain.sendSyncFrom(frame, channel),
      invoke: (channel: string, ...args: unknown[]) => ipcMain.invokeFrom(frame, channel, ...args),
      on: (channel: string, l: (...a: unknown[]) => void) => renderer.on(channel, l),
      removeListener: (channel: string, l: (...a: unknown[]) => void) => renderer.removeListener(channel, l),
    },
  };
  const requireStub = (id: string) => {
    required.push(id);
    if (id !== 'electron') throw new Error(`a sandboxed preload cannot require ${id}`);
    return electron;
  };
  const module = { exports: {} };
  new Function('require', 'exports', 'module', outputText)(requireStub, module.exports, module);
  // What main would send to this window's webContents.
  const window: EventTargetLike = {
    mainFrame: frame,
    isDestroyed: () => false,
    send: (channel, payload) => renderer.emit(channel, { sender: 'the IpcRendererEvent' }, structuredClone(payload)),
  };
  return { exposed, required, window, listenerCount: () => renderer.listenerCount(IPC_EVENT_CHANNEL) };
}

test('the preload exposes only invoke, cancel and onEvent, and requires only electron', (t) => {
  const { ipcMain } = setup(t);
  const { exposed, required } = loadPreload(ipcMain, OURS);
  assert.deepEqual([...exposed.keys()], ['shieldlab']);
  const api = exposed.get('shieldlab') as Record<string, unknown>;
  assert.deepEqual(Object.keys(api).sort(), ['cancel', 'invoke', 'onEvent']);
  assert.ok(Object.isFrozen(api));
  assert.deepEqual(required, ['electron']);
});

test('through the preload: calls reach the app, unknown methods never leave the page, events arrive bare', async (t) => {
  const { ipcMain, ipc, home } = setup(t);
  const { exposed, window, listenerCount } = loadPreload(ipcMain, OURS);
  const api = exposed.get('shieldlab') as Exposed;
  ipc.attach(window);

  assert.deepEqual(await api.invoke('vault.status', {}), { ok: true, result: { initialised: false, home, unlocked: false, slots: [] } });
  const unknown = await api.invoke('shell.exec', {});
  assert.equal(!unknown.ok && unknown.error.code, 'usage');
  const notString = await api.invoke({ toString: () => 'vault.status' }, {});
  assert.equal(!notString.ok && notString.error.code, 'usage');
  const unclonable = await api.invoke('vault.status', { f: () => 1 });
  assert.equal(!unclonable.ok && unclonable.error.code, 'invalid_argument');

  const events: unknown[] = [];
  const stop = api.onEvent((e) => events.push(e));
  assert.equal(listenerCount(), 1);
  assert.equal((await api.invoke('vault.init', INIT_ARGS)).ok, true);
  assert.deepEqual(events, [{ type: 'state', unlocked: true }]); // the payload only, never the IPC event
  stop();
  assert.equal(listenerCount(), 0);
  await api.invoke('vault.lock', {});
  assert.equal(events.length, 1);
  assert.throws(() => api.onEvent('not a function' as never), TypeError);
});

test('a preload in a page that is not ours gets no methods at all', async (t) => {
  const { ipcMain } = setup(t);
  const api = loadPreload(ipcMain, EVIL).exposed.get('shieldlab') as Exposed;
  const outcome = await api.invoke('vault.status', {});
  assert.equal(!outcome.ok && outcome.error.code, 'usage');
  assert.equal(await api.cancel('any'), false);
  const stop = api.onEvent(() => assert.fail('no events for foreign pages'));
  stop();
});

test('through the preload, a real conversion is cancelled by its callId: `cancelled`, and no output is left', async (t) => {
  const { ipcMain, ipc } = setup(t);
  const { exposed, window } = loadPreload(ipcMain, OURS);
  const api = exposed.get('shieldlab') as Exposed;
  ipc.attach(window);
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  // 256 MiB that is nowhere zero, in 32 MiB blocks: eight progress events, the first long before the end.
  const input = join(dir, 'big.raw');
  const output = join(dir, 'big.vhdx');
  const piece = Buffer.alloc(8 * 1024 * 1024, 0x5a);
  const fd = openSync(input, 'w');
  for (let i = 0; i < 32; i++) writeSync(fd, piece);
  closeSync(fd);

  const firstProgress = new Promise<ProgressEvent>((resolve) => {
    const stop = api.onEvent((e) => {
      const event = e as AppEvent;
      if (event.type !== 'progress' || event.callId !== 'convert-1') return;
      stop();
      resolve(event);
    });
  });
  const answer = api.invoke('vhdx.convert', { input, output }, { callId: 'convert-1' });
  const progress = await firstProgress;
  assert.ok(progress.done < progress.total);
  assert.equal(await api.cancel('convert-1'), true);
  const outcome = await answer;
  assert.equal(!outcome.ok && outcome.error.code, 'cancelled');
  assert.equal(existsSync(output), false);
  assert.equal(existsSync(`${output}.partial`), false);
  assert.equal(await api.cancel('convert-1'), false, 'ended: nothing runs under its id');
});
