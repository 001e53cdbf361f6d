// Electron main process: one window showing dist/renderer over app://shieldlab/, the contract
// over IPC, and the hardening from the Electron security checklist. Everything else is core's.
import { app, BrowserWindow, ipcMain, protocol, session, type Session, type WebContents } from 'electron';
import { fileURLToPath } from 'node:url';
import { ShieldLabApp } from '../core/app/service.ts';
import { homeFromArgv } from './args.ts';
import { registerIpc } from './ipc.ts';
import { APP_ENTRY_URL, APP_SCHEME, isAppUrl, isTrustedFrame } from './origin.ts';
import { createRendererHandler } from './protocol.ts';
import { mainWindowOptions } from './window.ts';

const RENDERER_DIR = fileURLToPath(new URL('../renderer/', import.meta.url));
const PRELOAD = fileURLToPath(new URL('./preload.cjs', import.meta.url));
/** The renderer never needs the network or local files: requests matching these are cancelled. */
const FOREIGN_URLS = ['*://*/*', 'file:///*'];

const log = (line: string) => process.stderr.write(`shieldlab: ${line}\n`);

// Both must happen before 'ready'. A standard + secure scheme gets a real origin, so 'self' in the
// CSP and the same-origin checks mean app://shieldlab and nothing else.
protocol.registerSchemesAsPrivileged([{ scheme: APP_SCHEME, privileges: { standard: true, secure: true, supportFetchAPI: true } }]);
app.enableSandbox();

if (!app.requestSingleInstanceLock()) {
  // Another ShieldLab window owns the vault session; it is focused by its 'second-instance'.
  app.quit();
} else {
  run();
}

function hardenSession(ses: Session): void {
  // Checklist item 5: Electron grants every permission request unless told otherwise.
  ses.setPermissionRequestHandler((_contents, permission, callback) => {
    log(`denied permission request: ${permission}`);
    callback(false);
  });
  ses.setPermissionCheckHandler(() => false);
  ses.setDevicePermissionHandler(() => false);
  ses.webRequest.onBeforeRequest({ urls: FOREIGN_URLS }, (details, callback) => {
    log(`blocked request to ${details.url.slice(0, 200)}`);
    callback({ cancel: true });
  });
}

function guardContents(contents: WebContents): void {
  // Checklist items 12–14: no navigation away from our origin (compared as origins, never by
  // prefix), no new windows, no <webview>.
  const stayHome = (event: { url: string; preventDefault(): void }, what: string) => {
    if (isAppUrl(event.url)) return;
    event.preventDefault();
    log(`denied ${what} to ${event.url.slice(0, 200)}`);
  };
  contents.on('will-navigate', (event) => stayHome(event, 'navigation'));
  contents.on('will-frame-navigate', (event) => stayHome(event, 'frame navigation'));
  contents.on('will-redirect', (event) => stayHome(event, 'redirect'));
  contents.on('will-attach-webview', (event) => {
    event.preventDefault();
    log('denied a <webview>');
  });
  contents.setWindowOpenHandler(({ url }) => {
    log(`denied window.open of ${url.slice(0, 200)}`);
    return { action: 'deny' };
  });
}

function run(): void {
  const shield = new ShieldLabApp({ home: homeFromArgv(process.argv), log });
  const ipc = registerIpc({ app: shield, ipcMain, isTrustedSender: isTrustedFrame, log });
  let mainWindow: BrowserWindow | null = null;

  const createWindow = () => {
    const win = new BrowserWindow(mainWindowOptions({ preload: PRELOAD, devTools: !app.isPackaged }));
    const detach = ipc.attach(win.webContents);
    win.once('ready-to-show', () => win.show());
    win.on('closed', () => {
      detach();
      if (mainWindow === win) mainWindow = null;
    });
    win.loadURL(APP_ENTRY_URL).catch((err: unknown) => log(`could not load the renderer: ${String(err)}`));
    mainWindow = win;
  };

  app.on('web-contents-created', (_event, contents) => guardContents(contents));
  app.on('second-instance', () => {
    if (!mainWindow) return;
    if (mainWindow.isMinimized()) mainWindow.restore();
    mainWindow.focus();
  });
  // One window; closing it ends the session (on macOS too): keys leave memory with the process.
  app.on('window-all-closed', () => app.quit());
  // VMs started from the window run in this process (it serves their disks): power them down before quitting.
  let shutDown = false;
  app.on('will-quit', (event) => {
    if (shutDown) return;
    event.preventDefault();
    ipc.dispose();
    void shield.shutdown().finally(() => {
      shutDown = true;
      app.quit();
    });
  });

  app
    .whenReady()
    .then(() => {
      hardenSession(session.defaultSession);
      protocol.handle(APP_SCHEME, createRendererHandler({ root: RENDERER_DIR }));
      createWindow();
    })
    .catch((err: unknown) => {
      log(`startup failed: ${String(err)}`);
      app.exit(1);
    });
}
