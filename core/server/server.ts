// Web mode: the contract over HTTP (POST /api/call/<method>) and a WebSocket event stream
// (/api/events), plus the built renderer. Loopback only; a per-launch token on every request;
// Host and Origin checked against DNS rebinding and cross-site requests; a strict CSP.
// A call made under an X-Call-Id can be cancelled (POST /api/cancel/<callId>), and is cancelled
// when its client goes away before the answer: for every method alike, through CallContext.signal.
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { randomBytes, timingSafeEqual } from 'node:crypto';
import { readFile, stat } from 'node:fs/promises';
import { extname, join, normalize, sep } from 'node:path';
import { WebSocketServer, type WebSocket } from 'ws';
import type { ShieldLabApp } from '../app/service.ts';
import type { AppEvent, CallOutcome } from '../app/contract.ts';
import { ShieldError, toShieldError, type ErrorCode } from '../errors.ts';
import { contentSecurityPolicy, MIME, securityHeaders } from './web-policy.ts';

export interface ServerOptions {
  app: ShieldLabApp;
  port?: number;
  /** Folder with the built renderer (index.html + assets). */
  staticDir: string;
  log?: (line: string) => void;
}

export interface RunningServer {
  url: string;
  port: number;
  token: string;
  close(): Promise<void>;
}

const COOKIE = 'shieldlab_token';
const MAX_BODY = 1024 * 1024;
/** A call id as the bridge makes them (a UUID) and Electron IPC accepts them: short and printable. */
const CALL_ID = /^[\w.:-]{1,64}$/;

export function httpStatusFor(code: ErrorCode): number {
  switch (code) {
    case 'usage':
    case 'invalid_argument':
    case 'share_invalid':
    case 'shares_insufficient':
    case 'shares_mismatch':
    case 'backup_invalid':
    case 'kp_invalid':
    case 'vhdx_corrupt':
    case 'vhdx_unsupported':
    case 'vhdx_parent_invalid':
    case 'shield_invalid':
    case 'pfx_invalid':
    case 'guardian_invalid':
    case 'eventlog_invalid':
      return 400;
    case 'unauthorized':
    case 'wrong_passphrase':
    case 'wrong_password':
    case 'backup_wrong_key':
      return 401;
    case 'forbidden':
    case 'kp_signature_invalid':
    case 'kp_untrusted_owner':
    case 'kp_not_owner':
    case 'kp_unwrap_denied':
    case 'shield_key_mismatch':
    case 'vtpm_state_invalid':
    case 'shield_tampered':
    case 'shield_rollback':
    case 'integrity_violation':
    case 'release_denied':
    case 'health_certificate_invalid':
    case 'attestation_failed':
    case 'host_not_registered':
      return 403;
    case 'not_found':
    case 'vault_not_initialised':
      return 404;
    case 'already_exists':
    case 'vault_exists':
    case 'home_not_empty':
    case 'cancelled':
    case 'recovery_not_configured':
    case 'vault_busy':
    case 'guardian_in_use':
    case 'guardian_not_backed_up':
    case 'guardian_no_private_key':
    case 'vm_running':
      return 409;
    case 'locked':
      return 423;
    case 'keychain_unavailable':
    case 'keychain_entry_missing':
    case 'tpm_unavailable':
    case 'secure_boot_unavailable':
      return 503;
    case 'tpm_error':
    case 'tpm_malformed':
      return 502;
    default:
      return 500;
  }
}


function tokenFrom(req: IncomingMessage): string | null {
  const auth = req.headers.authorization;
  if (auth?.startsWith('Bearer ')) return auth.slice(7);
  for (const part of (req.headers.cookie ?? '').split(';')) {
    const [k, ...v] = part.trim().split('=');
    if (k === COOKIE) return v.join('=');
  }
  return null;
}

export async function startServer(opts: ServerOptions): Promise<RunningServer> {
  const token = randomBytes(24).toString('base64url');
  const tokenBuf = Buffer.from(token);
  const log = opts.log ?? (() => undefined);
  const validToken = (t: string | null) => t !== null && t.length === token.length && timingSafeEqual(Buffer.from(t), tokenBuf);
  let port = 0;
  const allowedHosts = () => new Set([`127.0.0.1:${port}`, `localhost:${port}`]);
  const allowedOrigins = () => new Set([`http://127.0.0.1:${port}`, `http://localhost:${port}`]);

  const headers = (res: ServerResponse) => {
    const csp = contentSecurityPolicy(`'self' ws://127.0.0.1:${port} ws://localhost:${port}`);
    for (const [k, v] of Object.entries(securityHeaders(csp))) res.setHeader(k, v);
  };
  const sendJson = (res: ServerResponse, status: number, body: unknown) => {
    headers(res);
    res.writeHead(status, { 'Content-Type': 'application/json; charset=utf-8' });
    res.end(JSON.stringify(body));
  };
  const refuse = (res: ServerResponse, code: 'unauthorized' | 'forbidden' | 'not_found' | 'usage', message: string) =>
    sendJson(res, httpStatusFor(code), { ok: false, error: { code, message } } satisfies CallOutcome);

  /** Host + Origin + token. Returns an error to send, or null when the request may proceed. */
  const gate = (req: IncomingMessage): { code: 'unauthorized' | 'forbidden'; message: string } | null => {
    if (!allowedHosts().has(req.headers.host ?? '')) return { code: 'forbidden', message: 'Unexpected Host header (DNS rebinding guard).' };
    const origin = req.headers.origin;
    if (origin !== undefined && !allowedOrigins().has(origin)) return { code: 'forbidden', message: 'Cross-origin request refused.' };
    if (!validToken(tokenFrom(req))) return { code: 'unauthorized', message: 'Missing or wrong session token: open the URL that `shieldlab serve` printed.' };
    return null;
  };

  const readBody = (req: IncomingMessage) =>
    new Promise<string>((resolve, reject) => {
      let size = 0;
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => {
        size += c.length;
        if (size > MAX_BODY) {
          reject(new ShieldError('invalid_argument', 'Request body too large.'));
          req.destroy();
        } else chunks.push(c);
      });
      req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
      req.on('error', reject);
    });

  /**
   * What /api/call and /api/cancel both ask of a POST, against cross-site requests: browsers always
   * send Origin on POST, so a bare POST without it must carry the bearer header; and a JSON body,
   * which no cross-site form can send without a preflight.
   */
  const postRefusal = (req: IncomingMessage): { code: 'forbidden' | 'usage'; message: string } | null => {
    if (req.headers.origin === undefined && !req.headers.authorization) return { code: 'forbidden', message: 'API calls need an Origin header or a bearer token.' };
    if (!(req.headers['content-type'] ?? '').startsWith('application/json')) {
      return { code: 'usage', message: 'API calls take a JSON body (Content-Type: application/json).' };
    }
    return null;
  };

  /** The calls running under an X-Call-Id, to cancel them by it; each removes itself when it ends. */
  const running = new Map<string, AbortController>();
  /** Every call running, with or without an id: closing the server stops them all. */
  const inFlight = new Set<AbortController>();

  const handleCall = async (req: IncomingMessage, res: ServerResponse, method: string) => {
    const refused = postRefusal(req);
    if (refused) return refuse(res, refused.code, refused.message);
    if (Number(req.headers['content-length'] ?? 0) > MAX_BODY) {
      res.setHeader('Connection', 'close');
      return sendJson(res, 413, { ok: false, error: { code: 'invalid_argument', message: 'Request body too large.' } } satisfies CallOutcome);
    }
    const header = req.headers['x-call-id'];
    const callId = typeof header === 'string' ? header : undefined;
    if (callId !== undefined && !CALL_ID.test(callId)) return refuse(res, 'usage', 'X-Call-Id takes 1 to 64 letters, digits and . : - _ only.');
    if (callId !== undefined && running.has(callId)) return refuse(res, 'usage', 'A call with this X-Call-Id is already running.');
    // Registered before the body is read: a cancel that overtakes a slow upload still finds the call.
    const controller = new AbortController();
    inFlight.add(controller);
    if (callId !== undefined) running.set(callId, controller);
    // The page was closed (or the client gave up) before the answer: nobody will read it, stop the work.
    // The socket's own 'close', not the request's: that one also fires once the body has been read.
    const socket = req.socket;
    const gone = () => {
      if (res.writableEnded) return;
      log(`client went away: cancelling ${method.slice(0, 100)}`);
      controller.abort();
    };
    socket.once('close', gone);
    try {
      const text = await readBody(req);
      let args: unknown;
      try {
        args = text.length ? JSON.parse(text) : {};
      } catch {
        throw new ShieldError('invalid_argument', 'The request body is not valid JSON.');
      }
      if (controller.signal.aborted) throw new ShieldError('cancelled', 'Cancelled before it started: nothing was written.');
      const ctx = callId !== undefined ? { callId, signal: controller.signal } : { signal: controller.signal };
      const result = await opts.app.invoke(decodeURIComponent(method), args, ctx);
      if (!res.destroyed) sendJson(res, 200, { ok: true, result } as CallOutcome);
    } catch (err) {
      const e = toShieldError(err);
      if (!res.destroyed) sendJson(res, httpStatusFor(e.code), { ok: false, error: e.toJSON() } as CallOutcome);
    } finally {
      socket.removeListener('close', gone);
      inFlight.delete(controller);
      if (callId !== undefined && running.get(callId) === controller) running.delete(callId);
    }
  };

  /** POST /api/cancel/<callId>: 204 when a running call was told to stop, 404 when none runs under that id. */
  const handleCancel = (req: IncomingMessage, res: ServerResponse, encodedId: string) => {
    req.resume(); // the body says nothing; drained so the connection can be reused
    const refused = postRefusal(req);
    if (refused) return refuse(res, refused.code, refused.message);
    let callId: string;
    try {
      callId = decodeURIComponent(encodedId);
    } catch {
      return refuse(res, 'usage', 'Malformed call id.');
    }
    const controller = running.get(callId);
    if (!controller) return refuse(res, 'not_found', 'No call is running under this id (it may have just ended).');
    if (!controller.signal.aborted) log('cancel requested');
    controller.abort();
    headers(res);
    res.writeHead(204);
    res.end();
  };

  const serveStatic = async (res: ServerResponse, urlPath: string) => {
    const root = normalize(opts.staticDir);
    let file = normalize(join(root, decodeURIComponent(urlPath)));
    if (file !== root && !file.startsWith(root + sep)) return refuse(res, 'not_found', 'Not found.');
    try {
      if ((await stat(file)).isDirectory()) file = join(file, 'index.html');
    } catch {
      file = join(root, 'index.html'); // single-page app: unknown paths get the shell
    }
    try {
      const body = await readFile(file);
      headers(res);
      res.writeHead(200, { 'Content-Type': MIME[extname(file)] ?? 'application/octet-stream' });
      res.end(body);
    } catch {
      refuse(res, 'not_found', 'The renderer is not built: run `npm run build`.');
    }
  };

  const server = createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://127.0.0.1');
    // The printed URL carries ?token=…: trade it for an HttpOnly, SameSite=Strict cookie and drop it from the address bar.
    const queryToken = url.searchParams.get('token');
    if (req.method === 'GET' && queryToken !== null) {
      if (!allowedHosts().has(req.headers.host ?? '')) return refuse(res, 'forbidden', 'Unexpected Host header (DNS rebinding guard).');
      if (!validToken(queryToken)) return refuse(res, 'unauthorized', 'Wrong session token.');
      headers(res);
      res.writeHead(303, { 'Set-Cookie': `${COOKIE}=${token}; HttpOnly; SameSite=Strict; Path=/`, Location: url.pathname });
      return res.end();
    }
    const denied = gate(req);
    if (denied) {
      log(`refused ${req.method} ${url.pathname}: ${denied.code}`);
      return refuse(res, denied.code, denied.message);
    }
    const call = /^\/api\/call\/([\w.%-]+)$/.exec(url.pathname);
    if (call && req.method === 'POST') return void handleCall(req, res, call[1]!);
    const cancel = /^\/api\/cancel\/([\w.:%-]+)$/.exec(url.pathname);
    if (cancel && req.method === 'POST') return handleCancel(req, res, cancel[1]!);
    if (url.pathname.startsWith('/api/')) return refuse(res, 'not_found', 'No such API route.');
    if (req.method !== 'GET' && req.method !== 'HEAD') return refuse(res, 'usage', 'Method not allowed.');
    return void serveStatic(res, url.pathname);
  });

  const wss = new WebSocketServer({ noServer: true, maxPayload: 64 * 1024 });
  const sockets = new Set<WebSocket>();
  const unsubscribe = opts.app.onEvent((e) => {
    const text = JSON.stringify(e);
    for (const s of sockets) s.send(text);
  });
  server.on('upgrade', (req, socket, head) => {
    const url = new URL(req.url ?? '/', 'http://127.0.0.1');
    const denied = gate(req);
    // WebSockets are not bound by the same-origin policy: the Origin check is mandatory here.
    if (denied || url.pathname !== '/api/events' || req.headers.origin === undefined) {
      log(`refused websocket ${url.pathname}: ${denied?.code ?? 'bad request'}`);
      socket.end(`HTTP/1.1 ${denied?.code === 'unauthorized' ? '401 Unauthorized' : '403 Forbidden'}\r\nConnection: close\r\n\r\n`);
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) => {
      sockets.add(ws);
      ws.send(JSON.stringify({ type: 'state', unlocked: opts.app.isUnlocked } satisfies AppEvent));
      ws.on('close', () => sockets.delete(ws));
      ws.on('message', () => ws.close(1003, 'events only'));
    });
  });

  await new Promise<void>((resolve, reject) => {
    server.once('error', (err) => reject(toShieldError(err)));
    server.listen(opts.port ?? 0, '127.0.0.1', () => resolve());
  });
  const address = server.address();
  port = typeof address === 'object' && address ? address.port : 0;
  return {
    url: `http://127.0.0.1:${port}/?token=${token}`,
    port,
    token,
    async close() {
      // Calls still running are stopped first: what they had half-made is removed before we exit.
      for (const controller of inFlight) controller.abort();
      unsubscribe();
      for (const s of sockets) s.terminate();
      wss.close();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      server.closeAllConnections();
    },
  };
}
